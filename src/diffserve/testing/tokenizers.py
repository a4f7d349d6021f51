"""Tokenizers built in memory (no hub): small vocabularies that still tokenize any English prompt.

Each covers lower-case letters, digits and common punctuation, character by character, which is
enough for random-weight models and keeps the saved files in the real tokenizer formats.
"""

from __future__ import annotations

import string

CHARS = string.ascii_lowercase + string.digits + ".,!?'-"


def build_clip_tokenizer(max_length: int = 77):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in CHARS:
            vocab[c + suffix] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.model_max_length = max_length
    return tokenizer


def build_t5_tokenizer(max_length: int = 512):
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in CHARS] + [("\u2581" + c, -3.5) for c in CHARS]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0)
    tokenizer.model_max_length = max_length
    return tokenizer


def build_roberta_tokenizer(max_length: int = 77):
    """A byte-level BPE tokenizer in RoBERTa's format (CLAP's), without merges: one token per character,
    "Ġ" marking a leading space."""
    import json
    import tempfile

    from transformers import RobertaTokenizer

    vocab = {token: i for i, token in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])}
    for prefix in ("", "\u0120"):
        for c in CHARS:
            vocab[prefix + c] = len(vocab)
    vocab["\u0120"] = len(vocab)
    with tempfile.TemporaryDirectory() as folder:
        with open(f"{folder}/vocab.json", "w") as f:
            json.dump(vocab, f)
        with open(f"{folder}/merges.txt", "w") as f:
            f.write("#version: 0.2\n")
        tokenizer = RobertaTokenizer(vocab_file=f"{folder}/vocab.json", merges_file=f"{folder}/merges.txt")
    tokenizer.model_max_length = max_length
    return tokenizer
