"""A development PKI shaped like Intel's SGX/TDX PKI, for the quote simulator.

root CA -> "PCK Platform CA" -> PCK leaf (with the SGX extension dcap-qvl reads), and
root CA -> TCB signing cert (end entity) that signs TCB info and QE identity. Collateral is
issued for a caller-given `now` so tests and audits are reproducible. Only the dev root
trusts any of this: dcap-qvl's built-in Intel root refuses it (see
/work/shared/notes/tdx-quote-simulation.md for every constraint dcap-qvl enforces).

    pki = DevPki.generate()
    pki.save(path)                      # keys 0600; root.der for verifiers
    coll = pki.collateral_json(now=int(time.time()))
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from ..secretfile import write_secret
from .errors import TdxError

SGX_EXT_OID = "1.2.840.113741.1.13.1"
_CERT_START = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
_CERT_END = dt.datetime(2049, 12, 31, tzinfo=dt.UTC)
_DAY = 86400


class PkiParams(msgspec.Struct, frozen=True):
    """Platform identity baked into the PCK cert and the TCB info. Hex-free raw bytes."""

    fmspc: bytes = bytes.fromhex("00906ED50000")
    pce_id: bytes = b"\x00\x00"
    ppid: bytes = bytes(16)
    cpu_svn: bytes = bytes([2, 2, 2, 2, 3, 1, 0, 5] + [0] * 8)
    pce_svn: int = 11
    tee_tcb_svn: bytes = bytes([6, 1, 3] + [0] * 13)  # [1]=1 -> module identity TDX_01
    mr_signer_seam: bytes = bytes(48)
    qe_mr_signer: bytes = bytes(32)
    qe_isv_prod_id: int = 2
    qe_isv_svn: int = 4


# --- minimal DER writer for the SGX extension (cryptography has no generic ASN.1 encoder) ---


def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    ln = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(ln)]) + ln + content


def _oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    body = bytearray([40 * parts[0] + parts[1]])
    for p in parts[2:]:
        chunk = [p & 0x7F]
        p >>= 7
        while p:
            chunk.append(0x80 | (p & 0x7F))
            p >>= 7
        body += bytes(reversed(chunk))
    return _tlv(0x06, bytes(body))


def _int(value: int, tag: int = 0x02) -> bytes:
    # Minimal two's complement for non-negative values: a leading 0 only when the top bit is set.
    return _tlv(tag, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _seq(*items: bytes) -> bytes:
    return _tlv(0x30, b"".join(items))


def sgx_extension_der(p: PkiParams) -> bytes:
    """SEQUENCE of {OID, value} as in Intel's PCK certificates (PPID, TCB, PCE-ID, FMSPC, type)."""
    tcb = [_seq(_oid(f"{SGX_EXT_OID}.2.{i + 1}"), _int(p.cpu_svn[i])) for i in range(16)]
    tcb.append(_seq(_oid(f"{SGX_EXT_OID}.2.17"), _int(p.pce_svn)))
    tcb.append(_seq(_oid(f"{SGX_EXT_OID}.2.18"), _tlv(0x04, p.cpu_svn)))
    return _seq(
        _seq(_oid(f"{SGX_EXT_OID}.1"), _tlv(0x04, p.ppid)),
        _seq(_oid(f"{SGX_EXT_OID}.2"), _seq(*tcb)),
        _seq(_oid(f"{SGX_EXT_OID}.3"), _tlv(0x04, p.pce_id)),
        _seq(_oid(f"{SGX_EXT_OID}.4"), _tlv(0x04, p.fmspc)),
        _seq(_oid(f"{SGX_EXT_OID}.5"), _int(0, tag=0x0A)),  # ENUMERATED sgx type: standard
    )


