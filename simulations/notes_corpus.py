"""Synthetic psychiatric clinical notes for the notes-NLP study markers.

`synthetic_note` writes a ~2 KB outpatient note (header, HPI, past psychiatric / family / social
history, medications, mental status exam, vitals, labs, assessment, plan) in which every marker in
`affirmed` is mentioned affirmed at least once, with phrase variants of `STUDY_MARKERS`. With
`distractors`, the other markers appear only as distractors, in the way real notes mention what a
patient does not have: negated ("denies SI", "no anhedonia"), family ("mother with insomnia"),
historical ("history of suicidal ideation"), hypothetical ("return if suicidal thoughts develop"),
uncertain ("possible anhedonia"), and near misses that must not match a marker at all ("hopeful
about the future", "withdrew money"). Affirmed markers may get distractor sentences too, and some
sentences put a termination cue between a negated and an affirmed marker ("denies SI but reports
hopelessness"). Filler sentences carry the cue words real notes are full of ("lives with his wife",
"return to clinic", "no side effects") without mentioning a marker.

Affirmed/distractor is meant in ConText's sense (medspacy's default rules): a marker is affirmed in a
note iff ConText marks at least one of its mentions with none of negated / hypothetical / historical /
family / uncertain. tests/test_notes_nlp.py checks that `fedcare.notes.NoteReader` finds exactly the
`affirmed` set. Everything is a pure function of the generator's state.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence

import numpy as np

from fedcare.notes import Marker, Mention

STUDY_MARKERS: tuple[Marker, ...] = (
    Marker("hopelessness", ("hopeless", "hopelessness", "feels hopeless", "feeling hopeless",
                            "no hope for the future", "nothing to look forward to")),
    Marker("anhedonia", ("anhedonia", "anhedonic", "loss of interest", "loss of pleasure",
                         "little interest or pleasure", "no longer enjoys")),
    Marker("sleep_disturbance", ("insomnia", "sleep disturbance", "poor sleep", "difficulty sleeping",
                                 "trouble sleeping", "early morning awakening", "hypersomnia")),
    Marker("worthlessness", ("worthless", "worthlessness", "feels worthless", "feelings of worthlessness",
                             "excessive guilt", "low self-worth")),
    Marker("suicidal_ideation", ("suicidal ideation", "SI", "suicidal thoughts", "thoughts of suicide",
                                 "wish to die", "passive death wish")),
    Marker("social_withdrawal", ("social withdrawal", "socially withdrawn", "withdrawn from friends",
                                 "social isolation", "isolating at home", "avoiding friends")),
)

# Per marker: noun phrases (after "denies", "history of", ...) and predicates ("She {pred}.").
_NOUNS = {
    "hopelessness": ("hopelessness", "feeling hopeless", "sense of hopelessness", "feelings of hopelessness"),
    "anhedonia": ("anhedonia", "loss of interest in {hobby}", "loss of pleasure in {hobby}",
                  "little interest or pleasure in doing things"),
    "sleep_disturbance": ("insomnia", "sleep disturbance", "poor sleep", "difficulty sleeping",
                          "trouble sleeping", "early morning awakening", "hypersomnia", "initial insomnia"),
    "worthlessness": ("worthlessness", "feelings of worthlessness", "excessive guilt", "low self-worth"),
    "suicidal_ideation": ("suicidal ideation", "SI", "suicidal thoughts", "thoughts of suicide",
                          "passive SI", "passive death wish", "wish to die"),
    "social_withdrawal": ("social withdrawal", "social isolation", "isolating at home", "avoiding friends"),
}
_PREDICATES = {
    "hopelessness": ("feels hopeless", "feels hopeless about the future", "has no hope for the future",
                     "has nothing to look forward to", "is hopeless about getting better"),
    "anhedonia": ("is anhedonic", "no longer enjoys {hobby}", "describes loss of interest in {hobby}"),
    "sleep_disturbance": ("has trouble sleeping", "has difficulty sleeping at night", "describes poor sleep",
                          "notes early morning awakening"),
    "worthlessness": ("feels worthless", "describes {obj}self as worthless", "feels worthless at work",
                      "describes excessive guilt about {stressor}"),
    "suicidal_ideation": ("endorses a wish to die", "has thoughts of suicide", "describes passive SI",
                          "has suicidal thoughts at night"),
    "social_withdrawal": ("is socially withdrawn", "has been isolating at home", "has withdrawn from friends",
                          "has been avoiding friends"),
}
_HOBBIES = ("fishing", "gardening", "music", "cooking", "her grandchildren's visits", "church", "reading", "golf")
_STRESSORS = ("the divorce", "losing the job", "financial strain", "the move", "a recent breakup", "caregiving")
_RELATIVES = ("Mother", "Father", "Sister", "Brother", "Maternal aunt", "Paternal uncle", "Grandmother", "Son")
_DRUGS = ("sertraline 100 mg PO daily", "escitalopram 10 mg PO daily", "bupropion XL 150 mg PO every morning",
          "fluoxetine 40 mg PO daily", "venlafaxine XR 75 mg PO daily", "mirtazapine 15 mg PO at bedtime",
          "lithium 300 mg PO b.i.d.", "hydroxyzine 25 mg PO q6h PRN anxiety", "aripiprazole 2 mg PO daily")

# Sentence templates. {S}: subject ("She", "The patient", "Pt"), {s}: pronoun, {pos}: possessive,
# {n}/{N}: a noun phrase (lower / capitalised first letter), {p}: a predicate, {R}/{r}: a relative.
_AFFIRMED = (
    "{S} reports {n} for the past {k} weeks.", "{S} endorses {n}.", "Endorses {n} and low energy.",
    "{S} {p}.", "Reports {n} most days.", "Positive for {n}.", "{S} describes {n} since {stressor}.",
    "Ongoing {n}, worse over the last month.", "{S} continues to report {n}.", "Significant {n} noted today.",
    "{S} states that {s} {p}.", "{N} has been present most days.", "Today {s} {p}.",
    "Over the past month {s} {p}.", "{N} reported on PHQ-9 review.", "{S} endorses {n} and poor concentration.",
)
_TERMINATED = (  # {m}: a negated marker noun, then the affirmed one
    "Denies {m} but endorses {n}.", "No {m}; however, {s} reports {n}.", "{S} denies {m}, although {s} {p}.",
    "{S} denies {m}, yet {s} {p}.", "No {m}, but {s} {p}.", "Denies {m}; however, {s} {p}.",
)
_DISTRACTORS = {
    "negated": ("{S} denies {n}.", "Denies {n}.", "No {n}.", "No current {n}.", "Negative for {n}.",
                "{S} is without {n}.", "Free of {n} at this time.", "No evidence of {n} on exam.",
                "{S} does not endorse {n}.", "{S} doesn't report {n}.", "{S} cannot identify any {n}.",
                "{N}: none.", "{S} never had {n}.", "{N} has been ruled out.", "{N} is unlikely.",
                "{N}, now resolved.", "Thought content: denies {n}.", "ROS: negative for {n}.",
                "{S} denies any {n} today.", "No signs of {n}."),
    "family": ("{R} with {n}.", "{R} has a history of {n}.", "Family history of {n} in {r}.",
               "{Pos} {r} reports {n}.", "{R} struggled with {n} for years.", "{Pos} {r} was treated for {n}."),
    "historical": ("History of {n} in {year}.", "Hx of {n} as a teenager.", "h/o {n}, remote.",
                   "Past medical history of {n}.", "{S} has a history of {n} during a prior episode.",
                   "Remote history of {n}."),
    "hypothetical": ("Return to ED if {n} develops.", "Instructed to call 988 should {s} experience {n}.",
                     "If {n} worsens, will increase the dose.", "Call the clinic if {s} experiences {n}.",
                     "Come back for {n} or any new concerns.", "Should there be {n}, {s} will call."),
    "uncertain": ("Possible {n}.", "Likely {n} in the context of {stressor}.", "Rule out {n}.", "r/o {n}.",
                  "Presentation suggestive of {n}.", "Concerning for {n}.", "Suspicious for {n}.",
                  "{S} may be experiencing {n}."),
}
_NEAR_MISSES = (
    "{S} is hopeful about the future.", "Sleeping well on the current regimen.", "Enjoys {hobby} with friends.",
    "Withdrew money from savings to pay rent.", "Self-worth intact.", "Interest in activities preserved.",
    "Denies HI.", "No SIB.", "Isolation precautions not required.", "Hopes to return to work soon.",
    "Sleep hygiene reviewed.", "Suicide risk assessment completed; acute risk judged low.",
    "Guilt about missing work seems proportionate.", "{S} feels hopeful and sleeps well.",
)
_FILLER = {
    "hpi": ("{Name} is a {age} y.o. {sex} with major depressive disorder, recurrent, presenting for follow-up.",
            "{S} was last seen {k} weeks ago.", "Since the last visit, {s} started a new job.",
            "{S} reports adherence to {drug} with no side effects.", "Appetite is decreased with a {k} lb weight loss.",
            "Energy is low and concentration is impaired.", "{S} lives with {pos} {rel2} and works part time.",
            "Stressors include financial strain and {stressor}.", "{S} drinks alcohol socially and denies drug use.",
            "Caffeine intake is {k} cups of coffee per day.", "{S} was referred by {pos} primary care provider.",
            "Therapy has been helpful, but progress is slow.", "{Pos} {rel2} is supportive.", "{S} presents with worsening mood over the past {k} weeks.",
            "{S} reports the new dose is well tolerated.", "{Pos} {rel2} accompanied {obj} today and gave collateral.",
            "{S} has been attending therapy weekly.", "Denies side effects such as nausea or headache.",
            "{S} is unsure if the medication is helping.", "{S} missed two doses last week because of travel."),
    "past": ("One prior psychiatric hospitalization in {year}.", "No prior suicide attempts.",
             "Previous trials of fluoxetine and citalopram.", "Diagnosed with MDD in {year}.", "Prior diagnosis of generalized anxiety disorder.",
             "No history of mania or psychosis.", "Hx of alcohol use disorder, in remission since {year}.",
             "Previous outpatient therapy in {year} was helpful."),
    "family": ("Mother with depression.", "Father with alcohol use disorder.", "No family history of bipolar disorder.",
               "Family history is otherwise noncontributory.", "Brother with anxiety.", "Paternal grandfather with dementia.",
               "Mother is alive and well."),
    "social": ("Lives with {pos} {rel2} and two children.", "Works as a {job}.", "Former smoker, quit in {year}.",
               "No firearms at home.", "Completed college.", "Walks the dog daily.", "Married, lives in an apartment.", "Drinks 2 beers on weekends.",
               "Denies tobacco or cannabis use.", "Has a supportive sister nearby."),
    "mse": ("Appearance: casually dressed, fair hygiene.", "Behavior: cooperative, good eye contact.",
            "Speech: normal rate and volume.", "Mood: \"{mood}\".", "Affect: constricted, mood congruent.",
            "Thought process: linear and goal directed.", "Perception: no AH/VH.", "Cognition: alert and oriented x3.",
            "Insight: fair. Judgment: fair.", "Psychomotor: no agitation or retardation.", "Memory: grossly intact."),
    "assessment": ("{age} y.o. {sex} with MDD, recurrent, moderate.", "PHQ-9 today {k}, previously {k2}.",
                   "GAD-7 {k2}.", "Risk assessment: low acute risk.",
                   "Protective factors include family support and future orientation.",
                   "Symptoms are partially improved on the current regimen.", "Differential includes adjustment disorder.",
                   "Not currently at elevated risk.", "Medication adherence is good."),
    "plan": ("Continue {drug}.", "Increase bupropion to 300 mg daily.", "Refer to CBT.", "Follow up in {k} weeks.",
             "Return to clinic in {k} weeks.", "Safety plan reviewed and updated.", "Labs ordered: TSH, CBC, BMP.",
             "Crisis line number provided.", "Discussed risks and benefits of medication; patient agrees with plan.", "Check lithium level in 5 days.",
             "Patient to call if side effects occur.", "Coordinate care with the primary care provider.",
             "Next appointment in {k} weeks, sooner if needed."),
}
_HEADERS = {
    "hpi": ("HISTORY OF PRESENT ILLNESS:", "History of Present Illness:", "HPI:"),
    "past": ("PAST PSYCHIATRIC HISTORY:", "Past psychiatric history:"),
    "family": ("FAMILY HISTORY:", "Family history:"),
    "social": ("SOCIAL HISTORY:", "Social history:"),
    "mse": ("MENTAL STATUS EXAM:", "Mental status examination:", "MSE:"),
    "assessment": ("ASSESSMENT:", "Assessment:", "IMPRESSION:"),
    "plan": ("PLAN:", "Plan:"),
}
_LIST = "<list>"
_SECTIONS = ("hpi", "past", "family", "social", "mse", "assessment", "plan")
_HOME = {"negated": ("hpi", "mse"), "family": ("family", "hpi"), "historical": ("past", "hpi"),
         "hypothetical": ("plan",), "uncertain": ("assessment",), "affirmed": ("hpi", "hpi", "mse", "assessment"),
         "near": ("hpi", "social", "mse", "plan")}


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


class _Writer:
    """Fills templates for one note (one patient: sex, name, age fixed per note)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        female = bool(rng.integers(2))
        self.s, self.pos, self.obj = ("she", "her", "her") if female else ("he", "his", "him")
        self.sex = "female" if female else "male"
        self.name = _pick(rng, ("Ms. Rivera", "Mrs. Chen", "Ms. Okafor") if female else ("Mr. Jones", "Mr. Haddad", "Mr. Novak"))
        self.age = int(rng.integers(19, 80))

    def fill(self, template: str, *, marker: str | None = None, negated: str | None = None) -> str:
        rng = self.rng
        values = {
            "S": _pick(rng, (_cap(self.s), "The patient", "Pt", _cap(self.s))), "s": self.s, "pos": self.pos,
            "Pos": _cap(self.pos), "obj": self.obj, "k": str(int(rng.integers(2, 13))), "k2": str(int(rng.integers(3, 25))),
            "year": str(int(rng.integers(1995, 2023))), "hobby": _pick(rng, _HOBBIES), "stressor": _pick(rng, _STRESSORS),
            "R": _pick(rng, _RELATIVES), "r": _pick(rng, _RELATIVES).lower(), "drug": _pick(rng, _DRUGS),
            "rel2": _pick(rng, ("wife", "husband", "partner", "mother", "sister")), "Name": self.name,
            "age": str(self.age), "sex": self.sex, "job": _pick(rng, ("teacher", "nurse", "driver", "cashier")),
            "mood": _pick(rng, ("down", "depressed", "not great", "okay", "anxious", "tired")),
        }
        if marker is not None:
            noun = _pick(rng, _NOUNS[marker]).format(**values)
            values.update(n=noun, N=_cap(noun), p=_pick(rng, _PREDICATES[marker]).format(**values))
        if negated is not None:
            values["m"] = _pick(rng, _NOUNS[negated]).format(**values)
        return template.format(**values)


