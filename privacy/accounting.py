"""A site's DP-SGD schedule and the ε of what it trained, under the study's accountant.

The noise multiplier σ is chosen once per site for the whole planned study (`plan_schedule`):
over the study's rounds plus its reserve (`privacy.reserve_rounds`, rounds charged at the sites
but never aggregated, e.g. when the coordinator crashed and the study is resumed in a new run),
so that the site's (ε, δ) stays within the study's target after every one of them. What each
round spent is kept in the site's privacy ledger (`privacy/ledger.py`) and composed by
`epsilon_of`, which `plan_schedule` also uses: the plan and the charge agree by construction.

Both stay bounded in time and memory for every study `fedcare.study` accepts (ε up to
`EPSILON_MAX`, any δ, rounds, batch size; `bench/plan_sigma.py` measures it):

- `epsilon_of` composes identical (σ, q) steps into one entry, so its cost does not grow
  with the number of rounds charged (one entry per distinct σ: per run, at most).
- "prv" is Opacus' PRV accountant (Gopi et al.: a safe domain from RDP, Opacus' mesh for its
  `eps_error` 0.01, truncate, discretize, FFT self-composition, the upper bound `eps_upper`),
  built from Opacus' own pieces, with the domain bound taken over the integer RDP orders (a
  wider, still safe domain), the grid rounded up to an FFT-friendly length (a finer mesh) and
  each cell edge's CDF computed once: the same ε as Opacus' to ~1e-6 (tested). Where Opacus'
  grid would need more than `PRV_MAX_POINTS` points (its size grows with √steps and with ε:
  very large sites, small batches, many rounds; measured: tens of seconds and GBs), or where
  float rounding would dominate δ (Opacus raises there), ε is RDP's bound instead: looser, still
  a guarantee, and cheap. A coarser PRV mesh is not an option: measured, it can under-report ε.
- `plan_sigma` brackets σ with the cheap RDP accountant (integer orders), then refines it with
  a safeguarded secant on (log σ, log ε): a few evaluations of `epsilon_of` instead of Opacus'
  bisection from σ = 0, which evaluates PRV at ever smaller σ, where its grid grows without
  bound (21 s at ε 100, ~10 GB at ε 500 on this machine kind). The σ returned is always one
  whose `epsilon_of` was computed and found within the target: the ledger charges exactly it.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import numpy as np

from fedcare.errors import FedcareError
from fedcare.study import Study

PRV_EPS_ERROR = 0.01  # Opacus' default accuracy of the PRV accountant (added to its ε estimate)
PRV_MAX_POINTS = 2**19  # the PRV grid's largest length (4 MB per array; planning peaks ~30 MiB, BENCHMARKS.md)
PLAN_TOLERANCE = 0.005  # the planned σ spends between (1 - tolerance) × and 1 × the target ε
PLAN_EVALUATIONS = 8  # at most this many evaluations of the study's accountant per plan
MAX_SIGMA = 1e6  # as Opacus' get_noise_multiplier: beyond it the target is not reachable
_LOG8 = math.log(8.0)
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # Opacus' RDPAccountant.DEFAULT_ALPHAS
RDP_INTEGER_ORDERS = [a for a in RDP_ORDERS if float(a).is_integer()]  # exact series, fast; a subset: ε ≥ all orders'

History = list[tuple[float, float, int]]  # [(σ, sample rate, steps), ...]


class PlanningError(FedcareError, ValueError):
    """No noise multiplier meets the study's target under its accountant (the target is too small)."""


@dataclass(frozen=True)
class DPSchedule:
    """The planned DP-SGD steps of one site for the whole study: σ covers rounds + reserve_rounds."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    target_epsilon: float
    delta: float
    accountant: str
    reserve_rounds: int = 0

    @property
    def planned_rounds(self) -> int:
        """The rounds σ was planned over: the study's rounds and its reserve."""
        return self.rounds + self.reserve_rounds

    @property
    def total_steps(self) -> int:
        """The steps σ was planned over (all planned rounds, the reserve included)."""
        return self.steps_per_round * self.planned_rounds


def batches_per_epoch(n_train: int, batch_size: int) -> int:
    """Opacus' sample rate is 1 / len(loader); len(loader) = ceil(n / batch_size)."""
    return max(1, math.ceil(n_train / batch_size))


