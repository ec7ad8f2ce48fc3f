"""Which implementation of the LoRA GEMMs runs: the tuning cache, its keys, the default rule,
the PEFT_OPS_GEMM override (the tuning itself needs a GPU: tests/reliability/test_gpu.py)."""

import json

import pytest
import torch

from peft_ops.ops import gemm_choice

CUDA = torch.device("cuda", 0)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_OPS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("PEFT_OPS_GEMM", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    gemm_choice._device_name.cache_clear()
    gemm_choice._choices.cache_clear()
    yield tmp_path
    gemm_choice._device_name.cache_clear()
    gemm_choice._choices.cache_clear()


def test_keys_bucket_rows_and_ranks():
    key = gemm_choice.shape_key("forward", torch.bfloat16, 5000, 4096, 14336, 12)
    assert key == "forward|bfloat16|M8192|N4096|K14336|r16"
    assert gemm_choice.shape_key("dx", torch.float16, 1, 8, 8, 1) == "dx|float16|M1|N8|K8|r1"
    assert gemm_choice.shape_key("dx", torch.float16, 64, 8, 8, 64) == "dx|float16|M64|N8|K8|r64"


def test_the_file_is_per_gpu_and_versions(cache):
    path = gemm_choice.cache_file("NVIDIA H200 (MIG 1g)", {"torch": "2.11.0+cu128", "triton": "3.6.0"})
    assert path == cache / "tune" / "NVIDIA-H200-MIG-1g-torch2.11.0+cu128-triton3.6.0.json"


def test_default_rule_without_a_tuning(cache):
    assert gemm_choice.choose("forward", torch.bfloat16, 8192, 4096, 4096, 16, CUDA) == "triton"
    assert gemm_choice.choose("forward", torch.bfloat16, 16, 4096, 4096, 16, CUDA) == "cublas"
    assert gemm_choice.default_rule(63) == "cublas" and gemm_choice.default_rule(64) == "triton"
    # a launch plan follows the GPU's rule; the interpreter (CPU) runs the fused kernels it tests
    assert gemm_choice.choose("dx", torch.bfloat16, 16, 64, 64, 8, torch.device("meta")) == "cublas"
    assert gemm_choice.choose("dx", torch.bfloat16, 16, 64, 64, 8, torch.device("cpu")) == "triton"


def test_a_tuning_overrides_the_rule_for_its_gpu_and_versions_only(cache, monkeypatch):
    key = gemm_choice.shape_key("forward", torch.bfloat16, 8192, 4096, 4096, 16)
    path = gemm_choice.write("NVIDIA H200", gemm_choice.versions(),
                             {key: {"gemm": "cublas", "ms": {"triton": 0.40, "cublas": 0.38}}})
    assert gemm_choice.choose("forward", torch.bfloat16, 6000, 4096, 4096, 16, CUDA) == "cublas"  # same bucket
    assert gemm_choice.choose("dx", torch.bfloat16, 8192, 4096, 4096, 16, CUDA) == "triton"  # not tuned: rule
    # a second write merges; the record says what it was measured on
    other = gemm_choice.shape_key("dx", torch.bfloat16, 16, 4096, 4096, 16)
    gemm_choice.write("NVIDIA H200", gemm_choice.versions(), {other: {"gemm": "triton", "ms": {}}})
    record = json.loads(path.read_text())
    assert set(record["choices"]) == {key, other} and record["device"] == "NVIDIA H200"
    assert record["torch"] == torch.__version__
    assert gemm_choice.choose("dx", torch.bfloat16, 16, 4096, 4096, 16, CUDA) == "triton"
    # another GPU, or another triton, has no tuning
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    gemm_choice._device_name.cache_clear()
    assert gemm_choice.choose("forward", torch.bfloat16, 8192, 4096, 4096, 16, CUDA) == "triton"


def test_a_broken_tuning_file_is_no_tuning(cache):
    path = gemm_choice.cache_file("NVIDIA H200", gemm_choice.versions())
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert gemm_choice.choose("forward", torch.bfloat16, 8192, 4096, 4096, 16, CUDA) == "triton"
    gemm_choice._choices.cache_clear()  # read once per process: a new process would see this file
    path.write_text(json.dumps({"choices": {gemm_choice.shape_key("forward", torch.bfloat16, 8192, 4096, 4096, 16):
                                            {"gemm": "magma"}}}))
    assert gemm_choice.choose("forward", torch.bfloat16, 8192, 4096, 4096, 16, CUDA) == "triton"


def test_the_environment_forces_a_choice(cache, monkeypatch):
    monkeypatch.setenv("PEFT_OPS_GEMM", "cublas")
    assert gemm_choice.choose("forward", torch.bfloat16, 8192, 4096, 4096, 16, CUDA) == "cublas"
    assert gemm_choice.choose("forward", torch.bfloat16, 8192, 4096, 4096, 16, torch.device("cpu")) == "cublas"
    monkeypatch.setenv("PEFT_OPS_GEMM", "cutlass")
    with pytest.raises(ValueError, match="PEFT_OPS_GEMM"):
        gemm_choice.choose("forward", torch.bfloat16, 8192, 4096, 4096, 16, CUDA)


def test_the_launchers_refuse_an_unknown_gemm():
    from peft_ops.backend import kernel_modules

    lora = kernel_modules().lora
    x, w, b = torch.zeros(2, 8), torch.zeros(4, 8), torch.zeros(4, 1)
    with pytest.raises(ValueError, match="gemm"):
        lora.forward(x, w, torch.zeros(2, 1), b, 1.0, None, gemm="cutlass")
    with pytest.raises(ValueError, match="gemm"):
        lora.backward(torch.zeros(2, 4), x, w, torch.zeros(1, 8), b, torch.zeros(2, 1), None, 1.0, 0.0,
                      True, True, True, False, gemm="cutlass")


def test_the_nf4_path_rule_tuning_and_override(cache, monkeypatch):
    """The QLoRA products: the fused NF4 kernels below 512 rows (the GEMV up to 16, the fused
    dequant-GEMMs above), W decoded into the workspace and the dense path from 512 rows; a
    tuning or PEFT_OPS_NF4 overrides."""
    monkeypatch.delenv("PEFT_OPS_NF4", raising=False)
    assert gemm_choice.choose_nf4("nf4-forward", torch.bfloat16, 16, 4096, 4096, 16, CUDA) == "fused"
    assert gemm_choice.choose_nf4("nf4-forward", torch.bfloat16, 511, 4096, 4096, 16, CUDA) == "fused"
    assert gemm_choice.choose_nf4("nf4-forward", torch.bfloat16, 512, 4096, 4096, 16, CUDA) == "dequant"
    assert gemm_choice.choose_nf4("nf4-dx", torch.bfloat16, 8192, 4096, 4096, 16, torch.device("meta")) == "dequant"
    assert gemm_choice.choose_nf4("nf4-dx", torch.bfloat16, 8192, 64, 64, 8, torch.device("cpu")) == "fused"
    key = gemm_choice.shape_key("nf4-forward", torch.bfloat16, 8192, 4096, 4096, 16)
    gemm_choice.write("NVIDIA H200", gemm_choice.versions(), {key: {"path": "fused", "ms": {}}})
    assert gemm_choice.choose_nf4("nf4-forward", torch.bfloat16, 8192, 4096, 4096, 16, CUDA) == "fused"
    assert gemm_choice.choose_nf4("nf4-dx", torch.bfloat16, 8192, 4096, 4096, 16, CUDA) == "dequant"  # not tuned
    monkeypatch.setenv("PEFT_OPS_NF4", "dequant")
    assert gemm_choice.choose_nf4("nf4-forward", torch.bfloat16, 8192, 4096, 4096, 16, CUDA) == "dequant"
    monkeypatch.setenv("PEFT_OPS_NF4", "fast")
    with pytest.raises(ValueError, match="PEFT_OPS_NF4"):
        gemm_choice.choose_nf4("nf4-forward", torch.bfloat16, 8192, 4096, 4096, 16, CUDA)
