"""Benchmark of the DSCN operator on the shapes of every DSAN-T and DSAN-S stage at 224x224.

For each stage and strip axis it times forward and forward+backward of the compiled op ('cpp'), the pure-PyTorch
op ('pytorch') and, as the floor, a dense depthwise 1xK (or Kx1) convolution of the same shape (F.conv2d,
groups=C, on a channels_last tensor: the fast layout for it on CPU), all in this process, and prints times and
ratios. Memory is the bytes a forward+backward holds: tensors saved for backward, the output and the gradients.

    python ops_dscn/benchmark.py                       # CPU, batch 1 and 32
    python ops_dscn/benchmark.py --device cuda         # CUDA rows (cpp and conv; pytorch with --with-pytorch)
    python ops_dscn/benchmark.py --batch 32 --models dsan_t --threads 2
    python ops_dscn/benchmark.py --fused --threads 2   # the fused CPU inference kernels against their layers
    python ops_dscn/benchmark.py --fused --train --batch 16 --threads 2   # fused forward+backward

With ``--fused`` it times instead the fused CPU inference kernels against the same layers run one by one (in
channels_last memory): ``conv_mlp`` (the block MLP), ``strip_offsets`` (a DSCN layer's offset branch),
``pointwise_conv`` (the attention's three 1x1 convs with their GELU, gate and shortcut) and ``dw_conv2d`` (its 5x5
depthwise conv, against ``F.conv2d``), and prints the speed-up and the largest difference between the two results.
``--fused --train`` times a training forward+backward of the MLP and of the two offset branches (``conv_mlp`` /
``strip_offsets`` with their fused backwards against the layers and autograd) and prints the largest difference
between the two input gradients.
"""

import argparse
import functools
import os
import statistics
import sys
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F

# Run as a script, this folder would come first on sys.path and `import ops_dscn` would find the source tree
# (which has no built extension) instead of the installed package.
_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or ".") == _HERE:
    sys.path.pop(0)
import ops_dscn  # noqa: E402

# The models benchmarked (their shapes come from the model definitions, see `stages`).
MODELS = ("dsan_t", "dsan_s")
IMG_SIZE = 224


class Stage(NamedTuple):
    """The shapes of one DSAN stage's layers at `IMG_SIZE`, as the model runs them."""

    channels: int
    size: int  # height = width of the stage's feature map
    kernel: int  # DSCN taps
    dw_kernel: int  # the depthwise strip conv of each offset branch (DSAN-S: not the DSCN kernel)
    groups: int  # DSCN offset groups
    mlp_ratio: int  # MLP expansion


