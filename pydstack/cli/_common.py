"""What every command shares: where NATS is, who we are, one-line errors, output helpers.

Connection settings come, in order, from the command's own options, the group's options
(``pydstack --nats URL events``), the environment (``PYDSTACK_NATS``, ``PYDSTACK_CREDS``,
``PYDSTACK_HOME``, ``PYDSTACK_STREAM``), the data dir of a local ``pydstack up``
(``state.json``, ``config.json``, ``identities/``), and finally ``nats://127.0.0.1:4222``.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal, TypeVar
from urllib.parse import urlsplit

import click
import msgspec
import nats.errors
import nats.js.errors

from pydstack.adapters.nats import (
    EventStore,
    StoreError,
    StreamSettings,
    Unreachable,
    riding_out,
)
from pydstack.adapters.nats.identity import Identity, load_keyring, read_seed_file
from pydstack.controlplane import DEFAULT_PORT, DataDir
from pydstack.core.events import Event, Signer
from pydstack.core.retry import Backoff

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Settings:
    nats: str | None = None
    data_dir: str | None = None
    creds: str | None = None
    identity: str | None = None
    stream: str | None = None


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value is not None and param.name is not None:
        setattr(ctx.ensure_object(Settings), param.name, value)
    return value


def connection_options(f: F) -> F:
    """--nats/--data-dir/--creds/--as/--stream, accepted on the group and on each command."""
    opts = [
        click.option("--nats", envvar="PYDSTACK_NATS", metavar="URL", expose_value=False,
                     callback=_remember, is_eager=True,
                     help="NATS server(s), comma-separated [env PYDSTACK_NATS; default: the "
                          "local `pydstack up`, else nats://127.0.0.1:4222]"),
        click.option("--data-dir", envvar="PYDSTACK_HOME", metavar="DIR", expose_value=False,
                     callback=_remember, is_eager=True,
                     help="data dir of a local `up` [env PYDSTACK_HOME; default ./.pydstack]"),
        click.option("--creds", envvar="PYDSTACK_CREDS", metavar="FILE", expose_value=False,
                     callback=_remember, is_eager=True,
                     help="nkey seed file (or .creds) to connect and sign with"),
        click.option("--as", "identity", metavar="NAME", expose_value=False,
                     callback=_remember, is_eager=True,
                     help="identity from the data dir to use [default: operator]"),
        click.option("--stream", envvar="PYDSTACK_STREAM", metavar="NAME", expose_value=False,
                     callback=_remember, is_eager=True, help="stream name [default: DSTACK]"),
    ]  # fmt: skip
    for opt in reversed(opts):
        f = opt(f)
    return f


json_option = click.option("--json", "as_json", is_flag=True,
                           help="one JSON object per line instead of text")  # fmt: skip


@dataclass(frozen=True)
class Conn:
    url: str
    signer: Signer
    seed: str | None
    stream: str
    data: DataDir

    @property
    def keyring_path(self) -> Path:
        return self.data.identities.keyring_path

    @property
    def anchor(self) -> bytes | None:
        """The admin key this data dir pins as the root of the log's keyring (None: none)."""
        try:
            return self.data.identities.anchor()
        except StoreError:
            return None


def resolve(ctx: click.Context) -> Conn:
    s = ctx.ensure_object(Settings)
    data = DataDir.resolve(s.data_dir)
    cfg = data.load_config()
    url = s.nats or data.state().get("nats_url") or cfg.nats_url
    if not url:
        url = f"nats://{cfg.host}:{cfg.port}" if data.config_path.exists() else \
            f"nats://127.0.0.1:{DEFAULT_PORT}"  # fmt: skip
    stream = s.stream or cfg.stream
    name = s.identity or "operator"
    seed: str | None = None
    if s.creds:
        seed = read_seed_file(Path(s.creds))
        raw = Identity(name, "operator", seed).raw_seed
        ring = data.identities.keyring_path
        if not s.identity:  # sign under the name the keyring knows, else the file's (x.nk)
            known = load_keyring(ring).get(Signer.from_private_bytes(name, raw).public_key) \
                if ring.exists() else None  # fmt: skip
            if known is not None:
                name = known.actor
            elif Path(s.creds).suffix in (".nk", ".creds"):  # alice.creds (tenant add --out)
                name = Path(s.creds).stem
        signer = Signer.from_private_bytes(name, raw)
    else:
        ident = data.identities.load(name)
        if ident is None and s.identity:
            raise StoreError(f"no identity {name!r} in {data.identities.dir}")
        seed = ident.seed if ident else None
        # No identity at all: sign with a throwaway key (the audit reports an unknown signer).
        signer = ident.signer if ident else Signer.from_private_bytes(name, os.urandom(32))
    return Conn(url=url, signer=signer, seed=seed, stream=stream, data=data)


async def _probe(url: str) -> None:
    """Fail in milliseconds when no server listens (nats-py would retry until its timeout)."""
    errors = []
    for server in url.split(","):
        parts = urlsplit(server.strip() if "://" in server else f"nats://{server.strip()}")
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(parts.hostname or "127.0.0.1", parts.port or 4222), 3.0
            )
        except (OSError, TimeoutError) as exc:
            refused = isinstance(exc, ConnectionRefusedError)
            errors.append("connection refused" if refused else str(exc) or type(exc).__name__)
            continue
        writer.close()
        return
    raise Unreachable(url, "; ".join(dict.fromkeys(e.lower() for e in errors)))


