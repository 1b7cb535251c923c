"""Tests of classification/ (train.py, validate.py, engine, data checks, checkpoints, distributed_train.sh).

Fast tests exercise the pieces in-process. The ``slow`` ones run the real scripts end to end on the procedural
demo data with DSAN-T at small resolution (they run in CI too):

* learning: DSAN-T, 4 shape classes (chance 25 %), 48 px, 16 epochs of 480 images on two CPU threads must reach
  top-1 >= 50 % on the 100 validation images. Measured: 70 % in 64 s on an idle 2-core machine (12 epochs gave
  60 %, 20 gave 78 %); several times slower when other jobs share the cores.
* resume: a run killed with SIGTERM in the middle of its second epoch, then resumed, ends with exactly
  (bit for bit) the weights, optimizer, EMA, scheduler and RNG state of an uninterrupted run.
* distributed: ``distributed_train.sh 2`` (torchrun, gloo) completes and both ranks hold identical weights.
* validate.py loads a synthetic checkpoint in the original release format (timm CheckpointSaver dict with an
  ``argparse.Namespace``, DSCN groups [4, 8, 16, 16]) and reproduces the in-process top-1.

Whole file: about 3 minutes on an idle 2-core machine; 8 minutes measured with the cores shared.
"""
import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from timm.models import register_model

ROOT = Path(__file__).resolve().parents[1]
CLS = ROOT / 'classification'
if str(CLS) not in sys.path:
    sys.path.insert(0, str(CLS))

import data as cls_data  # noqa: E402
import engine  # noqa: E402
import train  # noqa: E402
import train_utils as tu  # noqa: E402
import validate  # noqa: E402

from dsan.data.demo import make_classification  # noqa: E402

PY = sys.executable
# Small, fast settings shared by the end-to-end runs (the demo config minus what does not fit 32 px).
FAST = ['--img-size', '32', '--crop-pct', '1.0', '--aa', '', '--reprob', '0', '--mixup', '0', '--cutmix', '0',
        '--color-jitter', '0', '--scale', '0.6', '1.0', '--warmup-epochs', '1', '--cooldown-epochs', '0',
        '--warmup-lr', '1e-4', '--min-lr', '1e-5', '--drop-path', '0', '--no-progress', '-j', '0']


def _env():
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([str(ROOT), env.get('PYTHONPATH', '')])
    env.setdefault('OMP_NUM_THREADS', '1')
    return env


