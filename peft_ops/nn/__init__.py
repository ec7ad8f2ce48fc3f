"""Drop-in ``nn.Module`` layers over the ops: LoRA, QLoRA, the bottleneck adapter, prompt encoders."""
