"""Stable Diffusion 1.x's UNet as a VFM (the paper's appendix A; Table 2's SD rows), through diffusers.

What the paper states: the UNet at time step t = 0, features of "the 9-th block", the window
resized from 336 x 336 to 672 x 672, a 22 x 22 x 1280 feature map. What runs here:

- the window (normalised to [-1, 1], SD's pixel range) is resized bilinearly by a factor of 2
  (336 -> 672) and encoded by the VAE encoder to latents (the posterior's mean, times the VAE's
  scaling factor 0.18215): 4 x 84 x 84;
- the UNet runs at t = 0 on the clean latent (no noise is added: at t = 0 the scheduler's noise
  scale sqrt(1 - alpha_bar_0) is ~0.03, and leaving it out keeps the features deterministic),
  conditioned on the text embedding of the empty prompt (SD's CLIP ViT-L/14 text encoder's last
  hidden state for "", computed once when the model is built);
- the features are the output of the UNet's first up block (diffusers' ``up_blocks[0]``, the LDM
  code's ``output_blocks[2]``): its resnets at the 11 x 11 bottleneck, then the upsampler's x2
  nearest-neighbour resize and conv: 1280 x 22 x 22.

Why that block: the numbering of "blocks" differs between the LDM code (12 input blocks, a middle
block, 12 output blocks) and diffusers (4 down, 1 mid, 4 up), so "the 9-th block" does not name
one block by itself; the size the paper states does. At a 672 x 672 input the latent is 84 x 84,
the encoder's resolutions are 84, 42, 21 and 11, and the only block whose output is 22 x 22 with
1280 channels is the first up block, upsampling the 11 x 11 bottleneck by 2 (22 = 2 x 11; the
paper's downsampling factor 336 / 22 = 15.3 says the same). The full UNet would instead resize to
the 21 x 21 skip connection at that point (diffusers forwards the skip's size when the latent is
not a multiple of 8, and the LDM code fails there), so only the blocks up to it run: the rest of
the UNet is neither needed nor run.

Weights: a diffusers folder or hub name of SD 1.x (``unet/``, ``vae/``, ``text_encoder/``), by
default ``stable-diffusion-v1-5/stable-diffusion-v1-5`` from the Hugging Face cache or hub, or a
single-file ``.safetensors`` checkpoint; diffusers and transformers are the optional extra
``proxyclip[sd]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ProxyCLIPError, WeightsError

SD15_HUB = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the SD 1.5 weights (formerly runwayml/stable-diffusion-v1-5)

# The architectures of SD 1.5 (diffusers' config.json of unet/, vae/, and text_encoder/), for random weights.
SD15_UNET: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD15_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
    norm_num_groups=32, scaling_factor=0.18215,
)
SD15_TEXT: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
# The empty prompt as SD's CLIP tokenizer gives it: start, end, then the pad token (= end) to 77 tokens.
EMPTY_PROMPT_IDS = [49406] + [49407] * 76


def _diffusers():
    try:
        import diffusers
        import transformers
    except ImportError:
        raise ProxyCLIPError("the Stable Diffusion VFM (sd15) needs diffusers and transformers: "
                             "pip install 'proxyclip[sd]'") from None
    return diffusers, transformers


class StableDiffusionFeatures(nn.Module):
    """SD 1.x's VAE encoder and UNet down to its first up block: 1280 x 22 x 22 features of a
    336 x 336 window.

    Args:
        vae: a diffusers ``AutoencoderKL`` (its encoder and quant_conv are used).
        unet: a diffusers ``UNet2DConditionModel`` (conv_in, time embedding, down blocks, mid block,
            first up block).
        prompt: 1 x 77 x 768 text embedding of the empty prompt.
        scale: the window is resized by this factor first (the paper: 336 -> 672).
    """

    runs_at_window = False
    mean = (0.5, 0.5, 0.5)  # SD's pixels lie in [-1, 1]
    std = (0.5, 0.5, 0.5)

    def __init__(self, vae: nn.Module, unet: nn.Module, prompt: torch.Tensor, scale: float = 2.0):
        super().__init__()
        self.encoder, self.quant_conv = vae.encoder, vae.quant_conv
        self.scaling_factor = float(vae.config.scaling_factor)
        self.unet = unet
        self.scale = scale
        self.register_buffer("prompt", prompt, persistent=False)  # 1 x 77 x 768
        self.patch_size = 16  # nominal (a 336 window gives 22 patches a side)

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W in [-1, 1] -> B x 4 x H/8 x W/8 scaled latents (the posterior's mean)."""
        moments = self.encoder(images)  # B x 8 x H/8 x W/8: mean and log-variance
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return moments[:, :4] * self.scaling_factor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x h x w (normalised to [-1, 1]) -> B x 1280 x h' x w' (22 x 22 for 336 x 336)."""
        size = (round(images.shape[-2] * self.scale), round(images.shape[-1] * self.scale))
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)  # B x 3 x 2h x 2w
        return self.unet_features(self.latents(images))

    def unet_features(self, latents: torch.Tensor) -> torch.Tensor:
        """B x 4 x h x w latents -> the first up block's output at t = 0, B x 1280 x 2 ceil(h/8) x ..."""
        unet = self.unet
        batch = latents.shape[0]
        timestep = torch.zeros(batch, dtype=torch.long, device=latents.device)  # t = 0
        emb = unet.time_embedding(unet.time_proj(timestep).to(latents.dtype))  # B x 1280
        context = self.prompt.to(latents.dtype).expand(batch, -1, -1)  # B x 77 x 768
        sample = unet.conv_in(latents)  # B x 320 x h x w
        skips: tuple[torch.Tensor, ...] = (sample,)
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=context)
            else:
                sample, res = block(hidden_states=sample, temb=emb)
            skips += res
        sample = unet.mid_block(sample, emb, encoder_hidden_states=context)  # B x 1280 x h/8 x w/8
        first = unet.up_blocks[0]
        skip = skips[-len(first.resnets):]
        if getattr(first, "has_cross_attention", False):
            return first(hidden_states=sample, temb=emb, res_hidden_states_tuple=skip, encoder_hidden_states=context)
        return first(hidden_states=sample, temb=emb, res_hidden_states_tuple=skip)  # upsampled x 2, no size forced


