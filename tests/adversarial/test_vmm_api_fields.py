"""Attack: dstack's VMM fields as hostile input. Whoever may call the VMM API (the host's
operator, see test_vmm_api_access) sends values no backend here can honour or that would
smuggle something onto the log or into a CVM's sys-config: GPUs on a host without any,
hugepages / NUMA / no-TEE flags, bridge networking, KMS and gateway URLs that are not plain
https (credentials, control characters, queries, other schemes, hundreds of them), absurd
resize values, log queries out of range. Each is a 4xx naming the field and nothing is
appended. What a valid host-provided URL may do is in docs/threat-model.md: it picks where the
CVM looks, never whom it trusts (the CVM checks the KMS's RA-TLS evidence and ``kms:rpc``
usage, and the gateway's certificate against the CA it was given)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pydstack.actors.vmm import running_vmm
from pydstack.adapters.nats import EventStore
from pydstack.core.events import subject
from tests import vmmapi
from tests.vmm.conftest import VmmHost, compose, wait_until


@pytest.fixture
async def url(vmm_host: VmmHost) -> AsyncIterator[str]:
    async with running_vmm(vmm_host.store, vmm_host.launch()) as (_, ends):
        yield ends.url


def _create(vm_id: str, **kw: Any) -> dict[str, Any]:
    return {"id": vm_id, "name": vm_id, "image": "sandbox-busybox", "memory": 256,
            "compose_file": compose(), "stopped": True, **kw}  # fmt: skip


async def _post(url: str, rpc: str, body: dict[str, Any]) -> tuple[int, Any]:
    return await asyncio.to_thread(vmmapi.request, url, "POST", f"/prpc/{rpc}", body)


async def _refused(url: str, rpc: str, body: dict[str, Any], field: str) -> str:
    status, answer = await _post(url, rpc, body)
    assert 400 <= status < 500, (rpc, body, status, answer)
    assert answer["field"] == field, (body, answer)
    assert "\n" not in answer["error"], answer
    return str(answer["error"])


HOSTILE_CREATE: list[tuple[dict[str, Any], str]] = [
    ({"gpus": {"attach_mode": "all"}}, "gpus"),
    ({"gpus": {"attach_mode": "listed", "gpus": [{"slot": "0000:01:00.0"}]}}, "gpus"),
    ({"gpus": {"attach_mode": "listed", "gpus": [{"slot": "../../dev/mem"}]}}, "gpus"),
    ({"gpus": {"attach_mode": "everything"}}, "gpus"),
    ({"gpus": {"attach_mode": "all", "bridges": []}}, "gpus"),
    ({"hugepages": True}, "hugepages"),
    ({"pin_numa": True}, "pin_numa"),
    ({"no_tee": True}, "no_tee"),
    ({"networking": {"mode": "bridge"}}, "networking"),
    ({"networking": {"mode": "user; rm -rf /"}}, "networking"),
    ({"kms_urls": ["http://attacker.example:80"]}, "kms_urls"),
    ({"kms_urls": ["https://admin:hunter2@kms.example"]}, "kms_urls"),
    ({"kms_urls": ["https://kms.example\r\nX-Injected: 1"]}, "kms_urls"),
    ({"kms_urls": ["https://kms.example/?redirect=http://evil"]}, "kms_urls"),
    ({"kms_urls": [f"https://k{i}.example" for i in range(1000)]}, "kms_urls"),
    ({"kms_urls": ["https://" + "a" * 5000]}, "kms_urls"),
    ({"kms_urls": "https://not-a-list.example"}, "kms_urls"),
    ({"gateway_urls": ["file:///etc/shadow"]}, "gateway_urls"),
    ({"gateway_urls": ["https://gw.example:70000"]}, "gateway_urls"),
    ({"gateway_urls": ["javascript:alert(1)"]}, "gateway_urls"),
    ({"vcpu": -1}, "vcpu"),
    ({"vcpu": 2**32}, "vcpu"),
    ({"vcpu": 100000}, "vcpu"),
    ({"memory": 2**40}, "memory"),
    ({"disk_size": 10**9}, "disk_size"),
    ({"hugepage": False}, "hugepage"),  # a typo of a dstack field: refused by its name
]


async def test_hostile_create_fields_are_refused_by_name_and_append_nothing(
    url: str, store: EventStore
) -> None:
    for i, (extra, field) in enumerate(HOSTILE_CREATE):
        vm_id = f"hostile-{i}"
        await _refused(url, "CreateVm", _create(vm_id, **extra), field)
        assert await store.last_by_subject(subject("vm", vm_id)) is None, extra


async def test_gpus_on_a_host_without_any_are_refused_naming_the_slot(url: str) -> None:
    body = _create("g", gpus={"attach_mode": "listed", "gpus": [{"slot": "0000:3b:00.0"}]})
    error = await _refused(url, "CreateVm", body, "gpus")
    assert "0000:3b:00.0" in error and "ListGpus" in error


async def _stopped_vm(url: str, store: EventStore, vm_id: str) -> int:
    status, answer = await _post(url, "CreateVm", _create(vm_id, disk_size=2))
    assert status == 200, answer

    async def settled() -> int:  # placed and recorded stopped: nothing more comes by itself
        _, info = await _post(url, "GetInfo", {"id": vm_id})
        last = await store.last_by_subject(subject("vm", vm_id))
        return last.seq if info["info"]["status"] == "stopped" and last is not None else 0

    return int(await wait_until(settled, 20, f"{vm_id} stopped"))


HOSTILE_UPDATE: list[tuple[str, dict[str, Any], str]] = [
    ("ResizeVm", {"vcpu": 0}, "vcpu"),
    ("ResizeVm", {"vcpu": 2**32 + 1}, "vcpu"),
    ("ResizeVm", {"vcpu": 10**6}, "vcpu"),
    ("ResizeVm", {"memory": -5}, "memory"),
    ("ResizeVm", {"memory": 0}, "memory"),
    ("ResizeVm", {"memory": 4_000_000_000}, "memory"),
    ("ResizeVm", {"disk_size": 1}, "disk_size"),  # shrinks
    ("ResizeVm", {"disk_size": 4_000_000_000}, "disk_size"),
    ("ResizeVm", {"image": "../../etc"}, "image"),
    ("ResizeVm", {"image": ""}, "image"),
    ("ResizeVm", {}, "vcpu"),
    ("ResizeVm", {"vcpus": 2}, "vcpus"),
    ("UpgradeApp", {"gpus": {"attach_mode": "all"}}, "gpus"),
    ("UpgradeApp", {"no_tee": True}, "no_tee"),
    ("UpgradeApp", {"update_kms_urls": True, "kms_urls": ["http://x"]}, "kms_urls"),
    ("UpdateVm", {"update_gateway_urls": True, "gateway_urls": ["https://a b"]}, "gateway_urls"),
    ("UpdateVm", {"compose_file": "not json"}, "compose_file"),
    ("UpdateVm", {"compose_file": "[1, 2]"}, "compose_file"),
]


async def test_hostile_updates_and_resizes_are_refused_by_name_and_append_nothing(
    url: str, store: EventStore
) -> None:
    seq = await _stopped_vm(url, store, "target")
    for rpc, extra, field in HOSTILE_UPDATE:
        await _refused(url, rpc, {"id": "target", **extra}, field)
        last = await store.last_by_subject(subject("vm", "target"))
        assert last is not None and last.seq == seq, (rpc, extra)


async def test_update_and_resize_of_an_unknown_vm_is_404(url: str, store: EventStore) -> None:
    for rpc in ("ResizeVm", "UpgradeApp", "UpdateVm"):
        status, answer = await _post(url, rpc, {"id": "ghost", "vcpu": 1})
        assert status == 404 and answer["field"] == "id", (rpc, answer)
    assert await store.last_by_subject(subject("vm", "ghost")) is None


async def test_env_pubkey_checks_the_app_id_and_needs_a_kms(url: str) -> None:
    await _refused(url, "GetAppEnvEncryptPubKey", {"app_id": "zz"}, "app_id")
    await _refused(url, "GetAppEnvEncryptPubKey", {"app_id": "ab" * 32}, "app_id")
    status, answer = await _post(url, "GetAppEnvEncryptPubKey", {"app_id": "ab" * 20})
    assert status == 503 and answer["field"] == "kms_urls", answer


async def test_hostile_log_queries_are_400_or_404_naming_the_parameter(
    url: str, store: EventStore
) -> None:
    await _stopped_vm(url, store, "logged")
    for query, status, field in [
        ("id=logged&lines=-1", 400, "lines"),
        ("id=logged&lines=99999999999999999999", 400, "lines"),
        ("id=logged&lines=1e3", 400, "lines"),
        ("id=logged&follow=maybe", 400, "follow"),
        ("id=logged&ansi=2", 400, "ansi"),
        ("id=logged&ch=../../etc/passwd", 400, "ch"),
        ("id=logged&ch=stdout", 400, "ch"),
        ("lines=5", 400, "id"),
        ("id=../../../etc/passwd", 404, "id"),
        ("id=nope", 404, "id"),
    ]:
        got, answer = await asyncio.to_thread(vmmapi.request, url, "GET", f"/logs?{query}")
        assert (got, answer["field"]) == (status, field), (query, got, answer)
