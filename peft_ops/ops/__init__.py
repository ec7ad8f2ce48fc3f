"""The ops: argument checks, the autograd Functions and the two paths behind them (the
Triton kernels' launchers and the PyTorch path), and their ``torch.library`` custom ops for
``torch.compile``. Imports only ``peft_ops.kernels`` and the modules beside it."""
