"""Run aarch64 (Raspberry Pi) artifacts on this x86 machine: a real aarch64 Python under qemu-user.

    with EmulatedPolicy("policy.bitrl") as policy:      # rasp4 artifact, qemu -cpu cortex-a72
        action = policy.act(obs)

The aarch64 Python is Debian's: its arm64 packages (python3.11-minimal and the libraries it
links) unpacked into a plain folder that qemu uses as the guest's root (`-L`), plus the aarch64
wheels of numpy and apache-tvm-ffi and the aarch64 `libtvm_runtime.so` (taken out of the
apache-tvm wheel; the compiler library is not needed). No chroot, no binfmt. It is built once,
on first use, under

    $BITRL_CACHE/aarch64-py311/        (BITRL_CACHE defaults to ~/.cache/bitrl-compile)
        sysroot/        the Debian arm64 packages, `dpkg -x`ed; sysroot/usr/bin/python3.11
        site/           the aarch64 wheels, unpacked
        tvm-runtime/    libtvm_runtime.so for aarch64
        runtime/HASH/   a copy of bitrl_compile.runtime for the guest, one per source version
        cpus/CPU/       the guest's `/` for one -cpu: the sysroot plus a /proc/cpuinfo of that CPU
        recipe.json     what was built; a different recipe rebuilds the folder

`python -m bitrl_compile.devices setup` builds it up front (for CI). The build needs
`dpkg`/`apt-get` with the arm64 architecture added (done here when running as root) and pip.
qemu enforces the ISA of the `-cpu` it is given: an instruction a Cortex-A72 lacks (sdot, LSE
atomics) kills the guest with SIGILL, as it would on a Raspberry Pi 4. An EmulatedPolicy starts in
about 3 s and then answers a call in about 1 ms; its timings are not the device's.

TVM's RPC server, what a Raspberry Pi runs for MetaSchedule autotuning
(`python3 -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090`), runs here the same way:

    with RPCServer("cortex-a72") as server:             # about 6 s to start
        remote = tvm.rpc.connect(server.host, server.port)

It needs the full `tvm` Python package in the guest: a second cache, built by `ensure_guest_tvm()`
(`setup --tvm`; about 20 s, 280 MB on disk), apart so that the aarch64 Python above is not rebuilt:

    $BITRL_CACHE/aarch64-tvm/
        site/           the aarch64 wheels of apache-tvm (the whole package) and of what it and
                        tvm.exec.rpc_server import that the aarch64 Python lacks
        recipe.json

`python -m bitrl_compile.devices rpc-server [--cpu CPU] [--port PORT]` runs one in the foreground.
"""

from __future__ import annotations

import compileall
import fcntl
import hashlib
import importlib.metadata
import json
import os
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import bitrl_compile
from bitrl_compile import runtime
from bitrl_compile.runtime import serve
from bitrl_compile.runtime.artifact import ArtifactError

PYTHON_VERSION = "3.11"
DEBIAN_PACKAGES = (  # python3.11 and every library it or its extension modules link, all :arm64
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
    "libc6", "zlib1g", "libexpat1", "libffi8", "libssl3", "libbz2-1.0", "liblzma5", "libgcc-s1",
    "libstdc++6", "libsqlite3-0", "libncursesw6", "libtinfo6", "libreadline8", "libuuid1", "libcrypt1",
    "libtirpc3", "libnsl2", "libdb5.3", "libgdbm6",
)
DEBIAN_PACKAGES_ALL = ("media-types",)  # Architecture: all, so no :arm64 suffix
TVM_FFI = "apache-tvm-ffi==0.1.14.post1"
TVM = "apache-tvm==0.27.0.post1"
LIBTVM_RUNTIME_MEMBER = "tvm/lib/libtvm_runtime.so"
WHEEL_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux2014_aarch64")
# The guest TVM (ensure_guest_tvm): apache-tvm needs ml_dtypes (numpy, apache-tvm-ffi and
# typing-extensions are in the aarch64 Python already); tvm.exec.rpc_server needs cloudpickle (its
# PopenWorker) and uses psutil to stop a timed-out session's children (TVM's "rpc" extra).
GUEST_TVM_WHEELS = ("ml_dtypes==0.6.0", "cloudpickle==3.1.1", "psutil==7.0.0")
QEMU = "qemu-aarch64"
DEFAULT_CPU = "cortex-a72"  # Raspberry Pi 4; "cortex-a76" is the Pi 5


class EmulatorError(RuntimeError):
    """The emulator cannot be set up or the emulated process failed; the message says what to run."""


