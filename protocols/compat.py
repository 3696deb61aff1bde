"""The one place that imports CrypTen.

CrypTen 0.4.1 (the last PyPI release) does ``from torch.onnx._internal.registration import
registry`` and ``import onnx`` at import time, both only for its ONNX model converter, which we never
use. On torch >= 2.x the first module is gone and onnx is usually absent, so ``import crypten`` fails.
We register stub modules for them *with real module specs* (a spec-less stub makes
``importlib.util.find_spec`` raise inside ``torch._dynamo``/transformers) and then import CrypTen.

Every module of ours gets CrypTen from here: ``from protocols.compat import crypten``.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types


def _stub(name: str, **attrs: object) -> None:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
    module.__dict__.update(attrs)
    sys.modules[name] = module


def _install_stubs() -> None:
    try:
        importlib.import_module("torch.onnx._internal.registration")
    except ImportError:
        _stub("torch.onnx._internal.registration", registry=None)
    if importlib.util.find_spec("onnx") is None:
        _stub("onnx")
        _stub("onnx.numpy_helper")


_install_stubs()
import crypten  # noqa: E402  (must follow the stubs)
import crypten.communicator as comm  # noqa: E402
from crypten.mpc import MPCTensor  # noqa: E402

__all__ = ["crypten", "comm", "MPCTensor"]
