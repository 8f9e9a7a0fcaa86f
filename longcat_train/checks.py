"""The declared checks (``longcat_data.flags.Check``) of the config fields of ``longcat-train`` and
``longcat-sample`` that more than one field or command uses: clip lengths, areas, seeds, paths.

No torch here: the configs import this module and ``--help`` must stay instant.
"""

from __future__ import annotations

import os
from pathlib import Path

from longcat_data.buckets import MIN_FRAMES, MODEL_SIDE_MULTIPLE, VAE_TEMPORAL_STRIDE
from longcat_data.flags import Check, parse_area


def _area_on_grid(value: str | tuple[int, int]) -> bool:
    return all(side % MODEL_SIDE_MULTIPLE == 0 for side in parse_area(value))


def _creatable_folder(value: str) -> bool:
    """An existing writable folder, or one whose nearest existing parent is a writable folder."""
    path = Path(value).expanduser().absolute()
    if path.exists():
        return path.is_dir() and os.access(path, os.W_OK | os.X_OK)
    parent = next(p for p in path.parents if p.exists())
    return parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)


def _local_source_exists(value: str) -> bool:
    """False only for a plain local path that does not exist; URLs, pipes, brace or glob patterns and
    ``user/name`` hub ids are checked when they are read."""
    remote = "://" in value or value.startswith("pipe:")
    pattern = any(c in value for c in "{*?[") or "::" in value
    hub_id = value.count("/") == 1 and not value.startswith(("/", ".", "~"))
    return remote or pattern or hub_id or Path(value).expanduser().exists()


CLIP_FRAMES = Check(
    lambda f: f >= MIN_FRAMES and (f - 1) % VAE_TEMPORAL_STRIDE == 0,
    f"4k+1 and at least {MIN_FRAMES} (the VAE's {VAE_TEMPORAL_STRIDE}x time stride): 5, 9, ..., 93",
)
COND_FRAMES = Check(
    lambda f: f >= 1 and (f - 1) % VAE_TEMPORAL_STRIDE == 0,
    f"4k+1 (whole latent frames of the VAE's {VAE_TEMPORAL_STRIDE}x time stride): 1, 5, 9, 13, ...",
)
AREA_ON_GRID = Check(
    _area_on_grid,
    f"HxW with both sides multiples of {MODEL_SIDE_MULTIPLE} (the model's pixel grid), e.g. 480x832",
)
# numpy seeds are 32-bit, and each rank adds its rank to the seed.
SEED = Check(lambda s: 0 <= s < 2**31, "in [0, 2**31)")
CREATABLE_FOLDER = Check(_creatable_folder, "a folder that exists or can be created, and is writable")
VALIDATION_SOURCE = Check(
    _local_source_exists, "an existing folder of images or videos + .txt captions, or eval shards, or unset"
)
RESUME_FROM = Check(
    lambda v: v == "latest" or Path(v).expanduser().exists(),
    "'latest' (in output_dir) or an existing checkpoint or output folder",
)
