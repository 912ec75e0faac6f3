"""Writing files whole or not at all: the project's one atomic write, and the checks of an output name.

A write goes to a temporary file beside the destination, `.NAME.XXXXXXXX.tmp` (NAME shortened with a hash when
the whole would exceed the file system's name limit), which is renamed over the destination once complete. An
error or an interrupt removes it; a temporary file of the same destination older than an hour (left by a
SIGKILL or a power cut) is removed by the next write there.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import stat
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

STALE_SECONDS = 3600  # a temporary file this old is not a write in progress
_RANDOM = "[a-z0-9_]{8}"  # mkstemp's random part


def name_max(folder: str | os.PathLike) -> int:
    """The longest file name (in bytes) the file system holding `folder` accepts."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _temp_stem(name: str, limit: int) -> str:
    """NAME in `.NAME.XXXXXXXX.tmp`, short enough for `limit`: a long name keeps its start plus a hash."""
    room = limit - len(".") - len(".XXXXXXXX.tmp")
    if len(name.encode()) <= room:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    head = name.encode()[:room - len(digest) - 1].decode(errors="ignore")
    return f"{head}~{digest}"


def _umask() -> int:
    """The process's umask, read without changing it (os.umask sets it, racing other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temps(path: str | os.PathLike, older_than: float = STALE_SECONDS) -> list[Path]:
    """Remove this tool's temporary files for `path` (`.NAME.XXXXXXXX.tmp` beside it) older than
    `older_than` seconds: what a killed write left. Returns the removed files."""
    path = Path(path)
    folder = path.parent
    pattern = re.compile(re.escape(f".{_temp_stem(path.name, name_max(folder))}.") + _RANDOM + r"\.tmp")
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        if not pattern.fullmatch(entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and now - st.st_mtime > older_than:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue  # gone already, or not ours to remove
    return removed


def _check_name(path: Path) -> None:
    limit = name_max(path.parent)
    if len(path.name.encode()) > limit:
        raise ValueError(f"output name {path.name[:24]}... is {len(path.name.encode())} bytes, over this file "
                         f"system's limit of {limit}; choose a shorter name")


_INTERRUPTS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], None], mode: int | None = None) -> Path:
    """Write a file whole or not at all: into a temporary file beside `path` (bytes, or `data(f)` writes it),
    flushed to disk, then renamed over `path`; on any error or interrupt the temporary file is removed.

    The file gets `0o666 & ~umask`, as `open()` would give, unless `mode` says otherwise (0o600 for secrets
    such as private keys: set before any byte is written). The project's one atomic write."""
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"output folder {folder} does not exist; create it first")
    _check_name(path)
    remove_stale_temps(path)
    # the interrupts wait until the handler below is armed: a Ctrl-C just after mkstemp made the file would
    # otherwise leave it behind (seen in tests/test_bad_inputs.py's signal cases, once in a few runs)
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _INTERRUPTS)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{_temp_stem(path.name, name_max(folder))}.", suffix=".tmp", dir=folder)
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        raise
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a pending interrupt is raised here, inside the try
        os.fchmod(fd, mode if mode is not None else 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
            else:
                data(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def check_output(path: str | os.PathLike, *, force: bool = False, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse an output name that could only fail or do harm, before any expensive work: a folder, a folder
    that does not exist or cannot be written, a name too long for the file system, an existing file without
    `force`, or one of the `inputs` (the same file, also through a symlink or a hard link, even with `force`)."""
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"output folder {folder} does not exist; create it first")
    _check_name(path)  # first: stat() of a name too long fails with ENAMETOOLONG
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name, e.g. {path / 'policy.bitrl'}")
    for source in inputs:
        if path.exists() and Path(source).exists() and os.path.samefile(source, path):
            raise ValueError(f"{path} is the input {source}; choose another output name (even --force will not "
                             "overwrite the input)")
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass --force to overwrite it")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write in {folder}; choose another output folder")
    return path
