"""Simulated device fleets: profiles, fleet parsing, and a round's simulated time per device.

A simulation runs every client on the same machine, so heterogeneity is *modelled*: device
``i`` finishing a round takes

    t_i = train_flops(submodel trained, tokens processed) / flops_i
          + (bytes_down_i + bytes_up_i) / bandwidth_i,   times a log-normal jitter,

where ``bandwidth_i`` depends on the link model (``federation.links``):

- ``device`` (default): every device sits on its own link, drawn once from its profile's
  range (``seed``, device id), and that link fluctuates from round to round by a log-normal
  factor (``link_fluctuation``): a device on poor Wi-Fi stays on poor Wi-Fi, which is what a
  per-device learner (FedSpine's bandits) can discover from observed times;
- ``round``: a fresh bandwidth from the range every round (links carry no identity).

Strategies never see the profile or the link, only the observed ``t_i`` (and the metrics
clients report).

Absolute FLOP/s are *effective training* throughput, not peak, and are **assumptions**: the
TX2 reference is set to 0.25 TFLOP/s and the others scale by the relative training throughput
1 : 2.5 : 6 quoted for the FedSpine testbed (Xavier NX 0.625, AGX Xavier 1.5 TFLOP/s). For scale,
NVIDIA's published peaks: Jetson TX2 1.33 TFLOPS fp16; Xavier NX 21 TOPS int8 (GPU + DLAs), its
384-core Volta GPU about 6 TFLOPS fp16 with tensor cores (our estimate from the core count and
clock, not a datasheet figure); AGX Xavier 32 TOPS int8, about 11 TFLOPS fp16. The assumed
effective throughputs are thus 19 %, ~10 % and ~14 % of those peaks (fine-tuning in PyTorch
reaches well under half of peak on these boards). Because the absolute figures are assumed, a
fleet entry may carry a speed factor (``tx2*2:30``: twice the assumed throughput), so a study
can show how its conclusions move with them; the relative throughputs stay as quoted.

The cost of a round may be rescaled to a deployment of another model size
(``federation.reference_params``, :func:`fedprune.federated.cost.cost_scale`): FLOPs and bytes
are multiplied by its factors before the time is computed. :func:`compute_share` summarises a
round's split between compute and communication per device class.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Iterable, Mapping

from ..registry import Registry

TX2_TRAIN_FLOPS = 0.25e12  # effective training FLOP/s of the reference device (relative throughput 1)
MBIT = 1e6 / 8  # bytes per second in one Mbit/s


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    memory_gb: float
    rel_throughput: float  # relative training throughput, TX2 = 1
    bandwidth_mbit: tuple[float, float] = (5.0, 100.0)  # link bandwidth range, Mbit/s
    dropout: float = 0.02  # probability the device silently fails a round
    jitter: float = 0.1  # sigma of the log-normal run-to-run multiplier
    link_fluctuation: float = 0.3  # sigma of the log-normal round-to-round factor on a device's own link

    def __post_init__(self):
        if self.memory_gb <= 0 or self.rel_throughput <= 0:
            raise ValueError(f"device {self.name}: memory and throughput must be positive")
        lo, hi = self.bandwidth_mbit
        if not 0 < lo <= hi:
            raise ValueError(f"device {self.name}: bandwidth range must satisfy 0 < low <= high, got {self.bandwidth_mbit}")
        if self.jitter < 0 or self.link_fluctuation < 0:
            raise ValueError(f"device {self.name}: jitter and link_fluctuation must be >= 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"device {self.name}: dropout must be in [0, 1), got {self.dropout}")

    @property
    def train_flops_per_s(self) -> float:
        return self.rel_throughput * TX2_TRAIN_FLOPS

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * 2**30)


DEVICE_PROFILES: Registry[DeviceProfile] = Registry("device profile")
for _p in (
    DeviceProfile("tx2", memory_gb=8, rel_throughput=1.0),
    DeviceProfile("xavier-nx", memory_gb=8, rel_throughput=2.5),
    DeviceProfile("agx-xavier", memory_gb=32, rel_throughput=6.0),
    # A mid-range phone: less memory for us, slower and flakier link, more dropout.
    DeviceProfile("phone", memory_gb=4, rel_throughput=0.8, bandwidth_mbit=(2.0, 50.0), dropout=0.1, jitter=0.25),
):
    DEVICE_PROFILES.register(_p.name, _p)


_UNITS = {"KB": 2**10, "MB": 2**20, "GB": 2**30}


def parse_memory(text: str) -> float:
    """``"512MB"``, ``"1.5GB"``, ``"300KB"`` -> gigabytes (binary units)."""
    t = str(text).strip().upper().replace("IB", "B")
    for unit, scale in _UNITS.items():
        if t.endswith(unit):
            try:
                value = float(t[:-len(unit)])
            except ValueError:
                break
            if value <= 0:
                break
            return value * scale / 2**30
    raise ValueError(f"bad memory size {text!r}: expected a positive number with KB, MB or GB, e.g. 1.5GB")


def parse_fleet(spec: str) -> list[DeviceProfile]:
    """``"tx2:30,xavier-nx:40,agx-xavier:10"`` -> 80 profiles, in that order (client id = index).

    ``NAME@MEMORY:COUNT`` (e.g. ``phone@1.5GB:10``) declares that class with another memory
    budget (the budget memory-aware strategies plan for), everything else as registered.
    ``NAME*SPEED:COUNT`` (e.g. ``tx2*0.5:30``) multiplies the class's assumed training throughput
    by ``SPEED`` (a sensitivity study of the assumed absolute throughputs); both may be combined
    (``tx2@4GB*2:10``).
    """
    fleet: list[DeviceProfile] = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        name, _, count = part.partition(":")
        try:
            n = int(count) if count else 1
        except ValueError:
            raise ValueError(f"bad fleet entry {part!r}: expected NAME:COUNT, e.g. tx2:30") from None
        if n < 0:
            raise ValueError(f"bad fleet entry {part!r}: count must be >= 0")
        name, star, speed = name.strip().partition("*")
        name, at, memory = name.strip().partition("@")
        profile = DEVICE_PROFILES.get(name.strip())
        if at:
            profile = replace(profile, name=f"{profile.name}@{memory.strip()}", memory_gb=parse_memory(memory))
        if star:
            try:
                factor = float(speed)
            except ValueError:
                factor = -1.0
            if not factor > 0 or not math.isfinite(factor):
                raise ValueError(f"bad fleet entry {part!r}: the speed factor after '*' must be a positive number, "
                                 "e.g. tx2*0.5:30")
            profile = replace(profile, name=f"{profile.name}*{speed.strip()}",
                              rel_throughput=profile.rel_throughput * factor)
        fleet.extend([profile] * n)
    if not fleet:
        raise ValueError(f"empty fleet {spec!r}; example: tx2:30,xavier-nx:40,agx-xavier:10")
    return fleet


def round_rng(seed: int, round_idx: int, client: int, purpose: str) -> random.Random:
    """A generator that depends only on (seed, round, client, purpose): resumable and order-free."""
    return random.Random(f"{seed}|{round_idx}|{client}|{purpose}")


def draws_dropout(profile: DeviceProfile, seed: int, round_idx: int, client: int) -> bool:
    return round_rng(seed, round_idx, client, "dropout").random() < profile.dropout


LINK_MODELS = ("device", "round")


def device_link_mbit(profile: DeviceProfile, seed: int, client: int) -> float:
    """The device's own link bandwidth (Mbit/s), fixed for a run (``links=device``)."""
    lo, hi = profile.bandwidth_mbit
    return random.Random(f"{seed}|link|{client}").uniform(lo, hi)


