"""Command-line helpers shared by the classification, segmentation and detection tools."""
import argparse
import os
from pathlib import Path

import torch

__all__ = ['add_renamed_options', 'device_problem', 'device_type', 'output_file_problem']


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


def output_file_problem(path: str | os.PathLike, create_folders: bool = False) -> str | None:
    """Why a tool could not write its output file `path`, or None; checked before a long run, so that a typo in an
    output path does not throw the run's result away at the end.

    Args:
        path: The file to be written.
        create_folders: The tool creates missing folders (then the nearest existing one must be writable).
    """
    if str(path).endswith(('/', os.sep)):
        return f'expected a file name, got the folder path {str(path)!r}'
    out = Path(path)
    if out.is_dir():
        return f'expected a file name, got the folder {str(out)!r}'
    folder = out.parent if str(out.parent) else Path('.')
    if not create_folders and not folder.exists():
        return f'expected a file in an existing folder, but {str(folder)!r} does not exist'
    while not folder.exists():  # the folders the tool would create
        folder = folder.parent
    if not folder.is_dir():
        return f'{str(folder)!r} is a file, not a folder'
    if not os.access(folder, os.W_OK | os.X_OK):
        return f'expected a file in a writable folder, but {str(folder)!r} is not writable'
    if out.exists() and not os.access(out, os.W_OK):
        return f'{str(out)!r} exists and is not writable'
    return None


class _Renamed(argparse.Action):
    """An option of the original scripts that this one spells differently: a usage error naming the new one."""

    def __init__(self, option_strings, dest, instead: str = '', **kwargs):
        super().__init__(option_strings, argparse.SUPPRESS, nargs='?', help=argparse.SUPPRESS)
        self.instead = instead

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f'{option_string} is a flag of the original scripts; here: {self.instead}')


def add_renamed_options(parser: argparse.ArgumentParser, renamed: dict[str, str]) -> None:
    """Accept the original's spellings in `renamed` (old flag -> what to use instead) only to refuse them with that
    hint: argparse said "unrecognized arguments", or took a prefix of another flag (`--mode` for `--modes`).
    Hidden from ``--help``."""
    for old, instead in renamed.items():
        parser.add_argument(old, action=_Renamed, instead=instead)
