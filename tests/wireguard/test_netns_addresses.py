"""`addresses_in`: which links of a namespace hold addresses overlapping a network (a gateway
node refuses to put its tunnel network next to another one: the kernel would misroute)."""

from __future__ import annotations

import os
import secrets

import pytest

from pydstack.adapters.wireguard import netns as ns


async def test_overlapping_addresses_are_found_by_link() -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    name = f"pdt{secrets.token_hex(3)}"
    async with ns.temporary_netns(name):
        await ns.add_veth(name, "va", name, "vb")
        await ns.add_address(name, "va", "10.0.0.129/24")
        await ns.add_address(name, "vb", "10.9.0.1/24")
        assert await ns.addresses_in(name, "10.0.0.0/24") == [("va", "10.0.0.129/24")]
        assert await ns.addresses_in(name, "10.0.0.0/16") == [("va", "10.0.0.129/24")]
        assert sorted(await ns.addresses_in(name, "10.0.0.0/8")) == [
            ("va", "10.0.0.129/24"), ("vb", "10.9.0.1/24")]  # fmt: skip
        assert await ns.addresses_in(name, "192.168.0.0/16") == []
