"""Reading checkpoint files and fitting their state_dicts to a model (no knowledge of the architecture).

As timm keeps its loading helpers out of the model files, the model file `dsan.py` keeps only what knows DSAN:
`checkpoint_filter_fn` and the inference of the DSCN groups from a state_dict. Everything here is re-exported by
`dsan.models` (and importable from `dsan.models.dsan`, as before).
"""
import argparse
import functools
import logging
import os
import pickle
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn

__all__ = [
    'CheckpointError', 'NoPretrainedWeightsError', 'check_state_dict', 'extract_state_dict', 'load_checkpoint',
    'read_checkpoint',
]

_logger = logging.getLogger(__name__)

# Prefixes of wrapped models: DistributedDataParallel, torch.compile, and the backbone of an mm segmentor/detector.
_WRAPPER_PREFIXES = ('module.', '_orig_mod.', 'backbone.')


class CheckpointError(ValueError):
    """A file or state_dict that is not a usable checkpoint for the model."""


class NoPretrainedWeightsError(RuntimeError):
    """`pretrained=True` for a model whose weights cannot be downloaded: the file has to be given."""


def _numpy_globals() -> list:
    core = getattr(np, '_core', None) or np.core  # numpy 2 renamed numpy.core to numpy._core
    multiarray = core.multiarray
    dtype_classes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if isinstance(getattr(np.dtypes, n), type)]
    out = [multiarray.scalar, multiarray._reconstruct, np.ndarray, np.dtype, *dtype_classes]
    # Files written under numpy 1.x name the module numpy.core, under 2.x numpy._core: accept both names.
    for mod in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        out += [(multiarray.scalar, f'{mod}.scalar'), (multiarray._reconstruct, f'{mod}._reconstruct')]
    return out


@functools.cache
def allowed_globals() -> tuple:
    """What the weights-only unpickler may build besides tensors: the objects training checkpoints hold.

    numpy arrays, scalars and dtypes (mm metadata such as the best score), timm's ``argparse.Namespace`` (the
    ``args`` of CheckpointSaver files), and, when mmengine is importable, its ``HistoryBuffer`` (the training log
    state in ``message_hub``) with a ``getattr`` that only resolves HistoryBuffer's public methods (its pickled
    statistics). One list for `read_checkpoint` and `dsan.mm.checkpoint.load_checkpoint_file`.

    Returns:
        Entries for ``torch.serialization.safe_globals`` (objects, or (object, pickled name) pairs).
    """
    allowed = [*_numpy_globals(), argparse.Namespace]
    try:
        from mmengine.logging import HistoryBuffer
    except ImportError:  # dsan.models does not need the OpenMMLab stack; without it no file can hold a HistoryBuffer
        return tuple(allowed)

    def history_getattr(obj: Any, name: str) -> Any:
        if obj is HistoryBuffer and isinstance(name, str) and not name.startswith('_') and callable(
                getattr(HistoryBuffer, name, None)):
            return getattr(HistoryBuffer, name)
        raise pickle.UnpicklingError(f'getattr({obj!r}, {name!r}) is not allowed in a checkpoint')

    return (*allowed, HistoryBuffer, (history_getattr, 'builtins.getattr'))


def _global_name(entry: Any) -> str:
    return entry[1] if isinstance(entry, tuple) else f'{entry.__module__}.{entry.__qualname__}'


