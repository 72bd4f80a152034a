"""Tiny random vision-language checkpoints for tests and benchmarks: LLaVA (CLIP tower,
Llama LM) and Qwen2-VL, each with a real BPE tokenizer, its image processor
(``preprocessor_config.json``) and a chat template that places images, saved the way
Hugging Face checkpoints are."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from switchyard.demo import SPECIAL_TOKENS, _train_tokenizer

LLAVA_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- message['role'] | upper + ': ' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '<image>\\n' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'ASSISTANT:' }}{%- endif %}"
)

QWEN2_VL_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]  # fmt: skip


def _tokenizer(extra_specials: list[str], template: str, eos: str):
    from transformers import PreTrainedTokenizerFast

    tokenizer = _train_tokenizer(1024)
    tokenizer.add_special_tokens(extra_specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=SPECIAL_TOKENS[0],
        eos_token=eos,
        pad_token=SPECIAL_TOKENS[2],
        chat_template=template,
        clean_up_tokenization_spaces=False,
        extra_special_tokens={},
    )
    return fast


def _fix_tokenizer_class(path: Path) -> None:
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def make_llava_checkpoint(
    path: Path,
    seed: int = 0,
    image_size: int = 56,
    vision: dict | None = None,
    text: dict | None = None,
) -> Path:
    """LLaVA-1.5 shaped: CLIP tower (patch 14, feature layer -2, CLS dropped), a GELU
    projector, a two-layer Llama; ``(image_size / 14) ** 2`` tokens per image. ``vision``
    and ``text`` override the tiny default shapes (benchmarks use larger ones)."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    path.mkdir(parents=True, exist_ok=True)
    fast = _tokenizer(["<image>"], LLAVA_TEMPLATE, "<|eot_id|>")
    eos = fast.convert_tokens_to_ids("<|eot_id|>")
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**{
            **dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, projection_dim=32),
            **(vision or {}), "image_size": image_size, "patch_size": 14,
        }),
        text_config=LlamaConfig(**{
            **dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                   initializer_range=0.2),
            **(text or {}), "vocab_size": len(fast), "eos_token_id": eos,
            "bos_token_id": fast.bos_token_id,
        }),
        image_token_index=fast.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        architectures=["LlavaForConditionalGeneration"],
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    GenerationConfig(eos_token_id=eos, bos_token_id=fast.bos_token_id).save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    ).save_pretrained(path)
    fast.save_pretrained(path, save_jinja_files=False)
    _fix_tokenizer_class(path)
    return path


def make_qwen2_vl_checkpoint(path: Path, seed: int = 0, version: str = "2") -> Path:
    """Qwen2-VL shaped (``version="2.5"``: Qwen2.5-VL, whose vision transformer has windowed
    blocks, RMSNorm and a gated MLP): a two-block vision transformer (patch 14, merge 2) and a
    two-layer Qwen2 LM with M-RoPE sections [2, 3, 3]; images of 28 to 112 pixels a side."""
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
    )

    if version == "2.5":
        config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        vision = dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
            spatial_merge_size=2, patch_size=14, temporal_patch_size=2, window_size=56,
            fullatt_block_indexes=[1],
        )  # fmt: skip
        architecture = "Qwen2_5_VLForConditionalGeneration"
    else:
        config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
        vision = dict(
            depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
            spatial_merge_size=2, patch_size=14, temporal_patch_size=2,
        )  # fmt: skip
        architecture = "Qwen2VLForConditionalGeneration"

    path.mkdir(parents=True, exist_ok=True)
    fast = _tokenizer(QWEN_SPECIALS, QWEN2_VL_TEMPLATE, "<|im_end|>")
    ids = {token: fast.convert_tokens_to_ids(token) for token in QWEN_SPECIALS}
    eos = ids["<|im_end|>"]
    config = config_class(
        text_config=dict(
            vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                             "rope_theta": 10000.0},
            eos_token_id=eos, bos_token_id=fast.bos_token_id, initializer_range=0.2,
        ),
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=eos,
        architectures=[architecture],
    )  # fmt: skip
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.save_pretrained(path)
    GenerationConfig(eos_token_id=eos).save_pretrained(path)
    Qwen2VLImageProcessor(
        min_pixels=28 * 28, max_pixels=112 * 112, patch_size=14, merge_size=2,
        temporal_patch_size=2,
    ).save_pretrained(path)  # fmt: skip
    fast.save_pretrained(path, save_jinja_files=False)
    _fix_tokenizer_class(path)
    return path


def random_image(seed: int, width: int = 56, height: int = 56) -> Image.Image:
    """A noise image: different seeds give images no processor confuses."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def expand_prompt(path: Path, messages: list[dict], images: list[Image.Image]):
    """The prompt of ``messages`` with each image's placeholder expanded to its token count,
    the engine's :class:`ImageInput` of each image, and transformers' model inputs for the
    same prompt: the reference a parity test runs ``generate`` on."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    from engine_service.engine.multimodal import ImageInput
    from switchyard.block_hash import MediaSpan, image_hash

    tokenizer = AutoTokenizer.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    hf_inputs: dict = {}
    pixels: list[torch.Tensor] = []
    grids: list = []
    if images:
        processed = AutoImageProcessor.from_pretrained(path)(images=images, return_tensors="pt")
        hf_inputs["pixel_values"] = processed["pixel_values"]
        if config.model_type == "llava":
            token = config.image_token_index
            side = config.vision_config.image_size // config.vision_config.patch_size
            counts = [side * side] * len(images)
            pixels = list(processed["pixel_values"])
            grids = [None] * len(images)
        else:
            token = config.image_token_id
            grids = [tuple(int(x) for x in g) for g in processed["image_grid_thw"]]
            counts = [t * h * w // 4 for t, h, w in grids]
            pixels = list(processed["pixel_values"].split([t * h * w for t, h, w in grids]))
            hf_inputs["image_grid_thw"] = processed["image_grid_thw"]
    expanded: list[int] = []
    engine_images = []
    for token_id in ids:
        if images and token_id == token:
            k = len(engine_images)
            data = pixels[k].contiguous()
            span = MediaSpan(
                len(expanded),
                counts[k],
                image_hash(data.numpy().tobytes(), data.shape, data.numpy().dtype.name, grids[k]),
            )
            engine_images.append(ImageInput(span, data, grids[k]))
            expanded += [token] * counts[k]
        else:
            expanded.append(token_id)
    input_ids = torch.tensor([expanded])
    hf_inputs.update(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    if config.model_type != "llava" and images:
        hf_inputs["mm_token_type_ids"] = (input_ids == token).int()
    return expanded, engine_images, hf_inputs


def user_message(*parts: str | None) -> list[dict]:
    """One user turn: ``None`` stands for an image, a string for text."""
    content = [{"type": "image"} if p is None else {"type": "text", "text": p} for p in parts]
    return [{"role": "user", "content": content}]
