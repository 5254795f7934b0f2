"""The linear probe's regularisation (and feature set) chosen by cross-validation on the polygons.

Samples are the labelled cells (probability path) or pixels (feature path) with their soft labels
``[N, K]`` (coverage fractions) and a *group* each: the connected labelled region they belong to
(:func:`label_groups`; a polygon, or touching polygons of one class in the same window). Folds
hold out whole groups, dealt class by class in a seeded random order, so that no held-out sample
has a neighbour from its own polygon in the training set (the held-out accuracy of a probe tested on
the pixels beside its training pixels says little).

Every candidate, a feature set (column subsets, simplest first: e.g. the pixel's indices, its
bands and indices, those and the cells' features) with a weight decay
(:data:`WEIGHT_DECAYS`, strongest first), is fitted on the other folds and scored on the
held-out one by its balanced accuracy (the mean of the classes' recalls; every class counts
alike, as a map reader counts them). Where the best candidate scores at least
:data:`POOR_ACCURACY`, the *one-standard-error rule* chooses: the simplest
candidate whose mean score is within one standard error of the best one's
(:func:`standard_error`: over the folds, and at least that of a proportion measured on as
many independent samples as there are labelled regions: 4.7 points with 25 regions). A
few polygons drawn on clear examples are often separated perfectly by many candidates; the rule
then takes the fewest features and the strongest regularisation, which extrapolate most
cautiously beyond what was drawn. Where even the best scores less (five classes of a dense
urban scene, ~50-60% balanced), the best candidate wins: the simplest within so wide an error
was often too simple (on the Vaihingen crop, ``benchmarks/quality_labels.py --regime segment``,
the rule chose two indices for five classes, or the strongest decay). The final probe is
fitted on every sample with the winner.

Its class scores are then multiplied by one *temperature*, the one that makes the held-out
probabilities most likely (temperature scaling: strong regularisation leaves probabilities near
uniform where the classes are in fact told apart well; the winning class of every sample is
unchanged), so that the confidence band and the probabilities mean what they say.

The winner's held-out accuracy, balanced accuracy and per-class recalls are reported; below
:data:`POOR_ACCURACY` balanced accuracy a :class:`PoorProbeWarning` is issued, as users of
classic classifiers expect from an accuracy assessment.

Without two groups of every class there are no folds: the probe is fitted with
:data:`DEFAULT_WEIGHT_DECAY` and the last feature set, and its accuracy is unknown (said in the
report and warned about).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy import ndimage

from geoupsample.heads import LinearProbe

#: Candidate weight decays (L2 on standardised features, per unit of the mean loss).
WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
#: Used when the polygons cannot be cross-validated.
DEFAULT_WEIGHT_DECAY = 1e-3
#: At most this many folds.
MAX_FOLDS = 5
#: Held-out balanced accuracy below which the probe is warned about.
POOR_ACCURACY = 0.8
#: At most this many samples take part in the cross-validation (a seeded random subset).
CV_SAMPLES = 4_000


class PoorProbeWarning(UserWarning):
    """The probe's held-out accuracy is poor, or unknown (too few polygons to test it)."""


@dataclass
class CrossValidation:
    """What the cross-validation found (all accuracies in [0, 1], on held-out groups)."""

    weight_decay: float
    feature_set: str
    folds: int
    groups: int
    accuracy: float | None = None
    balanced_accuracy: float | None = None
    per_class: dict[str, float] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)  # "<set> <decay>" -> balanced acc.
    chosen_by_cv: bool = True
    temperature: float = 1.0

    @property
    def poor(self) -> bool:
        """Whether the held-out balanced accuracy is below :data:`POOR_ACCURACY` or unknown."""
        return self.balanced_accuracy is None or self.balanced_accuracy < POOR_ACCURACY

    def summary(self) -> str:
        """One line for a run's output."""
        if self.balanced_accuracy is None:
            return (f"probe not cross-validated ({self.groups} labelled regions: draw at least "
                    f"two polygons of every class, apart); weight decay {self.weight_decay:g}")
        recall = ", ".join(f"{k} {100 * v:.0f}%" for k, v in self.per_class.items())
        how = "chosen by" if self.chosen_by_cv else "given; tested by"
        return (f"held-out accuracy {100 * (self.accuracy or 0):.1f}%, balanced "
                f"{100 * self.balanced_accuracy:.1f}% (recall: {recall}) over {self.folds} folds "
                f"of {self.groups} labelled regions; weight decay {self.weight_decay:g} "
                f"({how} cross-validation), features: {self.feature_set}, temperature "
                f"{self.temperature:.3g}")

    def warning(self) -> str | None:
        """The warning text when :attr:`poor`, else None."""
        if self.balanced_accuracy is None:
            return (f"the probe could not be tested: {self.groups} labelled region(s) do not "
                    "give two of every class; its accuracy is unknown. Draw at least two "
                    "polygons of every class, apart from each other")
        if self.balanced_accuracy >= POOR_ACCURACY:
            return None
        worst = min(self.per_class, key=lambda k: self.per_class[k])
        return (f"poor held-out accuracy: balanced {100 * self.balanced_accuracy:.1f}% "
                f"(below {100 * POOR_ACCURACY:.0f}%; {worst} recall "
                f"{100 * self.per_class[worst]:.0f}%) on polygons the probe did not see: the "
                "map will be unreliable. Draw more polygons, over the variety of each class, "
                "or try another backbone or --path")

    def tags(self) -> dict[str, str]:
        """GeoTIFF tags: ``probe_cv`` (JSON of every field) and ``probe_accuracy``."""
        out = {"probe_cv": json.dumps(asdict(self))}
        if self.balanced_accuracy is not None:
            out["probe_accuracy"] = f"{self.accuracy:.4f}"
            out["probe_balanced_accuracy"] = f"{self.balanced_accuracy:.4f}"
        if self.warning():
            out["probe_warning"] = self.warning() or ""
        return out


