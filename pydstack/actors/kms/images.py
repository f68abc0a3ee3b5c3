"""The KMS's image check against the images an admin registered on the log.

Before the authorization backend is asked, the request's ``os_image_hash`` (host-written, in
``vm_config``) must name an image on ``dstack.image.<hash>`` whose measurements for the
claimed shape equal the quote's MRTD and RTMR0-2 (``core.measure.check``). Only events the
write policy admits count (an admin's), so no host or tenant can register an image::

    verdict = await check_request_image(store, boot.os_image_hash, vm_config, quote,
                                        simulated=True)
"""

from __future__ import annotations

from pydstack.actors.image_registry import current_image
from pydstack.adapters.nats import EventStore
from pydstack.adapters.tdx.quote import parse_quote
from pydstack.core.events import ImageRegistered
from pydstack.core.measure import ImageCheck, Measured, check_image

_HEX = frozenset("0123456789abcdef")


async def registered_image(store: EventStore, os_image_hash: str) -> ImageRegistered | None:
    """The image as the log's admitted events leave it; None: unknown, revoked or malformed
    (a hash that is no 64 hex digits names no subject: nothing is read)."""
    h = os_image_hash.lower()
    if len(h) != 64 or not set(h) <= _HEX:
        return None
    return await current_image(store, h)


def quote_measurements(quote: bytes) -> Measured:
    r = parse_quote(quote).report
    return Measured(bytes(r.mr_td), bytes(r.rtmr0), bytes(r.rtmr1), bytes(r.rtmr2))


async def check_request_image(
    store: EventStore, os_image_hash: str, vm_config: str, quote: bytes, *, simulated: bool
) -> ImageCheck:
    image = await registered_image(store, os_image_hash)
    return check_image(image, os_image_hash, vm_config, quote_measurements(quote),
                       simulated=simulated)  # fmt: skip
