"""The gateway app id the dev and log backends answer (GetAppKey's and GetMeta's
`gateway_app_id`): the one app whose KMS certificate dstack's guests accept from a gateway
(`actors/gateway/app_cert.py`), given by the operator and checked to be exactly one app id."""

from __future__ import annotations

import pytest

from pydstack.actors.kms.backends import BackendConfigError, chain_meta, make_backend
from pydstack.adapters.nats import NEW, EventStore
from pydstack.core.events import AppRegistered, subject
from pydstack.core.kms.auth import BootInfo

GW = "0a" * 20
COMPOSE = "11" * 32


async def test_the_log_backend_answers_its_gateway_app_in_get_meta_and_get_app_key(
    store: EventStore,
) -> None:
    """Given as `0x` and upper case, answered as dstack's guest compares it: lowercase hex."""
    backend = make_backend("log", store=store, gateway_app_id="0x" + GW.upper())
    meta = await chain_meta(backend)
    assert meta["gateway_app_id"] == GW and meta["chain_id"] is None
    # the gateway app itself is an app registered on the log, as any other
    await store.append(subject("app", GW), [AppRegistered(app_id=GW, compose_hash=COMPOSE)], NEW)
    verdict = await backend.authorize_app(
        BootInfo(tcb_status="UpToDate", app_id=GW, compose_hash=COMPOSE)
    )
    assert verdict.is_allowed and verdict.gateway_app_id == GW


async def test_without_one_the_log_backend_leaves_get_metas_field_null(store: EventStore) -> None:
    assert (await chain_meta(make_backend("log", store=store)))["gateway_app_id"] is None


async def test_the_dev_backend_answers_its_gateway_app() -> None:
    backend = make_backend("dev", allow_dev=True, gateway_app_id=GW)
    assert (await chain_meta(backend))["gateway_app_id"] == GW


@pytest.mark.parametrize(
    "bad",
    ["any", "ANY", GW + "bb" * 20, GW[:-2], "gw-app", "0x" + "zz" * 20, " " * 3],
    ids=["any", "any-upper", "two-ids", "short", "name", "not-hex", "blank"],
)
def test_a_gateway_app_id_that_is_not_one_app_is_refused(bad: str, store: EventStore) -> None:
    """dstack's guest takes any certificate whose app id is within it, every one for "any":
    a configured value must name exactly one app."""
    with pytest.raises(BackendConfigError, match="is not one app id"):
        make_backend("log", store=store, gateway_app_id=bad)


def test_a_webhook_or_chain_backend_names_its_own_gateway_app() -> None:
    with pytest.raises(BackendConfigError, match="names its own gateway app id"):
        make_backend("webhook", url="http://127.0.0.1:1", gateway_app_id=GW)