@dataclass(frozen=True)
class Aarch64Python:
    """A ready aarch64 Python: run `python` under `qemu-aarch64 -L sysroot` with `site` on its path."""

    root: Path
    sysroot: Path
    site: Path
    libtvm_runtime: Path

    @property
    def python(self) -> Path:
        return self.sysroot / "usr" / "bin" / f"python{PYTHON_VERSION}"


def _log(message: str) -> None:
    print(f"bitrl-compile: {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    return Path(os.environ.get("BITRL_CACHE") or Path.home() / ".cache" / "bitrl-compile").expanduser().absolute()


def _recipe() -> dict:
    return {"recipe": 1, "python": PYTHON_VERSION, "debian": list(DEBIAN_PACKAGES + DEBIAN_PACKAGES_ALL),
            "wheels": _wheel_specs(), "tvm": TVM, "platforms": list(WHEEL_PLATFORMS)}


def _wheel_specs() -> list[str]:
    # The host's numpy version, so that emulated and native results compare like for like.
    return [f"numpy=={importlib.metadata.version('numpy')}", TVM_FFI, "typing-extensions>=4.13"]


def qemu_binary() -> str:
    path = shutil.which(QEMU)
    if path is None:
        raise EmulatorError(f"{QEMU} not found; install it with `apt-get install qemu-user`")
    return path


def ensure_aarch64_python() -> Aarch64Python:
    """The cached aarch64 Python, built on first use (about 20 s here, 130 MB of downloads, 150 MB on disk)."""
    qemu_binary()
    root = cache_root() / f"aarch64-py{PYTHON_VERSION.replace('.', '')}"
    py = Aarch64Python(root=root, sysroot=root / "sysroot", site=root / "site",
                       libtvm_runtime=root / "tvm-runtime" / "libtvm_runtime.so")
    _cached(root, _recipe(), f"an aarch64 Python {PYTHON_VERSION} for qemu", _build, "aarch64 Python")
    return py


def _cached(root: Path, recipe: dict, announce: str, fill, ready: str) -> None:
    """Make the cache folder `root` for `recipe` unless it is there: `fill(new, work, root)` populates a
    folder `new` inside the scratch folder `work`, which is then renamed to `root`, so a killed
    build never leaves half a cache. One build at a time (a lock file); the others wait and reuse it."""
    if _is_built(root, recipe):
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_built(root, recipe):
            return
        started = time.monotonic()
        for stale in root.parent.glob(f".{root.name}.build-*"):  # left by a killed build (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        _log(f"building {announce} in {root} (once; about 20 s)")
        work = Path(tempfile.mkdtemp(prefix=f".{root.name}.build-", dir=root.parent))
        try:
            new = work / root.name
            new.mkdir()
            fill(new, work, root)
            (new / "recipe.json").write_text(json.dumps(recipe, indent=2))
            if root.exists():  # an outdated recipe: move it aside, then swap the new one in
                os.rename(root, work / "old")
            os.rename(new, root)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    size = sum(os.lstat(os.path.join(folder, f)).st_size for folder, _, files in os.walk(root) for f in files)
    _log(f"{ready} ready in {time.monotonic() - started:.0f} s ({size / 2**20:.0f} MB in {root})")


def _is_built(root: Path, recipe: dict) -> bool:
    try:
        return json.loads((root / "recipe.json").read_text()) == recipe
    except (OSError, ValueError):
        return False


def _build(new: Path, work: Path, root: Path) -> None:
    """Fill the aarch64 Python's cache folder `new` (renamed to `root` afterwards)."""
    sysroot, site, tvm_runtime = new / "sysroot", new / "site", new / "tvm-runtime"
    for folder in (sysroot, site, tvm_runtime, work / "debs", work / "wheels"):
        folder.mkdir(parents=True)

    _log(f"  downloading {len(DEBIAN_PACKAGES) + len(DEBIAN_PACKAGES_ALL)} Debian arm64 packages")
    _apt_download([f"{p}:arm64" for p in DEBIAN_PACKAGES] + list(DEBIAN_PACKAGES_ALL), work / "debs")
    _log("  unpacking them into the sysroot")
    for deb in sorted((work / "debs").glob("*.deb")):
        _run(["dpkg", "-x", str(deb), str(sysroot)], f"unpack {deb.name}")
    _relativize_symlinks(sysroot)

    _log(f"  downloading aarch64 wheels: {', '.join(_wheel_specs())}")
    _pip_download(_wheel_specs(), work / "wheels")
    for wheel in sorted((work / "wheels").glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
    _log(f"  taking libtvm_runtime.so out of the aarch64 {TVM} wheel (~95 MB download)")
    tvm_wheels = work / "tvm-wheel"
    tvm_wheels.mkdir()
    _pip_download([TVM], tvm_wheels)
    (wheel,) = tvm_wheels.glob("*.whl")
    with zipfile.ZipFile(wheel) as z, open(tvm_runtime / "libtvm_runtime.so", "wb") as out:
        shutil.copyfileobj(z.open(LIBTVM_RUNTIME_MEMBER), out)
    wheel.unlink()

    _log("  precompiling the standard library and wheels to bytecode")
    _precompile(new, root)
    _log("  checking that it runs under qemu")
    smoke = _run_guest(new, "import ctypes, numpy, tvm_ffi\n"
                            f"ctypes.CDLL({str(tvm_runtime / 'libtvm_runtime.so')!r}, ctypes.RTLD_GLOBAL)\n"
                            "print(numpy.__version__)", timeout=600)
    if smoke.returncode != 0:
        raise EmulatorError(f"the aarch64 Python just built does not start under qemu: "
                            f"{_last_line(smoke.stderr)}")


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise EmulatorError(f"cannot {what}: `{cmd[0]}` not found (building the aarch64 Python needs "
                            "Debian's dpkg and apt-get)") from None
    if proc.returncode != 0:
        raise EmulatorError(f"cannot {what}: `{shlex.join(cmd)}` failed: {_last_line(proc.stderr)}")
    return proc


def _last_line(text: str) -> str:
    lines = [line for line in (text or "").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no message)"


def _apt_download(packages: list[str], folder: Path) -> None:
    """`apt-get download` the packages; adds the arm64 architecture first when we may (root)."""
    is_root = os.geteuid() == 0
    foreign = _run(["dpkg", "--print-foreign-architectures"], "list dpkg architectures").stdout.split()
    if "arm64" not in foreign:
        if not is_root:
            raise EmulatorError("the aarch64 Python needs Debian's arm64 packages; run once: "
                                "`sudo dpkg --add-architecture arm64 && sudo apt-get update`")
        _log("  adding the arm64 architecture to dpkg (dpkg --add-architecture arm64; apt-get update)")
        _run(["dpkg", "--add-architecture", "arm64"], "add the arm64 architecture")
        _run(["apt-get", "update", "-q"], "update the apt package lists")
    # As root apt drops to the `_apt` user, which cannot write into our private temp folder.
    cmd = ["apt-get", "download", "-q", *(["-o", "APT::Sandbox::User=root"] if is_root else []), *packages]
    proc = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, check=False)
    if proc.returncode != 0 and is_root:  # the arm64 package lists may be missing or stale
        _run(["apt-get", "update", "-q"], "update the apt package lists")
        proc = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        fix = "" if is_root else " (run `sudo apt-get update` and retry)"
        raise EmulatorError(f"cannot download Debian arm64 packages: {_last_line(proc.stderr)}{fix}")


def _pip_download(specs: list[str], folder: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-cache-dir", "--disable-pip-version-check",
           "--only-binary=:all:", "--python-version", PYTHON_VERSION, "--no-deps", "-d", str(folder)]
    for platform_tag in WHEEL_PLATFORMS:
        cmd += ["--platform", platform_tag]
    _run(cmd + specs, f"download aarch64 wheels {specs}")


def _relativize_symlinks(sysroot: Path) -> None:
    """Point absolute symlinks inside the sysroot (e.g. to /etc/...) at the sysroot, not the host."""
    for folder, dirs, files in os.walk(sysroot):
        for name in dirs + files:
            link = Path(folder) / name
            if link.is_symlink() and os.readlink(link).startswith("/"):
                target = sysroot / os.readlink(link).lstrip("/")
                link.unlink()
                link.symlink_to(os.path.relpath(target, link.parent))


def _precompile(new: Path, root: Path,
                subfolders: tuple[str, ...] = (f"sysroot/usr/lib/python{PYTHON_VERSION}", "site"),
                python_root: Path | None = None) -> None:
    """Write .pyc files once, so that each emulated start does not recompile the stdlib (7 s -> 2.5 s).

    `new` is the folder being built, renamed to `root` afterwards (tracebacks name files there).
    Bytecode depends only on the Python minor version: the host compiles it when it is 3.11 too,
    otherwise the guest does (slower, once), the aarch64 Python of `python_root` (default `new`).
    """
    folders = {str(new / sub): str(root / sub) for sub in subfolders}
    if _host_is_guest_version():
        for folder, final in folders.items():
            compileall.compile_dir(folder, quiet=2, workers=0, ddir=final)
        return
    code = (f"import compileall\nfor f, d in {folders!r}.items():\n"
            "    compileall.compile_dir(f, quiet=2, ddir=d)")
    _run_guest(python_root or new, code, timeout=1800)


def _host_is_guest_version() -> bool:
    return f"{sys.version_info.major}.{sys.version_info.minor}" == PYTHON_VERSION


# ------------------------------------------------------------------------------------------ guest TVM


def _tvm_recipe() -> dict:
    return {"recipe": 1, "python": PYTHON_VERSION, "wheels": [TVM, *GUEST_TVM_WHEELS],
            "platforms": list(WHEEL_PLATFORMS)}


def ensure_guest_tvm() -> Path:
    """The `site` folder holding the whole aarch64 `tvm` package (and ml_dtypes, cloudpickle, psutil).

    Put it on the guest's PYTHONPATH before the aarch64 Python's own `site` (numpy, tvm_ffi). Built
    on first use (about 20 s: a 95 MB download, 280 MB on disk, mostly libtvm_compiler.so) in its
    own cache folder, `cache_root() / "aarch64-tvm"`, with its own recipe.
    """
    py = ensure_aarch64_python()
    root = cache_root() / "aarch64-tvm"
    _cached(root, _tvm_recipe(), f"the full {TVM} package for the aarch64 Python",
            lambda new, work, final: _build_guest_tvm(new, work, final, py), "aarch64 TVM")
    return root / "site"


def _build_guest_tvm(new: Path, work: Path, root: Path, py: Aarch64Python) -> None:
    """Fill the guest TVM's cache folder `new` (renamed to `root` afterwards)."""
    site = new / "site"
    site.mkdir()
    specs = [TVM, *GUEST_TVM_WHEELS]
    _log(f"  downloading aarch64 wheels: {', '.join(specs)} (~95 MB)")
    _pip_download(specs, work / "wheels")
    _log("  unpacking them")
    for wheel in sorted((work / "wheels").glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
        wheel.unlink()
    _log("  precompiling them to bytecode")
    _precompile(new, root, ("site",), python_root=py.root)
    _log("  checking that `import tvm` works under qemu")
    version = TVM.split("==")[1]
    command = _guest_command(py.root, py.sysroot, [site, py.site], DEFAULT_CPU)
    smoke = subprocess.run(command + ["-c", "import tvm; print(tvm.__version__)"], capture_output=True,
                           text=True, timeout=600, check=False)
    if smoke.returncode != 0 or smoke.stdout.strip() != version:
        raise EmulatorError(f"the aarch64 TVM just unpacked does not import under qemu: "
                            f"{_last_line(smoke.stderr or smoke.stdout)}")


# ------------------------------------------------------------------------------------------- running


def _runtime_tree(py: Aarch64Python) -> Path:
    """A folder holding `bitrl_compile/__init__.py` and `bitrl_compile/runtime/*.py` for the guest.

    The guest cannot import the host's package (it would need torch and tvm); it gets a copy of
    the import-light part, cached by the hash of its sources.
    """
    sources = {"bitrl_compile/__init__.py": Path(bitrl_compile.__file__)}
    for source in sorted(Path(runtime.__file__).parent.glob("*.py")):
        sources[f"bitrl_compile/runtime/{source.name}"] = source
    contents = {name: path.read_bytes() for name, path in sources.items()}
    digest = hashlib.sha256()
    for name, data in contents.items():
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    tree = py.root / "runtime" / digest.hexdigest()[:16]
    if tree.is_dir():
        return tree
    tree.parent.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=tree.parent))
    try:
        for name, data in contents.items():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            (work / name).write_bytes(data)
        if _host_is_guest_version():
            compileall.compile_dir(work, quiet=2, workers=1, ddir=str(tree))
        _rename_into_place(work, tree)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return tree


