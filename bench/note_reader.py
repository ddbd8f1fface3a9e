"""Notes featurization at the site: fedcare's NoteReader vs medspacy's default pipeline, same run.

    python -m bench.note_reader [--notes 100000] [--baseline 200] [--agreement 1000]

One core (sched_setaffinity). Prints notes/s of medspacy (PyRuSH sentences + target matcher + ConText)
and of `fedcare.notes.NoteReader.mentions` on ~2 KB synthetic notes, the peak RSS of featurizing
`--notes` notes generated and consumed as a stream (through `fedcare.derived.NoteAggregator`, the
site's path, hashed block included), and the per-mention agreement with medspacy on a held-out corpus
(seed 13579, used nowhere else), with the disagreements by kind.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from collections import Counter

import numpy as np

from fedcare.derived import Derivation
from fedcare.notes import NoteReader
from fedcare.study import load_study
from simulations.notes_corpus import STUDY_MARKERS, labelled_corpus, synthetic_note

HELD_OUT_SEED = 13579
FLAGS = ("negated", "hypothetical", "historical", "family", "uncertain")


def _medspacy():
    from loguru import logger

    logger.remove()
    import medspacy
    from medspacy.target_matcher import TargetRule

    nlp = medspacy.load()
    nlp.get_pipe("medspacy_target_matcher").add([TargetRule(p, m.name) for m in STUDY_MARKERS for p in m.phrases])
    return nlp


def _rate(fn, notes) -> float:
    start = time.perf_counter()
    for note in notes:
        fn(note)
    return len(notes) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--notes", type=int, default=100_000)
    parser.add_argument("--baseline", type=int, default=200)
    parser.add_argument("--agreement", type=int, default=1000)
    args = parser.parse_args()
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    nlp, reader = _medspacy(), NoteReader(STUDY_MARKERS)
    sample = labelled_corpus(max(args.baseline, 2000), seed=97531, length=2000)
    size = sum(map(len, sample)) / len(sample)
    base = _rate(nlp, sample[:args.baseline])
    fast = _rate(reader.mentions, sample)
    print(f"notes of {size:.0f} characters on average, one core")
    print(f"  medspacy default pipeline      {base:10.1f} notes/s   (baseline, {args.baseline} notes)")
    print(f"  fedcare NoteReader.mentions    {fast:10.1f} notes/s   {fast / base:6.1f}x")

    study = load_study(os.path.join(os.path.dirname(__file__), "..", "studies", "depression-risk-notes.toml"))
    derivation = Derivation(study)
    aggregator = derivation.notes(1000)
    rng = np.random.default_rng(24680)
    names = [m.name for m in STUDY_MARKERS]
    start = time.perf_counter()
    for i in range(args.notes):
        note = synthetic_note(rng, affirmed=[n for n in names if rng.random() < 0.3], length=2000)
        aggregator.add(patient=i % 1000, day=derivation.index_day - int(rng.integers(1, 365)), text=note)
    elapsed = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  {args.notes} notes generated and featurized as a stream (markers + hashed block): "
          f"{elapsed:.0f} s incl. generation, peak RSS {rss:.0f} MiB")

    total = agree = 0
    kinds: Counter = Counter()
    for note in labelled_corpus(args.agreement, seed=HELD_OUT_SEED, length=2000):
        ref = {(e.start_char, e.end_char): tuple(getattr(e._, f"is_{f}") for f in FLAGS) for e in nlp(note).ents}
        mine = {(m.start, m.end): tuple(getattr(m, f) for f in FLAGS) for m in reader.mentions(note)}
        for span in set(ref) | set(mine):
            total += 1
            if span not in mine:
                kinds["missed mention"] += 1
            elif span not in ref:
                kinds["extra mention"] += 1
            elif ref[span] == mine[span]:
                agree += 1
            else:
                kinds.update(f for f, a, b in zip(FLAGS, ref[span], mine[span]) if a != b)
    print(f"  agreement with medspacy on {args.agreement} held-out notes: {agree}/{total} mentions = "
          f"{agree / total:.2%}; disagreements by kind: {dict(kinds) or 'none'}")


if __name__ == "__main__":
    main()
