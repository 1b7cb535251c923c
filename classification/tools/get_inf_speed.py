"""Inference throughput (images/s) of DSAN and its FLOP peers, in several modes, on CPU or GPU.

Every model runs in the same process with the same threads, input and settings, in every requested mode
(see `MODES`); each is warmed up first (compilation included) and timed over repeated batches with device
synchronisation, reporting the median. The table gives img/s per mode, the first model's img/s over each
model's (> 1: the first model is faster) and images per CPU-second; with several modes, each model's speed-up
of every mode over its first mode follows. `--profile N` adds a torch.profiler table per model.

Examples:
    python classification/tools/get_inf_speed.py --all-modes --threads 2 -b 32 --rounds 5   # dsan_t vs its peers
    python classification/tools/get_inf_speed.py dsan_t convnext_atto resnet18 efficientformer_l1 fastvit_t8 \\
        --batch-size 32 --modes eager compile --out speed.json
    python classification/tools/get_inf_speed.py dsan_s --device cuda --amp --modes channels_last --profile 15
    python classification/tools/get_inf_speed.py dsan_t --checkpoint dsan_t.pth.tar   # groups from the file
"""
import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn as nn
from timm.utils import reparameterize_model

import ops_dscn

try:
    import dsan.models  # noqa: F401  (registers the DSAN models with timm)
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import dsan.models  # noqa: F401
from dsan.allocator import keep_freed_memory  # noqa: E402
from dsan.cli import add_renamed_options, device_problem, output_file_problem  # noqa: E402
from dsan.compile import compile_model  # noqa: E402
from dsan.profiling import op_table  # noqa: E402

_logger = logging.getLogger('get_inf_speed')

# DSAN-T and its FLOP peers (the project issue): the models when none are named.
DEFAULT_MODELS = ('dsan_t', 'efficientformer_l1', 'resnet18')
# eager: the model as built (NCHW, or channels_last with --channels-last); channels_last: model and input in
# torch.channels_last; fused: channels_last after timm.utils.reparameterize_model (inference fusion, a no-op for
# models without reparameterize/fuse hooks); compile / fused_compile: channels_last / fused, then torch.compile.
MODES = ('eager', 'channels_last', 'fused', 'compile', 'fused_compile')
# The mode profiled (--profile) when only compiled modes are run: the same model, not compiled.
_UNCOMPILED = {'compile': 'channels_last', 'fused_compile': 'fused'}

def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def create(name: str, checkpoint: str | None = None, backend: str | None = None, head: bool = True) -> nn.Module:
    """Create a timm model; DSAN models take `backend` and, with `checkpoint`, their weights and groups. Without
    `head` the model returns its unpooled last-stage features (timm's num_classes=0, global_pool=''), as the
    original tool's 'w/o head' mode timed `forward_backbone`."""
    kwargs = {} if head else dict(num_classes=0, global_pool='')
    if name.startswith('dsan'):
        if backend:
            kwargs['backend'] = backend
        if checkpoint:
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=checkpoint))
    return timm.create_model(name, **kwargs)


@dataclasses.dataclass
class Prepared:
    """A model made ready for one mode.

    Attributes:
        mode: One of `MODES`.
        module: The eager module run in this mode (a deep copy of the given one; fused for the fused modes), in
            `memory_format`.
        runner: What is timed: `module`, or `torch.compile(module)` for the compiled modes.
        memory_format: The memory format of the module's weights and of the input it is given.
    """

    mode: str
    module: nn.Module
    runner: Callable[[torch.Tensor], torch.Tensor]
    memory_format: torch.memory_format

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """`x` in this mode's memory format (done once, outside the timed calls)."""
        return x.contiguous(memory_format=self.memory_format)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.runner(self.input(x))