def _run(args, timeout=600, **kw):
    return subprocess.run([PY, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=_env(),
                          cwd=str(ROOT), **kw)


@pytest.fixture(scope='module')
def demo4(tmp_path_factory):
    """4 classes (disk, ring, square, frame), 120 train + 25 val images per class, 48 px."""
    root = tmp_path_factory.mktemp('demo4')
    make_classification(str(root), num_classes=4, train_per_class=120, val_per_class=25, size=48, seed=0)
    return root


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """3 classes, 8 train + 4 val images per class, 32 px."""
    root = tmp_path_factory.mktemp('tiny')
    make_classification(str(root), num_classes=3, train_per_class=8, val_per_class=4, size=32, seed=1)
    return root


def _copy_tree(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------------------------------------- CLI


def test_defaults_are_the_paper_recipe():
    args, _ = train.parse_args(['/data'])
    assert (args.model, args.opt, args.weight_decay, args.sched, args.lr) == ('dsan_t', 'adamw', 0.05, 'cosine', 1e-3)
    assert (args.epochs, args.cooldown_epochs, args.warmup_epochs, args.warmup_lr, args.min_lr) == (300, 10, 5, 1e-6,
                                                                                                     1e-6)
    assert (args.aa, args.reprob, args.mixup, args.cutmix, args.smoothing) == ('rand-m9-mstd0.5-inc1', 0.25, 0.8, 1.0,
                                                                               0.1)
    assert (args.batch_size, args.drop_path, args.data_dir) == (64, 0.1, '/data')


def test_config_file_overrides_defaults_and_flags_override_config(tmp_path):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('epochs: 7\nlr: 0.01\n')
    args, text = train.parse_args(['-c', str(cfg), '--data-dir', '/d', '--lr', '0.5'])
    assert (args.epochs, args.lr, args.data_dir) == (7, 0.5, '/d')
    assert 'epochs: 7' in text
    cfg.write_text('epochz: 7\n')
    with pytest.raises(SystemExit):
        train.parse_args(['-c', str(cfg), '/d'])


def test_demo_config_is_valid():
    args, _ = train.parse_args(['-c', str(CLS / 'configs' / 'demo.yaml'), 'data/demo_cls'])
    assert args.model == 'dsan_t' and args.mixup == 0 and args.img_size == 64


# ----------------------------------------------------------------------------------------------------- bad inputs


def test_missing_data_dir_is_named(tmp_path):
    with pytest.raises(cls_data.DatasetError, match='does not exist'):
        cls_data.check_image_folder(str(tmp_path / 'nope'), 'train')
    with pytest.raises(cls_data.DatasetError, match=r"split folder .*train' does not exist"):
        cls_data.check_image_folder(str(tmp_path), 'train')


def test_empty_class_folder_is_named(tiny, tmp_path):
    root = _copy_tree(tiny, tmp_path / 'd')
    os.makedirs(root / 'train' / 'zz_empty')
    with pytest.raises(cls_data.DatasetError, match='zz_empty'):
        cls_data.check_image_folder(str(root), 'train')


def test_corrupt_image_is_named(tiny, tmp_path):
    root = _copy_tree(tiny, tmp_path / 'd')
    bad = sorted((root / 'val' / '01_ring').iterdir())[0]
    bad.write_bytes(b'\xff\xd8\xff\xe0 this is not a jpeg')
    ds = cls_data.build_dataset('', str(root), 'val', is_training=False)
    idx = [i for i in range(len(ds)) if ds.filename(i, absolute=True) == str(bad)][0]
    with pytest.raises(cls_data.CorruptImageError, match=bad.name):
        ds[idx]
    # timm's skip-with-a-warning behaviour stays available
    ds = cls_data.build_dataset('', str(root), 'val', is_training=False, skip_bad_images=True)
    img, _ = ds[idx]
    assert img.size == (32, 32)


def test_train_cli_bad_inputs(tiny, tmp_path):
    r = _run([CLS / 'train.py', tmp_path / 'missing', '--model', 'resnet10t'], timeout=120)
    assert r.returncode == 2 and 'missing' in r.stderr and 'does not exist' in r.stderr
    r = _run([CLS / 'train.py', tiny, '--model', 'no_such_net', '--output', tmp_path], timeout=120)
    assert r.returncode == 2 and "unknown model 'no_such_net'" in r.stderr and 'dsan_t' in r.stderr
    root = _copy_tree(tiny, tmp_path / 'd')
    bad = sorted((root / 'train' / '00_disk').iterdir())[0]
    bad.write_bytes(b'garbage')
    r = _run([CLS / 'train.py', root, '--model', 'resnet10t', '--epochs', '1', '-b', '4', '--output', tmp_path / 'o',
              *FAST], timeout=300)
    assert r.returncode != 0 and bad.name in r.stderr and 'cannot decode image file' in r.stderr
    assert not list((tmp_path / 'o').rglob('*.pth.tar'))


def test_validate_cli_bad_inputs(tiny, tmp_path):
    r = _run([CLS / 'validate.py', tiny, '--model', 'resnet10t', '--checkpoint', tmp_path / 'none.pth.tar'],
             timeout=120)
    assert r.returncode == 2 and 'none.pth.tar' in r.stderr
    r = _run([CLS / 'validate.py', tmp_path / 'nodata', '--model', 'dsan_t'], timeout=120)
    assert r.returncode == 2 and 'nodata' in r.stderr


# ----------------------------------------------------------------------------------------------------- checkpoints


def test_atomic_save_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / 'last.pth.tar'
    tu.atomic_save({'epoch': 1}, str(path))
    assert torch.load(path)['epoch'] == 1

    def boom(obj, f):
        f.write(b'partial')
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, 'save', boom)
    with pytest.raises(KeyboardInterrupt):
        tu.atomic_save({'epoch': 2}, str(path))
    monkeypatch.undo()
    assert torch.load(path)['epoch'] == 1
    assert os.listdir(tmp_path) == ['last.pth.tar']  # no temp file left behind


def test_non_finite_weights_are_never_saved():
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float('nan')
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(tu.NonFiniteError, match="'weight'"):
        tu.build_checkpoint(epoch=0, arch='x', model=model, optimizer=opt)


def test_checkpoints_resume_in_timm_at_the_next_epoch(tmp_path):
    """`epoch` is the last completed epoch: timm's resume_checkpoint (version 2) must not repeat it."""
    from timm.models import resume_checkpoint
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tu.atomic_save(tu.build_checkpoint(epoch=4, arch='x', model=model, optimizer=opt), str(tmp_path / 'last.pth.tar'))
    assert resume_checkpoint(torch.nn.Linear(2, 2), str(tmp_path / 'last.pth.tar'), log_info=False) == 5


def test_rng_state_roundtrip_is_weights_only_loadable(tmp_path):
    import random

    import numpy as np
    state = tu.rng_state_for_checkpoint(tu.get_rng_state())
    tu.atomic_save({'rng': state}, str(tmp_path / 'r.pt'))
    loaded = torch.load(tmp_path / 'r.pt', weights_only=True)['rng']
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    tu.set_rng_state(tu.rng_state_from_checkpoint(loaded))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_graceful_stop_flag_on_sigint(monkeypatch):
    logged = []
    monkeypatch.setattr(tu._logger, 'warning', lambda *a, **k: logged.append(a))
    stop = tu.GracefulStop()
    try:
        assert stop.check(torch.device('cpu')) == (0, False)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        # The handler only sets the flag: logging inside a signal handler can re-enter a log write in progress.
        assert stop.signum == signal.SIGINT and logged == []
        assert stop.check(torch.device('cpu')) == (signal.SIGINT, False)
        assert stop.check(torch.device('cpu')) == (signal.SIGINT, False)
        assert len(logged) == 1 and 'SIGINT' in logged[0]  # announced once, by the loop
    finally:
        stop.restore()


# ----------------------------------------------------------------------------------------------------- NaN handling


class _NaNNet(torch.nn.Module):
    def __init__(self, num_classes=3, **kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.fc = torch.nn.Linear(3, num_classes)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        out = self.fc(x.mean((2, 3)))
        return out * float('nan') if self.calls > 3 else out


@register_model
def _test_nan_net(pretrained=False, **kwargs):
    kwargs.pop('drop_rate', None)
    kwargs.pop('drop_path_rate', None)
    return _NaNNet(**kwargs)


def test_engine_stops_on_nan_loss():
    model = _NaNNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))] * 6
    stop = tu.GracefulStop(signals=())
    with pytest.raises(tu.NonFiniteError, match='loss is nan .* epoch 0 step 3'):
        engine.train_one_epoch(0, model, batches, opt, torch.nn.CrossEntropyLoss(), device=torch.device('cpu'),
                               stop=stop, progress=False)
    assert torch.isfinite(model.fc.weight).all()  # the NaN loss was never stepped


