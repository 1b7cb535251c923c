"""Parameters and FLOPs of the DSAN classification models, counted the way the paper did.

The paper reports torchprofile's ``profile_macs`` as "GFLOPs", and torchprofile does not know the DSCN
custom op, so the op itself counts 0. This tool prints that figure and, clearly labelled, the figure with
the op's own multiply-adds (2 per tap and output element: N * Ho * Wo * C * K' * 2) included.

Examples:
    python classification/tools/get_flops.py                       # dsan_t, dsan_t2, dsan_s at 224
    python classification/tools/get_flops.py dsan_s --img-size 512
    python classification/tools/get_flops.py dsan_t --checkpoint dsan_t.pth.tar   # groups from the file
    python classification/tools/get_flops.py --paper-table         # the paper's table next to ours
"""
import argparse
import functools
import logging
import sys
from pathlib import Path

import timm
import torch.nn as nn

try:
    import dsan.models  # noqa: F401  (registers the DSAN models with timm)
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import dsan.models  # noqa: F401

import ops_dscn  # noqa: F401  (tests patch ops_dscn.available_backends through this name)
from dsan.flops import DSCN_OP, count_macs, count_params  # noqa: F401  (re-exported for the tests and users)
from dsan.models.dsan import CheckpointError, extract_state_dict, infer_groups, read_checkpoint

_logger = logging.getLogger('get_flops')

# Published numbers (paper / original README) and the figures this repository is expected to measure.
PAPER_TABLE = [
    # name, published params (M), published GFLOPs, published top-1, expected params, expected GFLOPs
    ('dsan_t', 4.6, 1.0, 76.4, 4_484_706, 0.941),
    ('dsan_t2', 6.0, 1.3, 77.6, 6_037_440, 1.290),
    ('dsan_s', 19.9, 3.2, 82.3, 19_880_248, 3.203),
]
DSAN_T_README_GROUPS = (4, 8, 16, 16)  # the grouping behind the README's 4.6 M / 1.0 G DSAN-T row
DSAN_OUTPUT_STRIDE = 32  # the input to DSAN's last stage is 1/32 of the image
PAPER_DOWNSTREAM = [
    # task, model, published params, published FLOPs, metric
    ('ADE20K 512x512, LightHamHead 160k', 'DSAN-T', '4.6 M', '6.8 G', 'mIoU(MS) 43.5'),
    ('ADE20K 512x512, LightHamHead 160k', 'DSAN-S', '20.7 M', '23.0 G', 'mIoU(MS) 48.8'),
    ('Cityscapes 2048x1024, 80k', 'DSAN-T', '4.6 M', '52.6 G', 'mIoU 80.0'),
    ('Cityscapes 2048x1024, 80k', 'DSAN-S', '20.7 M', '181.1 G', 'mIoU 81.4'),
    ('COCO Mask R-CNN FPN 1x', 'DSAN-T', '24.3 M', '188.6 G', 'box AP 42.6 / mask AP 38.9'),
    ('COCO Mask R-CNN FPN 1x', 'DSAN-S', '39.5 M', '235.4 G', 'box AP 46.1 / mask AP 41.5'),
]


def _is_dsan(name: str) -> bool:
    return name.startswith('dsan')


def build(name: str, checkpoint: str | None = None, groups: tuple[int, ...] | None = None) -> nn.Module:
    """Create `name` in eval mode; the DSCN groups come from `groups`, else `checkpoint`, else the default."""
    kwargs = {}
    if groups:
        kwargs['groups'] = tuple(groups)
    elif checkpoint:
        state_dict = extract_state_dict(read_checkpoint(checkpoint))
        kwargs['groups'] = infer_groups(state_dict, timm.create_model(name).kernel_sizes)
    return timm.create_model(name, **kwargs).eval()


@functools.cache
def measure(
        name: str,
        img_size: tuple[int, int] = (224, 224),
        checkpoint: str | None = None,
        groups: tuple[int, ...] | None = None,
) -> dict:
    """Params, MACs with the op counted 0, and MACs with the op's own multiply-adds (cached)."""
    model = build(name, checkpoint, groups)
    macs, macs_with_dscn = count_macs(model, img_size)
    # Only DSAN has DSCN groups; other timm models get None (a '-' in the table).
    model_groups = list(model.groups) if _is_dsan(name) else None
    return dict(model=name, groups=model_groups, params=count_params(model), macs=macs, macs_with_dscn=macs_with_dscn)


def format_table(rows: list[dict], img_size) -> str:
    lines = [
        f'Input 3x{img_size[0]}x{img_size[1]}. GFLOPs = torchprofile MACs / 1e9 with the DSCN op counted 0 '
        '(as the paper); "+DSCN" adds the op\'s own multiply-adds (2 per tap and output element).',
        f'{"model":<10} {"groups":<16} {"params":>12} {"GFLOPs":>8} {"GFLOPs+DSCN":>12}',
    ]
    for r in rows:
        groups = '-' if r['groups'] is None else str(r['groups'])
        lines.append(f'{r["model"]:<10} {groups:<16} {r["params"]:>12,} {r["macs"] / 1e9:>8.3f} '
                     f'{r["macs_with_dscn"] / 1e9:>12.3f}')
    return '\n'.join(lines)