def _guest_command(root: Path, guest_root: Path, pythonpath: list[Path], cpu: str,
                   env: dict[str, str] | None = None) -> list[str]:
    """qemu running the Python of the cache folder `root`, with `guest_root` as the guest's `/`.

    `env`: more variables for the guest's environment.
    """
    extra = [arg for name, value in (env or {}).items() for arg in ("-E", f"{name}={value}")]
    return [qemu_binary(), "-cpu", cpu, "-L", str(guest_root),
            "-E", f"PYTHONPATH={os.pathsep.join(map(str, pythonpath))}",
            "-E", f"BITRL_TVM_RUNTIME={root / 'tvm-runtime' / 'libtvm_runtime.so'}",
            # no user site, and no current folder first on sys.path: a checkout's bitrl_compile/
            # (without runtime/, a separate top-level folder) would shadow the copy made for the guest
            "-E", "PYTHONNOUSERSITE=1", "-E", "PYTHONSAFEPATH=1", *extra, "-U", "PYTHONHOME",
            str(root / "sysroot" / "usr" / "bin" / f"python{PYTHON_VERSION}")]


def _run_guest(root: Path, code: str, timeout: float, cpu: str = DEFAULT_CPU) -> subprocess.CompletedProcess:
    """Python code on the bare sysroot of the cache folder `root` (building and probing it)."""
    cmd = _guest_command(root, root / "sysroot", [root / "site"], cpu)
    return subprocess.run(cmd + ["-c", code], capture_output=True, text=True, timeout=timeout, check=False)


