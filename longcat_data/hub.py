"""The Hugging Face hub round trip: push a finished output dir as a dataset repo, stream it back.

Push: a dataset card (README.md) is written next to the shards. Its YAML ``configs`` name the tar shards
as the data files of each split, so ``load_dataset("user/name", streaming=True)`` reads them with the
``datasets`` webdataset loader and never takes the manifest or the contact sheet for data. The shards,
the manifest and the card then go up in one resumable upload.

Stream: ``hf://datasets/user/name[@rev][/subdir]`` (or a bare ``user/name[@rev]``) becomes one
``pipe:curl`` URL per shard, read by webdataset like any local tar, so training starts after the first
shard arrives instead of after the whole set. The revision is pinned to a commit first, so a push that
lands mid-training cannot mix two versions of the data in one run.

Everything that talks to the hub goes through an ``HfApi``-like object passed in (``api=``), so tests
use a fake with the same few methods.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import tarfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import DatasetCardData, HfApi, get_token, hf_hub_url
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

from longcat_data import storage
from longcat_data.manifest import (
    CONTACT_SHEET,
    MANIFEST,
    OutputMismatch,
    build_manifest,
    read_manifest,
    read_states,
    repair_hint,
    verify_shards,
)
from longcat_data.shards import META

log = logging.getLogger(__name__)

CARD = "README.md"
HF_SCHEME = "hf://"
DATASETS_PREFIX = "hf://datasets/"

# A hub repo id: namespace/name, each of letters, digits, '-', '_', '.'; optionally @revision.
_REPO_ID = r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*"
_BARE_SPEC = re.compile(rf"^(?P<repo>{_REPO_ID})(?:@(?P<rev>[^/]+))?$")
_HF_SPEC = re.compile(rf"^(?P<repo>{_REPO_ID})(?:@(?P<rev>[^/]+))?(?:/(?P<sub>.+?))?/?$")


class PushError(Exception):
    """An output dir that cannot be pushed; the message says why and what to do."""


@dataclass(frozen=True)
class HubSpec:
    """Where shards live on the hub: a dataset repo, a revision (None: the default branch), a folder."""

    repo_id: str
    revision: str | None = None
    subdir: str = ""


def is_hf_spec(spec: str) -> bool:
    """True for ``hf://...`` and for a bare ``user/name[@rev]`` that is not an existing local path."""
    if spec.startswith(HF_SCHEME):
        return True
    return bool(_BARE_SPEC.match(spec)) and not Path(spec).exists()


def parse_hf_spec(spec: str) -> HubSpec:
    """Split ``hf://datasets/user/name[@rev][/subdir]`` or ``user/name[@rev]`` into its parts."""
    if spec.startswith(HF_SCHEME):
        if not spec.startswith(DATASETS_PREFIX):
            raise ValueError(
                f"{spec}: only dataset repos hold shards; write hf://datasets/user/name[@rev][/subdir]"
            )
        match = _HF_SPEC.match(spec[len(DATASETS_PREFIX) :])
    else:
        match = _BARE_SPEC.match(spec)
    if match is None:
        raise ValueError(
            f"{spec}: not a hub dataset; write hf://datasets/user/name[@rev][/subdir] or user/name"
        )
    return HubSpec(match["repo"], match["rev"], (match.groupdict().get("sub") or "").strip("/"))


def hub_token() -> str | None:
    """The token huggingface_hub itself would use (``HF_TOKEN``, then the saved login), made visible to
    the ``pipe:curl`` child processes as ``$HF_TOKEN`` so the token never appears in a URL or a log."""
    token = get_token()
    if token and os.environ.get("HF_TOKEN") != token:
        os.environ["HF_TOKEN"] = token
    return token


def shard_url(repo_id: str, revision: str, filename: str, *, authenticated: bool) -> str:
    """A webdataset ``pipe:`` URL that streams one file of a dataset repo to stdout.

    curl follows the hub's redirect to its file storage (``-L``) and fails on HTTP errors (``-f``), so a
    missing file or a bad token is a reader error rather than an HTML page parsed as a tar. The shell
    expands ``$HF_TOKEN`` when the reader opens the pipe.
    """
    url = hf_hub_url(repo_id, filename, repo_type="dataset", revision=revision)
    auth = ' -H "Authorization: Bearer $HF_TOKEN"' if authenticated else ""
    return f"pipe:curl -s -S -L -f --retry 3{auth} {shlex.quote(url)}"


