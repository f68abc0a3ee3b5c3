"""Pure VMM decisions: the per-host plan, dstack's restart policy, request checks, the fold."""

from . import record
from .image_name import IMAGE_NAME, image_name_error
from .options import check_gpus, check_host_options, check_networking, check_service_urls
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
    MAX_DISK_GB,
    NAME,
    Refused,
    check_disk,
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
    "IMAGE_NAME", "MAX_DISK_GB", "NAME", "Action", "Adopt", "Append", "Discard", "Observed",
    "RecordExited", "RecordStopped", "Refused", "Release", "Remove", "RestartDecision",
    "RestartNow", "RestartPolicy", "RestartTrack", "Start", "Stop", "VmRecord", "check_disk",
    "check_gpus", "check_host_options", "check_image", "check_image_name", "check_networking",
    "check_ports", "check_resources", "check_service_urls", "decide_command", "decide_create",
    "decide_restart", "decide_update", "image_name_error", "plan", "plan_vm", "record",
]  # fmt: skip
