"""Per-attribute accuracy of a trained retrieval model on the synthetic corpus: which of colour, shape and
direction of motion it gets right.

    python bench/attribute_accuracy.py --config configs/train/tiny-meanP-3d.yaml \\
        --checkpoint RUN/model.pt --shards SHARDS [--split test]

Every video of the split is assigned the caption class whose mean caption embedding is nearest
(``pipeline.retrieval_eval.attribute_accuracy``); the fields of the ``caption_class`` key
(``colour|shape|direction`` for the ``motion`` profile) are scored separately. t2v R@1 with ``caption_class``
equivalence is printed beside it, from the same embeddings. Chance: 1 / (values of the attribute).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import BenchRecord, add_record_args, col  # noqa: E402
from pipeline.retrieval_eval import attribute_accuracy, retrieval_metrics  # noqa: E402
from pipeline.training import embed_split, load_train_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the training YAML (model, eval sampling, size)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--shards", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--attributes", default="colour,shape,direction")
    add_record_args(p, "attribute_accuracy")
    args = p.parse_args(argv)
    record = BenchRecord.start("attribute_accuracy", sys.argv[1:] if argv is None else argv)
    cfg = load_train_config(args.config, {"equivalence": "caption_class"})
    video, text, owner, classes = embed_split(args.shards, cfg, args.checkpoint, args.split)
    if classes is None:
        raise ValueError(f"{args.shards}: the {args.split!r} videos carry no caption_class (not synthetic?)")
    r1 = retrieval_metrics(text @ video.T, owner, equivalence=classes)["t2v_R@1"]
    attributes = args.attributes.split(",")
    acc = attribute_accuracy(text, [classes[i] for i in owner], video, classes, attributes)
    row = {"checkpoint": args.checkpoint, "videos": len(classes), "t2v_R@1": round(r1, 4),
           **{k: round(v, 4) for k, v in acc.items()}}
    print(json.dumps(row))
    record.table("accuracy", columns=[col("checkpoint", "checkpoint"), col("videos", "videos"),
                                      col("t2v_R@1", "t2v R@1", "{:.3f}"),
                                      *[col(k, k, "{:.3f}") for k in acc]],
                 rows=[{**row, "config": args.config}],
                 sample_size=f"the {args.split} split of {args.shards}: {len(classes)} videos, "
                             f"{len(owner)} captions",
                 baseline="chance: 1 / (values of the attribute); t2v R@1 with caption_class equivalence",
                 filtering="none")
    record.write(args.json, note=args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
