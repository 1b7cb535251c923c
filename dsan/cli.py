"""Command-line helpers shared by the classification, segmentation and detection tools."""
import argparse
import os
import sys
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


def add_renamed_options(parser: argparse.ArgumentParser, renamed: dict[str, str]) -> None:
    """Refuse the original's spellings in `renamed` (old flag -> what to use instead) with that hint: argparse said
    "unrecognized arguments", or took a prefix of another flag (`--mode` for `--modes`).

    Only the exact old flags (``--flag`` or ``--flag=value``) are caught, before argparse parses: they are not
    argparse options, so they neither show in ``--help`` nor make an abbreviation of a real flag ambiguous.
    """
    parse_known_args = parser.parse_known_args

    def checked(args=None, namespace=None):
        argv = list(sys.argv[1:] if args is None else args)
        for token in argv[:argv.index('--')] if '--' in argv else argv:
            flag = token.split('=', 1)[0] if isinstance(token, str) else token
            if flag in renamed:
                parser.error(f'{flag} is a flag of the original scripts; here: {renamed[flag]}')
        return parse_known_args(argv, namespace)

    parser.parse_known_args = checked
