"""LogME and H-score from sufficient statistics: against direct computations on the raw data, and
federated sums equal to the pooled statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.covariance import OAS

from fedtune.statistics_protocol import gram_factor
from fedtune.transferability import FeatureStatistics, h_score, logme, logme_by_class, shrunk_h_score


def _task(seed: int, *, n: int = 120, dims: int = 6, classes: int = 3, signal: float = 2.0) -> tuple:
    """Features whose class shifts their mean by `signal` along a few directions, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, dims)) * signal
    return centres[labels] + rng.normal(size=(n, dims)), labels


def _direct_evidence(features: np.ndarray, target: np.ndarray, alpha: float, beta: float) -> float:
    """log p(y | F, alpha, beta) / N of Bayesian linear regression y = F w + noise, w ~ N(0, I / alpha),
    noise ~ N(0, I / beta), written out on the raw data (Bishop, PRML eq. 3.86)."""
    n, dims = features.shape
    precision = alpha * np.eye(dims) + beta * features.T @ features
    mean = beta * np.linalg.solve(precision, features.T @ target)
    residual = float(np.sum((target - features @ mean) ** 2))
    log_det = np.linalg.slogdet(precision)[1]
    evidence = (dims / 2 * math.log(alpha) + n / 2 * math.log(beta) - beta / 2 * residual
                - alpha / 2 * float(mean @ mean) - log_det / 2 - n / 2 * math.log(2 * math.pi))
    return evidence / n


@pytest.mark.parametrize("shape", [(120, 6), (8, 20)])  # more examples than dimensions, and fewer
def test_logme_from_statistics_is_the_evidence_of_the_raw_data_at_its_maximum(shape: tuple[int, int]) -> None:
    n, dims = shape
    features, labels = _task(0, n=n, dims=dims)
    fits = logme_by_class(FeatureStatistics.of(features, labels, num_classes=3))
    for k, fit in enumerate(fits):
        target = (labels == k).astype(np.float64)
        assert fit.evidence == pytest.approx(_direct_evidence(features, target, fit.alpha, fit.beta), rel=1e-9)
        # Evidence maximisation: moving either precision away lowers the evidence. With fewer examples
        # than dimensions the features fit every label exactly and the evidence keeps rising with
        # the noise precision beta: the iteration stops at its tolerance, so only alpha is checked.
        for factor in (0.8, 1.25):
            assert _direct_evidence(features, target, fit.alpha * factor, fit.beta) < fit.evidence
            if n > dims:
                assert _direct_evidence(features, target, fit.alpha, fit.beta * factor) < fit.evidence
    assert logme(FeatureStatistics.of(features, labels, num_classes=3)) == pytest.approx(
        np.mean([fit.evidence for fit in fits]))


def test_h_score_from_statistics_equals_its_definition_on_the_raw_data() -> None:
    features, labels = _task(1)
    covariance = np.cov(features, rowvar=False, bias=True)
    conditional = np.stack([features[labels == k].mean(0) for k in labels])  # E[f | y] of each example
    between = np.cov(conditional, rowvar=False, bias=True)
    expected = float(np.trace(np.linalg.pinv(covariance) @ between))
    assert h_score(FeatureStatistics.of(features, labels, num_classes=3)) == pytest.approx(expected, rel=1e-9)


def test_a_federation_of_clients_scores_exactly_as_the_pooled_data() -> None:
    features, labels = _task(2, n=300, dims=10, classes=4)
    pooled = FeatureStatistics.of(features, labels, num_classes=4)
    # Three clients of unequal sizes, one of them holding a single class (label skew).
    order = np.argsort(labels, kind="stable")
    parts = np.split(order, [40, 190])
    federated = sum((FeatureStatistics.of(features[p], labels[p], num_classes=4) for p in parts[1:]),
                    FeatureStatistics.of(features[parts[0]], labels[parts[0]], num_classes=4))
    np.testing.assert_allclose(federated.gram, pooled.gram, rtol=1e-12)
    assert logme(federated) == pytest.approx(logme(pooled), abs=1e-6)
    assert h_score(federated) == pytest.approx(h_score(pooled), abs=1e-6)


