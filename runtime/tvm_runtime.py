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
            fd, tmp = tempfile.mkstemp(prefix="libtvm_runtime-", suffix=".so")
            with os.fdopen(fd, "wb") as f:
                f.write(bundled)
            try:
                ctypes.CDLL(tmp, ctypes.RTLD_GLOBAL)
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
    return tvm_ffi.load_module(str(lib_path))


# Function pointers a TVM-built library leaves to its loader (TVM's codegen; tvm-ffi's "context symbols"): each
# variable __NAME points at the runtime's exported NAME.
CONTEXT_SYMBOLS = ("__TVMBackendAllocWorkspace", "__TVMBackendFreeWorkspace", "__TVMBackendParallelLaunch",
                   "__TVMBackendParallelBarrier", "__TVMFFIFunctionCall", "__TVMFFIErrorSetRaisedFromCStr",
                   "__TVMFFIHandleInitOnce", "__TVMFFIEnvModLookupFromImports")


class NativeLibrary:
    """A TVM-built library opened with dlopen, its functions as tvm-ffi functions that keep it loaded; it is
    dlclose'd when the last of them is gone (tvm-ffi's own loader never unloads a library)."""

    def __init__(self, lib_path: str | os.PathLike, bundled_runtime: bytes | None = None):
        tvm_ffi = _import_tvm_ffi()
        _load_runtime(bundled_runtime)
        enable_amx()
        ctypes.CDLL(str(tvm_ffi.libinfo.find_libtvm_ffi()), os.RTLD_NOW | os.RTLD_GLOBAL)  # the error setter
        self._dll = ctypes.CDLL(str(lib_path), os.RTLD_NOW | os.RTLD_LOCAL)
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
