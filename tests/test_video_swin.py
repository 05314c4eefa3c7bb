"""Video Swin encoder: equality with torchvision's swin3d, geometry, caches, training paths, checkpoints."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.video import swin3d_t
from torchvision.models.video.swin_transformer import SwinTransformer3d
from torchvision.ops import StochasticDepth

import models
from models.video_swin import (
    VideoSwinTransformer,
    build_window_geometry,
    convert_checkpoint,
    load_pretrained,
    relative_position_index_3d,
    window_and_shift_for,
)

# shifted windows, padding (20 → 21 tokens) and batch > 1 all in one small config
SMALL = dict(
    patch_size=[2, 4, 4], embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=[2, 3, 3]
)


def _tv_features(tv: SwinTransformer3d, x: torch.Tensor) -> torch.Tensor:
    return tv.norm(tv.features(tv.patch_embed(x)))


@pytest.fixture(scope="module")
def tv_swin3d_t_file(tmp_path_factory):
    torch.manual_seed(0)
    tv = swin3d_t().eval()
    path = tmp_path_factory.mktemp("tv") / "swin3d_t.pth"
    torch.save(tv.state_dict(), path)
    return tv, path


# ------------------------------------------------------------------------------------ reference equality


def test_matches_torchvision_swin3d_t(tv_swin3d_t_file):
    tv, path = tv_swin3d_t_file
    ours, _, _ = models.create_model("video-swin-t", pretrained=path, pretrained_source="torchvision")
    ours.eval()
    torch.manual_seed(1)
    # 4×64×64 is smaller than the (8,7,7) window on every axis (shrink, no shift); 8×96×96 needs padding
    for shape in [(1, 3, 4, 64, 64), (1, 3, 8, 96, 96)]:
        x = torch.randn(shape)
        with torch.no_grad():
            ref = _tv_features(tv, x)
            out = ours.forward_features(x)
            pooled = ours(x)
        assert out.shape == (1, shape[2] // 2, math.ceil(shape[3] / 32), math.ceil(shape[4] / 32), 768)
        assert (out - ref).abs().max().item() <= 1e-4, shape
        ref_pooled = torch.flatten(tv.avgpool(ref.permute(0, 4, 1, 2, 3)), 1)
        assert (pooled - ref_pooled).abs().max().item() <= 1e-4


def test_matches_torchvision_shifted_padded_batched():
    torch.manual_seed(0)
    tv = SwinTransformer3d(**SMALL).eval()
    ours = VideoSwinTransformer(**SMALL).eval()
    assert load_pretrained(ours, tv.state_dict(), "torchvision").ok
    for shape in [(2, 3, 8, 80, 80), (3, 3, 5, 37, 50), (1, 3, 6, 72, 88)]:
        x = torch.randn(shape)
        with torch.no_grad():
            diff = (ours.forward_features(x) - _tv_features(tv, x)).abs().max().item()
        assert diff <= 1e-4, (shape, diff)
    # training-mode path (bias rebuilt each call, no dropout configured) agrees as well
    ours.train()
    tv.train()
    for module in tv.modules():
        if isinstance(module, StochasticDepth):
            module.p = 0.0
    for layer in ours.layers:
        for block in layer.blocks:
            block.drop_path.drop_prob = 0.0
    x = torch.randn(2, 3, 8, 80, 80)
    assert (ours.forward_features(x) - _tv_features(tv, x)).abs().max().item() <= 1e-4


# ------------------------------------------------------------------------------------------- geometry


def test_window_shrinks_and_shift_drops_per_axis():
    window, shift = window_and_shift_for((4, 16, 7), (8, 7, 7), (4, 3, 3))
    assert window == (4, 7, 7) and shift == (0, 3, 0)
    geo = build_window_geometry((4, 16, 16), (8, 7, 7), torch.device("cpu"))
    assert geo.window == (4, 7, 7) and geo.shift == (0, 3, 3)
    assert geo.padded_thw == (4, 21, 21) and geo.num_windows == 9
    n = 4 * 49
    assert geo.shift_mask.shape == (9, 1, n, n)
    assert set(geo.shift_mask.unique().tolist()) == {0.0, -100.0}
    assert (geo.shift_mask[0] == 0).all()  # the first window holds one sub-window only
    assert (geo.shift_mask[-1] == -100).any()
    # input no larger than the window: no shift, no mask
    small = build_window_geometry((2, 7, 5), (8, 7, 7), torch.device("cpu"))
    assert small.window == (2, 7, 5) and small.shift == (0, 0, 0) and small.shift_mask is None


def test_relative_position_table_and_index():
    index = relative_position_index_3d((8, 7, 7))
    assert index.shape == (392, 392)
    assert index.min() == 0 and index.max() == 15 * 13 * 13 - 1
    assert (index.diag() == index[0, 0]).all()  # zero offset maps to one entry
    model = VideoSwinTransformer(**SMALL)
    table = model.layers[0].blocks[0].attn.relative_position_bias_table
    assert table.shape == ((2 * 2 - 1) * (2 * 3 - 1) * (2 * 3 - 1), 1)


def test_shapes_stages_and_projection():
    model = VideoSwinTransformer(**SMALL, output_dim=24).eval()
    assert model.num_features == 128
    x = torch.randn(2, 3, 8, 64, 64)
    with torch.no_grad():
        grid, stages = model.forward_features(x, return_stages=True)
        emb = model(x)
    assert grid.shape == (2, 4, 2, 2, 128)
    assert [tuple(s.shape) for s in stages] == [
        (2, 4, 16, 16, 16),
        (2, 4, 8, 8, 32),
        (2, 4, 4, 4, 64),
        (2, 4, 2, 2, 128),
    ]
    assert emb.shape == (2, 24)
    assert torch.allclose(grid, model.norm(stages[-1]), atol=1e-6)
    with pytest.raises(ValueError, match="expected video"):
        model.forward_features(torch.randn(2, 8, 3, 64, 64))


# ------------------------------------------------------------------------------- training and caching


def test_bias_table_gets_gradients_and_cache_follows_updates():
    torch.manual_seed(0)
    model = VideoSwinTransformer(**SMALL, drop_path_rate=0.0)
    x = torch.randn(1, 3, 8, 64, 64)
    model.eval()
    with torch.no_grad():
        before = model.forward_features(x)
        assert torch.equal(before, model.forward_features(x))  # cached bias reused
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    # A random projection of the output, not a norm of it: the final LayerNorm makes ``square().mean()`` (and
    # ``sum()``) nearly constant, so their gradients are ~1e-9 and non-zero only by rounding.
    projection = torch.randn(before.shape, generator=torch.Generator().manual_seed(1))
    (model.forward_features(x) * projection).sum().backward()
    for layer in model.layers:
        for block in layer.blocks:
            grad = block.attn.relative_position_bias_table.grad
            assert grad is not None and grad.abs().max() > 1e-4
    optimizer.step()  # in-place update of every table
    model.eval()
    with torch.no_grad():
        after = model.forward_features(x)
        fresh = VideoSwinTransformer(**SMALL, drop_path_rate=0.0).eval()
        fresh.load_state_dict(model.state_dict())
        assert not torch.allclose(before, after)
        assert torch.allclose(after, fresh.forward_features(x), atol=1e-6)
        # load_state_dict copies in place: the cache must notice that too
        model.load_state_dict(VideoSwinTransformer(**SMALL).state_dict())
        fresh.load_state_dict(model.state_dict())
        assert torch.allclose(model.forward_features(x), fresh.forward_features(x), atol=1e-6)


def test_gradient_checkpointing_same_output_and_grads():
    torch.manual_seed(0)
    model = VideoSwinTransformer(**SMALL, drop_path_rate=0.0)
    x = torch.randn(2, 3, 8, 64, 64)
    model(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out = model(x)
    out.sum().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-5), n


def test_stochastic_depth_active_only_in_training():
    torch.manual_seed(0)
    model = VideoSwinTransformer(**SMALL, drop_path_rate=0.5)
    x = torch.randn(4, 3, 4, 32, 32)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def _bias_table_grads(model: VideoSwinTransformer, x: torch.Tensor, projection: torch.Tensor,
                      dtype: torch.dtype | None) -> list[torch.Tensor]:
    """Every block's relative-position-bias gradient of a random projection of the output, computed
    under autocast to ``dtype`` (None: fp32). Not ``sum()`` of the output: after the final LayerNorm its
    gradients are ~1e-10, so in bf16 they round to exactly 0 on CPUs without AVX-512 / AMX."""
    model.zero_grad()
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = model(x)
    assert out.dtype == (dtype or torch.float32)
    (out.float() * projection).sum().backward()
    return [block.attn.relative_position_bias_table.grad.clone()
            for layer in model.layers for block in layer.blocks]


def test_bf16_autocast_on_cpu():
    torch.manual_seed(0)
    model = VideoSwinTransformer(**SMALL, drop_path_rate=0.0).eval()  # no drop path: train runs comparable
    x = torch.randn(2, 3, 8, 64, 64)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert F.cosine_similarity(out.float(), ref).min() > 0.98
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        half = model(x)
    assert half.dtype == torch.float16 and F.cosine_similarity(half.float(), ref).min() > 0.99
    model.train()  # and training under autocast reaches every bias table with the fp32 gradient's direction
    projection = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    fp32 = _bias_table_grads(model, x, projection, None)
    bf16 = _bias_table_grads(model, x, projection, torch.bfloat16)
    for i, (want, got) in enumerate(zip(fp32, bf16)):
        assert torch.isfinite(got).all() and got.abs().max() > 1e-4, i
        assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.95, i


def test_tiny_config_learns_on_cpu():
    torch.manual_seed(0)
    model, transform, tokenizer = models.create_model("video-swin-tiny", output_dim=8, image_size=32)
    assert tokenizer is None
    frames = torch.randint(0, 256, (4, 8, 48, 48, 3), dtype=torch.uint8)
    clips = transform(frames).permute(0, 2, 1, 3, 4)  # [B, 3, T, S, S]
    assert clips.shape == (4, 3, 8, 32, 32)
    target = torch.randn(4, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = F.mse_loss(model(clips), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8, losses


def test_encode_clips_mask_and_normalisation():
    torch.manual_seed(0)
    model, transform, _ = models.create_model("video-swin-tiny")
    model.eval()
    frames = transform(torch.randint(0, 256, (2, 3, 8, 64, 64, 3), dtype=torch.uint8))
    mask = torch.ones(2, 3, 8, dtype=torch.bool)
    mask[0, 1, 5:] = False  # a short clip
    mask[1, 2] = False  # an empty clip
    with torch.no_grad():
        clips = model.encode_clips(frames, mask)
        video = model.encode_video(frames, mask)
        padded = frames[0, 1].clone()
        padded[5:] = padded[4]
        short = model.encode_clips(padded[None, None])
    assert clips.shape == (2, 3, 128) and video.shape == (2, 128)
    assert torch.allclose(clips[0, 1], short[0, 0], atol=1e-5)
    assert clips[1, 2].abs().sum() == 0
    assert torch.allclose(clips[0].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(video[1], F.normalize(clips[1, :2].sum(0), dim=-1), atol=1e-5)


def test_transform_resizes_and_normalises():
    _, transform, _ = models.create_model("video-swin-tiny")
    frames = torch.full((2, 4, 48, 80, 3), 255, dtype=torch.uint8)
    out = transform(frames.numpy())
    assert out.shape == (2, 4, 3, 64, 64)
    expected = (1.0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(out[0, 0, :, 10, 10], expected, atol=1e-4)
    with pytest.raises(ValueError, match="uint8"):
        transform(torch.zeros(4, 64, 64, 3))


# ------------------------------------------------------------------------------------------ checkpoints


def test_torchvision_filter_maps_every_key(tv_swin3d_t_file):
    tv, _ = tv_swin3d_t_file
    converted = convert_checkpoint(tv.state_dict(), "torchvision")
    ours = VideoSwinTransformer()
    assert set(converted) == set(ours.state_dict())
    assert torch.equal(
        converted["layers.2.blocks.5.mlp.fc2.weight"], tv.state_dict()["features.4.5.mlp.3.weight"]
    )
    assert torch.equal(
        converted["layers.1.downsample.reduction.weight"], tv.state_dict()["features.3.reduction.weight"]
    )


def test_mmaction_round_trip(tmp_path):
    torch.manual_seed(0)
    source = VideoSwinTransformer(**SMALL)
    mm = {f"backbone.{k}": v.clone() for k, v in source.state_dict().items()}
    for key in list(mm):  # the official checkpoints also carry index buffers and a classifier
        if key.endswith("relative_position_bias_table"):
            mm[key.replace("bias_table", "index")] = torch.zeros(8, 8, dtype=torch.long)
    mm["cls_head.fc_cls.weight"] = torch.randn(400, 128)
    mm["cls_head.fc_cls.bias"] = torch.randn(400)
    path = tmp_path / "swin_mmaction.pth"
    torch.save({"meta": {"epoch": 30}, "state_dict": mm}, path)
    target = VideoSwinTransformer(**SMALL)
    report = load_pretrained(target, path, "mmaction")
    assert report.ok
    for k, v in source.state_dict().items():
        assert torch.equal(v, target.state_dict()[k]), k


def _swin2d_state_dict(model: VideoSwinTransformer, window_2d: int, timm_layout: bool) -> dict:
    """A 2D Swin ImageNet state dict with the key names/shapes of timm (or Microsoft's) layout."""
    sd = {}
    num_stages = len(model.layers)
    for k, v in model.state_dict().items():
        if k == "patch_embed.proj.weight":
            v = torch.randn(v.shape[0], v.shape[1], v.shape[3], v.shape[4])
        elif k.endswith("relative_position_bias_table"):
            v = torch.randn((2 * window_2d - 1) ** 2, v.shape[1])
            sd[k.replace("bias_table", "index")] = torch.zeros(window_2d**2, window_2d**2, dtype=torch.long)
        else:
            v = torch.randn_like(v)
        if timm_layout and ".downsample." in k:
            stage = int(k.split(".")[1])
            k = k.replace(f"layers.{stage}.", f"layers.{stage + 1}.", 1)
        sd[k] = v
    if not timm_layout:
        sd = {"model": sd}
        sd["model"][f"layers.{num_stages - 1}.blocks.1.attn_mask"] = torch.zeros(4, 49, 49)
        sd["model"]["head.weight"] = torch.randn(1000, model.num_features)
    else:
        sd["head.fc.weight"] = torch.randn(1000, model.num_features)
    return sd


@pytest.mark.parametrize("timm_layout", [True, False])
def test_swin2d_inflation(timm_layout):
    torch.manual_seed(0)
    cfg = dict(SMALL, window_size=[2, 7, 7])  # same spatial window as the 2D checkpoint: tiled, not resized
    model = VideoSwinTransformer(**cfg).eval()
    sd2d = _swin2d_state_dict(model, 7, timm_layout)
    flat2d = sd2d if timm_layout else sd2d["model"]
    assert load_pretrained(model, sd2d, "swin2d").ok
    state = model.state_dict()
    # kernel repeated over P=2 time steps and halved: a static video gives the 2D model's response
    kernel2d = flat2d["patch_embed.proj.weight"]
    assert torch.allclose(state["patch_embed.proj.weight"][:, :, 0], kernel2d / 2)
    assert torch.allclose(state["patch_embed.proj.weight"][:, :, 1], kernel2d / 2)
    frame = torch.randn(1, 3, 32, 32)
    static = frame[:, :, None].repeat(1, 1, 2, 1, 1)
    out3d = model.patch_embed.proj(static)[:, :, 0]
    out2d = F.conv2d(frame, kernel2d, flat2d["patch_embed.proj.bias"], stride=4)
    assert torch.allclose(out3d, out2d, atol=1e-5)
    # table tiled 2P-1 = 3 times over time
    table2d = flat2d["layers.2.blocks.1.attn.relative_position_bias_table"]
    table3d = state["layers.2.blocks.1.attn.relative_position_bias_table"]
    assert table3d.shape == (3 * 169, table2d.shape[1])
    for t in range(3):
        assert torch.equal(table3d[t * 169 : (t + 1) * 169], table2d)
    # merging layers land on our stage numbering whichever layout the file used
    downsample_key = (
        "layers.1.downsample.reduction.weight" if timm_layout else "layers.0.downsample.reduction.weight"
    )
    assert torch.equal(state["layers.0.downsample.reduction.weight"], flat2d[downsample_key])


def test_swin2d_inflation_resizes_table_bicubic():
    torch.manual_seed(0)
    model = VideoSwinTransformer(**SMALL)  # window (2,3,3): a 7×7 2D table must shrink to 5×5
    sd2d = _swin2d_state_dict(model, 7, timm_layout=True)
    key = "layers.0.blocks.0.attn.relative_position_bias_table"
    sd2d[key] = torch.full((169, 1), 0.25)  # bicubic resampling keeps a constant table constant
    ramp = torch.linspace(-1, 1, 13)
    key2 = "layers.3.blocks.0.attn.relative_position_bias_table"
    sd2d[key2] = (ramp[:, None] + 0 * ramp[None, :]).reshape(169, 1).repeat(1, 4)  # varies along rows only
    converted = convert_checkpoint(sd2d, "swin2d", patch_size=(2, 4, 4), window_size=(2, 3, 3))
    assert converted[key].shape == (3 * 25, 1)
    assert torch.allclose(converted[key], torch.full((75, 1), 0.25), atol=1e-6)
    resized = converted[key2][:25].reshape(5, 5, 4)
    assert torch.allclose(resized[:, 0], resized[:, 3])  # still constant along columns
    assert (resized[1:, :, 0] > resized[:-1, :, 0]).all()  # and increasing along rows
    assert torch.equal(converted[key2][:25], converted[key2][50:])
    assert load_pretrained(model, sd2d, "swin2d").ok


def test_load_reports_and_raises(tmp_path, caplog):
    model = VideoSwinTransformer(**SMALL)
    sd = dict(model.state_dict())
    sd["layers.0.blocks.0.extra.weight"] = torch.zeros(3)
    del sd["norm.weight"]
    with pytest.raises(
        ValueError, match=r"missing \(1\): norm.weight.*unexpected \(1\): layers.0.blocks.0.extra"
    ):
        load_pretrained(model, sd, "vidsift")
    with caplog.at_level(logging.WARNING, logger="models.video_swin"):
        report = load_pretrained(model, sd, "vidsift", strict=False)
    assert report.missing == ["norm.weight"] and report.unexpected == ["layers.0.blocks.0.extra.weight"]
    assert "norm.weight" in caplog.text
    bad_shape = dict(model.state_dict())
    bad_shape["norm.weight"] = torch.zeros(7)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_pretrained(model, bad_shape, "vidsift")
    with pytest.raises(ValueError, match="unknown checkpoint source"):
        convert_checkpoint(sd, "caffe")


def test_builder_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.create_model("video-swin-tiny", pretrained=tmp_path / "nope.pth")
    raw = tmp_path / "raw.pth"
    model, _, _ = models.create_model("video-swin-tiny")
    torch.save(model.state_dict(), raw)
    with pytest.raises(ValueError, match="pretrained_source"):
        models.create_model("video-swin-tiny", pretrained=raw)
    loaded, _, _ = models.create_model("video-swin-tiny", pretrained=raw, pretrained_source="vidsift")
    assert loaded.model_id == model.model_id
    unsafe = tmp_path / "unsafe.pth"
    torch.save(
        {"state_dict": model.state_dict(), "cfg": logging.getLogger("x")}, unsafe
    )  # needs a full unpickle
    with pytest.raises(ValueError, match="could not be read safely"):
        models.create_model("video-swin-tiny", pretrained=unsafe, pretrained_source="vidsift")
    with pytest.raises(ValueError, match="unknown option.*'windw_size'.*'video-swin-tiny'"):
        models.create_model("video-swin-tiny", windw_size=(2, 2, 2))


def test_vidsift_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model, _, _ = models.create_model("video-swin-tiny")
    path = models.save_checkpoint(model, tmp_path / "ckpt" / "tiny.pt")
    again, _, _ = models.create_model("video-swin-tiny", pretrained=path)
    assert again.model_id == model.model_id
    x = torch.randn(1, 3, 8, 64, 64)
    model.eval()
    again.eval()
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_registered_variants():
    names = models.list_models(family="video_swin")
    assert {"video-swin-t", "video-swin-s", "video-swin-b", "video-swin-l", "video-swin-tiny"} <= set(names)
    expected = {
        "video-swin-t": (96, (2, 2, 6, 2)),
        "video-swin-s": (96, (2, 2, 18, 2)),
        "video-swin-b": (128, (2, 2, 18, 2)),
        "video-swin-l": (192, (2, 2, 18, 2)),
    }
    for name, (dim, depths) in expected.items():
        cfg = models.get_model_config(name)
        assert cfg["embed_dim"] == dim and tuple(cfg["depths"]) == depths
        assert tuple(cfg["window_size"]) == (8, 7, 7) and tuple(cfg["patch_size"]) == (2, 4, 4)
        assert [h * 32 for h in cfg["num_heads"]] == [dim * 2**i for i in range(4)]
