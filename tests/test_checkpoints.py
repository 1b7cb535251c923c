"""Loading original-format DSAN checkpoints: wrapper formats, groups read from the file, clear errors, converter."""
import argparse
import logging
import re

import pytest
import timm
import torch
from conftest import BACKEND, load_tool
from safetensors.torch import save_file
from test_models import randomize_

from dsan.models import (
    CheckpointError,
    NoPretrainedWeightsError,
    checkpoint_filter_fn,
    extract_state_dict,
    infer_groups,
    load_checkpoint,
    read_checkpoint,
)

T_GROUPS = [(1, 4, 8, 8), (4, 8, 16, 16)]  # official code / README row of DSAN-T


def make_source(groups, **kwargs):
    """An 'original' DSAN-T with non-trivial weights and BN statistics, as a released checkpoint holds."""
    model = timm.create_model('dsan_t', groups=groups, backend=BACKEND, **kwargs)
    return randomize_(model).eval()


def save_formats(sd: dict, ema_sd: dict, tmp_path) -> dict:
    """The same weights in every wrapper format a loader must accept."""
    paths = {}

    def save(name, obj):
        paths[name] = tmp_path / name
        torch.save(obj, paths[name])

    # timm CheckpointSaver: args is an argparse.Namespace, EMA weights differ from the trained ones.
    save('saver.pth.tar', {
        'epoch': 299, 'arch': 'dsan_t', 'state_dict': sd, 'state_dict_ema': ema_sd,
        'optimizer': {'state': {}, 'param_groups': [{'lr': 1e-6, 'params': [0, 1]}]}, 'version': 2,
        'args': argparse.Namespace(model='dsan_t', lr=1e-3, drop_path=0.1), 'metric': 76.4})
    save('model.pth', {'model': sd, 'epoch': 10})
    save('plain.pth', sd)
    save('ddp.pth', {'state_dict': {'module.' + k: v for k, v in sd.items()}})
    save('mm.pth', {'meta': {'epoch': 1}, 'state_dict': {
        **{'backbone.' + k: v for k, v in sd.items() if not k.startswith('head.')},
        'decode_head.conv_seg.weight': torch.zeros(150, 256, 1, 1)}})
    paths['st.safetensors'] = tmp_path / 'st.safetensors'
    save_file({k: v.contiguous() for k, v in sd.items()}, str(paths['st.safetensors']))
    return paths


@pytest.fixture(scope='module', params=T_GROUPS, ids=['g1-4-8-8', 'g4-8-16-16'])
def source(request, tmp_path_factory):
    groups = request.param
    model = make_source(groups)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ema_sd = {k: (v + 0.01 if v.is_floating_point() else v) for k, v in sd.items()}
    paths = save_formats(sd, ema_sd, tmp_path_factory.mktemp('ckpt'))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    return dict(groups=groups, model=model, sd=sd, ema_sd=ema_sd, paths=paths, x=x, ref=ref)


@pytest.mark.parametrize('fmt', ['saver.pth.tar', 'model.pth', 'plain.pth', 'ddp.pth', 'st.safetensors'])
def test_round_trip_through_timm_create_model(source, fmt):
    model = timm.create_model(
        'dsan_t', pretrained=True, pretrained_cfg_overlay=dict(file=str(source['paths'][fmt])), backend=BACKEND)
    assert model.groups == list(source['groups'])  # read from the checkpoint, not the default
    assert 'state_dict' not in model.pretrained_cfg  # the weights are not kept alive in the config
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(source['x']), source['ref'], rtol=0, atol=0)


def test_ema_weights_only_on_request(source):
    path = str(source['paths']['saver.pth.tar'])
    ema = timm.create_model('dsan_t', pretrained=True, pretrained_cfg_overlay=dict(file=path),
                            pretrained_use_ema=True, backend=BACKEND)
    assert torch.equal(ema.state_dict()['head.bias'], source['ema_sd']['head.bias'])
    plain = timm.create_model('dsan_t', pretrained=True, pretrained_cfg_overlay=dict(file=path), backend=BACKEND)
    assert torch.equal(plain.state_dict()['head.bias'], source['sd']['head.bias'])
    with pytest.raises(CheckpointError, match='EMA weights requested'):
        timm.create_model('dsan_t', pretrained=True, pretrained_use_ema=True, backend=BACKEND,
                          pretrained_cfg_overlay=dict(file=str(source['paths']['plain.pth'])))


