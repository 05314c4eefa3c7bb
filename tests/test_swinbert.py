"""SwinBERT: attention pattern, sparse mask, MLM, decoding, scoring and checkpoints on the tiny config."""

from __future__ import annotations

import pytest
import torch

from models import create_model, get_model_config, list_models, model_id_for, save_checkpoint
from models.swinbert import SparseVideoMask, SwinBERT, checkpoint_extra
from pipeline.training.captioner import train_captioner

CAPTIONS = ["a red circle moves left", "blue square jumps", "green triangle spins slowly"]
SMALL = {"image_size": 32, "num_frames": 4}  # 2 x 1 x 1 video tokens: the cheapest grid the config allows


def _frames(transform, n: int, t: int = 4, seed: int = 0, size: int = 32) -> torch.Tensor:
    """Distinct videos: each a flat colour plus noise, so the captioner can tell them apart."""
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor([[220, 30, 30], [30, 30, 220], [30, 200, 30], [200, 200, 30]], dtype=torch.float)
    noise = torch.randint(0, 40, (n, t, size, size, 3), generator=g).float()
    raw = (base[:n, None, None, None, :] * 0.8 + noise).clamp(0, 255).to(torch.uint8)
    return transform(raw)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, transform, tokenizer = create_model("swinbert-tiny", **SMALL)
    return model, transform, tokenizer


@pytest.fixture(scope="module")
def trained():
    """A tiny captioner fitted on two videos (80 steps, ~10 s on a loaded CPU)."""
    torch.manual_seed(0)
    model, transform, tokenizer = create_model("swinbert-tiny", **SMALL)
    frames = _frames(transform, 2)
    mask = torch.ones(2, 4, dtype=torch.bool)
    history = train_captioner(model, [(frames, mask, CAPTIONS[:2])], steps=80, lr=5e-3)
    return model, transform, tokenizer, frames, mask, history


# ------------------------------------------------------------------------------------ attention pattern
def test_caption_tokens_cannot_see_later_caption_tokens(tiny):
    model, transform, tokenizer = tiny
    frames = _frames(transform, 2)
    ids = tokenizer(["a red circle moves left", "a blue square jumps"])
    changed = ids.clone()
    changed[:, 3] = tokenizer.encode_words("zebra")[0]
    with torch.no_grad():
        ctx = model.video_context(frames)
        a, b = model.caption_hidden(ctx, ids), model.caption_hidden(ctx, changed)
        ja, va = model.joint_forward(frames, None, ids)
        jb, vb = model.joint_forward(frames, None, changed)
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-6)  # earlier tokens unaffected
    assert (a[:, 3:] - b[:, 3:]).abs().amax() > 1e-3  # the changed token and later ones do change
    assert torch.allclose(ja[:, :3], jb[:, :3], atol=1e-6)
    assert (ja[:, 3:] - jb[:, 3:]).abs().amax() > 1e-3
    # Video tokens never attend to caption tokens: their states ignore the captions entirely.
    assert torch.allclose(va, vb, atol=1e-6)


def test_video_tokens_get_no_gradient_from_captions_but_captions_see_video(tiny):
    model, transform, tokenizer = tiny
    frames = _frames(transform, 1)
    ids = tokenizer(["a red circle moves left"])
    emb = model.word_embed.weight
    model.zero_grad()
    _, vid = model.joint_forward(frames, None, ids)
    vid.sum().backward()
    assert emb.grad is None or emb.grad.abs().sum() == 0
    # ...while caption tokens do depend on the video.
    with torch.no_grad():
        cap_a, _ = model.joint_forward(frames, None, ids)
        cap_b, _ = model.joint_forward(_frames(transform, 1, seed=5) * 0.5, None, ids)
    assert (cap_a - cap_b).abs().amax() > 1e-4


