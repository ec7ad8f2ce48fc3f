"""Run as a script: FSDP-QLoRA on CPU processes (gloo, loopback). A model of NF4 layers (QLoRA,
QDoRA) and a dense LoRA layer, 256/512 wide so that every NF4 weight splits into 2 or 4 row
shards of whole 256-block scale groups.

    python fsdp_qlora_worker.py single OUT          # one process, the global batch
    python fsdp_qlora_worker.py fsdp WORLD OUT PORT  # WORLD ranks, each its share of the batch

`single` writes OUT/single.safetensors (gradients, updated adapters, the NF4 tensors) and the
base checkpoints the ranks load: OUT/dense.safetensors (the float weights, as a Hugging Face
checkpoint holds them) and OUT/bnb.safetensors (the NF4 weights in bitsandbytes' serialized
layout). `fsdp` writes OUT/fsdp{WORLD}.safetensors (the same tensors, gathered) and
OUT/fsdp{WORLD}.rank{R}.json per rank: the NF4 bytes it holds, its DCP round trip, and the
loading runs (bytes equal, peak memory).
"""

import json
import os
import resource
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

import peft_ops

BATCH = 8
LOADING_LAYERS = 6  # the model the loading test builds: 6 layers of 1024 × 2048 fp32 (48 MiB dense)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q1 = peft_ops.QLoraLinear.from_linear(nn.Linear(256, 512), r=4, lora_alpha=8)
        self.q2 = peft_ops.QLoraLinear.from_linear(nn.Linear(512, 256), r=4, lora_alpha=8, use_dora=True)
        self.lora = peft_ops.LoraLinear.from_linear(nn.Linear(256, 256), r=4, lora_alpha=8)
        with torch.no_grad():  # past the zero init, so every gradient is nonzero
            for layer in (self.q1, self.q2, self.lora):
                layer.lora_B.normal_(0, 0.1)
            self.q2.lora_magnitude_vector.mul_(1.1)

    def forward(self, x):
        return self.lora(torch.relu(self.q2(torch.relu(self.q1(x)))))


def batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 256, generator=gen), torch.randn(BATCH, 256, generator=gen)


def step(model, x, target):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = (model(x) - target).square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    opt.step()
    return grads


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def nf4_state(model):
    """Every NF4 tensor of the model, whole (gathered from the shards)."""
    return {f"nf4.{k}": full(v).clone() for k, v in model.state_dict().items() if ".qweight." in k}


def loading_model(device="cpu"):
    """Layers of QLoRA over 1024 → 2048 weights, and a frozen dense 2048 → 3 head whose 3 rows FSDP2
    shards unevenly, on `device` (meta: nothing allocated)."""
    with torch.device(device):
        layers = nn.Sequential(*[nn.Linear(2048, 1024, bias=False) for _ in range(LOADING_LAYERS)],
                               nn.Linear(2048, 3))
    return peft_ops.apply_lora(layers, [str(i) for i in range(LOADING_LAYERS)], r=4, quantize="nf4")


def head():
    gen = torch.Generator().manual_seed(8)
    return {f"{LOADING_LAYERS}.weight": torch.randn(3, 2048, generator=gen),
            f"{LOADING_LAYERS}.bias": torch.randn(3, generator=gen)}