def plan_schedule(study: Study, n_train: int) -> DPSchedule:
    """Choose σ once so that the study's rounds and its reserve spend at most the target ε."""
    if n_train < 1:
        raise ValueError("a site needs at least one training row")
    sample_rate = 1.0 / batches_per_epoch(n_train, study.training.batch_size)
    steps_per_round = study.training.local_epochs * batches_per_epoch(n_train, study.training.batch_size)
    reserve = study.privacy.reserve_rounds
    sigma = plan_sigma(
        accountant=study.privacy.accountant, target_epsilon=study.privacy.epsilon, delta=study.privacy.delta,
        sample_rate=sample_rate, steps=steps_per_round * (study.training.rounds + reserve),
    )
    return DPSchedule(
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps_per_round=steps_per_round,
        rounds=study.training.rounds,
        target_epsilon=study.privacy.epsilon,
        delta=study.privacy.delta,
        accountant=study.privacy.accountant,
        reserve_rounds=reserve,
    )


def plan_sigma(*, accountant: str, target_epsilon: float, delta: float, sample_rate: float, steps: int,
               tolerance: float = PLAN_TOLERANCE) -> float:
    """The smallest σ found whose `epsilon_of` over `steps` steps is within the target (see the module docstring).

    Raises PlanningError when no σ up to MAX_SIGMA meets the target."""
    def cheap(sigma: float) -> float:
        return _rdp_epsilon([(sigma, sample_rate, steps)], delta, RDP_INTEGER_ORDERS)

    # Bracket: RDP over the integer orders is an upper bound of RDP over all of them, and above PRV.
    start = _solve(cheap, target_epsilon, start=1.0, tolerance=tolerance, evaluations=60)
    if start is None:
        start = MAX_SIGMA
    sigma = _solve(lambda s: epsilon_of(accountant, [(s, sample_rate, steps)], delta), target_epsilon,
                   start=start, tolerance=tolerance, evaluations=PLAN_EVALUATIONS)
    if sigma is None:
        raise PlanningError(
            f"no noise multiplier up to {MAX_SIGMA:g} meets ε = {target_epsilon:g} at δ = {delta:g} under the "
            f"{accountant} accountant: the target is below what it certifies"
        )
    return sigma


def _solve(epsilon_at, target: float, *, start: float, tolerance: float, evaluations: int) -> float | None:
    """Smallest σ seen with epsilon_at(σ) ≤ target, stopping once one spends ≥ (1 - tolerance) × target.

    ε falls with σ, nearly as a power of it: secant steps on (log σ, log ε) aimed just below the
    target, at most 8× at a time, kept inside the bracket found so far; a bisection when the bracket
    stops halving. Also stops when the bracket is narrower than tolerance / 2 in log σ: ε jumps
    there (where PRV's grid stops fitting, `_prv_epsilon` answers with RDP's larger bound)."""
    aim = math.log(target * (1 - tolerance / 2))
    low: float | None = None  # log σ of the largest σ seen spending more than the target
    high: float | None = None  # log σ of the smallest σ seen within it
    recent: list[tuple[float, float]] = []
    widths: list[float] = []
    x = math.log(start)
    for _ in range(evaluations):
        eps = epsilon_at(math.exp(x))
        y = math.log(eps) if eps > 0 else -math.inf
        if eps <= target:
            high = x if high is None else min(high, x)
            if eps >= target * (1 - tolerance):
                break
        else:
            low = x if low is None else max(low, x)
        if low is not None and high is not None:
            widths.append(high - low)
            if widths[-1] < tolerance / 2:
                break
        recent = [*recent[-1:], (x, y)]
        stalled = len(widths) >= 3 and widths[-1] > widths[-3] / 2
        x = _next_guess(recent, aim, low, high, bisect=stalled)
        if x is None:
            break
    return math.exp(high) if high is not None else None


def _next_guess(recent: list[tuple[float, float]], aim: float, low: float | None, high: float | None, *,
                bisect: bool) -> float | None:
    """The next log σ (see `_solve`); None when even MAX_SIGMA spends more than the target."""
    if low is not None and high is not None and bisect:
        return (low + high) / 2
    x1, y1 = recent[-1]
    slope = -1.0  # ε ~ 1/σ where the Gaussian mechanism is far from its floor
    if len(recent) > 1:
        x0, y0 = recent[0]
        if x1 != x0 and math.isfinite(y0) and math.isfinite(y1):
            slope = min((y1 - y0) / (x1 - x0), -1e-3)  # ε falls with σ (flat near its floor: long steps)
    if math.isfinite(y1):
        step = (aim - y1) / slope
    else:  # ε = ∞: more noise; ε = 0: less
        step = math.log(2.0) if y1 > 0 else -math.log(2.0)
    x = x1 + max(-_LOG8, min(step, _LOG8))
    top = math.log(MAX_SIGMA)
    if low is not None and high is not None:
        return x if low < x < high else (low + high) / 2
    if high is not None:  # the target lies below the smallest feasible σ
        return x if x < high else high - math.log(1.25)
    if low is not None and low >= top:
        return None
    return min(x if low is None or x > low else low + math.log(1.25), top)


