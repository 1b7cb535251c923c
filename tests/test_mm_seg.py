"""Segmentation on mmsegmentation: the DSAN mm backbone adapter, the eight configs, and the tools end to end.

The ``slow`` tests run the real `segmentation/tools` scripts (train, test, dist_train.sh, visualize, get_flops) in
subprocesses on tiny generated data in ADE20K and Cityscapes layout; they run in CI too.
"""
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip('mmseg', reason='the OpenMMLab stack is not installed (bash scripts/install_mm.sh)')

import timm  # noqa: E402
from conftest import BACKEND, ROOT, load_tool  # noqa: E402
from mm_common import S_ARCH, T_ARCH, free_port, run_script, script_env  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402

import dsan.mm  # noqa: E402,F401  (registers DSAN, installs the checkpoint reader)
from dsan.data.demo import make_segmentation  # noqa: E402
from dsan.mm import DSANBackbone, load_checkpoint_file, sync_bn_to_bn  # noqa: E402
from dsan.models.dsan import CheckpointError  # noqa: E402

PY = sys.executable
SEG = ROOT / 'segmentation'
CONFIGS = SEG / 'configs'


# config: (arch, head, dataset, iterations, checkpoint/eval interval)
RECIPES = {
    'ham/ham_dsan_t_ade20k_160k.py': (T_ARCH, 'ham_t', 'ade20k', 160000, 2000),
    'ham/ham_dsan_t_ade20k_80k.py': (T_ARCH, 'ham_t', 'ade20k', 80000, 2000),
    'ham/ham_dsan_s_ade20k_160k.py': (S_ARCH, 'ham_s', 'ade20k', 160000, 1000),
    'ham/ham_dsan_s_ade20k_80k.py': (S_ARCH, 'ham_s', 'ade20k', 80000, 2000),
    'ham/ham_dsan_t_cityscapes_80k.py': (T_ARCH, 'ham_t', 'cityscapes', 80000, 2000),
    'ham/ham_dsan_s_cityscapes_80k.py': (S_ARCH, 'ham_s', 'cityscapes', 80000, 2000),
    'upernet/upernet_dsan_t_ade20k_160k.py': (T_ARCH, 'upernet', 'ade20k', 160000, 2000),
    'pspnet/pspnet_dsan_t_ade20k_160k.py': (T_ARCH, 'pspnet', 'ade20k', 160000, 2000),
}
HEADS = {
    'ham_t': dict(type='LightHamHead', in_channels=[64, 160, 256], in_index=[1, 2, 3], channels=256, ham_channels=256,
                  ham_kwargs=dict(MD_R=16), norm_cfg=dict(type='GN', num_groups=32, requires_grad=True)),
    'ham_s': dict(type='LightHamHead', in_channels=[128, 320, 512], in_index=[1, 2, 3], channels=512,
                  ham_channels=512, ham_kwargs=dict(MD_R=16), norm_cfg=dict(type='GN', num_groups=32,
                                                                           requires_grad=True)),
    'upernet': dict(type='UPerHead', in_channels=[32, 64, 160, 256], in_index=[0, 1, 2, 3], channels=512,
                    pool_scales=(1, 2, 3, 6), norm_cfg=dict(type='SyncBN', requires_grad=True)),
    'pspnet': dict(type='PSPHead', in_channels=256, in_index=3, channels=512, pool_scales=(1, 2, 3, 6),
                   norm_cfg=dict(type='SyncBN', requires_grad=True)),
}
DATASETS = {
    # dataset type, data root, crop, test scale, classes
    'ade20k': ('ADE20KDataset', 'data/ade/ADEChallengeData2016', (512, 512), (2048, 512), 150),
    'cityscapes': ('CityscapesDataset', 'data/cityscapes/', (512, 1024), (2048, 1024), 19),
}


def _build(cfg_model, backend=BACKEND):
    init_default_scope('mmseg')
    cfg_model = Config(dict(model=cfg_model)).model
    cfg_model.backbone.init_cfg = None
    cfg_model.backbone.backend = backend
    sync_bn_to_bn(cfg_model)
    return MODELS.build(cfg_model)


# --------------------------------------------------------------------------------------------------------
# The configs


@pytest.mark.parametrize('name', sorted(RECIPES))
def test_config_matches_the_original_recipe(name):
    arch, head, dataset, iters, interval = RECIPES[name]
    cfg = Config.fromfile(CONFIGS / name)
    assert cfg.custom_imports.imports == ['dsan.mm'] and not cfg.custom_imports.allow_failed_imports
    assert cfg.default_scope == 'mmseg'

    bb = cfg.model.backbone
    assert bb.type == 'DSAN'
    assert {k: bb[k] for k in arch} == arch
    assert bb.norm_cfg == dict(type='SyncBN', requires_grad=True)
    variant = 't' if arch is T_ARCH else 's'
    assert bb.init_cfg == dict(type='Pretrained', checkpoint=f'pretrained/dsan_{variant}_encoder.pth')

    dh = cfg.model.decode_head
    for k, v in HEADS[head].items():
        assert dh[k] == v, (k, dh[k], v)
    assert dh.dropout_ratio == 0.1 and dh.align_corners is False
    assert dh.num_classes == DATASETS[dataset][4]
    assert dh.loss_decode == dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)
    assert 'auxiliary_head' not in cfg.model
    assert cfg.model.test_cfg == dict(mode='whole')

    ow = cfg.optim_wrapper
    assert ow.optimizer == dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01)
    keys = ow.paramwise_cfg.custom_keys
    assert keys['norm'] == dict(decay_mult=0.) and keys['head'] == dict(lr_mult=10.)
    warmup, poly = cfg.param_scheduler
    assert (warmup.type, warmup.start_factor, warmup.begin, warmup.end, warmup.by_epoch) == \
        ('LinearLR', 1e-6, 0, 1500, False)
    assert (poly.type, poly.power, poly.eta_min, poly.begin, poly.end, poly.by_epoch) == \
        ('PolyLR', 1.0, 1e-6, 1500, iters, False)
    assert cfg.train_cfg.max_iters == iters and cfg.train_cfg.val_interval == interval
    assert cfg.default_hooks.checkpoint.interval == interval and cfg.default_hooks.checkpoint.by_epoch is False

    ds_type, root, crop, test_scale, _ = DATASETS[dataset]
    assert cfg.train_dataloader.batch_size == 4
    train_ds = cfg.train_dataloader.dataset
    assert train_ds.type == ds_type and train_ds.data_root == root
    assert cfg.model.data_preprocessor.size == crop
    crop_t = next(t for t in train_ds.pipeline if t.type == 'RandomCrop')
    assert crop_t.crop_size == crop and crop_t.cat_max_ratio == 0.75
    resize_t = next(t for t in train_ds.pipeline if t.type == 'RandomResize')
    assert resize_t.scale == test_scale and resize_t.ratio_range == (0.5, 2.0)
    test_pipe = cfg.test_dataloader.dataset.pipeline
    assert next(t for t in test_pipe if t.type == 'Resize').scale == test_scale
    # The original resized ADE20K test images to a multiple of 32; not Cityscapes.
    assert any(t.type == 'ResizeToMultiple' for t in test_pipe) == (dataset == 'ade20k')
    assert cfg.tta_model.type == 'SegTTAModel'
    # --tta as the original's aug-test: ratios 0.5-1.75 of the test scale (not of each image's size), then flips.
    tta = cfg.tta_pipeline[1]
    assert tta.type == 'TestTimeAug'
    scales, *rest = tta.transforms
    w, h = test_scale
    assert [(t.type, t.scale, t.keep_ratio) for t in scales] == \
        [('Resize', (int(w * r), int(h * r)), True) for r in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)]
    assert (rest[0] == [dict(type='ResizeToMultiple', size_divisor=32)]) == (dataset == 'ade20k')
    assert [t.prob for t in rest[-3]] == [0., 1.]


