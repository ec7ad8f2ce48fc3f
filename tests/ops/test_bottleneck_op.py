"""bottleneck_adapter against a float64 reference: forward and every gradient, both paths
(Triton kernels — interpreted on CPU — and the PyTorch path), every activation and dtype."""

import pytest
import torch

import peft_ops
from peft_ops import reference
from peft_ops.kernels.interface import ACTIVATIONS
from peft_ops.ops.bottleneck import BottleneckAdapterFunction
from peft_ops.ops.paths import eager_ops
from peft_ops.tools.accuracy import (
    BottleneckCase,
    assert_close,
    make_bottleneck_inputs,
    run_bottleneck_case,
    saved_activation_bytes,
)
from peft_ops.tools.launches import KernelsRan

PATHS = ["triton", "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]

# (M, d, m): odd sizes; m = 1, 20 (one 32-wide tile), 64, and each dtype's widest tile class
# ("wide": fp16/bf16 m = 130, the 256-wide tile whose dX kernel runs three roles of programs; fp32
# m = 100, its 128-wide tile). Past the widest tile the PyTorch path runs: its own test below.
SHAPES = [(1, 3, 1), (37, 70, 20), (45, 33, 64), (20, 40, "wide")]


def bottleneck(m, dtype) -> int:
    return (100 if dtype == torch.float32 else 130) if m == "wide" else m


def ops_for(path: str):
    return eager_ops("bottleneck", path)


def check_case(case: BottleneckCase, path: str, device) -> None:
    for result in run_bottleneck_case(case, path, device=device):
        assert result.actual.dtype == case.dtype, result.name
        result.check(f"{path} {case.label()}", case.tolerance(result.name))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}_d{}_m{}".format(*s))
def test_forward_and_gradients(shape, activation, dtype, path, device):
    M, d, m = shape
    check_case(BottleneckCase(M, d, bottleneck(m, dtype), dtype, activation), path, device)


VARIANTS = {
    "dropout": dict(dropout_p=0.3),
    "no_bias": dict(bias=False),
    "3d_input": dict(leading=(3,)),
    "non_contiguous_x": dict(x_transposed=True, leading=(2,)),
    "negative_scaling": dict(scaling=-2.0),
    "dropout_3d_no_bias": dict(dropout_p=0.5, leading=(2,), bias=False),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_variants(variant, dtype, path, device):
    check_case(BottleneckCase(M=41, d=48, m=24, dtype=dtype, activation="gelu", **VARIANTS[variant]), path, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backward_over_several_row_slices(dtype, monkeypatch, device):
    # The dX kernel sums parameter gradients per row slice; force several slices at a small M.
    from peft_ops.kernels import bottleneck as kernels

    monkeypatch.setattr(kernels, "ROWS_PER_SLICE", 16)
    assert kernels.row_slices(70, 40, 16, 16)[0] == 5
    check_case(BottleneckCase(M=70, d=40, m=12, dtype=dtype, activation="silu", dropout_p=0.2), "triton", device)


def test_row_slices_cover_every_row_once():
    from peft_ops.kernels.bottleneck import TARGET_PROGRAMS, row_slices

    for M in (1, 15, 16, 17, 1000, 1025, 8192, 100_000):
        for D, block_d in ((4096, 64), (40, 16), (11008, 32)):
            slices, rows = row_slices(M, D, 16, block_d)
            assert rows % 16 == 0 and (slices - 1) * rows < M <= slices * rows
            assert slices == 1 or slices * -(-D // block_d) <= 2 * TARGET_PROGRAMS


@pytest.mark.parametrize("path", PATHS)
def test_backward_is_bitwise_deterministic(path, device):
    inp = make_bottleneck_inputs(BottleneckCase(M=70, d=40, m=20, dtype=torch.float32), device)
    grads = []
    for _ in range(3):
        tensors = [inp[k].clone().requires_grad_(True) for k in ("x", "down_weight", "down_bias", "up_weight",
                                                                  "up_bias")]
        torch.manual_seed(1)
        BottleneckAdapterFunction.apply(*tensors, "gelu", 0.5, 0.2, ops_for(path)).backward(inp["grad_out"])
        grads.append([t.grad for t in tensors])
    for again in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], again))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("needs", [("x",), ("down_weight",), ("up_bias",), ("x", "up_weight")])
