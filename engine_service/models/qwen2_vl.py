"""Qwen2-VL and Qwen2.5-VL: a vision transformer over variable-size images, and a Qwen2
decoder whose rotary positions are three-dimensional (M-RoPE).

The image processor cuts an image into ``grid_t x grid_h x grid_w`` patches (flattened rows
of ``C * temporal_patch * patch * patch`` values); the vision transformer attends within each
image only, and its merger folds every ``merge x merge`` neighbourhood into one embedding,
so an image gives ``t * h * w / merge**2`` placeholder tokens. Several images of one step,
of any sizes, run as one flat batch.

M-RoPE gives text tokens equal (t, h, w) coordinates (plain rotary) and an image's tokens
their grid coordinates, all offset by where the image starts; the text after an image
resumes from the largest coordinate used plus one::

    prompt       t0 t1 [img 2x3] t2 ...
    t            0  1   2 2 2 2 2 2   5      (image: rows 0..1, cols 0..2 around 2)
    h            0  1   2 2 2 3 3 3   5
    w            0  1   2 3 4 2 3 4   5      delta = 5 - 8 = -3 for every later token

The prompt's positions are computed once per request (:meth:`mrope_positions`); tokens
after the prompt are at ``cache index + delta``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from engine_service.layers.paged_attention import AttentionBackend
from engine_service.layers.parallel import SINGLE, TensorParallel
from engine_service.models.config import ModelConfig
from engine_service.models.qwen2 import Qwen2ForCausalLM
from engine_service.models.vision_language import (
    VisionLanguageCausalLM,
    full_hf_config,
    text_model_config,
)

if TYPE_CHECKING:
    from engine_service.engine.multimodal import ImageInput


def _mrope_section(text: dict[str, Any]) -> list[int]:
    for key in ("rope_parameters", "rope_scaling"):
        section = (text.get(key) or {}).get("mrope_section")
        if section:
            return [int(s) for s in section]
    raise ValueError("a Qwen2-VL config needs rope_parameters.mrope_section")


class Qwen2VLForConditionalGeneration(VisionLanguageCausalLM):
    architecture = "Qwen2VLForConditionalGeneration"
    unmapped_prefixes = ("model.visual.",)
    checkpoint_renames = (
        ("model.layers.", "model.language_model.layers."),
        ("model.embed_tokens.", "model.language_model.embed_tokens."),
        ("model.norm.", "model.language_model.norm."),
        ("visual.", "model.visual."),
    )

    @classmethod
    def parse_config(cls, raw: dict[str, Any]) -> ModelConfig:
        full = full_hf_config(raw)
        text = full.text_config.to_dict()
        section = _mrope_section(text)
        # Plain rotary frequencies; the sections pick which coordinate turns each pair.
        text.pop("rope_scaling", None)
        theta = (text.get("rope_parameters") or {}).get("rope_theta", text.get("rope_theta"))
        text["rope_parameters"] = {"rope_theta": theta if theta is not None else 1000000.0}
        config = text_model_config(
            full.to_dict(), text, cls.architecture, Qwen2ForCausalLM.parse_config
        )
        config.mrope_section = section
        return config

    def __init__(
        self, config: ModelConfig, backend: AttentionBackend, tp: TensorParallel = SINGLE
    ) -> None:
        super().__init__(config, backend, tp)
        from transformers import CONFIG_MAPPING

        hf = dict(config.multimodal or {})
        vision = dict(hf["vision_config"])
        vision_config = CONFIG_MAPPING[vision.pop("model_type")](**vision)
        self.image_token_id = int(hf["image_token_id"])
        self.merge = vision_config.spatial_merge_size
        self.patch_values = (
            vision_config.in_channels
            * vision_config.temporal_patch_size
            * vision_config.patch_size**2
        )
        if self.has_vision:
            self.model.visual = self._vision_class(hf["model_type"])(vision_config)

    @staticmethod
    def _vision_class(model_type: str) -> type[nn.Module]:
        if model_type == "qwen2_5_vl":
            from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
                Qwen2_5_VisionTransformerPretrainedModel,
            )

            return Qwen2_5_VisionTransformerPretrainedModel
        from transformers.models.qwen2_vl.modeling_qwen2_vl import (
            Qwen2VisionTransformerPretrainedModel,
        )

        return Qwen2VisionTransformerPretrainedModel

    def vision_tower(self) -> nn.Module:
        return self.model.visual

    def check_image(self, image: ImageInput) -> None:
        if image.grid_thw is None or len(image.grid_thw) != 3:
            raise ValueError("an image for this model needs its patch grid (grid_thw)")
        t, h, w = image.grid_thw
        if t != 1 or h % self.merge or w % self.merge:
            raise ValueError(
                f"image grid {image.grid_thw} is not a single frame of "
                f"{self.merge}x{self.merge}-mergeable patches"
            )
        shape = tuple(image.pixel_values.shape)
        if shape != (t * h * w, self.patch_values):
            raise ValueError(
                f"pixel_values of shape {shape}; grid {image.grid_thw} needs "
                f"({t * h * w}, {self.patch_values})"
            )
        tokens = t * h * w // self.merge**2
        if image.length != tokens:
            raise ValueError(
                f"an image has {image.length} placeholder tokens; its grid gives {tokens}"
            )

    def encode_images(self, images: list[ImageInput]) -> list[torch.Tensor]:
        dtype, device = self._vision_dtype_device()
        pixels = torch.cat([image.pixel_values for image in images]).to(device, dtype)
        grid = torch.tensor([image.grid_thw for image in images], device=device)
        merged = self.model.visual(pixels, grid_thw=grid).pooler_output
        return list(merged.split([image.length for image in images]))

    def mrope_positions(
        self, num_prompt_tokens: int, images: list[ImageInput]
    ) -> tuple[np.ndarray, int]:
        """The prompt's ``[3, num_prompt_tokens]`` positions and the delta of later tokens."""
        positions = np.empty((3, num_prompt_tokens), dtype=np.int64)
        next_position = 0  # where the next text token (or image origin) goes
        text_start = 0
        for image in sorted(images, key=lambda x: x.offset):
            num_text = image.offset - text_start
            positions[:, text_start : image.offset] = next_position + np.arange(num_text)
            next_position += num_text
            _, h, w = image.grid_thw  # type: ignore[misc]
            rows, cols = h // self.merge, w // self.merge
            end = image.offset + image.length
            positions[0, image.offset : end] = next_position
            positions[1, image.offset : end] = next_position + np.repeat(np.arange(rows), cols)
            positions[2, image.offset : end] = next_position + np.tile(np.arange(cols), rows)
            next_position += max(rows, cols)
            text_start = end
        tail = num_prompt_tokens - text_start
        positions[:, text_start:] = next_position + np.arange(tail)
        return positions, next_position + tail - num_prompt_tokens


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """Qwen2.5-VL: the same language side; its vision transformer (windowed attention,
    RMSNorm, gated MLP) comes from transformers by the config's model type."""

    architecture = "Qwen2_5_VLForConditionalGeneration"
