"""The host writes the shared directory a CVM boots from. A hostile host may make a file huge
(to exhaust the guest's memory) or a symlink (to make the guest read one of its own files as
host input, e.g. its keys). The guest reads each file with dstack's bounds and without
following a link: either fails the boot at ``host-shared`` naming the file, before any step."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pydstack_guest.boot import BootFailed, plan_boot, read_host_shared
from pydstack_guest.host_shared import FILES


@pytest.mark.parametrize("name", sorted(FILES))
def test_a_file_over_dstacks_bound_fails_the_boot_naming_it(tmp_path: Path, name: str) -> None:
    (tmp_path / "app-compose.json").write_bytes(b'{"manifest_version":2}')
    limit, _ = FILES[name]
    (tmp_path / name).write_bytes(b"x" * limit)  # at the bound: read
    read_host_shared(tmp_path)
    (tmp_path / name).write_bytes(b"x" * (limit + 1))
    with pytest.raises(BootFailed) as e:
        read_host_shared(tmp_path)
    assert (
        e.value.step == "host-shared" and f"{name} is larger than {limit} bytes" in e.value.reason
    )


def test_a_symlink_is_not_followed(tmp_path: Path) -> None:
    secret = tmp_path / "guest-secret"
    secret.write_text("app keys")
    share = tmp_path / "share"
    share.mkdir()
    (share / "app-compose.json").write_bytes(b'{"manifest_version":2}')
    (share / ".user-config").symlink_to(secret)
    with pytest.raises(BootFailed, match=r"\.user-config is a symlink \(not followed\)"):
        read_host_shared(share)


def test_the_host_cannot_name_the_app_id_of_an_app_without_a_kms(tmp_path: Path) -> None:
    """The host writes a victim's app id into .instance_info of a CVM whose compose uses no
    KMS: the guest measures the compose hash's first 20 bytes as dstack does (the host's app
    id counts only for a KMS app, whose KMS authorizes it), so the CVM never attests as the
    victim."""
    compose = b'{"manifest_version":2,"kms_enabled":false,"local_key_provider_enabled":true}'
    (tmp_path / "app-compose.json").write_bytes(compose)
    (tmp_path / ".instance_info").write_text('{"app_id":"' + "77" * 20 + '"}')
    plan = plan_boot(read_host_shared(tmp_path))
    assert plan.key_provider == "local"
    assert plan.app_id == hashlib.sha256(compose).digest()[:20] != bytes.fromhex("77" * 20)
