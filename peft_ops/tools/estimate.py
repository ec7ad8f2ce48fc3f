"""A static time estimate of each op on a named GPU, from what the compiler built. An ESTIMATE:
no GPU ran anything; ``scripts/gpu-check`` measures on one.

Why not bytes alone: the byte model (``peft_ops.tools.roofline``) says what the fastest possible
implementation would take, so it calls a kernel "100 % of roofline" whether it loads 16 bytes
per instruction or one, waits on a gather each iteration, or runs tiles too small to feed the
tensor cores. This model times the launch sequence the op really makes, from the facts of the
builds it really launches:

1. Plan (``peft_ops.tools.launches``): the op's launchers run on meta tensors for the GPU's target
   (sm_80 / sm_90a) and SM count; each Triton launch is recorded with its grid and arguments,
   each PyTorch op with the bytes it moves.
2. Build: for each Triton launch, every autotune config its family offers, compiled for the
   target exactly as the JIT would specialize that launch (``KernelBuild.from_launch``), and
   read (``peft_ops.tools.kernel_facts``): per loop iteration, tensor-core FLOPs by instruction,
   shared-memory bytes (``cp.async`` writes, ``wgmma`` operand reads, ``ldmatrix``), global
   bytes, memory instructions, all instructions, synchronous loads and gathers; CTAs per SM.
3. Time each build (the autotuner's choice is the fastest), per SM and in clock cycles:
   one CTA runs ``fixed + Σ_loops (latency + iterations · max(throughput, latency per iteration))``
   where, with n CTAs resident on the SM,

   - throughput = n · max(tensor FLOPs ÷ (tensor rate · pipe efficiency of its instruction),
     shared bytes ÷ 128 B/clk, global bytes ÷ L2→SM bytes/clk (gathered bytes excepted: they
     are lookups into small tables, served by L1), warp memory instructions ÷ 1/clk,
     warp instructions ÷ 4/clk);
   - latency per iteration = a DRAM latency per level of synchronous global loads (two when a
     load's address comes from a loaded value), else latency ÷ (stages − 1) for pipelined
     ``cp.async`` / TMA loads;

   waves: ⌊CTAs ÷ slots⌋ full ones plus a partial one (slots = SMs · CTAs per SM); then at least
   the launch's distinct tensor bytes ÷ (0.9 · HBM bandwidth), plus 2.5 µs per launch.
   PyTorch ops (sums, casts, fills) are memory-bound: bytes ÷ (0.9 · bandwidth) + 2.5 µs.
4. The frozen base layer (what LoRA is judged against) is a cuBLAS model: persistent, TMA-fed
   wgmma tiles (128×256 and smaller, the best per shape) on sm_90, ``mma.sync`` on sm_80, at
   the pipe efficiency that reproduces the calibration below; a GEMV (M = 1) is memory-bound.
5. PEFT's own LoRA / DoRA layer (``peft_layer_seconds``): its real code run on meta tensors,
   each ATen op one launch — half-precision matrix products by the cuBLAS model, fp32 ones
   (its default fp32 adapters) at the FP32 CUDA-core peak or their bytes, the rest their bytes
   at 0.9 of HBM bandwidth — plus 2.5 µs each. The bottleneck adapter the same way as eager
   PyTorch runs it (``eager_adapter_seconds``: the reference, op by op), and its six matrix
   products alone by the cuBLAS model (``adapter_gemm_floor_seconds``: the floor of any design
   built on cuBLAS's GEMMs).

Calibration (``CALIBRATION``; tests hold the model to each within a few percent):
- cuBLAS bf16 GEMM 8192³ on an H200: 790 TFLOP/s (measured on this workplace's H200);
- device-to-device copy on an H200: 4.3 TB/s of bytes read + written (same machine), from a
  16-byte-access copy kernel compiled here (``kernels/calibration.py``);
- the Triton tutorial's matmul, compiled here: on par with cuBLAS on an A100 (the tutorial's
  published result) and 75–90 % of it on Hopper (non-persistent ``cp.async`` GEMMs).
Assumed, from vendor documents and public microbenchmarks (not measured here): 128 B/clk of
shared memory per SM; L2→SM 48 B/clk/SM on sm_90 (≈ 12 TB/s on an H100 SXM) and 32 on sm_80;
loaded DRAM latency 650 ns (Hopper) / 600 ns (A100); ``mma.sync`` on Hopper at 55 % of the
``wgmma`` peak; 2.5 µs per launch on the GPU side (host overhead hidden: queued launches).
"""

