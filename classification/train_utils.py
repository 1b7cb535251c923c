"""Training-reliability helpers: distributed setup, atomic checkpoints, RNG state, graceful stop.

Checkpoint policy (what ``--resume`` relies on):

* A checkpoint is written only at the end of a completed epoch (after validation), to ``last.pth.tar`` and,
  when the eval metric improved, ``model_best.pth.tar``. Each file is written to a temporary file in the same
  directory, flushed and fsync'ed, then moved into place with :func:`os.replace`, so a reader (or a crash)
  sees either the previous complete file or the new complete file, never a partial one.
* SIGTERM / SIGINT in the middle of an epoch stops training at the next step boundary (distributed runs: at the
  next log step, where the ranks agree on it) *without* writing the partial epoch; ``--resume last.pth.tar``
  restarts that epoch from the state saved at the end of the previous one (model, optimizer, scheduler, EMA, AMP
  scaler, epoch and the python / numpy / torch RNG states of every rank), so at most the partial epoch is lost
  and the resumed run is the run that was interrupted.
* Weights are checked to be finite before every write; a non-finite loss stops training at the next log step
  (``--log-interval``; the loss is read from the device only there), before any checkpoint.
* ``--checkpoint-hist N`` also keeps the N best epoch checkpoints (by ``--eval-metric``, as timm) as
  ``checkpoint-<epoch>.pth.tar`` (hard links of ``last.pth.tar`` where the file system allows, else copies); the
  others are deleted.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import random
import re
import shutil
import signal
import tempfile
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

_logger = logging.getLogger(__name__)

# The process's umask, read once at import (setting it to read it is not thread-safe later).
_UMASK = os.umask(0o022)
os.umask(_UMASK)

# timm's meaning: `epoch` is the last completed epoch, so timm.models.resume_checkpoint resumes at epoch + 1.
CHECKPOINT_VERSION = 2


class NonFiniteError(RuntimeError):
    """The loss or the weights became NaN/Inf; training stops and no checkpoint is written."""


class DeviceError(ValueError):
    """A --device that does not exist here; the message names it."""


class ResumeError(ValueError):
    """A --resume checkpoint that cannot be read or does not fit the run; the message says which and why."""


class TrainingInterrupted(RuntimeError):
    """Training was stopped by a signal at a step boundary."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


# ---------------------------------------------------------------------------------------------------------------------
# distributed


def resolve_device(device: str = '', index: int | None = None) -> torch.device:
    """The torch.device for a --device value ('' picks CUDA when available, else the CPU), with an index on CUDA.

    Args:
        device: '', 'cpu', 'cuda' or 'cuda:N'.
        index: The CUDA device to use in place of the given one (torchrun's local rank), or None.

    Raises:
        DeviceError: not a device name, or CUDA asked for where there is none; the message names --device.
    """
    if not device:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise DeviceError(f'--device must be a torch device such as "cuda", "cuda:1" or "cpu"; got {device!r}') from e
    if dev.type == 'cuda':
        if not torch.cuda.is_available():
            raise DeviceError(f'--device {device}: no CUDA device is available here (torch.cuda.is_available() is '
                             'False); use --device cpu')
        # torch.cuda.set_device and DDP's device_ids need an index: the given one (default 0), or the local rank.
        dev = torch.device('cuda', index if index is not None else (dev.index or 0))
    return dev


def error_message(e: BaseException) -> str:
    """The one-line message of an input error, also when a DataLoader worker raised it.

    torch re-raises a worker's exception with the worker's whole traceback as its message ("Caught ... in DataLoader
    worker process 0. Original Traceback ..."); the user needs its last line, the original message.
    """
    text = str(e)
    if 'Original Traceback' in text:
        last = text.strip().splitlines()[-1]
        name = type(e).__name__
        text = last.split(f'{name}: ', 1)[1] if f'{name}: ' in last else last
    return text


# --input-size of train.py and validate.py: the loaders read every image as RGB, so C other than 3 would be ignored
# silently (timm's scripts read 'L' images for C = 1; DSAN's checkpoints and recipes are RGB).
INPUT_SIZE_RULE = ('--input-size', 'input_size', lambda v: v[0] == 3 and min(v) >= 1,
                   'C H W with C = 3 (images are read as RGB) and H, W >= 1')


def check_ranges(parser, args, rules) -> None:
    """``parser.error`` (exit status 2) naming the first argument outside its range.

    Args:
        parser: The argparse parser.
        args: The parsed arguments.
        rules: ``(flag, attribute, predicate, expected)`` tuples; None values pass (an unset optional argument).
    """
    for flag, attr, ok, expected in rules:
        value = getattr(args, attr)
        if value is not None and not ok(value):
            parser.error(f'{flag} must be {expected}; got {value}')


