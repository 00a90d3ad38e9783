"""The domain-gap report: how far each client's features and labels lie from the rest of the federation.

Everything is computed from `FeatureStatistics` (per client: the Gram matrix F^T F of its frozen
features, each class's feature sum and count), never from features. Statistics add, so the rest of
the federation is the federation's statistics minus the client's (`without`).

Feature distances between two datasets a and b, from their means mu and covariances C (unbiased,
1 / (n - 1), as numpy's `np.cov` and the CORAL paper):
- Fréchet distance: |mu_a - mu_b|^2 + tr(C_a) + tr(C_b) - 2 tr((C_a^1/2 C_b C_a^1/2)^1/2), as FID
  computes it. The square roots come from eigendecompositions of the symmetric positive
  semi-definite matrices, never from a general `sqrtm`: with a factor C_a = A A^T (A = V sqrt(L) over
  the eigenvalues that are not rounding noise), the trace term is the sum of the square roots of the
  eigenvalues of A^T C_b A, and between two clients the nuclear norm of A_a^T A_b. With fewer
  examples than dimensions (N < D, the usual case: 24 photos per client against 1280 features) the
  covariances are singular (rank <= N - 1); the distance is still exact for those empirical
  covariances, nothing is regularised, but, like FID, it is biased upward for small N, and a small
  client looks far for that reason alone. The flags therefore use the class-conditional shift below.
- CORAL distance (Sun & Saenko 2016, "Deep CORAL"): |C_a - C_b|_F^2 / (4 D^2).
- MMD with a linear kernel k(x, y) = x . y: MMD^2 = |mu_a - mu_b|^2 (the plug-in, biased estimate).

Under label skew these marginal distances also move with the labels (ant features differ from bee
features), so a single-class client looks "far" without any change in its images. The
class-conditional shift separates the two: for each class both hold, the squared distance between
the client's class mean and the other side's, minus what sampling noise alone gives (v_a / n_ak +
v_b / n_bk, each side's within-class variance over its count: the unbiased estimate, as for the
unbiased linear MMD), in units of the federation's within-class variance per example (the trace,
pooled over each client's own classes, so that a shifted client does not inflate the unit). The
per-class values are averaged with the client's class shares, and the reported shift is the square
root of that average (0 when it is not above noise): how many within-class standard deviations
the client's class means lie from the rest's. A class only this client holds cannot be compared.

Label skew: the Hellinger distance sqrt(1 - sum sqrt(p q)) and the Jensen-Shannon distance (the
square root of the divergence, base 2), both in [0, 1], of the client's label distribution from the
whole federation's (one common reference, so clients compare with each other).

fedtune/domain_gap_view.py shows the report: a console table, gap.png, and both files written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fedtune.transferability import FeatureStatistics

GAP_JSON = "gap.json"
GAP_PNG = "gap.png"
FORMAT = "fedtune-gap/1"
KERNEL = "linear: k(x, y) = x . y, so MMD^2 = |mean_a - mean_b|^2 (plug-in estimate)"

# Label skew is flagged at a fixed Hellinger distance, not one relative to the other clients: under
# Dirichlet(0.1) most clients hold one class, the median client is itself skewed, and a relative rule
# would flag none of them. 0.3 is reached by a 88/12 client of a balanced 2-class federation (a
# single-class one is at 0.54), or by a client lacking 2 of 10 balanced classes (0.33; lacking one
# class is 0.23).
LABEL_SKEW_THRESHOLD = 0.3
# Feature shift is flagged as an outlier among the clients, on the squared shift (unbiased and signed,
# so the clients with no shift scatter around 0 and their MAD measures the noise; the square root
# floored at 0 would pile them up at 0 and inflate the MAD): above median + k * MAD (the MAD scaled
# by 1.4826 to estimate a normal standard deviation), with k = 3.5, the modified z-score cut-off of
# Iglewicz & Hoaglin (1993); median and MAD are robust to the outlier itself.
OUTLIER_K = 3.5
MAD_TO_SD = 1.4826
# ... and above a floor, in within-class standard deviations: in a federation of like clients the
# MAD is tiny and any noise would be an "outlier". Class means half a within-class SD apart is
# Cohen's "medium" effect size; the clean clients of the tests' real photos (12 each) reach 0.35.
SHIFT_FLOOR = 0.5

# Eigenvalues below this share of the largest are rounding noise of G - n mu mu^T, not variance.
_RELATIVE_RANK_CUTOFF = 1e-10
# How far from symmetric / positive semi-definite statistics may be, relative to their scale,
# before they cannot come from real features.
_CONSISTENCY_TOLERANCE = 1e-8
REFERENCE = "reference set"


# ---------------------------------------------------------------------------------------------
# Moments from sufficient statistics
# ---------------------------------------------------------------------------------------------


def without(total: FeatureStatistics, part: FeatureStatistics) -> FeatureStatistics:
    """The statistics of `total`'s data less `part`'s: statistics add, so they subtract."""
    if total.class_sums.shape != part.class_sums.shape:
        raise ValueError(f"cannot subtract statistics of {part.class_sums.shape} from {total.class_sums.shape} "
                         "(classes x feature dimensions)")
    return FeatureStatistics(gram=total.gram - part.gram, class_sums=total.class_sums - part.class_sums,
                             class_counts=total.class_counts - part.class_counts)


def feature_mean(stats: FeatureStatistics) -> np.ndarray:
    """The mean feature vector (D)."""
    return stats.class_sums.sum(0) / stats.count


def feature_covariance(stats: FeatureStatistics) -> np.ndarray:
    """The unbiased covariance (D x D), (F^T F - n mu mu^T) / (n - 1); zero for a single example."""
    n = stats.count
    mean = feature_mean(stats)
    return (stats.gram - n * np.outer(mean, mean)) / max(n - 1, 1)


@dataclass(frozen=True)
class _Moments:
    """What the distances need of one dataset, computed once."""

    count: int
    mean: np.ndarray
    covariance: np.ndarray
    class_counts: np.ndarray
    class_means: np.ndarray  # K x D; rows of absent classes are 0
    # Within-class variance per example: the trace of the scatter around the class means over
    # n - (classes held); None when every class holds a single example.
    within_variance: float | None
    within_scatter_trace: float
    classes_held: int


def _moments(stats: FeatureStatistics) -> _Moments:
    counts = stats.class_counts
    held = counts > 0
    class_means = np.zeros_like(stats.class_sums)
    class_means[held] = stats.class_sums[held] / counts[held, None]
    within_trace = float(np.trace(stats.gram) - np.sum(stats.class_sums[held] ** 2 / counts[held, None]))
    within_trace = max(within_trace, 0.0)  # rounding; inconsistent statistics were refused before
    classes_held = int(held.sum())
    dof = stats.count - classes_held
    return _Moments(count=stats.count, mean=feature_mean(stats), covariance=feature_covariance(stats),
                    class_counts=counts, class_means=class_means,
                    within_variance=within_trace / dof if dof > 0 else None,
                    within_scatter_trace=within_trace, classes_held=classes_held)


def _factor(covariance: np.ndarray, *, who: str = "statistics") -> np.ndarray:
    """A (D x r) with A A^T = covariance, over the eigenvalues that are not rounding noise.

    ValueError naming `who` for a covariance with a clearly negative eigenvalue: its Gram matrix and
    feature sums cannot come from one set of features."""
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    largest = max(float(eigenvalues[-1]), 0.0)
    if eigenvalues[0] < -_CONSISTENCY_TOLERANCE * max(largest, 1e-300):
        raise ValueError(f"{who}: the Gram matrix and the feature sums are inconsistent (a covariance with the "
                         f"negative eigenvalue {eigenvalues[0]:.3g}): they cannot come from one set of features")
    keep = eigenvalues > _RELATIVE_RANK_CUTOFF * largest
    return eigenvectors[:, keep] * np.sqrt(eigenvalues[keep])


# ---------------------------------------------------------------------------------------------
# Distances
# ---------------------------------------------------------------------------------------------


def _frechet(a: _Moments, a_factor: np.ndarray, b: _Moments) -> float:
    # tr((C_a^1/2 C_b C_a^1/2)^1/2) = sum of sqrt(eigenvalues of A^T C_b A), A A^T = C_a: the same
    # non-zero eigenvalues, in an r x r matrix (r = rank of C_a).
    cross = np.linalg.eigvalsh(a_factor.T @ b.covariance @ a_factor) if a_factor.shape[1] else np.zeros(0)
    root_trace = float(np.sum(np.sqrt(np.clip(cross, 0.0, None))))
    distance = (float(np.sum((a.mean - b.mean) ** 2)) + float(np.trace(a.covariance))
                + float(np.trace(b.covariance)) - 2 * root_trace)
    return max(distance, 0.0)


def _coral(a: _Moments, b: _Moments) -> float:
    dims = len(a.mean)
    return float(np.sum((a.covariance - b.covariance) ** 2)) / (4 * dims**2)


def _mmd2_linear(a: _Moments, b: _Moments) -> float:
    return float(np.sum((a.mean - b.mean) ** 2))


def frechet_distance(a: FeatureStatistics, b: FeatureStatistics) -> float:
    """The Fréchet distance between the Gaussians of the two datasets' feature means and covariances."""
    first = _moments(a)
    return _frechet(first, _factor(first.covariance), _moments(b))


