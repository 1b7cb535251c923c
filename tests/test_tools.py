"""Classification tools: the paper's params/FLOPs figures, the paper table, speed and memory scripts."""
import csv
import json
import os
import re
import statistics
import subprocess
import sys
from types import SimpleNamespace

import pytest
import timm
import torch
from conftest import BACKEND, ROOT, load_tool, requires_cpp

get_flops = load_tool('classification/tools/get_flops.py')

# Spec §2 / issue: params and torchprofile GFLOPs at 224 with the DSCN op counted 0.
EXPECTED = {'dsan_t': (4_484_706, 0.941), 'dsan_t2': (6_037_440, 1.290), 'dsan_s': (19_880_248, 3.203)}


def dscn_own_macs(name: str, img: int = 224, groups=None) -> int:
    """2 multiply-adds per tap and output element, x- and y-strip, every block (stride 1, same padding)."""
    model = timm.create_model(name, backend=BACKEND)
    total = 0
    for i, (c, d, k) in enumerate(zip(model.embed_dims, model.depths, model.kernel_sizes)):
        hw = (img // 2 ** (i + 2)) ** 2
        total += d * 2 * (hw * c * k * 2)
    return total


@pytest.mark.parametrize('name', list(EXPECTED))
def test_get_flops_reproduces_paper_counting(name):
    r = get_flops.measure(name)
    params, gflops = EXPECTED[name]
    assert r['params'] == params
    assert abs(r['macs'] / 1e9 - gflops) < 1e-3, r['macs']
    assert r['macs_with_dscn'] - r['macs'] == dscn_own_macs(name)


def state_dict_params(model) -> int:
    """Parameters counted from the state_dict (its tensors minus the buffers: BN statistics), not model.parameters."""
    buffers = {name for name, _ in model.named_buffers()}
    return sum(v.numel() for k, v in model.state_dict().items() if k not in buffers)


def hooked_macs(model, img: int = 224) -> int:
    """The paper's MAC count rebuilt without torchprofile: module forward hooks plus the spec's block structure.

    torchprofile's rules: convolution = output elements x input channels per group x kernel taps; linear = output
    elements x input features; affine BatchNorm / LayerNorm = output elements; an elementwise product or a mean =
    output elements; the DSCN op = 0. Spec §2: each Block holds three elementwise products of its (C, H, W) output
    (layer_scale_1 *, layer_scale_2 *, and u * attn in the spatial gating unit); the head reads the token mean.
    """
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            total += output.numel() * module.in_channels // module.groups * module.kernel_size[0] * \
                module.kernel_size[1]
        elif isinstance(module, torch.nn.Linear):
            total += output.numel() * module.in_features
        elif isinstance(module, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
            total += output.numel()

    def block_hook(module, inputs, output):
        nonlocal total
        total += 3 * output.numel()

    def head_hook(module, inputs, output):
        nonlocal total
        total += inputs[0].numel()  # the mean over tokens that makes the head's input

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    for i in range(1, 5):
        handles += [b.register_forward_hook(block_hook) for b in getattr(model, f'block{i}')]
    handles.append(model.head.register_forward_hook(head_hook))
    # The hooks see the layers of the MLPs, offset branches and blocks only when they run one by one (not as the
    # fused inference kernels or with the norms folded).
    flags = ('fused_kernel', 'fused_offsets', 'fused_epilogue', 'fold_in_inference')
    fused = [(m, f) for m in model.modules() for f in flags if getattr(m, f, False)]
    try:
        for m, f in fused:
            setattr(m, f, False)
        with torch.no_grad():
            model.eval()(torch.randn(1, 3, img, img))
    finally:
        for h in handles:
            h.remove()
        for m, f in fused:
            setattr(m, f, True)
    return total


def _paper_table_rows(text: str) -> dict:
    """{label: (published params M or None, published GFLOPs or None, our params, our GFLOPs)} of the table."""
    rows = {}
    for line in text.splitlines():
        m = re.match(r'^(dsan_\w+ g=[\d/]+)\s+(?:([\d.]+)M\s+([\d.]+)G\s+[\d.]+)?\s*\|\s+([\d,]+)\s+([\d.]+)G', line)
        if m:
            label, pub_p, pub_f, ours_p, ours_f = m.groups()
            rows[label] = (pub_p and float(pub_p), pub_f and float(pub_f), int(ours_p.replace(',', '')),
                           float(ours_f))
    return rows


def test_paper_table_prints_measured_figures():
    """Every 'ours' figure of the paper table equals a count made here independently of the tool, and those
    measured counts round to the published ones for the grouping the README's figures were made with."""
    rows = _paper_table_rows(get_flops.paper_table())
    assert set(rows) == {'dsan_t g=1/4/8/8', 'dsan_t g=4/8/16/16', 'dsan_t2 g=4/8/16/16', 'dsan_s g=4/8/16/16'}
    measured, published = {}, {}
    for label, (pub_p, pub_f, ours_p, ours_f) in rows.items():
        name, groups = label.split(' g=')
        model = timm.create_model(name, groups=tuple(map(int, groups.split('/'))), backend=BACKEND)
        params, macs = state_dict_params(model), hooked_macs(model)
        assert ours_p == params, label
        assert ours_f == round(macs / 1e9, 3), (label, macs)
        measured[label] = (round(params / 1e6, 1), round(macs / 1e9, 1))
        if pub_p is not None:
            published[name] = (pub_p, pub_f)
    # The published 4.6 / 6.0 / 19.9 M and 1.0 / 1.3 / 3.2 G, within their rounding. DSAN-T's are those of groups
    # [4, 8, 16, 16], not of the official grouping [1, 4, 8, 8] (4.5 M / 0.9 G), as the table's note says.
    assert published == {'dsan_t': (4.6, 1.0), 'dsan_t2': (6.0, 1.3), 'dsan_s': (19.9, 3.2)}
    assert measured == {'dsan_t g=1/4/8/8': (4.5, 0.9), 'dsan_t g=4/8/16/16': published['dsan_t'],
                        'dsan_t2 g=4/8/16/16': published['dsan_t2'], 'dsan_s g=4/8/16/16': published['dsan_s']}


def test_format_table_prints_the_measured_row():
    r = get_flops.measure('dsan_t', groups=get_flops.DSAN_T_README_GROUPS)
    model = timm.create_model('dsan_t', groups=get_flops.DSAN_T_README_GROUPS, backend=BACKEND)
    assert r['params'] == state_dict_params(model) and r['macs'] == hooked_macs(model)
    row = get_flops.format_table([r], (224, 224)).splitlines()[-1].split()
    assert row[0] == 'dsan_t' and ' '.join(row[1:5]) == '[4, 8, 16, 16]'
    assert int(row[5].replace(',', '')) == r['params'] and float(row[6]) == round(r['macs'] / 1e9, 3)


@requires_cpp
def test_flops_without_compiled_op_count_the_same(monkeypatch):
    """The stand-in used when the op is not built gives the figures of the compiled op."""
    model = timm.create_model('dsan_t', depths=(1, 1, 2, 1), groups=(4, 8, 16, 16)).eval()
    with_op = get_flops.count_macs(model, (96, 64))
    monkeypatch.setattr(get_flops.ops_dscn, 'available_backends', lambda: ['pytorch'])
    model.set_backend('pytorch')
    assert get_flops.count_macs(model, (96, 64)) == with_op
    assert not any('_strip' in vars(m) for m in model.modules())  # the stand-in is removed afterwards


def test_get_flops_cli(capsys, tmp_path):
    model = timm.create_model('dsan_t', groups=(4, 8, 16, 16), backend=BACKEND)
    torch.save({'state_dict': model.state_dict()}, tmp_path / 'ckpt.pth')
    get_flops.main(['dsan_t', '--img-size', '64', '--checkpoint', str(tmp_path / 'ckpt.pth')])
    out = capsys.readouterr().out
    assert 'Input 3x64x64' in out and '[4, 8, 16, 16]' in out and '4,639,680' in out


def test_get_inf_speed_runs_and_reports():
    speed = load_tool('classification/tools/get_inf_speed.py')
    results = speed.run(['dsan_t', 'resnet18'], batch_size=2, img_size=64, warmup=1, iters=2,
                        backend=BACKEND, channels_last=True, micro_batch=1, flops=True)
    assert [r['model'] for r in results] == ['dsan_t', 'resnet18']
    assert [r['timed'] for r in results] == [2, 2]  # iters=2 and no --min-time: exactly 2 timed calls each
    assert [r['memory_format'] for r in results] == ['channels_last'] * 2  # --channels-last sets eager's format
    assert abs(results[0]['gflops'] - get_flops.measure('dsan_t', (64, 64))['macs'] / 1e9) < 1e-9
    model = timm.create_model('resnet18')
    assert results[1]['params'] == state_dict_params(model)


def test_get_inf_speed_interleaved_rounds_merge_every_timed_call(monkeypatch):
    """--rounds: every (model, mode) is timed once per round, in model/mode order, and its figures come from all
    its timed calls (a fake clock makes the arithmetic exact)."""
    speed = load_tool('classification/tools/get_inf_speed.py')
    order = []
    clock = [0.0]

    def fake_measure(runner, x, warmup=3, iters=10, min_time=0., amp_dtype=None, micro_batch=0):
        order.append(runner.tag)
        clock[0] += 1
        # call k of a model takes k seconds, so the merged median is checkable
        times = [clock[0]] * iters
        return speed._summary(times, [2 * t for t in times], x.shape[0])

    real_prepare = speed.prepare

    def tagged_prepare(model, mode, channels_last=False):
        prepared = real_prepare(model, mode, channels_last)
        prepared.runner.tag = (type(model).__name__, mode)
        return prepared

    monkeypatch.setattr(speed, 'measure', fake_measure)
    monkeypatch.setattr(speed, 'prepare', tagged_prepare)
    results = speed.run(['resnet10t', 'dsan_t'], batch_size=2, img_size=64, modes=('eager', 'fused'), iters=2,
                        backend=BACKEND, rounds=3)
    pairs = [('ResNet', 'eager'), ('ResNet', 'fused'), ('DSAN', 'eager'), ('DSAN', 'fused')]
    assert order == pairs * 3  # prepared and timed in turn, then two more interleaved rounds
    assert [r['timed'] for r in results] == [6] * 4 and all(r['rounds'] == 3 for r in results)
    # resnet10t eager ran at clock 1, 5 and 9 (2 calls each): median 5 s per batch of 2
    assert results[0]['sec_per_batch'] == 5 and results[0]['img_per_s'] == 2 / 5
    assert results[0]['img_per_cpu_s'] == 2 / 10
    assert results[3]['sec_per_batch'] == 8  # dsan_t fused: 4, 8, 12


# tiny settings of the tool's tests: a few forward calls of 2 images at 64x64
_TINY = ['--img-size', '64', '-b', '2', '--iters', '1', '--warmup', '1']


def test_get_inf_speed_every_eager_mode_gives_a_row_per_model():
    speed = load_tool('classification/tools/get_inf_speed.py')
    modes = ('eager', 'channels_last', 'fused')
    results = speed.run(['dsan_t', 'resnet10t'], batch_size=2, img_size=64, modes=modes, warmup=1, iters=1,
                        backend=BACKEND)
    assert [(r['model'], r['mode']) for r in results] == [(n, m) for n in ('dsan_t', 'resnet10t') for m in modes]
    assert [r['memory_format'] for r in results[:3]] == ['contiguous_format', 'channels_last', 'channels_last']
    assert all(r['img_per_s'] > 0 and r['batch_size'] == 2 and r['img_size'] == 64 for r in results)
    table = speed.format_results(results)
    assert all(m in table.splitlines()[0] for m in modes)
    assert re.search(r'^resnet10t +channels_last/eager [\d.]+x +fused/eager [\d.]+x$', table, re.M)


def _has_bn(model) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _all_channels_last(model) -> bool:
    return all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)


def test_get_inf_speed_prepare_fuses_a_copy_in_channels_last():
    speed = load_tool('classification/tools/get_inf_speed.py')
    model = timm.create_model('dsan_t', backend=BACKEND).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        ref = model(x)
        fused = speed.prepare(model, 'fused')
        assert fused.module is not model and fused.runner is fused.module
        assert not _has_bn(fused.module) and _has_bn(model)  # timm's hooks reached DSAN's; the model is untouched
        assert fused.input(x).is_contiguous(memory_format=torch.channels_last) and _all_channels_last(fused.module)
        torch.testing.assert_close(fused(x), ref, rtol=1e-4, atol=1e-4)
        cl = speed.prepare(model, 'channels_last')
        assert _has_bn(cl.module) and _all_channels_last(cl.module)
        assert cl.input(x).is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(cl(x), ref, rtol=1e-4, atol=1e-4)
        eager = speed.prepare(model, 'eager')
        assert eager.memory_format == torch.contiguous_format and eager.input(x).is_contiguous()
        assert not _all_channels_last(eager.module)
        assert speed.prepare(model, 'eager', channels_last=True).memory_format == torch.channels_last
    assert not _all_channels_last(model)
    with pytest.raises(ValueError, match='bogus'):
        speed.prepare(model, 'bogus')


@pytest.mark.slow
def test_get_inf_speed_prepare_fused_compile_matches_eager():
    speed = load_tool('classification/tools/get_inf_speed.py')
    model = timm.create_model('resnet10t').eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        prepared = speed.prepare(model, 'fused_compile')
        assert prepared.runner is not prepared.module and _all_channels_last(prepared.module)
        torch.testing.assert_close(prepared(x), model(x), rtol=1e-4, atol=1e-4)


def test_get_inf_speed_profile():
    speed = load_tool('classification/tools/get_inf_speed.py')
    assert speed.profile_mode(('compile', 'fused', 'eager')) == 'fused'
    assert speed.profile_mode(('fused_compile', 'compile')) == 'fused'
    assert speed.profile_mode(('compile',)) == 'channels_last'
    results = speed.run(['resnet10t'], batch_size=2, img_size=64, modes=('channels_last',), warmup=1, iters=1,
                        profile_rows=3)
    assert results[0]['profile']['mode'] == 'channels_last'
    assert 'aten::' in results[0]['profile']['table'] and 'Self CPU time total' in results[0]['profile']['table']


def test_get_inf_speed_cli_writes_json(tmp_path, capsys):
    speed = load_tool('classification/tools/get_inf_speed.py')
    out = tmp_path / 'speed.json'
    speed.main(['resnet10t', 'test_vit', '--modes', 'eager', 'fused', '--out', str(out), *_TINY])
    rows = json.loads(out.read_text())
    assert [(r['model'], r['mode']) for r in rows] == [(n, m) for n in ('resnet10t', 'test_vit')
                                                       for m in ('eager', 'fused')]
    assert rows[0]['gflops'] is None and rows[0]['img_per_s'] > 0  # NaN (no --flops) is null: strict JSON
    assert [p.name for p in tmp_path.iterdir()] == ['speed.json']  # no temporary file left behind
    text = capsys.readouterr().out
    assert 'resnet10t/x' in text and 'fused/eager' in text


def test_get_inf_speed_arguments(capsys):
    speed = load_tool('classification/tools/get_inf_speed.py')
    args = speed.parse_args([])
    assert args.models == ['dsan_t', 'efficientformer_l1', 'resnet18'] and args.modes == ['eager']
    assert speed.parse_args(['--all-modes']).modes == list(speed.MODES)
    for argv, words in ((['dsan_t', 'no_such_model_x'], ['argument models', "'no_such_model_x'"]),
                        (['--modes', 'eager', 'jit'], ['argument --modes', "'jit'"]),
                        (['--modes', 'eager', '--all-modes'], ['--all-modes'])):
        with pytest.raises(SystemExit) as e:
            speed.parse_args(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert all(w in err for w in words), err


class _FakeClock:
    """A deterministic perf_counter / process_time: time moves only when a fake workload says so."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def advance(self, wall: float, cpu: float = 0.0) -> None:
        self.wall += wall
        self.cpu += cpu

    def module(self):
        return SimpleNamespace(perf_counter=lambda: self.wall, process_time=lambda: self.cpu)


def test_get_inf_speed_arithmetic_on_a_fake_clock(monkeypatch):
    speed = load_tool('classification/tools/get_inf_speed.py')
    clock = _FakeClock()
    monkeypatch.setattr(speed, 'time', clock.module())
    # binary fractions: the sums and differences of the fake clock are exact
    costs = iter([(0.0, 0.0), (0.5, 1.0), (0.125, 0.5), (0.25, 2.0)])  # 1 warm-up call, 3 timed calls

    def model(x):
        clock.advance(*next(costs))

    r = speed.measure(model, torch.zeros(4, 3, 8, 8), warmup=1, iters=3)
    assert r['timed'] == 3
    assert r['sec_per_batch'] == 0.25 and r['img_per_s'] == 4 / 0.25  # median 0.25 s per batch of 4
    assert r['img_per_cpu_s'] == 4 / 1.0  # median CPU time 1.0 s
    rows = [dict(r, model='a', mode='eager', params=10, gflops=1.0),  # 16 img/s
            dict(r, model='b', mode='eager', params=20, gflops=2.0, img_per_s=4.0),
            dict(r, model='a', mode='compile', params=10, gflops=1.0, img_per_s=40.0),
            dict(r, model='b', mode='compile', params=20, gflops=2.0, img_per_s=5.0)]
    lines = speed.format_results(rows).splitlines()
    assert lines[0].split() == ['eager', 'compile'] and lines[1].split().count('a/x') == 2
    row_b = lines[3].split()
    # per mode: img/s, a's img/s over b's (> 1: a is faster), img/cpu-s
    assert row_b[:3] == ['b', '20', '2.000'] and [float(v) for v in row_b[3:]] == [4.0, 16 / 4, 4.0, 5.0, 40 / 5, 4.0]
    assert [float(v) for v in lines[2].split()[3:]] == [16.0, 1.0, 4.0, 40.0, 1.0, 4.0]
    # each model's speed-up over its first mode
    assert lines[-2:] == [f'{"a":<20} compile/eager 2.50x', f'{"b":<20} compile/eager 1.25x']
    # GFLOPs not counted (no --flops): a dash, not 'nan'
    uncounted = speed.format_results([dict(row, gflops=float('nan')) for row in rows]).splitlines()
    assert uncounted[3].split()[:3] == ['b', '20', '-'] and 'nan' not in ''.join(uncounted)


def test_train_throughput_arithmetic_on_a_fake_clock(monkeypatch):
    tool = load_tool('classification/tools/train_throughput.py')
    clock = _FakeClock()
    monkeypatch.setattr(tool, 'time', clock.module())

    def create(name, **kwargs):
        model = torch.nn.Linear(1, 1)
        model.tool_name, model.calls = name, 0
        return model

    monkeypatch.setattr(tool, 'model_factory', SimpleNamespace(create=create))
    # seconds per step of each model in rounds 0, 1, 2 (after 2 untimed warm-up steps)
    per_step = {'a': [0.5, 0.25, 1.0], 'b': [0.125, 0.125, 0.0625]}
    warmup, steps, batch = 2, 4, 8

    def fake_step(model, opt, x, y, loss_fn, amp_autocast=None):
        if model.calls >= warmup:
            clock.advance(per_step[model.tool_name][(model.calls - warmup) // steps])
        model.calls += 1

    monkeypatch.setattr(tool, '_step', fake_step)
    rows = tool.measure(['a', 'b'], img_size=8, batch_size=batch, warmup=warmup, steps=steps, rounds=3)
    for row in rows:
        expected = [batch * steps / (steps * t) for t in per_step[row['model']]]  # images / elapsed seconds
        assert row['per_round'] == expected
        assert row['img_per_sec'] == statistics.median(expected)
    assert [r['img_per_sec'] for r in rows] == [16.0, 64.0]


def test_train_throughput_compile_mode(monkeypatch):
    """--modes eager compile: a row per model and mode; the compiled one runs torch.compile'd training steps from the
    same weights (aot_eager here, so the test stays fast)."""
    tool = load_tool('classification/tools/train_throughput.py')
    compiled = []
    real_compile = torch.compile

    def spy_compile(model, **kwargs):
        compiled.append(model)
        return real_compile(model, backend='aot_eager')

    monkeypatch.setattr(tool.torch, 'compile', spy_compile)
    rows = tool.measure(['resnet10t'], img_size=32, batch_size=2, warmup=1, steps=1, rounds=2,
                        modes=('eager', 'compile'))
    assert [(r['model'], r['mode']) for r in rows] == [('resnet10t', 'eager'), ('resnet10t', 'compile')]
    assert len(compiled) == 1 and all(len(r['per_round']) == 2 and r['img_per_sec'] > 0 for r in rows)


def _tiny_classifier(name, **kwargs):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 1000))


@pytest.mark.slow
def test_train_throughput_profile_names_compiled_kernels(monkeypatch):
    """--profile: each row gets an op table of its training steps; the compiled step's table names inductor's
    generated kernels, which a model compiled without dsan.profiling.kernel_names does not."""
    import torch._inductor.config as inductor_config

    from dsan.profiling import op_table

    tool = load_tool('classification/tools/train_throughput.py')
    monkeypatch.setattr(tool, 'model_factory', SimpleNamespace(create=_tiny_classifier))
    rows = tool.measure(['tiny'], img_size=16, batch_size=2, warmup=1, steps=1, rounds=1, modes=('eager', 'compile'),
                        profile_rows=100)
    eager, compiled = (r['profile'] for r in rows)
    assert 'Self CPU time total' in eager and 'aten::convolution_backward' in eager and 'cpp_fused' not in eager
    assert 'cpp_fused' in compiled and 'aten::convolution_backward' in compiled
    assert inductor_config.cpp.enable_kernel_profile is False  # the setting is restored

    torch._dynamo.reset()  # else dynamo reuses the step compiled above for this model of the same structure
    plain = torch.compile(_tiny_classifier('tiny'))
    x = torch.randn(2, 3, 16, 16)
    assert 'cpp_fused' not in op_table(lambda: plain(x).sum().backward(), 'cpu', 100)


def test_profile_arguments_are_checked():
    from dsan.profiling import op_table

    with pytest.raises(ValueError, match='row_limit and calls must be >= 1; got 0 and 1'):
        op_table(lambda: None, 'cpu', row_limit=0)
    tool = load_tool('classification/tools/train_throughput.py')
    with pytest.raises(SystemExit) as err:
        tool.main(['tiny', '--profile', '-1'])
    assert err.value.code == 2


def test_train_throughput_times_the_training_loop():
    tool = load_tool('classification/tools/train_throughput.py')
    engine_py = str(ROOT / 'classification' / 'engine.py')
    rows = tool.measure(['resnet10t'], img_size=32, batch_size=2, warmup=1, steps=2, rounds=3, engines=[engine_py])
    assert [(r['model'], r['engine']) for r in rows] == [('resnet10t', engine_py)]
    assert len(rows[0]['per_round']) == 3 and rows[0]['img_per_sec'] == statistics.median(rows[0]['per_round'])


def _get_memory_step(batch: int):
    res = subprocess.run([sys.executable, str(ROOT / 'classification/tools/get_memory.py'), 'dsan_t', '-b', str(batch),
                          '--img-size', '64', '--device', 'cpu', '--backend', BACKEND],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    m = re.search(r'training step peak \+([0-9.]+) MiB over ([0-9.]+) MiB .*total ([0-9.]+) MiB \[cpu_vmhwm\]',
                  res.stdout)
    assert m, res.stdout
    return float(m.group(1))


def test_get_memory_training_step():
    # The CPU figure is the rise of the process's peak RSS, so it is measured in a fresh process (in this long-lived
    # test process, memory freed by earlier tests is reused and hides the step's peak).
    step2, step8 = _get_memory_step(2), _get_memory_step(8)
    # The step allocates the gradients (one float32 per parameter) and keeps them: a floor independent of the tool.
    grads_mib = state_dict_params(timm.create_model('dsan_t')) * 4 / 2 ** 20
    assert step2 >= grads_mib, (step2, grads_mib)
    # Activations grow with the batch (measured: about 8 MiB per 64 px image for DSAN-T).
    assert step8 - step2 > 10, (step2, step8)


def test_get_memory_inference_mode_and_the_original_flags():
    """The original tool's --mode inference (an eval forward without gradients), --shape H W and --batch_size."""
    res = subprocess.run([sys.executable, str(ROOT / 'classification/tools/get_memory.py'), 'dsan_t', '--batch_size',
                          '8', '--shape', '64', '96', '--mode', 'inference', '--device', 'cpu', '--backend', BACKEND],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    m = re.search(r'batch 8 at 64x96, cpu: inference forward peak \+([0-9.]+) MiB', res.stdout)
    assert m, res.stdout
    assert float(m.group(1)) < _get_memory_step(8)  # no activations kept for a backward, no gradients


def test_get_inf_speed_times_the_backbone_without_its_head():
    tool = load_tool('classification/tools/get_inf_speed.py')
    assert tool.parse_args(['dsan_t', '--no-head']).head is False
    model = tool.create('dsan_t', backend=BACKEND, head=False).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 256, 2, 2)  # the last stage's features, unpooled
    rows = tool.run(['dsan_t'], batch_size=1, img_size=64, warmup=1, iters=1, backend=BACKEND, head=False)
    assert rows[0]['img_per_s'] > 0


def test_get_memory_arithmetic(monkeypatch):
    mem = load_tool('classification/tools/get_memory.py')
    status = {'VmRSS': 1000, 'VmHWM': 5096}  # KiB
    monkeypatch.setattr(mem, '_proc_status_kib', status.get)
    monkeypatch.setattr(mem, '_reset_cpu_peak', lambda: True)
    r = mem.training_step_memory('resnet10t', batch_size=2, img_size=64, device='cpu')
    assert (r['before_mib'], r['peak_step_mib'], r['peak_total_mib']) == (1000 / 1024, 4.0, 5096 / 1024)
    assert r['method'] == 'cpu_vmhwm'
    monkeypatch.setattr(mem, '_reset_cpu_peak', lambda: False)
    assert mem.training_step_memory('resnet10t', 2, 64)['method'].startswith('cpu_vmhwm_unreset')


# ------------------------------------------------------------------------------------ measurement-tool defects


def _usage_error(fn, argv, capsys) -> str:
    """Run `fn(argv)`, which must stop with a usage error (exit status 2, no traceback); its error line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        fn(argv)
    assert e.value.code == 2, (argv, e.value.code)
    err = capsys.readouterr().err
    assert 'Traceback' not in err and err.strip(), (argv, err)
    return err.strip().splitlines()[-1]


def _tiny_net(width: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, width, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(width, 10)).eval()


def test_get_inf_speed_later_rounds_time_compiled_code(monkeypatch):
    """--rounds with compiled modes: preparing a model must not drop the code compiled for the models before it, so
    that the later rounds (no warm-up) time compiled calls, not a recompilation. A counting dynamo backend (no
    inductor: fast) sees every graph compiled."""
    speed = load_tool('classification/tools/get_inf_speed.py')
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    widths = {'a': 4, 'b': 6}
    monkeypatch.setattr(speed, 'create', lambda name, checkpoint=None, backend=None, head=True: _tiny_net(widths[name]))
    monkeypatch.setattr(speed, 'compile_model', lambda module: torch.compile(module, backend=counting_backend))
    real_measure = speed.measure
    compiled_in_later_rounds = []

    def spy_measure(runner, x, warmup=3, **kwargs):
        before = len(graphs)
        result = real_measure(runner, x, warmup=warmup, **kwargs)
        if warmup == 0:  # the calls of the rounds after the first
            compiled_in_later_rounds.append(len(graphs) - before)
        return result

    monkeypatch.setattr(speed, 'measure', spy_measure)
    results = speed.run(['a', 'b'], batch_size=1, img_size=8, modes=('compile', 'fused_compile'), warmup=1, iters=1,
                        rounds=3)
    assert [r['timed'] for r in results] == [3] * 4
    assert len(graphs) >= 4  # each (model, mode) was compiled in the first round
    assert compiled_in_later_rounds == [0] * 8  # 4 pairs x 2 later rounds, none compiling again


def test_get_flops_non_dsan_model(capsys):
    """A timm model without DSCN groups (the help says timm model names): its row has '-' for the groups."""
    r = get_flops.measure('resnet18', (32, 32))
    assert r['groups'] is None and r['params'] == 11_689_512
    assert (r['macs'], r['macs_with_dscn']) == get_flops.count_macs(timm.create_model('resnet18').eval(), (32, 32))
    get_flops.main(['resnet18', 'dsan_t', '--img-size', '32'])
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows['resnet18'][1:3] == ['-', '11,689,512'] and float(rows['resnet18'][3]) == round(r['macs'] / 1e9, 3)
    assert ' '.join(rows['dsan_t'][1:5]) == '[1, 4, 8, 8]'


@pytest.mark.parametrize('argv, words', [
    (['no_such_model_x'], ['argument models', "'no_such_model_x'"]),
    (['resnet18', '--img-size', '0'], ['argument --img-size', '>= 1', 'got 0']),
    (['dsan_t', '--img-size', '16'], ['argument --img-size', '>= 32', 'got 16 16']),
    (['dsan_t', '--img-size', '64', '64', '64'], ['argument --img-size', 'H or H W', '3 values']),
    (['dsan_t', '--groups', '3', '4', '8', '8'], ['argument --groups', '[32, 64, 160, 256]', 'got 3 4 8 8']),
    (['dsan_t', '--groups', '0', '4', '8', '8'], ['argument --groups', '>= 1', 'got 0 4 8 8']),
    (['resnet18', '--groups', '1', '1', '1', '1'], ['argument --groups', 'DSAN models only', 'resnet18']),
    (['dsan_t', '--checkpoint', 'MISSING'], ['argument --checkpoint', 'existing file', 'missing.pth']),
    (['dsan_t', '--checkpoint', 'GARBAGE'], ['argument --checkpoint', 'garbage.pth']),
    (['vit_tiny_patch16_224', '--img-size', '64'], ['argument --img-size', 'vit_tiny_patch16_224', '64x64']),
])
def test_get_flops_arguments(argv, words, capsys, tmp_path):
    (tmp_path / 'garbage.pth').write_bytes(b'not a checkpoint')
    paths = {'MISSING': str(tmp_path / 'missing.pth'), 'GARBAGE': str(tmp_path / 'garbage.pth')}
    line = _usage_error(get_flops.main, [paths.get(a, a) for a in argv], capsys)
    assert all(w in line for w in words), line


@pytest.mark.parametrize('argv, words', [
    (['--threads', '0'], ['argument --threads', '>= 1', 'got 0']),
    (['--device', 'tpu'], ['argument --device', "'cpu' or 'cuda[:N]'", "'tpu'"]),
    (['--device', 'cuda'], ['argument --device', "'cuda'", 'no CUDA GPU']),
    (['--backend', 'fast'], ['argument --backend', "'fast'"]),
    (['dsan_t', '--checkpoint', 'MISSING'], ['argument --checkpoint', 'existing file', 'missing.pth']),
    (['dsan_t', 'dsan_s', '--checkpoint', 'FILE'], ['argument --checkpoint', 'exactly one DSAN model', 'got 2',
                                                     'dsan_t dsan_s']),
    (['resnet18', '--checkpoint', 'FILE'], ['argument --checkpoint', 'exactly one DSAN model', 'got 0']),
    (['resnet18', '--out', 'NODIR/speed.json'], ['argument --out', 'does not exist', 'nodir']),
    (['resnet18', '--out', 'FILE/speed.json'], ['argument --out', 'is a file, not a folder', 'file.pth']),
    (['resnet18', '--out', 'DIR'], ['argument --out', 'file name', 'got the folder']),
])
def test_get_inf_speed_argument_checks(argv, words, capsys, tmp_path, monkeypatch):
    """Bad input stops before anything is timed (--out used to fail only when the results were written)."""
    speed = load_tool('classification/tools/get_inf_speed.py')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)  # --device cuda is refused on any machine
    (tmp_path / 'file.pth').write_bytes(b'')
    paths = {'MISSING': tmp_path / 'missing.pth', 'FILE': tmp_path / 'file.pth', 'DIR': tmp_path}
    argv = [str(paths[a]) if a in paths else a.replace('NODIR', str(tmp_path / 'nodir')).replace(
        'FILE', str(tmp_path / 'file.pth')) for a in argv]
    line = _usage_error(speed.parse_args, argv, capsys)
    assert all(w in line for w in words), line
    assert [p.name for p in tmp_path.iterdir()] == ['file.pth']  # nothing written


def test_cam_visual_overlay_paths_are_distinct(tmp_path):
    cam = load_tool('classification/tools/cam_visual.py')
    images = [str(tmp_path / p) for p in ('a/1.jpg', 'b/1.jpg', 'b/2.jpg', 'b/2.png', '3.jpg')]
    out = cam.overlay_paths(images, str(tmp_path), 'cams', 'dsan_t')
    assert out == [os.path.join('cams', p) for p in ('a/1_dsan_t.jpg', 'b/1_dsan_t.jpg', 'b/2_jpg_dsan_t.jpg',
                                                      'b/2_png_dsan_t.jpg', '3_dsan_t.jpg')]


def _write_images(folder, names):
    from PIL import Image
    for i, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new('RGB', (24, 24), (40 * i, 90, 200 - 40 * i)).save(path)


def test_cam_visual_images_of_subfolders_keep_their_paths(tmp_path, capsys):
    """imgs/cats/1.jpg and imgs/dogs/1.jpg used to be written to the same overlay; cams.csv now names each image's
    own overlay. --class-index beyond the model's classes is a usage error, checked once the model is built."""
    pytest.importorskip('pytorch_grad_cam')
    cam = load_tool('classification/tools/cam_visual.py')
    imgs, out_dir = tmp_path / 'imgs', tmp_path / 'cams'
    _write_images(imgs, ['cats/1.jpg', 'dogs/1.jpg'])
    base = ['--model', 'dsan_t', '--images-dir', str(imgs), '--out-dir', str(out_dir), '--img-size', '64',
            '--device', 'cpu', '--random-weights']
    written = cam.main(base)
    assert written == [str(out_dir / 'cats' / '1_dsan_t.jpg'), str(out_dir / 'dogs' / '1_dsan_t.jpg')]
    assert all(os.path.getsize(w) > 0 for w in written)
    with open(out_dir / 'cams.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert [(r['image'], r['overlay']) for r in rows] == [(str(imgs / 'cats' / '1.jpg'), written[0]),
                                                          (str(imgs / 'dogs' / '1.jpg'), written[1])]
    line = _usage_error(cam.main, [*base, '--class-index', '1000'], capsys)
    assert all(w in line for w in ('argument --class-index', '[0, 999]', '1000 classes', 'got 1000')), line
    line = _usage_error(cam.main, [*base, '--images-dir', str(tmp_path / 'none')], capsys)
    assert 'argument --images-dir' in line and 'none' in line, line


def test_cam_visual_needs_weights(tmp_path, capsys, monkeypatch):
    """Without --checkpoint the tool explained a random model without a word; the original read
    pretrained/<model>.pth.tar, which is now the default, and without it the flag is required."""
    pytest.importorskip('pytorch_grad_cam')
    cam = load_tool('classification/tools/cam_visual.py')
    imgs = tmp_path / 'imgs'
    _write_images(imgs, ['1.jpg'])
    monkeypatch.chdir(tmp_path)
    base = ['--model', 'dsan_t', '--images-dir', str(imgs), '--out-dir', str(tmp_path / 'cams'), '--img-size', '64',
            '--device', 'cpu']
    line = _usage_error(cam.main, base, capsys)
    assert 'argument --checkpoint: required' in line and 'pretrained/dsan_t.pth.tar' in line, line
    line = _usage_error(cam.main, [*base, '--checkpoint', 'x.pth', '--random-weights'], capsys)
    assert 'argument --random-weights: not allowed with --checkpoint' in line, line
    model = timm.create_model('dsan_t')
    (tmp_path / 'pretrained').mkdir()
    torch.save({'state_dict': model.state_dict()}, tmp_path / 'pretrained' / 'dsan_t.pth.tar')
    assert len(cam.main(base)) == 1
    assert 'weights from pretrained/dsan_t.pth.tar' in capsys.readouterr().err


def test_train_throughput_amp_autocasts_the_bare_step(monkeypatch):
    """--amp: the bare step runs its forward and loss under autocast (bfloat16 on the CPU), as it says."""
    tool = load_tool('classification/tools/train_throughput.py')
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 1000)  # the tool draws targets of 1000 classes

        def forward(self, x):
            y = self.fc(x.flatten(1)[:, :4])
            seen.append((torch.is_autocast_enabled('cpu'), y.dtype))
            return y

    monkeypatch.setattr(tool, 'model_factory', SimpleNamespace(create=lambda name, **kwargs: Recorder()))
    tool.measure(['rec'], img_size=2, batch_size=2, warmup=1, steps=1, rounds=2, amp=True)
    assert seen == [(True, torch.bfloat16)] * 3  # 1 warm-up step and 2 timed rounds of 1 step
    seen.clear()
    tool.measure(['rec'], img_size=2, batch_size=2, warmup=1, steps=1, rounds=1)
    assert seen == [(False, torch.float32)] * 2


@pytest.mark.parametrize('argv, words', [
    (['resnet10t', '-b', '0'], ['argument --batch-size', '>= 1', 'got 0']),
    (['resnet10t', '--steps', '0'], ['argument --steps', '>= 1', 'got 0']),
    (['resnet10t', '--rounds', '0'], ['argument --rounds', '>= 1', 'got 0']),
    (['resnet10t', '--threads', '0'], ['argument --threads', '>= 1', 'got 0']),
    (['resnet10t', 'no_such_model_x'], ['argument models', "'no_such_model_x'"]),
    (['resnet10t', '--engine', 'MISSING'], ['argument --engine', 'existing', 'missing_engine.py']),
])
def test_train_throughput_argument_checks(argv, words, capsys, tmp_path):
    tool = load_tool('classification/tools/train_throughput.py')
    argv = [str(tmp_path / 'missing_engine.py') if a == 'MISSING' else a for a in argv]
    line = _usage_error(tool.main, argv, capsys)
    assert all(w in line for w in words), line


@pytest.mark.parametrize('argv, words', [
    (['resnet10t', '-b', '0'], ['argument --batch-size', '>= 1', 'got 0']),
    (['resnet10t', '--img-size', '0'], ['argument --img-size', '>= 1', 'got 0']),
    (['resnet10t', '--shape', '64', '64', '64'], ['argument --img-size', 'H [W]', 'got 64 64 64']),
    (['resnet10t', '--mode', 'inference', '--optimizer'], ['--mode inference', 'no --optimizer']),
    (['dsan_t', '--backend', 'fast'], ['argument --backend', "'fast'"]),
    (['no_such_model_x'], ['argument model', "'no_such_model_x'"]),
])
def test_get_memory_argument_checks(argv, words, capsys):
    mem = load_tool('classification/tools/get_memory.py')
    line = _usage_error(mem.parse_args, argv, capsys)
    assert all(w in line for w in words), line


def test_get_memory_cpu_label_names_the_process_rss(monkeypatch, capsys):
    """On CPU the 'before' figure is the whole process's resident set, and the output says so (it said
    'model + input')."""
    mem = load_tool('classification/tools/get_memory.py')
    monkeypatch.setattr(mem, '_proc_status_kib', {'VmRSS': 1024 * 300, 'VmHWM': 1024 * 340}.get)
    monkeypatch.setattr(mem, '_reset_cpu_peak', lambda: True)
    r = mem.main(['resnet10t', '-b', '2', '--img-size', '32', '--device', 'cpu'])
    assert r['before_what'] == 'process RSS'
    out = capsys.readouterr().out
    assert 'training step peak +40.0 MiB over 300.0 MiB (process RSS), total 340.0 MiB [cpu_vmhwm]' in out, out
    assert 'model + input' not in out


def _convert_source(tmp_path):
    src = tmp_path / 'src.pth'
    torch.save({'state_dict': timm.create_model('dsan_t', backend=BACKEND).state_dict()}, src)
    return src


def test_convert_checkpoint_bad_destination_is_one_line(tmp_path, capsys, monkeypatch):
    """A dst that is a folder, or under a regular file, is refused before anything is read or written; an OSError
    while writing (here: a full disk) is the same one-line error, with no temporary file left."""
    convert = load_tool('tools/convert_checkpoint.py')
    src = _convert_source(tmp_path)
    (tmp_path / 'out').mkdir()
    (tmp_path / 'afile').write_bytes(b'x')
    for dst, words in ((tmp_path / 'out', ['folder', 'out']),
                       (tmp_path / 'afile' / 'x.pth', ['is a file', 'afile']),
                       (tmp_path / 'afile' / 'sub' / 'x.pth', ['is a file', 'afile'])):
        capsys.readouterr()
        assert convert.main([str(src), str(dst)]) == 2
        err = capsys.readouterr().err
        assert err.startswith('convert_checkpoint.py: error: dst ') and err.count('\n') == 1, err
        assert all(w in err for w in words), err
    assert list((tmp_path / 'out').iterdir()) == []

    def full_disk(*args, **kwargs):
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(convert.torch, 'save', full_disk)
    assert convert.main([str(src), str(tmp_path / 'new' / 'x.pth')]) == 2
    err = capsys.readouterr().err
    assert err.startswith('convert_checkpoint.py: error: ') and 'No space left on device' in err, err
    assert sorted(p.name for p in tmp_path.rglob('*')) == ['afile', 'new', 'out', 'src.pth']


def test_ops_benchmark_shapes_are_the_models(monkeypatch):
    """The shapes ops_dscn/benchmark.py times for each model and stage are those the model runs: the DSCN kernel
    and groups, the offset branch's depthwise kernel (DSAN-S: 9/7/5/5, not the DSCN kernel), the MLP, and the
    feature-map size at 224 (seen by hooks on a real forward)."""
    bench = load_tool('ops_dscn/benchmark.py')
    calls = {}

    def record(name, real):
        def fn(*args, **kwargs):
            calls[name] = [tuple(a.shape) if torch.is_tensor(a) else a for a in args]
            return real(*args, **kwargs)
        return fn

    for attr, key in (('strip_offsets_reference', 'offsets'), ('strip_offsets', 'offsets train'),
                      ('conv_mlp_reference', 'mlp')):
        monkeypatch.setattr(bench.ops_dscn, attr, record(key, getattr(bench.ops_dscn, attr)))
    for name in bench.MODELS:
        model = timm.create_model(name, backend=BACKEND).eval()
        firsts = [getattr(model, f'block{i}')[0] for i in range(1, 5)]
        seen = {}

        def note_offset_source(module, inputs, seen=seen):  # the (N, C, H, W) map the offset branches read
            seen.setdefault(module, tuple(inputs[1].shape))

        hooks = [b.attn.spatial_gating_unit.dscn_x.register_forward_pre_hook(note_offset_source) for b in firsts]
        with torch.inference_mode():
            model(torch.randn(1, 3, 224, 224))
        for h in hooks:
            h.remove()
        stages = bench.stages(name)
        assert len(stages) == 4
        for i, (stage, block) in enumerate(zip(stages, firsts)):
            sgu = block.attn.spatial_gating_unit
            c, s = stage.channels, stage.size
            assert seen[sgu.dscn_x] == (1, c, s, s), (name, i)
            assert (stage.kernel, stage.groups) == (sgu.dscn_x.kernel_size, sgu.dscn_x.group), (name, i)
            cases = bench._fused_cases(c, s, stage.kernel, stage.dw_kernel, stage.groups, stage.mlp_ratio, 1)
            train = bench._offsets_train_cases(c, s, stage.kernel, stage.dw_kernel, stage.groups, 1)
            for axis, strip in (('x', sgu.dscn_x), ('y', sgu.dscn_y)):
                dw, offset = strip.dw_conv[0].weight, strip.offset.weight
                for case, key in ((cases[f'offsets {axis}'], 'offsets'), (train[f'off {axis} train'], 'offsets train')):
                    calls.pop(key, None)
                    case[1]()  # the layers' function, which records its operands
                    x, dw_shape, *_ = calls[key]
                    assert x == (1, c, s, s) and dw_shape == tuple(dw.shape), (name, i, axis, key, dw_shape)
                    ln_w, lin_w = calls[key][3], calls[key][6]
                    assert ln_w == (c,) and lin_w == tuple(offset.shape), (name, i, axis, key)
            cases['mlp'][1]()
            assert calls['mlp'][1] == tuple(block.mlp.fc1.weight.shape), (name, i)
    assert [s.dw_kernel for s in bench.stages('dsan_s')] == [9, 7, 5, 5]


@pytest.mark.parametrize('argv, words', [
    (['--batch', '1', '0'], ['argument --batch', '>= 1', 'got 1 0']),
    (['--rounds', '0'], ['argument --rounds', '>= 1', 'got 0']),
    (['--repeat', '0'], ['argument --repeat', '>= 1', 'got 0']),
    (['--threads', '0'], ['argument --threads', '>= 1', 'got 0']),
])
def test_ops_benchmark_argument_checks(argv, words, capsys):
    bench = load_tool('ops_dscn/benchmark.py')
    line = _usage_error(bench.main, argv, capsys)
    assert all(w in line for w in words), line


def test_plot_curves_output_folder_and_bad_csv(tmp_path, capsys):
    plot = load_tool('classification/tools/plot_curves.py')
    summary = tmp_path / 'summary.csv'
    summary.write_text('epoch,train_loss,eval_top1,lr\n0,1.0,5,0.001\n1,0.9,6,0.0005\n')
    out = tmp_path / 'new' / 'deeper' / 'curves.png'
    plot.main([str(summary), '-o', str(out)])  # a missing folder is made
    from PIL import Image
    assert Image.open(out).size == (1500, 400)
    no_loss = tmp_path / 'no_loss.csv'
    no_loss.write_text('epoch,eval_top1\n0,5\n')
    (tmp_path / 'afile').write_bytes(b'')
    for argv, words in (([str(no_loss)], ['argument summary', 'no train_loss column', 'epoch, eval_top1']),
                        ([str(tmp_path / 'missing.csv')], ['argument summary', 'missing.csv']),
                        ([str(summary), '-o', str(tmp_path / 'afile' / 'c.png')], ['argument -o/--out', 'afile']),
                        ([str(summary), '-o', str(tmp_path / 'new')], ['argument -o/--out', 'folder']),
                        ([str(summary), '-o', str(tmp_path / 'c.txt')], ['argument -o/--out', 'c.txt', 'png'])):
        line = _usage_error(plot.main, argv, capsys)
        assert all(w in line for w in words), (argv, line)
    assert not (tmp_path / 'training_curves.png').exists()


def test_install_mm_uses_the_active_environment(tmp_path):
    """scripts/install_mm.sh installs into the activated environment (README's installation by hand), not into a
    .venv the user never made; an explicit VENV still wins."""
    env = {k: v for k, v in os.environ.items() if k not in ('VENV', 'VIRTUAL_ENV')}
    script = os.path.join(ROOT, 'scripts', 'install_mm.sh')
    for extra, named in (({'VIRTUAL_ENV': str(tmp_path / 'active')}, 'active'),
                         ({'VIRTUAL_ENV': str(tmp_path / 'active'), 'VENV': str(tmp_path / 'chosen')}, 'chosen')):
        r = subprocess.run(['bash', script], env={**env, **extra}, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and f'no virtual environment at {tmp_path / named}' in r.stderr, r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the error given where there is no GPU')
@pytest.mark.parametrize('tool', [
    'classification/tools/get_memory.py', 'classification/tools/train_throughput.py dsan_t',
    'classification/tools/cam_visual.py --random-weights', 'classification/tools/get_inf_speed.py dsan_t',
    'segmentation/tools/visualize.py cfg.py ckpt.pth --image-dir x', 'segmentation/tools/get_speed.py',
    'detection/tools/visualize.py cfg.py ckpt.pth --image-dir x', 'detection/tools/get_speed.py'])
def test_tools_refuse_a_cuda_device_where_there_is_none(tool):
    """One usage line naming --device, before any work (most tools stopped in a CUDA runtime traceback)."""
    script, *args = tool.split()
    r = subprocess.run([sys.executable, str(ROOT / script), *args, '--device', 'cuda:0'], capture_output=True,
                       text=True, timeout=300, env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].endswith("error: argument --device: got 'cuda:0', but no CUDA GPU is "
                                                      'available') and 'Traceback' not in r.stderr


def test_device_type_names_what_is_wrong():
    import argparse

    from dsan.cli import device_problem, device_type
    assert device_type('') == '' and device_type('cpu') == 'cpu'
    assert device_problem('gpu0') == "expected 'cpu' or 'cuda[:N]', got 'gpu0'"
    assert device_problem('meta') == "expected 'cpu' or 'cuda[:N]', got 'meta'"
    with pytest.raises(argparse.ArgumentTypeError, match="expected 'cpu' or 'cuda"):
        device_type('tpu')


@pytest.mark.parametrize('args, message', [
    ([], 'usage: '), (['data/x', '--model', 'dsan_t'], "must be a positive integer, got 'data/x'"),
    (['0'], "must be a positive integer, got '0'")])
def test_distributed_train_sh_checks_its_process_count(args, message):
    r = subprocess.run(['bash', str(ROOT / 'classification/distributed_train.sh'), *args], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and message in r.stderr, r.stderr


@pytest.mark.parametrize('tool, argv, message', [
    ('classification/tools/get_inf_speed.py', ['dsan_t', '--mode', 'w/o head'],
     "--mode is a flag of the original scripts; here: --no-head for 'w/o head'"),  # was taken as --modes
    ('classification/tools/get_inf_speed.py', ['dsan_t', '0'], "unknown timm model '0' (the original's GPU id? here: "
                                                                '--device cuda:0)'),
    ('classification/tools/get_memory.py', ['dsan_t', '--gpu_id', '0'], '--gpu_id is a flag of the original scripts; '
                                                                        'here: --device cuda:N'),
])
def test_original_spellings_name_their_replacement(tool, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        load_tool(tool).parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_original_spellings_leave_abbreviations_of_real_flags_alone():
    get_memory = load_tool('classification/tools/get_memory.py')
    assert get_memory.parse_args(['dsan_t', '--g']).grad_checkpointing is True  # was ambiguous with --gpu_id


def test_convert_checkpoint_takes_use_ema_as_validate_does():
    assert load_tool('tools/convert_checkpoint.py').parse_args(['a.pth', 'b.pth', '--use-ema']).ema is True
