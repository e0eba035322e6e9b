"""The configuration of a federated run: dataclass groups validated on construction, loaded
from YAML (``configs/federated/*.yaml``) with ``key=value`` overrides (``train.local_steps=5``).
The resolved config is written into the run directory.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from .local import TrainSettings
from .devices import LINK_MODELS, parse_fleet
from .evaluation import EvalSettings
from .lora import LoraSettings
from ..options import coerce, require_int, require_number


@dataclass
class ModelSettings:
    """The frozen base model."""

    name: str = "smollm2-135m"
    """model spec for fedprune.load_model, or 'tiny-llama' (a tiny random LLaMA, for tests)"""
    tokenizer: str = "smollm2-135m"
    """tokenizer spec for fedprune.load_tokenizer, or 'tiny-bpe' (a 320-token BPE, for tests)"""
    dtype: str = "float32"
    """float32, bfloat16 or float16: the frozen base weights' dtype"""
    device: str = "cpu"
    """cpu, cuda, cuda:N or auto (CUDA when available): where the base model and its training run"""

    def __post_init__(self):
        from ..models.device import DTYPE_CHOICES, DEVICE_CHOICES, parse_device_spec

        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"model.dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        try:
            parse_device_spec(self.device)
        except ValueError:
            raise ValueError(f"model.device must be {DEVICE_CHOICES}, got {self.device!r}") from None


@dataclass
class DataSettings:
    """Which dataset, and how it is split over clients."""

    dataset: str = "dolly"
    """dolly (Dolly-15k instructions; held out: 80 records) or commonsense_qa (CommonsenseQA training
    questions as cloze prompt + right answer; held out: the validation questions)"""
    partition: str = "shepherd"
    """dolly: shepherd (the published 10-client split), dirichlet or iid; commonsense_qa: iid, dirichlet or
    pathological (two question_concept groups per client)"""
    num_clients: int = 10
    alpha: float = 0.5
    """Dirichlet concentration over the groups (dolly: its 8 categories; commonsense_qa: the 19 most frequent
    question concepts and the rest as a 20th group); dirichlet only"""
    max_examples_per_client: int = 0
    """cap each client's data (0 = no cap; a cap makes tokenising 80 clients quick)"""
    data_dir: str | None = None
    """directory holding dolly-15k-shepherd-10clients/ and csqa/ (default: fedprune.settings.data_dir())"""

    def __post_init__(self):
        from .partition import FEDERATED_DATASETS

        if self.dataset not in FEDERATED_DATASETS:
            raise ValueError(f"data.dataset must be one of {', '.join(FEDERATED_DATASETS.names())}, "
                             f"got {self.dataset!r}")
        kinds = FEDERATED_DATASETS.get(self.dataset).partition_kinds
        if self.partition not in kinds:
            raise ValueError(f"data.partition for data.dataset={self.dataset} must be {', '.join(kinds)}, "
                             f"got {self.partition!r}")
        require_int("data.num_clients", self.num_clients, 1)
        require_int("data.max_examples_per_client", self.max_examples_per_client, 0)
        if self.partition == "shepherd" and self.num_clients != 10:
            raise ValueError("data.partition=shepherd has exactly 10 clients; set data.num_clients=10 or use dirichlet")
        if self.partition == "pathological" and self.num_clients < 10:
            raise ValueError(f"data.partition=pathological gives each client 2 of the 20 concept groups: "
                             f"data.num_clients={self.num_clients} cannot hold them all; use >= 10 or dirichlet")
        require_number("data.alpha", self.alpha, 0.0, low_open=True)