def coral_distance(a: FeatureStatistics, b: FeatureStatistics) -> float:
    """CORAL: |C_a - C_b|_F^2 / (4 D^2) (Sun & Saenko 2016)."""
    return _coral(_moments(a), _moments(b))


def mmd2_linear(a: FeatureStatistics, b: FeatureStatistics) -> float:
    """Squared MMD with the linear kernel k(x, y) = x . y: the squared distance of the feature means."""
    return _mmd2_linear(_moments(a), _moments(b))


@dataclass(frozen=True)
class ClassShift:
    """The class-conditional shift of a dataset from another; None where they share no class."""

    shift: float | None  # sqrt of `squared`, floored at 0
    squared: float | None  # the share-weighted mean of by_class_squared: unbiased, so < 0 where it is all noise
    by_class: dict[int, float]  # class -> its shift, sqrt(max(0, squared))
    by_class_squared: dict[int, float]  # class -> unbiased squared shift (may be < 0: noise)


def _class_shift(a: _Moments, b: _Moments, *, unit: float | None, symmetric: bool = False) -> ClassShift:
    """a's class means against b's, for the classes both hold, in units of the within-class variance
    `unit`; weighted by a's class shares (or by both's, `symmetric`, for a client-by-client matrix)."""
    shared = np.flatnonzero((a.class_counts > 0) & (b.class_counts > 0))
    if unit is None or len(shared) == 0:
        return ClassShift(shift=None, squared=None, by_class={}, by_class_squared={})
    # A side whose every class holds one example has no within-class spread of its own: the unit stands in.
    a_variance = unit if a.within_variance is None else a.within_variance
    b_variance = unit if b.within_variance is None else b.within_variance
    squared = {}
    for k in shared:
        distance = float(np.sum((a.class_means[k] - b.class_means[k]) ** 2))
        noise = a_variance / a.class_counts[k] + b_variance / b.class_counts[k]
        squared[int(k)] = (distance - noise) / unit
    weights = a.class_counts[shared] + (b.class_counts[shared] if symmetric else 0)
    mean_squared = float(np.dot(weights, list(squared.values())) / weights.sum())
    return ClassShift(shift=math.sqrt(max(mean_squared, 0.0)), squared=mean_squared,
                      by_class={k: math.sqrt(max(v, 0.0)) for k, v in squared.items()},
                      by_class_squared=squared)


