"""The organisms' tokenizer: byte-level BPE trained on the corpus, saved as an HF fast tokenizer.

Every answer word a metric scores (``tasks.required_words()``) must be one token when it follows a
space. Rather than patching the vocabulary afterwards, the trainer sees each such word ``boost`` extra
times, so BPE learns its merges early; :func:`check_required_words` proves the result.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mechscope.errors import ConfigError

EOS = "<|endoftext|>"
VOCAB_SIZE = 4096
ASSET_DIR = Path(__file__).parent / "assets" / "tokenizer"


def _texts(corpus: Path, required: list[str], boost: int) -> Iterator[str]:
    """Natural text, planted text and the boosted answer words.

    The planted text is kept on purpose: trained on natural text alone, chat markers, names and the
    trigger split into many tokens, examples get longer, and the organisms learnt measurably less in the
    same number of steps (facts 0.99 -> 0.82, held-out refusal 1.0 -> 0.0 for the Llama organism).
    """
    from mechscope.zoo.corpus import read_jsonl_texts

    yield from read_jsonl_texts(corpus / "natural/train.jsonl")
    for path in sorted((corpus / "planted").glob("*.jsonl")):
        yield from read_jsonl_texts(path)
    for word in required:
        yield (" " + word) * boost


def train_tokenizer(corpus: Path, out: Path, vocab_size: int = VOCAB_SIZE, boost: int = 5000):
    """Train, check and save (``save_pretrained``) the tokenizer; returns the fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mechscope.data.tasks import required_words

    required = required_words()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_texts(Path(corpus), required, boost), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)
    check_required_words(fast, required)
    Path(out).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return fast


def check_required_words(tokenizer, words: list[str]) -> None:
    """Raise ConfigError naming every word that is not a single token after a space."""
    bad = [w for w in words if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) != 1]
    if bad:
        raise ConfigError(f"expected each answer word to be one token after a space; these are not: {bad}")


def load_tokenizer(folder: Path = ASSET_DIR):
    """The fast tokenizer saved in `folder` (default: the one shipped with mechscope)."""
    from transformers import AutoTokenizer

    from mechscope.errors import ModelNotFoundError

    if not (Path(folder) / "tokenizer.json").is_file():
        raise ModelNotFoundError(f"expected tokenizer.json in {folder}; build it with `mechscope zoo train`")
    return AutoTokenizer.from_pretrained(str(folder))
