"""``peft-ops bench``: how much faster and leaner the fused ops are than what people use now.

On a CUDA GPU: forward, backward and forward+backward times (``triton.testing.do_bench``) of
each fused op and of every baseline present — eager PyTorch (the reference chain, PEFT's
way), the frozen base layer alone (cuBLAS: the bar LoRA is judged against), Hugging Face
PEFT's LoRA layer, bitsandbytes' 4-bit path — with speedups, TFLOP/s, GB/s, % of the
device's roofline, peak memory and activation bytes saved for backward.

Without a GPU it says so, and reports what holds anyway: the roofline model of every op and
shape (FLOPs, minimum / fused / eager bytes, and the least time those take on a chosen GPU: a
bound, not a prediction); the static estimate (``peft_ops.tools.estimate``: the launches each op
makes, timed from the compiled kernels' facts, calibrated against cuBLAS and copy figures);
and the activation bytes our layers save for backward next to PEFT's (measured here). On a
GPU the estimate sits beside the measurements, so the two can be compared.

Writes bench.csv, bench.json (every row, with device, versions, date and command),
bench.txt (the printed tables) and bench.png (speedup and % of roofline per op and shape:
measured, estimated, and the bytes-only upper bound) to the output folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

from .. import reference
from ..backend import kernel_modules
from ..kernels.interface import dtype_named
from ..nf4 import dequantize, quantize
from ..nn.bottleneck import BottleneckAdapter
from ..nn.lora import LoraLinear, QLoraLinear
from ..ops import gemm_choice
from ..ops.bottleneck import bottleneck_adapter
from ..ops.dora import dora_linear, qdora_linear, squared_row_norms
from ..ops.lora import lora_linear
from ..ops.multi_lora import multi_lora_linear
from ..ops.qlora import nf4_linear, qlora_linear
from . import estimate, roofline, tune
from .accuracy import saved_activation_bytes
from .aot import format_table, problems
from .presets import PRESETS
from .records import provenance, text_table, write_csv, write_json
from .roofline import ADAPTER_OPS, NF4_OPS, OPS, PHASES, OpShape

# The phases of a bench row: the roofline's two, and their sum.
ROW_PHASES = (*PHASES, "fwd+bwd")
# --ops names kept from before the bottleneck op had one name everywhere.
OP_ALIASES = {"adapter": "bottleneck"}


def shapes_for(ops: list[str], preset: dict) -> list[OpShape]:
    """The preset's shapes of `ops`: its "first" ones (if any), then every combination."""
    out = [s for s in preset.get("first", ()) if s.op in ops]
    for op in ops:
        if op == "bottleneck":
            out += [OpShape("bottleneck", M, d, d, m) for d, m in preset["bottlenecks"] for M in preset["tokens"]]
        elif op == "nf4":
            out += [OpShape("nf4", M, K, N) for K, N in preset["layers"]
                    for M in preset.get("nf4_tokens", preset["tokens"])]
        else:
            out += [OpShape(op, M, K, N, r) for K, N in preset["layers"] for r in preset["ranks"]
                    for M in preset["tokens"]]
    return list(dict.fromkeys(out))


def gemm_label(s: OpShape, dtype: torch.dtype, device: torch.device) -> str:
    """"forward/dX" implementations of lora_linear's GEMMs at shape s (``peft_ops.ops.gemm_choice``)."""
    forward = gemm_choice.choose("forward", dtype, s.M, s.N, s.K, s.r, device)
    dx = gemm_choice.choose("dx", dtype, s.M, s.N, s.K, s.r, device)
    return f"{forward}/{dx}"


def _sum_phases(values: dict) -> dict:
    return {**values, "fwd+bwd": values["forward"] + values["backward"]}


def model_row(s: OpShape, gpu_name: str, gpu: dict) -> list[dict]:
    """The roofline rows (one per phase) of one op and shape. Its times are bounds: what the
    FLOPs and bytes alone would take at the datasheet's peaks (no kernel reaches them)."""
    f = _sum_phases({p: roofline.flops(s, p) for p in PHASES})
    low = _sum_phases({p: roofline.min_bytes(s, p) for p in PHASES})
    fused = _sum_phases({p: roofline.fused_bytes(s, p) for p in PHASES})
    eager = _sum_phases(roofline.unfused_bytes(s))
    base_phases = {p: roofline.base_layer(s, p) for p in PHASES}
    base = {**base_phases, "fwd+bwd": tuple(map(sum, zip(*base_phases.values())))}
    rows = []
    for phase in ROW_PHASES:
        t_min = roofline.roofline_seconds(f[phase], low[phase], gpu)
        t_fused = roofline.roofline_seconds(f[phase], fused[phase], gpu)
        t_eager = roofline.roofline_seconds(f[phase], eager[phase], gpu)
        row = {"op": s.op, "shape": s.label(), "M": s.M, "K": s.K, "N": s.N, "r": s.r, "phase": phase,
               "flops": f[phase], "min_bytes": low[phase], "fused_bytes": fused[phase], "eager_bytes": eager[phase],
               "flop_per_byte": f[phase] / low[phase], "model_gpu": gpu_name,
               # the bytes-only model: bounds (the least time those FLOPs and bytes can take), not predictions
               "bound_fused_ms": t_fused * 1e3, "bound_eager_ms": t_eager * 1e3,
               "bound_speedup_vs_eager": t_eager / t_fused, "bound_pct_roofline": 100 * t_min / t_fused}
        if s.op in ADAPTER_OPS:
            row["bound_fused_vs_base"] = t_fused / roofline.roofline_seconds(*base[phase], gpu)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------
# Timed runs (a CUDA GPU; or any device with --time-anyway, for testing the code path)
# --------------------------------------------------------------------------------------

