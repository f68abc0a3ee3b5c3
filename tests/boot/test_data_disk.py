"""The QEMU guest's LUKS2 data disk (pydstack_guest.data_disk) without dm-crypt: the host kernel
has no device-mapper (PLATFORM.md), so the decisions, the command lines and the header checks
are tested here with a recording command runner; tests/boot/test_qemu_deploy.py formats, opens
and reopens a real one inside the guest and checks its header with `validate_luks2_header`."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from pydstack.adapters.tdx.backend import SimulatorBackend
from pydstack.adapters.tdx.identity import mr_config_id_v1
from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.tdx.simulator import QuoteSimulator, TdMeasurements
from pydstack_guest import LocalKeyProvider, create_dev_app_keys
from pydstack_guest.boot import BootFailed, HostShared, run_boot
from pydstack_guest.data_disk import (
    BINDS,
    EXT4_GROUP,
    PAYLOAD_OFFSET,
    PROBE,
    DataDiskError,
    backup_superblock_groups,
    disk_action,
    find_device,
    format_argv,
    open_argv,
    passphrase,
    payload_unwritten,
    setup_data_disk,
    validate_luks2_header,
)

KEY = bytes(range(32))
HDR = 16384  # cryptsetup's default LUKS2 header size (4 KiB binary + 12 KiB JSON)


def luks2_json() -> dict[str, Any]:
    """The metadata cryptsetup 2.6 writes for `format_argv` (salts and digest shortened)."""
    return {
        "keyslots": {"0": {
            "type": "luks2", "key_size": 64,
            "af": {"type": "luks1", "stripes": 4000, "hash": "sha256"},
            "area": {"type": "raw", "offset": "32768", "size": "258048",
                     "encryption": "aes-xts-plain64", "key_size": 64},
            "kdf": {"type": "pbkdf2", "hash": "sha256", "iterations": 1000, "salt": "c2FsdA=="},
        }},
        "tokens": {},
        "segments": {"0": {"type": "crypt", "offset": "16777216", "size": "dynamic",
                           "iv_tweak": "0", "encryption": "aes-xts-plain64",
                           "sector_size": 512}},
        "digests": {"0": {"type": "pbkdf2", "keyslots": ["0"], "segments": ["0"],
                          "hash": "sha256", "iterations": 1000, "salt": "c2FsdA==",
                          "digest": "ZGlnZXN0"}},
        "config": {"json_size": "12288", "keyslots_size": "16744448"},
    }  # fmt: skip


def luks2_header(doc: dict[str, Any] | None = None, *, cipher_alg: bytes = b"sha256") -> bytes:
    """Both header copies (primary at 0, secondary at HDR) in LUKS2's on-disk layout."""
    raw = json.dumps(doc or luks2_json()).encode().ljust(HDR - 4096, b"\0")
    out = b""
    for index, magic in enumerate((b"LUKS\xba\xbe", b"SKUL\xba\xbe")):
        binary = (magic + struct.pack(">HQQ", 2, HDR, 7) + bytes(48) + cipher_alg.ljust(32, b"\0")
                  + bytes(64) + b"0d2c6f9e-uuid".ljust(40, b"\0") + bytes(48)
                  + struct.pack(">Q", index * HDR)).ljust(4096, b"\0")  # fmt: skip
        out += binary + raw
    return out


def with_(path: str, value: object) -> dict[str, Any]:
    """The good metadata with one field (dotted path) replaced."""
    doc = copy.deepcopy(luks2_json())
    *parents, last = path.split(".")
    node = doc
    for p in parents:
        node = node[p]
    node[last] = value
    return doc


# ---- pure decisions and command lines ----------------------------------------------------------


def test_a_new_disk_is_formatted_a_luks2_one_opened_anything_else_refused() -> None:
    assert disk_action(bytes(1 << 20)) == "format"
    assert disk_action(luks2_header()) == "open"
    with pytest.raises(DataDiskError, match="LUKS1 header: want LUKS2"):
        disk_action(b"LUKS\xba\xbe\x00\x01" + bytes(100))
    # Data with no header (an ext4 left by someone, a wiped header): never formatted over.
    with pytest.raises(DataDiskError, match="refusing to format"):
        disk_action(bytes(1080) + b"\x53\xef" + bytes(1000))


