"""The demo checkpoint: a small random-weight Llama with a real byte-level BPE tokenizer.

:func:`ensure_demo_model` builds it once under ``data_dir/models/`` so that every service
can start without downloading anything; :func:`make_test_checkpoint` builds the same kind
of checkpoint at a given size for tests. The weights are random, so the model's text is
meaningless, but every piece a real Llama-3 checkpoint has is there and consistent:
``config.json`` + ``model.safetensors``, ``generation_config.json``, ``tokenizer.json`` +
``tokenizer_config.json`` with a Llama-3-style chat template, and the same EOS ids in all of
them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

DEMO_MODEL_NAME = "demo"
DEMO_MODEL_DIR = "models/demo-llama-v1"

BOS = "<|begin_of_text|>"
EOT = "<|eot_id|>"
EOS = "<|end_of_text|>"
PAD = "<|finetune_right_pad_id|>"
SPECIAL_TOKENS = [
    BOS,
    EOS,
    PAD,
    "<|start_header_id|>",
    "<|end_header_id|>",
    EOT,
    "<|eom_id|>",
    "<|python_tag|>",
]

CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set content = message['content'] %}"
    "{%- else %}{%- set content = message['content'] | map(attribute='text') | join('') %}"
    "{%- endif %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + content | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

README = """# Switchyard demo model

A Llama-architecture checkpoint with **random weights**, built by `switchyard.demo`. It exists
so that the platform can be started and exercised end to end without downloading a model.
The text it generates is meaningless.

The tokenizer is real: a byte-level BPE trained on a few pages of English, with Llama-3
special tokens and chat template. Token ids, chat formatting, EOS handling and streaming
behave as they would with a real model.
"""

# The tokenizer's training text: plain English covering common words, punctuation, digits
# and code-like fragments, so that tokenization of ordinary prompts looks realistic.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A large language model reads a sequence of
tokens and predicts the next one. It does this again and again, one token at a time, until
it writes a special token that marks the end of its answer, or until it reaches the limit
that the caller set. Serving such a model well is mostly a question of memory: every token
that the model has seen leaves keys and values behind in every layer, and the server must
keep them somewhere while the request is still running.

Good morning! How are you today? I am fine, thank you. What would you like to talk about?
Let me tell you a story about a small town by the sea. Every morning the fishermen went out
in their boats before the sun came up, and every evening they came back with their nets
full of fish. The children ran down to the harbour to meet them, and the old men sat on the
benches by the water and talked about the weather, the price of bread, and the news from the
city. In the summer the town was full of visitors who came to swim, to walk along the cliffs
and to eat in the little restaurants near the market square.

Please write a short poem about the moon. Explain the difference between a list and a tuple
in Python. Summarize the following article in three sentences. Translate this paragraph into
French. What is the capital of France? Paris is the capital and the largest city of France.
Which planet is the largest in our solar system? Jupiter is the largest planet, and Saturn is
the second largest. Water boils at 100 degrees Celsius at sea level and freezes at 0 degrees.
There are 24 hours in a day, 7 days in a week, 12 months in a year and 365 days in most years.

def add(a, b):
    return a + b

for i in range(10):
    print(i * 2, "is even")

if x > 0 and y < 100:
    result = {"name": "example", "value": 42, "items": [1, 2, 3]}

The history of computing is a history of people who wanted to do arithmetic faster. Early
machines were built from gears and levers; later ones used relays, then vacuum tubes, then
transistors, and finally integrated circuits with billions of transistors on a single chip.
Each step made computers smaller, cheaper and more reliable. Today a phone in your pocket is
more powerful than the computers that guided the first spacecraft to the moon.

Scientists study the natural world by asking questions, making observations and testing
ideas with experiments. A good experiment changes one thing at a time and measures what
happens. If the results agree with the prediction, the idea survives for now; if they do
not, the idea must be changed or thrown away. Over many years this slow and careful process
has taught us how stars are born, how living cells divide, and how diseases spread.

Cooking is both an art and a science. To make bread you need flour, water, salt and yeast.
Mix them together, knead the dough for ten minutes, and let it rise in a warm place for an
hour or two. Shape the loaf, let it rise again, and bake it in a hot oven until the crust is
golden brown and the bottom sounds hollow when you tap it. Fresh bread with butter is one of
the simple pleasures of life.

The weather today will be sunny in the morning with clouds in the afternoon. There is a
chance of rain in the evening, so take an umbrella if you are going out. Tomorrow will be
colder, with strong winds from the north and temperatures between five and ten degrees.

She opened the door and looked outside. The street was quiet, the shops were closed, and the
only sound was the wind in the trees. He asked her whether she wanted to go for a walk, and
she said yes, because she had been inside all day and needed some fresh air. They walked to
the park, sat on a bench under an old oak tree, and watched the ducks on the pond.

Music, painting, dance and literature have been part of every human culture that we know.
People sing when they are happy and when they are sad, at weddings and at funerals, at work
and at play. A melody can carry a memory for decades, and a single line from a book can
change the way someone sees the world.

To install the package, run the command below and then restart your terminal. If you see an
error message, check that you are using a supported version of the operating system and that
you have permission to write to the installation directory. For more information, read the
documentation or ask a question on the community forum. Thanks for your help!

Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 20 50 99 100 256 1000 2024 3.14 1,000,000 50% $20.
Punctuation: commas, periods. Questions? Exclamations! "Quotes" and 'apostrophes' (brackets)
[square] {curly} <angle> a-b a_b a/b a|b a:b a;b a=b a+b a*b a#b a@b a&b a~b a^b.

The assistant answers questions politely and accurately. If it does not know the answer, it
says so instead of guessing. It keeps its answers short unless the user asks for more
detail, and it uses examples to explain difficult ideas. The user can ask it to write code,
to check a calculation, to plan a trip, to draft an email, or simply to have a conversation.
"""


