"""What the segmentation and detection tests share: the original architectures and running the real scripts."""
import os
import socket
import subprocess

from conftest import ROOT

# The backbone arguments of the original mm configs.
T_ARCH = dict(embed_dims=[32, 64, 160, 256], mlp_ratios=[8, 8, 4, 4], kernel_sizes=[11, 11, 7, 5],
              dw_kernel_sizes=[11, 11, 7, 5], paddings=[5, 5, 3, 2], strides=[1, 1, 1, 1], dilations=[1, 1, 1, 1],
              groups=[1, 4, 8, 8], depths=[3, 3, 5, 2], drop_rate=0.0, drop_path_rate=0.1)
S_ARCH = dict(embed_dims=[64, 128, 320, 512], mlp_ratios=[8, 8, 4, 4], kernel_sizes=[15, 13, 7, 5],
              dw_kernel_sizes=[9, 7, 5, 5], paddings=[7, 6, 3, 2], strides=[1, 1, 1, 1], dilations=[1, 1, 1, 1],
              groups=[4, 8, 16, 16], depths=[2, 2, 5, 3], drop_rate=0.0, drop_path_rate=0.1)


def script_env(**extra) -> dict:
    """The environment of a script run: the checkout importable, one thread, no warning noise."""
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([str(ROOT), env.get('PYTHONPATH', '')])
    env.setdefault('OMP_NUM_THREADS', '1')
    env['PYTHONWARNINGS'] = 'ignore'
    env.update(extra)
    return env


def run_script(args, timeout=900, env=None, check=True) -> subprocess.CompletedProcess:
    """Run a command from the repository root; with `check`, fail the test with its output if it fails."""
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                       env=env or script_env(), cwd=str(ROOT))
    if check:
        assert r.returncode == 0, f'{args} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}'
    return r


def free_port() -> int:
    """A free TCP port on the loopback interface, for a torchrun rendezvous."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]
