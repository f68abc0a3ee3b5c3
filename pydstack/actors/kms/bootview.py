"""The BootInfo a backend is asked about, as dstack v0.5.11's KMS builds it (`build_boot_info`).

dstack's BootInfo carries `key_provider_info`: the payload of the attestation's `key-provider`
runtime event (a CVM asking after its boot, a KMS replica), empty when there is none (a
first boot asks for keys before emitting it) and for SignCert, which decides on the boot-time
view (`certgrants.at_boot`). `with_key_provider` adds it to verified evidence; the auditor's
re-check (`recheck`) adds it the same way, so a recorded decision re-derives byte for byte.

    ev = with_key_provider(ev)           # before the backend is asked and the decision stored
    audit_kms_log(events, make_recheck(lambda _q: coll, root_der), boot_time_of)
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from pydstack.adapters.tdx.attestation import AttestationDecodeError, decode_attestation
from pydstack.adapters.tdx.collateral import Collateral
from pydstack.adapters.tdx.identity import find_event_payload
from pydstack.core.events import BootInfo

from . import evidence
from .evidence import Evidence

Recheck = Callable[[bytes, str, str, int], tuple[list[str], BootInfo | None, str]]


def with_key_provider(ev: Evidence) -> Evidence:
    """`ev` whose BootInfo names the key provider its app info read (hex, "" for none)."""
    if ev.boot is None or ev.app_info is None or not ev.app_info.key_provider_info:
        return ev
    boot = msgspec.structs.replace(ev.boot, key_provider_info=ev.app_info.key_provider_info.hex())
    return msgspec.structs.replace(ev, boot=boot)


def recheck(inner: Recheck) -> Recheck:
    """The auditor's re-check `inner` whose BootInfo names the key provider as the KMS did."""

    def checked(raw: bytes, vm_config: str, policy: str, at: int) -> tuple[
        list[str], BootInfo | None, str
    ]:  # fmt: skip
        reasons, boot, qh = inner(raw, vm_config, policy, at)
        if boot is None:
            return reasons, boot, qh
        try:
            found = find_event_payload(decode_attestation(raw).runtime_events, "key-provider")
        except AttestationDecodeError:
            return reasons, boot, qh  # `inner` reports the attestation itself
        if found:
            boot = msgspec.structs.replace(boot, key_provider_info=found.hex())
        return reasons, boot, qh

    return checked


def make_recheck(collateral: Callable[[bytes], Collateral], root_ca_der: bytes | None) -> Recheck:
    """The auditor's `Recheck` for `pydstack.core.kms.audit_kms_log` (the evidence check's,
    with the key provider)."""
    return recheck(evidence.make_recheck(collateral, root_ca_der))
