"""`torch.compile` with the inductor settings a model asks for.

A model may name inductor options it needs through an ``inductor_options`` class attribute (a dict, as `DSAN` does);
:func:`compile_kwargs` merges them into the arguments of a ``torch.compile`` call and :func:`compile_model` compiles
with them. Models without the attribute compile exactly as a plain ``torch.compile`` would, so the classification
tools use these helpers for every model, DSAN or peer.

Why DSAN needs one: inductor's layout optimization gives every 4-D activation that a training graph saves for the
backward the channels-last stride order *of an (N, C, H, W) tensor* once a convolution is upstream. DSAN's DSCN
operators take and save (N, H, W, C) tensors (their inputs and offsets), which that rule lays out with H innermost:
inductor then writes each of them twice around every DSCN call (once for the operator, once transposed as the saved
activation) and copies them back in the backward. With ``layout_optimization=False`` the graph keeps the strides the
model produced; DSAN already runs its convolutions channels-last, which is what the optimization would arrange.
"""
from typing import Any

import torch
from torch import nn

__all__ = ['compile_kwargs', 'compile_model', 'model_inductor_options']


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel / DataParallel (.module), an already compiled module (._orig_mod) and timm's
    # features_only wrapper (FeatureGetterNet, .model), until a module names options or nothing is left to unwrap.
    while isinstance(model, nn.Module) and getattr(model, 'inductor_options', None) is None:
        for name in ('module', '_orig_mod', 'model'):
            inner = getattr(model, name, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            return model
    return model


def model_inductor_options(model: Any) -> dict[str, Any]:
    """The inductor options `model` asks for (its ``inductor_options`` attribute; wrappers are looked through).

    Returns:
        A new dict; empty for a model (or function) that names none.
    """
    options = getattr(_unwrap(model), 'inductor_options', None)
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(f'{type(_unwrap(model)).__name__}.inductor_options must be a dict; got '
                        f'{type(options).__name__}')
    return dict(options)


def compile_kwargs(model: Any, **kwargs: Any) -> dict[str, Any]:
    """Keyword arguments for ``torch.compile(model, ...)`` with the model's inductor options merged in.

    Args:
        model: What is compiled (a module, possibly wrapped, or a function), or the module class whose options apply
            (as for an mm model with a DSAN backbone).
        **kwargs: ``torch.compile`` keyword arguments (``backend``, ``mode``, ``options``, ``dynamic``, ...).

    Returns:
        `kwargs`, unchanged unless the backend is inductor (the default) and the model names options. Then
        ``options`` holds the model's options, overridden by those passed; as ``torch.compile`` takes either
        ``mode`` or ``options``, a ``mode`` is turned into its options (``torch._inductor.list_mode_options``), which
        is what inductor does with it.
    """
    backend = kwargs.get('backend', 'inductor')
    own = model_inductor_options(model) if backend == 'inductor' else {}
    if not own:
        return dict(kwargs)
    kwargs = dict(kwargs)
    mode = kwargs.pop('mode', None)
    options = dict(torch._inductor.list_mode_options(mode, kwargs.get('dynamic'))) if mode is not None else {}
    options.update(own)
    options.update(kwargs.pop('options', None) or {})
    kwargs['options'] = options
    return kwargs


def compile_model(model: Any, **kwargs: Any) -> Any:
    """``torch.compile(model, **kwargs)`` with the model's inductor options (see :func:`compile_kwargs`)."""
    return torch.compile(model, **compile_kwargs(model, **kwargs))