# Linux's names for the bits of AT_HWCAP and AT_HWCAP2 on arm64 (arch/arm64/include/uapi/asm/hwcap.h),
# the words of the "Features" line of /proc/cpuinfo.
HWCAP = ("fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32", "atomics", "fphp", "asimdhp",
         "cpuid", "asimdrdm", "jscvt", "fcma", "lrcpc", "dcpop", "sha3", "sm3", "sm4", "asimddp", "sha512",
         "sve", "asimdfhm", "dit", "uscat", "ilrcpc", "flagm", "ssbs", "sb", "paca", "pacg")
HWCAP2 = ("dcpodp", "sve2", "sveaes", "svepmull", "svebitperm", "svesha3", "svesm4", "flagm2", "frint",
          "svei8mm", "svef32mm", "svef64mm", "svebf16", "i8mm", "bf16", "dgh", "rng", "bti", "mte")
_HWCAP_PROBE = """import ctypes
getauxval = ctypes.CDLL(None).getauxval
getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
print(getauxval(16), getauxval(26))"""  # AT_HWCAP, AT_HWCAP2


def cpu_features(cpu: str = DEFAULT_CPU) -> list[str]:
    """The features qemu gives the guest for `cpu`, named as /proc/cpuinfo names them ("asimddp")."""
    py = ensure_aarch64_python()
    probe = _run_guest(py.root, _HWCAP_PROBE, timeout=120, cpu=cpu)
    if probe.returncode != 0:
        raise EmulatorError(f"{QEMU} cannot run CPU model {cpu!r} ({_last_line(probe.stderr)}); "
                            f"`{QEMU} -cpu help` lists them")
    hwcap, hwcap2 = map(int, probe.stdout.split())
    return ([name for bit, name in enumerate(HWCAP) if hwcap >> bit & 1]
            + [name for bit, name in enumerate(HWCAP2) if hwcap2 >> bit & 1])


