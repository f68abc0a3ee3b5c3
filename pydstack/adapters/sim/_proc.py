"""The process that stands for one simulated CVM: ``python -I -S _proc.py WORKDIR``.

Standard library only, run isolated (``-I -S``): it starts in milliseconds and a few MB, so a
host can carry hundreds. It is no VM and runs no app: it writes the boot stages a real guest
writes (``booted``, ``tee`` naming it a load generator, ``ready``) to ``events.log``, answers
``HTTP 200`` on the host side of each tcp port map (so a port check sees a live app), and
exits 0 on SIGTERM (a graceful power-off). With ``sim.json`` ``{"ready_by": "host"}`` it writes
only ``booted`` and ``tee``: the backend's boot hook (KMS keys, gateway registration) writes
the rest from the host.
"""

import json
import os
import signal
import socket
import sys
import threading
import time

T0 = time.monotonic()


def emit(wd: str, stage: str, detail: str = "", since: float = T0) -> None:
    """One ``GuestEvent`` line; ``uptime_s`` counts from ``since`` (monotonic)."""
    line = {"stage": stage, "detail": detail, "uptime_s": round(time.monotonic() - since, 3)}
    with open(os.path.join(wd, "events.log"), "ab") as f:
        f.write(json.dumps(line).encode() + b"\n")


def serve(sock: socket.socket) -> None:
    body = b"simulated CVM: a load generator, not a VM\n"
    head = b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    while True:
        conn, _ = sock.accept()
        try:
            conn.settimeout(2.0)
            conn.recv(4096)
            conn.sendall(head + body)
        except OSError:
            pass
        finally:
            conn.close()


def main(wd: str) -> int:
    with open(os.path.join(wd, "manifest.json"), "rb") as f:
        spec = json.load(f)
    try:
        with open(os.path.join(wd, "sim.json"), "rb") as f:
            ready_by = json.load(f).get("ready_by", "guest")
    except FileNotFoundError:
        ready_by = "guest"

    def power_off(*_: object) -> None:
        emit(wd, "shutdown")
        os._exit(0)

    signal.signal(signal.SIGTERM, power_off)
    for p in spec.get("ports") or ():
        if p.get("protocol", "tcp") != "tcp":
            continue
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((p.get("host_address", "127.0.0.1"), p["host_port"]))
        except OSError as exc:
            emit(wd, "error", f"cannot bind host port {p['host_port']}: {exc}")
            return 1
        s.listen(64)
        threading.Thread(target=serve, args=(s,), daemon=True).start()
    emit(wd, "booted", "sim: a load generator, not a VM")
    emit(wd, "tee", "simulated: load generator (bench.scale), no VM, no TEE")
    if ready_by == "guest":
        emit(wd, "ready", ",".join(str(p["host_port"]) for p in spec.get("ports") or ()))
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
