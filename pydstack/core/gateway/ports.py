"""An instance's declared port policy (dstack's PortPolicy), as the fold and the table hold it."""

from __future__ import annotations

import msgspec

from pydstack.core.events import PortAttrs


class DeclaredPorts(msgspec.Struct, frozen=True, kw_only=True):
    """dstack's PortPolicy: which ports of an instance may be reached, and how.

    ``restrict=False`` (dstack: restrict_mode off) lets every port through; ``ports`` then
    only carries per-port options such as the PROXY protocol header.
    """

    restrict: bool = False
    ports: tuple[PortAttrs, ...] = ()  # sorted by port, one entry per port

    @classmethod
    def of(cls, restrict: bool, ports: tuple[PortAttrs, ...] | list[PortAttrs]) -> DeclaredPorts:
        """Normalised: sorted by port, the last entry for a repeated port wins."""
        by_port = {p.port: p for p in ports}
        return cls(restrict=restrict, ports=tuple(by_port[k] for k in sorted(by_port)))

    def allows(self, port: int) -> bool:
        """Whether connections to ``port`` may be proxied (restrict mode fails closed)."""
        if not 0 < port < 65536:
            return False
        return not self.restrict or any(p.port == port for p in self.ports)

    def proxy_protocol(self, port: int) -> bool:
        """Whether to send a PROXY protocol header on connections to ``port``."""
        return any(p.port == port and p.pp for p in self.ports)
