"""Authorization backends the KMS asks before releasing keys (`AuthBackend` implementations).

- `WebhookBackend`: dstack's auth-simple protocol: POST `<url>/bootAuth/app` or
  `<url>/bootAuth/kms` with the BootInfo (camelCase, hex) -> `{isAllowed, reason,
  gatewayAppId}`. Any transport or format error refuses (fail closed) with the error as reason.
  Its `GET <url>` (dstack's auth API info) fills GetMeta's chain fields (`chain_meta`).
- `DevBackend`: allows every attested app, and no KMS: the cluster's root keys (`GetKmsKey`)
  never follow from it (a replica needs an explicit onboarding authorization, see
  `authority.py`). Refused unless explicitly enabled; warns loudly on start and names itself
  in every verdict, so a dev decision is recognisable on the log.
- `LogBackend` (`log_backend.py`, the default of `up`): an app's own `AppRegistered` /
  `AppUpgraded` events on the log name the compose hashes it may run; no KMS.
- `eth` (`pydstack.adapters.eth.EthAuthBackend`): a DstackKms contract on a chain (dstack's own
  deployments or ours, same ABI): `isAppAllowed(AppBootInfo)` for apps, `isKmsAllowed` for
  replicas; an outage (RPC down, no contract) refuses with a one-line reason. GetMeta's chain
  fields are the contract's and the node's chain id.

    backend = make_backend("webhook", url="http://127.0.0.1:8000")
    backend = make_backend("eth", eth_rpc_url="http://127.0.0.1:8545", kms_contract="0x…")
"""

from __future__ import annotations

import json
from types import TracebackType
from typing import Any, Self

import aiohttp
import structlog

from pydstack.adapters.nats import EventStore
from pydstack.core.kms import DEV_NOT_FOR_KMS, AuthBackend, AuthVerdict, BootInfo, webhook_body

log = structlog.get_logger("pydstack.kms")
MAX_INFO = 64 * 1024  # bytes of a webhook's info answer (dstack's auth APIs send ~300)


class BackendConfigError(ValueError):
    """The backend cannot be built as configured; the message says what to change."""


