"""Inference fusion of DSAN (BatchNorms and layer scales folded into convolutions), in timm's convention."""
import io

import pytest
import timm
import timm.utils
import torch
import torch.nn as nn
from conftest import BACKEND

import ops_dscn
from dsan.models import DSAN, Block, OverlapPatchEmbed
from dsan.models.dsan import Mlp
from ops_dscn.modules import DSCNX

SMALL = dict(depths=(1, 1, 1, 1))


def randomize_fusables_(model: nn.Module, seed: int = 2) -> nn.Module:
    """Non-trivial values for everything the fusion folds, keeping the network well conditioned.

    BN running statistics (mean in [-0.5, 0.5], var in [0.3, 2]), BN weights (|w| in [0.5, 1.5], a fifth negative)
    and layer scales (|s| in [0.02, 0.2], a fifth negative) per channel, and every 1-D bias in [-0.2, 0.2] (the
    default init zeroes the conv biases, which would hide a wrong bias fold). Convolutions keep their random init.
    """
    g = torch.Generator().manual_seed(seed)

    def uniform(t, lo, hi):
        return (lo + (hi - lo) * torch.rand(t.shape, generator=g, dtype=torch.float64)).to(t)

    def signs(t):
        return torch.where(torch.rand(t.shape, generator=g) < 0.2, -1., 1.).to(t)

    with torch.no_grad():
        for name, t in model.named_buffers():
            if name.endswith('running_mean'):
                t.copy_(uniform(t, -0.5, 0.5))
            elif name.endswith('running_var'):
                t.copy_(uniform(t, 0.3, 2.))
        for name, p in model.named_parameters():
            if 'layer_scale' in name:
                p.copy_(uniform(p, 0.02, 0.2) * signs(p))
            elif name.endswith(('norm.weight', 'norm1.weight', 'norm2.weight')):
                p.copy_(uniform(p, 0.5, 1.5) * signs(p))
            elif p.dim() == 1 and name.endswith('bias'):
                p.copy_(uniform(p, -0.2, 0.2))
    return model


def make_model(dtype: torch.dtype = torch.float32, **kwargs) -> DSAN:
    """Eval-mode dsan_t (drop path on, identity in eval) with randomized BNs, layer scales and biases."""
    model = timm.create_model('dsan_t', backend=BACKEND, drop_path_rate=0.1, **kwargs)
    return randomize_fusables_(model).to(dtype).eval()


def batchnorms(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def outputs(model: DSAN, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = dict(logits=model(x), features=model.forward_features(x))
        final, inter = model.forward_intermediates(x, indices=[0, 1, 2, 3])
        out['final'] = final
        out.update({f'stage{i}': t for i, t in enumerate(inter)})
    return out


def test_fused_matches_unfused_float64():
    """Exact up to rounding: 1e-10 in float64, on logits, features and every stage output."""
    model = make_model(torch.float64)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    ref = outputs(model, x)
    fused = timm.utils.reparameterize_model(model)
    got = outputs(fused, x)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-10, msg=lambda m, k=k: f'{k}: {m}')
    # The output moved away from what a model without the folded terms would give.
    assert ref['logits'].abs().max() > 0.1


def test_fused_matches_unfused_float32():
    """1e-5 on the logits; the LayerNorm-ed stage outputs (up to ~6) to 1e-4, the size of their float32 noise."""
    model = make_model(torch.float32)
    x = torch.randn(2, 3, 64, 64)
    ref = outputs(model, x)
    model.reparameterize()  # in place
    got = outputs(model, x)
    torch.testing.assert_close(got['logits'], ref['logits'], rtol=1e-5, atol=1e-5)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-4, msg=lambda m, k=k: f'{k}: {m}')


