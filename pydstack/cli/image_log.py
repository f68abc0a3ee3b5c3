"""`pydstack image register | registered | revoke` (admin): the images the KMS measures against.

The KMS issues an app's keys only when the quote's MRTD and RTMR0-2 are what the image named in
the request gives for the VM's shape, and only for images an admin put on the log. `up`
registers the images of its own host; a further host's images are registered here.
"""

from __future__ import annotations

from pathlib import Path

import click
import msgspec

from pydstack.core.events import ShapeMeasurements

from . import image_push  # noqa: F401 - adds `image push` to the group
from ._common import (
    Conn,
    Settings,
    connect,
    connection_options,
    echo_json,
    json_option,
    resolve,
    run,
)
from .vm import image_group

__all__ = ["image_group"]


def _admin(ctx: click.Context) -> Conn:
    s = ctx.ensure_object(Settings)
    if not s.identity and not s.creds:
        s.identity = "admin"  # only an admin's image events count
    conn = resolve(ctx)
    if conn.anchor is None or conn.signer.public_key != conn.anchor:
        raise click.ClickException(
            f"images are registered by the cluster's admin: {conn.data.identities.dir} has no "
            "admin key (run this on the admin host)"
        )
    return conn


def _hash(value: str) -> str:
    h = value.lower().removeprefix("0x")
    if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
        raise click.BadParameter(f"{value!r} is not an os_image_hash (64 hex digits)")
    return h


def _tdx_measurements(path: Path) -> tuple[ShapeMeasurements, ...]:
    """A JSON list of per-shape TDX measurements (dstack-mr's values, one object per shape)."""
    try:
        found = msgspec.json.decode(path.read_bytes(), type=tuple[ShapeMeasurements, ...])
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as e:
        raise click.ClickException(f"--tdx-measurements {path}: {e}") from None
    for m in found:
        for f in ("mr_td", "rtmr0", "rtmr1", "rtmr2"):
            value = getattr(m, f)
            if len(value) != 96 or any(c not in "0123456789abcdef" for c in value):
                raise click.ClickException(f"--tdx-measurements {path}: {f} is not 48 bytes hex")
    return found


@image_group.command("register")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--tdx-measurements", "tdx", type=click.Path(dir_okay=False, path_type=Path),
              help="JSON list of the image's TDX measurements per VM shape ({cpu_count, "
                   "memory_size, [hugepages, num_gpus, num_nvswitches, hotplug_off], mr_td, "
                   "rtmr0, rtmr1, rtmr2}, as dstack-mr computes them): what a real TD of this "
                   "image must show")  # fmt: skip
@connection_options
@json_option
@click.pass_context
def register(ctx: click.Context, path: Path, tdx: Path | None, as_json: bool) -> None:
    """Put the image in directory PATH on the log (its os_image_hash and the digests its
    measurements depend on): the KMS then serves TDs measured as this image."""
    from pydstack.actors.image_registry import ImageRegistryError, image_registration

    conn = _admin(ctx)
    try:
        reg = image_registration(path)
    except ImageRegistryError as e:
        raise click.ClickException(str(e)) from None
    if tdx is not None:
        reg = msgspec.structs.replace(reg, tdx=_tdx_measurements(tdx))
    appended = run(_register(conn, reg))
    if as_json:
        echo_json({**msgspec.to_builtins(reg), "appended": appended})
        return
    state = "registered" if appended else "already registered"
    click.echo(f"image {reg.name} {reg.os_image_hash}: {state}")


async def _register(conn: Conn, reg: object) -> bool:
    from pydstack.actors.image_registry import ImageRegistryError, register_image
    from pydstack.core.events import ImageRegistered

    assert isinstance(reg, ImageRegistered)
    async with await connect(conn) as store:
        try:
            return await register_image(store, reg)
        except ImageRegistryError as e:
            raise click.ClickException(str(e)) from None


@image_group.command("registered")
@connection_options
@json_option
@click.pass_context
def registered(ctx: click.Context, as_json: bool) -> None:
    """Images on the log the KMS serves (admin-registered, not revoked)."""
    from pydstack.actors.image_registry import registered_images

    async def go() -> list[dict[str, object]]:
        async with await connect(resolve(ctx)) as store:
            return [msgspec.to_builtins(i) for i in await registered_images(store)]

    images = run(go())
    if as_json:
        for i in images:
            echo_json(i)
        return
    if not images:
        click.echo("no image registered (pydstack image register DIR)")
    for i in images:
        shapes = len(i.get("tdx", ()))  # type: ignore[arg-type]
        click.echo(f"{i['name']:24} {i['os_image_hash']}  tdx shapes: {shapes}")


@image_group.command("revoke")
@click.argument("os_image_hash")
@click.option("--reason", default="", help="recorded on the log")
@connection_options
@click.pass_context
def revoke(ctx: click.Context, os_image_hash: str, reason: str) -> None:
    """The KMS issues no key to this image from now on."""
    from pydstack.actors.image_registry import current_image, revoke_image

    h = _hash(os_image_hash)
    conn = _admin(ctx)

    async def go() -> None:
        async with await connect(conn) as store:
            if await current_image(store, h) is None:
                raise click.ClickException(f"image {h} is not registered")
            await revoke_image(store, h, reason)

    run(go())
    click.echo(f"image {h}: revoked")
