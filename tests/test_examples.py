"""examples/finetune.py runs end to end (a short version) and prints every method's row."""

import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_finetune_example_short_run():
    pytest.importorskip("transformers")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "finetune.py"), "--steps", "3"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for method in ("LoRA", "QLoRA", "adapters (Houlsby)", "prompt tuning"):
        line = next(line for line in out.stdout.splitlines() if line.startswith(method + " "))
        before, after = (float(v) for v in re.search(r"([\d.]+) → ([\d.]+)", line).groups())
        share = float(re.search(r"\(([\d.]+) %\)", line).group(1))
        assert math.isfinite(before) and math.isfinite(after) and 0 < share < 15, line
        assert after < before, line  # three steps already help