@pytest.mark.parametrize('name', sorted(RECIPES))
def test_config_builds_and_runs(name):
    cfg = Config.fromfile(CONFIGS / name)
    model = _build(cfg.model).eval()
    bb = model.backbone
    assert isinstance(bb, DSANBackbone)
    # Single process, no CUDA: SyncBN ran as plain BatchNorm.
    assert type(bb.block1[0].norm1) is torch.nn.BatchNorm2d and bb.norm1.eps == 1e-5
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96), mode='tensor')
    stride = 32 if 'pspnet' in name else (4 if 'upernet' in name else 8)
    assert out.shape == (1, cfg.model.decode_head.num_classes, 64 // stride, 96 // stride)
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------------------
# The backbone adapter


def _adapter(**kw):
    args = dict(T_ARCH, drop_path_rate=0.0, norm_cfg=dict(type='BN', requires_grad=True), backend=BACKEND)
    args.update(kw)
    return DSANBackbone(**args)


def test_adapter_returns_the_normalised_stage_maps_of_the_one_definition():
    torch.manual_seed(0)
    adapter = _adapter().double().eval()
    reference = timm.create_model('dsan_t', num_classes=0, norm_eps=1e-5, backend=BACKEND).double().eval()
    # Same names as the timm model (minus its classifier): the weights move over strictly.
    reference.load_state_dict(adapter.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        outs = adapter(x)
        expected = reference.forward_intermediates(x, intermediates_only=True)
    assert len(outs) == 4
    for i, (o, e) in enumerate(zip(outs, expected)):
        assert o.shape == (2, T_ARCH['embed_dims'][i], 64 // 2 ** (i + 2), 96 // 2 ** (i + 2))
        assert o.is_contiguous()  # NCHW, as the original returned
        torch.testing.assert_close(o, e, rtol=0, atol=0)
    # Each map is its stage's LayerNorm output: zero mean, unit variance over channels.
    last = outs[3].permute(0, 2, 3, 1)
    torch.testing.assert_close(last.mean(-1), torch.zeros_like(last[..., 0]), atol=1e-8, rtol=0)


def test_adapter_state_dict_names_are_the_originals():
    names = set(_adapter().state_dict())
    assert 'patch_embed1.proj.weight' in names and 'norm4.weight' in names
    assert 'block3.4.attn.spatial_gating_unit.dscn_x.offset.weight' in names
    assert 'block1.0.mlp.dwconv.dwconv.weight' in names and 'block2.2.layer_scale_2' in names
    assert not any(k.startswith('head') for k in names)


def test_adapter_out_indices_and_frozen_stages():
    adapter = _adapter(out_indices=(3, 1), frozen_stages=2)
    outs = adapter(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [256, 64]
    adapter.train()
    for i in (1, 2):
        assert not any(p.requires_grad for n, p in adapter.named_parameters()
                       if n.startswith((f'patch_embed{i}.', f'block{i}.', f'norm{i}.')))
        frozen = [getattr(adapter, f'patch_embed{i}'), getattr(adapter, f'block{i}'), getattr(adapter, f'norm{i}')]
        assert not any(m.training for part in frozen for m in part.modules())
    assert all(p.requires_grad for n, p in adapter.named_parameters() if n.startswith(('block3.', 'norm4.')))
    assert adapter.block3[0].norm1.training


def test_adapter_out_indices_as_an_int():
    """A single stage may be given as an int, as mmseg's backbones take it; anything else is named."""
    outs = _adapter(out_indices=3)(torch.randn(1, 3, 64, 64))
    assert len(outs) == 1 and outs[0].shape == (1, 256, 2, 2)
    with pytest.raises(TypeError, match=r"out_indices must be an int or a sequence of ints .*got str '3'"):
        _adapter(out_indices='3')


def test_adapter_with_fewer_stages_loads_a_full_checkpoint():
    """num_stages=3 builds three stages; a four-stage file loads into them (its stage-4 keys left out) and the maps
    equal the four-stage backbone's."""
    torch.manual_seed(0)
    full = _adapter(out_indices=(0, 1, 2, 3)).eval()
    three = _adapter(num_stages=3, out_indices=(0, 1, 2)).eval()
    assert not any(hasattr(three, f'{m}4') for m in ('patch_embed', 'block', 'norm'))
    three.load_pretrained({'state_dict': full.state_dict()})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(three(x), full(x)[:3], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r'out_indices'):
        _adapter(num_stages=3, out_indices=(3,))


def test_adapter_with_fewer_stages_keeps_the_originals_defaults():
    """As the original: the maps of every stage built by default, and the drop-path rates spaced over the blocks of
    all the listed stages (here 13), not only the built ones."""
    three = _adapter(num_stages=3, drop_path_rate=0.1)
    assert three.out_indices == (0, 1, 2) and len(three(torch.randn(1, 3, 64, 64))) == 3
    full = _adapter(drop_path_rate=0.1)
    assert full.out_indices == (0, 1, 2, 3)
    rates = lambda m, n: [b.drop_path.drop_prob if hasattr(b.drop_path, 'drop_prob') else 0.  # noqa: E731
                          for i in range(n) for b in getattr(m, f'block{i + 1}')]
    expected = torch.linspace(0, 0.1, 13).tolist()
    assert rates(full, 4) == pytest.approx(expected, abs=1e-12)  # float32 linspace: to its rounding below
    assert rates(three, 3) == pytest.approx(expected[:11], abs=1e-7)
    assert rates(three, 3)[-1] == pytest.approx(0.1 * 10 / 12)


def test_adapter_takes_the_original_linear_argument():
    assert _adapter(linear=False).num_stages == 4  # as every original config passes it


def test_adapter_norm_cfg():
    sync = _adapter(norm_cfg=dict(type='SyncBN', requires_grad=True))
    assert type(sync.patch_embed1.norm) is torch.nn.BatchNorm2d  # no multi-process CUDA run here
    frozen = _adapter(norm_cfg=dict(type='BN', requires_grad=False))
    assert not frozen.block2[1].norm2.weight.requires_grad
    # (32 groups: a divisor of the widths; the LayerNorm check had built a probe of 8 channels, which refused it)
    assert type(_adapter(norm_cfg=dict(type='GN', num_groups=32)).block1[0].norm1) is torch.nn.GroupNorm
    # A LayerNorm normalises the last axis, not NCHW maps: it had been taken silently as the stage norm, and the
    # blocks were built with BatchNorms.
    with pytest.raises(ValueError, match=r"norm_cfg \{'type': 'LN'\} builds a LayerNorm.*'BN', 'SyncBN', 'GN'"):
        _adapter(norm_cfg=dict(type='LN'))


@pytest.mark.parametrize('kwargs, match', [
    (dict(paddings=[5, 5, 3, 3]), r'paddings must be \[5, 5, 3, 2\].*got \[5, 5, 3, 3\]'),
    (dict(strides=[1, 2, 1, 1]), r'strides must be \[1, 1, 1, 1\]'),
    (dict(dilations=[2, 1, 1, 1]), r'dilations must be'),
    (dict(out_indices=(4,)), r'out_indices must be .*\[0, 3\], got \[4\]'),
    (dict(frozen_stages=5), r'frozen_stages must be in \[-1, 4\], got 5'),
    (dict(num_stages=5), r'num_stages must be in \[1, 4\].*got 5'),
    (dict(linear=True), r"linear=True \(the original's ReLU after each MLP's fc1"),
    (dict(pretrained='x.pth', init_cfg=dict(type='Pretrained', checkpoint='x.pth')), 'cannot be set at the same'),
])
def test_adapter_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _adapter(**kwargs)


def test_adapter_pretrained_argument_is_deprecated_init_cfg():
    with pytest.warns(FutureWarning, match='pretrained'):
        adapter = _adapter(pretrained='some.pth')
    assert adapter.init_cfg == dict(type='Pretrained', checkpoint='some.pth')
    with pytest.raises(TypeError, match='pretrained must be a str or None'):
        _adapter(pretrained=3)
    with pytest.raises(TypeError, match="init_cfg must be a dict.*got str"):
        _adapter(init_cfg="{'type': 'Pretrained'}")


def test_adapter_pretrained_without_a_file_keeps_its_initialisation():
    adapter = _adapter(init_cfg=dict(type='Pretrained', checkpoint=None))
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    adapter.init_weights()
    assert adapter.is_init
    for k, v in adapter.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def _classification_state_dict(groups=(1, 4, 8, 8)):
    model = timm.create_model('dsan_t', groups=groups, backend=BACKEND)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_loaded(adapter, state_dict):
    own = adapter.state_dict()
    for k, v in own.items():
        torch.testing.assert_close(v, state_dict[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize('fmt', ['encoder', 'wrapped', 'classification', 'segmentor', 'safetensors'])
def test_adapter_loads_pretrained_files_strictly(tmp_path, fmt):
    sd = _classification_state_dict()
    encoder = {k: v for k, v in sd.items() if not k.startswith('head.')}
    path = tmp_path / 'ckpt.pth'
    if fmt == 'encoder':  # the original's pretrained/dsan_t_encoder.pth: the backbone state_dict alone
        torch.save(encoder, path)
    elif fmt == 'wrapped':  # DDP-saved, under 'state_dict'
        torch.save({'state_dict': {f'module.{k}': v for k, v in encoder.items()}}, path)
    elif fmt == 'classification':  # a timm training checkpoint, classifier included
        torch.save({'epoch': 3, 'arch': 'dsan_t', 'state_dict': sd}, path)
    elif fmt == 'segmentor':  # a whole segmentor: backbone.* and decode_head.*
        torch.save({'meta': {'iter': 10}, 'state_dict': {
            **{f'backbone.{k}': v for k, v in encoder.items()},
            'decode_head.conv_seg.weight': torch.zeros(150, 256, 1, 1)}}, path)
    else:
        from safetensors.torch import save_file
        path = tmp_path / 'ckpt.safetensors'
        save_file(encoder, str(path))
    adapter = _adapter(init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    adapter.init_weights()
    assert adapter.is_init
    _assert_loaded(adapter, encoder)


@pytest.mark.parametrize('prefix', ['student.', 'student'])
def test_adapter_prefix_option(tmp_path, prefix):
    """A prefix without its dot means the same, as in mmengine's Pretrained init (mmdet's configs write
    `prefix='backbone'`)."""
    encoder = {k: v for k, v in _classification_state_dict().items() if not k.startswith('head.')}
    torch.save({'state_dict': {f'student.{k}': v for k, v in encoder.items()}}, tmp_path / 'kd.pth')
    adapter = _adapter(init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'kd.pth'), prefix=prefix))
    adapter.init_weights()
    _assert_loaded(adapter, encoder)


@pytest.mark.parametrize('in_chans', [1, 4])
def test_adapter_adapts_an_rgb_stem_to_in_chans(tmp_path, in_chans):
    """As timm's pretrained loading: the RGB stem summed over its channels for one input channel, tiled and
    rescaled for more; every other weight loads as it is."""
    from timm.models import adapt_input_conv
    encoder = {k: v for k, v in _classification_state_dict().items() if not k.startswith('head.')}
    torch.save(encoder, tmp_path / 'rgb.pth')
    adapter = _adapter(in_chans=in_chans, init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'rgb.pth')))
    adapter.init_weights()
    stem = encoder['patch_embed1.proj.weight']
    assert adapter.patch_embed1.proj.weight.shape[1] == in_chans
    torch.testing.assert_close(adapter.patch_embed1.proj.weight, adapt_input_conv(in_chans, stem), rtol=0, atol=0)
    if in_chans == 1:
        torch.testing.assert_close(adapter.patch_embed1.proj.weight, stem.sum(1, keepdim=True))
    _assert_loaded(adapter, {**encoder, 'patch_embed1.proj.weight': adapter.patch_embed1.proj.weight})
    assert adapter(torch.randn(1, in_chans, 64, 64))[0].isfinite().all()
    two = {**encoder, 'patch_embed1.proj.weight': stem[:, :2].clone()}  # only an RGB stem is adapted
    torch.save(two, tmp_path / 'two.pth')
    with pytest.raises(CheckpointError, match=r'stem \(patch_embed1.proj\) takes 2 input channels, in_chans is'):
        _adapter(init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'two.pth'))).init_weights()


def test_adapter_names_the_stage_when_groups_disagree(tmp_path):
    torch.save(_classification_state_dict(groups=(4, 8, 16, 16)), tmp_path / 'g.pth')
    adapter = _adapter(init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'g.pth')))
    with pytest.raises(CheckpointError, match=r'stage 1 has DSCN groups 4 in the checkpoint but 1 in the config'):
        adapter.init_weights()


