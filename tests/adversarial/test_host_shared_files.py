"""The host writes the shared directory a CVM boots from. A hostile host may make a file huge
(to exhaust the guest's memory) or a symlink (to make the guest read one of its own files as
host input, e.g. its keys). The guest reads each file with dstack's bounds and without
following a link: either fails the boot at ``host-shared`` naming the file, before any step."""

from __future__ import annotations

from pathlib import Path

import pytest

from pydstack_guest.boot import BootFailed, read_host_shared
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
