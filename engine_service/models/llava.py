"""LLaVA (``LlavaForConditionalGeneration``): a CLIP vision tower, a two-layer projector, and
a Llama, Mistral or Qwen2 language model.

An image (one fixed-size crop from the checkpoint's image processor) becomes the hidden
states of one CLIP layer (``vision_feature_layer``, or several concatenated), without the
CLS row under the ``default`` select strategy, projected to the LM's width: one embedding
per patch, each at one ``<image>`` placeholder of the prompt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from engine_service.layers.paged_attention import AttentionBackend
from engine_service.layers.parallel import SINGLE, TensorParallel
from engine_service.models.config import ModelConfig
from engine_service.models.llama import LlamaForCausalLM
from engine_service.models.mistral import MistralForCausalLM
from engine_service.models.qwen2 import Qwen2ForCausalLM
from engine_service.models.vision_language import (
    VisionLanguageCausalLM,
    full_hf_config,
    text_model_config,
)

if TYPE_CHECKING:
    from engine_service.engine.multimodal import ImageInput

_LANGUAGE_MODELS = {
    "llama": LlamaForCausalLM,
    "mistral": MistralForCausalLM,
    "qwen2": Qwen2ForCausalLM,
}


class LlavaProjector(nn.Module):
    """Vision width to LM width: linear, activation, linear (HF's names)."""

    def __init__(self, vision_width: int, text_width: int, act: str, bias: bool) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        self.linear_1 = nn.Linear(vision_width, text_width, bias=bias)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(text_width, text_width, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class LlavaForConditionalGeneration(VisionLanguageCausalLM):
    architecture = "LlavaForConditionalGeneration"
    unmapped_prefixes = ("model.vision_tower.", "model.multi_modal_projector.")
    checkpoint_renames = (
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.vision_model.", "model.vision_tower."),
        ("model.vision_tower.vision_model.", "model.vision_tower."),
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    )

    @classmethod
    def parse_config(cls, raw: dict[str, Any]) -> ModelConfig:
        full = full_hf_config(raw)
        text = full.text_config.to_dict()
        family = _LANGUAGE_MODELS.get(text.get("model_type", "llama"))
        if family is None:
            raise ValueError(
                f"LLaVA with a {text.get('model_type')!r} language model is not supported; "
                f"supported: {', '.join(_LANGUAGE_MODELS)}"
            )
        return text_model_config(full.to_dict(), text, cls.architecture, family.parse_config)

    def __init__(
        self, config: ModelConfig, backend: AttentionBackend, tp: TensorParallel = SINGLE
    ) -> None:
        super().__init__(config, backend, tp)
        from transformers import CONFIG_MAPPING, AutoModel

        hf = dict(config.multimodal or {})
        vision = dict(hf["vision_config"])
        vision_config = CONFIG_MAPPING[vision.pop("model_type")](**vision)
        self.image_token_id = int(hf.get("image_token_index", hf.get("image_token_id")))
        self.feature_layer: int | list[int] = hf.get("vision_feature_layer", -2)
        self.select_strategy: str = hf.get("vision_feature_select_strategy", "default")
        self.image_size = vision_config.image_size
        self.num_patches = (vision_config.image_size // vision_config.patch_size) ** 2
        num_layers = 1 if isinstance(self.feature_layer, int) else len(self.feature_layer)
        if not self.has_vision:
            return
        self.model.vision_tower = AutoModel.from_config(vision_config)
        self.model.multi_modal_projector = LlavaProjector(
            vision_config.hidden_size * num_layers,
            config.hidden_size,
            hf.get("projector_hidden_act", "gelu"),
            bool(hf.get("multimodal_projector_bias", True)),
        )

    def vision_tower(self) -> nn.Module:
        return self.model.vision_tower

    @property
    def tokens_per_image(self) -> int:
        return self.num_patches + (self.select_strategy == "full")

    def check_image(self, image: ImageInput) -> None:
        shape = tuple(image.pixel_values.shape)
        size = self.image_size
        if shape != (3, size, size):
            raise ValueError(f"pixel_values of shape {shape}; this model takes (3, {size}, {size})")
        if image.length != self.tokens_per_image:
            raise ValueError(
                f"an image has {image.length} placeholder tokens; this model gives "
                f"{self.tokens_per_image} embeddings per image"
            )

    def encode_images(self, images: list[ImageInput]) -> list[torch.Tensor]:
        dtype, device = self._vision_dtype_device()
        pixels = torch.stack([image.pixel_values for image in images]).to(device, dtype)
        states = self.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        layers = [self.feature_layer] if isinstance(self.feature_layer, int) else self.feature_layer
        features = torch.cat([states[layer] for layer in layers], dim=-1)
        if self.select_strategy == "default":
            features = features[:, 1:]
        return list(self.model.multi_modal_projector(features))