def resolve_hf_shards(spec: str, *, api: Any = None) -> list[str]:
    """Shard URLs for a hub dataset, in manifest order (file-name order when it has no manifest).

    ``api`` is an ``HfApi`` (default) or any object with ``dataset_info``, ``list_repo_files`` and
    ``hf_hub_download``. Nothing but the file listing and the small manifest is downloaded here.
    """
    hub = parse_hf_spec(spec)
    api = api or HfApi()
    token = hub_token()
    try:
        commit = api.dataset_info(hub.repo_id, revision=hub.revision).sha
    except RevisionNotFoundError as err:
        raise ValueError(f"{spec}: dataset {hub.repo_id} has no revision {hub.revision!r}") from err
    except RepositoryNotFoundError as err:
        # A mistyped local folder also lands here: "out/shards" looks like a repo id.
        raise ValueError(
            f"{spec}: no such local folder, and no dataset {hub.repo_id} on the hub that this login can see "
            "(private repos need HF_TOKEN or `hf auth login`)"
        ) from err
    prefix = f"{hub.subdir}/" if hub.subdir else ""
    files = [
        f
        for f in api.list_repo_files(hub.repo_id, repo_type="dataset", revision=commit)
        if f.startswith(prefix)
    ]
    tars = sorted(f for f in files if f.endswith(".tar") and "/" not in f[len(prefix) :])

    if prefix + MANIFEST in files:
        manifest_path = api.hf_hub_download(
            hub.repo_id, prefix + MANIFEST, repo_type="dataset", revision=commit
        )
        manifest = json.loads(Path(manifest_path).read_text())
        if not manifest.get("complete", False):
            log.warning(
                "%s: the manifest says the dataset is not complete; streaming the shards it lists", spec
            )
        listed = [prefix + shard["name"] for shard in manifest.get("shards", [])]
        missing = sorted(set(listed) - set(files))
        if missing:
            raise ValueError(
                f"{spec}: {len(missing)} shard(s) in the manifest are not in the repo (first: {missing[0]}); "
                "the upload did not finish: run longcat-prep push again"
            )
        tars = listed
    if not tars:
        raise ValueError(
            f"{spec}: no .tar shards in {hub.repo_id}{'/' + hub.subdir if hub.subdir else ''} at {commit}"
        )
    log.info(
        "streaming %d shards from %s@%s%s (%s)",
        len(tars),
        hub.repo_id,
        commit[:12],
        f"/{hub.subdir}" if hub.subdir else "",
        "with token" if token else "anonymous",
    )
    return [shard_url(hub.repo_id, commit, name, authenticated=token is not None) for name in tars]


def load_finished_manifest(out_dir: str | Path) -> dict:
    """The manifest of an output dir that is safe to publish, or PushError saying why it is not.

    Safe means: prep finished (``complete``), every shard it lists is on disk at its recorded size, no
    other shard sits beside them, the writers' resume states agree on encoders and settings, and every
    sample was encoded by the manifest's encoders.
    """
    store = storage.folder(out_dir)
    out_dir = store.url()
    manifest = read_manifest(store)
    if manifest is None:
        raise PushError(f"{out_dir}: no {MANIFEST}; run longcat-prep shard to the end first")
    if not manifest.get("complete", False):
        raise PushError(
            f"{out_dir}: {MANIFEST} is not complete (prep was interrupted or ranks were not merged); "
            "re-run the same longcat-prep shard command to finish it"
        )
    if not manifest.get("encoders"):
        raise PushError(
            f"{out_dir}: {MANIFEST} records no encoders; it was not written by longcat-prep shard"
        )
    names = [shard["name"] for shard in manifest.get("shards", [])]
    if not names:
        raise PushError(f"{out_dir}: {MANIFEST} lists no shards; nothing to push")
    problems = verify_shards(store, manifest["shards"], count_samples=False)
    if problems:
        raise PushError(f"{problems[0]}; {repair_hint(out_dir)}")
    strays = [name for name in store.names("*.tar") if name not in set(names)]
    if strays:
        raise PushError(
            f"{out_dir}: {len(strays)} shard(s) not in {MANIFEST} (first: {strays[0]}), possibly from another "
            "prep run with other encoders; move them out or prep into a fresh dir"
        )
    states = read_states(store)
    if states:
        try:
            build_manifest(states)
        except OutputMismatch as err:
            raise PushError(
                f"{out_dir}: this dir mixes encoders or settings ({err}); re-run prep into a fresh dir"
            ) from err
    for name in names:
        _check_shard_encoders(store, name, manifest["encoders"])
    return manifest


