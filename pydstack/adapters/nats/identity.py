"""Per-actor identities: one nkey per actor, which is also its event-signing key.

An identity's secret is a 32-byte Ed25519 seed, stored as an nkey user seed (``SU…``). The
same seed authenticates the actor to NATS and signs its events, so the ``key`` in an envelope
is the nkey's public key: the server knows who publishes, the log proves who wrote.

Who may publish where is one table, :data:`pydstack.core.policy.ROLES` (re-exported here); the
embedded server turns it into NATS permissions (:func:`nats_user`). What each role may write,
event by event, is the read-time policy every fold applies against the keyring on the log
(``dstack.keyring.*``); ``keyring.json`` here lists this data dir's identities and pins the
admin key, the keyring's trust anchor (:meth:`IdentityStore.anchor`). Usage::

    ids = IdentityStore(data_dir / "identities")
    scheduler = ids.ensure("scheduler", "scheduler")
    store = await EventStore.connect(url, scheduler.signer, nkey_seed=scheduler.seed)

Files: ``identities/<name>.nk`` (the seed, mode 0600) and ``identities/keyring.json`` (public
keys, roles and subjects: safe to copy to auditors and other hosts).
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nkeys

from pydstack.adapters.secretfile import write_secret
from pydstack.core.audit import Signatory, make_keyring
from pydstack.core.events import ALL_SUBJECTS, Signer
from pydstack.core.policy import (
    ADMIN,
    AUDITOR,
    BLOB_WRITERS,
    HOST_BOUND,
    NAME,
    ROLES,
    Keyring,
    Role,
)

__all__ = [
    "ROLES", "Identity", "IdentityStore", "Role", "durables_of", "inbox_prefix", "load_anchor",
    "load_keyring", "nats_user", "nats_user_of", "nats_users", "public_nkey", "read_seed_file",
    "standalone_identity",
]  # fmt: skip

from .errors import StoreError
from .objectstore import blob_subjects, bucket_stream, evidence_bucket
from .server import NatsUser
from .store import DEFAULT_STREAM, inbox_prefix


def _reader_api(stream: str, durables: Iterable[str]) -> list[str]:
    """The JetStream API an actor needs to read the stream (direct gets: no consumer) and to
    create, use and delete its own durable consumers, named in ``durables``; nobody else's,
    no unnamed ones (that API also updates any existing consumer named in its body), and no
    stream changes at all."""
    api = "$JS.API"
    out = [
        f"{api}.INFO",
        f"{api}.STREAM.NAMES",
        f"{api}.STREAM.INFO.{stream}",
        f"{api}.STREAM.MSG.GET.{stream}",
        f"{api}.DIRECT.GET.{stream}",
        f"{api}.DIRECT.GET.{stream}.>",
        # consumers' metadata (lag for `status`): LIST shows every consumer's info anyway
        f"{api}.CONSUMER.INFO.{stream}.>",
        f"{api}.CONSUMER.LIST.{stream}",
        f"{api}.CONSUMER.NAMES.{stream}",
        # the evidence bucket beside it, read like the stream (direct gets only)
        f"{api}.STREAM.INFO.{bucket_stream(evidence_bucket(stream))}",
        f"{api}.DIRECT.GET.{bucket_stream(evidence_bucket(stream))}",
        f"{api}.DIRECT.GET.{bucket_stream(evidence_bucket(stream))}.>",
    ]
    for d in dict.fromkeys(durables):
        out += [
            f"{api}.CONSUMER.CREATE.{stream}.{d}",
            f"{api}.CONSUMER.CREATE.{stream}.{d}.>",
            f"{api}.CONSUMER.DURABLE.CREATE.{stream}.{d}",
            f"{api}.CONSUMER.MSG.NEXT.{stream}.{d}",
            f"{api}.CONSUMER.DELETE.{stream}.{d}",
            f"$JS.ACK.{stream}.{d}.>",
        ]
    return out


def durables_of(name: str, role: str, hosts: Iterable[str] = ()) -> tuple[str, ...]:
    """The durable consumers an identity may own: its own name (the scheduler's ``scheduler``,
    a host key's ``vmm-<host>``) and, for a host-bound role, ``vmm-<host>`` of each host (the
    VMM actor's durable, :class:`pydstack.actors.vmm.Vmm`). The auditor owns none."""
    if role == AUDITOR:
        return ()
    extra = (f"vmm-{h}" for h in hosts) if role in HOST_BOUND else ()
    return tuple(dict.fromkeys((name, *extra)))


@dataclass(frozen=True, slots=True)
class Identity:
    name: str
    role: str
    seed: str  # nkey user seed, "SU…"

    @classmethod
    def generate(cls, name: str, role: str) -> Identity:
        _check(name, role)
        seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode()
        return cls(name, role, seed)

    @property
    def raw_seed(self) -> bytes:
        prefix, raw = nkeys.decode_seed(self.seed.encode())
        if prefix != nkeys.PREFIX_BYTE_USER or len(raw) != 32:
            raise StoreError(f"identity {self.name}: not an nkey user seed")
        return bytes(raw)

    @property
    def signer(self) -> Signer:
        return Signer.from_private_bytes(self.name, self.raw_seed)

    @property
    def key(self) -> bytes:
        """The Ed25519 public key: the ``key`` of every envelope this identity signs."""
        return self.signer.public_key

    @property
    def nkey(self) -> str:
        """The public nkey (``U…``) the server authenticates."""
        return str(nkeys.from_seed(self.seed.encode()).public_key.decode())

    @property
    def subjects(self) -> tuple[str, ...]:
        return ROLES[self.role].subjects

    def signatory(self) -> Signatory:
        return Signatory(self.name, self.key, self.subjects)


def _check(name: str, role: str) -> None:
    if not NAME.match(name):
        raise StoreError(f"bad identity name {name!r}: use 1-64 letters, digits, '_' or '-'")
    if role not in ROLES:
        raise StoreError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")


def nats_user(
    identity: Identity, stream: str = DEFAULT_STREAM, hosts: Iterable[str] = ()
) -> NatsUser:
    """Server permissions of one identity (admin: all): its role's event subjects (a
    host-bound role's ``dstack.host.*`` narrowed to ``hosts``; a blob writer's, the evidence
    bucket's), reading the stream and its evidence bucket, its own
    durable consumers only, and replies only on its own inboxes (``inbox_prefix``)."""
    return nats_user_of(identity.nkey, identity.name, identity.role, stream, hosts)


def nats_user_of(
    nkey: str, name: str, role_name: str, stream: str = DEFAULT_STREAM, hosts: Iterable[str] = ()
) -> NatsUser:
    """:func:`nats_user` from public data only (a keyring entry: no seed needed)."""
    role = ROLES[role_name]
    if role.admin:
        return NatsUser(nkey, publish=(">",), subscribe=(">",))
    hosts = tuple(hosts)
    subjects: tuple[str, ...] = role.subjects
    if role_name in HOST_BOUND:
        subjects = tuple(s for s in subjects if s != "dstack.host.*")
        subjects += tuple(f"dstack.host.{h}" for h in hosts)
    if role_name in BLOB_WRITERS:  # put evidence blobs; create the bucket, never change it
        bucket = evidence_bucket(stream)
        subjects += (*blob_subjects(bucket), f"$JS.API.STREAM.CREATE.{bucket_stream(bucket)}")
    return NatsUser(
        nkey,
        publish=(*subjects, *_reader_api(stream, durables_of(name, role_name, hosts))),
        # its own inbox; the event subjects only as a follower's wake-up (readable anyway)
        subscribe=(f"{inbox_prefix(nkey)}.>", ALL_SUBJECTS),
    )


def nats_users(
    ring: Keyring, local: Iterable[Identity], stream: str = DEFAULT_STREAM, host: str = ""
) -> list[NatsUser]:
    """Every NATS user a server of this cluster admits: each key the log's keyring binds and
    has not revoked (hosts as bound there), plus this data dir's identities not on it yet (a
    host-bound one: on ``host``). A revoked key has no user: the server refuses its login."""
    users: dict[str, NatsUser] = {}
    revoked = set()
    for key, b in ring.names().items():
        nkey = public_nkey(key)
        if b.revoked:
            revoked.add(nkey)
        elif b.role in ROLES:
            users[nkey] = nats_user_of(nkey, b.name, b.role, stream, b.hosts)
    for i in local:
        if i.nkey not in users and i.nkey not in revoked:
            hosts = (host,) if host and i.role in HOST_BOUND else ()
            users[i.nkey] = nats_user(i, stream, hosts)
    return sorted(users.values(), key=lambda u: u.nkey)


def public_nkey(key: bytes) -> str:
    """The public user nkey (``U…``) of an Ed25519 public key (what a keyring entry holds)."""
    raw = bytes([nkeys.PREFIX_BYTE_USER]) + key
    crc = nkeys.crc16(bytearray(raw))
    return base64.b32encode(raw + crc.to_bytes(2, "little")).decode().rstrip("=")


def read_seed_file(path: Path) -> str:
    """The nkey seed in a seed file or in the seed block of a NATS ``.creds`` file."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise StoreError(f"cannot read credentials {path}: {exc.strerror}") from None
    match = re.search(r"\bSU[A-Z2-7]{56}\b", text)
    if match is None:
        raise StoreError(f"{path} holds no nkey user seed (a line starting with SU)")
    return match.group(0)


def standalone_identity(
    seed_file: str | None, name: str, role: str, keyring: str | Path | None, option: str
) -> tuple[Signer, str | None, bytes | None]:
    """What a standalone process (``python -m pydstack.actors.kms`` / ``.vmm`` / gateway) signs
    and logs in with: its keyring identity's seed file (an nkey seed, ``identities/<name>.nk``
    or a join bundle's, or for the KMS 32 raw bytes / 64 hex digits) and the admin anchor
    pinned from ``keyring`` (a keyring.json). Returns (signer, nkey seed or None, anchor).
    No seed file is an error: a random key is bound to no role, so every fold would refuse
    what it writes."""
    from pydstack.adapters.secretfile import SecretFileError, read_seed

    if not seed_file:
        raise StoreError(
            f"no identity: pass {option} FILE (the {role} identity's seed, e.g. a data dir's "
            f"identities/{role}.nk or a key of `pydstack host add`)"
        )
    anchor = load_anchor(Path(keyring)) if keyring else None
    try:
        seed = read_seed_file(Path(seed_file))
    except StoreError:
        try:
            return Signer.from_private_bytes(name, read_seed(seed_file)), None, anchor
        except SecretFileError as exc:
            raise StoreError(f"{seed_file}: neither an nkey seed nor a raw seed ({exc})") from None
    return Identity(name, role, seed).signer, seed, anchor


class IdentityStore:
    """The identities of one data dir: a seed file per actor and the public keyring."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    @property
    def keyring_path(self) -> Path:
        return self.dir / "keyring.json"

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.nk"

    def load(self, name: str) -> Identity | None:
        """The identity called `name`, or None if this data dir has none."""
        path = self.path(name)
        if not path.exists():
            return None
        role = self._roles().get(name)
        if role is None:
            raise StoreError(f"{path} exists but {self.keyring_path} does not list {name!r}")
        return Identity(name, role, read_seed_file(path))

    def ensure(self, name: str, role: str) -> Identity:
        """Load `name`, or create it (seed file 0600, keyring entry) the first time."""
        found = self.load(name)
        if found is not None:
            if found.role != role:
                raise StoreError(f"identity {name!r} has role {found.role!r}, not {role!r}")
            return found
        identity = Identity.generate(name, role)
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        write_secret(self.path(name), identity.seed + "\n", overwrite=False)
        self._write_keyring([*self.all(), identity])
        return identity

    def ensure_all(self, wanted: Iterable[tuple[str, str]]) -> dict[str, Identity]:
        return {name: self.ensure(name, role) for name, role in wanted}

    def all(self) -> list[Identity]:
        out = []
        for name in sorted(self._roles()):
            identity = self.load(name)
            if identity is not None:
                out.append(identity)
        return out

    def anchor(self) -> bytes | None:
        """The admin public key this data dir pins as the keyring's anchor (None: none yet)."""
        return load_anchor(self.keyring_path) if self.keyring_path.exists() else None

    def _roles(self) -> dict[str, str]:
        if not self.keyring_path.exists():
            return {}
        return {e["name"]: e["role"] for e in _read_keyring_json(self.keyring_path)}

    def _write_keyring(self, identities: Sequence[Identity]) -> None:
        entries = [
            {"name": i.name, "role": i.role, "nkey": i.nkey, "key": i.key.hex(),
             "subjects": list(i.subjects)}
            for i in sorted(identities, key=lambda i: i.name)
        ]  # fmt: skip
        tmp = self.keyring_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": 1, "identities": entries}, indent=2) + "\n")
        tmp.replace(self.keyring_path)


def _read_keyring_json(path: Path) -> list[dict[str, str]]:
    try:
        doc = json.loads(path.read_text())
        entries = doc["identities"]
        for e in entries:
            str(e["name"]), str(e["role"]), bytes.fromhex(e["key"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"bad keyring {path}: {exc}") from None
    return list(entries)


def load_anchor(path: Path) -> bytes | None:
    """The admin identity's public key in a keyring.json: the key a node pins as the root of
    the log's keyring (None when the file lists no admin)."""
    for e in _read_keyring_json(path):
        if e["role"] == ADMIN:
            return bytes.fromhex(e["key"])
    return None


def load_keyring(path: Path) -> dict[bytes, Signatory]:
    """The auditor's keyring: Ed25519 key → actor and the subjects it may write."""
    entries = _read_keyring_json(path)
    return make_keyring(
        Signatory(e["name"], bytes.fromhex(e["key"]), tuple(e.get("subjects", ()))) for e in entries
    )
