"""Simulated device fleets: profiles, fleet parsing, and a round's simulated time per device.

A simulation runs every client on the same machine, so heterogeneity is *modelled*: device
``i`` finishing a round takes

    t_i = train_flops(submodel trained, tokens processed) / flops_i
          + (bytes_down_i + bytes_up_i) / bandwidth_i,   times a log-normal jitter,

with ``bandwidth_i`` drawn per round from the profile's range. Strategies never see the
profile, only the observed ``t_i`` (and the metrics clients report).

Absolute FLOP/s are *effective training* throughput, not peak: the TX2 reference is set to
0.25 TFLOP/s (about 20 % of its 1.3 TFLOP/s fp16 peak) and the others scale by the relative
throughput 1 : 2.5 : 6 quoted for the FedSpine testbed.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

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

    def __post_init__(self):
        if self.memory_gb <= 0 or self.rel_throughput <= 0:
            raise ValueError(f"device {self.name}: memory and throughput must be positive")
        lo, hi = self.bandwidth_mbit
        if not 0 < lo <= hi:
            raise ValueError(f"device {self.name}: bandwidth range must satisfy 0 < low <= high, got {self.bandwidth_mbit}")
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
        name, at, memory = name.strip().partition("@")
        profile = DEVICE_PROFILES.get(name.strip())
        if at:
            profile = replace(profile, name=f"{profile.name}@{memory.strip()}", memory_gb=parse_memory(memory))
        fleet.extend([profile] * n)
    if not fleet:
        raise ValueError(f"empty fleet {spec!r}; example: tx2:30,xavier-nx:40,agx-xavier:10")
    return fleet


def round_rng(seed: int, round_idx: int, client: int, purpose: str) -> random.Random:
    """A generator that depends only on (seed, round, client, purpose): resumable and order-free."""
    return random.Random(f"{seed}|{round_idx}|{client}|{purpose}")


def draws_dropout(profile: DeviceProfile, seed: int, round_idx: int, client: int) -> bool:
    return round_rng(seed, round_idx, client, "dropout").random() < profile.dropout


def simulated_time(profile: DeviceProfile, flops: float, bytes_moved: int, seed: int, round_idx: int,
                   client: int) -> dict[str, float]:
    """Simulated seconds for one device's round: compute + communication, times jitter."""
    rng = round_rng(seed, round_idx, client, "time")
    lo, hi = profile.bandwidth_mbit
    bandwidth = rng.uniform(lo, hi) * MBIT
    jitter = math.exp(rng.gauss(0.0, profile.jitter)) if profile.jitter > 0 else 1.0
    compute_s = flops / profile.train_flops_per_s
    comm_s = bytes_moved / bandwidth
    return {"compute_s": compute_s * jitter, "comm_s": comm_s * jitter, "total_s": (compute_s + comm_s) * jitter,
            "bandwidth_mbit": bandwidth / MBIT}