def test_fused_model_structure_and_parameter_count():
    model = make_model()
    fused = timm.utils.reparameterize_model(model)  # deep copy: `model` is left as it was
    assert batchnorms(model) and not batchnorms(fused)
    assert not [n for n, m in fused.named_modules() if m.training]  # the Identity replacements are in eval mode too
    blocks = [m for m in fused.modules() if isinstance(m, Block)]
    assert len(blocks) == sum(fused.depths) and all(b.fused for b in blocks)
    assert all(b.attn.shortcut_scale.shape == (b.attn.proj_2.out_channels, 1, 1) for b in blocks)
    assert not any(m.fused for m in model.modules() if isinstance(m, Block))
    # Gone: per block 2 BNs (weight, bias) and 2 layer scales (6 C), per patch embedding one BN (2 C).
    removed = sum(6 * c * d + 2 * c for c, d in zip(fused.embed_dims, fused.depths))
    n_model = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in fused.parameters()) == n_model - removed
    keys = fused.state_dict().keys()
    assert not [k for k in keys if any(s in k for s in ('.norm1.', '.norm2.', '.layer_scale_', '.norm.'))]
    assert sum(k.endswith('attn.shortcut_scale') for k in keys) == sum(fused.depths)
    assert 'attn.shortcut_scale' not in ''.join(model.state_dict())  # unfused checkpoints keep the original names
    # The timm conventions still hold on the fused model.
    assert fused.feature_info == model.feature_info
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert fused.forward_features(x).shape == (1, 256, 2, 2)
        assert [t.shape[1] for t in fused.forward_intermediates(x, intermediates_only=True)] == fused.embed_dims


def test_reparameterize_twice_and_through_a_wrapper():
    """timm's walker calls DSAN.reparameterize on a wrapped model and then Block.reparameterize again: a no-op."""
    feats = timm.create_model('dsan_t', features_only=True, out_indices=(1, 3), backend=BACKEND, **SMALL)
    randomize_fusables_(feats).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        ref = feats(x)
        fused = timm.utils.reparameterize_model(feats)
        state = {k: v.clone() for k, v in fused.state_dict().items()}
        fused.model.reparameterize()
        timm.utils.reparameterize_model(fused, inplace=True)
        got = fused(x)
    assert not batchnorms(fused)
    assert fused.feature_info.channels() == [64, 256]
    for k, v in fused.state_dict().items():
        assert torch.equal(v, state[k]), k
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_reparameterized_model_holds_no_autograd_graph_and_copies():
    """Folded in place outside no_grad, the model's tensors are leaves: it deep-copies, saves and loads."""
    import copy
    import io
    model = make_model(**SMALL)
    model.reparameterize()
    assert all(t.grad_fn is None for t in [*model.parameters(), *model.buffers()])
    twin = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    twin.load_state_dict(torch.load(buffer))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)


def test_reset_classifier_keeps_the_model_mode_and_reparameterizes():
    """A classifier reset on an eval-mode model is in eval mode too (it used to be created in training mode, and
    reparameterize() then refused the model although model.training was False)."""
    model = make_model()
    x = torch.randn(2, 3, 64, 64)
    model.reset_classifier(5)
    assert not model.head.training and model.head.out_features == 5
    with torch.no_grad():
        before = model(x)
        timm.utils.reparameterize_model(model)
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    model.train().reset_classifier(3)
    assert model.head.training


def test_prune_intermediate_layers_keeps_the_requested_stages():
    model = make_model()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    assert model.prune_intermediate_layers([0, 1]) == [0, 1]
    assert model.num_stages == 2 and model.num_features == model.embed_dims[1] and model.num_classes == 0
    assert not any(hasattr(model, f'{part}{i}') for part in ('patch_embed', 'block', 'norm') for i in (3, 4))
    with torch.no_grad():
        got = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        # timm's convention: no head and no pooling left, the model returns the last kept stage's map
        torch.testing.assert_close(model(x), expected[1], rtol=0, atol=0)


