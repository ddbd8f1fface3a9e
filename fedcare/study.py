"""The study file: feature spec, label, model, training, privacy and SecAgg+ parameters.

`load_study(path)` parses and validates one TOML file into a frozen `Study`. Every
validation failure raises `StudyConfigError` with one line naming the file and field.
`Study.hash` is a stable SHA-256 over the parsed values (not the text), so comments and
key order do not change it; every party compares it before training. `Study.budget_key` is the
same without the run's overrides (rounds, ε): a site's ledger spends one budget per study under it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedcare.errors import StudyConfigError
from fedcare.fields import Fields
from fedcare.files import parse_toml_text, read_toml_text
from fedcare.study_toml import render_toml

if TYPE_CHECKING:
    from fedcare.notes_spec import NotesSpec
    from fedcare.mapping import Mapping
    from fedcare.omop import OmopMapping

FEATURE_TYPES = ("numeric", "count", "binary")
MISSING_POLICIES = ("impute", "indicator", "reject")
STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadagrad", "fedadam", "fedyogi")
# Each optional [strategy] field: the strategies that use it and its default for each (what a study
# that leaves the field out gets). Flower 1.42's own defaults for FedAvgM, FedAdagrad, FedAdam, FedYogi,
# except FedAvgM's momentum (Flower's 0.0 would make it FedAvg; 0.9 as in Hsu et al. 2019) and FedProx's
# μ (Flower has none). A field a strategy does not use is None in `Strategy`, and an error in the file.
STRATEGY_DEFAULTS: dict[str, dict[str, float]] = {
    "server_learning_rate": {"fedavg": 1.0, "fedavgm": 1.0, "fedprox": 1.0,
                             "fedadagrad": 0.1, "fedadam": 0.1, "fedyogi": 0.01},
    "server_momentum": {"fedavgm": 0.9},
    "proximal_mu": {"fedprox": 0.01},
    "beta1": {"fedadagrad": 0.0, "fedadam": 0.9, "fedyogi": 0.9},
    "beta2": {"fedadam": 0.99, "fedyogi": 0.99},
    "tau": {"fedadagrad": 1e-9, "fedadam": 1e-9, "fedyogi": 1e-3},
}
OPTIMIZERS = ("sgd", "adam")
STANDARDIZATIONS = ("spec", "federated")
ACCOUNTANTS = ("prv", "rdp")
# The largest per-site target ε a study (`privacy.epsilon`) or a run (`--epsilon`) may ask for: the
# accepted range is 0 < ε <= EPSILON_MAX. Each site plans σ for it with the study's accountant
# before training (`privacy/accounting.py`). Measured on a loaded 2-core machine
# (`bench/plan_sigma.py`, BENCHMARKS.md): up to 20, at most 0.44 s and 30 MiB for any accepted
# study (sites up to 1M rows, batch 1, 201 rounds, either accountant), 4.5x under the 2 s goal;
# above it PRV's grid keeps growing with ε (1.1-1.5 s at ε 30); Opacus' own search grows much
# faster (7 s at ε 20, 21 s at ε 100, ~10 GB at ε 500). A larger ε is hardly a guarantee anyway.
EPSILON_MAX = 20.0


@dataclass(frozen=True)
class Feature:
    """One model input as every site must derive it."""

    name: str
    type: str
    unit: str
    low: float
    high: float
    missing: str
    center: float
    scale: float


@dataclass(frozen=True)
class Label:
    name: str
    description: str


MODEL_KINDS = ("mlp", "logistic")


@dataclass(frozen=True)
class ModelSpec:
    kind: str
    hidden: tuple[int, ...]
    seed: int


@dataclass(frozen=True)
class Training:
    rounds: int
    local_epochs: int
    batch_size: int
    optimizer: str
    learning_rate: float
    momentum: float


@dataclass(frozen=True)
class PrivacyTargets:
    """Per-site DP-SGD targets for the whole study (all its runs together).

    `reserve_rounds`: rounds beyond `training.rounds` that σ is planned for, so that rounds charged
    at a site but never aggregated (a crashed coordinator; the study resumed in a new run) still
    leave room to complete every planned round within ε.
    """

    epsilon: float
    delta: float
    clipping_norm: float
    accountant: str
    reserve_rounds: int = 1


@dataclass(frozen=True)
class SecureAggregation:
    """SecAgg+ parameters (Flower's `SecAggPlusWorkflow`)."""

    num_shares: float | int
    reconstruction_threshold: float | int
    max_weight: float
    clipping_range: float
    quantization_range: int
    timeout_seconds: float


@dataclass(frozen=True)
class Strategy:
    """How the coordinator turns each round's secure aggregate into the next global model (`strategies/`,
    README "Strategies"). The optional fields are None where the strategy does not use them
    (`STRATEGY_DEFAULTS`); None fields are neither hashed nor rendered, so adding a field never
    changes the hash of a study that does not use it."""

    name: str
    server_learning_rate: float  # η on the aggregate delta (every strategy)
    min_sites: int
    server_momentum: float | None = None  # fedavgm: β of v_t = β v_{t-1} + Δ_t
    proximal_mu: float | None = None  # fedprox: μ of the sites' proximal term μ/2 ‖w − w_global‖²
    beta1: float | None = None  # fedadagrad, fedadam, fedyogi: decay of the first moment
    beta2: float | None = None  # fedadam, fedyogi: decay of the second moment
    tau: float | None = None  # fedadagrad, fedadam, fedyogi: adaptivity (added to √v)


@dataclass(frozen=True)
class Study:
    name: str
    description: str
    label: Label
    features: tuple[Feature, ...]
    model: ModelSpec
    training: Training
    privacy: PrivacyTargets
    secure_aggregation: SecureAggregation
    strategy: Strategy
    standardization: str = "spec"  # "spec": center/scale as written; "federated": from SecAgg+ sums
    mapping_source: dict[str, Any] | None = None  # the [mapping] table as written (FHIR derivation)
    notes_source: dict[str, Any] | None = None  # the [notes] table as written (markers, hashed n-grams)
    omop_source: dict[str, Any] | None = None  # the [omop] table as written (OMOP CDM derivation)
    scaled_from: str = ""  # set by with_scaling: the hash of the study as defined (a run's scaling keeps it)
    scaled_key: str = ""  # set by with_scaling: the budget key of the study as defined

    @functools.cached_property
    def mapping(self) -> Mapping | None:
        """How each feature is derived from FHIR R4 (`fedcare/mapping.py`), or None."""
        if self.mapping_source is None:
            return None
        from fedcare.mapping import parse_mapping

        hashed = set(self.hashed_feature_names)
        return parse_mapping(self.mapping_source, [f.name for f in self.features if f.name not in hashed],
                             f"study {self.name}")

    @functools.cached_property
    def omop(self) -> OmopMapping | None:
        """How each feature is derived from an OMOP CDM database (`fedcare/omop.py`), or None."""
        if self.omop_source is None:
            return None
        from fedcare.omop import parse_omop

        return parse_omop(self.omop_source, [f.name for f in self.features], f"study {self.name}",
                          default_index_date=self.mapping.index_date if self.mapping is not None else None)

    @functools.cached_property
    def notes(self) -> NotesSpec | None:
        """The linguistic markers and the optional hashed n-gram block (`fedcare/derived.py`), or None."""
        if self.notes_source is None:
            return None
        from fedcare.notes_spec import parse_notes

        return parse_notes(self.notes_source, f"study {self.name}", study_name=self.name)

    @property
    def hashed_feature_names(self) -> tuple[str, ...]:
        """The features `[notes.hashing]` adds after the spec's (none without it)."""
        hashing = self.notes.hashing if self.notes is not None else None
        return hashing.feature_names if hashing is not None else ()

    @functools.cached_property
    def hash(self) -> str:
        """Stable SHA-256 of the study's values (hex). A run's federated scaling does not change it."""
        return self.scaled_from or _digest(self._values())

    @functools.cached_property
    def budget_key(self) -> str:
        """SHA-256 (hex) of the study's values without `training.rounds` and `privacy.epsilon`: the same
        for every run of the study whatever its overrides (and its scaling), so they share one budget."""
        if self.scaled_key:
            return self.scaled_key
        values = self._values()
        del values["training"]["rounds"], values["privacy"]["epsilon"]
        return _digest(values)

    def _values(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        del values["scaled_from"], values["scaled_key"]
        if values["notes_source"] is None:  # studies written before notes existed keep their hash
            del values["notes_source"]
        if values["omop_source"] is None:  # and those written before OMOP too
            del values["omop_source"]
        # a strategy's unused fields (None) are not part of the study: studies written before they
        # existed keep their hash
        values["strategy"] = {k: v for k, v in values["strategy"].items() if v is not None}
        return values

    @property
    def input_names(self) -> list[str]:
        """Model input columns in order: the features, then one indicator per `indicator` feature."""
        indicators = [f"{f.name}_missing" for f in self.features if f.missing == "indicator"]
        return [f.name for f in self.features] + indicators

    def with_overrides(self, overrides: Overrides | None = None, *, rounds: int | None = None,
                       epsilon: float | None = None) -> Study:
        """A copy with the number of rounds and/or the per-site epsilon replaced (validated by `Overrides`)."""
        chosen = overrides if overrides is not None else Overrides(rounds=rounds, epsilon=epsilon)
        training, privacy = self.training, self.privacy
        if chosen.rounds is not None:
            training = dataclasses.replace(training, rounds=chosen.rounds)
        if chosen.epsilon is not None:
            privacy = dataclasses.replace(privacy, epsilon=chosen.epsilon)
        return dataclasses.replace(self, training=training, privacy=privacy)

    def with_scaling(self, center: list[float], scale: list[float]) -> Study:
        """This study with each feature's (center, scale) replaced by a run's federated standardization.
        The hash stays the study's: the scaling is a result of the run, not a different study."""
        if len(center) != len(self.features) or len(scale) != len(self.features):
            raise StudyConfigError(f"scaling: expected {len(self.features)} centers and scales")
        if not all(math.isfinite(c) for c in center) or not all(math.isfinite(x) and x > 0 for x in scale):
            raise StudyConfigError("scaling: centers must be finite and scales finite and > 0")
        features = tuple(dataclasses.replace(f, center=float(c), scale=float(x)) for f, c, x in zip(self.features, center, scale))
        return dataclasses.replace(self, features=features, scaled_from=self.hash, scaled_key=self.budget_key)

    def to_toml(self) -> str:
        """Render this study as a TOML file that `load_study` reads back to an equal Study."""
        return render_toml(self)


@dataclass(frozen=True)
class Overrides:
    """A run's replacements for the study file's values; None keeps the file's.

    They travel in Flower's run config, which has no null: there, and only there, 0 stands for
    "the file's value" (`run_config` / `from_run_config`). Coordinator and sites both apply them
    to their own copy of the study file and compare the resulting hash.
    """

    rounds: int | None = None
    epsilon: float | None = None

    def __post_init__(self) -> None:
        if self.rounds is not None and (isinstance(self.rounds, bool) or self.rounds < 1):
            raise StudyConfigError(f"--rounds: must be >= 1, got {self.rounds}")
        if self.epsilon is not None and not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise StudyConfigError(f"--epsilon: must be a finite number > 0, got {self.epsilon}")
        if self.epsilon is not None and self.epsilon > EPSILON_MAX:
            raise StudyConfigError(f"--epsilon: must be in the accepted range 0 < ε <= {EPSILON_MAX:g}, got {self.epsilon}")

    def run_config(self) -> dict[str, int | float]:
        """The `rounds` / `epsilon` entries of a run config (0 = the file's value)."""
        return {"rounds": self.rounds or 0, "epsilon": float(self.epsilon or 0.0)}

    @classmethod
    def from_run_config(cls, config: dict[str, Any]) -> Overrides:
        rounds = int(config.get("rounds", 0) or 0)
        epsilon = float(config.get("epsilon", 0.0) or 0.0)
        return cls(rounds=rounds or None, epsilon=epsilon or None)


def study_for_run(path: str | Path, run_config: dict[str, Any]) -> Study:
    """The study as a run uses it: the file with the run's overrides (`Overrides.from_run_config`)."""
    return load_study(path).with_overrides(Overrides.from_run_config(run_config))


def load_mapping(study_path: str | Path) -> Mapping:
    """Read a study file and return its validated `[mapping]` (the study itself is validated too)."""
    study = load_study(study_path)
    if study.mapping is None:
        raise StudyConfigError(f"{study_path}: [mapping]: missing section")
    return study.mapping


def load_study(path: str | Path) -> Study:
    """Read and validate a study TOML file. The file is read every time; the same text at the same
    path is parsed once (a simulated site loads its study at every message)."""
    path = Path(path)
    text = read_toml_text(path, StudyConfigError, "study file not found")
    return _parse_text(str(path), text)


@functools.lru_cache(maxsize=16)
def _parse_text(source: str, text: str) -> Study:
    return parse_study(parse_toml_text(text, f"{source}: ", StudyConfigError), source=source)


def parse_study(raw: dict[str, Any], source: str = "<study>") -> Study:
    """Validate an already-parsed TOML document."""
    r = Fields(source)
    study = r.table(raw, "[study]")
    label = r.table(raw, "[label]")
    model = r.table(raw, "[model]")
    training = r.table(raw, "[training]")
    privacy = r.table(raw, "[privacy]")
    secagg = r.table(raw, "[secure_aggregation]")
    strategy = r.table(raw, "[strategy]")

    features = tuple(_feature(r, i, f) for i, f in enumerate(r.array_of_tables(raw, "[[features]]")))
    names = [f.name for f in features]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise StudyConfigError(f"{source}: features[{i}].name: duplicate feature '{name}'")

    shares = r.number(secagg, "secure_aggregation.num_shares", positive=True)
    threshold = r.number(secagg, "secure_aggregation.reconstruction_threshold", positive=True)
    _check_shares(source, shares, threshold)

    parsed = Study(
        name=r.string(study, "study.name"),
        description=r.string(study, "study.description", default=""),
        label=Label(
            name=r.string(label, "label.name"),
            description=r.string(label, "label.description", default=""),
        ),
        features=features,
        model=_model(r, model),
        training=Training(
            rounds=r.integer(training, "training.rounds", minimum=1),
            local_epochs=r.integer(training, "training.local_epochs", minimum=1),
            batch_size=r.integer(training, "training.batch_size", minimum=1),
            optimizer=r.choice(training, "training.optimizer", OPTIMIZERS),
            learning_rate=r.number(training, "training.learning_rate", positive=True),
            momentum=r.number(training, "training.momentum", minimum=0.0, below=1.0),
        ),
        privacy=PrivacyTargets(
            epsilon=_epsilon(r, privacy),
            delta=r.number(privacy, "privacy.delta", positive=True, below=1.0),
            clipping_norm=r.number(privacy, "privacy.clipping_norm", positive=True),
            accountant=r.choice(privacy, "privacy.accountant", ACCOUNTANTS),
            reserve_rounds=r.integer(privacy, "privacy.reserve_rounds", minimum=0, default=1),
        ),
        secure_aggregation=SecureAggregation(
            num_shares=shares,
            reconstruction_threshold=threshold,
            max_weight=r.number(secagg, "secure_aggregation.max_weight", positive=True),
            clipping_range=r.number(secagg, "secure_aggregation.clipping_range", positive=True),
            quantization_range=r.integer(secagg, "secure_aggregation.quantization_range", minimum=2),
            timeout_seconds=r.number(secagg, "secure_aggregation.timeout_seconds", positive=True),
        ),
        strategy=_strategy(r, strategy),
    )
    if parsed.label.name in names:
        raise StudyConfigError(f"{source}: label.name: '{parsed.label.name}' is also a feature name")
    if "standardization" in raw:
        method = r.choice(r.table(raw, "[standardization]"), "standardization.method", STANDARDIZATIONS)
        parsed = dataclasses.replace(parsed, standardization=method)
    notes = None
    if "notes" in raw:
        from fedcare.notes_spec import hashed_features, parse_notes

        if not isinstance(raw["notes"], dict):
            raise StudyConfigError(f"{source}: notes: expected a [notes] table")
        notes = parse_notes(raw["notes"], source, study_name=parsed.name)
        generated = tuple(Feature(**f) for f in hashed_features(notes.hashing)) if notes.hashing is not None else ()
        clash = sorted(set(names) & {f.name for f in generated})
        if clash:
            raise StudyConfigError(f"{source}: features: '{clash[0]}' is a name the hashed n-gram block "
                                   "([notes.hashing]) uses; rename the feature")
        parsed = dataclasses.replace(parsed, features=parsed.features + generated, notes_source=raw["notes"])
    if "mapping" in raw:
        from fedcare.mapping import parse_mapping

        if not isinstance(raw["mapping"], dict):
            raise StudyConfigError(f"{source}: mapping: expected a [mapping] table")
        mapping = parse_mapping(raw["mapping"], names, source)  # every mistake is reported at load, naming the field
        parsed = dataclasses.replace(parsed, mapping_source=raw["mapping"])
        _check_derived(source, mapping, notes)
    elif notes is not None and notes.hashing is not None:
        raise StudyConfigError(f"{source}: notes.hashing: needs a [mapping] (its index_date dates the notes' window)")
    if "omop" in raw:
        from fedcare.omop import parse_omop

        if notes is not None:
            raise StudyConfigError(f"{source}: omop: a study with [notes] derives features from note text and "
                                   "readings, which the OMOP reader does not read yet (docs/OMOP.md)")
        index_date = parsed.mapping.index_date if parsed.mapping_source is not None else None
        parse_omop(raw["omop"], names, source, default_index_date=index_date)  # every mistake reported at load
        parsed = dataclasses.replace(parsed, omop_source=raw["omop"])
    return parsed


def _check_derived(source: str, mapping: Mapping, notes: NotesSpec | None) -> None:
    """Every `note` rule names a marker of `[notes.markers]`."""
    markers = {m.name for m in notes.markers} if notes is not None else set()
    for name, rule in mapping.features.items():
        if rule.source == "note" and rule.marker not in markers:
            known = f"markers: {', '.join(sorted(markers))}" if markers else "the study has no [notes.markers]"
            raise StudyConfigError(f"{source}: mapping.features.{name}.marker: no marker '{rule.marker}' ({known})")


def _strategy(r: Fields, raw: dict[str, Any]) -> Strategy:
    """[strategy]: the name, then each optional field the strategy uses (its default when absent);
    a field the strategy does not use, or an unknown key, is an error naming it."""
    name = r.choice(raw, "strategy.name", STRATEGIES)
    r.no_unknown_keys(raw, "strategy", ("name", "min_sites", *STRATEGY_DEFAULTS))
    for field, users in STRATEGY_DEFAULTS.items():
        if field in raw and name not in users:
            who = ", ".join(users)
            raise r.fail(f"strategy.{field}", f"only {who} use{'s' if len(users) == 1 else ''} it "
                                              f"(this study's strategy is {name})")

    def unit_interval(field: str) -> float | None:
        if name not in STRATEGY_DEFAULTS[field]:
            return None
        value = r.number(raw, f"strategy.{field}", default=STRATEGY_DEFAULTS[field][name])
        if not 0 <= value < 1:
            raise r.fail(f"strategy.{field}", f"must be in [0, 1), got {value}")
        return float(value)

    def positive(field: str) -> float | None:
        if name not in STRATEGY_DEFAULTS[field]:
            return None
        return float(r.number(raw, f"strategy.{field}", positive=True, default=STRATEGY_DEFAULTS[field][name]))

    return Strategy(
        name=name,
        # as written (an integer stays one: older studies keep their hash)
        server_learning_rate=r.number(raw, "strategy.server_learning_rate", positive=True,
                                      default=STRATEGY_DEFAULTS["server_learning_rate"][name]),
        min_sites=r.integer(raw, "strategy.min_sites", minimum=3),
        server_momentum=unit_interval("server_momentum"),
        proximal_mu=positive("proximal_mu"),
        beta1=unit_interval("beta1"),
        beta2=unit_interval("beta2"),
        tau=positive("tau"),
    )


def _epsilon(r: Fields, privacy: dict[str, Any]) -> float | int:
    epsilon = r.number(privacy, "privacy.epsilon", positive=True)
    if epsilon > EPSILON_MAX:
        raise r.fail("privacy.epsilon", f"must be in the accepted range 0 < ε <= {EPSILON_MAX:g}, got {epsilon}")
    return epsilon


def _digest(values: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _model(r: Fields, model: dict[str, Any]) -> ModelSpec:
    """`logistic`: logistic regression (no hidden layer, the clinical baseline); `mlp`: at least one."""
    kind = r.choice(model, "model.kind", MODEL_KINDS)
    if kind == "logistic":
        if model.get("hidden", []) != []:
            raise r.fail("model.hidden", "a logistic model has no hidden layers (remove the field, or use kind = \"mlp\")")
        hidden: tuple[int, ...] = ()
    else:
        hidden = tuple(r.int_list(model, "model.hidden", minimum=1))
    return ModelSpec(kind=kind, hidden=hidden, seed=r.integer(model, "model.seed", minimum=0))


def _feature(r: Fields, i: int, raw: dict[str, Any]) -> Feature:
    at = f"features[{i}]"
    name = r.string(raw, f"{at}.name")
    if not name.isidentifier():
        raise r.fail(f"{at}.name", f"'{name}' must be letters, digits and _")
    at = f"features[{i}] ({name})"
    ftype = r.choice(raw, f"{at}.type", FEATURE_TYPES)
    bounds = r.number_list(raw, f"{at}.range")
    if len(bounds) != 2 or not bounds[0] < bounds[1]:
        raise r.fail(f"{at}.range", "expected [low, high] with low < high")
    low, high = bounds
    if ftype == "binary" and (low, high) != (0, 1):
        raise r.fail(f"{at}.range", "a binary feature has range [0, 1]")
    if ftype == "count" and low < 0:
        raise r.fail(f"{at}.range", "a count cannot be negative")
    center = r.number(raw, f"{at}.center", default=(low + high) / 2)
    if not low <= center <= high:
        raise r.fail(f"{at}.center", f"{center} is outside range [{low}, {high}]")
    return Feature(
        name=name,
        type=ftype,
        unit=r.string(raw, f"{at}.unit"),
        low=float(low),
        high=float(high),
        missing=r.choice(raw, f"{at}.missing", MISSING_POLICIES),
        center=float(center),
        scale=float(r.number(raw, f"{at}.scale", positive=True, default=(high - low) / 4)),
    )


def _check_shares(source: str, shares: float | int, threshold: float | int) -> None:
    """Mirror Flower's SecAgg+ rules so a bad study fails at load, not mid-round."""
    at = f"{source}: secure_aggregation"
    if isinstance(shares, int):
        if shares < 3:
            raise StudyConfigError(f"{at}.num_shares: an absolute number of shares must be >= 3")
    elif not 0 < shares <= 1:
        raise StudyConfigError(f"{at}.num_shares: a fraction must be in (0, 1], got {shares}")
    if isinstance(threshold, int):
        if isinstance(shares, int) and threshold >= shares:
            raise StudyConfigError(
                f"{at}.reconstruction_threshold: {threshold} must be less than num_shares ({shares})"
            )
        if threshold < 2:
            raise StudyConfigError(f"{at}.reconstruction_threshold: must be >= 2, got {threshold}")
    elif not 0 < threshold < 1:
        raise StudyConfigError(
            f"{at}.reconstruction_threshold: a fraction must be in (0, 1), got {threshold}"
        )
