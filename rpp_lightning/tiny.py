"""Tiny models and a tokenizer built locally, for tests, smoke runs and the quickstart.

No hub download: the tokenizer is character-level over printable ASCII, built with `tokenizers`,
and the models are Hugging Face architectures instantiated from a small config. Everything is
saved with `save_pretrained`, so the code paths under test are the real `from_pretrained` ones.

    python -m rpp_lightning.tiny /tmp/tiny-lm              # a causal LM + tokenizer
    python -m rpp_lightning.tiny /tmp/tiny-rm --classifier # a sequence classifier + tokenizer
"""

from __future__ import annotations

import argparse
import string
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
# A plain chat template so the code paths that apply templates run on the tiny models too.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def build_tokenizer(chat_template: bool = True):
    """A character-level PreTrainedTokenizerFast over printable ASCII (vocab size 104)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(string.printable))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()  # characters are joined back without separators
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",  # generation pads prompts on the left
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama_config(
    vocab_size: int = 104,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position_embeddings: int = 512,
    **overrides,
):
    """A LlamaConfig a few hundred thousand parameters big; ids match build_tokenizer()."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=SPECIAL_TOKENS.index("<pad>"),
        bos_token_id=SPECIAL_TOKENS.index("<bos>"),
        eos_token_id=SPECIAL_TOKENS.index("<eos>"),
        tie_word_embeddings=False,
        **overrides,
    )


def save_tiny_causal_lm(path: str | Path, seed: int = 0, **config_overrides) -> Path:
    """Build a tiny LlamaForCausalLM with random weights and save it with its tokenizer."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**config_overrides))
    path = Path(path)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def save_tiny_classifier(path: str | Path, seed: int = 0, **config_overrides) -> Path:
    """Build a tiny LlamaForSequenceClassification (one label: a scalar reward) and save it."""
    import torch
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(tiny_llama_config(num_labels=1, **config_overrides))
    path = Path(path)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="directory to write")
    parser.add_argument("--classifier", action="store_true", help="a reward model instead")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    save = save_tiny_classifier if args.classifier else save_tiny_causal_lm
    print(save(args.path, seed=args.seed))


if __name__ == "__main__":
    main()
