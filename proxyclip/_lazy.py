"""Modules imported on first use.

The command line builds its parser from the method registry (:mod:`proxyclip.model.methods`), so
the modules the registry imports must not import torch (two seconds) at import time. They name
torch through these stand-ins instead, which import the real module the first time an attribute
is read (inside a function call, long after ``--help`` has been printed).
"""

from __future__ import annotations

import importlib
import types


class LazyModule(types.ModuleType):
    """Stands for the module ``name``; imports it when an attribute is first read."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._lazy_name = name

    def __getattr__(self, attr: str):
        module = importlib.import_module(self._lazy_name)
        self.__dict__.update(module.__dict__)  # later reads are plain attribute look-ups
        return getattr(module, attr)


torch = LazyModule("torch")
F = LazyModule("torch.nn.functional")
