"""Per-rank bytes of FSDP-QLoRA's frozen base for Llama-2 7B / 13B and Llama-3 70B at 1, 2, 4 and 8
ranks, computed from the NF4 format (blocksize 64, double quantization) with
`peft_ops.nf4_tensor.shard_bytes` — the formula tests/reliability/test_fsdp_qlora.py checks
against the bytes each rank holds. Every linear layer of the decoder blocks is NF4; the embedding,
lm_head and norms stay bf16, sharded by FSDP2 too. Adapters, optimizer state and activations are
not included.

    python benchmarks/fsdp_qlora_memory.py      # prints the table of docs/distributed.md
"""

from peft_ops.nf4_tensor import shard_bytes

# name: (hidden, intermediate, layers, vocab, kv width)
MODELS = {"Llama-2 7B": (4096, 11008, 32, 32000, 4096), "Llama-2 13B": (5120, 13824, 40, 32000, 5120),
          "Llama-3 70B": (8192, 28672, 80, 128256, 1024)}
RANKS = (1, 2, 4, 8)


def linear_shapes(hidden, intermediate, kv):
    return [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),
            (intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]


def per_rank(model: str, world: int) -> tuple[int, int]:
    """(NF4 bytes, bf16 bytes) one rank holds."""
    hidden, intermediate, layers, vocab, kv = MODELS[model]
    nf4 = layers * sum(shard_bytes(rows, cols, world_size=world) for rows, cols in linear_shapes(hidden, intermediate,
                                                                                                kv))
    dense = 2 * (2 * vocab * hidden + (2 * layers + 1) * hidden)  # embed, lm_head, norms in bf16
    return nf4, dense // world


def table() -> str:
    lines = ["| model | dense bf16 (1 rank) | " + " | ".join(f"{w} rank{'s' if w > 1 else ''}" for w in RANKS) + " |",
             "|---|---|" + "---|" * len(RANKS)]
    for model, (hidden, intermediate, layers, vocab, kv) in MODELS.items():
        weights = layers * sum(r * c for r, c in linear_shapes(hidden, intermediate, kv))
        dense = 2 * weights + sum(per_rank(model, 1)[1:])
        cells = [f"{sum(per_rank(model, w)) / 2**30:.2f} GiB" for w in RANKS]
        lines.append(f"| {model} | {dense / 2**30:.2f} GiB | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
