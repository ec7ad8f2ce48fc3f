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
    # r 12 and 16 share a bucket, so do M 5000 and 8192; two LoRA phases, two QLoRA ones
    assert len(keys) == len(set(keys)) == 2 * 4
    assert {c[0] for c in cases} == {"forward", "dx", "nf4-forward", "nf4-dx"}


def test_decide_takes_the_faster_and_triton_on_a_tie():
    chosen = tune.decide({"a": {"triton": 0.41, "cublas": 0.39}, "b": {"triton": 0.2, "cublas": 0.2},
                          "c": {"triton": 0.1, "cublas": 0.3}})
    assert {k: v["gemm"] for k, v in chosen.items()} == {"a": "cublas", "b": "triton", "c": "triton"}
    assert chosen["a"]["ms"] == {"triton": 0.41, "cublas": 0.39}
    # the QLoRA phases choose a path (ties: the fused kernels)
    nf4 = tune.decide({"nf4-forward|x": {"fused": 0.3, "dequant": 0.2}, "nf4-dx|x": {"fused": 0.2, "dequant": 0.2}})
    assert {k: v["path"] for k, v in nf4.items()} == {"nf4-forward|x": "dequant", "nf4-dx|x": "fused"}


def test_the_qlora_phase_calls_run_both_paths(device):
    """What tune would time for the QLoRA phases runs on either path (here: interpreted)."""
    for phase in gemm_choice.NF4_PHASES:
        for path in gemm_choice.NF4_PATHS:
            out = tune.phase_call(phase, path, torch.float32, 32, 24, 64, 4, device)()
            assert (out.shape if phase == "nf4-forward" else out[0].shape) == ((32, 24) if phase == "nf4-forward"
                                                                                else (32, 64))


@pytest.mark.skipif(torch.cuda.is_available(), reason="off a GPU only")
def test_tune_needs_a_gpu_and_dry_run_lists_the_cases(capsys):
    assert cli.main(["tune", "--preset", "quick"]) == 2
    assert "CUDA GPU" in capsys.readouterr().out
    assert cli.main(["tune", "--preset", "quick", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for case in tune.cases(PRESETS["quick"], torch.bfloat16):
        assert gemm_choice.shape_key(*case) in out
