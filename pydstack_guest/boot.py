"""A CVM's boot flow (dstack-util ``setup``), the same code in the QEMU image and the sandbox.

Named steps run in order; each reports a stage, and the first failure stops the boot with
`BootFailed(step, reason)`: the caller reports ``error`` and halts; it never reboots
(dstack #334). Checks and choices are pure functions (`plan_boot`, `check_mr_config_id`,
`check_key_provider`, `plan_storage`, `select_env`); `run_boot` does the I/O::

    shared = read_host_shared(Path("/dstack/.host-shared"))
    result = await run_boot(backend, shared, report=emit, local=LocalKeyProvider(path),
                            os_image_hash=h)
    # result.keys for the agent, result.env (allowed_envs only) for the compose runner

Keys come from a KMS only once it passed `pydstack_guest.kms_trust`'s checks against the
root app-compose pins (``key_provider_id``), never sys-config's; a KMS that fails one is a
``keys`` boot error naming the check.

RTMR3 gets dstack v0.5.11's events, order and payloads (`pydstack_guest.rtmr3`):
system-preparing, app-id, compose-hash, instance-id, boot-mr-done (before keys, so the KMS
sees them), then with a KMS mr-kms and os-image-hash, then key-provider, storage-fs,
system-ready. The host-shared files are dstack's (`pydstack_guest.host_shared`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from collections.abc import Awaitable, Callable, Sequence

import msgspec

from pydstack.adapters.tdx.backend import TdxBackend
from pydstack.adapters.tdx.identity import mr_config_id_v1, mr_config_id_v2
from pydstack.adapters.tdx.quote import parse_quote

from . import rtmr3
from .data_disk import DataDiskError, device_mapper_present
from .host_shared import BootFailed, HostShared, read_host_shared
from .kms_provider import KmsKeyProvider, decrypt_env
from .kms_trust import KmsTrust
from .provider import AppKeys, KeyProvider, KeyProviderError

__all__ = ["BootFailed", "BootPlan", "BootResult", "HostShared", "SysConfig", "plan_boot",
           "read_host_shared", "run_boot"]  # fmt: skip

Report = Callable[[str, str], None]
# Sets up the data disk with the disk key (`pydstack_guest.data_disk.setup_data_disk`), returns
# what it did; raises DataDiskError.
DataDisk = Callable[[bytes], Awaitable[str]]
RUNNERS = ("docker-compose",)  # dstack also has "bash"; this platform runs compose apps only
MANIFEST_VERSIONS = (1, 2)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class SysConfig(msgspec.Struct, frozen=True, kw_only=True):
    """dstack's ``.sys-config.json`` (host-written), plus two optional pydstack pins."""

    kms_urls: list[str] = []
    gateway_urls: list[str] = []
    pccs_url: str | None = None  # dstack's Option<String>: null when unset
    docker_registry: str | None = None
    host_api_url: str | None = None
    vm_config: str = "{}"
    kms_ca: str = ""  # read, never trusted: the KMS root is app-compose's key_provider_id
    gateway_ca: str = ""  # PEM the gateways' registration certificates chain to
    key_provider_id: str = ""  # hex; must agree with app-compose's, never a pin of its own


class InstanceInfo(msgspec.Struct, frozen=True, kw_only=True):
    instance_id_seed: str = ""
    instance_id: str = ""  # read, never used: the guest derives it (see instance_id_of)
    app_id: str = ""


def instance_id_of(seed: bytes, app_id: bytes) -> bytes:
    """dstack's instance id (dstack-util ``measure_app_info``): ``sha256(seed || app_id)``
    truncated to 20 bytes, both raw bytes (instance-info's hex decoded). The host chooses
    only the seed; the id it may have written beside it is ignored, as in dstack."""
    return hashlib.sha256(seed + app_id).digest()[:20]


