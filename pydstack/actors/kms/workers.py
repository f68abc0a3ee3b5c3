"""One KMS served by several worker processes, so its throughput grows with the cores.

    python -m pydstack.actors.kms --workers 4 ...   # a supervisor and 4 workers, one port

Each worker is a whole KMS instance (`running_kms`) in its own process: its own NATS
connection, its root keys loaded from the sealed key file (never on argv or env), its own
RA-TLS server certificate, its own decision log (OCC + group commit: workers conflict like
replicas and append again). The image registry, the log backend's composes and the webhook are
read per request, so a revocation appended while they run is honoured by each at its next
request. SignCert grants (`certgrants`) are per process: the per-window bound holds per worker.

The supervisor (no NATS, no keys) starts worker 0 first, alone: it alone may create the
cluster's root or onboard, and it closes the requests any earlier life of this KMS (one process
or workers) left undecided. Once it serves, the KMS is ready (`KMS_URL=` printed: start-up
costs what one process's does) and the others start on the same port (`SO_REUSEPORT`: the
kernel spreads connections over those listening) and take their share as each gets ready.
Worker `i` labels its requests `<instance-id>#w<i>` (`KeyRequested.kms_instance`), so a restarted
worker closes only its own cut-off requests. A worker that exits is restarted with `--worker-
restart`; more than `RESTARTS` exits within `RESTART_WINDOW` seconds stop the KMS with one line.
Workers die with the supervisor (`PR_SET_PDEATHSIG`: SIGKILL), as one process would: no orphan
decides after a successor started.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

import structlog

from pydstack.actors.trust import Judge
from pydstack.adapters.nats import EventStore
from pydstack.adapters.nats.errors import ConflictError
from pydstack.core.events import KeyRequested, subject
from pydstack.core.kms import abandoned, undecided

if TYPE_CHECKING:
    from .launch import KmsLaunch

log = structlog.get_logger("pydstack.kms")

RESTARTS = 5  # worker exits tolerated per window before the KMS gives up
RESTART_WINDOW = 60.0
_PR_SET_PDEATHSIG = 1


def worker_label(instance_id: str, index: int) -> str:
    """The `kms_instance` a worker's requests carry: replicas sharing an identity and the
    workers of one KMS differ by it."""
    return f"{instance_id}#w{index}"


def is_worker_label(label: str, instance_id: str) -> bool:
    tail = label.removeprefix(f"{instance_id}#w")
    return tail != label and tail.isdigit()


async def close_worker_cut_offs(store: EventStore, cluster: str, instance_id: str) -> int:
    """Close (KeyDenied, ABANDONED) every undecided request of this KMS's workers, from any
    earlier life; only before any worker serves. Returns how many. OCC as the service's own
    closing: what landed meanwhile is read again."""
    subj = subject("kms", cluster)
    for _attempt in range(20):
        records, version = await store.read_aggregate(subj)
        allowed = await Judge("kms", store.anchor).admitted(store, records)
        entries = [(ok.envelope.actor, ok.event) for ok in allowed]
        labels = sorted({ev.kms_instance for _, ev in entries if isinstance(ev, KeyRequested)
                         and is_worker_label(ev.kms_instance, instance_id)})  # fmt: skip
        cut = [r for lb in labels for r in undecided(entries, store.signer.actor, lb)]
        if not cut:
            return 0
        try:
            await store.append(subj, [abandoned(r) for r in cut], version)
        except ConflictError:
            continue
        for req in cut:
            log.warning("kms request abandoned by a restart", request_id=req.request_id,
                        kms_instance=req.kms_instance)  # fmt: skip
        return len(cut)
    raise ConflictError(subj, 0, "could not close the workers' cut-off requests: the log moved")


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the supervisor dies (Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class WorkerFailed(Exception):
    """A worker could not start, or kept exiting; the message says which and how. `status`:
    a worker's own exit status when it already said why in its one line."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Supervisor:
    """Start, watch and stop the workers of one KMS.

    `args`: this command's own options; each worker gets them plus its overrides (click
    keeps an option's last value)."""

    def __init__(self, args: Sequence[str], workers: int, metrics_port: int = 0) -> None:
        self.args = list(args)
        self.n = workers
        self.metrics_port = metrics_port
        self.port = 0
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self._drains: set[asyncio.Task[None]] = set()
        self._exits: list[float] = []
        self.joining: list[asyncio.Future[str]] = []

    def _argv(self, index: int, restart: bool) -> list[str]:
        extra = ["--workers", "1", "--worker-index", str(index), "--port", str(self.port)]
        if self.metrics_port:  # one Prometheus endpoint per worker: metrics-port + index
            extra += ["--metrics-port", str(self.metrics_port + index)]
        if restart:
            extra.append("--worker-restart")
        return [sys.executable, "-m", "pydstack.actors.kms", *self.args, *extra]

    async def start_worker(self, index: int, restart: bool = False) -> asyncio.Future[str]:
        """Start worker `index`; a future of its URL once it serves (WorkerFailed: it exited
        before)."""
        proc = await asyncio.create_subprocess_exec(
            *self._argv(index, restart), stdout=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL, preexec_fn=_die_with_parent,
        )  # fmt: skip
        self.procs[index] = proc
        ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        reader = asyncio.create_task(self._read(index, proc, restart, ready))
        self._drains.add(reader)
        reader.add_done_callback(self._drains.discard)
        ready.add_done_callback(lambda f: f.cancelled() or f.exception())  # `watch` sees exits
        return ready

    async def _read(
        self, index: int, proc: asyncio.subprocess.Process, restart: bool,
        ready: asyncio.Future[str],
    ) -> None:  # fmt: skip
        """Resolve `ready` with the worker's KMS_URL line, then drain its stdout."""
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            if line.startswith(b"KMS_URL=") and not ready.done():
                url = line.decode().strip().split("=", 1)[1]
                log.info("kms worker serving", worker=index, pid=proc.pid, url=url)
                ready.set_result(url)
        if not ready.done():
            code = await proc.wait()
            ready.set_exception(WorkerFailed(
                f"KMS worker {index} exited with status {code} before serving",
                status=code if index == 0 and not restart else None,
            ))  # fmt: skip

    async def start(self, port: int) -> str:
        """Worker 0 alone (root creation, onboarding, closing cut-off requests); once it
        serves, the others are started on its port and join as they get ready. Returns the
        KMS's URL (worker 0 serves it already)."""
        self.port = port
        url = await (await self.start_worker(0))
        self.port = int(url.rsplit(":", 1)[1])
        self.joining = [await self.start_worker(i) for i in range(1, self.n)]
        return url

    async def all_serving(self) -> None:
        """Print `KMS_WORKERS=<n>` once every worker started with the KMS serves (what a
        bench or test that wants them all waits for); not if one exited first."""
        results = await asyncio.gather(*self.joining, return_exceptions=True)
        if not any(isinstance(r, BaseException) for r in results):
            print(f"KMS_WORKERS={self.n}", flush=True)

    async def watch(self, stop: asyncio.Event) -> None:
        """Restart each worker that exits until `stop`; WorkerFailed past the budget."""
        while not stop.is_set():
            waits = {asyncio.ensure_future(p.wait()): i for i, p in self.procs.items()}
            stopping = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait([*waits, stopping], return_when=asyncio.FIRST_COMPLETED)
            for f in [*waits, stopping]:
                if f not in done:
                    f.cancel()
            for f in done:
                if f is stopping or f not in waits or stop.is_set():
                    continue
                i = waits[f]
                log.warning("kms worker exited: restarting", worker=i, status=f.result())
                now = time.monotonic()
                self._exits = [t for t in self._exits if now - t < RESTART_WINDOW] + [now]
                if len(self._exits) > RESTARTS:
                    raise WorkerFailed(
                        f"KMS workers exited {len(self._exits)} times in {RESTART_WINDOW:.0f} s"
                        f" (last: worker {i}, status {f.result()}); stopping the KMS: see the "
                        "workers' log lines above"
                    )
                await self.start_worker(i, restart=True)  # it serves once ready

    async def stop(self) -> None:
        for p in self.procs.values():
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                await asyncio.wait_for(p.wait(), 15)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                await p.wait()
        for t in list(self._drains):
            t.cancel()


