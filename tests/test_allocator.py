"""dsan.allocator.keep_freed_memory: glibc keeps a freed 64 MiB tensor for reuse; the C library defaults and a
user's own allocator settings are left alone. Each case runs in a fresh interpreter (malloc settings are
process-wide)."""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _is_glibc() -> bool:
    if not sys.platform.startswith('linux'):
        return False
    try:
        return bool(ctypes.CDLL(None).gnu_get_libc_version)
    except (OSError, AttributeError):
        return False


pytestmark = pytest.mark.skipif(not _is_glibc(), reason='glibc malloc only')

# Allocates, touches and frees a 64 MiB tensor; reports the bytes glibc had mmapped for it and what it kept after.
_PROBE = r'''
import ctypes, json, sys
import torch
from dsan.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks', 'fordblks',
                 'keepcost')]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
applied = [keep_freed_memory() for _ in range(int(sys.argv[1]))]
n = 64 << 20
before = libc.mallinfo2()
t = torch.empty(n // 4).fill_(1.0)
during = libc.mallinfo2()
del t
after = libc.mallinfo2()
t = torch.empty(n // 4).fill_(2.0)  # the same size again: served from what was kept, or mapped anew
again = libc.mallinfo2()
print(json.dumps(dict(applied=applied, mmapped=during.hblkhd - before.hblkhd,
                      unmapped=during.hblkhd - after.hblkhd, kept_free=after.fordblks - before.fordblks,
                      regrown=again.arena - after.arena, remapped=again.hblkhd - after.hblkhd)))
'''
_N = 64 << 20


def _probe(calls: int, **env: str) -> dict:
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith('MALLOC_') and k not in ('GLIBC_TUNABLES', 'LD_PRELOAD')}
    full_env.update(env)
    full_env['PYTHONPATH'] = os.pathsep.join(p for p in (ROOT, os.environ.get('PYTHONPATH', '')) if p)
    out = subprocess.run([sys.executable, '-c', _PROBE, str(calls)], env=full_env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_glibc_defaults_give_a_large_freed_tensor_back():
    # The control: without the call a 64 MiB tensor is its own mapping, unmapped when freed.
    r = _probe(0)
    assert r['applied'] == []
    assert r['mmapped'] >= _N and r['unmapped'] >= _N and r['remapped'] >= _N


def test_keep_freed_memory_keeps_a_large_freed_tensor_on_the_heap():
    r = _probe(2)
    assert r['applied'] == [True, True]  # the second call reports the first one's result
    assert r['mmapped'] == 0 and r['unmapped'] == 0
    # Freed and kept in the process: the heap's free bytes grow by the tensor's size, give or take the few small
    # blocks other code allocates or frees meanwhile (they move the count by ~100 KB either way from run to run) ...
    assert r['kept_free'] >= _N - (1 << 20)
    # ... and the next allocation of that size is not a new mapping either.
    assert r['remapped'] == 0


@pytest.mark.parametrize('env', [
    {'GLIBC_TUNABLES': 'glibc.malloc.mmap_threshold=131072'},
    {'MALLOC_TRIM_THRESHOLD_': '131072'},
    {'LD_PRELOAD': '/nonexistent/libjemalloc.so.2'},
])
def test_an_allocator_chosen_in_the_environment_is_left_alone(env):
    r = _probe(1, **env)
    assert r['applied'] == [False]
    assert r['mmapped'] >= _N and r['unmapped'] >= _N


def test_train_and_validate_flags():
    sys.path.insert(0, os.path.join(ROOT, 'classification'))
    import torch
    import train
    import train_utils
    import validate

    args, _ = train.parse_args(['data'])
    assert args.tune_malloc is True
    args, _ = train.parse_args(['data', '--no-tune-malloc'])
    assert args.tune_malloc is False
    assert validate.build_parser().parse_args(['data']).tune_malloc is True
    assert validate.build_parser().parse_args(['data', '--no-tune-malloc']).tune_malloc is False
    # Only CPU runs are changed; this process's allocator is not touched for another device.
    assert train_utils.keep_freed_memory(torch.device('meta')) is False
