"""Runs a check script in a fresh process with DSCN_CPU_ISA set, so each SIMD build of a CPU kernel is tested."""
import os
import subprocess
import sys

import pytest

ISAS = ["default", "avx2", "avx512"]


def run_under_isa(isa: str, script_text: str, tmp_path) -> None:
    """Runs `script_text` (which prints 'ok' when its checks pass) with DSCN_CPU_ISA=`isa`; skips if the CPU lacks it.

    The script can import this folder's test modules (it is put on sys.path).
    """
    script = tmp_path / "check.py"
    script.write_text(f"import sys\nsys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
                      + script_text)
    env = dict(os.environ, DSCN_CPU_ISA=isa)
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    if "not supported by this CPU" in res.stderr:
        pytest.skip(f"this CPU lacks {isa}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "ok"
