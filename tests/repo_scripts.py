"""The repository's scripts (bench/*.py, scripts/*.py) imported as modules, for the tests that check them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str, name: str):
    """ROOT/relative executed as module `name` (registered in sys.modules, so dataclasses and pickling inside it
    find their module)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
