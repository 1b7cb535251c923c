"""DSAN backbone: names and shapes of the original, an independent spec forward, timm conventions, backends."""
import copy
import math
import os
import subprocess
import sys
import warnings

import pytest
import timm
import timm.optim
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import BACKEND, ROOT, requires_cpp

import ops_dscn
from dsan.models import DSAN, describe_state_dict

# Spec §2: the three variants (mlp_ratios [8, 8, 4, 4] for all).
SPEC = {
    'dsan_t': dict(embed_dims=[32, 64, 160, 256], depths=[3, 3, 5, 2], kernel_sizes=[11, 11, 7, 5],
                   dw_kernel_sizes=[11, 11, 7, 5], groups=[1, 4, 8, 8], params=4_484_706),
    'dsan_t2': dict(embed_dims=[32, 64, 160, 256], depths=[3, 3, 8, 2], kernel_sizes=[19, 15, 13, 7],
                    dw_kernel_sizes=[19, 15, 13, 7], groups=[4, 8, 16, 16], params=6_037_440),
    'dsan_s': dict(embed_dims=[64, 128, 320, 512], depths=[2, 2, 5, 3], kernel_sizes=[15, 13, 7, 5],
                   dw_kernel_sizes=[9, 7, 5, 5], groups=[4, 8, 16, 16], params=19_880_248),
}
MLP_RATIOS = [8, 8, 4, 4]
SMALL = dict(depths=(1, 1, 1, 1))  # fast variants of dsan_t for behaviour tests


def spec_state_dict_shapes(embed_dims, depths, kernel_sizes, dw_kernel_sizes, groups, num_classes=1000, **_):
    """Every parameter/buffer name and shape of the original DSAN, written from the spec's description."""
    shapes = {}

    def bn(p, c):
        shapes.update({p + 'weight': (c,), p + 'bias': (c,), p + 'running_mean': (c,), p + 'running_var': (c,),
                       p + 'num_batches_tracked': ()})

    def conv(p, cout, cin_per_group, kh, kw):
        shapes.update({p + 'weight': (cout, cin_per_group, kh, kw), p + 'bias': (cout,)})

    for i, (c, d, k, kd, g) in enumerate(zip(embed_dims, depths, kernel_sizes, dw_kernel_sizes, groups)):
        s = i + 1
        conv(f'patch_embed{s}.proj.', c, 3 if i == 0 else embed_dims[i - 1], 7 if i == 0 else 3, 7 if i == 0 else 3)
        bn(f'patch_embed{s}.norm.', c)
        hid = c * MLP_RATIOS[i]
        for j in range(d):
            b = f'block{s}.{j}.'
            shapes[b + 'layer_scale_1'] = (c,)
            shapes[b + 'layer_scale_2'] = (c,)
            bn(b + 'norm1.', c)
            bn(b + 'norm2.', c)
            conv(b + 'attn.proj_1.', c, c, 1, 1)
            conv(b + 'attn.proj_2.', c, c, 1, 1)
            sgu = b + 'attn.spatial_gating_unit.'
            conv(sgu + 'conv0.', c, 1, 5, 5)
            conv(sgu + 'conv.', c, c, 1, 1)
            for axis, (kh, kw) in (('x', (1, kd)), ('y', (kd, 1))):
                p = sgu + f'dscn_{axis}.'
                conv(p + 'dw_conv.0.', c, 1, kh, kw)
                shapes[p + 'dw_conv.1.1.weight'] = (c,)
                shapes[p + 'dw_conv.1.1.bias'] = (c,)
                shapes[p + 'offset.weight'] = (g * k, c)
                shapes[p + 'offset.bias'] = (g * k,)
            shapes[sgu + 'dscn_x.input_proj.weight'] = (c, c)
            shapes[sgu + 'dscn_x.input_proj.bias'] = (c,)
            conv(b + 'mlp.fc1.', hid, c, 1, 1)
            conv(b + 'mlp.dwconv.dwconv.', hid, 1, 3, 3)
            conv(b + 'mlp.fc2.', c, hid, 1, 1)
        shapes[f'norm{s}.weight'] = (c,)
        shapes[f'norm{s}.bias'] = (c,)
    shapes['head.weight'] = (num_classes, embed_dims[-1])
    shapes['head.bias'] = (num_classes,)
    return shapes