def _plan(rng: np.random.Generator, affirmed: Collection[str], distractors: bool) -> list[tuple[str, str, str | None, str | None]]:
    """(section, template, marker, negated marker) for every sentence that mentions a marker."""
    names = [m.name for m in STUDY_MARKERS]
    others = [m for m in names if m not in affirmed]
    plan: list[tuple[str, str, str | None, str | None]] = []
    for marker in names:
        if marker in affirmed:
            for _ in range(1 + int(rng.random() < 0.3)):
                if distractors and others and rng.random() < 0.25:
                    plan.append(("hpi", _pick(rng, _TERMINATED), marker, _pick(rng, others)))
                else:
                    plan.append((_pick(rng, _HOME["affirmed"]), _pick(rng, _AFFIRMED), marker, None))
        if distractors and rng.random() < (0.3 if marker in affirmed else 0.8):
            for _ in range(1 + int(rng.random() < 0.4)):
                kind = _pick(rng, tuple(_DISTRACTORS))
                plan.append((_pick(rng, _HOME[kind]), _pick(rng, _DISTRACTORS[kind]), marker, None))
    if distractors and len(others) >= 2 and rng.random() < 0.4:
        chosen = [others[i] for i in rng.permutation(len(others))[:3]]
        plan.append((_pick(rng, _HOME["negated"]), _LIST, "|".join(chosen), None))
    if distractors:
        for _ in range(int(rng.integers(0, 3))):
            plan.append((_pick(rng, _HOME["near"]), _pick(rng, _NEAR_MISSES), None, None))
    return plan