def test_adapter_reports_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        _adapter(init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'missing.pth'))).init_weights()
    s_model = timm.create_model('dsan_s', backend=BACKEND)
    torch.save(s_model.state_dict(), tmp_path / 's.pth')
    with pytest.raises(CheckpointError):
        _adapter(init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 's.pth'))).init_weights()


def test_adapter_list_init_cfg_loads_through_the_dsan_loader(tmp_path):
    """A Pretrained entry of a list init_cfg is loaded as a single one is (strictly, groups checked); the other
    entries keep mmengine's initialisers and run first; two Pretrained entries are refused."""
    encoder = {k: v for k, v in _classification_state_dict().items() if not k.startswith('head.')}
    torch.save({'meta': {'iter': 10}, 'state_dict': {**{f'backbone.{k}': v for k, v in encoder.items()},
                                                     'decode_head.conv_seg.weight': torch.zeros(150, 256, 1, 1)}},
               tmp_path / 'seg.pth')
    pretrained = dict(type='Pretrained', checkpoint=str(tmp_path / 'seg.pth'))
    adapter = _adapter(init_cfg=[pretrained])
    adapter.init_weights()
    assert adapter.is_init
    _assert_loaded(adapter, encoder)
    constant = dict(type='Constant', layer='Conv2d', val=0.25, bias=0.0)
    adapter = _adapter(init_cfg=[constant])
    adapter.init_weights()
    assert bool((adapter.patch_embed1.proj.weight == 0.25).all())
    adapter = _adapter(init_cfg=[constant, pretrained])
    adapter.init_weights()
    _assert_loaded(adapter, encoder)
    assert adapter.init_cfg == [constant, pretrained]
    torch.save(_classification_state_dict(groups=(4, 8, 16, 16)), tmp_path / 'g.pth')
    with pytest.raises(CheckpointError, match=r'stage 1 has DSCN groups 4 in the checkpoint but 1 in the config'):
        _adapter(init_cfg=[dict(type='Pretrained', checkpoint=str(tmp_path / 'g.pth'))]).init_weights()
    with pytest.raises(ValueError, match='init_cfg has 2 Pretrained entries, expected at most one'):
        _adapter(init_cfg=[pretrained, pretrained]).init_weights()


def test_released_segmentor_checkpoint_loads_strictly(tmp_path):
    """An original mmseg 0.x file (meta / state_dict / optimizer) fits the model built from our config."""
    cfg = Config.fromfile(CONFIGS / 'ham/ham_dsan_t_ade20k_160k.py')
    source = _build(cfg.model)
    ckpt = _mmseg0x_checkpoint(source)
    torch.save(ckpt, tmp_path / 'released.pth')
    target = _build(cfg.model)
    loaded = load_checkpoint_file(tmp_path / 'released.pth')
    target.load_state_dict(loaded['state_dict'], strict=True)
    for k, v in target.state_dict().items():
        torch.testing.assert_close(v, ckpt['state_dict'][k], rtol=0, atol=0)


def _mmseg0x_checkpoint(model) -> dict:
    """A checkpoint laid out as mmseg 0.x / mmcv 1.x wrote them."""
    from mmseg.datasets import ADE20KDataset
    return {
        'meta': {'env_info': 'sys.platform: linux', 'seed': 0, 'exp_name': 'ham_dsan_t_ade20k_160k.py',
                 'mmseg_version': '0.24.1', 'config': 'norm_cfg = dict(type="SyncBN")', 'mmcv_version': '1.5.0',
                 'CLASSES': ADE20KDataset.METAINFO['classes'], 'PALETTE': ADE20KDataset.METAINFO['palette'],
                 'epoch': 1, 'iter': 160000, 'time': 'Mon Jan  1 00:00:00 2024', 'hook_msgs': {}},
        'state_dict': {k: v.clone() for k, v in model.state_dict().items()},
        'optimizer': {'state': {}, 'param_groups': [{'lr': 1e-6, 'betas': (0.9, 0.999), 'weight_decay': 0.01,
                                                     'params': [0, 1]}]},
    }


# --------------------------------------------------------------------------------------------------------
# Checkpoint reading and writing


