"""The cases that run one kernel at a forced tile config: for each autotuned kernel, a small
odd-shaped case of each operand family (shared by tests/kernel/test_tile_configs.py, which runs the
largest production tiles in the interpreter, and tests/reliability/test_gpu.py, which runs every config
of every family on a GPU)."""

import dataclasses
import os

import torch

from peft_ops.tools.accuracy import (
    BottleneckCase,
    DoraCase,
    EmbeddingCase,
    LoraCase,
    QLoraCase,
    assert_paths_agree,
    run_bottleneck_case,
    run_dora_case,
    run_embedding_case,
    run_lora_case,
    run_qlora_case,
)

from conftest import DEVICE, lora_ops


def lora_case(family):
    dtype = torch.float32 if family == "fp32" else torch.bfloat16
    return LoraCase(M=37, K=70, N=45, r=8, dtype=dtype, dropout_p=0.3,
                    adapter_dtype=torch.float32 if family == "mixed" else None)


def tma_lora_case(family):
    return dataclasses.replace(lora_case(family), K=72, N=48)


def qlora_case(M):
    def case(family):
        dtype = torch.float32 if family == "fp32" else torch.float16
        if family == "general":  # K odd: rows straddle bytes and blocks
            return QLoraCase(M=M, K=45, N=37, r=8, dtype=dtype, blocksize=32)
        return QLoraCase(M=M, K=64, N=45, r=8, dtype=dtype, dropout_p=0.2,
                         adapter_dtype=torch.float32 if family == "mixed" else None)
    return case


def split_gemv_case(family):
    """The split-K GEMV: where the word GEMV does not fit (fp32 x; K = 96, not a multiple
    of its K tiles, but of the blocksize 32: the aligned families)."""
    if family == "general":
        return qlora_case(3)(family)
    return dataclasses.replace(qlora_case(3)(family), K=96, blocksize=32)


def decode_gemv_case(family):
    """The word-decoding GEMV: decode-sized M, half-precision x, K a multiple of its K tiles."""
    return QLoraCase(M=3, K=256, N=45, r=8, dtype=torch.float16, dropout_p=0.2,
                     adapter_dtype=torch.float32 if family == "mixed" else None)


def dora_cublas_case(family):
    """DoRA on the cuBLAS path (its scale kernel after cuBLAS's pre), bias and dropout on."""
    dtype = torch.float32 if family == "fp32" else torch.bfloat16
    return DoraCase(M=37, K=70, N=45, r=8, dtype=dtype, dropout_p=0.3, gemm="cublas")


def embedding_case(family):
    dtype = torch.float32 if family == "fp32" else torch.bfloat16
    return EmbeddingCase(M=37, V=50, D=45, r=8, dtype=dtype, padding_idx=3,
                         adapter_dtype=torch.float32 if family == "mixed" else None)


def bottleneck_case(family):
    operand, width = family.split("/")
    dtype = torch.float32 if operand == "fp32" else torch.bfloat16
    m = {"b64": 20, "b128": 100, "b256": 130}[width]
    return BottleneckCase(M=37, d=70, m=m, dtype=dtype, activation="gelu", dropout_p=0.2)


def wide_bottleneck_case(family):
    """The dh and down kernels' programs are DH_BLOCK_B = 64 bottleneck columns wide whatever
    the bottleneck: its family's widest case, so that a row block spans several programs."""
    return bottleneck_case(family.split("/")[0] + ("/b256" if family.startswith("half") else "/b128"))


# kernel → (the case for a family, the families whose largest sm_90 tile runs in the interpreter)
KERNELS = {
    "_lora_shrink_kernel": (lora_case, ["half", "fp32"]),
    "_lora_forward_kernel": (lora_case, ["half", "fp32"]),
    "_lora_backward_g_kernel": (lora_case, ["half", "fp32"]),
    "_lora_backward_rank_kernel": (lora_case, ["half", "mixed", "fp32"]),
    "_lora_backward_dx_kernel": (lora_case, ["half", "mixed", "fp32"]),
    # the persistent TMA GEMMs (sm_90a): K = 72 keeps the rows 16-byte aligned for descriptors
    "_lora_forward_tma_kernel": (tma_lora_case, ["half", "mixed", "fp32"]),
    "_lora_backward_dx_tma_kernel": (tma_lora_case, ["half", "mixed", "fp32"]),
    # the cuBLAS implementation's memory-bound LoRA pieces (run with PEFT_OPS_GEMM=cublas)
    "_lora_expand_kernel": (lora_case, ["half", "mixed", "fp32"]),
    "_lora_dx_term_kernel": (lora_case, ["half", "mixed", "fp32"]),
    "_dora_scale_kernel": (dora_cublas_case, ["half", "fp32"]),
    "_nf4_matmul_kernel": (qlora_case(37), ["half", "fp32", "general"]),
    "_nf4_gemv_kernel": (split_gemv_case, ["half", "fp32", "general"]),
    "_nf4_decode_gemv_kernel": (decode_gemv_case, ["half", "mixed"]),
    "_nf4_backward_dx_kernel": (qlora_case(37), ["half", "general"]),
    "_lora_embedding_forward_kernel": (embedding_case, ["half", "mixed", "fp32"]),
    "_bottleneck_forward_kernel": (bottleneck_case, ["half/b64", "half/b128", "fp32/b64"]),
    "_bottleneck_backward_dh_kernel": (wide_bottleneck_case, ["half/b64", "fp32/b64"]),
    "_bottleneck_down_kernel": (wide_bottleneck_case, ["half/b64", "fp32/b64"]),
}


def gemm_for(kernel: str) -> str:
    """The PEFT_OPS_GEMM under which `kernel` runs: the cuBLAS path for its LoRA pieces, else the
    fused kernels (also at the cases' small M, where the default rule would take cuBLAS on a GPU)."""
    return "cublas" if kernel in ("_lora_expand_kernel", "_lora_dx_term_kernel", "_dora_scale_kernel") else "triton"


def largest(configs):
    def size(config):
        blocks = [v for k, v in config.kwargs.items() if k.startswith("BLOCK_")]
        return (torch.tensor(blocks).prod().item(), config.num_warps)
    return max(configs, key=size)


def run_case(case, path):
    if isinstance(case, DoraCase):
        return run_dora_case(case, path, device=DEVICE)
    if isinstance(case, QLoraCase):
        return run_qlora_case(case, path, device=DEVICE)
    if isinstance(case, BottleneckCase):
        return run_bottleneck_case(case, path, device=DEVICE)
    if isinstance(case, EmbeddingCase):
        return run_embedding_case(case, path, device=DEVICE)
    return run_lora_case(case, lora_ops(path), device=DEVICE)


def run_checked(case):
    """Against float64 (with the case's dropout); in half precision also against the PyTorch
    path's roundings, without dropout (the two paths draw different masks) — except on the
    cuBLAS implementation, which rounds the LoRA term once more (addmm's C) by design."""
    for result in run_case(case, "triton"):
        result.check(f"{case.label()}", case.tolerance(result.name))
    if case.dtype != torch.float32 and os.environ.get("PEFT_OPS_GEMM") != "cublas":
        case = dataclasses.replace(case, dropout_p=0.0)
        expected = {r.name: r.actual for r in run_case(case, "torch")}
        for result in run_case(case, "triton"):
            assert_paths_agree(result.actual, expected[result.name], f"{case.label()} {result.name}")
