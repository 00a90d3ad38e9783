"""How well frozen features suit a labelled task, from sums a federation can add up: LogME and H-score.

Each client reduces its features F (N x D) and labels to `FeatureStatistics`: the Gram matrix F^T F,
each class's feature sum and its count. Sums of clients' statistics are the statistics of the pooled
data, so the server scores the whole federation without seeing a feature (and, under secure
aggregation, without seeing one client's statistics).

What the statistics reveal: the Gram matrix and the class sums are second and first moments of a
client's features (its label counts included); they are not the features, but a client with few
examples gives away much of them (with N <= D, F^T F determines F up to a rotation).

- LogME (You et al. 2021, "LogME: Practical Assessment of Pre-trained Models for Transfer
  Learning"): the log marginal evidence, per example, of a Bayesian linear regression from the
  features to each one-hot label column, with its prior and noise precisions (alpha, beta) set by
  evidence maximisation; averaged over the classes. Everything it needs is F^T F, F^T y (a class's
  feature sum) and y^T y (its count).
- H-score (Bao et al. 2019, "An Information-Theoretic Approach to Transferability in Task Transfer
  Learning"): tr(cov(f)^-1 cov(E[f | y])), the share of the features' variance that the class
  explains; and its shrunk form (Ibrahim et al. 2022), which stays meaningful with fewer examples
  than feature dimensions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# LogME's fixed-point iteration: the paper's own stopping rule (relative change of alpha / beta).
_LOGME_MAX_ITERATIONS = 100
_LOGME_TOLERANCE = 1e-3
# Eigenvalues below this share of the largest are treated as zero by the pseudo-inverse of H-score.
_RELATIVE_RANK_CUTOFF = 1e-10


class FeatureStatistics:
    """Sufficient statistics of (features, labels) for LogME and H-score; `+` pools two datasets.

    The Gram matrix F^T F (D x D) is given, or formed from a factor B of it (R x D, B^T B = F^T F)
    the first time it is read: the factors clients with fewer examples than dimensions send,
    stacked as statistics are pooled. Scored `in_span`, pooled factors never become a D x D matrix
    (on digits, 70 of them per selection were most of the server's work at a small --sample).
    """

    def __init__(self, *, class_sums: np.ndarray, class_counts: np.ndarray, gram: np.ndarray | None = None,
                 factor: np.ndarray | None = None, null_dims: int = 0) -> None:
        self.class_sums = class_sums  # K x D: the sum of the features of each class's examples
        self.class_counts = class_counts  # K: examples of each class
        self.factor = factor
        # Feature dimensions these statistics leave out, along which every feature is zero: statistics
        # `in_span` are written in a basis of the features' span (D - null_dims of the D dimensions).
        self.null_dims = null_dims
        self._gram = gram
        classes, dims = class_sums.shape
        if gram is None and factor is None:
            raise ValueError("feature statistics need a Gram matrix or a factor of one")
        if (gram is not None and gram.shape != (dims, dims)) or class_counts.shape != (classes,):
            raise ValueError(f"feature statistics of mismatched shapes: gram {None if gram is None else gram.shape}, "
                             f"class sums {class_sums.shape}, class counts {class_counts.shape}")
        if factor is not None and (factor.ndim != 2 or factor.shape[1] != dims):
            raise ValueError(f"feature statistics: a Gram factor of shape {factor.shape}, not (R, {dims})")
        for name, value in (("gram", gram), ("factor", factor), ("class_sums", class_sums),
                            ("class_counts", class_counts)):
            if value is not None and not np.all(np.isfinite(value)):
                raise ValueError(f"feature statistics: {name} holds a NaN or infinite value")
        if np.any(class_counts < 0):
            raise ValueError("feature statistics: a negative class count")
        if null_dims < 0:
            raise ValueError("feature statistics: a negative number of null dimensions")

    @property
    def gram(self) -> np.ndarray:
        """F^T F (D x D), formed from the factor on first use when it was not given."""
        if self._gram is None:
            assert self.factor is not None  # the constructor requires one of the two
            gram = self.factor.T @ self.factor
            if not np.all(np.isfinite(gram)):
                raise ValueError("feature statistics: the Gram factor's product overflows")
            self._gram = gram
        return self._gram

    @classmethod
    def of(cls, features: np.ndarray, labels: np.ndarray, *, num_classes: int) -> FeatureStatistics:
        """The statistics of one dataset: features (N x D), integer labels in [0, num_classes). With fewer
        examples than dimensions the features themselves are the Gram matrix's factor (F^T F)."""
        f = np.asarray(features, dtype=np.float64)
        y = np.asarray(labels)
        if f.ndim != 2 or y.shape != (len(f),):
            raise ValueError(f"features must be N x D and labels N, not {f.shape} and {y.shape}")
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}), found {y.min()} .. {y.max()}")
        one_hot = np.eye(num_classes)[y.astype(np.int64)] if len(y) else np.zeros((0, num_classes))
        if len(f) < f.shape[1]:
            return cls(factor=f, class_sums=one_hot.T @ f, class_counts=one_hot.sum(0))
        return cls(gram=f.T @ f, class_sums=one_hot.T @ f, class_counts=one_hot.sum(0))

    def __add__(self, other: FeatureStatistics) -> FeatureStatistics:
        if self.class_sums.shape != other.class_sums.shape:
            raise ValueError(f"cannot pool statistics of {self.class_sums.shape} and {other.class_sums.shape} "
                             "(classes x feature dimensions)")
        if self.null_dims or other.null_dims:
            raise ValueError("cannot pool statistics written in a basis of their span: each has its own basis")
        sums, counts = self.class_sums + other.class_sums, self.class_counts + other.class_counts
        # Factors are stacked while they have fewer rows than dimensions (what `in_span` needs); past
        # that the D x D matrix is the smaller form, and a federation's stacked rows would grow with
        # its examples (10,000 clients' factors could outgrow memory).
        rows = sum(len(part.factor) for part in (self, other) if part.factor is not None)
        if self.factor is not None and other.factor is not None and rows < self.class_sums.shape[1]:
            gram = self.gram + other.gram if self._gram is not None and other._gram is not None else None
            return FeatureStatistics(gram=gram, class_sums=sums, class_counts=counts,
                                     factor=np.vstack([self.factor, other.factor]))
        return FeatureStatistics(gram=self.gram + other.gram, class_sums=sums, class_counts=counts)

    @property
    def count(self) -> int:
        return int(round(float(self.class_counts.sum())))

    @property
    def dims(self) -> int:
        """The features' dimensions, those left out by `in_span` included."""
        return self.class_sums.shape[1] + self.null_dims

    def in_span(self) -> FeatureStatistics:
        """The same statistics in an orthonormal basis Q of the span of the factor's rows, when the factor
        has fewer rows R than the D dimensions (otherwise these statistics): gram Q^T F^T F Q (R x R),
        class sums times Q, and D - R null dimensions along which every feature is zero.

        Every feature, and so every class sum, lies in that span (a client's factor rows span its
        features: fedtune/statistics_protocol.py, gram_factor; the server checks the class sums
        do). LogME, the H-score and the shrunk H-score are the same on both (each says why), and
        cost R^3 instead of D^3: on ants/bees, 192 examples against Lite's 1280 dimensions.
        """
        dims = self.class_sums.shape[1]
        if self.factor is None or len(self.factor) >= dims:
            return self
        basis, triangle = np.linalg.qr(self.factor.T)  # B^T = Q T, so Q^T B^T B Q = T T^T
        return FeatureStatistics(gram=triangle @ triangle.T, class_sums=self.class_sums @ basis,
                                 class_counts=self.class_counts, null_dims=self.null_dims + dims - len(triangle))

    def centred(self) -> FeatureStatistics:
        """The statistics of the same features less their mean (over all classes): F_c = F - 1 mu^T.

        Computed from the sums alone: F_c^T F_c = F^T F - N mu mu^T, and each class's sum less
        its count times mu. Applied to the federation's pooled statistics, the mean is the
        federation's, so no client needs to know it.
        """
        n = self.count
        if n < 1:
            raise ValueError("cannot centre the statistics of no examples")
        mean = self.class_sums.sum(0) / n
        return FeatureStatistics(gram=self.gram - n * np.outer(mean, mean),
                                 class_sums=self.class_sums - self.class_counts[:, None] * mean,
                                 class_counts=self.class_counts, null_dims=self.null_dims)


