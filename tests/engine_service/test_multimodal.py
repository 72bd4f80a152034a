"""Vision-language models in the engine: parity with transformers (LLaVA, Qwen2-VL), the
encoder-output cache, image hashes in block keys, and images the engine refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine_service.engine import EngineConfig, LLMEngine, SamplingParams
from engine_service.engine.multimodal import EncoderCache, ImageInput
from switchyard.block_hash import MediaSpan, block_extra_keys, chained_block_hashes
from tests.engine_service.helpers import make_engine, make_llama_checkpoint
from tests.multimodal_support import (
    expand_prompt,
    make_llava_checkpoint,
    make_qwen2_vl_checkpoint,
    random_image,
    user_message,
)

MAX_TOKENS = 8
LOGPROB_TOLERANCE = 2e-3

# One image, two images (different sizes for Qwen2-VL), and text alone.
PROMPTS = [
    (user_message(None, "Describe the picture."), [random_image(1, 84, 56)]),
    (
        user_message("Compare", None, "with", None, "please."),
        [random_image(2, 56, 56), random_image(3, 56, 112)],
    ),
    (user_message("Tell me a story about the sea."), []),
]


@pytest.fixture(scope="module", params=["llava", "qwen2_vl", "qwen2_5_vl"])
def vlm_checkpoint(request: pytest.FixtureRequest, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp(request.param) / "ckpt"
    if request.param == "llava":
        return make_llava_checkpoint(path)
    return make_qwen2_vl_checkpoint(path, version="2.5" if request.param == "qwen2_5_vl" else "2")


def _engine(path: Path, **settings) -> LLMEngine:
    config = {"num_kv_blocks": 96, "block_size": 4, "async_scheduling": False, **settings}
    return LLMEngine(EngineConfig(model=str(path), dtype="float32", **config))


def _greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)


def _reference(path: Path, hf_inputs: dict) -> tuple[list[int], list[float]]:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    out = model.generate(
        **hf_inputs,
        max_new_tokens=MAX_TOKENS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        eos_token_id=None,
        pad_token_id=0,
    )
    tokens = out.sequences[0, hf_inputs["input_ids"].shape[1] :].tolist()
    logprobs = [
        torch.log_softmax(step[0].float(), -1)[token].item()
        for step, token in zip(out.logits, tokens)
    ]
    return tokens, logprobs


def _run(engine: LLMEngine, prompts: list[tuple[list[int], list[ImageInput]]]):
    """Every prompt's greedy tokens and their logprobs, all requests in one batch."""
    for i, (ids, images) in enumerate(prompts):
        engine.add_request(f"r{i}", ids, _greedy(), images=images)
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    logprobs: dict[str, list[float]] = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for output in engine.step():
            tokens[output.request_id] += output.new_token_ids
            logprobs[output.request_id] += [lp.logprob for lp in output.new_logprobs or []]
    return [(tokens[f"r{i}"], logprobs[f"r{i}"]) for i in range(len(prompts))]


@pytest.fixture(scope="module")
def references(vlm_checkpoint: Path) -> list:
    """Each prompt of PROMPTS expanded, with transformers' greedy tokens and logprobs."""
    expanded = [expand_prompt(vlm_checkpoint, messages, images) for messages, images in PROMPTS]
    return [(ids, images, *_reference(vlm_checkpoint, hf)) for ids, images, hf in expanded]


@pytest.mark.parametrize("overlap", [False, True])
def test_images_mixed_with_text_match_transformers_under_chunked_prefill(
    vlm_checkpoint: Path, references: list, overlap: bool
) -> None:
    """One and two images per prompt and a text-only prompt, batched, with a step budget of
    8 tokens: prefill chunks end inside images, so spans are split across steps."""
    engine = _engine(vlm_checkpoint, max_num_batched_tokens=8, async_scheduling=overlap)
    ours = _run(engine, [(ids, images) for ids, images, _, _ in references])
    engine.close()
    # The chunk boundaries did fall inside image spans.
    assert any(i.offset % 8 + i.length > 8 for _, images, _, _ in references for i in images)
    for (_, _, ref_tokens, ref_logprobs), (tokens, logprobs) in zip(references, ours):
        assert tokens == ref_tokens
        assert max(abs(a - b) for a, b in zip(logprobs, ref_logprobs)) < LOGPROB_TOLERANCE


