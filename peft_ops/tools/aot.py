"""``peft-ops aot`` (also ``peft-ops compile``): build every kernel ahead of time (aot) at every
autotune config for sm_80 and sm_90a with ``triton.compile`` (no GPU needed) and report what
decides its speed: registers, spills (ptxas' own count of spill stores + loads), shared memory,
CTAs per SM and what limits them, and, per iteration of its main loop
(``peft_ops.tools.kernel_facts``), the tensor-core instructions, global loads and stores by
width, ``cp.async`` by size, TMA copies and gathers. It also plans one call of each op at a
model's shape and counts the launches (``peft_ops.tools.launches``). Exit code 1 if any build
spills, lacks tensor-core instructions or needs more shared memory than its GPU has.

Must run without TRITON_INTERPRET=1 (the interpreter replaces the JIT functions). Builds are
cached on disk (``$PEFT_OPS_CACHE_DIR``, default ``~/.cache/peft-ops``), keyed by the build, the
kernel sources and the triton version.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import multiprocessing
import os
import pathlib
import re
import sys
import time

from ..backend import kernel_modules
from ..ops.gemm_choice import cache_root
from . import kernel_facts, launches
from .records import text_table, write_json

# The kernel modules with builds (peft_ops.kernels.<name>.aot_specs).
KERNEL_MODULES = ("lora", "nf4", "bottleneck", "dropout", "dora", "embedding", "multi_lora")
TARGETS = ("sm80", "sm90")
# Largest shared memory a block may opt into: A100 (sm_80) 163 KiB, H100/H200 (sm_90) 227 KiB.
SHARED_LIMIT_BYTES = {"sm80": 166912, "sm90": 232448}


def kernel_specs(module_name: str, target: str) -> list:
    """The builds `peft_ops.kernels.<module_name>` lists for `target`."""
    return getattr(kernel_modules(), module_name).aot_specs(target)


def _ptxas_usage(log: str) -> dict:
    """Registers and spills from ptxas' own report (-v), which Triton prints on request."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs or not spills:
        raise RuntimeError(f"unexpected ptxas output:\n{log}")
    return {"registers": int(regs.group(1)), "stack_bytes": int(spills.group(1)),
            "spill_bytes": int(spills.group(2)) + int(spills.group(3))}


def build_facts(build, target: str) -> dict:
    """Build one ``KernelBuild`` for `target` and read its facts."""
    start = time.perf_counter()
    compiled, log = build.build_with_ptxas_log(target)
    seconds = time.perf_counter() - start
    ptx = compiled.asm["ptx"]
    usage = _ptxas_usage(log)
    facts = kernel_facts.ptx_facts(ptx, build.num_warps)
    shared = compiled.metadata.shared
    row = {
        "kernel": build.name, "function": build.function, "target": target,
        "needs_tensor_cores": build.uses_tensor_cores, "vector_loads": build.vector_loads,
        "config": build.config_label,
        "num_warps": build.num_warps, "num_stages": build.num_stages,
        **usage,
        "shared_bytes": shared,
        "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
        "mma_sync": len(re.findall(r"\bmma\.sync", ptx)),
        **kernel_facts.occupancy(target, usage["registers"], build.num_warps, shared),
        "main_loop": kernel_facts.main_loop_summary(facts),
        "facts": facts,
        "seconds": round(seconds, 2),
    }
    return json.loads(json.dumps(row))  # as the cache returns it (JSON: string keys)


def _build_job(job) -> dict:
    return build_facts(*job)


# --------------------------------------------------------------------------------------
# The build cache
# --------------------------------------------------------------------------------------

def cache_dir() -> pathlib.Path:
    return cache_root() / "builds"


_SOURCES_HASH = None