def randomize_(model: nn.Module, offset_std: float = 0.5) -> nn.Module:
    """Random weights, BN statistics and layer scales, with offsets large enough to move taps by pixels."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            r = torch.randn(t.shape, generator=g, dtype=t.dtype)
            if name.endswith('running_var'):
                t.copy_(r.abs() + 0.5)
            elif 'offset.weight' in name:
                t.copy_(r * offset_std)
            elif name.endswith(('norm.weight', 'norm1.weight', 'norm2.weight', '1.1.weight', 'layer_scale_1',
                                'layer_scale_2')) or (name.startswith('norm') and name.endswith('weight')):
                t.copy_(1 + 0.2 * r)
            else:
                fan_in = t[0].numel() if t.dim() > 1 else 1
                t.copy_(r * (0.1 if t.dim() == 1 else 1 / math.sqrt(fan_in)))
    return model


def reference_forward(sd: dict, cfg: dict, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """DSAN classification forward written directly from spec §2 (NCHW contiguous, functional)."""
    def bn(t, p):
        return F.batch_norm(t, sd[p + 'running_mean'], sd[p + 'running_var'], sd[p + 'weight'], sd[p + 'bias'],
                            False, 0., 1e-5)

    def conv(t, p, **kw):
        return F.conv2d(t, sd[p + 'weight'], sd[p + 'bias'], **kw)

    def offsets(src, p, axis, kd):
        c = src.shape[1]
        pad = (0, (kd - 1) // 2) if axis == 'x' else ((kd - 1) // 2, 0)
        t = conv(src, p + 'dw_conv.0.', padding=pad, groups=c).permute(0, 2, 3, 1)
        t = F.gelu(F.layer_norm(t, (c,), sd[p + 'dw_conv.1.1.weight'], sd[p + 'dw_conv.1.1.bias'], 1e-6))
        return F.linear(t, sd[p + 'offset.weight'], sd[p + 'offset.bias'])

    for i, (c, d, k, kd, g) in enumerate(zip(cfg['embed_dims'], cfg['depths'], cfg['kernel_sizes'],
                                             cfg['dw_kernel_sizes'], cfg['groups'])):
        s = i + 1
        x = bn(conv(x, f'patch_embed{s}.proj.', stride=4 if i == 0 else 2, padding=3 if i == 0 else 1),
               f'patch_embed{s}.norm.')
        for j in range(d):
            b = f'block{s}.{j}.'
            y = bn(x, b + 'norm1.')
            a = F.gelu(conv(y, b + 'attn.proj_1.'))
            sgu = b + 'attn.spatial_gating_unit.'
            x0 = conv(a, sgu + 'conv0.', padding=2, groups=c)
            nhwc = F.linear(x0.permute(0, 2, 3, 1), sd[sgu + 'dscn_x.input_proj.weight'],
                            sd[sgu + 'dscn_x.input_proj.bias'])
            nhwc = ops_dscn.dscn(nhwc, offsets(x0, sgu + 'dscn_x.', 'x', kd), k, pad=(k - 1) // 2, group=g,
                                 axis='x', backend='pytorch')
            nhwc = ops_dscn.dscn(nhwc, offsets(x0, sgu + 'dscn_y.', 'y', kd), k, pad=(k - 1) // 2, group=g,
                                 axis='y', backend='pytorch')
            a = a * conv(nhwc.permute(0, 3, 1, 2), sgu + 'conv.')
            a = conv(a, b + 'attn.proj_2.') + y
            x = x + sd[b + 'layer_scale_1'].view(-1, 1, 1) * a
            m = conv(bn(x, b + 'norm2.'), b + 'mlp.fc1.')
            m = F.gelu(conv(m, b + 'mlp.dwconv.dwconv.', padding=1, groups=m.shape[1]))
            x = x + sd[b + 'layer_scale_2'].view(-1, 1, 1) * conv(m, b + 'mlp.fc2.')
        tokens = x.flatten(2).transpose(1, 2)  # (N, HW, C), as the original
        tokens = F.layer_norm(tokens, (c,), sd[f'norm{s}.weight'], sd[f'norm{s}.bias'], eps)
        x = tokens.transpose(1, 2).reshape(x.shape)
    return F.linear(x.mean((2, 3)), sd['head.weight'], sd['head.bias'])


@pytest.mark.parametrize('name', list(SPEC))
def test_state_dict_names_shapes_and_params(name):
    model = timm.create_model(name, backend=BACKEND)
    expected = spec_state_dict_shapes(**SPEC[name])
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(got) == sorted(expected)
    assert got == expected
    assert sum(p.numel() for p in model.parameters()) == SPEC[name]['params']
    assert model.groups == SPEC[name]['groups']


def test_dsan_defaults_are_dsan_t():
    """`DSAN()` is DSAN-T (spec §2): same names, shapes, parameter count and layers as `dsan_t`."""
    default = DSAN(backend='pytorch')
    dsan_t = timm.create_model('dsan_t', backend='pytorch')
    got = {k: tuple(v.shape) for k, v in default.state_dict().items()}
    assert got == {k: tuple(v.shape) for k, v in dsan_t.state_dict().items()}
    assert got == spec_state_dict_shapes(**SPEC['dsan_t'])
    assert sum(p.numel() for p in default.parameters()) == SPEC['dsan_t']['params']
    assert default.groups == SPEC['dsan_t']['groups'] and default.kernel_sizes == SPEC['dsan_t']['kernel_sizes']
    # Same modules and hyper-parameters (drop path, eps, kernel sizes, DSCN groups) down to every repr.
    assert repr(default) == repr(dsan_t)


@pytest.mark.parametrize('name', list(SPEC))
def test_describe_state_dict_names_the_variant(name):
    sd = timm.create_model(name, backend='pytorch').state_dict()
    dims, depths = SPEC[name]['embed_dims'], SPEC[name]['depths']
    assert describe_state_dict(sd) == f'embed_dims {dims}, depths {depths} (looks like {name})'
    sd = {k: v for k, v in sd.items() if not k.startswith(f'block4.{depths[3] - 1}.')}
    assert describe_state_dict(sd).endswith(f'depths {depths[:3] + [depths[3] - 1]}')  # no variant


# The spec forward uses the pure-PyTorch op: with the compiled op this also compares the two (skipped, not
# replaced by pytorch, when the op is not built).
@pytest.mark.parametrize('backend', [pytest.param('cpp', marks=requires_cpp), 'pytorch'])
@pytest.mark.parametrize('groups', [(1, 4, 8, 8), (4, 8, 16, 16)])
def test_forward_matches_spec_reference(groups, backend):
    cfg = dict(SPEC['dsan_t'], groups=list(groups), depths=[2, 1, 1, 1])
    model = timm.create_model('dsan_t', depths=cfg['depths'], groups=groups, backend=backend)
    randomize_(model).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
        ref = reference_forward(model.state_dict(), cfg, x)
    assert out.shape == (2, 1000)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    # The offsets are large enough to matter: zeroing them changes the output.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if 'offset.' in n:
                p.zero_()
        assert (model(x) - ref).abs().max() > 1e-3


def test_original_initialisation():
    model = timm.create_model('dsan_t', drop_path_rate=0.1, backend=BACKEND)
    blk = model.block1[0]
    assert torch.equal(blk.layer_scale_1, torch.full((32,), 1e-2))
    assert torch.equal(blk.layer_scale_2, torch.full((32,), 1e-2))
    sgu = model.block3[0].attn.spatial_gating_unit
    # Linear: timm trunc_normal_(std=0.02) (absolute bounds +-2, as the original), bias 0; this also
    # overrides the DSCN modules' zero-init of the offsets.
    w = sgu.dscn_x.offset.weight
    assert 0.015 < w.std() < 0.025 and torch.all(sgu.dscn_x.offset.bias == 0)
    assert 0.015 < model.head.weight.std() < 0.025
    # Conv2d: normal(0, sqrt(2 / fan_out)), fan_out = kh * kw * out / groups; bias 0.
    fc1 = model.block3[0].mlp.fc1
    assert abs(fc1.weight.std().item() - math.sqrt(2 / 640)) < 0.1 * math.sqrt(2 / 640)
    assert torch.all(fc1.bias == 0)
    dw = model.block3[0].mlp.dwconv.dwconv
    assert abs(dw.weight.std().item() - math.sqrt(2 / 9)) < 0.1 * math.sqrt(2 / 9)
    assert torch.all(model.norm1.weight == 1) and torch.all(model.norm1.bias == 0)
    # Drop path: linear from 0 over all 13 blocks.
    rates = [getattr(b.drop_path, 'drop_prob', 0.) for i in range(1, 5) for b in getattr(model, f'block{i}')]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.1, 13))


def test_timm_conventions():
    model = timm.create_model('dsan_t', num_classes=10, backend=BACKEND, **SMALL).eval()
    cfg = model.pretrained_cfg
    assert cfg['crop_pct'] == 0.9 and cfg['interpolation'] == 'bicubic'
    assert tuple(cfg['mean']) == (0.5, 0.5, 0.5) and tuple(cfg['std']) == (0.5, 0.5, 0.5)
    assert timm.data.resolve_data_config({}, model=model)['crop_pct'] == 0.9
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 256, 2, 2)
        pooled = model.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(pooled, feats.mean((2, 3)))
        torch.testing.assert_close(model(x), model.head(pooled))
        assert model(x).shape == (2, 10)
        model.reset_classifier(5)
        assert model(x).shape == (2, 5) and model.get_classifier().out_features == 5
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), pooled)
    assert model.no_weight_decay() == set()
    groups = timm.optim.create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05).param_groups
    assert sum(len(g['params']) for g in groups) == len(list(model.parameters()))
    layer_groups = timm.optim.param_groups_layer_decay(model, layer_decay=0.9)
    assert sum(len(g['params']) for g in layer_groups) == len(list(model.parameters()))


def dscn_backends(model: nn.Module) -> set[str]:
    modules = [m for m in model.modules() if isinstance(m, (ops_dscn.modules.DSCNX, ops_dscn.modules.DSCNY))]
    assert len(modules) == 2 * sum(model.depths)
    return {m.backend for m in modules}


@pytest.fixture
def resolve_calls(monkeypatch):
    """Record the names `ops_dscn.resolve_backend` is asked about; 'cpp' resolves as if the op were built."""
    calls = []
    real = ops_dscn.resolve_backend

    def spy(name, *args, **kwargs):
        calls.append(name)
        return 'cpp' if name == 'cpp' else real(name, *args, **kwargs)

    monkeypatch.setattr(ops_dscn, 'resolve_backend', spy)
    return calls


def test_norm_eps_option():
    model = timm.create_model('dsan_t', norm_eps=1e-5, backend='pytorch', **SMALL)
    assert all(getattr(model, f'norm{i}').eps == 1e-5 for i in range(1, 5))
    assert all(getattr(timm.create_model('dsan_t', backend='pytorch', **SMALL), f'norm{i}').eps == 1e-6
               for i in range(1, 5))


def test_original_constructor_arguments_build_the_same_model():
    """The original DSAN's constructor: `norm_layer` is the stage LayerNorm (its variants pass
    partial(nn.LayerNorm, eps=1e-6)), plus img_size, pads, strides, dilations, num_stages, flag and
    forward_backbone. The model built its way equals timm's dsan_t, weight for weight and output for output."""
    from functools import partial

    from torch import nn
    original = DSAN(img_size=224, embed_dims=[32, 64, 160, 256], kernel_sizes=[11, 11, 7, 5],
                    dw_kernel_sizes=[11, 11, 7, 5], pads=[5, 5, 3, 2], strides=[1, 1, 1, 1], dilations=[1, 1, 1, 1],
                    groups=[1, 4, 8, 8], mlp_ratios=[8, 8, 4, 4], norm_layer=partial(nn.LayerNorm, eps=1e-6),
                    depths=[3, 3, 5, 2], num_stages=4, flag=False).eval()
    ours = timm.create_model('dsan_t').eval()
    assert {k: v.shape for k, v in original.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    assert original.norm4.eps == 1e-6 and isinstance(original.block1[0].norm1, nn.BatchNorm2d)
    ours.load_state_dict(original.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(original(x), ours(x), rtol=0, atol=0)
        tokens = original.forward_backbone(x)
        assert tokens.shape == (2, 4, 256)
        torch.testing.assert_close(tokens.mean(1), original.forward_head(original.forward_features(x), pre_logits=True))
    with pytest.raises(ValueError, match=r'pads must be \[5, 5, 3, 2\] .* got \[5, 5, 3, 3\]'):
        DSAN(pads=[5, 5, 3, 3], **SMALL)
    with pytest.raises(ValueError, match=r'strides must be \[1, 1, 1, 1\]'):
        DSAN(strides=[1, 2, 1, 1], **SMALL)
    with pytest.raises(ValueError, match='num_stages must be the number of per-stage entries'):
        DSAN(num_stages=3, **SMALL)
    from timm.layers import LayerNorm2d
    ln2d = DSAN(norm_layer=LayerNorm2d, **SMALL)  # a norm over NCHW maps stands in for the BatchNorms, as before
    assert type(ln2d.block1[0].norm1) is LayerNorm2d and type(ln2d.norm1) is LayerNorm2d  # (stage norms: always)


def test_backend_name_is_checked_by_ops_dscn_and_kept(resolve_calls, monkeypatch):
    """ops_dscn validates the name; the DSCN modules keep the name ('auto' resolves per call and device)."""
    model = timm.create_model('dsan_t', backend='pytorch', **SMALL)
    assert resolve_calls == ['pytorch'] and model.backend == 'pytorch' and dscn_backends(model) == {'pytorch'}
    model.set_backend('cpp')
    assert resolve_calls == ['pytorch', 'cpp'] and dscn_backends(model) == {'cpp'}
    # 'auto' is kept as the name, not pre-resolved to 'cpp' / 'pytorch' for the device the model is built on.
    model.set_backend('auto')
    assert model.backend == 'auto' and dscn_backends(model) == {'auto'}
    assert dscn_backends(timm.create_model('dsan_t', backend='auto', **SMALL)) == {'auto'}
    assert dscn_backends(DSAN(**SMALL)) == {'auto'}  # the default
    for bad in ('cuda', 'dscn', 'CPP'):  # one set of names, ops_dscn's, in its words
        with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'cpp', 'pytorch'\)"):
            timm.create_model('dsan_t', backend=bad, **SMALL)
        with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'cpp', 'pytorch'\)"):
            model.set_backend(bad)
    assert dscn_backends(model) == {'auto'}  # unchanged by the failed calls
    with pytest.raises(TypeError, match='needs backend='):
        model.set_backend()

    # 'cpp' without the compiled op fails at construction, with ops_dscn's error.
    def not_built(name, *args, **kwargs):
        if name == 'cpp':
            raise RuntimeError('compiled op not built (test)')
        return 'pytorch'

    monkeypatch.setattr(ops_dscn, 'resolve_backend', not_built)
    with pytest.raises(RuntimeError, match=r'compiled op not built \(test\)'):
        DSAN(backend='cpp', **SMALL)
    with pytest.raises(RuntimeError, match=r'compiled op not built \(test\)'):
        model.set_backend('cpp')


