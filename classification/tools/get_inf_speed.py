"""Inference throughput (images/s) of DSAN and timm models, eager and/or torch.compile'd, on CPU or GPU.

Every model runs in the same process with the same threads, input and settings; each is warmed up first
(compilation included) and timed over repeated batches with device synchronisation, reporting the median.

Examples:
    python classification/tools/get_inf_speed.py dsan_t convnext_atto resnet18 efficientformer_l1 fastvit_t8 \\
        --batch-size 32 --modes eager compile
    python classification/tools/get_inf_speed.py dsan_s --device cuda --amp --channels-last
    python classification/tools/get_inf_speed.py dsan_t --checkpoint dsan_t.pth.tar   # groups from the file
"""
import argparse
import contextlib
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn as nn

try:
    import dsan.models  # noqa: F401  (registers the DSAN models with timm)
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import dsan.models  # noqa: F401

_logger = logging.getLogger('get_inf_speed')

# glibc malloc settings for --tune-malloc: large activations are reused from the heap instead of being
# mmap'd and page-faulted in on every call (a poor man's jemalloc/tcmalloc; applies to every model alike).
MALLOC_ENV = {
    'MALLOC_MMAP_THRESHOLD_': str(32 * 2 ** 20),
    'MALLOC_TRIM_THRESHOLD_': str(2 ** 30),
    'MALLOC_TOP_PAD_': str(256 * 2 ** 20),
}


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def create(name: str, checkpoint: str | None = None, backend: str | None = None) -> nn.Module:
    """Create a timm model; DSAN models take `backend` and, with `checkpoint`, their weights and groups."""
    kwargs = {}
    if name.startswith('dsan'):
        if backend:
            kwargs['backend'] = backend
        if checkpoint:
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=checkpoint))
    return timm.create_model(name, **kwargs)


@torch.inference_mode()
def measure(
        model: nn.Module,
        x: torch.Tensor,
        warmup: int = 3,
        iters: int = 10,
        min_time: float = 0.,
        amp_dtype: torch.dtype | None = None,
        micro_batch: int = 0,
) -> dict:
    """Time `model(x)`: `warmup` untimed calls, then at least `iters` timed calls and `min_time` seconds.

    Args:
        micro_batch: If > 0, each batch is run as consecutive chunks of this many images (smaller working
            set; the results are the same since eval-mode models treat images independently).

    Returns:
        dict with the median seconds per batch, img/s from it, and the number of timed calls.
    """
    device = x.device
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    chunks = x.split(micro_batch) if micro_batch > 0 else (x,)

    def step():
        for c in chunks:
            model(c)

    with amp:
        for _ in range(warmup):
            step()
        _sync(device)
        times, cpu_times = [], []
        start = time.perf_counter()
        while len(times) < iters or time.perf_counter() - start < min_time:
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            _sync(device)
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    median = statistics.median(times)
    # Images per CPU-second of this process (all threads): a load-independent figure on a shared machine.
    cpu_median = statistics.median(cpu_times)
    return dict(sec_per_batch=median, img_per_s=x.shape[0] / median, timed=len(times),
                img_per_cpu_s=x.shape[0] / cpu_median if cpu_median > 0 else float('nan'))


def _gflops(model: nn.Module, img_size: int) -> float:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from get_flops import count_macs

    return count_macs(model.cpu(), (img_size, img_size))[0] / 1e9


