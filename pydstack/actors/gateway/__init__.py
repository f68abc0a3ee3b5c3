"""The gateway actors: registration (RegisterCvm over mutual RA-TLS), the cluster view every
node folds, and the recycler. See ``registrar``, ``registration``, ``view``, ``recycler``."""

from .recycler import RecycleConfig, Recycler
from .registrar import Contended, Registrar, RegistrarConfig
from .view import ClusterView, LedgerView

__all__ = [
    "ClusterView", "Contended", "LedgerView", "RecycleConfig", "Recycler", "Registrar",
    "RegistrarConfig",
]  # fmt: skip
