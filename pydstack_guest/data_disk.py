"""The CVM's data disk: LUKS2 (dm-crypt) with the app's disk key, ext4, at ``/dstack/persistent``.

dstack's ``dstack-util setup`` (``mount_data_disk``), for the QEMU guest image, whose kernel has
dm-crypt (modules). The sandbox CVM shares the host's kernel, which has no device-mapper: it
gets no data disk and measures ``storage-fs`` = ``plain`` (`pydstack_guest.boot.plan_storage`).

The VMM attaches the disk as a virtio block device with the serial ``pydstack-data`` (the QEMU
backend's ``data.qcow2``, sized from the VM's ``disk_size``). At boot, with the disk key of
GetAppKey (``disk_crypt_key``; its hex is the LUKS passphrase, as in dstack):

- its first MiB is all zero (a new disk): ``cryptsetup luksFormat --type luks2`` (aes-xts-plain64,
  512-bit key, PBKDF2-SHA256 with 1000 iterations: the key is 32 random bytes, not a password),
  open, ``mkfs.ext4``, mount;
- it has a LUKS2 header: copy the header into memory (``luksHeaderBackup`` to /run), check it
  is one we would have written (`validate_luks2_header`: a host could otherwise hand over a
  header with ``cipher_null``, dstack #555) and open the disk with that copy; a key that does
  not open it stops the boot: nothing is ever reformatted;
- anything else (data without a LUKS2 header): the boot stops.

A first boot cut short between ``luksFormat`` and ``mkfs`` leaves a LUKS2 disk whose payload
was never written. That is recognised on the raw disk (`payload_unwritten`: the payload's
start and every place ext4 keeps a backup superblock still read as zeros, which no written
ciphertext does) and the filesystem is made then; a disk whose filesystem is merely damaged
is never reformatted (its mount fails and the boot stops).

The key goes to cryptsetup on stdin (``--key-file=-``), never on a command line or a disk. The
ext4 inside is mounted at `MOUNT`, and docker's and containerd's state directories are bind
mounts from it (as dstack does), so the app's images, containers and volumes are encrypted.
Each step is a function of its inputs (`disk_action`, `format_argv`, `open_argv`, ...) and
`setup_data_disk` runs them with an injectable command runner::

    note = await setup_data_disk(keys.disk_crypt_key)  # "formatted /dev/vdb (first boot) ..."
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Literal

SERIAL = "pydstack-data"  # the virtio-blk serial the QEMU backend gives the data disk
MOUNT = Path("/dstack/persistent")  # dstack's mount point of the data disk
MAPPER = "dstack_data_disk"  # dstack's device-mapper name
BINDS = ("var/lib/docker", "var/lib/containerd")  # bind-mounted from MOUNT before the engine
HEADER_COPY = Path("/run/pydstack/luks-header")  # tmpfs: the validated header, then deleted
MARKER = ".pydstack-data-disk"  # in MOUNT: when and for which app it was formatted
CIPHER = "aes-xts-plain64"
KEY_BYTES = 64  # aes-xts with 256-bit AES: a 512-bit volume key
PBKDF_ITERATIONS = 1000  # the minimum: the passphrase is a random 256-bit key
PAYLOAD_OFFSET = 16 * 1024 * 1024  # data after 16 MiB of header + keyslots (as dstack)
SECTOR = 512
MAGIC = (b"LUKS\xba\xbe", b"SKUL\xba\xbe")  # primary, secondary header
PROBE = 1024 * 1024  # bytes read to decide whether a disk is new

Action = Literal["format", "open"]
Run = Callable[[Sequence[str], bytes | None], Awaitable[tuple[int, str]]]  # -> (rc, output)


class DataDiskError(Exception):
    """The data disk cannot be set up; the boot stops with this message."""


def passphrase(disk_key: bytes) -> bytes:
    """What cryptsetup reads on stdin: the key's hex (dstack's choice), no newline."""
    if len(disk_key) < 16:
        raise DataDiskError(f"the disk key has {len(disk_key)} bytes: want at least 16")
    return disk_key.hex().encode()


def disk_action(head: bytes) -> Action:
    """``format`` for a new (all-zero) disk, ``open`` for a LUKS2 one; anything else raises:
    data without a LUKS2 header is never formatted over."""
    if head[:6] == MAGIC[0]:
        version = struct.unpack_from(">H", head, 6)[0] if len(head) >= 8 else 0
        if version != 2:
            raise DataDiskError(f"the data disk has a LUKS{version} header: want LUKS2")
        return "open"
    if not head.strip(b"\0"):
        return "format"
    raise DataDiskError("the data disk holds data but no LUKS2 header (damaged, or not made by "
                        "this platform): refusing to format it")  # fmt: skip


def format_argv(device: Path) -> list[str]:
    return [
        "cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2",
        "--cipher", CIPHER, "--key-size", str(KEY_BYTES * 8), "--hash", "sha256",
        "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", str(PBKDF_ITERATIONS),
        "--sector-size", str(SECTOR), "--offset", str(PAYLOAD_OFFSET // SECTOR),
        "--key-file=-", str(device),
    ]  # fmt: skip


def header_backup_argv(device: Path, copy: Path = HEADER_COPY) -> list[str]:
    return ["cryptsetup", "luksHeaderBackup", f"--header-backup-file={copy}", str(device)]


def open_argv(device: Path, copy: Path = HEADER_COPY, name: str = MAPPER) -> list[str]:
    """Open with the validated in-memory header copy, not the disk's (no check-then-use gap)."""
    return ["cryptsetup", "open", "--type", "luks2", f"--header={copy}", "--key-file=-",
            str(device), name]  # fmt: skip


