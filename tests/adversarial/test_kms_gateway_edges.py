"""Hostile input on the parsing paths issue 16 item 7 added: a SignCert V1 CSR (SCALE from
the network) and its quote/event log, a KMS auth webhook's info answer, a DNS TXT app address,
a request to the reserved gateway ids. Each is bounded and refused in one line, with nothing
appended to the log. (The webhook info, TXT and reserved-id cases run with their features:
`tests/kms/test_meta_chain.py`, `tests/gateway/test_app_address.py`,
`tests/gateway/test_reserved_ids.py`.)
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from pydstack.actors.kms import KmsCallError
from pydstack.adapters.proxy.reserved import answer
from pydstack.core.kms.csr import CertConfig, Csr, CsrError
from pydstack.core.kms.csr_v1 import decode_csr_v1, encode_csr_v1
from tests.kms.conftest import VM_CONFIG, Kms, kms, pki, webhook  # noqa: F401 - fixtures

CSR = Csr("please sign cert:", b"\x30" * 91, CertConfig(subject="s", subject_alt_names=("a",)))
GOOD = encode_csr_v1(CSR, b"q" * 40, b"[]")


@given(st.binary(max_size=512))
@settings(max_examples=400, deadline=None)
def test_any_bytes_decode_or_fail_as_csr_error(data: bytes) -> None:
    """Random bytes: a CSR or a CsrError naming the field, never another exception."""
    try:
        csr, quote, log = decode_csr_v1(data)
    except CsrError as e:
        assert "\n" not in str(e)
        return
    assert encode_csr_v1(csr, quote, log) == data  # what decodes is canonical: dstack's bytes


@given(st.integers(0, len(GOOD) - 1), st.binary(min_size=1, max_size=8))
@settings(max_examples=300, deadline=None)
def test_truncated_or_extended_csr_is_refused(cut: int, extra: bytes) -> None:
    with pytest.raises(CsrError):
        decode_csr_v1(GOOD[:cut])
    with pytest.raises(CsrError, match="trailing"):
        decode_csr_v1(GOOD + extra)


def test_huge_counts_cost_nothing() -> None:
    """A compact length or count of 2^30+ on a short input is refused before any loop."""
    huge = b"\x03" + (1 << 31).to_bytes(4, "little")
    head = encode_csr_v1(Csr(CSR.confirm, CSR.pubkey, CertConfig(subject="s")), b"", b"")
    before_names = head[: -(1 + 3 + 2)]  # drop: the names count, 3 flags, 2 empty vecs
    with pytest.raises(CsrError, match="confirm"):
        decode_csr_v1(huge + b"x")
    with pytest.raises(CsrError, match="subject_alt_names count"):
        decode_csr_v1(before_names + huge + b"x" * 64)


@pytest.mark.parametrize(
    ("field", "csr"),
    [
        ("csr", GOOD[:-1]),  # truncated event log
        ("csr", GOOD),  # a quote that is no TDX quote, an event log with no events
        ("csr", encode_csr_v1(CSR, b"q" * 40, b"{not json")),
    ],
)
async def test_hostile_v1_csr_over_http_is_a_400_and_nothing_is_appended(
    kms: Kms,  # noqa: F811
    field: str,
    csr: bytes,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    body = {"api_version": 1, "csr": csr.hex(), "vm_config": VM_CONFIG,
            "signature": key.sign(csr, ec.ECDSA(hashes.SHA256())).hex()}  # fmt: skip
    before = len(await kms.events())
    async with kms.client() as c:
        with pytest.raises(KmsCallError) as info:
            await c.call("SignCert", body)
    assert info.value.status == 400 and "\n" not in info.value.error
    assert len(await kms.events()) == before


@given(st.text(max_size=64), st.text(max_size=256))
@settings(max_examples=300, deadline=None)
def test_reserved_answers_are_dstacks_statuses_only(method: str, target: str) -> None:
    """Any method and target: one of dstack's statuses, a body only for its index."""
    for ident in ("health", "gateway"):
        status, body = answer(ident, method, target)
        assert status in (200, 404, 405)
        assert body == b"" or (ident == "gateway" and status == 200)