def _guest_root(py: Aarch64Python, cpu: str) -> Path:
    """The guest's `/` for one CPU model: the sysroot's folders plus a /proc/cpuinfo for that CPU.

    qemu-user 7.2 (Debian 12) shows an aarch64 guest the x86 host's /proc/cpuinfo, so code that
    checks CPU features there (the runtime's `cpu_features` check does) would see x86 flags. With
    `-L`, a file that exists under the guest root replaces the host's: we write the Features line a
    Linux kernel would print for the emulated CPU (other /proc files stay the host's).
    """
    view = py.root / "cpus" / cpu
    if (view / "proc" / "cpuinfo").is_file():
        return view
    features = " ".join(cpu_features(cpu))
    view.parent.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=view.parent))
    try:
        for entry in os.listdir(py.sysroot):
            (work / entry).symlink_to(os.path.relpath(py.sysroot / entry, view))
        (work / "proc").mkdir()
        (work / "proc" / "cpuinfo").write_text("".join(
            f"processor\t: {i}\nFeatures\t: {features}\nCPU architecture: 8\n\n"
            for i in range(os.cpu_count() or 1)))
        _rename_into_place(work, view)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return view


def _rename_into_place(work: Path, final: Path) -> None:
    os.chmod(work, 0o755)  # mkdtemp made it private
    try:
        os.rename(work, final)
    except OSError:  # another process put the same folder in place first
        if not final.is_dir():
            raise


def qemu_python_command(cpu: str = DEFAULT_CPU) -> list[str]:
    """The command that runs the aarch64 Python under qemu for `cpu`; append `-c CODE` or a script.

    The guest can `import numpy, tvm_ffi, bitrl_compile.runtime`; BITRL_TVM_RUNTIME names its
    aarch64 libtvm_runtime.so; its /proc/cpuinfo lists the features of `cpu`.
    """
    py = ensure_aarch64_python()
    return _guest_command(py.root, _guest_root(py, cpu), [_runtime_tree(py), py.site], cpu)