def test_luks_format_is_luks2_aes_xts_with_cheap_pbkdf2_and_the_key_on_stdin() -> None:
    argv = format_argv(Path("/dev/vdb"))
    joined = " ".join(argv)
    assert argv[:2] == ["cryptsetup", "luksFormat"] and argv[-1] == "/dev/vdb"
    for want in ("--type luks2", "--cipher aes-xts-plain64", "--key-size 512", "--pbkdf pbkdf2",
                 "--pbkdf-force-iterations 1000", "--sector-size 512", "--offset 32768",
                 "--key-file=-", "--batch-mode"):  # fmt: skip
        assert want in joined, want
    key = passphrase(KEY)
    assert key == KEY.hex().encode()  # dstack's passphrase: the key's hex, no newline
    for a in (*argv, *open_argv(Path("/dev/vdb"))):
        assert KEY.hex() not in a
    # Opened with the header copy that was validated, never the disk's own (TOCTOU, dstack #555).
    assert "--header=/run/pydstack/luks-header" in open_argv(Path("/dev/vdb"))
    with pytest.raises(DataDiskError, match="disk key"):
        passphrase(b"short")


def test_the_header_cryptsetup_writes_is_accepted() -> None:
    validate_luks2_header(luks2_header())


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        (with_("keyslots.0.area.encryption", "cipher_null-ecb"), "keyslot encryption"),
        (with_("segments.0.encryption", "cipher_null-ecb"), "segment encryption"),
        (with_("keyslots.0.area.offset", "768"), "keyslot area"),
        (with_("keyslots.0.kdf", {"type": "argon2id", "salt": "c2FsdA=="}), "keyslot kdf"),
        (with_("keyslots.1", luks2_json()["keyslots"]["0"]), "one keyslot"),
        (with_("tokens", {"0": {"type": "luks2-keyring", "keyslots": ["0"]}}), "tokens"),
        (with_("segments.0.offset", "4096"), "segment offset"),
        (with_("segments.0.integrity", {"type": "hmac(sha256)"}), "segment encryption"),
        (with_("digests.0.segments", ["1"]), "digest for other"),
        (with_("config.requirements", {"mandatory": ["online-reencrypt"]}), "config"),
    ],
)
def test_a_header_we_would_not_have_written_is_refused(doc: dict[str, Any], words: str) -> None:
    """A host with the disk file could swap in a header that unlocks with any key onto a
    plaintext segment (cipher_null): the guest checks the copy it then opens with."""
    with pytest.raises(DataDiskError, match=words):
        validate_luks2_header(luks2_header(doc))


def test_a_damaged_or_foreign_header_is_refused() -> None:
    good = luks2_header()
    with pytest.raises(DataDiskError, match=r"header 0: .*magic"):
        validate_luks2_header(bytes(len(good)))
    with pytest.raises(DataDiskError, match=r"header 1: .*magic"):
        validate_luks2_header(good[:HDR] + bytes(HDR))
    with pytest.raises(DataDiskError, match="checksum"):
        validate_luks2_header(luks2_header(cipher_alg=b"crc32"))
    with pytest.raises(DataDiskError, match="header 0"):
        validate_luks2_header(good[:4096] + b"{not json" + good[4105:])


def test_the_data_disk_is_found_by_its_virtio_serial(tmp_path: Path) -> None:
    for name, serial in (("vda", ""), ("vdb", "pydstack-data\n"), ("vdc", "other")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "serial").write_text(serial)
    assert find_device(tmp_path) == Path("/dev/vdb")
    assert find_device(tmp_path / "missing") is None


# ---- the steps, with a recording runner --------------------------------------------------------


class FakeSystem:
    """Runs nothing: records each command and its stdin; ``luksHeaderBackup`` writes `header`
    to the copy path, ``cryptsetup open`` answers `open_rc`."""

    def __init__(self, header: bytes, open_rc: int = 0) -> None:
        self.header, self.open_rc = header, open_rc
        self.calls: list[tuple[list[str], bytes | None]] = []

    async def run(self, argv: Sequence[str], stdin: bytes | None) -> tuple[int, str]:
        self.calls.append((list(argv), stdin))
        if argv[:2] == ["cryptsetup", "luksHeaderBackup"]:
            copy_path = Path(argv[2].split("=", 1)[1])
            await asyncio.to_thread(copy_path.write_bytes, self.header)
        if argv[:2] == ["cryptsetup", "open"] and self.open_rc:
            return self.open_rc, "No key available with this passphrase."
        return 0, ""


async def _setup(tmp_path: Path, disk: bytes, fake: FakeSystem) -> str:
    dev = tmp_path / "vdb"
    dev.write_bytes(disk)
    return await setup_data_disk(KEY, device=dev, mount=tmp_path / "persistent", run=fake.run,
                                 label="ab" * 20, header_copy=tmp_path / "run" / "hdr",
                                 root=tmp_path / "root")  # fmt: skip


