"""``peft-ops compile``: build every kernel at every autotune config for sm_80 and sm_90a with
``triton.compile`` (no GPU needed) and report registers, spills (ptxas' own count of spill
stores + loads), shared memory and whether the PTX uses tensor cores. Exit code 1 if any
build spills, lacks tensor-core instructions or needs more shared memory than its GPU has.

Must run without TRITON_INTERPRET=1 (the interpreter replaces the JIT functions).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib
import io
import json
import multiprocessing
import os
import re
import sys
import time

from ._table import text_table

KERNEL_MODULES = ("peft_ops.kernels.lora", "peft_ops.kernels.nf4", "peft_ops.kernels.bottleneck_adapter")
TARGETS = ("sm80", "sm90")
# Largest shared memory a block may opt into: A100 (sm_80) 163 KiB, H100/H200 (sm_90) 227 KiB.
SHARED_LIMIT_BYTES = {"sm80": 166912, "sm90": 232448}


def _specs(module_name: str, target: str):
    return importlib.import_module(module_name).compile_specs(target)


def _ptxas_usage(log: str) -> dict:
    """Registers and spills from ptxas' own report (-v), which Triton prints on request."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs or not spills:
        raise RuntimeError(f"unexpected ptxas output:\n{log}")
    return {"registers": int(regs.group(1)), "stack_bytes": int(spills.group(1)),
            "spill_bytes": int(spills.group(2)) + int(spills.group(3))}


def _compile_one(job: tuple[str, str, int]) -> dict:
    module_name, target, index = job
    import triton

    spec = _specs(module_name, target)[index]
    triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v report, printed to stdout
    triton.knobs.compilation.always_compile = True  # a cached build would skip ptxas and its report
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        compiled = spec.compile(target)
    seconds = time.perf_counter() - start
    ptx = compiled.asm["ptx"]
    return {
        "kernel": spec.name, "target": target, "needs_tensor_cores": spec.uses_tensor_cores,
        "config": spec.config_label,
        **_ptxas_usage(log.getvalue()),
        "shared_bytes": compiled.metadata.shared,
        "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
        "mma_sync": len(re.findall(r"\bmma\.sync", ptx)),
        "seconds": round(seconds, 2),
    }


def compile_all(jobs: int | None = None) -> list[dict]:
    return run_jobs([(m, t, i) for m in KERNEL_MODULES for t in TARGETS for i in range(len(_specs(m, t)))], jobs)


def run_jobs(work: list[tuple[str, str, int]], jobs: int | None = None) -> list[dict]:
    """Compile the builds (kernel module, target, index in its compile_specs) in parallel."""
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        return [_compile_one(w) for w in work]
    # spawn: a clean interpreter per worker, whatever the parent imported
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile_one, work))


def problems(row: dict) -> list[str]:
    found = []
    if row["spill_bytes"]:
        found.append(f"spills {row['spill_bytes']} B")
    if row["shared_bytes"] > SHARED_LIMIT_BYTES[row["target"]]:
        found.append(f"needs {row['shared_bytes']} B of shared memory, over the {row['target']} limit")
    if row["needs_tensor_cores"] and not (row["wgmma"] or row["mma_sync"]):
        found.append("no tensor-core instruction")
    return found


def format_table(rows: list[dict]) -> str:
    header = ("kernel", "target", "config", "regs", "spill B", "stack B", "smem B", "tensor cores", "s")
    body = [(r["kernel"], r["target"], r["config"], r["registers"], r["spill_bytes"], r["stack_bytes"],
             r["shared_bytes"],
             (f"wgmma×{r['wgmma']}" if r["wgmma"] else f"mma.sync×{r['mma_sync']}") if r["wgmma"] or r["mma_sync"]
             else ("NONE" if r["needs_tensor_cores"] else "- (no dot)"), r["seconds"]) for r in rows]
    return text_table(header, body)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="peft-ops compile", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPU count)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("peft-ops compile needs TRITON_INTERPRET unset (the interpreter replaces the kernels)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    rows = compile_all(args.jobs)
    bad = [(r, problems(r)) for r in rows if problems(r)]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(format_table(rows))
        print(f"\n{len(rows)} builds in {time.perf_counter() - start:.1f} s; {len(bad)} with problems")
        for r, p in bad:
            print(f"  {r['kernel']} {r['target']} {r['config']}: {', '.join(p)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
