"""The checkpoint files users have: OpenAI's TorchScript CLIP files and the original DINO, DINOv2,
SAM and MAE checkpoints load as they are, with the features of the original code; refusals name keys."""

from __future__ import annotations

import warnings

import originals
import pytest
import torch
from conftest import TINY_CLIP, tiny_clip
from oracles import proxyclip_published as ref
from torch import nn

from proxyclip.errors import WeightsError
from proxyclip.model.checkpoints import is_torchscript, read_checkpoint
from proxyclip.model.clip import load_clip
from proxyclip.model.vfm import VFM_BUILDERS


def _openai_torchscript(path) -> nn.Module:
    """A TorchScript archive laid out as OpenAI's ViT-B-16.pt: fp16 weights under OpenAI's keys (which
    open_clip's CLIP shares) plus the input_resolution / context_length / vocab_size entries."""
    model, _ = tiny_clip(seed=5)
    model = model.half()
    for name, value in (("input_resolution", 64), ("context_length", 77), ("vocab_size", 49408)):
        if hasattr(model, name):
            delattr(model, name)  # open_clip keeps two of them as ints; OpenAI's archives hold tensors
        model.register_buffer(name, torch.tensor(value))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated; OpenAI's files are TorchScript all the same
        torch.jit.script(model).save(str(path))
    return model


def test_openai_torchscript_clip_file(tmp_path):
    path = tmp_path / "ViT-B-16.pt"
    source = _openai_torchscript(path)
    assert is_torchscript(path)
    with pytest.raises(Exception, match="TorchScript"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.load(path, weights_only=True)  # why it was refused: torch.load cannot read it safely
    model, _ = load_clip(TINY_CLIP, None, weights=str(path))
    assert model.visual.proj.dtype == torch.float32  # built in fp32, OpenAI's fp16 values copied in
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, source.state_dict()[name].float(), rtol=0, atol=0)
    x = torch.randn(2, 3, 64, 64)
    expected = source.float().encode_image(x)
    torch.testing.assert_close(model.encode_image(x), expected)


def test_clip_file_that_does_not_fit_names_the_keys(tmp_path):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in tiny_clip()[0].state_dict().items()}
    state["visual.extra.weight"] = torch.zeros(3)
    del state["ln_final.bias"]
    save_file(state, str(tmp_path / "clip.safetensors"))
    with pytest.raises(WeightsError) as err:
        load_clip(TINY_CLIP, None, weights=str(tmp_path / "clip.safetensors"))
    message = str(err.value)
    assert "\n" not in message
    assert "unexpected keys 1 (visual.extra.weight)" in message and "missing keys 1 (ln_final.bias)" in message


CASES = [("dino", False), ("dinov2", False), ("sam", False), ("mae", False), ("mae", True)]


@pytest.mark.parametrize(("kind", "decoder"), CASES, ids=["dino", "dinov2", "sam", "mae", "mae_full"])
def test_original_vfm_checkpoints_load_with_the_original_features(kind, decoder, tmp_path):
    """dino_vitbase8_pretrain.pth, dinov2_vitb14_reg4_pretrain.pth, sam_vit_b_01ec64.pth (the whole
    Sam), mae_pretrain_vit_base.pth and mae_pretrain_vit_base_full.pth layouts, loaded through the
    builders; features equal the original forward pass (the oracle's transcription) on the same file."""
    checkpoint = originals.original_state(kind, seed=2, decoder=decoder)
    path = tmp_path / f"{kind}.pth"
    torch.save(checkpoint, path)
    vfm = originals.load_vfm(kind, path)
    torch.manual_seed(0)
    for size in ((112, 112), (56, 112)):
        x = torch.randn(1, 3, *size)  # normalised for the VFM
        if vfm.runs_at_window:  # MAE: the segmenter resizes to the window first
            x = torch.nn.functional.interpolate(x, size=(112, 112), mode="bilinear", align_corners=False)
        with torch.no_grad():
            ours = vfm(x)
            expected = ref.vfm_features(originals.published(kind, checkpoint), x, 112)
        assert ours.shape == expected.shape
        assert (ours - expected).abs().max() < 1e-5


def test_vfm_file_that_does_not_fit_names_the_keys(tmp_path):
    checkpoint = originals.original_state("dino", seed=2)
    checkpoint["head.weight"] = torch.zeros(10, 32)
    del checkpoint["norm.bias"]
    torch.save(checkpoint, tmp_path / "dino.pth")
    with pytest.raises(WeightsError) as err:
        originals.load_vfm("dino", tmp_path / "dino.pth")
    message = str(err.value)
    assert "\n" not in message and "dino.pth" in message
    assert "unexpected keys 1 (head.weight)" in message and "missing keys 1 (norm.bias)" in message


def test_mae_decoder_is_ignored_but_other_extras_are_not(tmp_path):
    checkpoint = originals.original_state("mae", seed=2, decoder=True)
    checkpoint["model"]["fc_norm.weight"] = torch.ones(32)
    torch.save(checkpoint, tmp_path / "mae.pth")
    with pytest.raises(WeightsError, match=r"unexpected keys 1 \(fc_norm.weight\)"):
        originals.load_vfm("mae", tmp_path / "mae.pth")


def test_sam_layer_norms_use_sams_epsilon():
    """segment-anything builds its encoder with LayerNorm eps 1e-6 (timm's samvit: 1e-5)."""
    kind_kwargs = originals.TINY_VFMS["sam"][2]
    vfm = VFM_BUILDERS["sam_vitb"](random_weights=True, **kind_kwargs)
    norms = [m for m in vfm.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * kind_kwargs["depth"] + 2  # norm1, norm2 per block; the neck's two LayerNorm2d
    assert all(m.eps == 1e-6 for m in norms)


def test_read_checkpoint_unwraps_and_refuses(tmp_path):
    state = {"a.weight": torch.ones(2)}
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 3}, tmp_path / "ddp.pt")
    assert read_checkpoint(tmp_path / "ddp.pt").keys() == {"a.weight"}
    torch.save({"epoch": 3}, tmp_path / "empty.pt")
    with pytest.raises(WeightsError, match="no state dict"):
        read_checkpoint(tmp_path / "empty.pt")
    with pytest.raises(WeightsError, match="no such file"):
        read_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="could not be loaded"):
        read_checkpoint(tmp_path / "junk.pt")


def test_pickled_code_is_not_run(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pickled code ran')",))

    torch.save({"w": torch.ones(1), "evil": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="could not be loaded"):
        read_checkpoint(tmp_path / "evil.pt")