def init_distributed(device: str = '') -> dict[str, Any]:
    """Initialise ``torch.distributed`` from torchrun's environment, if present.

    The backend is NCCL when training on CUDA and gloo otherwise (CPU).

    Args:
        device: Requested device ('' picks CUDA when available, else CPU).

    Returns:
        Dict with ``distributed``, ``rank``, ``world_size``, ``local_rank`` and ``device`` (a torch.device).
    """
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    distributed = world_size > 1
    dev = resolve_device(device, local_rank if distributed else None)
    if dev.type == 'cuda':
        torch.cuda.set_device(dev)
    if distributed:
        backend = 'nccl' if dev.type == 'cuda' else 'gloo'
        dist.init_process_group(backend=backend)
        rank, world_size = dist.get_rank(), dist.get_world_size()
        _logger.info('Distributed training: rank %d of %d, backend %s, device %s', rank, world_size, backend, dev)
    return dict(distributed=distributed, rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank (identity when not distributed)."""
    if not is_distributed():
        return obj
    buf = [obj]
    dist.broadcast_object_list(buf, src=src)
    return buf[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Gather ``obj`` from every rank, in rank order (``[obj]`` when not distributed)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# RNG state


def get_rng_state() -> dict[str, Any]:
    """Snapshot of the python, numpy and torch (CPU and CUDA) global RNG states of this process."""
    state = {
        'python': random.getstate(),
        'numpy': np.random.get_state(),
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a snapshot made by :func:`get_rng_state`."""
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


# ---------------------------------------------------------------------------------------------------------------------
# checkpoints


def assert_finite_state(state_dict: dict[str, Any], what: str = 'model') -> None:
    """Raise :class:`NonFiniteError` naming the first floating tensor of ``state_dict`` with NaN/Inf values."""
    for name, value in state_dict.items():
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            raise NonFiniteError(f'{what} tensor {name!r} contains NaN/Inf values; refusing to write a checkpoint')


def _atomic_write(path: str, write: Any) -> None:
    """Write ``path`` atomically: ``write(f)`` into a temp file in the same directory (``.<name>.XXXX.tmp``), fsync,
    :func:`os.replace`, fsync of the directory."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=directory)
    try:
        # mkstemp makes the file 0600 whatever the umask; give it the mode open() would (0666 less the umask).
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` atomically (:func:`_atomic_write`)."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_copy(src: str, dst: str) -> None:
    """Copy file `src` to `dst` atomically (:func:`_atomic_write`)."""
    def copy(out):
        with open(src, 'rb') as f:
            shutil.copyfileobj(f, out)
    _atomic_write(dst, copy)


_HISTORY_INDEX = 'checkpoint-hist.json'


def keep_checkpoint_history(last_path: str, epoch: int, keep: int, metric: float | None,
                            decreasing: bool = False) -> list[str]:
    """``--checkpoint-hist``: keep the ``keep`` best epoch checkpoints as ``checkpoint-<epoch>.pth.tar``, as timm's
    CheckpointSaver does (ranked by the eval metric; ties keep the earlier epoch).

    The new file is a hard link of ``last_path`` (no copy; :func:`atomic_save` later replaces ``last_path`` with a
    new file, the link keeps this one), or an atomic copy where the file system has no hard links. The metrics of
    the kept files are recorded in ``checkpoint-hist.json`` beside them (written atomically), so that a resumed run
    goes on ranking them without reading the checkpoints.

    Args:
        last_path: The checkpoint just written (``last.pth.tar``).
        epoch: Its epoch.
        keep: How many ``checkpoint-<N>.pth.tar`` files to keep; 0 or less keeps none and deletes none.
        metric: Its eval metric (``--eval-metric``); None ranks last.
        decreasing: Lower is better (a loss).

    Returns:
        The kept history files, best first.
    """
    if keep <= 0:
        return []
    directory = os.path.dirname(os.path.abspath(last_path))
    index_path = os.path.join(directory, _HISTORY_INDEX)
    index: list[list] = []
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = [[name, m] for name, m in json.load(f) if os.path.exists(os.path.join(directory, name))]
    name = f'checkpoint-{epoch}.pth.tar'
    index = [entry for entry in index if entry[0] != name] + [[name, metric]]

    def rank(entry):
        m = entry[1]
        return (m is None, 0.0 if m is None else (m if decreasing else -m))

    ranked = sorted(index, key=rank)  # stable: among equal metrics the earlier entry stays ahead
    kept, dropped = ranked[:keep], ranked[keep:]
    if any(entry[0] == name for entry in kept):
        target = os.path.join(directory, name)
        tmp = os.path.join(directory, f'.{name}.{os.getpid()}.tmp')
        if os.path.exists(tmp):
            os.unlink(tmp)
        try:
            os.link(last_path, tmp)
            os.replace(tmp, target)
        except OSError:  # no hard links here (some network / FUSE file systems): copy
            if os.path.exists(tmp):
                os.unlink(tmp)
            atomic_copy(last_path, target)
    for old, _ in dropped:
        path = os.path.join(directory, old)
        if os.path.exists(path):
            os.unlink(path)
            _logger.info('Removed checkpoint %s (not among the %d best)', old, keep)
    tmp_index = index_path + f'.{os.getpid()}.tmp'
    with open(tmp_index, 'w') as f:
        json.dump(kept, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_index, index_path)
    return [os.path.join(directory, entry[0]) for entry in kept]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DistributedDataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, 'module') and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, '_orig_mod'):
            model = model._orig_mod
        else:
            return model


def build_checkpoint(
        *,
        epoch: int,
        arch: str,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any = None,
        model_ema: torch.nn.Module | None = None,
        loss_scaler: Any = None,
        rng_states: list[dict[str, Any]] | None = None,
        metric: float | None = None,
        args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the full training state after completed epoch ``epoch`` (0-based).

    Keys follow timm (``state_dict``, ``optimizer``, ``state_dict_ema``, ``amp_scaler``) so timm's
    ``load_checkpoint(..., use_ema=True)`` reads these files too.
    """
    state = {
        'version': CHECKPOINT_VERSION,
        'epoch': epoch,
        'arch': arch,
        'state_dict': unwrap_model(model).state_dict(),
        'optimizer': optimizer.state_dict(),
        'metric': metric,
        'args': args,
        'rng_states': rng_states,
    }
    if lr_scheduler is not None:
        state['scheduler'] = lr_scheduler.state_dict()
    if model_ema is not None:
        state['state_dict_ema'] = unwrap_model(model_ema.module).state_dict()
    if loss_scaler is not None:
        state['amp_scaler'] = loss_scaler.state_dict()
    assert_finite_state(state['state_dict'], 'model')
    if 'state_dict_ema' in state:
        assert_finite_state(state['state_dict_ema'], 'EMA model')
    return state


# The arguments that define the lr schedule of a run.
SCHEDULE_ARGS = ('sched', 'epochs', 'lr', 'min_lr', 'warmup_lr', 'warmup_epochs', 'cooldown_epochs', 'decay_epochs',
                 'decay_rate', 'sched_on_updates', 'grad_accum_steps', 'batch_size')


def changed_schedule_args(saved: dict[str, Any] | None, args) -> dict[str, tuple[Any, Any]]:
    """The schedule arguments (`SCHEDULE_ARGS`) whose value in `args` differs from a checkpoint's saved ones.

    Returns:
        ``{name: (saved value, new value)}``; empty when nothing changed or the checkpoint saved no arguments.
    """
    saved = saved or {}
    return {k: (saved[k], getattr(args, k)) for k in SCHEDULE_ARGS
            if k in saved and hasattr(args, k) and saved[k] != getattr(args, k)}


def remove_unused_run_dir(path: str | None) -> None:
    """Remove a run folder this run created that holds nothing but its ``args.yaml`` and ``log.txt`` (a run stopped
    by bad input before any epoch), closing the log file handlers that write into it."""
    if not path or not os.path.isdir(path) or not set(os.listdir(path)) <= {'args.yaml', 'log.txt'}:
        return
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, logging.FileHandler) and os.path.dirname(os.path.abspath(h.baseFilename)) == \
                os.path.abspath(path):
            root.removeHandler(h)
            h.close()
    shutil.rmtree(path, ignore_errors=True)