def class_conditional_shift(a: FeatureStatistics, b: FeatureStatistics, *, unit: float | None = None) -> ClassShift:
    """a's class-conditional feature shift from b (see the module docstring); `unit`: the within-class
    variance per example to measure in (default: a and b's pooled within-class variance)."""
    first, second = _moments(a), _moments(b)
    if unit is None:
        unit = _pooled_within_variance([first, second])
    return _class_shift(first, second, unit=unit)


def _pooled_within_variance(parts: Sequence[_Moments]) -> float | None:
    """Within-class variance per example, pooled over each part's own class means."""
    dof = sum(m.count - m.classes_held for m in parts)
    trace = sum(m.within_scatter_trace for m in parts)
    return trace / dof if dof > 0 and trace > 0 else None


def hellinger(p: np.ndarray, q: np.ndarray) -> float:
    """Hellinger distance sqrt(1 - sum sqrt(p q)) of two distributions, in [0, 1]."""
    return math.sqrt(max(1.0 - float(np.sum(np.sqrt(p * q))), 0.0))


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance: the square root of the JS divergence in bits, in [0, 1]."""
    m = (p + q) / 2

    def kl_to_m(x: np.ndarray) -> float:
        held = x > 0
        return float(np.sum(x[held] * np.log2(x[held] / m[held])))

    return math.sqrt(max((kl_to_m(p) + kl_to_m(q)) / 2, 0.0))


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureGap:
    """Feature distances of one dataset from another (the rest of the federation, or the reference set)."""

    frechet: float
    coral: float
    mmd2_linear: float
    class_shift: ClassShift

    def as_dict(self, classes: Sequence[str]) -> dict[str, Any]:
        return {"frechet": self.frechet, "coral": self.coral, "mmd2_linear": self.mmd2_linear,
                "class_conditional_shift": self.class_shift.shift,
                "class_conditional_shift_squared": self.class_shift.squared,
                "class_shift": {classes[k]: v for k, v in self.class_shift.by_class.items()}}


@dataclass(frozen=True)
class Flag:
    """Why a client is far from the rest: `kind` "label_skew" or "feature_shift"."""

    kind: str
    value: float
    threshold: float
    reason: str


@dataclass(frozen=True)
class ClientGap:
    name: str
    examples: int
    class_counts: np.ndarray
    hellinger: float
    jensen_shannon: float
    missing_classes: list[int]
    vs_rest: FeatureGap
    vs_reference: FeatureGap | None
    flags: list[Flag] = field(default_factory=list)

    @property
    def label_distribution(self) -> np.ndarray:
        return self.class_counts / self.examples


@dataclass(frozen=True)
class GapReport:
    """Per-client feature and label distances, the flags and the rules behind them."""

    classes: list[str]
    dimensions: int
    clients: list[ClientGap]
    federation_counts: np.ndarray
    reference_counts: np.ndarray | None
    federation_vs_reference: FeatureGap | None
    # The class-conditional shift's unit: the within-class variance per example, pooled over each
    # client's own class means (None: no client has two examples of a class).
    within_variance: float | None
    shift_threshold: float  # the feature-shift flag's threshold for this federation (a shift, not squared)
    shift_median: float | None  # of the clients' squared shifts
    shift_mad: float | None  # of the clients' squared shifts
    # Client x client matrices (order of `clients`): "class_conditional_shift" (NaN where two
    # clients share no class), "frechet", "coral", "mmd2_linear".
    pairwise: dict[str, np.ndarray]

    def flagged(self, kind: str) -> list[str]:
        return [c.name for c in self.clients if any(f.kind == kind for f in c.flags)]

    def as_dict(self) -> dict[str, Any]:
        classes = self.classes
        total = int(self.federation_counts.sum())
        return {
            "format": FORMAT,
            "classes": classes,
            "feature_dimensions": self.dimensions,
            "kernel": KERNEL,
            "covariance": "unbiased, 1 / (n - 1)",
            "within_class_variance": self.within_variance,
            "label_distances_against": "the whole federation's label distribution",
            "rules": {
                "label_skew": {
                    "distance": "hellinger", "threshold": LABEL_SKEW_THRESHOLD,
                    "rule": f"flagged when the Hellinger distance >= {LABEL_SKEW_THRESHOLD} (fixed)",
                },
                "feature_shift": {
                    "distance": "class_conditional_shift against the rest of the federation",
                    "k": OUTLIER_K, "mad_scale": MAD_TO_SD, "floor": SHIFT_FLOOR,
                    "median_squared": self.shift_median, "mad_squared": self.shift_mad,
                    "threshold": self.shift_threshold,
                    "rule": f"flagged when the squared shift > max(median + {OUTLIER_K} * {MAD_TO_SD} * MAD, "
                            f"{SHIFT_FLOOR}^2), median and MAD over the clients' squared shifts",
                },
            },
            "federation": {
                "examples": total,
                "class_counts": _counts_by_class(classes, self.federation_counts),
                "label_distribution": _shares_by_class(classes, self.federation_counts / total),
                "vs_reference": (None if self.federation_vs_reference is None
                                 else self.federation_vs_reference.as_dict(classes)),
            },
            "reference": None if self.reference_counts is None else {
                "examples": int(self.reference_counts.sum()),
                "class_counts": _counts_by_class(classes, self.reference_counts),
            },
            "clients": [
                {
                    "name": c.name,
                    "examples": c.examples,
                    "class_counts": _counts_by_class(classes, c.class_counts),
                    "label_distribution": _shares_by_class(classes, c.label_distribution),
                    "missing_classes": [classes[k] for k in c.missing_classes],
                    "label": {"hellinger": c.hellinger, "jensen_shannon": c.jensen_shannon},
                    "vs_rest": c.vs_rest.as_dict(classes),
                    "vs_reference": None if c.vs_reference is None else c.vs_reference.as_dict(classes),
                    "flags": [{"kind": f.kind, "value": f.value, "threshold": f.threshold, "reason": f.reason}
                              for f in c.flags],
                }
                for c in self.clients
            ],
            "pairwise": {
                "clients": [c.name for c in self.clients],
                **{name: [[None if math.isnan(v) else float(v) for v in row] for row in matrix]
                   for name, matrix in self.pairwise.items()},
            },
        }

    def to_json(self) -> str:
        """gap.json's text (strict JSON: a distance that cannot be measured is null)."""
        return json.dumps(self.as_dict(), indent=2, allow_nan=False) + "\n"


