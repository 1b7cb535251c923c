"""Test the installed ops_dscn, not the source tree next to these tests (each test module imports this first).

``python -m pytest tests`` run in the project folder puts that folder first on ``sys.path``; ``import ops_dscn`` then
found the source package, which has no compiled extension (unless built in place), and every compiled-kernel test
was skipped while pytest reported success. The project folder is taken off the path when an installed ops_dscn is
found without it; with none installed, the source tree (an in-place build) is what is tested. (A module rather than
a conftest.py: the repository's tests/ import their helpers as `conftest`, which a second conftest would shadow.)
"""
import importlib.util
import sys
from pathlib import Path

_PROJECT = Path(__file__).resolve().parents[1]


def _is_project(entry: str) -> bool:
    try:
        return Path(entry or ".").resolve() == _PROJECT
    except OSError:
        return False


if "ops_dscn" not in sys.modules and any(_is_project(p) for p in sys.path):
    _saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if not _is_project(p)]
    if importlib.util.find_spec("ops_dscn") is None:
        sys.path[:] = _saved
