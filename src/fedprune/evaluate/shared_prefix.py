"""Shared-prefix scoring: requests whose model inputs begin alike share one forward pass of that beginning.

The choices of a multiple-choice question are (context, choice) requests whose model inputs
(:func:`fedprune.evaluate.loglik.model_inputs`: lm-eval's tokens, left-truncated) start with
the same context tokens. Instead of running every input in full, a group of inputs runs its
longest common token prefix once, keeps its KV cache, and runs only the remaining tokens of
each input as one batch over that cache (the cache repeated along the batch, the suffixes
right-padded, position ids continuing after the prefix). The rule is purely on token ids, so it
covers every case lm-eval's split produces: identical contexts (the whole context is shared),
winogrande's partial scoring (different contexts, one continuation: the sentence up to the blank
is shared), a continuation whose first token merges with the context (the shared part stops
there), choices that begin alike (the prefix runs into the continuation; those positions'
log-probabilities come from the prefix pass), and identical contexts across questions.

:func:`plan_groups` partitions the distinct inputs (sorted, so that inputs sharing a beginning
are adjacent) into contiguous groups maximising the tokens not recomputed. :func:`schedule`
takes the groups window by window (about ``WINDOW * batch_size`` inputs): prefix passes of at
most ``batch_size`` prefixes, then suffix passes of at most ``batch_size`` inputs, each sorted by
length and cut where padding would cost more than another pass (:func:`split_sorted`).
:func:`run_window` runs them and hands each input's log-probabilities at its last ``tail``
positions to a callback: what a full forward of the input gives (float32 on CPU: within 1e-5).

Compared with the full path (and lm-eval), this saves the shared tokens, most of the padding
(lm-eval pads batches of 8 sorted requests; a long request here goes alone) and the LM head
everywhere but at the scored positions. Supported: model families whose logits are
``lm_head(decoder(...))`` with a plain KV cache (llama, mistral, qwen2, opt; no sliding window);
:func:`unsupported_reason` says why another model uses the full path.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MIN_PREFIX = 4
"""a group shares at least this many tokens (fewer is not worth a prefix row in a padded batch)"""
MAX_GROUP = 64
"""at most this many inputs share one prefix (bounds the planning cost)"""
WINDOW = 16
"""a window holds about WINDOW * batch_size inputs, whose prefixes' KV caches are kept together"""
PASS_COST = {"cpu": 16}
"""what one more forward pass costs, in padded tokens, by device type (for cutting sorted rows
into passes); on an accelerator, where tokens are nearly free up to a full batch, ``OTHER_PASS_COST``"""
OTHER_PASS_COST = 1024
FAMILIES = ("llama", "mistral", "qwen2", "opt")
"""``model_type`` values whose causal-LM logits are ``lm_head(decoder(...))`` over a DynamicCache"""


@dataclass(frozen=True)
class PrefixGroup:
    """Distinct model inputs whose first ``prefix`` tokens are identical (``prefix`` 0: a lone input).

    tails[i]: how many of the last positions of ``inputs[i]`` are scored.
    """

    prefix: int
    inputs: tuple[tuple[int, ...], ...]
    tails: tuple[int, ...]


