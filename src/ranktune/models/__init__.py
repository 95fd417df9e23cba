"""Loading base models and tokenizers, and finding the modules LoRA can adapt."""

from ranktune.models.loading import load_base_model, load_tokenizer, resolve_model_path
from ranktune.models.targets import adaptable_modules, matched_modules

__all__ = ["adaptable_modules", "load_base_model", "load_tokenizer", "matched_modules", "resolve_model_path"]
