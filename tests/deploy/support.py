"""What the deploy tests share: a `pydstack up` (no VMM, no gateway node), reading the log as a
client, appending as another actor's identity, and a simulated guest that boots on KMS keys."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydstack.adapters.nats import EventStore
from pydstack.adapters.nats.identity import IdentityStore
from pydstack.core.events import Event, decode_body, open_envelope
from tests.cli.harness import Up, cli, register_busybox_image

UP_ARGS = ("--no-gateway", "--dashboard-port", "-1")
COMPOSE_YAML = "services:\n  web:\n    image: nginx:{tag}\n    ports: ['80:80']\n"


def write_app(root: Path, name: str, tag: str = "1") -> Path:
    """A docker-compose.yaml in its own directory (the directory names the app)."""
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    f = d / "docker-compose.yaml"
    f.write_text(COMPOSE_YAML.format(tag=tag))
    return f


def deploy(plane: Up, *args: str, timeout: float = 60) -> tuple[int, list[dict[str, Any]], str]:
    r = cli(plane.data_dir, "deploy", *args, "--json", timeout=timeout)
    return r.code, r.lines() if r.out.strip() else [], r.err


def merged(lines: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for line in lines:
        out.update(line)
    return out


async def _read(url: str, home: Path, subject: str) -> list[tuple[int, str, Any]]:
    ids = IdentityStore(home / "identities")
    op = ids.load("operator")
    assert op is not None
    async with await EventStore.connect(url, op.signer, nkey_seed=op.seed) as store:
        recs, _ = await store.read_aggregate(subject)
    return [(r.seq, open_envelope(r.data).actor, decode_body(open_envelope(r.data))) for r in recs]


def events_of(plane: Up, subject: str) -> list[tuple[int, str, Any]]:
    """(seq, actor, event) of one aggregate, as stored."""
    url = plane.ready()["nats_url"]  # type: ignore[index]
    return asyncio.run(_read(url, plane.data_dir, subject))


async def _append(url: str, home: Path, actor: str, subject: str, events: Sequence[Event]) -> int:
    ident = IdentityStore(home / "identities").load(actor)
    assert ident is not None
    async with await EventStore.connect(url, ident.signer, nkey_seed=ident.seed) as store:
        _, version = await store.read_aggregate(subject)
        return (await store.append(subject, list(events), version)).seq


def append_as(plane: Up, actor: str, subject: str, *events: Event) -> int:
    """Append signed by `actor`'s identity from the data dir (as that actor would)."""
    url = plane.ready()["nats_url"]  # type: ignore[index]
    return asyncio.run(_append(url, plane.data_dir, actor, subject, events))


async def guest_env_key(plane: Up, app_compose: str, app_id: str = "") -> bytes:
    """Boot a simulated TDX guest of this app-compose on the KMS of `up` (KmsKeyProvider, RA-TLS)
    and return the env key the KMS derived for it; KeyRequested + KeyIssued land on the log."""
    from pydstack.adapters.sandbox.images import image_registration
    from pydstack.adapters.tdx.backend import measured_simulator
    from pydstack.adapters.tdx.identity import mr_config_id_v1
    from pydstack.adapters.tdx.pki import DevPki
    from pydstack.adapters.tdx.simulator import QuoteSimulator
    from pydstack.core.measure import ImageParts, VmShape
    from pydstack_guest import measure_identity
    from pydstack_guest.kms_provider import KmsKeyProvider
    from pydstack_guest.kms_trust import KmsTrust

    compose_hash = hashlib.sha256(app_compose.encode()).digest()
    app = bytes.fromhex(app_id) if app_id else compose_hash[:20]  # an upgrade keeps its app id
    # measured as a TD of a sandbox image the admin registered, in a 1 vCPU, 512 MiB VM
    image = image_registration(register_busybox_image(plane.data_dir).parent, "sandbox-busybox")
    shape = VmShape(cpu_count=1, memory_size=512 << 20)
    parts = ImageParts(firmware=image.firmware, kernel=image.kernel, initrd=image.initrd,
                       cmdline=image.cmdline)  # fmt: skip
    backend = measured_simulator(QuoteSimulator(DevPki.load(plane.data_dir / "dev-pki")), parts,
                                 shape, mr_config_id=mr_config_id_v1(compose_hash))  # fmt: skip
    await measure_identity(backend, app_id=app, app_compose=app_compose,
                           instance_id=os.urandom(20))  # fmt: skip
    vm_config = json.dumps({"os_image_hash": image.os_image_hash, "cpu_count": 1,
                            "memory_size": shape.memory_size})  # fmt: skip
    kms_url = plane.ready()["kms"]  # type: ignore[index]
    trust = KmsTrust.dev(plane.data_dir / "dev-pki")  # up's KMS is attested by it
    keys = await KmsKeyProvider(
        kms_url, backend, trust=trust, app_id=app, vm_config=vm_config
    ).app_keys()
    return keys.env_crypt_key
