"""dstack's `CertSigningRequestV1` (SignCert, api_version 1), SCALE encoded. Pure.

    CertSigningRequestV1 { confirm: String, pubkey: Vec<u8> (SPKI DER),
        config: CertConfig { org_name: Option<String>, subject: String,
            subject_alt_names: Vec<String>, usage_server_auth: bool, usage_client_auth: bool,
            ext_quote: bool },
        quote: Vec<u8>, event_log: Vec<u8> (dstack's JSON event log) }

What guests before dstack 0.5 send (v0.5.11's own guest and gateway send api_version 2).
dstack's KMS upgrades it to a V2 request (`TryFrom<CertSigningRequestV1>`): no app-info
extension, no validity overrides, the attestation built from the quote and its event log
(`Attestation::from_tdx_quote`). The client signs the whole encoding with its P-256 key;
dstack verifies the signature over the re-encoded request, so `encode_csr_v1` of what
`decode_csr_v1` returns is what the signature must cover.

    csr, quote, event_log = decode_csr_v1(blob)
    signed = encode_csr_v1(csr, quote, event_log)
"""

from __future__ import annotations

from .csr import CertConfig, Csr, CsrError, _bytes, _Reader, csr_head


def encode_csr_v1(csr: Csr, quote: bytes, event_log: bytes) -> bytes:
    c = csr.config
    parts = [
        *csr_head(csr),
        bytes([c.usage_server_auth, c.usage_client_auth, c.ext_quote]),
        _bytes(quote),
        _bytes(event_log),
    ]
    return b"".join(parts)


def decode_csr_v1(data: bytes) -> tuple[Csr, bytes, bytes]:
    """(the CSR as dstack upgrades it to V2, the TDX quote, the JSON event log); every byte
    of `data` is consumed. Each length is checked against what is left before it is taken."""
    r = _Reader(bytes(data))
    confirm = r.str_("confirm")
    pubkey = r.bytes_("pubkey")
    org = r.str_("config.org_name") if r.flag("config.org_name") else None
    subject = r.str_("config.subject")
    n = r.compact("config.subject_alt_names")
    if n > len(r.buf) - r.pos:  # each name takes at least its one-byte length
        raise CsrError(f"csr config.subject_alt_names count {n} cannot fit")
    alt = tuple(r.str_(f"config.subject_alt_names[{i}]") for i in range(n))
    flags = [r.flag(f"config.{f}") for f in ("usage_server_auth", "usage_client_auth", "ext_quote")]
    quote = r.bytes_("quote")
    event_log = r.bytes_("event_log")
    if r.pos != len(r.buf):
        raise CsrError(f"csr has {len(r.buf) - r.pos} trailing bytes after event_log")
    config = CertConfig(
        subject=subject,
        org_name=org,
        subject_alt_names=alt,
        usage_server_auth=flags[0],
        usage_client_auth=flags[1],
        ext_quote=flags[2],
    )
    return Csr(confirm, pubkey, config), quote, event_log
