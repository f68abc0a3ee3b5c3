"""dstack's ``VmConfiguration`` fields beyond name, image, resources and ports: what a host
here honours, and a :class:`Refused` naming the field for what it cannot.

Honoured: ``kms_urls`` / ``gateway_urls`` (the VM's own sys-config entries, checked here to be
plain ``https://`` URLs), ``networking.mode`` ``user`` (the only mode), ``gpus`` that ask for
none. Refused by name: GPUs (no host here has any), ``hugepages``, ``pin_numa``, ``no_tee``
and the ``bridge`` / ``custom`` networking modes::

    urls = check_service_urls("kms_urls", ["https://kms.example:9201"])
    check_gpus("listed", [], available=())           # fine: no GPU asked for
    check_host_options(hugepages=True)               # Refused("hugepages", ...)
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Final
from urllib.parse import urlsplit

from .requests import Refused

MAX_URLS: Final = 8  # per list; dstack's CLI sends one or two
MAX_URL_CHARS: Final = 512
NETWORKING_MODES: Final = ("user", "bridge", "custom")  # dstack's; only "user" exists here
GPU_ATTACH_MODES: Final = ("listed", "all")


def check_service_urls(field: str, urls: Sequence[str]) -> tuple[str, ...]:
    """``urls`` as a tuple when each is an ``https://`` URL with a host and nothing else
    worth hiding or smuggling: no credentials (they would sit on the log in the clear), no
    query or fragment, no whitespace or control characters, at most ``MAX_URL_CHARS`` each
    and ``MAX_URLS`` in all."""
    if len(urls) > MAX_URLS:
        raise Refused(field, f"{field}: {len(urls)} URLs, at most {MAX_URLS}")
    for url in urls:
        shown = url[:80] + ("…" if len(url) > 80 else "")
        if len(url) > MAX_URL_CHARS:
            raise Refused(field, f"{field}: {shown!r} is over {MAX_URL_CHARS} characters")
        if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
            raise Refused(field, f"{field}: {shown!r} holds whitespace or control characters")
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError on a port that is no number/out of range
        except ValueError as exc:
            raise Refused(field, f"{field}: {shown!r} is not a URL ({exc})") from None
        if parts.scheme != "https" or not parts.hostname:
            raise Refused(field, f"{field}: {shown!r} is not an https:// URL with a host")
        if parts.username is not None or parts.password is not None:
            raise Refused(field, f"{field}: {shown!r} holds credentials; they would be on "
                          "the log in the clear")  # fmt: skip
        if parts.query or parts.fragment:
            raise Refused(field, f"{field}: {shown!r} has a query or fragment")
    return tuple(urls)


def check_gpus(attach_mode: str, slots: Sequence[str], *, available: Collection[str]) -> None:
    """GPUs asked for (dstack's ``GpuConfig``) against the host's ``available`` slots: none
    asked (``listed`` with no slot, or no mode) is fine; ``all`` or a slot the host does not
    have is refused naming it."""
    if attach_mode not in ("", *GPU_ATTACH_MODES):
        raise Refused("gpus", f"gpus.attach_mode {attach_mode[:40]!r} is not 'listed' or 'all'")
    have = ", ".join(sorted(available)) or "none: ListGpus lists nothing"
    if attach_mode == "all":
        if not available:
            raise Refused("gpus", f"gpus: attach_mode 'all' asks for every GPU; this host has "
                          f"{have}")  # fmt: skip
        raise Refused("gpus", "gpus: attach_mode 'all' is not allowed (allow_attach_all: false)")
    for slot in slots:
        if slot not in available:
            raise Refused("gpus", f"gpus: GPU {slot[:40]!r} is not on this host (it has {have})")
    if slots:  # every slot exists: still nothing passes a GPU through yet
        raise Refused("gpus", "gpus: this VMM cannot pass GPUs through to a CVM")


def check_networking(mode: str) -> None:
    """dstack's per-VM ``networking.mode``: empty (the host's) or ``user``, the only one."""
    if mode in ("", "user"):
        return
    if mode in NETWORKING_MODES:
        raise Refused("networking", f"networking.mode {mode!r} is not offered here "
                      "(supported: user)")  # fmt: skip
    raise Refused("networking", f"networking.mode {mode[:40]!r} is not one of "
                  f"{', '.join(NETWORKING_MODES)}")  # fmt: skip


def check_host_options(*, hugepages: bool = False, pin_numa: bool = False,
                       no_tee: bool = False) -> None:  # fmt: skip
    """dstack's host-tuning flags: accepted when false (as its CLI sends them), each refused
    by name when set, since no backend here can do it."""
    if hugepages:
        raise Refused("hugepages", "hugepages: this VMM does not back CVM memory with "
                      "hugepages; leave it false")  # fmt: skip
    if pin_numa:
        raise Refused("pin_numa", "pin_numa: this VMM does not pin CVMs to NUMA nodes; "
                      "leave it false")  # fmt: skip
    if no_tee:
        raise Refused("no_tee", "no_tee: every CVM here runs in its TEE (TDX, or the sandbox's "
                      "simulated one); a VM without one is not offered")  # fmt: skip
