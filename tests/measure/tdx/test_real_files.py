"""Real firmware and kernels from Debian packages on this machine, when they are installed.

- The Debian kernel (``linux-image-amd64``, a Makefile dependency) is Authenticode-signed by
  Debian: the signature carries the image's SHA-256 Authenticode digest, computed by Debian's
  signing service. Our walk, run with SHA-256, must give that digest.
- The same kernel after QEMU's setup-header patch, signed with SHA-384 by ``osslsigncode``
  (when installed): the digest osslsigncode computes is the one our walk gives for RTMR1.
- Debian's ``ovmf`` 2022.11 ``OVMF.fd`` is an OvmfPkgX64 build with TDX metadata. Its MRTD and
  TD HOB digests below were computed by an independent implementation (quex-tech/td-report-web
  ``reproduce.mjs``, run with node), pinned to the file's SHA-256; no TD booted it, so these
  values are a cross-check between two implementations, not hardware measurements.
"""

from __future__ import annotations

import datetime
import hashlib
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pydstack.core.measure.tdx import (
    authenticode_digest,
    mrtd,
    patch_kernel,
    td_hob_digest,
    tdvf_sections,
)

OVMF = Path("/usr/share/ovmf/OVMF.fd")
OVMF_SHA256 = (
    "7b456907dd0786d415999e801a1ac4637b8ed4d7cf5378cfc6edbe5e574dd773"  # 2022.11-6+deb12u2
)
OVMF_MRTD_TWO_PASS = (
    "acccbcc870a381adab0d3919d90a7f268ac3b0364771f202"
    "ed4bb4e892d045b33db3b32e6924cba830a724eed443f7e1"
)
OVMF_TD_HOB = {
    2 << 30: (
        "0b8772e5b0b41b83e6044a68397e02f49fb47066b4fbe491"
        "7ea2c45c64f323fdacbb37948f821ebaf8bc9c938ba8a749"
    ),
    # Also the TD HOB digest in the real dstack-0.6.0 log (tests/vectors, 16 GiB guest).
    16 << 30: (
        "cd2312a0d87ef3c4a928df87088969a80b33d7bf3fc584bd"
        "de637b09ed808a8d821a56b78a13a6eb506db7578444abbe"
    ),
}
# DigestInfo for SHA-256 inside SpcIndirectDataContent: AlgorithmIdentifier, NULL, OCTET STRING.
_SHA256_DIGEST_INFO = re.compile(
    re.escape(bytes.fromhex("060960864801650304020105000420")) + b"(.{32})",
    re.DOTALL,
)


def _ovmf() -> bytes:
    if not OVMF.exists():
        pytest.skip(f"{OVMF} is not installed (Debian package ovmf)")
    fw = OVMF.read_bytes()
    if hashlib.sha256(fw).hexdigest() != OVMF_SHA256:
        pytest.skip(f"{OVMF} is another build than the pinned 2022.11-6+deb12u2")
    return fw


def _signed_kernels() -> list[Path]:
    return sorted(Path("/boot").glob("vmlinuz-*"))


def test_debian_ovmf_has_tdx_metadata() -> None:
    """The real image parses: a measured BFV and the HOB and temporary-memory sections."""
    types = [s.sec_type for s in tdvf_sections(_ovmf())]
    assert 0 in types and 2 in types and 3 in types


def test_debian_ovmf_mrtd_matches_an_independent_implementation() -> None:
    assert mrtd(_ovmf(), two_pass_add_pages=True).hex() == OVMF_MRTD_TWO_PASS


@pytest.mark.parametrize("memory", sorted(OVMF_TD_HOB))
def test_debian_ovmf_td_hob_matches_an_independent_implementation(memory: int) -> None:
    assert td_hob_digest(_ovmf(), memory).hex() == OVMF_TD_HOB[memory]


@pytest.mark.parametrize("path", _signed_kernels(), ids=lambda p: p.name)
def test_debian_kernel_signature_digest_is_our_authenticode_walk(path: Path) -> None:
    """Debian's signature over the kernel names the digest our walk computes (SHA-256)."""
    image = path.read_bytes()
    lfanew = struct.unpack_from("<I", image, 0x3C)[0]
    cert_at, cert_size = struct.unpack_from("<II", image, lfanew + 24 + 112 + 4 * 8)
    found = _SHA256_DIGEST_INFO.search(image[cert_at : cert_at + cert_size]) if cert_at else None
    if found is None:
        pytest.skip(f"{path} carries no SHA-256 Authenticode signature")
    assert authenticode_digest(image, "sha256") == found.group(1)


def _throwaway_signer(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pydstack test")])
    start = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.mark.skipif(shutil.which("osslsigncode") is None, reason="osslsigncode not installed")
@pytest.mark.parametrize("path", _signed_kernels()[:1], ids=lambda p: p.name)
def test_patched_kernel_sha384_matches_osslsigncode(path: Path, tmp_path: Path) -> None:
    """osslsigncode's SHA-384 Authenticode digest of the QEMU-patched kernel is ours."""
    patched = patch_kernel(path.read_bytes(), 0x2000000, 2 << 30, 0x28000)
    (tmp_path / "in.efi").write_bytes(patched)
    cert, key = _throwaway_signer(tmp_path)
    sign = ["osslsigncode", "sign", "-certs", str(cert), "-key", str(key), "-h", "sha384"]
    sign += ["-in", str(tmp_path / "in.efi"), "-out", str(tmp_path / "out.efi")]
    subprocess.run(sign, check=True, capture_output=True, timeout=120)
    verify = ["osslsigncode", "verify", "-in", str(tmp_path / "out.efi")]
    out = subprocess.run(verify, capture_output=True, text=True, timeout=120).stdout
    found = re.search(r"Calculated message digest\s*:\s*([0-9A-Fa-f]{96})", out)
    assert found, out
    assert authenticode_digest(patched).hex() == found.group(1).lower()