def _sources_hash() -> str:
    """The kernel sources, this report's code and the triton version: what a build's facts
    depend on besides the build itself."""
    global _SOURCES_HASH
    if _SOURCES_HASH is None:
        digest = hashlib.sha256(importlib.metadata.version("triton").encode())
        here = pathlib.Path(__file__).parent
        kernels = pathlib.Path(importlib.util.find_spec("peft_ops.kernels").origin).parent
        for path in sorted(kernels.glob("*.py")) + [here / "kernel_facts.py", here / "aot.py"]:
            digest.update(path.read_bytes())
        _SOURCES_HASH = digest.hexdigest()[:16]
    return _SOURCES_HASH


def _cache_file(build, target: str) -> pathlib.Path:
    identity = (build.key(), target, build.name, build.uses_tensor_cores, build.vector_loads)
    key = hashlib.sha256(repr(identity).encode()).hexdigest()
    return cache_dir() / _sources_hash() / f"{key[:32]}.json"


def _clear_interpreter() -> None:
    os.environ.pop("TRITON_INTERPRET", None)  # build workers need the real JIT functions


def run_builds(work: list, jobs: int | None = None, use_cache: bool = True) -> list[dict]:
    """Rows for [(build, target), …], built in parallel in fresh processes (without the
    interpreter, whatever this process runs under), each at most once, cached on disk."""
    rows: list = [None] * len(work)
    todo = []
    for i, (build, target) in enumerate(work):
        path = _cache_file(build, target) if use_cache else None
        if path is not None and path.exists():
            rows[i] = json.loads(path.read_text())
        else:
            todo.append(i)
    if todo:
        jobs = max(1, min(jobs or os.cpu_count() or 1, len(todo)))
        # spawn: a clean interpreter per worker, whatever the parent imported
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                                    initializer=_clear_interpreter) as pool:
            for i, row in zip(todo, pool.map(_build_job, [work[i] for i in todo])):
                rows[i] = row
                if use_cache:
                    path = _cache_file(*work[i])
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(f".{os.getpid()}.tmp")
                    tmp.write_text(json.dumps(row))
                    tmp.replace(path)  # atomic: a concurrent reader sees all or nothing
    return rows


def _tile_size(spec) -> tuple:
    blocks = [v for k, v in {**spec.config_kwargs, **spec.constexprs}.items()
              if k.startswith("BLOCK_") and isinstance(v, int)]
    return math.prod(blocks), spec.num_warps, spec.num_stages


def build_all(jobs: int | None = None, targets=TARGETS, only: str | None = None,
              use_cache: bool = True, ends_only_targets=(), first_only_targets=()) -> list[dict]:
    """Every build of every kernel file's ``aot_specs`` for `targets` (names containing
    `only`, if given). On the targets in `ends_only_targets`, two builds per build name (each
    kernel in each variant) instead of one per config: its family's first config (what a
    launch takes untuned) and its largest tile (the likeliest to spill); on those in
    `first_only_targets`, the first config alone."""
    work = []
    for m in KERNEL_MODULES:
        for t in targets:
            by_name: dict = {}
            for spec in kernel_specs(m, t):
                if only is None or only in spec.name:
                    by_name.setdefault(spec.name, []).append(spec)
            for specs in by_name.values():
                if t in first_only_targets:
                    specs = specs[:1]
                elif t in ends_only_targets:
                    largest = max(specs, key=_tile_size)
                    specs = [specs[0]] + ([largest] if largest is not specs[0] else [])
                work += [(spec, t) for spec in specs]
    return run_builds(work, jobs, use_cache)


def problems(row: dict) -> list[str]:
    found = []
    if row["spill_bytes"]:
        found.append(f"spills {row['spill_bytes']} B")
    if row["shared_bytes"] > SHARED_LIMIT_BYTES[row["target"]]:
        found.append(f"needs {row['shared_bytes']} B of shared memory, over the {row['target']} limit")
    if row["needs_tensor_cores"] and not (row["wgmma"] or row["mma_sync"]):
        found.append("no tensor-core instruction")
    narrow = {bits: n for bits, n in row["main_loop"].get("ld_global_by_bits", {}).items() if int(bits) < 32}
    if row.get("vector_loads") and narrow:
        found.append("synchronous " + ", ".join(f"{n}× {bits}-bit" for bits, n in sorted(narrow.items()))
                     + " global loads per main-loop iteration")
    return found


