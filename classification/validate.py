#!/usr/bin/env python3
"""Evaluate a checkpoint on an ImageNet-layout validation folder: top-1 / top-5, optional per-image CSV.

Loads the released DSAN checkpoints as they are (``dsan_t.pth.tar`` ...; the DSCN groups of each stage are read
from the file), timm CheckpointSaver files and this repository's ``last.pth.tar`` / ``model_best.pth.tar``::

    python classification/validate.py /path/to/imagenet --model dsan_t --checkpoint dsan_t.pth.tar -b 64
    python classification/validate.py data/demo_cls --model dsan_t --checkpoint output/demo/<run>/model_best.pth.tar \
        --img-size 64 --crop-pct 1.0 --per-image-csv results.csv
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import data as cls_data  # noqa: E402
import engine  # noqa: E402
import model_factory  # noqa: E402
import train_utils as tu  # noqa: E402
from timm.data import create_loader, resolve_data_config  # noqa: E402
from timm.utils import ParseKwargs  # noqa: E402

from dsan.cli import add_renamed_options, output_file_problem  # noqa: E402
from dsan.compile import compile_model  # noqa: E402

_logger = logging.getLogger('validate')


# PIL's resampling filters, by timm's names.
_INTERPOLATIONS = ('nearest', 'bilinear', 'bicubic', 'box', 'hamming', 'lanczos')


def build_parser() -> argparse.ArgumentParser:
    """The validation argument parser (timm's flag names)."""
    parser = argparse.ArgumentParser(description='DSAN ImageNet validation')
    group = parser.add_argument_group('Dataset parameters')
    group.add_argument('data', nargs='?', metavar='DIR', help='dataset root (holding the split folder)')
    group.add_argument('--data-dir', metavar='DIR', help='dataset root (alternative to the positional DIR)')
    group.add_argument('-d', '--dataset', metavar='NAME', default='', help='timm dataset type (default: image folders)')
    group.add_argument('--split', metavar='NAME', default='val', help='split folder (default: val)')
    group.add_argument('--class-map', default='', type=str, metavar='FILENAME',
                       help='class to index map file (default: the one a train.py checkpoint saved, else the class '
                            'folders in natural order)')
    group.add_argument('--skip-bad-images', action='store_true', help='skip unreadable images instead of failing')

    group = parser.add_argument_group('Model parameters')
    group.add_argument('--model', '-m', default='dsan_t', metavar='NAME', help='model name (default: dsan_t)')
    group.add_argument('--checkpoint', default='', type=str, metavar='PATH', help='weights to evaluate')
    group.add_argument('--use-ema', action='store_true', help='evaluate the EMA weights of a training checkpoint')
    group.add_argument('--pretrained', action='store_true', help='use the registered pretrained weights')
    group.add_argument('--num-classes', type=int, default=None, help='classes (default: from the checkpoint)')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, help='extra model kwargs')
    group.add_argument('--img-size', default=None, type=int, metavar='N', help='input image size')
    group.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N N N',
                       help='C H W input size (C = 3: images are read as RGB)')
    group.add_argument('--crop-pct', default=None, type=float, metavar='N', help='center crop ratio')
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='pixel mean override')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='pixel std override')
    group.add_argument('--interpolation', default='', type=str, choices=['', *_INTERPOLATIONS],
                       help='resize interpolation (default: the model\'s, bicubic for DSAN)')
    group.add_argument('--crop-mode', default=None, choices=['center', 'squash', 'border'],
                       help="timm's eval crop: 'center' keeps the aspect ratio; default: 'center' for a square input, "
                            "'squash' for a non-square --input-size (the resize to H / crop-pct x W / crop-pct of "
                            "the original's timm 0.4.12)")

    group = parser.add_argument_group('Run parameters')
    group.add_argument('-b', '--batch-size', default=256, type=int, metavar='N', help='batch size (default: 256)')
    group.add_argument('-j', '--workers', default=4, type=int, metavar='N', help='data-loading processes')
    group.add_argument('--device', default='', type=str, help='"cuda" or "cpu" (default: cuda when available)')
    group.add_argument('--tune-malloc', action=argparse.BooleanOptionalAction, default=True,
                       help='on the CPU, keep freed memory in the process for reuse (glibc; '
                            'dsan.allocator.keep_freed_memory) (default: on)')
    group.add_argument('--amp', action='store_true', help='mixed precision (see --amp-dtype)')
    group.add_argument('--amp-dtype', default='', type=str, choices=['', 'float16', 'bfloat16'],
                       help='dtype of --amp: "float16" or "bfloat16" (default: float16 on CUDA, bfloat16 on CPU)')
    group.add_argument('--channels-last', action='store_true', help='channels-last memory layout')
    group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor', metavar='BACKEND',
                       help='torch.compile the model with this backend (default when given without a value: '
                            'inductor)')
    group.add_argument('--torchcompile-mode', type=str, default=None, metavar='MODE',
                       help='torch.compile mode, e.g. "max-autotune" (default: torch\'s)')
    group.add_argument('--results-file', default='', type=str, metavar='FILENAME',
                       help='write the summary to this .json or .csv file')
    group.add_argument('--per-image-csv', default='', type=str, metavar='FILENAME',
                       help='write one row per image: file, target, correct, top-5 classes and probabilities')
    group.add_argument('--no-progress', action='store_true', help='no progress bar')
    group.add_argument('--pin-mem', action='store_true', help='pin the loader\'s CPU memory (faster copies to a GPU)')
    add_renamed_options(parser, {'--log-freq': '--no-progress for no progress bar (nothing is logged per batch)',
                                 '--num-gpu': 'one device per process: --device cuda:N'})
    return parser


