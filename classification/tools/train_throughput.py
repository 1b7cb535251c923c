#!/usr/bin/env python3
"""Training throughput (img/s) of several models in one run: forward, backward and AdamW step on random data.

Measures what ``train.py`` spends per step on the model (no data loading), same batch, resolution, threads and
optimizer for every model, models interleaved round by round so that a busy machine slows all of them alike::

    python classification/tools/train_throughput.py dsan_t convnext_atto resnet18 --img-size 224 -b 32
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence

import torch

_CLS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _CLS not in sys.path:
    sys.path.insert(0, _CLS)

import model_factory  # noqa: E402


def _step(model, opt, x, y, loss_fn) -> None:
    opt.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    opt.step()


def measure(models: Sequence[str], img_size: int = 224, batch_size: int = 32, warmup: int = 2, steps: int = 5,
            rounds: int = 3, device: str = 'cpu', model_kwargs: dict[str, dict] | None = None) -> list[dict]:
    """Return one dict per model: ``model``, ``params_m``, ``img_per_sec`` (median over rounds), ``per_round``.

    Args:
        models: Model names.
        img_size: Square input size.
        batch_size: Images per step.
        warmup: Untimed steps per model before the first round.
        steps: Timed steps per model per round.
        rounds: Rounds; each round times every model once, in turn.
        device: Device.
        model_kwargs: Extra ``create_model`` kwargs per model name.
    """
    dev = torch.device(device)
    state = {}
    for name in models:
        m = model_factory.create(name, num_classes=1000, **(model_kwargs or {}).get(name, {})).to(dev).train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.05)
        x = torch.randn(batch_size, 3, img_size, img_size, device=dev)
        y = torch.randint(0, 1000, (batch_size,), device=dev)
        for _ in range(warmup):
            _step(m, opt, x, y, torch.nn.functional.cross_entropy)
        state[name] = (m, opt, x, y, [])
    for _ in range(rounds):
        for m, opt, x, y, times in state.values():
            if dev.type == 'cuda':
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(steps):
                _step(m, opt, x, y, torch.nn.functional.cross_entropy)
            if dev.type == 'cuda':
                torch.cuda.synchronize()
            times.append(batch_size * steps / (time.perf_counter() - t))
    return [dict(model=name, params_m=sum(p.numel() for p in m.parameters()) / 1e6,
                 img_per_sec=statistics.median(times), per_round=times)
            for name, (m, _, _, _, times) in state.items()]


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Command-line entry point; prints a Markdown table."""
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('models', nargs='*', default=['dsan_t', 'convnext_atto', 'resnet18'])
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('-b', '--batch-size', type=int, default=32)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--steps', type=int, default=5)
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=0, help='torch threads (default: torch default)')
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = measure(args.models, args.img_size, args.batch_size, args.warmup, args.steps, args.rounds, args.device)
    print(f'Training throughput, {args.device}, {torch.get_num_threads()} threads, batch {args.batch_size}, '
          f'{args.img_size}x{args.img_size}, AdamW (median of {args.rounds} rounds of {args.steps} steps)')
    print('| model | params (M) | train img/s | per round |')
    print('|---|---|---|---|')
    for r in rows:
        print(f"| {r['model']} | {r['params_m']:.2f} | {r['img_per_sec']:.1f} | "
              f"{' / '.join(f'{v:.1f}' for v in r['per_round'])} |")
    return rows


if __name__ == '__main__':
    main()
