"""The site's decision before each DP-SGD round: may it train, and what will the round cost?

`charge_round` is the one entry point. It verifies the ledger, checks the study against the
site's policy (accepted studies, δ), composes the round's planned cost (σ, sample rate, steps)
with every earlier round of the same study at this site under the study's accountant, adds the
other studies' ε (basic composition across studies), and refuses if the study's ε would exceed
the policy's max_epsilon_per_study or the study's own target ε, or the site's lifetime ε its
max_epsilon_lifetime. Otherwise it records the round in the ledger and only then may the round
be trained: a crash after this point can over-count, never under-count.

"The same study" is every run of it whatever its overrides: the ledger keys rounds by
`Study.budget_key` (the study without `training.rounds` and `privacy.epsilon`), not by the run's
`Study.hash` (recorded in the round's note). So a second run with `--rounds` or `--epsilon` spends
from the same budget, and the study's target ε covers all its runs together. A run may charge its
rounds and its reserve (`privacy.reserve_rounds`): a round charged but never aggregated leaves
room to resume the study in a new run and still complete it within ε.

ε is always recomputed from the recorded (σ, sample rate, steps) of each round, never taken
from a stored total.
"""

from __future__ import annotations

from fedcare.protocol import Refusal, RefusalKind
from fedcare.study import Study
from privacy.accounting import DPSchedule, epsilon_of
from privacy.ledger import LedgerEntry, PrivacyLedger, rounds_of, studies_of
from privacy.policy import SitePolicy

TOLERANCE = 1e-9


class BudgetRefusal(Refusal):
    """The site's budget (kind BUDGET) or policy (kind POLICY) will not let it train this round."""


def study_epsilon(entries: list[LedgerEntry], study_key: str, extra: tuple[float, float, int] | None = None) -> float:
    """ε of one study (its budget key) at this site, all its runs, optionally with one more round."""
    rounds = rounds_of(entries, study_key)
    history = [e.dp_step for e in rounds] + ([extra] if extra else [])
    if not history:
        return 0.0
    first = rounds[0] if rounds else None
    accountant = first.accountant if first else ""
    delta = first.delta if first else 0.0
    return epsilon_of(accountant, history, delta)


def lifetime_epsilon(entries: list[LedgerEntry], exclude: str | None = None) -> float:
    """Σ ε over the site's studies (sequential composition), optionally leaving one study out."""
    return sum(study_epsilon(entries, h) for h in studies_of(entries) if h != exclude)


def check_study_allowed(policy: SitePolicy, study_hash: str, delta: float) -> None:
    if not policy.accepts_study(study_hash):
        raise BudgetRefusal(RefusalKind.POLICY, f"study {study_hash[:12]}… is not in this site's policy accepted_studies")
    if delta > policy.max_delta:
        raise BudgetRefusal(RefusalKind.POLICY, f"the study's δ = {delta:g} exceeds this site's policy max_delta = {policy.max_delta:g}")


def carried_schedule(entries: list[LedgerEntry], study: Study, run_id: int) -> DPSchedule | None:
    """The schedule this run started with (σ is fixed for the whole run); None for a new run."""
    run = rounds_of(entries, study.budget_key, run_id)
    if not run:
        return None
    first = run[0]
    return DPSchedule(
        noise_multiplier=first.noise_multiplier,
        sample_rate=first.sample_rate,
        steps_per_round=first.steps,
        rounds=study.training.rounds,
        target_epsilon=study.privacy.epsilon,
        delta=first.delta,
        accountant=first.accountant,
        reserve_rounds=study.privacy.reserve_rounds,
    )