@dataclass(frozen=True)
class EvidenceFit:
    """LogME for one class's one-hot column: the maximised log evidence per example, at precisions
    alpha (the prior's on the weights) and beta (the noise's)."""

    evidence: float
    alpha: float
    beta: float


def logme_by_class(stats: FeatureStatistics) -> list[EvidenceFit]:
    """Each class's maximised evidence (You et al. 2021, Algorithm 1), from the statistics alone.

    Null dimensions (`FeatureStatistics.in_span`) change nothing: along them F^T F has eigenvalue 0
    and F^T y is 0, so they add nothing to gamma or m, and their terms of the evidence,
    (1/2) log alpha from the prior and -(1/2) log(alpha + beta 0), cancel.
    """
    n = stats.count
    if n < 2:
        raise ValueError("LogME needs at least 2 examples")
    eigenvalues, eigenvectors = np.linalg.eigh(stats.gram)
    eigenvalues = np.clip(eigenvalues, 0.0, None)  # F^T F is positive semi-definite; rounding is not
    return [_maximised_evidence(eigenvalues, eigenvectors.T @ class_sum, float(class_count), n)
            for class_sum, class_count in zip(stats.class_sums, stats.class_counts, strict=True)]


def logme(stats: FeatureStatistics) -> float:
    """LogME: the mean over classes of the maximised log evidence per example (higher is better)."""
    return float(np.mean([fit.evidence for fit in logme_by_class(stats)]))