def _unsafe_globals(path: str, error: Exception) -> list[str]:
    """The globals outside `allowed_globals` that torch named when it refused `path` (empty: none named)."""
    names = set(re.findall(r'Unsupported global: GLOBAL ([\w.]+)', str(error)))
    try:  # a zip checkpoint can list all of them, where the error names the first only
        names.update(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip file (legacy pickle format): the error's name is all there is
        pass
    return sorted(names - {_global_name(g) for g in allowed_globals()})


def _unreadable(path: str, error: Exception, weights_only: bool) -> CheckpointError:
    """The error for a file torch could not load, saying which of the usual reasons it is."""
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        head = f.read(32)
    if head.startswith(b'version https://git-lfs'):
        return CheckpointError(f'{path} is a Git LFS pointer ({size} bytes), not the checkpoint itself: run git lfs '
                               'pull in its repository to fetch the file.')
    if not head:
        return CheckpointError(f'{path} is empty (0 bytes): not a torch checkpoint.')
    # torch writes zip archives (PK) or, in the legacy format, a pickle (protocol opcode 0x80).
    if not head.startswith((b'PK\x03\x04', b'\x80')):
        return CheckpointError(f'{path} ({size} bytes) is not a torch checkpoint (starts with {head!r}).')
    # Without weights_only nothing was refused: a missing class is a failure like any other, reported below.
    unsafe = _unsafe_globals(path, error) if weights_only else []
    if unsafe:
        return CheckpointError(
            f'{path} was not loaded: it holds objects outside the allowlist of the safe (weights-only) reader: '
            f'{_format_keys(unsafe, 8)}. Only load files you trust; to load it anyway, pass weights_only=False to '
            "dsan.models.read_checkpoint / load_checkpoint, or read it with torch.load(..., weights_only=False) and "
            "save its 'state_dict' (and 'meta') to a new file.")
    # torch wraps the unpickler's own reason in its advice text: keep the reason alone.
    reason = str(error).split('WeightsUnpickler error:')[-1].split('Check the documentation')[0].strip()
    reason = reason.splitlines()[0] if reason else ''
    if 'is not allowed in a checkpoint' in reason:  # the allowlist's getattr refused a name
        return CheckpointError(f'{path} was not loaded ({reason}).')
    detail = f'{type(error).__name__}: {reason}' if reason else type(error).__name__
    return CheckpointError(f'{path} ({size} bytes) could not be read as a torch checkpoint: it is truncated or '
                           f'corrupt ({detail}).')


def read_checkpoint(path: str | os.PathLike, weights_only: bool = True, map_location: Any = 'cpu') -> Any:
    """Read a checkpoint file (torch zip/legacy pickle or safetensors).

    Args:
        path: File path.
        weights_only: Use torch's restricted unpickler with `allowed_globals` (numpy values, timm's
            `argparse.Namespace`, mmengine's log state): timm, mmengine, mmseg and mmdet checkpoints load. Only pass
            False for files you trust.
        map_location: Where torch puts the tensors (safetensors files are read onto the CPU).

    Returns:
        Whatever the file holds (usually a dict).

    Raises:
        FileNotFoundError: No such file.
        CheckpointError: The path is a directory, or the file is a Git LFS pointer, not a torch checkpoint,
            truncated or corrupt, or holds objects outside the allowlist (named in the message).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f'{path} is a directory, not a checkpoint file.')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'Checkpoint file not found: {path}')
    if path.endswith('.safetensors'):
        try:
            from safetensors.torch import load_file
            return load_file(path, device='cpu')
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f'{path} is not a readable safetensors file ({type(e).__name__}: {e}).') from e
    try:
        if weights_only:
            with torch.serialization.safe_globals(list(allowed_globals())):
                return torch.load(path, map_location=map_location, weights_only=True)
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise _unreadable(path, e, weights_only) from e


def _strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    # mm checkpoints hold the backbone under 'backbone.' next to the heads: keep only the backbone there.
    if any(k.startswith(('backbone.', 'module.backbone.')) for k in state_dict):
        state_dict = {k: v for k, v in state_dict.items() if k.startswith(('backbone.', 'module.backbone.'))}
    out = {}
    for k, v in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in _WRAPPER_PREFIXES:
                if k.startswith(p):
                    k = k[len(p):]
                    changed = True
        out[k] = v
    return out


def extract_state_dict(checkpoint: Any, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Unwrap a checkpoint into a clean state_dict.

    Accepts timm CheckpointSaver dicts (`state_dict`, optional `state_dict_ema`), dicts with `model`
    (and optional `model_ema`), mm checkpoints (`state_dict` with `backbone.` keys) and plain state_dicts;
    strips `module.`, `_orig_mod.` and `backbone.` prefixes.

    Args:
        checkpoint: Loaded checkpoint object.
        use_ema: Take the EMA weights (`state_dict_ema` / `model_ema`); an error if there are none.

    Returns:
        Mapping of parameter/buffer name to tensor.

    Raises:
        CheckpointError: Not a checkpoint, or EMA weights requested but absent.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f'Expected a checkpoint dict, got {type(checkpoint).__name__}.')
    if use_ema:
        key = next((k for k in ('state_dict_ema', 'model_ema') if isinstance(checkpoint.get(k), Mapping)), None)
        if key is None:
            raise CheckpointError(
                f'EMA weights requested but the checkpoint has no state_dict_ema/model_ema '
                f'(top-level keys: {sorted(map(str, checkpoint))[:20]}).')
        state_dict = checkpoint[key]
    else:
        key = next((k for k in ('state_dict', 'model') if isinstance(checkpoint.get(k), Mapping)), None)
        state_dict = checkpoint[key] if key is not None else checkpoint
    if not state_dict or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        non_tensor = [str(k) for k, v in state_dict.items() if not isinstance(v, torch.Tensor)][:10]
        raise CheckpointError(
            'Not a DSAN checkpoint: expected a state_dict of tensors, or a dict holding one under '
            f"'state_dict' / 'model'; top-level keys: {sorted(map(str, checkpoint))[:20]}"
            + (f', non-tensor entries: {non_tensor}' if non_tensor else ''))
    return _strip_prefixes(state_dict)


def _format_keys(keys: Sequence[str], limit: int = 12) -> str:
    keys = list(keys)
    shown = ', '.join(keys[:limit])
    return shown + (f', ... ({len(keys) - limit} more)' if len(keys) > limit else '')


def check_state_dict(
        state_dict: Mapping[str, torch.Tensor],
        model: nn.Module,
        ignore_prefixes: tuple[str, ...] = (),
        header: str | None = None,
) -> None:
    """Check that `state_dict` has exactly the names and shapes of `model.state_dict()`.

    Args:
        state_dict: Clean state_dict (see `extract_state_dict`).
        model: Target model.
        ignore_prefixes: Names starting so are not checked (e.g. the classifier): they may be missing, extra or of
            another shape.
        header: First line of the error message (default: names the model class).

    Raises:
        CheckpointError: Listing the missing, unexpected and mismatched-shape keys.
    """
    expected = model.state_dict()

    def ignored(k: str) -> bool:
        return k.startswith(ignore_prefixes)

    missing = [k for k in expected if k not in state_dict and not ignored(k)]
    unexpected = [k for k in state_dict if k not in expected and not ignored(k)]
    mismatched = [
        f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}'
        for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape and not ignored(k)]
    if missing or unexpected or mismatched:
        lines = [(header or f'Checkpoint does not fit the model ({type(model).__name__})') + ':']
        if missing:
            lines.append(f'  missing keys ({len(missing)}): {_format_keys(missing)}')
        if unexpected:
            lines.append(f'  unexpected keys ({len(unexpected)}): {_format_keys(unexpected)}')
        if mismatched:
            lines.append(f'  mismatched shapes ({len(mismatched)}): {_format_keys(mismatched, 8)}')
        raise CheckpointError('\n'.join(lines))


def load_checkpoint(
        model: nn.Module,
        checkpoint: str | os.PathLike | Mapping[str, Any],
        use_ema: bool = False,
        strict: bool = True,
        weights_only: bool = True,
        filter_fn: Callable[..., dict[str, torch.Tensor]] | None = None,
        classifier: str | None = None,
) -> None:
    """Load a checkpoint into `model`, checking names and shapes first.

    Args:
        model: Target model.
        checkpoint: File path or an already loaded checkpoint/state_dict.
        use_ema: Load the EMA weights of a training checkpoint.
        strict: Also require the classifier to match; otherwise a missing classifier or one of another shape
            is skipped (the model keeps its own).
        weights_only: See `read_checkpoint`.
        filter_fn: `filter_fn(checkpoint, model, use_ema=use_ema)` returns the state_dict to load (a model's
            `checkpoint_filter_fn`); default `extract_state_dict`.
        classifier: Name of the classifier module (default: `model.pretrained_cfg['classifier']`, else 'head').

    Raises:
        CheckpointError: The checkpoint does not fit; the message lists what is wrong.
    """
    header = None
    if not isinstance(checkpoint, Mapping):
        header = f'Checkpoint {os.fspath(checkpoint)} does not fit the model ({type(model).__name__})'
        checkpoint = read_checkpoint(checkpoint, weights_only=weights_only)
    if filter_fn is not None:
        state_dict = filter_fn(checkpoint, model, use_ema=use_ema)
    else:
        state_dict = extract_state_dict(checkpoint, use_ema=use_ema)
    if strict:
        check_state_dict(state_dict, model, header=header)
        model.load_state_dict(state_dict, strict=True)
        return
    if classifier is None:
        classifier = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier') or 'head'
    prefix = classifier + '.'
    check_state_dict(state_dict, model, ignore_prefixes=(prefix,), header=header)
    expected = model.state_dict()
    head = [k for k in expected if k.startswith(prefix)]
    if any(k not in state_dict or state_dict[k].shape != expected[k].shape for k in head):
        _logger.info("Classifier missing or of another shape in the checkpoint: keeping the model's own.")
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
        state_dict.update({k: expected[k] for k in head})
    model.load_state_dict(state_dict, strict=True)
