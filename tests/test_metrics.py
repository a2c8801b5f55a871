"""Tests of mskd_fast.metrics against scikit-learn and direct numpy computations."""

from __future__ import annotations

import math
import os
import pickle

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, precision_recall_fscore_support

from mskd_fast.metrics import (
    MultiLabelMetrics,
    average_precision,
    average_precision_per_class,
    format_scale_recall,
    per_scale_recall,
    plot_scale_recall,
)

SCALAR_KEYS = ("mAP", "OP", "OR", "OF1", "CP", "CR", "CF1", "P@1", "R@1")


def _random_case(rng, n, c, quantise=None, pos_rate=0.3, empty_classes=()):
    """Logits (n, c) float32 and multi-hot targets (n, c) uint8; `quantise` rounds logits to create ties."""
    logits = rng.normal(scale=2.0, size=(n, c)).astype(np.float32)
    if quantise is not None:
        logits = (np.round(logits * quantise) / quantise).astype(np.float32)
    targets = (rng.random((n, c)) < pos_rate).astype(np.uint8)
    for k in empty_classes:
        targets[:, k] = 0
    return logits, targets


def _sigmoid32(logits):
    return torch.sigmoid(torch.from_numpy(logits)).numpy()


def _assert_results_equal(a, b):
    for key in SCALAR_KEYS:
        assert a[key] == b[key] or (math.isnan(a[key]) and math.isnan(b[key])), key
    np.testing.assert_array_equal(a["AP"], b["AP"])
    assert a["excluded_classes"] == b["excluded_classes"]
    assert a["num_samples"] == b["num_samples"]


# ----------------------------------------------------------------------------- average precision
def test_average_precision_hand_example():
    # scikit-learn's docstring example: 0.8333...
    assert average_precision([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.8333333333333333, abs=1e-15)
    # A tie between a positive and a negative at the top is one threshold: P = 1/2 there.
    assert average_precision([1.0, 1.0, 0.0], [1, 0, 0]) == pytest.approx(0.5, abs=1e-15)
    assert average_precision([1.0, 1.0, 0.0], [1, 0, 1]) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3, abs=1e-15)
    assert math.isnan(average_precision([0.3, 0.2], [0, 0]))


@pytest.mark.parametrize("quantise", [None, 4.0, 1.0, 0.25])
def test_average_precision_matches_sklearn_with_ties(quantise):
    rng = np.random.default_rng(int(quantise or 0) + 11)
    for _ in range(8):
        n, c = int(rng.integers(1, 200)), int(rng.integers(1, 12))
        scores, targets = _random_case(rng, n, c, quantise=quantise, pos_rate=rng.uniform(0.02, 0.9))
        ap = average_precision_per_class(scores, targets)
        for k in range(c):
            if targets[:, k].sum() == 0:
                assert math.isnan(ap[k])
                continue
            expected = average_precision_score(targets[:, k], scores[:, k])
            assert ap[k] == pytest.approx(expected, abs=1e-12)
            assert average_precision(scores[:, k], targets[:, k]) == pytest.approx(expected, abs=1e-12)