def run_python_under_qemu(code: str, cpu: str = DEFAULT_CPU, timeout: float = 300.0,
                          cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """Run `python -c code` on the emulated `cpu`, output captured as text.

    A guest killed by SIGILL has returncode -signal.SIGILL, as a native process would (qemu-user
    then writes a core file into `cwd` if `ulimit -c` allows it).
    """
    return subprocess.run(qemu_python_command(cpu) + ["-c", code], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, check=False)


# ---------------------------------------------------------------------------------- EmulatedPolicy

_ERRORS: dict[str, type[Exception]] = {"ValueError": ValueError, "ArtifactError": ArtifactError,
                                       "TypeError": TypeError, "KeyError": KeyError,
                                       "IndexError": IndexError, "RuntimeError": RuntimeError}


def _raise_remote(header: dict) -> None:
    kind, message = header.get("error", "RuntimeError"), header.get("message", "")
    if kind in _ERRORS:
        raise _ERRORS[kind](message)
    raise EmulatorError(f"{kind}: {message}")


class EmulatedPolicy:
    """A policy.bitrl for aarch64 running in one persistent qemu process; the API of runtime.Policy.

    `act(obs, deterministic=False, rng=rng)` draws one seed from `rng` for the guest's sampler, so
    sampled actions are repeatable for a seeded rng but differ from a native Policy's.
    """

    def __init__(self, path: str | os.PathLike, cpu: str = DEFAULT_CPU, startup_timeout: float = 300.0):
        self.path = str(path)
        self.cpu = cpu
        self._lock = threading.Lock()
        self._proc = None
        command = qemu_python_command(cpu) + ["-m", "bitrl_compile.runtime.serve", os.path.abspath(path)]
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the process
        self._proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._stderr)
        try:
            ready, _, _ = select.select([self._proc.stdout], [], [], startup_timeout)
            if not ready:
                raise EmulatorError(f"{self.path}: the emulated runtime did not start within "
                                    f"{startup_timeout:.0f} s on {cpu}")
            header, _ = self._receive()
            if not header.get("ok"):
                _raise_remote(header)
        except BaseException:
            self.close()
            raise
        self.manifest: dict = header["manifest"]
        self.input_spec = self.manifest["input"]
        self.output_spec = self.manifest["output"]
        self.obs_shape = tuple(self.input_spec["shape"])

    def forward(self, obs) -> np.ndarray:
        """The network's raw output (logits, Q-values or action mean) for one obs or a batch."""
        return self._call({"method": "forward"}, obs)

    def features(self, obs) -> np.ndarray:
        """A backbone artifact's features (manifest output kind "features") for one obs or a batch."""
        return self._call({"method": "features"}, obs)

    def act(self, obs, deterministic: bool = True, rng: np.random.Generator | None = None):
        """Action(s) the environment accepts: int for Discrete, float32 array inside the Box for Box."""
        seed = None
        if not deterministic:
            seed = int((rng or np.random.default_rng()).integers(2**63))
        return self._call({"method": "act", "deterministic": bool(deterministic), "seed": seed}, obs)

    def _call(self, request: dict, obs):
        obs = np.asarray(obs)
        if obs.dtype == object:  # has no bytes to send; the runtime's own message
            raise ValueError(f"observation must be numeric, got dtype {obs.dtype}")
        header, payload = serve.array_message(obs)
        with self._lock:
            if self._proc is None:
                raise EmulatorError(f"{self.path}: the emulated policy is closed")
            try:
                serve.write_message(self._proc.stdin, dict(request, **header), payload)
            except (BrokenPipeError, OSError):
                raise self._died() from None
            reply, data = self._receive()
        if not reply.get("ok"):
            _raise_remote(reply)
        result = serve.message_array(reply, data)
        return result[()] if result.ndim == 0 else result

    def _receive(self) -> tuple[dict, bytes]:
        try:
            message = serve.read_message(self._proc.stdout)
        except serve.ProtocolError:
            message = None
        if message is None:
            raise self._died()
        return message

    def _died(self) -> EmulatorError:
        try:
            code = self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        self._stderr.seek(0)
        stderr = self._stderr.read().decode(errors="replace")
        if code is not None and code < 0:
            how = f"was killed by {signal.Signals(-code).name}"
            if code == -signal.SIGILL:
                how += f" (an instruction that {self.cpu} does not have)"
        else:
            how = f"exited with status {code}"
        return EmulatorError(f"{self.path}: the emulated runtime ({QEMU} -cpu {self.cpu}) {how}: "
                             f"{_last_line(stderr)}")

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()  # end of input: the server returns
            proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        proc.stdout.close()
        self._stderr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_proc", None) is not None:
            self.close()

    def __repr__(self) -> str:
        target = getattr(self, "manifest", {}).get("target", {})
        return f"EmulatedPolicy({self.path!r}, target={target.get('name')}, cpu={self.cpu})"


