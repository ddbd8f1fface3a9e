"""Clinician notes and wearable streams for the synthetic hospitals, driven by the same latent severity.

With modalities on (`write_cohorts(..., modalities=True)`, the default for a study that derives
features from notes or readings), each patient also has six clinical states that clinicians write
about (hopelessness, anhedonia, sleep disturbance, worthlessness, suicidal ideation, social
withdrawal), each present with probability sigmoid(a + b d) for the latent severity d, and a
wearable life: a step-count trend, night-to-night sleep variability and a heart rate. They enter
the ground truth:

    logit p += 0.9 SI + 0.5 hopelessness + 0.35 withdrawal + 0.3 worthlessness + 0.25 anhedonia
             + 0.2 sleep_disturbance - 0.0005 steps_trend + 0.8 (sleep_sd - 0.9) + 0.02 (hr - 75)

and are observable only through the notes and the readings: coded features alone cannot reach the
full ceiling, which is what makes the contribution measurable.

Notes (`<split>.notes.csv`): Poisson(2 + max(d, 0)) notes in the year before the index date,
each mentioning every present state affirmed with probability 0.85, written by
`simulations.notes_corpus.synthetic_note` with its distractors (negated, family, historical,
hypothetical and near-miss mentions); older notes (400-700 days back) with mentions that fall
outside every window. Readings (`<split>.readings.csv`): for patients with a device, 45 days of
daily steps and sleep and 1-3 heart rates a day, on the days the device was worn (a wear rate and
a contiguous gap), in unit variants (h / min, /d / {steps}/d, /min / {beats}/min), plus
respiratory-rate readings the study does not use and readings after the index date.
"""

from __future__ import annotations

import csv
import datetime
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simulations.notes_corpus import synthetic_note

# state -> (a, b): P(present) = sigmoid(a + b d)
STATES: dict[str, tuple[float, float]] = {
    "hopelessness": (-1.2, 1.3),
    "anhedonia": (-1.0, 1.1),
    "sleep_disturbance": (-0.8, 0.9),
    "worthlessness": (-1.5, 1.2),
    "suicidal_ideation": (-3.0, 1.4),
    "social_withdrawal": (-1.4, 1.0),
}
STATE_WEIGHTS = {"suicidal_ideation": 0.9, "hopelessness": 0.5, "social_withdrawal": 0.35,
                 "worthlessness": 0.3, "anhedonia": 0.25, "sleep_disturbance": 0.2}
MENTION_RATE = 0.85
STREAM_DAYS = 45
LOINC, SNOMED = "http://loinc.org", "http://snomed.info/sct"
# (system, code) of each stream: not the codes of the coded wearable summaries (sleep_hours, ...)
STEPS, SLEEP, HEART_RATE = (LOINC, "55423-8"), (SNOMED, "248263006"), (LOINC, "8889-8")
RESPIRATORY_RATE = (LOINC, "9279-1")  # a stream the study does not use
NOTE_CHARS = 700  # synthetic sites keep notes short so simulations stay quick; the benchmark uses 2 KB


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass(frozen=True)
class Modalities:
    """One site's latent note-worthy states and wearable parameters, per patient (row order)."""

    states: dict[str, np.ndarray]  # state -> bool per patient
    steps_trend: np.ndarray  # steps/day change per 30 days
    sleep_sd: np.ndarray  # hours
    heart_rate: np.ndarray  # beats/min
    device: np.ndarray  # bool: wears a device
    wear_rate: np.ndarray  # share of days worn


def latent_modalities(severity: np.ndarray, *, wearable_missing: float, rng: np.random.Generator) -> Modalities:
    """The states and wearable parameters of patients with latent severity `severity`."""
    n = len(severity)
    states = {name: rng.random(n) < _sigmoid(a + b * severity) for name, (a, b) in STATES.items()}
    return Modalities(
        states=states,
        steps_trend=rng.normal(-450 * severity, 500, n),
        sleep_sd=np.exp(rng.normal(np.log(0.9) + 0.3 * severity, 0.3, n)),
        heart_rate=np.clip(rng.normal(75 + 4 * severity, 7, n), 45, 130),
        device=rng.random(n) >= wearable_missing,
        wear_rate=rng.beta(5, 2, n),
    )


