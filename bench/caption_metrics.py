"""vidsift's caption metrics against pycocoevalcap's reference scorers, on the same pre-tokenised captions.

    python -m bench.caption_metrics [--n 1200] [--profile motion]

Captions come from the synthetic corpus generator (no videos are rendered): for each of ``--n`` videos its
own paraphrases are the references, and the hypothesis set is one of
- ``own paraphrase``: the video's first caption, scored against its other captions;
- ``same class``: a paraphrase of another video of the same caption class (same colour, shape, motion);
- ``other class``: a caption of a random video (usually another class);
- ``word dropped``: the first caption with one word removed.
Both sides see the same text: vidsift's ``tokenize`` output joined by spaces (pycocoevalcap's PTBTokenizer
needs Java and is not used). Reported: corpus BLEU-4, corpus CIDEr-D and ROUGE-L from each implementation,
the largest per-item CIDEr-D difference, and the time each took.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import sys
import time

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from bench.record import BenchRecord, add_record_args, col, format_cell
from pipeline.caption_metrics import corpus_bleu, corpus_cider_d, corpus_rouge_l, tokenize
from synthetic import caption_class, make_captions, make_config, make_spec


def coco_scores(hypotheses: list[str], references: list[list[str]]) -> dict:
    """pycocoevalcap's Bleu(4), Cider (CIDEr-D) and Rouge on the pre-tokenised captions."""
    gts = {i: [" ".join(tokenize(r)) for r in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(tokenize(h))] for i, h in enumerate(hypotheses)}
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its counts
        bleu, _ = Bleu(4).compute_score(gts, res)
    cider, cider_items = Cider().compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    return {"BLEU-4": bleu[3], "CIDEr-D": float(cider), "ROUGE-L": float(rouge),
            "cider_items": [float(x) for x in cider_items], "s": time.perf_counter() - start}


def vidsift_scores(hypotheses: list[str], references: list[list[str]]) -> dict:
    start = time.perf_counter()
    bleu, _ = corpus_bleu(hypotheses, references)
    cider, cider_items = corpus_cider_d(hypotheses, references)
    rouge, _ = corpus_rouge_l(hypotheses, references)
    return {"BLEU-4": bleu, "CIDEr-D": cider, "ROUGE-L": rouge, "cider_items": cider_items,
            "s": time.perf_counter() - start}


def caption_sets(n: int, profile: str, seed: int) -> dict[str, tuple[list[str], list[list[str]]]]:
    """The four hypothesis sets described in the module docstring, over the same references."""
    cfg = make_config(seed=seed, profile=profile)
    specs = [make_spec(cfg, i) for i in range(n)]
    captions = [make_captions(s, profile, seed) for s in specs]
    classes = [caption_class(s, profile) for s in specs]
    by_class: dict[str, list[int]] = {}
    for i, c in enumerate(classes):
        by_class.setdefault(c, []).append(i)
    rng = random.Random(seed)
    refs = [c[1:] for c in captions]
    keep = [i for i, r in enumerate(refs) if r]
    refs = [refs[i] for i in keep]

    def same_class(i: int) -> str:
        others = [j for j in by_class[classes[i]] if j != i] or [i]
        return captions[rng.choice(others)][0]

    def drop_word(text: str) -> str:
        words = text.split()
        del words[rng.randrange(len(words))]
        return " ".join(words)

    return {
        "own paraphrase": ([captions[i][0] for i in keep], refs),
        "same class": ([same_class(i) for i in keep], refs),
        "other class": ([captions[rng.randrange(n)][0] for _ in keep], refs),
        "word dropped": ([drop_word(captions[i][0]) for i in keep], refs),
    }


def compare(sets: dict) -> list[dict]:
    rows = []
    for name, (hyps, refs) in sets.items():
        ours, coco = vidsift_scores(hyps, refs), coco_scores(hyps, refs)
        rows.append({
            "hypotheses": name, "items": len(hyps), "references": sum(len(r) for r in refs),
            "bleu_vidsift": ours["BLEU-4"], "bleu_coco": coco["BLEU-4"],
            "cider_vidsift": ours["CIDEr-D"], "cider_coco": coco["CIDEr-D"],
            "cider_item_max_diff": max(abs(a - b) for a, b in zip(ours["cider_items"], coco["cider_items"])),
            "rouge_vidsift": ours["ROUGE-L"], "rouge_coco": coco["ROUGE-L"],
            "max_corpus_diff": max(abs(ours[k] - coco[k]) for k in ("BLEU-4", "CIDEr-D", "ROUGE-L")),
            "vidsift_ms": ours["s"] * 1e3, "coco_ms": coco["s"] * 1e3,
        })
    return rows


COLUMNS = [
    col("hypotheses", "hypotheses"), col("items", "items"), col("references", "references"),
    col("bleu_vidsift", "BLEU-4 vidsift", "{:.4f}"), col("bleu_coco", "BLEU-4 pycocoevalcap", "{:.4f}"),
    col("cider_vidsift", "CIDEr-D vidsift", "{:.4f}"), col("cider_coco", "CIDEr-D pycocoevalcap", "{:.4f}"),
    col("rouge_vidsift", "ROUGE-L vidsift", "{:.4f}"), col("rouge_coco", "ROUGE-L pycocoevalcap", "{:.4f}"),
    col("max_corpus_diff", "max corpus |diff|", "{:.1e}"),
    col("cider_item_max_diff", "max per-item CIDEr-D |diff|", "{:.1e}"),
    col("vidsift_ms", "vidsift ms", "{:.0f}"), col("coco_ms", "pycocoevalcap ms", "{:.0f}"),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1200, help="videos whose captions are scored")
    p.add_argument("--profile", choices=["motion", "full"], default="motion")
    p.add_argument("--seed", type=int, default=0)
    add_record_args(p, "caption_metrics")
    args = p.parse_args(argv)
    record = BenchRecord.start("caption_metrics", sys.argv[1:] if argv is None else argv)
    rows = compare(caption_sets(args.n, args.profile, args.seed))
    for r in rows:
        print(" | ".join(format_cell(r[c["key"]], c["fmt"]) for c in COLUMNS))
    record.table(
        "agreement", columns=COLUMNS, rows=rows,
        sample_size=f"captions of {args.n} synthetic videos (profile {args.profile}, seed {args.seed}); "
                    "every set is scored as one corpus, so CIDEr-D's document frequencies come from its "
                    "own references",
        baseline="pycocoevalcap 1.2 Bleu(4), Cider and Rouge on the same pre-tokenised text, same run",
        filtering=f"videos with a single caption dropped (no reference left): {args.n - rows[0]['items']} "
                  f"of {args.n}")
    worst = max(r["max_corpus_diff"] for r in rows)
    record.add_headline("caption metrics", "BLEU-4 / CIDEr-D / ROUGE-L equal to pycocoevalcap's",
                        f"largest corpus difference {worst:.1e} over {len(rows)} caption sets",
                        "yes" if worst < 1e-6 else "no")
    record.write(args.json, note=args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
