"""Pure VMM decisions: the per-host plan, dstack's restart policy, request checks, the fold."""

from . import record
from .image_name import IMAGE_NAME, image_name_error
from .plan import (
    Action,
    Adopt,
    Append,
    Discard,
    Observed,
    RecordExited,
    RecordStopped,
    Release,
    Remove,
    Start,
    Stop,
    plan,
    plan_vm,
)
from .record import VmRecord
from .requests import (
    NAME,
    Refused,
    check_image,
    check_image_name,
    check_ports,
    check_resources,
    decide_command,
    decide_create,
    decide_update,
)
from .restart import RestartDecision, RestartNow, RestartPolicy, RestartTrack, decide_restart

__all__ = [
    "IMAGE_NAME", "NAME", "Action", "Adopt", "Append", "Discard", "Observed", "RecordExited",
    "RecordStopped", "Refused", "Release", "Remove", "RestartDecision", "RestartNow",
    "RestartPolicy", "RestartTrack", "Start", "Stop", "VmRecord", "check_image",
    "check_image_name", "check_ports", "check_resources", "decide_command", "decide_create",
    "decide_restart", "decide_update", "image_name_error", "plan", "plan_vm", "record",
]  # fmt: skip
