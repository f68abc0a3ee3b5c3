"""Synthetic inputs built from the documented layouts, independent of the code under test.

A TDVF image (OVMF GUIDed table + TDX metadata, TDVF spec 1.0 section 11), a PE32+ image
(PE/COFF spec) with a bzImage-like setup header, and an ACPI tables blob shaped like QEMU's q35
output. Each also has a plain reference computation, written here without the module's
helpers, for the tests to compare against.
"""

from __future__ import annotations

import hashlib
import struct
import uuid

FOOTER_GUID = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d").bytes_le
TDX_OFFSET_GUID = uuid.UUID("e47a6535-984a-4798-865e-4685a7bf8ec2").bytes_le
OTHER_GUID = uuid.UUID("00f771de-1a7e-4fcb-890e-68c77e2fb44e").bytes_le  # OVMF's SEV entry

# (data_offset, raw_size, address, memory_size, type, attributes)
Section = tuple[int, int, int, int, int, int]


def pattern(n: int, seed: bytes) -> bytes:
    out = b""
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(seed + counter.to_bytes(4, "little")).digest()
        counter += 1
    return out[:n]


def tdvf_image(sections: list[Section], size: int = 0x10000, metadata_at: int = 0x8000) -> bytes:
    """An image whose tail is OVMF's GUIDed table pointing at TDVF metadata at ``metadata_at``."""
    fw = bytearray(pattern(size, b"fw"))
    desc = b"TDVF" + struct.pack("<III", 16 + 32 * len(sections), 1, len(sections))
    for s in sections:
        desc += struct.pack("<IIQQII", *s)
    fw[metadata_at : metadata_at + len(desc)] = desc
    # Entries are data, u16 length (data + 18), GUID; the footer's length covers them all
    # and itself, as OVMF's ResetVector lays it out.
    tdx_entry = struct.pack("<I", size - metadata_at) + struct.pack("<H", 4 + 18) + TDX_OFFSET_GUID
    other_entry = bytes(8) + struct.pack("<H", 8 + 18) + OTHER_GUID
    table = tdx_entry + other_entry
    footer = struct.pack("<H", len(table) + 18) + FOOTER_GUID
    tail = table + footer + bytes(32)
    fw[size - len(tail) :] = tail
    return bytes(fw)


