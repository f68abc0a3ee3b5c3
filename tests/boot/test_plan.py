"""The pure checks of the boot flow: each refusal names its step and reason."""

from __future__ import annotations

import hashlib
import json

import pytest

from pydstack.adapters.tdx.identity import mr_config_id_v1
from pydstack_guest import create_dev_app_keys
from pydstack_guest.boot import (
    BootFailed,
    HostShared,
    check_key_provider,
    check_mr_config_id,
    plan_boot,
    plan_storage,
    select_env,
)


def shared(compose: dict[str, object], sys_config: dict[str, object] | None = None) -> HostShared:
    return HostShared(app_compose=json.dumps(compose).encode(),
                      sys_config=json.dumps(sys_config or {}).encode())  # fmt: skip


@pytest.mark.parametrize(
    ("compose", "sysc", "words"),
    [
        ({"runner": "bash"}, {}, "runner 'bash' is not supported"),
        ({"manifest_version": 3}, {}, "manifest_version 3"),
        ({"kms_enabled": True}, {}, "kms_urls is empty"),
        ({"allowed_envs": ["A-B"]}, {}, "invalid names ['A-B']"),
        ({"key_provider_id": "aa"}, {"key_provider_id": "bb"}, "pin different key providers"),
    ],
)
def test_compose_refusals(compose: dict[str, object], sysc: dict[str, object], words: str) -> None:
    with pytest.raises(BootFailed) as e:
        plan_boot(shared(compose, sysc))
    assert e.value.step == "compose" and words in e.value.reason


def test_kms_is_used_when_sys_config_names_one_unless_the_app_opts_out() -> None:
    urls: dict[str, object] = {"kms_urls": ["https://127.0.0.1:9100"]}
    assert plan_boot(shared({}, urls)).kms_urls == ("https://127.0.0.1:9100",)
    assert plan_boot(shared({"kms_enabled": False}, urls)).kms_urls == ()
    assert plan_boot(shared({}, {})).kms_urls == ()


def test_mr_config_id_must_pin_this_compose() -> None:
    s = shared({"name": "a"})
    plan = plan_boot(s)
    keys, _ = create_dev_app_keys(plan.app_id, now=0)
    assert plan.compose_hash == hashlib.sha256(s.app_compose).digest()
    assert check_mr_config_id(mr_config_id_v1(plan.compose_hash), plan, keys).startswith("v1")
    assert check_mr_config_id(bytes(48), plan, keys).startswith("none")
    with pytest.raises(BootFailed, match="mrconfigid"):
        check_mr_config_id(mr_config_id_v1(b"\x01" * 32), plan, keys)


def test_pinned_key_provider_refuses_other_keys() -> None:
    plan = plan_boot(shared({"key_provider_id": "ab" * 32}))
    keys, _ = create_dev_app_keys(plan.app_id, now=0)
    with pytest.raises(BootFailed, match="not the pinned"):
        check_key_provider(plan, keys)


def test_only_allowed_envs_are_exported() -> None:
    env, dropped = select_env([("A", "1"), ("B", "2"), ("C", "3")], ["A", "C", "Z"])
    assert env == {"A": "1", "C": "3"} and dropped == ("B",)


def test_without_dm_crypt_the_disk_is_measured_plain() -> None:
    assert plan_storage(dm_crypt=False).fs == "plain"
    assert not plan_storage(dm_crypt=False).encrypted
    assert plan_storage(dm_crypt=True, data_disk=True).encrypted
    assert plan_storage(dm_crypt=True, data_disk=True).fs == "ext4"  # dstack's value
    # dm-crypt alone encrypts nothing: without a data disk to set up it is measured plain.
    assert plan_storage(dm_crypt=True).fs == "plain"
    assert "NOT encrypted" in plan_storage(dm_crypt=True).note
    assert "no dm-crypt" in plan_storage(dm_crypt=False).note


def test_the_instance_id_is_derived_from_the_seed_and_app_id_as_dstack_does() -> None:
    """sha256(seed || app_id)[:20] over the raw bytes; the host's instance_id is ignored."""
    seed, app = bytes(range(20)), bytes([0xAB] * 20)
    info = {"instance_id_seed": seed.hex(), "app_id": app.hex(), "instance_id": "cd" * 20}
    plan = plan_boot(HostShared(app_compose=b"{}", instance_info=json.dumps(info).encode()))
    assert plan.instance_id == hashlib.sha256(seed + app).digest()[:20]


def test_without_a_seed_every_boot_is_a_new_instance() -> None:
    """No seed (or key_provider "none": no reusable disk): a random seed, as dstack."""
    info = json.dumps({"app_id": "ab" * 20}).encode()
    ids = {plan_boot(HostShared(app_compose=b"{}", instance_info=info)).instance_id for _ in "ab"}
    assert len(ids) == 2
