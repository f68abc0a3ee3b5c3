"""dstack's VmConfiguration fields, without processes: what ``core.vmm.options`` accepts and
refuses, the VM's own KMS / gateway URLs in its sys-config, and the console tail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pydstack.actors.vmm import vm_info
from pydstack.actors.vmm._logs import _Cleaner, tail_offset
from pydstack.actors.vmm._workdir import build_spec
from pydstack.core.events import (
    VmBootError,
    VmBootProgress,
    VmRequested,
    VmResources,
    VmUpdated,
    VmUpdateRequested,
)
from pydstack.core.projections import Applied
from pydstack.core.vmm import (
    Refused,
    VmRecord,
    check_gpus,
    check_host_options,
    check_networking,
    check_service_urls,
    record,
)


def _fold(*events: object) -> VmRecord:
    rec = None
    for i, e in enumerate(events, 1):
        rec = record.apply(rec, Applied(seq=i, id=f"e{i}", event=e, time_ns=i))  # type: ignore[arg-type]
    assert rec is not None
    return rec


def _requested(**kw: object) -> VmRequested:
    return VmRequested(vm_id="v1", app_id="ab" * 20, name="w", image="img", compose=b"{}",
                       resources=VmResources(vcpu=1, memory_mb=256), **kw)  # type: ignore[arg-type]  # fmt: skip


def _sys_config(rec: VmRecord, **host: tuple[str, ...]) -> dict[str, object]:
    spec = build_spec(rec, {}, **host)  # type: ignore[arg-type]
    doc: dict[str, object] = json.loads(spec.shared_files[".sys-config.json"])
    return doc


def test_a_vms_own_kms_and_gateway_urls_replace_the_hosts_in_its_sys_config() -> None:
    """As dstack's manifest: the VM's URLs when it has some, else the host's."""
    host = {"kms_urls": ("https://host-kms:1",), "gateway_urls": ("https://host-gw:2",)}
    own = _fold(_requested(kms_urls=("https://k2:9",), gateway_urls=("https://g2:9",)))
    assert _sys_config(own, **host)["kms_urls"] == ["https://k2:9"]
    assert _sys_config(own, **host)["gateway_urls"] == ["https://g2:9"]
    plain = _fold(_requested())
    assert _sys_config(plain, **host)["kms_urls"] == ["https://host-kms:1"]
    assert _sys_config(plain, **host)["gateway_urls"] == ["https://host-gw:2"]


def test_an_accepted_update_sets_or_clears_the_vms_urls_and_none_keeps_them() -> None:
    req = VmUpdateRequested(vm_id="v1", kms_urls=("https://k3:9",))
    rec = _fold(_requested(gateway_urls=("https://g:1",)), req,
                VmUpdated(vm_id="v1", request="e2"))  # fmt: skip
    assert (rec.kms_urls, rec.gateway_urls) == (("https://k3:9",), ("https://g:1",))
    clear = VmUpdateRequested(vm_id="v1", gateway_urls=())
    rec = _fold(_requested(gateway_urls=("https://g:1",)), clear,
                VmUpdated(vm_id="v1", request="e2"))  # fmt: skip
    assert rec.gateway_urls == ()


def test_plain_https_urls_are_kept_as_given() -> None:
    urls = ["https://kms.example:9201", "https://10.0.0.1/prpc", "https://[::1]:8000"]
    assert check_service_urls("kms_urls", urls) == tuple(urls)
    assert check_service_urls("gateway_urls", []) == ()


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://kms:1", "https://"),
        ("https://", "https://"),
        ("file:///etc/passwd", "https://"),
        ("https://user:secret@kms:1", "credentials"),
        ("https://kms:1/?next=evil", "query"),
        ("https://kms:1/#x", "query"),
        ("https://kms:1\n/x", "control"),
        ("https://kms :1", "whitespace"),
        ("https://kms:99999", "not a URL"),
        ("https://kms:1/" + "a" * 600, "over 512"),
    ],
)
def test_a_url_that_is_not_plain_https_is_refused_by_field(url: str, why: str) -> None:
    with pytest.raises(Refused) as e:
        check_service_urls("gateway_urls", [url])
    assert e.value.field == "gateway_urls" and why in str(e.value), str(e.value)


def test_more_than_eight_urls_are_refused() -> None:
    with pytest.raises(Refused, match="at most 8"):
        check_service_urls("kms_urls", [f"https://k{i}:1" for i in range(9)])


def test_gpus_that_ask_for_none_pass_and_any_gpu_is_refused_by_name() -> None:
    check_gpus("", [], available=())
    check_gpus("listed", [], available=())
    for mode, slots, words in [
        ("all", [], "attach_mode 'all'"),
        ("listed", ["0000:01:00.0"], "'0000:01:00.0' is not on this host"),
        ("some", [], "not 'listed' or 'all'"),
    ]:
        with pytest.raises(Refused) as e:
            check_gpus(mode, slots, available=())
        assert e.value.field == "gpus" and words in str(e.value), str(e.value)


def test_host_flags_pass_when_false_and_each_is_refused_by_name_when_set() -> None:
    check_host_options(hugepages=False, pin_numa=False, no_tee=False)
    for flag in ("hugepages", "pin_numa", "no_tee"):
        with pytest.raises(Refused) as e:
            check_host_options(**{flag: True})
        assert e.value.field == flag and str(e.value).startswith(flag)


def test_user_networking_passes_and_other_modes_are_refused() -> None:
    check_networking("")
    check_networking("user")
    for mode, words in [("bridge", "not offered here"), ("custom", "not offered"),
                        ("macvtap", "not one of")]:  # fmt: skip
        with pytest.raises(Refused, match=words):
            check_networking(mode)


def test_the_tail_starts_at_the_last_n_lines(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    log.write_bytes(b"".join(b"line %d\n" % i for i in range(50000)))
    data = log.read_bytes()
    assert data[tail_offset(log, 2) :] == b"line 49998\nline 49999\n"
    assert tail_offset(log, None) == 0 and tail_offset(log, 10**6) == 0
    assert tail_offset(log, 0) == len(data)
    log.write_bytes(b"a\nb\nno newline yet")
    assert log.read_bytes()[tail_offset(log, 2) :] == b"b\nno newline yet"


def test_ansi_escapes_are_stripped_even_when_a_chunk_cuts_one() -> None:
    c = _Cleaner()
    out = c.feed(b"\x1b[31mred\x1b[0m \x1b]0;title\x07ok\n\x1b[3") + c.feed(b"2mgreen\n")
    assert out == b"red ok\ngreen\n"
    assert c.feed(b"tail \x1b[1mbold", final=True) == b"tail bold"


def test_guest_reports_are_getinfos_events_the_last_twenty_as_dstack_keeps() -> None:
    """dstack's GuestEvent list: ``boot.progress`` / ``boot.error``, body, milliseconds."""
    reports = [VmBootProgress(vm_id="v1", stage=f"s{i}") for i in range(25)]
    rec = _fold(_requested(), *reports, VmBootError(vm_id="v1", stage="keys", error="denied"))
    events = vm_info(rec)["events"]
    assert len(events) == 20 and events[0] == {"event": "boot.progress", "body": "s6",
                                               "timestamp": 0}  # fmt: skip
    assert events[-1] == {"event": "boot.error", "body": "keys: denied", "timestamp": 0}
