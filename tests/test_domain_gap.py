"""The domain-gap report: its distances against direct computations on raw features, leave-one-out by
subtraction, the flags on real photographs through the real frozen backbone, and refused inputs."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from rich.console import Console
from torchvision.transforms.v2 import functional as TF

from fedtune.backbones import build_model, preprocessing_for
from fedtune.data.sources import load_split
from fedtune.domain_gap import (
    GAP_JSON,
    GAP_PNG,
    LABEL_SKEW_THRESHOLD,
    class_conditional_shift,
    coral_distance,
    domain_gap,
    frechet_distance,
    hellinger,
    jensen_shannon,
    mmd2_linear,
    without,
)
from fedtune.domain_gap_view import print_gap_report, write_gap_report
from fedtune.transferability import FeatureStatistics


def _features(seed: int, n: int, dims: int, *, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dims, dims)) / math.sqrt(dims)
    return rng.normal(size=(n, dims)) @ mixing + 0.5 + shift


def _stats(features: np.ndarray, labels: np.ndarray | None = None, classes: int = 2) -> FeatureStatistics:
    labels = np.zeros(len(features), dtype=int) if labels is None else labels
    return FeatureStatistics.of(features, labels, num_classes=classes)


def _direct_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """FID's formula on raw features, with scipy's general matrix square root."""
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(ca @ cb).real
    return float(np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca) + np.trace(cb) - 2 * np.trace(root))


def test_feature_distances_from_statistics_equal_their_definitions_on_raw_features() -> None:
    a, b = _features(0, 80, 6), _features(1, 50, 6, shift=0.3)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)

    assert frechet_distance(_stats(a), _stats(b)) == pytest.approx(_direct_frechet(a, b), abs=1e-6)
    assert coral_distance(_stats(a), _stats(b)) == pytest.approx(np.sum((ca - cb) ** 2) / (4 * 6**2), abs=1e-9)
    assert mmd2_linear(_stats(a), _stats(b)) == pytest.approx(np.sum((a.mean(0) - b.mean(0)) ** 2), abs=1e-9)
    # The linear-kernel MMD^2 is the mean of the kernel over pairs, within minus across (the V-statistic).
    kernel_mmd = (a @ a.T).mean() + (b @ b.T).mean() - 2 * (a @ b.T).mean()
    assert mmd2_linear(_stats(a), _stats(b)) == pytest.approx(kernel_mmd, abs=1e-9)
    assert frechet_distance(_stats(a), _stats(a)) == pytest.approx(0.0, abs=1e-6)


def test_frechet_with_fewer_examples_than_dimensions_is_exact_for_the_singular_covariances() -> None:
    # N < D: singular covariances, where a general sqrtm is unreliable. Directly: C = X X^T / (n - 1)
    # for centred X (D x n), and tr((C_a^1/2 C_b C_a^1/2)^1/2) is the nuclear norm of X_a^T X_b / sqrt(...).
    a, b = _features(2, 7, 20), _features(3, 9, 20, shift=0.2)
    xa, xb = (a - a.mean(0)).T / math.sqrt(len(a) - 1), (b - b.mean(0)).T / math.sqrt(len(b) - 1)
    nuclear = np.linalg.svd(xa.T @ xb, compute_uv=False).sum()
    expected = (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.sum(xa**2) + np.sum(xb**2) - 2 * nuclear)
    assert frechet_distance(_stats(a), _stats(b)) == pytest.approx(expected, abs=1e-6)
    assert frechet_distance(_stats(b), _stats(a)) == pytest.approx(expected, abs=1e-6)  # symmetric


def test_label_distances_by_definition() -> None:
    single, balanced = np.array([1.0, 0.0]), np.array([0.5, 0.5])
    assert hellinger(single, balanced) == pytest.approx(0.5412, abs=1e-4)  # the threshold's reference case
    assert hellinger(single, balanced) >= LABEL_SKEW_THRESHOLD
    p, q = np.array([0.2, 0.5, 0.3]), np.array([0.4, 0.1, 0.5])
    assert hellinger(p, q) == pytest.approx(np.linalg.norm(np.sqrt(p) - np.sqrt(q)) / math.sqrt(2), abs=1e-12)
    m = (p + q) / 2
    divergence = (np.sum(p * np.log2(p / m)) + np.sum(q * np.log2(q / m))) / 2
    assert jensen_shannon(p, q) == pytest.approx(math.sqrt(divergence), abs=1e-12)
    assert jensen_shannon(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(1.0)


def _synthetic_federation(seed: int = 5, *, dims: int = 8) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Five clients drawing from the same two class-conditional distributions (two single-class: label
    skew only), and client "moved" whose features are shifted (covariate shift)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(2, dims)) * 2

    def draw(counts: tuple[int, int], shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        labels = np.repeat([0, 1], counts)
        return centres[labels] + rng.normal(size=(len(labels), dims)) + shift, labels

    return {"ants-only": draw((30, 0)), "bees-only": draw((0, 30)), "mixed-1": draw((15, 15)),
            "mixed-2": draw((20, 10)), "moved": draw((10, 20), shift=1.5), "mixed-3": draw((12, 18))}


def test_leave_one_out_by_subtraction_equals_the_rest_computed_directly() -> None:
    raw = _synthetic_federation()
    clients = {name: _stats(f, y) for name, (f, y) in raw.items()}
    report = domain_gap(clients, class_names=["ants", "bees"])
    total = sum(clients.values(), _stats(np.zeros((0, 8))))
    for client in report.clients:
        rest = [name for name in raw if name != client.name]
        rest_features = np.concatenate([raw[n][0] for n in rest])
        rest_stats = _stats(rest_features, np.concatenate([raw[n][1] for n in rest]))
        mine = clients[client.name]
        np.testing.assert_allclose(without(total, mine).gram, rest_stats.gram, atol=1e-9)
        assert client.vs_rest.frechet == pytest.approx(_direct_frechet(raw[client.name][0], rest_features), abs=1e-6)
        assert client.vs_rest.coral == pytest.approx(coral_distance(mine, rest_stats), abs=1e-9)
        assert client.vs_rest.mmd2_linear == pytest.approx(mmd2_linear(mine, rest_stats), abs=1e-9)
        direct_shift = class_conditional_shift(mine, rest_stats, unit=report.within_variance)
        assert client.vs_rest.class_shift.squared == pytest.approx(direct_shift.squared, abs=1e-9)


def test_pairwise_matrices_equal_the_distances_of_each_pair() -> None:
    raw = _synthetic_federation()
    clients = {name: _stats(f, y) for name, (f, y) in raw.items()}
    report = domain_gap(clients, class_names=["ants", "bees"])
    names = list(raw)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i == j:
                continue
            assert report.pairwise["frechet"][i, j] == pytest.approx(_direct_frechet(raw[a][0], raw[b][0]), abs=1e-6)
            assert report.pairwise["coral"][i, j] == pytest.approx(coral_distance(clients[a], clients[b]), abs=1e-9)
            assert report.pairwise["mmd2_linear"][i, j] == pytest.approx(mmd2_linear(clients[a], clients[b]))
    # Two single-class clients of different classes share no class: no class-conditional distance.
    assert math.isnan(report.pairwise["class_conditional_shift"][0, 1])


def test_class_conditional_shift_is_its_definition_on_raw_features() -> None:
    raw = _synthetic_federation()
    (fa, ya), (fb, yb) = raw["mixed-2"], raw["moved"]
    shift = class_conditional_shift(_stats(fa, ya), _stats(fb, yb))

    def within(f: np.ndarray, y: np.ndarray) -> tuple[float, int]:
        """Trace of the scatter around the class means, and its degrees of freedom."""
        return sum(float(np.sum((f[y == k] - f[y == k].mean(0)) ** 2)) for k in (0, 1)), len(f) - 2

    (sa, da), (sb, db) = within(fa, ya), within(fb, yb)
    unit = (sa + sb) / (da + db)
    squared = {}
    for k in (0, 1):
        na, nb = np.sum(ya == k), np.sum(yb == k)
        distance = np.sum((fa[ya == k].mean(0) - fb[yb == k].mean(0)) ** 2)
        squared[k] = (distance - (sa / da) / na - (sb / db) / nb) / unit
    expected = (np.sum(ya == 0) * squared[0] + np.sum(ya == 1) * squared[1]) / len(ya)
    assert shift.squared == pytest.approx(expected, abs=1e-9)
    assert shift.shift == pytest.approx(math.sqrt(max(expected, 0)), abs=1e-9)
    assert shift.by_class_squared == pytest.approx(squared, abs=1e-9)


def test_label_skew_and_covariate_shift_are_told_apart() -> None:
    raw = _synthetic_federation()
    report = domain_gap({name: _stats(f, y) for name, (f, y) in raw.items()}, class_names=["ants", "bees"])
    by_name = {c.name: c for c in report.clients}

    assert report.flagged("label_skew") == ["ants-only", "bees-only"]
    assert report.flagged("feature_shift") == ["moved"]
    # The marginal distances of the single-class clients are large too (their labels differ), which
    # is why the flag does not use them.
    assert by_name["ants-only"].vs_rest.mmd2_linear > by_name["mixed-1"].vs_rest.mmd2_linear
    assert by_name["ants-only"].missing_classes == [1]
    reason = next(f.reason for f in by_name["moved"].flags)
    assert reason.startswith("moved: feature shift") and "within-class SDs" in reason


# ---------------------------------------------------------------------------------------------
# Real photographs through the real frozen backbone
# ---------------------------------------------------------------------------------------------

# 6 clients of the ants/bees photos (ants, bees): two single-class (label skew), four mixed; "c4" is corrupted.
_PLAN = {"c0": (12, 0), "c1": (0, 12), "c2": (6, 6), "c3": (8, 4), "c4": (4, 8), "c5": (6, 6)}
_SIZE = 64  # px: Lite0 at 64 px costs ~2 ms an image on a CPU


def _invert(image: torch.Tensor) -> torch.Tensor:
    return 255 - image  # uint8 (C, H, W), before preprocessing


def _blur(image: torch.Tensor) -> torch.Tensor:
    # After resizing, so the blur is of the same strength in every photo: sigma 4 px at 64 px.
    return TF.gaussian_blur(image, kernel_size=[33, 33], sigma=[4.0, 4.0])


# Colour inversion barely moves Lite0's final pooled features (cosine 0.75-0.95 between a photo's
# features and its inverse's, 0.2-0.4 between two photos; ImageNet's top-1 class is mostly kept),
# so its shift is measured after blocks_3, where colour is still seen (0.75 within-class SDs; 0.12
# with the pooled features, under the noise of 12 photos). Blur moves the final features.
@pytest.mark.parametrize(("corruption", "cut", "before_preprocessing"), [
    (_invert, "blocks_3", True), (_blur, None, False)], ids=["inverted@blocks_3", "blurred"])
def test_a_client_with_corrupted_photos_is_flagged_by_feature_shift_and_single_class_ones_by_label_skew(
        hymenoptera_root: Path, corruption, cut: str | None, before_preprocessing: bool) -> None:
    torch.manual_seed(0)
    photos = load_split("hymenoptera", "train", root=str(hymenoptera_root), download=False, seed=0)
    model = build_model("efficientnet_lite0", num_classes=2, weights="imagenet", cut=cut).eval()
    transform = preprocessing_for("efficientnet_lite0").at_size(_SIZE).transform()
    labels = np.array(photos.targets)
    rng = np.random.default_rng(0)
    pools = [list(rng.permutation(np.flatnonzero(labels == k))) for k in (0, 1)]

    clients = {}
    for name, counts in _PLAN.items():
        chosen = [int(pools[k].pop()) for k in (0, 1) for _ in range(counts[k])]
        images = []
        for index in chosen:
            image, _ = photos[index]
            corrupt = name == "c4"
            image = transform(corruption(image) if corrupt and before_preprocessing else image)
            images.append(corruption(image) if corrupt and not before_preprocessing else image)
        with torch.no_grad():
            features = model.forward_stages(torch.stack(images), 0, model.stage_index("head"))
        clients[name] = FeatureStatistics.of(features.double().numpy(), labels[chosen], num_classes=2)

    report = domain_gap(clients, class_names=photos.classes)

    shifts = {c.name: round(c.vs_rest.class_shift.shift or 0.0, 2) for c in report.clients}
    print(f"class-conditional shift vs the rest ({corruption.__name__}, cut {cut}): {shifts}, "
          f"threshold {report.shift_threshold:.2f}; Fréchet vs rest: "
          f"{ {c.name: round(c.vs_rest.frechet) for c in report.clients} }")
    assert report.flagged("feature_shift") == ["c4"]
    assert report.flagged("label_skew") == ["c0", "c1"]


# ---------------------------------------------------------------------------------------------
# What is written and shown
# ---------------------------------------------------------------------------------------------


def test_the_report_writes_strict_json_and_a_heatmap(tmp_path: Path) -> None:
    raw = _synthetic_federation()
    clients = {name: _stats(f, y) for name, (f, y) in raw.items()}
    reference = _stats(*_synthetic_federation(seed=9)["mixed-1"])
    report = domain_gap(clients, class_names=["ants", "bees"], reference=reference)

    written = write_gap_report(report, tmp_path / "gap")

    assert [p.name for p in written] == [GAP_JSON, GAP_PNG]
    data = json.loads((tmp_path / "gap" / GAP_JSON).read_text(), parse_constant=lambda c: pytest.fail(c))
    moved = next(c for c in data["clients"] if c["name"] == "moved")
    assert moved["flags"][0]["kind"] == "feature_shift" and moved["vs_reference"]["frechet"] > 0
    assert data["clients"][0]["class_counts"] == {"ants": 30, "bees": 0}
    assert data["clients"][0]["missing_classes"] == ["bees"]
    assert data["pairwise"]["class_conditional_shift"][0][1] is None  # no shared class: null, not NaN
    assert data["rules"]["label_skew"]["threshold"] == LABEL_SKEW_THRESHOLD
    assert data["kernel"].startswith("linear")
    assert data["federation"]["examples"] == 180 and data["reference"]["examples"] == 30
    assert (tmp_path / "gap" / GAP_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in (tmp_path / "gap").iterdir() if p.name.startswith(".")]  # no temp files left


def test_a_hundred_clients_are_drawn_and_printed(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    clients = {}
    for i in range(100):
        labels = rng.integers(0, 10, 12)
        clients[f"client-{i:03d}"] = _stats(rng.normal(size=(12, 5)) + (3.0 if i == 42 else 0.0), labels, 10)
    report = domain_gap(clients, class_names=[f"digit {d}" for d in range(10)])
    assert "client-042" in report.flagged("feature_shift")
    write_gap_report(report, tmp_path)
    assert (tmp_path / GAP_PNG).stat().st_size > 10_000

    out = io.StringIO()
    print_gap_report(report, console=Console(file=out, width=200))
    text = out.getvalue()
    assert "client-042" in text and "\nclient-042: feature shift" in text


# ---------------------------------------------------------------------------------------------
# Refused inputs
# ---------------------------------------------------------------------------------------------


def _good() -> FeatureStatistics:
    return _stats(_features(7, 10, 4), np.array([0, 1] * 5))


def _with(stats: FeatureStatistics, **parts: np.ndarray) -> FeatureStatistics:
    """Statistics as a peer could decode them, without FeatureStatistics' own checks at construction."""
    forged = object.__new__(FeatureStatistics)
    forged.__dict__.update(class_sums=stats.class_sums, class_counts=stats.class_counts, factor=None, null_dims=0,
                           _gram=stats.gram)
    forged.__dict__.update({("_gram" if name == "gram" else name): value for name, value in parts.items()})
    return forged