class AppCompose(msgspec.Struct, frozen=True, kw_only=True):
    """The fields of dstack's app-compose.json the boot acts on (others are kept, unread)."""

    manifest_version: int = 2
    name: str = ""
    runner: str = "docker-compose"
    docker_compose_file: str = ""
    allowed_envs: list[str] = []
    kms_enabled: bool | None = None  # None: use a KMS when sys-config names one
    local_key_provider_enabled: bool = False
    key_provider: str = ""  # "kms" / "local" / "none" / "" (dstack >= 0.5.1); wins over the flags
    key_provider_id: str = ""  # hex: the KMS root CA's SPKI DER (dstack); measured, trusted
    gateway_enabled: bool = False
    tproxy_enabled: bool = False  # dstack's older name of gateway_enabled
    no_instance_id: bool = False  # dstack: the instance-id event is measured empty
    storage_fs: str | None = None  # dstack: "zfs" / "ext4" (case-insensitive); here ext4 only


class BootPlan(msgspec.Struct, frozen=True, kw_only=True):
    compose: AppCompose
    sys_config: SysConfig
    compose_hash: bytes
    app_id: bytes
    instance_id: bytes  # b"" with no_instance_id, as dstack measures it
    kms_urls: tuple[str, ...]  # empty: local keys
    key_provider: str = "local"  # what the boot uses and measures: kms, local or none
    pinned_provider_id: bytes  # app-compose's key_provider_id (b"": no pin)


class StoragePlan(msgspec.Struct, frozen=True, kw_only=True):
    fs: str  # the storage-fs payload measured into RTMR3
    encrypted: bool
    note: str


class BootResult(msgspec.Struct, frozen=True, kw_only=True):
    plan: BootPlan
    keys: AppKeys
    env: dict[str, str]  # allowed_envs only
    dropped_envs: tuple[str, ...]
    storage: StoragePlan
    vm_config: str


def _hex(step: str, field: str, value: str) -> bytes:
    try:
        return bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        raise BootFailed(step, f"{field} is not hex: {value[:40]!r}") from None


def key_provider_kind(compose: AppCompose) -> str:
    """dstack's ``AppCompose::key_provider()``: ``key_provider`` when set, else ``kms`` if
    kms_enabled, else ``local`` if local_key_provider_enabled, else ``none``; "" (pydstack)
    when kms_enabled is absent: a KMS if sys-config names one."""
    if compose.key_provider:
        return compose.key_provider
    if compose.kms_enabled is None and not compose.local_key_provider_enabled:
        return ""
    return "kms" if compose.kms_enabled else ("local" if compose.local_key_provider_enabled
                                              else "none")  # fmt: skip