def test_train_stops_on_nan_without_a_checkpoint(tiny, tmp_path, capsys):
    assert timm.is_model('_test_nan_net')
    code = train.main([str(tiny), '--model', '_test_nan_net', '--epochs', '2', '-b', '4', '--output', str(tmp_path),
                       '--experiment', 'nan', *FAST])
    assert code == 1
    log = (tmp_path / 'nan' / 'log.txt').read_text()
    assert 'loss is nan' in log and 'stopping without writing a checkpoint' in log
    assert not list(tmp_path.rglob('*.pth.tar'))


# ----------------------------------------------------------------------------------------------------- validate.py


def _original_format_checkpoint(path, num_classes):
    """A file shaped like the released DSAN-T: timm CheckpointSaver dict, Namespace args, groups [4, 8, 16, 16]."""
    model = timm.create_model('dsan_t', num_classes=num_classes, groups=(4, 8, 16, 16))
    for m in model.modules():  # non-trivial BN statistics, so that eval-mode outputs depend on them
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    ckpt = {'epoch': 299, 'arch': 'dsan_t', 'state_dict': model.state_dict(), 'optimizer': {}, 'version': 2,
            'args': argparse.Namespace(model='dsan_t', lr=1e-3), 'metric': 76.4}
    torch.save(ckpt, path)
    return model