def test_average_precision_many_classes_uses_chunks():
    rng = np.random.default_rng(3)
    scores, targets = _random_case(rng, 50, 150, quantise=2.0)
    ap = average_precision_per_class(scores, targets)
    expected = [average_precision_score(targets[:, k], scores[:, k]) for k in range(150)]
    np.testing.assert_allclose(ap, expected, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- MultiLabelMetrics vs sklearn
@pytest.mark.parametrize("threshold", [0.5, 0.8])
def test_compute_matches_sklearn(threshold):
    rng = np.random.default_rng(7)
    n, c = 300, 9
    logits, targets = _random_case(rng, n, c, quantise=2.0, empty_classes=(2, 6))
    logits[:, 4] = -20.0  # class 4 is never predicted -> precision 0 (zero_division=0)
    names = [f"class{k}" for k in range(c)]
    metrics = MultiLabelMetrics(c, threshold=threshold, class_names=names)
    metrics.update(torch.from_numpy(logits), torch.from_numpy(targets))
    out = metrics.compute()

    assert out["num_samples"] == n
    assert out["excluded_classes"] == ["class2", "class6"]
    assert out["AP"].shape == (c,)
    assert np.isnan(out["AP"][[2, 6]]).all()
    keep = [k for k in range(c) if k not in (2, 6)]
    expected_ap = np.array([average_precision_score(targets[:, k], logits[:, k]) for k in keep]) * 100
    np.testing.assert_allclose(out["AP"][keep], expected_ap, rtol=0, atol=1e-10)
    assert out["mAP"] == pytest.approx(expected_ap.mean(), abs=1e-10)

    predicted = (_sigmoid32(logits) >= threshold).astype(np.uint8)
    p, r, f, _ = precision_recall_fscore_support(targets, predicted, average="micro", zero_division=0)
    assert out["OP"] == pytest.approx(100 * p, abs=1e-10)
    assert out["OR"] == pytest.approx(100 * r, abs=1e-10)
    assert out["OF1"] == pytest.approx(100 * f, abs=1e-10)
    p, r, _, _ = precision_recall_fscore_support(targets, predicted, average="macro", zero_division=0)
    assert out["CP"] == pytest.approx(100 * p, abs=1e-10)
    assert out["CR"] == pytest.approx(100 * r, abs=1e-10)
    assert out["CF1"] == pytest.approx(2 * out["CP"] * out["CR"] / (out["CP"] + out["CR"]), abs=1e-10)
    for key in SCALAR_KEYS:
        assert isinstance(out[key], float) and 0.0 <= out[key] <= 100.0


def test_top1_against_numpy():
    rng = np.random.default_rng(5)
    n, c = 200, 6
    logits, targets = _random_case(rng, n, c, quantise=1.0, pos_rate=0.2)
    targets[:7] = 0  # some images without any positive
    metrics = MultiLabelMetrics(c)
    metrics.update(logits, targets)
    out = metrics.compute()
    hits, recalls = [], []
    for i in range(n):
        top = int(np.argmax(logits[i]))  # first maximum on ties
        hit = float(targets[i, top] == 1)
        hits.append(hit)
        if targets[i].sum() > 0:
            recalls.append(hit / targets[i].sum())
    assert out["P@1"] == pytest.approx(100 * np.mean(hits), abs=1e-10)
    assert out["R@1"] == pytest.approx(100 * np.mean(recalls), abs=1e-10)


def test_degenerate_counts_give_zero_not_nan():
    metrics = MultiLabelMetrics(3, class_names=["a", "b", "c"])
    metrics.update(torch.full((4, 3), -30.0), torch.zeros(4, 3))  # nothing predicted, no positives
    out = metrics.compute()
    for key in ("OP", "OR", "OF1", "CP", "CR", "CF1", "P@1"):
        assert out[key] == 0.0, key
    assert math.isnan(out["mAP"]) and math.isnan(out["R@1"])
    assert out["excluded_classes"] == ["a", "b", "c"]


def test_ranking_uses_logits_without_sigmoid_saturation():
    # sigmoid(20) == sigmoid(30) == 1.0 in float32, but the logits still rank the positive first.
    metrics = MultiLabelMetrics(1)
    metrics.update(torch.tensor([[20.0], [30.0]]), torch.tensor([[0.0], [1.0]]))
    assert metrics.compute()["mAP"] == 100.0


# ----------------------------------------------------------------------------- streaming, padding, duplicates
def test_streaming_equals_single_batch():
    rng = np.random.default_rng(9)
    n, c = 257, 5
    logits, targets = _random_case(rng, n, c, quantise=4.0, empty_classes=(1,))
    ids = np.arange(n)
    single = MultiLabelMetrics(c)
    single.update(torch.from_numpy(logits), torch.from_numpy(targets), torch.from_numpy(ids))
    streamed = MultiLabelMetrics(c)
    order = rng.permutation(n)
    for chunk in np.array_split(order, 6):
        streamed.update(torch.from_numpy(logits[chunk]), torch.from_numpy(targets[chunk]), torch.from_numpy(chunk))
    _assert_results_equal(single.compute(), streamed.compute())
    # compute() is repeatable and further updates are still accepted
    _assert_results_equal(single.compute(), streamed.compute())
    anonymous = MultiLabelMetrics(c)
    for chunk in np.array_split(np.arange(n), 4):
        anonymous.update(logits[chunk], targets[chunk])
    _assert_results_equal(single.compute(), anonymous.compute())


def test_padding_dropped_and_duplicates_counted_once():
    rng = np.random.default_rng(10)
    n, c = 40, 4
    logits, targets = _random_case(rng, n, c)
    reference = MultiLabelMetrics(c)
    reference.update(logits, targets, np.arange(n))

    metrics = MultiLabelMetrics(c)
    metrics.update(logits[:30], targets[:30], np.arange(30))
    # second batch: samples 25..39 (25..29 again) plus 3 padding rows holding garbage
    pad_logits = np.full((3, c), np.nan, dtype=np.float32)
    pad_targets = np.full((3, c), 7, dtype=np.float32)
    metrics.update(
        np.concatenate([logits[25:], pad_logits]),
        np.concatenate([targets[25:].astype(np.float32), pad_targets]),
        np.concatenate([np.arange(25, n), [-1, -1, -5]]),
    )
    out = metrics.compute()
    assert out["num_samples"] == n
    _assert_results_equal(reference.compute(), out)
    state = metrics.state()
    assert state["sample_ids"].tolist() == list(range(n))


def test_duplicate_keeps_first_row():
    metrics = MultiLabelMetrics(2)
    metrics.update(torch.tensor([[3.0, -3.0]]), torch.tensor([[1, 0]]), torch.tensor([0]))
    metrics.update(torch.tensor([[-3.0, 3.0], [1.0, 1.0]]), torch.tensor([[1, 0], [0, 1]]), torch.tensor([0, 1]))
    rows = metrics.rows()
    np.testing.assert_array_equal(rows["logits"], [[3.0, -3.0], [1.0, 1.0]])
    np.testing.assert_array_equal(rows["probs"], _sigmoid32(rows["logits"]))
    assert rows["targets"].dtype == np.uint8


def test_duplicate_with_conflicting_targets_raises():
    metrics = MultiLabelMetrics(2)
    metrics.update(torch.zeros(2, 2), torch.tensor([[1, 0], [0, 1]]), torch.tensor([4, 4]))
    with pytest.raises(ValueError, match="sample_id 4"):
        metrics.compute()


def test_update_copies_inputs_and_reset():
    logits = torch.tensor([[2.0, -2.0], [-2.0, 2.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    metrics = MultiLabelMetrics(2)
    metrics.update(logits, targets)
    logits.neg_()  # a caller (or a CUDA graph) reusing the buffer must not change accumulated rows
    targets.zero_()
    assert metrics.compute()["mAP"] == 100.0
    metrics.reset()
    with pytest.raises(RuntimeError, match="no accumulated samples"):
        metrics.compute()


def test_state_round_trip():
    rng = np.random.default_rng(12)
    logits, targets = _random_case(rng, 30, 3)
    metrics = MultiLabelMetrics(3)
    metrics.update(logits, targets, np.arange(100, 130))
    clone = MultiLabelMetrics(3)
    clone.load_state(metrics.state())
    _assert_results_equal(metrics.compute(), clone.compute())
    assert clone.state()["sample_ids"].tolist() == list(range(100, 130))
    with pytest.raises(ValueError, match="missing keys"):
        clone.load_state({"logits": torch.zeros(1, 3)})


def test_sync_without_distributed_is_noop():
    metrics = MultiLabelMetrics(2)
    metrics.update(torch.tensor([[1.0, -1.0]]), torch.tensor([[1, 0]]), torch.tensor([0]))
    before = metrics.compute()
    metrics.sync()
    _assert_results_equal(before, metrics.compute())


# ----------------------------------------------------------------------------- validation
def test_constructor_validation():
    with pytest.raises(ValueError, match="num_classes"):
        MultiLabelMetrics(0)
    with pytest.raises(ValueError, match="class_names"):
        MultiLabelMetrics(3, class_names=["a", "b"])
    with pytest.raises(ValueError, match="threshold"):
        MultiLabelMetrics(3, threshold=1.5)
    with pytest.raises(TypeError, match="threshold"):
        MultiLabelMetrics(3, threshold="0.5")


@pytest.mark.parametrize(
    ("logits", "targets", "ids", "error", "match"),
    [
        (torch.zeros(4), torch.zeros(4), None, ValueError, "logits must have shape"),
        (torch.zeros(2, 3, 1), torch.zeros(2, 3, 1), None, ValueError, "logits must have shape"),
        (torch.zeros(2, 4), torch.zeros(2, 4), None, ValueError, "num_classes=3"),
        (torch.zeros(2, 3), torch.zeros(3, 3), None, ValueError, "targets must have shape"),
        (torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3), None, TypeError, "logits must have a floating"),
        (torch.tensor([[0.0, float("nan"), 0.0]]), torch.zeros(1, 3), None, ValueError, "logits must be finite"),
        (torch.tensor([[0.0, float("inf"), 0.0]]), torch.zeros(1, 3), None, ValueError, "logits must be finite"),
        (torch.zeros(1, 3), torch.tensor([[0.0, 0.5, 1.0]]), None, ValueError, "targets must be 0 or 1"),
        (torch.zeros(1, 3), torch.tensor([[0, -1, 1]]), None, ValueError, "targets must be 0 or 1"),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, dtype=torch.int64), ValueError, "sample_ids"),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 1, dtype=torch.int64), ValueError, "sample_ids"),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), TypeError, "sample_ids"),
        ([[0.0, 0.0, 0.0]], torch.zeros(1, 3), None, TypeError, "logits"),
    ],
)
def test_update_validation(logits, targets, ids, error, match):
    metrics = MultiLabelMetrics(3)
    with pytest.raises(error, match=match):
        metrics.update(logits, targets, ids)