def paper_table() -> str:
    """The paper's tables next to the figures measured here (ImageNet rows measured, others listed)."""
    lines = ['ImageNet-1K, 224x224: published vs measured here (torchprofile, DSCN op counted 0)',
             f'{"model":<22} {"pub. params":>11} {"pub. GFLOPs":>11} {"pub. top-1":>10} | '
             f'{"our params":>12} {"our GFLOPs":>10} {"+DSCN":>7}']
    rows = [(name, pub_p, pub_f, top1, measure(name)) for name, pub_p, pub_f, top1, _, _ in PAPER_TABLE]
    rows.insert(1, ('dsan_t', None, None, None, measure('dsan_t', groups=DSAN_T_README_GROUPS)))
    for name, pub_p, pub_f, top1, r in rows:
        label = f'{name} g={"/".join(map(str, r["groups"]))}'
        pub = (f'{pub_p:>10.1f}M {pub_f:>10.1f}G {top1:>10.1f}' if pub_p is not None else f'{"":>11} {"":>11} {"":>10}')
        lines.append(f'{label:<22} {pub} | {r["params"]:>12,} {r["macs"] / 1e9:>9.3f}G '
                     f'{r["macs_with_dscn"] / 1e9:>6.3f}G')
    lines += [
        '',
        "DSAN-T's published 4.6 M / 1.0 G match groups [4, 8, 16, 16] (second row); the official code and every",
        'segmentation/detection table use [1, 4, 8, 8] (first row). The grouping of the released DSAN-T',
        'classification checkpoint is read from the file when it is loaded.',
        '',
        'Segmentation / detection, as published (our measured figures: segmentation/tools/get_flops.py and',
        'detection/tools/get_flops.py, which need the OpenMMLab stack):',
        f'{"task":<36} {"model":<7} {"params":>8} {"FLOPs":>8}  metric',
    ]
    for task, model, p, f, metric in PAPER_DOWNSTREAM:
        lines.append(f'{task:<36} {model:<7} {p:>8} {f:>8}  {metric}')
    return '\n'.join(lines)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('models', nargs='*', default=[r[0] for r in PAPER_TABLE], help='timm model names')
    parser.add_argument('--img-size', '--shape', type=int, nargs='+', default=[224], help='H [W] of the input')
    parser.add_argument('--checkpoint', default=None, help='read the DSCN groups from this checkpoint (DSAN models)')
    parser.add_argument('--groups', type=int, nargs=4, default=None,
                        help='override the DSCN groups per stage (DSAN models)')
    parser.add_argument('--paper-table', action='store_true', help='print the paper table next to ours')
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the arguments; bad input is a one-line usage error (exit status 2).

    Sets `args.img_size` to (H, W).
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    return args


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in args.models:
        if not timm.is_model(name):
            parser.error(f'argument models: unknown timm model {name!r}')
    if len(args.img_size) not in (1, 2):
        parser.error(f'argument --img-size: takes H or H W, got {len(args.img_size)} values {args.img_size}')
    args.img_size = tuple(args.img_size) * (2 // len(args.img_size))
    # DSAN downsamples by 32: below that its last stages see a 1x1 map made of padding, a count that means nothing.
    least = DSAN_OUTPUT_STRIDE if any(_is_dsan(n) for n in args.models) else 1
    if min(args.img_size) < least:
        parser.error(f'argument --img-size: must be >= {least}' + (' (DSAN downsamples by 32)' if least > 1 else '')
                     + f', got {" ".join(map(str, args.img_size))}')
    others = [n for n in args.models if not _is_dsan(n)]
    for flag, value in (('--checkpoint', args.checkpoint), ('--groups', args.groups)):
        if value is not None and others:
            parser.error(f'argument {flag}: applies to DSAN models only, got {", ".join(others)}')
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        parser.error(f'argument --checkpoint: expected an existing file, got {args.checkpoint!r}')
    if args.groups is not None:
        for name in args.models:
            dims = timm.create_model(name, backend='pytorch').embed_dims
            if any(g < 1 or c % g for g, c in zip(args.groups, dims)):
                parser.error(f'argument --groups: each must be >= 1 and divide its stage\'s channels {dims} of '
                             f'{name}, got {" ".join(map(str, args.groups))}')


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.paper_table:
        print(paper_table())
        return
    _check_args(parser, args)
    groups = tuple(args.groups) if args.groups else None
    rows = []
    for name in args.models:
        try:
            rows.append(measure(name, args.img_size, args.checkpoint, groups))
        except CheckpointError as e:
            parser.error(f'argument --checkpoint: {e}'.splitlines()[0])
        except (RuntimeError, AssertionError) as e:  # e.g. a ViT built for one input size only
            parser.error(f'argument --img-size: {name} cannot run at {args.img_size[0]}x{args.img_size[1]}: '
                         + (str(e).splitlines() or [type(e).__name__])[0])
    print(format_table(rows, args.img_size))


if __name__ == '__main__':
    main()