def test_reader_loads_mmengine_training_checkpoints_and_refuses_code(tmp_path):
    import numpy as np
    from mmengine.logging import HistoryBuffer
    buf = HistoryBuffer()
    buf.update(0.5)
    torch.save({'state_dict': {'w': torch.ones(2)}, 'message_hub': {'log_scalars': {'loss': buf}},
                'meta': {'best': np.float64(0.25), 'arr': np.arange(3)}}, tmp_path / 'ok.pth')
    ckpt = load_checkpoint_file(tmp_path / 'ok.pth')
    assert ckpt['message_hub']['log_scalars']['loss'].mean() == 0.5 and ckpt['meta']['best'] == 0.25

    class Evil:
        def __reduce__(self):
            return os.system, ('echo owned',)

    with open(tmp_path / 'evil.pth', 'wb') as f:
        torch.save({'state_dict': {}, 'x': Evil()}, f)
    with pytest.raises(CheckpointError, match=r'outside the allowlist.*system'):
        load_checkpoint_file(tmp_path / 'evil.pth')

    class Sneaky:  # getattr is allowed only on HistoryBuffer's public methods
        def __reduce__(self):
            return getattr, (HistoryBuffer, '__init__')

    torch.save({'x': Sneaky()}, tmp_path / 'sneaky.pth')
    with pytest.raises(CheckpointError, match='not allowed in a checkpoint'):
        load_checkpoint_file(tmp_path / 'sneaky.pth')
    (tmp_path / 'junk.pth').write_bytes(b'not a checkpoint')
    with pytest.raises(CheckpointError, match='junk.pth'):
        load_checkpoint_file(tmp_path / 'junk.pth')


def test_reader_says_what_a_non_checkpoint_file_is(tmp_path):
    (tmp_path / 'lfs.pth').write_text('version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 9\n')
    (tmp_path / 'hello.pth').write_text('hello world\n')
    for name, reason in (('lfs.pth', 'is a Git LFS pointer .*run git lfs pull'),
                         ('hello.pth', r"is not a torch checkpoint \(starts with b'hello world\\n'\)")):
        with pytest.raises(CheckpointError, match=reason) as e:
            load_checkpoint_file(tmp_path / name)
        assert 'weights_only' not in str(e.value)


def test_mmengine_writes_checkpoints_atomically(tmp_path, monkeypatch):
    from mmengine.runner.checkpoint import save_checkpoint
    target = tmp_path / 'iter_1.pth'
    save_checkpoint({'state_dict': {'w': torch.ones(1)}}, str(target))
    assert load_checkpoint_file(target)['state_dict']['w'].item() == 1.0

    def fail(*a, **k):
        raise OSError('disk full')
    monkeypatch.setattr(os, 'fsync', fail)
    with pytest.raises(OSError, match='disk full'):
        save_checkpoint({'state_dict': {'w': torch.zeros(1)}}, str(target))
    # The old file is intact and no temporary file is left behind.
    assert load_checkpoint_file(target)['state_dict']['w'].item() == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ['iter_1.pth']


# --------------------------------------------------------------------------------------------------------
# Tools