@dataclass
class FederationSettings:
    """Rounds, sampling, fleet and faults."""

    strategy: str = "fedit"
    """a registered strategy (``federated.strategies.STRATEGIES``): fedit, hetlora, flexlora, flora, fedspine,
    fedpruner, fedpruner_plus and the memory-aware baselines"""
    rounds: int = 3
    clients_per_round: int = 3
    ranks: list[int] = field(default_factory=list)
    """LoRA rank per client, cycled by client id (empty = lora.rank for everyone)"""
    fleet: str = "tx2:3,xavier-nx:4,agx-xavier:3"
    """device classes NAME:COUNT (client id = position); must cover data.num_clients"""
    links: str = "device"
    """link model of the simulated fleet: device (each device keeps its own link, fluctuating per
    round) or round (a fresh bandwidth every round); see federated.devices"""
    deadline_s: float = 0.0
    """round deadline in simulated seconds; slower clients are cut off (0 = none)"""
    dropout: bool = True
    """simulate client dropout with each profile's probability"""
    max_update_norm: float = 1e4
    """reject client updates whose Frobenius norm exceeds this"""
    max_weight_ratio: float = 3.0
    """cap each client's aggregation weight at this many times the round's (lower) median weight,
    after capping it by the size the server registered for it (the simulator: its partition; Flower:
    what it declared when it joined); 0 trusts the declared num_examples. 3 leaves near-equal splits
    (Shepherd: 1492-1494 records per client) untouched and bounds a liar among 10 clients at 25 %"""
    clip_norm_ratio: float = 2.0
    """clip each client's update (the deviation of its LoRA factors from those it was sent) to this
    many times the round's (lower) median root-mean-square deviation per entry; 0 = off"""
    clip_norm: float = 0.0
    """clip each client's update to this absolute Frobenius norm; 0 = off"""
    aggregation: str = "mean"
    """mean (weighted by the capped sizes), median or trimmed_mean (coordinate-wise, unweighted;
    fedit, flexlora and the fedpruner family)"""
    trim_ratio: float = 0.1
    """trimmed_mean: fraction of clients dropped at each end, per entry, in [0, 0.5)"""
    seed: int = 0
    reference_params: float = 0.0
    """parameter count of the modelled deployment (e.g. 6.74e9 for a LLaMA-2-7B-class model): each
    round's FLOPs and LoRA bytes are rescaled to a model of that size and shape while the learning
    dynamics stay those of the model trained; 0 = the trained model's own size (federated.cost)"""
    options: dict[str, Any] = field(default_factory=dict)
    """the strategy's options, checked against its ``Options`` dataclass (fedspine: chooser, interval, ...)"""

    def __post_init__(self):
        from .strategies import STRATEGIES, strategy_options

        if self.strategy not in STRATEGIES:
            raise ValueError(f"federation.strategy {self.strategy!r} unknown; known: {', '.join(STRATEGIES.names())}")
        require_int("federation.rounds", self.rounds, 1)
        require_int("federation.clients_per_round", self.clients_per_round, 1)
        require_int("federation.seed", self.seed, 0)
        require_number("federation.reference_params", self.reference_params, 0.0)
        for i, r in enumerate(self.ranks):
            require_int(f"federation.ranks[{i}]", r, 1)
        # checked against the strategy's Options dataclass here, before any model is loaded: an unknown
        # option is refused by name, a value of the wrong type or range names the option; the given
        # keys are kept (coerced), so the resolved config says what was set
        given = dict(self.options or {})
        checked = strategy_options(self.strategy, given)
        self.options = {k: getattr(checked, k) for k in given}
        parse_fleet(self.fleet)
        if self.links not in LINK_MODELS:
            raise ValueError(f"federation.links must be one of {', '.join(LINK_MODELS)}, got {self.links!r}")
        require_number("federation.deadline_s", self.deadline_s, 0.0)
        require_number("federation.max_update_norm", self.max_update_norm, 0.0, low_open=True)
        if self.max_weight_ratio != 0 and self.max_weight_ratio < 1:
            raise ValueError(f"federation.max_weight_ratio must be 0 (off) or >= 1, got {self.max_weight_ratio}")
        if self.clip_norm_ratio < 0 or self.clip_norm < 0:
            raise ValueError(f"federation.clip_norm_ratio and clip_norm must be >= 0 (0 = off), got "
                             f"{self.clip_norm_ratio} and {self.clip_norm}")
        if 0 < self.clip_norm_ratio < 1:
            raise ValueError(f"federation.clip_norm_ratio={self.clip_norm_ratio} would clip the median client "
                             "itself; use 0 (off) or >= 1")
        from .aggregators import ROBUST_METHODS

        if self.aggregation not in ROBUST_METHODS:
            raise ValueError(f"federation.aggregation must be one of {', '.join(ROBUST_METHODS)}, "
                             f"got {self.aggregation!r}")
        if not 0 <= self.trim_ratio < 0.5:
            raise ValueError(f"federation.trim_ratio must be in [0, 0.5), got {self.trim_ratio}")
        if self.aggregation != "mean" and not STRATEGIES.get(self.strategy).supports_robust_aggregation:
            ok = [n for n in STRATEGIES.names() if STRATEGIES.get(n).supports_robust_aggregation]
            raise ValueError(f"federation.aggregation={self.aggregation} needs a strategy that averages entry by "
                             f"entry ({', '.join(ok)}); {self.strategy} does not: use aggregation=mean (with "
                             "clip_norm_ratio) instead")


