"""One model contract: configs as data (models/configs/*.json), one factory, the RetrievalModel base class,
one VideoTransform, the same override / pretrained rules in every family."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models
from models import (
    PretrainedWeightsError,
    RetrievalModel,
    VideoTransform,
    create_model,
    get_model_config,
    list_models,
    losses,
    save_checkpoint,
)
from models.clip4clip import CLIP4Clip
from models.dual_encoder import VidSwinDualEncoder
from models.factory import BUILDERS
from models.registry import CONFIG_DIR, add_model_config, merge_config, read_config_file
from models.transforms import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD

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


# ------------------------------------------------------------------------------------ configs are data

CONFIG_FILES = sorted(CONFIG_DIR.glob("*.json"))
# one variant per family, cheap to build on CPU
FAMILY_TINY = {
    "clip4clip": "clip4clip-meanP-tiny",
    "dual_encoder": "vidswin-tiny-cliptext",
    "video_swin": "video-swin-tiny",
    "swinbert": "swinbert-tiny",
}


def test_config_files_are_the_registry():
    assert len(CONFIG_FILES) == len(list_models()) >= 24
    for path in CONFIG_FILES:
        doc = json.loads(path.read_text())
        assert set(doc) <= {"name", "family", "description", "config"} and doc["name"] == path.stem
        assert doc["family"] in BUILDERS, path.name
        entry = models.get_model_entry(doc["name"])
        assert entry.family == doc["family"] and entry.path == str(path)
        # JSON lists come back as the tuples the Python configs used; nothing else changes
        assert json.loads(json.dumps(entry.config)) == doc["config"]
    assert get_model_config("video-swin-t")["depths"] == (2, 2, 6, 2)
    assert get_model_config("swinbert-tiny")["backbone"]["window_size"] == (2, 4, 4)
    cfg = get_model_config("clip4clip-meanP-tiny")
    cfg["vision_cfg"]["layers"] = 99  # a copy: the registry is not changed through it
    assert get_model_config("clip4clip-meanP-tiny")["vision_cfg"]["layers"] == 2


def test_importing_the_models_registers_nothing():
    """Family modules have no import side effects: the registry is filled only by reading the JSON files."""
    code = (
        "import models.clip4clip, models.dual_encoder, models.swinbert, models.video_swin, models.factory\n"
        "import models.registry as r\n"
        "assert r._REGISTRY == {}, sorted(r._REGISTRY)\n"
        "assert len(r.list_models()) == len(list(r.CONFIG_DIR.glob('*.json')))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
    sources = "".join(p.read_text() for p in (Path(models.__file__).parent).glob("*.py"))
    assert "register_model(" not in sources and "importlib" not in sources


def test_add_model_config_refuses_a_clashing_name(tmp_path):
    doc = json.loads((CONFIG_DIR / "video-swin-tiny.json").read_text())
    same = tmp_path / "same.json"
    same.write_text(json.dumps(doc))
    assert add_model_config(same) == ["video-swin-tiny"]  # the same config again: a no-op
    doc["config"]["embed_dim"] = 32
    clash = tmp_path / "clash.json"
    clash.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="already registered"):
        add_model_config(clash)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x"}))
    with pytest.raises(ValueError, match="needs 'name', 'family' and a 'config'"):
        read_config_file(bad)


@pytest.mark.parametrize("name", sorted(n for n in list_models() if "tiny" in n))
def test_every_tiny_config_builds(name):
    model, transform, tokenizer = create_model(name, seed=0)
    assert model.model_name == name and model.model_id.startswith(f"{name}@")
    assert isinstance(transform, VideoTransform)
    assert (tokenizer is None) == (models.get_model_entry(name).family == "video_swin")
    again, _, _ = create_model(name, seed=0)
    assert again.model_id == model.model_id  # seeded random init: the same weights everywhere


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(n for n in list_models() if "tiny" not in n))
def test_every_full_size_config_builds(name):
    model, transform, _ = create_model(name)
    assert isinstance(transform, VideoTransform) and transform.image_size == 224
    assert sum(p.numel() for p in model.parameters()) > 20e6


# ------------------------------------------------------------------------ one rule for overrides / weights


def test_merge_config_merges_nested_dicts_and_rejects_unknown_keys():
    base = {"a": 1, "cfg": {"x": 1, "y": {"z": 2, "w": 3}}, "t": (1, 2)}
    merged = merge_config("m", base, {"cfg": {"y": {"z": 5}}, "t": (3,), "extra": 7}, known_keys=("extra",))
    assert merged == {"a": 1, "cfg": {"x": 1, "y": {"z": 5, "w": 3}}, "t": (3,), "extra": 7}
    assert base["cfg"]["y"]["z"] == 2  # the registered config is never changed
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'bogus' for model 'm'"):
        merge_config("m", base, {"bogus": 1})


@pytest.mark.parametrize("family", sorted(FAMILY_TINY))
def test_unknown_override_key_is_a_value_error_in_every_family(family):
    name = FAMILY_TINY[family]
    with pytest.raises(ValueError, match=rf"unknown option.*'bogus_key'.*'{re.escape(name)}'"):
        create_model(name, bogus_key=1)


@pytest.fixture(scope="module")
def foreign_checkpoints(tmp_path_factory):
    """A Video Swin and a CLIP4Clip checkpoint: each is the wrong model for the other families."""
    folder = tmp_path_factory.mktemp("foreign")
    swin, _, _ = create_model("video-swin-tiny", seed=0)
    clip, _, _ = create_model("clip4clip-meanP-tiny", seed=0)
    return {
        "swin": save_checkpoint(swin, folder / "swin.pt"),
        "clip": save_checkpoint(clip, folder / "clip.pt"),
    }


@pytest.mark.parametrize("family", sorted(FAMILY_TINY))
def test_pretrained_that_cannot_be_had_raises_pretrained_weights_error(family, tmp_path, foreign_checkpoints):
    name = FAMILY_TINY[family]
    with pytest.raises(PretrainedWeightsError, match="does not exist|is not a file") as missing:
        create_model(name, pretrained=tmp_path / "missing.pt")
    assert isinstance(missing.value, FileNotFoundError)  # what callers caught before stays caught
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedWeightsError):
        create_model(name, pretrained=garbage)
    foreign = foreign_checkpoints["clip" if family == "video_swin" else "swin"]
    with pytest.raises(PretrainedWeightsError):
        create_model(name, pretrained=foreign)


def test_tower_weights_that_cannot_be_had_raise_pretrained_weights_error(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        create_model("vidswin-tiny-cliptext", video_pretrained=tmp_path / "none.pt")
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        create_model("vidswin-tiny-cliptext", text_pretrained=str(tmp_path / "none.pt"))
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        create_model("swinbert-tiny", backbone_pretrained=tmp_path / "none.pt")


# ------------------------------------------------------------------------------- RetrievalModel contract

SHARED = ("tokenize", "encode_text", "encode_video", "encode_clips", "video_from_clips", "embed_batch",
          "similarity", "contrastive_loss", "param_groups", "forward")


@pytest.mark.parametrize("name", ["clip4clip-seqTransf-tiny", "vidswin-tiny-cliptext"])
def test_retrieval_families_share_the_base_contract(name):
    model, transform, _ = create_model(name, seed=0)
    assert isinstance(model, RetrievalModel)
    for method in SHARED:  # the duplicated methods live once, in the base class
        assert method not in type(model).__dict__, method
    frames = transform(torch.randint(0, 256, (2, 3, 4, 40, 36, 3), dtype=torch.uint8))
    mask = torch.ones(2, 3, 4, dtype=torch.bool)
    mask[0, 2] = False  # a padding clip
    mask[1, 0, 2:] = False  # padded frames
    texts = ["a red circle", "a blue square moves"]
    with torch.no_grad():
        clips = model.encode_clips(frames, mask)
        text = model.encode_text(texts)
        assert torch.equal(clips[0, 2], torch.zeros_like(clips[0, 2]))
        assert torch.allclose(clips[1, 0], model.encode_video(frames[1:2, 0], mask[1:2, 0])[0], atol=1e-5)
        for mode in losses.CLIP_AGGREGATIONS:  # the old per-family body, written out
            model.clip_aggregation = mode
            video = model.video_from_clips(clips, mask)
            assert torch.equal(video, losses.aggregate_clips(clips, mask.any(-1), mode))
            assert torch.allclose(model.embed_batch(frames, mask), video, atol=1e-5)
        scale = model.logit_scale.exp().clamp(max=100.0)
        assert torch.allclose(model.similarity(text, video), scale * text @ video.t(), atol=1e-5)
        loss = model.loss(frames, mask, texts)
        assert torch.allclose(loss, losses.cross_entropy_sym(model.similarity(video, text)), atol=1e-5)
    with pytest.raises(ValueError, match="1 captions for 2 videos"):
        model.loss(frames, mask, texts[:1])
    with pytest.raises(ValueError, match="at least one valid frame"):
        model.encode_video(frames[:, 0], torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="token tensor length"):
        model.tokenize(torch.zeros(1, 3, dtype=torch.long))


def test_dual_encoder_param_groups():
    model, _, _ = create_model("vidswin-tiny-cliptext", seed=0)
    groups = {g["name"]: g for g in model.param_groups(1e-3, 1e-5, weight_decay=0.2)}
    assert set(groups) == {"backbone", "backbone_no_decay", "new", "new_no_decay"}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    params = dict(model.named_parameters())
    assert id(params["video_proj.weight"]) in ids["new"] and id(params["logit_scale"]) in ids["new_no_decay"]
    table = next(k for k in params if k.endswith("relative_position_bias_table"))
    assert id(params[table]) in ids["backbone_no_decay"]
    assert groups["new"]["lr"] == 1e-3 and groups["backbone"]["lr"] == 1e-5
    assert groups["backbone"]["weight_decay"] == 0.2 and groups["new_no_decay"]["weight_decay"] == 0.0


# -------------------------------------------------------------------------------------- one transform


def _old_clip_transform(frames, size, mean, std):
    """models.transforms.VideoTransform before issue #18 (bicubic, antialiased, clamped)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    lead, (h, w) = x.shape[:-3], x.shape[-3:-1]
    x = x.reshape(-1, h, w, 3).permute(0, 3, 1, 2).float().div_(255.0)
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
            x = x.clamp_(0.0, 1.0)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[:, :, top : top + size, left : left + size]
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return x.reshape(*lead, 3, size, size).contiguous()


