"""dstack v0.5.11's app-compose fields: which ones this platform honours, and a refusal, naming
the field, for each one it cannot. Pure.

dstack's ``AppCompose`` (dstack-types) and the guest's use of each field decide the list; a
field that would be silently ignored is refused before anything is appended, so an app never
runs believing it got something (swap, a pre-launch script, a waited-for clock) it did not::

    unhonoured({"manifest_version": 2, "runner": "bash"})  # ("runner", "'bash' is not run ...")
"""

from __future__ import annotations

from typing import Any, Final

KEY_PROVIDERS: Final = ("none", "kms", "local")  # dstack's KeyProviderKind minus tpm
STORAGE_FS: Final = ("ext4",)  # the QEMU guest's data disk (the sandbox measures "plain")


def key_provider_kind(doc: dict[str, Any]) -> str:
    """dstack's ``AppCompose::key_provider()``: ``key_provider`` when set, else ``kms`` if
    kms_enabled, else ``local`` if local_key_provider_enabled, else ``none``; "" when
    kms_enabled is absent (pydstack's guest then uses a KMS if sys-config names one)."""
    if doc.get("key_provider"):
        return str(doc["key_provider"])
    if "kms_enabled" not in doc and not doc.get("local_key_provider_enabled"):
        return ""
    if doc.get("kms_enabled"):
        return "kms"
    return "local" if doc.get("local_key_provider_enabled") else "none"


def _truthy(value: Any) -> bool:
    return value not in (None, False, 0, "", "0", [], {})


def _port_policy_error(policy: Any) -> str:
    """Why dstack-types' ``PortPolicy`` would not parse ``policy`` ('' when it does): a
    ``ports`` list of ``{"port": u16, "pp": bool}``, a bool ``restrict_mode``; the guest
    could not boot with anything else."""
    if policy is None:
        return ""
    if not isinstance(policy, dict):
        return "is not an object with ports and restrict_mode"
    if not isinstance(policy.get("restrict_mode", False), bool):
        return "restrict_mode is not true or false"
    ports = policy.get("ports", [])
    if not isinstance(ports, list):
        return "ports is not a list"
    for p in ports:
        port = p.get("port") if isinstance(p, dict) else None
        if type(port) is not int or not 0 <= port <= 65535:
            return f"ports holds {p!r}: each needs a port in 0-65535"
        if not isinstance(p.get("pp", False), bool):
            return f"ports holds {p!r}: pp is not true or false"
    return ""


def unhonoured(doc: dict[str, Any]) -> tuple[str, str] | None:  # a case per field
    """(field, why) for the first field the guest cannot honour, else None."""
    if doc.get("manifest_version", 2) not in (1, 2):
        return "manifest_version", f"{doc.get('manifest_version')!r} is not 1 or 2"
    if doc.get("runner", "docker-compose") != "docker-compose":
        return "runner", (f"{doc.get('runner')!r} is not run here: the guest runs "
                          "docker-compose apps only (no bash runner)")  # fmt: skip
    kind = doc.get("key_provider")
    if kind == "tpm":
        return "key_provider", "'tpm' needs a vTPM key provider, which this platform has not"
    if kind is not None and kind not in KEY_PROVIDERS:
        return "key_provider", f"{kind!r} is not one of {', '.join(KEY_PROVIDERS)}"
    pin = doc.get("key_provider_id", "")
    try:
        bytes.fromhex(str(pin).removeprefix("0x"))
    except ValueError:
        return "key_provider_id", f"{str(pin)[:40]!r} is not hex"
    gateway = doc.get("gateway_enabled") is True or doc.get("tproxy_enabled") is True
    if doc.get("no_instance_id") is True and gateway:
        return "no_instance_id", ("with gateway_enabled: the gateway keys a CVM's route and "
                                  "WireGuard peer by its instance id (dstack's gateway refuses "
                                  "an empty one too); turn one of them off")  # fmt: skip
    if doc.get("secure_time") is True:
        return "secure_time", ("the guest has no time source to wait for (dstack runs `chronyc "
                               "waitsync`); set it false")  # fmt: skip
    fs = doc.get("storage_fs")
    if fs not in (None, "") and str(fs).lower() not in STORAGE_FS:  # dstack: case-insensitive
        return "storage_fs", (f"{fs!r} is not built here: the guest's data disk is "
                              f"{' or '.join(STORAGE_FS)} (LUKS2)")  # fmt: skip
    if _truthy(doc.get("swap_size")):
        return "swap_size", "the guest sets up no swap; leave it out or 0"
    if _truthy(doc.get("pre_launch_script")):
        return "pre_launch_script", ("the guest starts the compose services through the "
                                     "Docker API and runs no shell script before them")  # fmt: skip
    if _truthy(doc.get("init_script")):
        return "init_script", "not run here (a dstack main-branch field)"
    bad_policy = _port_policy_error(doc.get("port_policy"))
    if bad_policy:  # honoured: the guest sends it at RegisterCvm, the gateway enforces it
        return "port_policy", bad_policy
    if "tproxy-net" in (doc.get("features") or ()) and not (
        doc.get("gateway_enabled") or doc.get("tproxy_enabled")
    ):
        return "features", "the deprecated 'tproxy-net' is not read here; set gateway_enabled"
    return None
