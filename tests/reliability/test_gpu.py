"""Native kernels on a CUDA GPU at a model's shapes (skipped on CPU-only machines; every other
test also runs natively there, since the `device` fixture is then CUDA)."""

import pytest
import torch

from peft_ops.ops.lora import LoraLinearFunction
from peft_ops.tools import check
from peft_ops.tools.accuracy import (
    DoraCase,
    LoraCase,
    make_lora_inputs,
    run_bottleneck_case,
    run_dora_case,
    run_embedding_case,
    run_lora_case,
    run_qlora_case,
)

from conftest import lora_ops
from helpers.tile_cases import KERNELS as TILE_CASES

pytestmark = pytest.mark.gpu

# Every case of `peft-ops check` (fp32/fp16/bf16; odd shapes, 3-D and strided x, dropout, bias,
# fp32 adapters, the NF4 decode and GEMM paths, every adapter activation) on the kernels.
CHECK_CASES = [("lora", c) for c in check.lora_cases(quick=False)] + \
    [("qlora", c) for c in check.qlora_cases(quick=False)] + \
    [("dora", c) for c in check.dora_cases(quick=False)] + \
    [("bottleneck", c) for c in check.bottleneck_cases(quick=False)] + \
    [("embedding", c) for c in check.embedding_cases(quick=False)]


def _case_id(item):
    op, case = item
    dtype = str(case.dtype).rsplit(".", 1)[-1]
    return f"{op}-{dtype}-{case.label()}" + (f"-p{case.dropout_p}" if case.dropout_p else "") + (
        "-fp32AB" if getattr(case, "adapter_dtype", None) else "")


@pytest.mark.parametrize("item", CHECK_CASES, ids=[_case_id(c) for c in CHECK_CASES])
def test_every_check_case_matches_float64_on_the_gpu(item):
    op, case = item
    run = {"lora": lambda: run_lora_case(case, lora_ops("triton"), device="cuda"),
           "qlora": lambda: run_qlora_case(case, "triton", device="cuda"),
           "dora": lambda: run_dora_case(case, "triton", device="cuda"),
           "bottleneck": lambda: run_bottleneck_case(case, "triton", device="cuda"),
           "embedding": lambda: run_embedding_case(case, "triton", device="cuda")}[op]
    for result in run():
        result.check(f"cuda {case.label()}", case.tolerance(result.name))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.05])
def test_model_shapes_match_float64(dtype, dropout_p):
    case = LoraCase(M=512, K=4096, N=1024, r=16, dtype=dtype, dropout_p=dropout_p, leading=(2,))
    for result in run_lora_case(case, lora_ops("triton"), device="cuda"):
        result.check(f"cuda {case.label()}", case.tolerance(result.name))


@pytest.mark.parametrize("nf4", [False, True], ids=["dora", "qdora"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.05])
def test_dora_at_model_shapes_matches_float64(nf4, dropout_p):
    """DoRA at a model's shape: the norm kernel's split-K and the dY pass's row slices at their
    GPU sizes, the persistent GEMMs with the DoRA epilogue."""
    case = DoraCase(M=1024, K=4096, N=1024, r=16, dtype=torch.bfloat16, dropout_p=dropout_p, nf4=nf4,
                    adapter_dtype=torch.float32)
    for result in run_dora_case(case, "triton", device="cuda"):
        result.check(f"cuda {case.label()}", case.tolerance(result.name))


def test_backward_is_bitwise_deterministic():
    inp = make_lora_inputs(LoraCase(M=1024, K=2048, N=2048, r=16, dtype=torch.bfloat16), "cuda")
    grads = []
    for _ in range(5):
        x = inp["x"].clone().requires_grad_()
        A = inp["lora_A"].clone().requires_grad_()
        B = inp["lora_B"].clone().requires_grad_()
        torch.manual_seed(0)
        y = LoraLinearFunction.apply(x, inp["weight"], A, B, inp["bias"], 2.0, 0.1, lora_ops("triton"))
        y.backward(inp["grad_out"])
        grads.append((y.detach(), x.grad, A.grad, B.grad))
    for later in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], later))


@pytest.mark.parametrize("dtype, m, M", [(torch.float32, 64, 1024), (torch.float32, 128, 1024),
                                         (torch.bfloat16, 64, 1024), (torch.bfloat16, 128, 1024),
                                         (torch.bfloat16, 128, 4096), (torch.bfloat16, 256, 1024)],
                         ids=["fp32-m64", "fp32-m128", "bf16-m64", "bf16-m128", "bf16-m128-M8192", "bf16-m256"])