def test_validate_loads_original_format_checkpoint(tiny, tmp_path):
    ckpt = tmp_path / 'dsan_t.pth.tar'
    model = _original_format_checkpoint(ckpt, num_classes=3).eval()
    args = validate.build_parser().parse_args([
        str(tiny), '--model', 'dsan_t', '--checkpoint', str(ckpt), '--img-size', '32', '--crop-pct', '1.0',
        '-b', '5', '-j', '0', '--per-image-csv', str(tmp_path / 'per_image.csv'),
        '--results-file', str(tmp_path / 'res.json'), '--no-progress'])
    summary = validate.validate(args)
    # the same model evaluated directly gives the same top-1
    ds = cls_data.build_dataset('', str(tiny), 'val', is_training=False)
    cfg = timm.data.resolve_data_config({'img_size': 32, 'crop_pct': 1.0}, model=model)
    loader = timm.data.create_loader(ds, cfg['input_size'], 5, crop_pct=1.0, interpolation=cfg['interpolation'],
                                     mean=cfg['mean'], std=cfg['std'], num_workers=0, use_prefetcher=False,
                                     device=torch.device('cpu'))
    direct = engine.evaluate(model, loader, device=torch.device('cpu'), progress=False)
    assert summary['count'] == 12 and summary['top1'] == pytest.approx(direct['top1'], abs=1e-3)
    rows = (tmp_path / 'per_image.csv').read_text().splitlines()
    assert len(rows) == 13 and rows[0].startswith('file,target')
    assert '"top1"' in (tmp_path / 'res.json').read_text()


# ----------------------------------------------------------------------------------------------------- end to end


def _final_top1(stdout):
    line = [x for x in stdout.splitlines() if x.startswith('final: top1')][-1]
    return float(line.split()[2])


EPOCHS = '16'


@pytest.mark.slow
def test_dsan_t_learns_the_demo(demo4, tmp_path):
    """DSAN-T reaches top-1 >= 50 % (chance 25 %) on 4 demo classes in 16 short CPU epochs."""
    start = time.time()
    env = _env()
    env['OMP_NUM_THREADS'] = '2'
    r = subprocess.run([PY, CLS / 'train.py', demo4, *FAST, '--model', 'dsan_t', '--epochs', EPOCHS, '-b', '32',
                        '--lr', '2e-3', '--sched-on-updates', '--img-size', '48', '--output', tmp_path,
                        '--experiment', 'learn'], capture_output=True, text=True, timeout=900, env=env, cwd=str(ROOT))
    assert r.returncode == 0, r.stderr[-3000:]
    top1 = _final_top1(r.stdout)
    print(f'DSAN-T demo4 top-1 {top1:.1f} % in {time.time() - start:.0f}s')
    assert top1 >= 50.0, r.stderr[-3000:]
    run = tmp_path / 'learn'
    for f in ('args.yaml', 'log.txt', 'summary.csv', 'last.pth.tar', 'model_best.pth.tar', 'training_curves.png'):
        assert (run / f).is_file(), f
    # validate.py on the trained checkpoint reproduces the final top-1 of training
    r = _run([CLS / 'validate.py', demo4, '--model', 'dsan_t', '--checkpoint', run / 'last.pth.tar',
              '--img-size', '48', '--crop-pct', '1.0', '-j', '0', '--no-progress'])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'top1 {top1:.3f}'[:-1] in r.stdout