def validate(args: argparse.Namespace) -> dict[str, Any]:
    """Run the evaluation described by ``args``; returns the summary dict (top1, top5, loss, count ...)."""
    device = tu.resolve_device(args.device)
    if args.tune_malloc:
        tu.keep_freed_memory(device)
    data_dir = args.data_dir or args.data
    if not args.dataset:
        args.split = cls_data.search_split(data_dir, args.split, allow_root=True)
        classes = cls_data.check_image_folder(data_dir, args.split)
    if not args.checkpoint and not args.pretrained:
        _logger.warning('No --checkpoint given: evaluating randomly initialised weights')
    model = model_factory.create(args.model, num_classes=args.num_classes, pretrained=args.pretrained,
                                 checkpoint=args.checkpoint, use_ema=args.use_ema, require_classifier=True,
                                 **args.model_kwargs)
    num_classes = model.num_classes if hasattr(model, 'num_classes') else None
    class_map = args.class_map
    if not args.dataset:
        split_dir = os.path.join(data_dir, args.split)
        saved = tu.checkpoint_class_map(args.checkpoint) if args.checkpoint and not class_map else None
        if saved:
            # Labelled as in training: a folder that lacks some classes keeps the training indices.
            unknown = [c for c in classes if c not in saved]
            if unknown:
                raise cls_data.DatasetError(f'class folder(s) of {split_dir!r} are not classes of {args.checkpoint}: '
                                            + ', '.join(repr(c) for c in unknown[:10]))
            _logger.info('Labels: the class indices saved in %s', args.checkpoint)
            class_map = saved
        labels = max(cls_data.read_class_map(class_map, split_dir).values()) + 1 if class_map else len(classes)
        what = f'the class map has {labels} labels' if class_map else f'{split_dir} has {len(classes)} class folders'
        if num_classes is not None and num_classes < labels:
            raise cls_data.DatasetError(f'{what} but the model only {num_classes} classes: the labels would not fit '
                                        'its classifier')
        if num_classes is not None and num_classes != labels:
            _logger.warning('The model has %d classes but %s: check --model/--checkpoint', num_classes, what)
    data_config = resolve_data_config(vars(args), model=model, verbose=True)
    # timm 0.4.12 resized a non-square input to (H / crop_pct, W / crop_pct) before its centre crop; timm 1.0's
    # 'center' mode keeps the aspect ratio instead. 'squash' is the former.
    crop_mode = args.crop_mode or ('squash' if data_config['input_size'][1] != data_config['input_size'][2]
                                   else data_config.get('crop_mode', 'center'))
    model.to(device).eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.torchcompile:
        # With the inductor options the model asks for (DSAN: dsan.compile); other models compile as plain.
        model = compile_model(model, backend=args.torchcompile, mode=args.torchcompile_mode)

    dataset = cls_data.build_dataset(args.dataset, data_dir, args.split, is_training=False,
                                     class_map=class_map, skip_bad_images=args.skip_bad_images)
    loader = create_loader(
        dataset, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=False,
        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
        crop_pct=data_config['crop_pct'], crop_mode=crop_mode, num_workers=args.workers, device=device,
        use_prefetcher=device.type == 'cuda', persistent_workers=False, pin_memory=args.pin_mem)
    amp_dtype = getattr(torch, args.amp_dtype or ('float16' if device.type == 'cuda' else 'bfloat16'))

    def amp_autocast():
        return torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=args.amp)

    start = time.time()
    res = engine.evaluate(model, loader, device=device, amp_autocast=amp_autocast, progress=not args.no_progress,
                          collect=bool(args.per_image_csv), channels_last=args.channels_last)
    elapsed = time.time() - start
    height, width = data_config['input_size'][1:]
    summary = dict(model=args.model, checkpoint=args.checkpoint, split=os.path.join(data_dir or '', args.split),
                   top1=round(res['top1'], 3), top5=round(res['top5'], 3), loss=round(res['loss'], 5),
                   count=res['count'], crop_pct=data_config['crop_pct'],
                   img_size=width if height == width else [height, width],
                   interpolation=data_config['interpolation'], img_per_sec=round(res['count'] / max(elapsed, 1e-9), 1),
                   amp=str(amp_dtype).replace('torch.', '') if args.amp else 'off')
    read_from = getattr(dataset, 'read_from', None)
    if read_from is not None:
        # timm's skipping reads the next image in place of an unreadable one: it is counted twice (as in timm).
        summary['replaced'] = int((read_from[:res['count']] != torch.arange(res['count'])).sum())
        if summary['replaced']:
            _logger.warning('%d unreadable image(s) were replaced by the next readable one (counted twice, as timm '
                            'does); the per-image CSV names the file read', summary['replaced'])
    _logger.info('%s: top1 %.3f top5 %.3f (%d images)', args.model, summary['top1'], summary['top5'], summary['count'])

    try:  # the paths were checked before the run; a failure now still leaves the summary in the log above
        if args.per_image_csv:
            idx_to_class = {v: k for k, v in getattr(dataset.reader, 'class_to_idx', {}).items()}
            _write_per_image(args.per_image_csv, dataset, res, idx_to_class)
            _logger.info('Per-image results: %s', args.per_image_csv)
        if args.results_file:
            _write_summary(args.results_file, summary)
    except OSError as e:
        raise OutputError(f'could not write the results ({e}); they were: {json.dumps(summary)}') from e
    return summary


