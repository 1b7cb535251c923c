"""CPU/GPU speed of a DSAN segmentor next to mmseg's SegNeXt MSCAN-T with the same LightHamHead, in one process.

Both models are built from their configs (random weights), timed interleaved round by round so that a noisy machine
affects both alike, and reported as the median over rounds: whole-image inference per image and one training
iteration (forward, backward, AdamW step). The figures to read are the ratios, and the ratio per FLOP
(torchprofile MACs of whole-image inference, DSCN op counted 0 as the paper does).

Examples:
    python segmentation/tools/get_speed.py                              # 512x512, inference batch 1, train batch 2
    python segmentation/tools/get_speed.py --shape 512 1024 --rounds 5 --threads 2
    python segmentation/tools/get_speed.py --device cuda --train-batch 8
"""
import argparse
from pathlib import Path

import torch

from dsan.cli import device_type
from dsan.flops import count_macs, count_params
from dsan.mm.speed import interleaved_median
from dsan.mm.tools import build_model
from dsan.mm.utils import whole_inference

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'
BASELINE = 'mmseg::segnext/segnext_mscan-t_1xb16-adamw-160k_ade20k-512x512.py'


def _train_step(model, optimizer, x, samples) -> None:
    loss, _ = model.parse_losses(model(x, samples, mode='loss'))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _samples(n: int, shape: tuple[int, int], num_classes: int, device: str) -> list:
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    out = []
    for _ in range(n):
        s = SegDataSample()
        s.gt_sem_seg = PixelData(data=torch.randint(0, num_classes, (1, *shape), device=device))
        s.set_metainfo(dict(img_shape=shape, ori_shape=shape, pad_shape=shape))
        out.append(s)
    return out


def benchmark(configs: dict[str, str], shape: tuple[int, int], batch: int, train_batch: int, rounds: int,
              warmup: int, device: str) -> list[dict]:
    """Median ms per image (inference) and s per training iteration of each model, timed interleaved."""
    rows, steps = {}, {}
    x = torch.randn(batch, 3, *shape, device=device)
    xt = torch.randn(train_batch, 3, *shape, device=device)
    for name, cfg in configs.items():
        model = build_model(cfg, 'cpu').eval()
        macs, _ = count_macs(model, shape, forward=whole_inference)
        model.to(device)
        rows[name] = dict(model=name, params=count_params(model), gflops=macs / 1e9)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        samples = _samples(train_batch, shape, model.decode_head.num_classes, device)

        def infer(model=model):
            model.eval()
            with torch.no_grad():
                whole_inference(model, x)

        def train(model=model, optimizer=optimizer, samples=samples):
            model.train()
            _train_step(model, optimizer, xt, samples)
        steps[f'{name}/infer'], steps[f'{name}/train'] = infer, train
    medians = interleaved_median(steps, rounds, warmup, device)
    for name, row in rows.items():
        row['infer_ms'] = medians[f'{name}/infer'] / batch * 1e3
        row['train_s'] = medians[f'{name}/train']
    return list(rows.values())


def format_rows(rows: list[dict], shape, batch, train_batch, device) -> str:
    base = rows[-1]
    lines = [f'{device}, {torch.get_num_threads()} threads, input {shape[0]}x{shape[1]}; inference batch {batch} '
             f'(ms per image), training iteration batch {train_batch} (s); ratios vs {base["model"]} '
             '(> 1: faster); per-FLOP = speed ratio x FLOP ratio.',
             f'{"model":<16} {"params":>11} {"GFLOPs":>7} {"infer ms/img":>13} {"train s/it":>11} '
             f'{"infer x":>8} {"train x":>8} {"per-FLOP x":>10}']
    for r in rows:
        speed = base['infer_ms'] / r['infer_ms']
        lines.append(f'{r["model"]:<16} {r["params"]:>11,} {r["gflops"]:>7.2f} {r["infer_ms"]:>13.1f} '
                     f'{r["train_s"]:>11.3f} {speed:>8.2f} {base["train_s"] / r["train_s"]:>8.2f} '
                     f'{speed * r["gflops"] / base["gflops"]:>10.2f}')
    return '\n'.join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--config', default=str(CONFIGS / 'ham/ham_dsan_t_ade20k_160k.py'), help='DSAN config')
    parser.add_argument('--baseline', default=BASELINE, help='config of the model to compare with')
    parser.add_argument('--shape', type=int, nargs='+', default=[512], help='input H [W]')
    parser.add_argument('--batch', type=int, default=1, help='inference batch')
    parser.add_argument('--train-batch', type=int, default=2, help='training batch')
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s choice)')
    parser.add_argument('--device', type=device_type, default='cpu')
    args = parser.parse_args(argv)
    if len(args.shape) not in (1, 2):
        raise SystemExit(f'--shape takes H or H W, got {args.shape}')
    for name in ('batch', 'train_batch', 'rounds'):
        if getattr(args, name) < 1:
            raise SystemExit(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(args.shape) * (2 // len(args.shape))
    configs = {Path(args.config).stem.split('_ade20k')[0]: args.config,
               Path(args.baseline.split('::')[-1]).stem.split('_1xb')[0]: args.baseline}
    rows = benchmark(configs, shape, args.batch, args.train_batch, args.rounds, args.warmup, args.device)
    text = format_rows(rows, shape, args.batch, args.train_batch, args.device)
    print(text)
    return text


if __name__ == '__main__':
    main()  # its return value is for callers; the exit status is 0 (errors exit through argparse or raise)
