"""The train and test entry points of `segmentation/tools` and `detection/tools`.

Both tasks run mmengine's stock ``Runner.from_cfg``; what differs between mmseg and mmdet (how predictions are
saved, the visualisation hook's arguments) is a small table here, so the two sets of tools stay two-line scripts
and cannot drift apart. On a machine without CUDA the published SyncBN configs are turned into BN, so the same
config files train and test on CPU, in one process or several (gloo).
"""
import argparse
import difflib
import logging
import os
import os.path as osp
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from mmengine.config import Config, ConfigDict, DictAction
from mmengine.logging import print_log
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from dsan.cli import add_renamed_options
from dsan.models import CheckpointError

from .checkpoint import load_checkpoint_file
from .utils import resolve_config_path, set_data_root, sync_bn_to_bn

__all__ = ['build_model', 'load_config', 'test', 'train']

TASKS = ('seg', 'det')


def _common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--work-dir', help='directory for logs and checkpoints (default: work_dirs/CONFIG_NAME)')
    parser.add_argument('--data-root', help="the dataset folder, for the train, val and test sets and the evaluators' "
                                            'annotation files alike (applied before --cfg-options)')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config entries, key=value pairs, e.g. train_dataloader.dataset.data_root=/data/ade '
             'train_cfg.max_iters=1000')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                        help='job launcher (dist_train.sh / dist_test.sh use pytorch)')
    # torchrun sets LOCAL_RANK; older launchers pass --local_rank.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0, help=argparse.SUPPRESS)


def load_checkpoint_strictly(model: torch.nn.Module, checkpoint: str, tool: str) -> Any:
    """Load `checkpoint` into `model` with every name and shape checked (mmseg's `init_model` / mmdet's
    `init_detector` load non-strictly: a checkpoint of another model would only be warned about).

    Returns:
        The loaded file's object (a dict with 'state_dict' and 'meta', or a bare state_dict).

    Raises:
        SystemExit: the checkpoint does not fit, with the first lines of the mismatch.
    """
    from mmengine.runner import load_checkpoint
    try:
        return load_checkpoint(model, checkpoint, map_location='cpu', strict=True, logger='silent')
    except (RuntimeError, CheckpointError) as e:
        lines = str(e).strip().splitlines()
        raise SystemExit(f'{tool}: error: {checkpoint} does not fit the config\'s model: '
                         + ' '.join(lines[:3])[:600]) from None


def load_config(path: str, cfg_options: dict | None, work_dir: str | None, launcher: str,
                data_root: str | None = None) -> Config:
    """Read `path`, apply `--data-root`, `--cfg-options`, the work dir, the launcher, and BN instead of SyncBN
    without CUDA."""
    cfg = Config.fromfile(resolve_config_path(path))
    if data_root is not None:
        for ann_file in set_data_root(cfg, data_root):
            print_log(f'--data-root: evaluating against {ann_file}', logger='current')
    if cfg_options:
        for key, hint in new_option_keys(cfg, cfg_options):
            print_log(f'--cfg-options {key}: the config has no such entry; it is added as a new one'
                      + (f' (did you mean {hint}?)' if hint else ''), logger='current', level=logging.WARNING)
        cfg.merge_from_dict(cfg_options)
    cfg.launcher = launcher
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(str(path)))[0])
    if not torch.cuda.is_available():
        n = sync_bn_to_bn(cfg.model)
        if n:
            print_log(f'No CUDA: {n} SyncBN norm config(s) of the model run as BN.', logger='current',
                      level=logging.WARNING)
        if launcher != 'none':
            # CPU processes: gloo, and DDP over CPU modules (mmengine's default wrapper asks for a GPU id).
            cfg.setdefault('env_cfg', ConfigDict()).setdefault('dist_cfg', ConfigDict())['backend'] = 'gloo'
            if cfg.get('model_wrapper_cfg') is None:
                cfg.model_wrapper_cfg = dict(
                    type='MMDistributedDataParallel', device_ids=None, broadcast_buffers=False,
                    find_unused_parameters=cfg.get('find_unused_parameters', False))
    _add_backbone_compile_options(cfg)
    return cfg


def new_option_keys(cfg: Config | Mapping, options: Mapping[str, object]) -> list[tuple[str, str | None]]:
    """The `--cfg-options` keys that name no entry of `cfg`, each with the closest existing key or None.

    mmengine adds such keys without a word, so a misspelt key (``train_cfg.max_iter``) changes nothing. A key may also
    be new on purpose (``randomness.seed``), so the tools warn rather than refuse.
    """
    found = []
    for key in options:
        node, parts = cfg, key.split('.')
        for depth, part in enumerate(parts):
            if isinstance(node, (Mapping, Config)) and part in node:
                node = node[part]
            elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                siblings = [str(k) for k in node.keys()] if isinstance(node, (Mapping, Config)) else []
                close = difflib.get_close_matches(part, siblings, n=1, cutoff=0.75)
                found.append((key, '.'.join(parts[:depth] + close) if close else None))
                break
    return found