def plan_boot(shared: HostShared) -> BootPlan:
    """Parse and check the host-shared files against what this platform runs."""
    try:
        compose = msgspec.json.decode(shared.app_compose, type=AppCompose)
    except msgspec.DecodeError as e:
        raise BootFailed("compose", f"app-compose.json: {e}") from None
    try:
        sysc = msgspec.json.decode(shared.sys_config, type=SysConfig)
        info = msgspec.json.decode(shared.instance_info, type=InstanceInfo)
    except msgspec.DecodeError as e:
        raise BootFailed("host-shared", str(e)) from None
    if compose.manifest_version not in MANIFEST_VERSIONS:
        raise BootFailed("compose", f"manifest_version {compose.manifest_version} is not "
                         f"supported (want one of {list(MANIFEST_VERSIONS)})")  # fmt: skip
    if compose.runner not in RUNNERS:
        raise BootFailed("compose", f"runner {compose.runner!r} is not supported "
                         f"(want one of {list(RUNNERS)})")  # fmt: skip
    bad = [n for n in compose.allowed_envs if not _ENV_NAME.match(n)]
    if bad:
        raise BootFailed("compose", f"allowed_envs has invalid names {bad}")
    kind = key_provider_kind(compose)
    if kind not in ("kms", "local", "none", ""):
        raise BootFailed("compose", f"key_provider {kind!r} is not supported here "
                         "(want kms, local or none)")  # fmt: skip
    wants_kms, local = kind == "kms", kind in ("local", "none")
    if wants_kms and not sysc.kms_urls:
        raise BootFailed("compose", "the app wants a KMS (kms_enabled) but sys-config "
                         "names none (kms_urls is empty)")  # fmt: skip
    if compose.no_instance_id and (compose.gateway_enabled or compose.tproxy_enabled):
        raise BootFailed("compose", "no_instance_id with gateway_enabled: the gateway needs "
                         "an instance id to route to (dstack's refuses an empty one)")  # fmt: skip
    if (compose.storage_fs or "ext4").lower() != "ext4":
        raise BootFailed("compose", f"storage_fs {compose.storage_fs!r} is not supported here "
                         "(want ext4)")  # fmt: skip
    uses = "kms" if sysc.kms_urls and not local else (kind if local else "local")
    compose_hash = hashlib.sha256(shared.app_compose).digest()
    info_app_id = _hex("host-shared", "instance-info app_id", info.app_id) or compose_hash[:20]
    if len(info_app_id) != 20:
        raise BootFailed("host-shared", "app_id must be 20 bytes")
    # dstack measures the host-named app id only for a KMS app (the KMS authorizes it);
    # without one the app id is the compose hash's first 20 bytes.
    app_id = info_app_id if uses == "kms" else compose_hash[:20]
    seed = _hex("host-shared", "instance-info instance_id_seed", info.instance_id_seed)
    if not seed or uses == "none":
        seed = os.urandom(20)  # dstack: a fresh instance when no seed or no reusable disk
    # Only the measured app-compose pins: sys-config is the host's, and a host that could
    # pin its own KMS root would hand the CVM keys it knows.
    pinned = _hex("compose", "key_provider_id", compose.key_provider_id)
    host_pin = _hex("host-shared", "sys-config key_provider_id", sysc.key_provider_id)
    if host_pin and pinned and host_pin != pinned:
        raise BootFailed("compose", "app-compose and sys-config pin different key providers "
                         "(only app-compose's key_provider_id is trusted)")  # fmt: skip
    return BootPlan(
        compose=compose, sys_config=sysc, compose_hash=compose_hash, app_id=app_id,
        instance_id=b"" if compose.no_instance_id else instance_id_of(seed, info_app_id),
        kms_urls=() if local else tuple(sysc.kms_urls), pinned_provider_id=pinned,
        key_provider=uses,
    )  # fmt: skip


def check_mr_config_id(mr_config_id: bytes, plan: BootPlan, keys: AppKeys) -> str:
    """dstack's MRCONFIGID rule: all zero = no pin; v1 = compose hash; v2 = hash + key provider."""
    if not any(mr_config_id):
        return "none (no pin)"
    if mr_config_id[0] == 1:
        if mr_config_id != mr_config_id_v1(plan.compose_hash):
            raise BootFailed("mrconfigid", f"MRCONFIGID {mr_config_id[:33].hex()} is not "
                             f"0x01||compose_hash {plan.compose_hash.hex()}")  # fmt: skip
        return "v1 = compose hash"
    if mr_config_id[0] == 2:
        kind, ident = provider_of(plan, keys)
        want = mr_config_id_v2(plan.compose_hash, plan.app_id, kind, ident)
        if mr_config_id != want:
            raise BootFailed("mrconfigid", "MRCONFIGID v2 does not match the compose hash, "
                             f"app id and key provider {kind}")  # fmt: skip
        return "v2 = compose hash + key provider"
    raise BootFailed("mrconfigid", f"MRCONFIGID version {mr_config_id[0]} is unknown")


def provider_of(plan: BootPlan, keys: AppKeys) -> tuple[str, bytes]:
    """(kind, id) of dstack's ``KeyProvider``: a ``none`` provider has no id (dstack's
    temporary keys), the others the id their keys name."""
    return plan.key_provider, b"" if plan.key_provider == "none" else keys.provider_id


def check_key_provider(plan: BootPlan, keys: AppKeys) -> None:
    _, ident = provider_of(plan, keys)
    if plan.pinned_provider_id and ident != plan.pinned_provider_id:
        raise BootFailed("keys", f"key provider id {ident.hex()[:32]}… is not the "
                         f"pinned {plan.pinned_provider_id.hex()[:32]}…")  # fmt: skip


