"""Where a KMS gets its own evidence: the quote binding its root keys (`KmsRootCreated`), its
RA-TLS `kms:rpc` certificate and its side of replica onboarding.

- **A guest agent** (`guest_agent`, a dstack.sock): the KMS runs inside a CVM and asks its own
  agent, as dstack's KMS does (`app_attest`: the agent's `Attest`); the seal key of its root
  key file comes from the same agent (`GetKey`).
- **The simulator**, on a simulated platform only (`dev_pki` with `seal_appkeys`): a TD
  simulated in-process, signed by the dev PKI; announced at every start.
- **Neither**: `SelfEvidenceError`. A KMS that cannot attest must not serve: it would publish
  a root with no evidence, which no CVM can tell from a host-made one.

Independently, `dev_pki` makes the KMS trust that simulator PKI when it verifies quotes (its
own, its clients', a replica's); without it only Intel's root, with the PCCS's collateral.

    ev = await self_evidence(guest_agent="/var/run/dstack.sock", dev_pki=None, ...)
    ev.attester, ev.seal, ev.root_ca_der, ev.collateral, ev.source
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import aiohttp
import structlog

from pydstack.adapters.tdx.attestation import (
    Attestation,
    AttestationDecodeError,
    decode_attestation,
)
from pydstack.adapters.tdx.collateral import CollateralCache
from pydstack.adapters.tdx.ratls import Attester
from pydstack.adapters.tdx.verify import Policy
from pydstack_guest import LocalKeyProvider

from .evidence import check_attestation
from .keystore import GuestAgentSealKey, KeyProviderSealKey, SealKeySource

log = structlog.get_logger("pydstack.kms")

GUEST_AGENT = "guest-agent"
SIMULATOR = "simulator"
PROBE_REPORT_DATA = bytes(64)  # what dstack's KMS quotes about itself (GetAttestationInfo)


class SelfEvidenceError(ValueError):
    """This KMS has no way to attest itself, or its source's evidence does not verify."""


class AgentError(Exception):
    """The guest agent did not attest: the message names the socket and the cause."""


class GuestAgentAttester:
    """`ratls.Attester` over a dstack guest agent's `Attest` RPC (SCALE V0 attestation, hex)."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path

    async def attest(self, report_data: bytes) -> Attestation:
        conn = aiohttp.UnixConnector(path=self.socket_path)
        try:
            async with aiohttp.ClientSession(connector=conn) as s:
                body = {"report_data": report_data.hex()}
                async with s.post("http://localhost/Attest", json=body) as resp:
                    text = await resp.text()
                    if resp.status != 200:
                        raise AgentError(
                            f"guest agent at {self.socket_path}: Attest answered "
                            f"{resp.status}: {text[:200]}"
                        )
            return decode_attestation(bytes.fromhex(json.loads(text)["attestation"]))
        except (aiohttp.ClientError, OSError) as e:
            raise AgentError(f"guest agent at {self.socket_path}: {e}") from None
        except (ValueError, KeyError, TypeError, AttestationDecodeError) as e:
            raise AgentError(f"guest agent at {self.socket_path}: bad Attest answer: {e}") from None


@dataclass(frozen=True, slots=True)
class SelfEvidence:
    attester: Attester
    seal: SealKeySource
    root_ca_der: bytes | None  # the simulator root trusted besides Intel's (dev only)
    collateral: CollateralCache
    source: str  # GUEST_AGENT or SIMULATOR


async def self_evidence(
    *, guest_agent: str | None, dev_pki: str | None, seal_appkeys: str | None, cluster: str,
    key_file: str, pccs_url: str, policy: Policy,
) -> SelfEvidence:  # fmt: skip
    """This KMS's evidence source, probed once: it attests and its evidence verifies under
    the KMS's own trust (else `SelfEvidenceError`, one line)."""
    root_der, collateral = _trust(dev_pki, pccs_url)
    attester: Attester
    seal: SealKeySource
    if guest_agent and seal_appkeys:
        raise SelfEvidenceError(
            "--seal-appkeys is the simulated TD's key provider; with --guest-agent the seal key "
            "comes from the agent: give one of them"
        )
    if guest_agent:
        attester, seal = GuestAgentAttester(guest_agent), GuestAgentSealKey(guest_agent)
        source = GUEST_AGENT
    elif dev_pki and seal_appkeys:
        attester = await _simulated_td(dev_pki, seal_appkeys, cluster, key_file)
        seal, source = KeyProviderSealKey(LocalKeyProvider(seal_appkeys)), SIMULATOR
    elif dev_pki:
        raise SelfEvidenceError(
            "--dev-pki without --guest-agent attests this KMS on a simulated TD, which needs "
            "--seal-appkeys FILE (its key provider); or give --guest-agent SOCKET"
        )
    else:
        raise SelfEvidenceError(
            "this KMS cannot attest itself: give --guest-agent SOCKET (the dstack guest agent "
            "of the CVM it runs in) or, on a simulated platform, --dev-pki DIR with "
            "--seal-appkeys FILE; a KMS root published without evidence is not served"
        )
    await _probe(attester, collateral, root_der, policy, guest_agent)
    if source == SIMULATOR:
        log.warning("kms evidence: SIMULATED TDX (an in-process TD signed by the dev PKI: no "
                    "confidentiality)", dev_pki=dev_pki)  # fmt: skip
    else:
        log.info("kms evidence: guest agent", socket=guest_agent,
                 simulated_root=root_der is not None)  # fmt: skip
    return SelfEvidence(attester, seal, root_der, collateral, source)


