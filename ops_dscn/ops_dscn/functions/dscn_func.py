"""The original module path of ``DSCNFunction`` (``ops_dscn/functions/dscn_func.py``), for code written against it."""

from . import DSCNFunction

__all__ = ["DSCNFunction"]
