#!/usr/bin/env python3
"""Training throughput (img/s) of several models in one run: forward, backward and AdamW step on random data.

Measures what ``train.py`` spends per step on the model (no data loading), same batch, resolution, threads and
optimizer for every model, models interleaved round by round so that a busy machine slows all of them alike::

    python classification/tools/train_throughput.py dsan_t convnext_atto resnet18 --img-size 224 -b 32
    python classification/tools/train_throughput.py dsan_t resnet18 -b 16 --modes eager compile   # torch.compile
    python classification/tools/train_throughput.py dsan_t -b 16 --modes eager compile --profile 30  # where it goes

``--profile N`` prints, after the timed rounds, a torch.profiler table (N rows, by self time) of one round's steps of
every model and mode; on the CPU the compiled steps list inductor's generated kernels by name (compiled with its
``cpp.enable_kernel_profile``, which adds a profiler event per kernel call to the timed rounds too).

``--loop`` times ``engine.train_one_epoch`` itself (its per-step bookkeeping, logging and host-device syncs
included) on an in-memory list of batches; ``--engine`` compares several versions of ``engine.py`` that way,
interleaved, e.g. the committed one against the working tree::

    git show HEAD:classification/engine.py > /tmp/engine_head.py
    python classification/tools/train_throughput.py dsan_t --loop --engine /tmp/engine_head.py classification/engine.py
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from functools import partial

import timm
import torch

_CLS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _CLS not in sys.path:
    sys.path.insert(0, _CLS)

import model_factory  # noqa: E402
import train_utils  # noqa: E402

from dsan.cli import device_type  # noqa: E402
from dsan.compile import compile_model  # noqa: E402
from dsan.profiling import kernel_names, op_table  # noqa: E402


def _step(model, opt, x, y, loss_fn, amp_autocast=nullcontext) -> None:
    opt.zero_grad(set_to_none=True)
    with amp_autocast():  # forward and loss only, as engine.train_one_epoch: backward runs outside autocast
        loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()


def _sync(dev: torch.device) -> None:
    if dev.type == 'cuda':
        torch.cuda.synchronize(dev)


def load_engine(path: str):
    """Import an ``engine.py`` (any version with the ``train_one_epoch`` of this repository) from ``path``."""
    name = 'engine_' + os.path.abspath(path).replace(os.sep, '_').replace('.', '_').replace('-', '_')
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(models: Sequence[str], img_size: int = 224, batch_size: int = 32, warmup: int = 2, steps: int = 5,
            rounds: int = 3, device: str = 'cpu', model_kwargs: dict[str, dict] | None = None,
            engines: Sequence[str] = (), amp: bool = False, log_interval: int = 50,
            modes: Sequence[str] = ('eager',), opt_fused: bool | None = None, profile_rows: int = 0) -> list[dict]:
    """Return one dict per model (and engine or mode): ``model``, ``params_m``, ``img_per_sec`` (median over rounds),
    ``per_round`` (and ``mode`` for the bare step; ``profile`` with `profile_rows`).

    A round's figure is ``batch_size * steps / elapsed`` (elapsed by ``time.perf_counter``, with a device sync at
    both ends on CUDA).

    Args:
        models: Model names.
        img_size: Square input size.
        batch_size: Images per step.
        warmup: Untimed steps per model before the first round.
        steps: Timed steps per model per round.
        rounds: Rounds; each round times every model once, in turn.
        device: Device.
        model_kwargs: Extra ``create_model`` kwargs per model name.
        engines: Paths of ``engine.py`` versions: time ``train_one_epoch`` of each (with every model) instead of
            the bare step; the rows then also name the ``engine``.
        amp: Autocast (float16 on CUDA, bfloat16 on CPU) of the forward and loss, in the bare step and the engine
            runs alike.
        log_interval: ``log_interval`` of the engine runs.
        modes: For the bare step: 'eager' and / or 'compile' (the model wrapped in ``torch.compile``, as
            ``train.py --torchcompile`` does; compilation happens in the warmup steps).
        opt_fused: torch's fused AdamW step; None: on the CPU, as ``train.py --opt-fused`` defaults.
        profile_rows: If > 0, after the rounds each row also gets ``profile``: ``dsan.profiling.op_table`` of one
            round's steps (`profile_rows` rows); models are then compiled with ``dsan.profiling.kernel_names``.
    """
    with kernel_names(profile_rows > 0):
        return _measure(models, img_size, batch_size, warmup, steps, rounds, device, model_kwargs, engines, amp,
                        log_interval, modes, opt_fused, profile_rows)


def _measure(models, img_size, batch_size, warmup, steps, rounds, device, model_kwargs, engines, amp, log_interval,
             modes, opt_fused, profile_rows) -> list[dict]:
    dev = torch.device(device)
    fused = {'fused': True} if (dev.type == 'cpu' if opt_fused is None else opt_fused) else {}
    loss_fn = torch.nn.functional.cross_entropy
    engine_modules = [(path, load_engine(path)) for path in engines]
    amp_autocast = (partial(torch.autocast, device_type=dev.type,
                            dtype=torch.float16 if dev.type == 'cuda' else torch.bfloat16) if amp else nullcontext)
    state = {}
    for name in models:
        m = model_factory.create(name, num_classes=1000, **(model_kwargs or {}).get(name, {})).to(dev).train()
        x = torch.randn(batch_size, 3, img_size, img_size, device=dev)
        y = torch.randint(0, 1000, (batch_size,), device=dev)
        params_m = sum(p.numel() for p in m.parameters()) / 1e6
        if not engine_modules:
            for mode in modes:
                mm = m if mode == modes[0] else copy.deepcopy(m)  # every mode starts from the same weights
                opt = torch.optim.AdamW(mm.parameters(), lr=1e-3, weight_decay=0.05, **fused)
                fn = compile_model(mm) if mode == 'compile' else mm  # as train.py --torchcompile
                for _ in range(max(warmup, 2 if mode == 'compile' else 0)):  # forward and backward compiled
                    _step(fn, opt, x, y, loss_fn, amp_autocast)

                def run(fn=fn, opt=opt, x=x, y=y):
                    for _ in range(steps):
                        _step(fn, opt, x, y, loss_fn, amp_autocast)
                state[(name, ('mode', mode))] = (run, params_m, [])
            continue
        for path, eng in engine_modules:
            # one model copy per engine: every engine starts from the same weights and optimizer state
            mm = model_factory.create(name, num_classes=1000, **(model_kwargs or {}).get(name, {})).to(dev).train()
            mm.load_state_dict(m.state_dict())
            opt = torch.optim.AdamW(mm.parameters(), lr=1e-3, weight_decay=0.05, **fused)
            stop = train_utils.GracefulStop(signals=())

            def run(n, mm=mm, opt=opt, eng=eng, stop=stop, x=x, y=y):
                eng.train_one_epoch(0, mm, [(x, y)] * n, opt, loss_fn, device=dev, stop=stop, progress=False,
                                    amp_autocast=amp_autocast, log_interval=log_interval)
            if warmup:
                run(warmup)
            state[(name, path)] = (partial(run, steps), params_m, [])
    for _ in range(rounds):
        for run, _, times in state.values():
            _sync(dev)
            t = time.perf_counter()
            run()
            _sync(dev)
            times.append(batch_size * steps / (time.perf_counter() - t))
    rows = []
    for (name, key), (run, params_m, times) in state.items():
        row = dict(model=name, params_m=params_m, img_per_sec=statistics.median(times), per_round=times)
        if profile_rows > 0:
            row['profile'] = op_table(run, dev, profile_rows)
        if isinstance(key, tuple):
            row['mode'] = key[1]
        else:
            row['engine'] = key
        rows.append(row)
    return rows


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One-line usage errors (exit status 2) for what would fail, or time nothing, only once the run is under way."""
    for flag, least in (('batch_size', 1), ('img_size', 1), ('steps', 1), ('rounds', 1), ('warmup', 0),
                        ('log_interval', 1), ('profile', 0)):
        value = getattr(args, flag)
        if value < least:
            p.error(f'argument --{flag.replace("_", "-")}: must be >= {least}, got {value}')
    if args.threads is not None and args.threads < 1:
        p.error(f'argument --threads: must be >= 1, got {args.threads}')
    for name in args.models:
        if not timm.is_model(name.split('.')[0]):  # a pretrained tag (name.tag) is the model's
            p.error(f'argument models: unknown timm model {name!r}')
    for path in args.engine:
        if not os.path.isfile(path):
            p.error(f'argument --engine: expected an existing engine.py file, got {path!r}')


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Command-line entry point; prints a Markdown table."""
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('models', nargs='*', default=['dsan_t', 'convnext_atto', 'resnet18'])
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('-b', '--batch-size', type=int, default=32)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--steps', type=int, default=5)
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--device', type=device_type, default='cpu')
    p.add_argument('--threads', type=int, default=None, help='torch threads, >= 1 (default: torch default)')
    p.add_argument('--loop', action='store_true', help="time engine.train_one_epoch (this checkout's engine.py)")
    p.add_argument('--engine', nargs='+', default=[], metavar='ENGINE_PY',
                   help='time train_one_epoch of these engine.py files, interleaved (implies --loop)')
    p.add_argument('--amp', action='store_true',
                   help='autocast of forward and loss (bfloat16 on CPU, float16 on CUDA), in every step')
    p.add_argument('--log-interval', type=int, default=50, help='log_interval of the --loop runs (default: 50)')
    p.add_argument('--tune-malloc', action='store_true',
                   help='keep freed memory in the process for reuse (glibc; dsan.allocator.keep_freed_memory), '
                        'as train.py does on the CPU; applies to every model alike')
    p.add_argument('--opt-fused', action=argparse.BooleanOptionalAction, default=None,
                   help="torch's fused AdamW step (default: on for the CPU, as train.py)")
    p.add_argument('--modes', nargs='+', default=['eager'], choices=['eager', 'compile'],
                   help='bare-step modes, each timed for every model (compile: torch.compile, as train.py '
                        '--torchcompile)')
    p.add_argument('--profile', type=int, default=0, metavar='N',
                   help="after timing, print a torch.profiler table (N rows) of one round's steps per model and mode")
    args = p.parse_args(argv)
    _check_args(p, args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tuned = train_utils.keep_freed_memory(torch.device(args.device)) if args.tune_malloc else False
    fused_opt = args.opt_fused if args.opt_fused is not None else torch.device(args.device).type == 'cpu'
    engines = args.engine or ([os.path.join(_CLS, 'engine.py')] if args.loop else [])
    rows = measure(args.models, args.img_size, args.batch_size, args.warmup, args.steps, args.rounds, args.device,
                   engines=engines, amp=args.amp, log_interval=args.log_interval, modes=args.modes,
                   opt_fused=args.opt_fused, profile_rows=args.profile)
    what = 'engine.train_one_epoch' if engines else 'bare step'
    print(f'Training throughput ({what}), {args.device}, {torch.get_num_threads()} threads, batch {args.batch_size}, '
          f'{args.img_size}x{args.img_size}, AdamW (fused {bool(fused_opt)}), amp {args.amp}, malloc tuned {tuned} '
          f'(median of {args.rounds} rounds of {args.steps} steps)')
    print('| model | engine / mode | params (M) | train img/s | per round |')
    print('|---|---|---|---|---|')
    for r in rows:
        print(f"| {r['model']} | {r.get('engine', r.get('mode'))} | {r['params_m']:.2f} | {r['img_per_sec']:.1f} | "
              f"{' / '.join(f'{v:.1f}' for v in r['per_round'])} |")
    for r in rows:
        if 'profile' in r:
            print(f"\nprofile: {r['model']} ({r.get('engine', r.get('mode'))}, {args.steps} steps)\n{r['profile']}")
    return rows


if __name__ == '__main__':
    main()