def plan_storage(*, dm_crypt: bool, data_disk: bool = False) -> StoragePlan:
    """The data disk: LUKS2 with the disk key where the kernel has dm-crypt and the CVM has a
    data disk (the QEMU guest image: `pydstack_guest.data_disk`), measured ``storage-fs`` =
    ``ext4`` as dstack does.

    Without device-mapper (the sandbox: it shares the host kernel, PLATFORM.md) nothing is
    encrypted and RTMR3 says so (``storage-fs`` = ``plain``) so a verifier or KMS policy can
    refuse it; ext4 native encryption (fscrypt v2, built in here) is the option for later."""
    if dm_crypt and data_disk:
        return StoragePlan(fs="ext4", encrypted=True,
                           note="LUKS2 (dm-crypt, aes-xts-plain64) with the disk key")  # fmt: skip
    if dm_crypt:
        return StoragePlan(fs="plain", encrypted=False, note="this kernel has dm-crypt but the "
                           "CVM has no data disk to set up: data NOT encrypted")  # fmt: skip
    return StoragePlan(fs="plain", encrypted=False, note="no dm-crypt (no device-mapper in "
                       "this kernel: the sandbox shares the host's): data disk NOT "
                       "encrypted")  # fmt: skip


def dm_crypt_available() -> bool:
    return device_mapper_present()


def select_env(
    pairs: Sequence[tuple[str, str]], allowed: Sequence[str]
) -> tuple[dict[str, str], tuple[str, ...]]:
    """(the variables in `allowed`, the names dropped): only allowed_envs reach the app."""
    ok = set(allowed)
    env = {k: v for k, v in pairs if k in ok}
    return env, tuple(sorted({k for k, _ in pairs if k not in ok}))


def _vm_config(sysc: SysConfig, os_image_hash: bytes) -> str:
    try:
        doc = json.loads(sysc.vm_config or "{}")
    except ValueError:
        raise BootFailed("host-shared", "sys-config vm_config is not JSON") from None
    return json.dumps(
        {**(doc if isinstance(doc, dict) else {}), "os_image_hash": os_image_hash.hex()}
    )


async def _emit(backend: TdxBackend, name: str, payload: bytes) -> None:
    await asyncio.to_thread(backend.emit_event, name, payload)


class KeysFrom(msgspec.Struct, frozen=True, kw_only=True):
    keys: AppKeys
    source: str  # what the boot log says of them
    mr_kms: bytes | None = None  # the KMS's mr_aggregated (None: local keys, or no attestation)
    os_image_hash: bytes = b""  # as the KMS answered it (b"": local keys, or it named none)


async def _keys(
    plan: BootPlan, backend: TdxBackend, local: KeyProvider, vm_config: str,
    trust: KmsTrust | None,
) -> KeysFrom:  # fmt: skip
    """A KMS's keys count only once it passed every check of `kms_trust`; one that fails is
    skipped, naming the check, and the next KMS URL is tried (as dstack tries each); none
    left is a boot error at ``keys``."""
    if not plan.kms_urls:
        return KeysFrom(keys=await local.app_keys(), source="local dev keys")
    trust = trust or KmsTrust.intel(plan.sys_config.pccs_url or "")
    errors = []
    for url in plan.kms_urls:
        kms = KmsKeyProvider(url, backend, trust=trust, app_id=plan.app_id, vm_config=vm_config,
                             root_pin=plan.pinned_provider_id)  # fmt: skip
        try:
            keys = await kms.app_keys()
        except KeyProviderError as e:
            errors.append(f"KMS {url}: {e}")
            continue
        return KeysFrom(keys=keys, source=f"{url}: {kms.verified}", mr_kms=kms.mr_kms,
                        os_image_hash=kms.os_image_hash)  # fmt: skip
    raise BootFailed("keys", "no key from an unverified KMS is used: " + "; ".join(errors))


