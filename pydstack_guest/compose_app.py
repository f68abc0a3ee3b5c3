"""Start a CVM's compose app on its docker engine: the sandbox guest and the QEMU guest image.

With a `ComposeProject` (``pydstack_guest.compose_cli``) the real ``docker-compose`` runs the
app's ``docker_compose_file`` as written: ports, volumes, networks, depends_on, healthcheck,
restart, on the app's own bridge network, images pulled from registries (or the engine's
registry mirrors). Without one, a guest image that has ``docker-compose`` uses it (project
dir `GUEST_PROJECT`, host paths allowed: the VM's own); one built without it runs the
services through a subset of compose (image, command, entrypoint, environment; host
networking) and the ``app`` stage says so: never silently.

The docker images of sandbox images (a rootfs tarball and the names it is imported under,
``pydstack.adapters.sandbox.images``) are imported first when the engine lacks them, so a
compose file naming ``busybox:latest`` runs offline. The guest agent's sockets are mounted
where dstack's CVMs have them and the SDKs look (``/var/run/dstack.sock``,
``/var/run/dstack/dstack.sock``, the legacy ``/var/run/tappd.sock``); each container's output
is appended to `console`::

    tasks = await start_compose_app(docker, app_compose, env, images=[(root, "sandbox-busybox")],
                                    dstack_sock=sock, console=log, report=emit,
                                    compose=ComposeProject(workdir=d, docker_host=url))
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from pydstack.adapters.sandbox._compose import services
from pydstack.adapters.sandbox._docker import Docker
from pydstack.adapters.sandbox.images import load_image

from .boot import Report
from .compose_cli import ComposeProject, available

GUEST_PROJECT = Path("/run/pydstack/compose")  # the QEMU guest's (volumes live in docker's root)

SUBSET = ("compose subset, no docker-compose in this image: only image, command, entrypoint "
          "and environment; ports, volumes, networks, depends_on, healthcheck ignored")  # fmt: skip


async def import_images(docker: Docker, images: Iterable[tuple[Path, str]]) -> None:
    """Import each (images root, sandbox image name)'s docker images the engine lacks."""
    for root, name in images:
        image = load_image(root, name)
        for tag in image.docker_images:
            if not await docker.has_image(tag):
                await docker.import_image(root / name / image.rootfs, tag)


def _sockets(dstack_sock: Path, tappd_sock: Path | None) -> dict[str, str]:
    out = {"/var/run/dstack.sock": str(dstack_sock),
           "/var/run/dstack/dstack.sock": str(dstack_sock)}  # fmt: skip
    if tappd_sock is not None:
        out["/var/run/tappd.sock"] = str(tappd_sock)
    return out


async def start_compose_app(
    docker: Docker, app_compose: bytes, env: Mapping[str, str], *,
    images: Iterable[tuple[Path, str]], dstack_sock: Path, console: Path, report: Report,
    tappd_sock: Path | None = None, compose: ComposeProject | None = None,
) -> list[asyncio.Task[None]]:  # fmt: skip
    """Run every service (stage ``app`` each); the returned tasks follow their logs.
    Raises `compose_cli.ComposeFailed` when docker-compose refuses or fails."""
    await import_images(docker, images)
    sockets = _sockets(dstack_sock, tappd_sock)
    if compose is None and available():  # a guest image with docker-compose in it
        compose = ComposeProject(workdir=GUEST_PROJECT, docker_host=f"unix://{docker.sock}")
    if compose is not None:
        text = json.loads(app_compose or b"{}").get("docker_compose_file") or ""
        names = await compose.up(text, env, sockets=sockets) if text.strip() else []
        logs = [asyncio.create_task(docker.follow_logs(c, console, label=svc))
                for c, svc in (await docker.services()).items()]  # fmt: skip
        for name in names:
            report("app", name)
        return logs
    mounts = [f"{host}:{inside}" for inside, host in sockets.items()]
    logs = []
    for svc in services(app_compose, env):
        await docker.run(svc.name, svc.image, svc.command, svc.entrypoint, svc.environment,
                         mounts)  # fmt: skip
        logs.append(asyncio.create_task(docker.follow_logs(svc.name, console)))
        report("app", f"{svc.name} ({SUBSET})")
    return logs