@pytest.mark.parametrize("dtype, m", [(torch.float32, 8), (torch.bfloat16, 130)], ids=["fp32_m8", "bf16_m130"])
def test_gradients_only_where_required(needs, dtype, m, path, device):
    """bf16 m = 130: the 256-wide tile, whose dX launch splits its programs in roles — dX's
    alone, the partials' roles alone (no dX programs), or all three."""
    case = BottleneckCase(M=9, d=24, m=m, dtype=dtype, activation="silu")
    inp = make_bottleneck_inputs(case, device)
    names = ("x", "down_weight", "down_bias", "up_weight", "up_bias")
    tensors = {k: inp[k].clone().requires_grad_(k in needs) for k in names}
    ref = {k: inp[k].double().requires_grad_(k in needs) for k in names}
    BottleneckAdapterFunction.apply(*tensors.values(), "silu", 0.75, 0.0, ops_for(path)).backward(inp["grad_out"])
    reference.bottleneck_adapter(*ref.values(), "silu", 0.75).backward(inp["grad_out"].double())
    for k in names:
        if k in needs:
            assert_close(tensors[k].grad, ref[k].grad, dtype, k)
        else:
            assert tensors[k].grad is None


@pytest.mark.parametrize("path", PATHS)
def test_empty_batch(path, device):
    inp = make_bottleneck_inputs(BottleneckCase(M=0, d=16, m=4, dtype=torch.float32), device)
    tensors = [inp[k].clone().requires_grad_(True) for k in ("x", "down_weight", "down_bias", "up_weight", "up_bias")]
    y = BottleneckAdapterFunction.apply(*tensors, "relu", 1.0, 0.0, ops_for(path))
    assert y.shape == (0, 16)
    y.sum().backward()
    assert all(t.grad is not None and not t.grad.any() for t in tensors)


