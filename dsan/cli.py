"""Command-line helpers shared by the classification, segmentation and detection tools."""
import argparse

import torch

__all__ = ['device_problem', 'device_type']


def device_problem(device: str) -> str | None:
    """Why `device` (a ``--device`` value) cannot be used here, or None.

    Checked before any work starts: without it a tool asked for ``cuda`` on a machine without a GPU ran until its
    first tensor moved and stopped in a traceback from the CUDA runtime.
    """
    try:
        dev = torch.device(device)
    except RuntimeError:
        return f"expected 'cpu' or 'cuda[:N]', got {device!r}"
    if dev.type not in ('cpu', 'cuda'):
        return f"expected 'cpu' or 'cuda[:N]', got {device!r}"
    if dev.type == 'cuda':
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return f'got {device!r}, but no CUDA GPU is available'
        if dev.index is not None and dev.index >= count:
            return f'got {device!r}, but there are {count} CUDA GPUs (cuda:0 to cuda:{count - 1})'
    return None


def device_type(value: str) -> str:
    """An argparse ``type`` for ``--device``: the value unchanged if usable ('' too, for tools where it means
    "CUDA when available"), else a usage error naming the argument (``argument --device: got 'cuda', but no CUDA GPU
    is available``)."""
    problem = device_problem(value) if value else None
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value