def _check_shard_encoders(store: storage.Folder, name: str, encoders: dict) -> None:
    """PushError when a sample of shard ``name`` was encoded by other encoders than the manifest's.

    Only the small ``.json`` members are read; the tar index lets the reader seek past the latents.
    """
    shard = store.url(name)
    try:
        with store.open(name) as f, tarfile.open(fileobj=f) as tar:
            metas = [(m.name, json.load(tar.extractfile(m))) for m in tar if m.name.endswith(f".{META}")]
    except (tarfile.TarError, ValueError) as err:
        raise PushError(f"{shard} is damaged ({err}); run longcat-prep inspect on its folder") from err
    for name, meta in metas:
        found = meta.get("encoders")
        if found is not None and found != encoders:
            raise PushError(
                f"{shard}: sample {name} was encoded with {found}, the manifest says {encoders}: "
                "this dir mixes encoders; re-run prep into a fresh dir with one --model"
            )


def split_patterns(shard_names: Iterable[str]) -> dict[str, str]:
    """One ``data_files`` glob per split: ``train-000000.tar`` -> ``{"train": "train-*.tar"}``."""
    splits = sorted({name.split("-", 1)[0] for name in shard_names})
    return {split: f"{split}-*.tar" for split in splits}


def bucket_table(buckets: dict[str, int]) -> tuple[str, int, int]:
    """Markdown rows for the card (height, width, frames, clips), the clip total and the frame total."""
    rows = ["| height | width | frames | clips |", "|---:|---:|---:|---:|"]
    clips = frames = 0
    for key, count in sorted(buckets.items(), key=lambda kv: -kv[1]):
        height, width, length = (int(v) for v in key.split("x"))
        rows.append(f"| {height} | {width} | {length} | {count} |")
        clips += count
        frames += count * length
    return "\n".join(rows), clips, frames


def dataset_card(manifest: dict, repo_id: str, *, license: str = "other", contact_sheet: bool = False) -> str:
    """README.md for the dataset repo: YAML metadata the hub and ``datasets`` read, then the human part."""
    patterns = split_patterns(shard["name"] for shard in manifest["shards"])
    data = DatasetCardData(
        license=license,
        task_categories=["image-to-video"],
        tags=["longcat-video", "webdataset", "video-latents", "lora-training"],
        pretty_name=repo_id.split("/", 1)[1],
        configs=[
            {
                "config_name": "default",
                "data_files": [{"split": split, "path": pattern} for split, pattern in patterns.items()],
            }
        ],
    )
    table, clips, frames = bucket_table(manifest.get("buckets", {}))
    encoders = "\n".join(f"- `{name}`: `{value}`" for name, value in sorted(manifest["encoders"].items()))
    shards = manifest["shards"]
    size = sum(shard.get("bytes", 0) for shard in shards)
    size_text = f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
    frames_per_clip = sorted({int(key.rsplit("x", 1)[1]) for key in manifest.get("buckets", {})})
    rejected = manifest.get("rejected", [])
    reasons = Counter(item.get("reason", "?").split(":", 1)[0] for item in rejected)
    rejected_line = (
        f"{len(rejected)} inputs were rejected during prep ({', '.join(f'{r}: {n}' for r, n in reasons.most_common())})."
        if rejected
        else "No input was rejected during prep."
    )
    sheet_line = f"![start frames and captions]({CONTACT_SHEET})\n\n" if contact_sheet else ""
    body = f"""
# {repo_id}

Training data for an image-to-video LoRA on [LongCat-Video](https://huggingface.co/meituan-longcat/LongCat-Video),
prepared by `longcat-prep shard`: {clips} clips in {len(shards)} WebDataset shard{"s" if len(shards) != 1 else ""} ({size_text}),
{frames} video frames in total ({", ".join(str(f) for f in frames_per_clip)} frames per clip). Each sample holds
the clip's normalised VAE latents, the start frame encoded alone (the I2V condition), the start frame as
an image, the caption, and optionally its umT5 text embeddings, so training needs no VAE or video decoding.

{sheet_line}## Train on it

```bash
longcat-train --shards hf://datasets/{repo_id} --output-dir out/
```

Shards are streamed while training (nothing is downloaded up front), split across nodes and data-loader
workers and shuffled exactly like local shards. Private repos use your `HF_TOKEN` or `hf auth login`.

## Load it with `datasets`

```python
from datasets import load_dataset

ds = load_dataset("{repo_id}", streaming=True, split="train")
sample = next(iter(ds))  # keys: __key__, latents.safetensors, cond.safetensors, cond.png, txt, json, ...
```

## Encoders

Latents and text embeddings were made by these encoders; train with the same ones.

{encoders}

## Buckets

{table}

## Sample layout

| member | content |
|---|---|
| `latents.safetensors` | `latents` bf16 [16, T, H/8, W/8], normalised per channel, T = 1 + (frames - 1) / 4 |
| `cond.safetensors` | `cond_latents` bf16 [16, 1, H/8, W/8]: the start frame encoded alone |
| `cond.png` | the start frame after crop and resize |
| `txt` | the caption |
| `t5.safetensors` | `embeds` bf16 [L, 4096] for the real caption tokens (optional) |
| `json` | source path, fps, original size, crop box, bucket, caption source, encoders |

`{MANIFEST}` lists the shards in order with their sample counts, the prep settings and the rejected inputs.
{rejected_line}

## License

`{license}`: the clips' own license decides how this data may be used; the latents are derived from them.
"""
    return f"---\n{data.to_yaml()}\n---\n{body}"


