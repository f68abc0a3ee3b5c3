"""What this host offers CVMs: the facts ``platform.choose_platform`` decides from.

``resolve_platform("auto")`` reads ``/sys/module/kvm_intel/parameters/tdx``, runs
``qemu-system-x86_64 -version`` and ``-object help`` (~30 ms), and, only when the answer depends
on it, boots a probe guest under KVM (bounded by ``KVM_PROBE_TIMEOUT_S``). The result is cached
for the life of the process (one ``up`` = one host run)::

    choice = resolve_platform("auto")   # PlatformChoice(platform="tcg", reason="auto: no TDX ...")

The probe guest is a 64 KiB firmware image (``probe_firmware``) that goes from the reset
vector through protected mode into 64-bit long mode (identity-mapped with 2 MiB pages built
in RAM), writes ``OK`` to COM1 and exits QEMU through ``isa-debug-exit`` (exit status 151).
It runs with the accelerator, CPU model and machine of the real KVM command line
(``argv.accel_args("kvm")``): on these machines ``-cpu host`` aborts in QEMU's KVM MSR setup,
so the probe fails there in ~50 ms. A probe that boots is necessary, not sufficient: with
``-cpu qemu64`` this firmware reaches long mode under KVM here while a Linux guest hangs, which
is why the probe uses exactly the real guests' CPU model.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Final

from .argv import accel_args
from .platform import (
    TDX_PARAM,
    HostFacts,
    KvmProbe,
    PlatformChoice,
    Wanted,
    choose_platform,
    needs_kvm_probe,
)

KVM_PROBE_TIMEOUT_S: Final = 5.0
QEMU_TIMEOUT_S: Final = 10.0
_DEBUG_EXIT_OK: Final = (ord("K") << 1) | 1  # isa-debug-exit: status (value << 1) | 1

# The probe firmware's code, assembled from this GNU as source (as --64; ld -Ttext=0
# --oformat=binary) and placed at the start of the ROM (mapped at 0xFFFF0000):
#         .set BASE, 0xFFFF0000
#         .code16
# start16: cli; lgdtl %cs:gdt_desc; movl %cr0,%eax; orl $1,%eax; movl %eax,%cr0
#         ljmpl $0x08, $(BASE + pm32)
#         .code32
# pm32:   movw $0x10,%ax; movw %ax,%ds; movw %ax,%es; movw %ax,%ss
#         movl $0x2003,0x1000                   # PML4[0] -> PDPT at 0x2000
#         movl $0x3003,0x2000; movl $0x4003,0x2008; movl $0x5003,0x2010; movl $0x6003,0x2018
#         xorl %ecx,%ecx                        # 4 page directories, 2048 x 2 MiB: 4 GiB
# 1:      movl %ecx,%eax; shll $21,%eax; orl $0x83,%eax; movl %eax,0x3000(,%ecx,8)
#         incl %ecx; cmpl $2048,%ecx; jne 1b
#         movl $0x1000,%eax; movl %eax,%cr3     # PAE, EFER.LME, paging: long mode
#         movl %cr4,%eax; orl $0x20,%eax; movl %eax,%cr4
#         movl $0xC0000080,%ecx; rdmsr; orl $0x100,%eax; wrmsr
#         movl %cr0,%eax; orl $0x80000000,%eax; movl %eax,%cr0
#         ljmp $0x18, $(BASE + lm64)
#         .code64
# lm64:   movw $0x3f8,%dx; movb $'O',%al; outb %al,%dx; movb $'K',%al; outb %al,%dx
#         outb %al,$0xf4                        # isa-debug-exit
# 2:      hlt; jmp 2b
#         .p2align 3                            # GDT: null, code32, data, code64 (accessed
# gdt:    .quad 0, 0x00CF9B000000FFFF, 0x00CF93000000FFFF, 0x00AF9B000000FFFF  # bits preset)
# gdt_desc: .word 31; .long BASE + gdt
# and at 0xFFF0 (the reset vector): ljmp $0xF000, $start16
_CODE: Final = bytes.fromhex(
    "fa2e660f0116d8000f20c06683c8010f22c066ea1a00ffff080066b810008ed88ec08ed0c70500100000"
    "03200000c7050020000003300000c7050820000003400000c7051020000003500000c705182000000360"
    "000031c989c8c1e0150d830000008904cd003000004181f90008000075e6b8001000000f22d80f20e083"
    "c8200f22e0b9800000c00f320d000100000f300f20c00d000000800f22c0eaa300ffff180066baf803b0"
    "4feeb04beee6f4f4ebfd8db4000066900000000000000000ffff0000009bcf00ffff00000093cf00ffff"
    "0000009baf001f00b800ffff"
)
_RESET: Final = bytes.fromhex("ea0000" + "00f0")  # ljmp $0xF000, $0x0000


def probe_firmware() -> bytes:
    """The probe guest's 64 KiB BIOS image (QEMU wants a multiple of 64 KiB)."""
    rom = bytearray(65536)
    rom[: len(_CODE)] = _CODE
    rom[0xFFF0 : 0xFFF0 + len(_RESET)] = _RESET
    return bytes(rom)