def mkfs_argv(name: str = MAPPER) -> list[str]:
    """Lazy inode tables and journal: zeroing them through dm-crypt costs minutes of emulated
    AES under TCG; the blocks read back as ciphertext noise that ext4 never trusts (the group
    descriptors say which inodes were ever used, the journal's own superblock is written)."""
    return ["mkfs.ext4", "-q", "-F", "-L", "dstack-data",
            "-E", "lazy_itable_init=1,lazy_journal_init=1", f"/dev/mapper/{name}"]  # fmt: skip


def mount_argv(mount: Path = MOUNT, name: str = MAPPER) -> list[str]:
    """``noinit_itable``: no background zeroing of those tables either (see `mkfs_argv`)."""
    return ["mount", "-t", "ext4", "-o", "noatime,noinit_itable", f"/dev/mapper/{name}",
            str(mount)]  # fmt: skip


def _u64(b: bytes, at: int) -> int:
    return int(struct.unpack_from(">Q", b, at)[0])


def _int(v: Any) -> int:
    """LUKS2 JSON writes 64-bit numbers as decimal strings."""
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, str) and v.isdigit():
        return int(v)
    raise ValueError(f"not a number: {v!r}")


def validate_luks2_header(data: bytes) -> None:
    """Raises `DataDiskError` unless both header copies in `data` (a ``luksHeaderBackup``
    or the disk's start) describe what `format_argv` makes: one aes-xts-plain64 keyslot
    (PBKDF2-SHA256, its area between the headers and the data), one aes-xts-plain64 segment
    at `PAYLOAD_OFFSET`, one digest, no tokens, flags or requirements (dstack's checks)."""
    hdr_size = 0
    for index, magic in enumerate(MAGIC):
        at = index * hdr_size
        try:
            hdr_size = _check_header(data, at, magic, index, hdr_size)
        except (ValueError, KeyError, TypeError, AttributeError, struct.error) as e:
            raise DataDiskError(f"LUKS2 header {index}: {e}") from None


