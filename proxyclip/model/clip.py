"""CLIP from open_clip: loading, the adapter that methods read CLIP's image tower through, and
text embeddings. No other module touches open_clip's internals."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer

from ..errors import ProxyCLIPError, WeightsError
from .checkpoints import load_state_dict, read_checkpoint
from .config import CLIP_MODELS
from .pos_embed import resize_pos_embed_with_cls


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
    precision: str = "fp32",
) -> tuple[torch.nn.Module, object]:
    """Build an open_clip model and its tokenizer on the CPU, in eval mode.

    Args:
        name: open_clip architecture name, e.g. "ViT-B-16".
        pretrained: open_clip pretrained tag (it decides QuickGELU: "openai" uses it).
        weights: a local checkpoint file used instead of downloading the tag's weights:
            .safetensors, a state dict (read with ``weights_only=True``), or OpenAI's own
            TorchScript file (``ViT-B-16.pt``); see :mod:`proxyclip.model.checkpoints`.
        random_weights: build the architecture with random weights (tests and benchmarks only).
        precision: open_clip's precision: "fp32", or "fp16" as the published runs built CLIP (linear,
            convolution and attention weights and ``proj`` in fp16; layer norms computed in fp32;
            class and positional embeddings fp32).

    Raises:
        WeightsError: the weights are not available (one line saying how to supply them).
    """
    if name not in open_clip.list_models():
        raise ProxyCLIPError(
            f"unknown CLIP model {name!r}; use an open_clip ViT name such as {', '.join(CLIP_MODELS)}"
        )
    quick_gelu = _uses_quick_gelu(name, pretrained)
    source = None if random_weights or weights else pretrained  # a local file is read below, safely
    try:
        model = open_clip.create_model(
            name, pretrained=source, force_quick_gelu=quick_gelu, weights_only=True, precision=precision
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
    if weights and not random_weights:  # open_clip state dict, .safetensors, or OpenAI's TorchScript file
        load_state_dict(model, read_checkpoint(weights), f"CLIP weights file {weights} for {name}")
    if not isinstance(model.visual, VisionTransformer) or model.visual.proj is None:
        raise ProxyCLIPError(f"CLIP model {name!r} is not an open_clip ViT with a projection; use e.g. ViT-B-16")
    if model.visual.attn_pool is not None:
        raise ProxyCLIPError(f"CLIP model {name!r} uses attentional pooling, which ProxyCLIP does not support")
    return model.eval().requires_grad_(False), open_clip.get_tokenizer(name)


class Block:
    """One residual attention block of CLIP's ViT, in pieces (batch-first tensors throughout).

    ``forward`` is the block as open_clip runs it: ``x + ls_1(attn(ln_1(x)))``, then
    ``x + ls_2(mlp(ln_2(x)))``. Methods that change the block call the pieces.
    """

    def __init__(self, block: torch.nn.Module, batch_first: bool):
        self.module = block
        self.batch_first = batch_first
        self.heads = int(block.attn.num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x L x D -> B x L x D, the unchanged block."""
        if self.batch_first:
            return self.module(x)
        return self.module(x.transpose(0, 1)).transpose(0, 1)

    def ln_1(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.ln_1(x)

    def ln_2(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.ln_2(x)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The attention's in-projection of ``x`` (already through ``ln_1``).

        Args:
            x: B x L x D.

        Returns:
            q, k, v: B x L x D each, heads concatenated along D (head-major).
        """
        attn = self.module.attn
        return F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """B x L x D -> B x H x L x D/H, the heads as the attention cuts them (head-major along D)."""
        b, n, d = x.shape
        return x.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)  # B x H x L x d

    @staticmethod
    def merge_heads(x: torch.Tensor) -> torch.Tensor:
        """B x H x L x d -> B x L x H*d, the inverse of :meth:`split_heads`."""
        b, h, n, d = x.shape
        return x.transpose(1, 2).reshape(b, n, h * d)  # B x L x D

    def out_proj(self, x: torch.Tensor) -> torch.Tensor:
        """The attention's output projection, B x L x D -> B x L x D."""
        return self.module.attn.out_proj(x)

    def ls_1(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.ls_1(x)

    def ls_2(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.ls_2(x)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """The feed-forward, B x L x D -> B x L x D (no norm, no residual)."""
        return self.module.mlp(x)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The block's own multi-head self-attention of ``x`` (through ``ln_1``), before out_proj:
        softmax(q k^T / sqrt(d)) v per head. B x L x D -> B x L x D."""
        q, k, v = self.qkv(x)
        b, n, d = q.shape
        q, k, v = (t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))  # B x H x L x d
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)  # B x L x D


class ClipAdapter:
    """CLIP's image tower in the pieces that training-free methods reuse: the one place that
    touches open_clip's internals.

    Only public pieces of open_clip's ViT are read: ``conv1``, ``class_embedding``,
    ``positional_embedding``, ``patch_dropout``, ``ln_pre``, ``transformer.resblocks`` (each with
    ``ln_1``, ``attn`` (``in_proj_weight``/``in_proj_bias``, ``out_proj``, ``num_heads``), ``ls_1``,
    ``ln_2``, ``mlp``, ``ls_2``), ``ln_post``, ``proj`` and ``preprocess_cfg``. All tensors are
    batch-first: B x L x D tokens, class token first.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.visual = model.visual
        self._blocks = [Block(b, self.visual.transformer.batch_first) for b in self.visual.transformer.resblocks]

    @property
    def patch_size(self) -> int:
        return int(self.visual.conv1.kernel_size[0])

    @property
    def width(self) -> int:
        """D, the transformer's width."""
        return int(self.visual.conv1.out_channels)

    @property
    def embed_dim(self) -> int:
        """E, the joint image-text space's width."""
        return int(self.visual.proj.shape[1])

    @property
    def depth(self) -> int:
        return len(self._blocks)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.proj.dtype

    @property
    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """CLIP's pixel mean and std (RGB, 0-1 range) as open_clip's preprocess config states them."""
        cfg = self.visual.preprocess_cfg
        return tuple(cfg["mean"]), tuple(cfg["std"])

    def grid(self, images: torch.Tensor) -> tuple[int, int]:
        """(h, w) patch grid of B x 3 x H x W images."""
        return images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size

    def block(self, index: int) -> Block:
        """Block ``index`` (negative counts from the last)."""
        return self._blocks[index]

    def embed(self, images: torch.Tensor, pos_recipe: str = "dino") -> torch.Tensor:
        """Patch embedding, class token, positional embedding and ``ln_pre``.

        Args:
            images: B x 3 x H x W, CLIP-normalised.
            pos_recipe: how the positional embedding is resized to the patch grid: the DINO
                recipe of ProxyCLIP's published code, or another method's (see
                :mod:`proxyclip.model.pos_embed`).

        Returns:
            B x (1 + h*w) x D tokens.
        """
        visual = self.visual
        x = visual.conv1(images)  # B x D x h x w
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)  # B x hw x D
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # B x 1 x D
        x = torch.cat([cls, x], dim=1)  # B x (1 + hw) x D
        x = x + resize_pos_embed_with_cls(visual.positional_embedding, grid, pos_recipe).to(x.dtype)
        return visual.ln_pre(visual.patch_dropout(x))

    def blocks(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Run blocks ``start:stop`` unchanged, B x L x D -> B x L x D."""
        transformer = self.visual.transformer
        if not transformer.batch_first:
            x = x.transpose(0, 1)  # B x L x D -> L x B x D
        for block in transformer.resblocks[start:stop]:
            x = block(x)
        return x if transformer.batch_first else x.transpose(0, 1)

    def last_block_input(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W -> B x (1 + h*w) x D: every block but the last, unchanged."""
        return self.blocks(self.embed(images), stop=-1)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """``ln_post`` and ``proj``: B x L x D -> B x L x E in CLIP's joint space (not normalised)."""
        return self.visual.ln_post(tokens) @ self.visual.proj

    def to_map(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Patch tokens as a map: B x (h*w) x C -> B x C x h x w."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)


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
    extra_templates: Sequence[str] = (),
) -> torch.Tensor:
    """Text embeddings of ``queries`` with the 80 OpenAI ImageNet templates (and ``extra_templates``,
    format strings with ``{}`` for the name, after them).

    Each template's embedding is l2-normalised, averaged over templates and normalised again,
    as open_clip's ``build_zero_shot_classifier`` does. ``progress(done, total)`` is called after
    each batch of names (e.g. to draw a progress bar).

    Returns:
        Q x E float32, rows of unit norm.
    """
    templates = [*open_clip.OPENAI_IMAGENET_TEMPLATES, *(t.format for t in extra_templates)]
    out = []
    for start in range(0, len(queries), batch):
        names = queries[start : start + batch]
        tokens = tokenizer([t(name) for name in names for t in templates]).to(device)  # (n*80) x 77
        emb = encode_text(model, tokens).reshape(len(names), len(templates), -1).mean(dim=1)  # n x E
        out.append(F.normalize(emb.float(), dim=-1))
        if progress is not None:
            progress(start + len(names), len(queries))
    return torch.cat(out)  # Q x E