class WebhookBackend:
    name = "webhook"

    def __init__(self, url: str, *, timeout: float = 5.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise BackendConfigError(f"webhook url {url!r} must start with http:// or https://")
        self.url = url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def _ask(self, path: str, boot: BootInfo) -> AuthVerdict:
        url = f"{self.url}/{path}"
        try:
            async with self._http().post(url, json=webhook_body(boot)) as resp:
                text = await resp.text()
                if resp.status != 200:
                    return AuthVerdict(False, f"webhook {url} answered {resp.status}: {text[:200]}")
                body: Any = json.loads(text)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            return AuthVerdict(False, f"webhook {url} failed: {type(e).__name__}: {e}")
        if not isinstance(body, dict) or not isinstance(body.get("isAllowed"), bool):
            return AuthVerdict(False, f"webhook {url} answered without a boolean isAllowed")
        return AuthVerdict(
            body["isAllowed"], str(body.get("reason", "")), str(body.get("gatewayAppId", ""))
        )

    async def meta(self) -> dict[str, object]:
        """GetMeta's chain fields from the webhook's `GET <url>` (dstack's `get_info`:
        kmsContractAddr, chainId, gatewayAppId, appImplementation); ValueError naming what
        is wrong when it cannot be read. The answer is read at most `MAX_INFO` bytes far."""
        try:
            async with self._http().get(self.url) as resp:
                raw = await resp.content.read(MAX_INFO + 1)
                if resp.status != 200:
                    raise ValueError(f"webhook {self.url} answered {resp.status}")
        except (aiohttp.ClientError, TimeoutError) as e:
            raise ValueError(f"webhook {self.url} failed: {type(e).__name__}: {e}") from None
        if len(raw) > MAX_INFO:
            raise ValueError(f"webhook {self.url} info is over {MAX_INFO} bytes")
        body: Any = json.loads(raw)
        if not isinstance(body, dict):
            raise ValueError(f"webhook {self.url} info is not a JSON object")
        chain_id = body.get("chainId")
        fields = [body.get(k) for k in ("gatewayAppId", "kmsContractAddr", "appImplementation")]
        if not all(isinstance(f, str) for f in fields) or type(chain_id) is not int:
            raise ValueError(f"webhook {self.url} info lacks gatewayAppId, kmsContractAddr, "
                             "appImplementation (strings) or chainId (an integer)")  # fmt: skip
        gateway, contract, implementation = fields
        return {
            "gateway_app_id": gateway,
            "kms_contract_address": contract,
            "chain_id": chain_id,
            "app_auth_implementation": implementation,
        }

    async def authorize_app(self, boot: BootInfo) -> AuthVerdict:
        return await self._ask("bootAuth/app", boot)

    async def authorize_kms(self, boot: BootInfo) -> AuthVerdict:
        return await self._ask("bootAuth/kms", boot)


NO_CHAIN: dict[str, object] = {
    "gateway_app_id": None,
    "kms_contract_address": None,
    "chain_id": None,
    "app_auth_implementation": None,
}


async def chain_meta(backend: AuthBackend) -> dict[str, object]:
    """GetMeta's optional chain fields as dstack v0.5.11 fills them from its auth API: the
    contract's (eth: read from the chain; webhook: its `GET /`), the dev and log backends'
    configured gateway app id, null otherwise. A backend that cannot be read leaves them null
    (logged): GetMeta also serves the KMS root a guest checks, which must not depend on the
    chain."""
    if isinstance(backend, DevBackend):
        return NO_CHAIN | {"gateway_app_id": backend.gateway_app_id}
    read = getattr(backend, "meta", None)
    gateway = getattr(backend, "gateway_app_id", None)
    if read is None and isinstance(gateway, str) and gateway:
        # the log backend's configured gateway app (`gateway_app_id_option`)
        return NO_CHAIN | {"gateway_app_id": gateway}
    if read is None:
        return dict(NO_CHAIN)
    try:
        return NO_CHAIN | dict(await read())
    except Exception as e:  # an outage must not take GetMeta down
        log.info("GetMeta without chain fields", backend=backend.name, error=str(e))
        return dict(NO_CHAIN)


class DevBackend:
    """Allow every attested app, for development only; never a KMS (`DEV_NOT_FOR_KMS`)."""

    name = "dev"

    def __init__(self, *, enabled: bool = False, gateway_app_id: str = "") -> None:
        if not enabled:
            raise BackendConfigError(
                "the dev authorization backend allows every app; enable it explicitly "
                "(--allow-dev-auth / PYDSTACK_KMS_ALLOW_DEV=1), never in production"
            )
        self.gateway_app_id = gateway_app_id
        log.warning(
            "DEV AUTHORIZATION BACKEND: EVERY ATTESTED APP GETS ITS KEYS. NOT FOR PRODUCTION.",
            backend="dev",
        )

    async def authorize_app(self, boot: BootInfo) -> AuthVerdict:
        return AuthVerdict(True, "dev backend allows all", self.gateway_app_id)

    async def authorize_kms(self, boot: BootInfo) -> AuthVerdict:
        # With the dev backend anything that boots would get the root keys, and with them
        # every app's keys: a KMS is authorized explicitly (authority.KmsAuthority) instead.
        return AuthVerdict(False, DEV_NOT_FOR_KMS)


def eth_backend(rpc_url: str, kms_contract: str) -> AuthBackend:
    """The `eth` backend on `rpc_url`, asking the DstackKms at `kms_contract`."""
    if not rpc_url.startswith(("http://", "https://")):
        raise BackendConfigError(
            f"--eth-rpc-url {rpc_url!r} must be an http:// or https:// JSON-RPC endpoint"
        )
    text = kms_contract.removeprefix("0x").removeprefix("0X")
    if len(text) != 40 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise BackendConfigError(
            f"--kms-contract {kms_contract!r} is not a contract address (0x + 40 hex digits)"
        )
    from pydstack.adapters.eth import EthAuthBackend

    return EthAuthBackend.connect(rpc_url, "0x" + text)


def gateway_app_id_option(text: str) -> str:
    """An operator's gateway app id for the dev and log backends, as they answer it
    (`gateway_app_id` of GetAppKey and GetMeta): one app id, 40 hex digits, lowercase.
    dstack's guest takes any certificate whose app id is a substring of it, and none at all
    for "any": a longer string would admit several apps, "any" every server."""
    app = text.strip().lower().removeprefix("0x")
    if len(app) != 40 or any(c not in "0123456789abcdef" for c in app):
        raise BackendConfigError(
            f"gateway app id {text[:60]!r} is not one app id (40 hex digits); dstack's guests "
            "trust a gateway certificate whose app id is within it ('any': every certificate)"
        )
    return app


def make_backend(
    kind: str,
    *,
    url: str = "",
    allow_dev: bool = False,
    store: EventStore | None = None,
    eth_rpc_url: str = "",
    kms_contract: str = "",
    gateway_app_id: str = "",
) -> AuthBackend:
    """`gateway_app_id` (dev and log: the others read theirs from the webhook or chain): the
    app whose KMS certificate dstack's guests accept from a gateway."""
    gateway = gateway_app_id_option(gateway_app_id) if gateway_app_id else ""
    if gateway and kind in ("webhook", "eth"):
        raise BackendConfigError(f"the {kind} backend names its own gateway app id "
                                 "(gatewayAppId): do not give one")  # fmt: skip
    if kind == "webhook":
        return WebhookBackend(url)
    if kind == "eth":
        return eth_backend(eth_rpc_url, kms_contract)
    if kind == "dev":
        return DevBackend(enabled=allow_dev, gateway_app_id=gateway)
    if kind == "log":
        if store is None:
            raise BackendConfigError("the log backend reads the app's events: give it the store")
        from .log_backend import LogBackend

        return LogBackend(store, gateway_app_id=gateway)
    raise BackendConfigError(f"unknown auth backend {kind!r}: use log, webhook, eth or dev")