def label_groups(labelled: np.ndarray, offset: int = 0) -> tuple[np.ndarray, int]:
    """Connected regions (8-connected) of one class each in a label map ``[h, w]`` (a bool
    mask, or class numbers with 0 unlabelled): ``int64 [h, w]`` region ids from ``offset``
    (-1 outside), and the number of regions. Touching polygons of different classes are
    separate regions (a densely labelled area is many regions, not one)."""
    labelled = np.asarray(labelled)
    ids = np.full(labelled.shape, -1, dtype=np.int64)
    n = 0
    for k in np.unique(labelled[labelled != 0]):
        comp, m = ndimage.label(labelled == k, structure=np.ones((3, 3), dtype=bool))
        ids[comp > 0] = comp[comp > 0] - 1 + offset + n
        n += int(m)
    return ids, n


def group_folds(groups: np.ndarray, classes: np.ndarray, folds: int, seed: int = 0
                ) -> np.ndarray:
    """Fold of every sample (``int64 [N]``): each group goes whole to one fold, the groups of
    each class (a group's majority class) dealt round-robin in a seeded random order. Classes
    are dealt in the order of their first group, not of their index, so that the folds do not
    depend on how the classes are named or numbered."""
    uniq, inverse = np.unique(groups, return_inverse=True)
    major = np.zeros(len(uniq), dtype=np.int64)
    for g in range(len(uniq)):
        major[g] = np.bincount(classes[inverse == g]).argmax()
    rng = np.random.default_rng(seed)
    fold_of = np.zeros(len(uniq), dtype=np.int64)
    start = 0
    classes_present = np.unique(major)
    first_group = [int(np.flatnonzero(major == k)[0]) for k in classes_present]
    for k in classes_present[np.argsort(first_group)]:
        members = rng.permutation(np.flatnonzero(major == k))
        fold_of[members] = (start + np.arange(len(members))) % folds
        start += len(members)  # the next class starts where this one stopped
    return fold_of[inverse]


#: Candidate temperatures (multipliers of the class scores).
TEMPERATURES = np.geomspace(0.25, 64.0, 33)


def temperature(proba: np.ndarray, target: np.ndarray, weight: np.ndarray) -> float:
    """The multiplier of the class scores that maximises the weighted likelihood of the
    held-out ``target [n, K]`` under ``proba [n, K]`` (softmax of ``T log p``), from
    :data:`TEMPERATURES`."""
    logp = np.log(np.clip(proba, 1e-12, 1.0))
    best, best_loss = 1.0, np.inf
    for t in TEMPERATURES:
        z = t * logp
        z = z - z.max(1, keepdims=True)
        log_soft = z - np.log(np.exp(z).sum(1, keepdims=True))
        loss = -float((weight * (target * log_soft).sum(1)).sum())
        if loss < best_loss - 1e-12:
            best, best_loss = float(t), loss
    return best


def _sample_weights(y: np.ndarray, balanced: bool) -> np.ndarray:
    """The probe's weight of each sample: its labelled share, times its class weight."""
    cover = y.sum(1)
    if not balanced:
        return cover
    mass = y.sum(0)
    present = max(int((mass > 0).sum()), 1)
    cw = np.where(mass > 0, mass.sum() / (present * np.maximum(mass, 1e-12)), 0.0)
    return cover * ((y / cover[:, None]) * cw).sum(1)


