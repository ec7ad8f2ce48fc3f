"""The PTX reader and the occupancy rule against hand-written PTX and hand-computed limits."""

import pytest

from peft_ops.tools import kernel_facts

# A loop over K that loads a 128-bit x tile, a byte, gathers a 4-byte table entry at an address
# made from that byte (cp.async), runs two wgmma and stores 64 bits; then a rank loop.
SOURCE = """def kernel():
    for k0 in range(0, K, BLOCK_K):
        pass
    for r0 in range(0, R, BLOCK_R):
        pass
"""

PTX = """
.visible .entry kern(
	.param .u64 kern_param_0
)
{
	.reg .b32 	%r<40>;
	.reg .b64 	%rd<40>;
	.reg .pred 	%p<9>;
	ld.param.u64 	%rd1, [kern_param_0];
$L__BB0_2:                              // =>This Inner Loop Header: Depth=1
	.loc	1 2 5
	@%p1 ld.global.v4.b32 	{ %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
	ld.global.b8 	%r5, [ %rd2 + 0 ];
	shr.u32 	%r6, %r5, 4;
	mul.wide.u32 	%rd3, %r6, 4;
	add.s64 	%rd4, %rd1, %rd3;
	cp.async.ca.shared.global [ %r7 + 0 ], [ %rd4 + 0 ], 0x4, %r8;
	cp.async.cg.shared.global [ %r9 + 0 ], [ %rd1 + 0 ], 0x10, %r8;
	cp.async.commit_group;
	wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%r10,%r11}, %rd5, %rd6, %p2, 1, 1, 0, 0;
	wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%r10,%r11}, {%r12,%r13}, %rd6, %p2, 1, 1, 0, 0;
	st.global.v2.b32 	[ %rd7 + 0 ], { %r1, %r2 };
	add.s64 	%rd1, %rd1, 128;
	setp.lt.s32 	%p3, %r20, %r21;
	.loc	1 2 9
	@%p3 bra 	$L__BB0_2;
$L__BB0_4:
	.loc	1 4 5
	mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%r30,%r31,%r32,%r33}, {%r1,%r2,%r3,%r4}, {%r5,%r6}, {%r30,%r31,%r32,%r33};
	ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r1, %r2, %r3, %r4}, [%r9];
	@%p4 bra 	$L__BB0_4;
	ret;
}
	.file	1 "{source}"
"""


@pytest.fixture
def facts(tmp_path):
    source = tmp_path / "kern.py"
    source.write_text(SOURCE)
    return kernel_facts.ptx_facts(PTX.replace("{source}", str(source)), num_warps=8)


def test_loops_are_found_and_named_by_their_for(facts):
    main, rank = facts["loops"]
    assert main["source"] == "kern.py:2" and main["for"] == "for k0 in range(0, K, BLOCK_K):"
    assert not main["rank_loop"] and rank["rank_loop"]
    assert facts["main_loops"] == [0]


def test_per_iteration_counts_by_hand(facts):
    loop = facts["loops"][0]
    threads = 8 * 32
    assert loop["tensor_core_instructions"] == {"wgmma.m64n128k16.half": 2}
    assert loop["tensor_core_flops"] == {"half": 2 * 2 * (2 * 64 * 128 * 16)}  # 2 instructions × 2 warpgroups
    assert loop["ld_global_by_bits"] == {8: 1, 128: 1}
    assert loop["st_global_by_bits"] == {64: 1}
    assert loop["cp_async_by_bytes"] == {4: 1, 16: 1}
    assert loop["global_load_bytes"] == (16 + 1) * threads
    assert loop["async_load_bytes"] == (4 + 16) * threads
    assert loop["global_store_bytes"] == 8 * threads
    # the 4-byte copy's address comes from the loaded byte: a gather; the 16-byte one is not
    assert loop["gathers"] == 1 and loop["gather_bytes"] == 4 * threads and loop["sync_load_gathers"] == 0
    # shared memory: both copies' writes, and the wgmma operands: B (128×16) twice, A (64×16)
    # from shared memory once (the second takes A from registers), per warpgroup, 2 bytes each
    assert loop["shared_bytes"] == 20 * threads + 2 * 2 * 16 * (128 + 64 + 128)


def test_mma_sync_and_ldmatrix_count_per_warp(facts):
    rank = facts["loops"][1]
    assert rank["tensor_core_flops"] == {"half": 8 * 2 * 16 * 8 * 16}
    assert rank["shared_bytes"] == 8 * 4 * 128  # ldmatrix .x4: four 8×8 16-bit matrices per warp
    summary = kernel_facts.main_loop_summary(facts)
    assert summary["gathers"] == 1 and "mma.sync.m16n8k16.half" not in summary["tensor_core_instructions"]


def test_a_load_through_a_loaded_value_is_a_gather_only_then():
    fn = kernel_facts.parse("ld.global.b32 %r1, [%rd1];\nadd.s64 %rd2, %rd3, 4;\nld.global.b32 %r2, [%rd2];\n"
                            "cvt.u64.u32 %rd4, %r1;\nld.global.b32 %r3, [%rd4];\n")
    tainted = kernel_facts.loaded_registers(fn)
    assert "%rd4" in tainted and "%rd2" not in tainted


@pytest.mark.parametrize("target, registers, warps, shared, expected", [
    # 154 regs → 20 blocks of 256 per warp: 3 warps per partition, 12 per SM → one 8-warp CTA
    ("sm90", 154, 8, 131072, (1, "registers")),
    # 96 regs → 12 blocks: 5 warps per partition, 20 per SM → five 4-warp CTAs; shared: 233472 // 47104 = 4
    ("sm90", 96, 4, 46080, (4, "shared memory")),
    # 24 regs → 3 blocks: 21 warps per partition would fit, but an SM holds 64 warps → 16 CTAs
    ("sm80", 24, 4, 0, (16, "warps")),
    ("sm80", 40, 1, 0, (32, "CTA slots")),
])
def test_occupancy_by_hand(target, registers, warps, shared, expected):
    got = kernel_facts.occupancy(target, registers, warps, shared)
    assert (got["ctas_per_sm"], got["limited_by"]) == expected
