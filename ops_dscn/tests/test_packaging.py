"""Tests of ops_dscn's packaging: the sdist holds what building and testing it needs, setup.py's dependencies and
its error without torch, and the source-tree hint of a load error. Nothing here compiles the extension."""
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import _use_installed  # noqa: F401  (first: the installed ops_dscn, not the source tree)
import pytest

SRC = Path(__file__).resolve().parents[1]  # the ops_dscn project folder (setup.py, csrc/, ops_dscn/, tests/)
pytestmark = pytest.mark.skipif(not (SRC / "setup.py").is_file(), reason=f"no ops_dscn source tree at {SRC}")
# Build outputs of earlier builds in the source tree: not sources, and a stale egg-info's SOURCES.txt would be merged
# into the sdist's file list, hiding a file that MANIFEST.in fails to add.
BUILD_OUTPUTS = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", "*.so", ".pytest_cache",
                                       ".hypothesis")


def _files(root: Path, sub: str) -> set[str]:
    """The files under root/sub, as paths relative to root, build outputs left out."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root / sub):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        found.update((Path(dirpath) / f).relative_to(root).as_posix() for f in filenames if not f.endswith(".so"))
    return found


def _run_setup(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Runs a fresh interpreter with `args` in cwd, CPU-only whatever the machine has (no CUDA toolkit needed)."""
    return subprocess.run([sys.executable, *args], cwd=cwd, env={**os.environ, "FORCE_CUDA": "0"},
                          capture_output=True, text=True, timeout=300)


def test_sdist_holds_every_file_the_build_and_tests_need(tmp_path):
    project = tmp_path / "ops_dscn"
    shutil.copytree(SRC, project, ignore=BUILD_OUTPUTS)
    dist = tmp_path / "dist"
    proc = _run_setup(["setup.py", "-q", "sdist", "--dist-dir", str(dist)], project)
    assert proc.returncode == 0, f"setup.py sdist failed:\n{proc.stdout}\n{proc.stderr}"
    tarballs = list(dist.glob("ops_dscn-*.tar.gz"))
    assert len(tarballs) == 1, f"expected one ops_dscn-*.tar.gz in {dist}; got {os.listdir(dist)}"
    with tarfile.open(tarballs[0]) as tar:
        # Names are "<name>-<version>/<path>"; the path is compared with the source tree's.
        packed = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}

    needed = _files(SRC, "csrc") | _files(SRC, "ops_dscn")
    needed |= {"setup.py", "benchmark.py", "selfcheck_cuda.sh", "README.md"}
    needed |= {f for f in _files(SRC, "tests") if f.endswith(".py")}
    assert any(f.endswith(".h") for f in needed) and "csrc/cuda/dscn_cuda.cu" in needed, f"odd source tree: {needed}"
    missing = sorted(needed - packed)
    assert not missing, f"the sdist lacks {missing}; it holds {sorted(packed)}"


def _setup_kwargs() -> dict:
    """setup.py's setup() arguments that matter here, read by running it with setuptools.setup replaced."""
    code = ("import json, runpy, setuptools\n"
            "seen = {}\n"
            "setuptools.setup = lambda **kw: seen.update(kw)\n"
            "runpy.run_path('setup.py', run_name='__main__')\n"
            "ext = seen['ext_modules'][0]\n"
            "print(json.dumps({'sources': ext.sources, 'depends': ext.depends}))\n")
    proc = _run_setup(["-c", code], SRC)
    assert proc.returncode == 0, f"running setup.py failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_extension_depends_on_every_header():
    """A header edit must rebuild _C: setuptools skips the build when no source or `depends` entry is newer."""
    kwargs = _setup_kwargs()
    headers = {f for f in _files(SRC, "csrc") if f.endswith(".h")}
    assert headers, f"no headers under {SRC / 'csrc'}"
    assert {Path(p).as_posix() for p in kwargs["depends"]} == headers
    # The paths are relative to the project folder, as the sources are, and name files that exist.
    assert all((SRC / p).is_file() for p in kwargs["depends"] + kwargs["sources"])