def test_update_mixing_ids_and_no_ids_raises():
    metrics = MultiLabelMetrics(2)
    metrics.update(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0]))
    with pytest.raises(ValueError, match="sample_ids"):
        metrics.update(torch.zeros(1, 2), torch.zeros(1, 2))


def test_average_precision_validation():
    with pytest.raises(ValueError, match="scores must have shape"):
        average_precision(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="targets must have the same shape"):
        average_precision(np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError, match="scores must be finite"):
        average_precision(np.array([0.0, np.nan]), np.array([0, 1]))
    with pytest.raises(ValueError, match="targets must contain only 0 and 1"):
        average_precision(np.array([0.0, 1.0]), np.array([0, 2]))
    with pytest.raises(ValueError, match="N >= 1"):
        average_precision_per_class(np.zeros((0, 2)), np.zeros((0, 2)))


# ----------------------------------------------------------------------------- per-scale recall
def _scale_case():
    # Two images, original sizes (w, h) = (200, 100) and (50, 50), resized to 100 x 100.
    probs = np.array([[0.9, 0.1, 0.6], [0.2, 0.7, 0.4]], dtype=np.float32)
    boxes = [
        np.array([[0, 0, 20, 10], [10, 10, 110, 35], [0, 0, 2, 1]], dtype=np.float32),
        np.array([[0, 0, 6, 6], [5, 5, 45, 45]], dtype=np.float32),
    ]
    # image 0: scales x 0.5, y 1.0 -> 10x10 -> 10 px; 50x25 -> sqrt(1250) = 35.36 px; 1x1 -> 1 px
    # image 1: scales x 2, y 2 -> 12x12 -> 12 px; 80x80 -> 80 px
    box_classes = [np.array([0, 1, 2]), np.array([1, 2])]
    sizes = np.array([[200, 100], [50, 50]])
    return probs, boxes, box_classes, sizes


