"""Which platform this host's CVMs run on: pure, from probe facts to a ``PlatformChoice``.

``choose_platform(wanted, facts)`` is the whole rule (``up --platform auto|tdx|kvm|tcg``):

- ``tdx`` when the host's KVM reports TDX (``/sys/module/kvm_intel/parameters/tdx`` is ``Y``)
  and the installed QEMU has the ``tdx-guest`` object (upstream QEMU 10.1 and later, or the
  build dstack's VMM ships; Debian 12's 7.2 has none);
- ``kvm`` only when a probe guest actually booted under KVM with the CPU model and machine
  the real KVM command line uses (``/dev/kvm`` opening is not enough: on these machines guests
  abort with ``-cpu host`` and hang with ``qemu64``);
- ``tcg`` otherwise (software emulation: no TEE, the guest simulates its TD).

``auto`` takes the first that holds and says why the better ones did not; an explicit
platform that the host lacks is refused in one line naming what is missing. The facts come
from ``adapters.qemu.probe``; the KVM probe is run only when the answer depends on it
(``kvm`` is ``None`` when it was not run).

>>> facts = HostFacts(tdx_param=None, qemu_objects=frozenset({"sev-guest"}),
...                   qemu_version="7.2.22", kvm=KvmProbe(ok=False, detail="no /dev/kvm"))
>>> choose_platform("auto", facts).platform
'tcg'
"""

from __future__ import annotations

from typing import Final, Literal

import msgspec

from .argv import Platform

Wanted = Literal["auto", "tdx", "kvm", "tcg"]
WANTED: Final[tuple[Wanted, ...]] = ("auto", "tdx", "kvm", "tcg")
TDX_PARAM: Final = "/sys/module/kvm_intel/parameters/tdx"
TDX_OBJECT: Final = "tdx-guest"


class PlatformRefused(ValueError):
    """The platform asked for is not available on this host; the message names what is missing."""


class KvmProbe(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    detail: str  # what happened: "booted in 0.05 s", "qemu aborted: ...", "no answer within 5 s"


class HostFacts(msgspec.Struct, frozen=True, kw_only=True):
    tdx_param: str | None  # the TDX_PARAM file's content; None: missing (no kvm_intel / no TDX)
    qemu_objects: frozenset[str] | None  # ``qemu -object help``; None: QEMU did not run
    qemu_version: str = ""  # "7.2.22"; "" unknown
    qemu_error: str = ""  # why QEMU did not run (qemu_objects is None)
    kvm: KvmProbe | None = None  # None: not probed (the answer did not depend on it)


class PlatformChoice(msgspec.Struct, frozen=True, kw_only=True):
    platform: Platform
    reason: str  # one line: why this platform (and, for auto, why not the better ones)


def tdx_missing(facts: HostFacts) -> list[str]:
    """What this host lacks for TDX guests (empty: it has everything)."""
    missing = []
    if facts.tdx_param is None:
        missing.append(f"{TDX_PARAM} is missing (no kvm_intel with TDX)")
    elif facts.tdx_param.strip() not in ("Y", "y", "1"):
        missing.append(f"{TDX_PARAM} is {facts.tdx_param.strip()!r} (KVM has TDX off)")
    if facts.qemu_objects is None:
        missing.append(f"QEMU did not run ({facts.qemu_error or 'unknown error'})")
    elif TDX_OBJECT not in facts.qemu_objects:
        ver = f"QEMU {facts.qemu_version}" if facts.qemu_version else "the installed QEMU"
        missing.append(f"{ver} has no {TDX_OBJECT} object (needs QEMU 10.1+ or dstack's build)")
    return missing


def kvm_missing(facts: HostFacts) -> str:
    """Why KVM guests cannot run here ("" when the probe guest booted)."""
    if facts.qemu_objects is None:
        return f"QEMU did not run ({facts.qemu_error or 'unknown error'})"
    if facts.kvm is None:
        return "the KVM probe was not run"
    return "" if facts.kvm.ok else f"the KVM probe guest did not boot: {facts.kvm.detail}"


def needs_kvm_probe(wanted: Wanted, facts: HostFacts) -> bool:
    """Whether the choice depends on the KVM probe (so it is run only then)."""
    return wanted == "kvm" or (wanted == "auto" and bool(tdx_missing(facts)))


def choose_platform(wanted: Wanted, facts: HostFacts) -> PlatformChoice:
    """The platform for ``wanted`` on a host with ``facts``; raises ``PlatformRefused``."""
    if wanted == "tcg":
        return PlatformChoice(platform="tcg", reason="asked for (--platform tcg): no TEE")
    no_tdx = tdx_missing(facts)
    if wanted == "tdx":
        if no_tdx:
            raise PlatformRefused("--platform tdx: this host has no TDX: " + "; ".join(no_tdx))
        return PlatformChoice(platform="tdx", reason=_tdx_reason(facts, "asked for"))
    if wanted == "auto" and not no_tdx:
        return PlatformChoice(platform="tdx", reason=_tdx_reason(facts, "auto"))
    no_kvm = kvm_missing(facts)
    if wanted == "kvm":
        if no_kvm:
            raise PlatformRefused(f"--platform kvm: {no_kvm}")
        return PlatformChoice(platform="kvm", reason=f"asked for; KVM probe: {_probe(facts)}")
    if not no_kvm:
        return PlatformChoice(
            platform="kvm",
            reason=f"auto: no TDX ({'; '.join(no_tdx)}); KVM probe: {_probe(facts)}; no TEE",
        )
    return PlatformChoice(
        platform="tcg", reason=f"auto: no TDX ({'; '.join(no_tdx)}); no KVM ({no_kvm}); no TEE"
    )


def _tdx_reason(facts: HostFacts, how: str) -> str:
    ver = f"QEMU {facts.qemu_version}" if facts.qemu_version else "QEMU"
    return f"{how}: KVM reports TDX and {ver} has {TDX_OBJECT}"


def _probe(facts: HostFacts) -> str:
    return facts.kvm.detail if facts.kvm is not None else "not run"