def common_prefix_length(a, b) -> int:
    """Number of leading tokens two id sequences share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def plan_groups(inputs: list[tuple[int, ...]], tails: list[int], min_prefix: int = MIN_PREFIX,
                max_group: int = MAX_GROUP) -> list[PrefixGroup]:
    """Partition distinct ``inputs`` into groups that share a token prefix.

    The inputs are sorted (token ids, lexicographically), so inputs sharing a beginning are
    adjacent; a dynamic programme then picks the contiguous groups that maximise the tokens
    saved, ``sum (size - 1) * prefix``. A group's prefix is the longest common prefix of its
    inputs, capped to leave every input at least one token of its own, and must be at least
    ``min_prefix`` tokens; inputs in no such group form groups of one with prefix 0.
    Every input appears in exactly one group.
    """
    if len(inputs) != len(tails):
        raise ValueError(f"{len(inputs)} inputs but {len(tails)} tails")
    if len(set(inputs)) != len(inputs):
        raise ValueError("inputs must be distinct (identical inputs are run once by the caller)")
    if any(not x for x in inputs):
        raise ValueError("an input has no tokens")
    if min_prefix < 1 or max_group < 1:
        raise ValueError(f"min_prefix ({min_prefix}) and max_group ({max_group}) must be at least 1")
    order = sorted(range(len(inputs)), key=lambda i: inputs[i])
    xs = [inputs[i] for i in order]
    lcp = [common_prefix_length(xs[k], xs[k + 1]) for k in range(len(xs) - 1)]
    best = [0] * (len(xs) + 1)  # best[j]: tokens saved by the best partition of xs[:j]
    start = list(range(len(xs) + 1))  # start[j]: first index of the last group of that partition
    shared = [0] * (len(xs) + 1)  # shared[j]: that group's prefix
    for j in range(len(xs)):
        best[j + 1], start[j + 1], shared[j + 1] = best[j], j, 0
        p = len(xs[j]) - 1
        for i in range(j - 1, max(-1, j - max_group), -1):
            p = min(p, lcp[i], len(xs[i]) - 1)
            if p < min_prefix:
                break  # the common prefix only shrinks as the group grows
            if best[i] + (j - i) * p > best[j + 1]:
                best[j + 1], start[j + 1], shared[j + 1] = best[i] + (j - i) * p, i, p
    groups, j = [], len(xs)
    while j > 0:
        i = start[j]
        members = order[i:j]
        groups.append(PrefixGroup(shared[j], tuple(inputs[m] for m in members), tuple(tails[m] for m in members)))
        j = i
    return groups[::-1]


@dataclass(frozen=True)
class Window:
    """Forward passes over some groups: their prefixes first, then their inputs' own tokens.

    prefix_batches: group indices per prefix pass (groups with ``prefix`` > 0 only);
    suffix_batches: ``(group index, input index)`` per suffix pass.
    """

    prefix_batches: tuple[tuple[int, ...], ...]
    suffix_batches: tuple[tuple[tuple[int, int], ...], ...]


def split_sorted(lengths: list[int], batch_size: int, pass_cost: int = PASS_COST["cpu"]) -> list[int]:
    """Sizes of consecutive batches of rows with ``lengths`` (non-increasing) that minimise the
    padded tokens (each batch pads to its first row) plus ``pass_cost`` tokens per forward pass,
    with at most ``batch_size`` rows a batch. A long row thus goes alone rather than padding
    the shorter rows after it."""
    if any(a < b for a, b in zip(lengths, lengths[1:])):
        raise ValueError("lengths must be sorted longest first")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    best = [0] + [None] * len(lengths)  # best[j]: cost of the first j rows
    size = [0] * (len(lengths) + 1)
    for j in range(1, len(lengths) + 1):
        for i in range(j - 1, max(0, j - batch_size) - 1, -1):  # on a tie, the last batch stays smallest
            cost = best[i] + lengths[i] * (j - i) + pass_cost
            if best[j] is None or cost < best[j]:
                best[j], size[j] = cost, j - i
    sizes, j = [], len(lengths)
    while j > 0:
        sizes.append(size[j])
        j -= size[j]
    return sizes[::-1]


def _split(items: list, lengths: list[int], batch_size: int, pass_cost: int) -> tuple[tuple, ...]:
    out, k = [], 0
    for n in split_sorted(lengths, batch_size, pass_cost):
        out.append(tuple(items[k:k + n]))
        k += n
    return tuple(out)


def schedule(groups: list[PrefixGroup], batch_size: int, window_rows: int | None = None,
             pass_cost: int = PASS_COST["cpu"]) -> list[Window]:
    """Forward passes of at most ``batch_size`` rows for ``groups``, window by window.

    Groups are taken longest prefix first (then longest input) into windows of about
    ``window_rows`` inputs (default ``WINDOW * batch_size``; a larger group fills one window
    alone). In a window, prefix passes take its groups in that order; suffix passes take its
    inputs sorted by the length left after their group's prefix; both are cut by
    :func:`split_sorted`, so that little is padded. The prefixes' KV caches live until the
    window's suffix passes are done.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    window_rows = window_rows or WINDOW * batch_size
    order = sorted(range(len(groups)), key=lambda g: (-groups[g].prefix, -max(map(len, groups[g].inputs)),
                                                      groups[g].inputs))
    chunks: list[list[int]] = []
    rows = 0
    for g in order:
        if not chunks or rows + len(groups[g].inputs) > window_rows:
            chunks.append([])
            rows = 0
        chunks[-1].append(g)
        rows += len(groups[g].inputs)
    windows = []
    for chunk in chunks:
        shared = [g for g in chunk if groups[g].prefix > 0]
        members = sorted(((g, i) for g in chunk for i in range(len(groups[g].inputs))),
                         key=lambda gi: -(len(groups[gi[0]].inputs[gi[1]]) - groups[gi[0]].prefix))
        windows.append(Window(
            _split(shared, [groups[g].prefix for g in shared], batch_size, pass_cost),
            _split(members, [len(groups[g].inputs[i]) - groups[g].prefix for g, i in members], batch_size,
                   pass_cost)))
    return windows


