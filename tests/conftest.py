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

HAS_CPP = 'cpp' in ops_dscn.available_backends()
# The compiled op when built, else the pure-PyTorch twin: the model tests run on any machine.
BACKEND = 'cpp' if HAS_CPP else 'pytorch'
requires_cpp = pytest.mark.skipif(
    not HAS_CPP, reason=f'compiled ops_dscn op not built ({ops_dscn.extension_error()})'
    if hasattr(ops_dscn, 'extension_error') else 'compiled ops_dscn op not built')


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
