"""CLIP from open_clip: loading, dense value features of the last block, text embeddings.

Only public pieces of open_clip's ViT are touched: ``conv1``, ``class_embedding``,
``positional_embedding``, ``ln_pre``, ``transformer.resblocks`` (and of the last block ``ln_1``,
``attn.in_proj_weight``/``in_proj_bias``, ``attn.out_proj``), ``ln_post`` and ``proj``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer

from ..errors import ProxyCLIPError, WeightsError
from .pos_embed import resize_pos_embed_with_cls

# The CLIP models of the paper: open_clip name -> default pretrained tag.
CLIP_MODELS = {
    "ViT-B-16": "openai",
    "ViT-L-14": "openai",
    "ViT-H-14": "laion2b_s32b_b79k",
}


def default_pretrained(name: str, tag: str | None = None) -> str:
    """``tag``, or else the paper's pretrained tag for the CLIP ``name`` (OpenAI's for other names)."""
    return tag or CLIP_MODELS.get(name, "openai")


def _uses_quick_gelu(name: str, pretrained: str | None) -> bool:
    """OpenAI's weights were trained with QuickGELU; open_clip only warns if it is not asked for."""
    if name.endswith("-quickgelu") or not pretrained:
        return False
    return bool(open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu", False))


def load_clip(
    name: str = "ViT-B-16",
    pretrained: str | None = "openai",
    weights: str | None = None,
    random_weights: bool = False,
) -> tuple[torch.nn.Module, object]:
    """Build an open_clip model and its tokenizer, in fp32 on the CPU, in eval mode.

    Args:
        name: open_clip architecture name, e.g. "ViT-B-16".
        pretrained: open_clip pretrained tag (it decides QuickGELU: "openai" uses it).
        weights: a local checkpoint file (.safetensors, or a state dict loaded with
            ``weights_only=True``) used instead of downloading the tag's weights.
        random_weights: build the architecture with random weights (tests and benchmarks only).

    Raises:
        WeightsError: the weights are not available (one line saying how to supply them).
    """
    if name not in open_clip.list_models():
        raise ProxyCLIPError(
            f"unknown CLIP model {name!r}; use an open_clip ViT name such as {', '.join(CLIP_MODELS)}"
        )
    quick_gelu = _uses_quick_gelu(name, pretrained)
    source = None if random_weights else (weights or pretrained)
    try:
        model = open_clip.create_model(
            name, pretrained=source, force_quick_gelu=quick_gelu, weights_only=True
        )
    except Exception as exc:  # open_clip and huggingface_hub raise many types here
        if random_weights:
            raise
        what = f"file {weights}" if weights else f"{name} / {pretrained}"
        raise WeightsError(
            f"CLIP weights {what} could not be loaded ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "Pass a local checkpoint with --clip-weights FILE, or put the weights in the Hugging Face "
            "cache (HF_HOME) and set HF_HUB_OFFLINE=1, or connect to the internet."
        ) from exc
    if not isinstance(model.visual, VisionTransformer) or model.visual.proj is None:
        raise ProxyCLIPError(f"CLIP model {name!r} is not an open_clip ViT with a projection; use e.g. ViT-B-16")
    if model.visual.attn_pool is not None:
        raise ProxyCLIPError(f"CLIP model {name!r} uses attentional pooling, which ProxyCLIP does not support")
    return model.eval().requires_grad_(False), open_clip.get_tokenizer(name)


def clip_normalisation(visual: VisionTransformer) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """CLIP's pixel mean and std (RGB, 0-1 range) as open_clip's preprocess config states them."""
    cfg = visual.preprocess_cfg
    return tuple(cfg["mean"]), tuple(cfg["std"])


def clip_patch_size(visual: VisionTransformer) -> int:
    return int(visual.conv1.kernel_size[0])


def last_block_input(visual: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Run CLIP's ViT up to, not including, its last block.

    Args:
        images: B x 3 x H x W, CLIP-normalised.

    Returns:
        B x (1 + h*w) x D tokens (class token first), h = H // patch, w = W // patch. The
        positional embedding is resized with the DINO recipe (see :mod:`proxyclip.pos_embed`).
    """
    x = visual.conv1(images)  # B x D x h x w
    grid = tuple(x.shape[-2:])
    x = x.flatten(2).transpose(1, 2)  # B x hw x D
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # B x 1 x D
    x = torch.cat([cls, x], dim=1)  # B x (1 + hw) x D
    x = x + resize_pos_embed_with_cls(visual.positional_embedding, grid).to(x.dtype)
    x = visual.ln_pre(visual.patch_dropout(x))
    transformer = visual.transformer
    if not transformer.batch_first:
        x = x.transpose(0, 1)  # B x L x D -> L x B x D
    for block in transformer.resblocks[:-1]:
        x = block(x)
    if not transformer.batch_first:
        x = x.transpose(0, 1)  # L x B x D -> B x L x D
    return x


def last_block_values(visual: VisionTransformer, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The value embeddings of the last block's patch tokens, as a feature map.

    Args:
        x: B x (1 + h*w) x D output of :func:`last_block_input`.
        grid: (h, w).

    Returns:
        B x D x h x w values, all heads concatenated along D (head-major, as in the attention).
    """
    block = visual.transformer.resblocks[-1]
    dim = x.shape[-1]
    w_v = block.attn.in_proj_weight[2 * dim :]  # D x D
    b_v = block.attn.in_proj_bias[2 * dim :] if block.attn.in_proj_bias is not None else None
    v = F.linear(block.ln_1(x[:, 1:]), w_v, b_v)  # B x hw x D
    return v.transpose(1, 2).reshape(x.shape[0], dim, *grid)  # B x D x h x w


def project_tokens(visual: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """The last block's output projection, then ``ln_post`` and ``proj``: no residual, no MLP.

    Args:
        tokens: B x L x D aggregated values.

    Returns:
        B x L x E features in CLIP's joint space (not normalised).
    """
    block = visual.transformer.resblocks[-1]
    z = block.attn.out_proj(tokens)  # B x L x D
    return visual.ln_post(z) @ visual.proj  # B x L x E


def vanilla_patch_features(visual: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """The plain CLIP baseline: the full last block, class token dropped, ``ln_post``, ``proj``.

    Args:
        x: B x (1 + h*w) x D output of :func:`last_block_input`.

    Returns:
        B x hw x E.
    """
    block = visual.transformer.resblocks[-1]
    if not visual.transformer.batch_first:
        x = block(x.transpose(0, 1)).transpose(0, 1)
    else:
        x = block(x)
    return visual.ln_post(x[:, 1:]) @ visual.proj  # B x hw x E


def encode_text(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens, normalize=True)``, faster for causal argmax-pooled towers.

    With a causal mask and pooling at the end-of-text token, the columns after the last
    end-of-text token cannot change the pooled output, so they are dropped before the
    transformer runs (CLIP prompts use ~15 of 77 positions): the same embeddings, ~5x faster.

    Args:
        tokens: T x 77 token ids.

    Returns:
        T x E unit-norm embeddings.
    """
    trimmable = (
        type(model) is open_clip.CLIP
        and model.attn_mask is not None
        and model.text_pool_type == "argmax"
        and model.text_projection is not None
    )
    if not trimmable:
        return model.encode_text(tokens, normalize=True)
    used = int((tokens != 0).any(dim=0).nonzero().max()) + 1
    tokens = tokens[:, :used]  # T x n
    dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(dtype) + model.positional_embedding[:used].to(dtype)  # T x n x W
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:used, :used]))  # T x n x W
    x = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection  # T x E
    return F.normalize(x, dim=-1)


@torch.no_grad()
def encode_queries(
    model: torch.nn.Module, tokenizer: object, queries: Sequence[str], device: torch.device | str, batch: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Text embeddings of ``queries`` with the 80 OpenAI ImageNet templates.

    Each template's embedding is l2-normalised, averaged over templates and normalised again,
    as open_clip's ``build_zero_shot_classifier`` does. ``progress(done, total)`` is called after
    each batch of names (e.g. to draw a progress bar).

    Returns:
        Q x E float32, rows of unit norm.
    """
    templates = open_clip.OPENAI_IMAGENET_TEMPLATES
    out = []
    for start in range(0, len(queries), batch):
        names = queries[start : start + batch]
        tokens = tokenizer([t(name) for name in names for t in templates]).to(device)  # (n*80) x 77
        emb = encode_text(model, tokens).reshape(len(names), len(templates), -1).mean(dim=1)  # n x E
        out.append(F.normalize(emb.float(), dim=-1))
        if progress is not None:
            progress(start + len(names), len(queries))
    return torch.cat(out)  # Q x E