def unsupported_reason(model) -> str | None:
    """Why ``model`` cannot use shared-prefix scoring (None when it can)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        return f"model type {model_type!r} is not one of {', '.join(FAMILIES)}"
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return "layers other than full attention"
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if decoder is model or not isinstance(head, torch.nn.Linear):
        return "no separate decoder and linear LM head"
    params = inspect.signature(decoder.forward).parameters
    if _cache_keyword(decoder) is None or not {"attention_mask", "position_ids"} <= set(params):
        return "its decoder takes no KV cache, attention mask or position ids"
    return None


def _cache_keyword(decoder) -> str | None:
    params = inspect.signature(decoder.forward).parameters
    return next((k for k in ("cache", "past_key_values") if k in params), None)


def _output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values




def _right_padded(rows: list[tuple[int, ...]], width: int) -> torch.Tensor:
    batch = torch.zeros(len(rows), width, dtype=torch.long)
    for i, x in enumerate(rows):
        batch[i, :len(x)] = torch.tensor(x, dtype=torch.long)
    return batch


def _cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer, each [batch, kv_heads, length, head_dim]."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def _padded_cat(tensors: list[torch.Tensor], length: int) -> torch.Tensor:
    """Concatenate [b_i, h, l_i, d] tensors along the batch, zero-padded to ``length`` positions."""
    return torch.cat([F.pad(t, (0, 0, 0, length - t.shape[2])) for t in tensors])


@torch.no_grad()
def run_window(model, groups: list[PrefixGroup], window: Window, device, collect) -> None:
    """Run one window's passes and call ``collect(input, logp)`` for each of its inputs.

    Prefix passes run the groups' prefixes (right-padded) and keep their KV caches. Each
    suffix pass runs some inputs' remaining tokens over their groups' cached prefixes: the
    cache rows are gathered per input, the slots after a shorter prefix are masked out, and
    position ids continue after the prefix (an input without a shared prefix attends to no
    cache slot). ``logp`` is a float32 tensor [tail, V]: row j predicts the token after
    position ``len(input) - tail + j``, as a full forward of the input would.
    """
    from transformers import DynamicCache

    decoder, head = model.get_decoder(), model.get_output_embeddings()
    slot: dict[int, int] = {}  # group -> row of the window's cache
    saved: dict[int, tuple[int, torch.Tensor]] = {}  # group -> (first position, hidden states first..prefix)
    layers: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    for batch in window.prefix_batches:
        prefixes = [groups[g].inputs[0][:groups[g].prefix] for g in batch]
        out = decoder(input_ids=_right_padded(prefixes, max(map(len, prefixes))).to(device), use_cache=True)
        layers.append(_cache_tensors(_output_cache(out)))
        for b, g in enumerate(batch):
            slot[g] = len(slot)
            first = min(len(x) - t for x, t in zip(groups[g].inputs, groups[g].tails))
            if first < groups[g].prefix:  # scored positions inside the prefix (choices that begin alike)
                saved[g] = (first, out.last_hidden_state[b, first:groups[g].prefix])
    if layers:
        width = max(kv[0][0].shape[2] for kv in layers)
        kv_all = [(_padded_cat([kv[i][0] for kv in layers], width), _padded_cat([kv[i][1] for kv in layers], width))
                  for i in range(len(layers[0]))]
        del layers
    for batch in window.suffix_batches:
        rows = [(groups[g].prefix, groups[g].inputs[i], groups[g].tails[i], g) for g, i in batch]
        width_p = max(p for p, _, _, _ in rows)
        suffixes = [x[p:] for p, x, _, _ in rows]
        width_s = max(map(len, suffixes))
        kwargs = {}
        if width_p > 0:
            index = torch.tensor([slot.get(g, 0) for _, _, _, g in rows], device=device)
            cache = DynamicCache(ddp_cache_data=[(k.index_select(0, index)[:, :, :width_p],
                                                  v.index_select(0, index)[:, :, :width_p]) for k, v in kv_all])
            mask = torch.ones(len(rows), width_p + width_s, dtype=torch.long)
            for r, (p, _, _, _) in enumerate(rows):
                mask[r, p:width_p] = 0  # slots after a shorter prefix (all of them without one)
            positions = torch.tensor([p for p, _, _, _ in rows])[:, None] + torch.arange(width_s)
            # padding slots repeat the last real position (an OPT position table ends at the model length)
            positions = torch.minimum(positions, torch.tensor([len(x) - 1 for _, x, _, _ in rows])[:, None])
            kwargs = {_cache_keyword(decoder): cache, "use_cache": True, "attention_mask": mask.to(device),
                      "position_ids": positions.to(device)}
        hidden = decoder(input_ids=_right_padded(suffixes, width_s).to(device), **kwargs).last_hidden_state
        pieces = []
        for r, (p, x, t, g) in enumerate(rows):
            first = len(x) - t  # scored positions: first .. len(x) - 1
            if first < p:
                start, h = saved[g]
                pieces.append(h[first - start:])
            pieces.append(hidden[r, max(first, p) - p:len(x) - p])
        logp = F.log_softmax(head(torch.cat(pieces)).float(), dim=-1)
        for (_, x, _, _), lp in zip(rows, torch.split(logp, [t for _, _, t, _ in rows])):
            collect(x, lp)


def score_inputs(model, inputs: list[tuple[int, ...]], tails: list[int], batch_size: int, device, collect) -> None:
    """Plan, schedule and run shared-prefix scoring of distinct ``inputs``; ``collect(input, logp)``
    receives each input's log-probabilities at its last ``tails[i]`` positions (see :func:`run_window`)."""
    groups = plan_groups(inputs, tails)
    pass_cost = PASS_COST.get(torch.device(device).type, OTHER_PASS_COST)
    for window in schedule(groups, batch_size, pass_cost=pass_cost):
        run_window(model, groups, window, device, collect)