async def _probe(
    attester: Attester, collateral: CollateralCache, root_der: bytes | None, policy: Policy,
    guest_agent: str | None,
) -> None:  # fmt: skip
    try:
        att = await attester.attest(PROBE_REPORT_DATA)
        coll = await collateral(att.quote)
    except Exception as e:  # any failure to attest stops the start, in one line
        raise SelfEvidenceError(f"this KMS cannot attest itself: {e}") from None
    ev = check_attestation(att, coll, policy=policy, now=int(time.time()), root_ca_der=root_der)
    if ev.unverified:
        hint = (" (a simulated guest agent? give --dev-pki DIR of its simulator PKI)"
                if guest_agent and root_der is None else "")  # fmt: skip
        raise SelfEvidenceError(
            f"this KMS's own evidence does not verify: {'; '.join(ev.unverified)}{hint}"
        )


def _trust(dev_pki: str | None, pccs_url: str) -> tuple[bytes | None, CollateralCache]:
    if not dev_pki:
        return None, CollateralCache.pccs(pccs_url)
    from pydstack.adapters.tdx.devpccs import dev_collateral
    from pydstack.adapters.tdx.pki import DevPki

    pki = DevPki.load(dev_pki)
    return pki.root_der, dev_collateral(pki)


async def _simulated_td(dev_pki: str, seal_appkeys: str, cluster: str, key_file: str) -> Attester:
    from pydstack.adapters.tdx.backend import SimulatorBackend
    from pydstack.adapters.tdx.pki import DevPki
    from pydstack.adapters.tdx.simulator import QuoteSimulator, TdMeasurements
    from pydstack_guest import GuestAgent, GuestConfig
    from pydstack_guest.agent import measure_identity

    pki = DevPki.load(dev_pki)
    backend = SimulatorBackend(
        QuoteSimulator(pki), TdMeasurements(mr_td=hashlib.sha384(b"kms image").digest())
    )
    keys = await LocalKeyProvider(seal_appkeys).app_keys()
    # The simulated KMS TD measures an identity as a dstack KMS CVM's boot does, so a peer
    # KMS (replica onboarding) sees an app id and instance id in its quote's event log.
    name = f"pydstack-kms:{cluster}"
    await measure_identity(
        backend, app_id=hashlib.sha256(name.encode()).digest()[:20], app_compose=name,
        instance_id=hashlib.sha256(f"{name}:{key_file}".encode()).digest()[:20],
    )  # fmt: skip
    return GuestAgent(backend, keys, GuestConfig())