# --------------------------------------------------------------------------------------- RPCServer


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _write_launcher(folder: Path, command: list[str], py: Aarch64Python) -> Path:
    """`folder/bin/python3.11`: a shell script that runs `command` (qemu and the guest Python) with "$@".

    qemu tells the guest that argv[0] is the script (`-0`), so the guest Python's sys.executable is
    the script, and a guest that starts Python again (TVM's RPC server runs its worker as
    `sys.executable -m tvm.exec.popen_worker`, multiprocessing's spawn does the same) gets qemu with
    the same -cpu, root and environment: without binfmt_misc the kernel cannot run an aarch64 binary
    itself (ENOEXEC). `folder/pyvenv.cfg` points that Python at the sysroot's standard library, as a
    venv's does (without it the guest would look for it in /usr and add /usr/local/... to sys.path).
    """
    launcher = folder / "bin" / f"python{PYTHON_VERSION}"
    launcher.parent.mkdir(parents=True)
    qemu, python = shlex.join(command[:-1]), shlex.quote(command[-1])
    launcher.write_text(f'#!/bin/sh\nexec {qemu} -0 "$0" {python} "$@"\n')
    launcher.chmod(0o755)
    (folder / "pyvenv.cfg").write_text(f"home = {py.python.parent}\n")
    return launcher


class RPCServer:
    """TVM's own RPC server, `python3.11 -m tvm.exec.rpc_server`, in the aarch64 Python under qemu.

    What a Raspberry Pi runs for MetaSchedule autotuning, on this machine:

        with RPCServer("cortex-a72") as server:         # starts in about 6 s
            remote = tvm.rpc.connect(server.host, server.port)
            remote.upload("lib.so")
            f = remote.load_module("lib.so")["main"]

    `port=None` picks a free one. The server forks a child per session, as on the device (fork works
    under qemu-user). `runtime_only` (TVM_USE_RUNTIME_LIB=1) loads libtvm_runtime.so, not the 229 MB
    libtvm_compiler.so, which a server does not call: a start takes about 6 s instead of 19 s (two
    Python processes import tvm). Its timings are qemu's, not the device's. Its files (log, uploads,
    the guest's TMPDIR) live in a temporary folder that `close()` removes, with the whole process group.
    """

    def __init__(self, cpu: str = DEFAULT_CPU, host: str = "127.0.0.1", port: int | None = None,
                 startup_timeout: float = 300.0, *, runtime_only: bool = True):
        self.cpu = cpu
        self._host = host
        self._proc: subprocess.Popen | None = None
        self._folder: Path | None = None
        py = ensure_aarch64_python()
        site = ensure_guest_tvm()
        guest_root = _guest_root(py, cpu)  # an unknown CPU model fails here, with qemu's list to look at
        self._port = _free_port(host) if port is None else int(port)
        self._folder = Path(tempfile.mkdtemp(prefix="bitrl-rpc-"))
        try:
            (self._folder / "tmp").mkdir()
            env = {"TMPDIR": str(self._folder / "tmp"), "PYTHONUNBUFFERED": "1"}
            if runtime_only:
                env["TVM_USE_RUNTIME_LIB"] = "1"
            command = _guest_command(py.root, guest_root, [site, py.site], cpu, env=env)
            launcher = _write_launcher(self._folder / "python", command, py)
            self.log_path = self._folder / "server.log"
            argv = [str(launcher), "-m", "tvm.exec.rpc_server", "--host", host, "--port", str(self._port),
                    "--port-end", str(self._port + 1)]  # [port, port-end): this port or none
            with open(self.log_path, "wb") as log:
                self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                              stderr=subprocess.STDOUT, cwd=self._folder,
                                              start_new_session=True)
            self._wait_until_ready(startup_timeout)
        except BaseException:
            self.close()
            raise

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> str:
        return f"{self._host}:{self._port}"

    def _what(self) -> str:
        return f"TVM's RPC server ({QEMU} -cpu {self.cpu}, {self.address})"

    def _log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _wait_until_ready(self, timeout: float) -> None:
        """Until the log says "bind to HOST:PORT" and an RPC session opens; EmulatorError if it dies."""
        import tvm.rpc

        probe_host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self._host, self._host)
        deadline = time.monotonic() + timeout
        bound, last_error = False, ""
        while True:
            code = self._proc.poll()
            if code is not None:
                raise EmulatorError(f"{self._what()} {_exit_status(code, self.cpu)}: "
                                    f"{_last_line(self._log_text())}")
            bound = bound or f"bind to {self._host}:{self._port}" in self._log_text()
            if bound:
                try:
                    session = tvm.rpc.connect(probe_host, self._port, session_timeout=60)
                except Exception as e:  # noqa: BLE001 - TVMError or socket error: retry until the deadline
                    last_error = _last_line(str(e))
                else:
                    del session  # ends the session; the server goes back to accepting
                    return
            if time.monotonic() > deadline:
                log = self._log_text()
                why = last_error or (_last_line(log) if log.strip() else "nothing in its log yet")
                raise EmulatorError(f"{self._what()} did not answer within {timeout:.0f} s: {why}")
            time.sleep(0.2)

    def wait(self, timeout: float | None = None) -> int | None:
        """The server's exit status once it has ended (None if still running after `timeout` s)."""
        if self._proc is None:
            raise EmulatorError(f"{self._what()} is closed")
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        """Kill the server's process group (its sessions and worker too) and remove its folder."""
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        folder, self._folder = self._folder, None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_proc", None) is not None or getattr(self, "_folder", None) is not None:
            self.close()

    def __repr__(self) -> str:
        state = "running" if getattr(self, "_proc", None) is not None else "closed"
        return f"RPCServer({self._host}:{getattr(self, '_port', None)}, cpu={self.cpu}, {state})"