def _render(writer: _Writer, template: str, marker: str | None, negated: str | None) -> str:
    if template == _LIST:  # "Denies a, b, or c." over several markers
        nouns = [writer.fill("{n}", marker=m) for m in (marker or "").split("|")]
        if len(nouns) > 1:
            nouns[-1] = "or " + nouns[-1]
        return _pick(writer.rng, ("Denies ", "Patient denies ", "No ")) + (", " if len(nouns) > 2 else " ").join(nouns) + "."
    return _cap(writer.fill(template, marker=marker, negated=negated))


def _vitals(rng: np.random.Generator) -> str:
    return (f"Vitals: BP {int(rng.integers(100, 150))}/{int(rng.integers(60, 95))}, HR {int(rng.integers(55, 105))}, "
            f"RR 16, T {rng.uniform(97.0, 99.5):.1f} F, SpO2 {int(rng.integers(94, 100))}% on RA.")


def _layout(rng: np.random.Generator) -> dict[str, str]:
    """Per-note formatting choices: headers, list style, section separator."""
    layout = {section: _pick(rng, _HEADERS[section]) for section in _SECTIONS}
    layout.update({f"{section}:inline": "\n" if rng.random() < 0.6 else " " for section in _SECTIONS})
    layout["plan:list"] = _pick(rng, ("- ", "1. ", ""))
    layout["join"] = "\n\n" if rng.random() < 0.5 else "\n"
    return layout