async def test_first_boot_formats_opens_makes_ext4_and_binds_docker(tmp_path: Path) -> None:
    fake = FakeSystem(luks2_header())
    note = await _setup(tmp_path, bytes(2 << 20), fake)
    assert [a[:2] for a, _ in fake.calls] == [
        ["cryptsetup", "luksFormat"], ["cryptsetup", "luksHeaderBackup"],
        ["cryptsetup", "open"], ["mkfs.ext4", "-q"], ["mount", "-t"],
        ["mount", "--bind"], ["mount", "--bind"],
    ]  # fmt: skip
    keyed = {a[1]: stdin for a, stdin in fake.calls if stdin is not None}
    assert keyed == {"luksFormat": KEY.hex().encode(), "open": KEY.hex().encode()}
    assert not (tmp_path / "run" / "hdr").exists()  # the header copy is gone after the open
    binds = [a[2:] for a, _ in fake.calls if a[:2] == ["mount", "--bind"]]
    assert binds == [[str(tmp_path / "persistent" / r), str(tmp_path / "root" / r)] for r in BINDS]
    marker = json.loads((tmp_path / "persistent" / ".pydstack-data-disk").read_text())
    assert marker["app_id"] == "ab" * 20
    assert note.startswith(f"formatted {tmp_path / 'vdb'} (new disk), opened, ext4 at ")
    assert f"(formatted at {marker['formatted_at']})" in note


async def test_later_boots_open_and_mount_without_formatting(tmp_path: Path) -> None:
    (tmp_path / "persistent").mkdir()
    (tmp_path / "persistent" / ".pydstack-data-disk").write_text('{"formatted_at": 1234}')
    fake = FakeSystem(luks2_header())
    note = await _setup(tmp_path, written_disk(), fake)
    cmds = [a[:2] for a, _ in fake.calls]
    assert ["cryptsetup", "luksFormat"] not in cmds and ["mkfs.ext4", "-q"] not in cmds
    assert cmds[:4] == [["cryptsetup", "luksHeaderBackup"], ["cryptsetup", "open"],
                        ["mount", "-t"], ["resize2fs", "/dev/mapper/dstack_data_disk"]]  # fmt: skip
    assert note.startswith(f"opened {tmp_path / 'vdb'}, ext4") and "(formatted at 1234)" in note


def written_disk(size: int = PAYLOAD_OFFSET + (2 << 20)) -> bytes:
    """A LUKS2 disk whose payload holds a filesystem (ciphertext: non-zero bytes)."""
    head = luks2_header().ljust(PAYLOAD_OFFSET, b"\0")
    return head + b"\x5a" * 4096 + bytes(size - PAYLOAD_OFFSET - 4096)


async def test_a_first_boot_cut_short_before_mkfs_gets_its_filesystem_next_boot(
    tmp_path: Path,
) -> None:
    """luksFormat done, payload never written: the next boot opens it and makes the ext4
    (and the marker) instead of failing to mount forever."""
    fake = FakeSystem(luks2_header())
    disk = luks2_header().ljust(PAYLOAD_OFFSET + (2 << 20), b"\0")
    note = await _setup(tmp_path, disk, fake)
    assert [a[:2] for a, _ in fake.calls] == [
        ["cryptsetup", "luksHeaderBackup"], ["cryptsetup", "open"], ["mkfs.ext4", "-q"],
        ["mount", "-t"], ["mount", "--bind"], ["mount", "--bind"],
    ]  # fmt: skip
    assert note.startswith(f"opened {tmp_path / 'vdb'}, made its missing filesystem")
    assert (tmp_path / "persistent" / ".pydstack-data-disk").exists()


def test_payload_unwritten_looks_at_the_start_and_every_backup_superblock() -> None:
    assert backup_superblock_groups(100) == [0, 1, 3, 5, 7, 9, 25, 27, 49, 81]
    size = PAYLOAD_OFFSET + 10 * EXT4_GROUP
    written: dict[int, bytes] = {}

    def read(at: int, n: int) -> bytes:
        return written.get(at, bytes(n))

    assert payload_unwritten(read, size)
    # A filesystem whose first MiB a host zeroed still has its backup superblocks: kept.
    written[PAYLOAD_OFFSET + 9 * EXT4_GROUP] = b"\x01" + bytes(4095)
    assert not payload_unwritten(read, size)
    written.clear()
    written[PAYLOAD_OFFSET] = b"\x01" + bytes(PROBE - 1)
    assert not payload_unwritten(read, size)
    assert not payload_unwritten(lambda at, n: bytes(n), PAYLOAD_OFFSET)  # no payload at all


