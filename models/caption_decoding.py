"""Caption decoding: greedy and beam search over a next-token scorer.

``next_logp(prefix [N, t]) -> log-probabilities [N, V]`` of the token after each prefix (SwinBERT appends
``[MASK]`` and reads the head there). Both searches start from SOT, stop at EOT or ``max_length`` generated
tokens, refuse EOT before ``min_length`` words, and return ``(ids [B, 1 + steps], mean token log-prob [B])``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from models.caption_tokenizer import CaptionTokenizer

NEG_INF = float("-inf")
NextLogp = Callable[[torch.Tensor], torch.Tensor]


def _no_early_eot(logp: torch.Tensor, eot_id: int, step: int, min_length: int) -> torch.Tensor:
    if step < min_length:
        logp = logp.clone()
        logp[:, eot_id] = NEG_INF
    return logp


def greedy_search(next_logp: NextLogp, tok: CaptionTokenizer, batch: int, device: torch.device,
                  max_length: int, min_length: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The most likely token at every step; a finished row continues with PAD at no cost."""
    b = batch
    seq = torch.full((b, 1), tok.sot_id, dtype=torch.long, device=device)
    total = torch.zeros(b, device=device)
    count = torch.zeros(b, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    for step in range(max_length):
        logp = _no_early_eot(next_logp(seq), tok.eot_id, step, min_length)
        best_logp, best = logp.max(dim=-1)
        best = torch.where(done, torch.full_like(best, tok.pad_id), best)
        total += torch.where(done, torch.zeros_like(best_logp), best_logp)
        count += (~done).float()
        seq = torch.cat([seq, best[:, None]], dim=1)
        done |= best == tok.eot_id
        if bool(done.all()):
            break
    return seq, total / count.clamp(min=1)


def beam_search(next_logp: NextLogp, tok: CaptionTokenizer, batch: int, device: torch.device, max_length: int,
                k: int, alpha: float, min_length: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` beams per video ranked by ``total log-prob / length ** alpha``. ``next_logp`` scores
    ``batch * k`` prefixes, beam-major per video (the caller repeats each video ``k`` times)."""
    b = batch
    seq = torch.full((b * k, 1), tok.sot_id, dtype=torch.long, device=device)
    total = torch.zeros(b, k, device=device)
    total[:, 1:] = NEG_INF  # only one live beam at the start: no duplicate hypotheses
    total = total.view(-1)
    length = torch.zeros(b * k, device=device)
    done = torch.zeros(b * k, dtype=torch.bool, device=device)
    for step in range(max_length):
        logp = _no_early_eot(next_logp(seq), tok.eot_id, step, min_length)  # [B*K, V]
        vocab = logp.shape[-1]
        # A finished beam has exactly one continuation, PAD, that costs nothing.
        frozen = torch.full_like(logp, NEG_INF)
        frozen[:, tok.pad_id] = 0.0
        logp = torch.where(done[:, None], frozen, logp)
        cand_total = total[:, None] + logp
        cand_len = (length + (~done).float())[:, None].expand_as(cand_total)
        norm = cand_total / cand_len.clamp(min=1) ** alpha
        norm = norm.view(b, k * vocab)
        top_norm, top_idx = norm.topk(k, dim=1)
        beam_idx = top_idx // vocab + (torch.arange(b, device=device) * k)[:, None]
        token = top_idx % vocab
        beam_idx, token = beam_idx.view(-1), token.view(-1)
        total = cand_total.view(-1)[beam_idx * vocab + token]
        length = cand_len.reshape(-1)[beam_idx * vocab + token]
        seq = torch.cat([seq[beam_idx], token[:, None]], dim=1)
        done = done[beam_idx] | (token == tok.eot_id)
        if bool(done.all()):
            break
    norm = (total / length.clamp(min=1) ** alpha).view(b, k)
    best = norm.argmax(dim=1) + torch.arange(b, device=device) * k
    mean_logp = total[best] / length[best].clamp(min=1)
    return seq[best], mean_logp
