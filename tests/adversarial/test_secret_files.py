"""Every secret file the code writes (private keys, seeds, sealed root keys, ``appkeys.json``,
dev PKI keys, WireGuard keys) is 0600 from its first byte, whatever the umask, and a file that
was there with a wider mode is replaced, never rewritten in place: a local user who could read
(or had opened) the old file never sees the secret."""

from __future__ import annotations

import ast
import os
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pydstack.adapters import secretfile
from pydstack.adapters.secretfile import write_secret

ROOT = Path(__file__).resolve().parents[2]
SECRETISH = re.compile(r"key|seed|secret|token|appkeys|\.nk|creds|private", re.IGNORECASE)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def umask0() -> Iterator[None]:
    """The most permissive umask: a file's mode is exactly what its creator asked for."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def no_wide_secret(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], None]:
    """Watch a directory: whenever a file's mode is changed, no non-empty file in it may be
    readable by group or others at that moment (write-then-chmod leaves exactly that window)."""
    watched: list[Path] = []
    real_chmod = os.chmod

    def chmod(path: object, mode: int, *args: object, **kwargs: object) -> None:
        for d in watched:
            for f in d.iterdir():
                if f.is_file() and f.stat().st_size:
                    assert not _mode(f) & 0o077, f"{f} held data with mode {_mode(f):o}"
        real_chmod(path, mode, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "chmod", chmod)
    return watched.append


# ---- the helper ------------------------------------------------------------------------------


def test_a_new_secret_is_0600_under_umask_0(tmp_path: Path, umask0: None) -> None:
    path = write_secret(tmp_path / "k.key", b"secret")
    assert _mode(path) == 0o600 and path.read_bytes() == b"secret"


def test_a_restrictive_umask_still_gives_a_readable_0600_file(tmp_path: Path) -> None:
    old = os.umask(0o777)
    try:
        path = write_secret(tmp_path / "k.key", "secret")
    finally:
        os.umask(old)
    assert _mode(path) == 0o600


def test_every_byte_goes_to_a_file_that_is_already_0600(
    tmp_path: Path, umask0: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write, seen = os.write, []

    def write(fd: int, data: bytes) -> int:
        seen.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    write_secret(tmp_path / "k.key", b"x" * 100_000)
    assert seen and set(seen) == {0o600}


def test_a_0644_file_is_replaced_by_a_0600_one_not_rewritten(tmp_path: Path, umask0: None) -> None:
    path = tmp_path / "appkeys.json"
    path.write_text("old")
    path.chmod(0o644)
    with path.open() as opened_before:  # a reader that opened the world-readable file
        old_inode = path.stat().st_ino
        write_secret(path, "new secret")
        assert opened_before.read() == "old"  # it never sees the secret
    assert _mode(path) == 0o600 and path.read_text() == "new secret"
    assert path.stat().st_ino != old_inode
    assert [p.name for p in tmp_path.iterdir()] == ["appkeys.json"]  # no temp file left


def test_overwrite_false_refuses_an_existing_file_and_leaves_it(tmp_path: Path) -> None:
    path = tmp_path / "cluster.secret"
    path.write_text("first")
    with pytest.raises(FileExistsError):
        write_secret(path, "second", overwrite=False)
    assert path.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["cluster.secret"]


def test_a_symlink_at_the_path_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    (tmp_path / "k.key").symlink_to(victim)
    write_secret(tmp_path / "k.key", "secret")
    assert victim.read_text() == "untouched"
    assert not (tmp_path / "k.key").is_symlink() and _mode(tmp_path / "k.key") == 0o600


def test_a_new_parent_directory_is_0700(tmp_path: Path, umask0: None) -> None:
    write_secret(tmp_path / "a" / "identities" / "x.nk", "SU...")
    assert _mode(tmp_path / "a" / "identities") == 0o700


def test_a_failed_write_leaves_neither_temp_nor_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fsync(fd: int) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(secretfile.os, "fsync", fsync)
    with pytest.raises(OSError, match="I/O error"):
        write_secret(tmp_path / "k.key", b"secret")
    assert list(tmp_path.iterdir()) == []


# ---- each place that writes one --------------------------------------------------------------


def test_dev_kms_appkeys_json_is_never_wider_than_0600(
    tmp_path: Path, umask0: None, no_wide_secret: Callable[[Path], None]
) -> None:
    from pydstack.controlplane import _dev_appkeys

    (tmp_path / "kms").mkdir()
    no_wide_secret(tmp_path / "kms")
    path = _dev_appkeys(tmp_path / "kms")
    assert _mode(path) == 0o600


def test_dev_pki_keys_rewritten_over_0644_files_are_never_readable(
    tmp_path: Path, umask0: None, no_wide_secret: Callable[[Path], None]
) -> None:
    from pydstack.adapters.tdx.pki import DevPki

    pki = DevPki.generate()
    for name in pki.keys:  # an earlier PKI left world-readable keys
        (tmp_path / f"{name}.key").write_text("old")
        (tmp_path / f"{name}.key").chmod(0o644)
    no_wide_secret(tmp_path)
    pki.save(tmp_path)
    assert {_mode(tmp_path / f"{n}.key") for n in pki.keys} == {0o600}


async def test_sealed_kms_root_keys_ignore_a_planted_0644_temp_file(
    tmp_path: Path, umask0: None
) -> None:
    import hashlib

    from pydstack.actors.kms.keystore import KeyProviderSealKey, RootKeyFile
    from pydstack.core.kms import RootKeys
    from pydstack_guest import LocalKeyProvider, create_dev_app_keys

    write_secret(tmp_path / "appkeys.json", create_dev_app_keys(bytes(20), now=0)[1])
    planted = tmp_path / "root.tmp"  # where the old code wrote before its rename
    planted.write_text("")
    planted.chmod(0o644)
    f = RootKeyFile(tmp_path / "root.sealed", "main",
                    KeyProviderSealKey(LocalKeyProvider(tmp_path / "appkeys.json")))  # fmt: skip
    await f.save(RootKeys(ca_scalar=12345, k256=hashlib.sha256(b"k").digest()))
    assert _mode(tmp_path / "root.sealed") == 0o600
    assert (await f.load()).ca_scalar == 12345


def test_haproxy_certificate_with_key_over_a_0644_file_is_0600(
    tmp_path: Path, umask0: None
) -> None:
    from pydstack.adapters.haproxy.plane import _write_private

    path = tmp_path / "example.com.pem"
    path.write_text("old")
    path.chmod(0o644)
    _write_private(path, b"-----BEGIN PRIVATE KEY-----\n")
    assert _mode(path) == 0o600


def test_gateway_dev_ca_key_over_a_0644_file_is_0600(tmp_path: Path, umask0: None) -> None:
    from pydstack.actors.gateway.up_launch import dev_ca

    (tmp_path / "ca.key").write_text("old")  # ca.pem missing: the CA is made anew
    (tmp_path / "ca.key").chmod(0o644)
    dev_ca(tmp_path)
    assert _mode(tmp_path / "ca.key") == 0o600


def test_keys_and_seeds_made_on_first_use_are_0600_under_umask_0(
    tmp_path: Path, umask0: None
) -> None:
    from pydstack.actors.dashboard._envkey import DevEnvKey
    from pydstack.actors.gateway.node_launch import load_or_create_key
    from pydstack.adapters.acme.keys import create_cluster_secret
    from pydstack.adapters.nats.identity import IdentityStore

    load_or_create_key(tmp_path / "wg" / "node.key")
    create_cluster_secret(tmp_path / "cluster.secret")
    DevEnvKey.load_or_create(tmp_path / "env" / "env.key")
    store = IdentityStore(tmp_path / "identities")
    store.ensure("operator", "operator")
    for path in (tmp_path / "wg" / "node.key", tmp_path / "cluster.secret",
                 tmp_path / "env" / "env.key", store.path("operator")):  # fmt: skip
        assert _mode(path) == 0o600, path
    for d in ("wg", "env", "identities"):
        assert _mode(tmp_path / d) == 0o700, d


def _hand_written_secrets(package: Path) -> list[str]:
    """Calls that write or chmod a secret-looking path themselves instead of ``write_secret``,
    and functions that write a file and then chmod it (the mode comes too late)."""
    found = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "secretfile.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            written, chmodded = set(), set()
            for node in ast.walk(fn):
                if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                    continue
                f, target = node.func, None
                on_os = isinstance(f.value, ast.Name) and f.value.id == "os"
                if f.attr in ("write_text", "write_bytes", "chmod") and not on_os:
                    target = ast.unparse(f.value)
                elif on_os and f.attr in ("open", "chmod") and node.args:
                    target = ast.unparse(node.args[0])
                if target is None:
                    continue
                if f.attr in ("write_text", "write_bytes"):
                    written.add(target)
                if f.attr == "chmod":
                    chmodded.add(target)
                if SECRETISH.search(target):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
            found += [f"{path.relative_to(ROOT)}:{fn.lineno}: {fn.name} writes {t} then chmods"
                      for t in sorted(written & chmodded)]  # fmt: skip
    return found


@pytest.mark.parametrize("package", ["pydstack", "pydstack_guest"])
def test_no_secret_file_is_written_by_hand(package: str) -> None:
    assert _hand_written_secrets(ROOT / package) == []
