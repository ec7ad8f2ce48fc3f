"""nf4_linear and qlora_linear against float64 references on the exact dequantized weight:
forward and every gradient, both regimes (fused dequant-GEMM, split-K decode GEMV), both
paths (Triton kernels — interpreted on CPU — and the PyTorch path), fp32 / fp16 / bf16."""

import pytest
import torch

import peft_ops
from peft_ops import reference
from peft_ops.nf4 import quantize
from peft_ops.tools.accuracy import QLoraCase, assert_close, run_qlora_case, saved_activation_bytes

PATHS = ["triton", "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
MS = [1, 3, 16, 67, 257]  # 1, 3, 16: the decode GEMV; 67, 257: the GEMM


def check(case: QLoraCase, path: str, device) -> None:
    for result in run_qlora_case(case, path, device=device):
        expected_dtype = (case.adapter_dtype or case.dtype) if result.name in ("dA", "dB") else case.dtype
        assert result.actual.dtype == expected_dtype, result.name
        result.check(f"{path} {case.label()}", case.tolerance(result.name))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M", MS)
def test_qlora_linear(M, dtype, path, device):
    check(QLoraCase(M=M, K=64, N=40, r=8, dtype=dtype), path, device)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M", MS)
def test_nf4_linear(M, dtype, path, device):
    check(QLoraCase(M=M, K=96, N=33, r=1, dtype=dtype, lora=False, train_base=True), path, device)


VARIANTS = {
    "dropout": dict(dropout_p=0.3),
    "3d_input": dict(leading=(3,)),
    "non_contiguous_x": dict(x_transposed=True, leading=(2,)),
    "fp32_adapters": dict(adapter_dtype=torch.float32),
    "odd_K_blocksize_32": dict(K=45, blocksize=32),  # K odd: rows straddle bytes and blocks
    "K_not_multiple_of_blocksize": dict(K=100, blocksize=64),
    "no_double_quant_no_bias": dict(double_quant=False, bias=False),
    "r80_train_bias": dict(r=80, train_base=True),
}


# Every variant on the kernels in every dtype; the PyTorch path (which shares one code path
# for all of them) in fp32, plus dropout and fp32 adapters in every dtype.
VARIANT_RUNS = [(variant, dtype, path) for variant in VARIANTS for dtype in DTYPES for path in PATHS
                if path == "triton" or dtype == torch.float32 or variant in ("dropout", "fp32_adapters")]


@pytest.mark.parametrize("M", [3, 67], ids=["decode", "gemm"])
@pytest.mark.parametrize("variant, dtype, path", VARIANT_RUNS,
                         ids=[f"{v}-{DTYPE_IDS[DTYPES.index(d)]}-{p}" for v, d, p in VARIANT_RUNS])
def test_variants(variant, dtype, path, M, device):
    kw = dict(M=M, K=64, N=40, r=8, dtype=dtype)
    kw.update(VARIANTS[variant])
    check(QLoraCase(**kw), path, device)


@pytest.mark.parametrize("regime, M, split_k", [("gemm", 1, None), ("gemm", 16, None), ("decode", 16, 4),
                                               ("decode", 7, 2), ("decode", 2, 8)])  # 8: an empty last slice
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forced_regimes_and_split_k(regime, M, split_k, dtype, device):
    for lora in (True, False):
        check(QLoraCase(M=M, K=200, N=24, r=4, dtype=dtype, lora=lora, regime=regime, split_k=split_k),
              "triton", device)


WORD_GEMV_CASES = {
    "bs64": dict(blocksize=64),
    "bs32_no_double_quant": dict(blocksize=32, double_quant=False),  # two block tables per lane
    "bs128_K512_odd_N": dict(blocksize=128, K=512, N=67),  # a lane's block shared with its neighbour
    "bs256_no_bias_nf4_only": dict(blocksize=256, bias=False, lora=False, train_base=True, r=1),
    "dropout_fp32_adapters": dict(dropout_p=0.3, adapter_dtype=torch.float32),
    "r12": dict(r=12),  # B's rows not a multiple of 8: the epilogue's rank loads without B_ROWS_ALIGNED
}


@pytest.mark.parametrize("M", [1, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("variant", list(WORD_GEMV_CASES))
def test_the_word_decoding_gemv(variant, dtype, M, device):
    """The one-launch decode GEMV (16-bit x, K a multiple of 256): W decoded from 32-bit words
    straight into the tensor cores' operand order, x read in the same permuted k order."""
    from peft_ops.tools.launches import KernelsRan

    kw = dict(M=M, K=256, N=45, r=8, dtype=dtype)
    kw.update(WORD_GEMV_CASES[variant])
    with KernelsRan() as ran:
        check(QLoraCase(**kw), "triton", device)
    assert "_nf4_decode_gemv_kernel" in ran.names


@pytest.mark.parametrize("M", [2, 8, 9, 15])
def test_the_decode_gemv_x_tile_at_either_side_of_eight_rows(M, device):
    """The word GEMV takes an 8-row x tile up to M = 8 and a 16-row one above; rows past M are
    masked (zero-filled, never read): full and partial tiles of both sizes against float64."""
    from peft_ops.tools.launches import KernelsRan

    with KernelsRan() as ran:
        check(QLoraCase(M=M, K=256, N=45, r=8, dtype=torch.bfloat16, blocksize=64), "triton", device)
    assert "_nf4_decode_gemv_kernel" in ran.names


# (N·K / 64 blocks a multiple of 4: the 8-bit absmax codes are read as words in place, not
# through a padded copy)
@pytest.mark.parametrize("kernel, N, K, dtype", [("_nf4_decode_gemv_kernel", 45, 1024, torch.bfloat16),
                                                  ("_nf4_gemv_kernel", 32, 200, torch.float32)])
def test_split_k_partials_are_summed_in_the_same_launch(kernel, N, K, dtype, device, monkeypatch):
    """Narrow layers split K (here: a GPU of 4 SMs, so that the word GEMV asks for 4 slices): each
    program's fp32 partial goes to the scratch, the tile's last program sums them in slice order
    and writes y — one launch, no PyTorch tail, the counters left zero for the next call, the
    scratch reused, the result the same bits every call."""
    from peft_ops.kernels import nf4 as nf4_kernels
    from peft_ops.ops import workspace
    from peft_ops.ops.paths import KernelNF4Ops
    from peft_ops.tools.launches import KernelsRan, count

    monkeypatch.setattr(nf4_kernels, "multiprocessor_count", lambda device: 4)
    word = "decode" in kernel
    block_n = nf4_kernels.DECODE_GEMV_BLOCK_N["interpreter"] if word else nf4_kernels.GEMV_BLOCK_N_FOR_SPLIT
    k_tile = nf4_kernels.DECODE_GEMV_K_MULTIPLE if "decode" in kernel else 512
    per_sm = nf4_kernels.DECODE_GEMV_PROGRAMS_PER_SM if "decode" in kernel else 2
    split = nf4_kernels.split_k_for(N, K, device, block_n, k_tile, per_sm)
    if "decode" in kernel:
        assert split == 4
    else:
        split = 4  # the split-K GEMV's own rule keeps ≥ 512 columns per slice: pinned here
    with KernelsRan() as ran:
        check(QLoraCase(M=3, K=K, N=N, r=8, dtype=dtype, regime="decode",
                        split_k=None if "decode" in kernel else split), "triton", device)
    assert kernel in ran.names
    workspace.free_workspaces()
    torch.manual_seed(0)
    q = quantize(torch.randn(N, K, device=device) / 8).tensors()
    x = torch.randn(3, K, device=device, dtype=dtype)
    xa, lora_B = torch.randn(3, 8, device=device, dtype=dtype), torch.randn(N, 8, device=device, dtype=dtype)
    ops = KernelNF4Ops(regime="decode", split_k=None if "decode" in kernel else split)
    first = ops.forward(x, q, xa, lora_B, 0.5, None)
    partials, counters = (b for key, b in workspace._BUFFERS.items() if key[-1].startswith("split-k"))
    assert partials.numel() >= split * 16 * N and not counters.any()  # every tile's counter back to 0
    launches = count(lambda: ops.forward(x, q, xa, lora_B, 0.5, None), device_type=device.type)
    assert [launch.name for launch in launches] == [kernel]  # no memset, no sum, no copy
    again = ops.forward(x, q, xa, lora_B, 0.5, None)
    assert torch.equal(first, again) and not counters.any()
    scratch = [b for key, b in workspace._BUFFERS.items() if key[-1].startswith("split-k")]
    assert len(scratch) == 2 and scratch[0] is partials and scratch[1] is counters


def test_the_word_gemv_splits_wide_layers_to_even_the_sms_where_all_programs_fit(device, monkeypatch):
    """On 132 SMs, 448 column tiles (4096 → 14336) put 4 programs on some SMs and 3 on others:
    two K slices (896 programs: 7 or 6, 3.5 tiles' work) where 8 fit on an SM at once, none
    where 6 do (a second wave); 344 tiles (→ 11008) gain nothing from 688 programs (6 or 5);
    narrow layers keep the split of the 2-per-SM rule; the launcher asks with its tile's
    residency (the 8-row tile at M ≤ 8, the 16-row one above)."""
    from peft_ops.kernels import nf4 as nf4_kernels

    monkeypatch.setattr(nf4_kernels, "multiprocessor_count", lambda device: 132)

    def split(N, K, resident):
        return nf4_kernels.split_k_for(N, K, device, 32, nf4_kernels.DECODE_GEMV_K_MULTIPLE, 2, resident)

    assert [split(14336, 4096, r) for r in (None, 6, 8)] == [1, 1, 2]
    assert split(11008, 4096, 8) == 1
    assert split(4096, 4096, 8) == split(4096, 4096, None) == 4  # 512 programs: 4 on all SMs but 16
    assert split(14336, 256, 8) == 1  # slices are whole 256-column tiles
    assert nf4_kernels.DECODE_GEMV_RESIDENT["sm90"] == {8: 8, 16: 6}

    asked = []
    monkeypatch.setattr(nf4_kernels, "split_k_for", lambda *args: asked.append(args[-1]) or 1)
    for M in (1, 8, 9, 16):
        check(QLoraCase(M=M, K=256, N=45, r=8, dtype=torch.bfloat16), "triton", device)
    resident = nf4_kernels.DECODE_GEMV_RESIDENT["interpreter"]
    assert asked == [resident[8], resident[8], resident[16], resident[16]]


def test_a_split_k_that_is_not_a_power_of_two_is_refused(device):
    from peft_ops.kernels import nf4 as nf4_kernels

    q = quantize(torch.randn(24, 200, device=device)).tensors()
    with pytest.raises(ValueError, match="split_k"):
        nf4_kernels.forward(torch.randn(2, 200, device=device), q, None, None, 0.0, None, "decode", 5,
                            tables=peft_ops.nf4.code_tables(device))


DEQUANT_VARIANTS = {"plain": {}, **{k: VARIANTS[k] for k in ("dropout", "fp32_adapters", "odd_K_blocksize_32",
                                                              "no_double_quant_no_bias", "non_contiguous_x")}}


@pytest.mark.parametrize("M", [3, 67])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("variant", list(DEQUANT_VARIANTS))
def test_the_dequant_path(variant, dtype, M, device):
    """W decoded into the workspace, then the dense LoRA kernels (or a plain GEMM for
    nf4_linear): the same float64 references and budgets as the fused kernels."""
    kw = dict(M=M, K=64, N=40, r=8, dtype=dtype, nf4_path="dequant")
    kw.update(DEQUANT_VARIANTS[variant])
    check(QLoraCase(**kw), "triton", device)
    if variant in ("plain", "odd_K_blocksize_32"):
        check(QLoraCase(**{**kw, "lora": False, "train_base": True, "r": 1}), "triton", device)


def test_the_workspace_is_reused_per_shape_and_freed_on_request(device):
    from peft_ops.ops import workspace
    from peft_ops.ops.paths import KernelNF4Ops

    workspace.free_workspaces()
    ops = KernelNF4Ops(path="dequant")
    torch.manual_seed(0)
    q = quantize(torch.randn(40, 64, device=device)).tensors()
    x = torch.randn(70, 64, device=device)
    first = ops.forward(x, q, None, None, 0.0, None)
    assert workspace.workspace_bytes() == 40 * 64 * 4  # one fp32 buffer of W's shape
    buffer = next(iter(workspace._BUFFERS.values()))
    again = ops.forward(x, q, None, None, 0.0, None)
    assert next(iter(workspace._BUFFERS.values())) is buffer and torch.equal(first, again)  # reused
    ops.forward(x.half(), q, None, None, 0.0, None)
    assert workspace.workspace_bytes() == 40 * 64 * (4 + 2)  # one more: per dtype
    assert peft_ops.free_workspaces(device) == 40 * 64 * 6 and workspace.workspace_bytes() == 0
    assert torch.equal(ops.forward(x, q, None, None, 0.0, None), first)  # allocates again


def test_public_functions_match_the_references(device):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 64, device=device)
    q = quantize(torch.randn(40, 64, device=device) / 8)
    A, B = torch.randn(8, 64, device=device) / 8, torch.randn(40, 8, device=device) / 3
    b = torch.randn(40, device=device)
    for backend in ("auto", "torch"):  # kernels and PyTorch path against float64 (dispatch: test_backend.py)
        with peft_ops.use_backend(backend):
            y = peft_ops.qlora_linear(x, q, A, B, 0.5, b)
            y0 = peft_ops.nf4_linear(x, q, b)
        assert_close(y, reference.qlora_linear(x.double(), q, A.double(), B.double(), 0.5, b.double()),
                     torch.float32, "qlora_linear")
        assert_close(y0, reference.nf4_linear(x.double(), q, b.double()), torch.float32, "nf4_linear")


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
@pytest.mark.parametrize("path", PATHS)
def test_saved_bytes_are_x_and_xa_only(dropout_p, path, device):
    """The lora_linear budget: x itself + xa [M, r] fp32 (+ with dropout the keep mask, bit-packed:
    M·⌈K/32⌉ int32 words); no dequantized weight."""
    from peft_ops.ops.qlora import NF4LinearFunction, QLoraLinearFunction
    from peft_ops.tools.accuracy import qlora_ops

    M, K, N, r = 64, 128, 96, 8
    x = torch.randn(M, K, device=device, dtype=torch.bfloat16, requires_grad=True)
    qw = quantize(torch.randn(N, K, device=device, dtype=torch.bfloat16))
    q = qw.tensors()
    A = torch.randn(r, K, device=device, dtype=torch.bfloat16, requires_grad=True)
    B = torch.randn(N, r, device=device, dtype=torch.bfloat16, requires_grad=True)
    meta = (N, K, 64, torch.bfloat16)
    params = [A, B, *qw.buffers()]
    nbytes, saved, y = saved_activation_bytes(
        lambda: QLoraLinearFunction.apply(x, A, B, None, q.packed, q.absmax, q.absmax_scale, q.absmax_offset, meta,
                                          1.0, dropout_p, qlora_ops(path)), params)
    assert nbytes == x.numel() * 2 + M * r * 4 + (M * K // 8 if dropout_p > 0 else 0)
    assert all(t.numel() != N * K for t in saved)  # no dequantized weight
    nbytes, _, _ = saved_activation_bytes(
        lambda: NF4LinearFunction.apply(x, None, q.packed, q.absmax, q.absmax_scale, q.absmax_offset, meta,
                                        qlora_ops(path)), params)
    assert nbytes == 0  # dX needs only the weight


def test_frozen_weight_gets_no_gradient_and_is_unchanged(device):
    qw = quantize(torch.randn(16, 64, device=device))
    before = {k: v.clone() for k, v in qw.state_dict().items()}
    x = torch.randn(4, 64, device=device, requires_grad=True)
    peft_ops.nf4_linear(x, qw).sum().backward()
    assert x.grad is not None
    assert all(not b.requires_grad for b in qw.buffers())
    assert all(torch.equal(before[k], v) for k, v in qw.state_dict().items())


@pytest.mark.parametrize("name, value, exc, word", [
    ("x", torch.randn(3, 63), ValueError, "x"),
    ("x", torch.ones(3, 64, dtype=torch.int64), TypeError, "x"),
    ("qweight", torch.randn(16, 64), TypeError, "qweight"),
    ("lora_A", torch.randn(4, 63), ValueError, "lora_A"),
    ("lora_B", torch.randn(15, 4), ValueError, "lora_B"),
    ("bias", torch.randn(15), ValueError, "bias"),
    ("bias", torch.randn(16, dtype=torch.float16), TypeError, "bias"),
    ("scaling", "1", TypeError, "scaling"),
    ("dropout_p", 1.0, ValueError, "dropout_p"),
])
def test_qlora_linear_rejects(name, value, exc, word):
    args = dict(x=torch.randn(3, 64), qweight=quantize(torch.randn(16, 64)), lora_A=torch.randn(4, 64),
                lora_B=torch.randn(16, 4), scaling=1.0, bias=torch.randn(16), dropout_p=0.0)
    args[name] = value
    with pytest.raises(exc, match=word):
        peft_ops.qlora_linear(**args)
    if name in ("x", "qweight", "bias"):
        with pytest.raises(exc, match=word):
            peft_ops.nf4_linear(args["x"], args["qweight"], args["bias"])
