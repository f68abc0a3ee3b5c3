"""``pydstack audit --app APP_ID``: one app's story from the log, re-verified on the way.

Reads the whole stream once. Every message goes through the log auditor (signature, subject,
hash chain of its aggregate, sequence); the app's events are picked out (``AppStory``) and
printed in order with their seq, time and actor. The story fails on any error at one of its
events, on an earlier event of one of its aggregates (the chain its events hang on), or a
missing sequence before its last event; every KeyIssued of the app is re-checked against its
recorded quote and policy (``recheck_kms``). Errors elsewhere in the log are only counted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from pydstack.core.apps import AppStory, StoryLine
from pydstack.core.audit import Auditor, Finding, Keyring
from pydstack.core.events import CodecError, decode_body, open_envelope

from ._common import Conn, connect, echo_json, fmt_time, run


def _relevant(f: Finding, story: AppStory) -> bool:
    if f.severity != "error" or not story.lines:
        return False
    if not f.subject:  # a gap: a deleted message may have been one of ours
        return f.seq <= story.lines[-1].seq
    last = max((ln.seq for ln in story.lines if ln.subject == f.subject), default=0)
    return f.seq <= last


async def _read(
    conn: Conn, app_id: str, ring: Keyring | None
) -> tuple[
    AppStory, list[Finding], dict[str, list[tuple[int, bytes]]], list[tuple[int, str, object]],
    dict[str, bytes],
]:  # fmt: skip
    from ._evidence import fetch_evidence
    from .audit import image_record

    auditor = Auditor(keyring=ring, first_seq=1, anchor=conn.anchor)
    story = AppStory(app_id)
    findings: list[Finding] = []
    kms: dict[str, list[tuple[int, bytes]]] = {}
    images: list[tuple[int, str, object]] = []
    async with await connect(conn) as store:
        last = await store.last_seq()
        if last:
            async for rec in store.read(until_seq=last):
                findings += auditor.check(rec.seq, rec.subject, rec.data)
                images.extend(image_record(rec.seq, rec.subject, rec.data, auditor.refused))
                try:
                    env = open_envelope(rec.data)
                    event = decode_body(env)
                except (CodecError, ValueError):
                    continue  # the auditor has reported it
                if event is None:
                    continue
                line = story.take(rec.seq, rec.subject, rec.time_ns or env.time_ns, env.actor,
                                  event)  # fmt: skip
                if line is not None and rec.subject.startswith("dstack.kms."):
                    kms.setdefault(rec.subject, []).append((rec.seq, rec.data))
        findings += auditor.finish(last)
        blobs, missing = await fetch_evidence(store, kms)  # the app's requests' evidence
    return story, findings + missing, kms, images, blobs


def audit_app(
    conn: Conn,
    app_id: str,
    ring: Keyring | None,
    collateral: Path | None,
    dev_pki: Path | None,
    as_json: bool,
) -> None:
    """Print the story and its findings; raise ClickException (exit 1) if any is an error."""
    from .audit import recheck_kms

    app_id = app_id.lower().removeprefix("0x")
    story, findings, kms, images, blobs = run(_read(conn, app_id, ring))
    if not story.lines:
        raise click.ClickException(f"no events of app {app_id} on the log (pydstack app ls)")
    mine = [f for f in findings if _relevant(f, story)]
    for subj, recs in kms.items():
        mine += recheck_kms(subj, recs, collateral, dev_pki, images, blobs)
    elsewhere = sum(f.severity == "error" and not _relevant(f, story) for f in findings)
    by_seq: dict[int, list[Finding]] = {}
    story_seqs = {ln.seq for ln in story.lines}
    loose: list[Finding] = []
    for f in mine:
        (by_seq.setdefault(f.seq, []) if f.seq in story_seqs else loose).append(f)
    for line in story.lines:
        _emit(line, by_seq.get(line.seq, []), as_json)
    for f in loose:
        _finding(f, as_json)
    errors = [f for f in mine if f.severity == "error"]
    checked = sum(1 for ln in story.lines if ln.type == "KeyIssued")
    summary: dict[str, Any] = {
        "app_id": app_id, "events": len(story.lines), "aggregates": len(story.subjects),
        "first_seq": story.lines[0].seq, "last_seq": story.lines[-1].seq,
        "keys_rechecked": checked, "errors": len(errors),
        "warnings": len(mine) - len(errors), "errors_elsewhere": elsewhere, "ok": not errors,
    }  # fmt: skip
    if as_json:
        echo_json({"summary": summary})
    else:
        other = f"; {elsewhere} errors elsewhere in the log (pydstack audit)" if elsewhere else ""
        click.echo(f"audited app {app_id}: {summary['events']} events on {summary['aggregates']} "
                   f"aggregates (seq {summary['first_seq']}-{summary['last_seq']}), "
                   f"{checked} key decisions re-checked; {len(errors)} errors, "
                   f"{summary['warnings']} warnings{other}")  # fmt: skip
    if errors:
        f = errors[0]
        more = f" ({len(errors) - 1} more listed)" if len(errors) > 1 else ""
        reason = f.reason if f.reason.startswith("seq ") else f"seq {f.seq}: {f.reason}"
        raise click.ClickException(f"audit of app {app_id} failed at {reason}{more}")


def _emit(line: StoryLine, problems: list[Finding], as_json: bool) -> None:
    if as_json:
        echo_json({"seq": line.seq, "time": fmt_time(line.time_ns), "actor": line.actor,
                   "subject": line.subject, "type": line.type, "text": line.text,
                   "problems": [f.reason for f in problems]})  # fmt: skip
        return
    mark = "✗" if any(f.severity == "error" for f in problems) else " "
    click.echo(f"{mark} seq {line.seq:<6} {fmt_time(line.time_ns)}  {line.actor:<9} "
               f"{line.text}")  # fmt: skip
    for f in problems:
        click.echo(f"    {'' if f.severity == 'error' else 'warning: '}{f.reason}")


def _finding(f: Finding, as_json: bool) -> None:
    if as_json:
        echo_json(f)
    else:
        click.echo(f"{'' if f.severity == 'error' else 'warning: '}{f.reason}")