def reference_mrtd(fw: bytes, sections: list[Section], two_pass: bool) -> bytes:
    """The TDX module's MRTD accumulation, written out plainly."""
    stream = []
    for off, _raw, addr, mem, _typ, attrs in sections:
        adds = []
        extends = []
        for p in range(mem // 4096):
            gpa = addr + p * 4096
            adds.append(struct.pack("<12s4xQ104x", b"MEM.PAGE.ADD", gpa) if not attrs & 2 else b"")
            chunks = b""
            if attrs & 1:
                for c in range(16):
                    chunks += struct.pack("<9s7xQ104x", b"MR.EXTEND", gpa + c * 256)
                    start = off + p * 4096 + c * 256
                    chunks += fw[start : start + 256]
            extends.append(chunks)
        if two_pass:
            stream += adds + extends
        else:
            for a, e in zip(adds, extends, strict=True):
                stream += [a, e]
    return hashlib.sha384(b"".join(stream)).digest()


def pe_image(
    sections: list[tuple[bytes, int]],
    *,
    protocol: int = 0x20F,
    loadflags: int = 0x01,
    xloadflags: int = 0x7F,
    cert: bytes = b"",
    trailer: bytes = b"",
    headers_size: int = 0x400,
) -> bytes:
    """A PE32+ image with a Linux setup header; ``sections`` are (raw data, file offset)."""
    # As in a real bzImage: the PE headers sit between the MZ header and the setup header
    # (0x1f1..0x268), and SizeOfHeaders covers both, so QEMU's patching changes the hash.
    lfanew = 0x40
    assert len(sections) <= 4, "more section headers would run into the setup header"
    img = bytearray(pattern(headers_size, b"hdr"))
    img[0:2] = b"MZ"
    struct.pack_into("<I", img, 0x3C, lfanew)
    # bzImage setup header fields the QEMU loader reads.
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", img, 0x206, protocol)
    img[0x210] = 0
    img[0x211] = loadflags
    struct.pack_into("<I", img, 0x22C, 0x7FFFFFFF)
    struct.pack_into("<H", img, 0x236, xloadflags)
    opt_size = 112 + 16 * 8
    struct.pack_into(
        "<4sHHIIIHH", img, lfanew, b"PE\0\0", 0x8664, len(sections), 0, 0, 0, opt_size, 0x22
    )
    opt = lfanew + 24
    struct.pack_into("<H", img, opt, 0x20B)
    struct.pack_into("<II", img, opt + 32, 0x1000, 0x200)  # section / file alignment
    struct.pack_into("<I", img, opt + 60, headers_size)
    struct.pack_into("<I", img, opt + 64, 0xDEADBEEF)  # checksum: excluded from the hash
    struct.pack_into("<I", img, opt + 108, 16)  # NumberOfRvaAndSizes
    body_end = max((o + len(d) for d, o in sections), default=headers_size)
    table = opt + opt_size
    for i, (data, off) in enumerate(sections):
        struct.pack_into("<8sIIIIIIHHI", img, table + 40 * i, f".s{i}".encode(), len(data),
                         0x1000 * (i + 1), len(data), off, 0, 0, 0, 0, 0x60000020)  # fmt: skip
    out = bytearray(img) + bytes(max(0, body_end - headers_size))
    for data, off in sections:
        out[off : off + len(data)] = data
    out += trailer
    if cert:
        struct.pack_into("<II", out, opt + 112 + 4 * 8, len(out), len(cert))
        out += cert
    return bytes(out)


def reference_authenticode(img: bytes, name: str = "sha384") -> bytes:
    """Authenticode as dstack-mr hashes it, for images whose sections fit in the file."""
    lfanew = struct.unpack_from("<I", img, 0x3C)[0]
    opt = lfanew + 24
    checksum = opt + 64
    certdir = opt + 112 + 4 * 8
    headers = struct.unpack_from("<I", img, opt + 60)[0]
    h = hashlib.new(name)
    h.update(img[:checksum] + img[checksum + 4 : certdir] + img[certdir + 8 : headers])
    nsec = struct.unpack_from("<H", img, lfanew + 6)[0]
    opt_size = struct.unpack_from("<H", img, lfanew + 20)[0]
    secs = []
    for i in range(nsec):
        size, ptr = struct.unpack_from("<II", img, opt + opt_size + 40 * i + 16)
        if size:
            secs.append((ptr, size))
    total = headers
    for ptr, size in sorted(secs):
        h.update(img[ptr : ptr + size])
        total += size
    cert_at, cert_size = struct.unpack_from("<II", img, certdir)
    if cert_at and cert_size:
        h.update(img[total : len(img) - cert_size])
    h.update(bytes(-len(img) % 8))
    return h.digest()


def acpi_blob(layout: list[tuple[bytes, int]], size: int = 0x20000) -> bytes:
    """Tables with these (signature, length), back to back, zero padded like QEMU's blob."""
    out = b""
    for sig, length in layout:
        out += sig + struct.pack("<I", length) + pattern(length - 8, sig)
    return out.ljust(size, b"\0")


# The table layout of a real QEMU q35 TDX guest's etc/acpi/tables (1 vCPU, one NIC), as
# published in quex-tech/td-report-web (src/acpi/1c-1g-nic.bin): the set dstack expects.
Q35_LAYOUT = [
    (b"FACS", 64),
    (b"DSDT", 7508),
    (b"FACP", 244),
    (b"APIC", 230),
    (b"MCFG", 60),
    (b"WAET", 40),
    (b"RSDT", 52),
]