def _add_backbone_compile_options(cfg: Config) -> None:
    # mmengine compiles with `torch.compile(model.train_step / test_step, **cfg.compile)`: a DSAN backbone's inductor
    # options (dsan.compile) are merged into that, as train.py --torchcompile does for the classifier.
    compile_cfg = cfg.get('compile')
    backbone = (cfg.get('model') or {}).get('backbone') or {}
    if not compile_cfg or str(backbone.get('type', '')).split('.')[-1] != 'DSAN':
        return
    from ..compile import compile_kwargs
    from ..models import DSAN
    compile_cfg = {} if compile_cfg is True else dict(compile_cfg)
    cfg.compile = compile_kwargs(DSAN, **compile_cfg)


def build_model(config: str, device: str = 'cpu', cfg_options: dict | None = None) -> torch.nn.Module:
    """The model of `config` (a path or `package::path`), randomly initialised (no pretrained file is read).

    For the FLOP and speed tools: built in the config's default scope, after `cfg_options` (``--cfg-options``), SyncBN
    as BN without CUDA, on `device`.
    """
    from mmengine.registry import MODELS, init_default_scope
    cfg = load_config(config, cfg_options, None, 'none')
    cfg.model.backbone.init_cfg = None
    init_default_scope(cfg.get('default_scope'))
    return MODELS.build(cfg.model).to(device)


