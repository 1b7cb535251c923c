"""Whole-model parameters and FLOPs of DSAN segmentors, counted the paper's way, next to the paper's rows.

FLOPs are torchprofile's ``profile_macs`` of one image through mmseg's whole-image inference (`encode_decode`:
backbone, decode head and the bilinear resize of the logits to the input size), with the DSCN custom op counted 0,
as the paper did (see `dsan.flops`); parameters are those of the whole segmentor.

Examples:
    python segmentation/tools/get_flops.py                      # the paper's four rows
    python segmentation/tools/get_flops.py segmentation/configs/upernet/upernet_dsan_t_ade20k_160k.py --shape 512
"""
import argparse
import logging
from pathlib import Path

from mmengine.config import DictAction

from dsan.cli import add_renamed_options
from dsan.flops import count_macs, count_params
from dsan.mm.tools import build_model
from dsan.mm.utils import whole_inference

_logger = logging.getLogger('get_flops')
CONFIGS = Path(__file__).resolve().parents[1] / 'configs'

# config, input (H, W), published params (M), published GFLOPs, published metric
PAPER_ROWS = [
    ('ham/ham_dsan_t_ade20k_160k.py', (512, 512), 4.6, 6.8, 'ADE20K mIoU(MS) 43.5'),
    ('ham/ham_dsan_s_ade20k_160k.py', (512, 512), 20.7, 23.0, 'ADE20K mIoU(MS) 48.8'),
    ('ham/ham_dsan_t_cityscapes_80k.py', (1024, 2048), 4.6, 52.6, 'Cityscapes mIoU 80.0'),
    ('ham/ham_dsan_s_cityscapes_80k.py', (1024, 2048), 20.7, 181.1, 'Cityscapes mIoU 81.4'),
]


def measure(config: str | Path, shape: tuple[int, int], cfg_options: dict | None = None) -> dict:
    """Params and MACs (DSCN op counted 0; and with its own multiply-adds) of `config` at `shape` = (H, W), after
    `cfg_options` (``--cfg-options``)."""
    model = build_model(str(config), cfg_options=cfg_options).eval()
    macs, macs_with_dscn = count_macs(model, shape, forward=whole_inference)
    return dict(config=Path(config).stem, shape=tuple(shape), params=count_params(model), macs=macs,
                macs_with_dscn=macs_with_dscn)


def format_rows(rows: list[dict], published: list[tuple] | None = None) -> str:
    head = f'{"config":<28} {"input":>10} {"params":>12} {"GFLOPs":>8} {"+DSCN":>8}'
    if published:
        head += f' | {"paper params":>12} {"paper GFLOPs":>12}  metric'
    lines = ['torchprofile MACs / 1e9 of whole-image inference (backbone, head, logits resized to the input), DSCN '
             'op counted 0 (as the paper); "+DSCN" adds the op\'s own multiply-adds.', head]
    for i, r in enumerate(rows):
        line = (f'{r["config"]:<28} {r["shape"][0]:>4}x{r["shape"][1]:<5} {r["params"]:>12,} '
                f'{r["macs"] / 1e9:>8.2f} {r["macs_with_dscn"] / 1e9:>8.2f}')
        if published:
            _, _, p, f, metric = published[i]
            line += f' | {p:>11.1f}M {f:>11.1f}G  {metric}'
        lines.append(line)
    return '\n'.join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('configs', nargs='*', help='config files (default: the paper\'s four rows)')
    parser.add_argument('--shape', type=int, nargs='+', default=[512], help='input H [W] for the given configs')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                        help='override config entries before the model is built, key=value pairs, e.g. '
                             'model.decode_head.channels=256')
    add_renamed_options(parser, {'--gpu_id': 'nothing: FLOPs are counted on the CPU'})
    return parser.parse_args(argv)


def main(argv=None) -> str:
    logging.basicConfig(level=logging.WARNING, format='%(message)s')
    args = parse_args(argv)
    if args.configs:
        if len(args.shape) not in (1, 2):
            raise SystemExit(f'--shape takes H or H W, got {args.shape}')
        shape = tuple(args.shape) * (2 // len(args.shape))
        text = format_rows([measure(c, shape, args.cfg_options) for c in args.configs])
    else:
        text = format_rows([measure(CONFIGS / c, s, args.cfg_options) for c, s, *_ in PAPER_ROWS], PAPER_ROWS)
    print(text)
    return text


if __name__ == '__main__':
    main()  # its return value is for callers; the exit status is 0 (errors exit through argparse or raise)
