"""The one rule for a guest image's name, wherever a name from a request or the log becomes a
directory (``<images>/<name>``): the VMM's request checks and each backend before its path join.

dstack's image names look like ``dstack-0.5.11`` or ``dstack-dev-0.5.3``: one path component,
letters, digits, ``.``, ``_``, ``-``, no leading punctuation, at most 128 characters, and no
``..`` anywhere. So no ``../``, no absolute path, no NUL, no empty name. Usage::

    if (reason := image_name_error(name)) is not None:
        raise SomeError(reason)       # "image '../x': ..." (one line, names the field)
"""

from __future__ import annotations

import re
from typing import Final

IMAGE_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHOWN: Final = 80  # a name quoted in a reason is cut here: reasons stay one short line


def image_name_error(name: str, field: str = "image") -> str | None:
    """``None`` when ``name`` is a valid image name, else why not, in one line starting with
    ``field`` (``field=""``: without it, for errors that add the field themselves)."""
    shown = repr(name if len(name) <= _SHOWN else name[:_SHOWN] + "...")
    if not name:
        return f"{field}: empty image name" if field else "empty image name"
    said = f"{field} {shown}" if field else shown
    if IMAGE_NAME.fullmatch(name) is None:
        return (f"{said}: an image name is letters, digits, '.', '_', '-' (1-128, no leading "
                "punctuation, no '/')")  # fmt: skip
    if ".." in name:
        return f"{said}: an image name must not contain '..'"
    return None
