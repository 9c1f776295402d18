"""Where each weight comes from, and a check of all of them before any is loaded.

open_clip and timm download through ``huggingface_hub``, which retries an unreachable hub with
back-off for most of a minute before it gives up, one weight at a time. :func:`weights_available`
instead looks at every weight a configuration needs first: local files must exist, hub weights
must be in the Hugging Face cache unless the hub answers a short connection probe. It raises one
:class:`~proxyclip.errors.WeightsError` naming every missing weight and how to supply it; when
the hub cannot be reached but everything is cached, the loading runs in huggingface_hub's offline
mode, which reads the cache without a single network call.
"""

from __future__ import annotations

import hashlib
import os
import socket
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from ..errors import WeightsError
from .catalog import VFM_TIMM_NAMES

PROBE_TIMEOUT_S = 2.5  # a connection to the hub that takes longer counts as offline


@dataclass(frozen=True)
class WeightSource:
    """One weight file a model needs: a local file, or a file in a Hugging Face repository."""

    role: str  # "CLIP" or "VFM"
    name: str  # what the user asked for, e.g. "ViT-B-16 (openai)"
    option: str  # the command-line option that gives a local file instead
    file: str | None = None  # a local file given by the user
    repo: str | None = None  # Hugging Face repository id of the library's weights
    filenames: tuple[str, ...] = ()  # files of ``repo`` the library loads (any one is enough)
    revision: str | None = None
    unknown: str | None = None  # why no source exists (e.g. an unknown pretrained tag)


def clip_source(name: str, pretrained: str | None, weights: str | None = None) -> WeightSource | None:
    """The weights :func:`proxyclip.model.clip.load_clip` will read; None if the model name is unknown
    (load_clip reports that itself)."""
    import open_clip

    label = f"{name} ({pretrained or 'no tag'})"
    if weights:
        return WeightSource("CLIP", label, "--clip-weights", file=str(weights))
    if name not in open_clip.list_models():
        return None
    cfg = open_clip.get_pretrained_cfg(name, pretrained or "")
    hub = cfg.get("hf_hub", "")
    if not hub:
        return WeightSource("CLIP", label, "--clip-weights",
                            unknown=f"open_clip has no downloadable weights tagged {pretrained!r} for {name}")
    repo, filename = os.path.split(hub)  # "org/model/" (open_clip's default file names) or "org/model/file"
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    filenames = (filename,) if filename else (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME)
    if filename.endswith((".bin", ".pth")):
        filenames = (filename[:-4] + ".safetensors", filename)  # open_clip prefers a safetensors twin
    return WeightSource("CLIP", label, "--clip-weights", repo=repo, filenames=filenames)


def vfm_source(vfm: str, weights: str | None = None) -> WeightSource | None:
    """The weights a ``VFM_BUILDERS`` entry will read; None for a builder this module does not know."""
    if weights:
        return WeightSource("VFM", vfm, "--vfm-weights", file=str(weights))
    timm_name = VFM_TIMM_NAMES.get(vfm)
    if timm_name is None:
        return None
    import timm

    cfg = timm.models.get_pretrained_cfg(timm_name)
    label = f"{vfm} (timm {timm_name})"
    if cfg is None or not cfg.hf_hub_id:
        return WeightSource("VFM", label, "--vfm-weights", unknown=f"timm has no hub weights for {timm_name}")
    repo, _, revision = cfg.hf_hub_id.partition("@")
    if cfg.hf_hub_filename:
        filenames = (cfg.hf_hub_filename,)
    else:
        filenames = ("model.safetensors", "pytorch_model.bin")  # timm's names, safetensors tried first
    return WeightSource("VFM", label, "--vfm-weights", repo=repo, filenames=filenames, revision=revision or None)