def later_checkpoint_epoch(last: str, resumed: str) -> int | None:
    """The epoch of `last` (a run folder's last.pth.tar) when it is another file than `resumed`, else None."""
    if not os.path.isfile(last) or os.path.samefile(last, resumed):
        return None
    try:  # memory-mapped: only the small entries are read
        epoch = torch.load(last, map_location='cpu', mmap=True, weights_only=False).get('epoch')
    except Exception:  # an unreadable last.pth.tar is not this run's problem
        return None
    return epoch if isinstance(epoch, int) else None


def checkpoint_class_map(path: str) -> dict[str, int] | None:
    """The ``class_to_idx`` a train.py checkpoint saved (the training folders' class indices), or None for any other
    file (released weights, timm files, safetensors) or one that does not read."""
    try:
        ckpt = torch.load(path, map_location='cpu', mmap=True, weights_only=True)
    except Exception:  # not a torch zip file, or one of another kind: the caller falls back to the folder order
        return None
    mapping = ckpt.get('class_to_idx') if isinstance(ckpt, dict) else None
    if isinstance(mapping, dict) and mapping and all(isinstance(v, int) for v in mapping.values()):
        return mapping
    return None


def load_training_checkpoint(path: str) -> dict[str, Any]:
    """Load a checkpoint written by :func:`build_checkpoint` (a trusted, locally written file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint to resume from not found: {path!r}')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:  # a truncated or foreign file: torch/pickle raise all kinds of errors
        raise ResumeError(f'--resume {path!r} is not a readable checkpoint ({type(e).__name__}: {e})') from e
    if not isinstance(ckpt, dict) or 'state_dict' not in ckpt or 'epoch' not in ckpt:
        raise ResumeError(f'--resume {path!r} is not a training checkpoint (needs "state_dict" and "epoch"); '
                          'use --initial-checkpoint to start from weights only')
    # timm's train.py (0.4.x and 1.0) saves its arguments as an argparse Namespace; train.py as a dict.
    if isinstance(ckpt.get('args'), argparse.Namespace):
        ckpt['args'] = vars(ckpt['args'])
    elif not isinstance(ckpt.get('args'), dict):
        ckpt['args'] = {}
    return ckpt


# Arguments that do not change what a run computes (where it writes, how it reports, how it loads data).
_BOOKKEEPING_ARGS = frozenset((
    'resume', 'experiment', 'output', 'config', 'log_interval', 'no_progress', 'no_plot', 'workers', 'pin_mem',
    'tensorboard', 'tune_malloc', 'local_rank', 'device', 'checkpoint_hist', 'no_resume_opt', 'data_dir'))


def changed_run_args(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The arguments of `current` that differ from a checkpoint's `saved` ones (both as train.py writes them to
    args.yaml), leaving out `SCHEDULE_ARGS` (reported on their own) and those that change no result."""
    return {k: (saved[k], current[k]) for k in saved
            if k in current and k not in SCHEDULE_ARGS and k not in _BOOKKEEPING_ARGS and saved[k] != current[k]}


