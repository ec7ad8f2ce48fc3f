"""``peft-ops check``: every fused op against its float64 reference on the device at hand.

On a CUDA machine the kernels run natively; on a CPU-only one they run in the Triton
interpreter (small shapes), and the PyTorch path is checked beside them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

from ..backend import interpreting, kernel_modules, triton_available
from ..kernels.interface import DTYPE_NAMES, FLOAT_DTYPES
from ..ops.paths import TorchLoraOps
from .accuracy import (
    BottleneckCase,
    DoraCase,
    EmbeddingCase,
    LoraCase,
    QLoraCase,
    run_bottleneck_case,
    run_dora_case,
    run_embedding_case,
    run_lora_case,
    run_qlora_case,
)
from .records import text_table

DTYPES = FLOAT_DTYPES


def lora_cases(quick: bool) -> list[LoraCase]:
    cases = []
    for dtype in DTYPES:
        cases += [
            LoraCase(M=33, K=64, N=48, r=8, dtype=dtype),
            LoraCase(M=127, K=96, N=70, r=16, dtype=dtype, dropout_p=0.25, bias=False),
            LoraCase(M=19, K=40, N=33, r=3, dtype=dtype, leading=(2,), train_base=True),
            LoraCase(M=29, K=56, N=24, r=4, dtype=dtype, x_transposed=True, dropout_p=0.1),
            LoraCase(M=21, K=48, N=40, r=4, dtype=dtype, weight_kn=True, dropout_p=0.1, train_base=True),
        ]
        if dtype != torch.float32:  # PEFT's fp32 adapters on a half-precision base
            cases += [LoraCase(M=24, K=48, N=40, r=8, dtype=dtype, adapter_dtype=torch.float32, dropout_p=0.1)]
        if not quick:
            cases += [LoraCase(M=65, K=130, N=96, r=64, dtype=dtype, dropout_p=0.1)]
    return cases


def qlora_cases(quick: bool) -> list[QLoraCase]:
    """NF4 rows: the decode GEMVs (M ≤ 16: the word-decoding one at K = 128, the split-K one
    where it does not fit: K = 96, fp32) and training sizes (on a GPU W decoded into the
    workspace and the dense path, by the default rule; in the interpreter the fused
    dequant-GEMM), with and without the adapter, an unaligned weight (K odd, blocks straddling
    rows) and PEFT's fp32 adapters."""
    cases = []
    for dtype in DTYPES:
        cases += [
            QLoraCase(M=3, K=128, N=48, r=8, dtype=dtype, lora=False),
            QLoraCase(M=1, K=96, N=40, r=8, dtype=dtype, dropout_p=0.1),
            QLoraCase(M=70, K=64, N=40, r=16, dtype=dtype, dropout_p=0.25, leading=(2,)),
            QLoraCase(M=33, K=45, N=20, r=4, dtype=dtype, blocksize=32, double_quant=False, lora=False,
                      train_base=True),
            QLoraCase(M=21, K=64, N=24, r=4, dtype=dtype, x_transposed=True),
        ]
        if dtype != torch.float32:
            cases += [QLoraCase(M=24, K=64, N=40, r=8, dtype=dtype, adapter_dtype=torch.float32)]
        if not quick:
            cases += [QLoraCase(M=9, K=256, N=24, r=8, dtype=dtype, split_k=4)]
    return cases


def dora_cases(quick: bool) -> list[DoraCase]:
    """DoRA rows (dora_linear, and qdora_linear on NF4): odd shapes, dropout (PEFT's base term on
    the dropped-out input), 3-D / non-contiguous input, a trainable base, PEFT's fp32 adapters,
    decode sizes (M ≤ 16) and training sizes of the NF4 base."""
    cases = []
    for dtype in DTYPES:
        cases += [
            DoraCase(M=33, K=64, N=48, r=8, dtype=dtype),
            DoraCase(M=70, K=96, N=40, r=16, dtype=dtype, dropout_p=0.25, bias=False, leading=(2,)),
            DoraCase(M=19, K=40, N=33, r=3, dtype=dtype, train_base=True, x_transposed=True),
            DoraCase(M=21, K=48, N=40, r=4, dtype=dtype, train_base=True, weight_kn=True, dropout_p=0.1),
            DoraCase(M=3, K=128, N=40, r=8, dtype=dtype, nf4=True, dropout_p=0.1),
            DoraCase(M=40, K=64, N=33, r=4, dtype=dtype, nf4=True),
        ]
        if dtype != torch.float32:
            cases += [DoraCase(M=24, K=48, N=40, r=8, dtype=dtype, adapter_dtype=torch.float32, dropout_p=0.1)]
        if not quick:
            cases += [DoraCase(M=65, K=130, N=96, r=64, dtype=dtype, dropout_p=0.1)]
    return cases


