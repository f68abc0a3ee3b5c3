"""``pydstack audit`` (re-verify the whole log) and ``pydstack status`` (server, stream, actors)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import click

from pydstack.adapters.nats import EventStore, StreamMissing
from pydstack.adapters.nats.identity import load_anchor, load_keyring
from pydstack.core.audit import Auditor, Finding, Keyring, Summary

from ._common import connect, connection_options, echo_json, json_option, progress, resolve, run
from ._evidence import fetch_evidence


def _summary_line(s: Summary, keyring: Path | None, anchor: bytes | None) -> str:
    signers = ", ".join(f"{name} {n}" for name, n in sorted(s.signers.items())) or "none"
    if s.keyring_seq:
        root = f"anchored to the pinned admin key {anchor.hex()[:16]}…" if anchor else \
            "NOT pinned: rooted in its first entry's signer"  # fmt: skip
        ring = (f"keyring on the log from seq {s.keyring_seq} ({root}); {s.refused} events "
                f"refused by the write policy")  # fmt: skip
        if s.pre_keyring:
            ring += f", {s.pre_keyring} pre-keyring"
    else:
        ring = "no keyring on the log (roles not checked)"
        ring += f"; keyring file {keyring}" if keyring else ""
    span = f"seq {s.first_seq}-{s.last_seq}" if s.events else "empty stream"
    return (f"audited {s.events} events ({span}) on {s.aggregates} aggregates; signers: "
            f"{signers}; {ring}; {s.errors} errors, {s.warnings} warnings")  # fmt: skip


@click.command("audit")
@connection_options
@click.option(
    "--keyring",
    "keyring_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="keyring.json of allowed signers [default: the data dir's, if any]",
)
@click.option("--no-keyring", is_flag=True, help="check signatures without a keyring")
@click.option(
    "--collateral",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="collateral JSON to re-verify the KMS decisions' quotes with",
)
@click.option(
    "--dev-pki",
    type=click.Path(file_okay=False, path_type=Path),
    help="simulator PKI the KMS trusted [default: the data dir's dev-pki, if any]",
)
@click.option("--app", "app_id", default=None, metavar="APP_ID",
              help="only this app's story, in order, each event re-verified")  # fmt: skip
@json_option
@click.pass_context
def audit_cmd(
    ctx: click.Context,
    keyring_file: Path | None,
    no_keyring: bool,
    collateral: Path | None,
    dev_pki: Path | None,
    app_id: str | None,
    as_json: bool,
) -> None:
    """Re-verify every signature, hash chain and sequence of the log, and every KMS decision.

    Exits non-zero when anything is wrong, naming the stream sequence and the reason (a
    forged or altered event, a broken chain, a deleted or reordered message, an event the
    write policy refuses against the log's keyring (every actor skipped it), a KeyIssued whose
    recorded quote, event log or policy does not re-verify). Unknown event types and events
    written before the log had a keyring are warnings. The keyring's root is the admin key of
    the data dir's keyring.json (or --keyring's).
    """
    conn = resolve(ctx)
    if dev_pki is None and collateral is None and (conn.data.path / "dev-pki").is_dir():
        dev_pki = conn.data.path / "dev-pki"
    kms_logs: dict[str, list[tuple[int, bytes]]] = {}
    images: list[tuple[int, str, object]] = []  # admitted image events, for the image checks
    ring_path = None if no_keyring else (keyring_file or conn.keyring_path)
    if ring_path is not None and not ring_path.exists():
        if keyring_file is not None:
            raise click.BadParameter(f"{keyring_file} does not exist", param_hint="--keyring")
        ring_path = None
    ring: Keyring | None = None
    anchor: bytes | None = None
    if ring_path is not None:
        ring = run(_load(ring_path))
        anchor = load_anchor(ring_path)
    if app_id is not None:
        from .app_audit import audit_app

        return audit_app(conn, app_id, ring, collateral, dev_pki, as_json)
    first_error: list[Finding] = []

    def emit(findings: list[Finding]) -> None:
        for f in findings:
            if f.severity == "error" and not first_error:
                first_error.append(f)
            if as_json:
                echo_json(f)
            else:
                click.echo(f.reason if f.severity == "error" else f"warning: {f.reason}")

    async def check() -> Summary:
        auditor = Auditor(keyring=ring, first_seq=1, anchor=anchor)
        async with await connect(conn) as store:
            last = await store.last_seq()
            with progress(last, "auditing") as bar:
                if last:
                    async for rec in store.read(until_seq=last):
                        emit(auditor.check(rec.seq, rec.subject, rec.data))
                        if rec.subject.startswith("dstack.kms."):
                            kms_logs.setdefault(rec.subject, []).append((rec.seq, rec.data))
                        images.extend(image_record(rec.seq, rec.subject, rec.data,
                                                   auditor.refused))  # fmt: skip
                        bar.update()
            emit(auditor.finish(last))
            blobs, extra = await fetch_evidence(store, kms_logs)  # missing / altered blobs
        extra += [f for subj, recs in kms_logs.items()
                  for f in recheck_kms(subj, recs, collateral, dev_pki, images, blobs)]  # fmt: skip
        emit(extra)
        s = auditor.summary()
        errors = sum(f.severity == "error" for f in extra)
        return replace(s, errors=s.errors + errors, warnings=s.warnings + len(extra) - errors)

    summary = run(check())
    if as_json:
        echo_json({"summary": {**asdict(summary), "ok": summary.ok,
                               "keyring": str(ring_path) if ring_path else None}})  # fmt: skip
    else:
        click.echo(_summary_line(summary, ring_path, anchor))
    if first_error:
        f = first_error[0]
        more = f" ({summary.errors - 1} more listed)" if summary.errors > 1 else ""
        raise click.ClickException(f"audit failed at {f.reason}{more}")


def image_record(rec_seq: int, subject: str, data: bytes, refused: dict[int, str]) -> list[
    tuple[int, str, object]
]:  # fmt: skip
    """An admitted image event as the re-check of image checks needs it (else nothing)."""
    from pydstack.core.events import CodecError, decode_body, open_envelope

    if not subject.startswith("dstack.image.") or rec_seq in refused:
        return []
    try:
        return [(rec_seq, subject, decode_body(open_envelope(data)))]
    except CodecError:
        return []


def recheck_images(
    subj: str, events: list[tuple[int, object]], images: list[tuple[int, str, object]],
    simulated: bool,
) -> list[Finding]:  # fmt: skip
    """Re-run each KeyIssued's image check with the images the log held when it was decided:
    the recorded summary must come out again, from the recorded attestation and vm_config.
    An app's issue (GetAppKey, SignCert) that records no check must pass it too once the log
    held an image (before any, the log predates measured images): a KMS that skipped the
    check does not escape the audit by leaving it out."""
    from pydstack.actors.kms.images import quote_measurements
    from pydstack.adapters.tdx.attestation import AttestationDecodeError, decode_attestation
    from pydstack.core.events import KeyIssued, KeyRequested
    from pydstack.core.measure import check_image
    from pydstack.core.measure.check import image_at

    requests: dict[str, KeyRequested] = {}
    out: list[Finding] = []
    for seq, e in events:
        if isinstance(e, KeyRequested):
            requests.setdefault(e.request_id, e)
        if not isinstance(e, KeyIssued):
            continue
        req = requests.get(e.request_id)
        if req is None:
            continue  # audit_kms_log names the missing request
        if not e.image_check and (
            req.method == "GetKmsKey" or not any(s < seq for s, _, _ in images)
        ):
            continue  # a replica's root keys, or a log without images then: never checked
        try:
            measured = quote_measurements(decode_attestation(req.attestation).quote)
        except (AttestationDecodeError, ValueError) as exc:
            measured, why = None, f"attestation: {exc}"
        if measured is not None:
            h = e.boot_info.os_image_hash
            again = check_image(image_at(images, h, seq), h, req.vm_config, measured,
                                simulated=simulated)  # fmt: skip
            if again.ok and again.summary == (e.image_check or again.summary):
                continue
            why = "; ".join(again.reasons) or f"re-check says {again.summary!r}"
        reason = f"seq {seq}: {subj}: {e.request_id}: image check does not hold: {why}"
        out.append(Finding(seq=seq, code="kms_image_check", reason=reason, subject=subj))
    return out


def recheck_kms(
    subj: str, recs: list[tuple[int, bytes]], collateral: Path | None, dev_pki: Path | None,
    images: list[tuple[int, str, object]] | None = None, blobs: Mapping[str, bytes] | None = None,
) -> list[Finding]:  # fmt: skip
    """Re-verify one KMS aggregate's decisions against their recorded evidence and policy,
    and (with `images`, the admitted image events) their image checks. `blobs`: the evidence
    bucket's blobs that hash right (`fetch_evidence`), for lean requests."""
    from pydstack.actors.kms import make_recheck
    from pydstack.actors.kms.certgrants import boot_time_of
    from pydstack.adapters.tdx.collateral import Collateral, collateral_from_json
    from pydstack.core.events import CodecError, KeyIssued, KeyRequested, decode_body, open_envelope
    from pydstack.core.kms import audit_kms_log
    from pydstack.core.kms.blobs import with_blob

    events = []
    sequenced: list[tuple[int, object]] = []
    seq_of: dict[str, int] = {}  # request id -> seq of its decision, to name it in findings
    for seq, data in recs:
        try:
            body = decode_body(open_envelope(data))
        except CodecError:
            continue  # already reported by the log audit
        if isinstance(body, KeyRequested) and body.attestation_sha256:  # lean: re-check as inline
            body = with_blob(body, (blobs or {}).get(body.attestation_sha256))
        events.append(body)
        sequenced.append((seq, body))
        rid = getattr(body, "request_id", None)
        if isinstance(rid, str):
            seq_of[rid] = seq
    first = recs[0][0] if recs else 0
    if not any(isinstance(e, KeyIssued) for e in events):
        return []
    if collateral is None and dev_pki is None:
        why = f"seq {first}: {subj}: KMS decisions not re-verified; give --collateral or --dev-pki"
        return [Finding(seq=first, code="kms_not_rechecked", reason=why, severity="warning")]
    root_der = None
    at = {"now": 0}
    if dev_pki is not None:
        from pydstack.adapters.tdx.pki import DevPki

        pki = DevPki.load(dev_pki)
        root_der = pki.root_der

        def coll(_q: bytes) -> Collateral:  # dev collateral as it was valid at decision time
            return collateral_from_json(pki.collateral_json(at["now"]))
    else:
        assert collateral is not None
        fixed = collateral_from_json(collateral.read_bytes())

        def coll(_q: bytes) -> Collateral:
            return fixed

    inner = make_recheck(coll, root_der)

    def recheck(raw: bytes, vm_config: str, policy: str, now: int) -> Any:
        at["now"] = now
        return inner(raw, vm_config, policy, now)

    out = recheck_images(subj, sequenced, images, dev_pki is not None) if images is not None else []
    for p in audit_kms_log(events, recheck, boot_time_of):
        seq = seq_of.get(p.split(":", 1)[0], first)
        out.append(Finding(seq=seq, code="kms_decision", reason=f"seq {seq}: {subj}: {p}",
                           subject=subj))  # fmt: skip
    return out