async def run_boot(
    backend: TdxBackend,
    shared: HostShared,
    *,
    report: Report,
    local: KeyProvider,
    os_image_hash: bytes,
    dm_crypt: bool | None = None,
    data_disk: DataDisk | None = None,
    kms_trust: KmsTrust | None = None,
) -> BootResult:
    """Run the steps; raises `BootFailed` naming the first step that failed. `dm_crypt`
    None: whether this kernel has device-mapper; with it and `data_disk` the storage step
    sets up the LUKS2 data disk, else the data is measured ``plain`` (not encrypted).
    `kms_trust`: how the KMS's RA-TLS evidence is checked (None: Intel's root, collateral
    from sys-config's PCCS; a simulated TD passes `KmsTrust.dev`)."""
    step = ["compose"]

    def done(name: str, detail: str, following: str) -> None:
        report(name, detail)
        step[0] = following

    try:
        return await _steps(
            backend, shared, done, local, os_image_hash, dm_crypt, data_disk, kms_trust
        )
    except BootFailed:
        raise
    except Exception as e:  # any failure must stop the boot, named by its step
        raise BootFailed(step[0], f"{type(e).__name__}: {e}") from e


async def _steps(
    backend: TdxBackend,
    shared: HostShared,
    done: Callable[[str, str, str], None],
    local: KeyProvider,
    os_image_hash: bytes,
    dm_crypt: bool | None,
    data_disk: DataDisk | None,
    kms_trust: KmsTrust | None,
) -> BootResult:
    plan = plan_boot(shared)
    done("compose", f"{plan.compose.name or '-'} runner={plan.compose.runner} "
         f"hash={plan.compose_hash.hex()[:16]}", "identity")  # fmt: skip
    vm_config = _vm_config(plan.sys_config, os_image_hash)
    for name, payload in rtmr3.identity_events(app_id=plan.app_id, compose_hash=plan.compose_hash,
                                               instance_id=plan.instance_id):  # fmt: skip
        await _emit(backend, name, payload)
    done("identity", f"app {plan.app_id.hex()} instance {plan.instance_id.hex() or '(none)'}",
         "keys")  # fmt: skip
    try:
        got = await _keys(plan, backend, local, vm_config, kms_trust)
    except KeyProviderError as e:
        raise BootFailed("keys", str(e)) from None
    keys = got.keys
    check_key_provider(plan, keys)
    done("keys", f"{plan.key_provider} {got.source}", "mrconfigid")
    quote, _ = await asyncio.to_thread(backend.attest, bytes(64))
    mr = check_mr_config_id(parse_quote(quote).report.mr_config_id, plan, keys)
    done("mrconfigid", mr, "storage")
    # dstack measures the image hash the KMS answered (it checked it); ours when it named none
    kind, ident = provider_of(plan, keys)
    for name, payload in rtmr3.key_events(
        kind, ident, mr_kms=got.mr_kms, os_image_hash=got.os_image_hash or os_image_hash
    ):
        await _emit(backend, name, payload)
    has_dm = dm_crypt_available() if dm_crypt is None else dm_crypt
    storage = plan_storage(dm_crypt=has_dm, data_disk=data_disk is not None)
    await _emit(backend, *rtmr3.storage_event(storage.fs))  # before the disk, as dstack
    if storage.encrypted and data_disk is not None:
        if not keys.disk_crypt_key:
            raise BootFailed("storage", f"the {keys.provider_name} keys have no disk key")
        try:
            what = await data_disk(keys.disk_crypt_key)
        except DataDiskError as e:
            raise BootFailed("storage", str(e)) from None
        storage = StoragePlan(fs=storage.fs, encrypted=True, note=f"{storage.note}: {what}")
    done("storage", storage.note, "env")
    env: dict[str, str] = {}
    dropped: tuple[str, ...] = ()
    if shared.encrypted_env:
        if not keys.env_crypt_key:
            raise BootFailed("env", "an encrypted env was given but the keys have no env key")
        try:
            pairs = decrypt_env(keys.env_crypt_key, shared.encrypted_env)
        except KeyProviderError as e:
            raise BootFailed("env", str(e)) from None
        env, dropped = select_env(pairs, plan.compose.allowed_envs)
        done("env", f"exported {sorted(env)}; not in allowed_envs, dropped {list(dropped)}",
             "system-ready")  # fmt: skip
    await _emit(backend, *rtmr3.SYSTEM_READY)
    return BootResult(plan=plan, keys=keys, env=env, dropped_envs=dropped, storage=storage,
                      vm_config=vm_config)  # fmt: skip