def run(
        models: list[str],
        batch_size: int = 32,
        img_size: int = 224,
        modes: tuple[str, ...] = ('eager',),
        device: str = 'cpu',
        channels_last: bool = False,
        amp: bool = False,
        warmup: int = 3,
        iters: int = 10,
        min_time: float = 0.,
        checkpoint: str | None = None,
        backend: str | None = None,
        micro_batch: int = 0,
        flops: bool = False,
        freezing: bool = True,
) -> list[dict]:
    """Benchmark every model in every mode with identical settings; one result dict per (model, mode).

    With `flops`, each model's torchprofile GMACs at `img_size` (the paper's "GFLOPs", DSCN op counted 0)
    are added, to find the peer with the closest FLOPs. `freezing` turns on inductor's inference freezing
    for 'compile' (weights as constants: prepacked oneDNN weights, conv + BN / activation fusion), the
    recommended torch.compile setting for CPU inference.
    """
    import torch._inductor.config as inductor_config

    dev = torch.device(device)
    amp_dtype = (torch.float16 if dev.type == 'cuda' else torch.bfloat16) if amp else None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, img_size, img_size, generator=g).to(dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    results = []
    for name in models:
        model = create(name, checkpoint if name.startswith('dsan') else None, backend).eval().to(dev)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        params = sum(p.numel() for p in model.parameters())
        gflops = _gflops(model, img_size) if flops else float('nan')
        for mode in modes:
            if mode == 'compile':
                torch._dynamo.reset()
                inductor_config.freezing = freezing
                runner = torch.compile(model)
            elif mode == 'eager':
                runner = model
            else:
                raise ValueError(f"mode must be 'eager' or 'compile', got {mode!r}")
            t0 = time.perf_counter()
            r = measure(runner, x, warmup=warmup, iters=iters, min_time=min_time, amp_dtype=amp_dtype,
                        micro_batch=micro_batch)
            r.update(model=name, mode=mode, params=params, gflops=gflops, warmup_s=time.perf_counter() - t0)
            _logger.info('%-20s %-8s %8.1f img/s', name, mode, r['img_per_s'])
            results.append(r)
        del model
    inductor_config.freezing = False
    return results


def format_results(results: list[dict], reference: str | None = None) -> str:
    """A table of img/s per model and mode, the ratio of `reference` (default: first model) to each, and
    images per CPU-second (all threads of the process; less sensitive to other load on the machine)."""
    modes = list(dict.fromkeys(r['mode'] for r in results))
    by = {(r['model'], r['mode']): r for r in results}
    names = list(dict.fromkeys(r['model'] for r in results))
    reference = reference or names[0]
    head = f'{"model":<20} {"params":>11} {"GFLOPs":>7}'
    head += ''.join(f' {m + " img/s":>14} {reference + "/x":>10} {"img/cpu-s":>10}' for m in modes)
    lines = [head]
    for n in names:
        first = by[(n, modes[0])]
        line = f'{n:<20} {first["params"]:>11,} {first.get("gflops", float("nan")):>7.3f}'
        for m in modes:
            r, ref = by.get((n, m)), by.get((reference, m))
            ratio = ref['img_per_s'] / r['img_per_s'] if r and ref else float('nan')
            line += (f' {r["img_per_s"]:>14.1f} {ratio:>10.2f} {r["img_per_cpu_s"]:>10.1f}' if r
                     else f' {"-":>14} {"-":>10} {"-":>10}')
        lines.append(line)
    return '\n'.join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('models', nargs='*', default=['dsan_t'], help='timm model names')
    parser.add_argument('-b', '--batch-size', type=int, default=32)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--modes', nargs='+', default=['eager'], choices=['eager', 'compile'])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (CPU)')
    parser.add_argument('--channels-last', action='store_true', help='convert models and input to channels_last')
    parser.add_argument('--amp', action='store_true', help='autocast: bfloat16 on CPU, float16 on CUDA')
    parser.add_argument('--warmup', type=int, default=3, help='untimed calls (after compilation)')
    parser.add_argument('--iters', type=int, default=10, help='minimum timed calls')
    parser.add_argument('--min-time', type=float, default=0., help='minimum seconds of timed calls')
    parser.add_argument('--checkpoint', default=None, help='weights (and DSCN groups) for the DSAN models')
    parser.add_argument('--backend', default=None, help="DSCN backend of the DSAN models ('cpp', 'pytorch')")
    parser.add_argument('--micro-batch', type=int, default=0,
                        help='run each batch as chunks of this many images (every model alike)')
    parser.add_argument('--flops', action='store_true', help='also count torchprofile GFLOPs of every model')
    parser.add_argument('--no-freezing', dest='freezing', action='store_false',
                        help="compile without inductor's inference freezing")
    parser.add_argument('--tune-malloc', action='store_true',
                        help='re-run with glibc malloc settings that keep large activations on the heap (Linux)')
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    args = parse_args(argv)
    tuned = all(os.environ.get(k) == v for k, v in MALLOC_ENV.items())
    if args.tune_malloc and not tuned and argv is None:
        # malloc reads these at process start: re-run this script with them set.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args.models, args.batch_size, args.img_size, tuple(args.modes), args.device, args.channels_last,
                  args.amp, args.warmup, args.iters, args.min_time, args.checkpoint, args.backend,
                  args.micro_batch, args.flops, args.freezing)
    print(f'device {args.device}, threads {torch.get_num_threads()}, batch {args.batch_size}, '
          f'{args.img_size}x{args.img_size}, channels_last {args.channels_last}, amp {args.amp}, '
          f'micro-batch {args.micro_batch or "off"}, malloc tuned {tuned}, compile freezing {args.freezing}, '
          f'torch {torch.__version__}, '
          f'timm {timm.__version__}; median of >= {args.iters} timed batches')
    print(format_results(results))
    return results


if __name__ == '__main__':
    main()