def _old_swin_transform(frames, size):
    """models.video_swin.VideoSwinTransform before issue #18 (bilinear, antialiased, always resized)."""
    x = torch.as_tensor(np.asarray(frames)) if not isinstance(frames, torch.Tensor) else frames
    lead, (h, w) = x.shape[:-3], x.shape[-3:-1]
    x = x.reshape(-1, h, w, 3).permute(0, 3, 1, 2).float().div_(255.0)
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[:, :, top : top + size, left : left + size]
    x = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return x.reshape(*lead, 3, size, size)


@pytest.fixture(scope="module")
def family_transforms():
    return {family: create_model(name, seed=0)[1] for family, name in FAMILY_TINY.items()}


@pytest.mark.parametrize("family", sorted(FAMILY_TINY))
def test_one_transform_gives_each_family_its_old_output(family, family_transforms):
    tf = family_transforms[family]
    s = tf.image_size
    rng = np.random.default_rng(7)
    for hw in ((40, 52), (52, 40), (s, s), (s, s + 9), (s - 5, s + 3), (2 * s + 1, s + 2)):
        raw = rng.integers(0, 256, (2, 3, *hw, 3), dtype=np.uint8)
        if family == "clip4clip":
            old = _old_clip_transform(raw, s, CLIP_MEAN, CLIP_STD)
        elif family == "dual_encoder":
            old = _old_clip_transform(raw, s, IMAGENET_MEAN, IMAGENET_STD)
        else:
            old = _old_swin_transform(raw, s)
        new = tf(raw)
        assert new.shape == old.shape == (2, 3, 3, s, s) and new.dtype == torch.float32
        assert torch.equal(new, old), (family, hw, (new - old).abs().max())
        assert torch.equal(tf(torch.from_numpy(raw)), new)


@pytest.mark.parametrize(
    "bad, shown",
    [
        (np.zeros((2, 8, 8, 3), dtype=np.float32), "float32"),
        (torch.zeros(2, 8, 8, 3), "float32"),
        (np.zeros((2, 8, 8, 4), dtype=np.uint8), r"\(2, 8, 8, 4\)"),
        (np.zeros((8, 8, 3), dtype=np.uint8), r"\(8, 8, 3\)"),
        (np.zeros((1, 0, 8, 3), dtype=np.uint8), "empty spatial size 0x8"),
        ([["not", "frames"]], "str|<U"),
        (None, "NoneType|object"),
    ],
)
def test_transform_rejects_bad_input_with_one_value_error(bad, shown):
    tf = VideoTransform(8, IMAGENET_MEAN, IMAGENET_STD, interpolation="bilinear")
    with pytest.raises(ValueError, match=rf"frames must be uint8 \[\.\.\., T, H, W, 3\].*({shown})"):
        tf(bad)
    with pytest.raises(ValueError, match="interpolation 'lanczos'"):
        VideoTransform(8, interpolation="lanczos")