def _counts_by_class(classes: Sequence[str], counts: np.ndarray) -> dict[str, int]:
    return {name: int(round(float(n))) for name, n in zip(classes, counts, strict=True)}


def _shares_by_class(classes: Sequence[str], shares: np.ndarray) -> dict[str, float]:
    return {name: float(share) for name, share in zip(classes, shares, strict=True)}


def domain_gap(
    clients: Mapping[str, FeatureStatistics],
    *,
    class_names: Sequence[str],
    reference: FeatureStatistics | None = None,
) -> GapReport:
    """The domain-gap report of a federation, from each client's statistics of one frozen backbone's
    features (and, optionally, the server's reference set's).

    Costs one D x D eigendecomposition per client (about 0.5 s at D = 1280 on one core) plus
    products of D x D matrices; nothing scales with the number of examples.
    ValueError naming the client for statistics that cannot be compared or cannot come from features.
    """
    names = list(clients)
    if len(names) < 2:
        raise ValueError(f"a domain-gap report needs at least 2 clients (each is compared with the rest); "
                         f"got {len(names)}")
    classes = [str(c) for c in class_names]
    if len(set(classes)) != len(classes):
        raise ValueError(f"class names must be distinct: {classes}")
    for who, stats in [*((f"client {name!r}", clients[name]) for name in names), (REFERENCE, reference)]:
        if stats is not None and not isinstance(stats, FeatureStatistics):
            raise ValueError(f"{who}: expected FeatureStatistics, got {type(stats).__name__}")
    shape = (len(classes), clients[names[0]].class_sums.shape[1])
    for name in names:
        _check(f"client {name!r}", clients[name], shape=shape)
    if reference is not None:
        _check(REFERENCE, reference, shape=shape)

    checked = {name: _checked_moments(f"client {name!r}", clients[name]) for name in names}
    moments = {name: m for name, (m, _) in checked.items()}
    factors = {name: factor for name, (_, factor) in checked.items()}
    total = clients[names[0]]
    for name in names[1:]:
        total = total + clients[name]
    federation = _moments(total)
    unit = _pooled_within_variance(list(moments.values()))
    federation_distribution = federation.class_counts / federation.count

    gaps = []
    reference_checked = None if reference is None else _checked_moments(REFERENCE, reference)
    for name in names:
        client = moments[name]
        rest = _moments(without(total, clients[name]))
        distribution = client.class_counts / client.count
        gaps.append(ClientGap(
            name=name, examples=client.count, class_counts=client.class_counts,
            hellinger=hellinger(distribution, federation_distribution),
            jensen_shannon=jensen_shannon(distribution, federation_distribution),
            missing_classes=[int(k) for k in np.flatnonzero((client.class_counts == 0)
                                                             & (federation.class_counts > 0))],
            vs_rest=_feature_gap(client, rest, frechet=_frechet(client, factors[name], rest), unit=unit),
            vs_reference=(None if reference_checked is None else _feature_gap(
                client, reference_checked[0], frechet=_frechet(client, factors[name], reference_checked[0]),
                unit=unit)),
        ))
    federation_vs_reference = None
    if reference_checked is not None:
        reference_moments, reference_factor = reference_checked
        # The Fréchet distance is symmetric: the reference's factor serves, no eigendecomposition of the federation's.
        federation_vs_reference = _feature_gap(
            federation, reference_moments, frechet=_frechet(reference_moments, reference_factor, federation),
            unit=unit)

    squared = [g.vs_rest.class_shift.squared for g in gaps if g.vs_rest.class_shift.squared is not None]
    median = float(np.median(squared)) if squared else None
    mad = None if median is None else float(np.median(np.abs(np.array(squared) - median)))
    limit = SHIFT_FLOOR**2 if median is None or mad is None else max(median + OUTLIER_K * MAD_TO_SD * mad,
                                                                     SHIFT_FLOOR**2)
    threshold = math.sqrt(limit)
    return GapReport(classes=classes, dimensions=shape[1],
                     clients=[_with_flags(g, classes, threshold=threshold, median=median, mad=mad) for g in gaps],
                     federation_counts=federation.class_counts,
                     reference_counts=None if reference_checked is None else reference_checked[0].class_counts,
                     federation_vs_reference=federation_vs_reference, within_variance=unit,
                     shift_threshold=threshold,
                     shift_median=median, shift_mad=mad, pairwise=_pairwise(names, moments, factors, unit=unit))