async def _load(path: Path) -> Keyring:
    return load_keyring(path)


@click.command("status")
@connection_options
@json_option
@click.pass_context
def status_cmd(ctx: click.Context, as_json: bool) -> None:
    """Server, stream state, actors' consumers and their lag, aggregate counts."""
    conn = resolve(ctx)

    async def gather() -> dict[str, Any]:
        import nats.js.errors

        async with await connect(conn) as store:
            nc = store.nc
            try:
                si = await store.js.stream_info(conn.stream, subjects_filter="dstack.>")
            except nats.js.errors.NotFoundError:
                raise StreamMissing(conn.stream) from None
            consumers = await store.js.consumers_info(conn.stream)
            host_rows = await _hosts(store)
        st = si.state
        server: dict[str, Any] = dict(nc._server_info or {})  # nats-py has no public accessor
        kinds: Counter[str] = Counter()
        events: Counter[str] = Counter()
        for subj, n in (st.subjects or {}).items():
            kind = subj.split(".")[1] if subj.count(".") >= 2 else subj
            kinds[kind] += 1
            events[kind] += n
        local = conn.data.state()
        running = bool(local) and _alive(int(local.get("pid", 0)))
        return {
            "server": {"url": conn.url, "version": server.get("version", "?"),
                       "name": server.get("server_name", "")},
            "local": {"data_dir": str(conn.data.path), "up_running": running,
                      "pid": local.get("pid") if running else None,
                      "metrics_url": local.get("metrics_url") if running else None,
                      "tee": local.get("tee") if running else None},
            "stream": {"name": conn.stream, "messages": st.messages, "bytes": st.bytes,
                       "first_seq": st.first_seq, "last_seq": st.last_seq,
                       "deleted": st.num_deleted or 0, "replicas": si.config.num_replicas,
                       "deny_delete": bool(si.config.deny_delete),
                       "leader": si.cluster.leader if si.cluster else None},
            "aggregates": {k: {"aggregates": kinds[k], "events": events[k]} for k in sorted(kinds)},
            "hosts": host_rows,
            "consumers": [
                {"name": c.name, "lag": c.num_pending or 0, "ack_pending": c.num_ack_pending or 0,
                 "redelivered": c.num_redelivered or 0,
                 "last_delivered": c.delivered.stream_seq if c.delivered else 0,
                 "durable": bool(c.config.durable_name)}
                for c in consumers
            ],
        }  # fmt: skip

    info = run(gather())
    if as_json:
        echo_json(info)
        return
    srv, loc, s = info["server"], info["local"], info["stream"]
    up = f"`up` pid {loc['pid']}, metrics {loc['metrics_url'] or 'off'}" if loc["up_running"] \
        else "no local `up` running"  # fmt: skip
    click.echo(f"server     {srv['url']}  nats-server {srv['version']}  ({up}; {loc['data_dir']})")
    if loc["tee"] == "simulated":  # simulation is never silent
        click.echo("tee        SIMULATED TDX (dev PKI): attestation proves nothing, nothing is "
                   "confidential")  # fmt: skip
    click.echo(f"stream     {s['name']}  {s['messages']} messages  {s['bytes']} bytes  "
               f"seq {s['first_seq']}-{s['last_seq']}  deleted {s['deleted']}  replicas "
               f"{s['replicas']}  deny_delete {'yes' if s['deny_delete'] else 'NO'}")  # fmt: skip
    aggs = "  ".join(f"{k} {v['aggregates']} ({v['events']} events)"
                     for k, v in info["aggregates"].items()) or "none"  # fmt: skip
    click.echo(f"aggregates {aggs}")
    for h in info["hosts"]:
        gone = "  (left)" if h["left"] else ""
        why = f" ({h['platform_reason']})" if h["platform_reason"] else ""
        click.echo(f"host       {h['host_id']}  platform {h['platform']}{why}{gone}")
    if not info["consumers"]:
        click.echo("consumers  none (no actor has connected yet)")
    for c in info["consumers"]:
        if c["durable"]:
            click.echo(
                f"consumer   {c['name']:<12} lag {c['lag']}  ack pending {c['ack_pending']}"
                f"  redelivered {c['redelivered']}  at seq {c['last_delivered']}"
            )


async def _hosts(store: EventStore) -> list[dict[str, Any]]:
    """Each host's platform as its own VMM announced it (HostJoined), through the write policy."""
    from pydstack.actors.trust import Judge
    from pydstack.core.events import kind_filter
    from pydstack.core.projections import Applied, hosts

    records, _ = await store.read_aggregate(kind_filter("host"))
    folded: dict[str, Any] = {}
    for ok in await Judge("status").admitted(store, records):
        if ok.event is None:  # a type unknown to this version
            continue
        agg = ok.envelope.subject.split(".", 2)[2]
        h = hosts.apply(folded.get(agg), Applied(0, ok.envelope.time_ns, ok.event, ok.envelope.id))
        if h is not None:
            folded[agg] = h
    return [{"host_id": h.host_id, "platform": h.platform or "unknown",
             "platform_reason": h.platform_reason, "left": h.left}
            for h in sorted(folded.values(), key=lambda h: h.host_id)]  # fmt: skip


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
