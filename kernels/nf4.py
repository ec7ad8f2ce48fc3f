"""NF4 kernels: dequantize, and x·dequant(W)ᵀ with the LoRA term fused (QLoRA), forward and dX.

    y = x·dequant(W)ᵀ [+ s·xa·Bᵀ] + b        x [M, K], W [N, K] in NF4 (peft_ops.nf4), xa [M, r], B [N, r]

The format is bitsandbytes' (see ``peft_ops.nf4``, which owns it and hands its two code tables
to every launcher here as ``tables``): element f = n·K + k of the flattened W is
nibble (f odd: low, even: high) of byte f // 2, scaled by the fp32 absmax of block
f // blocksize, which is itself ``map[code8]·scale[block // 256] + offset`` with double
quantization. Every kernel reads those bytes as 32-bit words: `nf4_word_tile` decodes any
[rows × BLOCK_K] tile of W (the fused GEMMs), `nf4_fragment_tile` the decode GEMV's operand, and
the dequantize kernel whole words.

Design, from a cost model (bf16, d = 4096, MLP 14336, H200: 4.8 TB/s, 989 TFLOP/s; every
figure below is the static estimate of ``peft_ops.tools.estimate``, not a measurement):

- Decoding without lookups in memory. A table lookup per weight (`tl.load(NF4 + nibble)`) is a
  load whose address depends on the loaded byte: a gather, 4-byte `cp.async` into shared
  memory, a full memory latency per iteration. The word decoders instead load the packed
  bytes as 32-bit words (16-byte vectors) and, per NF4 block, build the block's 16 dequantized
  values P[v] = dtype(NF4[v]·absmax) in registers — bitsandbytes' exact rounding, computed
  once per block instead of once per weight — as byte planes; `prmt` (PTX byte permute, via
  inline assembly; emulated in integer ops under the interpreter) then picks each code's two
  bytes: 16 `prmt` and 5 selector ops per word of 8 codes (≈ 2.6 instructions per weight) plus
  ≈ 45 per block table. The 8-bit absmax codes (double quantization) are read as words too:
  1-byte loads are never pipelined.
- Training sizes (M ≥ 512, the default rule of ``peft_ops.ops.gemm_choice``): W is decoded
  once per call into a reusable buffer (`dequantize`, 0.5 B read + 2 B written per weight:
  12.3 µs for 4096 × 4096, at HBM speed) and the dense LoRA kernels run on it — the forward,
  and again in the backward (the decoded W is never saved). QLoRA fwd+bwd at M = 8192,
  4096→4096, r = 16: 788 µs against 763 µs for bf16 LoRA (1.03×; 1.028–1.032 over the
  default layers). The fused dequant-GEMMs below (`_nf4_matmul_kernel`,
  `_nf4_backward_dx_kernel`) decode each W tile in registers once per 64–128 rows
  (`nf4_word_tile`): 1,296 µs at that shape (1.70× LoRA; 2,409 µs when they loaded bytes
  and gathered code values), but faster than decode + dense from 17 to 256 rows on every
  default layer (M = 128, 4096→4096: 84 against 89 µs; 14336→4096: 177 against 229 µs),
  where they run by default.
- The fused GEMMs' tiles (`nf4_word_tile`): with K % blocksize == 0 (real models) each row
  starts on a word, its words load as vectors (pipelined `cp.async`), the block table is built
  once per row and tile and the codes pick 16-bit values by `prmt` as above; fp32 x takes a
  select tree per code (15 selects) and a multiply. K odd or rows that start inside a block: a
  row starts at any nibble, so each 8 weights come from two 32-bit words funnel-shifted into
  place (nibble-swapped, 64-bit shift), and each weight takes one of the two block scales its
  row segment can touch. No byte loads, no per-weight gathers in any of them (the nested
  absmax map is one lookup per row and tile, two on unaligned rows).
- Decode sizes (M ≤ DECODE_MAX_M): `_nf4_decode_gemv_kernel`, one launch: each program owns
  BLOCK_N rows of W over a slice of K (W read once for all M ≤ 16 rows of x, which stays in
  L1/L2). W goes from registers straight into the tensor cores: the dot is the same for any
  order of k and of W's rows, so `nf4_fragment_tile` decodes W in the order of the `mma`
  operand's registers: a lane loads 64 consecutive weights of each of its two rows as 16-byte
  vectors, builds one block table per row (`cvt.rn.bf16x2.f32`: 24 instructions), and its prmt
  lookups (with their 5 selector instructions per word) leave the 16-bit values packed two per
  register, as the tensor cores take them. x is loaded in k order ([BLOCK_M, 256]: 16-byte
  `cp.async` on Triton 3.6 and 3.9 alike) and put in the tile's k order by a bit permutation of
  the register tile (`nf4_fragment_x`); loaded in that order directly, its 4–8-byte runs were
  2-byte synchronous `ld.global` under Triton 3.6 (64 per iteration, a memory latency each).
  x rows past M are masked, not repeated: zero-filled copies move no bytes, so M = 1 reads x
  once per program, not BLOCK_M times. BLOCK_M is 8 up to M = 8 (one n8 tensor-core tile:
  half the `mma` and x loads) and 16 above. Per weight (PTX, sm_90a, `mma.sync`, 2 warps):
  4.13 instructions at M ≤ 8, 4.44 at M ≤ 16 (sm_80 4.05 / 4.31): prmt 2.1, selectors 0.6,
  tables 0.5, the rest the tensor cores, loads and address arithmetic. The block and word
  indices are divided as unsigned (`index_div`): a signed // by a power of two rounds toward
  zero, four 64-bit instructions where one shift does (4.30 / 4.62 before; 3–16 % fewer loop
  instructions in every NF4 kernel).
  Narrow layers split K (`split_k_for`: the fewest power-of-two slices that give 2 programs
  per SM, slices of whole 256-column tiles; 1, 4 and 8 per SM were worse in the estimate),
  and wide ones too where the column tiles fall unevenly on the SMs and twice the programs
  still fit on them at once (DECODE_GEMV_RESIDENT):
  each program stores its fp32 partial ([BLOCK_M × BLOCK_N], in a scratch reused across calls)
  and the tile's last program — found by an atomic counter, release/acquire — sums the
  partials in slice order (deterministic) and runs the epilogue; no PyTorch tail, no memset
  (the counters are zeroed once, and each launch leaves them zero). Static estimate, H200,
  M = 1: 4096 × 14336 12.4 µs = 51 % of HBM, bound by instruction issue (split 2: 448 column
  tiles put 4 programs on some SMs and 3 on others, 896 put 7 or 6; unsplit 13.5 µs, 13.9
  with signed indices, 15.1 before the x tile changes; Triton 3.6, the GPU image's, the same);
  4096 → 4096 6.7 µs (split 4); 4096 → 11008 11.3 µs (unsplit: 688 programs, 6 or 5 per SM, even nothing).
  M = 9–16 (the 16-row tile, 6 CTAs per SM) stays unsplit at 448: 896 would take two waves.
  Before the register-operand decode:
  20.4 / 18.3 µs (the decoded tile went through shared memory, a 2-byte store per weight).
  Where this stops. The estimate charges every launch 2.5 µs and streams HBM at 0.9 of its
  peak, so no kernel of any design can be estimated above 66 % of HBM here (30.3 MB: 7.0 +
  2.5 µs); 85 % of HBM is 7.4 µs in all. Of the kernel itself, 85 % needs ≤ 2.6 instructions
  per weight, below the 2 prmt per weight that any exact lookup of a 16-bit value in a
  per-block table costs with 3-bit `prmt` indices (one per output byte), plus 0.6 for the
  selectors and 0.5 for the tables: exact bitsandbytes rounding and 85 % exclude each other
  in this model. Factoring absmax out of the dot (a constant table, one multiply per block)
  would save the tables, not the lookups, and changes the rounding. `wgmma` (4 warps) was
  measured in the estimate at 5.6 instructions per weight: its register operands cost a `mov`
  each. `_nf4_gemv_kernel` (the same split-K and reduction over `nf4_word_tile`, 64-column
  tiles) serves fp32 x and K not a multiple of 256.
- dX at decode sizes: `_nf4_backward_dx_kernel`, the dense dX kernel over `nf4_word_tile`.
- Bit-exactness: the absmax decode ``map·scale + offset`` must round twice, as in
  bitsandbytes; a fused multiply-add would round once and differ in the last bit. Every
  kernel here is launched with ``enable_fp_fusion=False`` (NF4_LAUNCH_OPTIONS), so the
  dequantized values equal bitsandbytes' ``dequantize_4bit`` bit for bit.
- Offsets: the flat index n·K + k passes 2³¹ for a 32k × 64k weight, so it is int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interface
from .common import (
    INTERPRETED,
    OLD_TRITON,
    KernelBuild,
    autotuned,
    current_target,
    dtype_family,
    grouped_tile,
    launch,
    launch_guard,
    m_bucket,
    mma,
    multiprocessor_count,
    split_k_total,
    tile_configs,
)
from .lora import (
    b_rows_aligned,
    backward_with,
    block_r,
    dora_scale,
    launch_flags,
    lora_dx_term,
    lora_epilogue,
)

# M at or below which the forward takes the split-K GEMV (decode) path.
DECODE_MAX_M = 16
GEMV_BLOCK_M = 16  # x rows per GEMV program, at most; rows past M are masked
# the word GEMV's x tile at M ≤ 8: one n8 tensor-core tile instead of two (half the mma and x loads)
DECODE_GEMV_SMALL_M = 8
# No fused multiply-add: the absmax decode must round twice, as bitsandbytes does.
NF4_LAUNCH_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def index_div(index, divisor: tl.constexpr):
    """index // divisor for nonnegative int64 indices and a power-of-two divisor: one shift (a
    signed // rounds toward zero, three more 64-bit instructions per element)."""
    return (index.to(tl.uint64) // divisor).to(tl.int64)


@triton.jit
def index_mod(index, divisor: tl.constexpr):
    """index % divisor for nonnegative int64 indices and a power-of-two divisor: one mask."""
    return (index.to(tl.uint64) % divisor).to(tl.int64)


@triton.jit
def nf4_block_absmax(ABSMAX, ABSMAX_SCALE, ABSMAX_MAP, ABSMAX_OFFSET, blocks, NESTED: tl.constexpr,
                     CODE_WORDS: tl.constexpr = False):
    """fp32 absmax of NF4 blocks `blocks` (int64 indices, any shape). CODE_WORDS: ABSMAX is the
    8-bit codes (NESTED) as int32 words, read 4 bytes at a time: a load the pipeliner streams
    (it leaves 1-byte loads synchronous)."""
    if NESTED and CODE_WORDS:
        code8 = (tl.load(ABSMAX + index_div(blocks, 4)) >> (index_mod(blocks, 4) * 8).to(tl.int32)) & 0xFF
        absmax = tl.load(ABSMAX_MAP + code8) * tl.load(ABSMAX_SCALE + index_div(blocks, 256))
        absmax = absmax + tl.load(ABSMAX_OFFSET)
    elif NESTED:
        code8 = tl.load(ABSMAX + blocks)
        # one fp32 scale per 256 absmax values (peft_ops.nf4.ABSMAX_BLOCKSIZE)
        absmax = tl.load(ABSMAX_MAP + code8) * tl.load(ABSMAX_SCALE + index_div(blocks, 256))
        absmax = absmax + tl.load(ABSMAX_OFFSET)  # a separate rounding (fp fusion is off)
    else:
        absmax = tl.load(ABSMAX + blocks)
    return absmax


def emulate_ptx() -> bool:
    """Whether kernels emulate their inline PTX (`prmt`): under the interpreter, unless the launch
    is planned for a GPU (a static estimate compiles it)."""
    return INTERPRETED and interface.planning() is None


# bitsandbytes' NF4 code values (fp32), as the constants of `nf4_code_value`'s select tree; a
# test holds them to peft_ops.nf4.NF4_CODE_VALUES bit for bit (kernels cannot import peft_ops).
NF4_C0, NF4_C1, NF4_C2, NF4_C3 = (tl.constexpr(-1.0), tl.constexpr(-0.6961928009986877),
                                  tl.constexpr(-0.5250730514526367), tl.constexpr(-0.39491748809814453))
NF4_C4, NF4_C5, NF4_C6, NF4_C7 = (tl.constexpr(-0.28444138169288635), tl.constexpr(-0.18477343022823334),
                                  tl.constexpr(-0.09105003625154495), tl.constexpr(0.0))
NF4_C8, NF4_C9, NF4_C10, NF4_C11 = (tl.constexpr(0.07958029955625534), tl.constexpr(0.16093020141124725),
                                    tl.constexpr(0.24611230194568634), tl.constexpr(0.33791524171829224))
NF4_C12, NF4_C13, NF4_C14, NF4_C15 = (tl.constexpr(0.44070982933044434), tl.constexpr(0.5626170039176941),
                                      tl.constexpr(0.7229568362236023), tl.constexpr(1.0))


@triton.jit
def nf4_code_value(nib):
    """NF4[nib] in fp32 for 4-bit codes `nib` (int32, any shape): a select tree on the code's
    four bits, 15 selects per code and no memory access (a table lookup would be a load whose
    address depends on the loaded weight: a gather per weight)."""
    b0 = (nib & 1) != 0
    b1 = (nib & 2) != 0
    b2 = (nib & 4) != 0
    low = tl.where(b2, tl.where(b1, tl.where(b0, NF4_C7, NF4_C6), tl.where(b0, NF4_C5, NF4_C4)),
                   tl.where(b1, tl.where(b0, NF4_C3, NF4_C2), tl.where(b0, NF4_C1, NF4_C0)))
    high = tl.where(b2, tl.where(b1, tl.where(b0, NF4_C15, NF4_C14), tl.where(b0, NF4_C13, NF4_C12)),
                    tl.where(b1, tl.where(b0, NF4_C11, NF4_C10), tl.where(b0, NF4_C9, NF4_C8)))
    return tl.where((nib & 8) != 0, high, low)


@triton.jit
def nf4_word_codes(words):
    """The 8 NF4 codes of each packed 32-bit word (little-endian bytes; even element in a byte's
    high nibble): int32 [*words.shape, 8], in weight order."""
    j = tl.arange(0, 8)
    shift = (j >> 1) * 8 + (1 - (j & 1)) * 4  # byte j // 2; its high nibble for even j
    return (tl.expand_dims(words, len(words.shape)) >> shift) & 0xF


@triton.jit
def prmt(a, b, selector, EMULATE: tl.constexpr):
    """PTX ``prmt.b32`` (default mode) on int32 tensors: byte i of the result is byte
    (nibble i of `selector`) & 7 of the 8 bytes b:a (a's bytes are 0-3, b's 4-7). The selectors
    here never set a nibble's bit 3 (prmt's sign-replicating mode). EMULATE: the same in integer
    ops, for the interpreter (which runs no PTX); the tests run the decode through it."""
    if EMULATE:
        out = tl.zeros_like(a + b + selector)
        for i in tl.static_range(4):
            index = (selector >> (4 * i)) & 7
            byte = (tl.where(index < 4, a, b) >> ((index & 3) * 8)) & 0xFF
            out = out | (byte << (8 * i))
        return out
    else:
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, selector + tl.zeros_like(a)],
                                         dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def half_bits(values, OUT_DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """The 16-bit patterns (int32, high half zero) of fp32 `values` rounded to OUT_DTYPE (fp16 or
    bf16), to nearest even. The interpreter truncates fp32 → bf16, so EMULATE rounds bf16 on
    the bits (exact for every finite value)."""
    if EMULATE and OUT_DTYPE == tl.bfloat16:
        bits = values.to(tl.int32, bitcast=True)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF
    else:
        return values.to(OUT_DTYPE).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def value_pair(low, high, OUT_DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """fp32 `low`, `high` rounded to OUT_DTYPE (16-bit, to nearest even) and packed into one int32
    (low in bits 0-15): one `cvt.rn.bf16x2.f32` / `cvt.rn.f16x2.f32` on a GPU (two roundings,
    two widenings, a shift and an or when written elementwise)."""
    if EMULATE:
        return half_bits(low, OUT_DTYPE, EMULATE) | (half_bits(high, OUT_DTYPE, EMULATE) << 16)
    else:
        # the instruction puts its first source in the upper half
        operands = [low.to(tl.int32, bitcast=True), high.to(tl.int32, bitcast=True)]
        if OUT_DTYPE == tl.bfloat16:
            return tl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,r,r", operands, dtype=tl.int32,
                                             is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,r,r", operands, dtype=tl.int32,
                                             is_pure=True, pack=1)


@triton.jit
def nf4_byte_planes(absmax, OUT_DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """For one NF4 block's absmax (fp32, any shape): the block's 16 dequantized values
    P[v] = OUT_DTYPE(NF4[v]·absmax) — rounded as bitsandbytes rounds them — as byte planes for
    `prmt`: L_k holds the low bytes of P[4k … 4k+3], H_k the high bytes (8 int32 tensors)."""
    q0 = value_pair(absmax * NF4_C0, absmax * NF4_C1, OUT_DTYPE, EMULATE)
    q1 = value_pair(absmax * NF4_C2, absmax * NF4_C3, OUT_DTYPE, EMULATE)
    q2 = value_pair(absmax * NF4_C4, absmax * NF4_C5, OUT_DTYPE, EMULATE)
    q3 = value_pair(absmax * NF4_C6, absmax * NF4_C7, OUT_DTYPE, EMULATE)
    q4 = value_pair(absmax * NF4_C8, absmax * NF4_C9, OUT_DTYPE, EMULATE)
    q5 = value_pair(absmax * NF4_C10, absmax * NF4_C11, OUT_DTYPE, EMULATE)
    q6 = value_pair(absmax * NF4_C12, absmax * NF4_C13, OUT_DTYPE, EMULATE)
    q7 = value_pair(absmax * NF4_C14, absmax * NF4_C15, OUT_DTYPE, EMULATE)
    # bytes 0, 2 of each pair (the low bytes of P[2i], P[2i+1]), then bytes 1, 3 (the high ones)
    return (prmt(q0, q1, 0x6420, EMULATE), prmt(q2, q3, 0x6420, EMULATE), prmt(q4, q5, 0x6420, EMULATE),
            prmt(q6, q7, 0x6420, EMULATE), prmt(q0, q1, 0x7531, EMULATE), prmt(q2, q3, 0x7531, EMULATE),
            prmt(q4, q5, 0x7531, EMULATE), prmt(q6, q7, 0x7531, EMULATE))


@triton.jit
def nf4_selectors(words, EMULATE: tl.constexpr):
    """The `prmt` selectors of `nf4_code_bytes` for the 8 codes of each packed word: (index,
    upper) for its low 16 bits, then for its high 16 bits (prmt reads a selector's low 16 bits).
    index: each code's low 3 bits, one per nibble; upper: nibble i is i, or i + 4 (the second
    source) when code i ≥ 8. 5 instructions per word."""
    index = words & 0x77777777
    if EMULATE:
        upper = ((words >> 1) & 0x44444444) | 0x32103210
    else:  # one lop3: (a & b) | c
        upper = tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x44444444, 0x32103210, 0xEA;", "=r,r", [words >> 1],
                                          dtype=tl.int32, is_pure=True, pack=1)
    return index, upper, index >> 16, upper >> 16


@triton.jit
def nf4_code_bytes(index, upper, planes, EMULATE: tl.constexpr):
    """For the 4 codes whose selectors are `index`, `upper` (`nf4_selectors`): the low bytes and
    the high bytes of their 4 dequantized 16-bit values (int32 each, bytes in the codes' nibble
    order: elements 1, 0, 3, 2), by table lookups in registers: 6 prmt, 3 per byte plane (the
    code's low 3 bits index 8 bytes, its bit 3 picks the half of the table)."""
    l0, l1, l2, l3, h0, h1, h2, h3 = planes
    low = prmt(prmt(l0, l1, index, EMULATE), prmt(l2, l3, index, EMULATE), upper, EMULATE)
    high = prmt(prmt(h0, h1, index, EMULATE), prmt(h2, h3, index, EMULATE), upper, EMULATE)
    return low, high


@triton.jit
def nf4_four_codes(index, upper, planes, EMULATE: tl.constexpr):
    """The 4 dequantized 16-bit values of 4 codes (their selectors `index`, `upper`), as two int32
    pairs in weight order: the looked-up bytes (`nf4_code_bytes`) interleaved by 2 more prmt."""
    low, high = nf4_code_bytes(index, upper, planes, EMULATE)
    # the codes sit in a byte as (odd element, even element) nibbles, so bytes 0-3 of `low`
    # hold elements 1, 0, 3, 2
    return prmt(low, high, 0x4051, EMULATE), prmt(low, high, 0x6273, EMULATE)


@triton.jit
def four_copies(a):
    """[*a.shape, 4] holding `a` four times along the new (register) axis; no instructions."""
    return tl.reshape(tl.join(tl.join(a, a), tl.join(a, a)), (a.shape[0], a.shape[1], a.shape[2], 4))


@triton.jit
def nf4_four_values(index, upper, planes, OUT_DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """The 4 dequantized values of 4 codes (their selectors `index`, `upper`, [a, b, c] int32) as
    an OUT_DTYPE (16-bit) tensor [a, b, c, 4] in weight order. On a GPU the two interleaving
    prmt are one inline-assembly block whose outputs are the 16-bit values packed two per
    register, as the tensor cores take them: split into 16-bit halves in IR, they cost 5
    instructions per pair to split and pack again (and, shift, two cvt, prmt)."""
    low, high = nf4_code_bytes(index, upper, planes, EMULATE)
    if EMULATE:
        pairs = tl.join(prmt(low, high, 0x4051, EMULATE), prmt(low, high, 0x6273, EMULATE))
        values = tl.reshape(tl.join(pairs & 0xFFFF, pairs >> 16), (low.shape[0], low.shape[1], low.shape[2], 4))
        return values.to(tl.int16).to(OUT_DTYPE, bitcast=True)
    else:
        # pack=4: $0, $1 hold the 4 outputs two per register; each input's 4 copies are $2-$5
        # (low) and $6-$9 (high), of which the block reads the first
        asm: tl.constexpr = "prmt.b32 $0, $2, $6, 0x4051;\n\tprmt.b32 $1, $2, $6, 0x6273;"
        operands = [four_copies(low), four_copies(high)]
        if OUT_DTYPE == tl.bfloat16:  # (the dtype argument must be a dtype, not a constexpr)
            return tl.inline_asm_elementwise(asm, "=r,=r,r,r,r,r,r,r,r,r", operands, dtype=tl.bfloat16, is_pure=True,
                                             pack=4)
        else:
            return tl.inline_asm_elementwise(asm, "=r,=r,r,r,r,r,r,r,r,r", operands, dtype=tl.float16, is_pure=True,
                                             pack=4)


@triton.jit
def nf4_word_pairs(words, absmax, OUT_DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """The 8 weights of each packed 32-bit word, dequantized to OUT_DTYPE (16-bit) with the
    absmax of its block (broadcast against `words`), as 4 int32 pairs per word in weight order
    (p0, p1, p2, p3: weights 0-1, 2-3, 4-5, 6-7). No memory access per weight."""
    planes = nf4_byte_planes(absmax, OUT_DTYPE, EMULATE)
    index, upper, index_high, upper_high = nf4_selectors(words, EMULATE)
    p0, p1 = nf4_four_codes(index, upper, planes, EMULATE)
    p2, p3 = nf4_four_codes(index_high, upper_high, planes, EMULATE)
    return p0, p1, p2, p3


@triton.jit
def swap_nibbles(words):
    """Each byte's two nibbles swapped: a packed word's element e (high nibble of byte e // 2 for
    even e, as bitsandbytes packs) moves to nibble e, so that a shift by 4·e bits reaches it."""
    return ((words >> 4) & 0x0F0F0F0F) | ((words & 0x0F0F0F0F) << 4)


@triton.jit
def round_to(values, OUT_DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """fp32 `values` in OUT_DTYPE, rounded to nearest even (on the bits under the interpreter,
    which truncates fp32 → bf16)."""
    if EMULATE and OUT_DTYPE == tl.bfloat16:
        return half_bits(values, OUT_DTYPE, EMULATE).to(tl.int16).to(OUT_DTYPE, bitcast=True)
    else:
        return values.to(OUT_DTYPE)


@triton.jit
def nf4_word_tile(WORDS, ABSMAX, ABSMAX_SCALE, ABSMAX_MAP, ABSMAX_OFFSET, rows, k0, K, numel,
                  BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, ALIGNED: tl.constexpr,
                  OUT_DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """W[rows, k0 : k0 + BLOCK_K] in OUT_DTYPE ([len(rows), BLOCK_K]; k0 a multiple of BLOCK_K,
    `rows` valid int64 row indices), decoded in registers from the packed bytes read as 32-bit
    words: no byte loads and no load whose address depends on a weight's code. Columns past K
    hold the weights that follow in memory (the next row's; clamped at the end): finite values
    that the caller's other operand zeroes or its store masks.

    ALIGNED (K % BLOCKSIZE == 0): each row starts on a word, and the tile's words are loaded as
    vectors; each block's 16 values are built once (`nf4_byte_planes`, 16-bit OUT_DTYPE) and
    picked by `prmt` (≈ 3 instructions per weight), or, for fp32, computed by a select tree
    per code and one multiply. Otherwise (K odd, or rows that start inside a block) a row's
    weights start at any nibble: the words are shifted into place two at a time (a 64-bit
    funnel shift of nibble-swapped words), and each weight picks one of the two block scales
    its row segment can touch (BLOCK_K ≤ BLOCKSIZE)."""
    start = rows * K + k0  # int64 flat index of each row's first weight
    last_word = (numel - 1) // 8
    last_block = (numel - 1) // BLOCKSIZE
    if ALIGNED:
        GROUPS: tl.constexpr = BLOCK_K // BLOCKSIZE if BLOCK_K > BLOCKSIZE else 1  # blocks across the tile
        GROUP_WORDS: tl.constexpr = BLOCK_K // 8 // GROUPS
        group = tl.arange(0, GROUPS)
        word = (index_div(start, 8)[:, None, None] + (group * GROUP_WORDS)[None, :, None]
                + tl.arange(0, GROUP_WORDS)[None, None, :])
        blocks = index_div(start, BLOCKSIZE)[:, None] + group[None, :]
        if BLOCK_K > BLOCKSIZE:  # K need not be a multiple of BLOCK_K: the last row's tile may pass the end
            word = tl.minimum(word, last_word)
            blocks = tl.minimum(blocks, last_block)
        words = tl.load(WORDS + word)
        absmax = nf4_block_absmax(ABSMAX=ABSMAX, ABSMAX_SCALE=ABSMAX_SCALE, ABSMAX_MAP=ABSMAX_MAP,
                                  ABSMAX_OFFSET=ABSMAX_OFFSET, blocks=blocks, NESTED=NESTED, CODE_WORDS=True)
        if OUT_DTYPE == tl.float32:
            values = nf4_code_value(nf4_word_codes(words)) * absmax[:, :, None, None]
        else:
            planes = nf4_byte_planes(absmax[:, :, None], OUT_DTYPE, EMULATE)
            index, upper, index_high, upper_high = nf4_selectors(words, EMULATE)
            first = nf4_four_values(index, upper, planes, OUT_DTYPE, EMULATE)  # weights 0-3 of each word
            second = nf4_four_values(index_high, upper_high, planes, OUT_DTYPE, EMULATE)  # 4-7
            values = tl.permute(tl.join(first, second), (0, 1, 2, 4, 3))
    else:
        tl.static_assert(BLOCK_K <= BLOCKSIZE, "a row segment touches at most two blocks")
        WORDS_PER_ROW: tl.constexpr = BLOCK_K // 8
        word = tl.minimum(index_div(start, 8)[:, None] + tl.arange(0, WORDS_PER_ROW)[None, :], last_word)
        low = swap_nibbles(tl.load(WORDS + word)).to(tl.uint32, bitcast=True).to(tl.uint64)
        high = swap_nibbles(tl.load(WORDS + tl.minimum(word + 1, last_word))).to(tl.uint32, bitcast=True)
        shift = (index_mod(start, 8) * 4).to(tl.uint64)[:, None]
        words = ((low | (high.to(tl.uint64) << 32)) >> shift).to(tl.uint32).to(tl.int32, bitcast=True)
        codes = (words[:, :, None] >> (4 * tl.arange(0, 8))[None, None, :]) & 0xF  # element e at nibble e
        # the segment's two blocks: the first weight's, and the next (past the end: the last)
        first_block = index_div(start, BLOCKSIZE)
        first = nf4_block_absmax(ABSMAX=ABSMAX, ABSMAX_SCALE=ABSMAX_SCALE, ABSMAX_MAP=ABSMAX_MAP,
                                 ABSMAX_OFFSET=ABSMAX_OFFSET, blocks=first_block, NESTED=NESTED, CODE_WORDS=True)
        second = nf4_block_absmax(ABSMAX=ABSMAX, ABSMAX_SCALE=ABSMAX_SCALE, ABSMAX_MAP=ABSMAX_MAP,
                                  ABSMAX_OFFSET=ABSMAX_OFFSET, blocks=tl.minimum(first_block + 1, last_block),
                                  NESTED=NESTED, CODE_WORDS=True)
        in_first = ((first_block + 1) * BLOCKSIZE - start).to(tl.int32)  # weights of the row in its first block
        position = 8 * tl.arange(0, WORDS_PER_ROW)[:, None] + tl.arange(0, 8)[None, :]
        absmax = tl.where(position[None, :, :] < in_first[:, None, None], first[:, None, None], second[:, None, None])
        values = round_to(nf4_code_value(codes) * absmax, OUT_DTYPE, EMULATE)
    return tl.reshape(values, (rows.shape[0], BLOCK_K))


@triton.jit
def nf4_x_wt(acc, x_ptrs, x_step, k_begin, k_end, cols, WORDS, ABSMAX, ABSMAX_SCALE, ABSMAX_MAP,
             ABSMAX_OFFSET, K, numel, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
             ALIGNED: tl.constexpr, EMULATE: tl.constexpr, WIDEN_BF16_DOT: tl.constexpr,
             DOT_PRECISION: tl.constexpr):
    """acc + X[:, k_begin:k_end]·dequant(W)[cols, k_begin:k_end]ᵀ, W decoded tile by tile in
    registers (k_begin a multiple of BLOCK_K; x_ptrs point at column k_begin of the x rows)."""
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        x = tl.load(x_ptrs, mask=(offs_k < k_end - k0)[None, :], other=0.0)  # zero past the end: W runs on there
        w = nf4_word_tile(WORDS=WORDS, ABSMAX=ABSMAX, ABSMAX_SCALE=ABSMAX_SCALE, ABSMAX_MAP=ABSMAX_MAP,
                          ABSMAX_OFFSET=ABSMAX_OFFSET, rows=cols, k0=k0, K=K, numel=numel, BLOCK_K=BLOCK_K,
                          BLOCKSIZE=BLOCKSIZE, NESTED=NESTED, ALIGNED=ALIGNED, OUT_DTYPE=x.dtype, EMULATE=EMULATE)
        acc = mma(x, tl.trans(w), acc, WIDEN_BF16_DOT, DOT_PRECISION)
        x_ptrs += x_step
    return acc


@triton.jit
def _nf4_dequantize_kernel(WORDS, ABSMAX, ABSMAX_SCALE, ABSMAX_MAP, ABSMAX_OFFSET, OUT, numel, n_words,
                           BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, GROUPS: tl.constexpr,
                           PAIRS: tl.constexpr, EMULATE: tl.constexpr, BLOCK_WORDS: tl.constexpr):
    """OUT[f] = NF4[nibble f]·absmax[f // BLOCKSIZE] for the 8·BLOCK_WORDS weights of BLOCK_WORDS
    packed 32-bit words per program (vector loads, codes decoded in registers), in GROUPS groups
    of weights that share one absmax, decoded once per group; one launch for the whole weight.
    PAIRS (16-bit OUT, numel even): each group's 16 values are computed once and the codes pick
    them with `prmt` (≈ 3 instructions per weight); else a select tree per code and a multiply."""
    WORDS_PER_GROUP: tl.constexpr = BLOCK_WORDS // GROUPS
    pid = tl.program_id(0).to(tl.int64)
    group = tl.arange(0, GROUPS)
    word = pid * BLOCK_WORDS + group[:, None] * WORDS_PER_GROUP + tl.arange(0, WORDS_PER_GROUP)[None, :]
    words = tl.load(WORDS + word, mask=word < n_words, other=0)
    # a group's first weight names its block (the tail's groups past numel: any valid block)
    first = tl.minimum(pid * BLOCK_WORDS * 8 + group * (WORDS_PER_GROUP * 8), numel - 1)
    absmax = nf4_block_absmax(ABSMAX=ABSMAX, ABSMAX_SCALE=ABSMAX_SCALE, ABSMAX_MAP=ABSMAX_MAP,
                              ABSMAX_OFFSET=ABSMAX_OFFSET, blocks=index_div(first, BLOCKSIZE), NESTED=NESTED,
                              CODE_WORDS=True)
    if PAIRS:
        p0, p1, p2, p3 = nf4_word_pairs(words, absmax[:, None], OUT.dtype.element_ty, EMULATE)
        # join(join(a, c), join(b, d)) puts a, b, c, d along its two new (last) axes in that order
        pairs = tl.reshape(tl.join(tl.join(p0, p2), tl.join(p1, p3)), (GROUPS, WORDS_PER_GROUP, 4))
        pair = word[:, :, None] * 4 + tl.arange(0, 4)[None, None, :]
        tl.store(OUT.to(tl.pointer_type(tl.int32)) + pair, pairs, mask=pair * 2 < numel)
    else:
        flat = word[:, :, None] * 8 + tl.arange(0, 8)[None, None, :]  # [GROUPS, WORDS_PER_GROUP, 8]
        values = nf4_code_value(nf4_word_codes(words)) * absmax[:, None, None]
        tl.store(OUT + flat, values.to(OUT.dtype.element_ty), mask=flat < numel)


# Autotune lists per target and operand family: "half" = fp16/bf16 x and adapters, "mixed" =
# half x with fp32 adapters, "fp32" = fp32 x (tf32x3 dots), and "general" = any dtype when K
# is odd or not a multiple of the blocksize (a scale per weight, not per row: more registers
# and shared memory). `peft-ops aot` proves every one spill-free and within shared memory;
# the pruned ones spilled or overflowed (e.g. 128×256 tiles, BLOCK_K ≥ 128 in the GEMV).
def _lists(names, half, mixed, fp32, general):
    return {"half": tile_configs(names, half), "mixed": tile_configs(names, mixed),
            "fp32": tile_configs(names, fp32), "general": tile_configs(names, general)}


_GEMM = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
# fp32: 8 warps (the select-tree decode of fp32 values held 244-255 registers at 4 warps; 300 B
# of spills under Triton 3.6)
_MATMUL_GPU = _lists(_GEMM, half=[(128, 128, 64, 8, 8, 3), (64, 128, 64, 8, 4, 3), (128, 64, 64, 8, 4, 3)],
                     mixed=[(64, 128, 64, 8, 4, 3)], fp32=[(64, 64, 32, 8, 8, 3)], general=[(64, 64, 32, 8, 8, 2)])
MATMUL_CONFIGS = {"sm80": _MATMUL_GPU, "sm90": _MATMUL_GPU, "interpreter": tile_configs(_GEMM, [(32, 32, 32, 8, 4, 1)])}
_GEMV = ("BLOCK_N", "BLOCK_K")
# 64 columns in every family, so that the split-K rule (`split_k_for`) knows the tile count;
# Triton before 3.9 spilled (176 B) on the fp32 tile at 4 warps (3.9 spills 12 B at 8).
_GEMV_GPU = _lists(_GEMV, half=[(64, 64, 4, 3)], mixed=[(64, 64, 4, 3)],
                   fp32=[(64, 64, 8, 3)] if OLD_TRITON else [(64, 64, 4, 3)], general=[(64, 32, 4, 2)])
GEMV_CONFIGS = {"sm80": _GEMV_GPU, "sm90": _GEMV_GPU, "interpreter": tile_configs(_GEMV, [(32, 32, 4, 1)])}
GEMV_BLOCK_N_FOR_SPLIT = 64  # the split-K GEMV's column tile on a GPU (every config's: the split follows it)
# The word-decoding GEMV (16-bit x, K % BLOCK_K == 0): (BLOCK_N, BLOCK_K, warps, stages), one W
# row per thread (BLOCK_N = 32·warps).
_DECODE_GEMV = ("BLOCK_N", "BLOCK_K", "K_WIDTH")
# K_WIDTH: consecutive k per lane in the tensor-core operand as Triton 3.9 lays out 16-bit W
# from registers — 4 for `mma.sync`, 2 for `wgmma`; decoded in that order, W needs no shuffle
# or shared-memory pass (another order is still right, only slower). sm_90a runs 2 warps of
# `mma.sync` (32 rows): at 4 warps Triton picks `wgmma`, whose register operands cost a `mov`
# each (5.6 instructions per weight against 4.8).
_DECODE_GEMV_HALF = {"sm80": [(64, 256, 4, 4, 3)], "sm90": [(32, 256, 4, 2, 3)]}
DECODE_GEMV_BLOCK_N = {"sm80": 64, "sm90": 32, "interpreter": 32}  # each target's one config's (split-K follows it)
# The 8-row tile (M ≤ 8) has lists of its own ("half/m8", "mixed/m8"): on sm_90a with a register
# cap, since uncapped, ptxas left the build without LoRA or a bias at 80 registers with 8 bytes
# spilled (a local load per iteration). At 128: 102-128 registers, no spill in any variant (at
# 96 / 104 the LoRA / fp32-rank ones spilled 8 bytes); 8 CTAs per SM, more than a decode grid
# puts on one (N / 32 programs: 448 over 132 SMs at N = 14336). The 16-row builds (144
# registers) stay uncapped: at 128 or 144 they spilled 40-108 bytes.
_DECODE_GEMV_M8_MAXNREG = {"sm80": None, "sm90": 128}


def _decode_gemv_lists(target: str) -> dict:
    """{family: configs} of the word GEMV on `target`: each 16-bit family, and its 8-row lists."""
    lists = {}
    for family in ("half", "mixed"):
        lists[family] = tile_configs(_DECODE_GEMV, _DECODE_GEMV_HALF[target])
        lists[f"{family}/m8"] = [triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages,
                                               maxnreg=_DECODE_GEMV_M8_MAXNREG[target]) for c in lists[family]]
    return lists


DECODE_GEMV_CONFIGS = {**{t: _decode_gemv_lists(t) for t in _DECODE_GEMV_HALF},
                       "interpreter": tile_configs(_DECODE_GEMV, [(32, 256, 2, 1, 1)])}


def decode_gemv_family(named_args: dict, constexprs: dict) -> str:
    """dtype_family("X"), with the 8-row tile's launches in their own lists ("half/m8", "mixed/m8")."""
    family = dtype_family("X")(named_args, constexprs)
    return f"{family}/m8" if constexprs.get("BLOCK_M") == DECODE_GEMV_SMALL_M else family


# dX: BLOCK_M is DX_BLOCK_M (each M-block decodes every W tile once: a wider one halves the
# decode work but the tile then holds a 128-row accumulator next to the decode).
DX_BLOCK_M = {"sm80": 64, "sm90": 64, "interpreter": 32}
_DX = ("BLOCK_N", "BLOCK_K", "GROUP_M")
# Triton before 3.9 spilled (16–40 B, sm_80) on the 32×32 "general" tile: a 16-row one without
# pipelining there (0 spills under 3.6).
_DX_GPU = _lists(_DX, half=[(64, 64, 8, 4, 3)], mixed=[(64, 64, 8, 4, 3)], fp32=[(32, 32, 8, 4, 3), (16, 64, 8, 4, 3)],
                 general=[(16, 32, 8, 4, 1)] if OLD_TRITON else [(32, 32, 8, 4, 2)])
BACKWARD_DX_CONFIGS = {"sm80": _DX_GPU, "sm90": _DX_GPU, "interpreter": tile_configs(_DX, [(32, 32, 8, 4, 1)])}


def _unaligned(constexprs: dict) -> bool:
    """The "general" autotune family: K odd or not a multiple of the blocksize."""
    return not (constexprs.get("ROW_ALIGNED") and constexprs.get("EVEN_K"))


_NF4_KEY = ["BLOCKSIZE", "NESTED", "EVEN_K", "ROW_ALIGNED", "RANK_FP32"]
# The bounds of loops over names local to a kernel (its helpers' arguments), as expressions of
# its launch arguments: what a static estimate needs to count the iterations (peft_ops.tools.estimate).
LOOP_BOUNDS = {
    "_nf4_matmul_kernel": {"k_begin": "0", "k_end": "K"},
    "_nf4_gemv_kernel": {"k_begin": "0", "k_end": "min(K, cdiv(cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K)"},
    "_nf4_decode_gemv_kernel": {"k_begin": "0", "k_end": "min(K, cdiv(cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K)"},
}


@autotuned(MATMUL_CONFIGS, dtype_family("X", _unaligned),
           key=["M_BUCKET", "N", "K", "R", "HAS_LORA", "HAS_BIAS", "DORA"] + _NF4_KEY)
@triton.jit
def _nf4_matmul_kernel(
    X, WORDS, ABSMAX, ABSMAX_SCALE, ABSMAX_MAP, ABSMAX_OFFSET, XA, B, BIAS, Y, SCALE, PRE, M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_bn, stride_br, stride_bias, scaling,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, EVEN_K: tl.constexpr, ROW_ALIGNED: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, DORA: tl.constexpr, BLOCK_R: tl.constexpr,
    WIDEN_BF16_DOT: tl.constexpr, RANK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Y[M, N] = X·dequant(W)ᵀ [+ scaling·XA·Bᵀ] + BIAS, W decoded tile by tile in registers.
    DORA: PRE gets X·dequant(W)ᵀ + scaling·XA·Bᵀ and Y = PRE ⊙ SCALE[n] + BIAS (`store_output`)."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows/columns past the edge wrap onto valid ones for the loads (the store is masked).
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk
    acc = nf4_x_wt(acc=tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), x_ptrs=x_ptrs,
                   x_step=BLOCK_K * tl.cast(stride_xk, tl.int64), k_begin=0, k_end=K, cols=cols, WORDS=WORDS,
                   ABSMAX=ABSMAX, ABSMAX_SCALE=ABSMAX_SCALE, ABSMAX_MAP=ABSMAX_MAP, ABSMAX_OFFSET=ABSMAX_OFFSET,
                   K=K, numel=tl.cast(N, tl.int64) * K, BLOCK_K=BLOCK_K, BLOCKSIZE=BLOCKSIZE, NESTED=NESTED,
                   ALIGNED=EVEN_K and ROW_ALIGNED, EMULATE=EMULATE, WIDEN_BF16_DOT=WIDEN_BF16_DOT,
                   DOT_PRECISION=DOT_PRECISION)
    acc = lora_epilogue(acc=acc, XA=XA, B=B, BIAS=BIAS, rows=rows, cols=cols, R=R, stride_bn=stride_bn,
                        stride_br=stride_br, stride_bias=stride_bias, scaling=scaling, HAS_LORA=HAS_LORA,
                        HAS_BIAS=HAS_BIAS and not DORA, BLOCK_R=BLOCK_R, RANK_FP32=RANK_FP32,
                        WIDEN_BF16_DOT=WIDEN_BF16_DOT, DOT_PRECISION=DOT_PRECISION, B_ROWS_ALIGNED=False)
    store_output(acc, Y, SCALE, PRE, BIAS, cols, offs_m, offs_n, M, N, stride_bias, HAS_BIAS, DORA)


@triton.jit
def store_output(acc, Y, SCALE, PRE, BIAS, cols, offs_m, offs_n, M, N, stride_bias, HAS_BIAS: tl.constexpr,
                 DORA: tl.constexpr):
    """Y[offs_m, offs_n] = acc; DORA: PRE = acc (the pre-scale output DoRA's backward keeps) and
    Y = acc ⊙ SCALE[cols] + BIAS[cols] (the bias left out of acc), from the same accumulator."""
    offsets = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if DORA:
        tl.store(PRE + offsets, acc.to(PRE.dtype.element_ty), mask=mask)
        acc = dora_scale(acc, SCALE, BIAS, cols, stride_bias, HAS_BIAS)
    tl.store(Y + offsets, acc.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def gemv_finish(acc, PARTIALS, COUNTERS, tile, pid_s, XA, B, BIAS, Y, SCALE, PRE, rows, cols, offs_m, offs_n, M, N,
                R, stride_bn, stride_br, stride_bias, scaling, SPLIT_K: tl.constexpr, HAS_LORA: tl.constexpr,
                HAS_BIAS: tl.constexpr, DORA: tl.constexpr, BLOCK_R: tl.constexpr, RANK_FP32: tl.constexpr,
                WIDEN_BF16_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, B_ROWS_ALIGNED: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The GEMVs' last step: Y[offs_m, offs_n] = acc [+ scaling·XA·Bᵀ] + BIAS on the whole sum
    (DORA: `store_output`'s PRE and scaled Y) — with SPLIT_K > 1 by the tile's last program
    only, on the slices' sum (`split_k_total`)."""
    last = pid_s == 0  # one slice: the only program
    if SPLIT_K > 1:
        acc, last = split_k_total(acc, PARTIALS, COUNTERS, tile, pid_s, SPLIT_K, BLOCK_M, BLOCK_N)
    if last:
        acc = lora_epilogue(acc=acc, XA=XA, B=B, BIAS=BIAS, rows=rows, cols=cols, R=R, stride_bn=stride_bn,
                            stride_br=stride_br, stride_bias=stride_bias, scaling=scaling, HAS_LORA=HAS_LORA,
                            HAS_BIAS=HAS_BIAS and not DORA, BLOCK_R=BLOCK_R, RANK_FP32=RANK_FP32,
                            WIDEN_BF16_DOT=WIDEN_BF16_DOT, DOT_PRECISION=DOT_PRECISION,
                            B_ROWS_ALIGNED=B_ROWS_ALIGNED)
        store_output(acc, Y, SCALE, PRE, BIAS, cols, offs_m, offs_n, M, N, stride_bias, HAS_BIAS, DORA)


@autotuned(GEMV_CONFIGS, dtype_family("X", _unaligned),
           key=["M", "N", "K", "R", "HAS_LORA", "HAS_BIAS", "DORA"] + _NF4_KEY)
@triton.jit
def _nf4_gemv_kernel(
    X, WORDS, ABSMAX, ABSMAX_SCALE, ABSMAX_MAP, ABSMAX_OFFSET, XA, B, BIAS, Y, SCALE, PRE, PARTIALS, COUNTERS,
    M, N, K, R, stride_xm, stride_xk, stride_bn, stride_br, stride_bias, scaling,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, EVEN_K: tl.constexpr, ROW_ALIGNED: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, DORA: tl.constexpr, BLOCK_R: tl.constexpr,
    WIDEN_BF16_DOT: tl.constexpr, RANK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE: tl.constexpr,
    B_ROWS_ALIGNED: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Y[M, N] = X·dequant(W)ᵀ [+ scaling·XA·Bᵀ] + BIAS for M ≤ BLOCK_M rows, one launch: program
    (n, s) decodes its [BLOCK_N × K-slice s] of W once; with SPLIT_K > 1 the tile's last program
    sums the slices' partials (`split_k_total`) and writes Y."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    # Slices are whole BLOCK_K tiles, so a tile never straddles two of them (and ROW_ALIGNED
    # tiles stay inside one NF4 block).
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_begin = pid_s * k_per_split
    k_end = tl.minimum(K, k_begin + k_per_split)
    x_ptrs = X + rows[:, None] * stride_xm + (k_begin + offs_k)[None, :].to(tl.int64) * stride_xk
    acc = nf4_x_wt(acc=tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), x_ptrs=x_ptrs,
                   x_step=BLOCK_K * tl.cast(stride_xk, tl.int64), k_begin=k_begin, k_end=k_end, cols=cols,
                   WORDS=WORDS, ABSMAX=ABSMAX, ABSMAX_SCALE=ABSMAX_SCALE, ABSMAX_MAP=ABSMAX_MAP,
                   ABSMAX_OFFSET=ABSMAX_OFFSET, K=K, numel=tl.cast(N, tl.int64) * K, BLOCK_K=BLOCK_K,
                   BLOCKSIZE=BLOCKSIZE, NESTED=NESTED, ALIGNED=EVEN_K and ROW_ALIGNED, EMULATE=EMULATE,
                   WIDEN_BF16_DOT=WIDEN_BF16_DOT, DOT_PRECISION=DOT_PRECISION)
    gemv_finish(acc, PARTIALS, COUNTERS, pid_n, pid_s, XA, B, BIAS, Y, SCALE, PRE, rows, cols, offs_m, offs_n, M, N,
                R, stride_bn, stride_br, stride_bias, scaling, SPLIT_K, HAS_LORA, HAS_BIAS, DORA, BLOCK_R, RANK_FP32,
                WIDEN_BF16_DOT, DOT_PRECISION, B_ROWS_ALIGNED, BLOCK_M, BLOCK_N)


@triton.jit
def nf4_fragment_half(WORDS, ABSMAX, ABSMAX_SCALE, ABSMAX_MAP, ABSMAX_OFFSET, row0, row_add, N, k0, K, row_words, h,
                      planes, HALF: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
                      OUT_DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """For the HALF rows r of W at row0 + (r // 8)·16 + r % 8 + row_add (wrapped into N): the 4
    packed words at k0 + 64·t + 32·h of each row, t = 0..3, one 16-byte vector per (row, t),
    decoded: [HALF, t, word, 2, 4] (weights 0-3, 4-7 of each word), and the rows' block tables
    (built here when `planes` is None). The (row, t) pairs are enumerated as one flat index,
    t fastest, so that the loads' natural layout puts t on lanes 0-1, the row on lanes 2-4 and
    the row group on the warp — the tensor-core operand's own arrangement (a [row, t] load
    let older Triton pick another, and the decoded tile then went through shared memory)."""
    q = tl.arange(0, HALF * 4)
    r = q // 4
    t = q % 4
    rows = ((row0 + (r >> 3) * 16 + (r & 7) + row_add) % N).to(tl.int64)
    if planes is None:
        blocks = index_div(rows * K + k0, BLOCKSIZE) + (t * 64 + h * 32) // BLOCKSIZE
        absmax = nf4_block_absmax(ABSMAX=ABSMAX, ABSMAX_SCALE=ABSMAX_SCALE, ABSMAX_MAP=ABSMAX_MAP,
                                  ABSMAX_OFFSET=ABSMAX_OFFSET, blocks=blocks, NESTED=NESTED, CODE_WORDS=True)
        planes = nf4_byte_planes(tl.reshape(absmax, (HALF, 4))[:, :, None], OUT_DTYPE, EMULATE)
    word = (rows * row_words + k0 // 8 + t * 8 + h * 4)[:, None] + tl.arange(0, 4)[None, :]
    words = tl.reshape(tl.load(WORDS + word), (HALF, 4, 4))
    index, upper, index_high, upper_high = nf4_selectors(words, EMULATE)
    first = nf4_four_values(index, upper, planes, OUT_DTYPE, EMULATE)
    second = nf4_four_values(index_high, upper_high, planes, OUT_DTYPE, EMULATE)
    return tl.permute(tl.join(first, second), (0, 1, 2, 4, 3)), planes


@triton.jit
def nf4_fragment_rows(WORDS, ABSMAX, ABSMAX_SCALE, ABSMAX_MAP, ABSMAX_OFFSET, row0, row_add, N, k0, K, row_words,
                      HALF: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, OUT_DTYPE: tl.constexpr,
                      EMULATE: tl.constexpr):
    """W[rows, k0 : k0 + 256] decoded (the HALF rows of `nf4_fragment_half`), as
    [HALF, 4 (t), 4 (word), 2 (half), 4 (weight), 2 (h)]."""
    low, planes = nf4_fragment_half(WORDS, ABSMAX, ABSMAX_SCALE, ABSMAX_MAP, ABSMAX_OFFSET, row0, row_add, N, k0, K,
                                    row_words, 0, None, HALF, BLOCKSIZE, NESTED, OUT_DTYPE, EMULATE)
    if BLOCKSIZE < 64:  # the second half of each lane's 64 weights is another block
        planes = None
    high, planes = nf4_fragment_half(WORDS, ABSMAX, ABSMAX_SCALE, ABSMAX_MAP, ABSMAX_OFFSET, row0, row_add, N, k0, K,
                                     row_words, 1, planes, HALF, BLOCKSIZE, NESTED, OUT_DTYPE, EMULATE)
    return tl.join(low, high)


@triton.jit
def nf4_fragment_tile(WORDS, ABSMAX, ABSMAX_SCALE, ABSMAX_MAP, ABSMAX_OFFSET, row0, N, k0, K, row_words,
                      BLOCK_N: tl.constexpr, K_WIDTH: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
                      OUT_DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """W[row0 : row0 + BLOCK_N, k0 + k(kappa)] for kappa = 0..255 (k(kappa): `nf4_fragment_x`), in OUT_DTYPE (16-bit),
    decoded in registers from 16-byte loads of packed words, laid out so that every thread
    already holds its own part of the tensor-core operand (the dot's first operand, 4 warps,
    `mma.sync` or `wgmma` with W from registers): no shared-memory round trip for W.

    The dot is the same for any order of k (x is put in the same order, `nf4_fragment_x`)
    and of the rows, so both are chosen to match the operand's layout: in it a lane holds rows
    r, r + 8 (and + 64 in a 128-row tile) and pairs of k two apart in groups of 8. A lane here
    loads 64 consecutive weights of each of its rows (one NF4 block of 64: one table per row),
    as the operand's k positions 2·t, 2·t + 1 (+ 8·i), and its two row groups by two loads."""
    HALF: tl.constexpr = BLOCK_N // 2
    # row groups of 8, 16 apart; the second call adds 8
    upper = nf4_fragment_rows(WORDS, ABSMAX, ABSMAX_SCALE, ABSMAX_MAP, ABSMAX_OFFSET, row0, 0, N, k0, K, row_words,
                              HALF, BLOCKSIZE, NESTED, OUT_DTYPE, EMULATE)
    lower = nf4_fragment_rows(WORDS, ABSMAX, ABSMAX_SCALE, ABSMAX_MAP, ABSMAX_OFFSET, row0, 8, N, k0, K, row_words,
                              HALF, BLOCKSIZE, NESTED, OUT_DTYPE, EMULATE)
    # [r_hi, r_lo, t, word, half, j1, j0, h, row8]
    tile = tl.reshape(tl.join(upper, lower), (HALF // 8, 8, 4, 4, 2, 2, 2, 2, 2))
    # rows r_hi·16 + row8·8 + r_lo; k positions as `nf4_fragment_x` orders them (the operand's
    # K_WIDTH consecutive positions per lane: j0 alone, or j1 j0)
    if K_WIDTH == 2:  # h·128 + word·32 + half·16 + j1·8 + t·2 + j0
        tile = tl.permute(tile, (0, 8, 1, 7, 3, 4, 5, 2, 6))
    else:  # h·128 + word·32 + half·16 + t·4 + j1·2 + j0
        tile = tl.permute(tile, (0, 8, 1, 7, 3, 4, 2, 5, 6))
    return tl.reshape(tile, (BLOCK_N, 256))


@triton.jit
def nf4_fragment_x(x, K_WIDTH: tl.constexpr):
    """x [rows, 256] (k in order) as [256, rows] in the tile's k order, a bit permutation of k done
    on the register tile (x is loaded contiguously: 16-byte loads). Position kappa of the
    tensor-core tile (`nf4_fragment_tile`) holds k = 64·t + 32·h + 8·w + v (t: the lane, w: the
    word of a 4-word load, v: the weight in the word, h: which of the two loads); kappa's bits,
    from bit 0: K_WIDTH = 2 (`wgmma`): v0, t0, t1, v1, v2, w0, w1, h; K_WIDTH = 4 (`mma.sync` as
    Triton feeds it): v0, v1, t0, t1, v2, w0, w1, h."""
    ROWS: tl.constexpr = x.shape[0]
    bits = tl.reshape(x, (ROWS, 2, 2, 2, 2, 2, 2, 2, 2))  # axes 1-8: k's bits 7 … 0, then
    if K_WIDTH == 2:  # kappa's bits 7 … 0 are k's 5 4 3 2 1 7 6 0
        bits = tl.permute(bits, (3, 4, 5, 6, 7, 1, 2, 8, 0))
    else:  # k's 5 4 3 2 7 6 1 0
        bits = tl.permute(bits, (3, 4, 5, 6, 1, 2, 7, 8, 0))
    return tl.reshape(bits, (256, ROWS))


@autotuned(DECODE_GEMV_CONFIGS, decode_gemv_family,
           key=["M", "N", "K", "R", "HAS_LORA", "HAS_BIAS", "DORA"] + _NF4_KEY)
@triton.jit
def _nf4_decode_gemv_kernel(
    X, WORDS, ABSMAX, ABSMAX_SCALE, ABSMAX_MAP, ABSMAX_OFFSET, XA, B, BIAS, Y, SCALE, PRE, PARTIALS, COUNTERS,
    M, N, K, R, row_words, stride_xm, stride_xk, stride_bn, stride_br, stride_bias, scaling,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, EVEN_K: tl.constexpr, ROW_ALIGNED: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, DORA: tl.constexpr, BLOCK_R: tl.constexpr,
    WIDEN_BF16_DOT: tl.constexpr, RANK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE: tl.constexpr,
    B_ROWS_ALIGNED: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, K_WIDTH: tl.constexpr,
):
    """Y[M, N] = X·dequant(W)ᵀ [+ scaling·XA·Bᵀ] + BIAS for M ≤ BLOCK_M rows, in one launch: program
    (n, s) owns BLOCK_N columns of Y (rows of W) over the s-th of SPLIT_K slices of K, so W is
    read once for all M rows, from 32-bit words decoded in registers (`nf4_fragment_tile`); with
    SPLIT_K > 1 (narrow layers: more programs than column tiles) the tile's last program sums
    the slices' fp32 partials in a fixed order (`split_k_total`) and writes Y. K % BLOCK_K == 0
    (the launcher's condition)."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    # slices of whole BLOCK_K tiles (each stays on word and block boundaries)
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_begin = pid_s * k_per_split
    k_end = tl.minimum(K, k_begin + k_per_split)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (offs_m % M).to(tl.int64)  # rows past M repeat a valid one (x loads and the store are masked)
    cols = (offs_n % N).to(tl.int64)  # W rows past N repeat a valid one (the store is masked)
    # x [BLOCK_M, BLOCK_K] loaded in order (16-byte copies) and permuted in registers; rows past M
    # are masked (zero-filled copies move no bytes: M = 1 reads x once, not BLOCK_M times)
    x_ptrs = X + rows[:, None] * stride_xm + (k_begin + tl.arange(0, BLOCK_K))[None, :].to(tl.int64) * stride_xk
    x_rows = (offs_m < M)[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    # The loop's own stage count pipelines every load in it, the block scales too (their 8-bit
    # codes and the map lookup they index): by default only loads feeding the dot are, and the
    # scales' two dependent loads waited two memory latencies per iteration.
    for k0 in tl.range(k_begin, k_end, BLOCK_K, num_stages=GEMV_STAGES):
        x = nf4_fragment_x(tl.load(x_ptrs, mask=x_rows, other=0.0), K_WIDTH)
        w = nf4_fragment_tile(WORDS=WORDS, ABSMAX=ABSMAX, ABSMAX_SCALE=ABSMAX_SCALE, ABSMAX_MAP=ABSMAX_MAP,
                              ABSMAX_OFFSET=ABSMAX_OFFSET, row0=pid * BLOCK_N, N=N, k0=k0, K=K, row_words=row_words,
                              BLOCK_N=BLOCK_N, K_WIDTH=K_WIDTH, BLOCKSIZE=BLOCKSIZE, NESTED=NESTED,
                              OUT_DTYPE=X.dtype.element_ty,
                              EMULATE=EMULATE)
        acc = mma(w, x, acc, WIDEN_BF16_DOT, DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
    acc = tl.trans(acc)
    gemv_finish(acc, PARTIALS, COUNTERS, pid, pid_s, XA, B, BIAS, Y, SCALE, PRE, rows, cols, offs_m, offs_n, M, N, R,
                stride_bn, stride_br, stride_bias, scaling, SPLIT_K, HAS_LORA, HAS_BIAS, DORA, BLOCK_R, RANK_FP32,
                WIDEN_BF16_DOT, DOT_PRECISION, B_ROWS_ALIGNED, BLOCK_M, BLOCK_N)


@autotuned(BACKWARD_DX_CONFIGS, dtype_family("DY", _unaligned),
           key=["M_BUCKET", "N", "K", "R", "HAS_LORA", "HAS_DROPOUT"] + _NF4_KEY)
@triton.jit
def _nf4_backward_dx_kernel(
    DY, WORDS, ABSMAX, ABSMAX_SCALE, ABSMAX_MAP, ABSMAX_OFFSET, G, A, KEEP, DX,
    M, N, K, R, M_BUCKET, stride_dym, stride_dyn, stride_ar, stride_ak, lora_scale,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, EVEN_K: tl.constexpr, ROW_ALIGNED: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_R: tl.constexpr, WIDEN_BF16_DOT: tl.constexpr, RANK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    EMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Per output tile (M-block, K-block): DX = dY·dequant(W) [+ lora_scale·(G·A)⊙keep], the
    LoRA term first in the accumulator as in the dense dX kernel."""
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    k_mask = offs_k < K
    rows = offs_m.to(tl.int64)
    cols = (offs_k % K).to(tl.int64)
    if HAS_LORA:
        acc = lora_dx_term(G=G, A=A, KEEP=KEEP, rows=rows, m_mask=m_mask, cols=cols, k0=pid_k * BLOCK_K, R=R, K=K,
                           stride_ar=stride_ar, stride_ak=stride_ak, lora_scale=lora_scale, HAS_DROPOUT=HAS_DROPOUT,
                           BLOCK_R=BLOCK_R, WIDEN_BF16_DOT=WIDEN_BF16_DOT, DOT_PRECISION=DOT_PRECISION,
                           BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    wrapped_rows = (offs_m % M).to(tl.int64)
    dy_ptrs = DY + wrapped_rows[:, None] * stride_dym + offs_n[None, :].to(tl.int64) * stride_dyn
    dy_step = BLOCK_N * tl.cast(stride_dyn, tl.int64)
    numel = tl.cast(N, tl.int64) * K
    for n0 in range(0, N, BLOCK_N):
        dy = tl.load(dy_ptrs, mask=(offs_n < N - n0)[None, :], other=0.0)  # zero past N: W wraps there
        w_rows = ((n0 + offs_n) % N).to(tl.int64)
        w = nf4_word_tile(WORDS=WORDS, ABSMAX=ABSMAX, ABSMAX_SCALE=ABSMAX_SCALE, ABSMAX_MAP=ABSMAX_MAP,
                          ABSMAX_OFFSET=ABSMAX_OFFSET, rows=w_rows, k0=pid_k * BLOCK_K, K=K, numel=numel,
                          BLOCK_K=BLOCK_K, BLOCKSIZE=BLOCKSIZE, NESTED=NESTED, ALIGNED=EVEN_K and ROW_ALIGNED,
                          OUT_DTYPE=DY.dtype.element_ty, EMULATE=EMULATE)
        acc = mma(dy, w, acc, WIDEN_BF16_DOT, DOT_PRECISION)
        dy_ptrs += dy_step
    dx_ptrs = DX + rows[:, None] * K + offs_k[None, :]
    tl.store(dx_ptrs, acc.to(DX.dtype.element_ty), mask=m_mask[:, None] & k_mask[None, :])


# --------------------------------------------------------------------------------------
# Launchers. `qw` is a peft_ops.nf4.NF4Tensors (the weight's tensors and shape), validated
# by peft_ops; `tables` the format's (NF4 code values, 8-bit dynamic map) as fp32 tensors on
# the weight's device (peft_ops.nf4.code_tables). These only shape, allocate and launch.
# --------------------------------------------------------------------------------------

def _format_args(qw, tables) -> tuple:
    """The five pointer arguments every kernel here takes for W, in order: the packed codes as
    int32 words, the absmax (its 8-bit codes as words too, with double quantization), and the
    second level's scale, map and offset (unused pointers without it)."""
    _, absmax_map = tables
    if qw.absmax_scale is None:
        return packed_words(qw.packed), qw.absmax, qw.absmax, qw.absmax, qw.absmax
    return packed_words(qw.packed), packed_words(qw.absmax), qw.absmax_scale, absmax_map, qw.absmax_offset


def _format_flags(qw) -> dict:
    K = qw.in_features
    return {"BLOCKSIZE": qw.blocksize, "NESTED": qw.absmax_scale is not None, "EVEN_K": K % 2 == 0,
            "ROW_ALIGNED": K % qw.blocksize == 0}


DEQUANT_BLOCK_WORDS = 1024  # packed words per program of the dequantize kernel: 8192 weights, so that
# each thread decodes many weights per block table (the table costs ≈ 45 instructions)


def packed_words(packed: torch.Tensor) -> torch.Tensor:
    """Bytes (the packed codes, or the 8-bit absmax codes) as int32 words (little-endian), for
    word-wide loads: a view when they are 4-byte aligned and a multiple of 4 long, else an
    aligned zero-padded copy."""
    flat = packed.reshape(-1)
    if flat.numel() % 4 or flat.data_ptr() % 4:
        padded = torch.zeros(triton.cdiv(flat.numel(), 4) * 4, dtype=torch.uint8, device=flat.device)
        padded[:flat.numel()] = flat
        flat = padded
    return flat.view(torch.int32)


def dequantize(qw, dtype: torch.dtype, *, tables, out: torch.Tensor | None = None) -> torch.Tensor:
    """W [N, K] in `dtype`, one launch; into `out` (contiguous [N, K] of `dtype`: a reusable
    workspace) when given. `tables` is unused here (the codes decode by selects), kept for the
    launchers' common signature."""
    N, K = qw.out_features, qw.in_features
    if out is None:
        out = torch.empty((N, K), device=qw.packed.device, dtype=dtype)
    assert out.shape == (N, K) and out.dtype == dtype and out.is_contiguous(), "the launcher writes a dense [N, K]"
    if N * K == 0:
        return out
    words, absmax, absmax_scale, absmax_map, absmax_offset = _format_args(qw, tables)
    groups = max(1, DEQUANT_BLOCK_WORDS * 8 // qw.blocksize)  # blocks per program (blocksizes: powers of 2)
    # pairs of 16-bit values stored as int32: an even count, 4-byte aligned
    pairs = dtype != torch.float32 and (N * K) % 2 == 0 and out.data_ptr() % 4 == 0
    with launch_guard(qw.packed):
        launch(_nf4_dequantize_kernel, (triton.cdiv(words.numel(), DEQUANT_BLOCK_WORDS),),
            words, absmax, absmax_scale, absmax_map, absmax_offset, out, N * K, words.numel(),
            BLOCKSIZE=qw.blocksize, NESTED=qw.absmax_scale is not None, GROUPS=groups, PAIRS=pairs,
            EMULATE=emulate_ptx(), BLOCK_WORDS=DEQUANT_BLOCK_WORDS, **NF4_LAUNCH_OPTIONS)
    return out


GEMV_STAGES = tl.constexpr(3)  # pipeline depth of the word-decoding GEMV's loop (all its loads)
# K multiple the word-decoding GEMV needs on every target (its BLOCK_K: `nf4_fragment_tile` is 256 wide)
DECODE_GEMV_K_MULTIPLE = 256


def word_gemv_fits(x: torch.Tensor, qw) -> bool:
    """Whether the decode forward takes the word-decoding GEMV: half-precision x (the tables hold
    16-bit values), K a multiple of its tiles (rows start on a word; chunks sit in one block),
    the packed bytes 4-byte aligned; else the split-K byte-decoding GEMV."""
    K = qw.in_features
    return (x.dtype in (torch.float16, torch.bfloat16) and K % DECODE_GEMV_K_MULTIPLE == 0
            and qw.packed.data_ptr() % 4 == 0)


MAX_SPLIT_K = 16  # K slices of a decode GEMV at most (a compiled variant per power of two)
SPLIT_K_CHOICES = (1, 2, 4, 8, 16)
DECODE_GEMV_PROGRAMS_PER_SM = 2  # the word GEMV's split-K target (see the module docstring)


def split_k_for(N: int, K: int, device: torch.device, block_n: int = GEMV_BLOCK_N_FOR_SPLIT,
                k_tile: int = 512, programs_per_sm: int = 2, resident: int | None = None) -> int:
    """K slices of a decode GEMV (a power of two), 1 off a GPU: the fewest that give
    `programs_per_sm` programs per SM over column tiles of `block_n`, each slice at least
    `k_tile` columns (shorter ones would not amortize their partial sums; the word GEMV's
    slices are whole 256-column tiles). With `resident` (the CTAs of the kernel one SM holds at
    once), then the fewest more that bring the busiest SM's work within SPLIT_BALANCE of the
    least any split allows while all programs still fit at once: 448 column tiles on 132 SMs
    put 4 on some and 3 on others, 896 half-length ones 7 or 6 (3.5 tiles' work, not 4)."""
    sms = multiprocessor_count(device)
    if sms is None:
        return 1
    tiles = triton.cdiv(N, block_n)
    split = 1
    while split < MAX_SPLIT_K and tiles * split < programs_per_sm * sms and K // (2 * split) >= k_tile:
        split *= 2
    if resident is None:
        return split
    splits = [split]
    while splits[-1] < MAX_SPLIT_K and K // (2 * splits[-1]) >= k_tile and tiles * 2 * splits[-1] <= resident * sms:
        splits.append(2 * splits[-1])
    busiest = {s: triton.cdiv(tiles * s, sms) / s for s in splits}  # in full-K tiles
    return next(s for s in splits if busiest[s] <= SPLIT_BALANCE * min(busiest.values()))


SPLIT_BALANCE = 1.05  # a further K split pays for its partial sums when it evens the SMs' work by more
# CTAs of the word GEMV one SM holds at once, per target and x tile height (its builds'
# registers; tests/tools/test_aot.py holds every build to these): a split into more programs
# than fit at once leaves a second wave, slower than the imbalance it evens.
# (no split off a GPU: the interpreter's are sm_90a's)
DECODE_GEMV_RESIDENT = {"sm80": {8: 6, 16: 4}, "sm90": {8: 8, 16: 6}, "interpreter": {8: 8, 16: 6}}


def split_k_scratch(device: torch.device, split: int, N: int, scratch=None) -> tuple:
    """(fp32 partials, int32 counters) for a decode GEMV of `split` K slices over N columns:
    room for any column tile up to 128 wide, and a counter per 16 columns. The counters must be
    zero (every launch leaves them so): `scratch(device, floats, counters)` gives reusable ones
    (``peft_ops.ops.workspace``); without it they are allocated (and zeroed) per call."""
    floats = split * GEMV_BLOCK_M * triton.cdiv(N, 128) * 128
    counters = triton.cdiv(N, 16)
    if scratch is not None:
        return scratch(device, floats, counters)
    return (torch.empty(floats, device=device, dtype=torch.float32),
            torch.zeros(counters, device=device, dtype=torch.int32))


def forward(x: torch.Tensor, qw, xa: torch.Tensor | None, lora_B: torch.Tensor | None, scaling: float,
            bias: torch.Tensor | None, regime: str | None = None, split_k: int | None = None, *,
            tables, scratch=None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y = x·dequant(W)ᵀ [+ scaling·xa·lora_Bᵀ] + bias, [M, N] in x's dtype (or `out_dtype`:
    fp32 keeps the accumulator unrounded, as DoRA's A·Wᵀ takes it), one launch.
    `regime`: "gemm" or "decode" (default: decode for M ≤ DECODE_MAX_M); `split_k` (a power of
    two ≤ MAX_SPLIT_K) pins the split-K GEMV at that many K slices (default: the word GEMV where
    it fits, each at `split_k_for`'s slices); `scratch`: see `split_k_scratch`."""
    return _forward(x, qw, xa, lora_B, scaling, bias, regime, split_k, tables, scratch, out_dtype, None)[0]


def dora_forward(x: torch.Tensor, qw, xa: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                 bias: torch.Tensor | None, col_scale: torch.Tensor, regime: str | None = None,
                 split_k: int | None = None, *, tables, scratch=None):
    """(y, pre) of QDoRA: pre = x·dequant(W)ᵀ + scaling·xa·lora_Bᵀ (kept for the backward) and
    y = pre ⊙ col_scale + bias, both [M, N] in x's dtype, from the same accumulator in the
    kernel :func:`forward` launches (col_scale fp32 [N]: ``dora.weight_norm``'s). One launch."""
    return _forward(x, qw, xa, lora_B, scaling, bias, regime, split_k, tables, scratch, None, col_scale)


def _forward(x, qw, xa, lora_B, scaling, bias, regime, split_k, tables, scratch, out_dtype, col_scale):
    M, K = x.shape
    N = qw.out_features
    dora = col_scale is not None
    y = torch.empty((M, N), device=x.device, dtype=out_dtype or x.dtype)
    pre = torch.empty_like(y) if dora else None
    if M == 0:
        return y, pre
    regime = regime or ("decode" if M <= DECODE_MAX_M else "gemm")
    if regime == "decode" and M > GEMV_BLOCK_M:
        raise ValueError(f"the decode regime takes at most {GEMV_BLOCK_M} rows, got {M}")
    has_lora = xa is not None
    R = lora_B.shape[1] if has_lora else 0
    adapter_dtype = lora_B.dtype if has_lora else x.dtype
    flags = {**launch_flags(x.dtype, adapter_dtype, max(R, 1)), **_format_flags(qw)}
    lora_args = (xa, lora_B) if has_lora else (x, x)  # unused pointers when HAS_LORA is False
    common = dict(HAS_LORA=has_lora, HAS_BIAS=bias is not None, DORA=dora, **flags, **NF4_LAUNCH_OPTIONS)
    tail = (x.stride(0), x.stride(1), lora_B.stride(0) if has_lora else 0, lora_B.stride(1) if has_lora else 0,
            bias.stride(0) if bias is not None else 0, float(scaling))
    outputs = (y, col_scale, pre) if dora else (y, y, y)  # Y, SCALE, PRE (unused pointers when not DORA)
    with launch_guard(x, qw.packed):
        if regime == "gemm":
            grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)  # noqa: E731
            launch(_nf4_matmul_kernel, grid, x, *_format_args(qw, tables), *lora_args,
                   bias if bias is not None else y, *outputs, M, N, K, R, m_bucket(M), *tail, EMULATE=emulate_ptx(),
                   **common)
            return y, pre
        word = split_k is None and word_gemv_fits(x, qw)
        block_m = DECODE_GEMV_SMALL_M if word and M <= DECODE_GEMV_SMALL_M else GEMV_BLOCK_M
        if word:
            target = current_target()
            split = split_k_for(N, K, x.device, DECODE_GEMV_BLOCK_N[target], DECODE_GEMV_K_MULTIPLE,
                                DECODE_GEMV_PROGRAMS_PER_SM, DECODE_GEMV_RESIDENT[target][block_m])
        else:
            split = split_k or split_k_for(N, K, x.device)
            if split not in SPLIT_K_CHOICES:
                raise ValueError(f"split_k must be a power of two up to {MAX_SPLIT_K}, got {split}")
        partials, counters = split_k_scratch(x.device, split, N, scratch) if split > 1 else (y, y)
        kernel = _nf4_decode_gemv_kernel if word else _nf4_gemv_kernel
        extra = (K // 8,) if word else ()  # the word GEMV's row length in words
        launch(kernel, lambda META: (triton.cdiv(N, META["BLOCK_N"]), split), x, *_format_args(qw, tables),
               *lora_args, bias if bias is not None else y, *outputs, partials, counters, M, N, K, R, *extra, *tail,
               BLOCK_M=block_m, SPLIT_K=split, EMULATE=emulate_ptx(),
               B_ROWS_ALIGNED=has_lora and b_rows_aligned(lora_B), **common)
    return y, pre


def backward_dx(dy: torch.Tensor, qw, *, tables) -> torch.Tensor:
    """dx = dy·dequant(W) [M, K] in dy's dtype (nf4_linear's backward; W gets no gradient)."""
    M, N = dy.shape
    K = qw.in_features
    dx = torch.empty((M, K), device=dy.device, dtype=dy.dtype)
    if M == 0:
        return dx
    block_m = DX_BLOCK_M[current_target()]
    grid = lambda META: (triton.cdiv(M, block_m) * triton.cdiv(K, META["BLOCK_K"]),)  # noqa: E731
    flags = {**launch_flags(dy.dtype, dy.dtype, 1), **_format_flags(qw)}
    with launch_guard(dy, qw.packed):
        launch(_nf4_backward_dx_kernel, grid,
            dy, *_format_args(qw, tables), dy, dy, dy, dx, M, N, K, 0, m_bucket(M),
            dy.stride(0), dy.stride(1), 0, 0, 1.0,
            HAS_LORA=False, HAS_DROPOUT=False, BLOCK_M=block_m, EMULATE=emulate_ptx(), **flags,
            **NF4_LAUNCH_OPTIONS)
    return dx


def qlora_backward(dy: torch.Tensor, x: torch.Tensor, qw, lora_A: torch.Tensor, lora_B: torch.Tensor,
                   xa: torch.Tensor, keep: torch.Tensor | None, scaling: float, dropout_p: float,
                   need_dx: bool, need_dA: bool, need_dB: bool, need_db: bool, *, tables,
                   dy_base: torch.Tensor | None = None):
    """(dx, dA, dB, db) of the QLoRA layer, as ``lora.backward`` (`dy_base` too) with the NF4 dX
    kernel."""
    block_m = DX_BLOCK_M[current_target()]
    base = dy if dy_base is None else dy_base

    def launch_dx(g, dx, lora_scale, rank, **constexprs):  # the rank pass stays its own launch
        M = dy.shape[0]
        grid = lambda META: (triton.cdiv(M, block_m) * triton.cdiv(qw.in_features, META["BLOCK_K"]),)  # noqa: E731
        launch(_nf4_backward_dx_kernel, grid,
            base, *_format_args(qw, tables), g, lora_A, keep if keep is not None else g, dx, M, qw.out_features,
            qw.in_features, lora_A.shape[0], m_bucket(M), base.stride(0), base.stride(1), lora_A.stride(0),
            lora_A.stride(1), lora_scale, HAS_LORA=True, BLOCK_M=block_m, EMULATE=emulate_ptx(), **constexprs,
            **_format_flags(qw), **NF4_LAUNCH_OPTIONS)
        return False

    with launch_guard(dy, base, x, qw.packed, lora_A, lora_B):
        return backward_with(launch_dx, dy, x, lora_A, lora_B, xa, keep, scaling, dropout_p, need_dx, need_dA,
                             need_dB, need_db)


# What the aot builds cover: each config at the heaviest settings (LoRA, bias, dropout,
# nested absmax) in the operand variants that differ in registers, with the fast decode
# (K even, K % blocksize == 0: real models) and the "general" configs with the general one.
AOT_VARIANTS = {
    "bf16": dict(dtype="bf16", rank_dtype="bf16", family="half"),
    "bf16+fp32 A,B": dict(dtype="bf16", rank_dtype="fp32", family="mixed"),
    "fp32": dict(dtype="fp32", rank_dtype="fp32", family="fp32"),
}
FORMAT_VARIANTS = {"aligned": dict(EVEN_K=True, ROW_ALIGNED=True), "odd K": dict(EVEN_K=False, ROW_ALIGNED=False)}


def aot_specs(target: str) -> list:
    plain = ("M", "seed", "R")
    fmt_pointers = dict(WORDS="i32", ABSMAX="i32", ABSMAX_SCALE="fp32", ABSMAX_MAP="fp32", ABSMAX_OFFSET="fp32")
    options = dict(NF4_LAUNCH_OPTIONS)
    specs = []
    for variant, v in AOT_VARIANTS.items():
        dt, rt, family = v["dtype"], v["rank_dtype"], v["family"]
        fp32_rank = rt == "fp32"
        common = dict(BLOCK_R=block_r(64, fp32_rank), WIDEN_BF16_DOT=False, RANK_FP32=fp32_rank and dt != "fp32",
                      DOT_PRECISION="tf32x3", BLOCKSIZE=64, NESTED=True, EMULATE=False)
        for fmt, fmt_flags in FORMAT_VARIANTS.items():
            def build(name, kernel, configs, pointers, constexprs, fmt=fmt, fmt_flags=fmt_flags, variant=variant,
                      family=family, common=common, **kw):
                for cfg in configs[target][family if fmt == "aligned" else "general"]:
                    specs.append(KernelBuild(f"{name} [{variant}, {fmt}]", kernel, cfg, {**fmt_pointers, **pointers},
                                             {**common, **fmt_flags, **constexprs}, plain_ints=plain,
                                             options=options, vector_loads=True, **kw))

            outputs = dict(Y=dt, SCALE="fp32", PRE=dt)
            # DoRA's epilogue (PRE stored, Y scaled) on the half-precision builds of the real-model format
            doras = (False, True) if fmt == "aligned" and family != "fp32" else (False,)
            for dora in doras:
                tag = f"{variant}, DoRA" if dora else variant
                build("nf4_matmul", _nf4_matmul_kernel, MATMUL_CONFIGS, dict(X=dt, XA="fp32", B=rt, BIAS=dt, **outputs),
                      dict(HAS_LORA=True, HAS_BIAS=True, DORA=dora), variant=tag,
                      unit_strides=("stride_xk", "stride_br", "stride_bias"), float_args=("scaling",))
                # (split-K builds: the in-kernel reduction of the partials compiled in)
                build("nf4_gemv", _nf4_gemv_kernel, GEMV_CONFIGS,
                      dict(X=dt, XA="fp32", B=rt, BIAS=dt, **outputs, PARTIALS="fp32", COUNTERS="i32"),
                      dict(HAS_LORA=True, HAS_BIAS=True, DORA=dora, BLOCK_M=GEMV_BLOCK_M, SPLIT_K=4,
                           B_ROWS_ALIGNED=True), variant=tag,
                      unit_strides=("stride_xk", "stride_br", "stride_bias"), float_args=("scaling",))
                if fmt == "aligned" and family != "fp32":
                    # with LoRA and a bias, and (nf4_linear's plain launch) without either: ptxas
                    # allocates each anew, and the plain 8-row build spilled where the full one did
                    # not (one plain build: without LoRA, DoRA and the rank dtype do not exist)
                    plain_too = (True, False) if not (dora or fp32_rank) else (True,)
                    tiles = {GEMV_BLOCK_M: family, DECODE_GEMV_SMALL_M: f"{family}/m8"}
                    for cfg, block_m, full in ((c, m, f) for m, listed in tiles.items()
                                               for c in DECODE_GEMV_CONFIGS[target][listed] for f in plain_too):
                        specs.append(KernelBuild(
                            f"nf4_decode_gemv [{tag}{', M ≤ 8' if block_m < GEMV_BLOCK_M else ''}"
                            f"{'' if full else ', no LoRA or bias'}]",
                            _nf4_decode_gemv_kernel, cfg,
                            {**fmt_pointers, "X": dt, "XA": "fp32", "B": rt, "BIAS": dt, **outputs,
                             "PARTIALS": "fp32", "COUNTERS": "i32"},
                            {**common, **fmt_flags, "HAS_LORA": full, "HAS_BIAS": full, "DORA": dora,
                             "BLOCK_M": block_m, "SPLIT_K": 2, "B_ROWS_ALIGNED": full},
                            plain_ints=plain, options=options, vector_loads=True,
                            unit_strides=("stride_xk", "stride_br", "stride_bias"), float_args=("scaling",)))
            build("nf4_backward_dx", _nf4_backward_dx_kernel, BACKWARD_DX_CONFIGS,
                  dict(DY=dt, G="fp32", A=rt, KEEP="i32", DX=dt),
                  dict(HAS_LORA=True, HAS_DROPOUT=True, BLOCK_M=DX_BLOCK_M[target]),
                  unit_strides=("stride_dyn", "stride_ak"), float_args=("lora_scale",))
    for out in ("bf16", "fp32"):
        specs.append(KernelBuild(f"nf4_dequantize [{out}]", _nf4_dequantize_kernel,
                                 triton.Config({"BLOCK_WORDS": DEQUANT_BLOCK_WORDS}, num_warps=4, num_stages=1),
                                 {"WORDS": "i32", "ABSMAX": "i32", "ABSMAX_SCALE": "fp32", "ABSMAX_MAP": "fp32",
                                  "ABSMAX_OFFSET": "fp32", "OUT": out},
                                 dict(BLOCKSIZE=64, NESTED=True, GROUPS=DEQUANT_BLOCK_WORDS * 8 // 64,
                                      PAIRS=out != "fp32", EMULATE=False),
                                 options=options, uses_tensor_cores=False))
    return specs

