"""Train LoRA with Hugging Face's ``transformers.Trainer`` on our layers, then save the adapter
in PEFT's format and load it back with ``peft.PeftModel.from_pretrained``.

    python examples/train_with_trainer.py               # ~30 s on 2 CPU cores
    python examples/train_with_trainer.py --steps 4     # a smoke run

The model is a small Llama built from a config (no download); the task is synthetic: each token
is (5·previous + 3) mod the vocabulary. The LoRA settings come from a ``peft.LoraConfig`` when
peft is installed (``apply_lora(model, config)``), else from keyword arguments; nothing else in
the training script changes — the Trainer sees an ordinary model whose only trainable
parameters are the adapters.
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch
import transformers

import peft_ops

VOCAB = 128


def base_model() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      initializer_range=0.15, bos_token_id=None, eos_token_id=None)
    return transformers.LlamaForCausalLM(config)


class RuleDataset(torch.utils.data.Dataset):
    """Sequences that follow one next-token rule, from random first tokens."""

    def __init__(self, rows: int, length: int = 24, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        tokens = [torch.randint(0, VOCAB, (rows,), generator=gen)]
        for _ in range(length - 1):
            tokens.append((5 * tokens[-1] + 3) % VOCAB)
        self.ids = torch.stack(tokens, dim=1)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def lora_settings():
    """A peft.LoraConfig when peft is installed (what PEFT users already have), else the same
    settings as keyword arguments."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    try:
        import peft
    except ImportError:
        return dict(target_modules=targets, r=8, lora_alpha=16)
    return dict(target_modules=peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default=None, help="adapter folder (default: a temporary one)")
    args = parser.parse_args()

    base = base_model()
    model = peft_ops.apply_lora(copy.deepcopy(base), **lora_settings())
    print(peft_ops.trainable_summary(model))
    evaluation = RuleDataset(32, seed=1)
    with torch.no_grad():
        before = model(input_ids=evaluation.ids, labels=evaluation.ids).loss.item()

    out = args.out or tempfile.mkdtemp()
    training = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(), max_steps=args.steps, per_device_train_batch_size=16, learning_rate=3e-3,
        lr_scheduler_type="constant", logging_steps=max(1, args.steps // 4), save_strategy="no", report_to=[],
        use_cpu=not torch.cuda.is_available(), seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=training, train_dataset=RuleDataset(512))
    trainer.train()

    model.eval()
    with torch.no_grad():
        after = model(input_ids=evaluation.ids, labels=evaluation.ids).loss.item()
    print(f"eval loss {before:.4f} → {after:.4f} after {args.steps} Trainer steps")
    peft_ops.save_peft_adapter(model, out)
    print(f"saved PEFT adapter to {out}")

    try:
        import peft
    except ImportError:
        return
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base).to(model.device), out).eval()
    with torch.no_grad():
        ours = model(input_ids=evaluation.ids.to(model.device)).logits
        theirs = reloaded(input_ids=evaluation.ids.to(model.device)).logits
    difference = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    print(f"PeftModel.from_pretrained: logits within {difference:.1e} (relative) of ours")
    if not difference <= 1e-4:
        raise SystemExit(f"the reloaded adapter does not match ({difference:.2e})")


if __name__ == "__main__":
    main()