def read_tdx_param(path: str = TDX_PARAM) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def qemu_facts(qemu: str = "qemu-system-x86_64") -> tuple[frozenset[str] | None, str, str]:
    """``(objects, version, error)``: the ``-object help`` list (None when QEMU did not run)."""
    try:
        ver = subprocess.run([qemu, "-version"], capture_output=True, text=True,
                             timeout=QEMU_TIMEOUT_S, check=False)  # fmt: skip
        out = subprocess.run([qemu, "-object", "help"], capture_output=True, text=True,
                             timeout=QEMU_TIMEOUT_S, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, "", f"{qemu}: {e}"
    if out.returncode != 0:
        return None, "", f"{qemu} -object help: {_first_line(out.stderr) or out.returncode}"
    m = re.search(r"version (\d+\.\d+(?:\.\d+)?)", ver.stdout)
    lines = out.stdout.splitlines()[1:]  # "List of user creatable objects:"
    return frozenset(x.strip() for x in lines if x.strip()), m.group(1) if m else "", ""


def kvm_probe(
    qemu: str = "qemu-system-x86_64",
    *,
    timeout_s: float = KVM_PROBE_TIMEOUT_S,
    platform: str = "kvm",
    device: str = "/dev/kvm",
) -> KvmProbe:
    """Boot the probe firmware with the real guests' accelerator, CPU and machine; bounded.

    ``platform="tcg"`` runs the same guest under TCG (how the tests show the firmware works)."""
    if platform == "kvm":
        try:
            os.close(os.open(device, os.O_RDWR | os.O_CLOEXEC))
        except OSError as e:
            return KvmProbe(ok=False, detail=f"{device}: {e.strerror or e}")
    with tempfile.TemporaryDirectory(prefix="pydstack-kvm-probe-") as d:
        rom, serial = Path(d) / "probe.rom", Path(d) / "serial.log"
        rom.write_bytes(probe_firmware())
        argv = [qemu, *accel_args("kvm" if platform == "kvm" else "tcg"), "-nodefaults",
                "-display", "none", "-no-reboot", "-m", "16M", "-bios", str(rom),
                "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                "-chardev", f"file,id=com0,path={serial}", "-serial", "chardev:com0"]  # fmt: skip
        t0 = time.monotonic()
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                               check=False, stdin=subprocess.DEVNULL)  # fmt: skip
        except subprocess.TimeoutExpired:
            return KvmProbe(ok=False, detail=f"no answer within {timeout_s:g} s (guest hangs)")
        except OSError as e:
            return KvmProbe(ok=False, detail=f"{qemu}: {e}")
        took = time.monotonic() - t0
        said = serial.read_bytes() if serial.exists() else b""
    if p.returncode == _DEBUG_EXIT_OK and said == b"OK":
        return KvmProbe(ok=True, detail=f"booted to long mode in {took:.2f} s")
    why = _error_line(p.stderr) or f"exit status {p.returncode}"
    how = "qemu aborted" if p.returncode in (-6, 134) else f"qemu exited ({p.returncode})"
    return KvmProbe(ok=False, detail=f"{how}: {why}")


def probe_host(wanted: Wanted, qemu: str = "qemu-system-x86_64") -> HostFacts:
    """The facts ``choose_platform(wanted, ...)`` needs (the KVM probe only when it matters)."""
    objects, version, error = qemu_facts(qemu)
    facts = HostFacts(tdx_param=read_tdx_param(), qemu_objects=objects, qemu_version=version,
                      qemu_error=error)  # fmt: skip
    if objects is not None and needs_kvm_probe(wanted, facts):
        facts = HostFacts(tdx_param=facts.tdx_param, qemu_objects=objects, qemu_version=version,
                          kvm=kvm_probe(qemu))  # fmt: skip
    return facts


@functools.cache
def resolve_platform(wanted: Wanted, qemu: str = "qemu-system-x86_64") -> PlatformChoice:
    """``choose_platform`` on this host's facts, once per process; raises ``PlatformRefused``."""
    return choose_platform(wanted, probe_host(wanted, qemu))


def _first_line(text: str) -> str:
    return next((x.strip() for x in text.splitlines() if x.strip()), "")


def _error_line(text: str) -> str:
    """QEMU's first error line (warnings about CPU features come before it)."""
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    err = [x for x in lines if "error" in x.lower() or "assert" in x.lower()]
    line = (err or lines or [""])[0]
    return line.removeprefix("qemu-system-x86_64: ")[:200]
