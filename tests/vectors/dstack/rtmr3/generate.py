"""Write cases.json: RTMR3 event lists as dstack v0.5.11's guest builds them, replayed by
dstack-sdk. From the repository root::

    .venv/bin/python tests/vectors/dstack/rtmr3/generate.py

Standard library and dstack-sdk only; nothing from pydstack. Three sources, each dstack's:

1. The order, names and payloads are transcribed from dstack v0.5.11 (commit 40eaf35e),
   ``dstack-util/src/system_setup.rs``: ``measure_app_info`` (system-preparing, app-id,
   compose-hash, instance-id: ``sha256(instance_id_seed || app_id)[:20]``, empty with
   ``no_instance_id``; boot-mr-done), ``request_app_keys_from_kms_url`` (mr-kms in the TLS
   verifier when the KMS certificate has an attestation, then os-image-hash from GetAppKey's
   answer; KMS only), ``verify_app`` (key-provider: ``serde_json::to_vec(KeyProviderInfo)``,
   names kms / local-sgx / none, id hex / hex / ""), ``setup_fs`` (storage-fs:
   ``FsType``'s Display, ``zfs`` / ``ext4``; system-ready).
2. Each event's digest is cc-eventlog's ``RuntimeEvent::digest`` rule, sha384(le32
   0x08000001 || ":" || name || ":" || payload). Before anything is written, the rule must
   reproduce every RTMR3 digest of two logs dstack's own code made (tests/vectors/dstack/
   attestation.decoded.json from guest-agent/fixtures/attestation.bin, and verifier/fixtures/
   quote-report.json), or the script stops.
3. RTMR3 is dstack-sdk's (PyPI ``dstack-sdk``) ``GetQuoteResponse.replay_rtmrs()`` over the
   event log, as dstack's JSON event log carries it; it must first reproduce both fixtures'
   quoted RTMR3.

Fixed inputs: the compose is vmm-cli's own output (``../app-compose/out/deploy-default.json``),
the KMS root SPKI and os-image-hash are those of attestation.bin's dstack boot, the local-sgx
mr that of quote-report.json's; the seed and mr-kms are arbitrary constants.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path

from dstack_sdk.dstack_client import GetQuoteResponse

HERE = Path(__file__).resolve().parent
DSTACK = HERE.parent
RUNTIME = 0x08000001  # cc-eventlog DSTACK_RUNTIME_EVENT_TYPE


def digest(name: str, payload: bytes) -> bytes:
    return hashlib.sha384(
        struct.pack("<I", RUNTIME) + b":" + name.encode() + b":" + payload
    ).digest()


def log_entry(name: str, payload: bytes) -> dict[str, object]:
    return {"imr": 3, "event_type": RUNTIME, "digest": digest(name, payload).hex(),
            "event": name, "event_payload": payload.hex()}  # fmt: skip


def sdk_rtmr3(event_log: list[dict[str, object]]) -> str:
    return GetQuoteResponse(quote="", event_log=json.dumps(event_log)).replay_rtmrs()[3]


def check_against_dstack_fixtures() -> dict[str, list[dict[str, object]]]:
    """The digest rule and the SDK's replay reproduce both dstack-made logs exactly."""
    att = json.loads((DSTACK / "attestation.decoded.json").read_text())
    qr = json.loads((DSTACK / "quote-report.json").read_text())
    quote = bytes.fromhex(qr["quote"])
    # TDX v4 quote: 48-byte header, TD report; RTMR3 at report offset 472 (48 bytes)
    qr_rtmr3 = quote[48 + 472 : 48 + 520].hex()
    logs = {"attestation.bin": (att["event_log"], att["rtmr_from_quote"][3]),
            "quote-report.json": (json.loads(qr["event_log"]), qr_rtmr3)}  # fmt: skip
    out = {}
    for source, (log, want) in logs.items():
        for e in log:
            if e["imr"] == 3 and e["event_type"] == RUNTIME:
                got = digest(e["event"], bytes.fromhex(e["event_payload"])).hex()
                if got != e["digest"]:
                    sys.exit(f"{source}: digest rule does not give dstack's for {e['event']}")
        plain = [{k: e[k] for k in ("imr", "event_type", "digest", "event", "event_payload")}
                 for e in log]  # fmt: skip
        if sdk_rtmr3(plain) != want:
            sys.exit(f"{source}: dstack-sdk's replay does not give the quoted RTMR3")
        out[source] = [e for e in plain if e["imr"] == 3]
    return out


