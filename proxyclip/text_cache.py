"""Text embeddings cached on disk, so that a large vocabulary is encoded once per model.

Encoding ADE847's 847 names with the 80 templates takes minutes on a CPU; the result depends only
on the text tower's weights, its architecture, the tokenizer, the templates, the names, the dtype
and the device kind. :func:`encode_cached` keys a file by a sha256 of all of those (the weights by a
sha256 of every text-tower tensor's bytes, wherever they were loaded from) and stores the Q x E
float32 embeddings as ``.safetensors`` (never pickle) under the user cache folder:

- ``$PROXYCLIP_CACHE/text`` (``PROXYCLIP_CACHE=off`` disables the cache), else
  ``$XDG_CACHE_HOME/proxyclip/text``, else ``~/.cache/proxyclip/text``;
- at most ``PROXYCLIP_CACHE_MAX_MB`` (default 512) MiB: the least recently used files go first;
- safe to delete at any time: files are written atomically (temporary file, then rename), and a
  corrupt, partial or foreign file is ignored and rewritten.

The dtype and device are part of the key because embeddings computed in bf16 (or on a GPU) differ
slightly from fp32 CPU ones: a result must never depend on what the cache held.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import os
import tempfile
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

FORMAT = 1  # bump when the stored layout or the encoding changes
DEFAULT_MAX_MB = 512
_OFF = ("", "0", "off", "none", "no", "false")
_disabled = contextvars.ContextVar("proxyclip_text_cache_disabled", default=False)
_digests: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (tensor versions, digest)
_warned_unwritable = False


def cache_dir() -> Path | None:
    """The folder of cached text embeddings, or None when the cache is off."""
    if _disabled.get():
        return None
    value = os.environ.get("PROXYCLIP_CACHE")
    if value is not None:
        return None if value.strip().lower() in _OFF else Path(value).expanduser() / "text"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "proxyclip" / "text"


@contextmanager
def disabled() -> Iterator[None]:
    """Neither read nor write the cache inside the block (``--no-text-cache``)."""
    token = _disabled.set(True)
    try:
        yield
    finally:
        _disabled.reset(token)


def _max_bytes() -> int:
    try:
        return int(float(os.environ.get("PROXYCLIP_CACHE_MAX_MB", DEFAULT_MAX_MB)) * (1 << 20))
    except ValueError:
        return DEFAULT_MAX_MB << 20


def _text_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer outside the image tower (``visual``): what text embeddings depend on."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return [(n, t) for n, t in named if not n.startswith("visual.")]


def text_weights_digest(model: torch.nn.Module) -> str:
    """sha256 of the names, shapes, dtypes and bytes of every text-tower tensor (hex).

    Computed once per model object and reused while its tensors are unchanged (~0.15 s for
    ViT-B/16's 63 M text parameters).
    """
    import torch

    tensors = _text_tensors(model)
    versions = tuple((t.data_ptr(), t._version) for _, t in tensors)
    memo = _digests.get(model)
    if memo is not None and memo[0] == versions:
        return memo[1]
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        data = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(memoryview(data.view(torch.uint8).numpy()))
    digest = h.hexdigest()
    _digests[model] = (versions, digest)
    return digest


def cache_key(model: torch.nn.Module, tokenizer: object, queries: Sequence[str], templates: Sequence[Callable],
              device: torch.device | str) -> str:
    """The file name (without suffix) of the embeddings of ``queries``: a sha256 of everything they depend on."""
    import torch

    ident = {
        "format": FORMAT,
        "weights": text_weights_digest(model),
        "architecture": hashlib.sha256(repr(model).encode()).hexdigest(),  # activations, e.g. QuickGELU
        "tokenizer": [type(tokenizer).__qualname__, getattr(tokenizer, "context_length", None)],
        "templates": [t("{}") for t in templates],
        "queries": list(queries),
        "device": torch.device(device).type,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def load(path: Path, queries: Sequence[str]) -> torch.Tensor | None:
    """The Q x E float32 embeddings stored at ``path``, or None if it is missing, corrupt or not for ``queries``."""
    import torch
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            emb = fh.get_tensor("embeddings")
        ok = (meta.get("format") == str(FORMAT) and json.loads(meta.get("queries", "null")) == list(queries)
              and emb.dtype == torch.float32 and emb.dim() == 2 and emb.shape[0] == len(queries))
    except FileNotFoundError:
        return None
    except Exception:  # a truncated or foreign file: safetensors raises several kinds
        ok = False
    if not ok:
        path.unlink(missing_ok=True)
        return None
    try:
        os.utime(path)  # most recently used: evicted last
    except OSError:
        pass
    return emb


def store(path: Path, queries: Sequence[str], emb: torch.Tensor) -> None:
    """Write Q x E float32 embeddings atomically, then evict the oldest files beyond the size bound.

    A cache that cannot be written is skipped with one warning: it only saves time.
    """
    global _warned_unwritable
    from safetensors.torch import save

    data = save({"embeddings": emb.detach().float().cpu().contiguous()},
                metadata={"format": str(FORMAT), "queries": json.dumps(list(queries), ensure_ascii=False)})
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        tmp = None
        evict(path.parent, _max_bytes(), keep=path)
    except OSError as exc:
        if not _warned_unwritable:
            _warned_unwritable = True
            warnings.warn(f"text embeddings are not cached: cannot write {path.parent} ({exc.strerror or exc})",
                          stacklevel=3)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def evict(folder: Path, max_bytes: int, keep: Path | None = None) -> None:
    """Delete the least recently used cache files of ``folder`` until it holds at most ``max_bytes``."""
    entries = []
    for p in folder.glob("*.safetensors"):
        try:
            st = p.stat()
        except FileNotFoundError:  # another process evicted it
            continue
        entries.append((st.st_mtime, st.st_size, p))
    total = sum(size for _, size, _ in entries)
    for _, size, p in sorted(entries, key=lambda e: e[0]):
        if total <= max_bytes:
            break
        if p != keep:
            p.unlink(missing_ok=True)
            total -= size


def too_long_names(tokenizer: object, queries: Sequence[str], templates: Sequence[Callable]) -> list[tuple[str, int]]:
    """The names that some template makes longer than the tokenizer's context (they get cut), with
    the longest token count. Tokenizers without ``encode`` and ``context_length`` are not checked."""
    encode = getattr(tokenizer, "encode", None)
    context = getattr(tokenizer, "context_length", None)
    if encode is None or not context:
        return []
    # BPE tokenises word by word, so a template adds about the same tokens to every name: estimate
    # with the longest template, then count exactly for the names close to the limit.
    overhead = max(len(encode(t("x"))) for t in templates) - len(encode("x"))
    found = []
    for name in queries:
        if len(encode(name)) + overhead + 2 + 2 <= context:  # 2: start and end tokens; 2: margin
            continue
        longest = max(len(encode(t(name))) for t in templates) + 2
        if longest > context:
            found.append((name, longest))
    return found


def warn_too_long(tokenizer: object, queries: Sequence[str], templates: Sequence[Callable]) -> None:
    """One warning per class name that CLIP's context cuts (the cut name is what gets encoded)."""
    context = getattr(tokenizer, "context_length", None)
    for name, count in too_long_names(tokenizer, queries, templates):
        shown = name if len(name) <= 80 else name[:77] + "..."
        warnings.warn(f"class name {shown!r} is too long for CLIP: with a template it takes {count} tokens, "
                      f"more than the {context} of CLIP's context, and is cut to fit; shorten it", stacklevel=3)


def encode_cached(model: torch.nn.Module, tokenizer: object, queries: Sequence[str], device: torch.device | str,
                  progress: Callable[[int, int], None] | None = None, extra_templates: Sequence[str] = ()) -> torch.Tensor:
    """:func:`proxyclip.model.clip.encode_queries`, read from the disk cache when it holds them.

    Returns:
        Q x E float32 unit-norm embeddings on ``device``, equal to encoding them now.
    """
    import open_clip

    from .model.clip import encode_queries

    templates = (*open_clip.OPENAI_IMAGENET_TEMPLATES, *(t.format for t in extra_templates))  # as encode_queries
    warn_too_long(tokenizer, queries, templates)
    folder = cache_dir()
    path = None
    if folder is not None:
        path = folder / f"{cache_key(model, tokenizer, queries, templates, device)}.safetensors"
        emb = load(path, queries)
        if emb is not None:
            return emb.to(device)
    emb = encode_queries(model, tokenizer, queries, device, progress=progress, extra_templates=extra_templates)
    if path is not None:
        store(path, queries, emb)
    return emb