@functools.cache
def stages(model_name: str) -> tuple[Stage, ...]:
    """Each stage's shapes, read from the first block of the stage of a `model_name` built by timm."""
    try:
        import dsan.models  # noqa: F401  (registers the DSAN models with timm)
    except ImportError:  # running from a checkout without `pip install -e .`
        sys.path.insert(0, os.path.dirname(_HERE))
        import dsan.models  # noqa: F401
    import timm

    model = timm.create_model(model_name, backend="pytorch")  # only read: the pure-PyTorch op needs nothing built
    result = []
    for i, info in enumerate(model.feature_info):
        block = getattr(model, f"block{i + 1}")[0]
        strip = block.attn.spatial_gating_unit.dscn_x
        result.append(Stage(strip.channels, IMG_SIZE // info["reduction"], strip.kernel_size, strip.dw_kernel_size,
                            strip.group, block.mlp.fc1.out_channels // strip.channels))
    return tuple(result)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, repeat: int, min_time: float = 0.2) -> float:
    """Median wall time of fn() in milliseconds, after warm-up."""
    for _ in range(2):
        fn()
    _sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < repeat or (time.perf_counter() - start < min_time and len(times) < 50 * repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _held_bytes(fn) -> int:
    """Bytes of the tensors saved for backward plus the output and the input gradients of one forward+backward."""
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().nbytes() if t.device.type != "meta" else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, inputs = fn()
    grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
    return sum(saved) + out.untyped_storage().nbytes() + sum(g.untyped_storage().nbytes() for g in grads)


def _cases(c, s, k, g, batch, axis, device, dtype):
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, s, s, c, generator=gen, dtype=dtype).to(device)
    off = (torch.randn(batch, s, s, g * k, generator=gen, dtype=dtype) * 2).to(device)
    weight = torch.randn(c, 1, 1, k, dtype=dtype, device=device) if axis == "x" else \
        torch.randn(c, 1, k, 1, dtype=dtype, device=device)
    pad = (0, k // 2) if axis == "x" else (k // 2, 0)
    x_nchw = x.permute(0, 3, 1, 2)  # NCHW view of NHWC memory: the channels_last layout

    def make(kind):
        def run(requires_grad=False):
            if kind == "conv":
                a = x_nchw.detach().requires_grad_(requires_grad)
                w = weight.detach().requires_grad_(requires_grad)
                return F.conv2d(a, w, padding=pad, groups=c), (a, w)
            a = x.detach().requires_grad_(requires_grad)
            o = off.detach().requires_grad_(requires_grad)
            return ops_dscn.dscn(a, o, k, pad=k // 2, group=g, axis=axis, backend=kind), (a, o)

        return run

    return {kind: make(kind) for kind in ("conv", "cpp", "pytorch")}


def _fused_cases(c, s, k, dw_k, g, ratio, batch):
    """{name: (fused_fn, layers_fn)} for the MLP and the two offset branches of one stage (float32 CPU); `k` is the
    DSCN kernel (the offsets per group), `dw_k` the offset branch's depthwise strip kernel."""
    gen = torch.Generator().manual_seed(0)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    x = r(batch, c, s, s).contiguous(memory_format=torch.channels_last)
    ch = c * ratio
    mlp = (x, r(ch, c, 1, 1, scale=c ** -0.5), r(ch), r(ch, 1, 3, 3, scale=1 / 3), r(ch),
           r(c, ch, 1, 1, scale=ch ** -0.5), r(c), x)
    cases = {"mlp": (lambda: torch.ops.ops_dscn.conv_mlp(*mlp), lambda: ops_dscn.conv_mlp_reference(*mlp))}
    for axis, on_x in (("x", True), ("y", False)):
        dw = r(c, 1, 1, dw_k, scale=1 / dw_k) if on_x else r(c, 1, dw_k, 1, scale=1 / dw_k)
        off = (x, dw, r(c), 1 + r(c, scale=0.1), r(c, scale=0.1), 1e-6, r(g * k, c, scale=c ** -0.5), r(g * k), on_x)
        cases[f"offsets {axis}"] = (lambda off=off: torch.ops.ops_dscn.strip_offsets(*off),
                                    lambda off=off: ops_dscn.strip_offsets_reference(*off))
    # The attention's three 1x1 convs with their epilogues: proj_1 + GELU, conv * u, proj_2 + scaled shortcut.
    gate, scale = r(batch, c, s, s).contiguous(memory_format=torch.channels_last), r(c, 1, 1)
    w = [(r(c, c, 1, 1, scale=c ** -0.5), r(c)) for _ in range(3)]

    def attn_1x1(fn):
        a = fn(x, *w[0], True)
        a = fn(a, *w[1], False, gate)
        return fn(a, *w[2], False, None, x, scale)

    cases["attn 1x1s"] = (lambda: attn_1x1(torch.ops.ops_dscn.pointwise_conv),
                          lambda: attn_1x1(ops_dscn.pointwise_conv_reference))
    # The attention's depthwise 5x5 (ops_dscn.dw_conv2d serves batches up to FORWARD_MAX_BATCH).
    dw5 = (x, r(c, 1, 5, 5, scale=0.2), r(c), (1, 1), (2, 2))
    cases["dw 5x5"] = (lambda: ops_dscn.dw_conv2d(*dw5), lambda: F.conv2d(*dw5, 1, c))
    return cases


def _mlp_train_case(c, s, ratio, batch):
    """(fused_fn, layers_fn) of one MLP forward+backward (float32 CPU); each returns the input gradient."""
    gen = torch.Generator().manual_seed(0)
    ch = c * ratio
    shapes_scales = (((batch, c, s, s), 1.0), ((ch, c, 1, 1), c ** -0.5), ((ch,), 1.0), ((ch, 1, 3, 3), 1 / 3),
                     ((ch,), 1.0), ((c, ch, 1, 1), ch ** -0.5), ((c,), 1.0))
    leaves = [(torch.randn(*shape, generator=gen) * scale).requires_grad_() for shape, scale in shapes_scales]
    leaves[0] = leaves[0].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(batch, c, s, s, generator=gen).contiguous(memory_format=torch.channels_last)

    def run(backend):
        y = ops_dscn.conv_mlp(*leaves, backend=backend)
        return torch.autograd.grad(y, leaves, grad)[0]

    return (lambda: run("cpp")), (lambda: run("pytorch"))


def _offsets_train_cases(c, s, k, dw_k, g, batch):
    """{name: (fused_fn, layers_fn)}: forward+backward of the two offset branches of one stage (float32 CPU; `k`: the
    DSCN kernel, `dw_k`: the branch's depthwise strip kernel); each returns the input gradient."""
    gen = torch.Generator().manual_seed(0)
    cases = {}
    for axis, on_x in (("x", True), ("y", False)):
        x = torch.randn(batch, c, s, s, generator=gen).contiguous(memory_format=torch.channels_last)
        dw = torch.randn(*((c, 1, 1, dw_k) if on_x else (c, 1, dw_k, 1)), generator=gen) / dw_k
        params = [dw, torch.randn(c, generator=gen), 1 + 0.1 * torch.randn(c, generator=gen),
                  0.1 * torch.randn(c, generator=gen), torch.randn(g * k, c, generator=gen) * c ** -0.5,
                  torch.randn(g * k, generator=gen)]
        leaves = [t.requires_grad_() for t in [x, *params]]
        grad = torch.randn(batch, s, s, g * k, generator=gen)

        def run(backend, leaves=leaves, grad=grad, on_x=on_x):
            x, dw, db, lnw, lnb, lw, lb = leaves
            y = ops_dscn.strip_offsets(x, dw, db, lnw, lnb, 1e-6, lw, lb, on_x, backend=backend)
            return torch.autograd.grad(y, leaves, grad)[0]

        cases[f"off {axis} train"] = (lambda run=run: run("cpp")), (lambda run=run: run("pytorch"))
    return cases


def fused_main(args) -> None:
    """Times the fused CPU kernels against their layers (--fused; --train: their forward+backward)."""
    what = "forward+backward (MLP, offset branches)" if args.train else "inference kernels"
    print(f"fused CPU {what}, float32, threads={torch.get_num_threads()} torch={torch.__version__}")
    header = f"{'model':7} {'st':>2} {'N':>3} {'kernel':>10} {'shape (HxWxC)':>14} | {'layers':>10} {'fused':>10} |" \
             f" layers/fused | max |diff|"
    print(header)
    print("-" * len(header))
    cpu = torch.device("cpu")
    for batch in args.batch:
        for model in args.models:
            for i, (c, s, k, dw_k, g, ratio) in enumerate(stages(model), start=1):
                cases = ({"mlp train": _mlp_train_case(c, s, ratio, batch),
                          **_offsets_train_cases(c, s, k, dw_k, g, batch)}
                         if args.train else _fused_cases(c, s, k, dw_k, g, ratio, batch))
                for name, (fused, layers) in cases.items():
                    with torch.inference_mode(not args.train):
                        t_layers, t_fused = _time(layers, cpu, args.repeat), _time(fused, cpu, args.repeat)
                        diff = (fused() - layers()).abs().max().item()
                    print(f"{model:7} {i:>2} {batch:>3} {name:>10} {f'{s}x{s}x{c}':>14} | {t_layers:8.3f}ms "
                          f"{t_fused:8.3f}ms | {t_layers / t_fused:11.2f}x | {diff:.1e}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the arguments; bad input is a one-line usage error (exit status 2)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--axes", nargs="+", default=["x", "y"], choices=["x", "y"])
    parser.add_argument("--repeat", type=int, default=5, help="minimum timed repetitions per measurement")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds per shape; each figure is the best round's median")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--with-pytorch", action="store_true", help="also time the pure-PyTorch op on CUDA")
    parser.add_argument("--no-pytorch", action="store_true", help="skip the (slow) pure-PyTorch op")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--fused", action="store_true",
                        help="time the fused CPU inference kernels (conv_mlp, strip_offsets) against their layers")
    parser.add_argument("--train", action="store_true",
                        help="with --fused: time forward+backward of the MLP and the offset branches (fused "
                             "backwards against autograd through their layers)")
    args = parser.parse_args(argv)
    if min(args.batch) < 1:
        parser.error(f"argument --batch: each must be >= 1, got {' '.join(map(str, args.batch))}")
    for flag in ("repeat", "rounds"):
        if getattr(args, flag) < 1:
            parser.error(f"argument --{flag}: must be >= 1, got {getattr(args, flag)}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"argument --threads: must be >= 1, got {args.threads}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if not ops_dscn.extension_available():
        raise SystemExit(f"the compiled op is not built: {ops_dscn.extension_error()}")
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.fused:
        return fused_main(args)
    dtype = getattr(torch, args.dtype)
    kinds = ["conv", "cpp"]
    if not args.no_pytorch and (device.type == "cpu" or args.with_pytorch):
        kinds.append("pytorch")

    print(f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} torch={torch.__version__}")
    header = f"{'model':7} {'st':>2} {'ax':>2} {'N':>3} {'shape (HxWxC) K G':>20} |"
    for kind in kinds:
        header += f" {kind + ' fwd':>11} {kind + ' f+b':>11} |"
    header += " cpp/conv fwd  f+b | pytorch/cpp fwd  f+b | mem cpp/conv"
    print(header)
    print("-" * len(header))
    for batch in args.batch:
        for model in args.models:
            for i, (c, s, k, _, g, _) in enumerate(stages(model), start=1):
                for axis in args.axes:
                    runs = _cases(c, s, k, g, batch, axis, device, dtype)
                    # The kinds take turns, round after round, and each keeps its best round: a burst of load
                    # on a shared machine then slows one round of every kind rather than all of one kind.
                    res = {}
                    for _ in range(args.rounds):
                        for kind in kinds:
                            run = runs[kind]

                            def fwd_bwd(run=run):
                                out, inputs = run(True)
                                torch.autograd.grad(out, inputs, torch.ones_like(out))

                            with torch.no_grad():
                                fwd = _time(run, device, args.repeat)
                            fb = _time(fwd_bwd, device, args.repeat)
                            res[kind, "fwd"] = min(res.get((kind, "fwd"), fwd), fwd)
                            res[kind, "fb"] = min(res.get((kind, "fb"), fb), fb)
                    mem = {kind: _held_bytes(lambda run=runs[kind]: run(True)) for kind in ("conv", "cpp")}
                    line = f"{model:7} {i:>2} {axis:>2} {batch:>3} {f'{s}x{s}x{c} {k:>2} {g:>2}':>20} |"
                    for kind in kinds:
                        line += f" {res[kind, 'fwd']:9.3f}ms {res[kind, 'fb']:9.3f}ms |"
                    line += (f" {res['cpp', 'fwd'] / res['conv', 'fwd']:8.2f}x "
                             f"{res['cpp', 'fb'] / res['conv', 'fb']:5.2f}x |")
                    if "pytorch" in kinds:
                        line += (f" {res['pytorch', 'fwd'] / res['cpp', 'fwd']:11.1f}x "
                                 f"{res['pytorch', 'fb'] / res['cpp', 'fb']:5.1f}x |")
                    else:
                        line += f" {'-':>11}  {'-':>5} |"
                    line += f" {mem['cpp'] / mem['conv']:6.2f}x"
                    print(line, flush=True)


if __name__ == "__main__":
    main()
