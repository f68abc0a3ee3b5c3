"""The app's ``docker_compose_file`` run by the real ``docker-compose`` (Debian's 1.29) against
the CVM's own docker engine, as dstack's ``app-compose.sh`` runs ``docker compose up``.

The file is written as the app-compose holds it (``<workdir>/docker-compose.yaml``) and
compose does everything it says: ports, volumes, networks, depends_on, healthcheck, restart,
on the app's own bridge network. Env substitution is compose's own, as in dstack: the
variables are the decrypted env (``allowed_envs`` only, `pydstack_guest.boot.select_env`)
plus ``DSTACK_*``, given to the compose process as its environment; compose parses the YAML
first and substitutes into the parsed values, so a value never adds a key or a service
(tests/adversarial/test_compose_env_injection.py runs the same attacks through it).

Unlike dstack, a variable that steers the tools themselves (``LD_*``, ``PYTHON*``,
``DOCKER_*``, ``COMPOSE_*``, ``PATH``, ``HOME``, proxies, CA bundles) is refused when the env
sets it: its value is the host's, and it would choose the engine compose talks to, the code
it loads or the credential helpers it runs (`tool_variable`).

The guest agent's sockets are bind-mounted into every service at dstack's paths by an
override file (``pydstack-override.json``); a service that binds them itself
(``/var/run/dstack.sock:/var/run/dstack.sock``, as dstack's docs say) gets the same mount.
With ``host_paths=False`` (the sandbox, which shares the host's kernel and filesystem) what
would reach the host is refused by name before anything starts (`sandbox_escapes`)::

    project = ComposeProject(workdir=wd / "compose", docker_host="unix:///run/x/docker.sock",
                             host_paths=False)
    names = await project.up(app_compose, env, sockets={"/var/run/dstack.sock": sock})
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COMPOSE = "docker-compose"
PROJECT = "dstack"  # dstack runs compose in /dstack: its project (and volume prefix) is "dstack"
TOOL_PREFIXES = ("LD_", "PYTHON", "DOCKER_", "COMPOSE_")
TOOL_NAMES = frozenset({
    "PATH", "HOME", "TMPDIR", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
})  # fmt: skip
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Host privileges a container would get on the sandbox's host: refused there.
HOST_KEYS = ("privileged", "cap_add", "devices", "userns_mode", "security_opt", "cgroup_parent",
             "device_cgroup_rules", "sysctls")  # fmt: skip
HOST_MODES = ("pid", "ipc", "uts", "cgroup")  # `<key>: host` shares the host's


class ComposeFailed(RuntimeError):
    """docker-compose refused the file or could not start it; the message says why."""


def tool_variable(name: str) -> bool:
    """Whether an env name steers docker-compose or its interpreter rather than the app."""
    upper = name.upper()
    return upper in TOOL_NAMES or upper.startswith(TOOL_PREFIXES)


def compose_environ(env: Mapping[str, str], *, docker_host: str, home: Path) -> dict[str, str]:
    """The compose process's whole environment: ours, then the app's variables."""
    if bad := sorted(n for n in env if tool_variable(n)):
        raise ComposeFailed(f"env {', '.join(bad)} would steer docker-compose itself (its "
                            "engine, code or credentials): refused; rename it")  # fmt: skip
    return {"PATH": PATH, "HOME": str(home), "DOCKER_HOST": docker_host, **env}


def _bind(volume: Any) -> tuple[str, str] | None:
    """(source, target) of a bind mount in resolved config, None for a named volume."""
    if isinstance(volume, dict):
        if volume.get("type") != "bind":
            return None
        return str(volume.get("source", "")), str(volume.get("target", ""))
    source, sep, rest = str(volume).partition(":")
    if not sep or not source.startswith(("/", ".", "~")):
        return None
    return source, rest.partition(":")[0]


def sandbox_escapes(raw: Mapping[str, Any], resolved: Mapping[str, Any],
                    sockets: Mapping[str, str]) -> list[str]:  # fmt: skip
    """What a compose file asks for that would reach the sandbox's host (its kernel and
    filesystem are the machine's): host paths (binds other than the agent sockets at their
    own paths, env_file, build contexts, file secrets and configs), host namespaces and
    privileges. `raw` is the file as parsed, `resolved` as ``docker-compose config`` has it."""
    out: list[str] = []
    for name, svc in (raw.get("services") or {}).items():
        for key in ("env_file", "build", "extends"):
            if isinstance(svc, dict) and key in svc:
                out.append(f"service {name}: {key} reads the host's files")
    for name, svc in (resolved.get("services") or {}).items():
        out += [f"service {name}: {k} gives host privileges" for k in HOST_KEYS if svc.get(k)]
        out += [f"service {name}: {k}: host" for k in HOST_MODES if svc.get(k) == "host"]
        for volume in svc.get("volumes") or []:
            bind = _bind(volume)
            if bind is not None and not (bind[0] == bind[1] and bind[0] in sockets):
                out.append(f"service {name}: bind mount of host path {bind[0]}")
    for kind in ("secrets", "configs"):
        for name, item in (resolved.get(kind) or {}).items():
            if isinstance(item, dict) and "file" in item:
                out.append(f"{kind[:-1]} {name}: file {item['file']} is a host path")
    return out


def _interpreter(binary: str) -> str:
    """The Python that runs docker-compose (its YAML library turns YAML into JSON for us)."""
    with open(binary, "rb") as f:
        first = f.readline().decode(errors="replace")
    return first[2:].strip().split()[0] if first.startswith("#!") else "python3"


YAML_TO_JSON = "import json,sys,yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"


@dataclass(frozen=True)
class ComposeProject:
    workdir: Path  # the project dir: docker-compose.yaml, the override, compose's HOME
    docker_host: str  # the CVM's engine, e.g. unix:///run/pydstack-sandbox/x/docker.sock
    host_paths: bool = True  # False: refuse what reaches the host (`sandbox_escapes`)
    project: str = PROJECT
    binary: str = COMPOSE

    def _argv(self, *args: str, override: bool = True) -> list[str]:
        files = ["-f", "docker-compose.yaml"]
        if override:
            files += ["-f", "pydstack-override.json"]
        return [self.binary, "--ansi", "never", "-p", self.project, "--project-directory",
                str(self.workdir), *files, *args]  # fmt: skip

    async def _run(self, argv: list[str], environ: Mapping[str, str], *, what: str,
                   stdin: bytes | None = None) -> bytes:  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=self.workdir, env=dict(environ), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate(stdin)
        if proc.returncode:
            lines = [x.strip() for x in err.decode(errors="replace").splitlines() if x.strip()]
            raise ComposeFailed(f"{what}: " + " / ".join(lines[-3:]))
        return out

    async def _json(self, yaml_text: bytes) -> Any:
        interp = _interpreter(shutil.which(self.binary) or self.binary)
        out = await self._run(
            [interp, "-c", YAML_TO_JSON],
            {"PATH": PATH},
            what="reading the compose file as YAML",
            stdin=yaml_text,
        )
        return json.loads(out or b"null")

    async def up(self, compose_file: str, env: Mapping[str, str], *,
                 sockets: Mapping[str, str]) -> list[str]:  # fmt: skip
        """Check and start the app (``up -d --remove-orphans``); its service names.
        `sockets`: container path -> this machine's path of each guest agent socket."""
        if shutil.which(self.binary) is None:
            raise ComposeFailed(f"{self.binary} not found: apt-get install docker-compose")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "docker-compose.yaml").write_text(compose_file)
        (self.workdir / ".env").unlink(missing_ok=True)  # only the boot's env substitutes
        environ = compose_environ(env, docker_host=self.docker_host, home=self.workdir)
        raw = await self._json(compose_file.encode()) or {}
        if not isinstance(raw, dict):
            raise ComposeFailed("the compose file is not a mapping")
        if raw and "services" not in raw:
            raise ComposeFailed("the compose file has no services: mapping (a compose v1 "
                                "file, which neither dstack nor pydstack runs)")  # fmt: skip
        if not raw.get("services"):
            # empty, or `services: {}`: nothing to start (1.29 would read the latter as a v1
            # file whose one service is named "services")
            return []
        config = self._argv("config", override=False)
        resolved = await self._json(await self._run(config, environ, what="docker-compose config"))
        if not self.host_paths:
            if bad := sandbox_escapes(raw, resolved, sockets):
                raise ComposeFailed("refused in the sandbox (it shares the host's kernel and "
                                    "files): " + "; ".join(bad))  # fmt: skip
        names = [str(n) for n in resolved["services"]]
        mounts = [f"{host}:{inside}" for inside, host in sockets.items()]
        override = {"version": str(resolved.get("version") or "3.9"),
                    "services": {n: {"volumes": mounts} for n in names}}  # fmt: skip
        (self.workdir / "pydstack-override.json").write_text(json.dumps(override))
        await self._run(
            self._argv("up", "-d", "--remove-orphans"), environ, what="docker-compose up"
        )
        return names


def available(binary: str = COMPOSE) -> bool:
    return shutil.which(binary) is not None or os.access(binary, os.X_OK)