def _maximised_evidence(eigenvalues: np.ndarray, projected: np.ndarray, squared_norm: float, n: int) -> EvidenceFit:
    """Evidence maximisation for one target column y, given the eigenvalues of F^T F, V^T F^T y in its
    eigenbasis and y^T y (for a one-hot column, the class's count)."""

    def posterior(alpha: float, beta: float) -> tuple[float, float, float]:
        """(gamma, m^T m, |y - F m|^2) at these precisions; m = beta (alpha I + beta F^T F)^-1 F^T y."""
        weights = beta * projected / (alpha + beta * eigenvalues)  # V^T m
        gamma = float(np.sum(beta * eigenvalues / (alpha + beta * eigenvalues)))
        # |y - F m|^2 = y^T y - 2 m^T F^T y + m^T F^T F m, all in the eigenbasis
        residual = squared_norm - 2 * float(weights @ projected) + float(weights @ (eigenvalues * weights))
        return gamma, float(weights @ weights), max(residual, 0.0)

    alpha, beta = 1.0, 1.0
    for _ in range(_LOGME_MAX_ITERATIONS):
        gamma, mean_squared, residual = posterior(alpha, beta)
        new_alpha = gamma / max(mean_squared, 1e-300)
        new_beta = (n - gamma) / max(residual, 1e-12 * max(squared_norm, 1.0))
        converged = abs(new_alpha / new_beta - alpha / beta) <= _LOGME_TOLERANCE * (alpha / beta)
        alpha, beta = new_alpha, new_beta
        if converged:
            break
    _, mean_squared, residual = posterior(alpha, beta)
    dims = len(eigenvalues)
    evidence = (dims / 2 * math.log(alpha) + n / 2 * math.log(beta)
                - 0.5 * float(np.sum(np.log(alpha + beta * eigenvalues)))
                - beta / 2 * residual - alpha / 2 * mean_squared - n / 2 * math.log(2 * math.pi))
    return EvidenceFit(evidence=evidence / n, alpha=alpha, beta=beta)