@pytest.mark.parametrize("path", PATHS)
def test_double_backward_raises(path, device):
    inp = make_bottleneck_inputs(BottleneckCase(M=4, d=16, m=4, dtype=torch.float32), device)
    x = inp["x"].requires_grad_(True)
    y = BottleneckAdapterFunction.apply(x, inp["down_weight"], None, inp["up_weight"], None, "gelu", 1.0, 0.0,
                                        ops_for(path))
    (dx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        dx.sum().backward()


def test_public_function_dispatches_and_matches(device):
    case = BottleneckCase(M=10, d=24, m=8, dtype=torch.float32, activation="gelu_tanh")
    inp = make_bottleneck_inputs(case, device)
    args = [inp[k] for k in ("x", "down_weight", "down_bias", "up_weight", "up_bias")]
    expected = reference.bottleneck_adapter(*[a.double() for a in args], "gelu_tanh", 0.5)
    for backend in ("auto", "triton"):  # the other backends: tests/ops/test_backend.py
        with peft_ops.use_backend(backend):
            assert_close(peft_ops.bottleneck_adapter(*args, activation="gelu_tanh", scaling=0.5), expected,
                         torch.float32, backend)


def test_bottleneck_past_the_kernel_tile_runs_the_pytorch_path(monkeypatch, device):
    # m past the kernels' widest tile: the op is compute-bound there and runs the PyTorch path, correctly.
    from peft_ops.kernels.bottleneck import max_bottleneck

    assert (max_bottleneck(torch.float32), max_bottleneck(torch.bfloat16)) == (128, 256)
    case = BottleneckCase(M=6, d=20, m=max_bottleneck(torch.float32) + 1, dtype=torch.float32)
    inp = make_bottleneck_inputs(case, device)
    args = [inp[k].requires_grad_(k != "x") for k in ("x", "down_weight", "down_bias", "up_weight", "up_bias")]
    with peft_ops.use_backend("triton"), KernelsRan() as ran:
        y = peft_ops.bottleneck_adapter(*args, activation="relu", scaling=0.75)
        y.backward(inp["grad_out"])
    assert not ran.names
    ref = [a.detach().double().requires_grad_(True) for a in args]
    reference.bottleneck_adapter(*ref, "relu", 0.75).backward(inp["grad_out"].double())
    assert_close(y, reference.bottleneck_adapter(*[a.double() for a in args], "relu", 0.75), torch.float32)
    assert_close(args[3].grad, ref[3].grad, torch.float32, "dW_up")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_saved_bytes_are_x_plus_h(dropout_p, path, device):
    M, d, m = 64, 48, 16
    inp = make_bottleneck_inputs(BottleneckCase(M=M, d=d, m=m, dtype=torch.bfloat16), device)
    params = [inp[k].requires_grad_(True) for k in ("down_weight", "down_bias", "up_weight", "up_bias")]
    x = inp["x"]  # a frozen layer's output: the adapter's input need not require grad
    ours, saved, _ = saved_activation_bytes(
        lambda: BottleneckAdapterFunction.apply(x, *params, "gelu", 1.0, dropout_p, ops_for(path)), params)
    assert ours == x.numel() * 2 + M * m * 4  # x (not copied) + h in fp32
    assert any(t.data_ptr() == x.data_ptr() for t in saved)
    eager, _, _ = saved_activation_bytes(
        lambda: reference.bottleneck_adapter(x, *params, "gelu", 1.0, dropout_p), params)
    # Eager saves x, h and act(h) in x's dtype (as many bytes as ours), and the M×d dropout mask.
    assert eager >= ours + (M * d if dropout_p else 0)


def test_no_h_saved_without_grad(device):
    inp = make_bottleneck_inputs(BottleneckCase(M=8, d=16, m=4, dtype=torch.float32), device)
    args = [inp[k] for k in ("x", "down_weight", "down_bias", "up_weight", "up_bias")]
    nbytes, saved, y = saved_activation_bytes(lambda: peft_ops.bottleneck_adapter(*args), [])
    assert nbytes == 0 and not y.requires_grad


@pytest.mark.parametrize("path", PATHS)
def test_dropout_keeps_the_right_share_and_replays_in_backward(path, device):
    """The forward's mask, read out of y (dropped: y = x exactly), replayed in the float64
    reference reproduces every gradient: the backward regenerated the same mask."""
    case = BottleneckCase(M=64, d=64, m=8, dtype=torch.float32, dropout_p=0.4)
    inp = make_bottleneck_inputs(case, device)
    names = ("x", "down_weight", "down_bias", "up_weight", "up_bias")
    tensors = [inp[k].clone().requires_grad_(True) for k in names]
    torch.manual_seed(0)
    y = BottleneckAdapterFunction.apply(*tensors, "relu", 1.0, 0.4, ops_for(path))
    no_drop = BottleneckAdapterFunction.apply(*[t.detach() for t in tensors], "relu", 1.0, 0.0, ops_for(path))
    kept = y.detach() != inp["x"]
    assert (no_drop != inp["x"]).all()
    assert abs(float(kept.float().mean()) - 0.6) < 0.03
    y.backward(inp["grad_out"])
    ref = [inp[k].double().requires_grad_(True) for k in names]
    reference.bottleneck_adapter(*ref, "relu", 1.0, 0.4, dropout_mask=kept).backward(inp["grad_out"].double())
    for name, t, r in zip(names, tensors, ref):
        assert_close(t.grad, r.grad, torch.float32, f"d{name}")