def raw_ecdsa_sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA-P256-SHA256 as raw r||s (64 bytes), the encoding quotes and collateral use."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pydstack development (NOT INTEL)"),
        ]
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca_pathlen: int | None,
    extra: Sequence[x509.ExtensionType] = (),
) -> x509.Certificate:
    pub = key.public_key()
    is_ca = ca_pathlen is not None
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.subject if issuer else _name(subject))
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_CERT_START)
        .not_valid_after(_CERT_END)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=ca_pathlen), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not is_ca,
                content_commitment=not is_ca,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                # webpki demands cRLSign on every CRL issuer (IssuerNotCrlSigner otherwise).
                key_cert_sign=is_ca,
                crl_sign=is_ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    for ext in extra:
        # The SGX extension must be non-critical: webpki rejects unknown critical extensions.
        b = b.add_extension(ext, critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _crl(
    issuer: x509.Certificate, key: ec.EllipticCurvePrivateKey, issued: int, until: int
) -> bytes:
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(dt.datetime.fromtimestamp(issued, dt.UTC))
        .next_update(dt.datetime.fromtimestamp(until, dt.UTC))
        # webpki needs CRLNumber and AKI, else MalformedExtensions.
        .add_extension(x509.CRLNumber(1), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return crl.public_bytes(serialization.Encoding.DER)


def _iso(t: int) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _canonical(obj: object) -> str:
    # Sorted compact JSON: dcap-qvl's PCCS client re-serializes tcbInfo with serde_json,
    # which yields exactly this form, so one signature works for files and PCCS alike.
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


_KEYS = ("root", "platform_ca", "tcb_signer", "pck", "attestation")


class DevPki:
    """Keys, certificates and parameters of one simulated platform. Build with `generate`/`load`."""

    def __init__(
        self,
        keys: dict[str, ec.EllipticCurvePrivateKey],
        certs: dict[str, x509.Certificate],
        params: PkiParams,
    ) -> None:
        self.keys = keys
        self.certs = certs
        self.params = params
        self.root_der = certs["root"].public_bytes(serialization.Encoding.DER)
        pem = serialization.Encoding.PEM
        self.pck_chain_pem = b"".join(certs[n].public_bytes(pem) for n in ("pck", "platform_ca"))
        self.pck_chain_pem += certs["root"].public_bytes(pem)

    @classmethod
    def generate(cls, params: PkiParams | None = None) -> DevPki:
        if params is None:
            params = PkiParams(ppid=secrets.token_bytes(16), qe_mr_signer=secrets.token_bytes(32))
        keys = {n: ec.generate_private_key(ec.SECP256R1()) for n in _KEYS}
        root = _cert("pydstack Dev SGX Root CA", keys["root"], None, keys["root"], ca_pathlen=1)
        platform = _cert(
            "pydstack Dev SGX PCK Platform CA",  # "Platform" makes dcap-qvl's ca() say platform
            keys["platform_ca"],
            root,
            keys["root"],
            ca_pathlen=0,
        )
        signer = _cert(
            "pydstack Dev SGX TCB Signing", keys["tcb_signer"], root, keys["root"], ca_pathlen=None
        )
        sgx = x509.UnrecognizedExtension(
            x509.ObjectIdentifier(SGX_EXT_OID), sgx_extension_der(params)
        )
        pck = _cert(
            "pydstack Dev SGX PCK Certificate",
            keys["pck"],
            platform,
            keys["platform_ca"],
            ca_pathlen=None,
            extra=[sgx],
        )
        certs = {"root": root, "platform_ca": platform, "tcb_signer": signer, "pck": pck}
        return cls(keys, certs, params)

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write keys (mode 0600), certificates (PEM), root.der and params.json."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for name, key in self.keys.items():
            blob = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            write_secret(d / f"{name}.key", blob)  # replaces one that existed, 0600 throughout
        for name, cert in self.certs.items():
            (d / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (d / "root.der").write_bytes(self.root_der)
        (d / "params.json").write_bytes(msgspec.json.encode(self.params))

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> DevPki:
        d = Path(directory)
        try:
            keys: dict[str, ec.EllipticCurvePrivateKey] = {}
            for name in _KEYS:
                key = serialization.load_pem_private_key((d / f"{name}.key").read_bytes(), None)
                if not isinstance(key, ec.EllipticCurvePrivateKey):
                    raise TdxError(f"dev PKI key {name}.key in {d} is not an EC key")
                keys[name] = key
            certs = {
                n: x509.load_pem_x509_certificate((d / f"{n}.pem").read_bytes())
                for n in ("root", "platform_ca", "tcb_signer", "pck")
            }
            params = msgspec.json.decode((d / "params.json").read_bytes(), type=PkiParams)
        except (OSError, ValueError, msgspec.DecodeError) as e:
            raise TdxError(f"cannot load dev PKI from {d}: {e}") from e
        return cls(keys, certs, params)

    def tcb_info(
        self, issued: int, until: int, tcb_status: str, advisory_ids: Sequence[str]
    ) -> str:
        p = self.params
        level: dict[str, object] = {
            "tcb": {
                "sgxtcbcomponents": [{"svn": s} for s in p.cpu_svn],
                "pcesvn": p.pce_svn,
                "tdxtcbcomponents": [{"svn": s} for s in p.tee_tcb_svn],
            },
            "tcbDate": _iso(issued),
            "tcbStatus": tcb_status,
        }
        if advisory_ids:
            level["advisoryIDs"] = list(advisory_ids)
        module = {
            "mrsigner": p.mr_signer_seam.hex().upper(),
            "attributes": "0000000000000000",
            "attributesMask": "FFFFFFFFFFFFFFFF",
        }
        ident = {
            **module,
            "id": f"TDX_{p.tee_tcb_svn[1]:02X}",
            "tcbLevels": [
                {
                    "tcb": {"isvsvn": p.tee_tcb_svn[0]},
                    "tcbDate": _iso(issued),
                    "tcbStatus": "UpToDate",
                }
            ],
        }
        return _canonical(
            {
                "id": "TDX",
                "version": 3,
                "issueDate": _iso(issued),
                "nextUpdate": _iso(until),
                "fmspc": p.fmspc.hex().upper(),
                "pceId": p.pce_id.hex().upper(),
                "tcbType": 0,
                "tcbEvaluationDataNumber": 17,
                "tdxModule": module,
                "tdxModuleIdentities": [ident],
                "tcbLevels": [level],
            }
        )

    def qe_identity(self, issued: int, until: int) -> str:
        p = self.params
        return _canonical(
            {
                "id": "TD_QE",
                "version": 2,
                "issueDate": _iso(issued),
                "nextUpdate": _iso(until),
                "tcbEvaluationDataNumber": 17,
                "miscselect": "00000000",
                "miscselectMask": "FFFFFFFF",
                "attributes": "11000000000000000000000000000000",
                "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
                "mrsigner": p.qe_mr_signer.hex().upper(),
                "isvprodid": p.qe_isv_prod_id,
                "tcbLevels": [
                    {
                        "tcb": {"isvsvn": p.qe_isv_svn},
                        "tcbDate": _iso(issued),
                        "tcbStatus": "UpToDate",
                    }
                ],
            }
        )

    def collateral(
        self,
        now: int,
        *,
        tcb_status: str = "UpToDate",
        advisory_ids: Sequence[str] = (),
        valid_for: int = 30 * _DAY,
    ) -> dict[str, str]:
        """Signed collateral valid from `now - 1 day` to `now + valid_for` (dcap-qvl JSON keys)."""
        issued, until = now - _DAY, now + valid_for
        signer, chain = self.keys["tcb_signer"], self.issuer_chain("tcb_signer")
        tcb_info = self.tcb_info(issued, until, tcb_status, advisory_ids)
        qe_identity = self.qe_identity(issued, until)
        root, platform = self.certs["root"], self.certs["platform_ca"]
        return {
            "pck_crl_issuer_chain": self.issuer_chain("platform_ca"),
            "root_ca_crl": _crl(root, self.keys["root"], issued, until).hex(),
            "pck_crl": _crl(platform, self.keys["platform_ca"], issued, until).hex(),
            "tcb_info_issuer_chain": chain,
            "tcb_info": tcb_info,
            "tcb_info_signature": raw_ecdsa_sign(signer, tcb_info.encode()).hex(),
            "qe_identity_issuer_chain": chain,
            "qe_identity": qe_identity,
            "qe_identity_signature": raw_ecdsa_sign(signer, qe_identity.encode()).hex(),
        }

    def collateral_json(
        self,
        now: int,
        *,
        tcb_status: str = "UpToDate",
        advisory_ids: Sequence[str] = (),
        valid_for: int = 30 * _DAY,
    ) -> str:
        """`collateral` as the JSON text `QuoteCollateralV3.from_json` reads."""
        coll = self.collateral(
            now, tcb_status=tcb_status, advisory_ids=advisory_ids, valid_for=valid_for
        )
        return json.dumps(coll)

    def issuer_chain(self, name: str) -> str:
        pem = serialization.Encoding.PEM
        return (self.certs[name].public_bytes(pem) + self.certs["root"].public_bytes(pem)).decode()
