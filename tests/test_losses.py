"""Symmetric CrossEn, logit scale clamp, gather-with-gradient across workers, multi-clip aggregation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from models import losses


def _emb(n: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_symmetric_cross_entropy_matches_manual():
    sim = torch.randn(5, 5, generator=torch.Generator().manual_seed(1))
    manual_rows = -torch.log_softmax(sim, 1).diag().mean()
    manual_cols = -torch.log_softmax(sim, 0).diag().mean()
    assert torch.allclose(losses.cross_entropy_sym(sim), 0.5 * (manual_rows + manual_cols))
    with pytest.raises(ValueError, match="square"):
        losses.cross_entropy_sym(torch.zeros(2, 3))


def test_contrastive_loss_single_process_is_crossen_of_scaled_logits():
    v, t = _emb(6, seed=2), _emb(6, seed=3)
    scale = torch.tensor([math.log(20.0)])
    expected = losses.cross_entropy_sym(20.0 * t @ v.t())
    assert torch.allclose(losses.contrastive_loss(v, t, scale), expected, atol=1e-6)
    # aligned pairs give a lower loss than random ones
    assert losses.contrastive_loss(v, v, scale) < losses.contrastive_loss(v, t, scale)
    with pytest.raises(ValueError, match="paired"):
        losses.contrastive_loss(v, t[:5], scale)


def test_logit_scale_is_clamped_at_ln100():
    t, v = _emb(3, seed=4), _emb(4, seed=5)
    big = losses.scaled_logits(t, v, torch.tensor([10.0]))
    assert torch.allclose(big, 100.0 * t @ v.t(), atol=1e-4)
    small = losses.scaled_logits(t, v, torch.tensor([math.log(10.0)]))
    assert torch.allclose(small, 10.0 * t @ v.t(), atol=1e-5)


def test_no_gather_without_process_group():
    x = torch.randn(3, 4, requires_grad=True)
    assert losses.distributed_world() == (0, 1)
    assert losses.gather_with_grad(x) is x


def test_aggregate_clips_mean_max_lse_with_mask():
    emb = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])
    mask = torch.tensor([[True, True, False]])
    mean = losses.aggregate_clips(emb, mask, "mean", normalize=False)
    mx = losses.aggregate_clips(emb, mask, "max", normalize=False)
    lse = losses.aggregate_clips(emb, mask, "lse", normalize=False)
    assert torch.allclose(mean, torch.tensor([[0.5, 0.5]]))
    assert torch.allclose(mx, torch.tensor([[1.0, 1.0]]))
    assert torch.allclose(
        lse, torch.log(torch.exp(torch.tensor([[1.0, 0.0]])) + torch.exp(torch.tensor([[0.0, 1.0]])))
    )
    assert torch.allclose(losses.aggregate_clips(emb, mask).norm(dim=-1), torch.ones(1))
    with pytest.raises(ValueError, match="not one of"):
        losses.aggregate_clips(emb, mask, "median")
    with pytest.raises(ValueError, match="at least one valid clip"):
        losses.aggregate_clips(emb, torch.zeros(1, 3, dtype=torch.bool))
    logits = torch.tensor([[[1.0, 3.0, 100.0]]])
    assert torch.allclose(losses.aggregate_clip_logits(logits, mask, "max"), torch.tensor([[3.0]]))
    assert torch.allclose(losses.aggregate_clip_logits(logits, mask, "mean"), torch.tensor([[2.0]]))


# ------------------------------------------------------------------------ two workers (gloo, CPU)


def _worker(
    rank: int, world: int, init_file: str, video: torch.Tensor, text: torch.Tensor, out: dict
) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        n = video.shape[0] // world
        v = video[rank * n : (rank + 1) * n].clone().requires_grad_(True)
        t = text[rank * n : (rank + 1) * n].clone().requires_grad_(True)
        loss = losses.contrastive_loss(v, t, torch.tensor([math.log(10.0)]))
        loss.backward()
        out[rank] = (float(loss), v.grad.clone(), t.grad.clone())
    finally:
        dist.destroy_process_group()


def test_gathered_loss_matches_full_batch_across_two_workers(tmp_path):
    video, text = _emb(8, seed=6), _emb(8, seed=7)
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(2, str(tmp_path / "pg"), video, text, out), nprocs=2, join=True)
    v, t = video.clone().requires_grad_(True), text.clone().requires_grad_(True)
    full = losses.contrastive_loss(v, t, torch.tensor([math.log(10.0)]))
    full.backward()
    # the mean of the workers' losses is the global loss; DDP averages gradients over workers, so each
    # worker's feature gradient / world equals the full-batch gradient of its rows (negatives got gradient)
    assert math.isclose((out[0][0] + out[1][0]) / 2, float(full.detach()), rel_tol=1e-5)
    for rank in range(2):
        rows = slice(rank * 4, (rank + 1) * 4)
        assert torch.allclose(out[rank][1] / 2, v.grad[rows], atol=1e-6)
        assert torch.allclose(out[rank][2] / 2, t.grad[rows], atol=1e-6)