def _feature_gap(a: _Moments, b: _Moments, *, frechet: float, unit: float | None) -> FeatureGap:
    return FeatureGap(frechet=frechet, coral=_coral(a, b), mmd2_linear=_mmd2_linear(a, b),
                      class_shift=_class_shift(a, b, unit=unit))


def _pairwise(names: list[str], moments: dict[str, _Moments], factors: dict[str, np.ndarray], *,
              unit: float | None) -> dict[str, np.ndarray]:
    """Client x client distance matrices, from the factors: no D x D product per pair."""
    count = len(names)
    dims = len(moments[names[0]].mean)
    matrices = {name: np.zeros((count, count)) for name in ("class_conditional_shift", "frechet", "coral",
                                                             "mmd2_linear")}
    traces = {name: float(np.trace(m.covariance)) for name, m in moments.items()}
    # |C|_F^2 = |A^T A|_F^2 for C = A A^T
    squared_norms = {name: float(np.sum((factor.T @ factor) ** 2)) for name, factor in factors.items()}
    for i, a in enumerate(names):
        for j in range(i + 1, count):
            b = names[j]
            cross = factors[a].T @ factors[b]
            # tr((C_a^1/2 C_b C_a^1/2)^1/2) is the nuclear norm of A_a^T A_b; tr(C_a C_b) = |A_a^T A_b|_F^2.
            root_trace = float(np.sum(np.linalg.svd(cross, compute_uv=False))) if cross.size else 0.0
            mean_distance = _mmd2_linear(moments[a], moments[b])
            frechet = max(mean_distance + traces[a] + traces[b] - 2 * root_trace, 0.0)
            coral = max(squared_norms[a] + squared_norms[b] - 2 * float(np.sum(cross**2)), 0.0) / (4 * dims**2)
            shift = _class_shift(moments[a], moments[b], unit=unit, symmetric=True).shift
            for name, value in (("frechet", frechet), ("coral", coral), ("mmd2_linear", mean_distance),
                                ("class_conditional_shift", math.nan if shift is None else shift)):
                matrices[name][i, j] = matrices[name][j, i] = value
    return matrices