def empty_prompt_embedding(text_encoder: nn.Module) -> torch.Tensor:
    """1 x 77 x 768: the last hidden state of SD's text encoder for the empty prompt."""
    ids = torch.tensor([EMPTY_PROMPT_IDS])
    with torch.no_grad():
        return text_encoder(input_ids=ids).last_hidden_state.float()


def _from_parts(vae: nn.Module, unet: nn.Module, text_encoder: nn.Module) -> StableDiffusionFeatures:
    prompt = empty_prompt_embedding(text_encoder.eval())
    model = StableDiffusionFeatures(vae.eval(), unet.eval(), prompt)
    return model.eval().requires_grad_(False)


def build_random(unet: dict | None = None, vae: dict | None = None, text: dict | None = None) -> StableDiffusionFeatures:
    """The architecture with random weights (SD 1.5's, or the configurations given: tests)."""
    diffusers, transformers = _diffusers()
    return _from_parts(diffusers.AutoencoderKL(**(vae or SD15_VAE)),
                       diffusers.UNet2DConditionModel(**(unet or SD15_UNET)),
                       transformers.CLIPTextModel(transformers.CLIPTextConfig(**(text or SD15_TEXT))))


def load_pretrained(source: str = SD15_HUB) -> StableDiffusionFeatures:
    """SD 1.x from a diffusers folder or hub name (unet/, vae/, text_encoder/), or a ``.safetensors``
    single-file checkpoint (read by diffusers' ``from_single_file``).

    Raises:
        WeightsError: the weights cannot be loaded, saying how to supply them.
    """
    diffusers, transformers = _diffusers()
    path = Path(source).expanduser()
    try:
        if path.is_file():
            if path.suffix != ".safetensors":
                raise ProxyCLIPError(f"SD checkpoint {path}: only .safetensors single files are read (pickled .ckpt "
                                     "files can run code); convert it, or pass a diffusers folder")
            pipe = diffusers.StableDiffusionPipeline.from_single_file(str(path), safety_checker=None)
            return _from_parts(pipe.vae, pipe.unet, pipe.text_encoder)
        where = str(path) if path.is_dir() else source
        vae = diffusers.AutoencoderKL.from_pretrained(where, subfolder="vae")
        unet = diffusers.UNet2DConditionModel.from_pretrained(where, subfolder="unet")
        text = transformers.CLIPTextModel.from_pretrained(where, subfolder="text_encoder", use_safetensors=None)
    except ProxyCLIPError:
        raise
    except Exception as exc:  # diffusers, transformers and huggingface_hub raise many types here
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise WeightsError(
            f"Stable Diffusion weights {source} could not be loaded ({type(exc).__name__}: {reason}). Pass "
            "--vfm-weights PATH (a diffusers folder with unet/, vae/ and text_encoder/, or a .safetensors "
            f"checkpoint), or put {SD15_HUB} in the Hugging Face cache (HF_HOME) and set HF_HUB_OFFLINE=1, "
            "or connect to the internet."
        ) from exc
    return _from_parts(vae, unet, text)


def build_sd15(weights: str | None = None, random_weights: bool = False) -> nn.Module:
    """Stable Diffusion 1.5's UNet (t = 0, empty prompt): 1280 x 22 x 22 features of a 336 window."""
    if random_weights:
        return build_random()
    return load_pretrained(weights or SD15_HUB)