def _section(layout: dict[str, str], section: str, lines: Sequence[str]) -> str:
    head = layout[section]
    style = layout["plan:list"] if section == "plan" else ""
    if style:
        return head + "\n" + "\n".join((f"{i + 1}. " if style == "1. " else style) + line
                                        for i, line in enumerate(lines))
    # "Header: No ..." would make ": No" one backward negation cue of the header (as in medspaCy)
    joiner = "\n" if lines and lines[0].startswith("No ") else layout[f"{section}:inline"]
    return head + joiner + " ".join(lines)


def synthetic_note(rng: np.random.Generator, *, affirmed: Collection[str], distractors: bool = True,
                   length: int = 2000) -> str:
    """A ~`length`-character psychiatric progress note; each marker in `affirmed` is mentioned affirmed.

    Markers not in `affirmed` appear (if `distractors`) only negated, in a relative, in the past,
    hypothetically, uncertainly, or as near misses that match no marker. Unknown marker names raise.
    """
    unknown = set(affirmed) - {m.name for m in STUDY_MARKERS}
    if unknown:
        raise ValueError(f"unknown markers: {sorted(unknown)}")
    writer = _Writer(rng)
    layout = _layout(rng)
    body: dict[str, list[str]] = {name: [] for name in _SECTIONS}
    for section, template, marker, negated in _plan(rng, affirmed, distractors):
        body[section].append(_render(writer, template, marker, negated))
    for section in _SECTIONS:  # shuffle within sections, at least one filler sentence each
        lines = [body[section][i] for i in rng.permutation(len(body[section]))]
        lines.insert(int(rng.integers(len(lines) + 1)), writer.fill(_pick(rng, _FILLER[section])))
        body[section] = lines
    meds = [_pick(rng, _DRUGS) for _ in range(int(rng.integers(1, 4)))]
    if "sleep_disturbance" not in affirmed and distractors and rng.random() < 0.3:
        meds.append("trazodone 50 mg PO at bedtime as needed for insomnia")
    extra = {"mse": "\n" + _vitals(rng), "past": "\nMEDICATIONS:\n" + "\n".join("- " + d for d in meds)}
    header = _pick(rng, ("PSYCHIATRY PROGRESS NOTE", "Outpatient Behavioral Health Follow-up", "Psychiatric Evaluation"))
    header += f"\nDate of service: {int(rng.integers(1, 13)):02d}/{int(rng.integers(1, 29)):02d}/2024"
    fixed = len(header) + sum(len(v) for v in extra.values()) + len(layout["join"]) * len(_SECTIONS)
    size = fixed + sum(len(_section(layout, sec, body[sec])) for sec in _SECTIONS)
    used: set[str] = set()
    while size < length * 0.97:  # filler until the note is long enough, each template once if possible
        pool = [(sec, f) for sec in _SECTIONS for f in _FILLER[sec] if f not in used]
        section, template = pool[int(rng.integers(len(pool)))] if pool else (_pick(rng, _SECTIONS), "")
        used.add(template)
        line = writer.fill(template or _pick(rng, _FILLER[section]))
        body[section].insert(int(rng.integers(len(body[section]) + 1)), line)
        size += len(line) + 1
    parts = [header] + [_section(layout, sec, body[sec]) + extra.get(sec, "") for sec in _SECTIONS]
    return layout["join"].join(parts) + "\n"


