"""Reading the log: ``pydstack events`` (monitor) and ``pydstack replay`` (state at a point)."""

from __future__ import annotations

from typing import Any, Final

import click
import msgspec

from pydstack.adapters.nats import Recorded
from pydstack.core.events import ALL_SUBJECTS as ALL
from pydstack.core.events import (
    SignatureError,
    decode_body,
    kind_filter,
    open_envelope,
    verify,
)
from pydstack.core.events.subjects import KINDS
from pydstack.core.policy import Allowed, Gate
from pydstack.core.projections import Projections, fold, from_allowed

from ._common import (
    Point,
    PointType,
    connect,
    connection_options,
    echo_json,
    fmt_time,
    json_option,
    progress,
    resolve,
    run,
)

_BODY_WIDTH: Final = 110


def _value(v: Any) -> str:
    if isinstance(v, bytes):
        return f"<{len(v)}B>"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}={_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list | tuple):
        return "[" + ",".join(_value(x) for x in v) + "]"
    return str(v)


def short_body(event: msgspec.Struct) -> str:
    """``key=value`` of the fields that are set, cut to one terminal line."""
    fields: dict[str, Any] = msgspec.to_builtins(event, builtin_types=(bytes,))
    fields.pop("type", None)
    text = " ".join(f"{k}={_value(v)}" for k, v in fields.items() if v not in ("", [], b"", None))
    return text if len(text) <= _BODY_WIDTH else text[: _BODY_WIDTH - 1] + "…"


def describe(rec: Recorded) -> dict[str, Any]:
    """One stored message as `events --json` prints it; never raises on bad bytes."""
    out: dict[str, Any] = {"seq": rec.seq, "time": fmt_time(rec.time_ns), "subject": rec.subject}
    try:
        env = open_envelope(rec.data)
    except ValueError as exc:
        return {**out, "type": None, "valid": False, "error": f"unparseable: {exc}"}
    out.update(type=env.type, actor=env.actor, id=env.id, correlation=env.correlation,
               causation=env.causation, valid=True)  # fmt: skip
    try:
        verify(rec.data)
    except SignatureError:
        out.update(valid=False, error="bad signature")
    try:
        event = decode_body(env)
    except ValueError as exc:
        return {**out, "valid": False, "error": str(exc)}
    if event is not None:
        out["body"] = msgspec.to_builtins(event)
        out["summary"] = short_body(event)
    return out


def line(d: dict[str, Any]) -> str:
    mark = "" if d.get("valid") else f"  !! {d.get('error')}"
    return (f"{d['seq']:>7}  {d['time']}  {d['subject']:<28} {d.get('type') or '?':<18} "
            f"{d.get('actor', '?'):<10} {d.get('summary', '')}{mark}")  # fmt: skip


def _subject(value: str | None) -> str:
    if not value:
        return ALL
    return kind_filter(value) if value in KINDS else value


@click.command("events")
@connection_options
@click.option(
    "--subject",
    "subj",
    metavar="SUBJECT|KIND",
    help="a subject or wildcard (dstack.vm.*), or a kind: " + ", ".join(sorted(KINDS)),
)
@click.option(
    "--since",
    type=PointType(),
    default=None,
    help="from this sequence (123), time (2025-01-31T12:00:00Z) or age (10m)",
)
@click.option("--follow", "-f", is_flag=True, help="keep printing new events as they arrive")
@json_option
@click.pass_context
def events_cmd(
    ctx: click.Context, subj: str | None, since: Point | None, follow: bool, as_json: bool
) -> None:
    """Print the log: seq, time, subject, type, actor, short body (one line per event)."""
    conn = resolve(ctx)
    subject = _subject(subj)

    async def show() -> None:
        async with await connect(conn) as store:
            if await store.last_seq() == 0 and not follow:  # also: StreamMissing, clearly
                return
            kwargs: dict[str, Any] = {"subject": subject, "follow": follow}
            if since is not None and since[0] == "time":
                kwargs["from_time"] = since[1]
            elif since is not None:
                kwargs["from_seq"] = int(since[1])
            async for rec in store.read(**kwargs):
                d = describe(rec)
                click.echo(msgspec.json.encode(d).decode() if as_json else line(d))

    run(show())


@click.command("replay")
@connection_options
@click.option(
    "--until",
    type=PointType(),
    default=None,
    help="up to this sequence or time (default: everything)",
)
@json_option
@click.pass_context
def replay_cmd(ctx: click.Context, until: Point | None, as_json: bool) -> None:
    """Rebuild apps, VMs and hosts as they were at a point of the log (pure folds).

    Only events the write policy allows are folded (the actors' verdict, against the log's
    keyring rooted in the data dir's admin key); the others are counted as skipped.
    """
    conn = resolve(ctx)
    gate = Gate.pinned(conn.anchor)

    async def rebuild() -> tuple[Projections, int, int]:
        state, skipped, upto, batch = Projections(), 0, 0, []
        async with await connect(conn) as store:
            last = await store.last_seq()
            stop = last if until is None or until[0] == "time" else min(last, int(until[1]))
            if stop == 0:
                return state, 0, 0
            with progress(stop, "replaying") as bar:
                async for rec in store.read(until_seq=stop):
                    if until is not None and until[0] == "time" and rec.time_ns > until[1] * 1e9:
                        break
                    v = gate.judge(rec.seq, rec.subject, rec.data)
                    if isinstance(v, Allowed):
                        a = from_allowed(v, rec.seq, rec.time_ns)
                    else:
                        a, skipped = None, skipped + 1
                    if a is not None:
                        batch.append(a)
                    if len(batch) >= 4096:
                        state, batch = fold(batch, state), []
                    bar.update(rec.seq - upto)
                    upto = rec.seq
                state = fold(batch, state)
        return state, skipped, upto

    state, skipped, upto = run(rebuild())
    if as_json:
        echo_json({"seq": upto, "skipped": skipped,
                   "apps": state.apps, "vms": state.vms, "hosts": state.hosts})  # fmt: skip
        return
    _print_state(state, skipped, upto)


def _print_state(p: Projections, skipped: int, upto: int) -> None:
    click.echo(f"state at seq {upto}" + (f" ({skipped} unreadable or refused messages skipped)"
                                          if skipped else ""))  # fmt: skip
    click.echo(f"apps ({len(p.apps)})")
    for a in sorted(p.apps.values(), key=lambda a: a.app_id):
        gone = f"  removed: {a.removed_reason}" if a.removed else ""
        click.echo(f"  {a.app_id}  {a.name or '-':<16} compose {a.compose_hash[:16]}…  "
                   f"upgrades {a.upgrades}{gone}")  # fmt: skip
    click.echo(f"vms ({len(p.vms)})")
    for v in sorted(p.vms.values(), key=lambda v: v.vm_id):
        where = f"{v.host} cid {v.cid}" if v.host else "-"
        ports = ",".join(f"{m.host_port}:{m.vm_port}" for m in v.ports) or "-"
        why = f"  ({v.reason})" if v.reason else ""
        click.echo(f"  {v.vm_id}  {v.state:<9} app {v.app_id}  {v.resources.vcpu} vcpu "
                   f"{v.resources.memory_mb} MB  on {where}  ports {ports}{why}")  # fmt: skip
    click.echo(f"hosts ({len(p.hosts)})")
    for h in sorted(p.hosts.values(), key=lambda h: h.host_id):
        left = "  left" if h.left else ""
        click.echo(f"  {h.host_id}  vcpu {h.vcpu_used}/{h.vcpu}  memory {h.memory_used_mb}/"
                   f"{h.memory_mb} MB  vms {len(h.placements)}{left}")  # fmt: skip