def test_core_op_is_a_deprecated_alias_of_backend(resolve_calls):
    with pytest.warns(FutureWarning, match="core_op='dscn_pytorch' is deprecated, use backend='pytorch'"):
        model = timm.create_model('dsan_t', core_op='dscn_pytorch', **SMALL)
    assert model.backend == 'pytorch' and dscn_backends(model) == {'pytorch'}
    with pytest.warns(FutureWarning, match="use backend='cpp'"):
        model = DSAN(core_op='dscn', **SMALL)  # the deprecated name of the compiled op
    assert resolve_calls[-1] == 'cpp' and dscn_backends(model) == {'cpp'}
    with pytest.warns(FutureWarning, match="use backend='pytorch'"):
        model.set_backend(core_op='dscn_pytorch')
    assert dscn_backends(model) == {'pytorch'}
    with pytest.warns(FutureWarning):
        DSAN(backend='cpp', core_op='dscn', **SMALL)  # both, agreeing: fine
    with pytest.raises(ValueError, match=r"backend='pytorch' and core_op='dscn' \(backend='cpp'\) disagree"):
        DSAN(backend='pytorch', core_op='dscn', **SMALL)
    with pytest.raises(ValueError, match=r"backend='auto' and core_op='dscn_pytorch' \(backend='pytorch'\) disagree"):
        model.set_backend('auto', core_op='dscn_pytorch')
    with pytest.raises(ValueError, match=r"core_op must be one of \('dscn', 'dscn_pytorch'\)"):
        DSAN(core_op='pytorch', **SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        DSAN(backend='pytorch', **SMALL)  # no warning without core_op


def test_channels_last_is_layout_only():
    model = timm.create_model('dsan_t', backend=BACKEND, **SMALL).eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        out_cl = model.forward_features(x)
        model.channels_last = False
        out_nchw = model.forward_features(x)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out_cl, out_nchw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('out_indices', [(0, 1, 2, 3), (1, 3)])
def test_features_only(out_indices):
    model = timm.create_model('dsan_t', features_only=True, out_indices=out_indices, backend=BACKEND, **SMALL)
    chans = [32, 64, 160, 256]
    assert model.feature_info.channels() == [chans[i] for i in out_indices]
    assert model.feature_info.reduction() == [4 * 2 ** i for i in out_indices]
    x = torch.randn(2, 3, 64, 96)
    feats = model.eval()(x)
    assert len(feats) == len(out_indices)
    for f, c, r in zip(feats, model.feature_info.channels(), model.feature_info.reduction()):
        assert f.shape == (2, c, 64 // r, 96 // r)
    # Same tensors as the classification model's intermediates (stage outputs after norm{i}).
    full = timm.create_model('dsan_t', backend=BACKEND, **SMALL).eval()
    full.load_state_dict(model.model.state_dict(), strict=False)
    with torch.no_grad():
        final, inter = full.forward_intermediates(x, indices=list(out_indices))
        torch.testing.assert_close(final, full.forward_features(x))
    for f, ref in zip(feats, inter):
        torch.testing.assert_close(f, ref)


def test_gradient_checkpointing_same_grads():
    model = randomize_(timm.create_model('dsan_t', backend=BACKEND, **SMALL)).double().train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)

    def grads():
        model.zero_grad()
        out = model(x)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    state = {k: v.clone() for k, v in model.state_dict().items()}
    out_ref, g_ref = grads()
    model.load_state_dict(state)  # undo the BN running-stat update
    model.set_grad_checkpointing(True)
    out_ck, g_ck = grads()
    torch.testing.assert_close(out_ck, out_ref)
    for a, b in zip(g_ck, g_ref):
        torch.testing.assert_close(a, b)


def _output_and_grads(model, x):
    """The model's output on x, the gradient of x and every parameter's gradient (on the CPU) for a fixed weighting
    of the outputs."""
    model.zero_grad()
    xi = x.clone().requires_grad_()
    out = model(xi)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)).sum().backward()
    return out.detach().cpu(), xi.grad.cpu(), {n: p.grad.to('cpu', copy=True) for n, p in model.named_parameters()}


