"""An artifact whose manifest is edited and sealed again: every member hash and manifest.sha256 recomputed, what an
attacker (or a buggy writer) can do; the tests of the manifest's structure check that readers still refuse it."""

from __future__ import annotations

import hashlib
import json
import zipfile


def sealed(artifact, path, edit):
    """A copy of `artifact` at `path` with edit(manifest) applied and every hash recomputed; returns path."""
    with zipfile.ZipFile(artifact) as z:
        members = {n: z.read(n) for n in z.namelist()}
    manifest = json.loads(members["manifest.json"])
    edit(manifest)
    manifest["members"] = {n: hashlib.sha256(members[n]).hexdigest() for n in manifest["members"]}
    text = json.dumps(manifest, indent=2).encode()
    members.update({"manifest.json": text, "manifest.sha256": hashlib.sha256(text).hexdigest().encode() + b"\n"})
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path
