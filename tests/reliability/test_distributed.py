"""DDP and FSDP2 (gloo, 2 CPU processes on loopback): one training step of a model with
LoraLinear, QLoraLinear and a BottleneckAdapter — as LoRA and as DoRA layers — gives the
gradients and updated adapter weights of a single process on the global batch, and the
adapters save from rank 0 to PEFT's files. FSDP2 shards the Parameters; NF4 weights are
buffers, so they stay replicated."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

WORKER = pathlib.Path(__file__).parents[1] / "helpers" / "distributed_worker.py"
TOL = 1e-5  # fp32: the two halves' mean gradients against the whole batch's, relative to the largest


def run(mode: str, out: pathlib.Path) -> None:
    args = [sys.executable, str(WORKER), mode, str(out)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.fixture(scope="module", params=["", "+dora"], ids=["lora", "dora"])
def single(request, tmp_path_factory):
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("dist")
    run("single" + request.param, out)
    return out, load_file(out / f"single{request.param}.safetensors"), request.param


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_one_step_equals_a_single_process(mode, single):
    from safetensors.torch import load_file

    out, expected, variant = single
    mode += variant
    run(mode, out)
    got = load_file(out / f"{mode}.safetensors")
    assert set(got) == set(expected)
    names = {k.split(".", 1)[1] for k in expected}
    assert {"lora.lora_A", "qlora.lora_B", "adapter.down_weight", "adapter.up_bias"} <= names
    if variant:
        assert {"lora.lora_magnitude_vector", "qlora.lora_magnitude_vector"} <= names
    for key, value in expected.items():
        error = ((got[key] - value).abs().max() / value.abs().max()).item()
        assert error <= TOL, (mode, key, error)
    # the adapters rank 0 wrote are the single process's, in PEFT's layout
    ours, theirs = (load_file(out / f"peft_{m}" / "adapter_model.safetensors") for m in (mode, "single" + variant))
    magnitudes = {f"base_model.model.{n}.lora_magnitude_vector" for n in ("lora", "qlora")} if variant else set()
    assert set(ours) == set(theirs) == {f"base_model.model.{n}.lora_{ab}.weight" for n in ("lora", "qlora")
                                        for ab in "AB"} | magnitudes
    for key in ours:
        assert torch.allclose(ours[key], theirs[key], rtol=TOL, atol=TOL * theirs[key].abs().max().item()), key