def test_adapter_at_model_shapes_matches_float64(dtype, m, M):
    from peft_ops.tools.accuracy import BottleneckCase, run_bottleneck_case

    # m = 128 (fp32) and 256 (bf16): each dtype's widest kernel tile; m ≥ 128 takes the two-pass
    # forward and the split dX kernel, bf16 m = 128 over 8192 rows (2 × 4096) the one-kernel
    # forward on sm_90a; the harness fails if no kernel ran
    case = BottleneckCase(M=M, d=4096, m=m, dtype=dtype, activation="gelu", dropout_p=0.1, leading=(2,))
    for result in run_bottleneck_case(case, "triton", device="cuda"):
        result.check(f"cuda {case.label()}", case.tolerance(result.name))


@pytest.mark.parametrize("m", [64, 256])
def test_adapter_backward_is_bitwise_deterministic(m):
    from peft_ops.ops.bottleneck import BottleneckAdapterFunction, _kernel_ops
    from peft_ops.tools.accuracy import BottleneckCase, make_bottleneck_inputs

    inp = make_bottleneck_inputs(BottleneckCase(M=4096, d=4096, m=m, dtype=torch.bfloat16), "cuda")
    names = ("x", "down_weight", "down_bias", "up_weight", "up_bias")
    results = []
    for _ in range(5):
        tensors = [inp[k].clone().requires_grad_() for k in names]
        torch.manual_seed(0)
        y = BottleneckAdapterFunction.apply(*tensors, "silu", 1.0, 0.1, _kernel_ops())
        y.backward(inp["grad_out"])
        results.append([y.detach()] + [t.grad for t in tensors])
    for later in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], later))


def test_compiled_model_on_the_kernels_equals_eager():
    import sys

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from test_torch_compile import Model, run

    torch._dynamo.reset()
    model = Model().to("cuda", torch.bfloat16)
    x = torch.randn(2, 64, 32, device="cuda", dtype=torch.bfloat16)
    eager = run(model, x)
    compiled = run(torch.compile(model, fullgraph=True), x)
    for a, b in zip(eager, compiled):
        assert torch.allclose(a, b, rtol=1e-2, atol=1e-3)


def test_custom_ops_on_the_kernels_pass_opcheck():
    import sys

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from test_torch_compile import _opcheck_cases

    for op, args in _opcheck_cases().values():
        args = tuple(a.cuda() if isinstance(a, torch.Tensor) and a.dim() > 0 else a for a in args)
        args = tuple("triton" if isinstance(a, str) and a == "torch" else a for a in args)
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.configs
@pytest.mark.parametrize("kernel", sorted(TILE_CASES))
def test_every_autotune_config(kernel, monkeypatch):
    """Every config of every family of `kernel` on this GPU's target, forced one at a time, at
    small odd shapes: against float64, and in half precision against the PyTorch path."""
    from peft_ops.kernels import bottleneck, common, embedding, lora, nf4  # noqa: F401  (register the kernels)

    from helpers.tile_cases import gemm_for, run_checked

    monkeypatch.setenv("PEFT_OPS_GEMM", gemm_for(kernel))

    case_of, _ = TILE_CASES[kernel]
    target = common.process_target()
    for family, configs in common.tile_families(kernel, target).items():
        for config in configs:
            with common.forced_config(kernel, config):
                try:
                    run_checked(case_of(family))
                except AssertionError as err:
                    raise AssertionError(f"{kernel} {family} {config}: {err}") from err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cublas_path_at_model_shapes_matches_float64(dtype):
    case = LoraCase(M=512, K=4096, N=1024, r=16, dtype=dtype, dropout_p=0.05, train_base=True)
    for result in run_lora_case(case, lora_ops("cublas"), device="cuda"):
        result.check(f"cuda cublas {case.label()}", case.tolerance(result.name))


