"""On-site clinical-note NLP: marker mentions with ConText assertion, and hashed n-gram features.

`NoteReader(markers).mentions(text)` finds every mention of a study marker (a set of phrases) and
tells whether it is negated, hypothetical, historical, about a family member or uncertain. It
reproduces what medspaCy 1.3.1's default pipeline (`medspacy.load()`: PyRuSH sentences, the target
matcher, ConText with its default rules) decides, in pure Python + `re`, roughly 50x faster:

* Matching works on spaCy-like tokens without building them: a phrase or cue matches whole tokens,
  case-insensitively, consecutive tokens separated by at most one space (a double space, tab or
  newline is a token of its own and breaks a phrase); punctuation is a token of its own ("h/o",
  ": none", "self-worth"), and the contractions of spaCy's English tokenizer split as it does
  ("cannot" -> can + not, "doesn't" -> does + n't; the curly "n’t" is not "n't").
* Overlapping matches are pruned as medspaCy does (pairwise, the longer in tokens wins, repeated
  until stable), targets among targets and cues among cues; a cue overlapping a target does not
  modify that target but keeps its scope and still modifies the other targets in it.
* A cue's scope runs to the sentence end (forward), from the sentence start (backward) or over the
  whole sentence (bidirectional). Pairs of cues in a sentence, in text order, cut each other's scope:
  a termination cue ("but", "however", "although", "because", "presents", ...) cuts every other cue,
  and a cue cuts another cue of its own category ("no SI, no HI": the first "no" stops at the second).
* Sentences follow a regex approximation of PyRuSH's rules and of how it assembles them: a sentence
  begins at a begin clue (". " + capital, a new line + capital, a bullet, ...) only if an end clue
  lies between it and the previous begin, so "Denies SI/HI. Pt ..." stays one sentence as in PyRuSH.

Positions are kept as character offsets in which a token boundary is the start of the next token,
so that medspaCy's token-index comparisons carry over exactly. The default lexicon `DEFAULT_CUES`
is medspaCy's default rule set in this module's own notation; medspaCy 1.3.1 ships no pseudo cues
and no rule with a max_scope, so neither does the default (a `Direction.PSEUDO` cue is supported:
it matches, wins overlaps and cuts same-category scopes, but modifies nothing).

`hashed_ngrams` turns a note into a fixed-length count vector without a vocabulary. Everything here
is immutable after construction and thread-safe; no note text is logged.
"""

from __future__ import annotations

import bisect
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np


class Category(Enum):
    """What a ConText cue asserts about the targets in its scope."""

    NEGATED = "negated"
    HYPOTHETICAL = "hypothetical"
    HISTORICAL = "historical"
    FAMILY = "family"
    UNCERTAIN = "uncertain"


class Direction(Enum):
    """Where a cue's scope lies relative to the cue, or what the cue does instead."""

    FORWARD = "forward"
    BACKWARD = "backward"
    BIDIRECTIONAL = "bidirectional"
    TERMINATE = "terminate"
    PSEUDO = "pseudo"


@dataclass(frozen=True)
class Marker:
    """A study marker: case-insensitive whole-word phrases that mention it."""

    name: str
    phrases: tuple[str, ...]


@dataclass(frozen=True)
class Mention:
    """One mention of a marker: character offsets [start, end) and its ConText assertions."""

    marker: str
    start: int
    end: int
    negated: bool
    hypothetical: bool
    historical: bool
    family: bool
    uncertain: bool

    @property
    def affirmed(self) -> bool:
        """True when the mention is none of negated, hypothetical, historical, family, uncertain."""
        return not (self.negated or self.hypothetical or self.historical or self.family or self.uncertain)


@dataclass(frozen=True)
class Cue:
    """A ConText cue. `pattern`: token slots separated by spaces, alternatives by "|", a trailing
    "?" makes a slot optional; e.g. "no new|other? evidence of|for?"."""

    pattern: str
    category: Category
    direction: Direction


