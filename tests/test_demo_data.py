"""Tests of the procedural demo datasets (dsan.data.demo): layouts, determinism, labels, masks, CLI."""
import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dsan.data import demo


def _files(root):
    out = []
    for d, _, fs in os.walk(root):
        out.extend(os.path.relpath(os.path.join(d, f), root) for f in fs)
    return sorted(out)


def test_classification_layout(tmp_path):
    counts = demo.make_classification(str(tmp_path), num_classes=4, train_per_class=3, val_per_class=2, size=32)
    assert counts == {'train': 12, 'val': 8}
    for split, n in (('train', 3), ('val', 2)):
        classes = sorted(os.listdir(tmp_path / split))
        assert classes == ['00_disk', '01_ring', '02_square', '03_frame']
        for c in classes:
            files = os.listdir(tmp_path / split / c)
            assert len(files) == n
            img = Image.open(tmp_path / split / c / files[0])
            assert img.size == (32, 32) and img.mode == 'RGB'
    assert (tmp_path / 'classes.txt').read_text().split() == classes


def test_classification_is_deterministic(tmp_path):
    a, b, c = tmp_path / 'a', tmp_path / 'b', tmp_path / 'c'
    for out, seed in ((a, 1), (b, 1), (c, 2)):
        demo.make_classification(str(out), num_classes=3, train_per_class=2, val_per_class=1, size=24, seed=seed)
    files = _files(a)
    assert files == _files(b) == _files(c)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files if f.endswith('.jpg'))


@pytest.mark.parametrize('shape', demo.SHAPES)
def test_every_shape_renders_inside_the_image(shape):
    alpha = demo.render_shape_alpha(shape, (64, 64), (32, 32), 20, angle=10)
    assert alpha.shape == (64, 64) and alpha.dtype == np.float32
    assert 0 <= alpha.min() and alpha.max() <= 1
    assert (alpha > 0.5).sum() > 50
    assert alpha[0].max() == alpha[-1].max() == alpha[:, 0].max() == alpha[:, -1].max() == 0


def test_paired_shapes_differ_in_structure():
    def mask(s):
        return demo.render_shape_alpha(s, (64, 64), (32, 32), 24) > 0.5
    assert mask('disk')[32, 32] and not mask('ring')[32, 32]  # the ring has a hole
    assert mask('square')[32, 32] and not mask('frame')[32, 32]
    up, down = mask('triangle_up'), mask('triangle_down')
    assert up[:32].sum() < up[32:].sum() and down[:32].sum() > down[32:].sum()  # apex up vs apex down
    plus, cross = mask('plus'), mask('cross')
    assert plus[32, 8] and not cross[32, 8] and cross[16, 16] and not plus[16, 16]


def test_unknown_shape_is_named():
    with pytest.raises(ValueError, match="unknown shape 'blob'"):
        demo.render_shape_alpha('blob', (8, 8), (4, 4), 2)


def test_scene_masks_and_semantic_map():
    rng = np.random.default_rng(0)
    scene = demo.render_scene(rng, (96, 96), [1, 4, 6], scale=(0.15, 0.25))
    assert scene.image.shape == (96, 96, 3) and scene.image.dtype == np.uint8
    seg = scene.semantic_mask()
    assert set(np.unique(seg)) <= {0, 2, 5, 7}
    union = np.zeros((96, 96), bool)
    for obj in scene.objects:
        assert not (union & obj.mask).any()  # occlusion leaves disjoint visible masks
        union |= obj.mask
        if obj.mask.any():
            x, y, w, h = obj.bbox
            assert obj.mask[y:y + h, x:x + w].sum() == obj.mask.sum()
    assert ((seg > 0) == union).all()


def test_segmentation_layout(tmp_path):
    demo.make_segmentation(str(tmp_path), num_classes=5, num_train=3, num_val=2, size=48)
    for split, n in (('training', 3), ('validation', 2)):
        imgs = sorted(os.listdir(tmp_path / 'images' / split))
        anns = sorted(os.listdir(tmp_path / 'annotations' / split))
        assert len(imgs) == n and [a[:-4] for a in anns] == [i[:-4] for i in imgs]
        label = np.asarray(Image.open(tmp_path / 'annotations' / split / anns[0]))
        assert label.shape == (48, 48) and label.max() <= 5
    assert (tmp_path / 'classes.txt').read_text().split()[0] == 'background'


def _rle_decode(rle):
    h, w = rle['size']
    flat = np.zeros(h * w, np.uint8)
    pos, val = 0, 0
    for c in rle['counts']:
        flat[pos:pos + c] = val
        pos, val = pos + c, 1 - val
    return flat.reshape((h, w), order='F').astype(bool)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 2 ** 31 - 1))
