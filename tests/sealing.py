"""An artifact whose manifest is edited and sealed again: every member hash and manifest.sha256 recomputed, what an
attacker (or a buggy writer) can do; the tests of the manifest's structure check that readers still refuse it."""

from __future__ import annotations

import hashlib
import json
import zipfile


def sealed(artifact, path, edit=None, *, member: str | None = None, edit_member=None, reseal: bool = True):
    """A copy of `artifact` at `path` with edit(manifest) applied and every hash recomputed; returns path.
    `member` / edit_member(bytearray): that member's bytes edited too; reseal=False keeps the old hashes (a
    tampered member an honest manifest does not describe)."""
    with zipfile.ZipFile(artifact) as z:
        members = {n: z.read(n) for n in z.namelist()}
    if member is not None:
        data = bytearray(members[member])
        edit_member(data)
        members[member] = bytes(data)
    if reseal:
        manifest = json.loads(members["manifest.json"])
        if edit is not None:
            edit(manifest)
        manifest["members"] = {n: hashlib.sha256(members[n]).hexdigest() for n in manifest["members"]}
        text = json.dumps(manifest, indent=2).encode()
        members.update({"manifest.json": text, "manifest.sha256": hashlib.sha256(text).hexdigest().encode() + b"\n"})
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path