async def _drain(out: asyncio.StreamReader) -> None:
    while await out.readline():
        pass


async def supervise(args: Sequence[str], workers: int, port: int, metrics_port: int) -> int:
    """Run the KMS as `workers` processes until SIGTERM/SIGINT; the exit status."""
    sup = Supervisor(args, workers, metrics_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        url = await sup.start(port)
        print(f"KMS_URL={url}", flush=True)
        announce = asyncio.create_task(sup.all_serving())
        try:
            await sup.watch(stop)
        finally:
            announce.cancel()
    except WorkerFailed as exc:
        if exc.status is not None:  # worker 0 refused to start: its own line said why
            return exc.status or 1
        print(f"Error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        await sup.stop()
    return 0


def launch_argv(opts: KmsLaunch, *, nats_url: str, seed_file: str, keyring: str = "") -> list[str]:
    """`python -m pydstack.actors.kms` options for `opts`: file paths only, never a secret
    (the identity's seed, the root keys, tokens stay in their files)."""
    args = ["--nats", nats_url, "--cluster", opts.cluster, "--host", opts.host,
            "--port", str(opts.port), "--key-file", opts.key_file, "--auth", opts.auth,
            "--pccs-url", opts.pccs_url, "--signer-seed-file", seed_file]  # fmt: skip
    for flag, value in (
        ("--seal-appkeys", opts.seal_appkeys), ("--guest-agent", opts.guest_agent),
        ("--auth-url", opts.auth_url), ("--eth-rpc-url", opts.eth_rpc_url),
        ("--kms-contract", opts.kms_contract), ("--dev-pki", opts.dev_pki),
        ("--instance-id", opts.instance_id), ("--onboard-from", opts.onboard_from),
        ("--onboard-token-file", opts.onboard_token_file),
        ("--replica-token-file", opts.replica_token_file), ("--keyring", keyring),
        ("--gateway-app-id", opts.gateway_app_id),
    ):  # fmt: skip
        if value:
            args += [flag, value]
    for mr in opts.allow_mrs:
        args += ["--allow-mr", mr]
    if opts.allow_dev_auth:
        args.append("--allow-dev-auth")
    return args


@contextlib.asynccontextmanager
async def running_kms_workers(
    opts: KmsLaunch, workers: int, *, nats_url: str, seed_file: str, keyring: str = ""
) -> AsyncIterator[str]:
    """`running_kms` as `workers` processes (a supervisor process and its workers): yields
    the URL once worker 0 serves, stops them at exit. Their log lines go to this process's
    stderr; one that cannot start says why there, and this raises WorkerFailed.

        async with running_kms_workers(launch, 4, nats_url=url, seed_file="ids/kms.nk") as url:
            ...
    """
    argv = launch_argv(opts, nats_url=nats_url, seed_file=seed_file, keyring=keyring)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pydstack.actors.kms", *argv, "--workers", str(workers),
        stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        line = await proc.stdout.readline()
        if not line.startswith(b"KMS_URL="):
            code = await proc.wait()
            raise WorkerFailed(f"the KMS exited with status {code} before serving (its own "
                               "line above says why)", status=code)  # fmt: skip
        drain = asyncio.create_task(_drain(proc.stdout))
        try:
            yield line.decode().strip().split("=", 1)[1]
        finally:
            drain.cancel()
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