def h_score(stats: FeatureStatistics) -> float:
    """H-score: tr(cov(f)^+ cov(E[f | y])) (higher is better; at most the number of classes - 1).

    With fewer examples than feature dimensions the empirical covariance is singular, and the score
    saturates at classes - 1 whatever the features (ants/bees' 244 Lite0 features of 1280
    dimensions score exactly 1.0): `shrunk_h_score` is meant for that case. Null dimensions
    (`FeatureStatistics.in_span`) have covariance 0, which the pseudo-inverse leaves out.
    """
    covariance, centred, shares = _covariances(stats, "H-score")
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    keep = eigenvalues > _RELATIVE_RANK_CUTOFF * max(float(eigenvalues.max()), 0.0)
    # tr(cov^+ sum_k w_k c_k c_k^T) = sum_k w_k |diag(1/l) V^T c_k|^2 over the kept eigenpairs:
    # K x D work after the eigendecomposition, not the D x D products of forming cov^+.
    projected = centred @ eigenvectors[:, keep]
    return float(np.sum(shares[:, None] * projected**2 / eigenvalues[keep]))


def shrunk_h_score(stats: FeatureStatistics) -> float:
    """H-score with a shrunk covariance (Ibrahim et al. 2022, "Newer is not always better"):
    tr(cov_a(f)^-1 (1 - a) cov(E[f | y])), cov_a = (1 - a) cov + a (tr cov / D) I.

    The shrinkage a is the Oracle Approximating Shrinkage of Chen et al. 2010 (as scikit-learn's
    `OAS` computes it), which needs only tr(cov) and tr(cov^2): from the statistics alone, where
    Ledoit-Wolf would need fourth moments of the features. Unlike the plain score it does not
    saturate when there are fewer examples than dimensions.

    D counts the null dimensions of statistics `in_span` (their covariance is 0): tr(cov) / D and
    tr(cov^2) / D^2 are those of the whole covariance, and the shrunk covariance is a mu I along
    the null dimensions, which the class means (in the span) never reach.
    """
    covariance, centred, shares = _covariances(stats, "shrunk H-score")
    n, dims = stats.count, stats.dims
    alpha = float(np.sum(covariance**2)) / dims**2
    mu = float(np.trace(covariance)) / dims
    if mu <= 0:
        raise ValueError("shrunk H-score: the features do not vary (zero covariance)")
    denominator = (n + 1) * (alpha - mu**2 / dims)
    shrinkage = 1.0 if denominator == 0 else min((alpha + mu**2) / denominator, 1.0)
    shrunk = (1.0 - shrinkage) * covariance + shrinkage * mu * np.eye(len(covariance))
    # tr(shrunk^-1 (1 - a) sum_k w_k c_k c_k^T) = (1 - a) sum_k w_k c_k . shrunk^-1 c_k
    solved = np.linalg.solve(shrunk, centred.T)
    return float((1.0 - shrinkage) * np.sum(shares * np.einsum("kd,dk->k", centred, solved)))


def _covariances(stats: FeatureStatistics, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The features' covariance (normalised by N), and the class means E[f | y] less the mean (K' x D, the
    classes present) with their shares of the examples: cov(E[f | y]) = sum_k share_k c_k c_k^T."""
    n = stats.count
    if n < 2:
        raise ValueError(f"{what} needs at least 2 examples")
    mean = stats.class_sums.sum(0) / n
    covariance = stats.gram / n - np.outer(mean, mean)
    present = stats.class_counts > 0
    class_means = stats.class_sums[present] / stats.class_counts[present, None]
    return covariance, class_means - mean, stats.class_counts[present] / n
