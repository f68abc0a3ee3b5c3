"""The authorization port of the KMS: pure types shared by every backend.

A backend answers two questions about an attested CVM, described by its ``BootInfo``: may this
app get its keys (``authorize_app``), and may this KMS instance join the cluster
(``authorize_kms``). Backends: ``webhook`` (dstack auth-simple protocol), ``eth`` (on-chain
allow-lists) and ``dev`` (allow-all, refused unless explicitly enabled).

Usage::

    verdict = await backend.authorize_app(boot)
    if not verdict.is_allowed:
        deny(verdict.reason)
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from pydstack.core.events.kms import BootInfo

__all__ = ["AuthBackend", "AuthVerdict", "BootInfo"]


class AuthVerdict(msgspec.Struct, frozen=True):
    """A backend's answer (dstack's ``BootResponse``: isAllowed, reason, gatewayAppId)."""

    is_allowed: bool
    reason: str = ""
    gateway_app_id: str = ""


class AuthBackend(Protocol):
    """An authorization backend. ``name`` is recorded in ``KeyIssued.backend``."""

    name: str

    async def authorize_app(self, boot: BootInfo) -> AuthVerdict:
        """May the app described by ``boot`` receive its keys?"""
        ...

    async def authorize_kms(self, boot: BootInfo) -> AuthVerdict:
        """May the KMS instance described by ``boot`` receive the root keys?"""
        ...
