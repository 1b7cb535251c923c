"""Model creation for train.py / validate.py: DSAN registration, clear errors, original-checkpoint loading."""
from __future__ import annotations

import logging
from typing import Any

import timm
import torch

_logger = logging.getLogger(__name__)

try:
    import dsan.models  # noqa: F401  (registers dsan_t, dsan_t2, dsan_s with timm)
    _DSAN_IMPORT_ERROR: BaseException | None = None
except ImportError as _e:  # keep other timm models usable; report when a DSAN model is asked for
    _DSAN_IMPORT_ERROR = _e


class ModelError(ValueError):
    """Unknown model name or unusable model checkpoint."""


def is_dsan(name: str) -> bool:
    """True for the DSAN family (``dsan_t``, ``dsan_t2``, ``dsan_s`` and tagged names like ``dsan_t.in1k``)."""
    return name.split('.')[0].startswith('dsan')


def _check_name(name: str) -> None:
    if is_dsan(name) and _DSAN_IMPORT_ERROR is not None:
        raise ModelError(f'model {name!r} needs the dsan package, which failed to import ({_DSAN_IMPORT_ERROR}). '
                         'Run `bash scripts/setup_env.sh` (or `pip install --no-build-isolation -e .`) first.')
    if not timm.is_model(name.split('.')[0]):
        dsan_names = ', '.join(timm.list_models('dsan*')) or 'none registered'
        raise ModelError(f'unknown model {name!r}; DSAN models: {dsan_names}; '
                         'any timm model name also works (see timm.list_models())')


def create(
        name: str,
        num_classes: int | None = None,
        pretrained: bool = False,
        checkpoint: str = '',
        use_ema: bool = False,
        require_classifier: bool = False,
        **kwargs: Any,
) -> torch.nn.Module:
    """Create ``name`` with timm, optionally loading weights from ``checkpoint``.

    DSAN checkpoints go through the model file's loader (``dsan.models``): original ``.pth.tar`` files,
    timm CheckpointSaver files and this repository's own checkpoints all load, the DSCN groups of each stage
    are read from the file, and the class count defaults to the checkpoint's classifier. If ``num_classes``
    differs from the checkpoint's, or the file has none (a backbone-only file), the classifier is initialised afresh
    (fine-tuning). Other models use :func:`timm.models.load_checkpoint`.

    Args:
        name: Model name (``dsan_t`` ... or any timm model).
        num_classes: Classifier size (default: the checkpoint's, else the model default).
        pretrained: Load the registered pretrained weights.
        checkpoint: Weights file to start from ('' for none).
        use_ema: Load the EMA weights of a training checkpoint.
        require_classifier: The classifier must come from ``checkpoint`` (evaluation): a file without one, or a
            ``num_classes`` other than its own, is a ModelError instead of a freshly initialised classifier.
        **kwargs: Passed to :func:`timm.create_model` (``drop_path_rate``, ``backend`` ...).

    Raises:
        ModelError: unknown model name, the checkpoint does not fit (message from the loader), or ``pretrained``
            for a DSAN model whose weights cannot be downloaded (the message says where to put them).
        FileNotFoundError: ``checkpoint`` does not exist.
    """
    _check_name(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if not checkpoint:
        if num_classes is not None:
            kwargs['num_classes'] = num_classes
        if not is_dsan(name):
            return timm.create_model(name, pretrained=pretrained, **kwargs)
        from dsan.models import NoPretrainedWeightsError
        try:
            return timm.create_model(name, pretrained=pretrained, **kwargs)
        except NoPretrainedWeightsError as e:  # no download exists: say where the files go, in one line
            raise ModelError(str(e)) from None

    if is_dsan(name):
        from dsan.models import CheckpointError, extract_state_dict, read_checkpoint
        try:
            state_dict = extract_state_dict(read_checkpoint(checkpoint), use_ema=use_ema)
        except CheckpointError as e:
            raise ModelError(str(e)) from e
        ckpt_classes = state_dict['head.weight'].shape[0] if 'head.weight' in state_dict else None
        if require_classifier and ckpt_classes is None:
            raise ModelError(f'{checkpoint} has no classifier (head.weight): a backbone-only file cannot be evaluated')
        if require_classifier and num_classes not in (None, ckpt_classes):
            raise ModelError(f'--num-classes {num_classes} differs from the {ckpt_classes} classes of {checkpoint}: '
                             'the evaluation would score a randomly initialised classifier')
        if num_classes is None:
            num_classes = ckpt_classes or 1000  # a backbone-only file: DSAN's default, ImageNet's 1000
        # A file without a classifier declares 0 classes, so that timm loads it without one (its other keys are
        # still checked: see the DSAN loader) and the model keeps its freshly initialised head.
        overlay = dict(state_dict=state_dict, num_classes=ckpt_classes or 0)
        kwargs['num_classes'] = num_classes
        if ckpt_classes is None:
            _logger.info('%s has no classifier: the model\'s is initialised afresh', checkpoint)
        elif num_classes != ckpt_classes:
            _logger.info('Checkpoint has %d classes, model %d: the classifier is re-initialised',
                         ckpt_classes, num_classes)
        try:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        except CheckpointError as e:
            raise ModelError(f'{checkpoint}: {e}') from e
        _logger.info('Loaded %s weights from %s', 'EMA' if use_ema else 'model', checkpoint)
        return model

    try:
        state_dict = timm.models.load_state_dict(checkpoint, use_ema=use_ema)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ModelError(f'{checkpoint} is not a readable checkpoint: {e}') from e
    model = timm.create_model(name, **kwargs, **({} if num_classes is None else {'num_classes': num_classes}))
    if num_classes is None:  # take the class count from the checkpoint's classifier
        # A model registered outside timm's builders may have no pretrained_cfg.
        head = f"{(getattr(model, 'pretrained_cfg', None) or {}).get('classifier', 'head')}.weight"
        if head in state_dict and state_dict[head].shape[0] != model.num_classes:
            model = timm.create_model(name, num_classes=state_dict[head].shape[0], **kwargs)
    try:
        model.load_state_dict(state_dict)
    except FileNotFoundError:
        raise
    except (RuntimeError, KeyError) as e:
        raise ModelError(f'{checkpoint} does not fit model {name!r}: {e}') from e
    return model