def test_build_without_torch_names_the_commands_that_work():
    # None in sys.modules makes `import torch` raise ImportError, as an isolated build environment without torch does.
    code = "import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; " \
           "runpy.run_path('setup.py', run_name='__main__')"
    proc = _run_setup(["-c", code], SRC)
    assert proc.returncode == 1, f"expected exit status 1; got {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line error; got {lines}"
    message = lines[0]
    assert message.startswith("ops_dscn: building needs PyTorch importable in the build environment; got "
                              "ModuleNotFoundError: import of torch halted"), message
    assert "`pip install --no-build-isolation --use-pep517 -e ./ops_dscn`" in message
    assert "`pip install --no-build-isolation ./ops_dscn`" in message
    assert "`python setup.py build_ext --inplace`" in message


def test_source_tree_hint_only_for_the_source_tree(tmp_path):
    """The hint is for a package imported from the project folder (setup.py beside it), not for any install."""
    source = tmp_path / "project" / "ops_dscn" / "functional.py"
    installs = [tmp_path / "usr/lib/python3/dist-packages/ops_dscn/functional.py",
                tmp_path / "prefix/lib/python3.11/site-packages/ops_dscn/functional.py",
                tmp_path / "target/ops_dscn/functional.py"]
    for path in [source, *installs]:
        path.parent.mkdir(parents=True)
        path.touch()
    (source.parents[1] / "setup.py").touch()

    # Run from the source tree so that its functional.py is the one tested, whatever ops_dscn is installed.
    code = ("import json, sys\n"
            "import ops_dscn.functional as F\n"
            "print(json.dumps({'file': F.__file__, 'error': F.extension_error(),\n"
            "                  'hints': [F._source_tree_hint(p) for p in sys.argv[1:]]}))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(source), *map(str, installs)], cwd=SRC,
                          env={**os.environ, "PYTHONPATH": str(SRC)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"importing ops_dscn from {SRC} failed:\n{proc.stdout}\n{proc.stderr}"
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(got["file"]).resolve() == SRC / "ops_dscn" / "functional.py"
    source_hint, *install_hints = got["hints"]
    assert source_hint.startswith(f" (ops_dscn was imported from the source tree {source};"), source_hint
    assert install_hints == ["", "", ""]
    if got["error"] is not None:  # not built in place: the real load error carries the hint
        assert "(ops_dscn was imported from the source tree " in got["error"], got["error"]


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("ldd") is None, reason="ELF/ldd only")
def test_the_built_extension_runs_its_kernels_with_openmp():
    """setup.py drops -fopenmp (with a warning) only where the compiler cannot build OpenMP code; the kernels then run
    on one thread. The build tested here must not have taken that path silently."""
    import ops_dscn

    if not ops_dscn.extension_available():
        pytest.skip(f"compiled op not built: {ops_dscn.extension_error()}")
    from ops_dscn import _C

    linked = subprocess.run(["ldd", _C.__file__], capture_output=True, text=True, timeout=60).stdout
    assert "libgomp" in linked or "libomp" in linked or "libiomp" in linked, linked


def test_setup_probes_openmp_and_drops_it_with_a_warning(tmp_path):
    """A compiler that cannot build OpenMP code gets no -fopenmp and a warning saying the kernels will run on one
    thread; DSCN_OPENMP=0 / 1 decide without the probe."""
    code = ("import runpy, setuptools\n"
            "setuptools.setup = lambda **kw: None\n"
            "ns = runpy.run_path('setup.py')\n"
            "print('FLAGS', ns['_openmp_flags']())\n")

    def flags(**env):
        proc = subprocess.run([sys.executable, "-c", code], cwd=SRC, capture_output=True, text=True, timeout=300,
                              env={**os.environ, **env})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    assert "FLAGS ['-fopenmp']" in flags()
    fake = tmp_path / "no-openmp-c++"
    fake.write_text("#!/bin/sh\necho 'fatal error: omp.h: No such file or directory' >&2\nexit 1\n")
    fake.chmod(0o755)
    out = flags(CXX=str(fake))
    assert "FLAGS []" in out and "ONE thread" in out
    assert "FLAGS []" in flags(CXX=str(fake), DSCN_OPENMP="0")
    assert "FLAGS ['-fopenmp']" in flags(CXX=str(fake), DSCN_OPENMP="1")
