"""`pydstack up` runs a KMS; a simulated guest boots on its keys and the decision is on the log."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from tests.cli.harness import PYDSTACK, Up, cli, register_busybox_image, wait_for


def guest_gets_keys(home: Path, tmp_path: Path, image: Path, *extra: str) -> str:
    """`attest simulate` (a simulated CVM measured as `image`) against the KMS of the `up` in
    `home`, until it has its keys; stopped after. Its log's text; fails if it ended."""
    kms_url = json.loads((home / "state.json").read_text())["kms_url"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYDSTACK_")}
    log = tmp_path / "sim.log"
    with log.open("wb") as f:
        sim = subprocess.Popen(
            [PYDSTACK, "attest", "simulate", "--state", str(tmp_path / "sim"), "--socket",
             str(tmp_path / "d.sock"), "--kms", kms_url, "--dev-pki", str(home / "dev-pki"),
             "--image", str(image), *extra],
            stdout=f, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        wait_for(lambda: "app keys from" in log.read_text() or sim.poll() is not None,
                 timeout=30, what="the simulated guest to get its keys")  # fmt: skip
        assert sim.poll() is None, log.read_text()
    finally:
        sim.terminate()
        sim.wait(timeout=10)
    return log.read_text()


def test_simulated_guest_gets_keys_from_the_kms_of_up(tmp_path: Path) -> None:
    home = tmp_path / "home"
    plane = Up(home, extra=("--no-gateway",)).start()  # about the KMS; long tmp paths
    try:
        kms_url = plane.ready()["kms"]  # type: ignore[index]
        assert kms_url.startswith("https://127.0.0.1:")
        compose = tmp_path / "app-compose.json"
        compose.write_text('{"manifest_version":2,"name":"demo","runner":"docker-compose"}')
        # the KMS's default (log) backend: keys only for a compose the app's events name
        assert cli(home, "app", "register", str(compose)).code == 0
        guest_gets_keys(home, tmp_path, register_busybox_image(home), "--compose", str(compose))
        r = cli(home, "events", "--subject", "dstack.kms.*", "--json")
        assert r.code == 0, r.err
        types = [e["type"] for e in r.lines()]
        assert types[:1] == ["KmsRootCreated"] and types[-2:] == ["KeyRequested", "KeyIssued"]
        issued = r.lines()[-1]["body"]
        app_id = hashlib.sha256(compose.read_bytes()).hexdigest()[:40]
        assert issued["boot_info"]["app_id"] == app_id
        assert issued["boot_info"]["tcb_status"] == "UpToDate"
        assert cli(home, "audit").code == 0
    finally:
        assert plane.stop() == 0


def test_audit_catches_a_signed_but_lying_kms_decision(tmp_path: Path) -> None:
    """A KeyIssued whose BootInfo does not match its recorded quote fails `pydstack audit`,
    even though it is correctly signed by the KMS identity and chained."""
    import asyncio

    import msgspec

    from pydstack.adapters.nats import EventStore
    from pydstack.adapters.nats.identity import IdentityStore
    from pydstack.core.events import KeyIssued, KeyRequested, decode_body, open_envelope

    home = tmp_path / "home"
    # `attest simulate`'s own compose is registered nowhere: the dev backend, not the log's
    plane = Up(home, extra=("--no-gateway", "--kms-auth", "dev")).start()
    try:
        url = plane.ready()["nats_url"]  # type: ignore[index]
        guest_gets_keys(home, tmp_path, register_busybox_image(home))
        assert cli(home, "audit").code == 0

        async def forge() -> int:
            kms = IdentityStore(home / "identities").load("kms")
            assert kms is not None
            async with await EventStore.connect(url, kms.signer, nkey_seed=kms.seed) as store:
                recs, version = await store.read_aggregate("dstack.kms.main")
                bodies = [decode_body(open_envelope(r.data)) for r in recs]
                req = next(b for b in bodies if isinstance(b, KeyRequested))
                issued = next(b for b in bodies if isinstance(b, KeyIssued))
                lie = msgspec.structs.replace(
                    issued, request_id="forged",
                    boot_info=msgspec.structs.replace(issued.boot_info, app_id="ab" * 20),
                )  # fmt: skip
                again = msgspec.structs.replace(req, request_id="forged")
                v = await store.append("dstack.kms.main", [again, lie], version)
                return v.seq

        seq = asyncio.run(forge())
        r = cli(home, "audit")
        assert r.code == 1
        assert f"seq {seq}: dstack.kms.main: forged: re-derived BootInfo differs" in r.out, r.out
        assert "1 errors" in r.out
    finally:
        assert plane.stop() == 0


def test_audit_re_runs_the_image_check_of_every_key_issued(tmp_path: Path) -> None:
    """A KMS (its key signs) records a decision for a request that names another registered
    image than the TD booted, with a consistent BootInfo and a passing image check: `pydstack
    audit` re-runs the check with the images the log held then and fails, naming the register;
    the genuine decisions before it re-check clean."""
    import asyncio
    import json

    import msgspec

    from pydstack.adapters.nats import EventStore
    from pydstack.adapters.nats.identity import IdentityStore
    from pydstack.core.events import KeyIssued, KeyRequested, decode_body, open_envelope

    home = tmp_path / "home"
    plane = Up(home, extra=("--no-gateway", "--kms-auth", "dev")).start()
    try:
        url = plane.ready()["nats_url"]  # type: ignore[index]
        image = register_busybox_image(home)
        other = tmp_path / "other-image"  # a second registered image: other content, other hash
        other.mkdir()
        (other / "rootfs.tar").write_bytes((image / "rootfs.tar").read_bytes())
        meta = json.loads((image / "metadata.json").read_text())
        (other / "metadata.json").write_text(json.dumps({**meta, "version": "evil"}))
        r = cli(home, "image", "register", str(other), "--json")
        assert r.code == 0, r.err
        other_hash = r.lines()[0]["os_image_hash"]
        guest_gets_keys(home, tmp_path, image)
        assert cli(home, "audit").code == 0  # the genuine decision re-checks, image included

        async def forge() -> int:
            kms = IdentityStore(home / "identities").load("kms")
            assert kms is not None
            async with await EventStore.connect(url, kms.signer, nkey_seed=kms.seed) as store:
                recs, version = await store.read_aggregate("dstack.kms.main")
                bodies = [decode_body(open_envelope(r.data)) for r in recs]
                req = next(b for b in bodies if isinstance(b, KeyRequested))
                issued = next(b for b in bodies if isinstance(b, KeyIssued))
                claimed = {**json.loads(req.vm_config), "os_image_hash": other_hash}
                again = msgspec.structs.replace(req, request_id="forged",
                                                vm_config=json.dumps(claimed))  # fmt: skip
                lie = msgspec.structs.replace(
                    issued, request_id="forged",
                    boot_info=msgspec.structs.replace(issued.boot_info, os_image_hash=other_hash),
                    image_check=issued.image_check.replace("sandbox-busybox", "other-image"),
                )  # fmt: skip
                v = await store.append("dstack.kms.main", [again, lie], version)
                return v.seq

        seq = asyncio.run(forge())
        r = cli(home, "audit")
        assert r.code == 1
        assert f"seq {seq}: dstack.kms.main: forged: image check does not hold" in r.out, r.out
        assert "RTMR2 is" in r.out and "the image gives" in r.out
        assert "re-derived BootInfo differs" not in r.out  # only the image betrays it
    finally:
        assert plane.stop() == 0
