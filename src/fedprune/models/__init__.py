"""Loading, converting and saving models."""
from .checkpoint import load_checkpoint, save_model
from .loading import KNOWN_MODELS, load_model, load_tokenizer, resolve_model_dir

__all__ = ["KNOWN_MODELS", "load_model", "load_tokenizer", "resolve_model_dir", "save_model", "load_checkpoint"]