def _fit(x: np.ndarray, y: np.ndarray, decay: float, class_weight: str | None, seed: int,
         classes: Sequence[str], max_iter: int = 200, init: LinearProbe | None = None
         ) -> LinearProbe:
    probe = LinearProbe(weight_decay=decay, class_weight=class_weight, seed=seed,
                        max_iter=max_iter)
    with warnings.catch_warnings():  # a fold may miss a class: the final fit warns, not this
        warnings.simplefilter("ignore", UserWarning)
        return probe.fit(x.T[:, :, None], y.T[:, :, None], classes=classes, init=init)


def _proba(probe: LinearProbe, x: np.ndarray) -> np.ndarray:
    return probe.predict_proba(np.ascontiguousarray(x.T[:, :, None], dtype=np.float32))[:, :, 0].T


def select_probe(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    classes: Sequence[str],
    *,
    class_weight: str | None = "balanced",
    weight_decay: float | None = None,
    feature_sets: Mapping[str, np.ndarray] | None = None,
    seed: int = 0,
    max_samples: int = 100_000,
) -> tuple[LinearProbe, CrossValidation]:
    """Cross-validate and fit the probe (see the module docstring).

    Args:
        x: features of the labelled samples ``[N, C]`` (finite).
        y: their coverage fractions ``[N, K]`` (rows summing to their labelled share, > 0).
        groups: labelled region of each sample ``[N]`` (:func:`label_groups`).
        classes: the K class names.
        class_weight: ``"balanced"`` (default) or None, as :class:`LinearProbe`'s.
        weight_decay: fix it (then only tested, not chosen); None: chosen from
            :data:`WEIGHT_DECAYS`.
        feature_sets: candidate column subsets by name (default: all columns, ``"all"``); the
            chosen probe uses all ``C`` columns with zero weight on the others.
        seed: of the folds and of the subsets drawn.
        max_samples: the final fit's sample bound (:class:`LinearProbe`'s).

    Returns:
        The probe fitted on every sample (``[K, C]`` weights) and the cross-validation.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    groups = np.asarray(groups)
    sets = dict(feature_sets) if feature_sets else {"all": np.arange(x.shape[1])}
    decays = WEIGHT_DECAYS if weight_decay is None else (float(weight_decay),)
    truth = y.argmax(1)
    n_groups = len(np.unique(groups))
    per_class_groups = [len(np.unique(groups[truth == k])) for k in range(y.shape[1])
                        if (truth == k).any()]
    folds = min(MAX_FOLDS, min(per_class_groups)) if per_class_groups else 0
    if folds < 2:
        decay = DEFAULT_WEIGHT_DECAY if weight_decay is None else float(weight_decay)
        name = list(sets)[-1]
        cv = CrossValidation(decay, name, 0, n_groups, chosen_by_cv=False)
        return _final(x, y, sets[name], decay, class_weight, seed, classes, max_samples), cv
    rng = np.random.default_rng(seed)
    pick = np.arange(x.shape[0])
    if pick.size > CV_SAMPLES:
        pick = np.sort(rng.choice(pick, CV_SAMPLES, replace=False))
    xs, ys, gs, ts = x[pick], y[pick], groups[pick], truth[pick]
    fold = group_folds(gs, ts, folds, seed)
    held_out: dict[str, np.ndarray] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small fits: OpenMP wake-ups would dominate, worse when busy
    try:
        _cross_validate(xs, ys, ts, fold, folds, sets, decays, class_weight, seed, classes,
                        held_out)
    finally:
        torch.set_num_threads(threads)
    cover = ys.sum(1)
    per_fold = {key: np.array([_balanced_accuracy(p.argmax(1)[fold == f], ts[fold == f],
                                                  cover[fold == f])
                               for f in range(folds)]) for key, p in held_out.items()}
    scores = {key: float(np.nanmean(v)) for key, v in per_fold.items()}
    top = max(scores, key=lambda k: scores[k])
    # the one-standard-error rule where the classes separate well (the choice is then how
    # cautiously to extrapolate); where even the best is poor, the best: the simplest within
    # a wide error would throw away what tells the classes apart
    se = (standard_error(per_fold[top], scores[top], n_groups)
          if scores[top] >= POOR_ACCURACY else 0.0)
    best = next(k for k in held_out if scores[k] >= scores[top] - se - 1e-12)  # simplest
    name, decay_text = best.rsplit(" ", 1)
    decay = float(decay_text)
    right = held_out[best].argmax(1) == ts
    per_class = {classes[k]: float((cover * right)[ts == k].sum() / cover[ts == k].sum())
                 for k in range(ys.shape[1]) if (ts == k).any()}
    cv = CrossValidation(
        weight_decay=decay,
        feature_set=name,
        folds=folds,
        groups=n_groups,
        accuracy=float((cover * right).sum() / cover.sum()),
        balanced_accuracy=float(np.mean(list(per_class.values()))),
        per_class=per_class,
        scores=scores,
        chosen_by_cv=weight_decay is None,
        temperature=temperature(held_out[best], ys / cover[:, None],
                                _sample_weights(ys, class_weight == "balanced")),
    )
    probe = _final(x, y, sets[name], decay, class_weight, seed, classes, max_samples)
    assert probe.weight is not None and probe.bias is not None
    probe.weight, probe.bias = probe.weight * cv.temperature, probe.bias * cv.temperature
    return probe, cv


def standard_error(per_fold: np.ndarray, accuracy: float, regions: int) -> float:
    """The standard error of a held-out accuracy: the larger of its spread over the folds
    (``std / sqrt(folds)``) and the Agresti-Coull error of a proportion measured on
    ``regions`` independent samples (pixels of one polygon are not independent: the labelled
    regions are), which stays above 0 when every fold scores 100%."""
    folds = per_fold[np.isfinite(per_fold)]
    spread = float(folds.std(ddof=1) / np.sqrt(len(folds))) if len(folds) > 1 else 0.0
    p = (accuracy * regions + 2.0) / (regions + 4.0)
    return max(spread, float(np.sqrt(p * (1.0 - p) / (regions + 4.0))))


def _balanced_accuracy(pred: np.ndarray, truth: np.ndarray, weight: np.ndarray) -> float:
    """Mean over the classes present in ``truth`` of their (weighted) recall; NaN if none."""
    recalls = [float((weight * (pred == truth))[truth == k].sum() / weight[truth == k].sum())
               for k in np.unique(truth)]
    return float(np.mean(recalls)) if recalls else float("nan")


def _cross_validate(xs: np.ndarray, ys: np.ndarray, ts: np.ndarray, fold: np.ndarray,
                    folds: int, sets: Mapping[str, np.ndarray], decays: Sequence[float],
                    class_weight: str | None, seed: int, classes: Sequence[str],
                    held_out: dict[str, np.ndarray]) -> None:
    """Fill ``held_out``: the held-out probabilities ``[n, K]`` of every candidate
    ``"<set> <decay>"``, in order of simplicity (sets in order, strongest decay first)."""
    for name, cols in sets.items():
        probas = {d: np.full_like(ys, 1.0 / ys.shape[1]) for d in decays}
        for f in range(folds):
            test, train = fold == f, fold != f
            if len(np.unique(ts[train])) < 2:
                continue  # nothing to learn: the held-out groups get uniform probabilities
            previous = None  # the regularisation path, strongest first, each fit warm-started
            for decay in sorted(decays, reverse=True):
                previous = _fit(xs[train][:, cols], ys[train], decay, class_weight, seed,
                                classes, max_iter=60, init=previous)
                probas[decay][test] = _proba(previous, xs[test][:, cols])
        for decay in sorted(decays, reverse=True):
            held_out[f"{name} {decay:g}"] = probas[decay]


def _final(x: np.ndarray, y: np.ndarray, cols: np.ndarray, decay: float,
           class_weight: str | None, seed: int, classes: Sequence[str], max_samples: int
           ) -> LinearProbe:
    """The probe fitted on every sample with the columns ``cols``, widened to all columns
    (zero weight, unit scale elsewhere) so that it applies to the full feature vector."""
    probe = LinearProbe(weight_decay=decay, class_weight=class_weight, seed=seed,
                        max_samples=max_samples)
    probe.fit(x[:, cols].T[:, :, None], y.T[:, :, None], classes=classes)
    if len(cols) == x.shape[1]:
        return probe
    assert probe.weight is not None and probe.mean is not None and probe.std is not None
    k, c = probe.weight.shape[0], x.shape[1]
    weight = torch.zeros(k, c, dtype=torch.float64)
    mean = torch.zeros(c, dtype=torch.float64)
    std = torch.ones(c, dtype=torch.float64)
    idx = torch.as_tensor(np.asarray(cols), dtype=torch.long)
    weight[:, idx], mean[idx], std[idx] = probe.weight, probe.mean, probe.std
    probe.weight, probe.mean, probe.std = weight, mean, std
    return probe
