"""Hugging Face PEFT's habits and files: target matching, applying and merging adapters on a
model, PEFT adapter folders both ways, swapping a PEFT model's layers, prompt learning."""
