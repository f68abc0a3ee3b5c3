"""The guest picks the key provider as dstack's ``AppCompose::key_provider()`` does."""

from __future__ import annotations

import json

import pytest

from pydstack_guest.boot import BootFailed, HostShared, plan_boot

URLS = {"kms_urls": ["https://127.0.0.1:9100"]}


def kms_urls(compose: dict[str, object]) -> tuple[str, ...]:
    shared = HostShared(app_compose=json.dumps(compose).encode(),
                        sys_config=json.dumps(URLS).encode())  # fmt: skip
    return plan_boot(shared).kms_urls


@pytest.mark.parametrize(
    ("compose", "uses_kms"),
    [
        ({"kms_enabled": False, "key_provider": "kms"}, True),  # key_provider wins
        ({"kms_enabled": True, "key_provider": "local"}, False),
        ({"kms_enabled": True, "key_provider": "none"}, False),
        ({"kms_enabled": True, "local_key_provider_enabled": True}, True),  # kms before local
        ({"kms_enabled": False, "local_key_provider_enabled": True}, False),
        ({"local_key_provider_enabled": True}, False),  # dstack: kms_enabled defaults to false
        ({"kms_enabled": False}, False),  # none
        ({}, True),  # pydstack: no kms_enabled at all, a KMS when sys-config names one
    ],
)
def test_key_provider_precedence_is_dstacks(compose: dict[str, object], uses_kms: bool) -> None:
    assert bool(kms_urls(compose)) is uses_kms


def test_a_tpm_key_provider_is_refused_by_name() -> None:
    with pytest.raises(BootFailed, match="key_provider 'tpm' is not supported"):
        kms_urls({"key_provider": "tpm"})