def modality_log_odds(m: Modalities) -> np.ndarray:
    """The ground-truth terms the notes and streams carry (module docstring)."""
    total = sum(w * m.states[name].astype(float) for name, w in STATE_WEIGHTS.items())
    return total - 0.0005 * m.steps_trend + 0.8 * (m.sleep_sd - 0.9) + 0.02 * (m.heart_rate - 75)


def write_notes(path: Path, *, ids: list[str], rows: np.ndarray, m: Modalities, severity: np.ndarray,
                index_date: datetime.date, rng: np.random.Generator, length: int = NOTE_CHARS) -> int:
    """`patient_id,date,text` for the patients at `rows`; returns the number of notes written."""
    names = list(STATES)
    written = 0
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["patient_id", "date", "text"])
        for pid, row in zip(ids, rows.tolist()):
            present = [name for name in names if m.states[name][row]]
            recent = rng.poisson(2.0 + 1.0 * max(severity[row], 0.0))
            for _ in range(recent):
                day = index_date - datetime.timedelta(days=int(rng.integers(1, 364)))
                affirmed = [name for name in present if rng.random() < MENTION_RATE]
                writer.writerow([pid, day.isoformat(), synthetic_note(rng, affirmed=affirmed, length=length)])
            for _ in range(rng.poisson(0.3)):  # outside every window: must not count
                day = index_date - datetime.timedelta(days=int(rng.integers(400, 700)))
                affirmed = [name for name in names if rng.random() < 0.3]
                writer.writerow([pid, day.isoformat(), synthetic_note(rng, affirmed=affirmed, length=length)])
            written += recent
    return written


def write_readings(path: Path, *, ids: list[str], rows: np.ndarray, m: Modalities, sleep_hours: np.ndarray,
                   steps_per_day: np.ndarray, index_date: datetime.date, rng: np.random.Generator) -> int:
    """`patient_id,time,system,code,value,unit` for the patients at `rows`; returns the readings written."""
    written = 0
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["patient_id", "time", "system", "code", "value", "unit"])
        for pid, row in zip(ids, rows.tolist()):
            if not m.device[row]:
                continue
            gap_start, gap = int(rng.integers(0, STREAM_DAYS)), int(rng.integers(0, 10))
            sleep_in_minutes = rng.random() < 0.3
            steps_unit = "/d" if rng.random() < 0.7 else "{steps}/d"
            hr_unit = "/min" if rng.random() < 0.7 else "{beats}/min"
            for back in range(-3, STREAM_DAYS):  # a few days after the index date: outside every window
                if gap_start <= back < gap_start + gap or rng.random() > m.wear_rate[row]:
                    continue
                day = index_date - datetime.timedelta(days=back)
                stamp = day.isoformat()
                steps = max(0.0, steps_per_day[row] - m.steps_trend[row] * back / 30 + rng.normal(0, 1200))
                writer.writerow([pid, stamp, *STEPS, f"{round(steps)}", steps_unit])
                sleep = float(np.clip(rng.normal(sleep_hours[row], m.sleep_sd[row]), 1.0, 16.0))
                if sleep_in_minutes:
                    writer.writerow([pid, f"{stamp}T07:{int(rng.integers(0, 60)):02d}:00Z", *SLEEP,
                                     f"{sleep * 60:.1f}", "min"])
                else:
                    writer.writerow([pid, stamp, *SLEEP, f"{sleep:.3f}", "h"])
                for _ in range(int(rng.integers(1, 4))):
                    hour = int(rng.integers(6, 23))
                    writer.writerow([pid, f"{stamp}T{hour:02d}:15:00Z", *HEART_RATE,
                                     f"{rng.normal(m.heart_rate[row], 6):.0f}", hr_unit])
                    written += 1
                if rng.random() < 0.3:
                    writer.writerow([pid, stamp, *RESPIRATORY_RATE, f"{rng.normal(15, 2):.0f}", "/min"])
                written += 2
    return written