@pytest.mark.parametrize(("bad", "problem"), [
    (_stats(_features(7, 10, 6), np.array([0, 1] * 5)), r"client 'b': statistics of 2 classes x 6 feature "
                                                         r"dimensions, but the report has 2 classes x 4"),
    (_stats(_features(7, 10, 4), np.array([0, 1] * 5), classes=3), "client 'b': statistics of 3 classes"),
    (_stats(np.zeros((0, 4)), np.zeros(0, dtype=int)), "client 'b' has 0 examples"),
    (_with(_good(), gram=np.full((4, 4), np.nan)), "client 'b': gram holds a NaN"),
    (_with(_good(), class_counts=np.array([5.0, -1.0])), "client 'b': class counts must be whole numbers"),
    (_with(_good(), class_counts=np.array([5.5, 4.5])), "client 'b': class counts must be whole numbers"),
    (_with(_good(), gram=_good().gram + np.triu(np.ones((4, 4)), 1)), "client 'b': the Gram matrix is not symmetric"),
    (_with(_good(), gram=_good().gram * 0.01), "client 'b': the Gram matrix, class sums and counts are inconsistent"),
    # Off the diagonal only, so each dimension's spread stays possible, but no covariance is that correlated.
    (_with(_good(), gram=_good().gram + 10 * np.abs(_good().gram).max() * np.array(
        [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])),
     "client 'b': the Gram matrix and the feature sums are inconsistent"),
    (_with(_good(), gram=_good().gram * 1e300, class_sums=_good().class_sums * 1e160), "client 'b': its statistics "
                                                                                       "overflow"),
    ("not statistics", "client 'b': expected FeatureStatistics, got str"),
])
def test_statistics_that_cannot_be_compared_are_refused_naming_the_client(bad: FeatureStatistics,
                                                                          problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        domain_gap({"a": _good(), "b": bad, "c": _good()}, class_names=["x", "y"])


def test_a_federation_of_one_a_bad_reference_and_repeated_class_names_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 2 clients"):
        domain_gap({"a": _good()}, class_names=["x", "y"])
    with pytest.raises(ValueError, match="reference set: statistics of 2 classes x 6"):
        domain_gap({"a": _good(), "b": _good()}, class_names=["x", "y"],
                   reference=_stats(_features(1, 10, 6), np.array([0, 1] * 5)))
    with pytest.raises(ValueError, match="class names must be distinct"):
        domain_gap({"a": _good(), "b": _good()}, class_names=["x", "x"])
