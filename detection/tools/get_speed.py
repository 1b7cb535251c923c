"""Speed of Mask R-CNN DSAN-T next to mmdet's own Mask R-CNN R-50-FPN, in one process.

Both detectors are built from their configs (random weights), and timed interleaved round by round (the median over
rounds): inference of one 1333x800 image (`mode='predict'`: backbone, FPN, RPN with NMS, RoI heads and masks), and
one training iteration at batch 1 (forward, backward, AdamW step) with a few random ground-truth boxes and masks.
The figures to read are the ratios.

Examples:
    python detection/tools/get_speed.py                               # 800x1333, CPU
    python detection/tools/get_speed.py --rounds 5 --device cuda --train-batch 2
"""
import argparse
from pathlib import Path

import numpy as np
import torch

from dsan.cli import device_type
from dsan.flops import count_params
from dsan.mm.speed import interleaved_median
from dsan.mm.tools import build_model

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'
BASELINE = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'


def _samples(n: int, shape: tuple[int, int], device: str, num_boxes: int = 5, seed: int = 0) -> list:
    """`n` data samples of the padded `shape`, each with `num_boxes` random boxes, labels and masks."""
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    gen = torch.Generator().manual_seed(seed)
    h, w = shape
    out = []
    for _ in range(n):
        xy = torch.rand(num_boxes, 2, generator=gen) * torch.tensor([w * 0.7, h * 0.7])
        wh = (torch.rand(num_boxes, 2, generator=gen) * 0.25 + 0.05) * torch.tensor([w, h])
        boxes = torch.cat([xy, xy + wh], 1)
        masks = np.zeros((num_boxes, h, w), np.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.round().int().tolist()):
            masks[i, y0:y1, x0:x1] = 1
        s = DetDataSample(metainfo=dict(img_shape=shape, ori_shape=shape, pad_shape=shape, batch_input_shape=shape,
                                        scale_factor=(1.0, 1.0)))
        s.gt_instances = InstanceData(bboxes=boxes.to(device), labels=torch.randint(0, 80, (num_boxes,),
                                                                                  generator=gen).to(device),
                                      masks=BitmapMasks(masks, h, w))
        out.append(s)
    return out


def benchmark(configs: dict[str, str], shape: tuple[int, int], train_batch: int, rounds: int, warmup: int,
              device: str) -> list[dict]:
    """Median s per image (inference) and per training iteration of each detector, timed interleaved."""
    # Inputs padded to a multiple of 32, as DetDataPreprocessor does (800x1333 -> 800x1344).
    shape = tuple(-(-s // 32) * 32 for s in shape)
    x = torch.randn(1, 3, *shape, device=device)
    xt = torch.randn(train_batch, 3, *shape, device=device)
    rows, steps = {}, {}
    for name, cfg in configs.items():
        model = build_model(cfg, device)
        rows[name] = dict(model=name, params=count_params(model))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        infer_samples = _samples(1, shape, device)
        train_samples = _samples(train_batch, shape, device)

        def infer(model=model, samples=infer_samples):
            model.eval()
            with torch.no_grad():
                model(x, samples, mode='predict')

        def train(model=model, optimizer=optimizer, samples=train_samples):
            model.train()
            loss, _ = model.parse_losses(model(xt, samples, mode='loss'))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        steps[f'{name}/infer'], steps[f'{name}/train'] = infer, train
    medians = interleaved_median(steps, rounds, warmup, device)
    for name, row in rows.items():
        row['infer_s'] = medians[f'{name}/infer']
        row['train_s'] = medians[f'{name}/train']
    return list(rows.values())


def format_rows(rows: list[dict], shape, train_batch, device) -> str:
    base = rows[-1]
    lines = [f'{device}, {torch.get_num_threads()} threads, input {shape[0]}x{shape[1]} (padded to a multiple of 32); '
             f'inference s per image, training iteration at batch {train_batch} (s); ratios vs {base["model"]} '
             '(> 1: faster).',
             f'{"model":<26} {"params":>12} {"infer s/img":>12} {"train s/it":>11} {"infer x":>8} {"train x":>8}']
    for r in rows:
        lines.append(f'{r["model"]:<26} {r["params"]:>12,} {r["infer_s"]:>12.3f} {r["train_s"]:>11.3f} '
                     f'{base["infer_s"] / r["infer_s"]:>8.2f} {base["train_s"] / r["train_s"]:>8.2f}')
    return '\n'.join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--config', default=str(CONFIGS / 'coco/mask_rcnn_dsan_t_fpn_1x.py'), help='DSAN config')
    parser.add_argument('--baseline', default=BASELINE, help='config of the detector to compare with')
    parser.add_argument('--shape', type=int, nargs=2, default=[800, 1333], help='input H W')
    parser.add_argument('--train-batch', type=int, default=1)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--threads', type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument('--device', type=device_type, default='cpu')
    args = parser.parse_args(argv)
    if args.train_batch < 1 or args.rounds < 1:
        parser.error(f'--train-batch and --rounds must be >= 1, got {args.train_batch} and {args.rounds}')
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = {Path(args.config).stem: args.config, Path(args.baseline.split('::')[-1]).stem: args.baseline}
    rows = benchmark(configs, tuple(args.shape), args.train_batch, args.rounds, args.warmup, args.device)
    text = format_rows(rows, tuple(args.shape), args.train_batch, args.device)
    print(text)
    return text


if __name__ == '__main__':
    main()  # its return value is for callers; the exit status is 0 (errors exit through argparse or raise)
