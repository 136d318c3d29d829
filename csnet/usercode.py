"""Importing the user's own code, ``module.path:function``, named on the command line or in Python.

Only for a name the user gave in this command: a run folder is data, and loading one never imports
what it names (``csnet.stages.check_code`` and the data registry refuse it).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from csnet.errors import UsageError


def load_function(spec: str, option: str):
    """The function ``spec`` names, with one-line errors for each way the import can fail. The current folder
    is importable, as under ``python -m``."""
    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        raise UsageError(f"{option} {spec!r}: your own code is given as module.path:function")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"{option} {spec}: cannot import {module_name} ({e})") from e
    except Exception as e:  # the module's own code failed: a SyntaxError, a raise at import time
        raise UsageError(f"{option} {spec}: importing {module_name} failed ({type(e).__name__}: {e})") from e
    factory = getattr(module, func_name, None)
    if factory is None:
        raise UsageError(f"{option} {spec}: {module_name} has no {func_name}")
    if not callable(factory):
        raise UsageError(f"{option} {spec}: {func_name} is a {type(factory).__name__}, not a function")
    return factory
