"""`pydstack image push`'s adapter against the real docker-registry: names as registries and
mirrors keep them, reproducible digests, the manifest read back by its digest; the CLI's
refusals in one line."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import urllib.request
from pathlib import Path

import pytest

from pydstack.adapters.registry import (
    LocalRegistry,
    PushError,
    image_from_rootfs,
    push_rootfs,
    repository,
)
from pydstack.adapters.registry._push import MANIFEST
from pydstack.adapters.sandbox import build_busybox_image
from tests.cli.harness import cli


@pytest.mark.parametrize(
    ("name", "repo"),
    [
        ("busybox", ("library/busybox", "latest")),
        ("busybox:1.36", ("library/busybox", "1.36")),
        ("me/app:v2", ("me/app", "v2")),
        ("127.0.0.1:5000/app:v1", ("app", "v1")),
        ("registry.example/team/app", ("team/app", "latest")),
        ("localhost/x:y", ("x", "y")),
    ],
)
def test_names_are_what_registries_and_hub_mirrors_are_asked_for(
    name: str, repo: tuple[str, str]
) -> None:
    assert repository(name) == repo


@pytest.mark.parametrize("name", ["", "UPPER/case", "a b", "app:"])
def test_a_bad_name_is_refused_by_name(name: str) -> None:
    with pytest.raises(PushError, match="is not an image name"):
        repository(name)


def test_the_same_rootfs_is_the_same_image(tmp_path: Path) -> None:
    build_busybox_image(tmp_path)
    tar = tmp_path / "sandbox-busybox" / "rootfs.tar"
    a, b = image_from_rootfs(tar.read_bytes()), image_from_rootfs(tar.read_bytes())
    assert a.manifest == b.manifest and a.digest == b.digest
    assert image_from_rootfs(tar.read_bytes() + b"\0" * 512).digest != a.digest


def _get(url: str) -> bytes:
    req = urllib.request.Request(url, headers={"Accept": MANIFEST})
    with urllib.request.urlopen(req, timeout=5) as r:
        return bytes(r.read())


@pytest.mark.skipif(shutil.which("docker-registry") is None, reason="make deps: docker-registry")
def test_a_pushed_image_is_served_by_its_digest(tmp_path: Path) -> None:
    build_busybox_image(tmp_path)
    rootfs = (tmp_path / "sandbox-busybox" / "rootfs.tar").read_bytes()

    async def go() -> None:
        async with LocalRegistry.start(tmp_path / "reg") as reg:
            pushed = await asyncio.to_thread(push_rootfs, reg.url, "tools/bb:1", rootfs)
            again = await asyncio.to_thread(push_rootfs, reg.url, "tools/bb:1", rootfs)
            assert again.digest == pushed.digest and pushed.pinned == f"tools/bb@{pushed.digest}"
            body = await asyncio.to_thread(_get, f"{reg.url}/v2/tools/bb/manifests/{pushed.digest}")
            assert body == image_from_rootfs(rootfs).manifest
            assert json.loads(body)["layers"][0]["size"] > 100_000

    asyncio.run(go())


def test_push_without_a_registry_is_one_line(tmp_path: Path) -> None:
    r = cli(tmp_path / "home", "image", "push", "busybox", "bb:1")
    assert r.code == 1 and r.err.strip().splitlines() == [
        "Error: no registry: pass --registry http://HOST:PORT, or run `pydstack up --registry`"
    ]


def test_push_of_a_source_that_is_no_rootfs_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("x")
    r = cli(tmp_path / "home", "image", "push", str(tmp_path / "f.txt"), "bb:1",
            "--registry", "http://127.0.0.1:9")  # fmt: skip
    assert r.code == 2 and "is not a directory, a tar file or 'busybox'" in r.err


def test_up_refuses_a_mirror_that_is_not_http(tmp_path: Path) -> None:
    r = cli(tmp_path / "home", "up", "--registry-mirror", "ftp://10.0.0.1/x")
    assert r.code == 2 and "is not http(s)://HOST[:PORT]" in r.err
    assert not (tmp_path / "home").exists()  # refused before anything was made


def test_up_opens_its_registry_mirrors_to_qemu_guests(tmp_path: Path) -> None:
    """The guests' allowed host services gain the mirrors' ports (and nothing else)."""
    from pydstack.adapters.firewall import HostServices
    from pydstack.controlplane import ControlPlane, DataDir, UpOptions

    mirrors = ("http://127.0.0.1:5123", "https://10.1.2.3:5443")
    plane = ControlPlane(DataDir(tmp_path), UpOptions(registry_mirrors=mirrors))
    services = plane._guest_services()
    assert services.registry == (5123, 5443)
    assert ControlPlane(DataDir(tmp_path), UpOptions())._guest_services().registry == ()
    assert isinstance(services, HostServices)


def test_a_rootfs_directory_is_tarred_reproducibly(tmp_path: Path) -> None:
    """Same tree, same bytes (so the same digest), whatever the files' times or owners."""
    import os
    import tarfile

    from pydstack.cli.image_push import rootfs_of

    root = tmp_path / "rootfs"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "app").write_text("#!/bin/sh\necho hi\n")
    (root / "etc").mkdir()
    (root / "etc" / "link").symlink_to("../bin/app")
    first = rootfs_of(str(root))
    os.utime(root / "bin" / "app", (1, 1))
    assert rootfs_of(str(root)) == first
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        assert tar.getnames() == ["bin", "etc", "bin/app", "etc/link"]
        assert {m.mtime for m in tar.getmembers()} == {0}
