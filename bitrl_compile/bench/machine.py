"""Facts about the machine a measurement ran on, and the qemu plugin that counts guest instructions.

Every benchmark prints the machine it ran on: `bitrl-compile bench` (report.py), `bitrl-compile bench-kernels`
(kernels.py) and the research scripts in the repository's bench/ folder take these facts from here.

    cpu_name()        the CPU model name from /proc/cpuinfo ("Intel(R) Xeon(R) Platinum 8592+")
    load_average()    the 1, 5 and 15 minute load averages
    machine()         both, with the core count, architecture, Python version and platform string
    summary()         "CPU, N cores, Python X.Y.Z", one line for a report's reproduce note
    status_bytes()    VmRSS and VmHWM of this process (it lives in child.py, the measured process, which runs
                      in the qemu guest where this package is not installed; it is re-exported here)
    build_plugin()    libbitrl_insn.so, qemu's instruction-count plugin, from qemu_insn_plugin.c
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from bitrl_compile.bench.child import status_bytes

__all__ = ["PLUGIN_SOURCE", "build_plugin", "cpu_name", "load_average", "machine", "status_bytes", "summary"]

PLUGIN_SOURCE = Path(__file__).with_name("qemu_insn_plugin.c")


def cpu_name() -> str:
    """The `model name` line of /proc/cpuinfo; platform's processor or machine name where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> tuple[float, float, float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def machine() -> dict:
    """CPU name, cores, architecture, Python version, platform string and load average of this machine."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "arch": platform.machine(),
            "python": platform.python_version(), "platform": platform.platform(), "load_average": load_average()}


def summary() -> str:
    """One line: "CPU, N cores, Python X.Y.Z"."""
    return f"{cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def build_plugin() -> Path:
    """libbitrl_insn.so from qemu_insn_plugin.c, built once per source version under the cache."""
    # imported here, not at the top: _hashlib loads OpenSSL, and the bare child process of
    # bench/bitnet_memory.py imports this module for status_bytes
    import hashlib
    import shutil
    import subprocess
    import tempfile

    from bitrl_compile.devices import cache_root

    source = PLUGIN_SOURCE.read_bytes()
    lib = cache_root() / "qemu-plugins" / f"libbitrl_insn-{hashlib.sha256(source).hexdigest()[:12]}.so"
    if lib.is_file():
        return lib
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("counting instructions under qemu needs a host C compiler; install it with "
                           "`apt-get install gcc`")
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        built = Path(tmp) / lib.name
        proc = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-fvisibility=hidden", "-o", str(built),
                               str(PLUGIN_SOURCE)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"cannot build the qemu plugin: {proc.stderr.strip()[-300:]}")
        os.replace(built, lib)
    return lib