def bottleneck_cases(quick: bool) -> list[BottleneckCase]:
    """Bottleneck adapter rows: every activation, odd shapes, 3-D / non-contiguous input,
    dropout, no biases, and the widest kernel tile class (fp16/bf16 m = 130: the 256-wide tile,
    two backward launches; fp32 m = 100: the 128-wide tile, its widest)."""
    cases = []
    for dtype in DTYPES:
        cases += [
            BottleneckCase(M=37, d=70, m=20, dtype=dtype, activation="relu", leading=(2,)),
            BottleneckCase(M=45, d=64, m=16, dtype=dtype, activation="gelu", dropout_p=0.25, x_transposed=True),
            BottleneckCase(M=19, d=48, m=8, dtype=dtype, activation="gelu_tanh", bias=False),
            BottleneckCase(M=33, d=40, m=64, dtype=dtype, activation="silu", scaling=-1.5),
        ]
        if not quick:
            cases += [BottleneckCase(M=20, d=40, m=100 if dtype == torch.float32 else 130, dtype=dtype,
                                  activation="gelu")]
    return cases


def embedding_cases(quick: bool) -> list[EmbeddingCase]:
    """Embedding LoRA rows: a repeated id (the deterministic scatter-add), padding_idx, odd
    sizes, PEFT's fp32 adapters, and two rank chunks (r = 80)."""
    cases = []
    for dtype in DTYPES:
        cases += [EmbeddingCase(M=45, V=70, D=40, r=8, dtype=dtype, padding_idx=3),
                  EmbeddingCase(M=19, V=33, D=24, r=3, dtype=dtype)]
        if dtype != torch.float32:
            cases += [EmbeddingCase(M=30, V=50, D=48, r=8, dtype=dtype, adapter_dtype=torch.float32)]
        if not quick:
            cases += [EmbeddingCase(M=65, V=130, D=96, r=80, dtype=dtype, padding_idx=0)]
    return cases


@dataclasses.dataclass
class Row:
    op: str
    path: str
    shape: str
    dtype: str
    tensor: str
    error: float
    tol: float

    @property
    def ok(self) -> bool:
        return self.error <= self.tol


def _rows(op: str, path: str, case: LoraCase | BottleneckCase, results) -> list[Row]:
    label = case.label() + (f" p={case.dropout_p}" if getattr(case, "dropout_p", 0) else "")
    dtype = DTYPE_NAMES[case.dtype] + ("+fp32 A,B" if getattr(case, "adapter_dtype", None) else "")
    return [Row(op, path, label, dtype, r.name, r.error(), case.tolerance(r.name)) for r in results]


def run_checks(device: torch.device, paths: list[str], quick: bool = False, progress=None) -> list[Row]:
    rows = []
    for path in paths:
        ops = TorchLoraOps if path == "torch" else kernel_modules().lora
        for case in lora_cases(quick):
            rows += _rows("lora_linear", path, case, run_lora_case(case, ops, device=device))
            if progress:
                progress(rows)
        for case in qlora_cases(quick):
            if path == "torch" and case.split_k:
                continue  # split-K is the kernels' own
            op = "qlora_linear" if case.lora else "nf4_linear"
            rows += _rows(op, path, case, run_qlora_case(case, path, device=device))
            if progress:
                progress(rows)
        for case in dora_cases(quick):
            op = "qdora_linear" if case.nf4 else "dora_linear"
            rows += _rows(op, path, case, run_dora_case(case, path, device=device))
            if progress:
                progress(rows)
        for case in bottleneck_cases(quick):
            rows += _rows("bottleneck_adapter", path, case, run_bottleneck_case(case, path, device=device))
            if progress:
                progress(rows)
        for case in embedding_cases(quick):
            rows += _rows("lora_embedding", path, case, run_embedding_case(case, path, device=device))
            if progress:
                progress(rows)
    return rows


def format_table(rows: list[Row]) -> str:
    header = ("op", "path", "shape", "dtype", "tensor", "max err", "tol", "pass")
    body = [(r.op, r.path, r.shape, r.dtype, r.tensor, f"{r.error:.2e}", f"{r.tol:.1e}", "ok" if r.ok else "FAIL")
            for r in rows]
    return text_table(header, body)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="peft-ops check", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and triton_available() and not interpreting():
        # kernels.common decorates the shared @triton.jit helpers: once it is imported, the mode is
        # fixed (peft_ops.kernels itself and its triton-free interface are imported with peft_ops)
        if "peft_ops.kernels.common" in sys.modules:
            print("peft-ops check: kernels already imported without TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
    if not triton_available():
        paths = ["torch"]
        where = "CPU, triton not installed: PyTorch path only"
    elif device.type == "cuda":
        paths = ["triton"]
        where = f"CUDA: {torch.cuda.get_device_name()}"
    else:
        paths = ["triton", "torch"]
        where = "CPU: Triton kernels in the interpreter, and the PyTorch path"
    print(f"peft-ops check on {where}; torch {torch.__version__}", flush=True)

    start = time.perf_counter()
    rows = run_checks(device, paths, quick=args.quick)
    print(format_table(rows))
    failed = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} passed in {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0
