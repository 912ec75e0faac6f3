"""libbitrl, the C API of a policy.bitrl (runtime/capi/bitrl.h), built for a target on first use.

    cflags, libs = capi_flags("rasp4")      # ["-I.../include"], ["-L...", "-lbitrl", "-Wl,-rpath,...", ...]
    subprocess.run(["aarch64-linux-gnu-gcc", "app.c", "-o", "app", *cflags, *libs])
    run_under_qemu(["./app", "policy.bitrl"], cpu="cortex-a72", input="0.1 0.2 0.3 0.4\\n")

The library is C11 and links only libc, libdl, libm, libpthread and zlib: no TVM, no Python. Signatures are
checked with OpenSSL's libcrypto, opened with dlopen only when trusted keys are configured (runtime/capi/trust.c). It is built
once per target architecture and version of its sources and compiler, under

    $BITRL_CACHE/capi/{arch}-{hash}/
        include/bitrl.h     the public header
        libbitrl.so         the library

into a temporary folder renamed into place, so a killed build never leaves half a library. The host build
uses `cc`; the aarch64 build (rasp4, rasp5) uses `aarch64-linux-gnu-gcc` and links the aarch64 zlib of the
emulator's Debian sysroot (devices/sysroot.py), the one a Raspberry Pi OS has. tvm-ffi's headers are used at
compile time only, for the layouts of DLTensor and TVMFFIAny.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bitrl_compile import runtime
from bitrl_compile.devices.sysroot import (
    DEFAULT_CPU,
    cache_root,
    cpu_root,
    ensure_aarch64_python,
    qemu_binary,
)
from bitrl_compile.runtime.policy import host_arch

SOURCES = ("bitrl.c", "json.c", "manifest.c", "params.c", "sha256.c", "trust.c", "zip.c")
HEADERS = ("bitrl.h", "internal.h")
# The targets the C API is built for, by architecture (a Raspberry Pi's kernels are aarch64 code).
TARGET_ARCH = {"host": None, "rasp4": "aarch64", "rasp5": "aarch64",
               "x86-avx2": "x86_64", "x86-avx512": "x86_64", "x86-amx": "x86_64"}
CROSS_CC = {"aarch64": "aarch64-linux-gnu-gcc", "x86_64": "x86_64-linux-gnu-gcc"}
ARCH_FLAGS = {"aarch64": ["-march=armv8-a"], "x86_64": []}  # armv8-a: a Cortex-A72 (no LSE, no dotprod) runs it
CFLAGS = ["-std=c11", "-O2", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra"]
LDLIBS = ["-ldl", "-lpthread", "-Wl,--no-as-needed", "-lm"]  # libm: the kernels (lib.so) call expf & co


class CapiError(RuntimeError):
    """libbitrl cannot be built for a target; the message names what to install or change."""


def source_dir() -> Path:
    """Where the C sources are: bitrl_compile/runtime/capi (package data of the runtime)."""
    return Path(runtime.__file__).parent / "capi"


def target_arch(target: str) -> str:
    if target not in TARGET_ARCH:
        raise ValueError(f"unknown target {target!r} for the C API; choose one of {', '.join(TARGET_ARCH)}")
    return TARGET_ARCH[target] or host_arch()


def compiler(arch: str) -> str:
    """The C compiler that builds for `arch` here: `cc` natively, the cross compiler otherwise."""
    name = "cc" if arch == host_arch() else CROSS_CC.get(arch)
    path = shutil.which(name) if name else None
    if path is None:
        fix = ("`apt-get install gcc-aarch64-linux-gnu`" if arch == "aarch64" else "`apt-get install gcc`")
        raise CapiError(f"no C compiler for {arch} ({name or 'none known'} not found); install one with {fix}")
    return path


def tvm_ffi_include() -> Path:
    """tvm-ffi's headers (tvm/ffi/c_api.h, dlpack/dlpack.h), found without importing tvm_ffi."""
    spec = importlib.util.find_spec("tvm_ffi")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / "include" / "tvm" / "ffi" / "c_api.h").is_file():
            return Path(folder) / "include"
    raise CapiError("tvm-ffi's C headers are not installed (building libbitrl needs them); "
                    "run `pip install apache-tvm-ffi==0.1.14.post1`")