def _train_tokenizer(vocab_size: int):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Title-cased and upper-cased copies teach the merges for capitalized words too.
    lines = [
        line for text in (CORPUS, CORPUS.title(), CORPUS.upper()) for line in text.splitlines(True)
    ]
    tokenizer.train_from_iterator(lines, trainer=trainer)
    # Special tokens go after the learned vocabulary, as in Llama 3.
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def make_test_checkpoint(
    path: str | Path,
    *,
    hidden_size: int = 256,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 8,
    num_key_value_heads: int = 4,
    intermediate_size: int = 512,
    max_position_embeddings: int = 4096,
    tokenizer_vocab_size: int = 3072,
    tie_word_embeddings: bool = False,
    seed: int = 0,
) -> Path:
    """Write a random-weight Llama checkpoint with a trained BPE tokenizer into ``path``.

    The model's ``vocab_size`` equals the tokenizer's size (learned tokens plus the special
    tokens; at most ``tokenizer_vocab_size``). EOS is ``<|eot_id|>`` and ``<|end_of_text|>``
    in ``generation_config.json``, ``<|eot_id|>`` in ``config.json`` and the tokenizer.
    The same arguments give byte-identical weights. Returns ``path``.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(tokenizer_vocab_size)
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}

    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOT],
        pad_token_id=ids[PAD],
        architectures=["LlamaForCausalLM"],
        dtype="float32",
    )
    torch.manual_seed(seed)
    weights = LlamaForCausalLM(config).state_dict()
    if tie_word_embeddings:
        del weights["lm_head.weight"]  # shares storage with the embedding, as HF saves it
    save_file(
        {name: tensor.contiguous() for name, tensor in weights.items()},
        path / "model.safetensors",
        metadata={"format": "pt"},
    )
    config.save_pretrained(path)
    GenerationConfig(
        bos_token_id=ids[BOS],
        eos_token_id=[ids[EOT], ids[EOS]],
        pad_token_id=ids[PAD],
        do_sample=True,
        temperature=0.6,
        top_p=0.9,
    ).save_pretrained(path)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        model_max_length=max_position_embeddings,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    # Keep the chat template inside tokenizer_config.json, where readers without
    # transformers (the gateway's own tokenizer loader, for one) look for it.
    fast.save_pretrained(path, save_jinja_files=False)
    # Name the class every transformers version knows (v5 writes its new backend's name).
    config_file = path / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    return path


def ensure_demo_model(data_dir: str | Path) -> Path:
    """Return the demo checkpoint under ``data_dir``, building it on first use.

    Idempotent and safe against concurrent callers: the checkpoint is built in a temporary
    folder beside its final place and renamed into it; a caller that loses the race throws
    its copy away.
    """
    target = Path(data_dir).expanduser() / DEMO_MODEL_DIR
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-build-", dir=target.parent))
    try:
        make_test_checkpoint(staging)
        (staging / "README.md").write_text(README)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model(model: str, data_dir: str | Path) -> str:
    """Map a ``model`` setting to a checkpoint directory: ``demo`` is the demo checkpoint
    (built on first use), anything else is returned as given."""
    if model == DEMO_MODEL_NAME:
        return str(ensure_demo_model(data_dir))
    return model