def timer(device: torch.device):
    """fn → median milliseconds: triton.testing.do_bench on a GPU (warm-up, L2 flush), else the
    median of a few wall-clock runs (meaningful only for checking the code path)."""
    if device.type == "cuda":
        return kernel_modules().common.benchmark_ms

    def cpu_median_ms(fn, reps=3):
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[len(times) // 2]
    return cpu_median_ms


def implementations(s: OpShape, dtype: torch.dtype, device: torch.device) -> tuple[dict, torch.Tensor, list, list]:
    """{name: forward function} for the fused op and every baseline present, the output
    gradient, the leaves that require grad (x first), and the other non-activation tensors
    (weights), which saved-byte counts leave out. `peft-ops bench` and `pytest benchmarks/`
    both time these."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0, grad=False):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype).requires_grad_(grad)

    x = rand(s.M, s.K, grad=True)
    if s.op == "bottleneck":
        params = [rand(s.r, s.K, scale=s.K ** -0.5, grad=True), rand(s.r, grad=True),
                  rand(s.K, s.r, scale=s.r ** -0.5, grad=True), rand(s.K, grad=True)]
        impls = {"fused": lambda: bottleneck_adapter(x, *params, "gelu", 1.0),
                 "eager": lambda: reference.bottleneck_adapter(x, *params, "gelu", 1.0)}
        return impls, rand(s.M, s.K), [x, *params], []

    W = rand(s.N, s.K, scale=s.K ** -0.5)
    impls = {"base": lambda: F.linear(x, W)}
    leaves, weights = [x], [W]
    if s.op in NF4_OPS:
        q = quantize(W)
        weights += list(q.buffers())
        if s.op == "nf4":
            impls["fused"] = lambda: nf4_linear(x, q)
            impls["eager"] = lambda: F.linear(x, dequantize(q, dtype))
    magnitude = None
    if s.op in ADAPTER_OPS:
        A, B = rand(s.r, s.K, scale=s.K ** -0.5, grad=True), rand(s.N, s.r, scale=s.r ** -0.5, grad=True)
        leaves += [A, B]
        if s.op == "lora":
            impls["fused"] = lambda: lora_linear(x, W, A, B, 2.0)
            impls["eager"] = lambda: reference.lora_linear(x, W, A, B, 2.0)
        elif s.op == "qlora":
            impls["fused"] = lambda: qlora_linear(x, q, A, B, 2.0)
            impls["eager"] = lambda: reference.qlora_linear(x, q, A, B, 2.0)
            impls["lora (bf16 base)"] = lambda: lora_linear(x, W, A, B, 2.0)
        else:  # DoRA: ‖W‖² cached, as the layers hold it; beside it our LoRA (QLoRA) at the same shape
            magnitude = (W.float().norm(dim=1) * 1.1).to(dtype).requires_grad_()
            leaves.append(magnitude)
            if s.op == "dora":
                sq = squared_row_norms(W)
                impls["fused"] = lambda: dora_linear(x, W, A, B, magnitude, 2.0, weight_sq_norm=sq)
                impls["eager"] = lambda: reference.dora_linear(x, W, A, B, magnitude, 2.0)
                impls["lora"] = lambda: lora_linear(x, W, A, B, 2.0)
            else:
                sq = squared_row_norms(q, dtype)
                impls["fused"] = lambda: qdora_linear(x, q, A, B, magnitude, 2.0, weight_sq_norm=sq)
                impls["eager"] = lambda: reference.qdora_linear(x, q, A, B, magnitude, 2.0)
                impls["qlora"] = lambda: qlora_linear(x, q, A, B, 2.0)
            weights.append(sq)
        peft_layer = _peft_layer(s, W, A, B, quantized=s.op in NF4_OPS, magnitude=magnitude)
        if peft_layer is not None:
            impls["peft"] = lambda: peft_layer(x)
            weights += [*peft_layer.parameters(), *peft_layer.buffers()]
    elif s.op == "nf4":
        bnb_layer = _bnb_layer(W)
        if bnb_layer is not None:
            impls["bitsandbytes"] = lambda: bnb_layer(x)
            weights += [*bnb_layer.parameters(), *bnb_layer.buffers()]
    return impls, rand(s.M, s.N), leaves, weights


def _bnb_layer(W: torch.Tensor):
    """bitsandbytes' Linear4bit (NF4, double quant) over W, or None without bitsandbytes."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    layer = bnb.nn.Linear4bit(W.shape[1], W.shape[0], bias=False, compute_dtype=W.dtype, compress_statistics=True,
                              quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(W.detach().cpu().float(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
    layer = layer.to(W.device)  # quantizes on the move
    if getattr(layer.weight, "quant_state", None) is None:  # bitsandbytes builds that did not
        layer.weight = bnb.nn.Params4bit(W.detach().float(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)._quantize(W.device)
    return layer


def _peft_layer(s: OpShape, W, A, B, quantized: bool, magnitude=None):
    """PEFT's LoRA layer over nn.Linear (or over bitsandbytes' Linear4bit), with A and B; its
    DoRA layer when a magnitude is given."""
    try:
        import peft
    except ImportError:
        return None
    if quantized:
        base = _bnb_layer(W)
        if base is None:
            return None
    else:
        base = torch.nn.Linear(s.K, s.N, bias=False, device=W.device, dtype=W.dtype)
        with torch.no_grad():
            base.weight.copy_(W)
    holder = torch.nn.Module()
    holder.proj = base
    model = peft.get_peft_model(holder, peft.LoraConfig(r=s.r, lora_alpha=2 * s.r, target_modules=["proj"],
                                                        use_dora=magnitude is not None))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
        if magnitude is not None:
            layer.lora_magnitude_vector["default"].weight.copy_(magnitude)
    return layer


def timed_rows(s: OpShape, dtype: torch.dtype, device: torch.device, measure, gpu: dict) -> dict:
    """{phase: {impl: ms}} plus peak memory and saved bytes of each implementation."""
    impls, dy, leaves, weights = implementations(s, dtype, device)
    out = {phase: {} for phase in ROW_PHASES}
    memory, saved = {}, {}
    for name, forward in impls.items():
        def step(forward=forward):
            for t in leaves:
                t.grad = None
            forward().backward(dy)

        out["forward"][name] = measure(forward)
        y = forward()
        out["backward"][name] = measure(lambda y=y: y.backward(dy, retain_graph=True))
        out["fwd+bwd"][name] = measure(step)
        del y
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            memory[name] = torch.cuda.max_memory_allocated() - start
        saved[name] = saved_activation_bytes(forward, leaves[1:] + weights)[0]
    return {"ms": out, "peak_memory_bytes": memory, "saved_bytes": saved}


# --------------------------------------------------------------------------------------
# Static facts without a GPU
# --------------------------------------------------------------------------------------

def saved_activation_rows(dtype=torch.bfloat16) -> list[dict]:
    """Activation bytes saved for backward (saved_tensors_hooks, parameters excluded), in
    units of x, measured here: our layers next to PEFT's (and eager for the bottleneck adapter)."""
    M, d, r = 256, 512, 16
    rows = []
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(M, d, generator=gen).to(dtype).requires_grad_()
    x_bytes = x.numel() * x.element_size()
    for dropout in (0.0, 0.1):
        linear = torch.nn.Linear(d, d, bias=False, dtype=dtype)
        layers = {"peft_ops LoraLinear": LoraLinear.from_linear(linear, r=r, lora_alpha=2 * r,
                                                                          lora_dropout=dropout),
                  "peft_ops QLoraLinear": QLoraLinear.from_linear(linear, r=r, lora_alpha=2 * r,
                                                                            lora_dropout=dropout),
                  "peft_ops LoraLinear (DoRA)": LoraLinear.from_linear(linear, r=r, lora_alpha=2 * r,
                                                                       lora_dropout=dropout, use_dora=True)}
        try:
            import peft

            holder = torch.nn.Module()
            holder.proj = torch.nn.Linear(d, d, bias=False, dtype=dtype)
            layers["PEFT LoRA (fp32 adapters)"] = peft.get_peft_model(holder, peft.LoraConfig(
                r=r, lora_alpha=2 * r, target_modules=["proj"], lora_dropout=dropout)).base_model.model.proj
            dora_holder = torch.nn.Module()
            dora_holder.proj = torch.nn.Linear(d, d, bias=False, dtype=dtype)
            layers["PEFT DoRA (fp32 adapters)"] = peft.get_peft_model(dora_holder, peft.LoraConfig(
                r=r, lora_alpha=2 * r, target_modules=["proj"], lora_dropout=dropout,
                use_dora=True)).base_model.model.proj
        except ImportError:
            pass
        found = {}
        for name, layer in layers.items():
            layer.train()
            weights = [*layer.parameters(), *layer.buffers()]  # the NF4 weight is buffers
            found[name] = saved_activation_bytes(lambda layer=layer: layer(x), weights)[0]
        for name, nbytes in found.items():
            mask_bytes = M * -(-d // 32) * 4 if dropout else 0  # the keep mask, bit-packed
            # DoRA keeps one [M, out] tensor more (the pre-scale output) and two fp32 [out] vectors
            dora = M * d * x.element_size() + 2 * d * 4 if "DoRA" in name else 0
            rows.append({"layer": name, "shape": f"M={M} d={d} r={r}", "dropout": dropout, "saved_bytes": nbytes,
                         "saved_per_x": nbytes / x_bytes, "x_plus_xa_per_x": (x_bytes + M * r * 4) / x_bytes,
                         "budget_per_x": (x_bytes + M * r * 4 + mask_bytes + dora) / x_bytes})
    adapter = BottleneckAdapter(d, 64, "gelu", dtype=dtype)
    params = list(adapter.parameters())
    for name, fn in (("peft_ops BottleneckAdapter", lambda: adapter(x)),
                     ("eager bottleneck adapter (reference)",
                      lambda: reference.bottleneck_adapter(x, *params, "gelu", 1.0))):
        nbytes = saved_activation_bytes(fn, params)[0]
        rows.append({"layer": name, "shape": f"M={M} d={d} m=64", "dropout": 0.0, "saved_bytes": nbytes,
                     "saved_per_x": nbytes / x_bytes, "x_plus_xa_per_x": None, "budget_per_x": None})
    return rows


def timed_multi_adapter(scenario: dict, dtype: torch.dtype, device: torch.device, measure) -> dict:
    """fwd+bwd milliseconds of one ``estimate.MULTI_LORA_SCENARIOS`` entry: the grouped call, one
    adapter's ``lora_linear`` over all the rows, and the adapters' calls one after the other."""
    adapters, rows, d, r = (scenario[k] for k in ("adapters", "rows", "d", "r"))
    if device.type != "cuda":  # --time-anyway on a CPU checks the code path: tiny shapes
        rows, d = min(rows, 8), min(d, 64)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0, grad=False):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype).requires_grad_(grad)

    x, weight, dy = rand(adapters * rows, d, grad=True), rand(d, d, scale=d ** -0.5), rand(adapters * rows, d)
    lora_As = [rand(r, d, scale=d ** -0.5, grad=True) for _ in range(adapters)]
    lora_Bs = [rand(d, r, scale=r ** -0.5, grad=True) for _ in range(adapters)]
    ids = torch.arange(adapters).repeat_interleave(rows)  # on the CPU, as the layers pass them

    def grouped():
        multi_lora_linear(x, weight, lora_As, lora_Bs, [2.0] * adapters, ids).backward(dy)

    def one_adapter():
        lora_linear(x, weight, lora_As[0], lora_Bs[0], 2.0).backward(dy)

    def sequential():
        for k in range(adapters):
            part = slice(k * rows, (k + 1) * rows)
            lora_linear(x[part], weight, lora_As[k], lora_Bs[k], 2.0).backward(dy[part])

    return {"grouped_ms": measure(grouped), "one_adapter_ms": measure(one_adapter),
            "sequential_ms": measure(sequential)}


def multi_adapter_rows(dtype: torch.dtype, device: torch.device, measure, gpu_name: str | None, jobs) -> list[dict]:
    """The grouped op's targets (``estimate.MULTI_LORA_SCENARIOS``): timed when `measure` is given
    (a GPU), the static estimate on `gpu_name` unless None."""
    est = estimate.Estimator(gpu_name, jobs) if gpu_name in estimate.GPUS else None
    out = []
    for scenario in estimate.MULTI_LORA_SCENARIOS:
        row = {k: scenario[k] for k in ("name", "adapters", "rows", "d", "r", "compare", "relation", "goal")}
        if measure is not None:
            row.update(timed_multi_adapter(scenario, dtype, device, measure))
            row["measured_ratio"] = (row["grouped_ms"] / row["one_adapter_ms"] if scenario["compare"] == "one adapter"
                                     else row["sequential_ms"] / row["grouped_ms"])
        if est is not None:
            found = estimate.multi_lora_estimate(est, scenario)
            row.update({"estimate_grouped_ms": found["grouped_s"] * 1e3,
                        "estimate_one_adapter_ms": found["one_adapter_s"] * 1e3,
                        "estimate_sequential_ms": found["sequential_s"] * 1e3, "estimate_ratio": found["ratio"],
                        "estimate_launches": found["grouped_launches"],
                        "estimate_sequential_launches": found["sequential_launches"],
                        "estimate_kernels": "; ".join(f"{p['name'].strip('_').removesuffix('_kernel')} "
                                                      f"{p['seconds'] * 1e6:.1f} µs" for p in found["parts"])})
        out.append(row)
    return out


def add_estimates(rows: list[dict], shapes: list[OpShape], gpu_name: str, gpu: dict, dtype, jobs, progress) -> list:
    """The static estimate (peft_ops.tools.estimate) beside each row, in place; returns the aot
    rows of the builds it chose. An estimate, not a measurement: it times the launches each op
    makes from the compiled kernels' facts, calibrated against cuBLAS and copy figures."""
    if gpu_name not in estimate.GPUS:
        progress(f"no static estimate for {gpu_name} (estimates exist for {', '.join(sorted(estimate.GPUS))})")
        return []
    est = estimate.Estimator(gpu_name, jobs)
    # beside QLoRA and DoRA our LoRA at the same shape; beside QDoRA our QLoRA
    companion = {"qlora": "lora", "dora": "lora", "qdora": "qlora"}
    wanted = list(shapes) + [dataclasses.replace(s, op=companion[s.op]) for s in shapes if s.op in companion]
    results = est.ops(list(dict.fromkeys(wanted)), dtype, progress=progress)
    peft_estimates = {}  # shape → PEFT's DoRA layer or the eager adapter, op by op (None without peft)
    chosen = {}
    for row in rows:
        s = next(s for s in shapes if s.op == row["op"] and s.label() == row["shape"])
        phase = results[s][row["phase"]]
        seconds = phase["seconds"]
        row["estimate_ms"] = seconds * 1e3
        row["estimate_pct_roofline"] = 100 * roofline.roofline_seconds(row["flops"], row["min_bytes"], gpu) / seconds
        row["estimate_pct_hbm"] = 100 * row["min_bytes"] / seconds / (gpu["bandwidth_GBps"] * 1e9)
        row["estimate_launches"] = phase["launches"]
        row["estimate_kernels"] = "; ".join(f"{p['name'].strip('_').removesuffix('_kernel')} {p['config']} "
                                            f"({p['bound']})" for p in phase["parts"] if p["config"] is not None
                                            and not p["name"].startswith("aten."))
        if s.op in (*ADAPTER_OPS, "nf4"):
            row["estimate_base_ms"] = estimate.base_layer_seconds(s, est.device)[row["phase"]] * 1e3
            row["estimate_vs_base"] = row["estimate_ms"] / row["estimate_base_ms"]
        if s.op in companion:
            other = companion[s.op]
            row[f"estimate_{other}_ms"] = results[dataclasses.replace(s, op=other)][row["phase"]]["seconds"] * 1e3
        if s.op == "bottleneck":  # beside ours: eager PyTorch, and the floor of any design on cuBLAS's GEMMs
            eager = peft_estimates.setdefault(s, estimate.eager_adapter_seconds(s, est.device))
            floor = estimate.adapter_gemm_floor_seconds(s, est.device)[row["phase"]]
            row["estimate_eager_ms"] = eager[row["phase"]]["seconds"] * 1e3
            row["estimate_eager_launches"] = eager[row["phase"]]["launches"]
            row["estimate_cublas_gemms_ms"] = floor * 1e3
            row["estimate_cublas_gemms_pct_roofline"] = \
                100 * roofline.roofline_seconds(row["flops"], row["min_bytes"], gpu) / floor
        if s.op == "dora" and (theirs := peft_estimates.setdefault(s, estimate.peft_layer_seconds(s, est.device))):
            row["estimate_peft_ms"] = theirs[row["phase"]]["seconds"] * 1e3
            row["estimate_peft_launches"] = theirs[row["phase"]]["launches"]
        for part in phase["parts"]:
            row = est.chosen_row(part)  # None for a PyTorch op (aten.*): nothing compiled
            if row is not None:
                chosen[part["build"]] = {**row, "bound": part["bound"]}
    return list(chosen.values())


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------

def write_plot(path: pathlib.Path, rows: list[dict], timed: bool) -> bool:
    """Per op and shape (fwd+bwd): speedup over eager (measured; or the bytes-only bound without
    a GPU) as bars, and % of roofline: measured, the static estimate, and the bytes-only upper
    bound, as lines. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in rows if r["phase"] == "fwd+bwd"]
    ops = [op for op in OPS if any(r["op"] == op for r in rows)]
    if not ops:
        return False
    widest = max(sum(r["op"] == op for r in rows) for op in ops)
    fig, axes = plt.subplots(len(ops), 1, figsize=(max(8.0, 0.3 * widest), 3.4 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        mine = [r for r in rows if r["op"] == op]
        xs = list(range(len(mine)))
        measured = timed and any("speedup_vs_eager" in r for r in mine)
        speed = [r.get("speedup_vs_eager", float("nan")) if measured else r["bound_speedup_vs_eager"] for r in mine]
        ax.bar(xs, speed, color="tab:blue", alpha=0.8,
               label="× eager, measured" if measured else "× eager, bytes-only bound (no timing)")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_ylabel("× eager")
        ax.set_title(f"{op}: fwd+bwd")
        ax.set_xticks(xs, [r["shape"] for r in mine], rotation=70, fontsize=6)
        twin = ax.twinx()
        twin.plot(xs, [r["bound_pct_roofline"] for r in mine], "--", color="gray", lw=1,
                  label="% roofline: upper bound (bytes only)")
        if any("estimate_pct_roofline" in r for r in mine):
            twin.plot(xs, [r.get("estimate_pct_roofline", float("nan")) for r in mine], "s-", color="tab:orange",
                      ms=3, label="% roofline: static estimate")
        if any("pct_roofline" in r for r in mine):
            twin.plot(xs, [r.get("pct_roofline", float("nan")) for r in mine], "o-", color="tab:red", ms=3,
                      label="% roofline: measured")
        twin.set_ylim(0, 105)
        twin.set_ylabel("% roofline")
        ax.legend(loc="upper left", fontsize=7)
        twin.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def targets_report(rows: list[dict], saved: list[dict], on_gpu: bool, multi: list[dict] = ()) -> list[dict]:
    """The performance targets (benchmarks/README.md) at their shapes: what this run measured
    (timings count only from a CUDA GPU) and what the static estimate says; a missed target
    says by how much."""
    def select(op, phase, cond):
        return [r for r in rows if r["op"] == op and r["phase"] == phase and cond(r)]

    def gemv_shape(r):  # the 4096 × 14336 decode GEMV when the run has it, else every M = 1 row
        return r["M"] == 1 and (r["K"], r["N"]) == (4096, 14336) if any(
            x["op"] == "nf4" and x["M"] == 1 and (x["K"], x["N"]) == (4096, 14336) for x in rows) else r["M"] == 1

    lora = select("lora", "fwd+bwd", lambda r: r["M"] == 8192)
    qlora = select("qlora", "fwd+bwd", lambda r: r["M"] == 8192)
    dora = select("dora", "fwd+bwd", lambda r: r["M"] == 8192)
    qdora = select("qdora", "fwd+bwd", lambda r: r["M"] == 8192)
    gemv = select("nf4", "forward", gemv_shape)
    bottleneck = select("bottleneck", "fwd+bwd", lambda r: r["M"] >= 4096)
    lora_saved = [r for r in saved if r["layer"] == "peft_ops LoraLinear"]
    dora_saved = [r for r in saved if r["layer"] == "peft_ops LoraLinear (DoRA)"]

    def values(selected, key_fn, needed):
        return [key_fn(r) for r in selected if all(k in r for k in needed)]

    measured = on_gpu
    specs = [
        ("LoRA fwd+bwd ÷ frozen base fwd+bwd at M = 8192", "≤", 1.05, lora, max,
         lambda r: r["ms_fused"] / r["ms_base"], ("ms_fused", "ms_base"),
         lambda r: r["estimate_vs_base"], ("estimate_vs_base",)),
        ("QLoRA fwd+bwd ÷ bf16 LoRA fwd+bwd at M = 8192", "≤", 1.08, qlora, max,
         lambda r: r["ms_fused"] / r["ms_lora (bf16 base)"], ("ms_fused", "ms_lora (bf16 base)"),
         lambda r: r["estimate_ms"] / r["estimate_lora_ms"], ("estimate_ms", "estimate_lora_ms")),
        ("DoRA fwd+bwd ÷ our LoRA fwd+bwd at M = 8192", "≤", 1.15, dora, max,
         lambda r: r["ms_fused"] / r["ms_lora"], ("ms_fused", "ms_lora"),
         lambda r: r["estimate_ms"] / r["estimate_lora_ms"], ("estimate_ms", "estimate_lora_ms")),
        ("DoRA fwd+bwd: speedup over PEFT's DoRA layer at M = 8192", "≥", 1.7, dora, min,
         lambda r: r["ms_peft"] / r["ms_fused"], ("ms_peft", "ms_fused"),
         lambda r: r["estimate_peft_ms"] / r["estimate_ms"], ("estimate_peft_ms", "estimate_ms")),
        ("QDoRA fwd+bwd ÷ our QLoRA fwd+bwd at M = 8192", "≤", 1.15, qdora, max,
         lambda r: r["ms_fused"] / r["ms_qlora"], ("ms_fused", "ms_qlora"),
         lambda r: r["estimate_ms"] / r["estimate_qlora_ms"], ("estimate_ms", "estimate_qlora_ms")),
        ("NF4 decode GEMV: % of HBM bandwidth", "≥", 85, gemv, min,
         lambda r: r["pct_bandwidth"], ("pct_bandwidth",), lambda r: r["estimate_pct_hbm"], ("estimate_pct_hbm",)),
        ("NF4 decode GEMV: speedup over the bf16 GEMV", "≥", 3, gemv, min,
         lambda r: r["ms_base"] / r["ms_fused"], ("ms_base", "ms_fused"),
         lambda r: r["estimate_base_ms"] / r["estimate_ms"], ("estimate_base_ms", "estimate_ms")),
        ("bottleneck adapter fwd+bwd at M ≥ 4096: % of HBM roofline", "≥", 80, bottleneck, min,
         lambda r: r["pct_roofline"], ("pct_roofline",), lambda r: r["estimate_pct_roofline"],
         ("estimate_pct_roofline",)),
    ]
    report = []
    for name, relation, goal, selected, worst, fn, needed, est_fn, est_needed in specs:
        got = values(selected, fn, needed) if measured else []
        est = values(selected, est_fn, est_needed) if est_fn is not None else []
        report.append(_target(name, relation, goal, worst(got) if got else None, worst(est) if est else None))
    for row in multi:  # the grouped op's rows (many adapters in one batch)
        report.append(_target(row["name"], row["relation"], row["goal"],
                              row.get("measured_ratio") if measured else None, row.get("estimate_ratio")))
    report.append(_target("activation bytes saved per LoRA layer ÷ (x + x·Aᵀ + mask bits)",
                          "=", 1, max([r["saved_per_x"] / r["budget_per_x"] for r in lora_saved], default=None), None,
                          measured_anywhere=True))
    report.append(_target("activation bytes saved per DoRA layer ÷ (x + x·Aᵀ + one [M, out] + mask bits)",
                          "=", 1, max([r["saved_per_x"] / r["budget_per_x"] for r in dora_saved], default=None), None,
                          measured_anywhere=True))
    return report


def _target(name: str, relation: str, goal: float, value: float | None, estimate: float | None,
            measured_anywhere: bool = False) -> dict:
    def verdict(v):
        ok = {"≤": v <= goal, "≥": v >= goal, "=": abs(v - goal) < 1e-9}[relation]
        return "met" if ok else f"missed by {abs(v - goal):.4g}"

    row = {"target": name, "goal": f"{relation} {goal:g}", "measured": None,
           "status": "not measured" if measured_anywhere else "not measured (needs a CUDA GPU)",
           "estimate": None if estimate is None else round(estimate, 4),
           "estimate_status": "" if estimate is None else "estimate: " + verdict(estimate)}
    if value is not None:
        row.update(measured=round(value, 4), status=verdict(value))
    return row


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="peft-ops bench", description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default=",".join(OPS),
                        help=f"comma-separated, from {','.join(OPS)} ('adapter' is kept as a name of 'bottleneck')")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="shapes: default (7-8B model: d=4096, MLP 11008/14336, r 8/16/64, "
                             "M 1…8192), quick, smoke (tiny), gpu-check (target rows first)")
    parser.add_argument("--quick", action="store_const", const="quick", dest="preset", help="= --preset quick")
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench-results"), help="output folder")
    parser.add_argument("--gpu", choices=sorted(roofline.GPUS), default=None,
                        help="the GPU of the roofline and the static estimate (default: the device here, else H200)")
    parser.add_argument("--peak-bandwidth", type=float, help="override: HBM GB/s")
    parser.add_argument("--peak-tflops", type=float, help="override: dense bf16 TFLOP/s")
    parser.add_argument("--no-estimate", "--no-compile", action="store_true", dest="no_estimate",
                        help="skip the static estimate (it builds the kernels it times ahead of time)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel aot builds")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: time no new shape after this (the ones left are listed as skipped)")
    parser.add_argument("--autotune-out", type=pathlib.Path, default=None,
                        help="write the autotuners' choices (JSON) here, after every timed shape")
    parser.add_argument("--tune", action="store_true",
                        help="on a CUDA GPU, first run `peft-ops tune --preset quick` (fused LoRA GEMMs against "
                             "cuBLAS, cached); the rows then show the tuned choice and the record its timings")
    parser.add_argument("--time-anyway", action="store_true", help=argparse.SUPPRESS)  # tests: time on a CPU
    args = parser.parse_args(argv)
    ops = [OP_ALIASES.get(op.strip(), op.strip()) for op in args.ops.split(",") if op.strip()]
    unknown = [op for op in ops if op not in OPS]
    if unknown or not ops:
        parser.error(f"--ops: unknown {unknown}; choose from {','.join(OPS)}")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype_named(args.dtype)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    gpu_name = args.gpu or (roofline.gpu_for_device_name(device_name) if device.type == "cuda" else None) or "H200"
    gpu = dict(roofline.GPUS[gpu_name])
    if args.peak_bandwidth:
        gpu["bandwidth_GBps"] = args.peak_bandwidth
    if args.peak_tflops:
        gpu["bf16_TFLOPs"] = args.peak_tflops
    timing = device.type == "cuda" or args.time_anyway

    def progress(message):
        print(message, flush=True)

    start = time.perf_counter()
    if device.type == "cuda":
        progress(f"peft-ops bench on {device_name}; roofline: {gpu_name} ({gpu['bandwidth_GBps']:g} GB/s, "
                 f"{gpu['bf16_TFLOPs']:g} TFLOP/s bf16)")
    else:
        progress("peft-ops bench: no CUDA GPU here, so no timings (they need one). Reporting what holds without "
                 f"one: the bytes-only roofline bounds and the static estimate on {gpu_name} "
                 f"({gpu['bandwidth_GBps']:g} GB/s, {gpu['bf16_TFLOPs']:g} TFLOP/s bf16), and saved activation bytes.")
    for package, what in (("peft", "PEFT's LoRA layer"), ("bitsandbytes", "bitsandbytes' 4-bit layers")):
        if importlib.util.find_spec(package) is None:
            progress(f"{package} is not installed: {what} are left out of the comparison")
    gemm_tuning = {}
    if args.tune:
        if device.type == "cuda":
            progress("tuning the LoRA GEMMs (fused against cuBLAS, the quick preset's shapes) …")
            gemm_tuning = tune.decide(tune.tune(PRESETS["quick"], dtype, progress=progress))
            gemm_choice.write(device_name, gemm_choice.versions(), gemm_tuning)
        else:
            progress("--tune: no CUDA GPU here, nothing tuned (the rows show the default rule's choice)")
    preset = PRESETS[args.preset]
    shapes = shapes_for(ops, preset)
    rows, skipped = [], []
    measure = timer(device) if timing else None
    for i, s in enumerate(shapes, 1):
        if timing and args.time_budget is not None and time.perf_counter() - start > args.time_budget:
            skipped = shapes[i - 1:]
            progress(f"time budget of {args.time_budget:g} s spent: {len(skipped)} shapes not timed")
            break
        phase_rows = model_row(s, gpu_name, gpu)
        if s.op == "lora":  # the implementation of its GEMMs here: tuned on this GPU, else the default rule
            for row in phase_rows:
                row["gemm"] = gemm_label(s, dtype, device if device.type == "cuda" else torch.device("meta"))
        if timing:
            result = timed_rows(s, dtype, device, measure, gpu)
            for row in phase_rows:
                ms = result["ms"][row["phase"]]
                for impl, value in ms.items():
                    row[f"ms_{impl}"] = value
                if "fused" in ms:
                    fused_s = ms["fused"] / 1e3
                    row["tflops"] = row["flops"] / fused_s / 1e12
                    row["GBps"] = row["min_bytes"] / fused_s / 1e9
                    row["pct_bandwidth"] = 100 * row["GBps"] / gpu["bandwidth_GBps"]
                    row["pct_roofline"] = 100 * roofline.roofline_seconds(row["flops"], row["min_bytes"], gpu) / fused_s
                    if "eager" in ms:
                        row["speedup_vs_eager"] = ms["eager"] / ms["fused"]
                    if "base" in ms:
                        row["fused_vs_base"] = ms["fused"] / ms["base"]
                for impl, value in result["peak_memory_bytes"].items():
                    row[f"peak_memory_{impl}"] = value
                for impl, value in result["saved_bytes"].items():
                    row[f"saved_bytes_{impl}"] = value
            if args.autotune_out:
                args.autotune_out.parent.mkdir(parents=True, exist_ok=True)
                args.autotune_out.write_text(json.dumps(kernel_modules().common.autotune_choices(), indent=1))
        rows += phase_rows
        if i % 10 == 0 or i == len(shapes) or timing:
            progress(f"  [{i}/{len(shapes)}] {s.op} {s.label()}")
    shapes = [s for s in shapes if s not in skipped]

    multi = []
    if "lora" in ops:
        progress("many adapters in one batch (multi_lora_linear) …")
        multi = multi_adapter_rows(dtype, device, measure if timing else None,
                                   None if args.no_estimate else gpu_name, args.jobs)
    progress("saved activation bytes (measured here) …")
    saved = saved_activation_rows(dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    origin = provenance("peft-ops bench " + " ".join(argv))

    def write(builds: list, calibration: list) -> str:
        targets = targets_report(rows, saved, device.type == "cuda", multi)
        record = {**origin, "dtype": args.dtype, "roofline_gpu": {"name": gpu_name, **gpu}, "timed": timing,
                  "gemm_tuning": gemm_tuning,
                  "rows": rows, "multi_adapter": multi,
                  "saved_activations": saved, "estimate_builds": builds, "estimate_calibration": calibration,
                  "targets": targets, "skipped_shapes": [f"{s.op} {s.label()}" for s in skipped]}
        write_json(args.out / "bench.json", record)
        provenance = {k: record[k] for k in ("device", "torch", "triton", "date", "command")}
        write_csv(args.out / "bench.csv", [{**row, **provenance} for row in rows])  # each row says where it came from
        plotted = write_plot(args.out / "bench.png", rows, timing)
        text = summary(rows, saved, builds, targets, timing, gpu_name, calibration, multi)
        (args.out / "bench.txt").write_text(text + "\n")
        return text + (f"\n\nwrote {args.out / 'bench.csv'}, {args.out / 'bench.json'}, {args.out / 'bench.txt'}"
                       + (f", {args.out / 'bench.png'}" if plotted else " (no plot: pip install matplotlib)"))

    builds, calibration = [], []
    if not args.no_estimate and shapes:
        if timing:  # the timings are on disk before the estimate compiles (a time box may end it)
            write([], [])
        builds = add_estimates(rows, shapes, gpu_name, gpu, dtype, args.jobs, progress)
        if builds:
            progress("the estimate's calibration anchors …")
            calibration = estimate.calibration(args.jobs)
    print(write(builds, calibration) + f" in {time.perf_counter() - start:.0f} s")
    return 0


def _ms(value) -> str:
    return "" if value is None else f"{value:.3f}"


def summary(rows, saved, builds, targets, timed, gpu_name="", calibration=(), multi=()) -> str:
    lines = []
    show = [r for r in rows if r["phase"] == "fwd+bwd"]
    estimated = any("estimate_ms" in r for r in show)
    header = ("op", "shape", "FLOP/B", "fused B ÷ min", "eager B ÷ fused", "bound: × eager", "bound: % roofline")
    body = [(r["op"], r["shape"], f"{r['flop_per_byte']:.0f}", f"{r['fused_bytes'] / r['min_bytes']:.2f}",
             f"{r['eager_bytes'] / r['fused_bytes']:.2f}", f"{r['bound_speedup_vs_eager']:.2f}",
             f"≤ {r['bound_pct_roofline']:.0f}") for r in show]
    if any("gemm" in r for r in show):
        header += ("GEMMs fwd/dX",)
        body = [b + (r.get("gemm", ""),) for b, r in zip(body, show)]
    if estimated:
        header += ("est. ms", "est. % roofline", "est. ÷ base", "launches")
        body = [b + (_ms(r.get("estimate_ms")), f"{r['estimate_pct_roofline']:.0f}" if "estimate_ms" in r else "",
                     f"{r['estimate_vs_base']:.2f}" if "estimate_vs_base" in r else "",
                     r.get("estimate_launches", "")) for b, r in zip(body, show)]
    if timed:
        header += ("fused ms", "× eager", "% roofline")
        body = [b + (f"{r.get('ms_fused', float('nan')):.3f}", f"{r.get('speedup_vs_eager', float('nan')):.2f}",
                     f"{r.get('pct_roofline', float('nan')):.0f}") for b, r in zip(body, show)]
    lines += ["\nfwd+bwd per op and shape. 'bound': the bytes-only model, an upper bound (no kernel reaches "
              "it)" + (f"; 'est.': the static estimate on {gpu_name} from the compiled kernels (an estimate, not a "
                       "measurement)" if estimated else "") + ("; measured timings last" if timed else ""),
              text_table(header, body)]
    adapters = [r for r in show if "estimate_cublas_gemms_ms" in r]
    if adapters:
        lines += [f"\nthe bottleneck adapter's fwd+bwd, static estimate on {gpu_name}: ours, eager PyTorch (every op "
                  "a launch), and its six matrix products alone by the cuBLAS model (nothing else: the floor of "
                  "any design built on cuBLAS's GEMMs)",
                  text_table(("shape", "ours ms", "ours % roofline", "eager ms", "eager launches", "6 GEMMs ms",
                              "6 GEMMs % roofline"),
                             [(r["shape"], _ms(r["estimate_ms"]), f"{r['estimate_pct_roofline']:.0f}",
                               _ms(r["estimate_eager_ms"]), r["estimate_eager_launches"],
                               _ms(r["estimate_cublas_gemms_ms"]), f"{r['estimate_cublas_gemms_pct_roofline']:.0f}")
                              for r in adapters])]
    if multi:
        estimated_multi = any("estimate_ratio" in m for m in multi)
        lines += ["\nmany adapters in one batch (multi_lora_linear, bf16, d = 4096, r = 16), fwd+bwd ms"
                  + (f"; 'est.': the static estimate on {gpu_name}" if estimated_multi else ""),
                  text_table(("scenario", "goal", "grouped", "one adapter", "sequential", "ratio", "est. grouped",
                              "est. one adapter", "est. sequential", "est. ratio", "est. launches"),
                             [(m["name"], f"{m['relation']} {m['goal']:g}", _ms(m.get("grouped_ms")),
                               _ms(m.get("one_adapter_ms")), _ms(m.get("sequential_ms")),
                               "" if "measured_ratio" not in m else f"{m['measured_ratio']:.3f}",
                               _ms(m.get("estimate_grouped_ms")), _ms(m.get("estimate_one_adapter_ms")),
                               _ms(m.get("estimate_sequential_ms")),
                               "" if "estimate_ratio" not in m else f"{m['estimate_ratio']:.3f}",
                               "" if "estimate_launches" not in m else
                               f"{m['estimate_launches']} (sequential {m['estimate_sequential_launches']})")
                              for m in multi])]
    lines += ["\nactivation bytes saved for backward (measured here), in units of x",
              text_table(("layer", "shape", "dropout", "saved ÷ x", "x + x·Aᵀ (+ mask bits) ÷ x"),
                         [(r["layer"], r["shape"], r["dropout"], f"{r['saved_per_x']:.3f}",
                           "" if r["budget_per_x"] is None else f"{r['budget_per_x']:.3f}") for r in saved])]
    if builds:
        found = [f"{b['kernel']} {b['target']} {b['config']}: {'; '.join(problems(b))}" for b in builds if problems(b)]
        lines += [f"\nthe builds the estimate chose ({len(builds)}; per main-loop iteration and thread)",
                  format_table(builds),
                  "problems (peft-ops aot's rules: spills, shared memory, tensor cores, promised vector loads): "
                  + ("none" if not found else f"{len(found)}\n  " + "\n  ".join(found))]
    if calibration:
        lines += ["\nthe static estimate against its calibration anchors",
                  text_table(("anchor", "reference", "model", "within"),
                             [(c["anchor"], "–".join(f"{v:g}" for v in c["reference"]) if isinstance(
                                 c["reference"], (list, tuple)) else f"{c['reference']:g}", f"{c['model']:.3g}",
                               "yes" if c["within"] else "NO") for c in calibration])]
    lines += ["\ntargets", text_table(("target", "goal", "measured", "status", "static estimate", ""),
                                      [(t["target"], t["goal"], "" if t["measured"] is None else t["measured"],
                                        t["status"], "" if t["estimate"] is None else t["estimate"],
                                        t["estimate_status"]) for t in targets])]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
