"""Maps ``architectures`` in a checkpoint's config.json to our model classes."""

from __future__ import annotations

from engine_service.models.causal_lm import CausalLM
from engine_service.models.deepseek_v3 import DeepseekV3ForCausalLM
from engine_service.models.gpt_oss import GptOssForCausalLM
from engine_service.models.llama import LlamaForCausalLM
from engine_service.models.llava import LlavaForConditionalGeneration
from engine_service.models.mistral import MistralForCausalLM
from engine_service.models.mixtral import MixtralForCausalLM
from engine_service.models.qwen2 import Qwen2ForCausalLM
from engine_service.models.qwen2_moe import Qwen2MoeForCausalLM
from engine_service.models.qwen2_vl import (
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)
from engine_service.models.qwen3 import Qwen3ForCausalLM
from engine_service.models.qwen3_moe import Qwen3MoeForCausalLM

_REGISTRY: dict[str, type[CausalLM]] = {
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
    "GptOssForCausalLM": GptOssForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "LlavaForConditionalGeneration": LlavaForConditionalGeneration,
    "Qwen2VLForConditionalGeneration": Qwen2VLForConditionalGeneration,
    "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLForConditionalGeneration,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}

SUPPORTED_ARCHITECTURES = tuple(sorted(_REGISTRY))


def resolve_architecture(architectures: list[str] | None) -> type[CausalLM]:
    for name in architectures or []:
        if name in _REGISTRY:
            return _REGISTRY[name]
    raise ValueError(
        f"model architecture {architectures or '(none given)'} is not supported; "
        f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )
