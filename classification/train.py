#!/usr/bin/env python3
"""ImageNet-style training of DSAN (and any timm model), in timm's command-line shape.

Defaults are the paper's recipe (DSAN.md §4): AdamW lr 1e-3 wd 0.05, cosine over 300 epochs plus 10 cooldown,
5 warmup epochs from 1e-6, min lr 1e-6, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, mixup 0.8,
cutmix 1.0, label smoothing 0.1, drop path 0.1, batch 64 per process (8 GPUs in the paper).

Examples::

    # paper recipe, 8 GPUs
    bash classification/distributed_train.sh 8 /path/to/imagenet --model dsan_t -b 64 --lr 1e-3 --drop-path 0.1
    # the bundled demo on a CPU
    python classification/train.py data/demo_cls -c classification/configs/demo.yaml

Reliability: see ``train_utils`` (atomic end-of-epoch checkpoints, exact ``--resume``, SIGTERM/SIGINT and NaN
handling). Outputs go to ``--output/<experiment>``: ``args.yaml``, ``log.txt``, ``summary.csv``,
``last.pth.tar``, ``model_best.pth.tar``, ``checkpoint-<epoch>.pth.tar`` (the ``--checkpoint-hist`` best),
``training_curves.png`` and optional TensorBoard events.

The defaults, ``train.sh`` and ``configs/dsan_t_imagenet.yaml`` are that recipe. Its command has no AMP flag (the
original timm 0.4.12 script then trains in float32), so AMP is off here too; ``--amp`` is available, faster, but
not the recipe behind the published numbers.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from datetime import datetime
from functools import partial

import numpy as np
import torch
import yaml

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import data as cls_data  # noqa: E402
import engine  # noqa: E402
import model_factory  # noqa: E402
import train_utils as tu  # noqa: E402
from timm.data import Mixup, create_loader, resolve_data_config  # noqa: E402
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy  # noqa: E402
from timm.optim import create_optimizer_v2, get_optimizer_class, optimizer_kwargs  # noqa: E402
from timm.scheduler import create_scheduler_v2, scheduler_kwargs  # noqa: E402
from timm.utils import ModelEmaV3, NativeScaler, ParseKwargs, distribute_bn, random_seed  # noqa: E402

from dsan.cli import add_renamed_options  # noqa: E402
from dsan.compile import compile_kwargs  # noqa: E402

_logger = logging.getLogger('train')

# The first parser reads only -c/--config; the YAML it names overrides the defaults of the main parser.
config_parser = argparse.ArgumentParser(description='Training config', add_help=False)
config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                           help='YAML config file specifying default arguments')


def build_parser() -> argparse.ArgumentParser:
    """The training argument parser (timm's flag names; defaults are the DSAN paper recipe)."""
    parser = argparse.ArgumentParser(description='DSAN ImageNet training', parents=[config_parser])

    group = parser.add_argument_group('Dataset parameters')
    group.add_argument('data', nargs='?', metavar='DIR', help='dataset root (ImageNet layout: train/, val/)')
    group.add_argument('--data-dir', metavar='DIR', help='dataset root (alternative to the positional DIR)')
    group.add_argument('-d', '--dataset', metavar='NAME', default='',
                       help='timm dataset type, e.g. "torch/cifar10" (default: image folders)')
    group.add_argument('--train-split', metavar='NAME', default='train', help='training split folder')
    group.add_argument('--val-split', metavar='NAME', default='val', help='validation split folder ("" for none)')
    group.add_argument('--class-map', default='', type=str, metavar='FILENAME', help='class to index map file')
    group.add_argument('--skip-bad-images', action='store_true',
                       help='skip unreadable images with a warning (default: stop with an error naming the file)')

    group = parser.add_argument_group('Model parameters')
    group.add_argument('--model', default='dsan_t', type=str, metavar='MODEL', help='model name (default: dsan_t)')
    group.add_argument('--pretrained', action='store_true', help='start from the registered pretrained weights')
    group.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH',
                       help='start from these weights (original DSAN or timm format); the head is re-initialised '
                            'when --num-classes differs')
    group.add_argument('--resume', default='', type=str, metavar='PATH',
                       help='resume the full training state from a last.pth.tar written by this script')
    group.add_argument('--no-resume-opt', action='store_true', help='with --resume, do not restore the optimizer')
    group.add_argument('--num-classes', type=int, default=None, metavar='N',
                       help='number of classes (default: the number of class folders of the training split)')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                       help='extra model kwargs, e.g. backend=pytorch')
    group.add_argument('--img-size', type=int, default=None, metavar='N', help='image size (default: model cfg)')
    group.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N N N',
                       help='C H W input size (C = 3: images are read as RGB)')
    group.add_argument('--crop-pct', default=None, type=float, metavar='N', help='validation center crop ratio')
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='pixel mean override')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='pixel std override')
    group.add_argument('--interpolation', default='', type=str, metavar='NAME', help='resize interpolation')
    group.add_argument('-b', '--batch-size', type=int, default=64, metavar='N', help='batch size per process')
    group.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N',
                       help='validation batch size (default: --batch-size)')
    group.add_argument('--channels-last', action='store_true', help='use channels-last memory layout')
    group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor', metavar='BACKEND',
                       help='torch.compile the model with this backend (default when given without a value: '
                            'inductor)')
    group.add_argument('--torchcompile-mode', type=str, default=None, metavar='MODE',
                       help='torch.compile mode, e.g. "max-autotune" (default: torch\'s)')

    group = parser.add_argument_group('Optimizer parameters')
    group.add_argument('--opt', default='adamw', type=str, metavar='OPTIMIZER', help='optimizer (default: adamw)')
    group.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON', help='optimizer epsilon')
    group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA', help='optimizer betas')
    group.add_argument('--momentum', type=float, default=0.9, metavar='M', help='SGD momentum')
    group.add_argument('--weight-decay', type=float, default=0.05, help='weight decay (default: 0.05)')
    group.add_argument('--clip-grad', type=float, default=None, metavar='NORM', help='clip gradient norm')
    group.add_argument('--clip-mode', type=str, default='norm', help='"norm", "value" or "agc"')
    group.add_argument('--layer-decay', type=float, default=None, help='layer-wise lr decay')
    group.add_argument('--opt-fused', action=argparse.BooleanOptionalAction, default=None,
                       help="torch's fused step for Adam / AdamW / SGD (one kernel over all parameters instead of a "
                            'Python loop; the same update) (default: on for the CPU)')
    group.add_argument('--grad-accum-steps', type=int, default=1, metavar='N',
                       help='accumulate gradients over N batches per optimizer update (timm semantics: each loss is '
                            'divided by N; the lr schedule counts optimizer updates) (default: 1)')

    group = parser.add_argument_group('Learning rate schedule parameters')
    group.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER', help='lr scheduler')
    group.add_argument('--sched-on-updates', action='store_true', help='step the schedule every update')
    group.add_argument('--lr', type=float, default=1e-3, metavar='LR', help='learning rate (default: 1e-3)')
    group.add_argument('--warmup-lr', type=float, default=1e-6, metavar='LR', help='warmup start lr')
    group.add_argument('--min-lr', type=float, default=1e-6, metavar='LR', help='lower lr bound')
    group.add_argument('--epochs', type=int, default=300, metavar='N', help='epochs (+ cooldown) (default: 300)')
    group.add_argument('--decay-epochs', type=float, default=100, metavar='N',
                       help='step scheduler interval (default: 100, as the original)')
    group.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE', help='step decay rate')
    group.add_argument('--warmup-epochs', type=int, default=5, metavar='N', help='warmup epochs (default: 5)')
    group.add_argument('--cooldown-epochs', type=int, default=10, metavar='N', help='cooldown epochs (default: 10)')

    group = parser.add_argument_group('Augmentation and regularization parameters')
    group.add_argument('--no-aug', action='store_true', help='disable all training augmentation')
    group.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT', help='crop scale')
    group.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO',
                       help='crop aspect ratio')
    group.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability')
    group.add_argument('--vflip', type=float, default=0., help='vertical flip probability')
    group.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT', help='color jitter')
    group.add_argument('--aa', type=str, default='rand-m9-mstd0.5-inc1', metavar='NAME',
                       help='AutoAugment / RandAugment policy ("" for none)')
    group.add_argument('--reprob', type=float, default=0.25, metavar='PCT', help='random erasing probability')
    group.add_argument('--remode', type=str, default='pixel', help='random erasing mode')
    group.add_argument('--recount', type=int, default=1, help='random erasing count')
    group.add_argument('--mixup', type=float, default=0.8, help='mixup alpha (0 disables)')
    group.add_argument('--cutmix', type=float, default=1.0, help='cutmix alpha (0 disables)')
    group.add_argument('--cutmix-minmax', type=float, nargs='+', default=None, help='cutmix min/max ratio')
    group.add_argument('--mixup-prob', type=float, default=1.0, help='probability of mixup or cutmix per batch')
    group.add_argument('--mixup-switch-prob', type=float, default=0.5, help='probability of cutmix instead of mixup')
    group.add_argument('--mixup-mode', type=str, default='batch', help='"batch", "pair" or "elem"')
    group.add_argument('--mixup-off-epoch', default=0, type=int, metavar='N', help='turn mixup off at this epoch')
    group.add_argument('--smoothing', type=float, default=0.1, help='label smoothing (default: 0.1)')
    group.add_argument('--train-interpolation', type=str, default='random', help='training resize interpolation')
    group.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='dropout rate')
    group.add_argument('--drop-path', type=float, default=0.1, metavar='PCT', help='drop path rate (default: 0.1)')

    group = parser.add_argument_group('Batch norm parameters')
    group.add_argument('--sync-bn', action='store_true', help='synchronized BatchNorm across processes')
    group.add_argument('--dist-bn', type=str, default='reduce', help='"broadcast", "reduce" or "" after each epoch')

    group = parser.add_argument_group('Model exponential moving average')
    group.add_argument('--model-ema', action='store_true', help='track an EMA of the weights')
    group.add_argument('--model-ema-decay', type=float, default=0.9998, help='EMA decay (default: 0.9998)')
    group.add_argument('--model-ema-warmup', action='store_true', help='EMA decay warmup')

    group = parser.add_argument_group('Miscellaneous parameters')
    group.add_argument('--seed', type=int, default=42, metavar='S', help='random seed (default: 42)')
    group.add_argument('--log-interval', type=int, default=50, metavar='N', help='log every N steps')
    group.add_argument('-j', '--workers', type=int, default=4, metavar='N', help='data-loading processes per rank')
    group.add_argument('--pin-mem', action='store_true', help='pin CPU memory in the loader')
    group.add_argument('--device', default='', type=str, help='"cuda" or "cpu" (default: cuda when available)')
    group.add_argument('--tune-malloc', action=argparse.BooleanOptionalAction, default=True,
                       help='on the CPU, keep freed memory in the process for reuse (glibc; '
                            'dsan.allocator.keep_freed_memory): training steps 0.75-0.95x the time (default: on)')
    group.add_argument('--amp', action='store_true',
                       help='mixed precision (float16 on CUDA, bfloat16 on CPU); off by default, as in the paper\'s '
                            'recipe')
    group.add_argument('--amp-dtype', default='', type=str, choices=['', 'float16', 'bfloat16'],
                       help='"float16" or "bfloat16" (default: float16 on CUDA, bfloat16 on the CPU)')
    group.add_argument('--output', default='output/train', type=str, metavar='PATH', help='output root folder')
    group.add_argument('--experiment', default='', type=str, metavar='NAME',
                       help='run folder name (default: <date>-<model>; on --resume, the checkpoint\'s folder)')
    group.add_argument('--eval-metric', default='top1', type=str, choices=['top1', 'top5', 'loss'],
                       help='metric that picks the best checkpoint (default: top1)')
    group.add_argument('--checkpoint-hist', type=int, default=10, metavar='N',
                       help='also keep the N best epoch checkpoints by --eval-metric as checkpoint-<epoch>.pth.tar, '
                            'as timm; 0 keeps none (default: 10)')
    group.add_argument('--tensorboard', action='store_true', help='write TensorBoard events (pip install tensorboard)')
    group.add_argument('--no-plot', action='store_true', help='do not write training_curves.png')
    group.add_argument('--no-progress', action='store_true', help='no progress bar (logs only)')
    add_renamed_options(parser, {
        '--native-amp': '--amp (torch autocast)', '--apex-amp': '--amp (torch autocast)',
        '--start-epoch': '--resume CHECKPOINT (the run goes on from its epoch)'})
    return parser


def _unit(v: float) -> bool:
    return 0 <= v <= 1


# What each numeric flag accepts (checked after parsing, so that a bad value fails at once, naming the flag, and
# not deep inside torch or timm, or silently).
_RANGES = (
    ('-b/--batch-size', 'batch_size', lambda v: v >= 1, '>= 1'),
    ('-vb/--validation-batch-size', 'validation_batch_size', lambda v: v >= 1, '>= 1'),
    ('--grad-accum-steps', 'grad_accum_steps', lambda v: v >= 1, '>= 1'),
    ('--num-classes', 'num_classes', lambda v: v >= 1, '>= 1'),
    ('--img-size', 'img_size', lambda v: v >= 1, '>= 1'),
    ('--crop-pct', 'crop_pct', lambda v: 0 < v <= 1, 'in (0, 1]'),
    tu.INPUT_SIZE_RULE,
    ('--epochs', 'epochs', lambda v: v >= 1, '>= 1'),
    ('--warmup-epochs', 'warmup_epochs', lambda v: v >= 0, '>= 0'),
    ('--cooldown-epochs', 'cooldown_epochs', lambda v: v >= 0, '>= 0'),
    ('--lr', 'lr', lambda v: v > 0, '> 0'),
    ('--min-lr', 'min_lr', lambda v: v >= 0, '>= 0'),
    ('--warmup-lr', 'warmup_lr', lambda v: v >= 0, '>= 0'),
    ('--weight-decay', 'weight_decay', lambda v: v >= 0, '>= 0'),
    ('--smoothing', 'smoothing', lambda v: 0 <= v < 1, 'in [0, 1)'),
    ('--drop', 'drop', lambda v: 0 <= v < 1, 'in [0, 1)'),
    ('--drop-path', 'drop_path', lambda v: 0 <= v < 1, 'in [0, 1)'),
    ('--reprob', 'reprob', _unit, 'in [0, 1]'),
    ('--hflip', 'hflip', _unit, 'in [0, 1]'),
    ('--vflip', 'vflip', _unit, 'in [0, 1]'),
    ('--mixup', 'mixup', lambda v: v >= 0, '>= 0'),
    ('--cutmix', 'cutmix', lambda v: v >= 0, '>= 0'),
    ('--mixup-prob', 'mixup_prob', _unit, 'in [0, 1]'),
    ('--mixup-switch-prob', 'mixup_switch_prob', _unit, 'in [0, 1]'),
    ('--model-ema-decay', 'model_ema_decay', lambda v: 0 < v < 1, 'in (0, 1)'),
    ('-j/--workers', 'workers', lambda v: v >= 0, '>= 0'),
    ('--log-interval', 'log_interval', lambda v: v >= 1, '>= 1'),
    ('--checkpoint-hist', 'checkpoint_hist', lambda v: v >= 0, '>= 0'),
)


# Options of the original train.py (timm 0.4.12's) that this one does not have, with their defaults there. An
# args.yaml written by an original run holds them all: at these values they changed nothing and are ignored; any
# other value is refused by name, since the run it describes cannot be repeated here.
_ORIGINAL_ONLY_DEFAULTS = {
    'dataset_download': False, 'gp': None, 'lr_noise': None, 'lr_noise_pct': 0.67, 'lr_noise_std': 1.0,
    'lr_cycle_mul': 1.0, 'lr_cycle_decay': 0.5, 'lr_cycle_limit': 1, 'lr_k_decay': 1.0, 'epoch_repeats': 0.0,
    'start_epoch': None, 'patience_epochs': 10, 'aug_repeats': 0, 'aug_splits': 0, 'jsd_loss': False,
    'bce_loss': False, 'bce_target_thresh': None, 'resplit': False, 'drop_connect': None, 'drop_block': None,
    'bn_tf': False, 'bn_momentum': None, 'bn_eps': None, 'split_bn': False, 'model_ema_force_cpu': False,
    'worker_seeding': 'all', 'recovery_interval': 0, 'save_images': False, 'apex_amp': False, 'native_amp': False,
    'no_ddp_bb': False, 'no_prefetcher': False, 'tta': 0, 'use_multi_epochs_loader': False, 'torchscript': False,
    'log_wandb': False,
    # Older timm 0.4.x spellings of some of them.
    'jsd': False, 'validation_batch_size_multiplier': 1,
}
# Written per process by the launcher, not an option of the run: ignored at any value.
_ORIGINAL_PER_PROCESS = ('local_rank',)


def _drop_original_only_keys(parser: argparse.ArgumentParser, cfg: dict, path: str) -> dict:
    """`cfg` without the original-only options at their inert defaults; a usage error for any other value."""
    known = {a.dest for a in parser._actions}
    cfg = {k: v for k, v in cfg.items() if k not in _ORIGINAL_PER_PROCESS or k in known}
    active = [f'{k}={cfg[k]!r}' for k in sorted(set(cfg) & set(_ORIGINAL_ONLY_DEFAULTS) - known)
              if cfg[k] != _ORIGINAL_ONLY_DEFAULTS[k]]
    if active:
        parser.error(f'{path}: option(s) of the original train.py (timm 0.4.12) that this one does not have, set to '
                     f'other than their defaults: {", ".join(active)}')
    dropped = sorted(k for k in cfg if k in _ORIGINAL_ONLY_DEFAULTS and k not in known)
    if dropped:
        # Logging is not set up yet: the run's own log starts later.
        print(f'train.py: {path}: ignored, at their defaults (options of the original train.py only): '
              f'{", ".join(dropped)}', file=sys.stderr)
    return {k: v for k, v in cfg.items() if k not in dropped}


def parse_args(argv: Sequence[str] | None = None):
    """Parse ``argv`` with YAML defaults from ``-c``; returns ``(args, yaml_text)``."""
    args_config, remaining = config_parser.parse_known_args(argv)
    parser = build_parser()
    if args_config.config:
        if not os.path.isfile(args_config.config):
            parser.error(f'config file {args_config.config!r} does not exist')
        with open(args_config.config) as f:
            cfg = yaml.safe_load(f) or {}
        if not isinstance(cfg, dict):
            parser.error(f'{args_config.config}: expected a mapping of option names to values, got a '
                         f'{type(cfg).__name__}')
        cfg = _drop_original_only_keys(parser, cfg, args_config.config)
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(cfg) - known)
        if unknown:
            parser.error(f'unknown key(s) in {args_config.config}: {", ".join(unknown)}')
        parser.set_defaults(**cfg)
    args = parser.parse_args(remaining)
    tu.check_ranges(parser, args, _RANGES)
    if args.opt_fused and not _has_fused_step(args):
        parser.error(f'--opt-fused: --opt {args.opt} has no fused step (adam, adamw, sgd, momentum and nesterov '
                     'have; not with --opt-foreach)')
    args.config = args_config.config
    # The dataset given on the command line wins over the -c file's (an args.yaml holds the folder of its own run,
    # which was used silently instead of the DIR given with it).
    given = build_parser().parse_args(remaining) if args_config.config else args
    args.data_dir = given.data_dir or given.data or args.data_dir or args.data
    args.data = given.data or args.data
    args.output = args.output or 'output/train'  # '' (an original args.yaml's default) meant this folder there
    return args, yaml.safe_dump(vars(args), default_flow_style=False)


def _setup_logging(log_file: str, primary: bool) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.INFO if primary else logging.WARNING)
    fmt = logging.Formatter('%(asctime)s %(levelname)s %(name)s: %(message)s', '%H:%M:%S')
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    root.addHandler(console)
    if log_file:
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        root.addHandler(fh)


def _amp_setup(args, device: torch.device):
    if not args.amp:
        return nullcontext, None
    dtype_name = args.amp_dtype or ('float16' if device.type == 'cuda' else 'bfloat16')
    dtype = {'float16': torch.float16, 'bfloat16': torch.bfloat16}.get(dtype_name)
    if dtype is None:
        raise ValueError(f'--amp-dtype must be float16 or bfloat16, got {dtype_name!r}')
    scaler = NativeScaler(device=device.type) if dtype == torch.float16 else None
    return partial(torch.autocast, device_type=device.type, dtype=dtype), scaler


# torch optimizers with a fused step on every device (CPU included); timm builds them for these --opt names.
_FUSED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def _has_fused_step(args) -> bool:
    """Whether --opt builds one of `_FUSED_OPTIMIZERS` (and --opt-foreach, which excludes fusing, is not set)."""
    try:
        opt_class = get_optimizer_class(args.opt.lower().split('_')[-1], bind_defaults=False)
    except ValueError:
        return False  # an unknown name: create_optimizer_v2 reports it
    return opt_class in _FUSED_OPTIMIZERS and not getattr(args, 'opt_foreach', None)


def _optimizer_args(args, device: torch.device) -> dict:
    """timm's optimizer arguments, plus ``fused=True`` where --opt-fused (default: on the CPU) applies.

    On the CPU the fused step of torch's AdamW took DSAN-T's update from 12.9 to 3.5 ms and resnet18's from 28.0 to
    4.7 ms (2 threads): the unfused one loops over the parameter tensors (468 for DSAN-T) in Python.
    """
    kwargs = optimizer_kwargs(cfg=args)
    fused = args.opt_fused if args.opt_fused is not None else device.type == 'cpu'
    if fused and _has_fused_step(args):
        kwargs['fused'] = True
    return kwargs