def epsilon_of(accountant_name: str, history: History, delta: float) -> float:
    """ε of a DP-SGD history [(σ, sample rate, steps), ...] under the named accountant."""
    merged = _merged(history)
    if not merged:
        return 0.0
    return _epsilon(accountant_name, tuple(merged), float(delta))


@functools.lru_cache(maxsize=1024)
def _epsilon(accountant_name: str, merged: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """The accountants are deterministic: a site asks for the same history every round (its ledger's
    rounds plus the next), and in simulation one process asks for many sites."""
    if accountant_name == "rdp":
        return _rdp_epsilon(list(merged), delta, RDP_ORDERS)
    if accountant_name == "prv":
        return _prv_epsilon(list(merged), delta)
    raise ValueError(f"unknown accountant {accountant_name!r}")


def _merged(history: History) -> History:
    """Identical (σ, q) steps composed into one entry (composition is commutative)."""
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in history:
        steps[(float(sigma), float(q))] = steps.get((float(sigma), float(q)), 0) + int(n)
    return [(sigma, q, n) for (sigma, q), n in steps.items() if n > 0]


def _rdp_epsilon(history: History, delta: float, orders: list[float]) -> float:
    """Opacus' RDP accountant (`RDPAccountant.get_epsilon`) over the given orders."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    rdp = sum(compute_rdp(q=q, noise_multiplier=sigma, steps=n, orders=orders) for sigma, q, n in history)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Optimal order is the (largest|smallest) alpha.*")
        eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


def _prv_epsilon(history: History, delta: float) -> float:
    """Opacus' PRV accountant on an FFT-friendly grid, or RDP where that grid would not fit (module docstring)."""
    from opacus.accountants.analysis.prv import (
        Domain, DiscretePRV, PoissonSubsampledGaussianPRV, TruncatedPrivacyRandomVariable, compose_heterogeneous,
    )

    delta_error = delta / 1000  # Opacus' default
    total = sum(n for _, _, n in history)
    # Opacus' compute_safe_domain_size, over the integer orders (a larger bound: still safe).
    bound = max([_rdp_epsilon(history, delta_error / 4, RDP_INTEGER_ORDERS)]
                + [_rdp_epsilon([(sigma, q, 1)], delta_error / (8 * total), RDP_INTEGER_ORDERS) for sigma, q, _ in history])
    width = max(bound, PRV_EPS_ERROR) + 3
    mesh = PRV_EPS_ERROR / math.sqrt(total * math.log(12 / delta_error) / 2)  # Opacus' mesh: its error bound holds
    points = _fft_length(2 * math.ceil(width / mesh) + 2)
    # Beyond PRV_MAX_POINTS, or where float rounding would dominate δ (Opacus refuses those grids): RDP.
    if points > min(PRV_MAX_POINTS, (delta - delta_error) / (2 * float(np.finfo(np.longdouble).eps))):
        return _rdp_epsilon(history, delta, RDP_ORDERS)
    k = points // 2 - 1
    dt = width / k  # at most Opacus' mesh; the grid -k·dt … (k + 1)·dt as Domain.create_aligned lays it out
    domain = Domain(t_min=-k * dt, t_max=(k + 1) * dt, size=points)
    edges = domain.t_min - dt / 2 + dt * np.arange(points + 1)
    dprvs = []
    with np.errstate(divide="ignore"):  # PRV takes log(1 - q), -inf when a site's batch is all its rows
        for sigma, q, _ in history:
            # Opacus' discretize, each cell edge's CDF computed once (Opacus: twice, cdf(tR) - cdf(tL)).
            prv = TruncatedPrivacyRandomVariable(PoissonSubsampledGaussianPRV(q, sigma), domain.t_min, domain.t_max)
            pmf = np.diff(prv.cdf(edges))
            shift = prv.mean() - float(np.dot(domain.ts, pmf))
            if abs(shift) >= dt / 2:
                raise RuntimeError("Discrete mean differs significantly from continuous mean.")
            dprvs.append(DiscretePRV(pmf=pmf, domain=domain.shift_right(shift)))
        composed = compose_heterogeneous(dprvs=dprvs, num_self_compositions=[n for _, _, n in history])
        _, _, eps_upper = composed.compute_epsilon(delta, delta_error, PRV_EPS_ERROR)
    return float(eps_upper)


def _fft_length(n: int) -> int:
    """The smallest even 5-smooth length ≥ n (pocketfft is fast on those)."""
    from scipy.fft import next_fast_len

    while (length := next_fast_len(n, real=True)) % 2:
        n = length + 1
    return length
