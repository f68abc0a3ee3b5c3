"""A log in memory for the pure gateway tests: events appended in commit order, folded as
they land, exactly what a node would see on the stream (no store, no processes)."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field

from pydstack.core.events import AnyEvent, GatewayNodeJoined
from pydstack.core.gateway.cluster import (
    AddressPlan,
    Admission,
    ClusterState,
    Refused,
    RegisterRequest,
    decide_register,
    fold,
)
from pydstack.core.gateway.ports import DeclaredPorts
from pydstack.core.gateway.recycle import Recycle, decide_recycle
from pydstack.core.projections import Applied

PLAN = AddressPlan("10.0.0.0/25", ("10.0.0.1/32",))


def key(n: int) -> str:
    """A distinct, valid WireGuard public key (base64 of 32 non-zero bytes)."""
    return base64.b64encode(hashlib.sha256(b"key %d" % n).digest()).decode()


def hexid(kind: str, n: int) -> str:
    return hashlib.sha1(f"{kind} {n}".encode()).hexdigest()


def app(n: int) -> str:
    return hexid("app", n)


def inst(n: int) -> str:
    return hexid("instance", n)


def request(i: int, a: int, k: int, **kw: object) -> RegisterRequest:
    return RegisterRequest(
        app_id=app(a),
        instance_id=inst(i),
        compose_hash=hexid("compose", a),
        wg_public_key=key(k),
        **kw,  # type: ignore[arg-type]
    )


@dataclass
class Log:
    cluster: str = "default"
    now_s: int = 1_700_000_000
    events: list[Applied] = field(default_factory=list)
    state: ClusterState = field(init=False)

    def __post_init__(self) -> None:
        self.state = ClusterState(cluster=self.cluster)

    def add(self, *events: AnyEvent) -> None:
        batch = [
            Applied(len(self.events) + i + 1, self.now_s * 1_000_000_000, e, f"e{i}")
            for i, e in enumerate(events)
        ]
        self.events.extend(batch)
        self.state = fold(batch, self.state)

    def join(self, node_id: str, ip: str, domain: str = "gw.example.com", n: int = 900) -> None:
        self.add(
            GatewayNodeJoined(
                node_id=node_id,
                wg_public_key=key(n),
                tunnel_ip=ip,
                endpoint=f"192.0.2.{n % 250}:51820",
                base_domain=domain,
                cluster="" if self.cluster == "default" else self.cluster,
            )
        )

    def register(
        self, req: RegisterRequest, plan: AddressPlan = PLAN, node_id: str | None = None
    ) -> Admission | Refused:
        out = decide_register(self.state, req, plan, node_id=node_id)
        if isinstance(out, Admission):
            self.add(out.ledger, out.record)
        return out

    def recycle(self, timeout_s: int) -> list[Recycle]:
        out = decide_recycle(self.state, now_s=self.now_s, timeout_s=timeout_s)
        for r in out:
            self.add(r.ledger, *([r.record] if r.record else []))
        return out

    def refold(self) -> ClusterState:
        return fold(self.events, ClusterState(cluster=self.cluster))


OPEN = DeclaredPorts()
