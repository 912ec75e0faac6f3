"""Writing files whole or not at all: the project's one atomic write."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], None], mode: int | None = None) -> Path:
    """Write a file whole or not at all: into a temporary file beside `path` (bytes, or `data(f)` writes it),
    flushed to disk, then renamed over `path`; on any error or interrupt the temporary file is removed.
    The file gets mkstemp's 0600 unless `mode` says otherwise. The project's one atomic write."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
            else:
                data(f)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