from __future__ import annotations

import ast
import dataclasses
import math
import re
import sys

import torch

from .. import reference
from ..backend import kernel_modules
from . import launches as launch_plans
from .aot import run_builds
from .roofline import GPUS as DATASHEETS
from .roofline import CountBytes

# Parameters beyond the datasheet (roofline.GPUS): the compile target, SMs, loaded DRAM latency.
# fp32_TFLOPs: the datasheet's FP32 (CUDA-core) peak, what PyTorch's fp32 matmuls get by default
# (TF32 off): PEFT's fp32 adapters run there.
GPUS = {
    "A100-40GB": dict(target="sm80", sms=108, dram_latency_ns=600, fp32_TFLOPs=19.5),
    "A100-80GB": dict(target="sm80", sms=108, dram_latency_ns=600, fp32_TFLOPs=19.5),
    "H100-PCIe": dict(target="sm90", sms=114, dram_latency_ns=650, fp32_TFLOPs=51.0),
    "H100-SXM": dict(target="sm90", sms=132, dram_latency_ns=650, fp32_TFLOPs=67.0),
    "H200": dict(target="sm90", sms=132, dram_latency_ns=650, fp32_TFLOPs=67.0),
}
TARGET_RATES = {  # per SM per clock
    "sm90": dict(tensor_flops={"half": 4096, "tf32": 2048, "fp8": 8192, "int8": 8192}, shared_bytes=128,
                 l2_bytes=48, issue=4, memory_instructions=1,
                 # wgmma fed by TMA in warp-specialized pipelines (cuBLAS) vs by cp.async from the
                 # same warps, with a CTA-wide barrier each iteration (Triton's non-persistent GEMMs)
                 pipe_efficiency={"wgmma (TMA)": 0.824, "wgmma": 0.71, "mma.sync": 0.55}),
    "sm80": dict(tensor_flops={"half": 2048, "tf32": 1024, "int8": 4096}, shared_bytes=128, l2_bytes=32, issue=4,
                 memory_instructions=1, pipe_efficiency={"mma.sync": 0.88}),
}
HBM_EFFICIENCY = 0.90  # 4.3 of 4.8 TB/s on an H200: a device-to-device copy, bytes read + written
LAUNCH_SECONDS = 2.5e-6
FIXED_LATENCIES_PER_CTA = 2  # pipeline fill before the first iteration, the final store after the last
CALIBRATION = {
    "cublas_bf16_8192_tflops_h200": 790.0,
    "copy_TBps_h200": 4.3,
    "tutorial_over_cublas_a100": (0.90, 1.05),
    "tutorial_over_cublas_hopper": (0.75, 0.92),
}


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    target: str
    sms: int
    clock_hz: float  # the clock of the datasheet's tensor peak
    bandwidth: float  # bytes/s
    latency_clk: float
    rates: dict
    fp32_flops: float = 0.0  # FP32 CUDA-core FLOP/s (no tensor cores)

    @property
    def hbm_bytes_per_second(self) -> float:
        return self.bandwidth * HBM_EFFICIENCY


def device(name: str) -> Device:
    if name not in GPUS:
        raise ValueError(f"no static estimate for GPU {name!r}: choose from {sorted(GPUS)} (the targets compiled "
                         "here are sm_80 and sm_90a)")
    spec, sheet = GPUS[name], DATASHEETS[name]
    rates = TARGET_RATES[spec["target"]]
    clock = sheet["bf16_TFLOPs"] * 1e12 / (spec["sms"] * rates["tensor_flops"]["half"])
    return Device(name, spec["target"], spec["sms"], clock, sheet["bandwidth_GBps"] * 1e9,
                  spec["dram_latency_ns"] * 1e-9 * clock, rates, spec["fp32_TFLOPs"] * 1e12)


# --------------------------------------------------------------------------------------
# Iterations of each loop
# --------------------------------------------------------------------------------------

