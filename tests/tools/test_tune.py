"""`peft-ops tune` off a GPU: the cases it would time, how it decides, and that it refuses to
time without a CUDA GPU (on one, tests/reliability/test_gpu.py runs it)."""

import pytest
import torch

from peft_ops.ops import gemm_choice
from peft_ops.tools import cli, tune
from peft_ops.tools.bench import PRESETS


def test_cases_are_one_per_cache_key():
    preset = dict(layers=[(4096, 4096)], ranks=[12, 16], tokens=[5000, 8192, 1])
    cases = tune.cases(preset, torch.bfloat16)
    keys = [gemm_choice.shape_key(*c) for c in cases]
    assert len(keys) == len(set(keys)) == 2 * 2  # r 12 and 16 share a bucket, so do M 5000 and 8192
    assert {c[0] for c in cases} == {"forward", "dx"}


def test_decide_takes_the_faster_and_triton_on_a_tie():
    chosen = tune.decide({"a": {"triton": 0.41, "cublas": 0.39}, "b": {"triton": 0.2, "cublas": 0.2},
                          "c": {"triton": 0.1, "cublas": 0.3}})
    assert {k: v["gemm"] for k, v in chosen.items()} == {"a": "cublas", "b": "triton", "c": "triton"}
    assert chosen["a"]["ms"] == {"triton": 0.41, "cublas": 0.39}


@pytest.mark.skipif(torch.cuda.is_available(), reason="off a GPU only")
def test_tune_needs_a_gpu_and_dry_run_lists_the_cases(capsys):
    assert cli.main(["tune", "--preset", "quick"]) == 2
    assert "CUDA GPU" in capsys.readouterr().out
    assert cli.main(["tune", "--preset", "quick", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for case in tune.cases(PRESETS["quick"], torch.bfloat16):
        assert gemm_choice.shape_key(*case) in out
