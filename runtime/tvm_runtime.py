"""Load a compiled Relax VM library with the TVM *runtime* only: tvm-ffi + libtvm_runtime.so.

`import tvm` drags in the 240 MB compiler; a device needs neither it nor torch. We load
libtvm_runtime.so (3 MB) from, in this order: the path in BITRL_TVM_RUNTIME; the `apache-tvm` wheel
if installed (found without importing `tvm`); the copy bundled in the artifact
(`bitrl-compile --bundle-runtime`), so that a device needs only `pip install apache-tvm-ffi numpy`.
Then tvm-ffi opens the exported library.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
import tempfile
from _ctypes import dlclose as _dlclose
from pathlib import Path

_RUNTIME_LOADED = False


class LibraryLoadError(OSError):
    """The dynamic loader refused a library (another machine's, or not a library); `reason` is its short word."""

    def __init__(self, member: str, lib_path, error: BaseException):
        text = " ".join(str(error).split())
        # the loader's message names the temporary file the library was written to: keep what it said about it
        reason = (text.rsplit(f"{lib_path}: ", 1)[-1] if lib_path else text)[:200] or type(error).__name__
        machine, here = _elf_machine(lib_path), os.uname().machine
        if machine and machine != here:  # glibc then says "No such file or directory", which misleads
            reason = f"a library for {machine}, and this machine is {here}"
        self.member, self.reason = member, reason
        super().__init__(f"{member} cannot be loaded ({reason})")


_ELF_MACHINES = {3: "i386", 40: "arm", 62: "x86_64", 183: "aarch64", 243: "riscv"}


def _elf_machine(lib_path) -> str | None:
    """The architecture an ELF file is for ("aarch64", ...), None if it is no ELF or unknown."""
    try:
        with open(lib_path, "rb") as f:
            head = f.read(20)
    except OSError:
        return None
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    machine = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    return _ELF_MACHINES.get(machine, f"ELF machine {machine}")


def check_elf(member: str, data: bytes) -> None:
    """LibraryLoadError unless `data` is a 64-bit little-endian ELF for this machine whose program headers and
    segments lie inside it: the dynamic loader maps a truncated library past its end, and touching that is SIGBUS."""
    here = os.uname().machine
    if len(data) < 64 or data[:4] != b"\x7fELF":
        raise LibraryLoadError(member, "", OSError("not an ELF library"))
    machine = _ELF_MACHINES.get(int.from_bytes(data[18:20], "little"))
    if data[4] != 2 or data[5] != 1 or machine != here:
        raise LibraryLoadError(member, "", OSError(f"a library for {machine or 'another machine'}, and this machine "
                                                   f"is {here}"))
    phoff, phentsize, phnum = (int.from_bytes(data[32:40], "little"), int.from_bytes(data[54:56], "little"),
                               int.from_bytes(data[56:58], "little"))
    if phentsize < 56 or phoff + phnum * phentsize > len(data):
        raise LibraryLoadError(member, "", OSError("truncated or corrupt ELF program headers"))
    for i in range(phnum):
        ph = phoff + i * phentsize
        offset, size = int.from_bytes(data[ph + 8:ph + 16], "little"), int.from_bytes(data[ph + 32:ph + 40], "little")
        if int.from_bytes(data[ph:ph + 4], "little") != 0 and offset + size > len(data):
            raise LibraryLoadError(member, "", OSError("truncated: a segment ends past the file"))


def _dlopen(member: str, lib_path, mode: int) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(str(lib_path), mode)
    except OSError as e:
        raise LibraryLoadError(member, lib_path, e) from None
_AMX: bool | None = None
ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA, SYS_ARCH_PRCTL = 0x1023, 18, 158  # Linux x86-64 (>= 5.16)


def cpu_flags() -> set[str]:
    """This CPU's feature flags from /proc/cpuinfo ("flags" on x86, "Features" on ARM); empty if unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return flags


def enable_amx() -> bool:
    """Ask Linux once per process for the AMX tile state, which kernels with AMX tile products (the
    `amx` BitLinear kernel at batch >= 16) need: without it their first tile instruction faults.
    Returns whether AMX is usable; False (and nothing done) on CPUs without AMX."""
    global _AMX
    if _AMX is None:
        _AMX = False
        if "amx_tile" in cpu_flags():
            libc = ctypes.CDLL(None, use_errno=True)
            _AMX = libc.syscall(ctypes.c_long(SYS_ARCH_PRCTL), ctypes.c_long(ARCH_REQ_XCOMP_PERM),
                                ctypes.c_ulong(XFEATURE_XTILEDATA)) == 0
    return _AMX


def _import_tvm_ffi():
    """Import tvm_ffi without letting it import torch (it tries to, for DLPack interop)."""
    if "tvm_ffi" in sys.modules:
        return sys.modules["tvm_ffi"]
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tvm_ffi tolerates
    try:
        import tvm_ffi
    except ImportError as e:
        raise RuntimeError(f"the TVM runtime is not installed ({e}); run `pip install apache-tvm-ffi numpy`") from None
    finally:
        if blocked:
            del sys.modules["torch"]
    return tvm_ffi


def find_libtvm_runtime() -> Path | None:
    """The TVM runtime library of this machine: BITRL_TVM_RUNTIME, else the apache-tvm wheel's, else None."""
    env = os.environ.get("BITRL_TVM_RUNTIME")
    if env:
        if not Path(env).is_file():
            raise RuntimeError(f"BITRL_TVM_RUNTIME={env} is not a file; point it at libtvm_runtime.so or unset it")
        return Path(env)
    spec = importlib.util.find_spec("tvm")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            for candidate in (Path(folder) / "lib" / "libtvm_runtime.so", Path(folder) / "libtvm_runtime.so"):
                if candidate.is_file():
                    return candidate
    return None


def _load_runtime(bundled: bytes | None) -> None:
    global _RUNTIME_LOADED
    if _RUNTIME_LOADED:
        return
    tvm_ffi = _import_tvm_ffi()
    # In a process that imported `tvm` (the compiler, which contains the runtime) the VM is
    # already registered; loading a second copy of the runtime would corrupt its registries.
    if tvm_ffi.get_global_func("vm.builtin.alloc_storage", allow_missing=True) is None:
        path = find_libtvm_runtime()
        if path is None and bundled is None:
            raise RuntimeError("libtvm_runtime.so not found; `pip install apache-tvm`, set BITRL_TVM_RUNTIME, "
                               "or compile the artifact with --bundle-runtime")
        if path is None:
            check_elf("libtvm_runtime.so", bundled)
            fd, tmp = tempfile.mkstemp(prefix="libtvm_runtime-", suffix=".so")
            with os.fdopen(fd, "wb") as f:
                f.write(bundled)
            try:
                _dlopen("libtvm_runtime.so", tmp, ctypes.RTLD_GLOBAL)
            finally:
                os.unlink(tmp)  # stays mapped
        else:
            ctypes.CDLL(str(path), ctypes.RTLD_GLOBAL)
    _RUNTIME_LOADED = True


def load_module(lib_path: str | os.PathLike, bundled_runtime: bytes | None = None):
    """Open any exported TVM library (e.g. kernels alone) with the runtime only: a tvm-ffi module."""
    tvm_ffi = _import_tvm_ffi()
    _load_runtime(bundled_runtime)
    enable_amx()
    try:
        return tvm_ffi.load_module(str(lib_path))
    except RuntimeError as e:
        if "Failed to load dynamic shared library" not in str(e):
            raise
        raise LibraryLoadError("lib.so", lib_path, e) from None


# Function pointers a TVM-built library leaves to its loader (TVM's codegen; tvm-ffi's "context symbols"): each
# variable __NAME points at the runtime's exported NAME.
CONTEXT_SYMBOLS = ("__TVMBackendAllocWorkspace", "__TVMBackendFreeWorkspace", "__TVMBackendParallelLaunch",
                   "__TVMBackendParallelBarrier", "__TVMFFIFunctionCall", "__TVMFFIErrorSetRaisedFromCStr",
                   "__TVMFFIHandleInitOnce", "__TVMFFIEnvModLookupFromImports")


class NativeLibrary:
    """A TVM-built library opened with dlopen, its functions as tvm-ffi functions that keep it loaded; it is
    dlclose'd when the last of them is gone (tvm-ffi's own loader never unloads a library)."""

    def __init__(self, lib_path: str | os.PathLike, bundled_runtime: bytes | None = None):
        self._handle = None
        tvm_ffi = _import_tvm_ffi()
        _load_runtime(bundled_runtime)
        enable_amx()
        ctypes.CDLL(str(tvm_ffi.libinfo.find_libtvm_ffi()), os.RTLD_NOW | os.RTLD_GLOBAL)  # the error setter
        self._dll = _dlopen("lib.so", lib_path, os.RTLD_NOW | os.RTLD_LOCAL)
        self._handle = self._dll._handle
        process = ctypes.CDLL(None)
        try:
            ctypes.c_void_p.in_dll(self._dll, "__tvm_ffi__library_ctx")
        except ValueError:
            pass
        else:  # it calls functions of other modules through its loader: only tvm-ffi's loader can serve it
            self.close()
            raise RuntimeError("the compiled library calls functions of other modules; open it with load_module")
        for name in CONTEXT_SYMBOLS:
            try:
                slot = ctypes.c_void_p.in_dll(self._dll, name)
            except ValueError:  # the library does not use it
                continue
            try:
                slot.value = ctypes.cast(getattr(process, name[2:]), ctypes.c_void_p).value
            except AttributeError:
                self.close()
                raise RuntimeError(f"the compiled library needs {name[2:]}, which this TVM runtime lacks") from None

    def function(self, name: str):
        """The library's function `name` (its symbol __tvm_ffi_<name>); KeyError if it has none."""
        try:
            address = ctypes.cast(getattr(self._dll, f"__tvm_ffi_{name}"), ctypes.c_void_p).value
        except AttributeError:
            raise KeyError(name) from None
        return _import_tvm_ffi().Function.__from_extern_c__(address, keep_alive_object=self)

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            _dlclose(handle)

    def __del__(self):
        self.close()


def new_vm(module):
    """An initialised Relax VM over a module `load_module` opened (call vm["main"](...)); one per thread."""
    vm = module["vm_load_executable"]()
    vm["vm_initialization"](1, 0, 2)  # device type kDLCPU, device id 0, pooled allocator
    return vm


ALIGNMENT = 64  # TVM kernels assume 64-byte aligned buffers (aligned vector loads)


def aligned(array, dtype=None):
    """A C-contiguous, 64-byte aligned copy of `array` (or `array` itself if it already is one)."""
    import numpy as np

    array = np.asarray(array, dtype=dtype)
    if array.flags.c_contiguous and array.ctypes.data % ALIGNMENT == 0:
        return array
    raw = np.empty(array.nbytes + ALIGNMENT, np.uint8)
    offset = -raw.ctypes.data % ALIGNMENT
    out = raw[offset:offset + array.nbytes].view(array.dtype).reshape(array.shape)
    out[...] = array
    return out


def to_device(array):
    """An aligned contiguous numpy array as a tvm-ffi tensor (zero copy; keep the array alive).

    Misaligned memory would crash inside a kernel, so it is refused here with a ValueError.
    """
    return _import_tvm_ffi().from_dlpack(array, require_alignment=ALIGNMENT, require_contiguous=True)
