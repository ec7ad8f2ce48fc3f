"""Fine-tune a small causal LM four ways — LoRA, QLoRA, bottleneck adapters, prompt tuning —
and print, for each: trainable share, loss before/after, step time, adapter file size versus
the full model's.

    python examples/finetune.py              # ~1 minute on 2 CPU cores
    python examples/finetune.py --steps 3    # a smoke run

The model is a 4-layer Llama built from a config (no download); the task is synthetic: every
sequence follows a fixed next-token rule the frozen model does not know. On a CPU-only
machine the ops run their PyTorch path; on a GPU, the Triton kernels.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import transformers
from safetensors.torch import save_file

import peft_ops

VOCAB = 128


def base_model(device) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      # wide random weights stand in for pretraining: a frozen model
                                      # at the usual 0.02 init barely moves its logits for any prompt
                                      initializer_range=0.15, bos_token_id=None, eos_token_id=None)
    return transformers.LlamaForCausalLM(config).to(device)


def task_batch(gen, rows=16, length=32, device="cpu") -> torch.Tensor:
    """Sequences where each token is (5·previous + 3) mod VOCAB, from a random first token."""
    tokens = [torch.randint(0, VOCAB, (rows,), generator=gen)]
    for _ in range(length - 1):
        tokens.append((5 * tokens[-1] + 3) % VOCAB)
    return torch.stack(tokens, dim=1).to(device)


def folder_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def prepare(method: str, model):
    """(model to train, learning rate, function that saves its adapter to a folder)."""
    if method == "LoRA":
        model = peft_ops.apply_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"], r=8, lora_alpha=16)
        return model, 5e-3, lambda path: peft_ops.save_peft_adapter(model, path)
    if method == "QLoRA":
        model = peft_ops.apply_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"], r=8, lora_alpha=16, quantize="nf4")
        return model, 5e-3, lambda path: peft_ops.save_peft_adapter(model, path)
    if method == "adapters (Houlsby)":
        model = peft_ops.apply_adapters(model, ["self_attn", "mlp"], bottleneck_size=32, activation="gelu")

        def save(path):  # no PEFT format for bottleneck adapters: their parameters, in safetensors
            os.makedirs(path, exist_ok=True)
            params = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            save_file(params, os.path.join(path, "adapters.safetensors"))
        return model, 2e-2, save
    wrapped = peft_ops.apply_prompt_learning(model, "prompt_tuning", num_virtual_tokens=16, init="vocab")
    return wrapped, 0.3, lambda path: peft_ops.save_prompt_learning(wrapped, path)


def run(method: str, steps: int, device) -> dict:
    base = base_model(device)
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.contiguous() for k, v in base.state_dict().items()}, os.path.join(tmp, "model.safetensors"))
        full_bytes = os.path.getsize(os.path.join(tmp, "model.safetensors"))
    model, lr, save = prepare(method, base)
    trainable, total = peft_ops.trainable_parameters(model)
    gen = torch.Generator().manual_seed(1)
    held_out = task_batch(torch.Generator().manual_seed(99), device=device)

    def eval_loss():
        model.eval()
        with torch.no_grad():
            loss = model(held_out, labels=held_out).loss.item()
        model.train()
        return loss

    before = eval_loss()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    step_ms = []
    model.train()
    for _ in range(steps):
        batch = task_batch(gen, device=device)
        start = time.perf_counter()
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_ms.append((time.perf_counter() - start) * 1e3)
    after = eval_loss()
    with tempfile.TemporaryDirectory() as tmp:
        save(tmp)
        adapter_bytes = folder_bytes(tmp)
    return {"method": method, "trainable": trainable, "total": total, "before": before, "after": after,
            "step_ms": statistics.median(step_ms), "adapter_bytes": adapter_bytes, "full_bytes": full_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps per method")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"4-layer Llama (hidden 128, vocab {VOCAB}) on {device.type}; {args.steps} AdamW steps of 16×32 tokens each")
    header = f"{'method':20s} {'trainable':>18s} {'loss before → after':>22s} {'step ms':>8s} {'adapter file':>22s}"
    print(header)
    for method in ("LoRA", "QLoRA", "adapters (Houlsby)", "prompt tuning"):
        r = run(method, args.steps, device)
        share = f"{r['trainable']:,} ({100 * r['trainable'] / r['total']:.2f} %)"
        size = f"{r['adapter_bytes'] / 1024:.0f} KiB ({100 * r['adapter_bytes'] / r['full_bytes']:.1f} %)"
        print(f"{method:20s} {share:>18s} {r['before']:>10.3f} → {r['after']:<9.3f} {r['step_ms']:>8.1f} {size:>22s}",
              flush=True)
    print("adapter file: its size as a share of the full model's safetensors file")


if __name__ == "__main__":
    main()
