"""Start a CVM's compose app on its docker engine: the sandbox guest and the QEMU guest image.

No registry here: the docker images an app may use come as sandbox images (a rootfs tarball
and the names it is imported under, ``pydstack.adapters.sandbox.images``), imported when the
engine lacks them. Each service runs with host networking and the guest agent's sockets
mounted where dstack's CVMs have them and the SDKs look (``/var/run/dstack.sock``,
``/var/run/dstack/dstack.sock``, the legacy ``/var/run/tappd.sock``); its output is appended
to `console`::

    tasks = await start_compose_app(docker, app_compose, env, images=[(root, "sandbox-busybox")],
                                    dstack_sock=sock, console=log, report=emit)
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from pathlib import Path

from pydstack.adapters.sandbox._compose import services
from pydstack.adapters.sandbox._docker import Docker
from pydstack.adapters.sandbox.images import load_image

from .boot import Report


async def import_images(docker: Docker, images: Iterable[tuple[Path, str]]) -> None:
    """Import each (images root, sandbox image name)'s docker images the engine lacks."""
    for root, name in images:
        image = load_image(root, name)
        for tag in image.docker_images:
            if not await docker.has_image(tag):
                await docker.import_image(root / name / image.rootfs, tag)


async def start_compose_app(
    docker: Docker, app_compose: bytes, env: Mapping[str, str], *,
    images: Iterable[tuple[Path, str]], dstack_sock: Path, console: Path, report: Report,
    tappd_sock: Path | None = None,
) -> list[asyncio.Task[None]]:  # fmt: skip
    """Run every service (stage ``app`` each); the returned tasks follow their logs."""
    await import_images(docker, images)
    mounts = [f"{dstack_sock}:/var/run/dstack.sock", f"{dstack_sock}:/var/run/dstack/dstack.sock"]
    if tappd_sock is not None:
        mounts.append(f"{tappd_sock}:/var/run/tappd.sock")
    logs = []
    for svc in services(app_compose, env):
        await docker.run(svc.name, svc.image, svc.command, svc.entrypoint, svc.environment,
                         mounts)  # fmt: skip
        logs.append(asyncio.create_task(docker.follow_logs(svc.name, console)))
        report("app", svc.name)
    return logs
