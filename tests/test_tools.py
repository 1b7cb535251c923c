"""Classification tools: the paper's params/FLOPs figures, the paper table, speed and memory scripts."""
import re
import subprocess
import sys

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


def test_dsan_t_readme_grouping_and_paper_table():
    r = get_flops.measure('dsan_t', groups=get_flops.DSAN_T_README_GROUPS)
    assert r['params'] == 4_639_680 and round(r['macs'] / 1e9, 3) == 0.993
    text = get_flops.paper_table()
    for needle in ('4,484,706', '0.941G', '4,639,680', '0.993G', '6,037,440', '19,880,248', '3.203G',
                   'dsan_t g=4/8/16/16', 'mIoU(MS) 43.5', '188.6 G'):
        assert needle in text
    rows = get_flops.format_table([r], (224, 224))
    assert '[4, 8, 16, 16]' in rows and '0.993' in rows


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
    assert all(r['img_per_s'] > 0 and r['timed'] >= 2 for r in results)
    assert abs(results[0]['gflops'] - get_flops.measure('dsan_t', (64, 64))['macs'] / 1e9) < 1e-9
    table = speed.format_results(results)
    assert 'dsan_t/x' in table and 'resnet18' in table and '1.00' in table


def test_get_memory_training_step():
    # The CPU figure is the rise of the process's peak RSS, so it is measured in a fresh process (in this long-lived
    # test process, memory freed by earlier tests is reused and hides the step's peak).
    res = subprocess.run([sys.executable, str(ROOT / 'classification/tools/get_memory.py'), 'dsan_t', '-b', '2',
                          '--img-size', '64', '--device', 'cpu', '--backend', BACKEND],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    m = re.search(r'training step peak \+([0-9.]+) MiB over ([0-9.]+) MiB .*total ([0-9.]+) MiB \[cpu_vmhwm\]',
                  res.stdout)
    assert m, res.stdout
    step, before, total = map(float, m.groups())
    assert step > 0 and before > 0 and abs(total - (before + step)) < 0.2
