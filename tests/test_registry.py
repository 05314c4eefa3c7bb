"""Registry + factory for the CLIP4Clip and VidSwin dual-encoder families (open_clip-style create_model)."""

from __future__ import annotations

import re

import pytest
import torch

from models import create_model, get_model_config, list_models
from models.clip4clip import CLIP4Clip
from models.dual_encoder import VidSwinDualEncoder
from models.transforms import VideoTransform

torch.set_num_threads(2)

REQUIRED = [
    "clip4clip-meanP-ViT-B-32",
    "clip4clip-seqLSTM-ViT-B-32",
    "clip4clip-seqTransf-ViT-B-32",
    "clip4clip-tightTransf-ViT-B-32",
    "clip4clip-meanP-ViT-B-16",
    "clip4clip-seqTransf-ViT-B-16",
    "vidswin-t-cliptext",
    "clip4clip-meanP-tiny",
    "clip4clip-seqLSTM-tiny",
    "clip4clip-seqTransf-tiny",
    "clip4clip-tightTransf-tiny",
    "vidswin-tiny-cliptext",
]
TINY = [n for n in REQUIRED if n.endswith("-tiny") or n.endswith("tiny-cliptext")]


def test_required_variants_are_registered():
    names = set(list_models())
    assert set(REQUIRED) <= names
    assert set(list_models("clip4clip")) >= {n for n in REQUIRED if n.startswith("clip4clip-")}
    assert set(list_models("dual_encoder")) == {"vidswin-t-cliptext", "vidswin-tiny-cliptext",
                                                 "vidswin-tiny64-cliptext"}


def test_configs_match_the_papers_and_tiny_limits():
    b32 = get_model_config("clip4clip-meanP-ViT-B-32")
    assert (
        b32["vision_cfg"]["patch_size"] == 32
        and b32["vision_cfg"]["width"] == 768
        and b32["embed_dim"] == 512
    )
    assert get_model_config("clip4clip-seqTransf-ViT-B-16")["vision_cfg"]["patch_size"] == 16
    for name in TINY:
        cfg = get_model_config(name)
        text = cfg["text_cfg"]
        assert text["width"] == 64 and 2 <= text["layers"] <= 4 and text["context_length"] == 32
        assert 64 <= cfg["embed_dim"] <= 128
        if name.startswith("clip4clip"):
            vision = cfg["vision_cfg"]
            assert vision["image_size"] in (32, 64) and vision["patch_size"] == 8
            assert 64 <= vision["width"] <= 128 and 2 <= vision["layers"] <= 4
    with pytest.raises(KeyError, match="unknown model 'clip4clip-nope'"):
        create_model("clip4clip-nope")


@pytest.mark.parametrize("name", TINY)
def test_create_model_returns_model_transform_tokenizer(name):
    torch.manual_seed(0)
    model, transform, tokenizer = create_model(name)
    assert isinstance(model, (CLIP4Clip, VidSwinDualEncoder)) and not model.training
    assert isinstance(transform, VideoTransform) and transform.image_size == model.image_size
    assert re.fullmatch(rf"{re.escape(name)}@[0-9a-f]{{12}}", model.model_id)
    frames = transform(torch.randint(0, 256, (2, 1, 4, 48, 40, 3), dtype=torch.uint8))
    assert frames.shape == (2, 1, 4, 3, model.image_size, model.image_size)
    with torch.no_grad():
        clips = model.encode_clips(frames, torch.ones(2, 1, 4, dtype=torch.bool))
        video = model.encode_video(frames[:, 0])
        text = model.encode_text(["a red circle moves left", "a blue square"])
        tokens_text = model.encode_text(tokenizer(["a red circle moves left", "a blue square"]))
        logits = model.similarity(text, video)
    assert clips.shape == (2, 1, model.embed_dim) and video.shape == text.shape == (2, model.embed_dim)
    assert torch.allclose(clips[:, 0], video, atol=1e-5)
    assert torch.allclose(text, tokens_text)
    assert logits.shape == (2, 2)
    scale = model.logit_scale.exp().clamp(max=100.0)
    assert torch.allclose(logits, scale * text @ video.t(), atol=1e-4)
    # same seed → same weights → same model id; another seed → another id
    torch.manual_seed(0)
    assert create_model(name)[0].model_id == model.model_id
    torch.manual_seed(1)
    assert create_model(name)[0].model_id != model.model_id


def test_overrides_change_the_built_model():
    model, _, _ = create_model("clip4clip-meanP-tiny", sim_header="seqLSTM", text_cfg={"layers": 3})
    assert model.sim_header == "seqLSTM" and len(model.clip.transformer.resblocks) == 3
    with pytest.raises(ValueError, match="sim_header 'bogus'"):
        create_model("clip4clip-meanP-tiny", sim_header="bogus")


@pytest.mark.slow
def test_full_size_configs_build():
    model, transform, tokenizer = create_model("clip4clip-seqTransf-ViT-B-32")
    n_params = sum(p.numel() for p in model.parameters())
    # CLIP ViT-B/32 has ~151M parameters; seqTransf adds 4 text-width blocks (~12.6M) + frame positions
    assert 160e6 < n_params < 170e6
    assert len(model.transformer_clip) == 4 and transform.image_size == 224 and tokenizer.context_length == 77
    with torch.no_grad():
        emb = model.encode_video(torch.randn(1, 2, 3, 224, 224))
    assert emb.shape == (1, 512)
    del model
    dual, transform, _ = create_model("vidswin-t-cliptext")
    assert dual.video.num_features == 768 and dual.embed_dim == 512 and transform.image_size == 224