_IMPLEMENTATION_KEYS = ('fused', 'foreach')


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, keeping this run's choice of step implementation (fused / foreach).

    The saved param groups replace the optimizer's, flags included: a checkpoint written before torch had a fused
    step, or by a run on another device, turned the fused step off on resume (on the CPU AdamW's update then took
    3.7x as long). The flags choose how the update is computed, not what it is, so this run's are kept.
    """
    impl = [{k: g[k] for k in _IMPLEMENTATION_KEYS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flags in zip(optimizer.param_groups, impl):
        group.update(flags)
        if group.get('fused') or group.get('capturable'):
            for p in group['params']:  # where these steps keep their counters (as torch's own loading does)
                step = optimizer.state.get(p, {}).get('step')
                if torch.is_tensor(step):
                    optimizer.state[p]['step'] = step.to(device=p.device, dtype=torch.float32)


def _check_resume_args(args, ckpt: dict, current: dict) -> str | None:
    """Refuse a --resume whose checkpoint cannot go on under these arguments; return a warning naming the other
    differences (None if there are none), for the run's log.

    Raises:
        tu.ResumeError: the checkpoint has EMA weights and --model-ema is off (they would be dropped from the
            run's next checkpoints); it has no optimizer state, or was made with another --opt (its state does not
            fit the optimizer), unless --no-resume-opt says to start a fresh optimizer.
    """
    run_args = f'-c {os.path.join(os.path.dirname(os.path.abspath(args.resume)), "args.yaml")} --resume {args.resume}'
    if 'state_dict_ema' in ckpt and not args.model_ema:
        raise tu.ResumeError(f'--resume {args.resume} holds the EMA weights of a --model-ema run: add --model-ema '
                             f'(or resume with every argument of that run: {run_args}); without it they are lost '
                             '(--initial-checkpoint starts a new run from its weights)')
    saved = ckpt['args']
    if not args.no_resume_opt:
        if 'optimizer' not in ckpt:
            raise tu.ResumeError(f'--resume {args.resume} has no optimizer state (weights and epoch only): add '
                                 '--no-resume-opt to go on from its epoch with a fresh optimizer, or start from its '
                                 'weights with --initial-checkpoint')
        if saved.get('opt') and str(saved['opt']).lower() != str(args.opt).lower():
            raise tu.ResumeError(f'--resume {args.resume} was trained with --opt {saved["opt"]}, this run asks for '
                                 f'--opt {args.opt}: its optimizer state does not fit; add --no-resume-opt for a '
                                 'fresh optimizer')
    changed = tu.changed_run_args(saved, current)
    if not changed:
        return None
    # The optimizer's saved hyper-parameters (weight decay, betas, ...) are restored with its state.
    return (f'--resume with arguments other than the run\'s: '
            f'{", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))} (the optimizer '
            f'state keeps its saved settings unless --no-resume-opt; {run_args} resumes with all of the run\'s)')


def main(argv: Sequence[str] | None = None) -> int:
    """Train; returns the process exit code (0 done, 1 NaN/Inf, 2 bad input, 128+N on signal N)."""
    args, args_text = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    try:
        info = tu.init_distributed(args.device)
    except tu.DeviceError as e:
        print(f'train.py: error: {e}', file=sys.stderr)
        return 2
    device, rank, world_size = info['device'], info['rank'], info['world_size']
    primary = rank == 0
    try:
        return _train(args, args_text, device, rank, world_size, primary)
    except (cls_data.DatasetError, cls_data.CorruptImageError, model_factory.ModelError, tu.ResumeError,
            FileNotFoundError) as e:
        _logger.error('%s', tu.error_message(e))
        print(f'train.py: error: {tu.error_message(e)}', file=sys.stderr)
        tu.remove_unused_run_dir(getattr(args, 'new_run_dir', None))
        return 2
    finally:
        if tu.is_distributed():
            torch.distributed.destroy_process_group()


def _train(args, args_text: str, device: torch.device, rank: int, world_size: int, primary: bool) -> int:
    # ---- input checks first, so mistakes fail in a second and with a message naming the path
    if not args.dataset:
        args.val_split = cls_data.search_split(args.data_dir, args.val_split)
        classes = cls_data.check_image_folder(args.data_dir, args.train_split)
        if args.val_split and not args.class_map:
            cls_data.check_val_classes(classes, cls_data.check_image_folder(args.data_dir, args.val_split),
                                       args.data_dir, args.train_split, args.val_split)
        train_dir = os.path.join(args.data_dir, args.train_split)
        if args.class_map:
            labels = max(cls_data.read_class_map(args.class_map, train_dir).values()) + 1
            source = f'the indices of --class-map {args.class_map} (up to {labels - 1})'
        else:
            labels, source = len(classes), f'the {len(classes)} class folders of {train_dir}'
        if args.num_classes is None:
            args.num_classes = labels
        elif args.num_classes < labels:
            raise cls_data.DatasetError(f'--num-classes {args.num_classes} is less than {source}: their labels would '
                                        'not fit the classifier')
    if args.sync_bn and world_size > 1 and device.type != 'cuda':
        raise model_factory.ModelError('--sync-bn needs CUDA devices (torch.nn.SyncBatchNorm); on the CPU --dist-bn '
                                       'reduce (the default) averages the BatchNorm statistics after each epoch')
    resume_ckpt = tu.load_training_checkpoint(args.resume) if args.resume else None
    resume_warning = _check_resume_args(args, resume_ckpt, yaml.safe_load(args_text)) if resume_ckpt else None

    # ---- output folder (rank 0 names it), logging
    if resume_ckpt is not None and not args.experiment:
        out_dir = os.path.dirname(os.path.abspath(args.resume))
    elif args.experiment:
        out_dir = os.path.join(args.output, args.experiment)
    else:  # a new folder, named by rank 0: <date>-<model>, with a counter if a run started in the same second
        out_dir = tu.broadcast_object(tu.make_new_run_dir(
            os.path.join(args.output, f'{datetime.now():%Y%m%d-%H%M%S}-{args.model}')) if primary else None)
        args.new_run_dir = out_dir if primary else None
    found = tu.run_dir_contents(out_dir)
    if found and (resume_ckpt is None or not os.path.samefile(out_dir, os.path.dirname(os.path.abspath(args.resume)))):
        # Its checkpoints, best model, summary and args.yaml would be overwritten, or mixed with this run's.
        hint = (f'resume it with --resume {os.path.join(out_dir, "last.pth.tar")}, or '
                if 'last.pth.tar' in found else '')
        raise tu.ResumeError(f'{out_dir} holds another run ({", ".join(found)}): {hint}give this run another '
                             '--experiment')
    if primary:
        if not os.path.exists(out_dir):
            args.new_run_dir = out_dir  # removed again if the run stops on bad input before writing anything
        os.makedirs(out_dir, exist_ok=True)
        if resume_ckpt is None:  # a resumed run's args.yaml is rewritten once the checkpoint was found to fit
            _write_args(out_dir, args_text)
    _setup_logging(os.path.join(out_dir, 'log.txt') if primary else '', primary)
    _logger.info('Output folder: %s', out_dir)
    if resume_warning:
        _logger.warning('%s', resume_warning)
    if primary and resume_ckpt is None:
        _remove_stale_temp_files(out_dir)
    last_epoch = tu.later_checkpoint_epoch(os.path.join(out_dir, 'last.pth.tar'), args.resume) if resume_ckpt \
        else None
    if last_epoch is not None and last_epoch > resume_ckpt['epoch']:
        _logger.warning('Resuming from epoch %d of %s into %s, whose last.pth.tar has reached epoch %d: its later '
                        'checkpoints will be overwritten as the run goes on (--experiment NAME keeps them)',
                        resume_ckpt['epoch'], args.resume, out_dir, last_epoch)
    _logger.info('Training on %s with %d process(es)', device, world_size)
    if args.tune_malloc:
        tu.keep_freed_memory(device)
    random_seed(args.seed, rank)

    # ---- model
    model = model_factory.create(args.model, num_classes=args.num_classes, pretrained=args.pretrained,
                                 checkpoint=args.initial_checkpoint, drop_rate=args.drop,
                                 drop_path_rate=args.drop_path, **args.model_kwargs)
    _logger.info('Model %s: %.2f M parameters, %d classes', args.model,
                 sum(p.numel() for p in model.parameters()) / 1e6, args.num_classes or -1)
    data_config = resolve_data_config(vars(args), model=model, verbose=primary)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.sync_bn and world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)

    optimizer = create_optimizer_v2(model, **_optimizer_args(args, device))
    amp_autocast, loss_scaler = _amp_setup(args, device)
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)

    # ---- data
    loader_kw = dict(num_workers=args.workers, distributed=world_size > 1, pin_memory=args.pin_mem, device=device,
                     use_prefetcher=device.type == 'cuda', persistent_workers=False,
                     mean=data_config['mean'], std=data_config['std'])
    ds_train = cls_data.build_dataset(args.dataset, args.data_dir, args.train_split, is_training=True,
                                      class_map=args.class_map, skip_bad_images=args.skip_bad_images)
    loader_train = create_loader(
        ds_train, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=True,
        no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, scale=args.scale,
        ratio=args.ratio, hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
        auto_augment=args.aa or None, interpolation=args.train_interpolation, **loader_kw)
    if len(loader_train) == 0:
        raise cls_data.DatasetError(f'-b/--batch-size {args.batch_size} is larger than the {len(ds_train)} training '
                                    f'images ({world_size} process(es)): no full batch per epoch')
    loader_eval = None
    if args.val_split:
        # A folder dataset's validation labels are the training split's class indices (a class missing from the
        # validation folders would otherwise shift every label after it).
        eval_class_map = args.class_map or (ds_train.reader.class_to_idx if not args.dataset else '')
        ds_eval = cls_data.build_dataset(args.dataset, args.data_dir, args.val_split, is_training=False,
                                         class_map=eval_class_map, skip_bad_images=args.skip_bad_images)
        loader_eval = create_loader(
            ds_eval, input_size=data_config['input_size'], batch_size=args.validation_batch_size or args.batch_size,
            is_training=False, interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'],
            **loader_kw)

    mixup_fn = None
    mixup_active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
    if mixup_active:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=args.num_classes)
        train_loss_fn = SoftTargetCrossEntropy()
    elif args.smoothing:
        train_loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        train_loss_fn = torch.nn.CrossEntropyLoss()

    # with --grad-accum-steps the schedule counts optimizer updates, as timm's train.py does
    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    lr_scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args),
                                                   updates_per_epoch=updates_per_epoch)

    # ---- resume: everything the next epoch depends on
    start_epoch, best_metric, best_epoch = 0, None, None
    if resume_ckpt is not None:
        saved_classes = resume_ckpt.get('class_to_idx')
        now_classes = dict(ds_train.reader.class_to_idx) if not args.dataset else None
        if isinstance(saved_classes, dict) and now_classes is not None and saved_classes != now_classes:
            raise tu.ResumeError(f'--resume {args.resume}: the run was trained on other class folders than '
                                 f'{train_dir} holds (resuming would relabel its images): '
                                 f'{cls_data.class_map_difference(saved_classes, now_classes)}')
        try:
            tu.unwrap_model(model).load_state_dict(resume_ckpt['state_dict'])
        except (RuntimeError, ValueError) as e:  # ValueError: dsan.models.CheckpointError (another DSCN grouping)
            raise tu.ResumeError(f'--resume {args.resume}: its weights do not fit --model {args.model} with '
                                 f'{args.num_classes} classes (resume with the arguments of that run): {e}') from None
        # A schedule changed on resume (say, more --epochs) follows the new arguments, as timm's resume does; an
        # unchanged one is restored exactly.
        changed = tu.changed_schedule_args(resume_ckpt.get('args'), args)
        if changed:
            _logger.warning('--resume with a changed schedule (%s): the lr schedule follows the new arguments',
                            ', '.join(f'{k} {old} -> {new}' for k, (old, new) in changed.items()))
        if not args.no_resume_opt:
            load_optimizer_state(optimizer, resume_ckpt['optimizer'])
            if 'scheduler' in resume_ckpt and not changed:
                lr_scheduler.load_state_dict(resume_ckpt['scheduler'])
            if loss_scaler is not None and 'amp_scaler' in resume_ckpt:
                loss_scaler.load_state_dict(resume_ckpt['amp_scaler'])
        if model_ema is not None:
            if 'state_dict_ema' in resume_ckpt:
                model_ema.module.load_state_dict(resume_ckpt['state_dict_ema'])
            else:
                _logger.warning('--model-ema: the checkpoint has no EMA weights; starting the EMA from the model')
                model_ema.set(model)
        start_epoch = resume_ckpt['epoch'] + 1
        best_metric, best_epoch = resume_ckpt.get('best_metric'), resume_ckpt.get('best_epoch')
        rng_states = resume_ckpt.get('rng_states') or []
        if len(rng_states) == world_size:
            tu.set_rng_state(tu.rng_state_from_checkpoint(rng_states[rank]))
        else:
            _logger.warning('Checkpoint has RNG states of %d process(es), this run has %d: reseeding',
                            len(rng_states), world_size)
            random_seed(args.seed + start_epoch, rank)
        _logger.info('Resumed from %s: continuing at epoch %d', args.resume, start_epoch)
        del resume_ckpt
        if primary:  # the resume's checks passed: the folder is this run's now
            _write_args(out_dir, args_text)
            _remove_stale_temp_files(out_dir)
    if start_epoch > 0:
        lr_scheduler.step(start_epoch)

    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)
    if args.torchcompile:  # after DDP, as in timm; checkpoints and the EMA use the unwrapped module
        # With the inductor options the model asks for (DSAN: dsan.compile); other models compile as plain.
        compile_kw = compile_kwargs(model, backend=args.torchcompile, mode=args.torchcompile_mode)
        model = torch.compile(model, **compile_kw)
        _logger.info('torch.compile backend %s, options %s', args.torchcompile, compile_kw.get('options', {}))

    writer = None
    if args.tensorboard and primary:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise model_factory.ModelError('--tensorboard needs the tensorboard package: pip install tensorboard') \
                from e
        writer = SummaryWriter(os.path.join(out_dir, 'tensorboard'))

    _logger.info('Scheduled epochs: %d (start at %d), %d steps and %d optimizer updates per epoch', num_epochs,
                 start_epoch, len(loader_train), updates_per_epoch)
    stop = tu.GracefulStop()
    summary_csv = os.path.join(out_dir, 'summary.csv')
    last_path = os.path.join(out_dir, 'last.pth.tar')
    best_path = os.path.join(out_dir, 'model_best.pth.tar')
    if primary and start_epoch > 0:
        _repair_run_dir(args, out_dir, start_epoch - 1, best_epoch, decreasing=args.eval_metric == 'loss')
    num_updates = start_epoch * updates_per_epoch
    progress = primary and not args.no_progress
    decreasing = args.eval_metric == 'loss'
    eval_metrics = {}
    # From here on the run folder holds the log of real work: an error no longer removes it.
    args.new_run_dir = None
    try:
        for epoch in range(start_epoch, num_epochs):
            if hasattr(loader_train.sampler, 'set_epoch'):
                loader_train.sampler.set_epoch(epoch)
            if mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
                mixup_fn.mixup_enabled = False
            start = time.time()
            train_metrics = engine.train_one_epoch(
                epoch, model, loader_train, optimizer, train_loss_fn, device=device, stop=stop,
                lr_scheduler=lr_scheduler, mixup_fn=mixup_fn, amp_autocast=amp_autocast, loss_scaler=loss_scaler,
                model_ema=model_ema, clip_grad=args.clip_grad, clip_mode=args.clip_mode, num_updates=num_updates,
                log_interval=args.log_interval, progress=progress, channels_last=args.channels_last,
                grad_accum_steps=args.grad_accum_steps)
            num_updates = int(train_metrics.pop('num_updates'))
            if world_size > 1 and args.dist_bn in ('broadcast', 'reduce'):
                distribute_bn(model, world_size, args.dist_bn == 'reduce')

            if loader_eval is not None:
                eval_metrics = engine.evaluate(model, loader_eval, device=device, amp_autocast=amp_autocast,
                                               progress=progress, desc=f'val {epoch}',
                                               channels_last=args.channels_last)
                if model_ema is not None:
                    ema_metrics = engine.evaluate(model_ema.module, loader_eval, device=device,
                                                  amp_autocast=amp_autocast, progress=progress,
                                                  desc=f'val-ema {epoch}', channels_last=args.channels_last)
                    eval_metrics.update({f'ema_{k}': v for k, v in ema_metrics.items()})
                eval_metrics.pop('count', None)
                eval_metrics.pop('ema_count', None)
            if eval_metrics:
                metric = eval_metrics.get(args.eval_metric)
            else:  # no validation split: the training loss decides, in the direction --eval-metric is compared
                metric = train_metrics['loss'] if decreasing else -train_metrics['loss']
            lr_scheduler.step(epoch + 1, metric)

            improved = metric is not None and (best_metric is None or (
                metric < best_metric if decreasing else metric > best_metric))
            if improved:
                best_metric, best_epoch = metric, epoch
            rng_states = tu.all_gather_object(tu.rng_state_for_checkpoint(tu.get_rng_state()))
            if primary:
                ckpt = tu.build_checkpoint(
                    epoch=epoch, arch=args.model, model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                    model_ema=model_ema, loss_scaler=loss_scaler, rng_states=rng_states, metric=metric,
                    args=yaml.safe_load(args_text))
                ckpt.update(best_metric=best_metric, best_epoch=best_epoch)
                if not args.dataset:  # the labels' class names, so validate.py labels any folder the same way
                    ckpt['class_to_idx'] = dict(ds_train.reader.class_to_idx)
                # last.pth.tar is written last but one: it commits the epoch. A kill before it leaves the previous
                # epoch's, and the resumed run redoes this epoch (whose summary row it replaces); a kill after it,
                # before model_best or the history, is repaired on resume (_repair_run_dir).
                tu.append_summary(summary_csv, epoch, train_metrics, eval_metrics, lr=train_metrics['lr'])
                tu.atomic_save(ckpt, last_path)
                if improved:
                    tu.atomic_save(ckpt, best_path)
                tu.keep_checkpoint_history(last_path, epoch, args.checkpoint_hist, metric, decreasing)
                if writer is not None:
                    for k, v in train_metrics.items():
                        writer.add_scalar(f'train/{k}', v, epoch)
                    for k, v in eval_metrics.items():
                        writer.add_scalar(f'eval/{k}', v, epoch)
                    writer.flush()
                _logger.info('Epoch %d done in %.0fs: train loss %.4f, %s, %.1f img/s', epoch, time.time() - start,
                             train_metrics['loss'],
                             ', '.join(f'{k} {v:.3f}' for k, v in eval_metrics.items()) or 'no validation',
                             train_metrics['img_per_sec'])
            signum, _ = stop.check(device)
            if signum:  # arrived during validation/saving: the epoch is complete and saved
                raise tu.TrainingInterrupted(signum, f'interrupted after epoch {epoch}')
    except tu.NonFiniteError as e:
        _logger.error('Non-finite values: %s', e)
        _logger.error('Last good checkpoint: %s', last_path if os.path.exists(last_path) else 'none')
        return 1
    except Exception as e:
        if not isinstance(e, tu.TrainingInterrupted):
            if not stop.signum:
                raise
            # e.g. Ctrl-C stopped the data-loading workers during validation: still a clean stop
            e = tu.TrainingInterrupted(stop.signum, f'{type(e).__name__} after the signal: {e}')
        saved = os.path.exists(last_path)
        # With -c args.yaml the resumed run has every argument of this one (data, sizes, EMA, ...).
        _logger.warning('Stopped by %s (%s). %s', _signame(e.signum), e,
                        f'Resume with: train.py -c {os.path.join(out_dir, "args.yaml")} --resume {last_path}' if saved
                        else 'No epoch completed, nothing saved.')
        return 128 + e.signum
    finally:
        stop.restore()
        if writer is not None:
            writer.close()

    if world_size > 1:
        checksums = tu.all_gather_object(tu.weights_checksum(model))
        if len(set(checksums)) != 1:
            _logger.error('Ranks disagree on the final weights (checksums %s)', checksums)
            return 1
        _logger.info('All %d ranks hold identical weights (checksum %s)', world_size, checksums[0])
    if primary:
        if not args.no_plot and os.path.exists(summary_csv):
            try:
                png = _plot_curves().plot_summary(summary_csv, os.path.join(out_dir, 'training_curves.png'))
                _logger.info('Training curves: %s', png)
            except ImportError as e:
                _logger.warning('No training-curve plot (%s); pip install matplotlib', e)
        if best_metric is not None:
            if loader_eval is None:
                _logger.info('Best train loss: %.3f (epoch %d)', abs(best_metric), best_epoch)
            else:
                _logger.info('Best %s: %.3f (epoch %d)', args.eval_metric, best_metric, best_epoch)
        if eval_metrics:
            print(f'final: top1 {eval_metrics["top1"]:.2f} top5 {eval_metrics["top5"]:.2f} '
                  f'(best {args.eval_metric} {best_metric:.2f} at epoch {best_epoch}); checkpoints in {out_dir}')
    return 0


def _remove_stale_temp_files(out_dir: str) -> None:
    for name in tu.remove_stale_temp_files(out_dir):
        _logger.info('Removed %s (a temp file of a save that was killed)', name)


def _write_args(out_dir: str, args_text: str) -> None:
    tmp = os.path.join(out_dir, f'.args.yaml.{os.getpid()}.tmp')
    with open(tmp, 'w') as f:
        f.write(args_text)
    os.replace(tmp, os.path.join(out_dir, 'args.yaml'))


def _repair_run_dir(args, out_dir: str, resumed_epoch: int, best_epoch: int | None, decreasing: bool) -> None:
    """Bring a run folder resumed from its last.pth.tar in line with it after a kill between the epoch's saves: a
    best epoch that is the resumed one, but that model_best.pth.tar does not hold (killed between the two writes),
    is written from it, and its history file is linked or ranked out again. (summary.csv rows of epochs that run
    again are replaced as each epoch ends: `tu.append_summary`.)
    """
    resumed = os.path.abspath(args.resume)
    best_path = os.path.join(out_dir, 'model_best.pth.tar')
    if os.path.dirname(resumed) != os.path.abspath(out_dir):
        # Resumed into another folder (--experiment): it gets the best model so far, where that is at hand.
        source_best = os.path.join(os.path.dirname(resumed), 'model_best.pth.tar')
        source = resumed if best_epoch == resumed_epoch else (
            source_best if best_epoch is not None and tu.checkpoint_epoch(source_best) == best_epoch else None)
        if not os.path.exists(best_path) and source is not None:
            tu.atomic_copy(source, best_path)
            _logger.info('model_best.pth.tar: the best epoch so far (%d), from %s', best_epoch, source)
        elif not os.path.exists(best_path) and best_epoch is not None:
            _logger.warning('The best epoch so far (%d) is not in %s: model_best.pth.tar will be the next better one',
                            best_epoch, os.path.dirname(resumed))
        return
    if resumed != os.path.join(os.path.abspath(out_dir), 'last.pth.tar'):
        return  # resumed from an earlier checkpoint: model_best may rightly hold a later epoch
    if best_epoch == resumed_epoch and tu.checkpoint_epoch(best_path) != resumed_epoch:
        tu.atomic_copy(resumed, best_path)
        _logger.warning('model_best.pth.tar did not hold the best epoch %d (a save was killed): rewritten from %s',
                        best_epoch, args.resume)
    if args.checkpoint_hist > 0:  # idempotent: links the file if it ranks, deletes it (or a stray copy) if not
        metric = torch.load(resumed, map_location='cpu', mmap=True, weights_only=False).get('metric')
        tu.keep_checkpoint_history(resumed, resumed_epoch, args.checkpoint_hist, metric, decreasing)


def _plot_curves():
    spec = importlib.util.spec_from_file_location('plot_curves', os.path.join(_HERE, 'tools', 'plot_curves.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f'signal {signum}'


if __name__ == '__main__':
    np.set_printoptions(precision=4)
    sys.exit(main())