def test_rle_roundtrip(h, w, seed):
    mask = np.random.default_rng(seed).random((h, w)) > 0.5
    rle = demo.mask_to_rle(mask)
    assert sum(rle['counts']) == h * w
    assert (_rle_decode(rle) == mask).all()


def test_detection_layout(tmp_path):
    demo.make_detection(str(tmp_path), num_classes=4, num_train=3, num_val=2, size=64)
    for split, n in (('train2017', 3), ('val2017', 2)):
        coco = json.loads((tmp_path / 'annotations' / f'instances_{split}.json').read_text())
        assert len(coco['images']) == n == len(os.listdir(tmp_path / split))
        assert [c['id'] for c in coco['categories']] == [1, 2, 3, 4]
        ids = {im['id'] for im in coco['images']}
        assert coco['annotations']
        for ann in coco['annotations']:
            assert ann['image_id'] in ids and 1 <= ann['category_id'] <= 4
            x, y, bw, bh = ann['bbox']
            assert 0 <= x and 0 <= y and x + bw <= 64 and y + bh <= 64 and bw > 0 and bh > 0
            assert _rle_decode(ann['segmentation']).sum() == ann['area'] > 0


def test_cli_and_errors(tmp_path, capsys):
    out = tmp_path / 'cls'
    counts = demo.main(['--out', str(out), '--num-classes', '2', '--train-per-class', '1', '--val-per-class', '1',
                        '--size', '16'])
    assert counts == {'train': 2, 'val': 2}
    assert 'wrote classification demo data' in capsys.readouterr().out
    with pytest.raises(FileExistsError, match='not empty'):
        demo.make_classification(str(out), num_classes=2)
    with pytest.raises(ValueError, match='num_classes must be between 2 and 10'):
        demo.make_classification(str(tmp_path / 'x'), num_classes=11)
    assert not (tmp_path / 'x').exists()  # arguments are checked before anything is written
    bad = [(['--out', str(out), '--num-classes', '2'], 'not empty (pass --overwrite'),
           (['--num-classes', '11'], 'num_classes must be between 2 and 10, got 11'),
           (['--size', '0'], 'size must be an integer >= 16, got 0'),
           (['--train-per-class', '-2'], 'train_per_class must be an integer >= 1, got -2'),
           (['--task', 'detection', '--max-objects', '0'], 'max_objects must be an integer >= 1, got 0'),
           (['--task', 'segmentation', '--num-val', '0'], 'num_val must be an integer >= 1, got 0')]
    for argv, message in bad:
        if '--out' not in argv:
            argv = argv + ['--out', str(tmp_path / 'y')]
        with pytest.raises(SystemExit) as exc:
            demo.main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith('dsan.data.demo: error: '), (argv, err)
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / 'y').exists()


@pytest.mark.parametrize('task', ['classification', 'segmentation', 'detection'])
def test_overwrite_replaces_what_a_run_wrote(tmp_path, task):
    out = tmp_path / task
    big = dict(classification=dict(num_classes=3, train_per_class=3, val_per_class=2, size=24),
               segmentation=dict(num_classes=3, num_train=4, num_val=2, size=32),
               detection=dict(num_classes=3, num_train=4, num_val=2, size=32))[task]
    small = {k: (2 if k != 'size' else 16) for k in big}
    make = getattr(demo, f'make_{task}')
    make(str(out), **big)
    (out / 'notes.txt').write_text('mine')  # not the generator's: kept
    make(str(out), overwrite=True, **small)
    fresh = tmp_path / 'fresh'
    make(str(fresh), **small)
    assert _files(out) == sorted(_files(fresh) + ['notes.txt'])  # no file of the first run is left
    assert all((out / f).read_bytes() == (fresh / f).read_bytes() for f in _files(fresh))


def test_interrupted_run_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    out = tmp_path / 'cls'
    demo.make_classification(str(out), num_classes=2, train_per_class=2, val_per_class=1, size=16)
    before = {f: (out / f).read_bytes() for f in _files(out)}
    calls = []

    def failing_render(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real_render(*args, **kwargs)

    real_render = demo.render_scene
    monkeypatch.setattr(demo, 'render_scene', failing_render)
    with pytest.raises(KeyboardInterrupt):
        demo.make_classification(str(out), num_classes=3, train_per_class=2, val_per_class=1, size=24, overwrite=True)
    assert {f: (out / f).read_bytes() for f in _files(out)} == before  # nothing half-written, no staging folder
    # A run killed outright leaves its staging folder: the next run removes it and does not count it as content.
    (out.parent / 'empty').mkdir()
    (out.parent / 'empty' / '.partial-x1' / 'train').mkdir(parents=True)
    monkeypatch.undo()
    demo.make_classification(str(out.parent / 'empty'), num_classes=2, train_per_class=1, val_per_class=1, size=16)
    assert sorted(os.listdir(out.parent / 'empty')) == ['classes.txt', 'train', 'val']
