"""Interleaved timing for the speed tools of segmentation/ and detection/.

Each round runs every model's step once, one after the other, so that a noisy machine slows all of them alike; the
figure of a step is its median over the rounds after the warm-up ones. Read the ratios between models of one run.
"""
import statistics
import time
from collections.abc import Callable

import torch

__all__ = ['interleaved_median', 'synchronize']


def synchronize(device: str | torch.device) -> None:
    """Wait for queued GPU work on `device` (no-op on the CPU)."""
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


def interleaved_median(steps: dict[str, Callable[[], object]], rounds: int, warmup: int,
                       device: str | torch.device = 'cpu') -> dict[str, float]:
    """Median seconds of each step over `rounds` interleaved rounds, after `warmup` untimed ones.

    Raises:
        ValueError: `rounds` < 1 or `warmup` < 0.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f'rounds must be >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}')
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(warmup + rounds):
        for name, step in steps.items():
            synchronize(device)
            t0 = time.perf_counter()
            step()
            synchronize(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}
