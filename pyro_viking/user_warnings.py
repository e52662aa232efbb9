"""Warnings that point at the user's code.

A warning raised deep inside a Pyro or PyTorch call stack (``Predictive`` → a guide → a
distribution's ``rsample``) would otherwise be attributed to whichever library line a fixed
``stacklevel`` happens to reach. :func:`warn` attributes it to the innermost frame outside
``pyro_viking``, Pyro and PyTorch, so the message shows the line the user wrote.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Tuple, Type

__all__ = ["warn"]

#: packages whose frames are skipped (those that are imported)
INTERNAL_PACKAGES = ("pyro_viking", "pyro", "torch")


def _internal_dirs() -> Tuple[str, ...]:
    dirs = []
    for name in INTERNAL_PACKAGES:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__file__", None):
            dirs.append(os.path.dirname(os.path.abspath(module.__file__)) + os.sep)
    return tuple(dirs)


def warn(message: str, category: Type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the innermost caller outside
    ``pyro_viking``, ``pyro`` and ``torch`` (the outermost frame if there is none)."""
    internal = _internal_dirs()
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and (
            os.path.abspath(frame.f_code.co_filename).startswith(internal)
            or frame.f_code.co_filename.startswith("<frozen")):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)
