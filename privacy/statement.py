"""The hospital's privacy statement: its ledger as a table, verified, against its policy.

`fedcare privacy report --kit DIR` prints `statement_text`; the numbers are recomputed from
the recorded rounds (σ, sample rate, steps), not read from stored totals. A study is named by its
budget key (`Study.budget_key`: every run of it, whatever its overrides); each round's note holds
the hash of the run's study.
"""

from __future__ import annotations

from privacy.budget import lifetime_epsilon, study_epsilon
from privacy.ledger import LedgerEntry, rounds_of, studies_of
from privacy.policy import SitePolicy


def _entry_row(e: LedgerEntry) -> str:
    if e.event != "round":
        return f"{e.seq:>4}  {e.time}  {e.event.upper():<12}  {e.note}"
    return (
        f"{e.seq:>4}  {e.time}  {e.study_hash[:12]}  {e.run_id:>5}  {e.round:>5}  {e.noise_multiplier:>7.4f}  "
        f"{e.sample_rate:>8.5f}  {e.steps:>5}  {e.epsilon_study:>8.4f}  {e.epsilon_lifetime:>10.4f}"
    )


def statement_text(entries: list[LedgerEntry], policy: SitePolicy, ledger_path: str) -> str:
    lines = [
        f"privacy ledger: {ledger_path}",
        f"chain verified: {len(entries)} entries, none altered, removed or reordered",
        f"site policy: {policy.describe()}",
        "",
        " seq  time (UTC)            study key     run    round  sigma    q         steps  ε study   ε lifetime",
    ]
    lines += [_entry_row(e) for e in entries] or ["   (no round trained yet)"]
    lines += ["", "study key     runs  rounds  ε spent   δ        policy max  remaining"]
    for study_hash in studies_of(entries):
        rounds = rounds_of(entries, study_hash)
        eps = study_epsilon(entries, study_hash)
        remaining = max(policy.max_epsilon_per_study - eps, 0.0)
        runs = len({e.run_id for e in rounds})
        lines.append(
            f"{study_hash[:12]}  {runs:>4}  {len(rounds):>6}  {eps:>8.4f}  {rounds[0].delta:<8g} "
            f"{policy.max_epsilon_per_study:>10g}  {remaining:>9.4f}"
        )
    total = lifetime_epsilon(entries)
    lines += [
        "",
        f"lifetime ε {total:.4f} of {policy.max_epsilon_lifetime:g} "
        f"(remaining {max(policy.max_epsilon_lifetime - total, 0.0):.4f}; studies compose additively)",
    ]
    return "\n".join(lines)
