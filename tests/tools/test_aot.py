"""Every kernel in every variant compiles on this CPU-only machine — for sm_90a at the two ends
of its autotune family, the first config (what a launch takes untuned) and the largest tile
(the likeliest to spill); for sm_80 at the first — without register spills and with
tensor-core instructions in the PTX; the static facts the estimate reads come from these
builds. CI's second leg builds the same sm_90a set with the GPU image's triton 3.6
(`.ci/triton-3.6`); `peft-ops compile` builds every config of every family for both targets
(run it when a tile table changes).

Runs `peft-ops compile` in a subprocess: the compile needs the real JIT functions, which the
Triton interpreter (set for the other tests) replaces.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from peft_ops.tools.aot import SHARED_LIMIT_BYTES, format_table, problems

pytestmark = pytest.mark.aot


@pytest.fixture(scope="module")
def compile_record():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "peft_ops.tools.aot", "--json", "--first-only", "sm80", "--ends-only",
                          "sm90"], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.stdout.strip(), out.stderr[-3000:]
    return json.loads(out.stdout[out.stdout.index("{"):])


@pytest.fixture(scope="module")
def compile_rows(compile_record):
    return compile_record["builds"]


def test_compile_report(compile_rows, capsys):
    with capsys.disabled():  # the registers / shared-memory table, in the test output
        print("\n" + format_table(compile_rows))
    builds = {r["kernel"] for r in compile_rows}  # "lora_forward [bf16]", …
    for kernel in ("lora_shrink", "lora_shrink_split", "lora_forward", "lora_backward_g", "lora_backward_rank",
                   "lora_backward_dx", "lora_forward_tma", "lora_backward_dx_tma"):
        for variant in ("bf16", "bf16+fp32 A,B", "fp32"):
            assert f"{kernel} [{variant}]" in builds
    def kernel_and_variant(name):  # without the dX kernel's launch role, which differs by target
        return re.sub(r"(, (dX\+dW|dX, dW|no dropout))+\]$", "]", name)

    tma_only = {b for b in builds if "_tma [" in b}  # TMA: sm_90a only
    assert {kernel_and_variant(r["kernel"]) for r in compile_rows if r["target"] == "sm90"} == \
        {kernel_and_variant(b) for b in builds}
    assert {kernel_and_variant(r["kernel"]) for r in compile_rows if r["target"] == "sm80"} == \
        {kernel_and_variant(b) for b in builds - tma_only}


def test_no_spills(compile_rows):
    spilling = [(r["kernel"], r["target"], r["config"], r["spill_bytes"]) for r in compile_rows if r["spill_bytes"]]
    assert not spilling


def test_builds_that_promise_vector_loads_keep_it(compile_rows):
    """The LoRA, NF4 and grouped multi-LoRA kernels promise no narrow synchronous load in their
    main loops (under Triton 3.6 a dropped alignment hint once made the multi-LoRA factors' loads
    2 bytes each; at r = 8 the g kernel's B loads were): `peft-ops aot` reports a broken promise
    as a problem, which fails CI's 3.6 leg too."""
    promised = [r for r in compile_rows if r.get("vector_loads")]
    assert {r["kernel"].split(" [")[0] for r in promised} >= {
        "multi_lora_shrink", "multi_lora_backward_g", "multi_lora_backward_rank", "lora_backward_g", "lora_shrink",
        "lora_forward_tma", "lora_backward_dx_tma", "nf4_matmul", "nf4_decode_gemv", "nf4_backward_dx"}
    assert [(r["kernel"], r["target"], problems(r)) for r in promised if problems(r)] == []


def test_a_narrow_synchronous_load_is_a_problem_only_where_vectors_were_promised():
    row = {"spill_bytes": 0, "shared_bytes": 0, "target": "sm90", "needs_tensor_cores": False, "wgmma": 0,
           "mma_sync": 0, "main_loop": {"ld_global_by_bits": {"16": 64, "128": 2}}, "vector_loads": True}
    assert problems(row) == ["synchronous 64× 16-bit global loads per main-loop iteration"]
    assert problems({**row, "vector_loads": False}) == []
    assert problems({**row, "main_loop": {"ld_global_by_bits": {"32": 2}}}) == []


def test_tensor_cores_used(compile_rows):
    for r in compile_rows:
        if r["needs_tensor_cores"]:
            assert r["wgmma"] or r["mma_sync"], (r["kernel"], r["target"], r["config"])
    # on sm_90 the large GEMM tiles use warpgroup MMA
    assert all(r["wgmma"] for r in compile_rows if r["target"] == "sm90" and r["kernel"].startswith("lora_forward"))
    # the NF4 training GEMM decodes W in registers and still feeds wgmma on sm_90a
    assert all(r["wgmma"] for r in compile_rows if r["target"] == "sm90" and r["kernel"].startswith("nf4_matmul"))


def test_nf4_kernels_are_covered(compile_rows):
    builds = {r["kernel"] for r in compile_rows}
    for kernel in ("nf4_matmul", "nf4_gemv", "nf4_backward_dx"):
        for variant in ("bf16", "bf16+fp32 A,B", "fp32"):
            for fmt in ("aligned", "odd K"):
                assert f"{kernel} [{variant}, {fmt}]" in builds
    assert {"nf4_dequantize [bf16]", "nf4_dequantize [fp32]", "nf4_decode_gemv [bf16]",
            "nf4_decode_gemv [bf16+fp32 A,B]", "nf4_decode_gemv [bf16, M ≤ 8, no LoRA or bias]"} <= builds


def test_a_configs_register_cap_reaches_the_build(compile_rows):
    """The sm_90a decode GEMV's 8-row configs carry maxnreg = 128 (uncapped, ptxas spilled the
    build without LoRA or a bias at 80 registers); the builds honour it, the 16-row ones have none."""
    small = [r for r in compile_rows if r["target"] == "sm90" and r["kernel"].startswith("nf4_decode_gemv [")
             and "M ≤ 8" in r["kernel"]]
    wide = [r for r in compile_rows if r["target"] == "sm90" and r["kernel"].startswith("nf4_decode_gemv [")
            and "M ≤ 8" not in r["kernel"]]
    assert len(small) >= 5 and len(wide) >= 5
    assert all(r["registers"] <= 128 and not r["spill_bytes"] for r in small)
    assert max(r["registers"] for r in wide) > 128  # (what the cap would have cut: those spilled at 128)


def test_the_decode_gemv_holds_the_ctas_per_sm_its_split_rule_counts_on(compile_rows):
    """`split_k_for` splits a wide layer's K only while all the programs fit on the SMs at once,
    counting DECODE_GEMV_RESIDENT CTAs per SM for each x tile: every build of that tile, in
    every variant, holds at least that many (else the split would leave a second wave)."""
    from peft_ops.kernels.nf4 import DECODE_GEMV_RESIDENT, DECODE_GEMV_SMALL_M, GEMV_BLOCK_M

    rows = [r for r in compile_rows if r["kernel"].startswith("nf4_decode_gemv [")]
    assert {r["target"] for r in rows} == {"sm80", "sm90"}
    for r in rows:
        block_m = DECODE_GEMV_SMALL_M if "M ≤ 8" in r["kernel"] else GEMV_BLOCK_M
        assert r["ctas_per_sm"] >= DECODE_GEMV_RESIDENT[r["target"]][block_m], (r["kernel"], r["target"])


def test_shared_memory_fits(compile_rows):
    for r in compile_rows:
        assert r["shared_bytes"] <= SHARED_LIMIT_BYTES[r["target"]], r


def test_adapter_kernels_are_covered(compile_rows):
    builds = {r["kernel"] for r in compile_rows}
    for variant in ("bf16, m≤64", "bf16, m≤128", "bf16, m≤256", "fp32, m≤64", "fp32, m≤128"):
        assert any(b.startswith(f"bottleneck_backward_dx [{variant}, ") for b in builds), variant
    for variant in ("bf16, m≤64", "bf16, m≤128", "fp32, m≤64"):  # the one-kernel forward's families
        assert f"bottleneck_forward [{variant}]" in builds
    for variant in ("bf16, m≤128", "bf16, m≤256", "fp32, m≤128"):  # the two-pass forward's second pass
        assert f"bottleneck_up [{variant}]" in builds and f"bottleneck_up [{variant}, no bias or dropout]" in builds
    for dt in ("bf16", "fp32"):  # the dh and down kernels: 64 bottleneck columns per program, any m
        assert f"bottleneck_backward_dh [{dt}, 64 bottleneck columns per program]" in builds
        assert f"bottleneck_down [{dt}, 64 bottleneck columns per program]" in builds
    # the dX kernel's roles built into one kernel (programs of any role) where the tables split
    # them: sm_80 bf16 at every m, sm_90 m ≤ 128 and m ≤ 256
    for target, variants in (("sm80", ("m≤64", "m≤128", "m≤256")), ("sm90", ("m≤128", "m≤256"))):
        on_target = {r["kernel"] for r in compile_rows if r["target"] == target}
        for variant in variants:
            assert f"bottleneck_backward_dx [bf16, {variant}, dX, dW]" in on_target
    # the 64-row tiles on sm_90 reach warpgroup MMA: the forward, both passes of the two-pass
    # forward, the dh kernel, and the dX role of the split dX kernel at 64×128 (N = 128)
    sm90 = [r for r in compile_rows if r["target"] == "sm90"]
    for kernel in ("bottleneck_forward", "bottleneck_down", "bottleneck_up", "bottleneck_backward_dh"):
        assert any(r["wgmma"] for r in sm90 if r["kernel"].startswith(kernel + " [bf16")), kernel
    split = [r for r in sm90 if r["kernel"].startswith("bottleneck_backward_dx [bf16, m≤256, dX, dW")]
    assert split and all("wgmma.m64n128k16.half" in r["facts"]["tensor_core_instructions"] for r in split)


def _rows(aot_rows, kernel, target=None, variant=None):
    return [r for r in aot_rows if r["kernel"].startswith(kernel + " [") and (target is None or r["target"] == target)
            and (variant is None or f"[{variant}" in r["kernel"])]


def test_every_loop_is_found_and_named(compile_rows):
    """Each build's loops are read from its PTX and tied to the `for` they come from; every
    kernel but the loopless ones has a main loop; every build fits at least one CTA per SM."""
    for r in compile_rows:
        facts = r["facts"]
        for loop in facts["loops"]:
            assert loop["for"].startswith("for ") and " in " in loop["for"] or loop["for"].startswith("while "), \
                (r["kernel"], loop["source"])
        # one tile per program, only the loop over rank chunks: the cuBLAS path's LoRA pieces
        loopless = r["kernel"].startswith(("nf4_dequantize", "dropout_mask", "lora_expand", "lora_dx_term",
                                            "multi_lora_expand", "multi_lora_dx_term",
                                            "dora_scale", "dora_dropout_split", "dora_dropout_dx",
                                            "lora_embedding_gather", "lora_embedding_forward"))
        assert bool(facts["main_loops"]) != loopless, r["kernel"]
        assert r["ctas_per_sm"] >= 1 and r["limited_by"]
    # the adapter forward streams the row twice: two main loops
    assert all(len(r["facts"]["main_loops"]) == 2 for r in _rows(compile_rows, "bottleneck_forward"))


def test_static_facts_today(compile_rows):
    """What the compiler built, per main-loop iteration: the facts the kernel rebuilds change
    (each a one-line edit when they do)."""
    dense = [r for k in ("lora_shrink", "lora_forward", "lora_backward_g", "lora_backward_rank", "lora_backward_dx",
                         "bottleneck_forward", "bottleneck_backward_dh",
                         "bottleneck_backward_dx") for r in _rows(compile_rows, k)]
    for r in dense:  # no byte loads, no gathers: whole-vector loads and 16-byte (or 8/4-byte edge) copies
        loop = r["main_loop"]
        assert loop["gathers"] == 0 and "8" not in loop["ld_global_by_bits"], r["kernel"]
    # the grouped multi-LoRA kernels (ALIGNED: ranks and features multiples of 8): rows gathered
    # through the order, yet x, dY and the factors stream as 16-byte cp.async, no synchronous loads
    for k in ("multi_lora_shrink", "multi_lora_backward_g"):
        assert all(set(r["main_loop"]["cp_async_by_bytes"]) == {"16"} and not r["main_loop"]["ld_global_by_bits"]
                   for r in _rows(compile_rows, k, variant="bf16]")), k
    for k in ("lora_shrink", "lora_forward", "lora_backward_dx"):  # the GEMM operands: 16-byte cp.async only
        assert all(set(r["main_loop"]["cp_async_by_bytes"]) == {"16"} and not r["main_loop"]["ld_global_by_bits"]
                   for r in _rows(compile_rows, k)), k
    # NF4's word decoders: packed weights in 16-byte cp.async (the GEMV) or 32-bit+ loads (the
    # dequantize kernel), codes decoded in registers (prmt): no byte loads; the only dependent
    # loads are the nested absmax map's, one per row a lane holds (its block of 64 weights)
    for r in _rows(compile_rows, "nf4_decode_gemv"):
        loop = r["main_loop"]
        assert not loop["ld_global_by_bits"] and "16" in loop["cp_async_by_bytes"], r["kernel"]
        assert loop["gathers"] == 2 and loop["instructions"] > 0, (r["kernel"], r["config"])
        # W reaches the tensor cores from registers: of the loop's shared-memory traffic, beyond
        # x's tile (written once, read by each warp), ≤ 1.5 bytes per weight — the packed words
        # and absmax codes in and out of the pipeline's buffers; never the 16-bit values (≥ 4)
        config = dict(kv.split("=") for kv in r["config"].split()[0].split(","))
        block_n, block_k = int(config["BLOCK_N"]), int(config["BLOCK_K"])
        warps = int(r["config"].split()[1][1:])
        x_rows = 8 if "M ≤ 8" in r["kernel"] else 16  # the x tile's rows (the launcher's BLOCK_M)
        x_bytes = block_k * x_rows * 2 * (1 + warps)
        assert loop["shared_bytes"] - x_bytes <= 1.5 * block_n * block_k, (r["kernel"], r["config"])
        # the decode GEMV's evidence: ≥ 2 CTAs per SM, ≤ 64 KB of shared memory
        assert r["ctas_per_sm"] >= 2 and r["shared_bytes"] <= 64 * 1024, (r["kernel"], r["config"])
    for r in _rows(compile_rows, "nf4_dequantize"):
        whole = r["facts"]["whole_kernel"]
        assert "8" not in whole["ld_global_by_bits"] and whole["gathers"] <= 1, r["kernel"]  # 1: the absmax map
    # The fused dequant-GEMMs and the split-K GEMV (fp32 x, K not a multiple of 256) decode W from
    # 32-bit words too (`nf4_word_tile`): no byte loads; on aligned rows every load is pipelined
    # (cp.async), on unaligned ones (K odd) two 32-bit words per 8 weights are funnel-shifted.
    # The only dependent loads are the nested absmax map's (one per row-tile, two where a row
    # segment can touch two blocks), and the 4-byte copies are the per-row scales — a handful
    # per iteration, not one per weight (the code-value gathers made 24-66 of each before).
    for k in ("nf4_matmul", "nf4_gemv", "nf4_backward_dx"):
        for r in _rows(compile_rows, k):
            loop = r["main_loop"]
            aligned = "aligned]" in r["kernel"]
            assert set(loop["ld_global_by_bits"]) <= ({"32"} if not aligned else set()), (r["kernel"], loop)
            assert loop["gathers"] == (1 if aligned else 2), (r["kernel"], r["config"], loop["gathers"])
            assert loop["cp_async_by_bytes"].get("4", 0) <= 8, (r["kernel"], r["config"], loop["cp_async_by_bytes"])
    # DoRA: the norm's pass over W streams A and W in 16-byte cp.async (no loads, no gathers in
    # its main loop); the dY pass reads dY and pre as 128-bit vectors; the elementwise pieces
    # (the cuBLAS path's scale, the dropout glue) load and store 128-bit vectors, mask words 32-bit
    # (r = 256, past the one-dot quadratic term's R_PAD ≤ 64: the per-row loop over B's rows is
    # the heaviest loop there, with narrower loads of B — no gathers either)
    for r in _rows(compile_rows, "dora_norm"):
        loop = r["main_loop"]
        assert loop["gathers"] == 0, r["kernel"]
        if "r 256]" not in r["kernel"]:
            assert set(loop["cp_async_by_bytes"]) == {"16"} and not loop["ld_global_by_bits"], (r["kernel"], loop)
    for r in _rows(compile_rows, "dora_backward_dy"):
        loop = r["main_loop"]
        assert set(loop["ld_global_by_bits"]) == {"128"} and loop["gathers"] == 0, (r["kernel"], loop)
    for k in ("dora_scale", "dora_dropout_split", "dora_dropout_dx"):
        rows = _rows(compile_rows, k)
        assert rows, k
        for r in rows:
            whole = r["facts"]["whole_kernel"]
            assert "128" in whole["ld_global_by_bits"] and whole["gathers"] == 0, (r["kernel"], whole)
            assert set(whole["ld_global_by_bits"]) <= {"128", "32", "16"}, (r["kernel"], whole)
            assert set(whole["st_global_by_bits"]) == {"128"}, (r["kernel"], whole)
    # sm_90a: every half-precision forward GEMM tile runs wgmma with N ≥ 128 …
    for r in _rows(compile_rows, "lora_forward", "sm90", "bf16]"):
        assert all(int(name.split("n")[1].split("k")[0]) >= 128 for name in r["main_loop"]["tensor_core_instructions"]
                   if name.startswith("wgmma")), r["config"]
    # … and the persistent TMA GEMMs (forward and dX) of the half-precision families run 128-row
    # tiles (two 64-row warpgroups at 8 warps) with wgmma N ≥ 128, operands by TMA, 1 CTA per SM
    # (the GEMM loop of each; the dX launch's rank items have a loop of their own, over M)
    gemm_loops = {"lora_forward_tma": "for k in range(0, k_steps):",
                  "lora_backward_dx_tma": "for n in range(0, n_steps):"}
    for k, gemm_loop in gemm_loops.items():
        for variant in ("bf16]", "bf16+fp32 A,B]", "bf16, no dropout]", "bf16+fp32 A,B, no dropout]"):
            rows = _rows(compile_rows, k, "sm90", variant)
            assert rows or "no dropout" in variant, (k, variant)
            for r in rows:
                loops = [loop for loop in r["facts"]["loops"] if loop["for"] == gemm_loop]
                assert len(loops) == 1, (r["kernel"], r["config"])
                main = loops[0]["tensor_core_instructions"]
                assert main and all(name.startswith("wgmma.m64n") and int(name.split("n")[1].split("k")[0]) >= 128
                                    for name in main), (r["kernel"], r["config"], main)
                assert "BLOCK_M=128" in r["config"] and "w8" in r["config"] and r["ctas_per_sm"] >= 1
                assert loops[0]["tma_copies"] == 2 and not loops[0]["cp_async_by_bytes"], r["config"]
    # the dX launch's rank items stream x and dY through cp.async (16-byte copies) on tensor cores
    for r in _rows(compile_rows, "lora_backward_dx_tma", "sm90", "bf16]"):
        items = [loop for loop in r["facts"]["loops"] if loop["for"] == "for m0 in range(0, M, RANK_BLOCK_M):"]
        assert len(items) == 1 and "16" in items[0]["cp_async_by_bytes"], r["config"]
        assert any(name.startswith("wgmma") for name in items[0]["tensor_core_instructions"]), r["config"]
    # the decode GEMV: 16-row mma.sync tiles (no wgmma), 3+ CTAs per SM on sm_90
    for r in _rows(compile_rows, "nf4_gemv", "sm90", "bf16, aligned"):
        assert not r["wgmma"] and r["ctas_per_sm"] >= 3, r["config"]
    # TMA only in the persistent GEMMs
    assert all(r["facts"]["tma_copies"] == 0 for r in compile_rows if "_tma [" not in r["kernel"])


def test_launches_per_call_are_recorded(compile_record):
    planned = {(p["op"], p["shape"], p["options"], p["phase"]): p for p in compile_record["launches_per_call"]}
    lora = planned[("lora", "M=8192 4096→4096 r=16", "-", "backward")]  # the rank pass rides in the dX launch
    assert lora["launches"] == 2 and lora["triton"] == 2 and not lora["torch_ops"]
    assert planned[("lora", "M=8192 4096→4096 r=16", "-", "forward")]["sequence"] == ["_lora_shrink_kernel",
                                                                                      "_lora_forward_tma_kernel"]
    assert planned[("nf4", "M=1 4096→14336", "-", "forward")]["launches"] == 1  # the word GEMV, no tail