def test_features_only_and_new_classifier_from_checkpoint(source):
    overlay = dict(file=str(source['paths']['saver.pth.tar']))
    feats = timm.create_model('dsan_t', pretrained=True, pretrained_cfg_overlay=overlay, features_only=True,
                              backend=BACKEND)
    with torch.no_grad():
        _, ref_inter = source['model'].forward_intermediates(source['x'])
        for f, r in zip(feats.eval()(source['x']), ref_inter):
            torch.testing.assert_close(f, r, rtol=0, atol=0)
    # Backbone-only mm checkpoint into a features model.
    mm = timm.create_model('dsan_t', pretrained=True, features_only=True, backend=BACKEND,
                           pretrained_cfg_overlay=dict(file=str(source['paths']['mm.pth'])))
    assert mm.model.groups == list(source['groups'])
    ten = timm.create_model('dsan_t', pretrained=True, pretrained_cfg_overlay=overlay, num_classes=10,
                            backend=BACKEND)
    assert ten.head.out_features == 10
    torch.testing.assert_close(ten.state_dict()['block2.0.attn.proj_1.weight'],
                               source['sd']['block2.0.attn.proj_1.weight'])


def test_load_checkpoint_function(source):
    model = timm.create_model('dsan_t', groups=source['groups'], backend=BACKEND).eval()
    load_checkpoint(model, source['paths']['saver.pth.tar'])
    with torch.no_grad():
        torch.testing.assert_close(model(source['x']), source['ref'], rtol=0, atol=0)
    other = timm.create_model('dsan_t', groups=source['groups'], num_classes=10, backend=BACKEND)
    with pytest.raises(CheckpointError, match=r'head.weight: checkpoint \(1000, 256\) vs model \(10, 256\)'):
        load_checkpoint(other, source['paths']['plain.pth'])
    load_checkpoint(other, source['paths']['plain.pth'], strict=False)  # keeps the new head
    torch.testing.assert_close(other.norm4.weight, source['sd']['norm4.weight'])


def test_infer_groups(source):
    assert infer_groups(source['sd'], (11, 11, 7, 5)) == list(source['groups'])
    with pytest.raises(CheckpointError, match='rows must be groups \\* kernel_size'):
        infer_groups(source['sd'], (13, 11, 7, 5))
    with pytest.raises(CheckpointError, match='No DSCN offset weights for stage 4'):
        infer_groups({k: v for k, v in source['sd'].items() if not k.startswith('block4')}, (11, 11, 7, 5))


def test_another_grouping_is_named_on_every_loading_route(source, tmp_path):
    """timm's `checkpoint_path=` and a plain `load_state_dict` build the model first (default groups [1, 4, 8, 8]):
    a file of the paper's DSAN-T grouping [4, 8, 16, 16] gave 50 size mismatches that did not say why."""
    other = [1, 4, 8, 8] if list(source['groups']) != [1, 4, 8, 8] else [4, 8, 16, 16]
    expected = f"The checkpoint has DSCN groups {list(source['groups'])} per stage, this model {other}"
    model = timm.create_model('dsan_t', groups=other, backend=BACKEND)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for strict in (True, False):
        with pytest.raises(CheckpointError, match=re.escape(expected)):
            model.load_state_dict(source['sd'], strict=strict)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing half-loaded
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        timm.create_model('dsan_t', groups=other, checkpoint_path=str(source['paths']['saver.pth.tar']),
                          backend=BACKEND)
    wrapped = torch.nn.Sequential(model)  # under a prefix, as in a segmentor ('backbone.')
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        wrapped.load_state_dict({f'0.{k}': v for k, v in source['sd'].items()})
    # The groups given, both routes load, and a different architecture still gets torch's own report.
    loaded = timm.create_model('dsan_t', groups=source['groups'], backend=BACKEND,
                               checkpoint_path=str(source['paths']['plain.pth'])).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(source['x']), source['ref'])
    with pytest.raises(RuntimeError, match='size mismatch'):
        model.load_state_dict(timm.create_model('dsan_s', backend=BACKEND).state_dict())
    # The check holds no reference to the model: a deleted model is freed at once (a bound-method hook kept every
    # model alive until a garbage collection).
    import gc
    import weakref
    gc.disable()
    try:
        ref = weakref.ref(model)
        del model, wrapped
        assert ref() is None
    finally:
        gc.enable()