class OutputError(OSError):
    """An output file (--results-file, --per-image-csv) could not be written; the message holds the results."""


def _write_per_image(path: str, dataset, res: dict[str, Any], idx_to_class: dict[int, str]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    read_from = getattr(dataset, 'read_from', None)
    with open(path, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['file', 'target', 'target_name', 'correct', 'top5_classes', 'top5_names', 'top5_probs']
                   + (['in_place_of'] if read_from is not None else []))
        for i, (t, idx, prob) in enumerate(zip(res['targets'], res['topk_idx'], res['topk_prob'])):
            # With --skip-bad-images, row i may hold the predictions of a later file read in place of file i.
            j = int(read_from[i]) if read_from is not None and read_from[i] >= 0 else i
            # A class the folders do not name (a model with more classes than the folder) is written '-', so the
            # space-separated names keep their positions.
            w.writerow([dataset.filename(j), t, idx_to_class.get(t, '-'), int(idx[0] == t),
                        ' '.join(map(str, idx)), ' '.join(idx_to_class.get(k, '-') for k in idx),
                        ' '.join(f'{p:.4f}' for p in prob)]
                       + ([dataset.filename(i) if j != i else ''] if read_from is not None else []))


def _write_summary(path: str, summary: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith('.json'):
        with open(path, 'w') as f:  # strict JSON: a non-finite loss is null
            json.dump({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in summary.items()},
                      f, indent=2)
    else:
        with open(path, 'w', newline='') as f:
            w = csv.DictWriter(f, fieldnames=list(summary))
            w.writeheader()
            w.writerow({k: v if not isinstance(v, (list, tuple)) else ' '.join(map(str, v))
                        for k, v in summary.items()})


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 on bad input)."""
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    parser = build_parser()
    args = parser.parse_args(argv)
    tu.check_ranges(parser, args, (
        ('-b/--batch-size', 'batch_size', lambda v: v >= 1, '>= 1'),
        ('-j/--workers', 'workers', lambda v: v >= 0, '>= 0'),
        ('--num-classes', 'num_classes', lambda v: v >= 1, '>= 1'),
        ('--img-size', 'img_size', lambda v: v >= 1, '>= 1'),
        ('--crop-pct', 'crop_pct', lambda v: 0 < v <= 1, 'in (0, 1]'),
        tu.INPUT_SIZE_RULE,
        ('--std', 'std', lambda v: all(s > 0 for s in v), 'positive values')))
    chans = args.input_size[0] if args.input_size else int(args.model_kwargs.get('in_chans', 3))
    for flag in ('mean', 'std'):
        values = getattr(args, flag)
        if values is not None and len(values) not in (1, chans):
            parser.error(f'argument --{flag}: takes 1 or {chans} values (one per input channel), got {len(values)}')
    for flag in ('results_file', 'per_image_csv'):
        problem = getattr(args, flag) and output_file_problem(getattr(args, flag), create_folders=True)
        if problem:  # checked now: the evaluation may take an hour
            parser.error(f'argument --{flag.replace("_", "-")}: {problem}')
    if args.results_file and args.per_image_csv and \
            os.path.abspath(args.results_file) == os.path.abspath(args.per_image_csv):
        parser.error(f'argument --per-image-csv: {args.per_image_csv!r} is also the --results-file (one would '
                     'overwrite the other)')
    try:
        summary = validate(args)
    except (cls_data.DatasetError, cls_data.CorruptImageError, model_factory.ModelError, tu.DeviceError,
            FileNotFoundError, OutputError) as e:
        print(f'validate.py: error: {tu.error_message(e)}', file=sys.stderr)
        return 2
    print(f"{summary['model']}: top1 {summary['top1']:.3f}  top5 {summary['top5']:.3f}  "
          f"({summary['count']} images, {summary['split']})")
    print(json.dumps(summary))
    return 0


if __name__ == '__main__':
    sys.exit(main())
