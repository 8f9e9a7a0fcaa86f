"""The shard sample schema: what one clip is inside a WebDataset shard, and how it is packed and read.

A sample is the group of tar members sharing one key (webdataset's layout), each named by the part
after the key::

    {key}.latents.safetensors   "latents" bf16 [16, T, h, w]
    {key}.cond.safetensors      "cond_latents" bf16 [16, 1, h, w]: the start frame encoded alone
    {key}.cond.png              the start frame, uint8 RGB [H, W, 3]
    {key}.txt                   the caption, UTF-8
    {key}.t5.safetensors        "embeds" bf16 [L, D] (optional)
    {key}.json                  meta, UTF-8 JSON with sorted keys

``ShardSample`` packs one sample into these members and reads it back; ``ShardSample.check_members``
validates raw members from their safetensors headers alone, which is how readers bucket samples
without decoding a tensor. Writing tars: ``longcat_data.writer``; the manifest and resume records:
``longcat_data.manifest``; reading for training: ``longcat_data.stream``.
"""

from __future__ import annotations

import io
import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from math import prod
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

LATENT_CHANNELS = 16

# Members of one sample, keyed like webdataset does: the part of the tar member name after the key.
LATENTS = "latents.safetensors"
COND = "cond.safetensors"
COND_IMAGE = "cond.png"
CAPTION = "txt"
TEXT_EMBEDS = "t5.safetensors"
META = "json"

# ShardSample field -> (its member, the tensor's name inside that safetensors member).
TENSOR_MEMBERS = {
    "latents": (LATENTS, "latents"),
    "cond_latents": (COND, "cond_latents"),
    "text_embeds": (TEXT_EMBEDS, "embeds"),
}

_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


class ShardError(ValueError):
    """Shards that cannot be trained on as given (none found, wrong encoder or frame count, ...)."""


@dataclass
class ShardSample:
    """One clip as a shard stores it (shapes in the module docstring); ``meta`` as docs/contracts.md lists."""

    key: str
    latents: torch.Tensor
    cond_latents: torch.Tensor
    cond_image: np.ndarray
    caption: str
    meta: dict[str, Any]
    text_embeds: torch.Tensor | None = None

    def to_members(self) -> dict[str, bytes | str]:
        """webdataset members (``__key__`` a str, the rest bytes): tensors as bf16 safetensors, the start
        frame as PNG, meta as sorted-key JSON. ValueError for shapes or keys readers would refuse."""
        latents, cond = self.latents, self.cond_latents
        if latents.ndim != 4 or latents.shape[0] != LATENT_CHANNELS:
            raise ValueError(f"latents must be [16, T, h, w], got {tuple(latents.shape)}")
        if tuple(cond.shape) != (LATENT_CHANNELS, 1, *latents.shape[2:]):
            raise ValueError(f"cond_latents must be [16, 1, h, w] matching latents, got {tuple(cond.shape)}")
        image = self.cond_image
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"cond_image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
        if not re.fullmatch(r"[^.\s]+", self.key):
            raise ValueError(
                f"sample key {self.key!r} must be non-empty without dots or spaces (webdataset splits on '.')"
            )
        members: dict[str, bytes | str] = {
            "__key__": self.key,
            LATENTS: _tensor_bytes("latents", latents),
            COND: _tensor_bytes("cond_latents", cond),
            COND_IMAGE: _png_bytes(image),
            CAPTION: self.caption.encode("utf-8"),
            META: json.dumps(dict(self.meta), ensure_ascii=False, sort_keys=True).encode("utf-8"),
        }
        if self.text_embeds is not None:
            if self.text_embeds.ndim != 2:
                raise ValueError(f"text_embeds must be [L, D], got {tuple(self.text_embeds.shape)}")
            members[TEXT_EMBEDS] = _tensor_bytes("embeds", self.text_embeds)
        return members

    @classmethod
    def from_members(cls, members: Mapping[str, Any]) -> ShardSample:
        """Raw members (as webdataset yields them: bytes per extension) -> the sample, every part decoded."""
        tensors = decode_tensors(members)
        return cls(
            key=members["__key__"],
            latents=tensors["latents"],
            cond_latents=tensors["cond_latents"],
            cond_image=np.asarray(Image.open(io.BytesIO(members[COND_IMAGE])).convert("RGB")),
            caption=members[CAPTION].decode("utf-8"),
            meta=json.loads(members[META]),
            text_embeds=tensors.get("text_embeds"),
        )

    @staticmethod
    def check_members(members: Mapping[str, Any], *, need_cond: bool = True) -> tuple[int, ...]:
        """The latent shape (16, T, h, w) of raw members, checked from the safetensors headers alone.

        ValueError when a tensor member is missing, truncated or misshapen, when ``cond_latents`` (if
        ``need_cond``) do not match the latents, or when there are neither text embeddings nor a caption.
        """
        shape = _header_shape(members, "latents")
        if need_cond:
            cond = _header_shape(members, "cond_latents")
            if cond != (shape[0], 1, *shape[2:]):
                raise ValueError(f"cond_latents {cond} do not match latents {shape}")
        if TEXT_EMBEDS in members:
            _header_shape(members, "text_embeds")
        elif CAPTION not in members:
            raise ValueError(f"neither {TEXT_EMBEDS} nor a caption")
        return shape


def decode_tensors(members: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensor members present, decoded and keyed by their ``ShardSample`` field name; the PNG is left
    alone (training needs only these)."""
    return {
        field: load_safetensors(members[member])[name]
        for field, (member, name) in TENSOR_MEMBERS.items()
        if member in members
    }


def bucket_name(height: int, width: int, frames: int) -> str:
    return f"{height}x{width}x{frames}"


def safetensors_header(data: bytes) -> dict[str, dict]:
    """Tensor name -> {dtype, shape, data_offsets}, checking the byte sizes add up (no tensor decoded)."""
    if len(data) < 8:
        raise ValueError("safetensors member shorter than its header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError("safetensors header runs past the end of the member")
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        start, stop = info["data_offsets"]
        if stop - start != _DTYPE_BYTES[info["dtype"]] * prod(info["shape"]):
            raise ValueError(f"safetensors tensor {name} has the wrong byte size")
        end = max(end, stop)
    if 8 + n + end != len(data):
        raise ValueError(f"safetensors member is {len(data)} bytes, header says {8 + n + end}")
    return header


def _header_shape(members: Mapping[str, Any], field: str) -> tuple[int, ...]:
    member, name = TENSOR_MEMBERS[field]
    if member not in members:
        raise ValueError(f"missing {member}")
    header = safetensors_header(members[member])
    if name not in header:
        raise ValueError(f"{member} has no tensor {name!r}")
    return tuple(header[name]["shape"])


def _tensor_bytes(name: str, tensor: torch.Tensor) -> bytes:
    return save_safetensors({name: tensor.detach().to("cpu", torch.bfloat16).contiguous()})


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