def _with_flags(gap: ClientGap, classes: list[str], *, threshold: float, median: float | None,
                mad: float | None) -> ClientGap:
    flags = []
    if gap.hellinger >= LABEL_SKEW_THRESHOLD:
        held = ", ".join(f"{classes[k]} {int(n)}" for k, n in enumerate(gap.class_counts) if n > 0)
        lacking = f"; lacks {', '.join(classes[k] for k in gap.missing_classes)}" if gap.missing_classes else ""
        flags.append(Flag(kind="label_skew", value=gap.hellinger, threshold=LABEL_SKEW_THRESHOLD, reason=(
            f"{gap.name}: label skew, Hellinger distance {gap.hellinger:.2f} from the federation's label "
            f"distribution (flagged at >= {LABEL_SKEW_THRESHOLD}); holds {held}{lacking}")))
    shift = gap.vs_rest.class_shift.shift
    if shift is not None and shift > threshold:
        worst = max(gap.vs_rest.class_shift.by_class.items(), key=lambda item: item[1])
        flags.append(Flag(kind="feature_shift", value=shift, threshold=threshold, reason=(
            f"{gap.name}: feature shift, its class means lie {shift:.2f} within-class SDs from the rest "
            f"of the federation's (most: {classes[worst[0]]}, {worst[1]:.2f}); flagged above {threshold:.2f}, the root "
            f"of max(median {median:.3f} + {OUTLIER_K} x {MAD_TO_SD} x MAD {mad:.3f} of the clients' squared "
            f"shifts, floor {SHIFT_FLOOR}^2)")))
    return replace(gap, flags=flags)