def run_dir_contents(path: str) -> list[str]:
    """The checkpoints of a training run in folder `path`, [] if there are none (a summary.csv alone is an attempt
    killed in its first epoch, before any checkpoint: a new run there replaces it)."""
    return [name for name in ('last.pth.tar', 'model_best.pth.tar') if os.path.exists(os.path.join(path, name))]


def make_new_run_dir(path: str) -> str:
    """Create `path`, or `path-1`, `path-2`, ... where it exists (two runs started in one second), and return it."""
    candidate, n = path, 0
    while True:
        try:
            os.makedirs(candidate)
            return candidate
        except FileExistsError:
            n += 1
            candidate = f'{path}-{n}'


_TEMP_FILE = re.compile(r'^\.(last\.pth\.tar|model_best\.pth\.tar|checkpoint-\d+\.pth\.tar|args\.yaml)\..+\.tmp$'
                        r'|^(checkpoint-hist\.json|summary\.csv)\.\d+\.tmp$')


def remove_stale_temp_files(path: str) -> list[str]:
    """Delete the temp files that a run killed while saving left in its folder `path` (:func:`atomic_save` and
    :func:`keep_checkpoint_history` remove their own otherwise); returns their names."""
    removed = []
    for name in sorted(os.listdir(path)) if os.path.isdir(path) else []:
        if _TEMP_FILE.match(name):
            os.unlink(os.path.join(path, name))
            removed.append(name)
    return removed


def checkpoint_epoch(path: str) -> int | None:
    """The epoch a checkpoint file records (memory-mapped: only its small entries are read), None if unreadable."""
    try:
        epoch = torch.load(path, map_location='cpu', mmap=True, weights_only=False).get('epoch')
    except Exception:
        return None
    return epoch if isinstance(epoch, int) else None