def test_two_stream_path_equals_joint_attention(tiny):
    model, transform, tokenizer = tiny
    frames = _frames(transform, 2)
    mask = torch.tensor([[True] * 4, [True] * 3 + [False]])
    ids = tokenizer(CAPTIONS[:2])
    with torch.no_grad():
        model.sparse_mask.logits.normal_(0, 2)  # a non-trivial mask
        joint, _ = model.joint_forward(frames, mask, ids)
        two = model.caption_hidden(model.video_context(frames, mask), ids)
        model.sparse_mask.logits.zero_()
    assert torch.allclose(joint, two, atol=1e-5)


# ------------------------------------------------------------------------------------------ sparse mask
def test_sparsity_loss_gradient_reaches_mask_parameter(tiny):
    model, transform, _ = tiny
    model.train()
    model.zero_grad()
    loss, parts = model.training_loss(_frames(transform, 2), None, CAPTIONS[:2],
                                      generator=torch.Generator().manual_seed(0))
    loss.backward()
    model.eval()
    grad = model.sparse_mask.logits.grad
    assert grad is not None and grad.abs().sum() > 0
    assert parts["sparsity"] == pytest.approx(0.5)  # sigmoid(0) off the diagonal
    # The sparsity term alone pushes every off-diagonal logit down (and leaves the fixed diagonal alone).
    mask = SparseVideoMask(2, 4)
    mask.sparsity_loss().backward()
    g = mask.logits.grad
    off = ~torch.eye(8, dtype=torch.bool)
    assert (g[off] > 0).all() and (g.diagonal() == 0).all()


def test_mask_is_interpolated_linearly_over_time():
    mask = SparseVideoMask(temporal=2, spatial=1)
    with torch.no_grad():
        mask.logits.copy_(torch.tensor([[0.0, -2.0], [1.0, 0.0]]))
    with torch.no_grad():
        p = torch.sigmoid(mask.logits)
        out = mask.probabilities(temporal=3)
    assert out.shape == (3, 3)
    assert torch.equal(out.diagonal(), torch.ones(3))
    assert out[0, 2] == pytest.approx(float(p[0, 1]))  # corners are kept (align_corners)
    assert out[2, 0] == pytest.approx(float(p[1, 0]))
    assert out[0, 1] == pytest.approx(float((p[0, 0] + p[0, 1]) / 2))  # the midpoint interpolates
    assert out[1, 0] == pytest.approx(float((p[0, 0] + p[1, 0]) / 2))
    with pytest.raises(ValueError, match="spatial tokens"):
        mask.probabilities(temporal=2, spatial=4)


def test_model_runs_on_other_frame_counts(tiny):
    model, transform, _ = tiny
    for t in (2, 8, 3):  # 3 is padded to 4 with an invalid frame
        captions, scores = model.generate(_frames(transform, 1, t=t), None, max_length=3)
        assert len(captions) == 1 and torch.isfinite(scores).all()


def test_hard_threshold_at_inference_only():
    model, transform, _ = create_model("swinbert-tiny", sparse_mask_hard_inference=True)
    with torch.no_grad():
        model.sparse_mask.logits.normal_(0, 3)
    model.eval()
    m = model.video_attention_mask(4, 4)
    assert set(m.unique().tolist()) <= {0.0, 1.0} and (m.diagonal() == 1).all()
    model.train()
    soft = model.video_attention_mask(4, 4)
    assert ((soft > 0) & (soft < 1)).any()
    model.eval()
    frames = _frames(transform, 1, t=8, size=64)
    with torch.no_grad():
        joint, _ = model.joint_forward(frames, None, model.tokenizer(["a dog"]))
        two = model.caption_hidden(model.video_context(frames), model.tokenizer(["a dog"]))
    assert torch.allclose(joint, two, atol=1e-5)


def test_no_mask_ablation_trains_without_sparsity(tiny):
    model, transform, _ = create_model("swinbert-tiny", use_sparse_mask=False, **SMALL)
    assert model.sparse_mask is None and "sparse_mask.logits" not in model.state_dict()
    model.train()
    loss, parts = model.training_loss(_frames(transform, 2), None, CAPTIONS[:2])
    loss.backward()
    assert parts["sparsity"] == 0.0 and torch.isfinite(loss)


