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

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    from models import create_model
    from pipeline.retrieval_eval import attribute_accuracy, flatten_captions, retrieval_metrics
    from pipeline.training import build_objective, load_train_config, split_batches

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the training YAML (model, eval sampling, size)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--shards", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--attributes", default="colour,shape,direction")
    args = p.parse_args(argv)
    cfg = load_train_config(args.config)
    torch.set_num_threads(1)
    model, transform, _ = create_model(cfg.model, pretrained=args.checkpoint)
    objective = build_objective(model, cfg).eval()
    videos, texts, owners, classes = [], [], [], []
    with torch.inference_mode():
        for batch in split_batches(args.shards, cfg, transform, args.split):
            captions, owner = flatten_captions(batch["captions"])
            owners.append(owner + sum(len(v) for v in videos))
            videos.append(objective.embed_videos(batch["frames"], batch["mask"]).float().numpy())
            texts.append(model.encode_text(captions).float().numpy())
            classes += [m["caption_class"] for m in batch["meta"]]
    video, text, owner = np.concatenate(videos), np.concatenate(texts), np.concatenate(owners)
    video_n = video / np.linalg.norm(video, axis=1, keepdims=True)
    text_n = text / np.linalg.norm(text, axis=1, keepdims=True)
    r1 = retrieval_metrics(text_n @ video_n.T, owner, equivalence=classes)["t2v_R@1"]
    acc = attribute_accuracy(text, [classes[i] for i in owner], video, classes, args.attributes.split(","))
    print(json.dumps({"checkpoint": args.checkpoint, "videos": len(classes), "t2v_R@1": round(r1, 4),
                      **{k: round(v, 4) for k, v in acc.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
