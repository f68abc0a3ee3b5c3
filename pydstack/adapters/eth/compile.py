"""Compile ``contracts/*.sol`` with solc's standard-JSON interface.

The source is the truth: tests and the deploy helper compile it, nothing compiled is committed.
Two compilers are accepted, both speaking standard JSON: a native ``solc`` binary, or npm's
``solc`` package (solcjs, WebAssembly, offline once installed), which ``make deps`` puts in
``.venv/solcjs``.

    artifacts = compile_contracts()
    kms = artifacts["KmsAuth"]
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Final

import msgspec

from .errors import CompileError

__all__ = ["Artifact", "SolcCommand", "compile_contracts", "contracts_dir", "find_solc"]

# The EVM version is pinned so the bytecode does not change with the compiler's default.
EVM_VERSION: Final = "cancun"

# solcjs prints a notice on stdout in CLI mode; calling its compile() directly keeps stdout JSON.
_SOLCJS_SHIM: Final = """
const solc = require(process.argv[process.argv.length - 1]);
let input = "";
process.stdin.setEncoding("utf8");
process.stdin.on("data", (chunk) => { input += chunk; });
process.stdin.on("end", () => { process.stdout.write(solc.compile(input)); });
"""


class Artifact(msgspec.Struct, frozen=True):
    """One compiled contract: its ABI and creation bytecode (hex, no 0x)."""

    name: str
    abi: list[dict[str, Any]]
    bytecode: str


class SolcCommand(msgspec.Struct, frozen=True):
    """How to run a compiler: argv reading standard JSON on stdin and writing it on stdout."""

    argv: tuple[str, ...]
    description: str
    # Changes when the compiler does (solcjs package.json, or the binary's size and mtime).
    identity: str = ""


def contracts_dir() -> Path:
    """The repository's ``contracts/`` (this package is installed editable from the repo)."""
    return Path(__file__).resolve().parents[3] / "contracts"


def _solcjs(package: Path) -> SolcCommand | None:
    node = shutil.which("node")
    if node is None or not (package / "package.json").is_file():
        return None
    identity = (package / "package.json").read_text()
    return SolcCommand((node, "-e", _SOLCJS_SHIM, str(package)), f"solcjs at {package}", identity)


def _native(binary: str) -> SolcCommand:
    try:
        st = os.stat(binary)
        identity = f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        identity = ""
    return SolcCommand((binary, "--standard-json"), f"solc at {binary}", identity)


def find_solc() -> SolcCommand:
    """``$PYDSTACK_SOLC`` (a solc binary or a solcjs package dir), then the solcjs that
    ``make deps`` installs in the venv, then ``solc`` on PATH."""
    configured = os.environ.get("PYDSTACK_SOLC")
    if configured:
        path = Path(configured)
        if path.is_dir():
            found = _solcjs(path)
            if found is None:
                raise CompileError(f"PYDSTACK_SOLC={configured}: no solc package.json or no node")
            return found
        return _native(configured)
    found = _solcjs(Path(sys.prefix) / "solcjs" / "node_modules" / "solc")
    if found is not None:
        return found
    native = shutil.which("solc")
    if native is not None:
        return _native(native)
    raise CompileError(
        "no Solidity compiler: run `make deps` (installs solcjs) or set PYDSTACK_SOLC"
    )


_IMPORT: Final = re.compile(r'^\s*import\s+(?:[^"\';]*?\sfrom\s+)?["\']([^"\']+)["\']', re.M)


def _with_imports(sources: dict[str, str], import_roots: tuple[Path, ...]) -> dict[str, str]:
    """``sources`` plus every file they import, found under ``import_roots`` (solcjs has no
    file access: standard JSON must carry every unit)."""
    todo = list(sources)
    while todo:
        unit = todo.pop()
        for target in _IMPORT.findall(sources[unit]):
            name = target
            if target.startswith(("./", "../")):
                name = posixpath.normpath(posixpath.join(posixpath.dirname(unit), target))
            if name in sources:
                continue
            found = next((r / name for r in import_roots if (r / name).is_file()), None)
            if found is None:
                raise CompileError(f"{unit} imports {target}: not found under {import_roots}")
            sources[name] = found.read_text()
            todo.append(name)
    return sources


def compile_contracts(
    source_dir: Path | None = None,
    *,
    solc: SolcCommand | None = None,
    cache_dir: Path | None = None,
    timeout: float = 120.0,
    import_roots: tuple[Path, ...] = (),
) -> dict[str, Artifact]:
    """Compile every ``*.sol`` in ``source_dir`` (default: the repo's ``contracts/``).

    Returns the deployable contracts by name; interfaces (no bytecode) are left out. With
    ``cache_dir``, solc's output is kept there under the hash of the sources, settings and
    compiler, so an unchanged tree is compiled once (solcjs takes seconds). Imports that are
    not in ``source_dir`` (``@openzeppelin/...``) are read from ``import_roots``
    (``node_modules`` folders).
    """
    source_dir = source_dir or contracts_dir()
    texts = {p.name: p.read_text() for p in sorted(source_dir.glob("*.sol"))}
    if not texts:
        raise CompileError(f"no .sol files in {source_dir}")
    sources = {name: {"content": text} for name, text in _with_imports(texts, import_roots).items()}
    command = solc or find_solc()
    request = {
        "language": "Solidity",
        "sources": sources,
        "settings": {
            "optimizer": {"enabled": True, "runs": 200},
            "evmVersion": EVM_VERSION,
            "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object"]}},
        },
    }
    request_json = json.dumps(request, sort_keys=True)
    cache_file: Path | None = None
    if cache_dir is not None:
        key = hashlib.sha256(f"{command.argv}\0{command.identity}\0{request_json}".encode())
        cache_file = cache_dir / f"{key.hexdigest()}.json"
        if cache_file.is_file():
            return _artifacts(json.loads(cache_file.read_text()))
    try:
        done = subprocess.run(
            command.argv,
            input=request_json,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CompileError(f"{command.description} did not run: {exc}") from None
    if done.returncode != 0:
        raise CompileError(
            f"{command.description} failed ({done.returncode}): {done.stderr[-500:]}"
        )
    try:
        output = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise CompileError(
            f"{command.description} printed no JSON: {done.stdout[:200]!r}"
        ) from None
    errors = [e for e in output.get("errors", []) if e.get("severity") == "error"]
    if errors:
        raise CompileError(
            "; ".join(e.get("formattedMessage", e.get("message", "")) for e in errors)
        )
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_file.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(done.stdout)
        partial.replace(cache_file)
    return _artifacts(output)


def _artifacts(output: dict[str, Any]) -> dict[str, Artifact]:
    artifacts: dict[str, Artifact] = {}
    for contracts in output.get("contracts", {}).values():
        for name, out in contracts.items():
            bytecode = out["evm"]["bytecode"]["object"]
            if bytecode:
                artifacts[name] = Artifact(name=name, abi=out["abi"], bytecode=bytecode)
    return artifacts