def labelled_notes(n: int, *, seed: int, length: int = 2000) -> Iterator[tuple[frozenset[str], str]]:
    """`n` (affirmed markers, note) pairs; each marker is affirmed with probability 0.35. A stream: nothing is kept."""
    rng = np.random.default_rng(seed)
    names = [m.name for m in STUDY_MARKERS]
    for _ in range(n):
        affirmed = frozenset(name for name in names if rng.random() < 0.35)
        yield affirmed, synthetic_note(rng, affirmed=affirmed, length=length)


def labelled_corpus(n: int, *, seed: int, length: int = 2000) -> list[str]:
    """The notes of `labelled_notes(n, seed=seed, length=length)` (for tests and benchmarks)."""
    return [note for _, note in labelled_notes(n, seed=seed, length=length)]


def medspacy_reader(markers: Sequence[Marker]) -> Callable[[str], list[Mention]]:
    """The reference: medspaCy's default pipeline (`medspacy.load()`) with each phrase a TargetRule
    labelled with its marker, as a text -> mentions function. Dev-only (imports medspacy lazily)."""
    import medspacy
    from loguru import logger
    from medspacy.target_matcher import TargetRule

    logger.remove()
    nlp = medspacy.load()
    nlp.get_pipe("medspacy_target_matcher").add(
        [TargetRule(phrase, marker.name) for marker in markers for phrase in marker.phrases])

    def read(text: str) -> list[Mention]:
        return [Mention(e.label_, e.start_char, e.end_char, e._.is_negated, e._.is_hypothetical,
                        e._.is_historical, e._.is_family, e._.is_uncertain) for e in nlp(text).ents]

    return read


FLAGS = ("negated", "hypothetical", "historical", "family", "uncertain")


def disagreements(ours: Sequence[Mention], reference: Sequence[Mention]) -> tuple[int, Counter[str]]:
    """(mentions compared, disagreements by kind) of one note: a mention is a (marker, start, end)
    of either side; kinds are "missed" (reference only), "extra" (ours only) and each flag that differs."""
    mine = {(m.marker, m.start, m.end): m for m in ours}
    theirs = {(m.marker, m.start, m.end): m for m in reference}
    kinds: Counter[str] = Counter()
    for key in theirs.keys() | mine.keys():
        if key not in mine:
            kinds["missed"] += 1
        elif key not in theirs:
            kinds["extra"] += 1
        else:
            kinds.update(f for f in FLAGS if getattr(mine[key], f) != getattr(theirs[key], f))
    return len(theirs.keys() | mine.keys()), kinds