def key_provider(doc: dict[str, object]) -> str:
    """dstack-types ``AppCompose::key_provider()``: key_provider, else kms, else local,
    else none."""
    if doc.get("key_provider"):
        return str(doc["key_provider"])
    if doc.get("kms_enabled"):
        return "kms"
    return "local" if doc.get("local_key_provider_enabled") else "none"


def v0_5_11_events(
    *, compose: bytes, seed: bytes, provider_id: bytes, os_image_hash: bytes,
    mr_kms: bytes | None, storage_fs: str,
) -> list[tuple[str, bytes]]:  # fmt: skip
    """system_setup.rs, in the order a boot runs it (no host app_id: the compose's)."""
    doc = json.loads(compose)
    provider = key_provider(doc)
    compose_hash = hashlib.sha256(compose).digest()
    app_id = compose_hash[:20]
    no_instance_id = bool(doc.get("no_instance_id"))
    instance_id = b"" if no_instance_id else hashlib.sha256(seed + app_id).digest()[:20]
    events = [("system-preparing", b""), ("app-id", app_id), ("compose-hash", compose_hash),
              ("instance-id", instance_id), ("boot-mr-done", b"")]  # fmt: skip
    if provider == "kms":
        if mr_kms is not None:
            events.append(("mr-kms", mr_kms))
        events.append(("os-image-hash", os_image_hash))
    name = {"kms": "kms", "local": "local-sgx", "none": "none"}[provider]
    ident = "" if provider == "none" else provider_id.hex()
    # serde_json::to_vec of struct KeyProviderInfo { name, id }: compact, field order
    info = json.dumps({"name": name, "id": ident}, separators=(",", ":")).encode()
    events += [("key-provider", info), ("storage-fs", storage_fs.encode()), ("system-ready", b"")]
    return events


def main() -> None:
    fixtures = check_against_dstack_fixtures()
    att = json.loads((DSTACK / "attestation.decoded.json").read_text())["app_info_from_events"]
    kms_id = bytes.fromhex(json.loads(att["key-provider"])["id"])
    os_image_hash = bytes.fromhex(att["os-image-hash"])
    qr_log = fixtures["quote-report.json"]
    local_kp = next(e for e in qr_log if e["event"] == "key-provider")
    local_mr = bytes.fromhex(json.loads(bytes.fromhex(str(local_kp["event_payload"])))["id"])
    seed = bytes(range(20))
    mr_kms = hashlib.sha256(b"mr-kms vector").digest()
    ids = {"kms": kms_id, "local": local_mr, "none": b""}
    cases = [  # (id, vmm-cli compose, mr_kms, storage_fs)
        ("kms-ext4", "deploy-default.json", mr_kms, "ext4"),
        ("kms-ext4-no-kms-attestation", "deploy-default.json", None, "ext4"),
        ("kms-zfs", "deploy-default.json", mr_kms, "zfs"),
        ("kms-ext4-no-instance-id", "no-instance-id.json", mr_kms, "ext4"),
        ("local-sgx-ext4", "key-provider-local-over-kms.json", None, "ext4"),
        ("none-ext4", "key-provider-none.json", None, "ext4"),
    ]
    out = []
    for case, compose_file, mr, fs in cases:
        compose = (DSTACK / "app-compose" / "out" / compose_file).read_bytes()
        provider = key_provider(json.loads(compose))
        events = v0_5_11_events(compose=compose, seed=seed, provider_id=ids[provider],
                                os_image_hash=os_image_hash, mr_kms=mr, storage_fs=fs)  # fmt: skip
        log = [log_entry(n, p) for n, p in events]
        out.append({
            "case": case,
            "inputs": {"compose": compose_file, "instance_id_seed": seed.hex(),
                       "key_provider": provider, "key_provider_id": ids[provider].hex(),
                       "os_image_hash": os_image_hash.hex(),
                       "mr_kms": mr.hex() if mr is not None else None, "storage_fs": fs},
            "event_log": log,
            "rtmr3": sdk_rtmr3(log),
        })  # fmt: skip
    doc = {"dstack": "v0.5.11 (40eaf35e) dstack-util/src/system_setup.rs",
           "replayed_by": "dstack-sdk GetQuoteResponse.replay_rtmrs", "cases": out}  # fmt: skip
    (HERE / "cases.json").write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