@requires_cpp
def test_compiled_op_matches_pytorch_float64():
    """Outputs and every gradient of the model: compiled op vs pure-PyTorch twin, in float64."""
    model = randomize_(timm.create_model('dsan_t', backend='cpp', depths=(2, 1, 2, 1))).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    o1, gx1, gp1 = _output_and_grads(model, x)
    model.set_backend('pytorch')
    o2, gx2, gp2 = _output_and_grads(model, x)
    torch.testing.assert_close(o1, o2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx1, gx2, rtol=1e-9, atol=1e-10)
    assert any(gp1[n].abs().max() > 0 for n in gp1 if 'offset.weight' in n)
    for n in gp1:
        torch.testing.assert_close(gp1[n], gp2[n], rtol=1e-8, atol=1e-10, msg=lambda m, n=n: f'{n}: {m}')


@requires_cpp
def test_torch_compile_without_graph_breaks():
    """dsan_t with the compiled op (fake kernel + registered autograd) compiles into one graph."""
    model = timm.create_model('dsan_t', backend='cpp', **SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


@requires_cpp
def test_torch_compile_backward_matches_eager():
    """Training graph (the op's registered autograd under AOTAutograd): the same gradients as eager, in float64."""
    model = randomize_(timm.create_model('dsan_t', backend='cpp', **SMALL)).double().train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    weight = torch.linspace(-1, 1, 2 * 1000, dtype=torch.float64).view(2, 1000)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def grads(fn):
        model.load_state_dict(state)  # same BN running statistics before each pass
        model.zero_grad()
        xi = x.clone().requires_grad_()
        out = fn(xi)
        (out * weight).sum().backward()
        return out.detach(), xi.grad, {n: p.grad.clone() for n, p in model.named_parameters()}

    out_e, gx_e, gp_e = grads(model)
    torch._dynamo.reset()
    out_c, gx_c, gp_c = grads(torch.compile(model, backend='aot_eager', fullgraph=True))
    torch._dynamo.reset()
    assert set(gp_c) == set(gp_e) and all(g is not None for g in gp_c.values())
    assert all(gp_e[n].abs().max() > 1e-6 for n in gp_e if 'offset.weight' in n)  # the offsets get gradients
    # Same kernels, possibly another order of float64 sums: agreement to ~1e-10 relative, 1e-12 absolute.
    torch.testing.assert_close(out_c, out_e, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx_c, gx_e, rtol=1e-10, atol=1e-12)
    for n in gp_e:
        torch.testing.assert_close(gp_c[n], gp_e[n], rtol=1e-10, atol=1e-12, msg=lambda m, n=n: f'{n}: {m}')


# CUDA: the whole model on the GPU kernel (the op tests in ops_dscn/tests cover the kernel alone).
requires_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and 'cuda' in ops_dscn.compiled_device_types()),
    reason='no GPU, or ops_dscn built without its CUDA kernel')


