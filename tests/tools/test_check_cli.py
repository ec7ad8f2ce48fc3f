"""`peft-ops check`, the main job: table and exit code."""

import os
import subprocess
import sys

import torch

import peft_ops.tools.check as check


def test_check_command_passes_and_prints_the_table():
    # as a user (and CI) runs it: without TRITON_INTERPRET, which the command sets itself on a CPU
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "peft_ops.tools.cli", "check", "--quick"], capture_output=True,
                         text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    header = next(line for line in lines if line.startswith("op "))
    for column in ("op", "path", "shape", "dtype", "tensor", "max err", "tol", "pass"):
        assert column in header
    rows = [line for line in lines if line.startswith("lora_linear")]
    for dtype in ("fp32", "fp16", "bf16"):
        for tensor in ("y", "dx", "dA", "dB"):
            assert any(f" {dtype} " in r and f" {tensor} " in r for r in rows), (dtype, tensor)
    assert all(r.rstrip().endswith("ok") for r in rows)
    adapter_rows = [line for line in lines if line.startswith("bottleneck_adapter")]
    for dtype in ("fp32", "fp16", "bf16"):
        for tensor in ("y", "dx", "dW_down", "db_down", "dW_up", "db_up"):
            assert any(f" {dtype} " in r and f" {tensor} " in r for r in adapter_rows), (dtype, tensor)
    for activation in ("relu", "gelu", "gelu_tanh", "silu"):
        assert any(f" {activation} " in r for r in adapter_rows), activation
    assert all(r.rstrip().endswith("ok") for r in adapter_rows)
    if not torch.cuda.is_available():
        assert any(" triton " in r for r in rows) and any(" torch " in r for r in rows)


def test_check_exits_1_on_a_failure(monkeypatch, capsys):
    # A zero tolerance fails every row with a nonzero error: the exit code must say so.
    monkeypatch.setattr(check.LoraCase, "tolerance", lambda self, tensor="y": 0.0)
    one_case = check.lora_cases(True)[:1]
    monkeypatch.setattr(check, "lora_cases", lambda quick: one_case)
    monkeypatch.setattr(check, "qlora_cases", lambda quick: [])
    monkeypatch.setattr(check, "bottleneck_cases", lambda quick: [])
    monkeypatch.setattr(check, "dora_cases", lambda quick: [])
    monkeypatch.setattr(check, "embedding_cases", lambda quick: [])
    assert check.main(["--quick"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_cli_usage():
    from peft_ops.tools.cli import main

    assert main(["--help"]) == 0
    assert main(["frobnicate"]) == 2
