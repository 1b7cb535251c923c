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
import copy
import csv
import os
import shutil
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
    assert (args.amp, args.grad_accum_steps, args.torchcompile) == (False, 1, None)  # the paper's command: no AMP


def test_config_file_overrides_defaults_and_flags_override_config(tmp_path):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('epochs: 7\nlr: 0.01\n')
    args, text = train.parse_args(['-c', str(cfg), '--data-dir', '/d', '--lr', '0.5'])
    assert (args.epochs, args.lr, args.data_dir) == (7, 0.5, '/d')
    assert 'epochs: 7' in text
    # The dataset given with -c wins over the file's (a run's args.yaml names its own data, which was used instead).
    cfg.write_text('data: /a\ndata_dir: /a\n')
    for cli in (['/b'], ['--data-dir', '/b']):
        args, text = train.parse_args(['-c', str(cfg), *cli])
        assert args.data_dir == '/b' and 'data_dir: /b' in text, cli
    assert train.parse_args(['-c', str(cfg)])[0].data_dir == '/a'
    cfg.write_text('data_dir: /a\n')
    assert train.parse_args(['-c', str(cfg), '/b'])[0].data_dir == '/b'
    cfg.write_text('epochz: 7\n')
    with pytest.raises(SystemExit):
        train.parse_args(['-c', str(cfg), '/d'])


def test_args_yaml_of_an_original_run_is_read(tmp_path, capsys):
    """The original train.py (timm 0.4.12's) writes every option into args.yaml, some of which this one has not:
    at their defaults they are ignored (and named), otherwise refused by name."""
    import yaml
    original = {k: v for k, v in train._ORIGINAL_ONLY_DEFAULTS.items()}
    original.update(data_dir='/d', model='dsan_t', val_split='validation', batch_size=128, workers=8, output='',
                    drop_path=0.1, epochs=300, decay_epochs=100, scale=[0.08, 1.0], model_ema=True, local_rank=3)
    cfg = tmp_path / 'args.yaml'
    cfg.write_text(yaml.safe_dump(original))
    args, _ = train.parse_args(['-c', str(cfg)])
    assert (args.model, args.batch_size, args.workers, args.val_split, args.output) == (
        'dsan_t', 128, 8, 'validation', 'output/train')
    assert args.model_ema and args.data_dir == '/d' and not hasattr(args, 'tta')
    err = capsys.readouterr().err
    assert 'ignored, at their defaults' in err and 'apex_amp' in err and 'recovery_interval' in err
    cfg.write_text(yaml.safe_dump({**original, 'tta': 2, 'lr_cycle_limit': 3}))
    with pytest.raises(SystemExit):
        train.parse_args(['-c', str(cfg)])
    err = capsys.readouterr().err
    assert 'lr_cycle_limit=3, tta=2' in err and 'not have' in err
    cfg.write_text('- epochs\n')
    with pytest.raises(SystemExit):
        train.parse_args(['-c', str(cfg)])
    assert 'expected a mapping of option names to values, got a list' in capsys.readouterr().err


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
    img, target = ds[idx]
    assert img.size == (32, 32) and (img, target) == (ds[idx + 1][0], ds.reader.samples[idx + 1][1])