def test_wrong_model_is_reported(tmp_path):
    s = timm.create_model('dsan_s', backend=BACKEND)
    path = tmp_path / 'dsan_s.pth'
    torch.save({'state_dict': s.state_dict()}, path)
    with pytest.raises(CheckpointError, match='another architecture|mismatched shapes|does not fit'):
        timm.create_model('dsan_t', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), backend=BACKEND)
    # With the groups forced, the message lists the mismatched shapes.
    model = timm.create_model('dsan_t', backend=BACKEND)
    with pytest.raises(CheckpointError, match=r'mismatched shapes \(\d+\): patch_embed1.proj.weight: checkpoint'):
        checkpoint_filter_fn(s.state_dict(), model)


def test_missing_and_unexpected_keys_are_listed(source):
    model = timm.create_model('dsan_t', groups=source['groups'], backend=BACKEND)
    sd = dict(source['sd'])
    del sd['block3.1.mlp.fc2.weight']
    sd['block3.1.extra.weight'] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        checkpoint_filter_fn(sd, model)
    msg = str(e.value)
    assert 'missing keys (1): block3.1.mlp.fc2.weight' in msg
    assert 'unexpected keys (1): block3.1.extra.weight' in msg
    # BN counters are not weights: a checkpoint without them still loads.
    sd = {k: v for k, v in source['sd'].items() if not k.endswith('num_batches_tracked')}
    model.load_state_dict(checkpoint_filter_fn(sd, model), strict=True)


def test_timm_loading_options_pretrained_strict_and_in_chans(source, tmp_path):
    """timm's pretrained_strict=False loads what fits with a warning, and in_chans adapts the first conv (the
    strict check in the filter used to refuse both, where timm's own models take them)."""
    sd = dict(source['sd'])
    del sd['norm4.weight']
    sd['extra.weight'] = torch.zeros(1)
    path = tmp_path / 'damaged.pth'
    torch.save(sd, path)
    overlay = dict(file=str(path))
    with pytest.raises(CheckpointError, match='missing keys'):
        timm.create_model('dsan_t', pretrained=True, pretrained_cfg_overlay=overlay, backend=BACKEND)
    logger, records = logging.getLogger('dsan.models.dsan'), []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        model = timm.create_model('dsan_t', pretrained=True, pretrained_strict=False, pretrained_cfg_overlay=overlay,
                                  backend=BACKEND)
    finally:
        logger.removeHandler(handler)
    assert any('missing keys (1): norm4.weight' in r.getMessage() for r in records)
    assert torch.equal(model.norm3.weight, sd['norm3.weight'])
    gray = timm.create_model('dsan_t', pretrained=True, in_chans=1, backend=BACKEND,
                             pretrained_cfg_overlay=dict(file=str(source['paths']['plain.pth'])))
    w = source['sd']['patch_embed1.proj.weight']
    torch.testing.assert_close(gray.patch_embed1.proj.weight, w.sum(1, keepdim=True))  # timm's adapt_input_conv
    torch.testing.assert_close(gray.head.weight, source['sd']['head.weight'])
    with torch.no_grad():
        assert gray.eval()(torch.randn(1, 1, 64, 64)).shape == (1, 1000)


def test_unreadable_files_are_reported(source, tmp_path):
    good = source['paths']['saver.pth.tar'].read_bytes()
    truncated = tmp_path / 'truncated.pth.tar'
    truncated.write_bytes(good[: len(good) // 2])
    text = tmp_path / 'notes.pth'
    text.write_text('this is not a checkpoint\n')
    bad_st = tmp_path / 'bad.safetensors'
    bad_st.write_bytes(b'\x00' * 64)
    for path, reason in ((truncated, 'could not be read as a torch checkpoint: it is truncated or corrupt'),
                         (text, r"is not a torch checkpoint \(starts with b'this is not a checkpoint\\n'\)"),
                         (bad_st, 'not a readable safetensors')):
        with pytest.raises(CheckpointError, match=reason):
            timm.create_model('dsan_t', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              backend=BACKEND)
    with pytest.raises(FileNotFoundError, match='not found'):
        timm.create_model('dsan_t', pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'nope.pth')))
    not_sd = tmp_path / 'dict.pth'
    torch.save({'epoch': 3, 'config': 'x'}, not_sd)
    with pytest.raises(CheckpointError, match='Not a DSAN checkpoint'):
        timm.create_model('dsan_t', pretrained=True, pretrained_cfg_overlay=dict(file=str(not_sd)))
    with pytest.raises(CheckpointError, match='Expected a checkpoint dict'):
        extract_state_dict([1, 2, 3])