@requires_cuda
def test_cuda_model_matches_cpu_float64():
    """Outputs and every gradient of dsan_t on the GPU kernel against the CPU kernel, in float64."""
    model = randomize_(timm.create_model('dsan_t', backend='cpp', depths=(2, 1, 2, 1))).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    o1, gx1, gp1 = _output_and_grads(model, x)
    o2, gx2, gp2 = _output_and_grads(model.cuda(), x.cuda())
    # The GPU backward sums with atomics, in another order than the CPU: float64 agrees to ~1e-10 relative.
    torch.testing.assert_close(o2, o1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx2, gx1, rtol=1e-8, atol=1e-10)
    assert any(gp1[n].abs().max() > 0 for n in gp1 if 'offset.weight' in n)
    for n in gp1:
        torch.testing.assert_close(gp2[n], gp1[n], rtol=1e-8, atol=1e-10, msg=lambda m, n=n: f'{n}: {m}')


@pytest.mark.parametrize('device,dtype', [('cpu', torch.bfloat16),
                                          pytest.param('cuda', torch.float16, marks=requires_cuda),
                                          pytest.param('cuda', torch.bfloat16, marks=requires_cuda)], ids=str)
def test_autocast_training_step(device, dtype):
    """An AdamW step under autocast: finite loss, every parameter has a finite, non-zero gradient and is updated,
    logits near float32's. (No weight decay: decay alone would change every non-zero parameter.)"""
    torch.manual_seed(0)
    model = timm.create_model('dsan_t', backend=BACKEND, num_classes=10, **SMALL).to(device).train()
    x = torch.randn(4, 3, 64, 64, device=device)
    target = torch.arange(4, device=device)
    with torch.no_grad():
        ref = model.eval()(x)
        with torch.autocast(device, dtype=dtype):
            low = model(x)
    assert low.dtype == dtype
    torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.05)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
    with torch.autocast(device, dtype=dtype):
        loss = F.cross_entropy(model(x), target)
    scaler.scale(loss).backward()
    no_grad = [n for n, p in model.named_parameters()
               if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.any()]
    assert not no_grad, no_grad
    scaler.step(opt)
    scaler.update()
    assert torch.isfinite(loss)
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p.detach(), before[n])]
    assert not unchanged, unchanged


