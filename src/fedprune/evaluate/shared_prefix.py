"""Shared-prefix scoring: the tokens that requests' model inputs share run once, in one forward pass.

The choices of a multiple-choice question are (context, choice) requests whose model inputs
(:func:`fedprune.evaluate.loglik.model_inputs`: lm-eval's tokens, left-truncated) start with
the same context tokens. Instead of running every input in full (lm-eval, the ``full`` path),
the inputs of a question are packed into one row as a prefix tree: each distinct beginning
once, then each input's own tokens, with an attention mask that lets a token see exactly the
tokens before it on its own input (its ancestors in the tree) and position ids equal to its
position in that input. A row thus computes, for every token of every input, what a full
forward of that input computes (float32 on CPU: the same up to rounding, about 1e-6 per token
on tiny models). The rule is purely on token ids, so it covers every case lm-eval's split
produces: identical contexts (the whole context is shared), winogrande's partial scoring
(different contexts, one continuation: the sentence up to the blank is shared), a
continuation whose first token merges with the context (the shared part stops there),
choices that begin alike (their common first tokens are shared too), nested inputs, and
identical contexts across questions.

:func:`plan_groups` partitions the distinct inputs (sorted, so that inputs sharing a beginning
are adjacent) into groups, one row each; :func:`prefix_tree` packs a group; :func:`split_sorted`
cuts the rows, longest first, into forward passes where padding would cost more than another
pass, each holding no more tokens than ``batch_size`` padded copies of its longest input (what
a full-path batch of ``batch_size`` requests may hold); :func:`forward_trees` runs a pass, and
the LM head only at the scored positions, each once, and sums each continuation's
log-probabilities.

Compared with the full path and lm-eval, this saves the shared tokens, most of the padding
and the LM head everywhere but at the scored positions. Supported: model families whose
logits are ``lm_head(decoder(...))`` and whose decoder takes position ids and a 4D attention
mask (llama, mistral, qwen2, opt with sdpa or eager attention, no sliding window);
:func:`unsupported_reason` says why another model takes the full path.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MIN_PREFIX = 4
"""a group shares at least this many tokens (fewer is not worth packing)"""
MAX_GROUP = 16
"""at most this many inputs in one row (bounds the planning cost and a row's width)"""
PASS_COST = {"cpu": 16}
"""what one more forward pass costs, in padded tokens, by device type (for cutting sorted rows
into passes); elsewhere (an accelerator, where tokens are nearly free up to a full pass) ``OTHER_PASS_COST``"""
OTHER_PASS_COST = 1024
FAMILIES = ("llama", "mistral", "qwen2", "opt")
"""``model_type`` values whose causal-LM logits are ``lm_head(decoder(...))``"""
ATTENTION = ("sdpa", "eager")
"""attention implementations that take a custom 4D mask"""


@dataclass(frozen=True)
class PrefixGroup:
    """Distinct model inputs packed into one row; their first ``prefix`` tokens are identical
    (0: a lone input). tails[i]: how many of the last positions of ``inputs[i]`` are scored."""

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
    inputs and must be at least ``min_prefix`` tokens; inputs in no such group form groups of
    one with prefix 0. Every input appears in exactly one group.
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
        p = len(xs[j])
        for i in range(j - 1, max(-1, j - max_group), -1):
            p = min(p, lcp[i])
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
class PrefixTree:
    """Inputs packed into one row, each distinct beginning once.

    tokens[k], positions[k]: the token in row slot k and its position in its input(s);
    parents[k]: the slot of the token before it on its input (-1 at position 0);
    paths[i]: the slots of ``inputs[i]``'s tokens, in order (``len(paths[i]) == len(inputs[i])``).
    """

    tokens: tuple[int, ...]
    positions: tuple[int, ...]
    parents: tuple[int, ...]
    paths: tuple[tuple[int, ...], ...]


def prefix_tree(inputs) -> PrefixTree:
    """Pack distinct ``inputs`` (token id sequences) into one row: sorted, each input adds the
    tokens after its longest common prefix with the one before it (the longest it shares with
    any earlier one), so every distinct prefix appears once."""
    if len(set(inputs)) != len(inputs) or any(not x for x in inputs):
        raise ValueError("inputs must be distinct and non-empty")
    tokens, positions, parents = [], [], []
    paths: list[tuple[int, ...]] = [()] * len(inputs)
    prev: tuple[int, ...] = ()
    prev_path: tuple[int, ...] = ()
    for i in sorted(range(len(inputs)), key=lambda k: inputs[k]):
        x = inputs[i]
        shared = common_prefix_length(prev, x)
        path = list(prev_path[:shared])
        for pos in range(shared, len(x)):
            parents.append(path[-1] if path else -1)
            tokens.append(x[pos])
            positions.append(pos)
            path.append(len(tokens) - 1)
        paths[i] = prev_path = tuple(path)
        prev = x
    return PrefixTree(tuple(tokens), tuple(positions), tuple(parents), tuple(paths))


def tree_mask(tree: PrefixTree, width: int) -> torch.Tensor:
    """[width, width] bool: slot q may attend to slot k iff k is q or an ancestor of q (a token
    before it on its input); padding slots after the tree attend to themselves only."""
    allowed = torch.eye(width, dtype=torch.bool)
    for k, parent in enumerate(tree.parents):  # a parent's slot always comes before its child's
        if parent >= 0:
            allowed[k] |= allowed[parent]
    return allowed


def split_sorted(lengths: list[int], batch_size: int, pass_cost: int = PASS_COST["cpu"],
                 longest: list[int] | None = None) -> list[int]:
    """Sizes of consecutive forward passes over rows of ``lengths`` (non-increasing), minimising
    the padded tokens (a pass pads to its first row) plus ``pass_cost`` tokens per pass.

    A pass holds at most ``batch_size * max(longest[rows])`` tokens (rows x width), so never
    more than ``batch_size`` padded copies of its longest input; ``longest`` (each row's
    longest input) defaults to ``lengths``, which makes that at most ``batch_size`` rows. A
    single row always fits, and a long row goes alone rather than padding the rows after it.
    """
    if any(a < b for a, b in zip(lengths, lengths[1:])):
        raise ValueError("lengths must be sorted longest first")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    longest = list(lengths) if longest is None else list(longest)
    if len(longest) != len(lengths) or any(a > b for a, b in zip(longest, lengths)):
        raise ValueError("longest[i] must be at most lengths[i] (a row holds its longest input)")
    cap = batch_size * max(longest, default=0)
    best: list[int | None] = [0] + [None] * len(lengths)  # best[j]: cost of the first j rows
    size = [0] * (len(lengths) + 1)
    for j in range(1, len(lengths) + 1):
        top = 0
        for i in range(j - 1, -1, -1):  # last pass = rows i..j-1; on a tie it stays smallest
            rows = j - i
            if rows > 1 and rows * lengths[i] > cap:
                break  # wider and more rows only
            top = max(top, longest[i])
            if rows > 1 and rows * lengths[i] > batch_size * top:
                continue
            cost = best[i] + lengths[i] * rows + pass_cost
            if best[j] is None or cost < best[j]:
                best[j], size[j] = cost, rows
    sizes, j = [], len(lengths)
    while j > 0:
        sizes.append(size[j])
        j -= size[j]
    return sizes[::-1]


def passes(groups: list[PrefixGroup], batch_size: int, pass_cost: int = PASS_COST["cpu"]) -> list[list[int]]:
    """Group indices per forward pass: rows sorted by width (longest first), cut by :func:`split_sorted`."""
    widths = [len(prefix_tree(g.inputs).tokens) for g in groups]
    order = sorted(range(len(groups)), key=lambda g: (-widths[g], groups[g].inputs))
    out, k = [], 0
    for n in split_sorted([widths[g] for g in order], batch_size, pass_cost,
                          [max(map(len, groups[g].inputs)) for g in order]):
        out.append(order[k:k + n])
        k += n
    return out


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
    attention = getattr(config, "_attn_implementation", None)
    if attention not in ATTENTION:
        return f"attention {attention!r} takes no 4D mask (have {', '.join(ATTENTION)})"
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if decoder is model or not isinstance(head, torch.nn.Linear):
        return "no separate decoder and linear LM head"
    if not {"attention_mask", "position_ids"} <= set(inspect.signature(decoder.forward).parameters):
        return "its decoder takes no attention mask or position ids"
    return None


@torch.no_grad()
def forward_trees(model, groups: list[PrefixGroup], targets: dict, device) -> dict[tuple[int, ...], list[float]]:
    """One forward pass over ``groups``, one prefix-tree row each (right-padded); the summed
    log-probability of each continuation of each input.

    targets: input -> its continuations (token id tuples, each at most the input's tail): the
    last ``len(c)`` positions of the input predict ``c``, as in a full forward of the input.
    Returns input -> one float per continuation, in order. The LM head runs once per scored
    slot (inputs that begin alike share slots).
    """
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    trees = [prefix_tree(g.inputs) for g in groups]
    width = max(len(t.tokens) for t in trees)
    ids = torch.zeros(len(trees), width, dtype=torch.long)
    for r, t in enumerate(trees):
        ids[r, :len(t.tokens)] = torch.tensor(t.tokens)
    kwargs = {}
    if any(len(g.inputs) > 1 for g in groups):  # else plain right-padded rows: the causal mask is the tree's
        positions = torch.zeros(len(trees), width, dtype=torch.long)
        allowed = torch.empty(len(trees), 1, width, width, dtype=torch.bool)
        for r, t in enumerate(trees):
            positions[r, :len(t.tokens)] = torch.tensor(t.positions)
            allowed[r, 0] = tree_mask(t, width)
        dtype = head.weight.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        kwargs = {"attention_mask": mask.to(device), "position_ids": positions.to(device)}
    hidden = decoder(input_ids=ids.to(device), **kwargs).last_hidden_state  # [rows, width, H]
    slots: dict[int, int] = {}  # flat slot (row * width + slot) -> row of the scored logits
    picks, tokens, sizes, owners = [], [], [], []
    for r, (g, t) in enumerate(zip(groups, trees)):
        for path, x, tail in zip(t.paths, g.inputs, g.tails):
            for c in targets[x]:
                if not 0 < len(c) <= tail:
                    raise ValueError(f"a continuation of {len(c)} tokens for an input scored at its last {tail}")
                for k, token in zip(path[len(x) - len(c):], c):
                    picks.append(slots.setdefault(r * width + k, len(slots)))
                    tokens.append(token)
                sizes.append(len(c))
            owners.append((x, len(targets[x])))
    logits = head(hidden.reshape(-1, hidden.shape[-1])[torch.tensor(list(slots), device=hidden.device)])
    # log_softmax as lm-eval (and the full path) computes it: float32 CPU log_softmax over a large
    # vocabulary is off by up to ~1e-5 per token (SmolLM2), and consistently so; logit - logsumexp
    # would be closer to the exact value but 3e-4 away from lm-eval on a 30-token continuation
    logp = F.log_softmax(logits.float(), dim=-1)
    values = logp[torch.tensor(picks, device=logp.device), torch.tensor(tokens, device=logp.device)]
    sums = iter([float(v.sum()) for v in torch.split(values, sizes)])
    return {x: [next(sums) for _ in range(n)] for x, n in owners}


def score_inputs(model, targets: dict, batch_size: int, device, collect) -> None:
    """Plan, pack and run shared-prefix scoring. targets: distinct input -> its continuations
    (:func:`forward_trees`); ``collect(input, lls)`` receives each input's summed
    log-probabilities, one per continuation, as soon as its pass is done."""
    inputs = list(targets)
    groups = plan_groups(inputs, [max(map(len, targets[x])) for x in inputs])
    pass_cost = PASS_COST.get(torch.device(device).type, OTHER_PASS_COST)
    for chunk in passes(groups, batch_size, pass_cost):
        for x, lls in forward_trees(model, [groups[g] for g in chunk], targets, device).items():
            collect(x, lls)