def prepare(model: nn.Module, mode: str, channels_last: bool = False) -> Prepared:
    """Make an eval-mode `model` ready for `mode`, on a deep copy (`model` itself is left as it is).

    Args:
        model: The model, in eval mode and on its device.
        mode: One of `MODES`.
        channels_last: Memory format of the 'eager' mode (the other modes are always channels_last).

    Returns:
        The `Prepared` model. The compiled modes compile lazily, on the first call; inductor's settings (e.g.
        `freezing`) are read then. Code compiled earlier stays compiled (see `run` for when it is dropped).

    Raises:
        ValueError: `mode` is not one of `MODES`.
    """
    if mode not in MODES:
        raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
    fmt = torch.channels_last if channels_last or mode != 'eager' else torch.contiguous_format
    # reparameterize_model works on a deep copy and treats every model alike (timm's inference fusion hooks).
    module = reparameterize_model(model) if mode.startswith('fused') else copy.deepcopy(model)
    module = module.to(memory_format=fmt)
    runner = module
    if mode.endswith('compile'):
        runner = compile_model(module)  # with the inductor options the model asks for, as validate.py
    return Prepared(mode, module, runner, fmt)


@torch.inference_mode()
def measure(
        model: Callable[[torch.Tensor], torch.Tensor],
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
    return _summary(times, cpu_times, x.shape[0])


def _summary(times: list[float], cpu_times: list[float], batch_size: int) -> dict:
    """`measure`'s result from the wall and CPU seconds of the timed calls (kept, so rounds can be merged)."""
    median = statistics.median(times)
    # Images per CPU-second of this process (all threads): a load-independent figure on a shared machine.
    cpu_median = statistics.median(cpu_times)
    return dict(sec_per_batch=median, img_per_s=batch_size / median, timed=len(times),
                img_per_cpu_s=batch_size / cpu_median if cpu_median > 0 else float('nan'),
                times=times, cpu_times=cpu_times)


@torch.inference_mode()
def profile(
        model: Callable[[torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        row_limit: int = 20,
        calls: int = 2,
        amp_dtype: torch.dtype | None = None,
) -> str:
    """torch.profiler's op table of `calls` forward calls of `model(x)` (after one untimed call).

    Returns:
        `key_averages().table(...)` with `row_limit` rows, sorted by self CPU time, or by self device time on CUDA.
    """
    amp = torch.autocast(x.device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    with amp:
        return op_table(lambda: model(x), x.device, row_limit, calls)


def profile_mode(modes: tuple[str, ...]) -> str:
    """The mode `--profile` profiles: the first of `modes` not compiled, else the first one, not compiled."""
    return next((m for m in modes if m not in _UNCOMPILED), _UNCOMPILED.get(modes[0], modes[0]))


def _gflops(model: nn.Module, img_size: int) -> float:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from get_flops import count_macs

    return count_macs(model, (img_size, img_size))[0] / 1e9


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
        profile_rows: int = 0,
        rounds: int = 1,
        head: bool = True,
) -> list[dict]:
    """Benchmark every model in every mode with identical settings; one result dict per (model, mode).

    With `rounds` > 1 every (model, mode) is prepared and warmed up first, then timed in `rounds` interleaved rounds
    of `iters` calls each (model after model, mode after mode, round after round), and its result is the median
    over all its timed calls: load that comes and goes on a shared machine then slows every model alike, which
    keeps the ratios between them meaningful.

    Args:
        models: timm model names, timed in this order (the first one is the reference of `format_results`).
        modes: Modes of `MODES`, timed in this order for each model.
        channels_last: Memory format of the 'eager' mode.
        flops: Add each model's torchprofile GMACs at `img_size` (the paper's "GFLOPs", DSCN op counted 0), to
            find the peer with the closest FLOPs.
        head: False times the models without their classifier and pooling (their last-stage features).
        freezing: Inductor's inference freezing for the compiled modes (weights as constants: prepacked oneDNN
            weights, conv + BN / activation fusion), the recommended torch.compile setting for CPU inference.
        profile_rows: If > 0, each model's first result also gets 'profile': {'mode', 'table'}, the `profile` table
            (this many rows) of the first requested mode that is not compiled (for compiled-only runs: the same
            model, not compiled).

    Returns:
        The results: timing (`measure`), model, mode, params, gflops (NaN without `flops`), memory_format,
        warmup_s (seconds of the whole measurement, compilation included) and the run's settings.
    """
    import torch._inductor.config as inductor_config

    dev = torch.device(device)
    amp_dtype = (torch.float16 if dev.type == 'cuda' else torch.bfloat16) if amp else None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, img_size, img_size, generator=g).to(dev)
    settings = dict(device=device, batch_size=batch_size, img_size=img_size, amp=amp, micro_batch=micro_batch,
                    threads=torch.get_num_threads(), freezing=freezing)
    results = []
    kept = []  # (result, prepared model) pairs timed again in the later rounds
    reset_done = False
    with inductor_config.patch(freezing=freezing):
        for name in models:
            model = create(name, checkpoint if name.startswith('dsan') else None, backend, head).eval()
            params = sum(p.numel() for p in model.parameters())
            gflops = _gflops(model, img_size) if flops else float('nan')
            model = model.to(dev)
            first = len(results)
            for mode in modes:
                # A reset drops all compiled code: with one round, that of the pairs already timed (freeing
                # memory); with several rounds only before the first compiled pair, since the later rounds (no
                # warm-up) must find every pair still compiled, else they would time its recompilation.
                if mode.endswith('compile') and (rounds == 1 or not reset_done):
                    torch._dynamo.reset()
                    reset_done = True
                prepared = prepare(model, mode, channels_last)
                t0 = time.perf_counter()
                r = measure(prepared.runner, prepared.input(x), warmup=warmup, iters=iters, min_time=min_time,
                            amp_dtype=amp_dtype, micro_batch=micro_batch)
                r.update(model=name, mode=mode, params=params, gflops=gflops,
                         memory_format=str(prepared.memory_format).removeprefix('torch.'),
                         warmup_s=time.perf_counter() - t0, **settings)
                _logger.info('%-20s %-14s %8.1f img/s', name, mode, r['img_per_s'])
                results.append(r)
                if rounds > 1:
                    kept.append((r, prepared))
                del prepared
            if profile_rows > 0:
                mode = profile_mode(modes)
                prepared = prepare(model, mode, channels_last)
                table = profile(prepared.runner, prepared.input(x), profile_rows, amp_dtype=amp_dtype)
                results[first]['profile'] = dict(mode=mode, table=table)
                del prepared
            del model
        for i in range(1, rounds):
            for r, prepared in kept:
                more = measure(prepared.runner, prepared.input(x), warmup=0, iters=iters, min_time=min_time,
                               amp_dtype=amp_dtype, micro_batch=micro_batch)
                r.update(_summary(r['times'] + more['times'], r['cpu_times'] + more['cpu_times'], batch_size))
            _logger.info('round %d of %d done', i + 1, rounds)
    for r in results:
        r['rounds'] = rounds
    return results


def format_results(results: list[dict], reference: str | None = None) -> str:
    """The speed table of `run`'s results, and with several modes each model's speed-up over its first mode.

    Per mode: img/s; `<reference>/x`, the reference's img/s over the model's (> 1: the reference, by default the
    first model, is faster than that model); img/cpu-s, images per CPU-second (all threads of the process; less
    sensitive to other load on the machine). The speed-up lines give, per model, each mode's img/s over the
    model's first mode's (e.g. `compile/eager 1.35x`).
    """
    modes = list(dict.fromkeys(r['mode'] for r in results))
    by = {(r['model'], r['mode']): r for r in results}
    names = list(dict.fromkeys(r['model'] for r in results))
    reference = reference or names[0]
    ratio_label = reference + '/x'
    rw = max(len(ratio_label), 6)
    group = 10 + 1 + rw + 1 + 10
    lead = f'{"":<20} {"":>11} {"":>7}'
    top = lead + ''.join(f'   {m:^{group}}' for m in modes)
    head = f'{"model":<20} {"params":>11} {"GFLOPs":>7}'
    head += ''.join(f'   {"img/s":>10} {ratio_label:>{rw}} {"img/cpu-s":>10}' for _ in modes)
    lines = [top.rstrip(), head]
    for n in names:
        first = next(r for m in modes if (r := by.get((n, m))))
        gflops = first.get('gflops')
        counted = gflops is not None and not math.isnan(gflops)
        line = f'{n:<20} {first["params"]:>11,} ' + (f'{gflops:>7.3f}' if counted else f'{"-":>7}')  # - : no --flops
        for m in modes:
            r, ref = by.get((n, m)), by.get((reference, m))
            ratio = ref['img_per_s'] / r['img_per_s'] if r and ref else math.nan
            line += (f'   {r["img_per_s"]:>10.1f} {ratio:>{rw}.2f} {r["img_per_cpu_s"]:>10.1f}' if r
                     else f'   {"-":>10} {"-":>{rw}} {"-":>10}')
        lines.append(line)
    if len(modes) > 1:
        lines += ['', f'speed-up of each mode over the model\'s first mode ({modes[0]}), img/s over img/s:']
        for n in names:
            base = by.get((n, modes[0]))
            ups = []
            for m in modes[1:]:
                r = by.get((n, m))
                up = r['img_per_s'] / base['img_per_s'] if r and base else math.nan
                ups.append(f'{m}/{modes[0]} {up:.2f}x')
            lines.append(f'{n:<20} ' + '  '.join(ups))
    return '\n'.join(lines)


def write_json(results: list[dict], path: str | os.PathLike) -> None:
    """Write `results` to `path` as JSON, atomically (a temporary file in the same folder, then `os.replace`).

    NaN (e.g. GFLOPs not counted) is written as null, so the file is strict JSON.
    """
    def clean(v):
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, dict):
            return {k: clean(w) for k, w in v.items()}
        return v

    path = Path(path)
    text = json.dumps([clean(r) for r in results], indent=2, allow_nan=False)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'w') as f:
            f.write(text + '\n')
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('models', nargs='*', default=list(DEFAULT_MODELS),
                        help=f'timm model names; the first is the reference of the ratio column '
                             f'(default: {" ".join(DEFAULT_MODELS)})')
    parser.add_argument('-b', '--batch-size', type=int, default=32)
    parser.add_argument('--img-size', type=int, default=224)
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument('--modes', nargs='+', default=['eager'], choices=MODES,
                       help='modes, timed in this order in one process (default: eager)')
    modes.add_argument('--all-modes', action='store_true', help=f'every mode: {" ".join(MODES)}')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help="'cpu' or 'cuda[:N]'")
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (CPU), >= 1')
    parser.add_argument('--channels-last', action='store_true',
                        help='run the eager mode in channels_last too (the other modes always are)')
    parser.add_argument('--amp', action='store_true', help='autocast: bfloat16 on CPU, float16 on CUDA')
    parser.add_argument('--warmup', type=int, default=3, help='untimed calls (after compilation)')
    parser.add_argument('--iters', type=int, default=10, help='minimum timed calls')
    parser.add_argument('--min-time', type=float, default=0., help='minimum seconds of timed calls')
    parser.add_argument('--rounds', type=int, default=1,
                        help='interleaved rounds of --iters calls per model and mode (all kept in memory); '
                             'the median is over all rounds: steadier ratios on a shared machine')
    parser.add_argument('--checkpoint', default=None,
                        help='weights (and DSCN groups) of the DSAN model; a run with it names exactly one')
    parser.add_argument('--backend', default=None, choices=ops_dscn.BACKENDS, help='DSCN backend of the DSAN models')
    parser.add_argument('--micro-batch', type=int, default=0,
                        help='run each batch as chunks of this many images (every model alike)')
    parser.add_argument('--flops', action='store_true', help='also count torchprofile GFLOPs of every model')
    parser.add_argument('--no-freezing', dest='freezing', action='store_false',
                        help="compile without inductor's inference freezing")
    parser.add_argument('--profile', type=int, default=0, metavar='N',
                        help='after timing, print a torch.profiler table (N rows) of 2 forward calls per model, '
                             'in the first requested mode that is not compiled')
    parser.add_argument('--no-head', dest='head', action='store_false',
                        help="time the backbones alone (last-stage features, no pooling or classifier; the original "
                             "tool's --mode 'w/o head')")
    parser.add_argument('--out', default=None, metavar='FILE.json', help='also write the results as JSON')
    parser.add_argument('--tune-malloc', action='store_true',
                        help='keep freed memory in the process for reuse (glibc; dsan.allocator.keep_freed_memory), '
                             'as train.py does on the CPU; applies to every model alike')
    add_renamed_options(parser, {
        '--mode': "--no-head for 'w/o head' (the head is timed by default); --modes / --all-modes for the layouts "
                  'and compilation',
        '--gpu_id': '--device cuda:N', '--gpu-id': '--device cuda:N'})
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the arguments: an unknown model name or bad number is a usage error (exit status 2)."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.all_modes:
        args.modes = list(MODES)
    for name in args.models:
        if not timm.is_model(name):
            hint = f' (the original\'s GPU id? here: --device cuda:{name})' if name.isdigit() else ''
            parser.error(f'argument models: unknown timm model {name!r}{hint}')
    for flag in ('batch_size', 'img_size', 'iters', 'rounds'):
        if getattr(args, flag) < 1:
            parser.error(f'argument --{flag.replace("_", "-")}: must be >= 1, got {getattr(args, flag)}')
    for flag in ('warmup', 'micro_batch', 'profile'):
        if getattr(args, flag) < 0:
            parser.error(f'argument --{flag.replace("_", "-")}: must be >= 0, got {getattr(args, flag)}')
    if args.threads is not None and args.threads < 1:
        parser.error(f'argument --threads: must be >= 1, got {args.threads}')
    problem = device_problem(args.device)
    if problem:
        parser.error(f'argument --device: {problem}')
    if args.checkpoint is not None:
        dsan_models = list(dict.fromkeys(n for n in args.models if n.startswith('dsan')))
        if not Path(args.checkpoint).is_file():
            parser.error(f'argument --checkpoint: expected an existing file, got {args.checkpoint!r}')
        # A file holds one architecture's weights: loading it into the others would fail mid-run, after the
        # models before them were timed.
        if len(dsan_models) != 1:
            parser.error(f'argument --checkpoint: applies to exactly one DSAN model, got {len(dsan_models)}'
                         + (f' ({" ".join(dsan_models)}); time the others in another run' if dsan_models else ''))
    if args.out is not None:
        problem = output_file_problem(args.out)
        if problem:
            parser.error(f'argument --out: {problem}')
    return args