def test_features_that_carry_the_label_score_above_features_that_do_not() -> None:
    informative, labels = _task(3, signal=3.0)
    noise = np.random.default_rng(4).normal(size=informative.shape)
    good = FeatureStatistics.of(informative, labels, num_classes=3)
    useless = FeatureStatistics.of(noise, labels, num_classes=3)
    assert logme(good) > logme(useless)
    assert h_score(good) > h_score(useless)
    assert h_score(good) <= 3 - 1 + 1e-9  # at most classes - 1


@pytest.mark.parametrize(("features", "labels", "problem"), [
    (np.ones((4, 3)), np.array([0, 1, 2, 3]), r"labels must lie in \[0, 3\)"),
    (np.ones((4, 3)), np.array([0, 1, -1, 2]), r"labels must lie in \[0, 3\)"),
    (np.ones((4, 3)), np.array([0, 1]), "features must be N x D and labels N"),
    (np.full((2, 3), np.nan), np.array([0, 1]), "factor holds a NaN or infinite value"),  # 2 < 3: F is the factor
    (np.full((4, 3), np.nan), np.array([0, 1, 2, 0]), "gram holds a NaN or infinite value"),
])
def test_statistics_of_impossible_data_are_refused(features: np.ndarray, labels: np.ndarray, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        FeatureStatistics.of(features, labels, num_classes=3)


def test_statistics_of_different_shapes_do_not_pool_and_too_few_examples_are_refused() -> None:
    one = FeatureStatistics.of(np.ones((3, 2)), np.array([0, 1, 1]), num_classes=2)
    other = FeatureStatistics.of(np.ones((3, 4)), np.array([0, 1, 1]), num_classes=2)
    with pytest.raises(ValueError, match="cannot pool statistics"):
        one + other
    single = FeatureStatistics.of(np.ones((1, 2)), np.array([0]), num_classes=2)
    with pytest.raises(ValueError, match="at least 2 examples"):
        logme(single)
    with pytest.raises(ValueError, match="at least 2 examples"):
        h_score(single)


def test_shrunk_h_score_equals_its_definition_with_scikit_learns_oas() -> None:
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 3, 40)
    features = rng.normal(size=(40, 60)) + labels[:, None] * rng.normal(size=60)  # N < D
    oas = OAS(store_precision=False).fit(features)
    class_means = np.stack([features[labels == k].mean(0) for k in range(3)])
    centred = class_means - features.mean(0)
    shares = np.bincount(labels, minlength=3) / len(labels)
    between = (centred.T * shares) @ centred
    expected = np.trace(np.linalg.inv(oas.covariance_) @ ((1 - oas.shrinkage_) * between))

    stats = FeatureStatistics.of(features, labels, num_classes=3)
    assert shrunk_h_score(stats) == pytest.approx(expected, rel=1e-9)
    halves = [FeatureStatistics.of(features[part], labels[part], num_classes=3)
              for part in (slice(0, 13), slice(13, 40))]
    assert shrunk_h_score(halves[0] + halves[1]) == pytest.approx(shrunk_h_score(stats), abs=1e-6)


def test_shrunk_h_score_tells_features_apart_where_the_plain_score_saturates() -> None:
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 2, 30)
    useless = FeatureStatistics.of(rng.normal(size=(30, 100)), labels, num_classes=2)
    good = FeatureStatistics.of(rng.normal(size=(30, 100)) + 3 * labels[:, None], labels, num_classes=2)

    assert h_score(useless) == pytest.approx(1.0) and h_score(good) == pytest.approx(1.0)  # N < D: saturated
    assert shrunk_h_score(good) > 5 * shrunk_h_score(useless)
    constant = FeatureStatistics.of(np.ones((4, 3)), np.array([0, 1, 0, 1]), num_classes=2)
    with pytest.raises(ValueError, match="do not vary"):
        shrunk_h_score(constant)


