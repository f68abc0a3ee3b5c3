"""GetMeta's chain fields from the eth backend, as dstack v0.5.11's KMS fills them from its
auth-eth server (issue 16 item 7): v0.5.11 `kms_rpc.proto` `GetMetaResponse` has
`optional gateway_app_id`, `kms_contract_address`, `chain_id`, `app_auth_implementation`;
auth-eth's `GET /` reads them from the DstackKms (`gatewayAppId()`, `appImplementation()`) and
the node's chain id. Real KMS on TLS, real anvil, dstack's contracts and ours.
"""

from __future__ import annotations

from pydstack.actors.kms.backends import chain_meta
from pydstack.adapters.eth import EthAuthBackend
from pydstack.adapters.nats import free_port
from tests.kms.conftest import Kms

from .conftest import GATEWAY_APP_ID, Deployment
from .test_kms_eth import chain, kms, pki  # noqa: F401 - fixtures

# v0.5.11 GetMetaResponse, field by field
DSTACK_META_KEYS = [
    "ca_cert",
    "allow_any_upgrade",
    "k256_pubkey",
    "bootstrap_info",
    "is_dev",
    "gateway_app_id",
    "kms_contract_address",
    "chain_id",
    "app_auth_implementation",
]


async def test_get_meta_names_the_chain_the_kms_asks(kms: Kms, chain: Deployment) -> None:  # noqa: F811
    """GetMeta of an eth-backed KMS: the contract, its chain id, gateway app, app implementation."""
    async with kms.client() as c:
        meta = await c.call("GetMeta")
    assert list(meta) == DSTACK_META_KEYS
    assert meta["kms_contract_address"] == chain.kms.address
    assert meta["chain_id"] == chain.kms.web3.eth.chain_id
    assert meta["gateway_app_id"] == GATEWAY_APP_ID
    assert meta["app_auth_implementation"] == chain.kms.call("appImplementation")
    assert meta["is_dev"] is False and meta["allow_any_upgrade"] is False


async def test_chain_down_leaves_the_fields_null(chain: Deployment) -> None:  # noqa: F811
    """A node that does not answer: GetMeta's chain fields are null, never a made-up value."""
    dead = EthAuthBackend.connect(f"http://127.0.0.1:{free_port()}", chain.kms.address, timeout=2)
    assert await chain_meta(dead) == {
        "gateway_app_id": None,
        "kms_contract_address": None,
        "chain_id": None,
        "app_auth_implementation": None,
    }