def test_16_bit_greyscale_images_keep_their_contrast(tmp_path):
    """A 16-bit greyscale PNG reads as its top 8 bits in every channel, with or without skip_bad_images (PIL's
    convert('RGB') clips at 255: the test image came out 99 % white)."""
    import numpy as np
    from PIL import Image
    grey = (np.arange(256, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0..65535
    for cls in ('a', 'b'):
        (tmp_path / 'val' / cls).mkdir(parents=True)
        Image.fromarray(grey).save(tmp_path / 'val' / cls / 'x.png')
    assert Image.open(tmp_path / 'val' / 'a' / 'x.png').mode == 'I;16'
    for skip in (False, True):
        ds = cls_data.build_dataset('', str(tmp_path), 'val', is_training=False, skip_bad_images=skip)
        rgb = np.asarray(ds[0][0])
        assert rgb.shape == (16, 16, 3) and (rgb == (grey >> 8).astype(np.uint8)[..., None]).all()


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


def test_train_rejects_out_of_range_arguments(capsys):
    """A bad value fails at once with the flag's name (it used to fail deep in torch/timm, or train on silently)."""
    for argv, message in ((['-b', '0'], '-b/--batch-size must be >= 1; got 0'),
                          (['--epochs', '0'], '--epochs must be >= 1; got 0'),
                          (['--lr', '0'], '--lr must be > 0; got 0.0'),
                          (['--smoothing', '1.5'], '--smoothing must be in [0, 1); got 1.5'),
                          (['--drop-path', '1.5'], '--drop-path must be in [0, 1); got 1.5'),
                          (['--crop-pct', '0'], '--crop-pct must be in (0, 1]; got 0.0'),
                          (['--model-ema-decay', '2'], '--model-ema-decay must be in (0, 1); got 2.0'),
                          (['-j', '-1'], '-j/--workers must be >= 0; got -1'),
                          (['--num-classes', '0'], '--num-classes must be >= 1; got 0'),
                          (['--input-size', '4', '64', '64'], '--input-size must be C H W with C = 3 (images are '
                           'read as RGB) and H, W >= 1; got [4, 64, 64]'),
                          (['--eval-metric', 'acc1'], "invalid choice: 'acc1'"),
                          (['--native-amp'], '--native-amp is a flag of the original scripts; here: --amp'),
                          (['--start-epoch', '3'], '--start-epoch is a flag of the original scripts; here: --resume'),
                          (['--amp-dtype', 'fp16'], "invalid choice: 'fp16'")):
        with pytest.raises(SystemExit) as exc:
            train.parse_args(['data', *argv])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err, argv
    args, _ = train.parse_args(['data', '--eval-metric', 'top5', '-b', '1', '--lr', '1e-9'])
    assert args.eval_metric == 'top5'


def test_device_is_resolved_with_an_index(monkeypatch):
    """torch.cuda.set_device and DDP need an indexed device: plain `--device cuda` (and the default on a GPU machine)
    used to fail in a single process. Without CUDA, asking for it is a named error."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert tu.resolve_device('') == torch.device('cpu')
    with pytest.raises(tu.DeviceError, match='--device cuda: no CUDA device is available'):
        tu.resolve_device('cuda')
    with pytest.raises(tu.DeviceError, match="--device must be a torch device .* got 'gpu0'"):
        tu.resolve_device('gpu0')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    assert tu.resolve_device('') == tu.resolve_device('cuda') == torch.device('cuda', 0)
    assert tu.resolve_device('cuda:1') == torch.device('cuda', 1)
    assert tu.resolve_device('cuda:1', index=3) == torch.device('cuda', 3)
    chosen = []
    monkeypatch.setattr(torch.cuda, 'set_device', chosen.append)
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    assert tu.init_distributed('cuda')['device'] == torch.device('cuda', 0) and chosen == [torch.device('cuda', 0)]


def test_validation_labels_are_the_training_indices(tiny, tmp_path, monkeypatch):
    """A validation split without a class keeps the training split's labels (its folders used to be indexed on
    their own, shifting every label after the missing class); one with a class training lacks is an error."""
    import shutil
    root = _copy_tree(tiny, tmp_path / 'd')
    shutil.rmtree(root / 'val' / '00_disk')
    built = {}
    real_build = cls_data.build_dataset

    def build(name, data_root, split, **kw):
        built[split] = real_build(name, data_root, split, **kw)
        return built[split]

    monkeypatch.setattr(cls_data, 'build_dataset', build)
    out = tmp_path / 'o'
    assert train.main([str(root), '--model', 'resnet10t', '--epochs', '1', '-b', '4', '--output', str(out),
                       '--no-plot', *FAST]) == 0
    train_idx = built['train'].reader.class_to_idx
    for i in range(len(built['val'])):
        path = built['val'].filename(i, absolute=True)
        assert built['val'].reader.samples[i][1] == train_idx[Path(path).parent.name]
    (root / 'val' / '99_extra').mkdir()
    shutil.copy(next((root / 'val' / '01_ring').iterdir()), root / 'val' / '99_extra')
    assert train.main([str(root), '--model', 'resnet10t', '--epochs', '1', '-b', '4', '--output', str(out),
                       *FAST]) == 2


def test_train_names_data_that_cannot_fit(tiny, tmp_path, capsys):
    common = ['--model', 'resnet10t', '--epochs', '1', '--output', str(tmp_path), *FAST]
    assert train.main([str(tiny), '--num-classes', '2', '-b', '4', *common]) == 2
    assert '--num-classes 2 is less than the 3 class folders' in capsys.readouterr().err
    assert train.main([str(tiny), '-b', '64', *common]) == 2
    assert '-b/--batch-size 64 is larger than the 24 training images' in capsys.readouterr().err
    assert os.listdir(tmp_path) == []  # no run folder left behind by a run that stopped on bad input


def _image(path, mode='RGB', size=(12, 12)):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, 128).save(path)


def test_folder_reader_labels_by_the_class_folder(tmp_path, caplog):
    """Images in sub-folders of a class belong to it (timm's reader labels by the leaf folder: 'cat/2019/x.jpg'
    became class '2019'); every suffix the folder check accepts is read; images beside the class folders are left
    out with a warning (timm made them class '' at index 0); flat folders get exactly timm's labels."""
    from timm.data.readers.reader_image_folder import ReaderImageFolder
    split = tmp_path / 'train'
    for rel in ('cat/2019/a.jpg', 'cat/b.png', 'dog/2019/c.jpg', 'dog/d.JPG', 'c10/e.bmp', 'c2/f.webp', 'c2/g.tif'):
        _image(split / rel)
    _image(split / 'preview.jpg')
    with caplog.at_level('WARNING'):
        reader = cls_data.ClassFolderReader(str(split))
    assert reader.class_to_idx == {'c2': 0, 'c10': 1, 'cat': 2, 'dog': 3}  # timm's natural order
    labels = {os.path.relpath(p, split): t for p, t in reader.samples}
    assert labels == {'c10/e.bmp': 1, 'c2/f.webp': 0, 'c2/g.tif': 0, 'cat/2019/a.jpg': 2, 'cat/b.png': 2,
                      'dog/2019/c.jpg': 3, 'dog/d.JPG': 3}
    assert "image file(s) outside the class folders are not read: 'preview.jpg'" in caplog.text
    assert cls_data.check_image_folder(str(tmp_path), 'train') == list(reader.class_to_idx)
    flat = tmp_path / 'flat'
    for rel in ('b/1.jpg', 'a/10.png', 'a/9.png', 'n10/x.jpg', 'n9/y.jpeg'):
        _image(flat / rel)
    ours, timms = cls_data.ClassFolderReader(str(flat)), ReaderImageFolder(str(flat))
    assert ours.samples == timms.samples and ours.class_to_idx == timms.class_to_idx
    ds = cls_data.build_dataset('', str(tmp_path), 'train', is_training=False)
    assert len(ds) == 7 and ds[0][0].size == (12, 12)


def test_folder_reader_reads_each_linked_folder_once(tmp_path):
    """Symlinked folders are followed, but a link back to an ancestor does not repeat the class's images (os.walk
    with followlinks went round the loop until the path was too long: each image ~40 times)."""
    split = tmp_path / 'train'
    _image(split / 'cat' / 'a.jpg')
    _image(split / 'cat' / 'sub' / 'b.jpg')
    _image(tmp_path / 'extra' / 'c.jpg')
    (split / 'cat' / 'sub' / 'loop').symlink_to(split / 'cat', target_is_directory=True)
    (split / 'cat' / 'more').symlink_to(tmp_path / 'extra', target_is_directory=True)
    (split / 'dog').symlink_to(split / 'cat', target_is_directory=True)  # a linked class reads the same images
    reader = cls_data.ClassFolderReader(str(split))
    labels = sorted((os.path.relpath(p, split), t) for p, t in reader.samples)
    assert labels == [('cat/a.jpg', 0), ('cat/more/c.jpg', 0), ('cat/sub/b.jpg', 0),
                      ('dog/a.jpg', 1), ('dog/more/c.jpg', 1), ('dog/sub/b.jpg', 1)]


def test_class_map_sets_the_labels_and_the_class_count(tiny, tmp_path, capsys):
    """--class-map indices past the folder count size the classifier (a run used to fail mid-epoch with an index
    error); a map that cannot be read is named; validation folders follow the map."""
    cmap = tmp_path / 'map.txt'
    cmap.write_text('x\ny\n00_disk\n01_ring\n02_square\n')
    out = tmp_path / 'o'
    assert _tiny_run(tiny, out, 'cmap', '--epochs', '1', '--class-map', cmap) == 0
    ckpt = torch.load(out / 'cmap' / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert ckpt['state_dict']['fc.weight'].shape[0] == 5
    assert ckpt['class_to_idx'] == {'x': 0, 'y': 1, '00_disk': 2, '01_ring': 3, '02_square': 4}
    common = ['--model', '_test_tiny_net', '-b', '4', '--epochs', '1', '--output', str(tmp_path / 'p'), *FAST]
    assert train.main([str(tiny), '--class-map', str(cmap), '--num-classes', '4', *common]) == 2
    assert '--num-classes 4 is less than the indices of --class-map' in capsys.readouterr().err
    for text, message in (('', 'it is empty'), (None, 'Cannot locate')):
        if text is not None:
            (tmp_path / 'bad.txt').write_text(text)
        assert train.main([str(tiny), '--class-map', str(tmp_path / ('bad.txt' if text is not None else 'no.txt')),
                           *common]) == 2
        err = capsys.readouterr().err
        assert message in err and 'Traceback' not in err
    with pytest.raises(cls_data.DatasetError, match=r"must map class names to indices >= 0; got 'a: -1'"):
        cls_data.read_class_map({'a': -1})


def test_validate_labels_with_the_classes_of_the_checkpoint(tiny, tmp_path, capsys):
    """validate.py on a folder that lacks a training class keeps the training indices (saved in the checkpoint);
    it used to index the folder's own classes, so every class after the gap was scored against the wrong label."""
    import shutil
    out = tmp_path / 'o'
    assert _tiny_run(tiny, out, 'run', '--epochs', '1') == 0
    ckpt = out / 'run' / 'last.pth.tar'
    assert tu.checkpoint_class_map(str(ckpt)) == {'00_disk': 0, '01_ring': 1, '02_square': 2}
    root = _copy_tree(tiny, tmp_path / 'd')
    shutil.rmtree(root / 'val' / '00_disk')
    csv_path = tmp_path / 'rows.csv'
    args = validate.build_parser().parse_args([
        str(root), '--model', '_test_tiny_net', '--checkpoint', str(ckpt), '--img-size', '32', '--crop-pct', '1.0',
        '-j', '0', '--no-progress', '--per-image-csv', str(csv_path)])
    validate.validate(args)
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    expected = {'01_ring': 1, '02_square': 2}
    for row in rows:
        assert int(row['target']) == expected[row['file'].split('/')[0]], row
    (root / 'val' / 'zz_new').mkdir()
    shutil.copy(next((root / 'val' / '01_ring').iterdir()), root / 'val' / 'zz_new')
    with pytest.raises(cls_data.DatasetError, match="'zz_new'"):
        validate.validate(args)


def test_error_after_training_began_keeps_the_run_folder(tiny, tmp_path, capsys):
    """A corrupt validation image found after the first training epoch ends the run (exit 2, one line naming the
    file) but keeps the run folder and its log: only a run that never started is removed."""
    root = _copy_tree(tiny, tmp_path / 'd')
    bad = sorted((root / 'val' / '01_ring').iterdir())[0]
    bad.write_bytes(b'not a jpeg')
    assert _tiny_run(root, tmp_path / 'o', 'run', '--epochs', '1') == 2
    err = capsys.readouterr().err
    assert f'train.py: error: cannot decode image file {str(bad)!r}' in err
    assert (tmp_path / 'o' / 'run' / 'log.txt').is_file()


def test_error_message_of_a_loader_worker():
    inner = cls_data.CorruptImageError("cannot decode image file '/x/a.jpg': broken data stream")
    wrapped = cls_data.CorruptImageError('Caught CorruptImageError in DataLoader worker process 0.\nOriginal '
                                         'Traceback (most recent call last):\n  File "x.py", line 1, in f\n'
                                         f'data.CorruptImageError: {inner}\n')
    assert tu.error_message(wrapped) == str(inner)
    assert tu.error_message(inner) == str(inner)


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


def test_checkpoints_are_written_with_the_umask_mode(tmp_path):
    """mkstemp's 0600 used to stay: other users and groups could not read a run's checkpoints."""
    path = tmp_path / 'last.pth.tar'
    tu.atomic_save({'epoch': 1}, str(path))
    assert path.stat().st_mode & 0o777 == 0o666 & ~tu._UMASK


def test_resume_problems_are_named(tiny, tmp_path, capsys):
    common = ['--epochs', '2', '-b', '4', '--output', str(tmp_path), '--no-plot', *FAST]
    assert train.main([str(tiny), '--model', 'resnet10t', '--experiment', 'a', *common[:1], '1', *common[2:]]) == 0
    last = tmp_path / 'a' / 'last.pth.tar'
    assert train.main([str(tiny), '--model', 'resnet14t', '--resume', str(last), *common]) == 2
    assert f'--resume {last}: its weights do not fit --model resnet14t' in capsys.readouterr().err
    corrupt = tmp_path / 'corrupt.pth.tar'
    corrupt.write_bytes(last.read_bytes()[:500])
    assert train.main([str(tiny), '--model', 'resnet10t', '--resume', str(corrupt), *common]) == 2
    assert 'is not a readable checkpoint' in capsys.readouterr().err
    # Resuming an earlier checkpoint of a run folder whose last.pth.tar is further on says what it will overwrite.
    assert train.main([str(tiny), '--model', 'resnet10t', '--resume', str(last), '--experiment', 'a', *common]) == 0
    assert tu.later_checkpoint_epoch(str(last), str(tmp_path / 'a' / 'checkpoint-0.pth.tar')) == 1
    assert tu.later_checkpoint_epoch(str(last), str(last)) is None
    weights = tmp_path / 'weights.pth'
    torch.save(torch.load(last, weights_only=False)['state_dict'], weights)
    assert train.main([str(tiny), '--model', 'resnet10t', '--resume', str(weights), *common]) == 2
    assert 'is not a training checkpoint' in capsys.readouterr().err


def test_resume_with_more_epochs_follows_the_new_schedule(tiny, tmp_path):
    """A finished 2-epoch run resumed with --epochs 4 used to keep the old schedule (min lr for the new epochs)."""
    common = ['--model', 'resnet10t', '-b', '4', '--output', str(tmp_path), '--no-plot', *FAST]
    assert train.main([str(tiny), '--epochs', '2', '--experiment', 'a', *common]) == 0
    assert train.main([str(tiny), '--epochs', '4', '--resume', str(tmp_path / 'a' / 'last.pth.tar'), *common]) == 0
    with open(tmp_path / 'a' / 'summary.csv') as f:
        lrs = [float(row['lr']) for row in csv.DictReader(f)]
    # The old schedule had ended (--min-lr 1e-5 from epoch 2 on); the new one is a 4-epoch cosine, still decaying.
    assert len(lrs) == 4 and lrs[2] > 10 * 1e-5 and lrs[3] < lrs[2]
    assert tu.changed_schedule_args({'epochs': 2, 'lr': 1e-3}, argparse.Namespace(epochs=4, lr=1e-3)) == \
        {'epochs': (2, 4)}
    assert tu.changed_schedule_args(None, argparse.Namespace(epochs=4)) == {}


def test_backbone_only_checkpoint_fine_tunes_but_does_not_evaluate(tmp_path):
    """A backbone-only file (convert_checkpoint.py --encoder) starts a fine-tuning run with a fresh classifier (it
    used to fail on the missing head keys); evaluation refuses it, and a --num-classes other than the file's
    (it used to score a randomly initialised classifier)."""
    import model_factory
    source = timm.create_model('dsan_t', num_classes=5)
    full = tmp_path / 'full.pth'
    torch.save(source.state_dict(), full)
    encoder = tmp_path / 'encoder.pth'
    torch.save({k: v for k, v in source.state_dict().items() if not k.startswith('head.')}, encoder)
    model = model_factory.create('dsan_t', num_classes=3, checkpoint=str(encoder))
    assert model.num_classes == 3
    torch.testing.assert_close(model.patch_embed1.proj.weight, source.patch_embed1.proj.weight)
    assert model_factory.create('dsan_t', checkpoint=str(encoder)).num_classes == 1000
    with pytest.raises(model_factory.ModelError, match='has no classifier .*cannot be evaluated'):
        model_factory.create('dsan_t', checkpoint=str(encoder), require_classifier=True)
    with pytest.raises(model_factory.ModelError, match='--num-classes 3 differs from the 5 classes'):
        model_factory.create('dsan_t', num_classes=3, checkpoint=str(full), require_classifier=True)
    assert model_factory.create('dsan_t', checkpoint=str(full), require_classifier=True).num_classes == 5
    broken = tmp_path / 'broken.pth'  # a backbone key missing is still an error, classifier or not
    torch.save({k: v for k, v in source.state_dict().items() if not k.startswith(('head.', 'norm4.'))}, broken)
    with pytest.raises(model_factory.ModelError, match='norm4'):
        model_factory.create('dsan_t', num_classes=3, checkpoint=str(broken))


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


class _TinyNet(torch.nn.Module):
    """Small enough for in-process end-to-end runs of train.py: conv, ReLU, average pool, linear."""

    def __init__(self, num_classes=3, **kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


@register_model
def _test_tiny_net(pretrained=False, **kwargs):
    kwargs.pop('drop_rate', None)
    kwargs.pop('drop_path_rate', None)
    return _TinyNet(**kwargs)


def _tiny_run(data, out, exp, *extra):
    """train.py in-process with the tiny net on the tiny set (24 training images: 6 batches of 4)."""
    return train.main([str(data), '--model', '_test_tiny_net', '-b', '4', '--output', str(out), '--experiment', exp,
                       *FAST, *map(str, extra)])


def test_engine_names_the_nan_step_when_the_loader_ends_early():
    """A loader shorter than its len() leaves losses no log step read: the NaN among them is named 1-based too."""
    class Short:
        def __len__(self):
            return 10

        def __iter__(self):
            return iter([(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))] * 6)
    model = _NaNNet()
    with pytest.raises(tu.NonFiniteError, match=r'loss became NaN/Inf at epoch 0 \(at step 4\)'):
        engine.train_one_epoch(0, model, Short(), torch.optim.SGD(model.parameters(), lr=0.1),
                               torch.nn.CrossEntropyLoss(), device=torch.device('cpu'),
                               stop=tu.GracefulStop(signals=()), progress=False, log_interval=50)


@pytest.mark.parametrize('log_interval', [1, 50])
def test_engine_stops_on_nan_loss(log_interval):
    """The loss is read at log steps only: a NaN is reported there, naming the step where it first appeared."""
    model = _NaNNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))] * 6
    stop = tu.GracefulStop(signals=())
    # The 4th forward is the first NaN; the last step logs. Steps are numbered from 1, as the log lines number them.
    detected = 4 if log_interval == 1 else 6
    with pytest.raises(tu.NonFiniteError, match=rf'loss is nan at epoch 0 step 4/6 \(detected at the log step '
                                                rf'{detected};'):
        engine.train_one_epoch(0, model, batches, opt, torch.nn.CrossEntropyLoss(), device=torch.device('cpu'),
                               stop=stop, progress=False, log_interval=log_interval)
    assert model.calls == detected  # training went on until the log step (forwards counted from 1)
    # With a check at every step the NaN loss is never stepped; otherwise the steps before detection were.
    assert bool(torch.isfinite(model.fc.weight).all()) == (log_interval == 1)