def _tensor_cores(row: dict) -> str:
    if not (row["wgmma"] or row["mma_sync"]):
        return "NONE" if row["needs_tensor_cores"] else "- (no dot)"
    in_loop = row["main_loop"].get("tensor_core_instructions")
    if in_loop:
        return kernel_facts.describe_tensor_cores(in_loop)
    return (f"wgmma×{row['wgmma']}" if row["wgmma"] else f"mma.sync×{row['mma_sync']}") + " (not in the main loop)"


def format_table(rows: list[dict]) -> str:
    """One line per build; the memory columns count instructions per main-loop iteration and
    thread (ld/st.global by width in bits, cp.async by bytes)."""
    header = ("kernel", "target", "config", "regs", "spill B", "smem KiB", "CTAs/SM", "tensor cores / iter",
              "ld.global", "cp.async", "st.global", "gathers", "s")
    body = []
    for r in rows:
        loop = r["main_loop"]
        body.append((r["kernel"], r["target"], r["config"], r["registers"], r["spill_bytes"],
                     f"{r['shared_bytes'] / 1024:.0f}", f"{r['ctas_per_sm']} ({r['limited_by']})", _tensor_cores(r),
                     kernel_facts.describe_widths(loop.get("ld_global_by_bits", {})),
                     kernel_facts.describe_widths(loop.get("cp_async_by_bytes", {}), "B"),
                     kernel_facts.describe_widths(loop.get("st_global_by_bits", {})),
                     loop.get("gathers", 0), r["seconds"]))
    return text_table(header, body)


def format_launches(planned: list[dict]) -> str:
    header = ("op", "shape", "options", "phase", "launches", "Triton", "PyTorch ops")
    body = [(p["op"], p["shape"], p["options"], p["phase"], p["launches"], p["triton"],
             ", ".join(f"{name.removeprefix('aten.')}×{n}" for name, n in p["torch_ops"].items()) or "-")
            for p in planned]
    return text_table(header, body)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="peft-ops aot", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=None, help="parallel builds (default: CPU count)")
    parser.add_argument("--target", choices=["all", *TARGETS], default="all", help="sm80, sm90 (sm_90a) or all")
    parser.add_argument("--only", default=None, help="only builds whose name contains this")
    parser.add_argument("--json", action="store_true", help="print the record as JSON instead of tables")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="also write the record (JSON) here")
    parser.add_argument("--no-cache", action="store_true", help="build everything again")
    parser.add_argument("--ends-only", action="append", default=[], choices=TARGETS, metavar="TARGET",
                        help="on TARGET (repeatable), build each kernel in each variant at two configs only: "
                             "its family's first and its largest tile")
    parser.add_argument("--first-only", action="append", default=[], choices=TARGETS, metavar="TARGET",
                        help="on TARGET (repeatable), each kernel in each variant at its family's first config only")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("peft-ops aot needs TRITON_INTERPRET unset (the interpreter replaces the kernels)", file=sys.stderr)
        return 2
    targets = TARGETS if args.target == "all" else (args.target,)
    start = time.perf_counter()
    rows = build_all(args.jobs, targets, args.only, use_cache=not args.no_cache,
                       ends_only_targets=tuple(args.ends_only), first_only_targets=tuple(args.first_only))
    planned = launches.launch_table()
    bad = [(r, problems(r)) for r in rows if problems(r)]
    record = {"builds": rows, "launches_per_call": planned}
    if args.out:
        write_json(args.out, record)
    if args.json:
        print(json.dumps(record, indent=1))
    else:
        print(format_table(rows))
        print("\nlaunches per op call (planned for sm_90a, 132 SMs; bf16)")
        print(format_launches(planned))
        print(f"\n{len(rows)} builds in {time.perf_counter() - start:.1f} s; {len(bad)} with problems")
        for r, p in bad:
            print(f"  {r['kernel']} {r['target']} {r['config']}: {', '.join(p)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
