"""scripts/gpu-check without a GPU (--dry-run, as CI runs it): the steps run in order, each in
its own time box, and the output folder holds the eight files it promises."""

import json
import os
import pathlib
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

import pytest
import torch

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "gpu-check"
OUTPUTS = {"summary.txt", "bench.json", "bench.csv", "bench.png", "pytest.xml", "pytest.log", "autotune.json",
           "env.json"}

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is for machines without a GPU")


def run(out, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), str(out), "--dry-run", *args], env=env, capture_output=True,
                          text=True, timeout=600)


def test_dry_run_writes_the_promised_files(tmp_path):
    out = tmp_path / "out"
    result = run(out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == OUTPUTS
    assert all(p.stat().st_size < 16 * 2**20 for p in out.iterdir())
    summary = (out / "summary.txt").read_text()
    for step in ("env", "install", "correctness", "configs", "bench", "autotune"):
        assert f"\n{step} " in summary, step
    assert "skipped (no GPU" in summary and "result: PASS" in summary
    assert re.search(r"; \d+ gpu tests collected, not run", summary)
    env = json.loads((out / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["python"] and env["dry_run"] is True
    assert env["cuda_available"] is False
    # the gpu tests were collected (through the import path the script builds), not run
    ElementTree.parse(out / "pytest.xml")
    assert "test_gpu.py" in (out / "pytest.log").read_text()
    record = json.loads((out / "bench.json").read_text())
    assert record["rows"] and record["targets"] and record["timed"] is False
    assert json.loads((out / "autotune.json").read_text())["choices"] == []


def test_a_failed_or_overlong_step_stops_nothing_after_it(tmp_path):
    """An empty wheel folder fails the install step, one-second boxes kill the correctness,
    configs and bench steps; each later step still runs (autotune writes its file); the
    exit code is 1."""
    out = tmp_path / "out"
    (tmp_path / "wheels").mkdir()
    result = run(out, "--wheels", str(tmp_path / "wheels"), "--time-box", "correctness=1", "--time-box", "configs=1",
                 "--time-box", "bench=1")
    assert result.returncode == 1
    summary = (out / "summary.txt").read_text()
    lines = {line.split()[0]: line for line in summary.splitlines()[3:] if line.strip()}
    assert "no wheels" in lines["install"]
    for step in ("correctness", "configs", "bench"):
        assert "timed out after 1 s" in lines[step], step
    assert "result: FAIL" in summary and lines["autotune"].split()[1] == "skipped"
    assert (out / "autotune.json").exists() and (out / "env.json").exists()
    assert {p.name for p in out.iterdir()} <= OUTPUTS


def test_every_gpu_test_lives_where_gpu_check_collects():
    """gpu-check collects GPU_TEST_FILES only: a gpu- or configs-marked test elsewhere would
    never run on a GPU."""
    source = SCRIPT.read_text()
    listed = re.search(r"GPU_TEST_FILES = \(([^)]*)\)", source).group(1)
    files = set(listed.replace('"', "").replace(" ", "").split(","))
    files.discard("")
    root = SCRIPT.parent.parent
    marked = {str(p.relative_to(root)) for p in (root / "tests").rglob("test_*.py")
              if re.search(r"pytest\.mark\.(gpu|configs)\b", p.read_text())}
    assert marked and marked <= files, marked - files
