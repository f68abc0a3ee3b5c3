"""Pick a free local port that nothing else will take before our child binds it.

`bind(0)` hands out a port from the kernel's ephemeral range; between closing that probe and
the child's own bind, any outgoing connection on the machine may be given the same port (CI
saw nats-server die with "address already in use" on a port picked that way). Ports below the
ephemeral range are never handed to outgoing connections, so a port picked there stays free
unless another listener asks for it by number. The VMM's host-port range (20000-29999) is
avoided too, so a picked port never collides with a CVM's port map.
"""

from __future__ import annotations

import random
import socket
import threading
from collections import deque

# Below Linux's default ephemeral range (32768-60999) and the VMM's default host ports.
PICK_RANGE = (10000, 19999)

_recent: deque[int] = deque(maxlen=512)  # handed out by this process, maybe not bound yet
_lock = threading.Lock()


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """A port in PICK_RANGE that binds on `host` now and was not handed out recently here."""
    lo, hi = PICK_RANGE
    size = hi - lo + 1
    start = random.randrange(size)  # random start: concurrent processes rarely pick alike
    for i in range(size):
        port = lo + (start + i) % size
        with _lock:
            if port in _recent:
                continue
        if bindable(host, port, kind):
            with _lock:
                _recent.append(port)
            return port
    raise OSError(f"no free port in {lo}-{hi} on {host}; free some listeners and retry")


def bindable(host: str, port: int, kind: int = socket.SOCK_STREAM) -> bool:
    """Whether `port` on `host` can be bound right now (nothing listens or holds it)."""
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
