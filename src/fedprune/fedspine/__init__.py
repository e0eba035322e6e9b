"""FedSpine's algorithmic cores: per-device (p, r) bandits, LoRA-gradient importance,
cubic sparsity schedule and GQA-valid head/channel masks. Pure functions; the federated
runtime composes them."""
from __future__ import annotations

from .bandit import CHOOSERS, Arm, ConfigChooser, RandomChooser, SmoothUCB, UCB1Grid, make_chooser
from .importance import (ImportanceEMA, ffn_channel_importance, head_importance, layer_unit_importance,
                         lora_element_importance, lora_weight_grad_estimate, update_model_importance)
from .masks import (MaskHandle, apply_masks, check_gqa_valid, gqa_head_keep_mask, layer_keep_masks,
                    model_keep_masks, prune_to_masks)
from .reward import REWARDS, RoundOutcome, efficiency_reward, fedspine_reward, get_reward
from .schedule import cubic_sparsity, is_prune_step, sparsity_at_local_step, sparsity_schedule

__all__ = [
    "CHOOSERS", "Arm", "ConfigChooser", "RandomChooser", "SmoothUCB", "UCB1Grid", "make_chooser",
    "ImportanceEMA", "ffn_channel_importance", "head_importance", "layer_unit_importance",
    "lora_element_importance", "lora_weight_grad_estimate", "update_model_importance",
    "MaskHandle", "apply_masks", "check_gqa_valid", "gqa_head_keep_mask", "layer_keep_masks",
    "model_keep_masks", "prune_to_masks", "REWARDS", "RoundOutcome", "efficiency_reward", "fedspine_reward", "get_reward",
    "cubic_sparsity", "is_prune_step", "sparsity_at_local_step", "sparsity_schedule",
]
