"""Same bytes, same hashes: one docker-compose gives one app-compose.json, compose hash and app
id in dstack v0.5.11's ``vmm-cli.py compose`` and in pydstack (vectors made by running vmm-cli:
tests/vectors/dstack/app-compose/README.md), and a field the guest cannot honour is refused by
name before anything is appended."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from pydstack.cli.commands import compose_identity
from pydstack.cli.deploy import _compose_text
from pydstack.cli.main import main
from pydstack.core.apps import BadInput, DeployRequest, compose_ids, plan_deploy

VEC = Path(__file__).parents[1] / "vectors" / "dstack" / "app-compose"
CASES = dict(line.split("\t") for line in (VEC / "out/cases.tsv").read_text().splitlines())
_SUM_LINES = (VEC / "out/SHA256SUMS").read_text().splitlines()
SUMS = {name: digest for digest, name in (line.split("  ") for line in _SUM_LINES)}
# "no-instance-id" is honoured (gateway off); "everything" has it with the gateway on.
REFUSED = {"secure-time": "secure_time", "prelaunch": "pre_launch_script",
           "swap-4g": "swap_size", "everything": "no_instance_id"}  # fmt: skip


def expected(case: str) -> bytes:
    return (VEC / "out" / f"{case}.json").read_bytes()


def test_the_vectors_are_intact() -> None:
    """Each vector file still has the sha256 vmm-cli printed for it (SHA256SUMS)."""
    assert set(SUMS) == {f"{c}.json" for c in CASES}
    for case in CASES:
        assert hashlib.sha256(expected(case)).hexdigest() == SUMS[f"{case}.json"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_app_compose_writes_vmm_clis_bytes(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``pydstack app compose`` with vmm-cli's options writes its bytes, hash and app id."""
    monkeypatch.chdir(VEC)
    out = tmp_path / "app-compose.json"
    r = CliRunner().invoke(main, ["app", "compose", *CASES[case].split(" "), "--output", str(out)])
    assert r.exit_code == 0, r.output
    assert out.read_bytes() == expected(case)
    digest = SUMS[f"{case}.json"]
    assert f"Compose hash: {digest}\n" in r.stdout and f"App ID: {digest[:40]}\n" in r.stdout
    assert ("warning: deploy and app register will refuse it" in r.stderr) == (case in REFUSED)


@pytest.mark.parametrize(("case", "env"), [("deploy-default", False), ("env-file", True)])
def test_deploy_builds_vmm_clis_bytes(case: str, env: bool) -> None:
    """``pydstack deploy docker-compose.yaml`` = ``vmm-cli compose --kms --gateway
    --public-logs --public-sysinfo [--env-file]``: same bytes, compose hash and app id."""
    names = ("GREETING", "API_TOKEN", "DB_URL") if env else ()
    text = _compose_text(VEC / "input/docker-compose.yaml", "web", names)
    assert text.encode() == expected(case)
    app_id, compose_hash, _ = compose_ids(text)
    assert (app_id, compose_hash) == (SUMS[f"{case}.json"][:40], SUMS[f"{case}.json"])


def test_deploy_keeps_crlf_and_non_ascii_text_exactly(tmp_path: Path) -> None:
    """The docker-compose text goes in unchanged (CRLF, UTF-8 unescaped), as vmm-cli reads it."""
    text = _compose_text(VEC / "input/docker-compose-unicode.yaml", "café-app", ())
    doc = json.loads(expected("unicode-crlf"))
    assert json.loads(text)["docker_compose_file"] == doc["docker_compose_file"]
    assert "café" in text and "\\r\\n" in text


@pytest.mark.parametrize("case", sorted(set(CASES) - set(REFUSED)))
def test_honoured_composes_deploy_and_register_with_vmm_clis_ids(case: str) -> None:
    """vmm-cli's file, deployed or registered as is, has vmm-cli's compose hash and app id."""
    raw, digest = expected(case), SUMS[f"{case}.json"]
    plan = plan_deploy(DeployRequest(app_compose=raw.decode()), vm_id="v1")
    assert (plan.app_id, plan.compose_hash, plan.compose) == (digest[:40], digest, raw)
    assert compose_identity(raw, "f")[:2] == (digest[:40], digest)


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unhonoured_fields_are_refused_by_name(case: str) -> None:
    raw = expected(case)
    with pytest.raises(BadInput, match=rf"^app_compose\.{REFUSED[case]}: "):
        plan_deploy(DeployRequest(app_compose=raw.decode()), vm_id="v1")
    with pytest.raises(click.BadParameter, match=rf"app_compose\.{REFUSED[case]}: "):
        compose_identity(raw, "f")


