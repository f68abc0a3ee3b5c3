"""Authorization backends the KMS asks before releasing keys (`AuthBackend` implementations).

- `WebhookBackend`: dstack's auth-simple protocol: POST `<url>/bootAuth/app` or
  `<url>/bootAuth/kms` with the BootInfo (camelCase, hex) -> `{isAllowed, reason,
  gatewayAppId}`. Any transport or format error refuses (fail closed) with the error as reason.
- `DevBackend`: allows every attested app, and no KMS: the cluster's root keys (`GetKmsKey`)
  never follow from it (a replica needs an explicit onboarding authorization, see
  `authority.py`). Refused unless explicitly enabled; warns loudly on start and names itself
  in every verdict, so a dev decision is recognisable on the log.
- `LogBackend` (`log_backend.py`, the default of `up`): an app's own `AppRegistered` /
  `AppUpgraded` events on the log name the compose hashes it may run; no KMS.
- `eth` (`pydstack.adapters.eth.EthAuthBackend`): a DstackKms contract on a chain (dstack's own
  deployments or ours, same ABI): `isAppAllowed(AppBootInfo)` for apps, `isKmsAllowed` for
  replicas; an outage (RPC down, no contract) refuses with a one-line reason.

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

    async def authorize_app(self, boot: BootInfo) -> AuthVerdict:
        return await self._ask("bootAuth/app", boot)

    async def authorize_kms(self, boot: BootInfo) -> AuthVerdict:
        return await self._ask("bootAuth/kms", boot)


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


def make_backend(
    kind: str,
    *,
    url: str = "",
    allow_dev: bool = False,
    store: EventStore | None = None,
    eth_rpc_url: str = "",
    kms_contract: str = "",
) -> AuthBackend:
    if kind == "webhook":
        return WebhookBackend(url)
    if kind == "eth":
        return eth_backend(eth_rpc_url, kms_contract)
    if kind == "dev":
        return DevBackend(enabled=allow_dev)
    if kind == "log":
        if store is None:
            raise BackendConfigError("the log backend reads the app's events: give it the store")
        from .log_backend import LogBackend

        return LogBackend(store)
    raise BackendConfigError(f"unknown auth backend {kind!r}: use log, webhook, eth or dev")
