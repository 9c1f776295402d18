"""Reading the checkpoint files users have, without running pickled code, and loading them strictly.

Formats read by :func:`read_checkpoint`:

- ``.safetensors``;
- TorchScript archives (OpenAI's own CLIP files ``ViT-B-16.pt``, ``ViT-L-14.pt``, as the ``clip``
  package keeps them in ``~/.cache/clip``): ``torch.jit.load(..., map_location="cpu")`` and its
  state dict, as open_clip's ``load_openai_model`` reads them. TorchScript is not pickled Python:
  its code runs in the TorchScript interpreter, which calls no Python functions;
- anything else with ``torch.load(..., weights_only=True)`` (plain tensors and containers only),
  unwrapped from a ``"state_dict"`` or ``"model"`` entry (MAE's files) and a ``module.`` prefix.

:func:`load_state_dict` loads strictly and refuses with one line naming the unexpected, missing
and mis-shaped keys (the first few and how many).
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..errors import WeightsError

# Entries of OpenAI's TorchScript CLIP that are attributes, not weights (open_clip drops them too).
_OPENAI_JIT_EXTRAS = ("input_resolution", "context_length", "vocab_size")


def is_torchscript(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip file with a ``code/`` folder or ``constants.pkl``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any("/code/" in name or name.endswith("/constants.pkl") for name in names)


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, on the CPU, by name; no pickled code runs.

    Raises:
        WeightsError: missing or unreadable file, or no tensors in it.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"weights file {path}: no such file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        elif is_torchscript(path):
            with warnings.catch_warnings():  # "torch.jit.load is deprecated": still how these files are read
                warnings.simplefilter("ignore", FutureWarning)
                state = dict(torch.jit.load(path, map_location="cpu").state_dict())
            for key in _OPENAI_JIT_EXTRAS:
                state.pop(key, None)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except Exception as exc:  # safetensors, zipfile, the unpickler and TorchScript raise many types
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(f"weights file {path} could not be loaded ({type(exc).__name__}: {reason})") from exc
    for key in ("state_dict", "model"):  # training checkpoints: {"model": ..., "optimizer": ...}
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} holds no state dict of tensors")
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _some(keys: Iterable[str], count: int = 4) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:count])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > count else ''})"


def describe_mismatch(
    unexpected: Iterable[str] = (), missing: Iterable[str] = (), misshaped: Iterable[str] = ()
) -> str:
    """'N unexpected keys (a, b, ...); M missing keys (...)', the parts that are not empty."""
    parts = []
    for name, keys in (("unexpected", unexpected), ("missing", missing), ("wrongly shaped", misshaped)):
        keys = list(keys)
        if keys:
            parts.append(f"{name} keys {_some(keys)}")
    return "; ".join(parts)


def load_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """``model.load_state_dict(state)``, strictly, refusing with the keys that do not fit.

    Tensors are copied into the model's parameters (cast to their dtype, e.g. OpenAI's fp16).

    Args:
        what: names the weights in the error, e.g. "VFM weights file dino.pth for timm vit_base_patch8_224".

    Raises:
        WeightsError: one line naming the unexpected, missing and mis-shaped keys.
    """
    own = model.state_dict()
    computed = {  # non-persistent buffers (e.g. CLIP's attention mask): some files carry them, none needs them
        f"{name}.{buf}" if name else buf
        for name, module in model.named_modules()
        for buf in getattr(module, "_non_persistent_buffers_set", ())
    }
    state = {k: v for k, v in state.items() if k not in computed}
    misshaped = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state]
    if misshaped or unexpected or missing:
        raise WeightsError(f"{what} do not fit: {describe_mismatch(unexpected, missing, misshaped)}")
    model.load_state_dict(state, strict=True)