@pytest.mark.parametrize('name', ['dsan_t', 'dsan_t2', 'dsan_s'])
def test_pretrained_without_a_file_is_one_clear_error(name, monkeypatch, tmp_path):
    """The released weights are not downloadable: `pretrained=True` alone says how to load them, downloads nothing."""
    def no_download(*args, **kwargs):
        raise AssertionError(f'tried to download {args} {kwargs}')

    for module in (timm.models._builder, timm.models._hub, torch.hub):
        for fn in ('load_state_dict_from_url', 'download_cached_file', 'load_state_dict_from_hf',
                   'download_url_to_file', 'hf_hub_download'):
            if hasattr(module, fn):
                monkeypatch.setattr(module, fn, no_download)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf'))
    for kwargs in ({}, dict(features_only=True), dict(num_classes=10)):
        with pytest.raises(NoPretrainedWeightsError) as e:
            timm.create_model(name, pretrained=True, backend=BACKEND, **kwargs)
        msg = str(e.value)
        assert '\n' not in msg
        assert msg.startswith(f'{name} has no downloadable pretrained weights: the released DSAN checkpoints')
        # Where the file goes and which option / flag loads it.
        assert f"pretrained_cfg_overlay=dict(file='{name}.pth.tar')" in msg
        assert f'--initial-checkpoint {name}.pth.tar to classification/train.py' in msg
        assert f'--checkpoint {name}.pth.tar to classification/validate.py' in msg
        assert 'pretrained/dsan_{t,s}_encoder.pth' in msg
    assert isinstance(e.value, RuntimeError)  # what timm raised before: existing handlers still catch it
    assert not (tmp_path / 'torch').exists() and not (tmp_path / 'hf').exists()
    # A url in the config is timm's to download (here refused), not this error.
    with pytest.raises(AssertionError, match='tried to download'):
        timm.create_model(name, pretrained=True, backend=BACKEND,
                          pretrained_cfg_overlay=dict(url='https://example.invalid/dsan.pth'))


def test_converter_writes_clean_files(source, tmp_path, capsys):
    convert = load_tool('tools/convert_checkpoint.py')
    src = source['paths']['saver.pth.tar']
    for name in ('dsan_t.safetensors', 'dsan_t.pth'):
        convert.main([str(src), str(tmp_path / name), '--model', 'dsan_t'])
        model = timm.create_model('dsan_t', pretrained=True, backend=BACKEND,
                                  pretrained_cfg_overlay=dict(file=str(tmp_path / name)))
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(source['x']), source['ref'], rtol=0, atol=0)
    plain = torch.load(tmp_path / 'dsan_t.pth', weights_only=True)
    assert set(plain) == set(source['sd'])
    # Backbone-only encoder file, as the segmentation/detection configs load.
    enc_path = tmp_path / 'pretrained' / 'dsan_t_encoder.pth'
    convert.main([str(src), str(enc_path), '--model', 'dsan_t', '--encoder'])
    enc = torch.load(enc_path, weights_only=True)
    assert set(enc) == {k for k in source['sd'] if not k.startswith('head.')}
    feats = timm.create_model('dsan_t', pretrained=True, features_only=True, backend=BACKEND,
                              pretrained_cfg_overlay=dict(file=str(enc_path)))
    assert feats.model.groups == list(source['groups'])
    # EMA on request.
    convert.main([str(src), str(tmp_path / 'ema.pth'), '--ema'])
    assert torch.equal(torch.load(tmp_path / 'ema.pth', weights_only=True)['head.bias'], source['ema_sd']['head.bias'])
    # What cannot be converted is one line naming the reason, exit code 2 (it used to be a traceback).
    capsys.readouterr()
    for argv, reason in (([str(src), '--model', 'dsan_s'], 'belongs to another architecture'),
                         ([str(tmp_path / 'missing.pth')], 'not found: '),
                         ([str(tmp_path / 'dsan_t.pth'), '--ema'], 'EMA weights requested'),
                         ([str(src), '--model', 'resnet18'], "--model must be one of ['dsan_s', 'dsan_t', 'dsan_t2']")):
        assert convert.main([argv[0], str(tmp_path / 'x.pth'), *argv[1:]]) == 2
        err = capsys.readouterr().err
        assert err.startswith('convert_checkpoint.py: error: ') and reason in err, (argv, err)
    assert not (tmp_path / 'x.pth').exists()
    assert not list(tmp_path.rglob('.*.tmp-*'))  # written through a temporary file, renamed, none left behind