def _write_csv_atomically(path: str, fieldnames: list[str], rows: list[dict[str, Any]]) -> None:
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames, restval='')
        writer.writeheader()
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_summary(path: str) -> tuple[list[str], list[dict[str, str]]]:
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return [], []
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def append_summary(path: str, epoch: int, train_metrics: dict[str, float], eval_metrics: dict[str, float],
                   lr: float) -> None:
    """Add an epoch's row to `path`, in timm's ``summary.csv`` columns (``epoch``, ``train_*``, ``eval_*``, ``lr``).

    timm's ``update_summary`` appends under whatever header the file has: a run resumed with other metrics (say,
    with ``--model-ema``) wrote its values under the wrong columns. Here a row with new columns rewrites the file
    with the union of the columns (old rows leave the new ones empty).
    """
    row = {'epoch': epoch, **{f'train_{k}': v for k, v in train_metrics.items()},
           **{f'eval_{k}': v for k, v in (eval_metrics or {}).items()}, 'lr': lr}
    fieldnames, rows = _read_summary(path)
    # Rows of this epoch or later were written by an attempt that did not commit them (killed before its
    # last.pth.tar), or come before a resume from an earlier checkpoint: this epoch replaces them, now that it ran.
    kept = [r for r in rows if not _is_int(r.get('epoch')) or int(r['epoch']) < epoch]
    if len(kept) != len(rows):
        _write_csv_atomically(path, fieldnames + [k for k in row if k not in fieldnames], kept + [row])
        return
    if fieldnames and set(row) <= set(fieldnames):
        with open(path, 'a', newline='') as f:
            csv.DictWriter(f, fieldnames=fieldnames, restval='').writerow(row)
        return
    merged = fieldnames + [k for k in row if k not in fieldnames]
    if 'lr' in merged:  # timm puts lr last
        merged = [k for k in merged if k != 'lr'] + ['lr']
    _write_csv_atomically(path, merged, rows + [row])


def _is_int(value: Any) -> bool:
    try:
        int(value)
    except (TypeError, ValueError):
        return False
    return True


# ---------------------------------------------------------------------------------------------------------------------
# graceful stop


class GracefulStop:
    """Turn SIGTERM / SIGINT into a flag that the training loop polls at step boundaries.

    A second signal of the same kind restores the default behaviour (so a second Ctrl-C kills at once).
    In distributed runs :meth:`check` all-reduces the flag so every rank stops at the same step.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signum: int | None = None
        self._announced = False
        self._previous = {}
        for s in signals:
            try:
                self._previous[s] = signal.signal(s, self._handler)
            except ValueError:  # not in the main thread (e.g. called from a test runner thread)
                pass

    def _handler(self, signum, frame):
        # Only set the flag: logging here could re-enter a log write the main thread was in the middle of
        # ("--- Logging error ---"). `check` announces the stop.
        if self.signum is not None:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        self.signum = signum

    def restore(self) -> None:
        """Put the previous signal handlers back."""
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def check(self, device: torch.device, nonfinite: bool = False) -> tuple:
        """Return ``(signum or 0, any_rank_nonfinite)`` agreed across ranks (one tiny all-reduce)."""
        if self.signum is not None and not self._announced:
            self._announced = True
            _logger.warning('Received %s: stopping at the next step boundary (send again to kill now)',
                            signal.Signals(self.signum).name)
        flags = torch.tensor([self.signum or 0, int(nonfinite)], dtype=torch.int64)
        if is_distributed():
            flags = flags.to(device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            flags = flags.cpu()
        return int(flags[0]), bool(flags[1])


def rng_state_for_checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    """Make a :func:`get_rng_state` snapshot loadable with ``torch.load(weights_only=True)`` (no numpy objects)."""
    name, keys, pos, has_gauss, cached = state['numpy']
    out = dict(state)
    out['numpy'] = [str(name), torch.from_numpy(np.asarray(keys, np.int64)), int(pos), int(has_gauss), float(cached)]
    return out


def rng_state_from_checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`rng_state_for_checkpoint`."""
    name, keys, pos, has_gauss, cached = state['numpy']
    out = dict(state)
    out['python'] = (state['python'][0], tuple(state['python'][1]), state['python'][2])
    out['numpy'] = (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
    return out


def weights_checksum(model: torch.nn.Module) -> str:
    """Order-sensitive checksum of all parameters and buffers (compare across ranks)."""
    import hashlib
    h = hashlib.sha256()
    for name, t in unwrap_model(model).state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def keep_freed_memory(device: torch.device) -> bool:
    """`dsan.allocator.keep_freed_memory` for a run on the CPU; False (nothing done) on other devices."""
    if device.type != 'cpu':
        return False
    try:
        from dsan.allocator import keep_freed_memory as keep
    except ImportError:  # train.py and validate.py also run other timm models without the dsan package
        return False
    return keep()