@dataclass
class FederatedConfig:
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    federation: FederationSettings = field(default_factory=FederationSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def __post_init__(self):
        n_fleet = len(parse_fleet(self.federation.fleet))
        if n_fleet < self.data.num_clients:
            raise ValueError(f"federation.fleet has {n_fleet} devices but data.num_clients={self.data.num_clients}; "
                             "give every client a device (e.g. tx2:30,xavier-nx:40,agx-xavier:10 for 80)")
        if self.federation.clients_per_round > self.data.num_clients:
            raise ValueError(f"federation.clients_per_round={self.federation.clients_per_round} exceeds "
                             f"data.num_clients={self.data.num_clients}")
        from .partition import federated_dataset

        if self.eval.accuracy_examples and federated_dataset(self.data.dataset).choice_task is None:
            raise ValueError(f"eval.accuracy_examples needs a multiple-choice dataset (data.dataset=commonsense_qa); "
                             f"{self.data.dataset} has none: set eval.accuracy_examples=0")
        if self.federation.strategy == "fedit" and len(set(self.federation.ranks)) > 1:
            raise ValueError("fedit uses one rank for every client; set federation.ranks=[] or use hetlora/flexlora/flora")

    # ---- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FederatedConfig":
        groups = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(groups)
        if unknown:
            raise ValueError(f"unknown config section(s) {sorted(unknown)}; known: {sorted(groups)}")
        kwargs = {}
        for name, f in groups.items():
            sub_cls = f.default_factory  # type: ignore[misc]
            values = d.get(name) or {}
            known = {x.name for x in dataclasses.fields(sub_cls)}
            bad = set(values) - known if isinstance(values, dict) else set()
            if bad:
                raise ValueError(f"unknown key(s) {sorted(bad)} in section {name!r}; known: {sorted(known)}")
            if not isinstance(values, dict):
                raise ValueError(f"config section {name!r} must be a mapping of key: value, got {values!r}")
            kwargs[name] = sub_cls(**_coerce(sub_cls, values, name))
        return cls(**kwargs)


def _coerce(sub_cls, values: dict[str, Any], section: str = "") -> dict[str, Any]:
    """Cast each value to its field's annotated type, or refuse it naming ``section.key``.

    YAML reads ``1e-9`` as a string and ``3`` as an int: both become floats where a float is
    expected. An integer field takes 3 or 3.0 but refuses 2.5 (it would not be rounded: a
    ``rounds: 2.5`` that ran 3 rounds reported "round 3/2"), and a bool field refuses numbers.
    """
    import typing

    try:
        hints = typing.get_type_hints(sub_cls)
    except Exception:  # an unresolvable annotation: fall back to the defaults' types
        hints = {f.name: type(f.default) for f in dataclasses.fields(sub_cls) if f.default is not dataclasses.MISSING}
    prefix = f"{section}." if section else f"{sub_cls.__name__}."
    return {k: coerce(prefix + k, v, hints.get(k)) for k, v in values.items()}


def apply_overrides(d: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a nested dict."""
    d = {k: dict(v or {}) for k, v in d.items()}
    for ov in overrides:
        if "=" not in ov or "." not in ov.split("=", 1)[0]:
            raise ValueError(f"bad override {ov!r}: expected section.key=value, e.g. train.local_steps=5")
        path, value = ov.split("=", 1)
        section, key = path.split(".", 1)
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ValueError(f"override {ov!r}: the value is not valid YAML ({_yaml_problem(exc)})") from None
        d.setdefault(section, {})[key] = parsed
    return d


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> FederatedConfig:
    d: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        try:
            d = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{p}, line {mark.line + 1} column {mark.column + 1}" if mark is not None else str(p)
            raise ValueError(f"YAML syntax error in {where}: {_yaml_problem(exc)}") from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"{p} is not UTF-8 text ({exc.reason})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{p}: expected a mapping of sections (model, data, lora, train, federation, eval)")
    return FederatedConfig.from_dict(apply_overrides(d, overrides))


def _yaml_problem(exc: Exception) -> str:
    """The one-line reason of a YAML error (its ``problem``, with its ``context`` when given)."""
    problem = getattr(exc, "problem", None)
    context = getattr(exc, "context", None)
    if problem:
        return f"{problem} ({context})" if context else problem
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def dump_config(cfg: FederatedConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
