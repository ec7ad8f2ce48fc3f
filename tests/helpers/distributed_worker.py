"""Run as a script: train one step of a small model holding LoraLinear, QLoraLinear and a
BottleneckAdapter under DDP or FSDP2 (gloo, 2 CPU processes on loopback), or in a single
process on the whole batch, and write the adapter gradients and updated weights (safetensors).
A mode ending in "+dora" makes both LoRA layers DoRA layers (use_dora=True).

    python distributed_worker.py {single,ddp,fsdp2}[+dora] OUT_DIR [PORT]
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

import peft_ops

WORLD = 2


class Model(nn.Module):
    def __init__(self, dora=False):
        super().__init__()
        torch.manual_seed(0)
        self.lora = peft_ops.LoraLinear.from_linear(nn.Linear(16, 16), r=4, lora_alpha=8, use_dora=dora)
        self.qlora = peft_ops.QLoraLinear.from_linear(nn.Linear(16, 16), r=4, lora_alpha=8, use_dora=dora)
        self.adapter = peft_ops.BottleneckAdapter(16, 4, "gelu")
        with torch.no_grad():  # past the zero init, so every gradient is nonzero
            for p in (self.lora.lora_B, self.qlora.lora_B, self.adapter.up_weight, self.adapter.up_bias):
                p.normal_(0, 0.3)
            if dora:
                self.lora.lora_magnitude_vector.mul_(1.2)
                self.qlora.lora_magnitude_vector.mul_(0.9)

    def forward(self, x):
        return self.adapter(self.qlora(torch.relu(self.lora(x))))


def batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 16, generator=gen), torch.randn(8, 16, generator=gen)


def step(model, x, target):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = (model(x) - target).square().mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    grads = {n: g.clone() for n, g in grads.items()}
    opt.step()
    return grads


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main():
    mode, out = sys.argv[1], sys.argv[2]
    from safetensors.torch import save_file

    x, target = batch()
    if mode.startswith("single"):
        model = Model(dora=mode.endswith("+dora"))
        grads = step(model, x, target)
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        peft_ops.save_peft_adapter(model, os.path.join(out, f"peft_{mode}"))
        save_file({**{"grad." + k: v for k, v in grads.items()}, **{"param." + k: v for k, v in params.items()}},
                  os.path.join(out, f"{mode}.safetensors"))
        return
    # a file rendezvous, new per run: a TCP port picked free beforehand can be taken by another
    # job (another test's ranks) before rank 0 binds it, and the ranks then wait on a stranger
    rendezvous = "file://" + os.path.join(out, f"rendezvous-{mode}-{os.getpid()}")
    torch.multiprocessing.spawn(worker, args=(mode, out, rendezvous), nprocs=WORLD, join=True)


def worker(rank, mode, out, rendezvous):
    from safetensors.torch import save_file

    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=WORLD)
    x, target = batch()
    rows = slice(rank * 4, rank * 4 + 4)  # each rank its half of the global batch
    model = Model(dora=mode.endswith("+dora"))
    if mode.startswith("ddp"):
        wrapped = nn.parallel.DistributedDataParallel(model)
        inner = wrapped.module
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in (model.lora, model.qlora, model.adapter):
            fully_shard(layer)
        wrapped = inner = fully_shard(model)
    grads = step(wrapped, x[rows], target[rows])
    grads = {n.removeprefix("module."): full(g) for n, g in grads.items()}
    params = {n: full(p.detach()) for n, p in inner.named_parameters() if p.requires_grad}
    peft_ops.save_peft_adapter(inner, os.path.join(out, f"peft_{mode}"))  # every rank calls; rank 0 writes
    if rank == 0:
        save_file({**{"grad." + k: v.contiguous() for k, v in grads.items()},
                   **{"param." + k: v.contiguous() for k, v in params.items()}},
                  os.path.join(out, f"{mode}.safetensors"))
    dist.barrier()  # no rank leaves while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