def test_tune_caches_winners_the_ops_then_use(tmp_path, monkeypatch):
    from peft_ops.ops import gemm_choice
    from peft_ops.tools import tune
    from peft_ops.tools.bench import PRESETS

    monkeypatch.setenv("PEFT_OPS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("PEFT_OPS_GEMM", raising=False)
    monkeypatch.delenv("PEFT_OPS_NF4", raising=False)
    timings = tune.tune(PRESETS["smoke"], torch.bfloat16, progress=lambda _: None)
    assert all(ms[o] > 0 for key, ms in timings.items() for o in tune.options(key.split("|")[0])[0])
    chosen = tune.decide(timings)
    gemm_choice.write(torch.cuda.get_device_name(), gemm_choice.versions(), chosen)
    for phase, dtype, M, N, K, r in tune.cases(PRESETS["smoke"], torch.bfloat16):
        key = gemm_choice.shape_key(phase, dtype, M, N, K, r)
        if phase in gemm_choice.NF4_PHASES:
            assert gemm_choice.choose_nf4(phase, dtype, M, N, K, r, torch.device("cuda")) == chosen[key]["path"]
        else:
            assert gemm_choice.choose(phase, dtype, M, N, K, r, torch.device("cuda")) == chosen[key]["gemm"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_multi_lora_at_model_shapes_matches_float64_and_is_deterministic(dtype):
    """The grouped kernels at a model's shapes (4096 → 1024; ranks 16, 8, 64, 4 — the last one
    unaligned —, one adapter with a single row, one with none, rows without an adapter): within
    the op tests' tolerance of float64, equal to lora_linear's kernels per adapter under
    dropout (the same masks), and bitwise deterministic."""
    import peft_ops

    gen = torch.Generator().manual_seed(0)
    ranks, counts = (16, 8, 64, 4, 8), (700, 1, 300, 0, 210)
    ids = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)] + [torch.full((23,), -1)])
    ids = ids[torch.randperm(len(ids), generator=gen)]
    M, K, N = len(ids), 4096, 1024

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to("cuda", dtype)

    x, weight, bias, dy = rand(M, K), rand(N, K, scale=K ** -0.5), rand(N), rand(M, N)
    lora_As = [rand(r, K, scale=K ** -0.5) for r in ranks]
    lora_Bs = [rand(N, r, scale=r ** -0.5) for r in ranks]
    scalings = [2.0, 0.5, 1.0, 4.0, 1.5]

    def run(dropout_ps, seed=3):
        leaves = [t.detach().clone().requires_grad_() for t in (x, *lora_As, *lora_Bs)]
        torch.manual_seed(seed)
        y = peft_ops.multi_lora_linear(leaves[0], weight, leaves[1:6], leaves[6:], scalings, ids, bias, dropout_ps)
        return y, torch.autograd.grad(y, leaves, dy)

    def relative(a, b):
        return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()

    y, grads = run(None)
    exact = [t.double().requires_grad_() for t in (x, *lora_As, *lora_Bs)]
    y64 = peft_ops.reference.multi_lora_linear(exact[0], weight.double(), exact[1:6], exact[6:], scalings, ids.cuda(),
                                               bias.double())
    want = torch.autograd.grad(y64, exact, dy.double())
    assert relative(y, y64) <= 2e-2
    for index, (a, b) in enumerate(zip(grads, want)):
        if index in (4, 9):  # adapter 3 has no rows: exact zeros
            assert torch.equal(a, torch.zeros_like(a))
        else:
            assert relative(a, b) <= 2e-2, index
    dropout_ps = [0.1, 0.2, 0.05, 0.3, 0.0]
    first, again = run(dropout_ps), run(dropout_ps)
    assert torch.equal(first[0], again[0]) and all(torch.equal(a, b) for a, b in zip(first[1], again[1]))
    singles = [t.detach().clone().requires_grad_() for t in (x, *lora_As, *lora_Bs)]
    torch.manual_seed(3)  # the same seeds, in adapter order, for the adapters with rows
    expected = torch.nn.functional.linear(singles[0], weight, bias)
    for k in range(5):
        rows = (ids == k).nonzero().reshape(-1).cuda()
        if len(rows):
            part = peft_ops.lora_linear(singles[0][rows], weight, singles[1 + k], singles[6 + k], scalings[k], bias,
                                        dropout_ps[k])
            expected = expected.index_put((rows,), part)
    single_grads = torch.autograd.grad(expected, singles, dy, allow_unused=True)
    assert relative(first[0], expected) <= 2e-2
    for index, (a, b) in enumerate(zip(first[1], single_grads)):
        if b is not None:
            assert relative(a, b) <= 2e-2, index
