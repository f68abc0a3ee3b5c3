"""``pydstack image push SOURCE NAME``: build a one-layer image from a root filesystem and push
it to a registry (by default the one ``pydstack up --registry`` runs), for CVMs on machines
that reach no public registry.

SOURCE is a directory (its tree is the image's root), a tar file of one, or ``busybox`` (the
host's busybox-static, as the sandbox's own test image). The image is reproducible (same
rootfs, same digest); the output names it pinned (``NAME@sha256:...``), which is what a
measured compose file should say: a registry or mirror, being the host's, can move a tag but
cannot change what a digest names::

    pydstack image push busybox busybox:latest          # `image: busybox` via the mirror
    pydstack image push ./rootfs 127.0.0.1:5000/web:v1  # `image: 127.0.0.1:5000/web@sha256:...`
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import tempfile
from pathlib import Path

import click

from pydstack.controlplane import DataDir

from ._common import Settings, connection_options, echo_json, json_option
from .vm import image_group


def _dir_tar(root: Path) -> bytes:
    """`root`'s tree as a tar, reproducible: sorted, no times, owned by root."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for dirpath, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(dirs + files):
                path = Path(dirpath) / name
                info = tar.gettarinfo(str(path), arcname=str(path.relative_to(root)))
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "root", "root"
                if info.isfile():
                    with path.open("rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
    return out.getvalue()


def rootfs_of(source: str) -> bytes:
    """The plain tar of SOURCE's root filesystem."""
    if source == "busybox":
        from pydstack.adapters.sandbox import build_busybox_image

        with tempfile.TemporaryDirectory() as d:
            build_busybox_image(Path(d), "busybox")
            return (Path(d) / "busybox" / "rootfs.tar").read_bytes()
    path = Path(source)
    if path.is_dir():
        return _dir_tar(path)
    if path.is_file() and tarfile.is_tarfile(path):
        data = path.read_bytes()
        return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    raise click.BadParameter(f"{source!r} is not a directory, a tar file or 'busybox'",
                             param_hint="SOURCE")  # fmt: skip


@image_group.command("push")
@click.argument("source")
@click.argument("name")
@click.option("--registry", "registry", default="", metavar="URL",
              help="registry to push to (http://HOST:PORT) [default: the one `up --registry` "
                   "runs, state.json's registry_url]")  # fmt: skip
@click.option(
    "--cmd",
    "cmd",
    default="sh",
    show_default=True,
    help="the image's default command (words split by spaces)",
)
@connection_options
@json_option
@click.pass_context
def push(ctx: click.Context, source: str, name: str, registry: str, cmd: str,
         as_json: bool) -> None:  # fmt: skip
    """Build an image from SOURCE (a rootfs directory, a tar, or `busybox`) and push it as
    NAME; prints its digest and the pinned name to put in a compose file."""
    from pydstack.adapters.registry import PushError, push_rootfs, repository

    if not registry:
        s = ctx.ensure_object(Settings)
        registry = str(DataDir.resolve(s.data_dir).state().get("registry_url") or "")
    if not registry.startswith(("http://", "https://")):
        raise click.ClickException(
            "no registry: pass --registry http://HOST:PORT, or run `pydstack up --registry`"
        )
    try:
        repository(name)
        pushed = push_rootfs(registry, name, rootfs_of(source), cmd=tuple(cmd.split()))
    except (PushError, OSError) as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        echo_json({"name": name, "registry": registry, "repository": pushed.repository,
                   "tag": pushed.tag, "digest": pushed.digest,
                   "pinned": pushed.pinned})  # fmt: skip
        return
    click.echo(f"pushed {name} to {registry} ({pushed.repository}:{pushed.tag})")
    click.echo(f"digest {pushed.digest}")
    click.echo(f"pin it in a compose file as: image: {pushed.pinned}")