class _HostReads(torch.overrides.TorchFunctionMode):
    """Record every read of a tensor's value by the host (the points where a GPU run waits for the device)."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
             torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.__format__, torch.Tensor.cpu,
             torch.Tensor.numpy}

    def __init__(self, position):
        super().__init__()
        self.position, self.reads = position, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.reads.append((self.position['step'], func.__name__))
        return func(*args, **(kwargs or {}))


def _tagged(batches, position):
    for i, b in enumerate(batches):
        position['step'] = i
        yield b


class _Sized:
    def __init__(self, batches, position):
        self.batches, self.position = batches, position

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return _tagged(self.batches, self.position)


def test_train_loop_reads_the_device_only_at_log_steps():
    """Item 1 of the review: no host sync per step; loss, NaN check and stop flag are read at log steps."""
    import copy
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))
    model2 = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randn(2, 3, 4, 4), torch.tensor([0, 2])) for _ in range(12)]
    position = {'step': None}
    stop = tu.GracefulStop(signals=())
    with _HostReads(position) as mode:
        out = engine.train_one_epoch(0, model, _Sized(batches, position), opt, torch.nn.CrossEntropyLoss(),
                                     device=torch.device('cpu'), stop=stop, progress=False, log_interval=4)
    assert mode.reads, 'the loss must be read somewhere'
    assert {step for step, _ in mode.reads} == {3, 7, 11}, mode.reads
    # the epoch loss is still the mean of all 12 losses (accumulated on the device)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    losses = []
    for x, y in batches:
        loss = torch.nn.functional.cross_entropy(model2(x), y)
        opt2.zero_grad()
        loss.backward()
        opt2.step()
        losses.append(loss.item())
    assert out['loss'] == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    assert out['num_updates'] == 12


def test_evaluate_reads_the_device_once():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 7)).eval()
    batches = [(torch.randn(5, 3, 4, 4), torch.randint(0, 7, (5,))) for _ in range(4)]
    position = {'step': None}
    with _HostReads(position) as mode:
        res = engine.evaluate(model, _Sized(batches, position), device=torch.device('cpu'), progress=False)
    assert {step for step, _ in mode.reads} == {3}, mode.reads
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in batches])
    target = torch.cat([y for _, y in batches])
    top5 = logits.topk(5, dim=1).indices
    assert res['count'] == 20
    assert res['top1'] == pytest.approx(100 * (logits.argmax(1) == target).float().mean().item())
    assert res['top5'] == pytest.approx(100 * (top5 == target[:, None]).any(1).float().mean().item())
    assert res['loss'] == pytest.approx(torch.nn.functional.cross_entropy(logits, target).item(), rel=1e-6)


def test_stop_flag_stops_a_single_process_run_at_the_next_step():
    """Reading the signal flag needs no device sync, so it is not deferred to the next log step."""
    model = _TinyNet()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stop = tu.GracefulStop(signals=())

    def batches():
        for i in range(10):
            if i == 3:
                stop.signum = signal.SIGTERM  # arrives while batch 3 is being loaded
            yield torch.randn(2, 3, 8, 8), torch.tensor([0, 1])

    class Loader:
        def __len__(self):
            return 10

        def __iter__(self):
            return batches()

    with pytest.raises(tu.TrainingInterrupted, match='after 4/10 steps') as e:
        engine.train_one_epoch(0, model, Loader(), opt, torch.nn.CrossEntropyLoss(), device=torch.device('cpu'),
                               stop=stop, progress=False, log_interval=50)
    assert e.value.signum == signal.SIGTERM and len(calls) == 4


def test_train_stops_on_nan_without_a_checkpoint(tiny, tmp_path, capsys):
    code = train.main([str(tiny), '--model', '_test_nan_net', '--epochs', '2', '-b', '4', '--output', str(tmp_path),
                       '--experiment', 'nan', *FAST])
    assert code == 1
    log = (tmp_path / 'nan' / 'log.txt').read_text()
    assert 'loss is nan at epoch 0 step 4/6' in log  # the 4th forward is the first NaN one
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
                                     persistent_workers=False, device=torch.device('cpu'))  # timm 1.0.15: True
    direct = engine.evaluate(model, loader, device=torch.device('cpu'), progress=False)
    assert summary['count'] == 12 and summary['top1'] == pytest.approx(direct['top1'], abs=1e-3)
    rows = (tmp_path / 'per_image.csv').read_text().splitlines()
    assert len(rows) == 13 and rows[0].startswith('file,target')
    import json
    assert json.loads((tmp_path / 'res.json').read_text())['top1'] == summary['top1']


# ----------------------------------------------------------------------------------------------------- recipe

# The paper's command (spec §4, the original README): everything else is train.py's defaults.
PAPER_COMMAND = ['--model', 'dsan_t', '-b', '64', '--lr', '1e-3', '--drop-path', '0.1', '--workers', '16']


def _script_argv(tmp_path, script, *args, tool='train.py', **env_vars):
    """The `tool` arguments that `script` (train.sh, eval.sh) really runs (a stub PYTHON prints its arguments)."""
    stub = tmp_path / 'python'
    stub.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    stub.chmod(0o755)
    env = {k: v for k, v in _env().items() if k not in ('MODEL', 'DROP_PATH', 'NUM_GPUS')}
    env.update(PYTHON=str(stub), **env_vars)
    r = subprocess.run(['bash', str(CLS / script), *args], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    argv = r.stdout.splitlines()
    found = [i for i, a in enumerate(argv) if a.endswith(tool)]
    assert len(found) == 1, argv
    if script == 'train.sh':
        assert '--nproc_per_node=8' in argv[:found[0]], argv
    return argv[found[0] + 1:]


def _train_sh_argv(tmp_path, data):
    return _script_argv(tmp_path, 'train.sh', data)


def test_train_and_eval_sh_model_argument_is_optional(tmp_path):
    """`train.sh DATA --amp` (as its header says) keeps the default model and passes the flag on; it used to take
    '--amp' as the model name."""
    def value(argv, flag):
        return argv[len(argv) - 1 - argv[::-1].index(flag) + 1]
    argv = _script_argv(tmp_path, 'train.sh', '/data', '--amp')
    assert value(argv, '--model') == 'dsan_t' and argv[-1] == '--amp' and argv[0] == '/data'
    argv = _script_argv(tmp_path, 'train.sh', '/data', 'dsan_s', '--amp')
    assert value(argv, '--model') == 'dsan_s' and argv[-1] == '--amp'
    # The original's variables: MODEL was ignored while DROP_PATH was read.
    argv = _script_argv(tmp_path, 'train.sh', '/data', MODEL='dsan_s', DROP_PATH='0.2')
    assert value(argv, '--model') == 'dsan_s' and value(argv, '--drop-path') == '0.2'
    argv = _script_argv(tmp_path, 'eval.sh', '/data', 'c.pth', '--img-size', '64', tool='validate.py')
    assert value(argv, '--model') == 'dsan_t' and value(argv, '--checkpoint') == 'c.pth' and argv[-2:] == [
        '--img-size', '64']
    argv = _script_argv(tmp_path, 'eval.sh', '/data', 'c.pth', 'dsan_t2', tool='validate.py')
    assert value(argv, '--model') == 'dsan_t2'


def test_imagenet_recipe_is_the_same_in_train_sh_yaml_and_defaults(tmp_path):
    """train.sh, configs/dsan_t_imagenet.yaml and train.py's defaults all run the paper's command (no AMP)."""
    paper, _ = train.parse_args(['/data', *PAPER_COMMAND])
    defaults, _ = train.parse_args(['/data'])
    cfg, _ = train.parse_args(['-c', str(CLS / 'configs' / 'dsan_t_imagenet.yaml'), '/data'])
    sh, _ = train.parse_args(_train_sh_argv(tmp_path, '/data'))

    def differ(a, b):
        return {k for k in vars(a) if getattr(a, k) != getattr(b, k)}

    assert not paper.amp
    assert differ(defaults, paper) == {'workers'}  # a machine setting, not the recipe: timm's default 4
    assert differ(cfg, paper) == {'config', 'output'}
    assert differ(sh, paper) == {'output'} and sh.output == cfg.output


# ----------------------------------------------------------------------------------------------------- timm flags


def _accum_data(n):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


class _RecordingScheduler:
    def __init__(self):
        self.updates = []

    def step_update(self, num_updates, metric=None):
        self.updates.append(num_updates)


@pytest.mark.parametrize('n', [16, 12])  # 12: the last group has 2 batches of 2, against one batch of 4
def test_grad_accumulation_equals_one_large_batch(n):
    """4 accumulated batches of 2 make the optimizer update of one batch of 8 (SGD with momentum: scale-sensitive,
    unlike Adam, so a loss that is not divided by the accumulation count would show)."""
    x, y = _accum_data(n)
    ref = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))
    models = {k: copy.deepcopy(ref) for k in ('accum', 'large', 'plain')}

    def run(model, batch, accum):
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        sched = _RecordingScheduler()
        out = engine.train_one_epoch(0, model, [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)], opt,
                                     torch.nn.CrossEntropyLoss(), device=torch.device('cpu'),
                                     stop=tu.GracefulStop(signals=()), lr_scheduler=sched, progress=False,
                                     grad_accum_steps=accum)
        return out, sched.updates

    out_a, updates_a = run(models['accum'], 2, 4)
    out_l, updates_l = run(models['large'], 8, 1)
    out_p, _ = run(models['plain'], 2, 1)
    assert updates_a == updates_l == [1, 2] and out_a['num_updates'] == out_l['num_updates'] == 2
    for pa, pl in zip(models['accum'].parameters(), models['large'].parameters()):
        torch.testing.assert_close(pa, pl)
    assert out_a['loss'] == pytest.approx(out_l['loss'], rel=1e-6)  # reported undivided, mean over the images
    # the same micro-batches without accumulation end elsewhere: the comparison above can fail
    assert not torch.allclose(models['plain'][1].weight, models['large'][1].weight, atol=1e-3)
    assert out_p['num_updates'] == n // 2


def test_train_grad_accum_schedules_optimizer_updates(tiny, tmp_path):
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    assert _tiny_run(tiny, tmp_path, 'acc', '--epochs', '3', '--grad-accum-steps', '2', '--sched-on-updates') == 0
    ckpt = torch.load(tmp_path / 'acc' / 'last.pth.tar', weights_only=False)
    # 6 batches per epoch, an update every 2: 9 AdamW steps in 3 epochs
    assert {int(s['step']) for s in ckpt['optimizer']['state'].values()} == {9}
    assert '6 steps and 3 optimizer updates per epoch' in (tmp_path / 'acc' / 'log.txt').read_text()
    # the lr is the schedule's at update 9 of a schedule counted in updates (3 per epoch), not in batches
    args, _ = train.parse_args([str(tiny), '--epochs', '3', '--sched-on-updates', *FAST])
    lrs = {}
    for per_epoch in (3, 6):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
        sched, _ = create_scheduler_v2(opt, **scheduler_kwargs(args), updates_per_epoch=per_epoch)
        sched.step_update(num_updates=9)
        lrs[per_epoch] = opt.param_groups[0]['lr']
    assert lrs[3] != pytest.approx(lrs[6])
    assert ckpt['optimizer']['param_groups'][0]['lr'] == pytest.approx(lrs[3])
    with pytest.raises(SystemExit):
        train.parse_args(['/d', '--grad-accum-steps', '0'])


def test_opt_fused_on_cpu_by_default_and_the_same_update():
    """--opt-fused (default: on for the CPU) builds torch's fused Adam / AdamW / SGD, whose update equals the looped
    one; an optimizer without a fused step is a usage error when asked for, and left alone by default."""
    from timm.optim import create_optimizer_v2

    cpu, cuda = torch.device('cpu'), torch.device('cuda')
    args, _ = train.parse_args(['/d'])
    assert args.opt_fused is None
    assert train._optimizer_args(args, cpu)['fused'] is True
    assert 'fused' not in train._optimizer_args(args, cuda)  # timm's defaults on GPUs
    assert 'fused' not in train._optimizer_args(train.parse_args(['/d', '--no-opt-fused'])[0], cpu)
    assert train._optimizer_args(train.parse_args(['/d', '--opt-fused'])[0], cuda)['fused'] is True
    assert 'fused' not in train._optimizer_args(train.parse_args(['/d', '--opt', 'lamb'])[0], cpu)
    with pytest.raises(SystemExit):
        train.parse_args(['/d', '--opt', 'lamb', '--opt-fused'])

    torch.manual_seed(0)
    # (no conv bias before the BatchNorm: its gradient is rounding noise, which Adam's normalisation amplifies)
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 6 * 6, 5))
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    for opt_name in ('adamw', 'sgd'):
        a, _ = train.parse_args(['/d', '--opt', opt_name, '--lr', '0.01'])
        models, opts = {}, {}
        for fused in (False, True):
            models[fused] = copy.deepcopy(ref)
            kwargs = train._optimizer_args(a, cpu if fused else cuda)  # cuda: the same arguments without fused
            opts[fused] = create_optimizer_v2(models[fused], **kwargs)
            assert opts[fused].defaults.get('fused') is (True if fused else None)
            for _ in range(3):
                opts[fused].zero_grad()
                torch.nn.functional.cross_entropy(models[fused](x), y).backward()
                opts[fused].step()
        for p0, p1 in zip(models[False].parameters(), models[True].parameters()):
            torch.testing.assert_close(p1, p0, atol=1e-6, rtol=1e-5)
        assert not torch.equal(models[True][3].weight, ref[3].weight)


def test_resume_keeps_the_fused_optimizer_step():
    """An optimizer state saved without the fused flag (older torch, or a run on another device) turned the fused
    step off on resume; this run's implementation is kept, and the update is the one the saved state continues."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(8, 4)

    def steps(opt, n):
        for _ in range(n):
            opt.zero_grad()
            lin(x).square().mean().backward()
            opt.step()

    looped = torch.optim.AdamW(lin.parameters(), lr=0.1)
    steps(looped, 2)
    saved = copy.deepcopy(looped.state_dict())
    for group in saved['param_groups']:
        group.pop('fused', None)  # as a checkpoint of torch 1.13 (the original's) holds it
    start = [p.detach().clone() for p in lin.parameters()]
    steps(looped, 1)
    expected = [p.detach().clone() for p in lin.parameters()]
    with torch.no_grad():
        for p, p0 in zip(lin.parameters(), start):
            p.copy_(p0)
    fused = torch.optim.AdamW(lin.parameters(), lr=0.1, fused=True)
    train.load_optimizer_state(fused, saved)
    assert all(g['fused'] is True for g in fused.param_groups)
    assert all(s['step'].dtype == torch.float32 and int(s['step']) == 2 for s in fused.state.values())
    steps(fused, 1)
    for p, e in zip(lin.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize('decreasing', [False, True])
def test_keep_checkpoint_history_keeps_the_n_best(tmp_path, decreasing):
    """timm's --checkpoint-hist: the N best by the eval metric (ties keep the earlier), across a restart."""
    last = tmp_path / 'last.pth.tar'
    metrics = [0.5, 0.9, 0.1, 0.7, 0.9, None]
    kept = []
    for epoch, metric in enumerate(metrics):
        tmp = tmp_path / 'new'
        tmp.write_text(f'epoch {epoch}')
        os.replace(tmp, last)  # as atomic_save replaces last.pth.tar
        kept = tu.keep_checkpoint_history(str(last), epoch, 2, metric, decreasing)
    best = [1, 4] if not decreasing else [2, 0]  # 0.9 twice: epoch 1 stays ahead of epoch 4
    assert [os.path.basename(p) for p in kept] == [f'checkpoint-{e}.pth.tar' for e in best]
    assert sorted(p.name for p in tmp_path.glob('checkpoint-*.pth.tar')) == sorted(
        f'checkpoint-{e}.pth.tar' for e in best)
    for e in best:  # each file is that epoch's checkpoint, not a copy of the last one
        assert (tmp_path / f'checkpoint-{e}.pth.tar').read_text() == f'epoch {e}'
    assert not [p for p in os.listdir(tmp_path) if p.endswith('.tmp')]
    assert tu.keep_checkpoint_history(str(last), 9, 0, 1.0, decreasing) == []  # 0 keeps none, deletes none
    assert len(list(tmp_path.glob('checkpoint-*.pth.tar'))) == 2


def test_checkpoint_hist_keeps_the_n_best_epochs_of_a_run(tiny, tmp_path):
    assert train.parse_args(['/d'])[0].checkpoint_hist == 10  # timm's default
    run = tmp_path / 'hist'
    assert _tiny_run(tiny, tmp_path, 'hist', '--epochs', '4', '--checkpoint-hist', '2') == 0
    files = sorted(p.name for p in run.glob('checkpoint-*.pth.tar'))
    assert len(files) == 2
    with open(run / 'summary.csv') as f:
        top1 = {int(row['epoch']): float(row['eval_top1']) for row in csv.DictReader(f)}
    kept = {int(name.split('-')[1].split('.')[0]) for name in files}
    others = set(top1) - kept
    assert min(top1[e] for e in kept) >= max(top1[e] for e in others)  # the two best by --eval-metric top1
    for name in files:
        ckpt = torch.load(run / name, weights_only=False)
        assert ckpt['metric'] == pytest.approx(top1[ckpt['epoch']])
    assert not [p for p in os.listdir(run) if p.endswith('.tmp')]
    assert _tiny_run(tiny, tmp_path, 'none', '--epochs', '1', '--checkpoint-hist', '0') == 0
    assert not list((tmp_path / 'none').glob('checkpoint-*'))


def test_train_torchcompile_matches_eager(tiny, tmp_path):
    from torch._dynamo.utils import counters
    assert train.parse_args(['/d', '--torchcompile'])[0].torchcompile == 'inductor'  # timm: a bare flag = inductor
    assert train.parse_args(['/d'])[0].torchcompile is None
    assert _tiny_run(tiny, tmp_path, 'eager', '--epochs', '1') == 0
    torch._dynamo.reset()
    counters.clear()
    assert _tiny_run(tiny, tmp_path, 'compiled', '--epochs', '1', '--torchcompile', 'aot_eager') == 0
    assert counters['stats']['unique_graphs'] >= 1  # the compiled model really ran
    a = torch.load(tmp_path / 'eager' / 'last.pth.tar', weights_only=False)
    b = torch.load(tmp_path / 'compiled' / 'last.pth.tar', weights_only=False)
    assert set(a['state_dict']) == set(b['state_dict'])  # saved unwrapped (no '_orig_mod.' prefix)
    for k, v in a['state_dict'].items():
        torch.testing.assert_close(b['state_dict'][k], v, rtol=1e-4, atol=1e-5)
    assert b['metric'] == pytest.approx(a['metric'])


def _validate_tiny(data, tmp_path, name, *extra):
    torch.manual_seed(0)  # no checkpoint: the same random weights in every call
    args = validate.build_parser().parse_args([
        str(data), '--model', '_test_tiny_net', '--num-classes', '3', '--img-size', '32', '--crop-pct', '1.0',
        '-j', '0', '--no-progress', '--per-image-csv', str(tmp_path / f'{name}.csv'), *extra])
    summary = validate.validate(args)
    with open(tmp_path / f'{name}.csv') as f:
        probs = [[float(p) for p in row['top5_probs'].split()] for row in csv.DictReader(f)]
    return summary, torch.tensor(probs)


def test_a_validation_folder_is_found_as_the_original_found_it(tiny, tmp_path):
    """The original's default split was 'validation', which timm's folder search also found as 'val/'; ours is
    'val', so a 'validation/' layout must be found the other way round (train.py and validate.py)."""
    root = tmp_path / 'data'
    _copy_tree(tiny / 'train', root / 'train')
    _copy_tree(tiny / 'val', root / 'validation')
    assert cls_data.search_split(str(root), 'val') == 'validation'
    assert cls_data.search_split(str(root), 'validation') == 'validation'
    assert cls_data.search_split(str(tiny), 'validation') == 'val'
    assert cls_data.search_split(str(root), 'test') == 'test'
    ckpt = tmp_path / 'dsan_t.pth.tar'
    _original_format_checkpoint(ckpt, num_classes=3)
    args = validate.build_parser().parse_args([str(root), '--model', 'dsan_t', '--checkpoint', str(ckpt),
                                              '--img-size', '32', '-b', '6', '-j', '0', '--no-progress'])
    summary = validate.validate(args)
    assert summary['count'] == 12 and summary['split'].endswith('validation')
    assert train.build_parser().parse_args([str(root)]).decay_epochs == 100  # the original's default


def test_validate_batch_size_default_is_timms():
    assert validate.build_parser().parse_args([]).batch_size == 256


def test_validate_torchcompile_matches_eager(tiny, tmp_path):
    from torch._dynamo.utils import counters
    assert validate.build_parser().parse_args(['--torchcompile']).torchcompile == 'inductor'
    eager, p_eager = _validate_tiny(tiny, tmp_path, 'eager')
    torch._dynamo.reset()
    counters.clear()
    compiled, p_compiled = _validate_tiny(tiny, tmp_path, 'compiled', '--torchcompile', 'aot_eager')
    assert counters['stats']['unique_graphs'] >= 1
    assert compiled['count'] == eager['count'] == 12 and compiled['top1'] == eager['top1']
    assert compiled['loss'] == pytest.approx(eager['loss'], abs=1e-5)
    torch.testing.assert_close(p_compiled, p_eager, rtol=0, atol=1e-4)


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_validate_amp_dtype_on_cpu(tiny, tmp_path, monkeypatch, dtype):
    seen = []
    evaluate = engine.evaluate

    def spy(model, loader, *, amp_autocast, **kw):
        with amp_autocast():
            seen.append((torch.is_autocast_enabled('cpu'), torch.get_autocast_dtype('cpu')))
        return evaluate(model, loader, amp_autocast=amp_autocast, **kw)

    monkeypatch.setattr(validate.engine, 'evaluate', spy)
    fp32, p32 = _validate_tiny(tiny, tmp_path, 'fp32')
    amp, p_amp = _validate_tiny(tiny, tmp_path, 'amp', '--amp', '--amp-dtype', dtype)
    assert not seen[0][0] and seen[1] == (True, getattr(torch, dtype))
    assert (fp32['amp'], amp['amp'], amp['count']) == ('off', dtype, 12)
    # low precision changes the probabilities a little, not the picture
    assert not torch.equal(p_amp, p32)
    torch.testing.assert_close(p_amp, p32, rtol=0, atol=0.02)


# ----------------------------------------------------------------------------------------------------- summary.csv


def test_summary_csv_has_one_header_across_a_resume(tiny, tmp_path):
    """train.py writes summary.csv itself (timm's update_summary wrote no header in 1.0.15, the oldest timm
    requirements.txt allows): one header, timm's columns, a row per epoch across a resume, read by plot_curves."""
    plot_curves = _load_tool('plot_curves')
    run = tmp_path / 'sum'
    assert _tiny_run(tiny, tmp_path, 'sum', '--epochs', '2') == 0
    assert _tiny_run(tiny, tmp_path, 'sum', '--epochs', '3', '--resume', run / 'last.pth.tar') == 0
    lines = (run / 'summary.csv').read_text().splitlines()
    assert lines[0].split(',')[:3] == ['epoch', 'train_loss', 'train_lr'] and 'eval_top1' in lines[0]
    assert len(lines) == 4 and lines.count(lines[0]) == 1
    cols = plot_curves.read_summary(str(run / 'summary.csv'))
    assert cols['epoch'] == [0, 1, 2]
    last = torch.load(run / 'last.pth.tar', weights_only=False)
    assert cols['eval_top1'][-1] == pytest.approx(last['metric'])
    png = plot_curves.plot_summary(str(run / 'summary.csv'), str(tmp_path / 'curves.png'))
    from PIL import Image
    assert Image.open(png).size == (1500, 400)


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
def test_padded_repeats_are_the_samplers_padding():
    """engine.padded_repeats marks exactly the indices timm's OrderedDistributedSampler repeats."""
    from timm.data.distributed_sampler import OrderedDistributedSampler
    for total, world in ((21, 2), (10, 4), (8, 4), (1, 3)):
        seen = []
        for rank in range(world):
            indices = list(OrderedDistributedSampler(range(total), num_replicas=world, rank=rank))
            repeat = engine.padded_repeats(rank, world, 0, len(indices), total)
            assert repeat.tolist() == [rank + p * world >= total for p in range(len(indices))]
            seen += [i for i, r in zip(indices, repeat.tolist()) if not r]
            # a batch in the middle of the rank's samples
            assert engine.padded_repeats(rank, world, 1, len(indices) - 1, total).tolist() == repeat.tolist()[1:]
        assert sorted(seen) == list(range(total))  # every image once


def test_two_process_gloo_run(tiny, tmp_path):
    env = _env()
    env['PYTHON'] = PY
    # An odd number of validation images: the sampler pads one rank with a repeat, which must not count.
    tiny = _copy_tree(tiny, tmp_path / 'data')
    sorted((tiny / 'val' / '00_disk').iterdir())[0].unlink()
    r = subprocess.run(['bash', str(CLS / 'distributed_train.sh'), '2', str(tiny), '--model', 'dsan_t',
                        '--epochs', '2', '-b', '4', '--output', str(tmp_path), '--experiment', 'ddp', *FAST,
                        '--grad-accum-steps', '2'],  # DDP's no_sync on the batches that only accumulate
                       capture_output=True, text=True, env=env, timeout=600, cwd=str(ROOT))
    assert r.returncode == 0, r.stderr[-4000:]
    assert 'with 2 process(es)' in r.stderr and 'backend gloo' in r.stderr
    assert 'All 2 ranks hold identical weights' in r.stderr
    ckpt = torch.load(tmp_path / 'ddp' / 'last.pth.tar', weights_only=False)
    assert ckpt['epoch'] == 1 and len(ckpt['rng_states']) == 2
    assert not any(k.startswith('module.') for k in ckpt['state_dict'])
    # The logged accuracy of the last epoch is validate.py's on one process.
    with open(tmp_path / 'ddp' / 'summary.csv') as f:
        logged = float(list(csv.DictReader(f))[-1]['eval_top1'])
    v = _run([CLS / 'validate.py', tiny, '--model', 'dsan_t', '--checkpoint', tmp_path / 'ddp' / 'last.pth.tar',
              '--img-size', '32', '--crop-pct', '1.0', '-b', '4', '-j', '0', '--no-progress'], timeout=300)
    assert v.returncode == 0, v.stderr[-2000:]
    assert '(11 images' in v.stdout and abs(float(v.stdout.split('top1 ')[1].split()[0]) - logged) < 1e-3


# ----------------------------------------------------------------------------------------------------- tools


def _load_tool(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f'cls_tool_{name}', CLS / 'tools' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plot_curves(tmp_path):
    summary = tmp_path / 'summary.csv'
    summary.write_text('epoch,train_loss,train_lr,eval_top1,eval_top5,eval_loss,lr\n'
                       '0,2.0,0.001,20,60,1.9,0.001\n1,1.5,0.0005,40,80,1.4,0.0005\n'
                       'epoch,train_loss,train_lr,eval_top1,eval_top5,eval_loss,lr\n'  # appended by a resume
                       '2,1.2,0.0002,50,,1.1,0.0002\n')
    plot_curves = _load_tool('plot_curves')
    cols = plot_curves.read_summary(str(summary))
    assert cols['epoch'] == [0, 1, 2] and cols['eval_top1'] == [20, 40, 50] and cols['lr'][-1] == 0.0002
    assert cols['eval_top5'][:2] == [60, 80] and cols['eval_top5'][2] != cols['eval_top5'][2]  # empty cell: NaN
    out = plot_curves.plot_summary(str(summary), str(tmp_path / 'c.png'))
    from PIL import Image
    assert Image.open(out).size == (1500, 400)  # figsize 15 x 4 in at 100 dpi


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


@pytest.mark.parametrize('script', ['train.py', 'validate.py'])
def test_pretrained_without_weights_is_one_line(tiny, tmp_path, script):
    """The released checkpoints cannot be downloaded: --pretrained says where they go and which flag loads them, in
    one line, with argparse's exit status 2, not a traceback."""
    extra = ['--epochs', '1', '--output', tmp_path] if script == 'train.py' else []
    r = _run([CLS / script, tiny, '--model', 'dsan_t', '--pretrained', *extra], timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert 'Traceback' not in r.stderr
    lines = [line for line in r.stderr.splitlines() if 'error:' in line]
    assert len(lines) == 1 and 'no downloadable pretrained weights' in lines[0]
    flag = '--initial-checkpoint' if script == 'train.py' else '--checkpoint'
    assert flag in lines[0] and 'pretrained_cfg_overlay' in lines[0]


# ------------------------------------------------------------------------------------------ run folders and resume


def test_a_run_folder_holding_a_run_is_not_overwritten(tiny, tmp_path, capsys):
    """Re-running into a finished run's folder without --resume used to overwrite its checkpoints, model_best and
    args.yaml and mix the two runs' summary rows; two default-named runs of one second shared a folder."""
    assert _tiny_run(tiny, tmp_path, 'x', '--epochs', '1') == 0
    # (log.txt aside: in this one process the first run's log handler is still open when the second one fails.)
    files = lambda: {p.name: p.read_bytes() for p in (tmp_path / 'x').iterdir() if p.name != 'log.txt'}  # noqa: E731
    before = files()
    assert _tiny_run(tiny, tmp_path, 'x', '--epochs', '1', '--lr', '1e-5') == 2
    err = capsys.readouterr().err
    assert f'{tmp_path / "x"} holds another run (last.pth.tar, model_best.pth.tar): resume it' in err
    assert files() == before
    # Resuming into the same folder is what it is for; into another run's folder is refused too.
    assert _tiny_run(tiny, tmp_path, 'y', '--epochs', '1') == 0
    assert _tiny_run(tiny, tmp_path, 'y', '--epochs', '2', '--resume', tmp_path / 'x' / 'last.pth.tar') == 2
    assert 'holds another run' in capsys.readouterr().err
    assert _tiny_run(tiny, tmp_path, 'x', '--epochs', '2', '--resume', tmp_path / 'x' / 'last.pth.tar') == 0
    base = str(tmp_path / 'new')
    assert [tu.make_new_run_dir(base) for _ in range(3)] == [base, f'{base}-1', f'{base}-2']


def test_resume_repairs_a_run_folder_killed_between_saves(tiny, tmp_path):
    """A kill after last.pth.tar (the epoch's commit) but before model_best and the history left model_best at an
    older epoch than the best one last.pth.tar records, for good; a kill while saving left a full-size temp file."""
    run = tmp_path / 'k'
    assert _tiny_run(tiny, tmp_path, 'k', '--epochs', '2', '--checkpoint-hist', '5') == 0
    last = torch.load(run / 'last.pth.tar', weights_only=False)
    last.update(best_epoch=1, best_metric=99.0)  # epoch 1 is the best: what a kill leaves
    tu.atomic_save(last, str(run / 'last.pth.tar'))
    stale = dict(last, epoch=0)
    tu.atomic_save(stale, str(run / 'model_best.pth.tar'))
    (run / 'checkpoint-1.pth.tar').unlink()
    (run / '.last.pth.tar.x1y2z3.tmp').write_bytes(b'partial')
    (run / 'summary.csv').write_text((run / 'summary.csv').read_text() + '2,0.5,0.001,1,,,0.001\n')  # a lost epoch
    assert _tiny_run(tiny, tmp_path, 'k', '--epochs', '3', '--checkpoint-hist', '5',
                     '--resume', run / 'last.pth.tar') == 0
    best_epoch = torch.load(run / 'last.pth.tar', weights_only=False)['best_epoch']
    assert best_epoch in (1, 2) and tu.checkpoint_epoch(str(run / 'model_best.pth.tar')) == best_epoch
    assert tu.checkpoint_epoch(str(run / 'checkpoint-1.pth.tar')) == 1
    assert not (run / '.last.pth.tar.x1y2z3.tmp').exists()
    with open(run / 'summary.csv') as f:  # the lost attempt's row of epoch 2 replaced by the epoch that ran
        rows = list(csv.DictReader(f))
    assert [int(r['epoch']) for r in rows] == [0, 1, 2] and rows[2]['train_loss'] != '0.5'


def test_a_run_resumed_into_another_folder_takes_its_best_model(tiny, tmp_path):
    run = tmp_path / 'p'
    assert _tiny_run(tiny, tmp_path, 'p', '--epochs', '1', '--eval-metric', 'top5') == 0  # top5: 100 at epoch 0
    assert _tiny_run(tiny, tmp_path, 'q', '--epochs', '2', '--eval-metric', 'top5', '--resume',
                     run / 'last.pth.tar') == 0
    last = torch.load(tmp_path / 'q' / 'last.pth.tar', weights_only=False)
    assert last['best_epoch'] == 0 and tu.checkpoint_epoch(str(tmp_path / 'q' / 'model_best.pth.tar')) == 0


def test_a_first_epoch_killed_before_its_checkpoint_leaves_no_run(tiny, tmp_path):
    """A kill in epoch 0 between its summary row and last.pth.tar left a folder that was refused as a run, with a
    hint to resume a checkpoint that did not exist; the run is started again there."""
    run = tmp_path / 'z'
    run.mkdir()
    (run / 'summary.csv').write_text('epoch,train_loss,lr\n0,9.9,0.001\n')
    assert _tiny_run(tiny, tmp_path, 'z', '--epochs', '1') == 0
    with open(run / 'summary.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]['train_loss'] != '9.9'


def test_resume_refuses_what_would_lose_or_mislabel_work(tiny, tmp_path, capsys):
    """Each of these resumed silently (or crashed with a traceback): the EMA weights dropped, renamed class folders
    relabelled, a timm checkpoint (its args a Namespace) or one without optimizer state, another --opt."""
    run = tmp_path / 'e'
    assert _tiny_run(tiny, tmp_path, 'e', '--epochs', '1', '--model-ema') == 0
    last = run / 'last.pth.tar'
    run_args = (run / 'args.yaml').read_text()
    assert _tiny_run(tiny, tmp_path, 'e', '--epochs', '2', '--resume', last) == 2
    err = capsys.readouterr().err
    assert f'--resume {last} holds the EMA weights of a --model-ema run: add --model-ema' in err
    assert f'-c {run / "args.yaml"} --resume {last}' in err

    (run / '.last.pth.tar.live.tmp').write_bytes(b'')
    renamed = tmp_path / 'renamed'
    shutil.copytree(tiny, renamed)
    for split in ('train', 'val'):
        classes = sorted(p.name for p in (renamed / split).iterdir())
        (renamed / split / classes[0]).rename(renamed / split / 'zzz')
    assert train.main([str(renamed), '--model', '_test_tiny_net', '-b', '4', '--output', str(tmp_path),
                       '--model-ema', '--epochs', '2', '--resume', str(last), *FAST]) == 2
    err = capsys.readouterr().err
    assert 'the run was trained on other class folders' in err and 'only in the folders: zzz' in err
    assert (run / 'args.yaml').read_text() == run_args  # a refused resume leaves the run's arguments as they were
    assert (run / '.last.pth.tar.live.tmp').exists()  # and another process's temp files

    ckpt = torch.load(last, weights_only=False)
    timm_style = dict(ckpt, args=argparse.Namespace(**ckpt['args']))
    torch.save(timm_style, tmp_path / 'timm_style.pth.tar')
    assert tu.load_training_checkpoint(str(tmp_path / 'timm_style.pth.tar'))['args'] == ckpt['args']
    no_opt = {k: v for k, v in ckpt.items() if k != 'optimizer'}
    torch.save(no_opt, tmp_path / 'no_opt.pth.tar')
    assert _tiny_run(tiny, tmp_path, 'n', '--epochs', '2', '--model-ema', '--resume', tmp_path / 'no_opt.pth.tar') == 2
    assert 'has no optimizer state (weights and epoch only): add --no-resume-opt' in capsys.readouterr().err
    assert _tiny_run(tiny, tmp_path, 'o', '--epochs', '2', '--model-ema', '--opt', 'sgd', '--resume', last) == 2
    assert 'was trained with --opt adamw, this run asks for --opt sgd' in capsys.readouterr().err
    assert _tiny_run(tiny, tmp_path, 'n', '--epochs', '2', '--model-ema', '--no-resume-opt',
                     '--resume', tmp_path / 'no_opt.pth.tar') == 0


def test_resume_with_other_metrics_keeps_the_summary_columns(tiny, tmp_path):
    """A run resumed with --model-ema adds ema columns: the summary is rewritten under the union of the columns (the
    new row's values had landed under the old header, lr reading the EMA's top-1). Other changed arguments are
    named in a warning."""
    run = tmp_path / 's'
    assert _tiny_run(tiny, tmp_path, 's', '--epochs', '1') == 0
    assert _tiny_run(tiny, tmp_path, 's', '--epochs', '2', '--model-ema', '--weight-decay', '0.5',
                     '--resume', run / 'last.pth.tar') == 0
    assert "--resume with arguments other than the run's: model_ema False -> True, weight_decay 0.05 -> 0.5" in \
        (run / 'log.txt').read_text()
    with open(run / 'summary.csv') as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames[-1] == 'lr' and 'eval_ema_top1' in reader.fieldnames
    assert [r['eval_ema_top1'] == '' for r in rows] == [True, False]
    assert all(0 < float(r['lr']) < 1e-2 for r in rows)


def test_summary_rows_of_epochs_that_run_again_are_replaced(tmp_path):
    """An epoch's row replaces the rows of that epoch and later ones (an attempt killed before its checkpoint, or a
    resume from an earlier checkpoint), when it is written: a resume that stops at once loses no row."""
    path = str(tmp_path / 'summary.csv')
    for epoch in range(3):
        tu.append_summary(path, epoch, {'loss': 1.0 - epoch / 10}, {'top1': 10.0 * epoch}, lr=1e-3)
    tu.append_summary(path, 1, {'loss': 0.5}, {'top1': 20.0, 'ema_top1': 21.0}, lr=1e-4)
    with open(path) as f:
        reader = csv.DictReader(f)
        assert [dict(r) for r in reader] == [
            {'epoch': '0', 'train_loss': '1.0', 'eval_top1': '0.0', 'eval_ema_top1': '', 'lr': '0.001'},
            {'epoch': '1', 'train_loss': '0.5', 'eval_top1': '20.0', 'eval_ema_top1': '21.0', 'lr': '0.0001'}]


# ------------------------------------------------------------------------------------- validate.py vs the original


def test_validate_evaluates_a_folder_of_class_folders_itself(tiny, tmp_path, monkeypatch):
    """`validate.py /data/imagenet/val` worked in the original (timm 0.4.12 fell back to the root folder); a root
    holding split folders keeps its error. A non-square --input-size is squashed to (H, W) / crop_pct before the
    crop, as timm 0.4.12 did (timm 1.0's 'center' keeps the aspect ratio)."""
    crop_modes = []
    real_loader = validate.create_loader
    monkeypatch.setattr(validate, 'create_loader', lambda *a, **k: crop_modes.append(k['crop_mode']) or
                        real_loader(*a, **k))
    summary, _ = _validate_tiny(tiny / 'val', tmp_path, 'root')
    assert summary['count'] == 12 and crop_modes == ['center']
    assert cls_data.search_split(str(tiny), 'validation', allow_root=True) == 'val'
    assert cls_data.search_split(str(tiny), 'test', allow_root=True) == 'test'  # tiny/ holds split folders
    summary, _ = _validate_tiny(tiny, tmp_path, 'nonsquare', '--input-size', '3', '32', '40')
    assert summary['img_size'] == [32, 40]
    _validate_tiny(tiny, tmp_path, 'nonsquare_center', '--input-size', '3', '32', '40', '--crop-mode', 'center')
    assert crop_modes[1:] == ['squash', 'center']
    # A class folder named like a split (CIFAR-100 has 'train') holds images, not class folders: still a class.
    flat = tmp_path / 'flat'
    _copy_tree(tiny / 'val', flat)
    first = sorted(flat.iterdir())[0]
    first.rename(flat / 'train')
    summary, _ = _validate_tiny(flat, tmp_path, 'flat')
    assert summary['count'] == 12


@pytest.mark.parametrize('extra, message', [
    (['--interpolation', 'BICUBIC'], "argument --interpolation: invalid choice: 'BICUBIC'"),
    (['--mean', '0.5', '0.5'], 'argument --mean: takes 1 or 3 values (one per input channel), got 2'),
    (['--std', '0', '1', '1'], '--std must be positive values'),
    (['--input-size', '3', '0', '64'], '--input-size must be C H W with C = 3 (images are read as RGB) and H, W >= 1'),
    (['--input-size', '1', '64', '64'], '--input-size must be C H W with C = 3 (images are read as RGB)'),
    (['--per-image-csv', '{file}/out.csv'], "argument --per-image-csv: '{file}' is a file, not a folder"),
    (['--results-file', '{tmp}'], 'argument --results-file: expected a file name, got the folder'),
    (['--results-file', '{tmp}/new/'], 'argument --results-file: expected a file name, got the folder path'),
    (['--results-file', '{tmp}/r.csv', '--per-image-csv', '{tmp}/r.csv'], 'is also the --results-file'),
])
def test_validate_refuses_bad_overrides_and_outputs_before_evaluating(tiny, tmp_path, capsys, monkeypatch, extra,
                                                                      message):
    """One usage line each (they were tracebacks; an unwritable output path was found only after the evaluation,
    which then was lost)."""
    monkeypatch.setattr(engine, 'evaluate', lambda *a, **k: pytest.fail('evaluated before the check'))
    file = tmp_path / 'a_file'
    file.write_text('x')
    extra = [e.format(file=file, tmp=tmp_path) for e in extra]
    with pytest.raises(SystemExit) as e:
        validate.main([str(tiny), '--model', '_test_tiny_net', '--num-classes', '3', '--img-size', '32', '-j', '0',
                       '--no-progress', *extra])
    assert e.value.code == 2
    assert message.format(file=file) in capsys.readouterr().err


def test_validate_keeps_the_results_when_an_output_cannot_be_written(tiny, tmp_path, capsys, monkeypatch):
    def fail(*_):
        raise PermissionError('disk full')
    monkeypatch.setattr(validate, '_write_summary', fail)
    code = validate.main([str(tiny), '--model', '_test_tiny_net', '--num-classes', '3', '--img-size', '32', '-j', '0',
                          '--no-progress', '--results-file', str(tmp_path / 'r.json')])
    err = capsys.readouterr().err
    assert code == 2 and 'could not write the results (disk full); they were: {' in err and '"top1":' in err


def test_skipped_images_are_named_in_the_per_image_csv(tiny, tmp_path):
    """With --skip-bad-images an unreadable file is replaced by the next one (timm's skipping, counted twice): the
    CSV row names the file really read and the one it stands for (it had named the unreadable file, with another
    image's predictions)."""
    data = tmp_path / 'data'
    _copy_tree(tiny / 'val', data / 'val')
    first = sorted((data / 'val').iterdir())[0]
    bad = first / 'zz_broken.png'  # natural order: the last of its class, so the next image is another class's
    bad.write_bytes(b'not an image')
    summary, _ = _validate_tiny(data, tmp_path, 'skip', '--skip-bad-images')
    assert summary['count'] == 13 and summary['replaced'] == 1
    with open(tmp_path / 'skip.csv') as f:
        rows = list(csv.DictReader(f))
    replaced = [r for r in rows if r['in_place_of']]
    assert len(replaced) == 1 and replaced[0]['in_place_of'].endswith('zz_broken.png')
    assert not replaced[0]['file'].endswith('zz_broken.png')
    assert sum(r['file'] == replaced[0]['file'] for r in rows) == 2
    assert all(len(r['top5_names'].split(' ')) == 3 for r in rows)  # 3 classes: no empty names
    # A model of more classes than the folders: the classes without a folder are '-' (they were empty names, and
    # the space-separated list lost their places).
    _validate_tiny(tiny, tmp_path, 'wide', '--num-classes', '5')
    with open(tmp_path / 'wide.csv') as f:
        assert all(r['top5_names'].split(' ').count('-') == 2 for r in csv.DictReader(f))


def test_randaugment_posterize_at_full_magnitude_runs():
    """rand-m9-mstd0.5-inc1 draws magnitude 10 now and then, where timm's PosterizeIncreasing keeps 0 bits: Pillow 13
    refuses 0 bits and training stopped; as with earlier Pillows (the original's runs), the image turns black."""
    from PIL import Image
    from timm.data.auto_augment import AugmentOp
    img = Image.new('RGB', (8, 8), (200, 100, 50))
    op = AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=10)
    assert op(img).getpixel((0, 0)) == (0, 0, 0)
    assert AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=0)(img).getpixel((0, 0)) == (192, 96, 48)
    grey = Image.new('L', (4, 4), 77)
    assert cls_data._posterize(grey, 0).getpixel((0, 0)) == 0 and cls_data._posterize(grey, 8) is grey
