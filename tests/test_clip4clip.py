"""CLIP4Clip on open_clip, the VidSwin dual encoder, transforms and weights loading (tiny configs, CPU)."""

from __future__ import annotations

import os
import pickle
import socket
import zipfile

import numpy as np
import pytest
import torch
from open_clip.model import CLIP, convert_weights_to_lp

from models import create_model, get_model_config, model_id_for, save_checkpoint
from models.pretrained import PretrainedWeightsError, read_torchscript_state_dict
from models.transforms import CLIP_MEAN, CLIP_STD, VideoTransform

CAPTIONS = [
    "a red circle moves left",
    "a blue square moves right",
    "a green triangle moves up",
    "a yellow star moves down",
    "a purple circle moves right",
    "an orange square moves left",
]


def tiny(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return create_model(name, **overrides)


def random_frames(b: int, t: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, 3, size, size, generator=g)


def open_clip_twin(model) -> CLIP:
    """An independent open_clip CLIP built from the same config, holding the same weights."""
    cfg = model.config
    twin = CLIP(
        cfg["embed_dim"],
        cfg["vision_cfg"],
        cfg["text_cfg"],
        quick_gelu=cfg["quick_gelu"],
        nonscalar_logit_scale=True,
    )
    twin.load_state_dict(model.clip.state_dict())
    return twin.eval()


# ----------------------------------------------------------------------------------------- transforms


def test_transform_resizes_crops_and_normalises():
    tf = VideoTransform(32)
    frames = np.zeros((2, 3, 40, 60, 3), dtype=np.uint8)
    frames[..., 0] = 255  # pure red
    out = tf(frames)
    assert out.shape == (2, 3, 3, 32, 32) and out.dtype == torch.float32
    expected = [(1.0 - CLIP_MEAN[0]) / CLIP_STD[0], -CLIP_MEAN[1] / CLIP_STD[1], -CLIP_MEAN[2] / CLIP_STD[2]]
    assert torch.allclose(out[0, 0, :, 5, 5], torch.tensor(expected), atol=1e-4)
    # centre crop: a marker column in the middle of a wide frame survives, the edges are cut
    wide = np.zeros((1, 32, 64, 3), dtype=np.uint8)
    wide[:, :, 31:33] = 255
    wide[:, :, :8] = 255
    cropped = tf(torch.from_numpy(wide))
    assert cropped.shape == (1, 3, 32, 32)
    assert cropped[0, 0, :, 15:17].mean() > cropped[0, 0, :, 0:4].mean()
    with pytest.raises(ValueError, match="uint8"):  # one exception type for every bad input
        tf(np.zeros((1, 32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[..., T, H, W, 3\]"):
        tf(np.zeros((1, 32, 32, 4), dtype=np.uint8))


# --------------------------------------------------------------------------------------------- meanP


def test_meanp_of_repeated_frame_equals_open_clip_image_embedding():
    model, transform, _ = tiny("clip4clip-meanP-tiny")
    twin = open_clip_twin(model)
    frame = random_frames(1, 1, seed=1)[:, 0]  # [1, 3, S, S]
    clip_video = frame.unsqueeze(1).repeat(1, 5, 1, 1, 1)
    # padded frames hold garbage and must not matter
    padded = torch.cat([clip_video, random_frames(1, 3, seed=2)], 1)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    with torch.no_grad():
        expected = twin.encode_image(frame, normalize=True)
        got = model.encode_video(clip_video)
        got_masked = model.encode_video(padded, mask)
        text_expected = twin.encode_text(model.tokenize(CAPTIONS[:2]), normalize=True)
        text_got = model.encode_text(CAPTIONS[:2])
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(got_masked, expected, atol=1e-5)
    assert torch.allclose(text_got, text_expected, atol=1e-5)
    assert torch.allclose(got.norm(dim=-1), torch.ones(1))


def test_encode_clips_masks_and_aggregates():
    model, _, _ = tiny("clip4clip-meanP-tiny")
    frames = random_frames(2, 4 * 3, seed=3).view(2, 3, 4, 3, 32, 32)
    mask = torch.ones(2, 3, 4, dtype=torch.bool)
    mask[1, 2] = False  # a whole clip is padding
    mask[0, 1, 2:] = False
    with torch.no_grad():
        emb = model.encode_clips(frames, mask)
        single = model.encode_video(frames[0, 1:2], mask[0, 1:2])
        pooled = model.embed_batch(frames, mask)
        assert torch.allclose(model.encode_video(frames, mask), pooled)
        model.clip_aggregation = "max"
        pooled_max = model.encode_video(frames, mask)
    assert emb.shape == (2, 3, 64)
    assert torch.allclose(emb[0, 1], single[0], atol=1e-5)
    assert torch.all(emb[1, 2] == 0)
    expected = torch.nn.functional.normalize(emb[1, :2].mean(0), dim=-1)
    assert torch.allclose(pooled[1], expected, atol=1e-5)
    expected_max = torch.nn.functional.normalize(emb[1, :2].amax(0), dim=-1)
    assert torch.allclose(pooled_max[1], expected_max, atol=1e-5)
    with pytest.raises(ValueError, match="at least one valid frame"):
        model.encode_video(frames[:, 0], torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[B, T, 3, S, S\]"):
        model.encode_video(torch.zeros(2, 4, 3, 16, 16))


# ----------------------------------------------------------------------------------- seqTransf / LSTM


def test_seqtransf_initialised_from_clip_text_weights(tmp_path):
    model, _, _ = tiny("clip4clip-seqTransf-tiny")
    clip_sd = model.clip.state_dict()
    n_text = len(model.clip.transformer.resblocks)
    assert len(model.transformer_clip) == min(4, n_text) == 2
    assert torch.equal(
        model.frame_position_embeddings.weight, clip_sd["positional_embedding"][: model.max_frames]
    )
    for i, block in enumerate(model.transformer_clip):
        for key, value in block.state_dict().items():
            assert torch.equal(value, clip_sd[f"transformer.resblocks.{i}.{key}"]), (i, key)

    # after loading CLIP weights from a file, the new modules copy the *loaded* weights
    torch.manual_seed(123)
    other = CLIP(
        **{k: model.config[k] for k in ("embed_dim", "vision_cfg", "text_cfg")}, nonscalar_logit_scale=True
    )
    weights = tmp_path / "open_clip_tiny.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in other.state_dict().items()}}, weights)
    loaded, _, _ = create_model("clip4clip-seqTransf-tiny", pretrained=str(weights))
    ref = other.state_dict()
    assert torch.equal(loaded.clip.visual.conv1.weight, ref["visual.conv1.weight"])
    assert torch.equal(
        loaded.frame_position_embeddings.weight, ref["positional_embedding"][: loaded.max_frames]
    )
    assert torch.equal(
        loaded.transformer_clip[1].attn.in_proj_weight, ref["transformer.resblocks.1.attn.in_proj_weight"]
    )
    assert loaded.model_id != model.model_id


@pytest.mark.parametrize("name", ["clip4clip-seqTransf-tiny", "clip4clip-seqLSTM-tiny"])
def test_sequence_heads_ignore_padded_frames(name):
    model, _, _ = tiny(name)
    frames = random_frames(2, 6, seed=4)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    garbage = frames.clone()
    garbage[1, 4:] = torch.randn(2, 3, 32, 32) * 5
    with torch.no_grad():
        a = model.encode_video(frames, mask)
        b = model.encode_video(garbage, mask)
        short = model.encode_video(frames[1:, :4])
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(a[1], short[0], atol=1e-5)


# ------------------------------------------------------------------------------------- 3D linear patch


def test_3d_patch_center_init_equals_2d_on_static_clip():
    model2d, _, _ = tiny("clip4clip-meanP-tiny")
    model3d, _, _ = tiny("clip4clip-meanP-3d-tiny", seed=7)
    model3d.clip.load_state_dict(model2d.clip.state_dict())
    model3d.init_from_clip()
    frame = random_frames(2, 1, seed=5)
    static = frame.repeat(1, 6, 1, 1, 1)
    moving = random_frames(2, 6, seed=6)
    with torch.no_grad():
        f2 = model2d.encode_frames(static)
        f3 = model3d.encode_frames(static)
        assert torch.allclose(f2, f3, atol=1e-5)
        # centre init: each frame sees only itself, so any clip matches 2D until the side slots train
        assert torch.allclose(model2d.encode_frames(moving), model3d.encode_frames(moving), atol=1e-5)
        model3d.conv2.weight[:, :, 0] += 0.05 * torch.randn_like(model3d.conv2.weight[:, :, 0])
        assert not torch.allclose(model2d.encode_frames(moving), model3d.encode_frames(moving), atol=1e-3)
        # "average" inflation: equal on interior frames of a static clip, not at the zero-padded ends
        avg, _, _ = tiny("clip4clip-meanP-3d-tiny", patch3d_init="average")
        avg.clip.load_state_dict(model2d.clip.state_dict())
        avg.init_from_clip()
        fa = avg.encode_frames(static)
    assert torch.allclose(fa[:, 1:-1], f2[:, 1:-1], atol=1e-4)
    assert not torch.allclose(fa[:, 0], f2[:, 0], atol=1e-3)


# -------------------------------------------------------------------------------------- tightTransf


def test_tighttransf_scores_shape_and_pairing():
    model, _, _ = tiny("clip4clip-tightTransf-tiny")
    frames = random_frames(3, 4, seed=8)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    with torch.no_grad():
        scores = model.cross_scores(CAPTIONS[:2], frames, mask)
        single = model.cross_scores([CAPTIONS[1]], frames[2:3], mask[2:3])
    assert scores.shape == (2, 3)
    assert torch.isfinite(scores).all()
    assert torch.allclose(scores[1, 2], single[0, 0], atol=1e-5)  # batching does not mix pairs
    assert scores.std() > 0
    meanp, _, _ = tiny("clip4clip-meanP-tiny")
    with pytest.raises(RuntimeError, match="tightTransf"):
        meanp.cross_scores(CAPTIONS[:1], frames)


# ----------------------------------------------------------------------------------------- training


def _toy_batch(n: int = 6, t: int = 4, size: int = 32):
    """Each video a distinct constant colour + noise; captions differ per video."""
    g = torch.Generator().manual_seed(0)
    colors = torch.rand(n, 3, 1, 1, generator=g) * 4 - 2
    return colors.unsqueeze(1).expand(n, t, 3, size, size) + 0.1 * torch.randn(
        n, t, 3, size, size, generator=g
    )


@pytest.mark.parametrize(
    "name",
    [
        "clip4clip-meanP-tiny",
        "clip4clip-seqTransf-tiny",
        pytest.param("clip4clip-tightTransf-tiny", marks=pytest.mark.slow),
        pytest.param("vidswin-tiny-cliptext", marks=pytest.mark.slow),
    ],
)
def test_loss_decreases_and_reaches_both_towers(name):
    model, _, _ = tiny(name)
    model.train()
    frames = _toy_batch(t=3)
    mask = torch.ones(6, 3, dtype=torch.bool)
    mask[0, 2] = False
    groups = model.param_groups(lr=3e-3, backbone_lr=2e-3)
    grouped = [p for g in groups for p in g["params"]]
    assert (
        len(grouped) == len({id(p) for p in grouped}) == sum(1 for p in model.parameters() if p.requires_grad)
    )
    opt = torch.optim.AdamW(groups)
    first = model.loss(frames, mask, CAPTIONS)
    first.backward()
    video_param = (
        model.clip.visual.conv1.weight if hasattr(model, "clip") else model.video.patch_embed.proj.weight
    )
    text_param = model.clip.transformer.resblocks[0].attn.in_proj_weight if hasattr(model, "clip") else None
    if text_param is None:
        text_param = model.text.transformer.resblocks[0].attn.in_proj_weight
    assert video_param.grad is not None and video_param.grad.abs().sum() > 0
    assert text_param.grad is not None and text_param.grad.abs().sum() > 0
    if name == "clip4clip-seqTransf-tiny":
        assert model.transformer_clip[0].attn.in_proj_weight.grad.abs().sum() > 0
    if name == "clip4clip-tightTransf-tiny":
        assert model.cross.score.weight.grad.abs().sum() > 0
    opt.step()
    for _ in range(7):
        opt.zero_grad()
        loss = model.loss(frames, mask, CAPTIONS)
        loss.backward()
        opt.step()
    assert float(loss) < 0.7 * float(first)


def test_param_groups_split_backbone_from_new_modules():
    model, _, _ = tiny("clip4clip-seqLSTM-tiny")
    groups = {g["name"]: g for g in model.param_groups(lr=1e-4, backbone_lr=1e-7, weight_decay=0.2)}
    new_ids = {id(p) for name, g in groups.items() if name.startswith("new") for p in g["params"]}
    assert {id(p) for p in model.lstm_visual.parameters()} <= new_ids
    assert not {id(p) for p in model.clip.parameters()} & new_ids
    assert groups["backbone"]["lr"] == 1e-7 and groups["new"]["lr"] == 1e-4
    assert groups["backbone"]["weight_decay"] == 0.2 and groups["backbone_no_decay"]["weight_decay"] == 0.0


# --------------------------------------------------------------------------------- checkpoints / ids


@pytest.mark.parametrize("name", ["clip4clip-seqTransf-tiny", "vidswin-tiny-cliptext"])
def test_save_load_round_trip_reproduces_embeddings_and_model_id(tmp_path, name):
    model, transform, _ = tiny(name)
    with torch.no_grad():  # move away from the init so the test cannot pass by re-initialising
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.model_id = model_id_for(name, model)
    frames = transform(torch.randint(0, 256, (2, 4, 36, 40, 3), dtype=torch.uint8))
    with torch.no_grad():
        video, text = model.encode_video(frames), model.encode_text(CAPTIONS[:3])
    path = save_checkpoint(model, tmp_path / "ckpt" / "model.pt")
    torch.manual_seed(99)
    loaded, _, _ = create_model(name, pretrained=str(path))
    with torch.no_grad():
        assert torch.allclose(loaded.encode_video(frames), video, atol=1e-6)
        assert torch.allclose(loaded.encode_text(CAPTIONS[:3]), text, atol=1e-6)
    assert loaded.model_id == model.model_id and loaded.model_id.startswith(f"{name}@")
    fresh, _, _ = tiny(name)
    assert fresh.model_id != model.model_id
    # a checkpoint of another architecture is refused with a clear error
    other = "clip4clip-meanP-tiny" if name != "clip4clip-meanP-tiny" else "clip4clip-seqLSTM-tiny"
    with pytest.raises(PretrainedWeightsError, match="does not fit"):
        create_model(other, pretrained=str(path))


# ----------------------------------------------------------------------------- tokenizer / pretrained


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Any socket connection fails; caches point at empty folders."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # offline mode makes huggingface_hub fail at once instead of retrying with back-off (~45 s)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_tokenizer_works_offline(no_network):
    _, _, tokenizer = create_model("clip4clip-meanP-tiny")
    tokens = tokenizer(["a red circle moves left", "word " * 100])
    assert tokens.shape == (2, 32) and tokens.dtype == torch.long
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    assert tokens[0, 0] == sot and (tokens[0] == eot).sum() == 1 and tokens[0, 7:].sum() == 0
    assert tokens[1, -1] == eot  # truncated captions still end with EOT (the pooled token)
    assert tokenizer.decode(tokens[0, 1:6].tolist()).strip() == "a red circle moves left"


def test_missing_pretrained_gives_clear_errors(no_network, tmp_path):
    with pytest.raises(PretrainedWeightsError, match=r"'no-such-tag'.*ViT-B-32.*known tags: .*openai"):
        create_model("clip4clip-meanP-ViT-B-32", pretrained="no-such-tag")
    with pytest.raises(PretrainedWeightsError, match="no open_clip pretrained tags"):
        create_model("clip4clip-meanP-tiny", pretrained="openai")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_model("clip4clip-meanP-tiny", pretrained=str(tmp_path / "missing.pt"))
    # a real tag, but the hub cannot be reached: the weights could not be had (no random init)
    with pytest.raises(PretrainedWeightsError, match="could not be had"):
        create_model("clip4clip-meanP-ViT-B-32", pretrained="openai", cache_dir=str(tmp_path / "c"))
    with pytest.raises(PretrainedWeightsError, match="could not be had"):
        create_model("vidswin-t-cliptext", text_pretrained="laion2b_s34b_b79k", cache_dir=str(tmp_path / "c"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedWeightsError, match="could not be read safely"):
        create_model("clip4clip-meanP-tiny", pretrained=str(garbage))


class _Holder(torch.nn.Module):
    """Holds a CLIP's modules at the top level, like OpenAI's TorchScript ``Multimodal`` module."""

    def __init__(self, clip: CLIP):
        super().__init__()
        for name, child in clip.named_children():
            self.add_module(name, child)
        for name, param in clip.named_parameters(recurse=False):
            self.register_parameter(name, param)
        # OpenAI archives carry these as int buffers; they must be dropped on conversion
        self.register_buffer("input_resolution", torch.tensor(32))
        self.register_buffer("context_length", torch.tensor(32))
        self.register_buffer("vocab_size", torch.tensor(49408))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.logit_scale.float()


def _torchscript_clip_archive(path, seed: int = 5):
    torch.manual_seed(seed)
    cfg = get_model_config("clip4clip-meanP-tiny")
    clip = CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"])
    convert_weights_to_lp(clip)  # OpenAI archives are partly fp16
    reference = {k: v.float().clone() for k, v in clip.state_dict().items()}
    traced = torch.jit.trace(_Holder(clip), torch.ones(1))
    torch.jit.save(traced, str(path))
    return reference


def test_openai_torchscript_archive_loads_without_executing_code(tmp_path):
    path = tmp_path / "ViT-tiny.pt"
    reference = _torchscript_clip_archive(path)
    with pytest.raises(Exception, match="TorchScript"):
        torch.load(path, weights_only=True)  # why the restricted reader exists
    state = read_torchscript_state_dict(path)
    assert {"input_resolution", "visual.conv1.weight", "transformer.resblocks.1.mlp.c_fc.bias"} <= set(state)
    model, _, _ = create_model("clip4clip-meanP-tiny", pretrained=str(path))
    loaded = model.clip.state_dict()
    for key, value in reference.items():
        assert torch.equal(loaded[key], value.reshape(loaded[key].shape)), key
    assert model.clip.visual.conv1.weight.dtype == torch.float32

    # an archive whose pickle calls anything but tensor rebuilding is refused, and nothing runs
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    payload = pickle.dumps(_Evil(str(marker)), protocol=2)
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.namelist():
            dst.writestr(item, payload if item.endswith("/data.pkl") else src.read(item))
    with pytest.raises(PretrainedWeightsError, match="not allowed"):
        create_model("clip4clip-meanP-tiny", pretrained=str(evil))
    assert not marker.exists()


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_dual_encoder_text_tower_from_clip_weights(tmp_path):
    path = tmp_path / "ViT-tiny.pt"
    reference = _torchscript_clip_archive(path, seed=11)
    model, transform, _ = create_model("vidswin-tiny-cliptext", text_pretrained=str(path))
    text_sd = model.text.state_dict()
    assert torch.equal(text_sd["token_embedding.weight"], reference["token_embedding.weight"])
    assert torch.equal(
        text_sd["transformer.resblocks.0.attn.in_proj_weight"],
        reference["transformer.resblocks.0.attn.in_proj_weight"],
    )
    frames = transform(np.random.default_rng(0).integers(0, 256, (2, 5, 32, 32, 3), dtype=np.uint8))
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    with torch.no_grad():
        emb = model.encode_video(frames, mask)
        repeated = frames.clone()
        repeated[1, 3:] = frames[1, 2]  # padding acts as "repeat the last valid frame"
        assert torch.allclose(emb, model.encode_video(repeated), atol=1e-5)
    assert emb.shape == (2, 64) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
