"""Train 4 LoRA adapters of different ranks on 4 tasks in one run: every batch mixes the tasks'
samples, each sample through its own adapter (`peft_ops.mixed_adapter_batch`), so each layer
reads its base weight once for all 4 adapters. Then each adapter is trained again alone on its own
task, and the script shows the two give the same weights; each adapter is saved to its own PEFT
folder (`PeftModel.from_pretrained` loads it).

    python examples/train_multi_adapter.py --steps 5 --out adapters

The model is a small Llama built from a config (no download); the tasks are next-token rules.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import transformers

import peft_ops

TASKS = {"add3": (1, 3), "twice": (2, 0), "times5": (5, 1), "mirror": (-1, 0)}  # t → (a·t + b) mod 128
RANKS = {"add3": 4, "twice": 8, "times5": 16, "mirror": 8}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PER_TASK = 2  # samples of each task per batch


def base_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      initializer_range=0.15, bos_token_id=None, eos_token_id=None)
    return transformers.LlamaForCausalLM(config)


def build_model() -> torch.nn.Module:
    model = base_model()
    first, *others = TASKS
    peft_ops.apply_lora(model, TARGETS, r=RANKS[first], lora_alpha=16, adapter_name=first)
    for name in others:
        peft_ops.add_adapter(model, name, TARGETS, r=RANKS[name], lora_alpha=16)
    for name, param in model.named_parameters():  # every adapter trains (apply_lora: only the active one)
        param.requires_grad_("lora_" in name)
    return model.train()


def task_batch(task: str, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + list(TASKS).index(task))
    tokens = torch.randint(0, 128, (PER_TASK, 1), generator=gen)
    a, b = TASKS[task]
    for _ in range(15):
        tokens = torch.cat([tokens, (a * tokens[:, -1:] + b) % 128], dim=1)
    return tokens


def summed_loss(model, tokens, total_samples):
    logits = model(tokens).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")
    return loss / (total_samples * (tokens.shape[1] - 1))  # the mixed batch's mean, so both runs scale alike


def train_mixed(model, steps, lr):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    names = [task for task in TASKS for _ in range(PER_TASK)]  # sample i runs adapter names[i]
    for step in range(steps):
        tokens = torch.cat([task_batch(task, step) for task in TASKS])
        with peft_ops.mixed_adapter_batch(model, names):
            loss = summed_loss(model, tokens, len(names))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in (0, steps - 1):
            print(f"mixed step {step}: loss {loss.item():.3f}", flush=True)


def train_alone(model, task, steps, lr):
    peft_ops.set_adapter(model, task)
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    for step in range(steps):
        loss = summed_loss(model, task_batch(task, step), PER_TASK * len(TASKS))
        opt.zero_grad()
        loss.backward()
        opt.step()


def adapter_state(model, task):
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if "lora_" in n and (f"named_adapters.{task}." in n or ("named_adapters." not in n and task == "add3"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--out", default="adapters-multi")
    args = parser.parse_args()

    model = build_model()
    start = copy.deepcopy(model)
    train_mixed(model, args.steps, args.lr)
    for task in TASKS:
        alone = copy.deepcopy(start)
        train_alone(alone, task, args.steps, args.lr)
        mixed, single = adapter_state(model, task), adapter_state(alone, task)
        error = max(((mixed[n] - single[n]).abs().max() / single[n].abs().max()).item() for n in single)
        moved = max((mixed[n] - adapter_state(start, task)[n]).abs().max().item() for n in single)
        print(f"{task}: r={RANKS[task]}, {len(single)} tensors, mixed vs alone max relative difference {error:.2e} "
              f"(moved {moved:.3f})", flush=True)
        peft_ops.save_peft_adapter(model, args.out, adapter_name=task)  # PEFT's layout: <out>/<task>/
    print(f"saved {', '.join(os.path.join(args.out, task) for task in TASKS)}", flush=True)


if __name__ == "__main__":
    main()
