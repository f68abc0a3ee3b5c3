"""dstack's vmm-cli ``deploy`` of an app-compose whose fields the guest cannot honour is refused
by the VMM API, naming the field, with nothing appended; vmm-cli's other composes are taken
(files: tests/vectors/dstack/app-compose, written by vmm-cli v0.5.11 ``compose``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pydstack.actors.vmm import running_vmm
from pydstack.adapters.nats import EventStore
from pydstack.core.events import subject
from tests import vmmapi
from tests.vmm.conftest import VmmHost

OUT = Path(__file__).parents[1] / "vectors" / "dstack" / "app-compose" / "out"


@pytest.fixture
async def url(vmm_host: VmmHost) -> AsyncIterator[str]:
    async with running_vmm(vmm_host.store, vmm_host.launch()) as (_, ends):
        yield ends.url


async def _post(url: str, rpc: str, body: dict[str, Any]) -> tuple[int, Any]:
    return await asyncio.to_thread(vmmapi.request, url, "POST", f"/prpc/{rpc}", body)


def _create(vm_id: str, case: str) -> dict[str, Any]:
    return {"id": vm_id, "name": vm_id, "image": "sandbox-busybox", "memory": 256,
            "compose_file": (OUT / f"{case}.json").read_text(), "stopped": True}  # fmt: skip


async def test_create_vm_refuses_unhonoured_compose_fields_by_name(
    url: str, store: EventStore
) -> None:
    cases = {"secure-time": "secure_time", "prelaunch": "pre_launch_script",
             "swap-4g": "swap_size", "everything": "no_instance_id"}  # fmt: skip
    for case, field in cases.items():
        status, answer = await _post(url, "CreateVm", _create(f"r-{case}", case))
        assert status == 400 and answer["field"] == "compose_file", answer
        assert answer["error"].startswith(f"compose_file.{field}: "), answer
        assert "\n" not in answer["error"]
        assert await store.last_by_subject(subject("vm", f"r-{case}")) is None
    status, answer = await _post(url, "CreateVm", _create("ok", "deploy-default"))
    assert status == 200, answer
    status, answer = await _post(url, "UpgradeApp", {"id": "ok", "compose_file": (
        OUT / "swap-4g.json").read_text()})  # fmt: skip
    assert status == 400 and answer["error"].startswith("compose_file.swap_size: "), answer
