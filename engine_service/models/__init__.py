"""Our model implementations, built from shared layers, loading Hugging Face checkpoints."""

from engine_service.models.causal_lm import CausalLM
from engine_service.models.loader import load_model
from engine_service.models.registry import SUPPORTED_ARCHITECTURES, resolve_architecture

__all__ = ["SUPPORTED_ARCHITECTURES", "CausalLM", "load_model", "resolve_architecture"]