def main(argv=None) -> list[dict]:
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    args = parse_args(argv)
    tuned = keep_freed_memory() if args.tune_malloc else False
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = run(args.models, args.batch_size, args.img_size, tuple(args.modes), args.device, args.channels_last,
                  args.amp, args.warmup, args.iters, args.min_time, args.checkpoint, args.backend,
                  args.micro_batch, args.flops, args.freezing, args.profile, args.rounds, args.head)
    print(f'device {args.device}, threads {torch.get_num_threads()}, batch {args.batch_size}, '
          f'{args.img_size}x{args.img_size}, eager channels_last {args.channels_last}, amp {args.amp}, '
          f'micro-batch {args.micro_batch or "off"}, malloc tuned {tuned}, compile freezing {args.freezing}, '
          f'{"with head" if args.head else "backbone only (no head)"}, '
          f'torch {torch.__version__}, '
          f'timm {timm.__version__}; median of >= {args.iters} timed batches'
          + (f' in each of {args.rounds} interleaved rounds' if args.rounds > 1 else ''))
    print(format_results(results))
    for r in results:
        if 'profile' in r:
            print(f'\nprofile: {r["model"]} ({r["profile"]["mode"]}, 2 forward calls)\n{r["profile"]["table"]}')
    if args.out:
        write_json(results, args.out)
        _logger.info('results written to %s', args.out)
    return results


if __name__ == '__main__':
    main()