def _train_cmd(data, out, exp, *extra):
    return [PY, str(CLS / 'train.py'), str(data), '--model', 'dsan_t', '--epochs', '3', '-b', '8', '--model-ema',
            '--model-ema-decay', '0.9', '--log-interval', '1', '--output', str(out), '--experiment', exp, *FAST,
            *extra]


@pytest.mark.slow
@pytest.mark.parametrize('eval_metric', ['loss', 'top1'])
def test_best_checkpoint_without_validation_is_the_lowest_train_loss(tiny, tmp_path, eval_metric):
    import csv
    r = subprocess.run(_train_cmd(tiny, tmp_path, 'noval', '--val-split', '', '--eval-metric', eval_metric),
                       capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(tmp_path / 'noval' / 'summary.csv') as f:
        losses = [float(row['train_loss']) for row in csv.DictReader(f)]
    best = torch.load(tmp_path / 'noval' / 'model_best.pth.tar', weights_only=False)
    assert len(losses) == 3 and best['epoch'] == losses.index(min(losses))


@pytest.mark.slow
def test_resume_after_sigterm_is_exact(tiny, tmp_path):
    """Uninterrupted 3 epochs == (SIGTERM in epoch 1, resume): same weights, optimizer, EMA, scheduler, RNG."""
    r = subprocess.run(_train_cmd(tiny, tmp_path, 'full'), capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    proc = subprocess.Popen(_train_cmd(tiny, tmp_path, 'cut'), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, env=_env())
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if 'Train: 1 [1/' in line:  # mid-way through the second epoch
            proc.send_signal(signal.SIGTERM)
            break
    _, rest = proc.communicate(timeout=300)
    log = ''.join(seen) + rest
    assert proc.returncode == 128 + signal.SIGTERM, log[-3000:]
    assert 'Stopped by SIGTERM' in log and 'Resume with' in log
    last = tmp_path / 'cut' / 'last.pth.tar'
    assert torch.load(last, weights_only=False)['epoch'] == 0  # the partial epoch 1 was not saved
    assert not [p for p in os.listdir(tmp_path / 'cut') if p.endswith('.tmp')]

    r = subprocess.run(_train_cmd(tiny, tmp_path, 'cut', '--resume', str(last)), capture_output=True, text=True,
                       env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'continuing at epoch 1' in r.stderr

    a = torch.load(tmp_path / 'full' / 'last.pth.tar', weights_only=False)
    b = torch.load(last, weights_only=False)
    assert a['epoch'] == b['epoch'] == 2
    for key in ('state_dict', 'state_dict_ema'):
        for k, v in a[key].items():
            assert torch.equal(v, b[key][k]), f'{key}.{k}'
    for k, s in a['optimizer']['state'].items():
        for name, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b['optimizer']['state'][k][name])), (k, name)
    assert a['scheduler'] == b['scheduler']
    assert torch.equal(a['rng_states'][0]['torch'], b['rng_states'][0]['torch'])
    assert a['rng_states'][0]['python'] == b['rng_states'][0]['python']
    summary = (tmp_path / 'cut' / 'summary.csv').read_text().splitlines()
    assert [row.split(',')[0] for row in summary[1:]] == ['0', '1', '2']


@pytest.mark.slow
def test_two_process_gloo_run(tiny, tmp_path):
    env = _env()
    env['PYTHON'] = PY
    r = subprocess.run(['bash', str(CLS / 'distributed_train.sh'), '2', str(tiny), '--model', 'dsan_t',
                        '--epochs', '2', '-b', '4', '--output', str(tmp_path), '--experiment', 'ddp', *FAST],
                       capture_output=True, text=True, env=env, timeout=600, cwd=str(ROOT))
    assert r.returncode == 0, r.stderr[-4000:]
    assert 'with 2 process(es)' in r.stderr and 'backend gloo' in r.stderr
    assert 'All 2 ranks hold identical weights' in r.stderr
    ckpt = torch.load(tmp_path / 'ddp' / 'last.pth.tar', weights_only=False)
    assert ckpt['epoch'] == 1 and len(ckpt['rng_states']) == 2
    assert not any(k.startswith('module.') for k in ckpt['state_dict'])


# ----------------------------------------------------------------------------------------------------- tools


def _load_tool(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f'cls_tool_{name}', CLS / 'tools' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plot_curves(tmp_path):
    csv = tmp_path / 'summary.csv'
    csv.write_text('epoch,train_loss,train_lr,eval_top1,eval_top5,eval_loss,lr\n'
                   '0,2.0,0.001,20,60,1.9,0.001\n1,1.5,0.0005,40,80,1.4,0.0005\n')
    out = _load_tool('plot_curves').plot_summary(str(csv), str(tmp_path / 'c.png'))
    from PIL import Image
    assert Image.open(out).size[0] > 500


def test_cam_visual_writes_overlays(tiny, tmp_path):
    pytest.importorskip('pytorch_grad_cam')
    imgs = tmp_path / 'imgs'
    imgs.mkdir()
    for p in sorted((tiny / 'val' / '00_disk').iterdir())[:2]:
        (imgs / p.name).write_bytes(p.read_bytes())
    ckpt = tmp_path / 'dsan_t.pth.tar'
    _original_format_checkpoint(ckpt, num_classes=3)
    written = _load_tool('cam_visual').main(['--model', 'dsan_t', '--checkpoint', str(ckpt), '--images-dir',
                                             str(imgs), '--out-dir', str(tmp_path / 'cams'), '--img-size', '64'])
    assert len(written) == 2 and all(os.path.getsize(w) > 0 for w in written)
    assert (tmp_path / 'cams' / 'cams.csv').read_text().count('\n') == 3


def test_train_throughput_tool():
    rows = _load_tool('train_throughput').measure(['resnet10t', 'dsan_t'], img_size=32, batch_size=2, warmup=1,
                                                  steps=1, rounds=1)
    assert [r['model'] for r in rows] == ['resnet10t', 'dsan_t'] and all(r['img_per_sec'] > 0 for r in rows)


@pytest.mark.slow
def test_ctrl_c_with_loader_workers_stops_cleanly(tiny, tmp_path):
    """Ctrl-C reaches the whole process group (the loader workers too): still a clean stop, exit code 130."""
    cmd = _train_cmd(tiny, tmp_path, 'ctrlc', '-j', '1')
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=_env(),
                            start_new_session=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if 'Train: 1 [1/' in line:
            os.killpg(proc.pid, signal.SIGINT)
            break
    _, rest = proc.communicate(timeout=300)
    log = ''.join(seen) + rest
    assert proc.returncode == 128 + signal.SIGINT, log[-3000:]
    assert 'Stopped by SIGINT' in log and 'Traceback' not in log
    assert torch.load(tmp_path / 'ctrlc' / 'last.pth.tar', weights_only=False)['epoch'] == 0


def test_imagenet_config_matches_the_defaults():
    defaults, _ = train.parse_args(['/d'])
    args, _ = train.parse_args(['-c', str(CLS / 'configs' / 'dsan_t_imagenet.yaml'), '/d'])
    differ = {k for k in vars(args) if getattr(args, k) != getattr(defaults, k)}
    assert differ == {'config', 'workers', 'amp', 'output'}