def simulated_time(profile: DeviceProfile, flops: float, bytes_moved: int, seed: int, round_idx: int,
                   client: int, links: str = "device", flops_scale: float = 1.0,
                   bytes_scale: float = 1.0) -> dict[str, float]:
    """Simulated seconds for one device's round: compute + communication, times jitter.

    ``flops_scale`` / ``bytes_scale`` rescale the round to the modelled deployment's size
    (:class:`fedprune.federated.cost.CostScale`); 1 leaves the trained model's own cost."""
    rng = round_rng(seed, round_idx, client, "time")
    if links == "device":
        fluct = profile.link_fluctuation
        bandwidth = device_link_mbit(profile, seed, client) * MBIT
        bandwidth *= math.exp(rng.gauss(0.0, fluct)) if fluct > 0 else 1.0
    elif links == "round":
        lo, hi = profile.bandwidth_mbit
        bandwidth = rng.uniform(lo, hi) * MBIT
    else:
        raise ValueError(f"unknown link model {links!r}; known: {', '.join(LINK_MODELS)}")
    jitter = math.exp(rng.gauss(0.0, profile.jitter)) if profile.jitter > 0 else 1.0
    compute_s = flops * flops_scale / profile.train_flops_per_s
    comm_s = bytes_moved * bytes_scale / bandwidth
    return {"compute_s": compute_s * jitter, "comm_s": comm_s * jitter, "total_s": (compute_s + comm_s) * jitter,
            "bandwidth_mbit": bandwidth / MBIT}


def compute_share(records: Iterable[Mapping]) -> dict[str, float]:
    """Per device class, the mean over its devices of ``compute_s / (compute_s + comm_s)``.

    ``records``: a round's per-device records with ``device`` (class name), ``compute_s`` and
    ``comm_s`` (records without times, e.g. dropped devices, are skipped). Also ``"all"``: the mean
    of the class means (each class counts once, whatever its size).
    """
    by_class: dict[str, list[float]] = {}
    for rec in records:
        if "compute_s" not in rec or "comm_s" not in rec:
            continue
        total = float(rec["compute_s"]) + float(rec["comm_s"])
        if total > 0:
            by_class.setdefault(str(rec["device"]), []).append(float(rec["compute_s"]) / total)
    out = {k: sum(v) / len(v) for k, v in sorted(by_class.items())}
    if out:
        out["all"] = sum(out.values()) / len(out)
    return out