def charge_round(
    ledger: PrivacyLedger,
    policy: SitePolicy,
    schedule: DPSchedule,
    *,
    study_hash: str,
    budget_key: str,
    run_id: int,
    server_round: int,
) -> LedgerEntry:
    """Refuse (BudgetRefusal) or record this round's cost; see the module docstring.

    `study_hash` is the run's `Study.hash` (checked against the policy's accepted studies),
    `budget_key` its `Study.budget_key` (the ledger's key for the study's rounds)."""
    entries = ledger.entries()  # raises LedgerTampered: a broken ledger blocks training
    check_study_allowed(policy, study_hash, schedule.delta)
    if len(rounds_of(entries, budget_key, run_id)) >= schedule.planned_rounds:
        raise BudgetRefusal(RefusalKind.BUDGET, f"this run's planned {schedule.rounds} rounds and {schedule.reserve_rounds} "
                                                "reserve rounds are spent; training more would exceed ε")
    step = (schedule.noise_multiplier, schedule.sample_rate, schedule.steps_per_round)
    if not rounds_of(entries, budget_key):
        # The first round of a study sets its accountant and δ for every later round.
        eps_study = epsilon_of(schedule.accountant, [step], schedule.delta)
    else:
        eps_study = study_epsilon(entries, budget_key, extra=step)
    eps_lifetime = lifetime_epsilon(entries, exclude=budget_key) + eps_study
    if eps_study > policy.max_epsilon_per_study + TOLERANCE:
        raise BudgetRefusal(
            RefusalKind.BUDGET,
            f"privacy budget: this round would bring the study to ε = {eps_study:.3f} > this site's "
            f"max_epsilon_per_study = {policy.max_epsilon_per_study:g}; the site trains no more rounds of it",
            shared="privacy budget: this round would exceed this site's max_epsilon_per_study; "
                   "the site trains no more rounds of it",
        )
    if eps_study > schedule.target_epsilon + TOLERANCE:
        raise _over_target(entries, budget_key, run_id, eps_study, schedule)
    if eps_lifetime > policy.max_epsilon_lifetime + TOLERANCE:
        raise BudgetRefusal(
            RefusalKind.BUDGET,
            f"privacy budget: this round would bring the site's lifetime ε to {eps_lifetime:.3f} > its "
            f"max_epsilon_lifetime = {policy.max_epsilon_lifetime:g}; the site trains no more rounds",
            shared="privacy budget: this round would exceed this site's max_epsilon_lifetime; the site trains no more rounds",
        )
    return ledger.append(
        event="round", study_hash=budget_key, run_id=run_id, round=server_round,
        noise_multiplier=schedule.noise_multiplier, sample_rate=schedule.sample_rate,
        steps=schedule.steps_per_round, accountant=schedule.accountant, delta=schedule.delta,
        epsilon_study=eps_study, epsilon_lifetime=eps_lifetime, note=f"study hash {study_hash}",
    )


def _over_target(entries: list[LedgerEntry], budget_key: str, run_id: int, eps_study: float,
                 schedule: DPSchedule) -> BudgetRefusal:
    """The refusal of a round that would take the study (all its runs) past its own target ε."""
    earlier = [e for e in rounds_of(entries, budget_key) if e.run_id != run_id]
    where = "the site trains no more rounds of it"
    if not earlier:
        return BudgetRefusal(
            RefusalKind.BUDGET,
            f"privacy budget: this round would bring the study to ε = {eps_study:.3f} > its target "
            f"ε = {schedule.target_epsilon:g}; {where}",
            shared=f"privacy budget: this round would exceed the study's target ε; {where}",
        )
    spent = epsilon_of(earlier[0].accountant, [e.dp_step for e in earlier], earlier[0].delta)
    return BudgetRefusal(
        RefusalKind.BUDGET,
        f"privacy budget: this round would bring the study to ε = {eps_study:.3f} > its target ε = "
        f"{schedule.target_epsilon:g}: the study already spent ε = {spent:.3f} in {len(earlier)} rounds of earlier "
        f"runs at this site (every run of a study, whatever its --rounds / --epsilon, shares its ε); {where}",
        shared="privacy budget: this round would exceed the study's target ε: the study already spent ε in earlier "
               f"runs at this site (every run of a study shares its ε); {where}",
    )
