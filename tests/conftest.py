"""Shared fixtures of the DSAN model, checkpoint and tool tests."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

import ops_dscn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the tests also run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import dsan.models  # noqa: E402,F401  (registers the DSAN models with timm)

# The tests use tiny inputs; one thread avoids oversubscription slow-downs on shared CI machines.
torch.set_num_threads(int(os.environ.get('DSAN_TEST_THREADS', '1')))

HAS_CPP = ops_dscn.extension_available()
CPP_MISSING = f'compiled ops_dscn op not built ({ops_dscn.extension_error()})'
# DSAN_REQUIRE_CPP=1 (run_tests.sh, CI): a missing compiled op fails the session instead of skipping its tests.
REQUIRE_CPP = os.environ.get('DSAN_REQUIRE_CPP', '') == '1'
# Backend of the tests of model behaviour (not of the op): the compiled op when built, else the pure-PyTorch twin,
# announced in the report header. Tests that compare the compiled op with the PyTorch one are marked
# `requires_cpp`: without the op they are skipped with the reason, never run as pytorch against pytorch.
BACKEND = 'cpp' if HAS_CPP else 'pytorch'
requires_cpp = pytest.mark.skipif(not HAS_CPP, reason=f'{CPP_MISSING}; DSAN_REQUIRE_CPP=1 makes this an error')


def pytest_report_header(config) -> str:
    if HAS_CPP:
        return 'dsan: model tests run the compiled DSCN op (backend cpp)'
    return (f'dsan: {CPP_MISSING}: model tests run backend pytorch, tests of the compiled op are skipped '
            '(DSAN_REQUIRE_CPP=1 makes this an error)')


def pytest_sessionstart(session) -> None:
    if REQUIRE_CPP and not HAS_CPP:
        pytest.exit(f'DSAN_REQUIRE_CPP=1 but the {CPP_MISSING}', returncode=pytest.ExitCode.USAGE_ERROR)


def load_tool(relpath: str):
    """Import a script (e.g. 'classification/tools/get_flops.py') as a module."""
    path = ROOT / relpath
    # Named after the whole path: classification/, segmentation/ and detection/ each have a tools/get_flops.py.
    name = 'tool_' + relpath.removesuffix('.py').replace('/', '_').replace('-', '_')
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def backend() -> str:
    return BACKEND
