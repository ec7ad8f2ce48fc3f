"""The ops inside torch.compile: a model with LoraLinear, QLoraLinear and a BottleneckAdapter
compiles with fullgraph=True (no graph break) and gives eager's outputs and gradients, on the
PyTorch path (inductor) and on the interpreted kernels (aot_eager) here, natively in
tests/reliability/test_gpu.py; the custom ops pass torch.library.opcheck."""

import pytest
import torch
import torch.nn as nn

import peft_ops
from peft_ops.ops import custom_ops


class Model(nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        torch.manual_seed(0)
        self.lora = peft_ops.LoraLinear.from_linear(nn.Linear(32, 24), r=4, lora_dropout=dropout)
        self.qlora = peft_ops.QLoraLinear.from_linear(nn.Linear(24, 32), r=4, lora_dropout=dropout)
        self.base = peft_ops.nf4.quantize(torch.randn(32, 32) / 6)
        self.adapter = peft_ops.BottleneckAdapter(32, 8, "gelu", dropout=dropout)
        with torch.no_grad():
            for p in (self.lora.lora_B, self.qlora.lora_B, self.adapter.up_weight, self.adapter.up_bias):
                p.normal_(0, 0.3)

    def forward(self, x):
        h = self.qlora(torch.relu(self.lora(x)))
        return self.adapter(peft_ops.nf4_linear(h, self.base) + h)


def run(model, x):
    for p in model.parameters():
        p.grad = None
    x = x.detach().requires_grad_(True)
    y = model(x)
    y.square().mean().backward()
    return [y.detach(), x.grad] + [p.grad for p in model.parameters() if p.requires_grad]


@pytest.fixture(autouse=True)
def _torch_path():
    torch._dynamo.reset()
    with peft_ops.use_backend("torch"):
        yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_model_equals_eager(dtype):
    model = Model().to(dtype)
    x = torch.randn(2, 5, 32, dtype=dtype)
    eager = run(model, x)
    compiled = run(torch.compile(model, fullgraph=True), x)  # fullgraph: a graph break is an error
    for a, b in zip(eager, compiled):
        assert a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreted kernels (GPU: tests/reliability/test_gpu.py)")
def test_compiled_model_on_the_kernels_equals_eager():
    """The kernel path traces without a graph break too, the kernel loader's import included
    (Dynamo and AOT autograd; the kernels run in the interpreter through the custom ops)."""
    model = Model()
    x = torch.randn(2, 5, 32)
    with peft_ops.use_backend("triton"):
        compiled = run(torch.compile(model, fullgraph=True, backend="aot_eager"), x)
        eager = run(model, x)
    for a, b in zip(eager, compiled):
        assert a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-6, atol=0)