def test_per_scale_recall_hand_made():
    probs, boxes, box_classes, sizes = _scale_case()
    table = per_scale_recall(probs, boxes, box_classes, sizes, img_size=100, bin_px=10, threshold=0.5)
    assert len(table) == 9  # bins 0..8 (80 px falls into [80, 90))
    by_bin = {row["bin_lo"]: row for row in table}
    # bin [0,10): 1 px object of class 2 in image 0 (p=0.6) -> found
    assert (by_bin[0]["objects"], by_bin[0]["found"], by_bin[0]["recall"]) == (1, 1, 100.0)
    # bin [10,20): 10 px class 0 image 0 (0.9, found), 12 px class 1 image 1 (0.7, found)
    assert (by_bin[10]["objects"], by_bin[10]["found"]) == (2, 2)
    # bin [30,40): 35.4 px class 1 image 0 (0.1) -> missed
    assert (by_bin[30]["objects"], by_bin[30]["found"], by_bin[30]["recall"]) == (1, 0, 0.0)
    # bin [80,90): class 2 image 1 (0.4) -> missed
    assert (by_bin[80]["objects"], by_bin[80]["found"]) == (1, 0)
    assert by_bin[20]["objects"] == 0 and math.isnan(by_bin[20]["recall"])
    assert sum(row["objects"] for row in table) == 5
    assert (by_bin[10]["bin_lo"], by_bin[10]["bin_hi"]) == (10, 20)

    # A lower threshold finds the 0.4 object; wider bins merge rows.
    table = per_scale_recall(probs, boxes, box_classes, sizes, img_size=100, bin_px=50, threshold=0.4)
    assert [(r["objects"], r["found"]) for r in table] == [(4, 3), (1, 1)]
    # (h, w) resolution: 100 x 200 doubles widths -> the 1x1 object becomes 2x1 = 1.41 px
    table = per_scale_recall(probs, boxes, box_classes, sizes, img_size=(100, 200), bin_px=1000)
    assert table[0]["objects"] == 5


