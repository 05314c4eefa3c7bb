"""Caption metrics implemented from their definitions (no downloads, no Java): BLEU-4, CIDEr-D, ROUGE-L
and an exact-match METEOR.

Conventions follow coco-caption (pycocoevalcap), with one documented difference: tokenisation is
``lowercase → strip punctuation → split on whitespace`` instead of the Stanford PTB tokenizer (which needs
Java). On plain lowercase English captions the two agree.

Given the same tokens, BLEU-4, CIDEr-D and ROUGE-L equal pycocoevalcap 1.2's ``Bleu(4)``, ``Cider`` and
``Rouge`` scorers: tests/test_caption_metrics.py compares them on a dozen caption sets, and
``python -m bench.caption_metrics`` on the synthetic corpus' captions (docs/results.md). The only numeric
difference is BLEU's brevity penalty, where coco-caption uses ``(hyp_len + 1e-15) / (ref_len + 1e-9)``:
below 1e-9.

Every corpus function takes ``hypotheses: list[str]`` and ``references: list[list[str]]`` (one list of
reference captions per hypothesis) and returns ``(corpus_score, per_item_scores)``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_PUNCT = re.compile(r"[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Lowercase, drop punctuation, split on whitespace (the PTB tokenizer without Java)."""
    if not isinstance(text, str):
        raise TypeError(f"caption must be a str, got {type(text).__name__}: {text!r}")
    return _PUNCT.sub(" ", text.lower()).split()


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _check(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"got {len(hypotheses)} hypotheses but {len(references)} reference sets")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"reference set {i} must be a non-empty list of captions, got {refs!r}")


# ----------------------------------------------------------------------------------------------- BLEU
def corpus_bleu(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4, smoothing: str = "coco"
) -> tuple[float, list[float]]:
    """Corpus BLEU-``max_n`` (Papineni et al. 2002) with the brevity penalty over the corpus.

    Clipped n-gram counts and lengths are summed over the corpus before the geometric mean. The
    effective reference length of each item is the reference length closest to the hypothesis length
    (ties → the shorter), as coco-caption's ``"closest"`` option.

    ``smoothing``: ``"coco"`` — coco-caption's ``(matches + 1e-15) / (total + 1e-9)``, i.e. effectively
    none (a zero 4-gram precision gives ~0); ``"add1"`` — add one to matches and totals for n > 1
    (Lin & Och 2004), useful on tiny corpora. Per-item scores are sentence BLEU with the same rule.
    """
    _check(hypotheses, references)
    if smoothing not in ("coco", "add1"):
        raise ValueError(f"smoothing must be 'coco' or 'add1', got {smoothing!r}")
    tot_match = [0] * max_n
    tot_count = [0] * max_n
    tot_hyp_len = 0
    tot_ref_len = 0
    per_item = []
    for hyp, refs in zip(hypotheses, references):
        h = tokenize(hyp)
        rs = [tokenize(r) for r in refs]
        match, count = [0] * max_n, [0] * max_n
        for n in range(1, max_n + 1):
            hyp_counts = _ngrams(h, n)
            max_ref: Counter = Counter()
            for r in rs:
                for gram, c in _ngrams(r, n).items():
                    max_ref[gram] = max(max_ref[gram], c)
            match[n - 1] = sum(min(c, max_ref[g]) for g, c in hyp_counts.items())
            count[n - 1] = max(len(h) - n + 1, 0)
        ref_len = min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
        per_item.append(_bleu_from_counts(match, count, len(h), ref_len, smoothing))
        for i in range(max_n):
            tot_match[i] += match[i]
            tot_count[i] += count[i]
        tot_hyp_len += len(h)
        tot_ref_len += ref_len
    return _bleu_from_counts(tot_match, tot_count, tot_hyp_len, tot_ref_len, smoothing), per_item


def _bleu_from_counts(match, count, hyp_len, ref_len, smoothing) -> float:
    if hyp_len == 0:
        return 0.0
    log_p = 0.0
    for n, (m, c) in enumerate(zip(match, count), start=1):
        if smoothing == "add1" and n > 1:
            p = (m + 1.0) / (c + 1.0)
        else:
            p = (m + 1e-15) / (c + 1e-9)
        log_p += math.log(p) if p > 0 else -math.inf
    log_p /= len(match)
    bp = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    return bp * math.exp(log_p)


