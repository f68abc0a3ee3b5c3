"""Push a one-layer image made from a root filesystem over the registry API (distribution's
v2 API, Docker's schema-2 manifest), without a docker engine.

The image is reproducible: the layer is the tarball gzipped with no timestamp, the config
names no creation time, so the same rootfs always has the same manifest digest, the one a
compose file pins (``name@sha256:...``). A name without a registry host is a Docker Hub name
(``busybox`` is ``library/busybox``): pushed to a registry that CVMs use as their mirror, it
serves ``image: busybox`` unchanged.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import urljoin

MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG = "application/vnd.docker.container.image.v1+json"
LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# distribution's reference grammar: path components and tags
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")


class PushError(RuntimeError):
    pass


@dataclass(frozen=True)
class Image:
    config: bytes
    layer: bytes  # gzipped tar
    manifest: bytes

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.manifest).hexdigest()


@dataclass(frozen=True)
class Pushed:
    name: str  # as given, e.g. busybox:latest or 127.0.0.1:5000/app:v1
    repository: str  # on the registry, e.g. library/busybox
    tag: str
    digest: str  # sha256:... of the manifest

    @property
    def pinned(self) -> str:
        """The name pinned to this content: what a measured compose file should say."""
        base = self.name.rsplit("@", 1)[0]
        last = base.rsplit("/", 1)[-1]
        if ":" in last:
            base = base[: len(base) - len(last)] + last.split(":", 1)[0]
        return f"{base}@{self.digest}"


def repository(name: str) -> tuple[str, str]:
    """(repository on the registry, tag) of an image name: with a registry host, the path
    after it; without, the Docker Hub's (``busybox`` -> ``library/busybox``), as a mirror of
    the Hub is asked for it."""
    ref = name.partition("@")[0]
    base, tag = ref.rsplit(":", 1) if ":" in ref.rsplit("/", 1)[-1] else (ref, "latest")
    parts = base.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        parts = parts[1:]  # the registry's own name: as the registry keeps it
    elif len(parts) == 1:
        parts = ["library", parts[0]]  # a Docker Hub official image, as mirrors are asked
    repo = "/".join(parts)
    if not all(_COMPONENT.fullmatch(c) for c in parts) or not _TAG.fullmatch(tag):
        raise PushError(f"{name!r} is not an image name (lowercase name[:tag])")
    return repo, tag


def image_from_rootfs(rootfs_tar: bytes, *, cmd: tuple[str, ...] = ("sh",)) -> Image:
    """The image of one layer: `rootfs_tar` (a plain tar of the root filesystem)."""
    layer = gzip.compress(rootfs_tar, mtime=0)
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": [f"PATH={DEFAULT_PATH}"], "Cmd": list(cmd)},
        "rootfs": {"type": "layers",
                   "diff_ids": ["sha256:" + hashlib.sha256(rootfs_tar).hexdigest()]},
    }, sort_keys=True, separators=(",", ":")).encode()  # fmt: skip

    def desc(media: str, blob: bytes) -> dict[str, object]:
        return {"mediaType": media, "size": len(blob),
                "digest": "sha256:" + hashlib.sha256(blob).hexdigest()}  # fmt: skip

    manifest = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST,
                           "config": desc(CONFIG, config), "layers": [desc(LAYER, layer)]},
                          indent=3).encode()  # fmt: skip
    return Image(config=config, layer=layer, manifest=manifest)


def _call(
    method: str, url: str, body: bytes | None = None, ctype: str = ""
) -> tuple[int, dict[str, str]]:
    req = urllib.request.Request(url, data=body, method=method)
    if ctype:
        req.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        if method == "HEAD" and e.code == 404:
            return 404, {}
        raise PushError(f"{method} {url}: {e.code} {e.read()[:200]!r}") from None
    except OSError as e:
        raise PushError(f"{method} {url}: {e}") from None


def _blob(registry: str, repo: str, blob: bytes) -> None:
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    if _call("HEAD", f"{registry}/v2/{repo}/blobs/{digest}")[0] == 200:
        return
    _, headers = _call("POST", f"{registry}/v2/{repo}/blobs/uploads/", b"")
    location = urljoin(f"{registry}/", headers.get("Location", ""))
    sep = "&" if "?" in location else "?"
    _call("PUT", f"{location}{sep}digest={digest}", blob, "application/octet-stream")


def push_rootfs(registry: str, name: str, rootfs_tar: bytes, *,
                cmd: tuple[str, ...] = ("sh",)) -> Pushed:  # fmt: skip
    """Push `rootfs_tar` as `name` to `registry` (``http://host:port``); blocking I/O."""
    repo, tag = repository(name)
    image = image_from_rootfs(rootfs_tar, cmd=cmd)
    registry = registry.rstrip("/")
    _blob(registry, repo, image.layer)
    _blob(registry, repo, image.config)
    _, headers = _call("PUT", f"{registry}/v2/{repo}/manifests/{tag}", image.manifest, MANIFEST)
    served = headers.get("Docker-Content-Digest", image.digest)
    if served != image.digest:
        raise PushError(f"{registry} stored {name} as {served}, not {image.digest}")
    return Pushed(name=name, repository=repo, tag=tag, digest=image.digest)