# ------------------------------------------------------------------------------------------------- MLM
def test_mlm_masking_rules(tiny):
    model, _, tokenizer = tiny
    ids = tokenizer(["a red circle moves left"] * 2000)
    n_cand = int(((ids != tokenizer.pad_id) & (ids != tokenizer.sot_id))[0].sum())  # words + EOT = 6
    inputs, targets = model.mlm_inputs(ids, torch.Generator().manual_seed(1))
    assert (targets.sum(dim=1) == min(round(n_cand * model.mask_prob), model.max_masked_tokens)).all()
    assert not targets[:, 0].any()  # SOT never masked
    assert not targets[ids == tokenizer.pad_id].any()
    eot_pos = (ids == tokenizer.eot_id).nonzero()[:, 1]
    assert targets[torch.arange(len(ids)), eot_pos].any()  # EOT is maskable
    chosen_in, chosen_true = inputs[targets], ids[targets]
    frac_mask = (chosen_in == tokenizer.mask_id).float().mean()
    frac_kept = (chosen_in == chosen_true).float().mean()
    assert 0.77 < frac_mask < 0.83 and 0.08 < frac_kept < 0.12
    assert torch.equal(inputs[~targets], ids[~targets])


def test_training_loss_api_and_errors(tiny):
    model, transform, _ = tiny
    frames = _frames(transform, 2)
    with pytest.raises(ValueError, match="1 captions for 2 videos"):
        model.training_loss(frames, None, ["only one"])
    with pytest.raises(TypeError, match="list of str"):
        model.training_loss(frames, None, "not a list")
    with pytest.raises(ValueError, match=r"batch positions \[1\] have no valid frame"):
        model.training_loss(frames, torch.tensor([[True] * 4, [False] * 4]), CAPTIONS[:2])
    with pytest.raises(ValueError, match="frames must be"):
        model.training_loss(frames[:, 0], None, CAPTIONS[:2])


# --------------------------------------------------------------------------------- decoding and scoring
def test_training_reduces_loss_and_greedy_reproduces_captions(trained):
    model, _, tokenizer, frames, mask, history = trained
    assert history[-1]["mlm"] < history[0]["mlm"] / 5
    captions, scores = model.generate(frames, mask, beam_size=1)
    assert captions == CAPTIONS[:2]
    assert (scores > -1.0).all()


def test_decoding_stops_at_eos_and_respects_max_length(trained):
    model, _, tokenizer, frames, mask, _ = trained
    # The trained captions end (EOT) long before the context limit.
    ids = model._greedy(model.video_context(frames, mask), max_length=20)[0]
    assert ids.shape[1] <= max(len(tokenizer.encode_words(c)) for c in CAPTIONS[:2]) + 2
    for row in ids:
        after_eot = row[(row == tokenizer.eot_id).nonzero()[0, 0] + 1:]
        assert (after_eot == tokenizer.pad_id).all()
    short, _ = model.generate(frames, mask, max_length=2)
    assert short == ["a red", "blue square"]
    # A model whose head always prefers EOT emits empty captions after one step, greedy and beam alike.
    with torch.no_grad():
        model.head_bias[tokenizer.eot_id] += 1000.0
    try:
        for beam in (1, 3):
            caps, sc = model.generate(frames, mask, max_length=10, beam_size=beam)
            assert caps == ["", ""] and torch.allclose(sc, torch.zeros(2), atol=1e-4)
            # min_length forbids that early end: exactly 3 words, then the (still preferred) EOT.
            caps, _ = model.generate(frames, mask, max_length=10, beam_size=beam, min_length=3)
            assert [len(c.split()) for c in caps] == [3, 3]
    finally:
        with torch.no_grad():
            model.head_bias[tokenizer.eot_id] -= 1000.0