async def connect(conn: Conn, *, replicas: int = 1) -> EventStore:
    await _probe(conn.url)
    try:
        return await EventStore.connect(
            conn.url,
            conn.signer,
            nkey_seed=conn.seed,
            settings=StreamSettings(name=conn.stream, replicas=replicas),
            name=f"pydstack-cli-{conn.signer.actor}",
            # A node dying under the command (the stream leader, say) fails over to another
            # of the URLs; `leader_wait` bounds how long a call waits for that.
            reconnect=True,
            anchor=conn.anchor,
        )
    except Unreachable as exc:
        if "authorization" in str(exc).lower():
            raise StoreError(
                f"NATS at {conn.url} refused our credentials; pass --creds FILE, or --data-dir "
                "of the `pydstack up` that created the identities"
            ) from None
        raise


async def refuse_if_refused(store: EventStore, writes: Iterable[tuple[str, Event]]) -> None:
    """Append nothing the write policy would refuse: every fold would skip it, and the log
    would keep it for ever. Raises one line naming the rule (checked against the log's
    keyring and owners now; the folds judge again at read time)."""
    from pydstack.actors.trust import would_refuse  # the actors' import chain is heavy

    refused = await would_refuse(store, writes)
    if refused is not None:
        who = store.signer.actor
        raise StoreError(f"refused by the write policy ({refused.reason}): {refused.detail}; "
                         f"signing as {who!r}, nothing appended")  # fmt: skip


FORCE_EXIT_S = 3.0  # after Ctrl-C, how long a command may take to shut down cleanly


async def _interruptible(coro: Coroutine[Any, Any, T]) -> T:
    """Ctrl-C cancels the command; one that is still shutting down `FORCE_EXIT_S` later (or
    a second Ctrl-C) exits at once with 130. Commands only read, or await every write's ack,
    so nothing is lost by not waiting longer (a follower once sat in a client's close)."""
    if threading.current_thread() is not threading.main_thread():
        return await coro  # signals reach the main thread only (e.g. click's CliRunner)
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    assert task is not None

    def force_exit() -> None:
        sys.stdout.flush()
        sys.stderr.write(f"interrupted; still shutting down after {FORCE_EXIT_S:g}s: exiting\n")
        sys.stderr.flush()
        os._exit(130)

    def on_sigint() -> None:
        if task.cancelling():
            force_exit()
        task.cancel()
        loop.call_later(FORCE_EXIT_S, force_exit)

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        return await coro
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None
    finally:
        loop.remove_signal_handler(signal.SIGINT)


LEADER_WAIT_S: Final = 30.0
# JetStream forgets message ids after the stream's duplicate window (120 s); a retry inside it
# is deduplicated even without the expected-sequence check that also guards it.
_LEADER_WAIT_MAX_S: Final = 100.0


def leader_wait() -> Backoff:
    """How long a command waits out a stream without a leader (an election after a NATS node
    died): ``PYDSTACK_LEADER_WAIT_S`` seconds, default 30, at most 100."""
    raw = os.environ.get("PYDSTACK_LEADER_WAIT_S", "").strip()
    try:
        seconds = float(raw) if raw else LEADER_WAIT_S
    except ValueError:
        raise click.ClickException(
            f"PYDSTACK_LEADER_WAIT_S={raw!r}: expected a number of seconds"
        ) from None
    if not 0 <= seconds <= _LEADER_WAIT_MAX_S:
        raise click.ClickException(
            f"PYDSTACK_LEADER_WAIT_S={raw}: expected 0 to {_LEADER_WAIT_MAX_S:g} seconds"
        )
    return Backoff(deadline_s=seconds)


def _progress_line(text: str) -> None:
    click.echo(text, err=True)  # stderr: --json output on stdout stays one object per line


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; every expected failure becomes one line and exit code 1.

    Store calls wait out a leader election (`leader_wait`), saying so on stderr; each write is
    retried with the same bytes and message ids, so it lands once (docs/architecture.md)."""
    try:
        with riding_out(leader_wait(), notify=_progress_line):
            return asyncio.run(_interruptible(coro))
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    except nats.js.errors.NotFoundError as exc:
        raise click.ClickException(f"not found on the server: {exc.description or exc}") from None
    except (nats.errors.TimeoutError, TimeoutError):
        raise click.ClickException(
            "the NATS server did not answer in time: check this identity may do that, and "
            "that a majority of the NATS servers are up"
        ) from None
    except nats.errors.Error as exc:
        raise click.ClickException(f"NATS error: {exc}") from None


def echo_json(obj: Any) -> None:
    click.echo(msgspec.json.encode(obj).decode())


# -- points in the log: a sequence or a time ---------------------------------------------------

Point = tuple[Literal["seq", "time"], float]
_DURATION: Final = re.compile(r"^-?(\d+(?:\.\d+)?)(s|m|h|d)$")
_UNIT: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_point(value: str, now: float | None = None) -> Point:
    """``123`` (a sequence), ``2025-01-31T12:00:00Z`` (a time) or ``10m`` (that long ago)."""
    v = value.strip()
    if v.isdigit():
        return ("seq", int(v))
    m = _DURATION.match(v)
    if m:
        return ("time", (now or time.time()) - float(m.group(1)) * _UNIT[m.group(2)])
    try:
        dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a sequence (123), a time (2025-01-31T12:00:00Z) or an age (10m)"
        ) from None
    return ("time", (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp())


class PointType(click.ParamType):  # type: ignore[type-arg]  # generic only since click 8.2
    name = "SEQ|TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        return parse_point(str(value))


def fmt_time(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


# -- progress on long work ---------------------------------------------------------------------


class _Progress:
    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)


@contextmanager
def progress(total: int, label: str) -> Iterator[_Progress]:
    """A progress bar on stderr for long work, only when a person is watching (a TTY)."""
    if total < 2000 or not sys.stderr.isatty():
        yield _Progress(None)
        return
    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        yield _Progress(bar)