# --------------------------------------------------------------------------------------------- CIDEr-D
def corpus_cider_d(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4, sigma: float = 6.0
) -> tuple[float, list[float]]:
    """CIDEr-D (Vedantam et al. 2015) exactly as coco-caption's ``CiderScorer``.

    tf-idf vectors of 1..4-grams, document frequency = number of items whose *reference set* contains
    the n-gram, idf = ``log(num_items) - log(max(1, df))``; similarity per reference and n: clipped dot
    product ``Σ min(h, r)·r / (|h||r|)`` times the Gaussian length penalty ``exp(-Δ²/2σ²)``; averaged over
    n and over references, times 10. Δ uses word counts; coco-caption counts bigrams (words - 1), which
    gives a different Δ only when a caption is empty, and then the similarity is 0 either way, so the
    scores are identical. The idf comes from the references of the corpus being scored (the same item
    scores differently in another corpus), so a single item scored alone gets 0 (log 1 = 0), as in
    coco-caption.
    """
    _check(hypotheses, references)
    hyp_counts = [_all_ngrams(tokenize(h), max_n) for h in hypotheses]
    ref_counts = [[_all_ngrams(tokenize(r), max_n) for r in refs] for refs in references]
    doc_freq: Counter = Counter()
    for refs in ref_counts:
        doc_freq.update({gram for counts, _ in refs for gram in counts})
    log_num_docs = math.log(float(len(references))) if references else 0.0

    def to_vec(counts: Counter, length: int):
        vec = [dict() for _ in range(max_n)]
        norm = [0.0] * max_n
        for gram, tf in counts.items():
            n = len(gram) - 1
            w = float(tf) * (log_num_docs - math.log(max(1.0, doc_freq[gram])))
            vec[n][gram] = w
            norm[n] += w * w
        return vec, [math.sqrt(x) for x in norm], length

    per_item = []
    for (hc, hlen), refs in zip(hyp_counts, ref_counts):
        vh, nh, lh = to_vec(hc, hlen)
        total = 0.0
        for rc, rlen in refs:
            vr, nr, lr = to_vec(rc, rlen)
            penalty = math.exp(-((lh - lr) ** 2) / (2 * sigma**2))
            for n in range(max_n):
                val = sum(min(w, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, w in vh[n].items())
                if nh[n] != 0 and nr[n] != 0:
                    val /= nh[n] * nr[n]
                total += val * penalty
        per_item.append(total / max_n / len(refs) * 10.0)
    corpus = sum(per_item) / len(per_item) if per_item else 0.0
    return corpus, per_item


def _all_ngrams(tokens: list[str], max_n: int) -> tuple[Counter, int]:
    counts: Counter = Counter()
    for n in range(1, max_n + 1):
        counts.update(_ngrams(tokens, n))
    return counts, len(tokens)


# --------------------------------------------------------------------------------------------- ROUGE-L
def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len(a)·len(b)))."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def corpus_rouge_l(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], beta: float = 1.2
) -> tuple[float, list[float]]:
    """ROUGE-L as coco-caption: best LCS precision and best LCS recall over the references, combined as
    ``(1+β²)PR / (R + β²P)`` with β = 1.2; corpus score = mean over items."""
    _check(hypotheses, references)
    per_item = []
    for hyp, refs in zip(hypotheses, references):
        h = tokenize(hyp)
        precs, recs = [], []
        for r in refs:
            rt = tokenize(r)
            lcs = lcs_length(h, rt)
            precs.append(lcs / len(h) if h else 0.0)
            recs.append(lcs / len(rt) if rt else 0.0)
        p, r = max(precs), max(recs)
        per_item.append(((1 + beta**2) * p * r) / (r + beta**2 * p) if p > 0 and r > 0 else 0.0)
    return (sum(per_item) / len(per_item) if per_item else 0.0), per_item


# -------------------------------------------------------------------------------------- METEOR (exact)
def corpus_meteor_exact(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], alpha: float = 0.9, beta: float = 3.0,
    gamma: float = 0.5,
) -> tuple[float, list[float]]:
    """METEOR with the exact-match module only (Banerjee & Lavie 2005 parameters).

    Unigram alignment by exact token match (greedy, left to right, preferring the candidate that keeps
    the alignment monotone), ``Fmean = PR / (αP + (1-α)R)``, fragmentation penalty
    ``γ·(chunks/matches)^β``; the best reference wins. Official METEOR 1.5 also matches stems, WordNet
    synonyms and paraphrases, so this score is a lower bound of it and not comparable to published
    METEOR numbers — report it as "METEOR (exact)".
    """
    _check(hypotheses, references)
    per_item = []
    for hyp, refs in zip(hypotheses, references):
        h = tokenize(hyp)
        per_item.append(max(_meteor_one(h, tokenize(r), alpha, beta, gamma) for r in refs))
    return (sum(per_item) / len(per_item) if per_item else 0.0), per_item


def _meteor_one(h: list[str], r: list[str], alpha: float, beta: float, gamma: float) -> float:
    used = [False] * len(r)
    alignment = []  # (hyp index, ref index)
    last_ref = -1
    for i, tok in enumerate(h):
        candidates = [j for j, t in enumerate(r) if t == tok and not used[j]]
        if not candidates:
            continue
        after = [j for j in candidates if j > last_ref]
        j = after[0] if after else candidates[0]
        used[j] = True
        alignment.append((i, j))
        last_ref = j
    matches = len(alignment)
    if matches == 0:
        return 0.0
    p, rec = matches / len(h), matches / len(r)
    fmean = p * rec / (alpha * p + (1 - alpha) * rec)
    chunks = 1
    for (i0, j0), (i1, j1) in zip(alignment, alignment[1:]):
        if not (i1 == i0 + 1 and j1 == j0 + 1):
            chunks += 1
    penalty = gamma * (chunks / matches) ** beta
    return fmean * (1 - penalty)


def evaluate_captions(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """All corpus metrics at once: ``{"BLEU-4", "CIDEr-D", "ROUGE-L", "METEOR-exact"}`` (coco scale:
    BLEU/ROUGE/METEOR in [0, 1], CIDEr-D in [0, 10])."""
    return {
        "BLEU-4": corpus_bleu(hypotheses, references)[0],
        "CIDEr-D": corpus_cider_d(hypotheses, references)[0],
        "ROUGE-L": corpus_rouge_l(hypotheses, references)[0],
        "METEOR-exact": corpus_meteor_exact(hypotheses, references)[0],
    }