def test_per_scale_recall_validation():
    probs, boxes, box_classes, sizes = _scale_case()
    with pytest.raises(ValueError, match="probs must lie in"):
        per_scale_recall(probs * 3, boxes, box_classes, sizes, 100)
    with pytest.raises(ValueError, match="boxes must hold"):
        per_scale_recall(probs, boxes[:1], box_classes, sizes, 100)
    with pytest.raises(ValueError, match=r"box_classes\[1\] must lie in"):
        per_scale_recall(probs, boxes, [box_classes[0], np.array([1, 3])], sizes, 100)
    with pytest.raises(ValueError, match=r"boxes\[0\] must be \(x1, y1, x2, y2\)"):
        per_scale_recall(probs, [boxes[0][:, [2, 1, 0, 3]], boxes[1]], box_classes, sizes, 100)
    with pytest.raises(ValueError, match="image_sizes"):
        per_scale_recall(probs, boxes, box_classes, sizes[:, :1], 100)
    with pytest.raises(ValueError, match="bin_px"):
        per_scale_recall(probs, boxes, box_classes, sizes, 100, bin_px=0)
    with pytest.raises(ValueError, match="img_size"):
        per_scale_recall(probs, boxes, box_classes, sizes, (100,))


def test_format_and_plot_scale_recall(tmp_path):
    probs, boxes, box_classes, sizes = _scale_case()
    vanilla = per_scale_recall(probs, boxes, box_classes, sizes, img_size=100)
    mskd = per_scale_recall(np.minimum(probs + 0.2, 1.0), boxes, box_classes, sizes, img_size=100)
    text = format_scale_recall(vanilla)
    lines = text.strip().splitlines()
    assert lines[0].startswith("| sqrt(area) px")
    assert "| [10, 20) | 2 | 2 | 100.00 |" in lines
    assert "| [20, 30) | 0 | 0 | - |" in lines
    assert lines[-1] == "| all | 5 | 3 | 60.00 |"
    path = tmp_path / "scale_recall.png"
    plot_scale_recall({"vanilla": vanilla, "MSKD": mskd}, path)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp_")]
    with pytest.raises(FileNotFoundError):
        plot_scale_recall({"vanilla": vanilla}, tmp_path / "missing" / "plot.png")


