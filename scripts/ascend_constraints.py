"""Write constraints-ascend.txt, the tested set for Ascend hosts, from requirements-lock.txt.

python scripts/ascend_constraints.py     after scripts/lock.sh changed the lock

torch-npu pins torch exactly, and the lock's torch has no torch-npu release: the Ascend set is the lock
with its torch pair and CUDA wheels swapped for a torch / torchvision / torch-npu trio
(`tuner.runtime.stack.PIP_ASCEND_TRIO`). tests/runtime/test_stack.py fails while the file is stale.
"""

from __future__ import annotations

from pathlib import Path

from tuner.runtime.stack import ascend_constraints

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements-lock.txt"
CONSTRAINTS = ROOT / "constraints-ascend.txt"

if __name__ == "__main__":
    text = ascend_constraints(LOCK.read_text())
    CONSTRAINTS.write_text(text)
    print(f"wrote {CONSTRAINTS.name} ({len(text.splitlines())} lines)")