# medspaCy 1.3.1's default ConText rules (resources/en/context_rules.json), in the notation above.
# Its rule "risks of" ({"LOWER": {"IN": ["risks of", "risk of"]}}) can never match a single token,
# so it is left out. Columns: category, direction, pattern.
_LEXICON = """
neg fwd absence of
neg fwd adequate|sufficient to rule him|her|them|patient|pt? out against|for?
neg fwd adequate|sufficient to rule the patient|pt out against|for?
neg fwd any other
neg fwd as well as any
neg fwd can|did rule him|her|them|patient|pt? out against|for?
neg fwd can|did rule the patient|pt out against|for?
neg fwd checked for
neg fwd clear of
neg fwd decline|declined|declines|declining
neg fwd deny|denied|denies|denying
neg fwd does|did not|n't look like
neg fwd evaluate for
neg fwd fails to reveal
neg fwd free of
neg fwd inconsistent with
neg fwd lack of
neg fwd lacked|lacking
neg fwd negative|neg for
neg fwd never developed|had
neg fwd no abnormal|new?
neg fwd no cause|history|findings|complaints|sign|signs|suggestion of|for
neg fwd no findings to indicate
neg fwd no new|other? mammographic|radiographic? evidence of|for?
neg fwd no significant|suspicious
neg fwd not|n't appear|appreciate|demonstrate|exhibit|feel|had|have|reveal|see?
neg fwd not|n't associated with
neg fwd not|n't complain|know of
neg fwd not|n't have evidence of|for
neg fwd not|n't known to have
neg fwd not|n't to be
neg fwd patient|pt was|is not|n't
neg fwd rather than
neg fwd resolved
neg fwd ruled|rules him|her|them|patient|pt? out against|for?
neg fwd ruled|rules the patient|pt out against|for?
neg fwd test for
neg fwd to exclude
neg fwd unremarkable for
neg fwd was|is|are|can not|n't
neg fwd with no
neg fwd without
neg fwd without any? evidence|indication|sign of|for?
neg bwd are|is|was ruled out
neg bwd free
neg bwd has been negative
neg bwd has|have been ruled out
neg bwd no longer present
neg bwd not|n't significant|suspicious
neg bwd non diagnostic
neg bwd now resolved
neg bwd prophylaxis
neg bwd unlikely
neg bwd was|is|are negative|neg
neg bwd : none
neg bwd : no
neg bwd are not evident
neg bwd negative on
neg term apart for|from
neg term as a|an|the secondary? cause|etiology|source|reason for|of
neg term as has
neg term aside from
neg term but|however|nevertheless|still|except|though|although|yet
neg term cause|causes|reason|reasons|etiology for|of
neg term origin|origins of|for
neg term other possibilities of
neg term secondary to?
neg term source|sources for|of
neg term trigger event for
unc fwd concerned|concerning for|about
unc fwd doubt
unc fwd may|might|must|should|will|could|can? be ruled out for
unc fwd may|might be
unc fwd poss|possible|probably|likely
unc fwd r / o
unc fwd ro
unc fwd may|might|must|should|will|could? rule him|her|them|patient|pt? out against|for?
unc fwd may|might|must|should|will|could? rule the patient|pt out against|for?
unc fwd suggestive of
unc fwd suspicious for
unc fwd what must be ruled out is
unc fwd worrisome for
unc fwd worried about
unc bwd did|could not|n't rule out
unc bwd may|might|must|should|will|could|can? be ruled out
unc bwd not|n't been? ruled out
unc bwd is|ought to be ruled out for|against?
hist fwd history|hx|hist|ho
hist fwd h / o
hist fwd past medical? history
hist term present|presenting|presents
hist term comes in with
hyp fwd as needed
hyp fwd come back for|to
hyp fwd if
hyp fwd return
hyp fwd should she|he|they|patient|pt
hyp fwd should the patient|pt
hyp fwd should there
hyp term because|since
fam fwd aunt|aunts|brother|brothers|child|children|cousin|cousins|dad|dads|daughter|daughters|fam|family|families|father|fathers|grandchild|grandchildren|granddaughter|granddaughters|grandfather|grandfathers|grandmother|grandmothers|grandparent|grandparents|grandson|grandsons|husband|mom|moms|mother|mothers|nephew|nephews|niece|nieces|parent|parents|partner|sibling|siblings|sister|sisters|son|sons|spouse|uncle|uncles|wife 's|'?
"""
_CATEGORIES = {"neg": Category.NEGATED, "unc": Category.UNCERTAIN, "hist": Category.HISTORICAL,
               "hyp": Category.HYPOTHETICAL, "fam": Category.FAMILY}
