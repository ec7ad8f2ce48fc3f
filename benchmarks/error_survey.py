"""Max error of lora_linear against float64 over many random cases, per path, dtype and tensor.

The tolerances in peft_ops/tools/accuracy.py are set from rounding analysis and checked
against this survey (its cases and runner are the ones the tests and `peft-ops check` use).
On a CPU machine the kernels run in the Triton interpreter:

    TRITON_INTERPRET=1 python benchmarks/error_survey.py --cases 40
"""

import argparse
import collections
import random

import torch

from peft_ops.kernels.interface import DTYPE_NAMES
from peft_ops.ops.paths import eager_ops
from peft_ops.tools.accuracy import LoraCase, run_lora_case


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=40, help="random cases per dtype and path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adapter-fp32", action="store_true", help="fp32 adapters on half-precision x")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rng = random.Random(args.seed)
    worst = collections.defaultdict(float)
    tol = {}
    dtypes = [torch.float16, torch.bfloat16] if args.adapter_fp32 else [torch.float32, torch.float16, torch.bfloat16]
    for dtype in dtypes:
        for i in range(args.cases):
            case = LoraCase(M=rng.randint(1, 160), K=rng.randint(1, 160), N=rng.randint(1, 160),
                            r=rng.choice([1, 4, 8, 16, 64]), dtype=dtype,
                            dropout_p=rng.choice([0.0, 0.0, 0.1, 0.5]), bias=rng.random() < 0.7,
                            train_base=rng.random() < 0.3, scaling=rng.choice([0.5, 1.0, 2.0]),
                            adapter_dtype=torch.float32 if args.adapter_fp32 else None)
            for path in ("triton", "torch"):
                ops = eager_ops("lora", path)
                for result in run_lora_case(case, ops, device=device, seed=i):
                    key = (path, DTYPE_NAMES[dtype], result.name)
                    worst[key] = max(worst[key], result.error())
                    tol[key] = case.tolerance(result.name)
    print(f"{'path':8s} {'dtype':6s} {'tensor':6s} {'max error':>10s} {'tolerance':>10s}   ({args.cases} cases each)")
    for (path, dtype, name), err in sorted(worst.items()):
        print(f"{path:8s} {dtype:6s} {name:6s} {err:10.3e} {tol[(path, dtype, name)]:10.3e}")


if __name__ == "__main__":
    main()