def _exit_status(code: int, cpu: str) -> str:
    if code < 0:
        how = f"was killed by {signal.Signals(-code).name}"
        if code == -signal.SIGILL:
            how += f" (an instruction that {cpu} does not have)"
        return how
    return f"exited with status {code}"


# ----------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """`python -m bitrl_compile.devices setup` builds the cache; `... python ARGS` runs the guest;
    `... rpc-server` runs TVM's RPC server in it."""
    argv = sys.argv[1:] if argv is None else argv
    usage = ("usage: python -m bitrl_compile.devices setup [--tvm]     build the aarch64 Python cache "
             "(--tvm: and the guest TVM)\n"
             "       python -m bitrl_compile.devices python [--cpu CPU] ARGS...   run it under qemu\n"
             "       python -m bitrl_compile.devices rpc-server [--cpu CPU] [--host HOST] [--port PORT]\n"
             "                                       TVM's RPC server under qemu, in the foreground")
    if argv[:1] == ["setup"] and argv[1:] in ([], ["--tvm"]):
        try:
            py = ensure_aarch64_python()
            tvm_site = ensure_guest_tvm() if argv[1:] == ["--tvm"] else None
        except EmulatorError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"aarch64 Python: {py.python}\nsite: {py.site}\nlibtvm_runtime: {py.libtvm_runtime}")
        if tvm_site is not None:
            print(f"tvm site: {tvm_site}")
        return 0
    if argv[:1] == ["rpc-server"]:
        return _rpc_server_main(argv[1:])
    if argv[:1] == ["python"]:
        args, cpu = argv[1:], DEFAULT_CPU
        if args[:1] == ["--cpu"] and len(args) >= 2:
            cpu, args = args[1], args[2:]
        try:
            command = qemu_python_command(cpu) + args
        except EmulatorError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return subprocess.call(command)
    print(usage, file=sys.stderr)
    return 2


def _rpc_server_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m bitrl_compile.devices rpc-server",
        description="TVM's RPC server in the aarch64 Python under qemu; Ctrl-C stops it.")
    parser.add_argument("--cpu", default=DEFAULT_CPU,
                        help=f"qemu CPU model (default {DEFAULT_CPU}, Raspberry Pi 4)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (0.0.0.0: reachable from other machines)")
    parser.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the server on SIGTERM too (__exit__)
    try:
        with RPCServer(args.cpu, host=args.host, port=args.port) as server:
            print(f"{server.address}  (TVM RPC server, {QEMU} -cpu {args.cpu}; Ctrl-C stops it)", flush=True)
            shown = len(server._log_text())
            while (code := server.wait(timeout=0.5)) is None:
                text = server._log_text()  # the server's log lines (sessions, loaded modules) on stderr
                sys.stderr.write(text[shown:])
                shown = len(text)
            sys.stderr.write(server._log_text()[shown:])
            print(f"error: the server {_exit_status(code, args.cpu)}", file=sys.stderr)
            return 1
    except EmulatorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def qemu_cpu(manifest: dict) -> str:
    """The `qemu-aarch64 -cpu` that models the CPU an artifact was compiled for (its TVM target's mcpu)."""
    try:
        return json.loads(manifest["target"]["tvm"]).get("mcpu") or DEFAULT_CPU
    except (KeyError, TypeError, ValueError):
        return DEFAULT_CPU


def open_policy(path: str | os.PathLike):
    """A runtime Policy for this machine, or an EmulatedPolicy (qemu) for an artifact of another architecture."""
    from bitrl_compile.runtime.policy import host_arch

    manifest = runtime.read_artifact(path).manifest
    if manifest["target"]["arch"] != host_arch():
        return EmulatedPolicy(path, cpu=qemu_cpu(manifest))
    return runtime.load(path)
