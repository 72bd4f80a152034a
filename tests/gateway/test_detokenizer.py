"""Incremental detokenization: the stream of deltas must equal ``tokenizer.decode`` of
all the ids, and never carry half a UTF-8 character."""

from __future__ import annotations

import random
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from gateway.detokenizer import IncrementalDetokenizer
from gateway.tokenization import ModelTokenizer, _byte_level_decoder, _direct_decoding_matches


def byte_token_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """One byte-level token per UTF-8 byte: the worst case for splitting characters."""
    printable = {byte: char for char, byte in _byte_level_decoder().items()}
    return tokenizer.convert_tokens_to_ids([printable[byte] for byte in text.encode()])


def stream(
    detokenizer: IncrementalDetokenizer, ids: list[int], chunk_sizes: list[int]
) -> list[str]:
    deltas = []
    position = 0
    for size in chunk_sizes:
        deltas.append(detokenizer.add(ids[position : position + size]))
        position += size
    deltas.append(detokenizer.flush())
    return deltas


def test_multibyte_characters_split_over_tokens_are_emitted_whole(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    text = "Hi 😀 你好, 🎉 déjà vu!"
    ids = byte_token_ids(tokenizer, text)
    deltas = stream(IncrementalDetokenizer(tokenizer, []), ids, [1] * len(ids))
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == text == tokenizer.decode(ids, skip_special_tokens=True)
    assert "😀" in deltas and "你" in deltas  # each emitted once complete, not byte by byte


def test_stream_equals_decode_of_all_ids_for_random_tokens(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    rng = random.Random(7)
    vocab_size = len(tokenizer)
    prompt = tokenizer.encode("The quick brown fox")
    for _ in range(50):
        ids = [rng.randrange(vocab_size) for _ in range(rng.randrange(1, 40))]
        sizes = []
        while sum(sizes) < len(ids):
            sizes.append(rng.randrange(1, 4))
        deltas = stream(IncrementalDetokenizer(tokenizer, prompt), ids, sizes)
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)


def test_priming_ahead_of_the_first_token_changes_no_delta(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    rng = random.Random(11)
    vocab_size = len(tokenizer)
    prompt = tokenizer.encode("Hi 😀 and")
    split = byte_token_ids(tokenizer, " 你好 😀")  # characters split over tokens
    for _ in range(20):
        ids = [*split, *(rng.randrange(vocab_size) for _ in range(rng.randrange(1, 20)))]
        sizes = [rng.randrange(1, 3) for _ in ids]
        primed = IncrementalDetokenizer(tokenizer, prompt)
        primed.prime()
        assert stream(primed, ids, sizes) == stream(
            IncrementalDetokenizer(tokenizer, prompt), ids, sizes
        )


def test_real_tokenization_of_emoji_and_cjk_round_trips(tokenizer: PreTrainedTokenizerBase) -> None:
    text = "Good morning 😀! 你好世界 🎉🎉 naïve café"
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas = stream(IncrementalDetokenizer(tokenizer, []), ids, [1] * len(ids))
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == text


def test_first_generated_token_keeps_its_leading_space(tokenizer: PreTrainedTokenizerBase) -> None:
    prompt = tokenizer.encode("Hello")
    generated = tokenizer.encode(" world", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    assert detokenizer.add(generated) + detokenizer.flush() == " world"


def test_special_tokens_are_not_emitted(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = [
        *tokenizer.encode("Paris", add_special_tokens=False),
        tokenizer.convert_tokens_to_ids("<|eot_id|>"),
    ]
    assert "".join(stream(IncrementalDetokenizer(tokenizer, []), ids, [1] * len(ids))) == "Paris"


def test_an_unfinished_character_is_flushed_as_decode_shows_it(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    ids = byte_token_ids(tokenizer, "ok 😀")[:-2]  # drop the emoji's last two bytes
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    emitted = "".join(detokenizer.add([token_id]) for token_id in ids)
    assert emitted == "ok "
    tail = detokenizer.flush()
    assert tail.startswith("\ufffd")
    assert emitted + tail == tokenizer.decode(ids, skip_special_tokens=True)


def test_token_bytes_are_exact_even_for_partial_characters(checkpoint: Path) -> None:
    model_tokenizer = ModelTokenizer(str(checkpoint))
    try:
        text = "Hi 😀 你好"
        ids = model_tokenizer.tokenizer.encode(text, add_special_tokens=False)
        assert b"".join(model_tokenizer.token_bytes(token_id) for token_id in ids) == text.encode()
        first_byte = byte_token_ids(model_tokenizer.tokenizer, "😀")[0]
        assert model_tokenizer.token_bytes(first_byte) == b"\xf0"
        assert model_tokenizer.token_text(first_byte) == "bytes:\\xf0"
    finally:
        model_tokenizer.close()


def test_the_gateway_detokenizes_through_the_rust_tokenizer_with_the_wrappers_text(
    checkpoint: Path,
) -> None:
    model_tokenizer = ModelTokenizer(str(checkpoint))
    try:
        wrapper = model_tokenizer.tokenizer
        assert model_tokenizer.decoder is wrapper.backend_tokenizer
        rng = random.Random(11)
        prompt = wrapper.encode("The quick brown fox")
        texts = ["Hi 😀 你好, déjà vu!", " it is . is it ? don 't", "<|eot_id|> after a special"]
        cases = [wrapper.encode(text, add_special_tokens=False) for text in texts]
        cases += [[rng.randrange(len(wrapper)) for _ in range(30)] for _ in range(30)]
        for ids in cases:
            deltas = stream(
                IncrementalDetokenizer(model_tokenizer.decoder, prompt), ids, [1] * len(ids)
            )
            assert "".join(deltas) == wrapper.decode(ids, skip_special_tokens=True)
    finally:
        model_tokenizer.close()


def test_a_wrapper_that_rewrites_decoded_text_is_kept(checkpoint: Path) -> None:
    """A tokenizer whose wrapper cleans up spaces (``" ."`` to ``"."``) decodes differently
    from its Rust core: detokenization must keep going through the wrapper."""
    model_tokenizer = ModelTokenizer(str(checkpoint))
    try:
        wrapper = model_tokenizer.tokenizer
        wrapper.clean_up_tokenization_spaces = True
        # The library skips the clean-up for BPE unless told that corrupting is intended.
        wrapper.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
        ids = wrapper.encode("yes . no", add_special_tokens=False)
        assert wrapper.decode(ids) != wrapper.backend_tokenizer.decode(ids), "clean-up applies"
        assert not _direct_decoding_matches(wrapper)
    finally:
        model_tokenizer.close()