async def test_a_key_that_does_not_open_the_disk_stops_without_formatting(tmp_path: Path) -> None:
    fake = FakeSystem(luks2_header(), open_rc=2)
    with pytest.raises(DataDiskError, match=r"does not open the data disk .*No key available"):
        await _setup(tmp_path, luks2_header(), fake)
    assert [a[:2] for a, _ in fake.calls] == [["cryptsetup", "luksHeaderBackup"],
                                               ["cryptsetup", "open"]]  # fmt: skip


async def test_a_tampered_header_is_never_opened(tmp_path: Path) -> None:
    fake = FakeSystem(luks2_header(with_("segments.0.encryption", "cipher_null-ecb")))
    with pytest.raises(DataDiskError, match="segment encryption"):
        await _setup(tmp_path, luks2_header(), fake)
    assert [a[:2] for a, _ in fake.calls] == [["cryptsetup", "luksHeaderBackup"]]


async def test_data_without_a_header_is_left_alone(tmp_path: Path) -> None:
    fake = FakeSystem(b"")
    with pytest.raises(DataDiskError, match="refusing to format"):
        await _setup(tmp_path, b"\x01" + bytes(4096), fake)
    assert fake.calls == []


async def test_no_data_disk_attached_is_a_clear_error(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr("pydstack_guest.data_disk.find_device", lambda: None)
    with pytest.raises(DataDiskError, match="no data disk"):
        await setup_data_disk(KEY, run=FakeSystem(b"").run, wait_s=0)


# ---- in the boot flow: measured, reported, failing the boot -------------------------------------


def _backend(compose: bytes) -> SimulatorBackend:
    return SimulatorBackend(QuoteSimulator(DevPki.generate()), TdMeasurements(
        mr_td=hashlib.sha384(b"t").digest(),
        mr_config_id=mr_config_id_v1(hashlib.sha256(compose).digest()),
    ))  # fmt: skip


async def _boot(tmp_path: Path, **kw: Any) -> tuple[list[tuple[str, str]], SimulatorBackend]:
    compose = json.dumps({"manifest_version": 2, "name": "t", "kms_enabled": False}).encode()
    keys = tmp_path / "appkeys.json"
    keys.write_text(create_dev_app_keys(hashlib.sha256(compose).digest()[:20], now=0)[1])
    backend, stages = _backend(compose), []
    await run_boot(backend, HostShared(app_compose=compose), local=LocalKeyProvider(keys),
                   report=lambda s, d: stages.append((s, d)), os_image_hash=bytes(32),
                   **kw)  # fmt: skip
    return stages, backend


def _storage_fs(backend: SimulatorBackend) -> list[bytes]:
    return [bytes(e.event_payload) for e in backend.event_log() if e.event == "storage-fs"]


async def test_the_boot_sets_up_the_disk_with_the_disk_key_and_measures_ext4(
    tmp_path: Path,
) -> None:
    seen: list[bytes] = []

    async def data_disk(key: bytes) -> str:
        seen.append(key)
        return "opened /dev/vdb"

    stages, backend = await _boot(tmp_path, dm_crypt=True, data_disk=data_disk)
    assert len(seen) == 1 and len(seen[0]) == 32  # the app's disk_crypt_key
    assert dict(stages)["storage"] == "LUKS2 (dm-crypt, aes-xts-plain64) with the disk key: " \
                                      "opened /dev/vdb"  # fmt: skip
    assert _storage_fs(backend) == [b"ext4"]


async def test_without_dm_crypt_the_boot_says_and_measures_plain(tmp_path: Path) -> None:
    """The sandbox: the host kernel has no device-mapper; a data disk is not even tried."""

    async def data_disk(key: bytes) -> str:
        raise AssertionError("no dm-crypt: the disk must not be touched")

    stages, backend = await _boot(tmp_path, dm_crypt=False, data_disk=data_disk)
    assert "no dm-crypt" in dict(stages)["storage"]
    assert "NOT encrypted" in dict(stages)["storage"]
    assert _storage_fs(backend) == [b"plain"]


async def test_a_disk_that_does_not_open_fails_the_boot_at_storage(tmp_path: Path) -> None:
    async def data_disk(key: bytes) -> str:
        raise DataDiskError("the disk key does not open the data disk /dev/vdb")

    with pytest.raises(BootFailed, match="boot error at storage: the disk key does not open"):
        await _boot(tmp_path, dm_crypt=True, data_disk=data_disk)