def test_same_text_with_other_images_shares_no_image_block(vlm_checkpoint: Path) -> None:
    """Block keys carry the hash of the images they cover: the text before the image is
    shared, the image's blocks and everything after are not; the same image is."""
    messages = user_message("Look at this:", None, "What is it?")
    ids_a, images_a, _ = expand_prompt(vlm_checkpoint, messages, [random_image(10)])
    ids_b, images_b, _ = expand_prompt(vlm_checkpoint, messages, [random_image(11)])
    assert ids_a == ids_b and images_a[0].mm_hash != images_b[0].mm_hash
    block = 4
    first_image_block = images_a[0].offset // block

    def hashes(ids: list[int], images: list[ImageInput]) -> list[bytes]:
        return chained_block_hashes(ids, block, (), [image.span for image in images])

    a, b = hashes(ids_a, images_a), hashes(ids_b, images_b)
    assert a[:first_image_block] == b[:first_image_block]
    assert not set(a[first_image_block:]) & set(b[first_image_block:])
    assert hashes(ids_a, images_a) == a

    engine = _engine(vlm_checkpoint)
    [(tokens_a, _)] = _run(engine, [(ids_a, images_a)])
    engine.add_request("b", ids_b, _greedy(), images=images_b)
    engine.add_request("a-again", ids_a, _greedy(), images=images_a)
    outputs: dict[str, list] = {"b": [], "a-again": []}
    cached: dict[str, int] = {}
    while engine.has_unfinished():
        for output in engine.step():
            outputs[output.request_id] += output.new_token_ids
            cached[output.request_id] = output.num_cached_tokens
    engine.close()
    # The other image reuses only the text before it; the same image reuses all but the
    # last token, and answers as before.
    assert cached["b"] == first_image_block * block
    assert cached["a-again"] == (len(ids_a) - 1) // block * block
    assert outputs["a-again"] == tokens_a
    assert outputs["b"] != tokens_a


def test_encoder_runs_once_per_step_and_outputs_are_reused(vlm_checkpoint: Path) -> None:
    """Without the prefix cache, a repeated image is served by the encoder cache; the
    images of all requests in a step go through the encoder in one call."""
    messages = user_message(None, "Describe the picture.")
    first = expand_prompt(vlm_checkpoint, messages, [random_image(20)])
    second = expand_prompt(vlm_checkpoint, messages, [random_image(21)])
    engine = _engine(vlm_checkpoint, enable_prefix_caching=False)
    together = _run(engine, [first[:2], second[:2]])
    stats = engine.stats()
    assert (stats.mm_images_encoded, stats.mm_encoder_runs) == (2, 1)
    assert (stats.mm_cache_queries, stats.mm_cache_hits) == (2, 0)
    again = _run(engine, [first[:2]])
    stats = engine.stats()
    engine.close()
    assert again[0][0] == together[0][0]
    assert (stats.mm_images_encoded, stats.mm_cache_queries, stats.mm_cache_hits) == (2, 3, 1)


def test_encoder_cache_evicts_least_recently_used_within_its_bound() -> None:
    row = torch.zeros(4, 8)  # 128 bytes
    cache = EncoderCache(capacity_bytes=300)
    cache.put("a", row)
    cache.put("b", row)
    assert cache.get("a") is not None  # now "b" is the least recently used
    cache.put("c", row)
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert cache.used_bytes == 256
    cache.put("huge", torch.zeros(100, 8))  # larger than the whole cache: not kept
    assert cache.get("huge") is None and len(cache) == 2


def test_engine_refuses_images_that_do_not_fit(vlm_checkpoint: Path, tmp_path: Path) -> None:
    messages = user_message(None, "What is it?")
    ids, images, _ = expand_prompt(vlm_checkpoint, messages, [random_image(30)])
    engine = _engine(vlm_checkpoint)
    image = images[0]
    shifted = ImageInput(
        MediaSpan(image.offset + 1, image.length, image.mm_hash), image.pixel_values, image.grid_thw
    )
    with pytest.raises(ValueError, match="not a run of image tokens"):
        engine.add_request("shifted", ids, _greedy(), images=[shifted])
    with pytest.raises(ValueError, match="no images"):
        engine.add_request("none", ids, _greedy())
    short = ImageInput(
        MediaSpan(image.offset, image.length - 1, image.mm_hash), image.pixel_values, image.grid_thw
    )
    with pytest.raises(ValueError):
        engine.add_request("short", ids, _greedy(), images=[short])
    engine.close()

    make_llama_checkpoint(tmp_path / "llama")
    text_only = make_engine(tmp_path / "llama")
    with pytest.raises(ValueError, match="does not take images"):
        text_only.add_request("t", [1, 2, 3], _greedy(), images=images)
    text_only.close()


def test_block_keys_of_images_equal_block_extra_keys_with_their_hashes() -> None:
    """The per-block image keys are block_extra_keys' own: one definition for all parts."""
    span = MediaSpan(offset=6, length=4, mm_hash="img:x")
    tokens = list(range(16))
    hashes = chained_block_hashes(tokens, 4, block_extra_keys(cache_salt="s"), [span])
    plain = chained_block_hashes(tokens[:4], 4, block_extra_keys(cache_salt="s"))
    assert hashes[0] == plain[0]  # block 0 holds no image token
    from switchyard.block_hash import hash_block

    h1 = hash_block(hashes[0], tokens[4:8], block_extra_keys(None, "s", ["img:x"]))
    h2 = hash_block(h1, tokens[8:12], block_extra_keys(None, "s", ["img:x"]))
    h3 = hash_block(h2, tokens[12:16], block_extra_keys(None, "s"))
    assert hashes == [hashes[0], h1, h2, h3]