def test_reparameterize_in_training_mode_raises():
    model = make_model().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r'DSAN\.reparameterize\(\) .* inference only: call \.eval\(\)'):
        model.reparameterize()
    with pytest.raises(RuntimeError, match=r'OverlapPatchEmbed\.reparameterize\(\) .* call \.eval\(\)'):
        timm.utils.reparameterize_model(model)
    with pytest.raises(RuntimeError, match=r'Block\.reparameterize\(\) .* call \.eval\(\)'):
        model.block1[0].reparameterize()
    model.eval()
    model.block1[0].norm1.train()  # one BatchNorm left in training mode is enough to refuse
    with pytest.raises(RuntimeError, match='inference only'):
        model.reparameterize()
    # Nothing was folded half-way.
    assert len(batchnorms(model)) == 2 * sum(model.depths) + model.num_stages
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_only_batchnorms_are_folded():
    embed = OverlapPatchEmbed(3, 2, 8, 16, norm_layer=lambda c: nn.GroupNorm(1, c)).eval()
    with pytest.raises(TypeError, match='Only BatchNorm2d / SyncBatchNorm can be folded'):
        embed.reparameterize()
    embed = OverlapPatchEmbed(3, 2, 8, 16, norm_layer=lambda c: nn.BatchNorm2d(c, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match='without running statistics'):
        embed.reparameterize()


def test_fused_model_exports():
    """torch.export of the fused model: no batch_norm in the graph, and the exported module gives the same output."""
    model = make_model(**SMALL)
    fused = timm.utils.reparameterize_model(model)
    x = torch.randn(2, 3, 64, 64)
    ep = torch.export.export(fused, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == 'call_function'}
    assert targets and not [t for t in targets if 'batch_norm' in t], targets
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(ep.module()(x), fused(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ep.module()(x), ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# The fused MLP kernel (ops_dscn.conv_mlp) in the model: where it runs and that it computes the same thing.

requires_mlp_kernel = pytest.mark.skipif(not ops_dscn.conv_mlp_available(torch.empty(0)),
                                         reason='ops_dscn built without the conv_mlp kernel')


class CountMlpKernel(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts calls of ops_dscn::conv_mlp under this mode."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.ops.ops_dscn.conv_mlp.default
        return func(*args, **(kwargs or {}))


def kernel_calls(model: nn.Module, x: torch.Tensor, grad: bool = False) -> int:
    with torch.set_grad_enabled(grad), CountMlpKernel() as counter:
        model(x)
    return counter.calls


@requires_mlp_kernel
def test_mlp_kernel_runs_where_it_applies(monkeypatch):
    model = make_model(**SMALL)
    x = torch.randn(1, 3, 64, 64)
    assert kernel_calls(model, x) == 4  # one MLP per block
    # With gradients needed the kernel serves maps of at least Mlp.fused_train_min_pixels (28x28) pixels only:
    assert kernel_calls(model, x, grad=True) == 0  # stage 1 is 16x16
    assert kernel_calls(model, torch.randn(1, 3, 112, 112), grad=True) == 1  # stage 1 is 28x28
    monkeypatch.setattr(Mlp, 'fused_train_min_pixels', 1)
    assert kernel_calls(model, x, grad=True) == 4
    assert kernel_calls(model.double(), x.double()) == 0  # float64 keeps the reference arithmetic
    assert kernel_calls(make_model(fused_mlp=False, **SMALL), x) == 0
    dropout = make_model(drop_rate=0.1, **SMALL).train()
    assert kernel_calls(dropout, x) == 0  # active dropout
    frozen = make_model(**SMALL).train().requires_grad_(False)
    assert kernel_calls(frozen, x, grad=True) == 4  # nothing needs a gradient, no dropout: the kernel serves


@requires_mlp_kernel
def test_mlp_kernel_trains_like_the_layers_one_by_one(monkeypatch):
    """A training step (train-mode BatchNorm, drop path) through the kernel's backward gives the gradients of the
    layer-by-layer model with the same weights, to float32 rounding."""
    monkeypatch.setattr(Mlp, 'fused_train_min_pixels', 1)  # the kernel in every stage
    torch.manual_seed(0)
    model, layers = make_model(**SMALL), make_model(fused_mlp=False, **SMALL)
    layers.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for m in (model, layers):
        m.train()
        torch.manual_seed(1)  # the same drop-path draws in both models
        with CountMlpKernel() as counter:
            torch.nn.functional.cross_entropy(m(x), torch.tensor([1, 7])).backward()
        grads.append((counter.calls, {k: p.grad for k, p in m.named_parameters()}))
    (calls, got), (no_calls, ref) = grads
    assert calls == 4 and no_calls == 0
    assert got.keys() == ref.keys()
    for k in ref:
        scale = ref[k].abs().max().item()
        # (the bias of a conv before a train-mode BatchNorm has a zero gradient up to rounding: the 1e-6 floor)
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5 * scale + 1e-6, msg=lambda m, k=k: f"{k}: {m}")


@requires_mlp_kernel
@pytest.mark.parametrize('fuse', [False, True], ids=['bn', 'reparameterized'])
def test_mlp_kernel_matches_the_layers_one_by_one(fuse):
    """Logits and stage outputs of the kernel path against the layer-by-layer path (fused_mlp=False), same weights;
    with `reparameterize` the block's residual add goes through the kernel too."""
    model, layers = make_model(), make_model(fused_mlp=False)
    layers.load_state_dict(model.state_dict())
    if fuse:
        model.reparameterize()
        layers.reparameterize()
    x = torch.randn(2, 3, 64, 64)
    assert kernel_calls(model, x) == sum(model.depths)
    got, ref = outputs(model, x), outputs(layers, x)
    torch.testing.assert_close(got['logits'], ref['logits'], rtol=1e-5, atol=1e-5)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-4, msg=lambda m, k=k: f'{k}: {m}')


@pytest.mark.parametrize('fuse', [False, True])
def test_export_with_dynamic_batch_and_size_serves_every_size(fuse):
    """The model picks kernels by batch and map size (the depthwise kernel up to 2 images, the 1x1 epilogues under
    compile up to 8, the training MLP kernel from 28x28 maps). Those choices used to become guards, so an export with
    dynamic batch, H and W refused batch 1 or 9, or maps over 784 pixels, or did not export at batch 2."""
    from torch.export import Dim
    model = make_model(**SMALL)
    if fuse:
        model = timm.utils.reparameterize_model(model)
    dims = {'x': {0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC}}
    with torch.no_grad():
        ep = torch.export.export(model, (torch.randn(2, 3, 64, 64),), dynamic_shapes=dims)
        for shape in ((1, 3, 64, 64), (9, 3, 64, 64), (3, 3, 160, 160), (2, 3, 71, 97)):
            x = torch.randn(shape)
            torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_compiled_model_settles_on_dynamic_shapes():
    """torch.compile (automatic dynamic shapes) over batches 1-9 and three image sizes: a few graphs, then none;
    before, each batch band and map size made its own graph until the recompile limit sent the rest to eager."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    model = make_model(**SMALL)
    compiled = torch.compile(model, backend='eager')
    graphs = []
    with torch.no_grad():
        for size in (64, 96, 128):
            for batch in (1, 2, 3, 9):
                before = counters['stats']['unique_graphs']
                x = torch.randn(batch, 3, size, size)
                torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
                graphs.append(counters['stats']['unique_graphs'] - before)
    assert sum(graphs) <= 6 and sum(graphs[-4:]) <= 1, str(graphs)  # batch 1 is specialised at each new size at most
    torch._dynamo.reset()


def test_jit_trace_sees_only_aten_operators():
    """Tracers (FLOP counters used directly, ONNX export) must see the layers: none of the ops_dscn kernels but the
    DSCN op itself may be recorded, in inference and in training mode."""
    model = make_model(**SMALL)
    x = torch.randn(1, 3, 64, 64)
    for grad in (False, True):
        # With gradients on, the depthwise convs' autograd Function had been recorded as prim::PythonOp: the trace
        # check failed, torch.jit.save refused it and torchprofile counted those layers 0.
        with torch.set_grad_enabled(grad):
            traced = torch.jit.trace(model, x)  # check_trace: two runs give the same graph
        kinds = {n.kind() for n in traced.inlined_graph.nodes()
                 if n.kind().startswith('ops_dscn::') or n.kind() == 'prim::PythonOp'}
        assert kinds <= {'ops_dscn::dscn'}, kinds
        with torch.no_grad():
            torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-5)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    model.train()
    traced = torch.jit.trace(model, x.repeat(2, 1, 1, 1), check_trace=False)
    assert not any(n.kind() == 'prim::PythonOp' for n in traced.inlined_graph.nodes())


@requires_mlp_kernel
def test_inference_export_keeps_the_mlp_kernel():
    """Exported under no_grad (an inference graph), the MLP kernel is in the graph and the program runs."""
    fused = timm.utils.reparameterize_model(make_model(**SMALL))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ep = torch.export.export(fused, (x,))
        targets = [n.target for n in ep.graph.nodes if n.op == 'call_function']
        assert targets.count(torch.ops.ops_dscn.conv_mlp.default) == 4
        torch.testing.assert_close(ep.module()(x), fused(x), rtol=1e-6, atol=1e-6)


def test_pointwise_conv_single_image_matmul_path():
    """A single channels_last image in float32 inference runs the 1x1 conv as F.linear (same result); batches,
    gradients, float64 and NCHW memory take nn.Conv2d's path."""
    from dsan.models.dsan import PointwiseConv2d
    torch.manual_seed(0)
    conv = PointwiseConv2d(16, 24, 1)
    ref = nn.Conv2d(16, 24, 1)
    ref.load_state_dict(conv.state_dict())
    seen = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    def path(x, grad=False):
        seen.clear()
        with torch.set_grad_enabled(grad), Spy():
            y = conv(x)
        torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
        return 'conv' if torch.ops.aten.convolution.default in seen else 'matmul'

    x = torch.randn(1, 16, 7, 9).contiguous(memory_format=torch.channels_last)
    assert path(x) == 'matmul'
    assert path(x, grad=True) == 'conv'  # the weight needs a gradient
    assert path(torch.cat([x, x])) == 'conv'
    assert path(x.contiguous()) == 'conv'
    conv.double(), ref.double()
    assert path(x.double()) == 'conv'


def count_calls(monkeypatch, owner, name: str) -> list:
    """Wraps `owner.name` so that each call is recorded (its arguments) in the returned list."""
    calls = []
    original = getattr(owner, name)

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return calls


def model_and_layers(cls: type, flag: str) -> tuple[DSAN, DSAN]:
    """Two small models with the same weights; in the second every `cls` module has `flag` off (its layers)."""
    model, layers = make_model(**SMALL), make_model(**SMALL)
    layers.load_state_dict(model.state_dict())
    for m in layers.modules():
        if isinstance(m, cls):
            setattr(m, flag, False)
    return model, layers


@pytest.mark.skipif(not ops_dscn.pointwise_conv_available(torch.empty(0)), reason='ops_dscn.pointwise_conv not built')
@pytest.mark.parametrize('fuse', [False, True], ids=['bn', 'reparameterized'])
def test_attention_epilogue_kernel_matches_the_layers_one_by_one(fuse, monkeypatch):
    """The attention's three 1x1 convs run as ops_dscn.pointwise_conv with their GELU, gate and (scaled) shortcut in
    float32 inference only, and the model's outputs equal the layer-by-layer ones (fused_epilogue=False)."""
    from dsan.models.dsan import PointwiseConv2d
    calls = count_calls(monkeypatch, ops_dscn, 'pointwise_conv')
    model, layers = model_and_layers(PointwiseConv2d, 'fused_epilogue')
    if fuse:
        model.reparameterize()
        layers.reparameterize()
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    ref = outputs(layers, x)
    assert not calls
    got = outputs(model, x)
    assert len(calls) == 3 * 4 * 3  # three per block, four blocks, three forwards in `outputs`
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f'{k}: {m}')
    calls.clear()
    model(x).sum().backward()  # gradients: the layers (autograd keeps their outputs)
    model.double()(x.double())  # float64: the reference arithmetic
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert model.float()(x).dtype == torch.bfloat16  # autocast: the layers, in autocast's dtypes
    assert not calls


def test_eval_blocks_fold_their_norms_on_the_fly_in_float32_inference(monkeypatch):
    """An eval-mode model that is not reparameterized computes, in CPU float32 inference, with the weights
    `reparameterize` would give (made once and kept, see the next test): equal to its layer-by-layer output, and
    used neither in training, nor under gradients, nor in float64, nor under torch.jit tracing."""
    calls = count_calls(monkeypatch, Block, '_folded_weights')
    model, layers = model_and_layers(Block, 'fold_in_inference')
    x = torch.randn(2, 3, 64, 64)
    ref = outputs(layers, x)
    assert not calls
    got = outputs(model, x)
    assert len(calls) == 4  # four blocks, made on the first of the three forwards in `outputs` and kept
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f'{k}: {m}')
    calls.clear()
    model(x).sum().backward()  # gradients reach the norms and layer scales
    assert model.block1[0].norm1.weight.grad is not None and model.block1[0].layer_scale_1.grad is not None
    with torch.no_grad():
        model.train()(x)  # batch statistics
        model.eval().double()(x.double())  # float64: the reference arithmetic
        torch.jit.trace(model.float(), x, check_trace=False)
    assert not calls