def _check_header(data: bytes, at: int, magic: bytes, index: int, first_size: int) -> int:
    def bad(what: str) -> ValueError:
        return ValueError(f"refusing a header with {what}")

    if len(data) < at + 4096 or data[at : at + 6] != magic:
        raise bad("no LUKS2 magic")
    version = struct.unpack_from(">H", data, at + 6)[0]
    hdr_size, hdr_offset = _u64(data, at + 8), _u64(data, at + 256)
    if version != 2:
        raise bad(f"version {version}")
    if not 4096 < hdr_size <= 4 * 1024 * 1024 or (index and hdr_size != first_size):
        raise bad(f"header size {hdr_size}")
    if hdr_offset != at:
        raise bad(f"header offset {hdr_offset} (want {at})")
    if data[at + 72 : at + 104].rstrip(b"\0") != b"sha256":
        raise bad("a checksum other than sha256")
    if any(data[at + 24 : at + 72]) or any(data[at + 208 : at + 256]):
        raise bad("a label or subsystem")
    raw = data[at + 4096 : at + hdr_size].split(b"\0", 1)[0]
    doc = json.loads(raw)
    keyslots, segments, digests = doc["keyslots"], doc["segments"], doc["digests"]
    if list(keyslots) != ["0"] or list(segments) != ["0"] or list(digests) != ["0"]:
        raise bad("other than one keyslot, one segment and one digest")
    if doc.get("tokens"):
        raise bad("tokens")
    if set(doc["config"]) - {"json_size", "keyslots_size"}:
        raise bad(f"config {sorted(doc['config'])}")
    ks, seg, dig = keyslots["0"], segments["0"], digests["0"]
    area, kdf, af = ks["area"], ks["kdf"], ks["af"]
    if ks["type"] != "luks2" or ks["key_size"] != KEY_BYTES or "priority" in ks:
        raise bad(f"keyslot type {ks['type']} key size {ks['key_size']}")
    if area["type"] != "raw" or area["encryption"] != CIPHER or area["key_size"] != KEY_BYTES:
        raise bad(f"keyslot encryption {area['encryption']!r}")
    a_off, a_size = _int(area["offset"]), _int(area["size"])
    if a_off < 2 * hdr_size or a_off + a_size > PAYLOAD_OFFSET:
        raise bad(f"keyslot area at {a_off} (+{a_size}) outside the metadata")
    if kdf["type"] != "pbkdf2" or kdf["hash"] != "sha256":
        raise bad(f"keyslot kdf {kdf['type']} {kdf.get('hash')}")
    if af["type"] != "luks1" or af["hash"] != "sha256" or af["stripes"] != 4000:
        raise bad("keyslot anti-forensic settings other than luks1/sha256/4000")
    if seg["type"] != "crypt" or seg["encryption"] != CIPHER or seg.get("integrity"):
        raise bad(f"segment encryption {seg.get('encryption')!r}")
    if _int(seg["offset"]) != PAYLOAD_OFFSET or seg["size"] != "dynamic":
        raise bad(f"segment offset {seg['offset']} size {seg['size']}")
    if _int(seg["iv_tweak"]) != 0 or seg["sector_size"] != SECTOR or seg.get("flags"):
        raise bad("segment IV tweak, sector size or flags")
    if dig["type"] != "pbkdf2" or dig["hash"] != "sha256":
        raise bad(f"digest {dig['type']} {dig.get('hash')}")
    if [str(k) for k in dig["keyslots"]] != ["0"] or [str(s) for s in dig["segments"]] != ["0"]:
        raise bad("a digest for other keyslots or segments")
    return hdr_size


def find_device(sys_block: Path = Path("/sys/block"), serial: str = SERIAL) -> Path | None:
    """The block device whose virtio serial is `serial` (no udev needed)."""
    for d in sorted(sys_block.glob("vd*")) if sys_block.is_dir() else []:
        try:
            if (d / "serial").read_text().strip() == serial:
                return Path("/dev") / d.name
        except OSError:
            continue
    return None


def device_mapper_present() -> bool:
    try:
        return "device-mapper" in Path("/proc/misc").read_text()
    except OSError:
        return False


