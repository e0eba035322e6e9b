"""Prefill and decode throughput, peak memory and parameter bytes of a causal LM.

- prefill: one forward pass over a ``[batch, prompt_len]`` prompt, tokens/s = batch * prompt_len / s;
- decode: ``gen_len`` greedy steps of one token each with the KV cache, tokens/s = batch * gen_len / s;
- memory: on CUDA ``torch.cuda.max_memory_allocated`` over the measurement; on CPU the
  largest resident set size (psutil RSS) seen after each step (RSS includes Python,
  libraries and everything else in the process, so compare models within one run);
- parameter bytes: sum of ``numel * element_size`` over unique parameters.

Each measurement is the median of ``repeats`` runs after one warm-up run.
"""
from __future__ import annotations

import statistics
import time

import torch

from ..memory_usage import current_rss_bytes
from ..options import require_int


def parameter_bytes(model) -> int:
    """Bytes held by the model's (unique) parameters."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _PeakMemory:
    """Peak memory over a block: CUDA allocator peak, or the largest sampled RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.sample()
        return self

    def sample(self) -> None:
        if self.device.type != "cuda":
            self.peak = max(self.peak, current_rss_bytes())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.sample()


def prompt_ids(model, tokenizer, prompt_len: int, batch: int, seed: int = 0) -> torch.Tensor:
    """A [batch, prompt_len] prompt: WikiText-2 text when a tokenizer is given, else seeded random ids."""
    if tokenizer is not None:
        try:
            from ..data import load_text

            ids = tokenizer(load_text("wikitext2")[:20 * prompt_len], verbose=False)["input_ids"]
            if len(ids) >= prompt_len:
                return torch.tensor(ids[:prompt_len]).repeat(batch, 1)
        except FileNotFoundError:
            pass
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=gen)


@torch.no_grad()
def _prefill(model, ids: torch.Tensor):
    return model(input_ids=ids, use_cache=True)


@torch.no_grad()
def _decode(model, out, steps: int, peak: _PeakMemory | None = None) -> None:
    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        if peak is not None:
            peak.sample()


def speed(model, tokenizer=None, prompt_len: int = 128, gen_len: int = 64, batch: int = 1, repeats: int = 3) -> dict:
    """Throughput and memory of ``model`` on its current device and dtype.

    Returns ``{"prefill_tokens_per_s", "decode_tokens_per_s", "peak_memory_bytes",
    "memory_kind", "parameter_bytes", "parameters", "prompt_len", "gen_len", "batch",
    "device", "dtype"}``.
    """
    for name, value in (("prompt_len", prompt_len), ("gen_len", gen_len), ("batch", batch), ("repeats", repeats)):
        require_int(name, value, 1)
    if getattr(model, "config", None) is not None:
        from ..models.loading import check_context

        check_context(model.config, prompt_len + gen_len, "prompt_len + gen_len")
    param = next(model.parameters())
    device = param.device
    ids = prompt_ids(model, tokenizer, prompt_len, batch).to(device)
    _decode(model, _prefill(model, ids), min(gen_len, 2))  # warm-up
    prefill_s, decode_s = [], []
    with _PeakMemory(device) as peak:
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            out = _prefill(model, ids)
            _sync(device)
            t1 = time.perf_counter()
            peak.sample()
            _decode(model, out, gen_len, peak)
            _sync(device)
            prefill_s.append(t1 - t0)
            decode_s.append(time.perf_counter() - t1)
    return {
        "prefill_tokens_per_s": batch * prompt_len / statistics.median(prefill_s),
        "decode_tokens_per_s": batch * gen_len / statistics.median(decode_s),
        "peak_memory_bytes": int(peak.peak),
        "memory_kind": "cuda_max_memory_allocated" if device.type == "cuda" else "process_rss",
        "parameter_bytes": parameter_bytes(model),
        "parameters": sum(p.numel() for p in model.parameters()),
        "prompt_len": prompt_len, "gen_len": gen_len, "batch": batch,
        "device": str(device), "dtype": str(param.dtype).replace("torch.", ""),
    }
