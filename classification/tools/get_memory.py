"""Peak memory of one training step (forward, backward, optional optimizer step) or inference forward of a model.

On CUDA the figure is `torch.cuda.max_memory_allocated` above what the model and input already hold. On CPU
it is the rise of the process's peak resident set (Linux VmHWM, reset through /proc/self/clear_refs just
before the step) over the whole process's resident set (Python, torch and its libraries, model and input), so run
one model per process for a clean number.

The step measured is the process's first: its figure includes one-time allocations of the first call (lazily
initialised kernels and library workspaces). There is no warm-up step on purpose: on CPU the memory a warm-up step
frees stays in the process and the measured step would reuse it, hiding its peak.

Examples:
    python classification/tools/get_memory.py dsan_t -b 64
    python classification/tools/get_memory.py dsan_s -b 32 --device cuda --amp --optimizer
    python classification/tools/get_memory.py dsan_t --mode inference --img-size 1024 2048
"""
import argparse
import contextlib
import gc
import logging
import sys
from pathlib import Path

import timm
import torch

import ops_dscn

try:
    import dsan.models  # noqa: F401  (registers the DSAN models with timm)
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import dsan.models  # noqa: F401
from dsan.cli import add_renamed_options, device_type  # noqa: E402

_logger = logging.getLogger('get_memory')
MiB = 2 ** 20


def _proc_status_kib(field: str) -> int | None:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_cpu_peak() -> bool:
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def training_step_memory(
        name: str,
        batch_size: int = 64,
        img_size: int = 224,
        device: str = 'cpu',
        amp: bool = False,
        optimizer: bool = False,
        grad_checkpointing: bool = False,
        backend: str | None = None,
        inference: bool = False,
) -> dict:
    """Peak memory of one training step of `name`, or with `inference` of one eval-mode forward without gradients.

    `img_size` is an int (square) or (H, W).

    Returns:
        dict with `peak_step_mib` (memory the step adds at its peak), `before_mib` (what was held before the step),
        `before_what` (what `before_mib` counts: 'allocated, model + input' on CUDA, 'process RSS' on CPU) and
        `method` ('cuda_allocator' or 'cpu_vmhwm').
    """
    dev = torch.device(device)
    kwargs = dict(backend=backend) if backend and name.startswith('dsan') else {}
    model = timm.create_model(name, **kwargs).to(dev).train(not inference)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3) if optimizer and not inference else None
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    x = torch.randn(batch_size, 3, h, w, device=dev)
    target = torch.randint(0, model.num_classes, (batch_size,), device=dev)
    amp_ctx = (torch.autocast(dev.type, dtype=torch.float16 if dev.type == 'cuda' else torch.bfloat16)
               if amp else contextlib.nullcontext())
    gc.collect()
    if dev.type == 'cuda':
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        before_what = 'allocated, model + input'
    else:
        method_ok = _reset_cpu_peak()
        before = (_proc_status_kib('VmRSS') or 0) * 1024
        before_what = 'process RSS'

    if inference:
        with amp_ctx, torch.no_grad():
            model(x)
    else:
        with amp_ctx:
            loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    if dev.type == 'cuda':
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        method = 'cuda_allocator'
    else:
        peak = (_proc_status_kib('VmHWM') or 0) * 1024
        method = 'cpu_vmhwm' if method_ok else 'cpu_vmhwm_unreset (process peak, includes setup)'
    return dict(model=name, batch_size=batch_size, img_size=(h, w), device=device, method=method,
                mode='inference' if inference else 'training',
                before_mib=before / MiB, before_what=before_what, peak_step_mib=(peak - before) / MiB,
                peak_total_mib=peak / MiB)


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the arguments; bad input is a one-line usage error (exit status 2)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('model', nargs='?', default='dsan_t', help='timm model name (default: dsan_t)')
    parser.add_argument('-b', '--batch-size', '--batch_size', type=int, default=64)
    parser.add_argument('--img-size', '--shape', type=int, nargs='+', default=[224], metavar='SIZE',
                        help='H [W] of the input (default: 224)')
    parser.add_argument('--mode', choices=('training', 'inference'), default='training',
                        help='a training step (forward, backward) or an inference forward (eval, no gradients)')
    parser.add_argument('--device', type=device_type, default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--amp', action='store_true', help='autocast: bfloat16 on CPU, float16 on CUDA')
    parser.add_argument('--optimizer', action='store_true', help='include an AdamW step (its state)')
    parser.add_argument('--grad-checkpointing', action='store_true')
    parser.add_argument('--backend', default=None, choices=ops_dscn.BACKENDS, help='DSCN backend of DSAN models')
    add_renamed_options(parser, {'--gpu_id': '--device cuda:N', '--gpu-id': '--device cuda:N'})
    args = parser.parse_args(argv)
    if not timm.is_model(args.model):
        parser.error(f'argument model: unknown timm model {args.model!r}')
    if args.batch_size < 1:
        parser.error(f'argument --batch-size: must be >= 1, got {args.batch_size}')
    if len(args.img_size) > 2 or min(args.img_size) < 1:
        parser.error(f'argument --img-size: one or two sizes >= 1 (H [W]), got {" ".join(map(str, args.img_size))}')
    if args.mode == 'inference' and (args.optimizer or args.grad_checkpointing):
        parser.error('argument --mode inference: takes no --optimizer or --grad-checkpointing (training only)')
    args.img_size = tuple(args.img_size * 2 if len(args.img_size) == 1 else args.img_size)
    return args


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    args = parse_args(argv)
    r = training_step_memory(args.model, args.batch_size, args.img_size, args.device, args.amp, args.optimizer,
                             args.grad_checkpointing, args.backend, inference=args.mode == 'inference')
    what = 'training step' if args.mode == 'training' else 'inference forward'
    print(f'{r["model"]}: batch {r["batch_size"]} at {r["img_size"][0]}x{r["img_size"][1]}, {r["device"]}: {what} peak '
          f'+{r["peak_step_mib"]:.1f} MiB over {r["before_mib"]:.1f} MiB ({r["before_what"]}), '
          f'total {r["peak_total_mib"]:.1f} MiB [{r["method"]}]')
    return r


if __name__ == '__main__':
    main()
