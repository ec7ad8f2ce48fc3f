"""Train LoRA (or QLoRA) adapters on several GPUs with DDP or FSDP2, then save them in PEFT's
format from rank 0. On a CPU-only machine the same script runs on CPU processes (gloo).

    torchrun --nproc-per-node 8 examples/train_distributed.py --strategy fsdp2 --quantize nf4   # FSDP-QLoRA
    torchrun --nproc-per-node 2 examples/train_distributed.py --strategy ddp --steps 3     # CPU: gloo

FSDP-QLoRA: `prepare_fsdp` makes the NF4 base weights FSDP2 parameters, so `fully_shard` splits
them by rows: each rank holds 1/world of the 4-bit bytes, gathered per block for its forward and
backward. (A model too big for one rank is built on the meta device and filled with
`peft_ops.load_base_weights`, shard by shard: docs/distributed.md.)

The model is a small Llama built from a config (no download); put your own in `build_model`.
Its widths (512, 1024) split every NF4 weight into 8 row shards of whole scale groups.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import transformers

import peft_ops


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)  # every rank builds the same model
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                      initializer_range=0.05, bos_token_id=None, eos_token_id=None)
    return transformers.LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", choices=["ddp", "fsdp2"], default="ddp")
    parser.add_argument("--quantize", choices=["nf4"], default=None, help="QLoRA: the base weights in NF4")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="adapter-distributed")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    model = peft_ops.apply_lora(build_model().to(device), ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"], r=8, lora_alpha=16,
                                quantize=args.quantize)
    if args.strategy == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)  # all-reduces the adapters' gradients only
        inner = model.module
    else:
        from torch.distributed.fsdp import fully_shard

        peft_ops.prepare_fsdp(model)  # the NF4 weights become parameters FSDP2 shards (no-op without NF4)
        for block in model.model.layers:  # shard block by block, then the root
            fully_shard(block)
        inner = model = fully_shard(model)
        if rank == 0 and args.quantize:
            held = sum(w.nbytes for w in peft_ops.peft.fsdp.nf4_weights(inner).values())
            print(f"NF4 bytes on this rank: {held} (1/{world} of the model's)", flush=True)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    gen = torch.Generator().manual_seed(1)
    for step in range(args.steps):
        tokens = torch.randint(0, 128, (8 * world, 1), generator=gen)
        for _ in range(23):  # a fixed next-token rule to learn
            tokens = torch.cat([tokens, (5 * tokens[:, -1:] + 3) % 128], dim=1)
        local = tokens[rank * 8:(rank + 1) * 8].to(device)  # this rank's share of the global batch
        loss = model(local, labels=local).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and (step == 0 or step == args.steps - 1):
            print(f"step {step}: loss {loss.item():.3f}", flush=True)

    peft_ops.save_peft_adapter(inner, args.out)  # every rank calls it (FSDP2 gathers); rank 0 writes
    if rank == 0:
        print(f"saved {args.out} ({peft_ops.trainable_summary(inner)})", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
