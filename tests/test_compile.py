"""dsan.compile: torch.compile with the inductor options a model asks for (DSAN: no layout optimization)."""
import re

import pytest
import timm
import torch
import torch.nn as nn
from conftest import requires_cpp
from torch._inductor.utils import run_and_get_code

from dsan.compile import compile_kwargs, model_inductor_options
from dsan.models import DSAN
from dsan.models.dsan import Mlp, PointwiseConv2d

SMALL = dict(depths=(1, 1, 1, 1))


def test_compile_kwargs_merges_the_models_options():
    model = DSAN(depths=(1, 1, 1, 1))
    assert model_inductor_options(model) == {'layout_optimization': False}
    assert compile_kwargs(model) == {'options': {'layout_optimization': False}}
    # Passed options win over the model's; a mode becomes its options (torch.compile takes one or the other).
    kw = compile_kwargs(model, backend='inductor', mode='max-autotune', options={'layout_optimization': True})
    assert 'mode' not in kw and kw['backend'] == 'inductor'
    assert kw['options'] == {**torch._inductor.list_mode_options('max-autotune'), 'layout_optimization': True}
    assert compile_kwargs(model, mode=None)['options'] == {'layout_optimization': False}
    # Wrappers are looked through: DataParallel-style `.module`, an already compiled module's `._orig_mod`.
    wrapper = nn.Module()
    wrapper.module = model
    assert model_inductor_options(wrapper) == {'layout_optimization': False}
    assert model_inductor_options(torch.compile(model, backend='eager')) == {'layout_optimization': False}
    features = timm.create_model('dsan_t', features_only=True, **SMALL)
    assert model_inductor_options(features) == {'layout_optimization': False}
    # The class attribute is never handed out to be mutated.
    model_inductor_options(model)['layout_optimization'] = True
    assert DSAN.inductor_options == {'layout_optimization': False}


def test_compile_kwargs_leaves_other_models_and_backends_alone():
    peer = timm.create_model('resnet10t')
    assert compile_kwargs(peer, backend='inductor', mode='max-autotune') == {'backend': 'inductor',
                                                                             'mode': 'max-autotune'}
    assert compile_kwargs(DSAN(depths=(1, 1, 1, 1)), backend='aot_eager', mode='default') == {
        'backend': 'aot_eager', 'mode': 'default'}
    bad = nn.Linear(2, 2)
    bad.inductor_options = ['layout_optimization']
    with pytest.raises(TypeError, match=r'Linear.inductor_options must be a dict; got list'):
        compile_kwargs(bad)


def _dscn_copy_kernels(code: str) -> list[str]:
    # Inductor names a generated kernel after the ops whose values it computes; the DSCN ops run as extern
    # (fallback) kernels, so a generated kernel named after one of them only moves that op's input or output around.
    return sorted(set(re.findall(r'\bcpp_fused_\w*dscn\w*', code)))


@requires_cpp
@pytest.mark.slow
def test_inductor_training_graph_has_no_copies_around_the_dscn_ops():
    """A compiled training step (forward and backward graphs): with DSAN's options inductor writes no kernel that
    copies a DSCN op's (N, H, W, C) input, offsets or gradients, while a plain torch.compile does (the layout
    optimization's channels-last rule). Both give eager's gradients."""
    torch.manual_seed(0)
    model = timm.create_model('dsan_t', backend='cpp', num_classes=10, **SMALL).to(memory_format=torch.channels_last)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    target = torch.randn(2, 10)

    def step(fn):
        model.load_state_dict(state)
        model.zero_grad()
        (fn(x) * target).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    expected = step(model)
    codes = {}
    for name, kwargs in (('model options', compile_kwargs(model)), ('plain', {})):
        torch._dynamo.reset()
        grads, code = run_and_get_code(step, torch.compile(model, **kwargs))
        torch._dynamo.reset()
        code = '\n'.join(code)
        assert len(re.findall(r'torch\.ops\.ops_dscn\._dscn_backward\.default\(', code)) == 8, name  # fwd and bwd
        codes[name] = _dscn_copy_kernels(code)
        for n in expected:
            torch.testing.assert_close(grads[n], expected[n], rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f'{n}: {m}')
    assert codes['model options'] == []
    # The check above can see the copies: torch 2.14's inductor makes them without the options.
    assert codes['plain'], 'plain torch.compile no longer copies around the DSCN ops: review DSAN.inductor_options'


@requires_cpp
def test_compiled_gelu_is_the_op_where_a_gradient_flows(monkeypatch):
    """Under torch.compile a GELU that a gradient flows through stays ``ops_dscn.gelu`` (faster than inductor's GELU
    kernels in a training step); without one (no_grad, frozen parameters) it is ``F.gelu``, left to inductor."""
    torch.manual_seed(0)
    model = timm.create_model('dsan_t', backend='cpp', num_classes=10, **SMALL).train()
    x = torch.randn(2, 3, 64, 64)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def gelus(run):
        graphs.clear()
        torch._dynamo.reset()
        out = run(torch.compile(model, backend=capture))
        torch._dynamo.reset()
        targets = [n.target for g in graphs for n in g.graph.nodes if n.op == 'call_function']
        return out, (sum(t in (torch.ops.ops_dscn.gelu, torch.ops.ops_dscn.gelu.default) for t in targets),
                     sum(t is torch.nn.functional.gelu for t in targets))

    # 64x64 input: every map is below the fused MLP's training size, so 4 attention and 4 MLP GELUs run as layers.
    out, counts = gelus(lambda fn: fn(x))
    assert counts == (8, 0)
    out.sum().backward()  # the op's registered backward runs under the compiled forward
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # Without gradients the attention's GELU joins its conv's kernel and the MLPs are fused: the layers are asked for.
    monkeypatch.setattr(PointwiseConv2d, 'fused_epilogue', False)
    for m in model.modules():
        if isinstance(m, Mlp):
            m.fused_kernel = False
    with torch.no_grad():
        _, counts = gelus(lambda fn: fn(x))
    assert counts == (0, 8)
    model.requires_grad_(False)
    _, counts = gelus(lambda fn: fn(x))
    assert counts == (0, 8)


def test_module_compile_uses_the_models_options(monkeypatch):
    """`DSAN.compile()` (nn.Module's in-place compile) passes the model's options on to torch.compile."""
    seen = []
    real_compile = torch.compile

    def spy(fn, **kwargs):
        seen.append(kwargs)
        return real_compile(fn, backend='eager')

    monkeypatch.setattr(torch, 'compile', spy)
    model = DSAN(depths=(1, 1, 1, 1), num_classes=4).eval()
    model.compile(mode='max-autotune-no-cudagraphs')
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model._call_impl(x))
    assert seen == [{'options': {**torch._inductor.list_mode_options('max-autotune-no-cudagraphs'),
                                 'layout_optimization': False}}]
    torch._dynamo.reset()