def single(out):
    from safetensors.torch import save_file

    model = Model()
    nf4 = nf4_state(model)
    grads = step(model, *batch())
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    save_file({**{"grad." + k: v for k, v in grads.items()}, **{"param." + k: v for k, v in params.items()},
               **nf4}, os.path.join(out, "single.safetensors"))
    # base checkpoints for loading: dense floats, and bitsandbytes' serialized 4-bit layout
    torch.manual_seed(2)
    dense = {f"{i}.weight": torch.randn(1024, 2048) * 0.02 for i in range(LOADING_LAYERS)}
    save_file(dense | head(), os.path.join(out, "dense.safetensors"))
    bnb, expected = {}, {}
    for key, weight in dense.items():
        q = peft_ops.nf4.quantize(weight)
        packed, fields = q.to_bnb()
        meta = dict(quant_type="nf4", blocksize=q.blocksize, dtype="float32", shape=list(q.shape),
                    nested_blocksize=256, nested_dtype="float32", nested_offset=q.absmax_offset.item())
        bnb.update({key: packed, key + ".absmax": q.absmax, key + ".quant_map": fields["code"].clone(),
                    key + ".nested_absmax": q.absmax_scale, key + ".nested_quant_map": fields["state2"]["code"].clone(),
                    key + ".quant_state.bitsandbytes__nf4": torch.tensor(list(json.dumps(meta).encode()),
                                                                         dtype=torch.uint8)})
        layer = key.split(".")[0]
        expected.update({f"{layer}.qweight.{n}": t for n, t in q.state_dict().items()})
    save_file(bnb | head(), os.path.join(out, "bnb.safetensors"))
    save_file(expected, os.path.join(out, "expected_nf4.safetensors"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def load_run(out, source, fully_shard):
    """Build the loading model on meta, shard it, allocate this rank's part, load `source`:
    (whole NF4 tensors, peak RSS growth during the load in bytes)."""
    model = peft_ops.prepare_fsdp(loading_model("meta"))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device="cpu")
    before = rss_bytes()
    peft_ops.load_base_weights(model, os.path.join(out, source))
    # the process's high-water mark over its resident size before the load: an upper bound of
    # what loading added at its peak (an earlier, higher peak only makes it larger)
    peak_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    dense = {f"{LOADING_LAYERS}.{n}": full(p.detach()) for n, p in model[LOADING_LAYERS].named_parameters()}
    return {k.removeprefix("nf4."): v for k, v in nf4_state(model).items()}, peak_growth, dense


def worker(rank, world, out, rendezvous):
    from safetensors.torch import load_file, save_file
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    report = {}
    # loading first, while this process's peak memory is still low
    expected = load_file(os.path.join(out, "expected_nf4.safetensors"))
    for source in ("dense.safetensors", "bnb.safetensors"):
        got, peak_growth, dense = load_run(out, source, fully_shard)
        report[source] = {"equal": sorted(got) == sorted(expected) and all(torch.equal(got[k], expected[k])
                                                                          for k in expected),
                          "dense_equal": all(torch.equal(v, head()[k]) for k, v in dense.items()) and len(dense) == 2,
                          "peak_growth_bytes": peak_growth}
    report["dense_model_bytes"] = LOADING_LAYERS * 1024 * 2048 * 4

    x, target = batch()
    share = BATCH // world
    rows = slice(rank * share, (rank + 1) * share)
    model = Model()
    whole_bytes = {n: w.nbytes for n, w in peft_ops.peft.fsdp.nf4_weights(model).items()}
    peft_ops.prepare_fsdp(model)
    for layer in (model.q1, model.q2, model.lora):
        fully_shard(layer)
    fully_shard(model)
    weights = peft_ops.peft.fsdp.nf4_weights(model)
    report["nf4_bytes"] = {n: {"whole": whole_bytes[n], "here": w.nbytes,
                               "tensors": {k: t.numel() * t.element_size() for k, t in w.local_tensors().items()}}
                           for n, w in weights.items()}
    grads = step(model, x[rows], target[rows])
    grads = {n: full(g) for n, g in grads.items()}
    params = {n: full(p.detach()) for n, p in model.named_parameters() if p.requires_grad}
    nf4 = nf4_state(model)

    # a distributed checkpoint of the whole sharded model, NF4 included, round-trips bit for bit
    ckpt = os.path.join(out, f"dcp{world}")
    state = model.state_dict()
    output = model(x[rows]).detach()
    peft_ops.save_sharded_checkpoint(model, ckpt)
    before = {k: v._local_tensor.clone() if hasattr(v, "_local_tensor") else v.clone() for k, v in state.items()}
    with torch.no_grad():  # every value lost but the NF4 weights' format (which the load checks first)
        for k, v in state.items():
            if not k.endswith(".quant_meta"):
                (v._local_tensor if hasattr(v, "_local_tensor") else v).zero_()
    peft_ops.load_sharded_checkpoint(model, ckpt)
    after = {k: v._local_tensor if hasattr(v, "_local_tensor") else v for k, v in model.state_dict().items()}
    report["dcp_keys"] = sorted(before)
    report["dcp_equal"] = all(torch.equal(before[k], after[k]) for k in before)
    report["dcp_forward_equal"] = bool(torch.equal(model(x[rows]).detach(), output))

    if world == 2:
        report["from_peft_bnb_equal"] = from_peft_bnb(x, fully_shard)
        ddp_grads, ddp_params = ddp_step(x[rows], target[rows])

    with open(os.path.join(out, f"fsdp{world}.rank{rank}.json"), "w") as f:
        json.dump(report, f)
    if rank == 0:
        save_file({**{"grad." + k: v.contiguous() for k, v in grads.items()},
                   **{"param." + k: v.contiguous() for k, v in params.items()}, **nf4},
                  os.path.join(out, f"fsdp{world}.safetensors"))
    if world == 2 and rank == 0:
        save_file({**{"grad." + k: v.contiguous() for k, v in ddp_grads.items()},
                   **{"param." + k: v.contiguous() for k, v in ddp_params.items()}},
                  os.path.join(out, "ddp2.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


def ddp_step(x, target):
    """The same model with its NF4 weights in parameter storage, under DDP: one step (on the
    PyTorch path: the FSDP2 step of this run already drove the kernels)."""
    model = peft_ops.prepare_fsdp(Model())
    wrapped = nn.parallel.DistributedDataParallel(model)
    with peft_ops.use_backend("torch"):
        grads = {n.removeprefix("module."): g for n, g in step(wrapped, x, target).items()}
    return grads, {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def from_peft_bnb(x, fully_shard):
    """PEFT's LoRA over bitsandbytes' Linear4bit, swapped by from_peft, then sharded: the sharded
    model's output equals the unsharded one's bit for bit."""
    import copy

    import bitsandbytes as bnb
    import peft

    torch.manual_seed(3)
    dense = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256))
    model = nn.Sequential(*[bnb.nn.Linear4bit(m.in_features, m.out_features, compute_dtype=torch.float32,
                                              compress_statistics=True, quant_type="nf4") if isinstance(m, nn.Linear)
                            else m for m in dense])
    for index in (0, 2):
        model[index].weight = bnb.nn.Params4bit(dense[index].weight.data, requires_grad=False, quant_type="nf4",
                                                compress_statistics=True)._quantize("cpu")
        model[index].bias = nn.Parameter(dense[index].bias.data)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(target_modules=["0", "2"], r=4, lora_alpha=8))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    peft_ops.from_peft(peft_model)
    whole = copy.deepcopy(peft_model)
    expected = whole(x).detach()
    peft_ops.prepare_fsdp(peft_model)
    for layer in (peft_model.base_model.model[0], peft_model.base_model.model[2]):
        fully_shard(layer)
    fully_shard(peft_model)
    return bool(torch.equal(peft_model(x).detach(), expected))


def main():
    if sys.argv[1] == "single":
        single(sys.argv[2])
        return
    world, out = int(sys.argv[2]), sys.argv[3]
    # a file rendezvous, new per run (a TCP port picked free beforehand can be taken by another job)
    rendezvous = "file://" + os.path.join(out, f"rendezvous-{world}-{os.getpid()}")
    torch.multiprocessing.spawn(worker, args=(world, out, rendezvous), nprocs=world, join=True)


if __name__ == "__main__":
    main()
