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

from .client import TrainSettings
from .devices import LINK_MODELS, parse_fleet
from .evaluation import EvalSettings
from .lora import LoraSettings


@dataclass
class ModelSettings:
    """The frozen base model."""

    name: str = "smollm2-135m"
    """model spec for fedprune.load_model, or 'tiny-llama' (a tiny random LLaMA, for tests)"""
    tokenizer: str = "smollm2-135m"
    """tokenizer spec for fedprune.load_tokenizer, or 'tiny-bpe' (a 320-token BPE, for tests)"""
    dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"model.dtype must be float32 or bfloat16, got {self.dtype!r}")


@dataclass
class DataSettings:
    """How Dolly-15k is split over clients."""

    partition: str = "shepherd"
    """shepherd (the published 10-client split), dirichlet, or iid"""
    num_clients: int = 10
    alpha: float = 0.5
    """Dirichlet concentration over the 8 categories (dirichlet only)"""
    max_examples_per_client: int = 0
    """cap each client's data (0 = no cap; a cap makes tokenising 80 clients quick)"""
    data_dir: str | None = None
    """directory holding dolly-15k-shepherd-10clients/ (default: fedprune.settings.data_dir())"""

    def __post_init__(self):
        if self.partition not in ("shepherd", "dirichlet", "iid"):
            raise ValueError(f"data.partition must be shepherd, dirichlet or iid, got {self.partition!r}")
        if self.num_clients < 1:
            raise ValueError(f"data.num_clients must be >= 1, got {self.num_clients}")
        if self.partition == "shepherd" and self.num_clients != 10:
            raise ValueError("data.partition=shepherd has exactly 10 clients; set data.num_clients=10 or use dirichlet")
        if self.alpha <= 0:
            raise ValueError(f"data.alpha must be > 0, got {self.alpha}")


@dataclass
class FederationSettings:
    """Rounds, sampling, fleet and faults."""

    strategy: str = "fedit"
    """fedit, hetlora, flexlora or flora"""
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
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    """strategy-specific options passed to the strategy's constructor (fedspine: chooser, interval, ...)"""

    def __post_init__(self):
        from .strategies import STRATEGIES

        if self.strategy not in STRATEGIES:
            raise ValueError(f"federation.strategy {self.strategy!r} unknown; known: {', '.join(STRATEGIES.names())}")
        if self.rounds < 1 or self.clients_per_round < 1:
            raise ValueError("federation.rounds and federation.clients_per_round must be >= 1")
        if any(int(r) < 1 for r in self.ranks):
            raise ValueError(f"federation.ranks must all be >= 1, got {self.ranks}")
        parse_fleet(self.fleet)
        if self.links not in LINK_MODELS:
            raise ValueError(f"federation.links must be one of {', '.join(LINK_MODELS)}, got {self.links!r}")
        if self.deadline_s < 0 or self.max_update_norm <= 0:
            raise ValueError("federation.deadline_s must be >= 0 and max_update_norm > 0")


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
            bad = set(values) - known
            if bad:
                raise ValueError(f"unknown key(s) {sorted(bad)} in section {name!r}; known: {sorted(known)}")
            kwargs[name] = sub_cls(**_coerce(sub_cls, values))
        return cls(**kwargs)


def _coerce(sub_cls, values: dict[str, Any]) -> dict[str, Any]:
    """YAML reads ``1e-9`` as a string and ``3`` as an int: cast to the type of each field's default."""
    defaults = {f.name: f.default for f in dataclasses.fields(sub_cls) if f.default is not dataclasses.MISSING}
    out = dict(values)
    for k, v in values.items():
        d = defaults.get(k)
        try:
            if isinstance(d, bool):
                if isinstance(v, str):
                    out[k] = {"true": True, "false": False}[v.lower()]
            elif isinstance(d, float) and isinstance(v, (int, str)):
                out[k] = float(v)
            elif isinstance(d, int) and isinstance(v, str):
                out[k] = int(v)
        except (ValueError, KeyError):
            raise ValueError(f"{sub_cls.__name__}.{k}: cannot read {v!r} as {type(d).__name__}") from None
    return out


def apply_overrides(d: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a nested dict."""
    d = {k: dict(v or {}) for k, v in d.items()}
    for ov in overrides:
        if "=" not in ov or "." not in ov.split("=", 1)[0]:
            raise ValueError(f"bad override {ov!r}: expected section.key=value, e.g. train.local_steps=5")
        path, value = ov.split("=", 1)
        section, key = path.split(".", 1)
        d.setdefault(section, {})[key] = yaml.safe_load(value)
    return d


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> FederatedConfig:
    d: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        d = yaml.safe_load(p.read_text()) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{p}: expected a mapping of sections (model, data, lora, train, federation, eval)")
    return FederatedConfig.from_dict(apply_overrides(d, overrides))


def dump_config(cfg: FederatedConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
