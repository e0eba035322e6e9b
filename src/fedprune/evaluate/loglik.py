"""Log-likelihood of continuations given contexts, tokenized exactly like lm-eval's HFLM.

lm-evaluation-harness 0.4 (``TemplateLM._encode_pair`` + ``HFLM.tok_encode``):
- trailing whitespace of the context moves to the front of the continuation;
- ``context + continuation`` and ``context`` are encoded separately with the tokenizer's
  default special tokens (so a BOS is added only when the tokenizer adds one: SmolLM2's
  does not, Llama-2's does), and the continuation tokens are the tail of the whole
  encoding after ``len(context tokens)``;
- an empty context becomes the prefix token (BOS, else EOS);
- inputs longer than the model's context keep their last ``max_length + 1`` tokens.

Identical model inputs are run once. Two ways to run the rest (``scoring``):

- ``shared-prefix`` (default): inputs sharing a beginning (the choices of a question) are
  packed into one row as a prefix tree, so that the shared tokens run once
  (:mod:`fedprune.evaluate.shared_prefix`);
  models it does not support (:func:`~fedprune.evaluate.shared_prefix.unsupported_reason`)
  take the full path;
- ``full``: every input in full, as lm-eval does: sorted longest first, batches right-padded
  without an attention mask (padding sits after every real token, so a causal model's logits at
  real positions do not see it).

Both compute the same log-likelihoods, up to float32 rounding (a different summation order:
about 1e-6 per token on the tiny test models, within 1e-4 of lm-eval on SmolLM2-135M).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

DEFAULT_MAX_LENGTH = 2048
SCORING = ("shared-prefix", "full")


@dataclass(frozen=True)
class EncodedRequest:
    """Token ids of one (context, continuation) request: lists of ints."""

    context: list[int]
    continuation: list[int]


def prefix_token_id(tokenizer) -> int:
    """The token standing for an empty context: BOS, else EOS (lm-eval's ``prefix_token_id``)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def tok_encode(tokenizer, text: str, add_bos_token: bool | None = None) -> list[int]:
    """``tokenizer.encode`` as HFLM calls it (no double BOS when the text already starts with one)."""
    kwargs = {} if add_bos_token is None else {"add_special_tokens": add_bos_token}
    if add_bos_token is None:
        prefix = tokenizer.decode(prefix_token_id(tokenizer))
        if prefix and text.startswith(prefix):
            kwargs["add_special_tokens"] = False
    return tokenizer.encode(text, **kwargs)


def encode_pair(tokenizer, context: str, continuation: str, add_bos_token: bool | None = None) -> EncodedRequest:
    """Split ``context + continuation`` into context tokens and continuation tokens (lm-eval rules)."""
    if context == "":
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = prefix_token_id(tokenizer)
        return EncodedRequest([prefix], cont) if prefix != cont[0] else EncodedRequest(cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok_encode(tokenizer, context + continuation, add_bos_token)
    ctx = tok_encode(tokenizer, context, add_bos_token)
    return EncodedRequest(ctx, whole[len(ctx):])


def model_max_length(model) -> int:
    """The model's context length (config ``n_positions`` / ``max_position_embeddings`` / ``n_ctx``)."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(model.config, attr, None)
        if value:
            return int(value)
    return DEFAULT_MAX_LENGTH


def model_inputs(req: EncodedRequest, max_length: int) -> tuple[tuple[int, ...], int]:
    """The token ids fed to the model (all but the last, left-truncated) and the continuation length."""
    if not req.continuation:
        raise ValueError("a continuation encodes to no tokens; nothing to score")
    if len(req.continuation) > max_length:
        raise ValueError(f"continuation of {len(req.continuation)} tokens exceeds the model length {max_length}")
    return tuple((req.context + req.continuation)[-(max_length + 1):][:-1]), len(req.continuation)


def _accepts_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def forward_tails(model, inputs: list[tuple[int, ...]], tails: list[int], device) -> list[torch.Tensor]:
    """Log-probabilities at the last ``tails[i]`` positions of each input, in one forward pass.

    inputs: token id tuples (right-padded into a [B, max_len] batch). Returns one float32
    tensor [tails[i], V] per input: row j predicts the token after position ``len - tails[i] + j``.
    """
    lengths = [len(x) for x in inputs]
    width = max(lengths)
    batch = torch.zeros(len(inputs), width, dtype=torch.long)
    for i, x in enumerate(inputs):
        batch[i, :len(x)] = torch.tensor(x)
    # Only the last `keep` positions are needed: skip the LM head everywhere else.
    keep = width - min(n - t for n, t in zip(lengths, tails))
    kwargs = {"logits_to_keep": keep} if _accepts_logits_to_keep(model) else {}
    logits = model(input_ids=batch.to(device), **kwargs).logits  # [B, keep or width, V]
    offset = width - logits.shape[1]
    return [F.log_softmax(logits[i, n - t - offset:n - offset].float(), dim=-1)
            for i, (n, t) in enumerate(zip(lengths, tails))]


def scoring_path(model, scoring: str = "shared-prefix") -> str:
    """The path ``loglikelihoods`` takes for ``model``: ``scoring``, or ``full`` where the model
    does not support ``shared-prefix``. An unknown name raises ValueError."""
    from .shared_prefix import unsupported_reason

    if scoring not in SCORING:
        raise ValueError(f"unknown scoring {scoring!r}; choose one of {', '.join(SCORING)}")
    return "full" if scoring == "shared-prefix" and unsupported_reason(model) else scoring


def loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], batch_size: int = 8,
                   add_bos_token: bool | None = None, max_length: int | None = None,
                   progress: bool = True, desc: str = "loglikelihood", scoring: str = "shared-prefix") -> list[float]:
    """Summed log-probability of each continuation given its context, in request order.

    requests: ``(context, continuation)`` strings. batch_size: model inputs per forward pass
    (``shared-prefix``: a pass holds at most the tokens of ``batch_size`` padded copies of its
    longest input, as a ``full`` batch of ``batch_size`` inputs may).
    scoring: ``shared-prefix`` or ``full`` (module docstring). Returns one float per request.
    """
    from .shared_prefix import score_inputs

    path = scoring_path(model, scoring)
    max_length = max_length or model_max_length(model)
    encoded = [encode_pair(tokenizer, c, x, add_bos_token) for c, x in requests]
    # Identical model inputs give identical logits (e.g. boolq's one-token " no"/" yes"):
    # run each distinct input once, keeping enough positions for its longest continuation.
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, req in enumerate(encoded):
        groups.setdefault(model_inputs(req, max_length)[0], []).append(i)
    tails = {inp: max(len(encoded[i].continuation) for i in idx) for inp, idx in groups.items()}
    device = next(model.parameters()).device
    results = [0.0] * len(requests)
    bar = tqdm(total=len(requests), desc=desc, disable=not progress, leave=False)

    if path == "shared-prefix":
        def put(inp, lls):
            for i, ll in zip(groups[inp], lls):
                results[i] = ll
            bar.update(len(lls))

        score_inputs(model, {inp: [tuple(encoded[i].continuation) for i in idx] for inp, idx in groups.items()},
                     batch_size, device, put)
    else:
        order = sorted(groups, key=lambda inp: (-len(inp), inp))  # longest first, like lm-eval
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            for inp, logp in zip(chunk, forward_tails(model, chunk, [tails[x] for x in chunk], device)):
                for i in groups[inp]:
                    target = torch.tensor(encoded[i].continuation, device=logp.device)
                    results[i] = float(logp[-len(target):].gather(-1, target[:, None]).sum())
                bar.update(len(groups[inp]))
    bar.close()
    return results