def test_kept_folded_weights_follow_every_change_of_their_sources(monkeypatch):
    """Eager eval keeps each block's folded (and packed) weights between calls, and makes them again after any change
    of what they come from: in-place updates (buffers and parameters), a replaced parameter, load_state_dict, a
    change through `.data` (no version counter sees it) once `eval()` is called again, a dtype round trip, fused
    optimizer steps (no version bump either). Copies and pickles leave them out. Each time the output equals the
    layer-by-layer model's with the same weights."""
    import copy
    import pickle

    calls = count_calls(monkeypatch, Block, '_folded_weights')
    model, layers = model_and_layers(Block, 'fold_in_inference')
    x = torch.randn(2, 3, 64, 64)
    block = model.block2[0]

    def check(expect_calls):
        calls.clear()
        layers.load_state_dict(model.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(model(x), layers(x), rtol=1e-5, atol=1e-5)
        assert len(calls) == expect_calls

    check(4)
    check(0)  # kept
    kept = block.__dict__['_kept_inference_weights']
    with torch.no_grad():
        block.norm1.running_var.mul_(1.5)
    check(1)
    assert block.__dict__['_kept_inference_weights'] is not kept
    with torch.no_grad():
        block.layer_scale_2.neg_()
        model.block4[0].mlp.fc2.bias.add_(0.5)
    check(2)
    block.attn.proj_1.weight = nn.Parameter(torch.randn_like(block.attn.proj_1.weight))
    check(1)
    with torch.no_grad():  # weights that are only packed, not folded
        block.attn.spatial_gating_unit.conv.weight.mul_(-1.5)
        model.block3[0].attn.spatial_gating_unit.dscn_x.input_proj.weight.mul_(0.5)
    check(2)
    model.load_state_dict(make_model(**SMALL).state_dict())
    check(4)
    block.mlp.fc1.weight.data.mul_(-1)  # invisible to version counters: taken up by the next eval()
    model.eval()
    check(4)
    model.double().float()
    check(4)
    # torch's fused optimizer step changes the weights without a version bump (frozen-BN fine-tuning in eval mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    for _ in range(2):
        model(x).logsumexp(1).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        check(4)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert not any('_kept_inference_weights' in m.__dict__ for m in clone.modules())
        with torch.no_grad():
            torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize('convert', ['double', 'bfloat16', 'to_meta_and_back'])
def test_converted_models_drop_their_kept_inference_weights(convert):
    """`.double()`, `.bfloat16()`, `.to(device)` replace the tensors the kept weights are made from; the old float32
    copies go with them (a float64 or moved model may never run the folded path again to replace them)."""
    model = make_model(**SMALL).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model(x)
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    assert blocks and all('_kept_inference_weights' in b.__dict__ for b in blocks)
    if convert == 'to_meta_and_back':
        reference = make_model(**SMALL).eval()
        reference.load_state_dict(model.state_dict())
        model.to('meta')
        assert not any('_kept_inference_weights' in b.__dict__ for b in blocks)
        model.to_empty(device='cpu').load_state_dict(reference.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
        return
    getattr(model, convert)()
    assert not any('_kept_inference_weights' in b.__dict__ for b in blocks)
    with torch.no_grad():  # the converted model runs its layers one by one in that dtype
        assert model(x.to(getattr(torch, convert))).dtype == getattr(torch, convert)


def test_compiled_blocks_fold_in_the_graph_and_keep_nothing():
    """Under torch.compile the folded weights are made in the graph, never kept on the module."""
    model = make_model(**SMALL)
    x = torch.randn(2, 3, 64, 64)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend='aot_eager', fullgraph=True)(x)
        assert not any('_kept_inference_weights' in m.__dict__ for m in model.modules())
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize('drop_path', [0., 0.3], ids=['no_drop_path', 'drop_path'])
def test_training_blocks_fold_layer_scales_into_the_convs(drop_path, dtype):
    """In training a block folds its layer scales into proj_2 / fc2 (see `Block._forward_train`): the same outputs
    and gradients (input, every parameter, the layer scales included) as the block written out as the spec has it."""
    torch.manual_seed(0)
    block = randomize_fusables_(Block(dim=16, mlp_ratio=4, kernel_size=7, dw_kernel_size=3, group=2,
                                      drop_path=drop_path, backend=BACKEND)).to(dtype).train()
    x = torch.randn(3, 16, 28, 28, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn(3, 16, 28, 28, dtype=dtype)

    def spec_block(x):
        b = block
        x = x + b.drop_path(b.layer_scale_1[:, None, None] * b.attn(b.norm1(x)))
        return x + b.drop_path(b.layer_scale_2[:, None, None] * b.mlp(b.norm2(x)))

    results = []
    for fn in (block, spec_block):
        torch.manual_seed(1)  # the same drop-path draws
        y = fn(x)
        results.append((y.detach(), torch.autograd.grad(y, [x, *block.parameters()], g)))
    (y, grads), (y_ref, grads_ref) = results
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y, y_ref, **tol)
    names = ['input'] + [n for n, _ in block.named_parameters()]
    for name, a, b in zip(names, grads, grads_ref):
        scale = b.abs().max().item()
        torch.testing.assert_close(a, b, rtol=tol['rtol'], atol=tol['atol'] * max(scale, 1.),
                                   msg=lambda m, name=name: f'{name}: {m}')


def _node_counting_backend(op, counts):
    """A torch.compile backend that appends to `counts` how many nodes of each graph call `op` (the overload packet
    or its default overload), then runs the graph as it is."""
    def backend(gm, example_inputs):
        counts.append(sum(n.target in (op, op.default) for n in gm.graph.nodes))
        return gm
    return backend


@pytest.mark.skipif(not ops_dscn.pointwise_conv_available(torch.empty(0)), reason='ops_dscn.pointwise_conv not built')
def test_compiled_model_leaves_large_batches_to_inductor(monkeypatch):
    """Under torch.compile the attention's epilogue kernel is in the graph up to `compile_max_batch` images; beyond
    it the graph holds the layers (which inductor fuses itself), and both compiled models give the eager outputs."""
    from dsan.models.dsan import PointwiseConv2d
    monkeypatch.setattr(PointwiseConv2d, 'compile_max_batch', 2)
    model = make_model(**SMALL)
    counts = []
    count_kernel_nodes = _node_counting_backend(torch.ops.ops_dscn.pointwise_conv, counts)
    for batch in (2, 3):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=count_kernel_nodes, dynamic=False)
        x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    assert counts == [3 * 4, 0]  # three per block, four blocks; then none