def _warnings_of(logger_name: str) -> tuple[logging.Handler, list]:
    """A handler collecting the WARNING records of `logger_name` (attach it, and remove it after use)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger(logger_name).addHandler(handler)
    return handler, records


def test_mmengine_training_checkpoint_loads_through_the_classification_loaders(source, tmp_path):
    """A segmentor checkpoint as mmengine writes it (numpy metadata, the log's HistoryBuffer) is read with the same
    allowlist as dsan.mm's reader; a valid file holding something else is refused as such, not called corrupt."""
    import numpy as np
    history = pytest.importorskip('mmengine.logging').HistoryBuffer()
    history.update(0.5)
    encoder = {k: v for k, v in source['sd'].items() if not k.startswith('head.')}
    path = tmp_path / 'iter_160000.pth'
    torch.save({'meta': {'epoch': 1, 'iter': 160000, 'best_score': np.float64(0.41), 'seed': np.int64(0)},
                'state_dict': {**{'backbone.' + k: v for k, v in encoder.items()},
                               'decode_head.conv_seg.weight': torch.zeros(150, 256, 1, 1)},
                'message_hub': {'log_scalars': {'train/loss': history}, 'runtime_info': {'iter': 160000}}}, path)
    model = timm.create_model('dsan_t', num_classes=0, groups=source['groups'], backend=BACKEND)
    load_checkpoint(model, path)
    created = timm.create_model('dsan_t', num_classes=0, pretrained=True, backend=BACKEND,
                                pretrained_cfg_overlay=dict(file=str(path)))
    for m in (model, created):
        for k, v in m.state_dict().items():
            torch.testing.assert_close(v, encoder[k], rtol=0, atol=0, msg=k)
    refused = tmp_path / 'with_path.pth'
    torch.save({'state_dict': encoder, 'meta': {'work_dir': __import__('pathlib').Path('/tmp')}}, refused)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(model, refused)
    msg = str(e.value)
    assert 'outside the allowlist' in msg and 'pathlib.PosixPath' in msg and 'weights_only=False' in msg
    assert 'truncated' not in msg and 'corrupt' not in msg


def test_files_that_are_not_checkpoints_say_what_they_are(tmp_path):
    lfs = tmp_path / 'dsan_t.pth.tar'
    lfs.write_text('version https://git-lfs.github.com/spec/v1\noid sha256:4d7a2146\nsize 18136123\n')
    html = tmp_path / 'download.pth'
    html.write_text('<!DOCTYPE html><html><body>Not Found</body></html>\n')
    hello = tmp_path / 'hello.pth'
    hello.write_text('hello world\n')
    empty = tmp_path / 'empty.pth'
    empty.write_bytes(b'')
    for path, reason in ((lfs, 'is a Git LFS pointer .*run git lfs pull'),
                         (html, r"is not a torch checkpoint \(starts with b'<!DOCTYPE html>"),
                         (hello, r"\(12 bytes\) is not a torch checkpoint \(starts with b'hello world\\n'\)"),
                         (empty, r'is empty \(0 bytes\)')):
        with pytest.raises(CheckpointError, match=reason) as e:
            read_checkpoint(path)
        assert str(e.value).startswith(str(path))
        assert 'weights_only' not in str(e.value)  # nothing unsafe in them: that advice would mislead
    with pytest.raises(CheckpointError, match='is a directory'):
        read_checkpoint(tmp_path)


def test_fit_error_describes_the_file_and_names_it(source):
    """The file's widths and depths (not the model's, filled in with its BN counters) and its path are reported."""
    path = source['paths']['plain.pth']
    deeper = timm.create_model('dsan_t', depths=(3, 3, 6, 2), groups=source['groups'], backend=BACKEND)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(deeper, path)
    first = str(e.value).splitlines()[0]
    assert first.startswith(f'Checkpoint {path} does not fit the model (DSAN')
    assert first.endswith('checkpoint: embed_dims [32, 64, 160, 256], depths [3, 3, 5, 2] (looks like dsan_t):')
    with pytest.raises(CheckpointError, match=rf'Checkpoint {path} does not fit .*depths \[3, 3, 5, 2\] \(looks like'):
        timm.create_model('dsan_t', depths=(3, 3, 6, 2), pretrained=True, backend=BACKEND,
                          pretrained_cfg_overlay=dict(file=str(path)))


def test_pretrained_strict_false_leaves_out_weights_of_another_shape(source, tmp_path):
    """pretrained_strict=False loads what fits: the offset weights of other DSCN groups keep the model's own."""
    other = next(g for g in T_GROUPS if g != source['groups'])
    handler, records = _warnings_of('dsan.models.dsan')
    try:
        model = timm.create_model('dsan_t', groups=other, pretrained=True, pretrained_strict=False, backend=BACKEND,
                                  pretrained_cfg_overlay=dict(file=str(source['paths']['plain.pth'])))
    finally:
        logging.getLogger('dsan.models.dsan').removeHandler(handler)
    offset = 'block1.0.attn.spatial_gating_unit.dscn_x.offset.weight'
    assert model.state_dict()[offset].shape[0] == other[0] * 11
    torch.testing.assert_close(model.state_dict()['block1.0.mlp.fc1.weight'], source['sd']['block1.0.mlp.fc1.weight'])
    torch.testing.assert_close(model.head.weight, source['sd']['head.weight'])
    left_out = [r.getMessage() for r in records if 'another shape' in r.getMessage()]
    assert len(left_out) == 1 and str(source['paths']['plain.pth']) in left_out[0] and offset in left_out[0]


def test_pretrained_strict_false_with_a_new_class_count_is_silent(source):
    """A classifier of another class count is left out without a warning, as timm's models do: DSAN had named
    head.weight and head.bias as weights "not loaded"."""
    handler, records = _warnings_of('dsan.models.dsan')
    try:
        model = timm.create_model('dsan_t', num_classes=10, pretrained=True, pretrained_strict=False,
                                  backend=BACKEND, pretrained_cfg_overlay=dict(file=str(source['paths']['plain.pth'])))
    finally:
        logging.getLogger('dsan.models.dsan').removeHandler(handler)
    assert model.head.weight.shape == (10, 256) and not [r for r in records if 'another shape' in r.getMessage()]
    torch.testing.assert_close(model.norm4.weight, source['sd']['norm4.weight'])


def test_encoder_file_into_a_model_with_a_classifier(source, tmp_path):
    encoder = tmp_path / 'dsan_t_encoder.pth'
    torch.save({k: v for k, v in source['sd'].items() if not k.startswith('head.')}, encoder)
    overlay = dict(file=str(encoder))
    with pytest.raises(CheckpointError) as e:
        timm.create_model('dsan_t', pretrained=True, pretrained_cfg_overlay=overlay, backend=BACKEND)
    msg = str(e.value)
    assert msg.startswith(f'Checkpoint {encoder} has no classifier (head.weight, head.bias)') and '\n' not in msg
    assert 'num_classes=0' in msg and 'features_only=True' in msg
    with pytest.raises(CheckpointError, match=f'Checkpoint {encoder} has no classifier'):
        load_checkpoint(timm.create_model('dsan_t', groups=source['groups'], backend=BACKEND), encoder)
    # What the message suggests works; strict=False keeps the model's own head.
    headless = timm.create_model('dsan_t', pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0,
                                 backend=BACKEND)
    torch.testing.assert_close(headless.norm4.weight, source['sd']['norm4.weight'])
    assert timm.create_model('dsan_t', pretrained=True, pretrained_cfg_overlay=overlay, features_only=True,
                             backend=BACKEND).model.groups == list(source['groups'])
    torch.manual_seed(1)
    own = timm.create_model('dsan_t', groups=source['groups'], backend=BACKEND).head.weight.detach().clone()
    torch.manual_seed(1)
    kept = timm.create_model('dsan_t', pretrained=True, pretrained_strict=False, pretrained_cfg_overlay=overlay,
                             backend=BACKEND)
    torch.testing.assert_close(kept.head.weight, own, rtol=0, atol=0)
    torch.testing.assert_close(kept.norm4.weight, source['sd']['norm4.weight'])
