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


@dataclass(frozen=True)
class FeatureStatistics:
    """Sufficient statistics of (features, labels) for LogME and H-score; `+` pools two datasets."""

    gram: np.ndarray  # D x D: F^T F
    class_sums: np.ndarray  # K x D: the sum of the features of each class's examples
    class_counts: np.ndarray  # K: examples of each class

    def __post_init__(self) -> None:
        classes, dims = self.class_sums.shape
        if self.gram.shape != (dims, dims) or self.class_counts.shape != (classes,):
            raise ValueError(f"feature statistics of mismatched shapes: gram {self.gram.shape}, class sums "
                             f"{self.class_sums.shape}, class counts {self.class_counts.shape}")
        for name in ("gram", "class_sums", "class_counts"):
            if not np.all(np.isfinite(getattr(self, name))):
                raise ValueError(f"feature statistics: {name} holds a NaN or infinite value")
        if np.any(self.class_counts < 0):
            raise ValueError("feature statistics: a negative class count")

    @classmethod
    def of(cls, features: np.ndarray, labels: np.ndarray, *, num_classes: int) -> FeatureStatistics:
        """The statistics of one dataset: features (N x D), integer labels in [0, num_classes)."""
        f = np.asarray(features, dtype=np.float64)
        y = np.asarray(labels)
        if f.ndim != 2 or y.shape != (len(f),):
            raise ValueError(f"features must be N x D and labels N, not {f.shape} and {y.shape}")
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}), found {y.min()} .. {y.max()}")
        one_hot = np.eye(num_classes)[y.astype(np.int64)] if len(y) else np.zeros((0, num_classes))
        return cls(gram=f.T @ f, class_sums=one_hot.T @ f, class_counts=one_hot.sum(0))

    def __add__(self, other: FeatureStatistics) -> FeatureStatistics:
        if self.class_sums.shape != other.class_sums.shape:
            raise ValueError(f"cannot pool statistics of {self.class_sums.shape} and {other.class_sums.shape} "
                             "(classes x feature dimensions)")
        return FeatureStatistics(gram=self.gram + other.gram, class_sums=self.class_sums + other.class_sums,
                                 class_counts=self.class_counts + other.class_counts)

    @property
    def count(self) -> int:
        return int(round(float(self.class_counts.sum())))

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
                                 class_counts=self.class_counts)


@dataclass(frozen=True)
class EvidenceFit:
    """LogME for one class's one-hot column: the maximised log evidence per example, at precisions
    alpha (the prior's on the weights) and beta (the noise's)."""

    evidence: float
    alpha: float
    beta: float


def logme_by_class(stats: FeatureStatistics) -> list[EvidenceFit]:
    """Each class's maximised evidence (You et al. 2021, Algorithm 1), from the statistics alone."""
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
    dimensions score exactly 1.0): `shrunk_h_score` is meant for that case.
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
    """
    covariance, centred, shares = _covariances(stats, "shrunk H-score")
    n, dims = stats.count, len(covariance)
    alpha = float(np.mean(covariance**2))
    mu = float(np.trace(covariance)) / dims
    if mu <= 0:
        raise ValueError("shrunk H-score: the features do not vary (zero covariance)")
    denominator = (n + 1) * (alpha - mu**2 / dims)
    shrinkage = 1.0 if denominator == 0 else min((alpha + mu**2) / denominator, 1.0)
    shrunk = (1.0 - shrinkage) * covariance + shrinkage * mu * np.eye(dims)
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
