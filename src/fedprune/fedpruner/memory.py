"""Peak training memory of a K-layer LoRA submodel (FedPruner's memory model).

A device trains LoRA on ``K`` decoder layers of a LLaMA-style model (the others are not in
its submodel). The sizes come from the family's adapter (:class:`ModelShape`, so weights and
LoRA state are right for OPT too: biases, LayerNorms, learned positions); the activation
terms below are counted on LLaMA. Its peak memory is

    M(K) = M_embed_head + K * (M_layer_weights + M_layer_lora_state + M_layer_act)
           + M_transient + M_fixed

with ``N = batch * seq_len`` tokens, ``b`` bytes per base element, ``b_l`` per LoRA element:

- ``M_embed_head = (V H [x2 if untied] + H) b``: embeddings, LM head, final norm.
- ``M_layer_weights = (H (q + 2 kv) + q H + 3 H I + 2 H) b`` with ``q = n_heads d``,
  ``kv = n_kv d`` (frozen q/k/v/o, gate/up/down, two RMSNorms).
- ``M_layer_lora_state = P_lora (1 + 1 + s) b_l``: LoRA parameters, their gradients and
  ``s`` optimiser states (AdamW: 2), ``P_lora = r * sum over targets (in + out)``.
- ``M_layer_act``: tensors autograd saves for backward in one layer (frozen base weights
  are saved by reference and cost nothing; counted by instrumenting
  ``torch.autograd.graph.saved_tensors_hooks`` on transformers' LLaMA with peft LoRA):

      attention half: layer input x (N H, for RMSNorm) + normed input (N H, shared by
        the q/k/v LoRA A, if any) + rotated q (N q) + rotated k (N kv) + v (N kv) + attention output
        (N q, also the o_proj LoRA-A input: the CPU/flash kernels return it (B, T, h, d)
        so the reshape is a view) [+ (N q) with ``separate_attn_out``]
        + log-sum-exp (B n_heads T, float32);
      FFN half: residual (N H) + normed (N H, if gate/up have LoRA) + gate out, up out,
        silu(gate) (3 N I) + silu(gate) * up (N I, if down has LoRA);
      LoRA A outputs: N r per target; RMSNorm rsqrt: 2 N (float32);
      with LoRA dropout, per target its dropped input (N d_in) and the dropout mask (N d_in,
        in the input's dtype: PyTorch's CPU dropout multiplies by a float noise tensor; CUDA's
        fused kernel keeps a bool mask, so there the model errs high), and then the un-dropped
        normed inputs / silu(gate) * up are no longer saved (only the LoRA-A read them).

  With ``attention="eager"`` the (B, n_heads, T, T) softmax output and its input are
  saved too (once: softmax output = matmul input), and k/v are saved after ``repeat_kv`` (N q each).
- ``M_transient``: the largest short-lived working set, at the start of backward:
  ``max(head, layer_backward)``, ``layer_backward`` ~ 3 N I b. (Activations of all layers
  are alive at that moment.) ``head`` depends on how the loss is computed:

  * chunked (``chunked_loss=True``, the default of federated training,
    ``federated.local.chunked_loss``): only supervised positions reach the LM head, ``c`` of them at
    a time under activation checkpointing, so no ``N x V`` tensor ever exists. ``head`` = one
    chunk's float32 log-softmax output, its incoming gradient and the logits gradient
    (3 c V 4) + the gathered hidden states of the supervised tokens and their gradient
    (2 N H b, all tokens supervised at worst), ``c = min(loss_chunk_tokens, N)``;
  * full logits (``chunked_loss=False``, Hugging Face's ``labels=`` loss): the float32
    log-softmax output of every position, its incoming gradient and the logits gradient
    (3 N V 4). The model output, logits included, is dropped before backward (as local
    training does); a caller that keeps it alive pays N V b more.

  In both, a lower-precision chunk's logits and their float32 copy are freed before the
  backward peak, so ``b`` does not change the head's term.

  The count is for a layer inside a trained stack (its input requires grad); the first
  trained layer saves slightly less, so the model errs on the safe side.
- ``M_fixed``: what does not scale with the model: the framework runtime, allocator
  slack. Calibrate it per platform (``benchmarks/fedpruner/validate_memory_model.py``).

``max_layers_for_budget`` inverts ``M(K)``:
``K = floor((M_i - M_embed_head - M_transient - M_fixed) / per_layer)``, capped at L.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, asdict
from typing import Any

from ..adapters.shape import ModelShape  # read from a config by the family's adapter

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "int8": 1}
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd_momentum": 1, "sgd": 0}
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KNOWN_TARGETS = LLAMA_TARGETS + ("fc1", "fc2")
"""LoRA targets by the adapters' projection names (``ModelShape.linear_shapes``); fc1/fc2: OPT's FFN"""


@dataclass(frozen=True)
class TrainSetup:
    """How a device trains: sequence, batch, LoRA, optimiser, precisions, attention kernel."""

    seq_len: int = 256
    batch_size: int = 1
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = LLAMA_TARGETS
    optimizer: str = "adamw"
    dtype: str = "float32"
    lora_dtype: str = "float32"
    attention: str = "sdpa"
    separate_attn_out: bool = False
    lora_dropout: float = 0.0
    """LoRA dropout probability; > 0 saves each target's dropped input and its dropout mask"""
    fixed_overhead_bytes: int = 0
    chunked_loss: bool = True
    """the loss runs the LM head in checkpointed chunks of supervised tokens (``federated.local.chunked_loss``);
    False: full ``N x V`` logits (Hugging Face's ``labels=`` loss)"""
    loss_chunk_tokens: int = 64
    """tokens per LM-head chunk of the chunked loss"""

    def __post_init__(self):
        if self.seq_len <= 0 or self.batch_size <= 0 or self.lora_rank <= 0:
            raise ValueError("seq_len, batch_size and lora_rank must be positive")
        if self.loss_chunk_tokens <= 0:
            raise ValueError(f"loss_chunk_tokens must be positive, got {self.loss_chunk_tokens}")
        if self.optimizer not in OPTIMIZER_STATES:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; known: {sorted(OPTIMIZER_STATES)}")
        for name in (self.dtype, self.lora_dtype):
            if name not in DTYPE_BYTES:
                raise ValueError(f"unknown dtype {name!r}; known: {sorted(DTYPE_BYTES)}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.attention not in ("sdpa", "eager"):
            raise ValueError(f"attention must be 'sdpa' or 'eager', got {self.attention!r}")
        bad = set(self.lora_targets) - set(KNOWN_TARGETS)
        if bad:
            raise ValueError(f"unknown LoRA targets {sorted(bad)}; known: {KNOWN_TARGETS}")

    @property
    def tokens(self) -> int:
        return self.seq_len * self.batch_size


@dataclass
class MemoryBreakdown:
    """Bytes per component for one K (see module doc); ``total`` is the predicted peak."""

    num_layers: int
    embed_head: int
    layer_weights: int
    lora_state: int
    activations: int
    transient: int
    fixed: int
    per_layer: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.embed_head + self.layer_weights + self.lora_state + self.activations + self.transient + self.fixed

    @property
    def dynamic(self) -> int:
        """What training adds on top of the loaded weights: LoRA state + activations + transient + fixed."""
        return self.lora_state + self.activations + self.transient + self.fixed

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total"], d["dynamic"] = self.total, self.dynamic
        return d


def layer_weight_bytes(shape: ModelShape, setup: TrainSetup) -> int:
    return shape.layer_parameters() * DTYPE_BYTES[setup.dtype]


def lora_params_per_layer(shape: ModelShape, rank: int, targets: tuple[str, ...] = LLAMA_TARGETS) -> int:
    """``r * sum (in + out)`` over the LoRA targets of one layer."""
    lin = shape.linear_shapes()
    missing = [t for t in targets if t not in lin]
    if missing:
        raise ValueError(f"LoRA targets {missing} are not projections of this model; it has {sorted(lin)}")
    return sum(rank * (lin[t][0] + lin[t][1]) for t in targets)


def lora_state_bytes_per_layer(shape: ModelShape, setup: TrainSetup) -> int:
    """Parameters + gradients + optimiser states of one layer's LoRA."""
    p = lora_params_per_layer(shape, setup.lora_rank, setup.lora_targets)
    return p * (2 + OPTIMIZER_STATES[setup.optimizer]) * DTYPE_BYTES[setup.lora_dtype]


def lora_dropout_bytes(shape: ModelShape, setup: TrainSetup, targets: tuple[str, ...]) -> int:
    """With LoRA dropout, every target's LoRA-A saves its dropped input (N d_in) and dropout
    saves its mask (N d_in, the input's dtype on CPU); PEFT applies dropout per target, so q/k/v
    pay it thrice. (The un-dropped inputs this replaces are left out by the callers.)"""
    if not setup.lora_dropout:
        return 0
    lin = shape.linear_shapes()
    return sum(setup.tokens * lin[t][0] * 2 * DTYPE_BYTES[setup.dtype] for t in targets)


def layer_activation_bytes(shape: ModelShape, setup: TrainSetup) -> int:
    """Bytes autograd keeps for backward in one LLaMA layer with LoRA (module doc)."""
    N, B, T = setup.tokens, setup.batch_size, setup.seq_len
    H, I = shape.hidden, shape.intermediate
    q, kv = shape.num_heads * shape.d, shape.num_kv_heads * shape.d
    b = DTYPE_BYTES[setup.dtype]
    targets = set(setup.lora_targets)
    # with LoRA dropout the LoRA-A read dropped copies (lora_dropout_bytes), not these inputs
    undropped = not setup.lora_dropout
    elems = 0
    # attention half: the residual input x (RMSNorm), the normed input (only when a q/k/v
    # LoRA-A reads it; frozen base linears keep only their weight), rotated q/k, v, output
    elems += N * H
    if targets & {"q_proj", "k_proj", "v_proj"} and undropped:
        elems += N * H
    if setup.attention == "sdpa":
        elems += N * (q + 2 * kv) + N * q
    else:  # eager: k/v after repeat_kv, scores and softmax probabilities
        elems += N * 3 * q + N * q + B * shape.num_heads * T * T
    if setup.separate_attn_out:
        elems += N * q
    # FFN half: residual, normed (when a gate/up LoRA-A reads it), gate, up, silu(gate),
    # silu(gate)*up (when the down LoRA-A reads it)
    elems += N * H + 3 * N * I
    if targets & {"gate_proj", "up_proj"} and undropped:
        elems += N * H
    if "down_proj" in targets and undropped:
        elems += N * I
    # LoRA-A outputs, saved by each LoRA-B
    elems += N * setup.lora_rank * len(targets)
    extra_fp32 = 2 * N * 4  # two RMSNorm rsqrt (N, 1)
    if setup.attention == "sdpa":
        extra_fp32 += B * shape.num_heads * T * 4  # log-sum-exp
    return elems * b + extra_fp32 + lora_dropout_bytes(shape, setup, setup.lora_targets)


def embed_head_bytes(shape: ModelShape, setup: TrainSetup) -> int:
    return shape.outer_parameters() * DTYPE_BYTES[setup.dtype]


def head_transient_bytes(shape: ModelShape, setup: TrainSetup) -> int:
    """The LM head's and loss's working set in backward (module doc).

    Chunked: one chunk's float32 log-softmax, its grad and the logits grad, and the gathered
    supervised hidden states with their grad. Full: the float32 log-softmax of every position,
    its grad and the logits grad (the model output is dropped before backward).
    """
    N, V, H, b = setup.tokens, shape.vocab, shape.hidden, DTYPE_BYTES[setup.dtype]
    if setup.chunked_loss:
        c = min(setup.loss_chunk_tokens, N)
        return 3 * c * V * 4 + 2 * N * H * b
    return 3 * N * V * 4


def transient_bytes(shape: ModelShape, setup: TrainSetup) -> int:
    """``max(head, layer_backward)``: the LM head's working set (:func:`head_transient_bytes`)
    or one layer's backward (~3 N I b)."""
    layer_bwd = 3 * setup.tokens * shape.intermediate * DTYPE_BYTES[setup.dtype]
    return max(head_transient_bytes(shape, setup), layer_bwd)


def training_memory(shape: ModelShape, setup: TrainSetup, num_layers: int) -> MemoryBreakdown:
    """Predicted peak training memory of a submodel with ``num_layers`` trained layers."""
    K = int(num_layers)
    if not 0 <= K <= shape.num_layers:
        raise ValueError(f"num_layers must lie in [0, {shape.num_layers}], got {K}")
    per = {"weights": layer_weight_bytes(shape, setup), "lora_state": lora_state_bytes_per_layer(shape, setup),
           "activations": layer_activation_bytes(shape, setup)}
    return MemoryBreakdown(
        num_layers=K, embed_head=embed_head_bytes(shape, setup), layer_weights=K * per["weights"],
        lora_state=K * per["lora_state"], activations=K * per["activations"],
        transient=transient_bytes(shape, setup) if K > 0 else 0, fixed=int(setup.fixed_overhead_bytes),
        per_layer=per,
    )


def max_layers_for_budget(budget_bytes: float, shape: ModelShape, setup: TrainSetup) -> int:
    """Largest ``K`` in ``[0, L]`` with ``training_memory(K).total <= budget_bytes`` (0 if none fits)."""
    base = training_memory(shape, setup, 0).total + transient_bytes(shape, setup)
    one = training_memory(shape, setup, 1)
    per_layer = sum(one.per_layer.values())
    if budget_bytes < one.total:
        return 0
    K = min(shape.num_layers, int(math.floor((budget_bytes - base) / per_layer)))
    # guard the float division against off-by-one at exact boundaries
    while K > 0 and training_memory(shape, setup, K).total > budget_bytes:
        K -= 1
    while K < shape.num_layers and training_memory(shape, setup, K + 1).total <= budget_bytes:
        K += 1
    return K


def block_costs(shape: ModelShape, setup: TrainSetup) -> dict[str, int]:
    """Per-sub-block bytes (weights + LoRA state + activations) for FedPruner+ units ``attn`` / ``mlp``.

    The layer's two RMSNorms and LoRA-A outputs are split by the sub-block that owns them.
    """
    attn_t = tuple(t for t in setup.lora_targets if t in ("q_proj", "k_proj", "v_proj", "o_proj"))
    mlp_t = tuple(t for t in setup.lora_targets if t in ("gate_proj", "up_proj", "down_proj"))
    total = training_memory(shape, setup, 1).per_layer
    N, H, I, b = setup.tokens, shape.hidden, shape.intermediate, DTYPE_BYTES[setup.dtype]
    lin = shape.linear_shapes()
    ffn = [t for t in lin if t in ("gate_proj", "up_proj", "down_proj", "fc1", "fc2")]
    w_mlp = (sum(lin[t][0] * lin[t][1] for t in ffn) + sum(lin[t][1] for t in ffn if t in shape.biased)
             + shape.norm_params * H) * b
    lora_mlp = lora_state_bytes_per_layer(shape, TrainSetup(**{**asdict(setup), "lora_targets": mlp_t})) if mlp_t else 0
    undropped = not setup.lora_dropout
    act_mlp = (N * H + 3 * N * I + N * setup.lora_rank * len(mlp_t)
               + (N * H if undropped and {"gate_proj", "up_proj"} & set(mlp_t) else 0)
               + (N * I if undropped and "down_proj" in mlp_t else 0)) * b + N * 4 + \
        lora_dropout_bytes(shape, setup, mlp_t)
    mlp = w_mlp + lora_mlp + act_mlp
    attn = sum(total.values()) - mlp
    assert attn > 0 and attn_t is not None
    return {"attn": int(attn), "mlp": int(mlp)}


def saved_tensor_bytes(fn, exclude: Any = ()) -> int:
    """Bytes of distinct storages autograd saves for backward while ``fn()`` runs.

    Tensors sharing a storage count once; storages of ``exclude`` (e.g. the model's
    parameters, which autograd saves by reference) count zero. An instrument for checking
    ``layer_activation_bytes``; returns the sum, ``fn``'s result is discarded after the count.
    """
    import torch

    skip = {p.untyped_storage().data_ptr() for p in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())
