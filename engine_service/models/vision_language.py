"""What LLaVA and Qwen2-VL share: our dense decoder as the language model, a vision tower
built from ``transformers`` modules and loaded from the same checkpoint, and the hooks the
loader and the engine use.

The module tree follows the checkpoints' current layout, so tensor names load as they are::

    model.language_model.*   our DenseModel (stacked qkv / gate_up through the mapping)
    model.vision_tower.* | model.visual.*   transformers' module, its own names (unmapped)
    model.multi_modal_projector.*           (LLaVA)
    lm_head.*

Older checkpoints (``language_model.model.*``, ``vision_tower.vision_model.*``, ``visual.*``)
are renamed on load by each family's ``checkpoint_renames``.

Under tensor parallelism the language model is split like the dense families'; the vision
tower and projector are whole, and only on the engine's first rank, which encodes every
image and sends the embeddings with the step (``engine/parallel/channel.py``). The other
ranks build no vision side: its checkpoint tensors are skipped there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from engine_service.layers.embedding import ParallelLMHead
from engine_service.layers.paged_attention import AttentionBackend, AttentionMetadata
from engine_service.layers.parallel import TensorParallel
from engine_service.models.config import ModelConfig
from engine_service.models.dense import STACKED_WEIGHT_MAPPING, DenseModel

if TYPE_CHECKING:
    from engine_service.engine.multimodal import ImageInput


def full_hf_config(raw: dict[str, Any]) -> Any:
    """The checkpoint's config as its ``transformers`` class reads it: sub-configs with
    every default filled in (published LLaVA configs list only what differs)."""
    from transformers import CONFIG_MAPPING

    fields = {k: v for k, v in raw.items() if k != "model_type"}
    return CONFIG_MAPPING[raw["model_type"]](**fields)


def text_model_config(
    raw: dict[str, Any], text: dict[str, Any], architecture: str, lm_parse: Any
) -> ModelConfig:
    """The language model's :class:`ModelConfig` from the ``text_config`` dict, parsed by
    the text family's ``parse_config`` (``lm_parse``), with the whole config kept for the
    vision side."""
    config: ModelConfig = lm_parse(text)
    config.architecture = architecture
    config.multimodal = raw
    config.tie_word_embeddings = bool(
        raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    )
    if not config.eos_token_ids and raw.get("eos_token_id") is not None:
        eos = raw["eos_token_id"]
        config.eos_token_ids = [eos] if isinstance(eos, int) else list(eos)
    config.torch_dtype = raw.get("dtype") or raw.get("torch_dtype") or config.torch_dtype
    return config


def rebuild_meta_buffers(module: nn.Module) -> None:
    """Give buffers left on the meta device (non-persistent ones transformers modules build
    in ``__init__``: position ids, rotary frequencies) their values, by building a fresh copy
    of each owning submodule on the CPU from its ``config``."""
    for sub in module.modules():
        meta = [name for name, buf in sub._buffers.items() if buf is not None and buf.is_meta]
        if not meta:
            continue
        with torch.device("cpu"):
            fresh = type(sub)(sub.config)
        for name in meta:
            sub._buffers[name] = fresh._buffers[name]


class VisionLanguageCausalLM(nn.Module):
    """A decoder-only LM whose prompt embeddings may come from images; subclasses build
    ``self.model``'s vision side and implement ``encode_images`` / ``check_image``."""

    architecture: ClassVar[str]
    # The language model is built on the tensor-parallel layers (see models/loader.py).
    supports_tensor_parallel: ClassVar[bool] = True
    packed_modules_mapping = STACKED_WEIGHT_MAPPING
    unmapped_prefixes: ClassVar[tuple[str, ...]] = ()
    checkpoint_renames: ClassVar[tuple[tuple[str, str], ...]] = ()
    image_token_id: int

    def __init__(self, config: ModelConfig, backend: AttentionBackend, tp: TensorParallel) -> None:
        super().__init__()
        self.config = config
        # Only the engine's first rank encodes images (it alone schedules and samples).
        self.has_vision = tp.rank == 0 and tp.dp_rank == 0
        self.model = nn.Module()
        self.model.language_model = DenseModel(config, backend, tp, qk_norm=False)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    def vision_tower(self) -> nn.Module:
        raise NotImplementedError

    def checkpoint_name(self, name: str) -> str:
        for old, new in self.checkpoint_renames:
            if name.startswith(old):
                return new + name[len(old) :]
        return name

    def after_load(self) -> None:
        if self.has_vision:
            rebuild_meta_buffers(self.vision_tower())

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        mm_rows: torch.Tensor | None = None,
        mm_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.model.language_model(input_ids, positions, kv_cache, meta, mm_rows, mm_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits of ``hidden``'s rows; under tensor parallelism on the first rank only."""
        return self.lm_head.compute_logits(hidden)

    def _vision_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        weight = next(self.vision_tower().parameters())
        return weight.dtype, weight.device

    def encode_images(self, images: list[ImageInput]) -> list[torch.Tensor]:
        raise NotImplementedError

    def check_image(self, image: ImageInput) -> None:
        raise NotImplementedError
