"""Triton kernels and their launchers, shipped as ``peft_ops.kernels``.

Import this only where kernels will run: ``@triton.jit`` reads ``TRITON_INTERPRET`` when the
kernels are decorated, i.e. when a kernel module is first imported.
"""
