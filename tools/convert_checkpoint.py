"""Convert a DSAN checkpoint of any supported format into a clean state_dict.

Reads timm CheckpointSaver files (`state_dict`, optional `state_dict_ema`), files with `model`, mm
checkpoints (the `backbone.` keys of a segmentor or detector) and plain state_dicts (with or without a `module.`
prefix), checks them against the model (groups read from the file), and writes a plain state_dict: `.safetensors`
when the output name ends so, a torch file otherwise. `--encoder` drops the classifier, giving the backbone-only
files the segmentation and detection configs load (`init_cfg=dict(type='Pretrained',
checkpoint='pretrained/dsan_{t,s}_encoder.pth')`).

Examples:
    python tools/convert_checkpoint.py dsan_t.pth.tar pretrained/dsan_t.safetensors --model dsan_t
    python tools/convert_checkpoint.py dsan_t.pth.tar pretrained/dsan_t_encoder.pth --model dsan_t --encoder
    python tools/convert_checkpoint.py last.pth.tar dsan_s_ema.pth --model dsan_s --ema
"""
import argparse
import logging
import os
import sys
from pathlib import Path

import timm
import torch

try:
    import dsan.models  # noqa: F401  (registers the DSAN models with timm)
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import dsan.models  # noqa: F401

from dsan.models import CheckpointError, checkpoint_filter_fn, extract_state_dict, infer_groups, read_checkpoint

_logger = logging.getLogger('convert_checkpoint')


def convert(
        src: str | Path,
        dst: str | Path,
        model_name: str = 'dsan_t',
        use_ema: bool = False,
        encoder: bool = False,
        weights_only: bool = True,
) -> dict[str, torch.Tensor]:
    """Convert `src` into a clean state_dict written to `dst`.

    Args:
        src: Input checkpoint (any supported format).
        dst: Output file; `.safetensors` selects safetensors, anything else a torch file.
        model_name: Architecture the weights are checked against (`dsan_t`, `dsan_t2`, `dsan_s`).
        use_ema: Take the EMA weights of a training checkpoint.
        encoder: Drop the classifier (`head.*`) for the segmentation/detection backbones.
        weights_only: Read `src` with torch's restricted unpickler (see `read_checkpoint`).

    Returns:
        The state_dict written.

    Raises:
        CheckpointError: `src` is not a checkpoint or does not fit `model_name`.
    """
    state_dict = extract_state_dict(read_checkpoint(src, weights_only=weights_only), use_ema=use_ema)
    # The models only check names and shapes here (no forward): the pure-PyTorch DSCN needs nothing built.
    probe = timm.create_model(model_name, num_classes=0 if encoder else 1000, backend='pytorch')
    groups = infer_groups(state_dict, probe.kernel_sizes)
    num_classes = 0 if encoder or 'head.weight' not in state_dict else state_dict['head.weight'].shape[0]
    model = timm.create_model(model_name, groups=groups, num_classes=num_classes, backend='pytorch')
    # Validates names and shapes (raises listing what is wrong); drops the head for an encoder.
    state_dict = checkpoint_filter_fn(state_dict, model)
    state_dict = {k: v.detach().contiguous().clone() for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True)

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f'.{dst.name}.tmp-{os.getpid()}')  # written whole, then renamed: never a partial file
    try:
        if dst.suffix == '.safetensors':
            from safetensors.torch import save_file
            save_file(state_dict, str(tmp), metadata={'arch': model_name, 'groups': ','.join(map(str, groups))})
        else:
            torch.save(state_dict, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    n_params = sum(p.numel() for p in model.parameters())
    _logger.info('%s -> %s: %s, groups %s, %d tensors, %s params%s', src, dst, model_name, groups, len(state_dict),
                 f'{n_params:,}', ' (encoder, no head)' if encoder else '')
    return state_dict


def dst_problem(dst: str | Path) -> str | None:
    """Why `convert` could not write `dst`, or None; checked before the (slow) conversion.

    A missing folder is fine (`convert` creates it) as long as no part of its path is a file.
    """
    dst = Path(dst)
    if dst.is_dir() or not dst.name:
        return f'dst must be a file name, got the folder {str(dst)!r}'
    folder = dst.parent
    while not folder.exists():  # the first part of the path that exists must be a folder
        folder = folder.parent
    if not folder.is_dir():
        return f'dst must be under a folder, but {str(folder)!r} is a file (dst {str(dst)!r})'
    if not os.access(folder, os.W_OK | os.X_OK):
        return f'dst must be in a writable folder, but {str(folder)!r} is not writable (dst {str(dst)!r})'
    return None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src', help='input checkpoint')
    parser.add_argument('dst', help='output file (.safetensors or a torch file such as .pth)')
    parser.add_argument('--model', default='dsan_t', help='architecture: dsan_t, dsan_t2 or dsan_s')
    parser.add_argument('--ema', '--use-ema', action='store_true',
                        help='take the EMA weights (state_dict_ema / model_ema)')
    parser.add_argument('--encoder', action='store_true', help='drop the classifier (backbone-only file)')
    parser.add_argument('--unsafe-load', action='store_true',
                        help='read the input with the full unpickler (only for files you trust)')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Command-line entry point; returns the exit code (2 when the input cannot be converted, with the reason)."""
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    args = parse_args(argv)
    if not timm.is_model(args.model) or not args.model.startswith('dsan'):
        print(f'convert_checkpoint.py: error: --model must be one of {timm.list_models("dsan*")}; got {args.model!r}',
              file=sys.stderr)
        return 2
    problem = dst_problem(args.dst)
    if problem:
        print(f'convert_checkpoint.py: error: {problem}', file=sys.stderr)
        return 2
    try:
        convert(args.src, args.dst, args.model, use_ema=args.ema, encoder=args.encoder,
                weights_only=not args.unsafe_load)
    except (CheckpointError, OSError) as e:  # OSError: src unreadable, or dst unwritable (e.g. the disk is full)
        print(f'convert_checkpoint.py: error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