def upload_patterns(manifest: dict, out_dir: str | Path | storage.Folder) -> list[str]:
    """The files a push uploads: the manifest, the card, exactly the shards the manifest lists, and the
    contact sheet when there is one. Partial shards and prep's resume state stay local."""
    sheet = [CONTACT_SHEET] if storage.folder(out_dir).is_file(CONTACT_SHEET) else []
    return [MANIFEST, CARD, *sheet, *(shard["name"] for shard in manifest["shards"])]


def push_dataset(
    out_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    license: str = "other",
    dry_run: bool = False,
    api: Any = None,
) -> list[str]:
    """Write the card and upload the output dir to the dataset repo ``repo_id``; return the uploaded names.

    ``dry_run`` writes and checks the card only. The upload is resumable: run the same command again
    after an interruption and files already on the hub are not sent again. A remote output folder
    (``s3://...``) is checked and gets its card, but only ``dry_run`` is done from there.
    """
    if not re.fullmatch(_REPO_ID, repo_id):
        raise PushError(f"{repo_id!r} is not a dataset repo id; write user/name")
    store = storage.folder(out_dir)
    if store.local is None and not dry_run:
        raise PushError(
            f"{store.url()}: push uploads a local folder; copy this one to a local disk first "
            "(e.g. `aws s3 sync`), then push that copy (--dry-run checks it where it is)"
        )
    manifest = load_finished_manifest(store)
    sheet = store.is_file(CONTACT_SHEET)
    store.write_atomic(CARD, dataset_card(manifest, repo_id, license=license, contact_sheet=sheet))
    card = store.url(CARD)
    patterns = upload_patterns(manifest, store)
    if dry_run:
        log.info("dry run: wrote %s; would upload %d files to datasets/%s", card, len(patterns), repo_id)
        return patterns
    out_dir = store.local
    api = api or HfApi()
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    # Older huggingface_hub releases resume big uploads only through upload_large_folder; newer ones
    # dropped it and made upload_folder resumable (chunked, batched commits, skips what is there).
    if hasattr(api, "upload_large_folder"):
        api.upload_large_folder(
            repo_id=repo_id, folder_path=out_dir, repo_type="dataset", allow_patterns=patterns
        )
    else:
        api.upload_folder(
            repo_id=repo_id,
            folder_path=out_dir,
            repo_type="dataset",
            allow_patterns=patterns,
            commit_message=f"longcat-prep push: {len(manifest['shards'])} shards",
        )
    log.info("pushed %d files to https://huggingface.co/datasets/%s", len(patterns), repo_id)
    return patterns
