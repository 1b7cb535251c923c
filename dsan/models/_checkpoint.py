"""Reading checkpoint files and fitting their state_dicts to a model (no knowledge of the architecture).

As timm keeps its loading helpers out of the model files, the model file `dsan.py` keeps only what knows DSAN:
`checkpoint_filter_fn` and the inference of the DSCN groups from a state_dict. Everything here is re-exported by
`dsan.models` (and importable from `dsan.models.dsan`, as before).
"""
import argparse
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

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


def read_checkpoint(path: str | os.PathLike, weights_only: bool = True) -> Any:
    """Read a checkpoint file (torch pickle/zip or safetensors) onto the CPU.

    Args:
        path: File path.
        weights_only: Use torch's restricted unpickler (plus `argparse.Namespace`, which timm's
            CheckpointSaver stores as `args`). Only pass False for files you trust.

    Returns:
        Whatever the file holds (usually a dict).

    Raises:
        FileNotFoundError: No such file.
        CheckpointError: The file is truncated, corrupt or not a checkpoint.
    """
    path = os.fspath(path)
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
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location='cpu', weights_only=True)
        return torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:
        size = os.path.getsize(path)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ''
        hint = ''
        if 'Weights only load failed' in str(e):
            hint = ' It holds objects outside the safe list; if you trust it, pass weights_only=False.'
        raise CheckpointError(
            f'{path} ({size} bytes) could not be read as a torch checkpoint: it is truncated, corrupt or not a '
            f'checkpoint ({type(e).__name__}: {first}).{hint}') from e


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
    if not isinstance(checkpoint, Mapping):
        checkpoint = read_checkpoint(checkpoint, weights_only=weights_only)
    if filter_fn is not None:
        state_dict = filter_fn(checkpoint, model, use_ema=use_ema)
    else:
        state_dict = extract_state_dict(checkpoint, use_ema=use_ema)
    if strict:
        check_state_dict(state_dict, model)
        model.load_state_dict(state_dict, strict=True)
        return
    if classifier is None:
        classifier = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier') or 'head'
    prefix = classifier + '.'
    check_state_dict(state_dict, model, ignore_prefixes=(prefix,))
    expected = model.state_dict()
    head = [k for k in expected if k.startswith(prefix)]
    if any(k not in state_dict or state_dict[k].shape != expected[k].shape for k in head):
        _logger.info("Classifier missing or of another shape in the checkpoint: keeping the model's own.")
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
        state_dict.update({k: expected[k] for k in head})
    model.load_state_dict(state_dict, strict=True)
