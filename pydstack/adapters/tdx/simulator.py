"""Build complete, correctly signed TDX quotes from chosen measurements with a `DevPki`.

The quote is what a real TDX host would produce (header, TD report, ECDSA signature by the
attestation key, QE report signed by the PCK key and binding the attestation key, PCK chain),
so dcap-qvl verifies it once the dev root is trusted. Everything that does not depend on the
TD report is built once, so a quote costs one ECDSA signature.

    sim = QuoteSimulator(DevPki.generate())
    raw = sim.quote(report_data, TdMeasurements(mr_td=..., rtmrs=(r0, r1, r2, r3)))
    dcap_qvl.verify_with_root_ca(raw, collateral, sim.pki.root_der, now)
"""

from __future__ import annotations

import hashlib

import msgspec

from .errors import TdxError
from .pki import DevPki, raw_ecdsa_sign
from .quote import BODY_TD10, BODY_TD15, CERT_PCK_CHAIN, CERT_QE_REPORT, TD10_LEN, TD15_LEN

INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")  # dcap-qvl checks it
# SEPT_VE_DISABLE (bit 28) set, debug off: what dcap-qvl requires of a production TD.
DEFAULT_TD_ATTRIBUTES = bytes.fromhex("0000001000000000")
DEFAULT_XFAM = bytes.fromhex("e702060000000000")
DEFAULT_MR_SEAM = hashlib.sha384(b"pydstack simulated TDX module").digest()
ZERO48 = bytes(48)
QE_AUTH_DATA = bytes(range(32))  # dcap-qvl requires exactly 32 bytes


class TdMeasurements(msgspec.Struct, frozen=True):
    """What the simulated TDX module reports about the TD (all 48-byte fields)."""

    mr_td: bytes = ZERO48
    mr_config_id: bytes = ZERO48
    mr_owner: bytes = ZERO48
    mr_owner_config: bytes = ZERO48
    rtmrs: tuple[bytes, bytes, bytes, bytes] = (ZERO48, ZERO48, ZERO48, ZERO48)
    td_attributes: bytes = DEFAULT_TD_ATTRIBUTES
    xfam: bytes = DEFAULT_XFAM


def _check(name: str, value: bytes, size: int) -> None:
    if len(value) != size:
        raise TdxError(f"simulated {name} must be {size} bytes, got {len(value)}")


def _le16(v: int) -> bytes:
    return v.to_bytes(2, "little")


def _le32(v: int) -> bytes:
    return v.to_bytes(4, "little")


class QuoteSimulator:
    """Signs quotes for one simulated platform. Thread-safe: holds no mutable state."""

    def __init__(self, pki: DevPki) -> None:
        self.pki = pki
        p = pki.params
        att_key = pki.keys["attestation"]
        nums = att_key.public_key().public_numbers()
        self._att_key = att_key
        self.attestation_pub = nums.x.to_bytes(32, "big") + nums.y.to_bytes(32, "big")
        # qe_svn/pce_svn 0; user_data is not checked by dcap-qvl (Intel puts a QE id there).
        self._header = {
            v: b"".join((_le16(v), _le16(2), _le32(0x81), bytes(4), INTEL_QE_VENDOR_ID, bytes(20)))
            for v in (4, 5)
        }
        self._seam = p.tee_tcb_svn + DEFAULT_MR_SEAM + p.mr_signer_seam + bytes(8)
        # The QE report binds the attestation key: report_data = sha256(att_pub || auth) || 0*32.
        qe_report = (
            p.cpu_svn  # QE runs at the platform's CPU SVN
            + _le32(0)  # miscselect
            + bytes(28)
            + bytes.fromhex("11000000000000000000000000000000")  # attributes, debug bit clear
            + hashlib.sha256(b"pydstack simulated QE").digest()  # mr_enclave
            + bytes(32)
            + p.qe_mr_signer
            + bytes(96)
            + _le16(p.qe_isv_prod_id)
            + _le16(p.qe_isv_svn)
            + bytes(60)
            + hashlib.sha256(self.attestation_pub + QE_AUTH_DATA).digest()
            + bytes(32)
        )
        qe_sig = raw_ecdsa_sign(pki.keys["pck"], qe_report)
        # Intel ends the PEM chain with a NUL counted in the length; dcap-qvl accepts both.
        chain = pki.pck_chain_pem + b"\x00"
        qe_cert = (
            qe_report
            + qe_sig
            + _le16(len(QE_AUTH_DATA))
            + QE_AUTH_DATA
            + _le16(CERT_PCK_CHAIN)
            + _le32(len(chain))
            + chain
        )
        self._tail = self.attestation_pub + _le16(CERT_QE_REPORT) + _le32(len(qe_cert)) + qe_cert
        self._auth_len = _le32(64 + len(self._tail))

    def quote(
        self,
        report_data: bytes,
        m: TdMeasurements | None = None,
        *,
        version: int = 4,
        body_type: int = BODY_TD10,
        tee_tcb_svn2: bytes | None = None,
        mr_service_td: bytes = ZERO48,
    ) -> bytes:
        """A signed quote over `m` and `report_data` (64 bytes; shorter input is zero-padded).

        `version=5` wraps the same body in a v5 body descriptor; `body_type=BODY_TD15` (v5
        only) appends the TD 1.5 fields; dcap-qvl matches tee_tcb_svn2 against the TCB
        levels too, so it defaults to the platform's tee_tcb_svn.
        """
        if len(report_data) > 64:
            raise TdxError(f"report_data is at most 64 bytes, got {len(report_data)}")
        m = m or TdMeasurements()
        for name in ("mr_td", "mr_config_id", "mr_owner", "mr_owner_config"):
            _check(name, getattr(m, name), 48)
        if len(m.rtmrs) != 4:
            raise TdxError(f"simulated rtmrs must be 4 values, got {len(m.rtmrs)}")
        for i, r in enumerate(m.rtmrs):
            _check(f"rtmr{i}", r, 48)
        _check("td_attributes", m.td_attributes, 8)
        _check("xfam", m.xfam, 8)
        header = self._header.get(version)
        if header is None:
            raise TdxError(f"simulator builds quote versions 4 and 5, not {version}")
        parts = [
            header,
            self._seam,
            m.td_attributes,
            m.xfam,
            m.mr_td,
            m.mr_config_id,
            m.mr_owner,
            m.mr_owner_config,
            *m.rtmrs,
            report_data.ljust(64, b"\x00"),
        ]
        if version == 5:
            if body_type == BODY_TD15:
                if tee_tcb_svn2 is None:
                    tee_tcb_svn2 = self.pki.params.tee_tcb_svn
                _check("tee_tcb_svn2", tee_tcb_svn2, 16)
                _check("mr_service_td", mr_service_td, 48)
                parts += [tee_tcb_svn2, mr_service_td]
            elif body_type != BODY_TD10:
                raise TdxError(f"simulator builds v5 body types 2 and 3, not {body_type}")
            size = TD15_LEN if body_type == BODY_TD15 else TD10_LEN
            parts.insert(1, _le16(body_type) + _le32(size))
        elif body_type != BODY_TD10:
            raise TdxError("a v4 quote carries a TD 1.0 body; use version=5 for TD 1.5")
        signed = b"".join(parts)
        sig = raw_ecdsa_sign(self._att_key, signed)
        return signed + self._auth_len + sig + self._tail
