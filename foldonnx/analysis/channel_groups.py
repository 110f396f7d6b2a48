"""Channel groups: the unit of work of every structured pass.

A :class:`ChannelGroup` is a set of (tensor, axis) members whose channels must be merged or
removed together for the graph to stay correct. It is frozen, printable data produced by the
analysis (:func:`foldonnx.analysis.find_channel_groups`) and consumed by passes
(fold, prune, later low-rank / block approximation).

Channel indexing. A group has ``channels`` units of ``unit`` scalars each (unit = 1 for a
neuron, head_dim for an attention head). In a member tensor, scalar ``d`` of unit ``c`` sits at
index ``offset + c * unit_stride + d`` along ``axis`` (``unit_stride`` defaults to ``unit``,
i.e. contiguous units). So the q part of a fused ``[D, 3D]`` qkv weight is a member with
``axis=1, offset=0`` and the k part one with ``offset=D``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import numpy as np

__all__ = [
    "Role",
    "GroupKind",
    "Member",
    "DimRef",
    "NormRef",
    "ChannelGroup",
    "groups_to_json",
    "groups_from_json",
]


class Role(str, Enum):
    """How a member relates to the group's channels."""

    PRODUCER = "producer"  # the channel axis is an output axis (fc1 rows, conv out-channels)
    CONSUMER = "consumer"  # the channel axis is an input axis (fc2 columns, next conv in-channels)
    PARAM = "param"  # a per-channel parameter (bias, BN/LN affine, LayerScale, pos-embed, cls token)
    STAT = "stat"  # per-channel statistics that are not features (BN running mean / var)


class GroupKind(str, Enum):
    MLP = "mlp"  # transformer MLP hidden units
    HEADS = "heads"  # attention heads (whole heads are the unit)
    RESIDUAL = "residual"  # residual stream / embedding width
    CONV = "conv"  # conv channels (with BN) between two convs
    DEPTHWISE = "depthwise"  # channels coupled through depthwise convs / residual adds in CNNs
    SE = "se"  # squeeze-excitation internal channels
    OTHER = "other"


@dataclass(frozen=True)
class Member:
    """One (tensor, axis) slice that carries the group's channels."""

    tensor: str  # initializer or Constant-node output name
    axis: int  # axis of that tensor carrying the channels (non-negative)
    role: Role
    node: str = ""  # the node that uses the tensor
    op_type: str = ""
    param: str = ""  # what it is: weight, bias, bn_scale, bn_bias, bn_mean, bn_var, ln_scale, ...
    offset: int = 0  # index of the first scalar of unit 0 along `axis`
    unit_stride: int | None = None  # distance between units along `axis` (None: = unit)
    tag: str = ""  # free-form sub-role, e.g. "q", "k", "v", "o" for heads

    def indices(self, channels: int, unit: int) -> np.ndarray:
        """Indices along ``axis`` of all scalars, shape ``[channels, unit]``."""
        stride = unit if self.unit_stride is None else self.unit_stride
        return self.offset + np.arange(channels)[:, None] * stride + np.arange(unit)[None, :]


@dataclass(frozen=True)
class DimRef:
    """An integer in a constant tensor that encodes the group's size (a Reshape target etc.).

    ``what`` is ``"channels"`` (the value equals ``channels``, e.g. num_heads) or ``"total"``
    (the value equals ``channels * unit``, e.g. the hidden width). A fold rewrites it.
    ``multiple`` (added for issue 4): the value is ``multiple`` times that, e.g. the end of the k
    slice of a fused qkv (``2 * D``) or a fused qkv width (``3 * D``) in a Reshape / Split / Slice.
    ``node`` is the node that reads ``tensor`` directly.
    """

    tensor: str
    index: int  # flat index into that tensor
    what: str = "total"
    node: str = ""
    multiple: int = 1


@dataclass(frozen=True)
class NormRef:
    """A normalisation over the group's channel axis (LayerNorm fused or decomposed).

    Folding the channels it normalises changes its statistics; passes that want to weight
    merged channels (the n_c/n correction) need the nodes involved.
    """

    kind: str  # "layernorm" | "layernorm_decomposed" | "rmsnorm" | "batchnorm"
    nodes: tuple[str, ...]  # the node names forming it (first = the node reading the stream)
    scale: str = ""  # affine weight tensor name, if any
    bias: str = ""


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be merged / removed together, and everything that touches them."""

    id: int
    kind: GroupKind
    channels: int  # number of units
    unit: int = 1  # scalars per unit (head_dim for heads)
    members: tuple[Member, ...] = ()
    dims: tuple[DimRef, ...] = ()
    norms: tuple[NormRef, ...] = ()
    name: str = ""  # readable location, e.g. "blocks.3.mlp"
    params: int = 0  # parameters governed: scalars of all members' slices
    blocked: str | None = None  # why it cannot be folded; None when foldable
    notes: tuple[str, ...] = field(default=())

    @property
    def foldable(self) -> bool:
        return self.blocked is None

    @property
    def width(self) -> int:
        return self.channels * self.unit

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = self.kind.value
        d["foldable"] = self.foldable
        for m in d["members"]:
            m["role"] = Role(m["role"]).value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChannelGroup:
        d = dict(d)
        d.pop("foldable", None)
        members = tuple(Member(**{**m, "role": Role(m["role"])}) for m in d.pop("members", ()))
        dims = tuple(DimRef(**x) for x in d.pop("dims", ()))
        norms = tuple(NormRef(**{**x, "nodes": tuple(x["nodes"])}) for x in d.pop("norms", ()))
        return cls(
            kind=GroupKind(d.pop("kind")),
            members=members,
            dims=dims,
            norms=norms,
            notes=tuple(d.pop("notes", ())),
            **d,
        )

    def __str__(self) -> str:
        size = f"{self.channels}" if self.unit == 1 else f"{self.channels}x{self.unit}"
        state = "foldable" if self.foldable else f"blocked: {self.blocked}"
        return f"#{self.id} {self.kind.value} {self.name or ''} [{size}] {len(self.members)} members, {state}"


def groups_to_json(groups: list[ChannelGroup]) -> str:
    return json.dumps([g.to_dict() for g in groups], indent=1)


def groups_from_json(text: str) -> list[ChannelGroup]:
    """Groups from :func:`groups_to_json` text, or from ``fold-onnx inspect --json`` output
    (a mapping whose ``groups`` holds them)."""
    data = json.loads(text)
    if isinstance(data, dict):
        data = data.get("groups", [])
    return [ChannelGroup.from_dict(d) for d in data]
