"""`running_kms(..., KmsLaunch(onboard_from=URL))`: a second instance started with the options
`pydstack up --kms-onboard URL --kms-onboard-token-file FILE` passes gets the root keys from
the first (dev backend: only with its onboarding token) and answers the same."""

from __future__ import annotations

from pathlib import Path

import pytest

from pydstack.actors.kms import KmsClient
from pydstack.actors.kms.launch import KmsLaunch, running_kms
from pydstack.actors.kms.service import NotOnboarded
from pydstack.adapters.nats import EventStore
from pydstack.adapters.tdx.pki import DevPki
from pydstack.core.events import KmsReplicaOnboarded, decode_body, open_envelope, subject
from pydstack_guest import create_dev_app_keys
from tests import images

from .conftest import VM_CONFIG, bound_identity, make_cvm


def launch(
    tmp: Path, pki_dir: Path, name: str, onboard_from: str = "", token_of: str = ""
) -> KmsLaunch:
    """What `up` passes: its own token file; with `onboard_from`, the source's token as the
    operator copied it (`token_of`: the source's name)."""
    appkeys = tmp / f"{name}-appkeys.json"
    if not appkeys.exists():
        appkeys.write_text(create_dev_app_keys(name.encode().ljust(20, b"\0"), now=0)[1])
    return KmsLaunch(
        key_file=str(tmp / f"{name}.sealed"), cluster="main", seal_appkeys=str(appkeys),
        auth="dev", allow_dev_auth=True, dev_pki=str(pki_dir), instance_id=name,
        onboard_from=onboard_from, replica_token_file=str(tmp / f"{name}-onboard-token"),
        onboard_token_file=str(tmp / f"{token_of}-onboard-token") if token_of else "",
    )  # fmt: skip


async def get_app_key(url: str, pki: DevPki) -> dict[str, object]:
    async with KmsClient(url, dev_pki=pki) as c:
        temp = await c.call("GetTempCaCert")
    identity = await bound_identity(make_cvm(pki), temp)
    async with KmsClient(url, ca_pem=temp["ca_cert"], identity=identity) as c:
        out: dict[str, object] = await c.call("GetAppKey", {"vm_config": VM_CONFIG})
    return out


async def onboarded(store: EventStore) -> list[KmsReplicaOnboarded]:
    recs, _ = await store.read_aggregate(subject("kms", "main"))
    events = [decode_body(open_envelope(r.data)) for r in recs]
    return [e for e in events if isinstance(e, KmsReplicaOnboarded)]


async def test_second_instance_onboards_from_the_first(
    store: EventStore, pki: DevPki, tmp_path: Path
) -> None:
    pki_dir = tmp_path / "pki"
    pki.save(pki_dir)
    await images.register_test_image(store)
    async with running_kms(store, launch(tmp_path, pki_dir, "kms-a")) as url_a:
        with pytest.raises(NotOnboarded, match="--kms-onboard URL"):
            async with running_kms(store, launch(tmp_path, pki_dir, "kms-b")):
                pass
        b = launch(tmp_path, pki_dir, "kms-b", url_a, token_of="kms-a")
        async with running_kms(store, b) as url_b:
            assert await get_app_key(url_a, pki) == await get_app_key(url_b, pki)
    [first] = await onboarded(store)
    assert first.authorization == "token"  # what allowed it, never the token itself
    token_file = tmp_path / "kms-a-onboard-token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    recs, _ = await store.read_aggregate(subject("kms", "main"))
    assert all(token_file.read_text().strip().encode() not in r.data for r in recs)
    # Restarted with the option again, it is already onboarded: no second onboarding.
    async with running_kms(store, launch(tmp_path, pki_dir, "kms-a")) as url_a:
        async with running_kms(store, b) as url_b:
            assert await get_app_key(url_a, pki) == await get_app_key(url_b, pki)
    assert len(await onboarded(store)) == 1
