"""The shape sets of `peft-ops bench` and `peft-ops tune` (``--preset``)."""

from __future__ import annotations

from .roofline import OpShape

# NF4 rows also run the decode batches between 1 and 16 (bitsandbytes' gemv_4bit takes batch 1
# only; the decode GEMV must stay memory-bound up to 16 rows)
NF4_TOKENS = [1, 2, 4, 8, 16, 512, 4096, 8192]
PRESETS = {  # layer shapes (in, out), ranks, token counts M (nf4_tokens: the NF4 rows'), bottleneck adapters (d, m)
    "default": dict(layers=[(4096, 4096), (4096, 11008), (4096, 14336)], ranks=[8, 16, 64],
                    tokens=[1, 16, 512, 4096, 8192], nf4_tokens=NF4_TOKENS,
                    bottlenecks=[(4096, 16), (4096, 64), (4096, 256)]),
    "quick": dict(layers=[(4096, 4096), (4096, 14336)], ranks=[16], tokens=[16, 8192], bottlenecks=[(4096, 64)]),
    # tiny shapes: exercises every code path on any device (timings meaningless)
    "smoke": dict(layers=[(64, 48)], ranks=[8], tokens=[4, 40], bottlenecks=[(64, 8)]),
    # scripts/gpu-check: the target rows at the headline shapes first, then the default shapes
    # for as long as --time-budget allows
    "gpu-check": dict(layers=[(4096, 4096), (4096, 14336), (4096, 11008)], ranks=[16, 64, 8],
                      tokens=[8192, 1, 16, 4096, 512], nf4_tokens=[1, 8192, 2, 4, 8, 16, 4096, 512],
                      bottlenecks=[(4096, 64), (4096, 16), (4096, 256)],
                      first=[OpShape("lora", 8192, 4096, 4096, 16), OpShape("qlora", 8192, 4096, 4096, 16),
                             OpShape("nf4", 1, 4096, 14336), OpShape("bottleneck", 8192, 4096, 4096, 64),
                             OpShape("dora", 8192, 4096, 4096, 16), OpShape("qdora", 8192, 4096, 4096, 16)]),
}
