"""Check the layers: `lint-imports` (import-linter, contracts in pyproject.toml) on the installed layout.

    python3 scripts/lint_imports.py            # what .ci/run runs; exit status of lint-imports

The distribution maps the top-level folders passes/, targets/, runtime/, trainers/ into the one namespace
`bitrl_compile` (pyproject's package-dir). An editable install resolves them through an import hook that
import-linter's graph builder (grimp, which reads files on disk) does not see, so this lays the package out
as a wheel would (the .py files copied into TMP/bitrl_compile/...) and lints that copy. tests/test_layers.py
uses `installed_tree` for its own import-graph checks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def installed_tree(dest: Path) -> Path:
    """Copy the package's .py files into dest/ as `pip install .` would place them; returns dest."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]

    def folder(package: str) -> Path:  # a mapped package's folder, or a subpackage's under its parent's
        if package in config["package-dir"]:
            return ROOT / config["package-dir"][package]
        parent, _, leaf = package.rpartition(".")
        return folder(parent) / leaf if parent else ROOT / leaf

    for package in config["packages"]:
        target = dest / package.replace(".", "/")
        target.mkdir(parents=True, exist_ok=True)
        for file in folder(package).glob("*.py"):
            shutil.copy2(file, target / file.name)
    return dest


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="bitrl-layers-") as tmp:
        tree = installed_tree(Path(tmp))
        env = dict(os.environ, PYTHONPATH=str(tree))
        lint = shutil.which("lint-imports") or "lint-imports"
        return subprocess.run([lint, str(ROOT / "pyproject.toml"), "--no-cache"], cwd=tree,
                              env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
