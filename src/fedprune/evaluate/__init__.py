"""Evaluation: perplexity, zero-shot accuracy (lm-evaluation-harness conventions), speed.

    import fedprune
    model, tok = fedprune.load_model("smollm2-135m"), fedprune.load_tokenizer("smollm2-135m")
    fedprune.evaluate.perplexity(model, tok, "wikitext2", seq_len=512, limit=40)
    fedprune.evaluate.evaluate(model, tok, tasks=["wikitext2", "piqa"], limit=100)
    fedprune.evaluate.speed(model, tok, prompt_len=128, gen_len=64)

The protocol is ``shared/design/evaluation.md``; ``fedprune eval`` and ``fedprune speed``
call these same functions.
"""
from .harness import DEFAULT_TASKS, evaluate, parse_tasks, reported_metric, zero_shot_average
from .loglik import encode_pair, loglikelihoods
from .perplexity import perplexity, perplexity_details, perplexity_of_tokens
from .speed import parameter_bytes, speed
from .zeroshot import ChoiceScore, accuracy, score_example, score_examples, score_flat, zero_shot, zero_shot_details

__all__ = [
    "DEFAULT_TASKS", "evaluate", "parse_tasks", "reported_metric", "zero_shot_average", "encode_pair",
    "loglikelihoods", "perplexity", "perplexity_details", "perplexity_of_tokens", "parameter_bytes", "speed",
    "ChoiceScore", "accuracy", "score_example", "score_examples", "score_flat", "zero_shot", "zero_shot_details",
]