_DIRECTIONS = {"fwd": Direction.FORWARD, "bwd": Direction.BACKWARD, "bi": Direction.BIDIRECTIONAL,
               "term": Direction.TERMINATE, "pseudo": Direction.PSEUDO}
DEFAULT_CUES: tuple[Cue, ...] = tuple(
    Cue(pattern, _CATEGORIES[cat], _DIRECTIONS[direction])
    for cat, direction, pattern in (line.split(" ", 2) for line in _LEXICON.strip().splitlines())
)

# Words after which spaCy's English tokenizer splits "n't" off ("doesn't" -> "does", "n't").
_NT_HOSTS = ("ai", "are", "ca", "could", "dare", "did", "does", "do", "had", "has", "have", "is", "may", "might",
             "must", "need", "ought", "sha", "should", "was", "were", "wo", "would")
_ALNUM_BEFORE = r"(?<![^\W_])"
_TOKEN_SPLIT = re.compile(r"[^\W_]+|n't|'s|[^\w\s]|_")


def _tokens(phrase: str) -> tuple[str, ...]:
    """A phrase as spaCy-like tokens: alphanumeric runs and single punctuation characters."""
    return tuple(_TOKEN_SPLIT.findall(phrase.lower()))


# Where spaCy's tokenizer starts a word token: not glued to a letter/digit, nor to "x." (one token
# unless "lower.Upper"), nor to a curly quote after a letter, nor to "-", "/", ... opening a chunk ("-no").
_WORD_LEFT = (r"(?<![^\W_])(?<![^\W_][\u2018\u2019\u201c\u201d])(?<!(?<![^\W_])[-/@\\^|~])"
              r"(?:(?<![^\W_]\.)|(?-i:(?<=[a-z]\.)(?=[A-Z])))")
_QUOTES = "\"'`\u2018\u2019\u201c\u201d"
# a word glued to a "." keeps it unless the "." ends the chunk (up to closing punctuation) or "lower.Upper"
_NO_DOT = r"(?!\.(?![.)\]}\"',;:!?]*(?:\s|\Z)|(?-i:(?<=[a-z" + _QUOTES + r"]\.)[A-Z" + _QUOTES + r"])))"
_WORD_RIGHT = r"(?![^\W_])" + _NO_DOT
# spaCy's exceptions split "cannot" and "doesn't" only as a whole chunk (give or take punctuation)
_CHUNK_START = r"(?:(?<![^\s(\[{\"'`\u2018\u201c])|(?<=[^\W_]-))"
_CHUNK_END = r"(?:[.,;:!?)\]}\"'\u2019\u201d]*(?:\s|\Z)|-)"


def _token_regex(alts: Sequence[str]) -> str:
    """One token slot: any of `alts` as a whole spaCy-like token."""
    out = []
    for alt in alts:
        word = re.escape(alt)
        if alt == "n't":
            hosts = "|".join(f"(?<={_CHUNK_START}{h})|(?<={_CHUNK_START}{h.capitalize()})" for h in _NT_HOSTS)
            out.append(f"(?-i:(?:{hosts})n't)(?={_CHUNK_END})")
        elif not alt[0].isalnum():
            out.append(word + (_WORD_RIGHT if alt[-1].isalnum() else ""))
        else:
            plain = _WORD_LEFT + word + (r"(?!(?-i:'t))" if alt == "can" else "") + _WORD_RIGHT
            if alt == "not":
                plain += rf"|(?-i:(?<={_CHUNK_START}[cC]an)not)(?={_CHUNK_END})"
            if alt in _NT_HOSTS:
                plain += rf"|{_CHUNK_START}{word}(?-i:(?=n't{_CHUNK_END}))"
            if alt == "can":
                plain += rf"|{_CHUNK_START}can(?-i:(?=not{_CHUNK_END}))"
            out.append(plain)
    return "(?:" + "|".join(out) + ")"


def _variants(pattern: str) -> list[tuple[tuple[str, ...], ...]]:
    """Every token-slot sequence a pattern can match: each optional slot present or absent."""
    out: list[tuple[tuple[str, ...], ...]] = [()]
    for slot in pattern.split():
        optional = slot.endswith("?") and len(slot) > 1
        alts = tuple(slot[:-1].split("|") if optional else slot.split("|"))
        out = [v + (alts,) for v in out] + (out if optional else [])
    return [v for v in out if v]


@dataclass(frozen=True)
class _Rule:
    regex: re.Pattern[str]
    length: int  # tokens
    label: int