@pytest.mark.parametrize(
    ("field", "value"),
    [("runner", "bash"), ("key_provider", "tpm"), ("key_provider_id", "zz"),
     ("storage_fs", "zfs"), ("swap_size", "4G"), ("port_policy", {"ports": [{"port": 70000}]}),
     ("features", ["tproxy-net"]), ("manifest_version", 3), ("init_script", "echo")],
)  # fmt: skip
def test_other_unhonoured_fields_are_refused_by_name(field: str, value: object) -> None:
    doc = {**json.loads(expected("minimal")), field: value}
    with pytest.raises(BadInput, match=rf"^app_compose\.{field}: "):
        compose_ids(json.dumps(doc, indent=4))


def test_honoured_optional_fields_pass() -> None:
    """storage_fs ext4, swap 0, a port_policy (sent at RegisterCvm, enforced by the gateway),
    public_tcbinfo, docker_config: accepted."""
    policy = {"ports": [{"port": 443, "pp": True}, {"port": 80}], "restrict_mode": True}
    doc = {**json.loads(expected("minimal")), "storage_fs": "ext4", "swap_size": 0,
           "port_policy": policy, "public_tcbinfo": False,
           "docker_config": {}, "features": []}  # fmt: skip
    compose_ids(json.dumps(doc, indent=4))
    compose_ids(json.dumps({**doc, "storage_fs": "EXT4"}))  # dstack's FsType parse ignores case


@pytest.mark.parametrize("command", [["app", "register"], ["deploy", "--no-wait"]])
def test_the_cli_refuses_in_one_line_before_connecting(command: list[str]) -> None:
    """No NATS is running here: the refusal comes before any connection, so nothing is
    appended, and it is one line naming the field."""
    r = CliRunner().invoke(main, [*command, str(VEC / "out/secure-time.json"),
                                  "--nats", "nats://127.0.0.1:1"])  # fmt: skip
    assert r.exit_code == 2, r.output
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error")]
    assert len(errors) == 1 and "app_compose.secure_time: " in errors[0]


def test_the_sdks_helper_hashes_a_reserialization_not_the_file() -> None:
    """dstack-sdk's get_compose_hash re-serializes the compose (sorted, compact): a different
    hash from the file's, which is what vmm-cli prints and the guest measures."""
    from dstack_sdk.get_compose_hash import get_compose_hash

    doc = json.loads(expected("minimal"))
    compact = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert get_compose_hash(doc) == hashlib.sha256(compact.encode()).hexdigest()
    assert get_compose_hash(doc) != SUMS["minimal.json"]


@pytest.mark.parametrize(
    ("case", "refused"),
    [("env-file", False), ("key-provider-local-over-kms", True), ("key-provider-none", True),
     ("key-provider-kms", False), ("local-key-provider", True)],
)  # fmt: skip
def test_a_sealed_env_needs_the_kms_as_dstacks_key_provider_precedence_picks_it(
    case: str, refused: bool
) -> None:
    """The env is sealed to a KMS key: a compose whose key provider (key_provider first, then
    kms_enabled, then local_key_provider_enabled) is not the KMS cannot use it."""
    doc = {**json.loads(expected(case)), "allowed_envs": ["GREETING"]}
    req = DeployRequest(app_compose=json.dumps(doc), encrypted_env="ab" * 70,
                        env_names=("GREETING",))  # fmt: skip
    if refused:
        with pytest.raises(BadInput, match=r"^encrypted_env: the app-compose's key provider"):
            plan_deploy(req, vm_id="v1")
    else:
        assert plan_deploy(req, vm_id="v1").request.encrypted_env == bytes.fromhex("ab" * 70)