def test_baseline_miou_counts_a_constant_prediction(tmp_path):
    import numpy as np
    from PIL import Image
    baseline = load_tool('segmentation/tools/baseline_miou.py')
    a = np.zeros((4, 4), np.uint8)
    a[:2, :2] = 1  # 4 px of class 1, 12 px background
    b = np.full((4, 4), 255, np.uint8)
    b[0, :] = 2  # 4 px of class 2, the rest ignored
    Image.fromarray(a).save(tmp_path / 'a.png')
    Image.fromarray(b).save(tmp_path / 'b.png')
    paths = sorted(tmp_path.glob('*.png'))
    # Background everywhere: IoU(bg) = 12 / 20, classes 1 and 2 get 0, class 3 is absent (left out).
    assert baseline.constant_prediction_miou(paths, 4) == pytest.approx(100 * (12 / 20) / 3)
    with pytest.raises(ValueError, match=r'values \[2\] are not classes 0..1'):
        baseline.constant_prediction_miou(paths, 2)
    # An mIoU of 0 is a result, not a failure: exit status 0 (sys.exit(0.0) used to exit 1, printing "0.0").
    r = subprocess.run([sys.executable, str(ROOT / 'segmentation/tools/baseline_miou.py'), str(tmp_path),
                        '--num-classes', '4', '--label', '3'], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr.strip() == '', r.stderr


def test_baseline_miou_reads_the_official_layouts(tmp_path):
    """ADE20K's raw labels (0 = ignore, class c stored as c + 1) with --reduce-zero-label, as mmseg reads them; a
    Cityscapes gtFine folder through --suffix, which leaves out its colour / instance / id maps."""
    import numpy as np
    from PIL import Image
    baseline = load_tool('segmentation/tools/baseline_miou.py')
    ade = tmp_path / 'ade'
    ade.mkdir()
    raw = np.array([[0, 1, 1, 150], [150, 150, 255, 0]], np.uint8)  # 2 ignored + 1 raw 255, 2 px class 0, 3 px 149
    Image.fromarray(raw).save(ade / 'a.png')
    # Predicting class 149 ('flag'): IoU(149) = 3 / 5, IoU(0) = 0; the other classes are absent.
    expected = 100 * (3 / 5) / 2
    assert baseline.constant_prediction_miou([ade / 'a.png'], 150, 149, reduce_zero_label=True) == \
        pytest.approx(expected)
    assert baseline.main([str(ade), '--num-classes', '150', '--label', '149', '--reduce-zero-label']) == \
        pytest.approx(expected)
    city = tmp_path / 'gtFine' / 'val' / 'aachen'
    city.mkdir(parents=True)
    Image.fromarray(np.array([[18, 255], [0, 0]], np.uint8)).save(city / 'x_gtFine_labelTrainIds.png')
    Image.fromarray(np.full((2, 2), 200, np.uint8)).save(city / 'x_gtFine_color.png')
    r = subprocess.run([sys.executable, str(ROOT / 'segmentation/tools/baseline_miou.py'), str(tmp_path / 'gtFine'),
                        '--num-classes', '19', '--label', '18', '--suffix', '_gtFine_labelTrainIds.png'],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and 'mIoU 16.67 over 1 label maps' in r.stdout, r.stdout + r.stderr
    # Without the suffix the colour map is read too and refused in one line (exit 2), naming the file.
    r = subprocess.run([sys.executable, str(ROOT / 'segmentation/tools/baseline_miou.py'), str(tmp_path / 'gtFine'),
                        '--num-classes', '19'], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and 'x_gtFine_color.png: values [200]' in r.stderr and 'Traceback' not in r.stderr


@pytest.mark.parametrize('name', ['ham/ham_dsan_t_ade20k_160k.py', 'ham/ham_dsan_s_cityscapes_80k.py'])
def test_data_root_moves_every_dataset(name, tmp_path):
    from dsan.mm.tools import load_config
    cfg = load_config(str(CONFIGS / name), None, None, 'none', data_root=str(tmp_path))
    assert [cfg[f'{s}_dataloader'].dataset.data_root for s in ('train', 'val', 'test')] == [str(tmp_path)] * 3


def test_data_root_moves_the_datasets_inside_concatenations_and_wrappers(tmp_path):
    """A user's config may concatenate datasets (ConcatDataset takes no data_root: setting it there stopped the
    run) or wrap them (RepeatDataset); --data-root moves each dataset that reads files."""
    from mmengine.config import Config

    from dsan.mm.utils import set_data_root
    leaf = dict(type='ADE20KDataset', data_root='data/ade/', data_prefix=dict(img_path='images/training'))
    cfg = Config(dict(
        train_dataloader=dict(dataset=dict(type='ConcatDataset', datasets=[
            leaf, dict(type='RepeatDataset', times=2, dataset=leaf)])),
        val_dataloader=dict(dataset=dict(type='RepeatDataset', times=1, dataset=leaf)),
        test_dataloader=dict(dataset=leaf)))
    set_data_root(cfg, str(tmp_path))
    train = cfg.train_dataloader.dataset
    assert 'data_root' not in train and 'data_root' not in train.datasets[1]
    assert train.datasets[0].data_root == train.datasets[1].dataset.data_root == str(tmp_path)
    assert cfg.val_dataloader.dataset.dataset.data_root == cfg.test_dataloader.dataset.data_root == str(tmp_path)


def test_schedule_custom_keys_name_parameters():
    """Every paramwise custom key of the shipped schedule names some parameter of the model (mmengine ignores a
    key that matches nothing, as the original's 'pos_block' did)."""
    from dsan.mm.tools import build_model
    cfg = Config.fromfile(CONFIGS / 'ham/ham_dsan_t_ade20k_160k.py')
    names = [n for n, _ in build_model(str(CONFIGS / 'ham/ham_dsan_t_ade20k_160k.py')).named_parameters()]
    for key in cfg.optim_wrapper.paramwise_cfg.custom_keys:
        assert any(key in n for n in names), key


@pytest.mark.parametrize('tool', ['segmentation/tools/visualize.py', 'detection/tools/visualize.py'])
def test_visualize_tools_take_the_original_flag_spellings(tool):
    r = subprocess.run([sys.executable, str(ROOT / tool), '--help'], capture_output=True, text=True, timeout=120,
                       env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
    assert r.returncode == 0 and '--image-dir IMAGE_DIR, --image_dir IMAGE_DIR' in r.stdout, r.stdout + r.stderr
    assert '--out-dir OUT_DIR, --out_dir OUT_DIR' in r.stdout


def test_output_names_keep_apart_images_of_one_stem():
    from pathlib import Path

    from dsan.mm.utils import output_names
    images = [Path('d/a.JPG'), Path('d/a.png'), Path('d/b.jpg')]
    assert output_names(images, 't') == ['a_jpg_t.png', 'a_png_t.png', 'b_t.png']
    # Names that would still meet (suffixes differing in case; a file named like another's drawing) get a counter,
    # compared case-insensitively (one file on macOS and Windows).
    assert output_names([Path('a.JPG'), Path('a.jpg'), Path('b.png')], 't') == ['a_jpg_t.png', 'a_jpg_t_1.png',
                                                                                 'b_t.png']
    assert output_names([Path('a.jpg'), Path('a.png'), Path('a_jpg.png')], 't') == ['a_jpg_t.png', 'a_png_t.png',
                                                                                    'a_jpg_t_1.png']
    names = output_names([Path(f'{s}.{e}') for s in ('x', 'X', 'x_png') for e in ('png', 'PNG', 'jpg')], 't')
    assert len({n.lower() for n in names}) == 9


def test_overlay_blends_and_draws_a_legend():
    import numpy as np
    vis = load_tool('segmentation/tools/visualize.py')
    image = np.full((8, 10, 3), 100, np.uint8)
    labels = np.zeros((8, 10), np.int64)
    labels[:, 5:] = 1
    labels[0, 0] = 255  # ignore: left clear
    out = np.asarray(vis.overlay(image, labels, [[0, 0, 0], [200, 0, 0]], ['bg', 'thing'], 0.5, legend=False))
    assert out.shape == (8, 10, 3)
    assert tuple(out[0, 0]) == (100, 100, 100) and tuple(out[1, 0]) == (50, 50, 50)
    assert tuple(out[0, 9]) == (150, 50, 50)
    with_legend = vis.overlay(image, labels, [[0, 0, 0], [200, 0, 0]], ['bg', 'thing'], 0.5)
    assert with_legend.width > 10
    with pytest.raises(ValueError, match='opacity'):
        vis.overlay(image, labels, [[0, 0, 0], [200, 0, 0]], ['bg', 'thing'], 1.5)


def test_visualize_names_the_classes_of_the_checkpoint_then_of_the_config(tmp_path):
    """'auto' takes the checkpoint's classes, then those of the config's test dataset, and guesses ADE20K / Cityscapes
    from the class count last: a custom 19-class checkpoint was drawn with Cityscapes' names, and a checkpoint without
    classes (a bare state_dict) failed, though the config named them."""
    from mmseg.datasets import CityscapesDataset
    from mmseg.registry import DATASETS

    from dsan.mm.utils import checkpoint_dataset_meta, config_dataset_meta
    vis = load_tool('segmentation/tools/visualize.py')
    init_default_scope('mmseg')
    demo = config_dataset_meta(Config.fromfile(CONFIGS / 'demo/ham_dsan_t_demo.py'), DATASETS)
    assert len(demo['classes']) == len(demo['palette']) == 11 and demo['classes'][:2] == ('background', 'disk')
    ade = config_dataset_meta(Config.fromfile(CONFIGS / 'ham/ham_dsan_t_ade20k_160k.py'), DATASETS)
    assert len(ade['classes']) == len(ade['palette']) == 150 and ade['classes'][0] == 'wall'
    custom = {'classes': tuple(f'c{i}' for i in range(19)), 'palette': [[i, i, i] for i in range(19)]}
    saved = checkpoint_dataset_meta({'state_dict': {}, 'meta': {'dataset_meta': custom, 'seed': 0}})
    assert saved == custom
    assert checkpoint_dataset_meta({'meta': {'CLASSES': ('a', 'b'), 'PALETTE': None}}) == {'classes': ('a', 'b')}
    assert checkpoint_dataset_meta({'backbone.x': torch.zeros(1)}) == checkpoint_dataset_meta({'meta': {}}) == {}

    # Class names in a file (mmengine reads a str as one) and a subset of Cityscapes' classes, with their own colours.
    names = tmp_path / 'classes.txt'
    names.write_text('sky\ncar\n')
    subset = Config.fromfile(CONFIGS / 'ham/ham_dsan_t_cityscapes_80k.py')
    subset.test_dataloader.dataset.metainfo = dict(classes=('car', 'person', 'road'))
    assert config_dataset_meta(subset, DATASETS) == {'classes': ('car', 'person', 'road'),
                                                     'palette': [[0, 0, 142], [220, 20, 60], [128, 64, 128]]}
    subset.test_dataloader.dataset.metainfo = dict(classes=str(names))
    assert config_dataset_meta(subset, DATASETS)['classes'] == ['sky', 'car']

    classes, colours, source = vis.resolve_meta('auto', 19, saved, {})
    assert (classes[0], colours[1], source) == ('c0', [1, 1, 1], 'checkpoint')
    classes, colours, source = vis.resolve_meta('auto', 11, {}, demo)
    assert (classes[1], source, colours[1]) == ('disk', 'config', list(demo['palette'][1]))
    names_only = {'classes': demo['classes']}  # colours generated, the same on every call
    colours = vis.resolve_meta('config', 11, {}, names_only)[1]
    assert len(colours) == 11 and colours == vis.resolve_meta('config', 11, {}, names_only)[1]
    classes, _, source = vis.resolve_meta('auto', 19, {}, demo)  # the config's 11 do not fit
    assert (classes, source) == (list(CityscapesDataset.METAINFO['classes']), 'cityscapes')
    with pytest.raises(ValueError, match=r"no class names for the model's 12 classes \(the config names 11\)"):
        vis.resolve_meta('auto', 12, {}, demo)
    with pytest.raises(ValueError, match='--palette checkpoint: the checkpoint names no classes'):
        vis.resolve_meta('checkpoint', 11, {}, demo)
    with pytest.raises(ValueError, match='--palette config has 11 classes but the model predicts 19'):
        vis.resolve_meta('config', 19, saved, demo)


def _data_opts(root, scale):
    """Small and quick: tiny data, 2 images of 64 px per batch, no workers, 3 iterations."""
    opts = [f'{split}_dataloader.dataset.data_root={root}' for split in ('train', 'val', 'test')]
    opts += [f'{split}_dataloader.{k}' for split in ('train', 'val', 'test')
             for k in ('num_workers=0', 'persistent_workers=False')]
    return opts + [
        'model.backbone.init_cfg=None', f'model.backbone.backend={BACKEND}', 'train_dataloader.batch_size=2',
        f'train_dataloader.dataset.pipeline.2.scale={scale}', 'model.data_preprocessor.size=(64,64)',
        'train_dataloader.dataset.pipeline.3.crop_size=(64,64)', 'train_cfg.max_iters=3', 'train_cfg.val_interval=3',
        'default_hooks.checkpoint.interval=3', 'default_hooks.logger.interval=1']


@pytest.fixture(scope='module')
def ade_tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp('ade_tiny')
    make_segmentation(str(root), num_classes=4, num_train=6, num_val=3, size=64, seed=3)
    return root


@pytest.fixture(scope='module')
def cityscapes_tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp('cityscapes_tiny')
    make_segmentation(str(root), num_classes=4, num_train=6, num_val=3, size=64, seed=4, layout='cityscapes')
    return root


def _miou(text: str) -> float:
    import re
    found = re.findall(r'mIoU: ([0-9.]+)', text)
    assert found, text[-3000:]
    return float(found[-1])


@pytest.mark.slow
@pytest.mark.parametrize('config, layout', [('ham/ham_dsan_t_ade20k_160k.py', 'ade'),
                                            ('ham/ham_dsan_t_cityscapes_80k.py', 'cityscapes')])
def test_train_then_test_through_the_real_tools(config, layout, ade_tiny, cityscapes_tiny, tmp_path):
    root, scale = (ade_tiny, '(256,64)') if layout == 'ade' else (cityscapes_tiny, '(128,64)')
    opts = _data_opts(root, scale)
    work = tmp_path / 'work'
    r = run_script([PY, SEG / 'tools/train.py', CONFIGS / config, '--work-dir', work, '--cfg-options', *opts])
    assert 'Iter(train) [3/3]' in r.stdout + r.stderr
    assert 0 <= _miou(r.stdout + r.stderr) <= 100
    ckpt = work / 'iter_3.pth'
    assert ckpt.is_file() and not list(work.glob('*.tmp-*'))
    r = run_script([PY, SEG / 'tools/test.py', CONFIGS / config, ckpt, '--work-dir', tmp_path / 'test',
              '--out', tmp_path / 'preds', '--cfg-options', *opts])
    assert 0 <= _miou(r.stdout + r.stderr) <= 100
    assert len(list((tmp_path / 'preds').rglob('*.png'))) == 3
    if layout == 'ade':  # the README's Python inference: the config saved in the checkpoint, after `import dsan.mm`
        image = sorted((root / 'images/validation').iterdir())[0]
        code = ('import dsan.mm; from mmseg.apis import MMSegInferencer; '
                f'r = MMSegInferencer(model=None, weights={str(ckpt)!r}, device="cpu")({str(image)!r}); '
                'print("labels", tuple(r["predictions"].shape))')
        r = run_script([PY, '-c', code])
        assert 'labels (64, ' in r.stdout, r.stdout[-2000:]
    # Resume continues from iteration 3 (the file mmengine wrote, read back with the safe reader).
    r = run_script([PY, SEG / 'tools/train.py', CONFIGS / config, '--work-dir', work, '--resume', '--cfg-options',
                    *opts, 'train_cfg.max_iters=4', 'train_cfg.val_interval=4', 'default_hooks.checkpoint.interval=4'])
    out = r.stdout + r.stderr
    assert 'resumed epoch: 0, iter: 3' in out and 'Iter(train) [4/4]' in out and 'Iter(train) [1/' not in out


@pytest.mark.slow
def test_test_tool_evaluates_an_original_mmseg0x_checkpoint(ade_tiny, tmp_path):
    config = CONFIGS / 'ham/ham_dsan_t_ade20k_160k.py'
    torch.save(_mmseg0x_checkpoint(_build(Config.fromfile(config).model)), tmp_path / 'released.pth')
    opts = _data_opts(ade_tiny, '(256,64)')
    for extra in ([], ['--tta'], ['--show-dir', 'vis']):
        r = run_script([PY, SEG / 'tools/test.py', config, tmp_path / 'released.pth', '--work-dir', tmp_path / 'w',
                        *extra, '--cfg-options', *opts])
        assert 0 <= _miou(r.stdout + r.stderr) <= 100
    # --show-dir: every image (mmseg's hook drew every 50th), under the work dir
    assert len(list((tmp_path / 'w' / 'vis').rglob('*.png'))) == 3
    # Strict by default: a checkpoint of another model is an error, not a silent random evaluation.
    bad = _mmseg0x_checkpoint(_build(Config.fromfile(CONFIGS / 'ham/ham_dsan_s_ade20k_160k.py').model))
    torch.save(bad, tmp_path / 'other.pth')
    r = run_script([PY, SEG / 'tools/test.py', config, tmp_path / 'other.pth', '--cfg-options', *opts], check=False)
    assert r.returncode != 0 and 'size mismatch' in r.stderr


@pytest.mark.slow
def test_dist_train_two_gloo_processes(ade_tiny, tmp_path):
    env = script_env(PORT=str(free_port()), PYTHON=PY)
    work = tmp_path / 'work'
    r = run_script(['bash', SEG / 'dist_train.sh', CONFIGS / 'ham/ham_dsan_t_ade20k_160k.py', '2',
                    '--work-dir', work, '--cfg-options', *_data_opts(ade_tiny, '(256,64)')], env=env)
    out = r.stdout + r.stderr
    assert "'backend': 'gloo'" in out and 'Distributed training: True' in out
    assert 'Iter(train) [3/3]' in out and (work / 'iter_3.pth').is_file()


@pytest.mark.slow
def test_slurm_launcher_runs_cpu_processes(ade_tiny, tmp_path):
    # Two tasks as srun starts them (MASTER_ADDR given, as a job script may: there is no scontrol here), and a
    # misspelt option, which is warned about and changes nothing.
    port, work = str(free_port()), tmp_path / 'work'
    args = [PY, SEG / 'tools/train.py', CONFIGS / 'ham/ham_dsan_t_ade20k_160k.py', '--launcher', 'slurm', '--work-dir',
            work, '--cfg-options', *_data_opts(ade_tiny, '(256,64)'), 'trian_cfg.max_iters=5']
    procs = []
    for rank in range(2):
        env = script_env(SLURM_PROCID=str(rank), SLURM_NTASKS='2', SLURM_LOCALID=str(rank), SLURM_NODELIST='node1',
                         MASTER_ADDR='127.0.0.1', MASTER_PORT=port)
        for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
            env.pop(name, None)
        procs.append(subprocess.Popen([str(a) for a in args], cwd=str(ROOT), env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert 'Distributed training: True' in outs[0] and "'backend': 'gloo'" in outs[0]
    assert 'Iter(train) [3/3]' in outs[0] and (work / 'iter_3.pth').is_file()
    assert '--cfg-options trian_cfg.max_iters: the config has no such entry' in outs[0]
    assert '(did you mean train_cfg?)' in outs[0]


def test_launcher_variables_become_torch_rendezvous_variables():
    from dsan.mm.tools import cpu_rendezvous_env
    slurm = dict(SLURM_PROCID='3', SLURM_NTASKS='8', SLURM_LOCALID='1', SLURM_NODELIST='n[1-2]', MASTER_ADDR='n1')
    assert cpu_rendezvous_env('slurm', slurm) == dict(RANK='3', WORLD_SIZE='8', LOCAL_RANK='1', MASTER_ADDR='n1',
                                                      MASTER_PORT='29500')
    mpi = dict(OMPI_COMM_WORLD_RANK='2', OMPI_COMM_WORLD_SIZE='4', OMPI_COMM_WORLD_LOCAL_RANK='0', MASTER_ADDR='h',
               MASTER_PORT='1234')
    assert cpu_rendezvous_env('mpi', mpi) == dict(RANK='2', WORLD_SIZE='4', LOCAL_RANK='0', MASTER_ADDR='h',
                                                  MASTER_PORT='1234')
    with pytest.raises(ValueError, match='--launcher mpi needs MASTER_ADDR'):
        cpu_rendezvous_env('mpi', {k: v for k, v in mpi.items() if k != 'MASTER_ADDR'})
    del slurm['MASTER_ADDR']
    if shutil.which('scontrol') is None:
        with pytest.raises(ValueError, match=r'MASTER_ADDR is not set and scontrol.*SLURM_NODELIST=n\[1-2\]'):
            cpu_rendezvous_env('slurm', slurm)


def test_unknown_cfg_options_are_named_with_the_closest_key():
    from dsan.mm.tools import new_option_keys
    cfg = Config.fromfile(CONFIGS / 'ham/ham_dsan_t_ade20k_160k.py')
    options = {'train_cfg.max_iters': 3, 'train_cfg.max_iter': 3, 'model.backbone.drop_path_rat': 0.1,
               'trian_cfg.max_iters': 1, 'randomness.seed': 0, 'train_dataloader.dataset.pipeline.1.type': 'X',
               'train_dataloader.dataset.pipeline.99.type': 'X'}
    assert new_option_keys(cfg, options) == [
        ('train_cfg.max_iter', 'train_cfg.max_iters'),
        ('model.backbone.drop_path_rat', 'model.backbone.drop_path_rate'),
        ('trian_cfg.max_iters', 'train_cfg'), ('randomness.seed', None),
        ('train_dataloader.dataset.pipeline.99.type', None)]


@pytest.mark.slow
def test_visualize_writes_overlays(ade_tiny, tmp_path):
    config = CONFIGS / 'ham/ham_dsan_t_ade20k_160k.py'
    torch.save(_mmseg0x_checkpoint(_build(Config.fromfile(config).model)), tmp_path / 'released.pth')
    run_script([PY, SEG / 'tools/visualize.py', config, tmp_path / 'released.pth', '--image-dir',
          ade_tiny / 'images/validation', '--out-dir', tmp_path / 'vis', '--tag', 'dsan_t'])
    from PIL import Image
    outs = sorted((tmp_path / 'vis').glob('*_dsan_t.png'))
    assert len(outs) == 3
    with Image.open(outs[0]) as im:
        assert im.height >= 64 and im.width > 64  # the image plus the legend column (one row per class found)
    # A checkpoint that does not fit is refused (mmseg's init_model only warns, and drew a random head).
    other = _mmseg0x_checkpoint(_build(Config.fromfile(config).model))
    other['state_dict'] = {k: v for k, v in other['state_dict'].items() if not k.startswith('decode_head.')}
    torch.save(other, tmp_path / 'headless.pth')
    r = run_script([PY, SEG / 'tools/visualize.py', config, tmp_path / 'headless.pth', '--image-dir',
                    ade_tiny / 'images/validation', '--out-dir', tmp_path / 'vis2'], check=False)
    assert r.returncode != 0 and 'headless.pth does not fit the config\'s model' in r.stderr, r.stderr[-2000:]
    # A bare state_dict (no meta; mmseg's init_model raised KeyError 'meta'): the config's classes.
    torch.save(_mmseg0x_checkpoint(_build(Config.fromfile(config).model))['state_dict'], tmp_path / 'bare.pth')
    r = run_script([PY, SEG / 'tools/visualize.py', config, tmp_path / 'bare.pth', '--image-dir',
                    ade_tiny / 'images/validation', '--out-dir', tmp_path / 'vis3'])
    assert len(list((tmp_path / 'vis3').glob('*.png'))) == 3 and 'class names and colours: config' in r.stderr


@pytest.mark.slow
def test_visualize_draws_on_the_pixels_the_model_saw(tmp_path):
    """A phone photo stored sideways with an EXIF orientation: the model reads it upright (mmcv applies the tag),
    and so must the overlay (drawn on the raw PIL image it was out of place, or the tool stopped on differing
    sizes)."""
    import numpy as np
    from PIL import Image, ImageOps
    config = CONFIGS / 'ham/ham_dsan_t_ade20k_160k.py'
    torch.save(_mmseg0x_checkpoint(_build(Config.fromfile(config).model)), tmp_path / 'released.pth')
    stored = np.zeros((64, 96, 3), np.uint8)
    stored[:, :48] = 255  # left half white as stored; upright (orientation 6: turned 90 degrees) the top half
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / 'img').mkdir()
    Image.fromarray(stored).save(tmp_path / 'img' / 'phone.jpg', exif=exif, quality=95)
    run_script([PY, SEG / 'tools/visualize.py', config, tmp_path / 'released.pth', '--image-dir', tmp_path / 'img',
                '--out-dir', tmp_path / 'vis', '--tag', 't', '--opacity', '0', '--no-legend'])
    drawn = np.asarray(Image.open(tmp_path / 'vis' / 'phone_t.png').convert('RGB'), np.float64)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / 'img' / 'phone.jpg')), np.float64)
    assert drawn.shape == upright.shape == (96, 64, 3)
    assert np.abs(drawn - upright).mean() < 3


@pytest.mark.slow
def test_get_flops_reproduces_the_paper_rows():
    flops = load_tool('segmentation/tools/get_flops.py')
    rows = {r['config']: r for r in (flops.measure(CONFIGS / c, s) for c, s, *_ in flops.PAPER_ROWS)}
    t, s = rows['ham_dsan_t_ade20k_160k'], rows['ham_dsan_s_ade20k_160k']
    assert t['params'] == 4_587_536 and s['params'] == 20_725_734
    assert t['macs'] / 1e9 == pytest.approx(6.85, abs=0.005)
    assert s['macs'] / 1e9 == pytest.approx(23.05, abs=0.005)
    assert rows['ham_dsan_t_cityscapes_80k']['macs'] / 1e9 == pytest.approx(52.6, abs=0.05)
    assert rows['ham_dsan_s_cityscapes_80k']['macs'] / 1e9 == pytest.approx(181.1, abs=0.05)
    # The op's own multiply-adds come on top, never below.
    assert all(r['macs_with_dscn'] > r['macs'] for r in rows.values())


def test_get_flops_takes_cfg_options():
    flops = load_tool('segmentation/tools/get_flops.py')
    config = str(CONFIGS / 'ham/ham_dsan_t_ade20k_160k.py')
    text = flops.main([config, '--shape', '64', '--cfg-options', 'model.decode_head.channels=128'])
    row = text.splitlines()[-1].split()
    assert row[:2] == ['ham_dsan_t_ade20k_160k', '64x64']
    narrow = flops.measure(config, (64, 64), {'model.decode_head.channels': 128})
    assert int(row[2].replace(',', '')) == narrow['params'] < flops.measure(config, (64, 64))['params']


def test_demo_config_is_the_ade20k_recipe_on_the_demo_classes():
    cfg = Config.fromfile(CONFIGS / 'demo/ham_dsan_t_demo.py')
    assert cfg.model.decode_head.num_classes == len(cfg.metainfo['classes']) == 11
    assert cfg.model.backbone.embed_dims == T_ARCH['embed_dims']
    assert cfg.model.backbone.init_cfg == dict(type='Pretrained', checkpoint=None)  # run_demo.sh fills it in
    assert cfg.train_dataloader.dataset.type == 'BaseSegDataset'
    assert not cfg.train_dataloader.dataset.reduce_zero_label  # the background is a class in the demo


@pytest.mark.parametrize('name', sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.glob('*/*.py')
                                        if p.parent.name != '_base_'))
def test_tta_pipeline_reads_labels_as_the_test_set(name):
    """--tta swaps the test pipeline for tta_pipeline: its annotations must be read as the dataset's (the demo
    inherited ADE20K's reduce_zero_label=True and 2048x512 scales, and --tta stopped on mmseg's assertion)."""
    cfg = Config.fromfile(CONFIGS / name)
    loads = [t for group in cfg.tta_pipeline[1].transforms for t in group if t.type == 'LoadAnnotations']
    test_loads = [t for t in cfg.test_dataloader.dataset.pipeline if t.type == 'LoadAnnotations']
    assert len(loads) == len(test_loads) == 1
    assert loads[0].get('reduce_zero_label') == test_loads[0].get('reduce_zero_label')


def test_demo_tta_pipeline_tests_around_the_demo_scale(tmp_path):
    from mmseg.registry import DATASETS
    make_segmentation(str(tmp_path), num_classes=4, num_train=1, num_val=1, size=96, seed=5)
    cfg = Config.fromfile(CONFIGS / 'demo/ham_dsan_t_demo.py')
    init_default_scope('mmseg')
    ds_cfg = cfg.test_dataloader.dataset
    ds_cfg.update(data_root=str(tmp_path), pipeline=cfg.tta_pipeline)
    views = DATASETS.build(ds_cfg)[0]
    shapes = [tuple(v.shape[1:]) for v in views['inputs']]
    assert sorted(set(shapes)) == [(64, 64), (96, 96), (128, 128), (160, 160), (192, 192), (224, 224)]
    assert len(shapes) == 12  # each scale, plain and flipped
    gt = views['data_samples'][0].gt_sem_seg.data
    assert gt.shape[-2:] == (96, 96) and int(gt.min()) == 0  # background stays class 0, not 255


def test_sync_bn_to_bn_walks_nested_configs():
    cfg = {'a': dict(type='SyncBN'), 'b': [dict(norm=dict(type='SyncBN', requires_grad=True)), dict(type='GN')]}
    assert sync_bn_to_bn(cfg) == 2
    assert cfg['a']['type'] == 'BN' and cfg['b'][0]['norm'] == dict(type='BN', requires_grad=True)
    assert sync_bn_to_bn(cfg) == 0


def test_sync_bn_to_bn_walks_an_mmengine_config_and_tuples(tmp_path):
    (tmp_path / 'cfg.py').write_text("model = dict(backbone=dict(norm_cfg=dict(type='SyncBN')), heads=(dict(\n"
                                     "    norm_cfg=dict(type='SyncBN')),), names=('a', 'b'))\n")
    cfg = Config.fromfile(tmp_path / 'cfg.py')
    assert sync_bn_to_bn(cfg) == 2
    assert cfg.model.backbone.norm_cfg.type == 'BN' and cfg.model.heads[0].norm_cfg.type == 'BN'
    assert cfg.model.names == ('a', 'b')
    assert sync_bn_to_bn(cfg) == 0


def test_tools_reject_missing_files_and_bad_flags(tmp_path, capsys, monkeypatch):
    from dsan.mm.tools import test as mm_test
    from dsan.mm.tools import train as mm_train
    ham = str(CONFIGS / 'ham/ham_dsan_t_ade20k_160k.py')
    det = str(ROOT / 'detection/configs/coco/mask_rcnn_dsan_t_fpn_1x.py')
    ckpt = tmp_path / 'model.pth'
    torch.save({'state_dict': {}}, ckpt)  # only read (not loaded into a model) before the errors below
    empty = tmp_path / 'empty.pth'
    empty.write_bytes(b'')
    original = tmp_path / 'mmseg0x.pth'
    torch.save({'meta': {'mmseg_version': '0.24.1', 'iter': 160000}, 'state_dict': {}}, original)
    no_base = tmp_path / 'no_base.py'
    no_base.write_text("_base_ = ['./missing_base.py']\n")
    no_tta = tmp_path / 'no_tta.py'
    no_tta.write_text(f"_base_ = ['{ham}']\ntta_model = None\n")
    cases = [
        (mm_train, [str(tmp_path / 'nope.py')], 'config file not found: '),
        (mm_train, [str(no_base)], 'missing_base.py'),
        (mm_test, [ham, str(tmp_path / 'nope.pth')], 'checkpoint file not found: '),
        (mm_train, [ham, '--resume', str(tmp_path / 'nope.pth'), '--work-dir', str(tmp_path)],
         '--resume checkpoint not found: '),
        (mm_train, [ham, '--resume', str(empty), '--work-dir', str(tmp_path)], 'is empty (0 bytes)'),
        # An unreadable file is said to be one (it was "does not fit the config's model").
        (mm_test, [ham, str(empty)], f'checkpoint {empty}: {empty} is empty (0 bytes)'),
        # mmengine stopped with KeyError: 'message_hub' on a file of the original's mmseg 0.x.
        (mm_train, [ham, '--resume', str(original), '--work-dir', str(tmp_path)],
         'not a checkpoint of an mmengine training run (an mmseg 0.x / mmdet 2.x file, or weights only), so its '
         f'training state cannot be resumed; start from its weights with --cfg-options load_from={original}'),
        (mm_test, [ham, str(ckpt), '--tta', '--cfg-options', 'tta_model=None'], '--tta needs tta_model'),
        (mm_test, [str(no_tta), str(ckpt), '--tta'], '--tta needs tta_model'),
        (mm_train, [ham, '--launcher', 'slurm'], '--launcher slurm needs SLURM_PROCID, SLURM_NTASKS, SLURM_NODELIST'),
        (mm_test, [ham, str(ckpt), '--launcher', 'mpi'], '--launcher mpi needs OMPI_COMM_WORLD_RANK'),
        (mm_train, [ham, '--launcher', 'pytorch'], '--launcher pytorch needs RANK, WORLD_SIZE'),
        # The original's mmseg 0.x / mmdet 2.x spellings name their replacement (argparse: "unrecognized arguments").
        (mm_train, [ham, '--resume-from', 'x.pth'], '--resume-from is a flag of the original scripts; here: --resume'),
        (mm_test, [ham, str(ckpt), '--eval', 'mIoU'], "--eval is a flag of the original scripts; here: nothing: the "
                                                       "metrics are the config's test_evaluator"),
        (mm_test, [ham, str(ckpt), '--aug-test'], '--aug-test is a flag of the original scripts; here: --tta'),
    ]
    det_cases = [(['train', det, '--auto-scale-lr', '--cfg-options', 'auto_scale_lr=None'], '--auto-scale-lr needs'),
                 (['test', det, str(ckpt), '--out', str(tmp_path / 'r.json')], '--out must be a .pkl or .pickle'),
                 (['test', det, str(ckpt), '--show-dir', 'vis', '--cfg-options', 'default_hooks.visualization=None'],
                  '--show/--show-dir need a `visualization` hook')]
    for argv, message in det_cases:
        cases.append(((mm_train if argv[0] == 'train' else mm_test), argv[1:], message))
    if not torch.cuda.is_available():
        cases.append((mm_train, [ham, '--amp'], '--amp needs a CUDA GPU'))
    for name in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT', 'SLURM_PROCID', 'OMPI_COMM_WORLD_RANK'):
        monkeypatch.delenv(name, raising=False)
    for tool, argv, message in cases:
        task = 'det' if det in argv else 'seg'
        with pytest.raises(SystemExit) as exc:
            tool(argv, task=task)
        err = capsys.readouterr().err
        assert exc.value.code == 2, (argv, err)
        last = err.strip().splitlines()[-1]
        assert 'error: ' in last and message in last and 'Traceback' not in err, (argv, err)


def test_test_tool_names_another_grouping_in_one_line(tmp_path):
    """A segmentor file whose backbone has other DSCN groups than the config (the original's ham_dsan_s ADE20K
    config says [2, 8, 16, 16]) was a traceback with eight size mismatches."""
    from dsan.mm.tools import test as mm_test
    config = CONFIGS / 'ham/ham_dsan_t_ade20k_160k.py'
    cfg = Config.fromfile(config)
    cfg.model.backbone.groups = [4, 8, 16, 16]
    torch.save({'meta': {}, 'state_dict': _build(cfg.model).state_dict()}, tmp_path / 'g4.pth')
    with pytest.raises(SystemExit) as exc:
        mm_test([str(config), str(tmp_path / 'g4.pth'), '--work-dir', str(tmp_path / 'w')])
    assert str(exc.value.code).startswith(
        f"test.py: error: {tmp_path / 'g4.pth'} does not fit the config's model: The checkpoint has DSCN groups "
        '[4, 8, 16, 16] per stage, this model [1, 4, 8, 8]: build it with groups=[4, 8, 16, 16]')


def test_install_script_is_idempotent_and_pins_the_stack():
    req = (ROOT / 'requirements-mm.txt').read_text()
    for pin in ('mmengine==0.10.7', 'mmcv==2.1.0', 'mmsegmentation==1.2.2', 'mmdet==3.3.0', 'yapf=='):
        assert pin in req
    import mmcv
    import mmengine
    import mmseg
    assert (mmengine.__version__, mmcv.__version__, mmseg.__version__) == ('0.10.7', '2.1.0', '1.2.2')
    from mmcv.ops import nms  # the compiled ops are there
    boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.], [20., 20., 30., 30.]])
    _, keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]
    script = (ROOT / 'scripts/install_mm.sh').read_text()
    assert 'c++20' in script and 'strip --strip-debug' in script