def test_centred_statistics_are_the_statistics_of_the_centred_features_and_pool_like_them() -> None:
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 3, 50)
    features = rng.normal(loc=4.0, size=(50, 6)) + labels[:, None]  # a large common mean, as after a ReLU
    direct = FeatureStatistics.of(features - features.mean(0), labels, num_classes=3)

    pooled = FeatureStatistics.of(features[:20], labels[:20], num_classes=3) + FeatureStatistics.of(
        features[20:], labels[20:], num_classes=3)
    centred = pooled.centred()

    np.testing.assert_allclose(centred.gram, direct.gram, atol=1e-9)
    np.testing.assert_allclose(centred.class_sums, direct.class_sums, atol=1e-9)
    assert logme(centred) == pytest.approx(logme(direct), abs=1e-9)
    with pytest.raises(ValueError, match="no examples"):
        FeatureStatistics.of(np.zeros((0, 2)), np.zeros(0, dtype=int), num_classes=2).centred()


def _factored(features: np.ndarray, labels: np.ndarray, *, num_classes: int) -> FeatureStatistics:
    """A client's statistics as the server keeps them when the Gram matrix came as its factor."""
    stats = FeatureStatistics.of(features, labels, num_classes=num_classes)
    return FeatureStatistics(class_sums=stats.class_sums, class_counts=stats.class_counts, factor=gram_factor(features))


def test_scores_in_the_span_of_the_clients_factors_equal_the_scores_in_every_dimension() -> None:
    rng = np.random.default_rng(8)
    dims, classes = 60, 4
    clients = []
    for size in (7, 12, 3, 20):  # fewer examples than dimensions: each sends a factor
        labels = rng.integers(0, classes, size)
        features = rng.normal(loc=2.0, size=(size, dims)) + labels[:, None] * 0.5  # a common mean, as after a ReLU
        clients.append(_factored(features, labels, num_classes=classes))
    pooled = sum(clients[1:], clients[0])
    assert pooled.factor is not None and pooled.factor.shape == (42, dims)
    reduced = pooled.in_span()
    assert reduced.gram.shape == (42, 42) and reduced.null_dims == dims - 42 and reduced.dims == dims
    for score in (logme, h_score, shrunk_h_score):
        assert score(reduced) == pytest.approx(score(pooled), rel=1e-9, abs=1e-9), score.__name__
        assert score(reduced.centred()) == pytest.approx(score(pooled.centred()), rel=1e-9, abs=1e-9), score.__name__
    # A client that sent its Gram matrix whole leaves no factor for the pool: scored in every dimension.
    raw = FeatureStatistics.of(rng.normal(size=(5, dims)), np.arange(5) % classes, num_classes=classes)
    whole = FeatureStatistics(gram=raw.gram, class_sums=raw.class_sums, class_counts=raw.class_counts)
    assert (pooled + whole).factor is None and (pooled + whole).in_span().gram.shape == (dims, dims)
    with pytest.raises(ValueError, match="its own basis"):
        reduced + reduced
    with pytest.raises(ValueError, match="Gram factor of shape"):
        FeatureStatistics(class_sums=pooled.class_sums, class_counts=pooled.class_counts, factor=np.ones((3, dims + 1)))


def test_pooled_factors_give_way_to_the_gram_matrix_once_they_reach_the_dimensions() -> None:
    rng = np.random.default_rng(9)
    parts = [_factored(rng.normal(size=(4, 10)), np.arange(4) % 2, num_classes=2) for _ in range(3)]
    two = parts[0] + parts[1]
    assert two.factor is not None and two.factor.shape == (8, 10)
    three = two + parts[2]  # 12 rows for 10 dimensions: kept as the matrix
    assert three.factor is None
    np.testing.assert_allclose(three.gram, sum(p.gram for p in parts[1:]) + parts[0].gram, rtol=1e-12)