def _zlib(arch: str) -> list[str]:
    """What links zlib for `arch`: -lz natively; for aarch64 the sysroot's libz.so.1 itself (it has no libz.so)."""
    if arch == host_arch():
        return ["-lz"]
    if arch != "aarch64":
        raise CapiError(f"cross builds of the C API are for aarch64 only, not {arch}")
    libdir = ensure_aarch64_python().sysroot / "lib" / "aarch64-linux-gnu"
    libz = libdir / "libz.so.1"
    if not libz.exists():
        raise CapiError(f"the aarch64 zlib is missing from {libdir}; rebuild the emulator's sysroot "
                        "(`bitrl-compile emulator setup`)")
    return [str(libz), f"-Wl,-rpath-link,{libdir}"]


def _digest(cc: str, arch: str) -> str:
    h = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        h.update(name.encode() + b"\0" + (source_dir() / name).read_bytes())
    h.update((tvm_ffi_include() / "tvm" / "ffi" / "c_api.h").read_bytes())
    h.update((tvm_ffi_include() / "dlpack" / "dlpack.h").read_bytes())
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    h.update(f"{cc}\0{version}\0{CFLAGS}\0{ARCH_FLAGS[arch]}\0{LDLIBS}".encode())
    return h.hexdigest()[:16]


def build(target: str = "host") -> Path:
    """The folder holding include/bitrl.h and libbitrl.so for `target`, built on first use (about 2 s)."""
    arch = target_arch(target)
    cc = compiler(arch)
    final = cache_root() / "capi" / f"{arch}-{_digest(cc, arch)}"
    if (final / "libbitrl.so").is_file():
        return final
    zlib = _zlib(arch)
    final.parent.mkdir(parents=True, exist_ok=True)
    print(f"bitrl-compile: building libbitrl for {arch} in {final}", file=sys.stderr, flush=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.build-", dir=final.parent))
    try:
        (work / "include").mkdir()
        shutil.copy2(source_dir() / "bitrl.h", work / "include" / "bitrl.h")
        cmd = [cc, *CFLAGS, *ARCH_FLAGS[arch], "-shared", f"-I{tvm_ffi_include()}", "-Wl,-soname,libbitrl.so",
               *(str(source_dir() / s) for s in SOURCES), "-o", str(work / "libbitrl.so"), *zlib,
               *LDLIBS]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            raise CapiError(f"building libbitrl for {arch} failed: {lines[0] if lines else 'no message'} "
                            f"(command: {' '.join(cmd)})")
        os.chmod(work, 0o755)
        try:
            os.rename(work, final)
        except OSError:  # another process put the same build in place first
            if not (final / "libbitrl.so").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def capi_flags(target: str = "host") -> tuple[list[str], list[str]]:
    """(compiler flags, linker flags) for an application of `target` that uses bitrl.h, like pkg-config's
    --cflags and --libs; builds the library first if needed."""
    arch = target_arch(target)
    folder = build(target)
    libs = [f"-L{folder}", "-lbitrl", f"-Wl,-rpath,{folder}"]
    if arch != host_arch():
        libs.append(f"-Wl,-rpath-link,{ensure_aarch64_python().sysroot / 'lib' / 'aarch64-linux-gnu'}")
    return [f"-I{folder / 'include'}"], libs


def qemu_command(argv: list[str], cpu: str = DEFAULT_CPU) -> list[str]:
    """`qemu-aarch64 -cpu CPU -L ROOT argv...`: an aarch64 program (e.g. one linked with capi_flags("rasp4"))
    run here, with the emulator's Debian sysroot as its libraries and a /proc/cpuinfo of `cpu`."""
    return [qemu_binary(), "-cpu", cpu, "-L", str(cpu_root(ensure_aarch64_python(), cpu)), *argv]


def run_under_qemu(argv: list[str], cpu: str = DEFAULT_CPU, input: str | None = None, timeout: float = 300.0,
                   cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """Run an aarch64 program under qemu for `cpu` (qemu_command), output captured as text."""
    return subprocess.run(qemu_command(argv, cpu), input=input, capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, check=False)