def test_beam_search_finds_captions_and_scores_match(trained):
    model, _, _, frames, mask, _ = trained
    captions, scores = model.generate(frames, mask, beam_size=3)
    assert captions == CAPTIONS[:2]
    rescored = model.score_captions(frames, mask, captions)
    assert torch.allclose(scores, rescored, atol=1e-4)


def test_scoring_prefers_the_true_caption(trained):
    model, _, _, frames, mask, _ = trained
    candidates = [CAPTIONS, CAPTIONS]
    scores = model.score_captions(frames, mask, candidates)
    for i, s in enumerate(scores):
        assert int(s.argmax()) == i
    greedy, greedy_scores = model.generate(frames, mask)
    assert torch.allclose(model.score_captions(frames, mask, greedy), greedy_scores, atol=1e-4)


# ------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_round_trip(tmp_path):
    model, transform, _ = create_model("swinbert-tiny")  # the registered config, no overrides
    with torch.no_grad():
        model.sparse_mask.logits.normal_(0, 1)
    path = save_checkpoint(model, tmp_path / "swinbert.pt")
    loaded, _, _ = create_model("swinbert-tiny", pretrained=path)
    assert isinstance(loaded, SwinBERT) and not loaded.training
    assert loaded.model_id == model_id_for("swinbert-tiny", model)  # same weights, same identity
    frames = _frames(transform, 2, t=8, size=64)
    assert torch.equal(loaded.score_captions(frames, None, CAPTIONS[:2]), model.score_captions(frames, None,
                                                                                                CAPTIONS[:2]))
    # The mask learned for 8 frames loads into a 16-frame variant, interpolated over time.
    longer, _, _ = create_model("swinbert-tiny", pretrained=path, num_frames=16)
    assert longer.sparse_mask.logits.shape == (32, 32)  # 8 steps x 2 x 2
    with torch.no_grad():  # what the 8-frame model uses at run time on 16 frames
        assert torch.allclose(longer.sparse_mask.probabilities(), model.sparse_mask.probabilities(8, 4),
                              atol=1e-5)


def test_checkpoint_keeps_config_overrides(trained, tmp_path):
    model, _, _, frames, mask, _ = trained
    path = save_checkpoint(model, tmp_path / "small.pt", extra=checkpoint_extra(model))
    loaded, transform, _ = create_model("swinbert-tiny", pretrained=path)
    assert transform.image_size == 32 and loaded.num_frames == 4
    assert loaded.generate(frames, mask)[0] == CAPTIONS[:2]
    plain = save_checkpoint(model, tmp_path / "plain.pt")  # no extra: the recorded built config suffices
    again, transform, _ = create_model("swinbert-tiny", pretrained=plain)
    assert transform.image_size == 32 and again.num_frames == 4


def test_foreign_checkpoints_are_refused_and_backbone_init_works(tmp_path):
    backbone, _, _ = create_model("video-swin-tiny")
    path = save_checkpoint(backbone, tmp_path / "vswin.pt")
    with pytest.raises(ValueError, match="not a SwinBERT"):
        create_model("swinbert-tiny", pretrained=path)
    model, _, _ = create_model("swinbert-tiny", backbone_pretrained=path)
    for k, v in backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k
    with pytest.raises(FileNotFoundError):
        create_model("swinbert-tiny", pretrained=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="unknown option.*'hiden_size'.*'swinbert-tiny'"):
        create_model("swinbert-tiny", hiden_size=3)


