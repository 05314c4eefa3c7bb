"""/healthz tells the truth: degraded (HTTP 200, with the reason) while the newest published version fails
to load, ok again once a later one loads; a version built by another model than ``--pretrained`` is refused
once, without reloading weights, while the old version keeps answering."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import models
from index import build_index, store
from index.testing import clustered_vectors, write_embeddings
from workflows.serve import LiveIndex, SnapshotLoader, build_app, serving_in_thread

MODEL = "clip4clip-meanP-tiny"


def publish(root: Path, work: Path, seed: int, ckpt: Path, model) -> str:
    """A new full build of ``root`` from vectors recorded as ``model``'s (its checkpoint ``ckpt``)."""
    emb = write_embeddings(work / f"emb-{seed}", clustered_vectors(12, 64, seed=seed),
                           model_id=model.model_id, model_name=MODEL, pretrained=str(ckpt),
                           video_prefix=f"s{seed}")
    return build_index(emb, root, factory="Flat", progress=False)["version"]


def get_json(url: str) -> tuple[int, dict]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, json.loads(response.read())


def test_a_version_of_another_model_is_refused_once_while_the_old_one_serves(tmp_path):
    model_a, _, _ = models.create_model(MODEL, seed=0)
    model_b, _, _ = models.create_model(MODEL, seed=1)  # a "retrained" model: another model_id
    ckpt_a = models.save_checkpoint(model_a, tmp_path / "a.pt")
    ckpt_b = models.save_checkpoint(model_b, tmp_path / "b.pt")
    assert model_a.model_id != model_b.model_id
    root = tmp_path / "idx"
    first = publish(root, tmp_path, 1, ckpt_a, model_a)
    loader, loads = SnapshotLoader(str(root), pretrained=str(ckpt_a)), []

    def load(version):
        loads.append(version)
        return loader.load(version)

    live = LiveIndex(str(root), load, poll_s=0, retry_s=0)  # retry_s=0: any other failure is retried at once
    retrained = publish(root, tmp_path, 2, ckpt_b, model_b)
    for _ in range(3):
        assert live.check_now() is False and live.current.version == first
    assert loads == [None, retrained]  # tried once, never again
    health = live.health()
    assert health["status"] == "degraded" and health["version"] == first and health["newest"] == retrained
    assert f"built by model {model_b.model_id!r}" in health["reason"] and "--pretrained" in health["reason"]
    assert live.current.searcher.rank(live.current.searcher.encode_text(["a cat"]), k=3).hits[0]
    fixed = publish(root, tmp_path, 3, ckpt_a, model_a)  # the same model again: served, the error cleared
    assert live.check_now() is True and live.current.version == fixed
    assert live.health() == {"status": "ok", "ok": True, "version": fixed, "newest": fixed}
    assert live.status()["last_error"] is None


def test_healthz_is_degraded_while_the_newest_version_fails_to_load_and_ok_after(tmp_path):
    model, _, _ = models.create_model(MODEL, seed=0)
    ckpt = models.save_checkpoint(model, tmp_path / "c4c.pt")
    root = tmp_path / "idx"
    first = publish(root, tmp_path, 1, ckpt, model)
    app = build_app(str(root), pretrained=str(ckpt), poll_s=0)
    live = app.state.live
    with serving_in_thread(app) as base:
        assert get_json(base + "/healthz") == (200, {"status": "ok", "ok": True, "version": first,
                                                     "newest": first})
        broken = publish(root, tmp_path, 2, ckpt, model)
        (root / store.VERSIONS_DIR / broken / "index.json").write_text("{not json")  # the newest is corrupt
        assert live.check_now() is False
        status, health = get_json(base + "/healthz")
        assert status == 200 and health["status"] == "degraded" and health["ok"] is False
        assert health["version"] == first and health["newest"] == broken and broken in health["reason"]
        assert get_json(base + "/version")[1]["health"] == "degraded"
        status, answer = get_json(base + "/search?q=a+cat&k=2")
        assert status == 200 and answer["version"] == first  # the old version keeps answering
        fixed = publish(root, tmp_path, 3, ckpt, model)
        assert live.check_now() is True
        assert get_json(base + "/healthz") == (200, {"status": "ok", "ok": True, "version": fixed,
                                                     "newest": fixed})
