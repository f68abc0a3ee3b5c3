"""Pure folds of the event log into read models, and the placement decision.

Every fold is ``apply(state | None, applied) -> state | None`` over one aggregate, with frozen
state changed by copy; the same functions serve actors, the CLI, the SQLite read models and
the auditor. Usage::

    from pydstack.core import projections as p

    state = p.fold(p.applied(seq, data) for seq, data in messages)  # skip None in real code
    state.vms["vm-1"].state  # "running"
"""

from . import apps, hosts, vms
from ._applied import Applied, admit, applied, from_allowed
from ._world import Model, Projections, fold, route
from .apps import App
from .hosts import Host, Placement, decide_placement
from .vms import READY_STAGES, Desired, Vm, VmState

__all__ = [
    "READY_STAGES", "App", "Applied", "Desired", "Host", "Model", "Placement", "Projections",
    "Vm", "VmState", "admit", "applied", "apps", "decide_placement", "fold", "from_allowed",
    "hosts", "route", "vms",
]  # fmt: skip
