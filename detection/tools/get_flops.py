"""Parameters and FLOPs of DSAN detectors at 800x1280, counted the paper's way, next to the paper's rows.

The original counted torchprofile MACs of mmdet 2.x's `forward_dummy` on one 800x1280 image (the DSCN op counted 0):
backbone, FPN, the RPN head, and the RoI heads on 1000 random proposals (the mask head on the first 100). mmdet 3.x
has no `forward_dummy`; `dummy_forward` below runs the same modules on the same proposals. Single-stage detectors
run backbone, neck and head. RoIAlign (an mmcv op) is not counted by torchprofile, in the original either.

torchprofile counts a convolution as output elements x input channels x kernel, which for the mask head's 2x2
stride-2 transposed convolution is 4x its real multiply-adds (20.6 G instead of 5.1 G over 100 RoIs at 28x28).
The "deconv exact" column counts that layer by its input instead; it is the column that matches the paper's
188.6 / 235.4 G.

The input is padded up to a multiple of `--size-divisor` (32, mmdet's `pad_size_divisor` in these configs), as the
detector sees it at inference: 800x1333 is counted at 800x1344. The original padded only its mmcv count and ran
torchprofile on the unpadded size; `--size-divisor -1` gives that figure.

Examples:
    python detection/tools/get_flops.py                     # Mask R-CNN DSAN-T and DSAN-S next to the paper
    python detection/tools/get_flops.py detection/configs/coco/retinanet_dsan_t_fpn_1x.py --shape 800 1333
"""
import argparse
import math
from math import prod
from pathlib import Path

import torch
from mmengine.config import DictAction
from torchprofile.handlers import HANDLER_MAP

from dsan.cli import add_renamed_options
from dsan.flops import count_macs, count_params
from dsan.mm.tools import build_model

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'

# config, published params (M), published GFLOPs, published metric
PAPER_ROWS = [
    ('coco/mask_rcnn_dsan_t_fpn_1x.py', 24.3, 188.6, 'box AP 42.6, mask AP 38.9'),
    ('coco/mask_rcnn_dsan_s_fpn_1x.py', 39.5, 235.4, 'box AP 46.1, mask AP 41.5'),
]


def dummy_forward(model: torch.nn.Module, x: torch.Tensor, num_proposals: int = 1000):
    """mmdet 2.x's `forward_dummy`: every head of the detector, on `num_proposals` random proposals."""
    from mmengine.structures import InstanceData
    feats = model.extract_feat(x)
    if not hasattr(model, 'roi_head'):  # single stage
        return model.bbox_head(feats)
    rpn_outs = model.rpn_head(feats)
    # Random proposals as the original's (which drew torch.randn(1000, 4)); here valid boxes inside the image,
    # which mmcv's CPU RoIAlign requires. The heads' FLOPs do not depend on where the boxes are.
    gen = torch.Generator().manual_seed(0)
    h, w = x.shape[2:]
    xy = torch.rand(num_proposals, 2, generator=gen) * torch.tensor([w / 2, h / 2])
    wh = torch.rand(num_proposals, 2, generator=gen) * torch.tensor([w / 2, h / 2]) + 1
    proposals = torch.cat([xy, xy + wh], dim=1).to(x.device)
    roi_outs = model.roi_head.forward(feats, [InstanceData(bboxes=proposals)])
    return rpn_outs, roi_outs


class ExactTransposedConv:
    """Context: count transposed convolutions by their real multiply-adds (input elements x out/groups x kernel)."""

    def __enter__(self):
        self._saved = HANDLER_MAP['aten::_convolution']

        def handler(node, _default=self._saved):
            if not node.inputs[6].value:  # aten::_convolution(input, weight, bias, stride, pad, dil, transposed, ...)
                return _default(node)
            weight = node.inputs[1].shape  # (in, out / groups, kh, kw)
            return prod(node.inputs[0].shape) * weight[1] * prod(weight[2:])
        HANDLER_MAP['aten::_convolution'] = handler
        return self

    def __exit__(self, *exc):
        HANDLER_MAP['aten::_convolution'] = self._saved