# ---------------------------------------------------------------------------------------------
# Refusing statistics that cannot be compared or cannot come from features
# ---------------------------------------------------------------------------------------------


def _check(who: str, stats: FeatureStatistics, *, shape: tuple[int, int]) -> None:
    classes, dims = shape
    if stats.class_sums.shape != shape or stats.gram.shape != (dims, dims) or stats.class_counts.shape != (classes,):
        raise ValueError(f"{who}: statistics of {stats.class_sums.shape[0]} classes x "
                         f"{stats.gram.shape[-1]} feature dimensions, but the report has {classes} classes x "
                         f"{dims} dimensions (another backbone, cut or class list?)")
    for part in ("gram", "class_sums", "class_counts"):
        if not np.all(np.isfinite(getattr(stats, part))):
            raise ValueError(f"{who}: {part} holds a NaN or infinite value")
    counts = stats.class_counts
    if np.any(counts < 0) or np.any(counts != np.round(counts)):
        raise ValueError(f"{who}: class counts must be whole numbers >= 0, got {counts.tolist()[:20]}")
    if counts.sum() < 1:
        raise ValueError(f"{who} has 0 examples: nothing to compare")
    scale = max(float(np.abs(stats.gram).max()), 1e-300)
    if float(np.abs(stats.gram - stats.gram.T).max()) > _CONSISTENCY_TOLERANCE * scale:
        raise ValueError(f"{who}: the Gram matrix is not symmetric, so it is not F^T F of any features")
    held = counts > 0
    # Per dimension, the sum of squares is at least what the class means explain (Cauchy-Schwarz).
    with np.errstate(over="ignore", invalid="ignore"):
        spread = np.diag(stats.gram) - np.sum(stats.class_sums[held] ** 2 / counts[held, None], axis=0)
    if not np.all(np.isfinite(spread)):
        raise ValueError(f"{who}: its statistics overflow (values up to {scale:.3g})")
    if np.any(~held & np.any(stats.class_sums != 0, axis=1)) or spread.min() < -_CONSISTENCY_TOLERANCE * scale:
        raise ValueError(f"{who}: the Gram matrix, class sums and counts are inconsistent: they cannot come from "
                         "one set of features")


def _checked_moments(who: str, stats: FeatureStatistics) -> tuple[_Moments, np.ndarray]:
    """The moments and the covariance factor of statistics that passed `_check`."""
    with np.errstate(over="ignore", invalid="ignore"):
        moments = _moments(stats)
    if not (np.all(np.isfinite(moments.covariance)) and np.all(np.isfinite(moments.class_means))):
        raise ValueError(f"{who}: its statistics overflow (values up to {float(np.abs(stats.gram).max()):.3g})")
    return moments, _factor(moments.covariance, who=who)