def _trie(words: Sequence[str]) -> str:
    """One regex alternation for many literal words, factored by prefix (much faster in `re`)."""
    if not words:
        return "(?!)"
    groups: dict[str, list[str]] = {}
    for word in sorted(set(words)):
        if word:
            groups.setdefault(word[0], []).append(word[1:])
    parts = [re.escape(c) + (_trie(rest) if rest != [""] else "") if "" not in rest or rest == [""]
             else re.escape(c) + "(?:" + _trie([r for r in rest if r]) + ")?" for c, rest in groups.items()]
    return parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")"


def _candidates(firsts: Sequence[str]) -> re.Pattern[str]:
    """Where a sequence may start, on the lower-cased text: a listed first token at a token start
    (boundaries are rechecked by each sequence's own regex)."""
    words = [f for f in firsts if f[0].isalnum() and f != "can"]
    other = [f for f in firsts if not f[0].isalnum() and f != "n't"]
    alternatives = [_ALNUM_BEFORE + _trie(words)] if words else []
    if "can" in firsts:
        alternatives.append(_ALNUM_BEFORE + "can(?!'t)")
    if "not" in firsts:
        alternatives.append("(?<=can)not")
    if "n't" in firsts:
        alternatives.append("n't")
    if other:
        alternatives.append(_trie(other))
    return re.compile("|".join(alternatives) or "(?!)")


class _Matcher:
    """All matches of many token sequences: one regex finds candidate first tokens, then the
    sequences starting with that token are tried there (so overlapping matches are all found)."""

    def __init__(self, sequences: Sequence[tuple[tuple[tuple[str, ...], ...], int]]) -> None:
        by_first: dict[str, list[_Rule]] = {}
        for slots, label in sequences:
            rule = _Rule(re.compile(" ?".join(_token_regex(s) for s in slots), re.IGNORECASE), len(slots), label)
            for alt in dict.fromkeys(a.lower() for a in slots[0]):
                by_first.setdefault(alt, []).append(rule)
        self._rules = {first: tuple(rules) for first, rules in by_first.items()}
        self._first = _candidates(list(self._rules))

    def find(self, text: str, lower: str, pos: int = 0, endpos: int | None = None) -> list[tuple[int, int, int, int]]:
        """(start, boundary end, length in tokens, label) of every match in text[pos:endpos], sorted;
        `lower` is `text` lower-cased character by character (same offsets)."""
        end = len(text) if endpos is None else endpos
        found = []
        rules = self._rules
        for m in self._first.finditer(lower, pos, end):
            start = m.start()
            for rule in rules.get(m.group(), ()):
                hit = rule.regex.match(text, start, end)
                if hit is not None:
                    stop = hit.end()
                    found.append((start, stop + 1 if text[stop:stop + 1] == " " else stop, rule.length, rule.label))
        found.sort()
        return found


def _lower(text: str) -> str:
    """`text` lower-cased without changing any offset (a character whose lower case is longer stays)."""
    lower = text.lower()
    return lower if len(lower) == len(text) else "".join(c if len(c.lower()) != 1 else c.lower() for c in text)


def _overlaps(a0: int, a1: int, b0: int, b1: int) -> bool:
    """medspaCy's span overlap test, on [start, end) pairs."""
    return a0 <= b0 < a1 or a0 < b1 <= a1