@requires_cuda
def test_cuda_torch_compile_inductor_matches_eager():
    """Inductor on the GPU (the op's fake kernel declares the CUDA kernel's output layout): same logits as eager.

    In float64, so that TF32 convolutions (cuDNN's default in float32) cannot hide a layout error as rounding.
    """
    model = randomize_(timm.create_model('dsan_t', backend='cpp', **SMALL)).cuda().double().eval()
    x = torch.randn(2, 3, 64, 64, device='cuda', dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(compiled(x), ref, rtol=1e-7, atol=1e-7 * ref.abs().max().item())
    torch._dynamo.reset()


def test_dsan_class_validates_config():
    with pytest.raises(ValueError, match='kernel sizes must be odd'):
        DSAN(kernel_sizes=(10, 11, 7, 5), backend='pytorch')
    with pytest.raises(ValueError, match='groups has 3 entries'):
        DSAN(groups=(1, 4, 8), backend='pytorch')


def run_pytest_without_compiled_op(*args: str, require_cpp: bool) -> subprocess.CompletedProcess:
    """Run pytest on this file in a fresh process where the compiled op cannot be imported (as if not built)."""
    code = "import sys; sys.modules['ops_dscn._C'] = None; import pytest; sys.exit(pytest.main(sys.argv[1:]))"
    env = {k: v for k, v in os.environ.items() if k != 'DSAN_REQUIRE_CPP'}
    if require_cpp:
        env['DSAN_REQUIRE_CPP'] = '1'
    return subprocess.run(
        [sys.executable, '-c', code, '-rs', '-p', 'no:cacheprovider', __file__, *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_missing_compiled_op_fails_the_session_when_required():
    r = run_pytest_without_compiled_op('-k', 'test_norm_eps_option', require_cpp=True)
    out = r.stdout + r.stderr
    assert r.returncode == pytest.ExitCode.USAGE_ERROR, out
    # The message carries the import error of the extension.
    assert "DSAN_REQUIRE_CPP=1 but the compiled ops_dscn op not built (ModuleNotFoundError: import of ops_dscn._C" \
        in out, out
    assert 'passed' not in out


def test_missing_compiled_op_skips_backend_comparisons_visibly():
    r = run_pytest_without_compiled_op(
        '-k', 'test_forward_matches_spec_reference and groups0 or test_compiled_op_matches_pytorch_float64',
        require_cpp=False)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert 'dsan: compiled ops_dscn op not built (ModuleNotFoundError' in out  # the report header says so
    # The spec comparison runs on the PyTorch op; the cpp variants are skipped with the reason, not run as pytorch.
    assert '1 passed, 2 skipped' in out, out
    skipped = [line for line in out.splitlines() if line.startswith('SKIPPED')]
    assert len(skipped) == 2 and all('compiled ops_dscn op not built' in line for line in skipped), out


@requires_cpp
def test_dsan_gradient_penalty_through_the_kernels():
    """A gradient penalty (a gradient of a gradient) through a float64 DSAN in training mode, which runs every
    compiled kernel: the parameters' gradients equal those of the model with every kernel switched off, and agree
    with a finite difference along a random direction."""
    from dsan.models.dsan import Mlp, PointwiseConv2d
    from ops_dscn.modules import DSCNX, DSCNY

    torch.manual_seed(0)
    model = DSAN(depths=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64), num_classes=3).double().train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.0  # running statistics stay put between the calls
        if isinstance(m, (DSCNX, DSCNY)):
            # Offsets off the integers: the interpolation has kinks there (at init every offset is 0).
            nn.init.normal_(m.offset.weight, std=0.3)
            nn.init.uniform_(m.offset.bias, -1, 1)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=torch.channels_last)

    def penalty(net):
        xi = x.clone().requires_grad_()
        gx, = torch.autograd.grad(F.log_softmax(net(xi), 1)[:, 0].sum(), xi, create_graph=True)
        return (gx ** 2).sum()

    def gradients(net):
        net.zero_grad()
        penalty(net).backward()
        return [p.grad.clone() for p in net.parameters()]

    layers = copy.deepcopy(model)
    layers.set_backend('pytorch')
    for m in layers.modules():
        if isinstance(m, (DSCNX, DSCNY)):
            m.fused_offsets = False
        elif isinstance(m, Mlp):
            m.fused_kernel = False
        elif isinstance(m, PointwiseConv2d):
            m.fused_epilogue = False
    grads = gradients(model)
    torch.testing.assert_close(grads, gradients(layers), rtol=1e-7, atol=1e-10)

    params = list(model.parameters())
    direction = [torch.randn_like(p) for p in params]
    eps = 1e-6

    def moved(step):
        with torch.no_grad():
            for p, v in zip(params, direction):
                p.add_(v, alpha=step)
        return penalty(model).detach()

    plus, minus = moved(eps), moved(-2 * eps)
    numeric = (plus - minus) / (2 * eps)
    analytic = sum((g * v).sum() for g, v in zip(grads, direction))
    torch.testing.assert_close(analytic, numeric, rtol=1e-3, atol=0)


@pytest.mark.parametrize('blocked, module, message', [
    ('ops_dscn', 'dsan.models', 'dsan needs the ops_dscn operator package'),
    ('mmengine', 'dsan.mm', 'dsan.mm needs the OpenMMLab stack'),
])
def test_a_missing_dependency_is_named_with_its_install_command(blocked, module, message):
    # sys.modules[name] = None makes `import name` fail as if the package were not installed.
    code = f'import sys; sys.modules[{blocked!r}] = None; import {module}'
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith('ImportError: ' + message) and 'install' in last, r.stderr[-2000:]


@pytest.mark.parametrize('feature_cls', ['getter', 'hook', 'fx'])
def test_feature_extractors_agree(feature_cls):
    """timm's three feature extractors give the same NCHW maps: a hook on `norm{i}` saw (N, H, W, C) tensors when the
    stage norm ran on tokens, and fx could not trace the kernel choices."""
    def make(**kw):
        torch.manual_seed(0)
        return timm.create_model('dsan_t', features_only=True, backend=BACKEND, **SMALL, **kw).eval()
    model, ref = make(feature_cls=feature_cls), make()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats, expected = model(x), ref(x)
    assert [tuple(f.shape) for f in feats] == [(2, c, 64 // r, 96 // r) for c, r in
                                               zip(ref.feature_info.channels(), ref.feature_info.reduction())]
    for f, e in zip(feats, expected):
        torch.testing.assert_close(f, e, rtol=0, atol=0)
    y = model.train()(x)
    sum(f.sum() for f in y).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_create_feature_extractor_and_stage_norm_hooks():
    from timm.models import create_feature_extractor
    torch.manual_seed(0)
    model = timm.create_model('dsan_t', backend=BACKEND, **SMALL).eval()
    x = torch.randn(1, 3, 64, 64)
    seen = []
    model.norm2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        logits = model(x)
        out = create_feature_extractor(model, return_nodes={'norm2': 'n2', 'head': 'logits'})(x)
    assert seen[0] == (1, 64, 8, 8)  # NCHW, as the stage's output
    assert out['n2'].shape == (1, 64, 8, 8)
    torch.testing.assert_close(out['logits'], logits, rtol=0, atol=0)


def test_torch_jit_script_is_refused_clearly():
    model = timm.create_model('dsan_t', backend=BACKEND, **SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch.jit.script's own deprecation warning
        with pytest.raises(RuntimeError, match='DSAN cannot be scripted with torch.jit.script.*torch.export'):
            torch.jit.script(model)
