"""Caption metrics on tiny cases computed by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import contextlib
import importlib
import io
import math
import random

import pytest

from pipeline.caption_metrics import (
    corpus_bleu,
    corpus_cider_d,
    corpus_meteor_exact,
    corpus_rouge_l,
    evaluate_captions,
    lcs_length,
    tokenize,
)


def test_tokenize_lowercases_and_strips_punctuation():
    assert tokenize("A Red circle, moving LEFT.") == ["a", "red", "circle", "moving", "left"]
    with pytest.raises(TypeError, match="caption must be a str"):
        tokenize(None)


def test_bleu_identical_is_one_and_disjoint_is_zero():
    assert corpus_bleu(["the cat sat on the mat"], [["the cat sat on the mat"]])[0] == pytest.approx(1.0)
    assert corpus_bleu(["x y z w"], [["a b c d"]])[0] < 1e-6


def test_bleu_clipping_and_add1_smoothing():
    # hyp "the cat the cat" vs ref "the cat is here": clipped p1 = 2/4, p2 = 1/3 -> (1+1)/(3+1),
    # p3 = 0/2 -> 1/3, p4 = 0/1 -> 1/2; equal lengths -> BP = 1.
    score, _ = corpus_bleu(["the cat the cat"], [["the cat is here"]], smoothing="add1")
    assert score == pytest.approx((0.5 * 0.5 * (1 / 3) * 0.5) ** 0.25)
    # Without smoothing (coco-caption) a zero 3-gram precision collapses the score.
    assert corpus_bleu(["the cat the cat"], [["the cat is here"]])[0] < 1e-3


def test_bleu_brevity_penalty_uses_closest_reference_length():
    # hyp "a b c" (3 words); refs of 2 and 5 words -> closest is 2 -> no penalty; all precisions 1 (add1).
    score, _ = corpus_bleu(["a b c"], [["a b", "a b c d e"]], smoothing="add1")
    assert score == pytest.approx(1.0)
    # hyp "the cat" vs a 4-word ref: precisions 1, BP = exp(1 - 4/2).
    score, _ = corpus_bleu(["the cat"], [["the cat sat on"]], smoothing="add1")
    assert score == pytest.approx(math.exp(-1.0))


def test_bleu_is_corpus_level_not_mean_of_sentences():
    # Totals: p1 = 4/6, p2 = 3/4, p3 = 2/2, p4 = 1/1; lengths 6 vs 6 -> BP 1 -> (0.5)^(1/4).
    score, per_item = corpus_bleu(["a b c d", "x y"], [["a b c d"], ["z w"]])
    assert score == pytest.approx(0.5**0.25, rel=1e-6)
    assert per_item[0] == pytest.approx(1.0) and per_item[1] < 1e-6


def test_cider_d_hand_computed():
    # Two items, every reference n-gram has df 1 -> idf = log(2) for all; 3/4-grams are empty (val 0).
    # Identical 2-word captions: n=1 and n=2 similarities are 1 -> (1 + 1) / 4 * 10 = 5.
    score, per_item = corpus_cider_d(["a b", "c d"], [["a b"], ["c d"]])
    assert per_item == pytest.approx([5.0, 5.0])
    assert score == pytest.approx(5.0)
    # hyp "a b" vs ref "a b c": n=1: 2w^2 / (sqrt2 w * sqrt3 w) = 2/sqrt6; n=2: w^2 / (w * sqrt2 w) = 1/sqrt2;
    # length penalty exp(-1 / (2 * 36)).
    _, per_item = corpus_cider_d(["a b", "d e"], [["a b c"], ["d e"]])
    expected = (2 / math.sqrt(6) + 1 / math.sqrt(2)) * math.exp(-1 / 72) / 4 * 10
    assert per_item[0] == pytest.approx(expected)
    assert per_item[1] == pytest.approx(5.0)


def test_cider_d_clips_repeated_ngrams():
    # hyp "a a" vs ref "a b" (plus a second item so idf > 0): n=1 hyp {a: 2w}, ref {a: w, b: w}:
    # min(2w, w) * w / (2w * sqrt2 w) = 1 / (2 sqrt2); n=2: (a,a) not in ref -> 0.
    _, per_item = corpus_cider_d(["a a", "c d"], [["a b"], ["c d"]])
    assert per_item[0] == pytest.approx((1 / (2 * math.sqrt(2))) / 4 * 10)


def test_rouge_l_hand_computed():
    assert lcs_length("a b c d".split(), "a c d e f".split()) == 3
    # P = 3/4, R = 3/5, beta = 1.2
    p, r = 0.75, 0.6
    expected = (1 + 1.44) * p * r / (r + 1.44 * p)
    score, _ = corpus_rouge_l(["a b c d"], [["a c d e f"]])
    assert score == pytest.approx(expected)
    # Best precision and best recall are taken over references separately.
    score, _ = corpus_rouge_l(["a b"], [["a b c d", "a"]])  # P: max(2/2, 1/2)=1, R: max(2/4, 1/1)=1
    assert score == pytest.approx(1.0)


def test_meteor_exact_hand_computed():
    # hyp "a b c d" vs ref "a b x c d": 4 matches, P = 1, R = 0.8, Fmean = 0.8 / (0.9 + 0.08),
    # 2 chunks -> penalty 0.5 * (2/4)^3.
    score, _ = corpus_meteor_exact(["a b c d"], [["a b x c d"]])
    assert score == pytest.approx(0.8 / 0.98 * (1 - 0.5 * 0.125))
    assert corpus_meteor_exact(["q"], [["a b"]])[0] == 0.0


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="2 hypotheses but 1 reference sets"):
        corpus_bleu(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="reference set 0 must be a non-empty list"):
        corpus_cider_d(["a"], [[]])
    with pytest.raises(ValueError, match="reference set 0"):
        corpus_rouge_l(["a"], ["a plain string"])


def test_evaluate_captions_reports_all_metrics():
    refs = [["a red circle moves left", "red circle going left"]]
    out = evaluate_captions(["a red circle moves left"], refs)
    assert set(out) == {"BLEU-4", "CIDEr-D", "ROUGE-L", "METEOR-exact"}
    assert out["BLEU-4"] == pytest.approx(1.0) and out["ROUGE-L"] == pytest.approx(1.0)


# ------------------------------------------------------------------- against pycocoevalcap (coco-caption)
def _coco(hypotheses, references):
    """pycocoevalcap's Bleu(4) and Cider (CIDEr-D, sigma 6) on our tokenisation joined by spaces (its
    PTBTokenizer needs Java): corpus BLEU-4, corpus CIDEr-D and per-item CIDEr-D."""
    # A dev dependency (pyproject.toml): missing, the test fails rather than skipping the comparison.
    bleu_mod = importlib.import_module("pycocoevalcap.bleu.bleu")
    cider_mod = importlib.import_module("pycocoevalcap.cider.cider")
    rouge_mod = importlib.import_module("pycocoevalcap.rouge.rouge")
    gts = {i: [" ".join(tokenize(r)) for r in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(tokenize(h))] for i, h in enumerate(hypotheses)}
    with contextlib.redirect_stdout(io.StringIO()):
        bleu, _ = bleu_mod.Bleu(4).compute_score(gts, res)
    cider, cider_items = cider_mod.Cider().compute_score(gts, res)
    rouge, _ = rouge_mod.Rouge().compute_score(gts, res)
    return bleu[3], float(cider), [float(x) for x in cider_items], float(rouge)


def _random_sets():
    rng = random.Random(0)
    words = "a the red blue green circle square wedge moves slides left right up down we see that one".split()

    def sentence():
        return " ".join(rng.choice(words) for _ in range(rng.randint(1, 9)))

    for _ in range(8):
        n = rng.randint(2, 10)
        refs = [[sentence() for _ in range(rng.randint(1, 4))] for _ in range(n)]
        yield [sentence() for _ in range(n)], refs


CAPTION_SETS = [
    (["a red circle moves left", "the blue square", "we"],
     [["a red circle moves left", "red circle going left"], ["the blue square slides up"], ["we see"]]),
    (["We see that a crimson wedge moves left.", "one golden square travels up", "a a a a"],
     [["we see that a scarlet wedge travels to the left", "the red triangle moves left"],
      ["a yellow square slides upwards", "one golden box moves up", "the yellow square goes up"],
      ["a b", "a"]]),
    (["", "a b c"], [["a b c"], ["a b"]]),  # an empty hypothesis
    *_random_sets(),
]


@pytest.mark.parametrize("hypotheses,references", CAPTION_SETS)
def test_bleu_cider_rouge_match_pycocoevalcap(hypotheses, references):
    """Same numbers as coco-caption's scorers. BLEU-4 differs by < 1e-9: coco-caption's brevity penalty uses
    (hyp_len + 1e-15) / (ref_len + 1e-9). CIDEr-D's length penalty counts words here and bigrams there; the
    two differ only for an empty caption, whose similarity is 0 either way."""
    bleu, cider, cider_items, rouge = _coco(hypotheses, references)
    assert corpus_bleu(hypotheses, references)[0] == pytest.approx(bleu, abs=1e-9)
    ours, ours_items = corpus_cider_d(hypotheses, references)
    assert ours == pytest.approx(cider, abs=1e-9)
    assert ours_items == pytest.approx(cider_items, abs=1e-9)
    assert corpus_rouge_l(hypotheses, references)[0] == pytest.approx(rouge, abs=1e-9)


def test_cider_d_document_frequency_comes_from_the_scored_corpus():
    """The same item scores differently in a different corpus (idf from the corpus' references), in both."""
    hyp, refs = ["a red circle moves up"], [["a red circle moves left"]]
    extra_h, extra_r = ["a red square moves up"], [["a red square moves up"]]
    alone = corpus_cider_d(hyp + extra_h, refs + extra_r)[1][0]
    crowd = corpus_cider_d(hyp + extra_h * 3, refs + extra_r * 3)[1][0]
    assert alone != pytest.approx(crowd)
    assert alone == pytest.approx(_coco(hyp + extra_h, refs + extra_r)[2][0], abs=1e-9)
    assert crowd == pytest.approx(_coco(hyp + extra_h * 3, refs + extra_r * 3)[2][0], abs=1e-9)
