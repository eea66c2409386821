"""The statistics a claim of the study rests on: intervals over seeds and paired tests on shared seeds.

Seeds are few (three), so intervals use Student's t, not the normal approximation, and
comparisons pair runs that share a seed (the same initialisation stream and data order
index), which removes the part of the noise two models have in common. A family of
comparisons (every pattern against the best one, say) is corrected with Holm's step-down
method, so "significant" in the finding holds at 5% for the family, not per comparison.
"""

import dataclasses
import math
import statistics
from collections.abc import Mapping, Sequence

from scipy import stats

CONFIDENCE = 0.95
ALPHA = 0.05


def interval(values: Sequence[float], confidence: float = CONFIDENCE) -> float:
    """Half-width of the t confidence interval of the mean of `values` (NaN below two values)."""
    values = [v for v in values if v == v]
    if len(values) < 2:
        return math.nan
    sem = statistics.stdev(values) / math.sqrt(len(values))
    return float(stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * sem)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """`first` against `second` on the seeds both have: mean difference, its interval, and the paired t-test."""

    first: str
    second: str
    seeds: int
    difference: float  # mean over shared seeds of first - second
    half_width: float  # of its confidence interval
    p_value: float  # two-sided paired t-test
    p_adjusted: float = math.nan  # Holm-adjusted within its family (set by `holm`)

    @property
    def p(self) -> float:
        """The family-adjusted p where there is one, else the raw p; NaN below two shared seeds."""
        return self.p_adjusted if self.p_adjusted == self.p_adjusted else self.p_value

    @property
    def tested(self) -> bool:
        return self.p == self.p

    @property
    def significant(self) -> bool:
        return self.p < ALPHA

    def verdict(self) -> str:
        """'significant (p=0.012)' or 'not significant (p=0.31)', with the family-adjusted p where there is one."""
        adjusted = ", Holm-adjusted" if self.p_adjusted == self.p_adjusted else ""
        if not self.tested:
            return f"untested ({self.seeds} shared seed{'s' if self.seeds != 1 else ''})"
        outcome = "significant" if self.significant else "not significant"
        return f"{outcome} (p={self.p:.2g}{adjusted}, {self.seeds} seeds)"


def paired(first: str, second: str, a: Mapping[int, float], b: Mapping[int, float]) -> Comparison:
    """Compares two models' per-seed values ({seed: value}) on the seeds both have."""
    shared = sorted(set(a) & set(b))
    differences = [a[s] - b[s] for s in shared]
    mean = statistics.fmean(differences) if differences else math.nan
    if len(shared) < 2:
        return Comparison(first, second, len(shared), mean, math.nan, math.nan)
    if statistics.pstdev(differences) == 0:  # identical differences: no spread to test against
        p = 1.0 if mean == 0 else 0.0
    else:
        p = float(stats.ttest_rel([a[s] for s in shared], [b[s] for s in shared]).pvalue)
    return Comparison(first, second, len(shared), mean, interval(differences), p)


def holm(comparisons: Sequence[Comparison]) -> list[Comparison]:
    """The same comparisons with Holm step-down adjusted p-values (in the input's order)."""
    tested = sorted((c.p_value, i) for i, c in enumerate(comparisons) if c.p_value == c.p_value)
    adjusted, running = {}, 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[i] = running
    return [dataclasses.replace(c, p_adjusted=adjusted.get(i, math.nan)) for i, c in enumerate(comparisons)]


def rank_correlation(first: Mapping[str, float], second: Mapping[str, float]) -> tuple[float, float, int]:
    """Spearman's rho between two rankings of the models both contain: (rho, two-sided p, models).

    Up to eight models the p-value is exact, from every pairing of the two rankings (7! = 5,040
    for the study's seven): scipy's t approximation, fine for more, says p = 0 for a perfect
    agreement, which no finite number of models can give.
    """
    shared = sorted(set(first) & set(second))
    if len(shared) < 3:
        return math.nan, math.nan, len(shared)
    x, y = [first[k] for k in shared], [second[k] for k in shared]
    result = stats.spearmanr(x, y)
    if len(shared) > 8:
        return float(result.statistic), float(result.pvalue), len(shared)
    rho = lambda y: stats.spearmanr(x, y).statistic
    exact = stats.permutation_test((y,), rho, permutation_type="pairings", n_resamples=math.factorial(8))
    return float(result.statistic), float(exact.pvalue), len(shared)
