"""Fixtures of the suites the attacks run against (a real VMM host: NATS, scheduler, sandbox
backend under a real supervisor)."""

from tests.vmm.conftest import images, scheduled, vmm_host

__all__ = ["images", "scheduled", "vmm_host"]
