"""scripts/bench.py is a script, not a module of the package: its functions are imported from the file."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench.py"
_spec = importlib.util.spec_from_file_location("scripts_bench", _SCRIPT)
_module = importlib.util.module_from_spec(_spec)
sys.modules["scripts_bench"] = _module
_spec.loader.exec_module(_module)
