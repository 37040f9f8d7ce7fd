"""A byte-level BPE tokenizer trained locally, for the tiny offline models."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS = EOS = "<|endoftext|>"
PAD = "<|pad|>"


def corpus_lines() -> list[str]:
    text = resources.files("genflow.plugins.shared").joinpath("data/tiny_corpus.txt").read_text()
    return [line for line in text.splitlines() if line.strip()]


def train_tiny_tokenizer(vocab_size: int = 512, extra_special: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE on the bundled corpus (takes well under a second)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD, *extra_special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=PAD,
    )


def save_tokenizer(directory: Path, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    tokenizer = train_tiny_tokenizer(vocab_size)
    tokenizer.save_pretrained(directory)
    return tokenizer
