"""The "sim" CVM backend: a load generator for ``bench.scale`` and tests, never a real CVM."""

from .backend import KIND, PLATFORM, BootHook, Report, SimBackend, SimConfig

__all__ = ["KIND", "PLATFORM", "BootHook", "Report", "SimBackend", "SimConfig"]
