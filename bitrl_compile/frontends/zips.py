"""Limits on the zips of model files (SB3 .zip, torch archives: .pt2, TorchScript, zip-format .pt, SB3's
policy.pth, .npz statistics), checked from the zip directory before anything is read: torch and zipfile allocate
each member at its declared size, and a 1 MB zip can declare a 1 GB member; reading it is the bomb."""

from __future__ import annotations

import io
import zipfile
import zlib
from pathlib import Path

from bitrl_compile.loaded import ModelLoadError

MAX_MEMBERS = 4096          # members of a model zip (an SB3 zip has 6, a TorchScript MLP about 20)
MAX_TOTAL_BYTES = 4 << 30   # all members together, as declared
MAX_RATIO = 100             # uncompressed / compressed: deflated weights ~1.1, a zip bomb ~1000
RATIO_FLOOR = 8 << 20       # members smaller than this may have any ratio

_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError, OSError)


def check_zip_directory(zf: zipfile.ZipFile, where: str, max_total: int = MAX_TOTAL_BYTES) -> None:
    """Refuse a zip whose directory declares too many members, too many bytes, or a bomb-like ratio."""
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise ModelLoadError(f"{where}: the zip holds {len(infos)} members, more than the limit {MAX_MEMBERS}; "
                             "not a model file this compiler reads")
    total = 0
    for info in infos:
        total += info.file_size
        if info.file_size > RATIO_FLOOR and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            raise ModelLoadError(f"{where}: member {info.filename[:80]!r} expands from {info.compress_size} to "
                                 f"{info.file_size} bytes (a zip bomb?); save the model again")
    if total > max_total:
        raise ModelLoadError(f"{where}: the zip's members declare {total} bytes in all, more than the limit "
                             f"{max_total}; not a model file this compiler reads")


def read_member(zf: zipfile.ZipFile, name: str, limit: int, where: str) -> bytes:
    """A member's bytes, refused when its declared size is over `limit`; the read itself is bounded by the
    declared size, so a directory that lies about it cannot make zipfile inflate more."""
    info = zf.getinfo(name)
    if info.file_size > limit:
        raise ModelLoadError(f"{where}: member {name[:80]!r} declares {info.file_size} bytes, more than the limit "
                             f"{limit}; not a model file this compiler reads")
    try:
        with zf.open(info) as f:
            data = f.read(info.file_size)
    except _READ_ERRORS as e:
        raise ModelLoadError(f"{where}: member {name[:80]!r} cannot be read ({first_line(e)}); copy or save the "
                             "file again") from None
    if len(data) != info.file_size:
        raise ModelLoadError(f"{where}: member {name[:80]!r} is truncated; copy or save the file again")
    return data


def check_torch_zip(data: bytes | Path, where: str, max_total: int = MAX_TOTAL_BYTES) -> None:
    """The directory checks on a torch archive (bytes or a file) before torch reads it; not a zip: nothing to
    check (torch.load says what it is)."""
    if isinstance(data, bytes):
        head = data[:2]
    else:
        with open(data, "rb") as f:
            head = f.read(2)
    if head != b"PK":
        return
    try:
        with zipfile.ZipFile(io.BytesIO(data) if isinstance(data, bytes) else data) as zf:
            check_zip_directory(zf, where, max_total)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        if isinstance(e, ModelLoadError):
            raise
        raise ModelLoadError(f"{where}: corrupt torch archive ({first_line(e)}); save the model again") from None


def first_line(e: BaseException) -> str:
    """An exception's message as one short line, for messages that quote a library's error."""
    lines = str(e).strip().splitlines()
    return lines[0][:160] if lines else type(e).__name__