def test_compiled_dropout_runs_in_one_graph_and_is_reproducible():
    model = Model(dropout=0.3).train()
    x = torch.randn(6, 32)
    compiled = torch.compile(model, fullgraph=True)
    torch.manual_seed(1)
    first = run(compiled, x)
    torch.manual_seed(1)
    again = run(compiled, x)
    assert all(torch.isfinite(t).all() for t in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    model.eval()  # no dropout: back to eager's numbers
    assert all(torch.allclose(a, b, rtol=1e-6, atol=0) for a, b in zip(run(model, x), run(compiled, x)))


def _opcheck_cases():
    gen = torch.Generator().manual_seed(0)
    x, W = torch.randn(5, 16, generator=gen), torch.randn(12, 16, generator=gen)
    A, B = torch.randn(4, 16, generator=gen), torch.randn(12, 4, generator=gen)
    xa, dy, seed = torch.randn(5, 4, generator=gen), torch.randn(5, 12, generator=gen), torch.tensor(12345)
    q = tuple(peft_ops.nf4.quantize(W).tensors())
    wd, wu, h = torch.randn(4, 16, generator=gen), torch.randn(16, 4, generator=gen), torch.randn(5, 4, generator=gen)
    dy16 = torch.randn(5, 16, generator=gen)
    keep = torch.randint(-2**31, 2**31, (5, 1), generator=gen, dtype=torch.int64).to(torch.int32)  # 16 columns
    return {
        "lora_shrink": (custom_ops.lora_shrink, (x, A, 0.2, seed, "torch")),
        "lora_forward": (custom_ops.lora_forward, (x, W, xa, B, 0.5, None, "torch")),
        "lora_backward": (custom_ops.lora_backward, (dy, x, W, A, B, xa, keep, 0.5, 0.2, True, True, False, True,
                                                        "torch")),
        "nf4_forward": (custom_ops.nf4_forward, (x, *q, xa, B, 0.5, None, "torch")),
        "nf4_backward_dx": (custom_ops.nf4_backward_dx, (dy, *q, "torch")),
        "qlora_backward": (custom_ops.qlora_backward,
                           (dy, x, *q, A, B, xa, None, 0.5, 0.0, True, False, True, False, "torch")),
        "bottleneck_forward": (custom_ops.bottleneck_forward,
                               (x, wd, None, wu, None, "silu", 0.5, 0.1, seed, True, "torch")),
        "bottleneck_backward": (custom_ops.bottleneck_backward, (dy16, x, h, wd, wu, "silu", 0.5, 0.1, seed, True, True,
                                                        "torch")),
    }


@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_custom_ops_pass_opcheck(name):
    op, args = _opcheck_cases()[name]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


class DoraModel(nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        torch.manual_seed(0)
        self.dora = peft_ops.LoraLinear.from_linear(nn.Linear(32, 24), r=4, lora_dropout=dropout, use_dora=True)
        self.qdora = peft_ops.QLoraLinear.from_linear(nn.Linear(24, 32), r=4, lora_dropout=dropout, use_dora=True)
        with torch.no_grad():
            for layer in (self.dora, self.qdora):
                layer.lora_B.normal_(0, 0.3)
                layer.lora_magnitude_vector.mul_(1.2)

    def forward(self, x):
        return self.qdora(torch.relu(self.dora(x)))


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_compiled_dora_equals_eager(path):
    """DoRA and QDoRA layers compile with fullgraph=True (‖W‖² computed in the graph there) and
    give eager's outputs and gradients, on the PyTorch path (inductor) and the interpreted
    kernels (aot_eager)."""
    if path == "triton" and torch.cuda.is_available():
        pytest.skip("interpreted kernels (GPU: tests/reliability/test_gpu.py)")
    model = DoraModel()
    x = torch.randn(2, 5, 32)
    with peft_ops.use_backend(path):
        eager = run(model, x)
        compiled = run(torch.compile(model, fullgraph=True, backend="inductor" if path == "torch" else "aot_eager"), x)
    for a, b in zip(eager, compiled):
        assert a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def _dora_opcheck_cases():
    gen = torch.Generator().manual_seed(0)
    x, W = torch.randn(5, 16, generator=gen), torch.randn(12, 16, generator=gen)
    A, B = torch.randn(4, 16, generator=gen), torch.randn(12, 4, generator=gen)
    m, sq = torch.rand(12, generator=gen) + 0.5, W.square().sum(1)
    xa, dy = torch.randn(5, 4, generator=gen), torch.randn(5, 12, generator=gen)
    pre, c, norm = torch.randn(5, 12, generator=gen), torch.rand(12, generator=gen), torch.rand(12, generator=gen) + 1
    q = tuple(peft_ops.nf4.quantize(W).tensors())
    keep = torch.randint(-2**31, 2**31, (5, 1), generator=gen, dtype=torch.int64).to(torch.int32)  # 16 columns
    return {
        "dora_norm": (custom_ops.dora_norm, (W, A, B, m, 0.5, sq, "torch")),
        "dora_forward": (custom_ops.dora_forward, (x, W, xa, keep, B, 0.5, None, c, 0.2, "torch")),
        "dora_backward": (custom_ops.dora_backward, (dy, x, W, A, B, xa, keep, pre, c, norm, 0.5, 0.2, True, True,
                                                     False, True, True, "torch")),
        "qdora_norm": (custom_ops.qdora_norm, (*q, A, B, m, 0.5, sq, torch.float32, "torch")),
        "qdora_forward": (custom_ops.qdora_forward, (x, *q, xa, None, B, 0.5, None, c, 0.0, "torch")),
        "qdora_backward": (custom_ops.qdora_backward, (dy, x, *q, A, B, xa, None, pre, c, norm, 0.5, 0.0, True, False,
                                                       True, True, False, "torch")),
    }


@pytest.mark.parametrize("name", list(_dora_opcheck_cases()))
def test_dora_custom_ops_pass_opcheck(name):
    op, args = _dora_opcheck_cases()[name]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


class EmbeddingModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = peft_ops.LoraEmbedding.from_embedding(nn.Embedding(40, 32, padding_idx=0), r=4)
        self.lora = peft_ops.LoraLinear.from_linear(nn.Linear(32, 24), r=4)
        with torch.no_grad():
            self.embed.lora_embedding_A.normal_()
            self.lora.lora_B.normal_(0, 0.3)

    def forward(self, ids):
        return self.lora(self.embed(ids))


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_compiled_embedding_lora_equals_eager(path):
    """LoraEmbedding compiles with fullgraph=True (its ids range check left to eager calls) and
    gives eager's outputs and adapter gradients, padding and repeated ids included."""
    if path == "triton" and torch.cuda.is_available():
        pytest.skip("interpreted kernels (GPU: tests/reliability/test_gpu.py)")
    model = EmbeddingModel()
    ids = torch.tensor([[0, 5, 5, 39, 5], [1, 2, 3, 0, 7]])

    def run_ids(m):
        for p in model.parameters():
            p.grad = None
        y = m(ids)
        y.square().mean().backward()
        return [y.detach()] + [p.grad for p in model.parameters() if p.requires_grad]

    with peft_ops.use_backend(path):
        eager = run_ids(model)
        compiled = run_ids(torch.compile(model, fullgraph=True, backend="inductor" if path == "torch" else "aot_eager"))
    for a, b in zip(eager, compiled):
        assert a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_embedding_custom_ops_pass_opcheck():
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([3, 1, 3, 0, 9])
    W, A, B = torch.randn(10, 12, generator=gen), torch.randn(4, 10, generator=gen), torch.randn(12, 4, generator=gen)
    xa, dy = torch.randn(5, 4, generator=gen), torch.randn(5, 12, generator=gen)
    for op, args in ((custom_ops.lora_embedding_forward, (ids, W, A, B, 0.5, "torch")),
                     (custom_ops.lora_embedding_backward, (dy, ids, A, B, xa, 0.5, 3, True, True, "torch")),
                     (custom_ops.lora_embedding_backward, (dy, ids, A, B, xa, 0.5, None, False, True, "torch"))):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.parametrize("backend", ["torch", "triton"], ids=["pytorch-path", "kernels"])
def test_mixed_adapter_batch_runs_in_a_compiled_model_at_a_graph_break(backend):
    """multi_lora_linear groups rows by their ids on the host (data-dependent sizes), so inside
    torch.compile it runs eagerly at a graph break — on the PyTorch path and on the grouped
    kernels — with eager's outputs and gradients; fullgraph=True refuses it, naming the reason."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 32, generator=gen) / 4
    lora_As = [(torch.randn(r, 32, generator=gen) / 4).requires_grad_() for r in (4, 8)]
    lora_Bs = [(torch.randn(24, r, generator=gen) / 4).requires_grad_() for r in (4, 8)]
    ids = torch.tensor([0, 1, -1, 1, 0, 0])

    def step(x):
        return torch.relu(peft_ops.multi_lora_linear(x * 2, weight, lora_As, lora_Bs, [2.0, 1.0], ids)).sum()

    def grads(fn, x):
        x = x.detach().requires_grad_()
        out = fn(x)
        return [out.detach(), *torch.autograd.grad(out, [x, *lora_As, *lora_Bs])]

    x = torch.randn(6, 32, generator=gen)
    with peft_ops.use_backend(backend):
        eager = grads(step, x)
        compiled = grads(torch.compile(step, backend="aot_eager"), x)
        torch._dynamo.reset()
        with pytest.raises(Exception, match="data-dependent"):  # the ids' range, checked on the host
            torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    for a, b in zip(eager, compiled):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