def _prune(matches: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """medspaCy's overlap pruning: neighbours that overlap keep the longer (the first on a tie),
    pass after pass until a pass removes nothing."""
    while True:
        kept, i, n = [], 0, len(matches)
        while i < n:
            cur = matches[i]
            if i + 1 < n and _overlaps(cur[0], cur[1], matches[i + 1][0], matches[i + 1][1]):
                nxt = matches[i + 1]
                kept.append(nxt if nxt[2] > cur[2] else cur)
                i += 2
            else:
                kept.append(cur)
                i += 1
        if len(kept) == n:
            return kept
        matches = kept


_FLAG = {Category.NEGATED: 1, Category.HYPOTHETICAL: 2, Category.HISTORICAL: 4, Category.FAMILY: 8,
         Category.UNCERTAIN: 16}


def _scopes(cues: list[tuple[int, int, int, int]], kinds: Sequence[tuple[Direction, Category]],
            lo: int, hi: int) -> list[list[int]]:
    """The scopes [start, end) of one sentence's cues after they have cut each other (ConText)."""
    scopes = []
    for start, end, _, label in cues:
        direction = kinds[label][0]
        if direction is Direction.FORWARD:
            scopes.append([end, hi])
        elif direction is Direction.BACKWARD:
            scopes.append([lo, start])
        else:
            scopes.append([lo, hi])
    for i in range(len(cues) - 1):
        for j in range(i + 1, len(cues)):
            _cut(cues[i], scopes[i], cues[j], scopes[j], kinds)
            _cut(cues[j], scopes[j], cues[i], scopes[i], kinds)
    return scopes


def _cut(cue: tuple[int, int, int, int], scope: list[int], other: tuple[int, int, int, int],
         other_scope: list[int], kinds: Sequence[tuple[Direction, Category]]) -> None:
    """Let `other` cut `cue`'s scope: if their scopes overlap and `other` terminates or shares the category."""
    direction, category = kinds[cue[3]]
    other_direction, other_category = kinds[other[3]]
    if direction is Direction.TERMINATE or not _overlaps(scope[0], scope[1], other_scope[0], other_scope[1]):
        return
    if other_direction is not Direction.TERMINATE and other_category is not category:
        return
    if direction in (Direction.FORWARD, Direction.BIDIRECTIONAL) and other[0] > cue[0]:
        scope[1] = min(scope[1], other[0])
    if direction in (Direction.BACKWARD, Direction.BIDIRECTIONAL) and other[1] < cue[1]:
        scope[0] = max(scope[0], other[1])


# Sentences: an approximation of PyRuSH's rules (resources/en/rush_rules.tsv). A begin clue is where a
# sentence may start, an end clue the character a sentence may end with; "W" is PyRuSH's \s (no newline).
_W = r"[ \t\xa0]"
_PRONOUN = "He|His|Her|She|We|Our|They|Their|I|My|But|This|That|this|that|he|she|we|our|his|her|they|their|my|but"
_DOSING = "".join(rf"(?<!\s{a}\.)" for a in ("b\\.i\\.d", "t\\.i\\.d", "q\\.i\\.d", "q\\.d", "bid", "tid", "qid", "qd"))
# Clues as (leading literal, alternatives after it): `re` skips quickly to the literals.
_BEGIN_RULES = (  # a sentence may begin where the match ends
    (r"\.", (r"(?<=[a-z)\d]\.)W+(?=[A-Z])", r"(?<=[A-Z]{3}\.)W+(?=[A-Z][a-z])", r"\"(?<=[a-z]\.\")W+(?=[A-Z])",
             r"W+(?=The|Now |Discharge |\d\.W*[A-Z])", r"\s+(?=\"|(?:" + _PRONOUN + ") )",
             r"(?<=[a-z]\.)W+(?=-W+[A-Z])", r"(?<=[a-z]W\.)W+(?=[A-Z][a-z])",
             r"(?<=\dW\.)W+(?=[A-Z])", r"(?<=[a-z]{2}\.)(?:W+|\n\s+)(?=[a-z])", r"(?<=[a-z]{2}\.)W*\n+W*(?=[a-z]|\d)",
             r"(?<=[a-z]\.)\n+W*(?=\d)")),
    (r"[?!]", (r"W+(?=[A-Z][a-z]|\d)",)),
    (r"\n", (r"\n*(?= [A-Z])", r"\n*W{0,4}(?=[A-Z])", r"(?=[-#*?.+/] ?[A-Za-z])", r"(?=\d+\.W*[A-Za-z]|\d\d?\)W*[A-Za-z]|\(\d\)W+[A-Z]|\"[A-Z])",
             r"(?<=[a-z]:\n)\n*(?=\S)", r"(?<=[a-z]:W\n)(?=\S)", r"(?<=[A-Z]{3}:\n)\n*(?=[a-z])",
             r"(?<=[A-Z\d]:\n)\n*(?=\d)", r"\n*(?=[a-z]+:)", r"(?<=\n\n)(?=\d+W)")),
)
_BEGIN_AT_RULES = ((r"-", (r"(?<=[a-z]W-)(?=W+[A-Z])",)),)  # a sentence may begin where the match starts
_ITEM_RULES = (  # list items "2. Continue": one (wide) begin clue at the number, none at "Continue"
    (r"\.", (r"W+(?=\d\.W*[A-Z])",)),
    (r"\n", (r"W+(?=\d\d?\.W+[A-Z])", r"(?<=\S\n)\n*(?=\d\.W+[A-Z])", r"(?<=\n\n)(?=\d+\.W+[A-Z])",
             r"(?=\d+\.(?:[A-Z]|W+[a-z]))")),
)
_ITEM = re.compile(r"\d+\.[ \t\xa0]*(?=[A-Za-z])")
_LOWER_NEXT = r"(?:[a-z]|\d+(?:\.\d+)?W+[a-z]{2})"  # "\c\n+\c" and "\c\n+\d+\s+\c\c" are no end clue
_END_RULES = (  # end clues: the match's first character (AT), the last one before it (LINE), or that + the match (WIDE)
    ("WIDE", r"\n", (r"(?<=\S\n)(?:(?<![a-z]\n)|(?!\n*W*" + _LOWER_NEXT + r"))\n",
                     r"(?<=\SW\n)(?:(?<![a-z]W\n)|(?!\n*W*" + _LOWER_NEXT + r"))\n",
                     r"(?<=[a-z]\n)\n*[a-z]{2,}:")),
    ("AT", r"\.", (r"(?<=\S\.)(?<!Mr\.)(?<!Ms\.)(?<!Mrs\.)(?<!Miss\.)(?<!\sDr\.)(?<!\sdr\.)(?<!\smr\.)(?<!\sms\.)(?<!\smrs\.)"
                   r"(?<!\sphd\.)(?<!\spulm\.)(?<!\n\d\.)(?<!\n\d\d\.)(?<!\n\d\d\d\.)(?<!\n\d{4}\.)(?:(?i:" + _DOSING + r")|(?!W+[a-z]))(?=W)",
                   r"(?<=[a-z]W\.)(?=W+[A-Z][a-z])", r"(?<=[A-Za-z\d)\]]\.)(?=W*\n)",
                   r"(?=\s+(?:He|His|Her|She|We|Our|The|They|Their|I|My) |W+The)")),
    ("AT", r"\?", (r"(?<=[A-Za-z\d]\?)(?=\s)",)),
    ("SPAN", r"\.", (r"W+\d\.W+[A-Z]",)),
    ("WIDE", r"-", (r"(?<=[a-z]W-)W+[A-Z]",)),
    ("AT", r"\"", (r"(?<=[a-z]\.\")(?=W+[A-Z])",)),
    ("AT", r":", (r"(?<=[A-Za-z\d]:)(?:(?<!\sis:)(?<!are:)(?<!was:)(?<!were:)|(?!W*\n+W*[a-z]))(?=W*\n)",)),
    ("LINE", r"\.", (r"(?<=\d{4}W\.)(?=W+[A-Z])",)),
    ("LINE", r"\n", (r"(?:(?<=[a-z]{2}\n)|(?<=[a-z]{2}W\n))(?<!\sand\n)(?<!\sandW\n)\n*(?= ?[A-Z])", r"(?<=\SW\n)\n*(?=-)",
                     r"(?<=[a-z]\n)(?=- [A-Za-z])",
                     r"(?:(?<=\S\n)|(?<=\SW\n))\n*(?=(?:[A-Z][a-z]+(?:W+[A-Z][a-z]+)?|[A-Z]{2,}|[A-Z]):)",
                     r"(?<=\d\n)\n*(?=[A-Z]{2})", r"(?<=\S\n)\n*(?=\d\.W+[A-Z]|(?:T|P|R|BP|O2)W)",
                     r"(?:(?<=\S\n)|(?<=\SW\n))\n*(?=Signed\s|Follow)")),
)


def _clues(rules: Sequence[tuple[str, Sequence[str]]]) -> re.Pattern[str]:
    return re.compile("|".join(lead + "(?:" + "|".join(rests) + ")" for lead, rests in rules).replace("W", _W))


_BEGIN, _BEGIN_AT, _ITEMS = _clues(_BEGIN_RULES), _clues(_BEGIN_AT_RULES), _clues(_ITEM_RULES)
_ENDS = tuple((kind, _clues([(lead, rests) for k, lead, rests in _END_RULES if k == kind]))
              for kind in ("AT", "SPAN", "LINE", "WIDE"))


def _trim_gap(text: str, lo: int, hi: int) -> list[int] | None:
    """PyRuSH's gap trimming: from the first non-space character to the last text-like one."""
    begin = next((i for i in range(lo, hi) if not text[i].isspace()), -1)
    if begin < 0:
        return None
    end = next((i for i in range(hi - 1, begin, -1) if text[i].isalnum() or text[i] in '.!?)]"'), -1)
    return [begin, end + 1] if end > begin else None


def _add_gap(text: str, spans: list[list[int]], lo: int, hi: int) -> None:
    """Text between sentences is a sentence of its own if long enough, else it joins the previous one."""
    gap = _trim_gap(text, lo, hi)
    if gap is not None and gap[1] - gap[0] > 5:
        spans.append(gap)
    elif gap is not None and spans:
        spans[-1][1] = gap[1]


def _sentence_spans(text: str, begins: list[int], ends: list[tuple[int, int]]) -> list[list[int]]:
    """PyRuSH's assembly of begin and end clues into sentences: a sentence runs from a begin clue to
    the end clues before the next begin clue; begin clues without an end clue in between are merged."""
    spans: list[list[int]] = []
    st_begin = st_end = j = 0
    started = False
    nb, ne = len(begins), len(ends)
    for i, b in enumerate(begins):
        if not started:
            st_begin = b
            if st_begin < st_end:
                continue
            started = True
        elif b < st_end:
            continue
        if spans and st_begin > spans[-1][1]:
            _add_gap(text, spans, spans[-1][1], st_begin)
        elif not spans and st_begin > 0:
            _add_gap(text, spans, 0, st_begin)
        for k in range(j, ne):
            if i < nb - 1 and k < ne - 1 and begins[i + 1] < ends[k][0] + 1:
                break
            st_end, j = ends[k][0] + 1, k
            while st_end >= 1 and text[st_end - 1].isspace():
                st_end -= 1
            if st_end < st_begin:
                continue
            if not started:  # another end clue before the next begin: the sentence grows
                spans[-1] = [st_begin, st_end]
                continue
            spans.append([st_begin, st_end])
            started = False
            if not (i == nb - 1 or (k < ne - 1 and begins[i + 1] > ends[k + 1][1])):
                break
    if spans:
        head = _trim_gap(text, 0, spans[0][0])
        if head is not None and spans[0][0] <= ends[0][0]:
            spans[0][0] = head[0]
        elif head is not None:
            spans.insert(0, head)
        _add_gap(text, spans, spans[-1][1], len(text))
    else:
        _add_gap(text, spans, 0, len(text))
    return spans


def _sentence_bounds(text: str) -> list[int]:
    """Sorted token-boundary offsets where a sentence (or a gap between sentences) starts; 0 first."""
    begins = {m.end() for m in _BEGIN.finditer(text)} | {m.start() for m in _BEGIN_AT.finditer(text)}
    for m in _ITEMS.finditer(text):  # overlapping begin clues: the wider one stands
        begins.add(m.end())
        item = _ITEM.match(text, m.end())
        if item is not None:
            begins.discard(item.end())
    first = len(text) - len(text.lstrip())
    if text[first:first + 1].isupper() or text[first:first + 1].isdigit():
        begins.add(first)
    found = []
    for kind, clues in _ENDS:
        for m in clues.finditer(text):
            e0 = m.start()
            if kind in ("LINE", "WIDE"):
                e0 -= 1
                while text[e0].isspace():
                    e0 -= 1
            found.append((e0, m.end() if kind in ("SPAN", "WIDE") else e0 + 1))
    last = len(text.rstrip()) - 1
    if 0 <= last < len(text) - 1:  # the last character before trailing whitespace
        found.append((last, last + 1))
    ends: list[tuple[int, int]] = []
    for e0, e1 in sorted(found):  # overlapping end clues: the wider one stands
        if ends and e0 < ends[-1][1]:
            if e1 - e0 > ends[-1][1] - ends[-1][0]:
                ends[-1] = (e0, e1)
        else:
            ends.append((e0, e1))
    bounds = {0}
    for s0, s1 in _sentence_spans(text, sorted(begins), ends):
        bounds.add(s0)
        bounds.add(s1 + 1 if text[s1:s1 + 1] == " " else s1)
    return sorted(b for b in bounds if b < len(text))


class NoteReader:
    """Compiled once for a study's markers; `mentions(text)` is the hot path.

    `cues` replaces the ConText lexicon (default: medspaCy's default rules). A phrase listed under
    two markers belongs to the first.
    """

    def __init__(self, markers: Sequence[Marker], *, cues: Sequence[Cue] = DEFAULT_CUES) -> None:
        self._names = tuple(m.name for m in markers)
        phrases: dict[tuple[str, ...], int] = {}
        for index, marker in enumerate(markers):
            for phrase in marker.phrases:
                tokens = _tokens(phrase)
                if not tokens:
                    raise ValueError(f"marker {marker.name!r} has an empty phrase")
                phrases.setdefault(tokens, index)
        self._targets = _Matcher([(tuple((t,) for t in tokens), index) for tokens, index in phrases.items()])
        self._kinds = tuple((c.direction, c.category) for c in cues)
        self._cues = _Matcher([(v, index) for index, cue in enumerate(cues) for v in _variants(cue.pattern)])

    def mentions(self, text: str) -> list[Mention]:
        """Every marker mention in `text`, in text order, with its ConText assertions."""
        lower = _lower(text)
        targets = _prune(self._targets.find(text, lower))
        if not targets:
            return []
        bounds = _sentence_bounds(text)
        flags = [0] * len(targets)
        done: set[int] = set()
        for t_start, _, _, _ in targets:
            k = bisect.bisect_right(bounds, t_start) - 1
            if k in done:
                continue
            done.add(k)
            lo, hi = bounds[k], bounds[k + 1] if k + 1 < len(bounds) else len(text)
            self._assert(text, lower, lo, hi, targets, flags)
        names = self._names
        return [Mention(names[label], start, _raw_end(text, end), bool(f & 1), bool(f & 2), bool(f & 4),
                        bool(f & 8), bool(f & 16))
                for (start, end, _, label), f in zip(targets, flags)]

    def _assert(self, text: str, lower: str, lo: int, hi: int, targets: list[tuple[int, int, int, int]], flags: list[int]) -> None:
        """Set the flags of the targets in sentence [lo, hi) from the cues of that sentence."""
        cues = _prune(self._cues.find(text, lower, lo, hi))
        if not cues:
            return
        kinds = self._kinds
        scopes = _scopes(cues, kinds, lo, hi)
        for i, (t0, t1, _, _) in enumerate(targets):
            if t0 < lo or t0 >= hi:
                continue
            for (c0, c1, _, label), (s0, s1) in zip(cues, scopes):
                direction, category = kinds[label]
                if direction is Direction.TERMINATE or direction is Direction.PSEUDO:
                    continue
                if _overlaps(c0, c1, t0, t1) or not _overlaps(s0, s1, t0, t1):
                    continue
                flags[i] |= _FLAG[category]


def _raw_end(text: str, end: int) -> int:
    """A boundary end (start of the next token) back to the end of the match's last character."""
    return end - 1 if end > 0 and text[end - 1] == " " else end


_GRAM_TOKEN = re.compile(r"[a-z0-9]+")


def hashed_ngrams(text: str, *, dimension: int, ngrams: int, salt: str) -> np.ndarray:
    """float64 counts, length `dimension`, of the note's word n-grams (1..`ngrams`) hashed into buckets.

    Feature hashing, no vocabulary. Exactly: tokens are the maximal runs of ASCII [a-z0-9] in
    `text.lower()`; a k-gram is its k consecutive tokens joined by one space; its bucket is
    int.from_bytes(blake2b(salt.encode() + b"\\x00" + gram.encode(), digest_size=8).digest(), "little")
    % dimension, and each occurrence adds 1.0 to its bucket. Deterministic across processes,
    machines and Python versions (no builtin hash()); a different `salt` gives unrelated buckets.
    """
    if dimension < 1 or ngrams < 1:
        raise ValueError("dimension and ngrams must be >= 1")
    tokens = _GRAM_TOKEN.findall(text.lower())
    base = hashlib.blake2b(digest_size=8)
    base.update(salt.encode("utf-8") + b"\x00")
    buckets: list[int] = []
    for k in range(1, ngrams + 1):
        for i in range(len(tokens) - k + 1):
            h = base.copy()
            h.update(" ".join(tokens[i:i + k]).encode("utf-8"))
            buckets.append(int.from_bytes(h.digest(), "little") % dimension)
    return np.bincount(np.asarray(buckets, dtype=np.int64), minlength=dimension).astype(np.float64)