async def run_command(argv: Sequence[str], stdin: bytes | None = None) -> tuple[int, str]:
    """(exit code, stderr + stdout) of `argv`; `stdin` (the key) goes on its standard input."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
    except FileNotFoundError:
        return 127, f"{argv[0]}: not found"
    out, err = await proc.communicate(stdin)
    return proc.returncode or 0, (err + out).decode(errors="replace").strip()


async def load_dm_crypt(run: Run = run_command) -> bool:
    """Load dm-crypt (and xts, the userspace crypto API cryptsetup uses for its keyslots);
    True when the kernel then has device-mapper."""
    if not device_mapper_present():
        await run(["modprobe", "-a", "dm_mod", "dm_crypt"], None)
    await run(["modprobe", "-a", "-q", "xts", "algif_skcipher"], None)  # else on first use
    return device_mapper_present()


async def _must(run: Run, what: str, argv: Sequence[str], stdin: bytes | None = None) -> str:
    rc, out = await run(argv, stdin)
    if rc != 0:
        last = out.splitlines()[-1] if out else f"exit {rc}"
        raise DataDiskError(f"{what} failed: {last}")
    return out


async def setup_data_disk(
    disk_key: bytes, *, device: Path | None = None, mount: Path = MOUNT,
    run: Run = run_command, label: str = "", wait_s: float = 10.0,
    header_copy: Path = HEADER_COPY, root: Path = Path("/"),
) -> str:  # fmt: skip
    """Format (first boot) or open the LUKS2 data disk, mount it at `mount` and bind docker's
    and containerd's state dirs (under `root`) from it; returns what was done. Raises
    `DataDiskError`. `label` (the app id) goes into the marker file written at format."""
    key = passphrase(disk_key)
    deadline = time.monotonic() + wait_s
    while device is None:
        device = await asyncio.to_thread(find_device)
        if device is None:
            if time.monotonic() > deadline:
                raise DataDiskError(f"no data disk (virtio serial {SERIAL!r}) attached: the "
                                    "VMM gives every CVM one")  # fmt: skip
            await asyncio.sleep(0.2)
    head = await asyncio.to_thread(_read_head, device)
    action = disk_action(head)
    await asyncio.to_thread(header_copy.parent.mkdir, parents=True, exist_ok=True)
    if action == "format":
        await _must(run, f"luksFormat {device}", format_argv(device), key)
    await asyncio.to_thread(header_copy.unlink, missing_ok=True)
    try:
        await _must(run, "reading the LUKS2 header", header_backup_argv(device, header_copy))
        hdr = await asyncio.to_thread(header_copy.read_bytes)
        validate_luks2_header(hdr)
        rc, out = await run(open_argv(device, header_copy), key)
        if rc != 0:
            why = out.splitlines()[-1] if out else f"exit {rc}"
            raise DataDiskError(
                f"the disk key does not open the data disk {device} ({why}): it was made for "
                "another app or instance; not formatting it"
            )
    finally:
        await asyncio.to_thread(header_copy.unlink, missing_ok=True)
    resumed = action == "open" and await asyncio.to_thread(_unwritten, device)
    if action == "format" or resumed:  # resumed: a first boot stopped before its mkfs
        await _must(run, "mkfs.ext4", mkfs_argv())
    await asyncio.to_thread(mount.mkdir, parents=True, exist_ok=True)
    await _must(run, f"mounting the data disk at {mount}", mount_argv(mount))
    marker = mount / MARKER
    if action == "format" or resumed:
        doc = {"formatted_at": int(time.time()), "app_id": label, "cipher": CIPHER}
        await asyncio.to_thread(marker.write_text, json.dumps(doc))
        done = (f"formatted {device} (new disk), opened" if action == "format" else
                f"opened {device}, made its missing filesystem (first boot cut short)")  # fmt: skip
    else:
        await _must(run, "growing the filesystem", ["resize2fs", f"/dev/mapper/{MAPPER}"])
        done = f"opened {device}"
    try:
        since = json.loads(await asyncio.to_thread(marker.read_text))["formatted_at"]
    except (OSError, ValueError, KeyError, TypeError):
        since = "?"
    for rel in BINDS:
        src, dst = mount / rel, root / rel
        await asyncio.to_thread(src.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(dst.mkdir, parents=True, exist_ok=True)
        await _must(run, f"bind-mounting {dst}", ["mount", "--bind", str(src), str(dst)])
    return f"{done}, ext4 at {mount} (formatted at {since}); {', '.join(BINDS)} on it"


EXT4_GROUP = 128 * 1024 * 1024  # 32768 blocks of 4 KiB per block group (mke2fs defaults)


def backup_superblock_groups(limit: int) -> list[int]:
    """Block groups below `limit` that hold a superblock copy under sparse_super: 0, 1 and the
    powers of 3, 5 and 7."""
    groups = {0, 1}
    for base in (3, 5, 7):
        g = base
        while g < limit:
            groups.add(g)
            g *= base
    return sorted(g for g in groups if g < limit)


def payload_unwritten(read: Callable[[int, int], bytes], disk_size: int) -> bool:
    """True when nothing was ever written to the LUKS2 payload of a disk that started out
    zero: its first `PROBE` bytes and the first 4 KiB of every group that would carry an ext4
    superblock (any written sector is ciphertext, never zeros). A disk too small to hold a
    payload is not "unwritten": opening it fails later, clearly."""
    if disk_size < PAYLOAD_OFFSET + PROBE:
        return False
    groups = backup_superblock_groups((disk_size - PAYLOAD_OFFSET) // EXT4_GROUP + 1)
    for g in groups:
        at = PAYLOAD_OFFSET + g * EXT4_GROUP
        size = PROBE if g == 0 else 4096
        if at + size > disk_size:
            break
        if read(at, size).strip(b"\0"):
            return False
    return True


def _unwritten(device: Path) -> bool:
    fd = os.open(device, os.O_RDONLY)
    try:
        return payload_unwritten(lambda at, n: os.pread(fd, n, at), os.lseek(fd, 0, os.SEEK_END))
    finally:
        os.close(fd)


def _read_head(device: Path) -> bytes:
    fd = os.open(device, os.O_RDONLY)
    try:
        return os.pread(fd, PROBE, 0)
    finally:
        os.close(fd)