def _cdiv(a, b):
    return -(-a // b)


_SAFE = {"cdiv": _cdiv, "min": min, "max": max}


def _evaluate(expression: str, names: dict):
    tree = ast.parse(expression, mode="eval")
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id not in names and node.id not in _SAFE:
            raise KeyError(node.id)
        if isinstance(node, (ast.Attribute, ast.Subscript, ast.Lambda)):
            raise ValueError(f"unsupported expression {expression!r}")
    return eval(compile(tree, "<loop bound>", "eval"), {"__builtins__": {}, **_SAFE}, names)  # noqa: S307


def loop_iterations(for_text: str, names: dict) -> int:
    """Iterations of ``for v in range(a, b, step):`` with a, b, step evaluated over `names`."""
    match = re.match(r"for\s+\w+\s+in\s+(?:tl\.)?range\((.*)\)\s*:", for_text)
    if not match:
        raise ValueError(f"cannot count the iterations of {for_text!r}")
    parts = [p.strip() for p in _split_top_level(match.group(1)) if "=" not in p]
    start, stop, step = (["0"] + parts + ["1"])[:3] if len(parts) == 1 else (parts + ["1"])[:3]
    start, stop, step = (_evaluate(p, names) for p in (start, stop, step))
    return max(0, _cdiv(stop - start, step))


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "(["
        depth -= char in ")]"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current] if current.strip() else parts


def _loop_names(kernel_name: str, module: str, args: dict, config_kwargs: dict) -> dict:
    names = {k: v for k, v in args.items() if isinstance(v, (int, float, bool))}
    names.update(config_kwargs)
    for local, expression in getattr(sys.modules[module], "LOOP_BOUNDS", {}).get(kernel_name, {}).items():
        names[local] = _evaluate(expression, names)
    # loops that only some CTAs run (branches on the program id): {for-text: fraction of CTAs}
    names["_loop_shares"] = getattr(sys.modules[module], "LOOP_SHARES", {}).get(kernel_name, {})
    return names


# --------------------------------------------------------------------------------------
# The time of one build
# --------------------------------------------------------------------------------------

def _iteration_clocks(it: dict, n: int, num_warps: int, num_stages: int, dev: Device) -> tuple[float, str]:
    """(clocks per iteration with n CTAs on the SM, the limiting resource)."""
    rates = dev.rates
    if any(k.startswith("wgmma") for k in it["tensor_core_instructions"]):
        family = "wgmma (TMA)" if it["tma_copies"] else "wgmma"
    else:
        family = "mma.sync"
    tensor = sum(flops / (rates["tensor_flops"][kind] * rates["pipe_efficiency"].get(family, 0.5))
                 for kind, flops in it["tensor_core_flops"].items())
    # Gathered bytes are lookups into small tables (the NF4 code book, the absmax map): L1 hits.
    global_bytes = it["global_load_bytes"] + it["async_load_bytes"] + it["global_store_bytes"] - it["gather_bytes"]
    memory_instructions = sum(it["ld_global_by_bits"].values()) + sum(it["st_global_by_bits"].values()) + \
        sum(it["cp_async_by_bytes"].values())
    throughput = {
        "tensor cores": n * tensor,
        "shared memory": n * it["shared_bytes"] / rates["shared_bytes"],
        "L2": n * global_bytes / rates["l2_bytes"],
        "memory instructions": n * num_warps * memory_instructions / rates["memory_instructions"],
        "instruction issue": n * num_warps * it["instructions"] / rates["issue"],
    }
    if sum(it["ld_global_by_bits"].values()):
        latency = dev.latency_clk * (1 + (it["sync_load_gathers"] > 0))
    elif it["async_load_bytes"] or it["tma_copies"]:
        latency = dev.latency_clk / max(1, num_stages - 1)
    else:
        latency = 0.0
    limiter = max(throughput, key=throughput.get)
    if latency > throughput[limiter]:
        return latency, "latency"
    return throughput[limiter], limiter