@requires_mlp_kernel
@pytest.mark.skipif(not ops_dscn.pack_weight_available(torch.empty(0)), reason='ops_dscn built without pack_weight')
def test_frozen_compiled_graphs_pack_the_folded_weights(monkeypatch):
    """Under torch.compile with inductor's freezing the graph packs the folded 1x1 weights, the gating conv's and
    DSCNX's input projection's (constants folded at compile time) at any batch, and the attention's 1x1 convs run
    as the kernel beyond `compile_max_batch` too; without freezing it packs nothing. The compiled models give the
    eager outputs, inductor with freezing included."""
    import torch._inductor.config as inductor_config

    from dsan.models.dsan import PointwiseConv2d
    monkeypatch.setattr(PointwiseConv2d, 'compile_max_batch', 2)
    model = make_model(**SMALL)
    counts, kernel_counts = [], []
    count_pack_nodes = _node_counting_backend(torch.ops.ops_dscn.pack_weight, counts)
    count_kernel_nodes = _node_counting_backend(torch.ops.ops_dscn.pointwise_conv, kernel_counts)
    for freezing, batch in ((True, 2), (True, 3), (False, 2), (False, 3)):
        for backend in (count_pack_nodes, count_kernel_nodes):
            torch._dynamo.reset()
            with inductor_config.patch(freezing=freezing), torch.no_grad():
                x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
                out = torch.compile(model, backend=backend, dynamic=False)(x)
                torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    # proj_1, proj_2, the gating conv, DSCNX's input projection, fc1 and fc2 of four blocks; then none
    assert counts == [6 * 4, 6 * 4, 0, 0]
    # proj_1, the gating conv, proj_2 and the input projection; unpacked, DSCNX's projection stays a Linear and
    # beyond `compile_max_batch` the 1x1 convs are left to inductor
    assert kernel_counts == [4 * 4, 4 * 4, 3 * 4, 0]
    torch._dynamo.reset()
    with inductor_config.patch(freezing=True), torch.no_grad():
        x = torch.randn(1, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


class PackedArgs(torch.utils._python_dispatch.TorchDispatchMode):
    """Records, per call of ops_dscn::conv_mlp / pointwise_conv under this mode, whether it got packed weights."""

    def __init__(self):
        super().__init__()
        self.packed = {'conv_mlp': [], 'pointwise_conv': []}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.ops_dscn.conv_mlp.default:
            self.packed['conv_mlp'].append(kwargs.get('fc1_packed', args[8] if len(args) > 8 else None) is not None)
        elif func is torch.ops.ops_dscn.pointwise_conv.default:
            self.packed['pointwise_conv'].append(kwargs.get('packed', args[7] if len(args) > 7 else None) is not None)
        return func(*args, **kwargs)


def packed_calls(model: nn.Module, x: torch.Tensor) -> dict[str, list[bool]]:
    with torch.no_grad(), PackedArgs() as mode:
        model(x)
    return mode.packed


@requires_mlp_kernel
@pytest.mark.skipif(not ops_dscn.pack_weight_available(torch.empty(0)), reason='ops_dscn built without pack_weight')
def test_reparameterize_packs_the_1x1_weights_for_the_kernels(monkeypatch):
    """`reparameterize` packs the folded 1x1 weights once (ops_dscn.pack_weight) for the MLP and attention kernels:
    not in the state_dict, used in inference, packed again in eager mode when a weight changes in place, is
    replaced or the model is copied, and the outputs stay those of the layers one by one."""
    model, layers = make_model(**SMALL), make_model(fused_mlp=False, **SMALL)
    layers.load_state_dict(model.state_dict())
    for m in layers.modules():
        if hasattr(m, 'fused_epilogue'):
            m.fused_epilogue = False
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    # Not reparameterized: the weights a block keeps in eager eval come packed (the folded MLP, proj_1 and proj_2
    # weights, the gating conv's and DSCNX's input projection's own), none of them kept on the modules.
    assert packed_calls(model, x) == {'conv_mlp': [True] * 4, 'pointwise_conv': [True] * 16}
    assert not any(getattr(m, name, None) is not None for m in model.modules()
                   for name in ('packed_weight', 'input_proj_packed', 'fc1_packed', 'fc2_packed'))
    model.reparameterize()
    layers.reparameterize()
    keys = set(model.state_dict())
    assert keys == set(layers.state_dict()) and not [k for k in keys if 'packed' in k]
    mlps = [m for m in model.modules() if isinstance(m, Mlp)]
    assert all(m.fc1_packed is not None and m.fc2_packed is not None for m in mlps)
    dscn_x = [m for m in model.modules() if isinstance(m, DSCNX)]
    assert len(dscn_x) == 4 and all(m.input_proj_packed is not None for m in dscn_x)
    calls = packed_calls(model, x)
    # Per block: proj_1, the gating conv and proj_2 (PointwiseConv2d), and DSCNX's input projection.
    assert calls == {'conv_mlp': [True] * 4, 'pointwise_conv': [True] * 16}

    def check():
        with torch.no_grad():
            torch.testing.assert_close(model(x), layers(x), rtol=1e-5, atol=1e-5)

    check()
    with torch.no_grad():  # in place: the version counter moves, and the next call packs again
        for m in (model, layers):
            m.block4[0].mlp.fc2.weight.mul_(-2.)
            m.block3[0].attn.proj_2.weight.add_(0.5)
            m.block1[0].attn.spatial_gating_unit.dscn_x.input_proj.weight.mul_(0.5)
    check()
    for m in (model, layers):  # replaced
        m.block2[0].mlp.fc1.weight = nn.Parameter(torch.randn_like(m.block2[0].mlp.fc1.weight) * 0.1)
    layers.block2[0].mlp.fc1.weight = nn.Parameter(model.block2[0].mlp.fc1.weight.detach().clone())
    check()
    model = timm.utils.reparameterize_model(model)  # a copy (its Blocks are already fused: nothing is folded again)
    check()
    model.double().float()  # the buffers follow the model's dtype, and back
    check()
    # A fused optimizer step (no version bump) on both: the packed copies follow it too.
    for m in (model, layers):
        params = [p for p in m.parameters() if p.requires_grad]
        torch.manual_seed(0)
        for p in params:
            p.grad = torch.randn_like(p)
        torch.optim.SGD(params, lr=0.05, fused=True).step()
    check()
    # Under gradients (the MLP kernel allowed at any size) the kernel gets the weights themselves.
    monkeypatch.setattr(Mlp, 'fused_train_min_pixels', 1)
    for p in model.parameters():
        p.requires_grad_(True)
    with PackedArgs() as mode:
        model(x)
    assert mode.packed['conv_mlp'] == [False] * 4
