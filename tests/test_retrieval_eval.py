"""Retrieval metrics on hand-built similarity matrices whose ranks are worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.retrieval_eval import (
    attribute_accuracy,
    evaluate_embeddings,
    flatten_captions,
    format_metrics,
    retrieval_metrics,
    retrieval_ranks,
    similarity_matrix,
    summarize_ranks,
)


def test_identity_matrix_is_perfect():
    m = retrieval_metrics(np.eye(5))
    for d in ("t2v", "v2t"):
        assert m[f"{d}_R@1"] == 1.0 and m[f"{d}_R@5"] == 1.0 and m[f"{d}_R@10"] == 1.0
        assert m[f"{d}_MdR"] == 1.0 and m[f"{d}_MnR"] == 1.0
    assert m["num_texts"] == 5 and m["num_videos"] == 5


def test_hand_built_ranks_square():
    # rows = captions, cols = videos; caption i belongs to video i.
    sim = np.array(
        [
            [0.9, 0.1, 0.2, 0.0],  # correct video 0 first -> rank 1
            [0.8, 0.5, 0.1, 0.0],  # video 0 beats video 1 -> rank 2
            [0.7, 0.6, 0.3, 0.4],  # 0, 1, 3 beat 2 -> rank 4
            [0.0, 0.0, 0.0, 0.1],  # rank 1
        ]
    )
    t2v, v2t = retrieval_ranks(sim, np.arange(4))
    assert t2v.tolist() == [1, 2, 4, 1]
    # v2t: column j vs its caption j. col0: [.9,.8,.7,0] -> caption 0 first -> 1
    # col1: [.1,.5,.6,0] -> caption 2 (0.6) beats caption 1 -> 2; col2: [.2,.1,.3,0] -> 1;
    # col3: [0,0,.4,.1] -> caption 2 beats caption 3 -> 2
    assert v2t.tolist() == [1, 2, 1, 2]
    m = retrieval_metrics(sim)
    assert m["t2v_R@1"] == pytest.approx(0.5)
    assert m["t2v_R@5"] == 1.0
    assert m["t2v_MdR"] == pytest.approx(1.5)
    assert m["t2v_MnR"] == pytest.approx(2.0)
    assert m["v2t_R@1"] == pytest.approx(0.5)
    assert m["v2t_MnR"] == pytest.approx(1.5)


def test_ties_count_against_the_query():
    m = retrieval_metrics(np.zeros((4, 4)))
    assert m["t2v_R@1"] == 0.0 and m["t2v_MdR"] == 4.0
    assert m["v2t_R@1"] == 0.0 and m["v2t_MnR"] == 4.0
    # a single tie with a wrong video -> rank 2
    t2v, _ = retrieval_ranks(np.array([[0.5, 0.5], [0.0, 1.0]]), np.array([0, 1]))
    assert t2v.tolist() == [2, 1]


def test_multiple_captions_per_video():
    # 5 captions, 3 videos: captions 0,1 -> video 0; 2 -> video 1; 3,4 -> video 2
    owners = np.array([0, 0, 1, 2, 2])
    sim = np.array(
        [
            [0.9, 0.1, 0.0],  # rank 1
            [0.2, 0.3, 0.1],  # video 1 wins -> rank 2
            [0.0, 0.8, 0.9],  # video 2 wins -> rank 2
            [0.1, 0.2, 0.7],  # rank 1
            [0.5, 0.6, 0.4],  # both others win -> rank 3
        ]
    )
    t2v, v2t = retrieval_ranks(sim, owners)
    assert t2v.tolist() == [1, 2, 2, 1, 3]
    # v2t video 0 col [.9,.2,0,.1,.5]: best own caption 0.9 -> rank 1
    # video 1 col [.1,.3,.8,.2,.6]: own caption 2 (0.8) best -> 1
    # video 2 col [0,.1,.9,.7,.4]: best own 0.7, caption 2 (0.9) wrong above -> 2
    assert v2t.tolist() == [1, 1, 2]
    m = retrieval_metrics(sim, owners)
    assert m["num_texts"] == 5 and m["num_videos"] == 3
    assert m["t2v_R@1"] == pytest.approx(2 / 5)
    assert m["v2t_R@1"] == pytest.approx(2 / 3)


def test_equivalence_classes_count_all_members_correct():
    # videos 0 and 1 share a caption_class; caption 0 belongs to video 0 but prefers video 1.
    sim = np.array(
        [
            [0.5, 0.9, 0.1],
            [0.2, 0.4, 0.3],
            [0.1, 0.2, 0.8],
        ]
    )
    owners = np.arange(3)
    strict = retrieval_metrics(sim, owners)
    assert strict["t2v_R@1"] == pytest.approx(2 / 3)  # caption 0 ranks its own video 2nd
    equiv = retrieval_metrics(sim, owners, equivalence=["red-up", "red-up", "blue-left"])
    # caption 0: best of class {0,1} is 0.9 -> rank 1; caption 1: class best 0.4 > 0.3 -> rank 1
    assert equiv["t2v_R@1"] == 1.0
    # v2t video 2 col [.1,.3,.8] -> 1; video 0 col [.5,.2,.1]: class captions {0,1} -> 0.5 best -> 1
    assert equiv["v2t_R@1"] == 1.0
    t2v, _ = retrieval_ranks(sim, owners, equivalence=["a", "b", "a"])
    # caption 1 (class b, only video 1 correct at 0.4; wrong 0.2, 0.3) -> rank 1
    # caption 0 (class a: videos 0, 2 -> best 0.5, wrong video 1 at 0.9) -> rank 2
    assert t2v.tolist() == [2, 1, 1]


def test_equivalence_with_rank_beyond_class():
    # 4 videos, classes [x, x, y, y]; caption of video 2 scores x-videos highest -> rank 3
    sim = np.array([[0.1, 0.2, 0.9, 0.3], [0.0, 0.0, 0.0, 0.0], [0.9, 0.8, 0.5, 0.1], [0.3, 0.2, 0.1, 0.7]])
    t2v, _ = retrieval_ranks(sim, np.arange(4), equivalence=["x", "x", "y", "y"])
    # caption 0 (class x): best correct 0.2, wrong y-videos 0.9 and 0.3 -> rank 3
    # caption 1 (class x): all zero, ties with both y-videos -> rank 3
    # caption 2 (class y): best correct 0.5, wrong 0.9, 0.8 -> rank 3
    # caption 3 (class y): best 0.7 -> rank 1
    assert t2v.tolist() == [3, 3, 3, 1]


def test_random_matrix_recall_is_near_chance():
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(400, 400))
    m = retrieval_metrics(sim)
    assert m["t2v_R@1"] < 0.02 and m["t2v_R@10"] < 0.06
    assert 150 < m["t2v_MdR"] < 250


def test_rectangular_requires_mapping_and_validation_errors():
    with pytest.raises(ValueError, match="text_to_video is required"):
        retrieval_metrics(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="one entry per text row"):
        retrieval_metrics(np.zeros((3, 2)), np.array([0, 1]))
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(np.zeros((2, 2)), np.array([0, 2]))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.array([[np.nan, 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="no correct candidate"):
        retrieval_metrics(np.zeros((2, 3)), np.array([0, 1]))  # video 2 has no caption
    with pytest.raises(ValueError, match="one class key per video"):
        retrieval_metrics(np.eye(2), equivalence=["a"])
    with pytest.raises(TypeError, match="integer"):
        retrieval_metrics(np.eye(2), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="empty"):
        retrieval_metrics(np.zeros((0, 0)), np.zeros(0, dtype=np.int64))


def test_similarity_and_evaluate_embeddings_with_torch():
    import torch  # a runtime dependency: missing fails the test

    video = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])
    text = torch.tensor([[3.0, 0.1], [0.1, 1.0], [0.0, 5.0], [-2.0, 0.0]])
    sim = similarity_matrix(text, video)
    assert sim.shape == (4, 3)
    assert sim[0, 0] == pytest.approx(3.0 / np.hypot(3.0, 0.1))
    m = evaluate_embeddings(text, np.array([0, 1, 1, 2]), video)
    assert m["t2v_R@1"] == 1.0 and m["v2t_R@1"] == 1.0
    with pytest.raises(ValueError, match="same D"):
        similarity_matrix(np.zeros((2, 3)), np.zeros((2, 4)))


def test_flatten_captions_and_summaries():
    texts, owners = flatten_captions([["a", "b"], ["c"], ["d", " ", "e"]])
    assert texts == ["a", "b", "c", "d", "e"]
    assert owners.tolist() == [0, 0, 1, 2, 2]
    with pytest.raises(ValueError, match="video 1 has no non-empty caption"):
        flatten_captions([["a"], []])
    with pytest.raises(TypeError, match="list of strings"):
        flatten_captions(["abc"])
    s = summarize_ranks(np.array([1, 3, 20]), "t2v", ks=(1, 5))
    assert s == {
        "t2v_R@1": pytest.approx(1 / 3),
        "t2v_R@5": pytest.approx(2 / 3),
        "t2v_MdR": 3.0,
        "t2v_MnR": 8.0,
    }
    line = format_metrics(retrieval_metrics(np.eye(3)))
    assert line.startswith("t2v R@1 100.0") and "| v2t" in line


def test_attribute_accuracy_scores_each_field_of_the_nearest_class():
    # Four classes colour|direction; the "model" sees colour but confuses left and right.
    classes = ["red|left", "red|right", "blue|left", "blue|right"]
    text = np.eye(4)
    text_classes = classes
    video = np.array([[1.0, 0.2, 0, 0], [1.0, 0.2, 0, 0], [0, 0, 0.2, 1.0], [0, 0, 0.2, 1.0]])
    acc = attribute_accuracy(text, text_classes, video, classes, ["colour", "direction"])
    assert acc == {"class": 0.5, "colour": 1.0, "direction": 0.5}
    # several captions per class average into one prototype
    names = ["colour", "direction"]
    acc2 = attribute_accuracy(np.vstack([text, text * 2]), classes * 2, video, classes, names)
    assert acc2 == acc
    with pytest.raises(ValueError, match="fields"):
        attribute_accuracy(text, text_classes, video, classes, ["colour"])
    with pytest.raises(ValueError, match="4 video classes for 3 videos"):
        attribute_accuracy(text, text_classes, video[:3], classes, ["colour", "direction"])
