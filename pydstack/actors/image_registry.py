"""Guest images on the log (``dstack.image.<os_image_hash>``): register, revoke, list.

An admin registers an image once; the KMS then issues keys only to TDs whose measurements are
that image's for their shape (``actors/kms/images``). Registering is idempotent: the same
registration twice appends nothing, a changed one (new TDX shapes) appends a new event::

    appended = await register_image(admin_store, sandbox_image_registration(root, "busybox"))
"""

from __future__ import annotations

from pathlib import Path

from pydstack.actors.trust import Judge
from pydstack.adapters.nats import EventStore, Version
from pydstack.core.events import ImageRegistered, ImageRevoked, kind_filter, subject
from pydstack.core.measure.check import latest_image, registration_problem


class ImageRegistryError(ValueError):
    """An image that cannot be registered (its files or its digests are wrong)."""


async def image_and_version(
    store: EventStore, os_image_hash: str
) -> tuple[ImageRegistered | None, Version]:
    """The image as the log's admitted events leave it (None: unknown, revoked or malformed)
    and its aggregate's version, for an append that must not race another writer."""
    records, version = await store.read_aggregate(subject("image", os_image_hash))
    admitted = await Judge("image-registry", store.anchor).admitted(store, records)
    return latest_image((ok.event for ok in admitted), os_image_hash), version


async def current_image(store: EventStore, os_image_hash: str) -> ImageRegistered | None:
    return (await image_and_version(store, os_image_hash))[0]


async def register_image(store: EventStore, reg: ImageRegistered) -> bool:
    """Append `reg` unless the log already holds it as is; True when appended."""
    if (why := registration_problem(reg, reg.os_image_hash)) is not None:
        raise ImageRegistryError(f"image {reg.name}: {why}")
    current, version = await image_and_version(store, reg.os_image_hash)
    if current == reg:
        return False
    await store.append(subject("image", reg.os_image_hash), [reg], version)
    return True


async def revoke_image(store: EventStore, os_image_hash: str, reason: str) -> None:
    subj = subject("image", os_image_hash)
    _, version = await store.read_aggregate(subj)
    await store.append(subj, [ImageRevoked(os_image_hash=os_image_hash, reason=reason)], version)


async def registered_images(store: EventStore) -> list[ImageRegistered]:
    """Every image the log allows now (admitted, not revoked), by name."""
    records = [rec async for rec in store.read(subject=kind_filter("image"))]
    by_subject: dict[str, list[object]] = {}
    judge = Judge("image-registry", store.anchor)
    for ok in await judge.admitted(store, records):
        by_subject.setdefault(ok.envelope.subject, []).append(ok.event)
    images = [latest_image(evs, s.rsplit(".", 1)[1]) for s, evs in by_subject.items()]
    return sorted((i for i in images if i is not None), key=lambda i: (i.name, i.os_image_hash))


def image_registration(path: Path) -> ImageRegistered:
    """The registration of the image directory at `path`: a dstack-layout QEMU image
    (``metadata.json`` naming a kernel) or a sandbox image (a rootfs tarball)."""
    import msgspec

    from pydstack.adapters.qemu.image import Image, ImageError
    from pydstack.adapters.qemu.image import image_registration as qemu_registration
    from pydstack.adapters.sandbox.images import image_registration as sandbox_registration

    meta = path / "metadata.json"
    try:
        doc = msgspec.json.decode(meta.read_bytes())
    except (OSError, msgspec.DecodeError) as e:
        raise ImageRegistryError(f"{path}: not an image directory ({e})") from None
    try:
        if isinstance(doc, dict) and "kernel" in doc:
            image = Image.load(path)
            image.verify()
            return qemu_registration(image)
        resolved = path.resolve()
        return sandbox_registration(resolved.parent, resolved.name)
    except (ImageError, OSError, ValueError) as e:
        raise ImageRegistryError(f"{path}: {e}") from None


def host_image_registrations(backend: str, state_dir: Path, images: Path | None = None) -> list[
    ImageRegistered
]:  # fmt: skip
    """The registrations of every image a host's VMM (`backend`, its `state_dir`) can boot;
    `ImageRegistryError` (or OSError) when one cannot be measured."""
    from pydstack.adapters.qemu.image import image_registration as qemu_registration
    from pydstack.adapters.qemu.image import list_images as qemu_images
    from pydstack.adapters.sandbox.images import image_registration as sandbox_registration
    from pydstack.adapters.sandbox.images import list_images as sandbox_images

    if backend == "sandbox":
        root = images or state_dir / "images"
        return [sandbox_registration(root, i.name) for i in sandbox_images(root)]
    if backend == "qemu":
        from pydstack.adapters.qemu.image import ImageError

        out = []
        for image in qemu_images(images):
            try:
                image.verify()
            except ImageError as e:
                raise ImageRegistryError(str(e)) from None
            out.append(qemu_registration(image))
        return out
    return []