def cached_file(source: WeightSource) -> str | None:
    """The path of ``source``'s file in the Hugging Face cache, or None if it is not there."""
    from huggingface_hub import try_to_load_from_cache

    for filename in source.filenames:
        path = try_to_load_from_cache(source.repo, filename, revision=source.revision)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """Whether the Hugging Face hub (or the proxy in front of it) accepts a connection within ``timeout``.

    Returns:
        (reachable, the reason when not, e.g. "HF_HUB_OFFLINE is set").
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False, "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxied = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxied.hostname or host, proxied.port or 80
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
        return False, f"{host}:{port} cannot be reached ({reason})"
    return True, ""


def missing_reason(source: WeightSource, reachable: bool | None) -> str | None:
    """Why ``source`` cannot be loaded now, or None if it can (``reachable``: the hub probe's answer)."""
    if source.file is not None:
        path = Path(source.file).expanduser()
        if not path.exists():
            return f"file not found: {source.file}"
        if not path.is_file():
            return f"not a file: {source.file}"
        return None
    if source.unknown:
        return source.unknown
    if cached_file(source) is not None or reachable:
        return None
    return f"not in the Hugging Face cache (hub repository {source.repo})"


def sources_for(config, clip_weights: str | None = None, vfm_weights: str | None = None) -> list[WeightSource]:
    """Every weight a :class:`~proxyclip.ProxyCLIPConfig` needs (the VFM only for methods that use one)."""
    found = [clip_source(config.clip, config.clip_pretrained, clip_weights)]
    if config.needs_vfm:
        found.append(vfm_source(config.vfm, vfm_weights))
    return [s for s in found if s is not None]


def check_weights(sources: Sequence[WeightSource]) -> bool:
    """Raise one :class:`WeightsError` naming every weight of ``sources`` that cannot be loaded.

    The hub is probed (at most :data:`PROBE_TIMEOUT_S` seconds) only when some weight comes from it.

    Returns:
        True if the hub cannot be reached (everything needed is then local or cached).
    """
    reachable, why = (True, "")
    if any(s.repo for s in sources):
        reachable, why = hub_reachable()
    missing = [(s, reason) for s in sources if (reason := missing_reason(s, reachable)) is not None]
    if not missing:
        return not reachable
    lines = [f"{len(missing)} weight file{'s' if len(missing) > 1 else ''} missing"
             + (f" and the Hugging Face hub is offline: {why}" if why else "") + ":"]
    for s, reason in missing:
        lines.append(f"  {s.role} {s.name}: {reason}; give a local file with {s.option} FILE")
    if any(s.repo for s, _ in missing):
        lines.append("  or download the weights once online into the Hugging Face cache (HF_HOME), "
                     "then run with HF_HUB_OFFLINE=1")
    raise WeightsError("\n".join(lines))


@contextmanager
def weights_available(config, clip_weights: str | None = None, vfm_weights: str | None = None,
                      random_weights: bool = False) -> Iterator[None]:
    """Check every weight ``config`` needs (see :func:`check_weights`), then load inside the block:
    offline from the cache if the hub cannot be reached, so nothing waits on network retries."""
    if random_weights:
        yield
        return
    offline = check_weights(sources_for(config, clip_weights, vfm_weights))
    if not offline:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """The sha256 digest of a file, in hex."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe_source(source: WeightSource | None, digest: bool = True) -> dict:
    """A record of where a weight came from, for result files: a local file and its sha256, or the
    hub repository, file and revision read from the cache."""
    if source is None:
        return {"kind": "unknown"}
    if source.file is not None:
        record = {"kind": "file", "path": str(Path(source.file).expanduser().resolve())}
        if digest:
            record["sha256"] = file_sha256(record["path"])
        return record
    record = {"kind": "hub", "name": source.name, "repo": source.repo}
    path = cached_file(source) if source.repo else None
    if path is not None:
        parts = Path(path).parts
        record["file"] = parts[-1]
        if "snapshots" in parts:
            record["revision"] = parts[parts.index("snapshots") + 1]
    return record