def build_seconds(row: dict, names: dict, ctas: int, hbm_bytes: int, dev: Device, persistent: bool = False) -> dict:
    """The estimate of one launch of the build `row` (a aot row) over `ctas` CTAs.
    `names`: the launch's arguments and constexprs, for the loops' bounds. `persistent`: the
    CTAs are the tiles of a persistent kernel, whose programs pay the fixed latencies (prologue,
    final store) once each, not once per tile; each tile still refills its loop's pipeline."""
    facts = row["facts"]
    shares = names.get("_loop_shares", {})
    loops = [(loop, loop_iterations(loop["for"], names), _evaluate(shares.get(loop["for"], "1"), names))
             for loop in facts["loops"]] or [(facts["whole_kernel"], 1, 1)]

    def cta_clocks(n: int) -> tuple[float, dict]:
        total, limits = (0.0 if persistent else FIXED_LATENCIES_PER_CTA * dev.latency_clk), {}
        for loop, iterations, share in loops:  # share: the fraction of CTAs that run the loop
            clocks, limiter = _iteration_clocks(loop, n, row["num_warps"], row["num_stages"], dev)
            total += share * (dev.latency_clk * (iterations > 0) + iterations * clocks)
            limits[limiter] = limits.get(limiter, 0) + share * iterations * clocks
        return total, limits

    occupancy = max(1, row["ctas_per_sm"])
    slots = dev.sms * occupancy
    full, rest = divmod(ctas, slots)
    clocks, limits = cta_clocks(occupancy)
    clocks *= full
    if rest:
        partial, partial_limits = cta_clocks(-(-rest // dev.sms))
        clocks += partial
        limits = limits if full else partial_limits
    if persistent:
        clocks += FIXED_LATENCIES_PER_CTA * dev.latency_clk
    compute_seconds = clocks / dev.clock_hz
    memory_seconds = hbm_bytes / dev.hbm_bytes_per_second
    bound = max(limits, key=limits.get) if limits else "latency"
    if memory_seconds > compute_seconds:
        bound = "HBM bandwidth"
    return {"seconds": max(compute_seconds, memory_seconds) + LAUNCH_SECONDS, "bound": bound,
            "waves": ctas / slots, "ctas": ctas,
            "ctas_per_sm": row["ctas_per_sm"]}


# --------------------------------------------------------------------------------------
# Launches → builds → times
# --------------------------------------------------------------------------------------

def _distinct_bytes(args: dict) -> int:
    seen, total = set(), 0
    for value in args.values():
        if isinstance(value, torch.Tensor) and id(value) not in seen:
            seen.add(id(value))
            total += value.numel() * value.element_size()
    return total


def _candidates(launch, target: str) -> list:
    constexprs = {k: v for k, v in launch.args.items() if not isinstance(v, torch.Tensor)}
    tensors = {k: v for k, v in launch.args.items() if isinstance(v, torch.Tensor)}
    configs = kernel_modules().common.candidate_configs(launch.name, target, tensors, constexprs)
    if configs is None:  # not autotuned: its launch arguments are its one config
        configs = [kernel_modules().common.fixed_config(launch.args.get("num_warps", 4),
                                                        launch.args.get("num_stages", 3))]
    return configs


def _grid_ctas(launch, config, module: str, names: dict) -> tuple[int, bool]:
    """(CTAs the launch schedules, whether it is persistent): its grid, or for a persistent
    kernel (the module's PERSISTENT_TILES names it) its output tiles, each timed as one CTA of a
    wave — what the programs looping over them run, one per SM."""
    tiles = getattr(sys.modules[module], "PERSISTENT_TILES", {}).get(launch.name)
    if tiles is not None:
        return _evaluate(tiles, names), True
    grid = launch.grid
    if callable(grid):
        grid = grid({**launch.args, **config.kwargs})
    return math.prod(grid), False


class Estimator:
    """Plans ops for one GPU, compiles what they launch (once, in parallel), then times them."""

    def __init__(self, gpu: str = "H200", jobs: int | None = None, use_cache: bool = True):
        self.device = device(gpu)
        self.jobs, self.use_cache = jobs, use_cache
        self._builds: dict = {}  # build key → KernelBuild
        self._rows: dict = {}  # build key → aot row

    def _build(self, launch, config):
        args = {**launch.args, **{k: v for k, v in config.kwargs.items()}}
        build = kernel_modules().common.KernelBuild.from_launch(launch.name, launch.kernel, args, config)
        key = (build.key(), self.device.target)
        self._builds.setdefault(key, build)
        return key

    def prepare(self, planned: list) -> None:
        """Build every kernel build the planned launches may use (lists of launches)."""
        for launch_list in planned:
            for launch in launch_list:
                if launch.kind == "triton":
                    for config in _candidates(launch, self.device.target):
                        self._build(launch, config)
        todo = [key for key in self._builds if key not in self._rows]
        rows = run_builds([(self._builds[key], self.device.target) for key in todo], self.jobs, self.use_cache)
        self._rows.update(zip(todo, rows))

    def launch_seconds(self, launch) -> dict:
        """The estimate of one planned launch: the fastest of its configs for a Triton kernel."""
        if launch.kind == "torch" and launch.gemm is not None:  # a matrix product: the cuBLAS model
            return {"name": launch.name, "seconds": cublas_seconds(*launch.gemm, self.device),
                    "bound": "cuBLAS model", "config": ""}
        if launch.kind == "torch":
            return {"name": launch.name, "seconds": launch.bytes / self.device.hbm_bytes_per_second + LAUNCH_SECONDS,
                    "bound": "HBM bandwidth", "config": ""}
        best = None
        for config in _candidates(launch, self.device.target):
            key = self._build(launch, config)
            if key not in self._rows:
                self.prepare([[launch]])
            row = self._rows[key]
            module = self._builds[key].module
            names = _loop_names(launch.name, module, launch.args, dict(config.kwargs))
            ctas, persistent = _grid_ctas(launch, config, module, names)
            timed = build_seconds(row, names, ctas, _distinct_bytes(launch.args), self.device, persistent)
            if best is None or timed["seconds"] < best["seconds"]:
                best = {"name": launch.name, "config": row["config"], "build": key, **timed}
        module = self._builds[best["build"]].module
        roles = getattr(sys.modules[module], "LAUNCH_ROLES", {}).get(launch.name)
        split = roles(launch.args) if roles else None
        return self._roles_seconds(launch, split, best, module) if split else best

    def _roles_seconds(self, launch, split: list, whole: dict, module: str) -> dict:
        """A launch whose programs take roles with tiles and grids of their own (the module's
        LAUNCH_ROLES: [(arguments, grid)] per role): each role timed as a launch of its own at
        the whole build's occupancy (one binary: the larger role's registers), the roles' SM
        times summed (they share the SMs), one launch charge, and the whole launch's HBM floor."""
        occupancy = self._rows[whole["build"]]["ctas_per_sm"]
        compute, ctas, parts = 0.0, 0, []
        for args, grid in split:
            role = dataclasses.replace(launch, args=args, grid=grid)
            config = _candidates(role, self.device.target)[0]  # fixed tiles: the launch's own config
            key = self._build(role, config)
            if key not in self._rows:
                self.prepare([[role]])
            row = {**self._rows[key], "ctas_per_sm": min(self._rows[key]["ctas_per_sm"], occupancy)}
            names = _loop_names(launch.name, module, args, dict(config.kwargs))
            role_ctas, persistent = _grid_ctas(role, config, module, names)
            timed = build_seconds(row, names, role_ctas, 0, self.device, persistent)
            compute += timed["seconds"] - LAUNCH_SECONDS
            ctas += role_ctas
            parts.append(timed)
        memory = _distinct_bytes(launch.args) / self.device.hbm_bytes_per_second
        bound = "HBM bandwidth" if memory > compute else max(parts, key=lambda t: t["seconds"])["bound"]
        return {**whole, "seconds": max(compute, memory) + LAUNCH_SECONDS, "bound": bound, "ctas": ctas,
                "waves": sum(t["waves"] for t in parts), "roles": parts}

    def sequence_seconds(self, launch_list: list) -> dict:
        parts = [self.launch_seconds(launch) for launch in launch_list]
        return {"seconds": sum(p["seconds"] for p in parts), "launches": len(parts), "parts": parts}

    def op(self, s, dtype=torch.bfloat16, dropout_p: float = 0.0, bias: bool = False) -> dict:
        """{phase: estimate} for op `s` (forward, backward, fwd+bwd)."""
        return self.ops([s], dtype, dropout_p, bias)[s]

    def ops(self, shapes: list, dtype=torch.bfloat16, dropout_p: float = 0.0, bias: bool = False,
            progress=None) -> dict:
        """{shape: {phase: estimate}}: every op planned first, its builds compiled in one batch."""
        plans = {s: launch_plans.op_launches(s, self.device.target, self.device.sms, dtype, dropout_p, bias)
                 for s in shapes}
        if progress:
            count = sum(len(found) for p in plans.values() for found in p.values())
            progress(f"estimate: {count} launches planned for {self.device.name}; building what they may use …")
        self.prepare([found for phases in plans.values() for found in phases.values()])
        out = {}
        for s, phases in plans.items():
            timed = {phase: self.sequence_seconds(found) for phase, found in phases.items()}
            timed["fwd+bwd"] = {"seconds": timed["forward"]["seconds"] + timed["backward"]["seconds"],
                                "launches": timed["forward"]["launches"] + timed["backward"]["launches"],
                                "parts": timed["forward"]["parts"] + timed["backward"]["parts"]}
            out[s] = timed
        return out

    def build_rows(self) -> list[dict]:
        """The compile rows of every build compiled so far."""
        return list(self._rows.values())

    def chosen_row(self, part: dict) -> dict | None:
        """The compile row of the build a timed launch (`part`) chose: that launch's own
        specialization, which a (function, config) pair alone does not name."""
        return self._rows.get(part.get("build"))


# --------------------------------------------------------------------------------------
# Many adapters in one batch (multi_lora_linear)
# --------------------------------------------------------------------------------------

# The grouped op's two targets (bf16, d = 4096 → 4096, r = 16): K adapters over M rows split evenly
# against one adapter's LoRA over the same rows, and K small batches in one call against K
# single-adapter calls one after the other (each reading the base weight again).
MULTI_LORA_SCENARIOS = (
    dict(name="8 adapters, M = 8192 split evenly: fwd+bwd ÷ one adapter's LoRA over the same rows",
         adapters=8, rows=1024, d=4096, r=16, compare="one adapter", relation="≤", goal=1.15),
    dict(name="8 adapters × 128 rows: speedup of one call over 8 sequential single-adapter calls",
         adapters=8, rows=128, d=4096, r=16, compare="sequential", relation="≥", goal=1.5),
)


def multi_lora_estimate(est: "Estimator", scenario: dict) -> dict:
    """The static estimate of one MULTI_LORA_SCENARIOS entry: fwd+bwd of the grouped call, of one
    adapter's ``lora_linear`` over all its rows, and of the adapters' calls one after the other
    (each over its own rows), in seconds, with the launches and the target's ratio."""
    adapters, rows, d, r = (scenario[k] for k in ("adapters", "rows", "d", "r"))
    grouped = launch_plans.call_launches(*launch_plans.multi_lora_call(adapters, rows, d, r), est.device.target,
                                         est.device.sms)
    one = launch_plans.op_launches(launch_plans.OpShape("lora", adapters * rows, d, d, r), est.device.target,
                                   est.device.sms)
    single = launch_plans.op_launches(launch_plans.OpShape("lora", rows, d, d, r), est.device.target, est.device.sms)
    est.prepare([*grouped.values(), *one.values(), *single.values()])

    def fwd_bwd(phases):
        timed = [est.sequence_seconds(found) for found in phases.values()]
        return sum(t["seconds"] for t in timed), sum(t["launches"] for t in timed), timed

    grouped_s, grouped_launches, parts = fwd_bwd(grouped)
    one_s, _, _ = fwd_bwd(one)
    single_s, single_launches, _ = fwd_bwd(single)
    ratio = grouped_s / one_s if scenario["compare"] == "one adapter" else adapters * single_s / grouped_s
    return {"grouped_s": grouped_s, "grouped_launches": grouped_launches, "one_adapter_s": one_s,
            "sequential_s": adapters * single_s, "sequential_launches": adapters * single_launches,
            "ratio": ratio, "parts": [p for phase in parts for p in phase["parts"]]}


# --------------------------------------------------------------------------------------
# cuBLAS, the base layer's bar
# --------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_K) tiles the cuBLAS model chooses among (persistent; best per shape).
CUBLAS_TILES = ((128, 256, 64), (256, 128, 64), (128, 128, 64), (64, 128, 64), (64, 64, 64))


def _cublas_tile_clocks(block_m: int, block_n: int, block_k: int, dev: Device, element_bytes: int = 2) -> float:
    """Clocks per BLOCK_K step of one persistent tile (one CTA per SM)."""
    rates = dev.rates
    flops = 2 * block_m * block_n * block_k
    loads = (block_m + block_n) * block_k * element_bytes
    if dev.target == "sm90":  # 64-row warpgroups, both operands from shared memory, TMA writes
        operand = (block_m // 64) * (block_k // 16) * (block_n * 16 + 64 * 16) * element_bytes
        tensor = flops / (rates["tensor_flops"]["half"] * rates["pipe_efficiency"]["wgmma (TMA)"])
    else:  # 8 warps of 64×32 (or as the tile allows): ldmatrix of A and B fragments per warp
        warps = 8
        warp_m, warp_n = block_m // 2, block_n // 4
        operand = warps * (block_k // 16) * (warp_m + warp_n) * 16 * element_bytes
        tensor = flops / (rates["tensor_flops"]["half"] * rates["pipe_efficiency"]["mma.sync"])
    return max(tensor, (operand + loads) / rates["shared_bytes"], loads / rates["l2_bytes"])


def cublas_seconds(M: int, N: int, K: int, dev: Device, element_bytes: int = 2) -> float:
    """y[M, N] = x[M, K]·W[N, K]ᵀ by cuBLAS (bf16): the best tile's persistent schedule, at least
    the bytes of x, W and y at 0.9 of HBM bandwidth (a GEMV at M = 1 is just that)."""
    memory = (M * K + N * K + M * N) * element_bytes / dev.hbm_bytes_per_second
    best = math.inf
    for block_m, block_n, block_k in CUBLAS_TILES:
        tiles = _cdiv(M, block_m) * _cdiv(N, block_n)
        rounds = _cdiv(tiles, dev.sms)
        clocks = rounds * (_cdiv(K, block_k) * _cublas_tile_clocks(block_m, block_n, block_k, dev, element_bytes)
                           + dev.latency_clk)
        best = min(best, clocks / dev.clock_hz)
    return max(best, memory) + LAUNCH_SECONDS


def base_layer_seconds(s, dev: Device) -> dict:
    """The frozen dense layer x·Wᵀ (forward) and dY·W (backward) by cuBLAS."""
    forward = cublas_seconds(s.M, s.N, s.K, dev, s.element_bytes)
    backward = cublas_seconds(s.M, s.K, s.N, dev, s.element_bytes)
    return {"forward": forward, "backward": backward, "fwd+bwd": forward + backward}


# --------------------------------------------------------------------------------------
# PEFT's own layers, op by op
# --------------------------------------------------------------------------------------

def eager_launch_seconds(launch: tuple, dev: Device) -> float:
    """One eager launch (a `CountBytes` record): a half-precision matrix product by the cuBLAS
    model; an fp32 one on the FP32 CUDA cores (PyTorch's default, TF32 off) or its bytes,
    whichever is longer; anything else its bytes at HBM speed; each plus a launch."""
    _, gemm, dtype, nbytes = launch
    memory = nbytes / dev.hbm_bytes_per_second
    if gemm is not None and dtype in (torch.bfloat16, torch.float16):
        return cublas_seconds(*gemm, dev)
    if gemm is not None:
        return max(2 * math.prod(gemm) / dev.fp32_flops, memory) + LAUNCH_SECONDS
    return memory + LAUNCH_SECONDS


def _eager_phases(run, grad_out: torch.Tensor, dev: Device) -> dict:
    """`run()` (a forward on meta tensors) and its backward from `grad_out`, each ATen op timed
    as one launch (`eager_launch_seconds`): {phase: {seconds, launches, parts}}."""
    with CountBytes() as forward:
        y = run()
    with CountBytes() as backward:
        y.backward(grad_out)
    out = {}
    for phase, log in (("forward", forward), ("backward", backward)):
        parts = [{"name": launch[0], "seconds": eager_launch_seconds(launch, dev)} for launch in log.launches]
        out[phase] = {"seconds": sum(p["seconds"] for p in parts), "launches": len(parts), "parts": parts}
    out["fwd+bwd"] = {"seconds": out["forward"]["seconds"] + out["backward"]["seconds"],
                      "launches": out["forward"]["launches"] + out["backward"]["launches"],
                      "parts": out["forward"]["parts"] + out["backward"]["parts"]}
    return out


def peft_layer_seconds(s, dev: Device, dropout_p: float = 0.0) -> dict | None:
    """PEFT's own layer at shape `s` (op "lora", or "dora": its DoRA layer), bf16 base and PEFT's
    default fp32 adapters, forward and backward run on meta tensors and each ATen op it
    dispatches timed as one launch (`eager_launch_seconds`): {phase: {seconds, launches, parts}}.
    None without peft, or for ops PEFT runs through other packages (NF4: bitsandbytes)."""
    if s.op not in ("lora", "dora"):
        return None
    try:
        import peft
    except ImportError:
        return None
    holder = torch.nn.Module()
    holder.proj = torch.nn.Linear(s.K, s.N, bias=False, device="meta", dtype=torch.bfloat16)
    config = peft.LoraConfig(r=s.r, lora_alpha=2 * s.r, target_modules=["proj"], lora_dropout=dropout_p,
                             use_dora=s.op == "dora")
    layer = peft.get_peft_model(holder, config).base_model.model.proj
    x = torch.empty(s.M, s.K, device="meta", dtype=torch.bfloat16, requires_grad=True)
    return _eager_phases(lambda: layer(x), torch.empty(s.M, s.N, device="meta", dtype=torch.bfloat16), dev)


def eager_adapter_seconds(s, dev: Device) -> dict:
    """The bottleneck adapter (op "bottleneck", x [M, d], bottleneck m = s.r) as eager PyTorch
    runs it — `peft_ops.reference.bottleneck_adapter`, gelu, in x's dtype, every parameter
    trained — op by op as `peft_layer_seconds` times PEFT's layers."""
    if s.op != "bottleneck":
        raise ValueError(f"s: an eager adapter estimate needs op 'bottleneck', got {s.op!r}")
    meta = dict(device="meta", dtype={2: torch.bfloat16, 4: torch.float32}[s.element_bytes])
    x = torch.empty(s.M, s.K, **meta, requires_grad=True)
    params = [torch.empty(shape, **meta, requires_grad=True) for shape in ((s.r, s.K), (s.r,), (s.K, s.r), (s.K,))]
    return _eager_phases(lambda: reference.bottleneck_adapter(x, *params, "gelu", 1.0, 0.0),
                         torch.empty(s.M, s.K, **meta), dev)


def adapter_gemm_floor_seconds(s, dev: Device) -> dict:
    """The bottleneck adapter's six matrix products alone, each by the cuBLAS model — forward
    h = x·W_downᵀ [M, m] and act(h)·W_upᵀ [M, d]; backward dz = dY·W_up, dX = dh·W_down,
    dW_down = dhᵀ·x, dW_up = dYᵀ·act(h) — with nothing else (no activation, bias, residual or
    Σ over rows, each of which eager PyTorch runs as launches of its own): the floor of any
    implementation built on cuBLAS's GEMMs."""
    M, d, m, e = s.M, s.K, s.r, s.element_bytes
    forward = cublas_seconds(M, m, d, dev, e) + cublas_seconds(M, d, m, dev, e)
    backward = (cublas_seconds(M, m, d, dev, e) + cublas_seconds(M, d, m, dev, e) + cublas_seconds(m, d, M, dev, e)
                + cublas_seconds(d, m, M, dev, e))
    return {"forward": forward, "backward": backward, "fwd+bwd": forward + backward}


# --------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------

def calibration(jobs: int | None = None, use_cache: bool = True) -> list[dict]:
    """The model against its anchors (CALIBRATION): each row gives the model's figure, the
    published or measured one, and the ratio."""
    kernels = kernel_modules().calibration
    rows = []
    h200, a100 = Estimator("H200", jobs, use_cache), Estimator("A100-80GB", jobs, use_cache)
    n = 8192
    flops = 2 * n ** 3
    rows.append({"anchor": "cuBLAS bf16 GEMM 8192³, H200 (TFLOP/s)",
                 "model": flops / cublas_seconds(n, n, n, h200.device) / 1e12,
                 "reference": CALIBRATION["cublas_bf16_8192_tflops_h200"]})
    numel = 2 * 1024 ** 3  # 4.3 GB of bf16 read and 4.3 GB written, as the measurement
    x = torch.empty(numel, device="meta", dtype=torch.bfloat16)
    copied = h200.sequence_seconds(_prepared(h200, lambda: kernels.copy(x)))
    rows.append({"anchor": "device-to-device copy, H200 (TB/s, read + written)",
                 "model": 2 * numel * 2 / copied["seconds"] / 1e12, "reference": CALIBRATION["copy_TBps_h200"]})
    for est, key, label in ((a100, "tutorial_over_cublas_a100", "A100"), (h200, "tutorial_over_cublas_hopper", "H200")):
        a = torch.empty(n, n, device="meta", dtype=torch.bfloat16)
        b = torch.empty(n, n, device="meta", dtype=torch.bfloat16)
        tutorial = est.sequence_seconds(_prepared(est, lambda: kernels.matmul(a, b)))["seconds"]
        low, high = CALIBRATION[key]
        rows.append({"anchor": f"Triton tutorial matmul ÷ cuBLAS, 8192³, {label}",
                     "model": cublas_seconds(n, n, n, est.device) / tutorial, "reference": (low, high)})
    for row in rows:
        ref = row["reference"]
        row["within"] = (ref[0] <= row["model"] <= ref[1]) if isinstance(ref, tuple) else \
            abs(row["model"] / ref - 1) <= 0.03
    return rows


def _prepared(est: Estimator, fn) -> list:
    """fn's launches planned for est's GPU, their builds compiled."""
    found = launch_plans.plan(fn, est.device.target, est.device.sms)
    est.prepare([found])
    return found
