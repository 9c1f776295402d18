"""The text side: our trimmed encoding equals open_clip's zero-shot classifier."""

import open_clip
import torch
from conftest import tiny_clip

from proxyclip.model.clip import encode_queries


def test_trimmed_text_encoding_equals_open_clip_zero_shot_classifier():
    model, tokenizer = tiny_clip(seed=5)
    names = ["cat", "a very long class name with many words", "tv monitor"]
    ours = encode_queries(model, tokenizer, names, "cpu", batch=2)
    with torch.no_grad():
        theirs = open_clip.build_zero_shot_classifier(
            model, tokenizer=tokenizer, classnames=names, templates=open_clip.OPENAI_IMAGENET_TEMPLATES, device="cpu"
        ).T
    assert ours.shape == (3, 32)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert len(open_clip.OPENAI_IMAGENET_TEMPLATES) == 80
