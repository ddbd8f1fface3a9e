"""What the coordinator's ServerApp and a site's ClientApp say to each other, in one place.

Every training message is a SecAgg+ round (Flower's `fit`), configured by a `RoundConfig`:

    study_hash  the study as the coordinator runs it; a site refuses any other
    phase       `Phase`: STATISTICS (federated standardization), TRAIN (DP-SGD), EVALUATE (final model)
    round       the training round (0 in the statistics round, R in the evaluation round)
    scaling     the run's federated scaling (float64 centers then scales), once known

A config without a known phase is refused (`RefusalKind.PROTOCOL`), never trained on.

The site's reply is one vector for SecAgg+ to mask, laid out by `VectorLayout` (the model's
arrays, then the weight, the evaluation block and the statistics block; the arithmetic is in
`fedcare.contribution`). When a site declines, its reply is an error whose code is
`REFUSAL_CODE` and whose reason is a `Refusal` as JSON (kind and message): the coordinator reads
the kind from that field, never from the text. The message that leaves the site is the refusal's
`shared` text, which never holds a per-site value (a size, a spent or projected ε, a model value);
the full message stays in the site's log.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedcare.errors import FedcareError

REFUSAL_CODE = 4210  # the `Error.code` of a reply in which a site declines (Flower's own codes are < 100)


class Phase(enum.Enum):
    """What a SecAgg+ round of a study does."""

    STATISTICS = "statistics"  # per-feature count, Σz, Σz² of the training rows (no training, no ε)
    TRAIN = "train"  # DP-SGD round, carrying the evaluation of the model it started from
    EVALUATE = "evaluate"  # evaluation of the final model only (no training, no ε)


class RefusalKind(enum.Enum):
    """Why a site declines a round."""

    BUDGET = "budget"  # the round would exceed the site's privacy budget (it declines every later round too)
    POLICY = "policy"  # the study or the round is outside the site's policy (δ, accepted studies, cohort, threshold)
    STUDY = "study"  # the coordinator runs another study than the site's copy
    GUARD = "guard"  # the message would expose the site's update outside SecAgg+
    DATA = "data"  # the site's data cannot take part (size above max_weight, changed since the run began)
    LEDGER = "ledger"  # the site's privacy ledger failed verification: training is blocked
    PROTOCOL = "protocol"  # the message is not a round this protocol knows
    CLIPPING = "clipping"  # the update would exceed SecAgg+'s clipping range (it would be clipped silently)
    APP = "app"  # the run's App (its code) is not one the site approved: none of it was run


# Refusals a site repeats for every later round of the run: its budget, its policy, its copy of the
# study, its approval of the App, its ledger and its data do not change between rounds.
PERMANENT_REFUSALS = frozenset({RefusalKind.BUDGET, RefusalKind.POLICY, RefusalKind.STUDY, RefusalKind.APP,
                                RefusalKind.LEDGER, RefusalKind.DATA})


class Refusal(FedcareError, RuntimeError):
    """A site declines a request; `kind` says why in a machine-readable way, the message in words.

    `shared` is what the coordinator may read: the message without any per-site value (default:
    the message itself, for refusals that hold none). `site` is the refusing site's name as the site
    itself states it (its kit's name; its folder's in simulation), so the coordinator's operator can
    tell who declined and why in one line.
    """

    def __init__(self, kind: RefusalKind, message: str, *, shared: str | None = None, site: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.shared = message if shared is None else shared
        self.site = site

    @property
    def permanent(self) -> bool:
        """Whether the site will refuse every later round of this run for the same reason."""
        return self.kind in PERMANENT_REFUSALS

    def reason(self) -> str:
        """The error reason of the reply that carries this refusal (kind, the shared message, the site's name)."""
        fields = {"refusal": self.kind.value, "message": self.shared}
        if self.site:
            fields["site"] = self.site
        return json.dumps(fields)

    @classmethod
    def from_reply(cls, code: int, reason: str) -> Refusal | None:
        """The refusal carried by an error reply, or None if the reply is another kind of error."""
        if code != REFUSAL_CODE:
            return None
        try:
            fields = json.loads(reason)
            return cls(RefusalKind(fields["refusal"]), str(fields["message"]), site=str(fields.get("site", ""))[:80])
        except (ValueError, KeyError, TypeError):
            return cls(RefusalKind.PROTOCOL, f"unreadable refusal: {reason[:200]}")


@dataclass(frozen=True)
class RoundConfig:
    """The configuration of one SecAgg+ round, as it travels in Flower's fit config."""

    study_hash: str
    phase: Phase
    round: int
    scaling: bytes | None = None

    def to_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"study_hash": self.study_hash, "phase": self.phase.value, "round": self.round}
        if self.scaling is not None:
            config["scaling"] = self.scaling
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RoundConfig:
        """Read a round's config; anything this protocol does not know is refused."""
        try:
            phase = Phase(config["phase"])
        except (KeyError, ValueError, TypeError):
            raise Refusal(RefusalKind.PROTOCOL, f"round config has no known phase (got {config.get('phase')!r}); "
                                                "the site does not train on a message it cannot read") from None
        study_hash, training_round, scaling = config.get("study_hash"), config.get("round"), config.get("scaling")
        if not isinstance(study_hash, str) or isinstance(training_round, bool) or not isinstance(training_round, int):
            raise Refusal(RefusalKind.PROTOCOL, "round config needs a study_hash (text) and a round (integer)")
        if scaling is not None and not isinstance(scaling, bytes):
            raise Refusal(RefusalKind.PROTOCOL, "round config: scaling must be bytes")
        return cls(study_hash=study_hash, phase=phase, round=training_round, scaling=scaling)


@dataclass(frozen=True)
class VectorLayout:
    """Where each part of a site's masked vector is: `model_arrays` arrays of the model, then three blocks.

    Index    part
    0..k-1   w·Δ, the site's weighted model delta (one array per model parameter)
    k        [w], the site's weight (n_train / max_weight; 0 when it trains nothing)
    k+1      the evaluation block: negatives per score bin, positives per score bin, Σ log-loss
    k+2      the statistics block: per feature count, Σz, Σz²
    """

    model_arrays: int
    bins: int
    features: int

    @property
    def length(self) -> int:
        """Arrays in the vector."""
        return self.model_arrays + 3

    @property
    def weight(self) -> int:
        return self.model_arrays

    @property
    def evaluation(self) -> int:
        return self.model_arrays + 1

    @property
    def statistics(self) -> int:
        return self.model_arrays + 2

    @property
    def evaluation_size(self) -> int:
        return 2 * self.bins + 1

    @property
    def statistics_size(self) -> int:
        return 3 * self.features

    def split(self, vector: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
        """(weighted delta, weight, evaluation block, statistics block) of a vector; refuses a wrong length."""
        if len(vector) != self.length:
            raise ValueError(f"vector has {len(vector)} arrays; the study's layout has {self.length}")
        k = self.model_arrays
        return list(vector[:k]), vector[self.weight], vector[self.evaluation], vector[self.statistics]
