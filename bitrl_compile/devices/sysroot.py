"""The aarch64 (Raspberry Pi) Python that runs on this x86 machine under qemu-user, and the guest TVM.

The aarch64 Python is Debian's: its arm64 packages (python3.11-minimal and the libraries it
links) unpacked into a plain folder that qemu uses as the guest's root (`-L`), plus the aarch64
wheels of numpy and apache-tvm-ffi and the aarch64 `libtvm_runtime.so` (taken out of the
apache-tvm wheel; the compiler library is not needed). No chroot, no binfmt. It is built once,
on first use (`ensure_aarch64_python()`), under

    $BITRL_CACHE/aarch64-py311/        (BITRL_CACHE defaults to ~/.cache/bitrl-compile)
        sysroot/        the Debian arm64 packages, `dpkg -x`ed; sysroot/usr/bin/python3.11
        site/           the aarch64 wheels, unpacked
        tvm-runtime/    libtvm_runtime.so for aarch64
        runtime/HASH/   a copy of bitrl_compile.runtime for the guest, one per source version
        cpus/CPU/       the guest's `/` for one -cpu: the sysroot plus a /proc/cpuinfo of that CPU
        recipe.json     what was built; a different recipe rebuilds the folder

`bitrl-compile emulator setup` builds it up front (for CI). The build needs `dpkg`/`apt-get` with
the arm64 architecture added (done here when running as root) and pip. qemu enforces the ISA of the
`-cpu` it is given: an instruction a Cortex-A72 lacks (sdot, LSE atomics) kills the guest with
SIGILL, as it would on a Raspberry Pi 4.

TVM's RPC server (devices/rpc.py) needs the full `tvm` Python package in the guest: a second cache,
built by `ensure_guest_tvm()` (`setup --tvm`; about 20 s, 280 MB on disk), apart so that the aarch64
Python above is not rebuilt:

    $BITRL_CACHE/aarch64-tvm/
        site/           the aarch64 wheels of apache-tvm (the whole package) and of what it and
                        tvm.exec.rpc_server import that the aarch64 Python lacks
        recipe.json

`qemu_python_command(cpu)` is the command that runs the aarch64 Python for one CPU model;
`run_python_under_qemu(code, cpu)` runs code with it.
"""

from __future__ import annotations

import compileall
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from bitrl_compile import runtime

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
    _unpack_wheels(_wheel_specs(), work, site)
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
                            f"{last_line(smoke.stderr)}")


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise EmulatorError(f"cannot {what}: `{cmd[0]}` not found (building the aarch64 Python needs "
                            "Debian's dpkg and apt-get)") from None
    if proc.returncode != 0:
        raise EmulatorError(f"cannot {what}: `{shlex.join(cmd)}` failed: {last_line(proc.stderr)}")
    return proc


def last_line(text: str) -> str:
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
        raise EmulatorError(f"cannot download Debian arm64 packages: {last_line(proc.stderr)}{fix}")


def _pip_download(specs: list[str], folder: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-cache-dir", "--disable-pip-version-check",
           "--only-binary=:all:", "--python-version", PYTHON_VERSION, "--no-deps", "-d", str(folder)]
    for platform_tag in WHEEL_PLATFORMS:
        cmd += ["--platform", platform_tag]
    _run(cmd + specs, f"download aarch64 wheels {specs}")


def _unpack_wheels(specs: list[str], work: Path, site: Path) -> None:
    """Download the aarch64 wheels `specs` (no dependencies) into the scratch folder and unpack them into `site`."""
    wheels = work / "wheels"
    wheels.mkdir(exist_ok=True)
    _pip_download(specs, wheels)
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
        wheel.unlink()


def guest_site(name: str, specs: list[str]) -> Path:
    """A cached `site` folder (cache_root() / name / "site") holding the aarch64 wheels `specs` unpacked, no
    dependencies: for a guest process that needs a package the runtime does not (the bench's onnxruntime
    baseline). Put it on the guest's PYTHONPATH. Built once, like the other caches."""
    root = cache_root() / name
    recipe = {"recipe": 1, "python": PYTHON_VERSION, "wheels": list(specs), "platforms": list(WHEEL_PLATFORMS)}
    _cached(root, recipe, f"the aarch64 wheels {', '.join(specs)}",
            lambda new, work, final: _unpack_wheels(specs, work, new / "site"), name)
    return root / "site"


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
    _log(f"  downloading and unpacking aarch64 wheels: {', '.join(specs)} (~95 MB)")
    _unpack_wheels(specs, work, site)
    _log("  precompiling them to bytecode")
    _precompile(new, root, ("site",), python_root=py.root)
    _log("  checking that `import tvm` works under qemu")
    version = TVM.split("==")[1]
    command = guest_command(py.root, py.sysroot, [site, py.site], DEFAULT_CPU)
    smoke = subprocess.run(command + ["-c", "import tvm; print(tvm.__version__)"], capture_output=True,
                           text=True, timeout=600, check=False)
    if smoke.returncode != 0 or smoke.stdout.strip() != version:
        raise EmulatorError(f"the aarch64 TVM just unpacked does not import under qemu: "
                            f"{last_line(smoke.stderr or smoke.stdout)}")


# ------------------------------------------------------------------------------------------- running


def _runtime_tree(py: Aarch64Python) -> Path:
    """A folder holding `bitrl_compile/__init__.py` and `bitrl_compile/runtime/*.py` for the guest.

    The guest cannot import the host's package (it would need torch and tvm); it gets a copy of
    the import-light part, cached by the hash of its sources.
    """
    # the path, not the module: devices depends on bitrl_compile.runtime only
    sources = {"bitrl_compile/__init__.py": Path(importlib.util.find_spec("bitrl_compile").origin)}
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


def guest_command(root: Path, guest_root: Path, pythonpath: list[Path], cpu: str,
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
    cmd = guest_command(root, root / "sysroot", [root / "site"], cpu)
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
        raise EmulatorError(f"{QEMU} cannot run CPU model {cpu!r} ({last_line(probe.stderr)}); "
                            f"`{QEMU} -cpu help` lists them")
    hwcap, hwcap2 = map(int, probe.stdout.split())
    return ([name for bit, name in enumerate(HWCAP) if hwcap >> bit & 1]
            + [name for bit, name in enumerate(HWCAP2) if hwcap2 >> bit & 1])


def cpu_root(py: Aarch64Python, cpu: str) -> Path:
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
    return guest_command(py.root, cpu_root(py, cpu), [_runtime_tree(py), py.site], cpu)


def run_python_under_qemu(code: str, cpu: str = DEFAULT_CPU, timeout: float = 300.0,
                          cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """Run `python -c code` on the emulated `cpu`, output captured as text.

    A guest killed by SIGILL has returncode -signal.SIGILL, as a native process would (qemu-user
    then writes a core file into `cwd` if `ulimit -c` allows it).
    """
    return subprocess.run(qemu_python_command(cpu) + ["-c", code], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, check=False)


def describe_exit(code: int | None, cpu: str) -> str:
    """How a guest process ended, in words: "exited with status 1", "was killed by SIGILL (an
    instruction that cortex-a72 does not have)"."""
    if code is not None and code < 0:
        how = f"was killed by {signal.Signals(-code).name}"
        if code == -signal.SIGILL:
            how += f" (an instruction that {cpu} does not have)"
        return how
    return f"exited with status {code}"