def test_backbone_from_a_retrieval_pretrained_dual_encoder(tmp_path):
    # The recipe of configs/train/tiny-swinbert-caption-pretrained.yaml: vidswin-tiny64-cliptext holds exactly
    # swinbert-tiny's Video Swin under a key prefix; load_backbone finds it there.
    dual, _, _ = create_model("vidswin-tiny64-cliptext")
    with torch.no_grad():
        for p in dual.parameters():
            p.add_(torch.randn_like(p))  # not an init a fresh SwinBERT could reproduce by chance
    path = save_checkpoint(dual, tmp_path / "retrieval.pt")
    model, _, _ = create_model("swinbert-tiny", backbone_pretrained=path)
    want = {k: v for k, v in model.backbone.state_dict().items() if not k.endswith(("_index", "attn_mask"))}
    got = {k[len("video."):]: v for k, v in dual.state_dict().items() if k.startswith("video.")}
    assert want and all(torch.equal(v, got[k]) for k, v in want.items())
    clip, _, _ = create_model("clip4clip-meanP-tiny")  # no Video Swin inside
    with pytest.raises(ValueError, match="no Video Swin backbone"):
        create_model("swinbert-tiny", backbone_pretrained=save_checkpoint(clip, tmp_path / "clip.pt"))


def test_full_size_config_is_registered():
    assert {"swinbert-tiny", "swinbert-vidswin-b"} <= set(list_models(family="swinbert"))
    cfg = get_model_config("swinbert-vidswin-b")
    assert cfg["hidden_size"] == 768 and cfg["num_frames"] == 32 and cfg["backbone"]["embed_dim"] == 128


# ------------------------------------------------------------- captioning from a retrieval video tower
TOWER_CAPTIONER = "swinbert-clip4clip-tiny-p4"


@pytest.fixture(scope="module")
def retrieval_checkpoint(tmp_path_factory):
    """A clip4clip-meanP-3d-tiny-p4 checkpoint with weights moved off their init (a 'trained' tower)."""
    torch.manual_seed(3)
    model, transform, _ = create_model("clip4clip-meanP-3d-tiny-p4")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("tower") / "retrieval.pt"
    save_checkpoint(model, str(path))
    return path, model, transform


def test_tower_captioner_reads_the_retrieval_models_frame_features(retrieval_checkpoint):
    path, retrieval, retrieval_transform = retrieval_checkpoint
    model, transform, _ = create_model(TOWER_CAPTIONER, backbone_pretrained=str(path))
    assert transform.mean == retrieval_transform.mean  # frames normalised as the tower was trained
    frames = _frames(transform, 2)
    with torch.no_grad():
        grid = model.backbone.forward_features(frames.permute(0, 2, 1, 3, 4))
        expected = retrieval.encode_frames(frames)
    assert grid.shape == (2, 4, 1, 1, retrieval.embed_dim)  # one token per frame
    torch.testing.assert_close(grid[:, :, 0, 0], expected)
    tokens, valid, (t, s) = model.video_tokens(frames)
    assert tokens.shape[:2] == (2, 4) and bool(valid.all()) and (t, s) == (4, 1)


def test_tower_captioner_refuses_a_checkpoint_without_that_tower(tmp_path):
    other, _, _ = create_model("clip4clip-meanP-tiny", seed=0)  # 2-D patches, 8 px: another tower
    path = tmp_path / "other.pt"
    save_checkpoint(other, str(path))
    with pytest.raises(ValueError, match="holds no CLIP4Clip video tower"):
        create_model(TOWER_CAPTIONER, backbone_pretrained=str(path))


def test_held_tower_gets_no_gradient_and_round_trips(retrieval_checkpoint, tmp_path):
    path, _, _ = retrieval_checkpoint
    model, transform, _ = create_model(TOWER_CAPTIONER, backbone_pretrained=str(path))
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    frames = _frames(transform, 2)
    history = train_captioner(model, [(frames, None, CAPTIONS[:2])], steps=3, lr=5e-3, backbone_lr_scale=0.0)
    assert len(history) == 3
    assert all(p.grad is None for p in model.backbone.parameters())  # lr scale 0 holds it: no backward
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())
    saved = tmp_path / "cap.pt"
    save_checkpoint(model, str(saved), extra=checkpoint_extra(model))
    again, _, _ = create_model(TOWER_CAPTIONER, pretrained=str(saved))  # the captioner carries its tower
    for key, value in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value)
