"""Reading mmengine / mmseg / mmdet checkpoints with torch's safe (weights-only) unpickler.

Since torch 2.6, ``torch.load`` refuses any object outside a small allowlist, and mmengine 0.10.7 calls it with that
default: its own training checkpoints then fail to load (resume, test), because they hold numpy values and the
training log state, a ``HistoryBuffer`` whose statistics methods are pickled as ``getattr(HistoryBuffer, 'mean')``.
Turning the check off (``weights_only=False``) would run whatever a downloaded file contains. Instead the reader
here allows exactly what these files hold: numpy arrays, scalars and dtypes, ``HistoryBuffer``, timm's
``argparse.Namespace``, and a ``getattr`` that only resolves public methods of ``HistoryBuffer``.

`install()` makes it mmengine's reader of local files (``CheckpointLoader``'s default scheme), and makes mmengine
write local files atomically (a checkpoint is written to a temporary file, synced, then renamed, so an interrupted
run never leaves a truncated checkpoint behind to resume from). Importing `dsan.mm` calls it, so every tool and
config that uses the DSAN backbone reads and writes checkpoints this way.
"""
import argparse
import os
import pickle
from typing import Any

import numpy as np
import torch
from mmengine.fileio import LocalBackend, register_backend
from mmengine.fileio import io as mm_io
from mmengine.logging import HistoryBuffer
from mmengine.runner import CheckpointLoader

from dsan.models.dsan import CheckpointError, read_checkpoint

__all__ = ['install', 'load_checkpoint_file']


def _history_getattr(obj: Any, name: str) -> Any:
    """`getattr` as the unpickler may call it: only for HistoryBuffer's public methods (its pickled statistics)."""
    if obj is HistoryBuffer and isinstance(name, str) and not name.startswith('_') and callable(
            getattr(HistoryBuffer, name, None)):
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(f'getattr({obj!r}, {name!r}) is not allowed in a checkpoint')


def _numpy_globals() -> list:
    core = getattr(np, '_core', None) or np.core  # numpy 2 renamed numpy.core to numpy._core
    multiarray = core.multiarray
    dtype_classes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if isinstance(getattr(np.dtypes, n), type)]
    out = [multiarray.scalar, multiarray._reconstruct, np.ndarray, np.dtype, *dtype_classes]
    # Files written under numpy 1.x name the module numpy.core, under 2.x numpy._core: accept both names.
    for mod in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        out += [(multiarray.scalar, f'{mod}.scalar'), (multiarray._reconstruct, f'{mod}._reconstruct')]
    return out


_SAFE_GLOBALS = [
    *_numpy_globals(),
    HistoryBuffer,
    argparse.Namespace,
    (_history_getattr, 'builtins.getattr'),
]


def load_checkpoint_file(filename: str | os.PathLike, map_location: Any = 'cpu') -> Any:
    """Load a local checkpoint with the weights-only unpickler and the allowlist above (safetensors too).

    Raises:
        FileNotFoundError: No such file.
        CheckpointError: The file is not a readable checkpoint, or holds objects outside the allowlist (named in
            the message).
    """
    filename = os.fspath(filename)
    if filename.endswith('.safetensors'):
        return read_checkpoint(filename)
    if not os.path.isfile(filename):
        raise FileNotFoundError(f'checkpoint file not found: {filename}')
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(filename, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(filename)
        except Exception:  # not a zip checkpoint: the original error says more
            unsafe = []
        allowed = {f'{g[1]}' if isinstance(g, tuple) else f'{g.__module__}.{g.__qualname__}' for g in _SAFE_GLOBALS}
        extra = sorted(set(unsafe) - allowed)
        if extra:
            detail = f'it holds objects outside the allowlist: {extra}'
        else:  # torch wraps the unpickler's own reason in its advice: keep the reason
            reason = str(e).split('WeightsUnpickler error:')[-1].split('Check the documentation')[0].strip()
            detail = reason.splitlines()[0] if reason else 'the safe unpickler refused it'
        raise CheckpointError(
            f'{filename} was not loaded ({detail}). Only load files you trust; to load it anyway, read it with '
            "torch.load(..., weights_only=False) and save its 'state_dict' (and 'meta') to a new file.") from e
    except (RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f'{filename} ({os.path.getsize(filename)} bytes) could not be read as a torch '
                              f'checkpoint: it is truncated, corrupt or not a checkpoint ({type(e).__name__}: '
                              f'{str(e).strip().splitlines()[0] if str(e).strip() else ""}).') from e


class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend, writing each file through a temporary file and an atomic rename."""

    def put(self, obj: bytes, filepath: str | os.PathLike) -> None:
        """Write `obj` to `filepath` atomically (parent directories are created)."""
        filepath = os.fspath(filepath)
        os.makedirs(os.path.dirname(filepath) or '.', exist_ok=True)
        tmp = f'{filepath}.tmp-{os.getpid()}'
        try:
            with open(tmp, 'wb') as f:
                f.write(obj)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, filepath)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def install() -> None:
    """Make `load_checkpoint_file` mmengine's loader of local paths, and local writes atomic."""
    CheckpointLoader.register_scheme(prefixes='', loader=load_checkpoint_file, force=True)
    register_backend('local', AtomicLocalBackend, force=True, prefixes='')
    # Drop backend instances created before this call, so they are rebuilt with the new class.
    for key in [k for k, v in mm_io.backend_instances.items() if type(v) is LocalBackend]:
        del mm_io.backend_instances[key]