# ----------------------------------------------------------------------------- CUDA (deferred value checks)
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_inputs_match_cpu_and_defer_value_checks():
    rng = np.random.default_rng(13)
    logits, targets = _random_case(rng, 64, 4)
    cpu = MultiLabelMetrics(4)
    cpu.update(logits, targets, np.arange(64))
    gpu = MultiLabelMetrics(4)
    gpu.update(torch.from_numpy(logits).cuda(), torch.from_numpy(targets).cuda(), torch.arange(64).cuda())
    _assert_results_equal(cpu.compute(), gpu.compute())
    bad = MultiLabelMetrics(4)
    bad_logits = torch.from_numpy(logits).cuda()
    bad_logits[3, 1] = float("nan")
    bad.update(bad_logits, torch.from_numpy(targets).cuda(), torch.arange(64).cuda())  # no host sync here
    with pytest.raises(ValueError, match=r"logits must be finite; in update\(\) call #1 row 3"):
        bad.compute()


# ----------------------------------------------------------------------------- DDP (2 gloo processes)
def _sync_case():
    rng = np.random.default_rng(21)
    n, c = 53, 6
    logits, targets = _random_case(rng, n, c, quantise=2.0, empty_classes=(4,))
    # rank 0 gets 0..29 in two batches, rank 1 gets 30..52, a wrap-around duplicate of 0..2 and padding
    shards = {
        0: [np.arange(0, 16), np.arange(16, 30)],
        1: [np.arange(30, 50), np.concatenate([np.arange(50, n), np.arange(0, 3), [-1, -1]])],
    }
    return logits, targets, shards


def _sync_worker(rank, world_size, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        logits, targets, shards = _sync_case()
        keyed = MultiLabelMetrics(logits.shape[1])
        anonymous = MultiLabelMetrics(logits.shape[1])
        for ids in shards[rank]:
            rows = np.where(ids >= 0, ids, 0)
            keyed.update(torch.from_numpy(logits[rows]), torch.from_numpy(targets[rows]), torch.from_numpy(ids))
        for ids in shards[rank]:
            unique = ids[(ids >= 0) & ~((rank == 1) & (ids < 3))]  # anonymous rows must be unique upfront
            anonymous.update(logits[unique], targets[unique])
        keyed.sync()
        anonymous.sync()
        keyed.sync()  # idempotent
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump({"keyed": keyed.compute(), "anonymous": anonymous.compute(),
                         "ids": keyed.state()["sample_ids"].tolist()}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sync_two_gloo_processes_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_sync_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    logits, targets, _ = _sync_case()
    single = MultiLabelMetrics(logits.shape[1])
    single.update(logits, targets, np.arange(logits.shape[0]))
    expected = single.compute()
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.pkl", "rb") as f:
            got = pickle.load(f)
        assert got["ids"] == list(range(logits.shape[0]))
        _assert_results_equal(expected, got["keyed"])
        for key in SCALAR_KEYS:  # anonymous rows arrive in rank order: same samples, different order
            assert got["anonymous"][key] == pytest.approx(expected[key], abs=1e-9), key
        assert got["anonymous"]["num_samples"] == logits.shape[0]