def test_interleaved_median_times_each_step_per_round(monkeypatch):
    from dsan.mm import speed
    clock = iter(range(1000))
    monkeypatch.setattr(speed.time, 'perf_counter', lambda: next(clock))
    calls = []
    # Each step reads the clock twice; a step's duration is 1 tick: the medians are exact and the order interleaved.
    medians = speed.interleaved_median({'a': lambda: calls.append('a'), 'b': lambda: calls.append('b')},
                                       rounds=3, warmup=1)
    assert calls == ['a', 'b'] * 4
    assert medians == {'a': 1, 'b': 1}
    with pytest.raises(ValueError, match='rounds must be >= 1'):
        speed.interleaved_median({}, rounds=0, warmup=0)


def test_load_config_adds_the_backbones_compile_options():
    """mmengine's `compile` setting gets DSAN's inductor options (dsan.compile) merged in; no `compile`: none."""
    from dsan.mm.tools import load_config
    config = str(ROOT / 'segmentation/configs/demo/ham_dsan_t_demo.py')
    assert load_config(config, None, None, 'none').get('compile') is None
    cfg = load_config(config, {'compile': True}, None, 'none')
    assert cfg.compile == {'options': {'layout_optimization': False}}
    cfg = load_config(config, {'compile': {'backend': 'inductor', 'mode': 'max-autotune-no-cudagraphs'}}, None, 'none')
    assert cfg.compile['backend'] == 'inductor' and 'mode' not in cfg.compile
    assert cfg.compile['options'] == {**torch._inductor.list_mode_options('max-autotune-no-cudagraphs'),
                                      'layout_optimization': False}
    assert load_config(config, {'compile': {'backend': 'aot_eager'}}, None, 'none').compile == {'backend': 'aot_eager'}