def _load_config_or_exit(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Config:
    # A missing config (or a missing `_base_` file of it) is a usage error: one line naming the file, as argparse
    # reports its own errors, rather than a traceback.
    try:
        if args.data_root is not None and not osp.isdir(args.data_root):
            raise FileNotFoundError(f'--data-root folder not found: {args.data_root}')
        return load_config(args.config, args.cfg_options, args.work_dir, args.launcher, args.data_root)
    except FileNotFoundError as e:
        parser.error(str(e))


# The variables each launcher gives its processes, and how to start the tools under it.
_LAUNCHER_ENV = {
    'pytorch': (('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'), 'start the tool with dist_train.sh / torchrun'),
    'slurm': (('SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_NODELIST'), 'start the tool with srun'),
    'mpi': (('OMPI_COMM_WORLD_RANK', 'OMPI_COMM_WORLD_SIZE', 'OMPI_COMM_WORLD_LOCAL_RANK'),
            'start the tool with Open MPI\'s mpirun'),
}


def _launcher_env_error(launcher: str, env: Mapping[str, str] = os.environ) -> str | None:
    """What is wrong with the environment for `launcher` (the variables it should have set), or None."""
    if launcher == 'none':
        return None
    names, how = _LAUNCHER_ENV[launcher]
    missing = [n for n in names if not env.get(n)]
    if missing:
        return f'--launcher {launcher} needs {", ".join(missing)} in the environment ({how})'
    if launcher == 'mpi' and not env.get('MASTER_ADDR'):
        return '--launcher mpi needs MASTER_ADDR in the environment (export it with mpirun -x MASTER_ADDR=HOST)'
    return None


def cpu_rendezvous_env(launcher: str, env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """torch's env:// variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) for a process that
    `launcher` started, as mmengine's `init_dist` derives them; for CPU processes, which it cannot start (it pins a
    GPU first).

    Raises:
        ValueError: the environment lacks what the launcher sets, or (slurm) the first node cannot be found.
    """
    error = _launcher_env_error(launcher, env)
    if error:
        raise ValueError(error)
    if launcher == 'pytorch':
        return {k: env[k] for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')} | {
            'LOCAL_RANK': env.get('LOCAL_RANK', '0')}
    if launcher == 'slurm':
        rank, world, local = env['SLURM_PROCID'], env['SLURM_NTASKS'], env.get('SLURM_LOCALID', '0')
        addr = env.get('MASTER_ADDR')
        if not addr:
            # The first host of the allocation is rank 0's, as mmengine takes it.
            if shutil.which('scontrol') is None:
                raise ValueError('--launcher slurm: MASTER_ADDR is not set and scontrol, which names the first node '
                                 f'of SLURM_NODELIST={env["SLURM_NODELIST"]}, is not on PATH')
            hosts = subprocess.run(['scontrol', 'show', 'hostnames', env['SLURM_NODELIST']], capture_output=True,
                                   text=True, check=False).stdout.split()
            if not hosts:
                raise ValueError(f'--launcher slurm: scontrol names no host in SLURM_NODELIST={env["SLURM_NODELIST"]}')
            addr = hosts[0]
    else:  # mpi
        rank, world = env['OMPI_COMM_WORLD_RANK'], env['OMPI_COMM_WORLD_SIZE']
        local, addr = env['OMPI_COMM_WORLD_LOCAL_RANK'], env['MASTER_ADDR']
    return dict(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=local, MASTER_ADDR=addr,
                MASTER_PORT=env.get('MASTER_PORT', '29500'))  # torch's default port, as mmengine's


def _check_launcher(parser: argparse.ArgumentParser, launcher: str) -> None:
    # Before any work: mmengine would stop on a KeyError naming one variable, after building the config.
    try:
        if launcher != 'none' and not torch.cuda.is_available():
            cpu_rendezvous_env(launcher)
        else:
            error = _launcher_env_error(launcher)
            if error:
                raise ValueError(error)
    except ValueError as e:
        parser.error(str(e))


def _build_runner(cfg: Config) -> Runner:
    if cfg.launcher != 'none' and not torch.cuda.is_available() and not dist.is_initialized():
        # mmengine's init_dist calls torch.cuda.set_device first, which fails without a GPU: start gloo here from the
        # launcher's variables, and mmengine then uses this process group.
        env = cpu_rendezvous_env(cfg.launcher)
        os.environ.update(env)
        dist.init_process_group(backend='gloo', rank=int(env['RANK']), world_size=int(env['WORLD_SIZE']))
    return Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)


def _close_process_group() -> None:
    """Destroy the default process group after a run that finished on every rank.

    Left to interpreter exit, gloo's worker threads can outlive the Python objects they hold and abort the process
    ("terminate called without an active exception"), failing a run whose work is already saved. Only called on
    success: after an error on one rank the others may still sit in a collective, and destroying would hang them.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def train(argv: Sequence[str] | None = None, task: str = 'seg') -> None:
    """`tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp] [--cfg-options ...] [--launcher ...]`."""
    if task not in TASKS:
        raise ValueError(f'task must be one of {TASKS}, got {task!r}')
    parser = argparse.ArgumentParser(description=f'Train a {"segmentor" if task == "seg" else "detector"}')
    parser.add_argument('config', help='config file')
    parser.add_argument(
        '--resume', nargs='?', const='auto', metavar='CHECKPOINT',
        help='resume training: from CHECKPOINT, or without a value from the latest checkpoint in the work dir')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision training (CUDA)')
    if task == 'det':
        parser.add_argument('--auto-scale-lr', action='store_true',
                            help="scale the lr by (GPUs x batch) / the config's auto_scale_lr.base_batch_size")
    _common_args(parser)
    add_renamed_options(parser, {'--resume-from': '--resume CHECKPOINT',
                                 '--load-from': '--cfg-options load_from=CHECKPOINT',
                                 '--gpus': 'dist_train.sh CONFIG NUM_GPUS',
                                 '--gpu-ids': 'dist_train.sh CONFIG NUM_GPUS'})
    args = parser.parse_args(argv)
    _check_launcher(parser, args.launcher)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    if args.amp and not torch.cuda.is_available():
        parser.error('--amp needs a CUDA GPU (mmengine\'s AmpOptimWrapper); none is visible here')

    cfg = _load_config_or_exit(parser, args)
    if args.amp:
        if cfg.optim_wrapper.get('type', 'OptimWrapper') == 'AmpOptimWrapper':
            print_log('AMP is already enabled in the config.', logger='current', level=logging.WARNING)
        else:
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.loss_scale = 'dynamic'
    if getattr(args, 'auto_scale_lr', False):
        if not cfg.get('auto_scale_lr') or 'base_batch_size' not in cfg.auto_scale_lr:
            parser.error(f'--auto-scale-lr needs auto_scale_lr.base_batch_size in {args.config}')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        if not osp.isfile(args.resume):
            parser.error(f'--resume checkpoint not found: {args.resume}')
        try:
            saved = load_checkpoint_file(args.resume)
        except CheckpointError as e:
            parser.error(f'--resume {args.resume}: {e}')
        if not isinstance(saved, Mapping) or 'message_hub' not in saved:
            # An mmseg 0.x / mmdet 2.x (mmcv 1.x) file or a bare state_dict: mmengine's resume needs its own
            # training state (it stopped with KeyError: 'message_hub').
            parser.error(f'--resume {args.resume}: not a checkpoint of an mmengine training run (an mmseg 0.x / '
                         'mmdet 2.x file, or weights only), so its training state cannot be resumed; start from its '
                         f'weights with --cfg-options load_from={args.resume}')
        del saved
        cfg.resume = True
        cfg.load_from = args.resume
    _build_runner(cfg).train()
    _close_process_group()


def test(argv: Sequence[str] | None = None, task: str = 'seg') -> None:
    """`tools/test.py CONFIG CHECKPOINT [--out ...] [--show-dir DIR] [--tta] [--cfg-options ...] [--launcher ...]`.

    The checkpoint is loaded strictly by default (every name must match the model: released original-format
    checkpoints do, without conversion); `--no-strict` only warns about mismatches, as mmengine does.
    """
    if task not in TASKS:
        raise ValueError(f'task must be one of {TASKS}, got {task!r}')
    parser = argparse.ArgumentParser(description=f'Test (evaluate) a {"segmentor" if task == "seg" else "detector"}')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file (mmengine, or an original mmseg 0.x / mmdet 2.x file)')
    parser.add_argument('--out', help='save the predictions: a directory of label images (segmentation) or a '
                                      '.pkl file of results (detection)')
    parser.add_argument('--show', action='store_true', help='show predictions in a window')
    parser.add_argument('--show-dir', help='write every visualised prediction into this directory (under the work '
                                           'dir)')
    parser.add_argument('--wait-time', type=float, default=2, help='seconds each shown image stays up')
    parser.add_argument('--tta', action='store_true', help='multi-scale + flip test (the config\'s tta_pipeline)')
    parser.add_argument('--no-strict', dest='strict', action='store_false',
                        help='load the checkpoint even if some names do not match (warn instead of failing)')
    _common_args(parser)
    add_renamed_options(parser, {
        '--eval': "nothing: the metrics are the config's test_evaluator",
        '--aug-test': '--tta', '--format-only': '--out DIR (segmentation) / --out FILE.pkl (detection)',
        '--gpu-id': 'dist_test.sh CONFIG CHECKPOINT NUM_GPUS, or CUDA_VISIBLE_DEVICES'})
    args = parser.parse_args(argv)
    _check_launcher(parser, args.launcher)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    if not osp.isfile(args.checkpoint):
        parser.error(f'checkpoint file not found: {args.checkpoint}')
    if task == 'det' and args.out is not None and not args.out.endswith(('.pkl', '.pickle')):
        parser.error(f'--out must be a .pkl or .pickle file for detection, got {args.out!r}')

    try:  # an unreadable file is not a model mismatch: said apart, before the runner is built
        load_checkpoint_file(args.checkpoint)
    except CheckpointError as e:
        parser.error(f'checkpoint {args.checkpoint}: {e}')
    cfg = _load_config_or_exit(parser, args)
    cfg.load_from = None  # loaded below, strictly
    if args.show or args.show_dir:
        hooks = cfg.get('default_hooks') or ConfigDict()
        if not hooks.get('visualization'):
            parser.error('--show/--show-dir need a `visualization` hook in default_hooks of the config')
        vis = hooks.visualization
        vis.draw = True
        if args.show:
            vis.show = True
            vis.wait_time = args.wait_time
        if args.show_dir:
            if task == 'seg':
                # Every image (mmseg's hook draws every `interval`-th, 50 by default), under the work dir as the
                # detection hook writes its own.
                vis.interval = 1
                cfg.visualizer.save_dir = osp.join(cfg.work_dir, args.show_dir)
            else:
                vis.test_out_dir = args.show_dir
    if args.tta:
        if not cfg.get('tta_model') or not cfg.get('tta_pipeline'):
            parser.error(f'--tta needs tta_model and tta_pipeline in {args.config}')
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model
    if args.out is not None and task == 'seg':
        cfg.test_evaluator['output_dir'] = args.out
        cfg.test_evaluator['keep_results'] = True

    runner = _build_runner(cfg)
    try:
        runner.load_checkpoint(args.checkpoint, map_location='cpu', strict=args.strict)
    except (CheckpointError, RuntimeError) as e:  # one line instead of mmengine's traceback
        lines = str(e).strip().splitlines()
        raise SystemExit(f'test.py: error: {args.checkpoint} does not fit the config\'s model: '
                         + ' '.join(lines[:3])[:800]) from None
    if args.out is not None and task == 'det':
        from mmdet.evaluation import DumpDetResults
        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=args.out))
    runner.test()
    _close_process_group()
