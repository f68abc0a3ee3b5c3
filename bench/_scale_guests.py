"""bench.scale's simulated guests, in a process of their own (LOAD GENERATOR, no CVM).

    python -m bench._scale_guests PKI_DIR CA_DIR N   # JSON lines in on stdin, out on stdout

Each request line ``{"vm", "kms", "gateways"}`` is one sim CVM's boot, at most N at once (one
process cannot be every CVM's vCPUs: timed from when its boot begins, a guest's latency would
otherwise hold the other guests' crypto): its keys from the KMS as a guest asks
(``KmsKeyProvider``, a quote simulated by the dev PKI in PKI_DIR, measured as the registered
test image), then RegisterCvm with each gateway in turn (``Gateways.register``: a client
certificate under the dev CA in CA_DIR).
Answers, one line each: ``{"vm", "stage": "keys", "ms"}``, ``{"vm", "stage": "gateway",
"ms", "url", "at"}``, then ``{"vm", "stage": "done"}`` or ``{"vm", "error"}``. Kept apart
from the VMM actors so that their lag is not this crypto's CPU (a real VMM shares nothing
with its guests).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench._scale_gateways import Gateways
from pydstack.adapters.tdx.pki import DevPki
from pydstack_guest.kms_provider import KmsKeyProvider
from pydstack_guest.kms_trust import KmsTrust
from tests.gateway.simcvm import DevCa
from tests.images import TEST_VM_CONFIG
from tests.kms.conftest import APP_ID, make_cvm


class GuestFarm:
    """The bench's side: starts this module as a process, sends boots, routes the answers to
    each VM's queue (``boot`` yields them until ``done`` or ``error``)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.queues: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, pki: DevPki, ca: DevCa, tmp: Path, concurrency: int) -> GuestFarm:
        pki.save(tmp / "guest-pki")
        save_ca(ca, tmp / "guest-ca")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench._scale_guests", str(tmp / "guest-pki"),
            str(tmp / "guest-ca"), str(concurrency), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, limit=1 << 20,
        )  # fmt: skip
        assert proc.stdout is not None
        if json.loads(await proc.stdout.readline() or b"{}").get("ready") is not True:
            raise RuntimeError("the simulated guests' process did not start")
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            msg = json.loads(line)
            self.queues.setdefault(msg["vm"], asyncio.Queue()).put_nowait(msg)
        for q in self.queues.values():  # the process is gone: nobody waits forever
            q.put_nowait({"error": "the simulated guests' process exited"})

    async def boot(self, vm: str, kms: str, gateways: list[str]) -> asyncio.Queue[dict[str, Any]]:
        q = self.queues.setdefault(vm, asyncio.Queue())
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"vm": vm, "kms": kms, "gateways": gateways}).encode()
                              + b"\n")  # fmt: skip
        await self.proc.stdin.drain()
        return q

    async def aclose(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        if self.proc.returncode is None:
            self.proc.terminate()
        await self.proc.wait()
        self._reader.cancel()


def save_ca(ca: DevCa, d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "ca.pem").write_text(ca.pem)
    key = ca.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())  # fmt: skip
    (d / "ca.key").write_bytes(key)


def load_ca(d: Path) -> DevCa:
    cert = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return DevCa(cert, key)


async def boot(
    pki: DevPki, trust: KmsTrust, gws: Gateways, req: dict[str, Any], room: asyncio.Semaphore
) -> None:
    vm = req["vm"]
    async with room:  # timed from here: a guest's time, not its wait for this process's CPU
        await _boot(pki, trust, gws, req, vm)


async def _boot(pki: DevPki, trust: KmsTrust, gws: Gateways, req: dict[str, Any],
                vm: str) -> None:  # fmt: skip
    try:
        instance = hashlib.sha256(vm.encode()).digest()[:20]
        cvm = await asyncio.to_thread(make_cvm, pki, instance_id=instance)
        provider = KmsKeyProvider(req["kms"], cvm.backend, trust=trust, app_id=APP_ID,
                                  vm_config=TEST_VM_CONFIG)  # fmt: skip
        t = time.perf_counter()
        await provider.app_keys()
        _say({"vm": vm, "stage": "keys", "ms": (time.perf_counter() - t) * 1000})
        if req["gateways"]:
            t = time.perf_counter()
            url = await gws.register(req["gateways"], vm, APP_ID)
            _say({"vm": vm, "stage": "gateway", "ms": (time.perf_counter() - t) * 1000,
                  "url": url, "at": time.time()})  # fmt: skip
        _say({"vm": vm, "stage": "done"})
    except Exception as exc:
        _say({"vm": vm, "error": f"{type(exc).__name__}: {exc}"})


def _say(msg: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


async def main(pki_dir: Path, ca_dir: Path, concurrency: int) -> None:
    pki = DevPki.load(pki_dir)
    trust = KmsTrust.dev(pki)
    gws = Gateways([], load_ca(ca_dir), pki)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    tasks: set[asyncio.Task[None]] = set()
    room = asyncio.Semaphore(concurrency)
    _say({"ready": True})
    while line := await reader.readline():
        task = asyncio.create_task(boot(pki, trust, gws, json.loads(line), room))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])))