def measure(config: str | Path, shape: tuple[int, int] = (800, 1280), cfg_options: dict | None = None) -> dict:
    """Params and MACs of `config` at `shape` = (H, W), after `cfg_options` (``--cfg-options``): torchprofile's count
    (DSCN op counted 0), the same with the transposed convolutions counted exactly, and torchprofile's count with
    the DSCN op's own multiply-adds."""
    model = build_model(str(config), cfg_options=cfg_options).eval()
    macs, macs_with_dscn = count_macs(model, shape, forward=dummy_forward)
    with ExactTransposedConv():
        macs_exact, _ = count_macs(model, shape, forward=dummy_forward)
    return dict(config=Path(config).stem, shape=tuple(shape), params=count_params(model), macs=macs,
                macs_exact_deconv=macs_exact, macs_with_dscn=macs_with_dscn)


def format_rows(rows: list[dict], published: list[tuple] | None = None) -> str:
    head = f'{"config":<26} {"input":>10} {"params":>12} {"GFLOPs":>8} {"deconv exact":>12} {"+DSCN":>8}'
    if published:
        head += f' | {"paper params":>12} {"paper GFLOPs":>12}  metric'
    lines = ['torchprofile MACs / 1e9 of the dummy forward (all heads, 1000 proposals), DSCN op counted 0 (as the '
             'paper); "deconv exact": transposed convs by their real MACs; "+DSCN" adds the op\'s own MACs.', head]
    for i, r in enumerate(rows):
        line = (f'{r["config"]:<26} {r["shape"][0]:>4}x{r["shape"][1]:<5} {r["params"]:>12,} '
                f'{r["macs"] / 1e9:>8.2f} {r["macs_exact_deconv"] / 1e9:>12.2f} {r["macs_with_dscn"] / 1e9:>8.2f}')
        if published:
            _, p, f, metric = published[i]
            line += f' | {p:>11.1f}M {f:>11.1f}G  {metric}'
        lines.append(line)
    return '\n'.join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('configs', nargs='*', help="config files (default: the paper's two Mask R-CNN rows)")
    parser.add_argument('--shape', type=int, nargs='+', default=[800, 1280], help='input H [W]')
    parser.add_argument('--size-divisor', type=int, default=32,
                        help='pad the input up to a multiple of this, as the detector does; -1: no padding')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                        help='override config entries before the model is built, key=value pairs, e.g. '
                             'model.neck.out_channels=128')
    add_renamed_options(parser, {'--gpu_id': 'nothing: FLOPs are counted on the CPU'})
    args = parser.parse_args(argv)
    if len(args.shape) not in (1, 2) or min(args.shape) < 1:
        parser.error(f'--shape takes H or H W, positive, got {args.shape}')
    if args.size_divisor == 0 or args.size_divisor < -1:
        parser.error(f'--size-divisor must be positive or -1 (no padding), got {args.size_divisor}')
    shape = tuple(args.shape) * (2 // len(args.shape))
    padded = shape if args.size_divisor == -1 else tuple(math.ceil(s / args.size_divisor) * args.size_divisor
                                                         for s in shape)
    if args.configs:
        text = format_rows([measure(c, padded, args.cfg_options) for c in args.configs])
    else:
        text = format_rows([measure(CONFIGS / c, padded, args.cfg_options) for c, *_ in PAPER_ROWS], PAPER_ROWS)
    if padded != shape:
        text = (f'Input padded to a multiple of {args.size_divisor}: {shape[0]}x{shape[1]} -> '
                f'{padded[0]}x{padded[1]}\n{text}')
    print(text)
    return text


if __name__ == '__main__':
    main()  # its return value is for callers; the exit status is 0 (errors exit through argparse or raise)
