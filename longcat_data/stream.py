"""Shards -> training batches: a webdataset pipeline of small iterator stages with an exact resume point.

Stages, each a generator over dict samples (webdataset style):

    shard_urls -> read_tars -> keep_share -> check_samples -> shuffle_samples -> bucket_batches
               -> skip_batches -> decode_batch

Everything a reader sees is a deterministic function of (seed, epoch, rank, worker): shard order, the
split of shards (or samples) over ranks and DataLoader workers, and the sample shuffle. Batches are
formed *before* tensors are decoded, from a cheap header check (``ShardSample.check_members``) that
rejects corrupt members, so the stream position is fully described by one number, the batches this
rank has consumed. Resuming at batch k replays the stream up to k without decoding a single tensor.

A ``DataLoader`` with W workers takes batches round-robin from worker 0, 1, ... W-1. Worker slot j plays
the *logical* worker ``(j + k) % W`` when the loader is started at batch k, so the batch the loader
yields first after a resume is the one the uninterrupted run would have yielded next.

The sample layout is ``longcat_data.shards``; a directory's shard list and the manifest checks are
``longcat_data.manifest``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import random
import re
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import safetensors.torch
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, group_by_keys

from longcat_data import storage
from longcat_data.defaults import STOP_SIGNALS
from longcat_data.encode import pad_text_embeds
from longcat_data.files import OutputError
from longcat_data.hub import is_hf_spec, resolve_hf_shards
from longcat_data.manifest import find_manifest, manifest_shards, read_manifest
from longcat_data.shards import CAPTION, META, TEXT_EMBEDS, ShardError, ShardSample, decode_tensors
from longcat_data.tars import Damage, tar_members
from longcat_data.video import VIDEO_EXTENSIONS

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- shard specs


def expand_shard_spec(spec: str | Sequence[str], *, allow_missing: bool = False) -> list[str]:
    """URLs webdataset can open from: a directory of ``*.tar``, a brace pattern or glob, a list, ``a::b``,
    ``pipe:cmd`` (braces expand to one command per shard), a Hugging Face dataset
    (``hf://datasets/user/name`` or ``user/name``), or a folder (or shard URLs) of a store fsspec reads
    (``s3://bucket/shards``, ``gs://...``), streamed from there. A directory's manifest listing shards
    that are not there is a ShardError unless ``allow_missing`` (``manifest.manifest_shards``)."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in specs:
        urls.extend(_expand_one(str(item), allow_missing))
    if not urls:
        raise ShardError(f"no shards in {spec!r}")
    return urls


def _remote_folder(spec: str, allow_missing: bool) -> list[str] | None:
    """The shards of a remote folder (its manifest's, else its ``*.tar``); None when ``spec`` is not a
    folder there (a shard URL, a pattern)."""
    store = storage.folder(spec.rstrip("/"))
    try:
        listed = manifest_shards(store, allow_missing=allow_missing)
        if listed is not None:
            return listed
        tars = [store.url(n) for n in store.names("*.tar")]
    except OSError as err:
        raise ShardError(f"cannot read the shards: {storage.describe_remote_error(err, spec)}") from err
    except OutputError as err:  # the manifest could not be read
        raise ShardError(str(err)) from err
    return tars or None


def _expand_one(spec: str, allow_missing: bool) -> list[str]:
    if storage.is_remote(spec) and storage.knows_protocol(spec) and not is_hf_spec(spec):
        if not any(c in spec for c in "*?[{") and not spec.endswith(".tar"):
            found = _remote_folder(spec, allow_missing)
            if found is None:
                raise ShardError(f"no shards (*.tar) in {spec}")
            return found
        if any(c in spec for c in "*?["):
            fs, _ = storage.remote_fs(spec)
            protocol = spec.split("://", 1)[0]
            return sorted(
                f"{protocol}://{p}" for u in expand_urls(spec) for p in fs.glob(u.split("://", 1)[1])
            )
    path = storage.local_path(spec) if spec.startswith("file://") else Path(spec).expanduser()
    if path.is_dir():
        listed = manifest_shards(path, allow_missing=allow_missing)
        tars = listed if listed is not None else sorted(str(p) for p in path.glob("*.tar"))
        if not tars:
            raw = any(p.suffix.lower() in VIDEO_EXTENSIONS for p in path.iterdir())
            hint = f"; it holds videos: run `longcat-prep shard {spec} OUT_DIR` first" if raw else ""
            rejected = read_manifest(path).get("rejected", []) if listed is not None else []
            if rejected:
                first = rejected[0]
                hint = (
                    f"; longcat-prep rejected all {len(rejected)} videos (manifest.json 'rejected'), "
                    f"e.g. {first['source']}: {first['reason']}"
                )
            raise ShardError(f"no shards (*.tar) in directory {spec}{hint}")
        return tars
    if is_hf_spec(spec):
        return resolve_hf_shards(spec)
    urls = expand_urls(spec)
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    if local and any(c in spec for c in "*?["):
        return sorted(f for u in local for f in glob.glob(os.path.expanduser(u)))
    missing = [u for u in local if not Path(u).expanduser().is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ShardError(f"shard {missing[0]} does not exist{more}")
    return [os.path.expanduser(u) if u in local else u for u in urls]


# ---------------------------------------------------------------- stream settings and seeding


@dataclass(frozen=True)
class StreamConfig:
    batch_size: int = 1
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    resampled: bool = False  # draw shards with replacement forever instead of shuffled passes
    shuffle_buffer: int = 64  # samples held for shuffling in each worker
    need_cond: bool = True  # image-to-video: every sample must carry cond.safetensors
    max_latent_frames: int | None = None  # refuse samples longer than the configured clip length
    min_latent_frames: int | None = None  # refuse samples shorter (continuation: its condition + 1)
    encoders: dict | None = None  # refuse samples whose json names other encoders


def _rng(*parts: object) -> random.Random:
    # Seeding with a string hashes it with sha512: stable across processes, unlike hash().
    return random.Random("/".join(map(str, parts)))


class DamagedShard(ShardError):
    """Part of a tar could not be read; ``lost`` whole samples went with it."""

    def __init__(self, message: str, lost: int) -> None:
        super().__init__(message)
        self.lost = lost


class SkipCounter:
    """webdataset handler: log and count a bad shard or member (the samples lost), keep streaming."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, exn: BaseException) -> bool:
        self.count += exn.lost if isinstance(exn, DamagedShard) else 1
        if self.count <= 10 or isinstance(exn, DamagedShard):
            log.warning("skipping corrupt data (%d so far): %s", self.count, str(exn).splitlines()[0][:300])
        return True


def expected_samples(urls: Sequence[str]) -> dict[str, int]:
    """Sample count per local shard path, from the manifest beside them ({} without one): what lets a
    reader count the samples a damaged tar lost."""
    manifest = find_manifest(urls) if urls else None
    if manifest is None:
        return {}
    directory = storage.parent(urls[0])
    return {
        _shard_id(storage.join(directory, s["name"])): s["samples"]
        for s in manifest.get("shards", [])
        if "samples" in s
    }


def _shard_id(url: str) -> str:
    """How ``expected_samples`` names a shard: a local one by its absolute path, a remote one by URL."""
    return url if storage.is_remote(url) else os.path.abspath(storage.local_path(url))


# ---------------------------------------------------------------- stages


def shard_urls(urls: Sequence[str], cfg: StreamConfig, worker: int, workers: int) -> Iterator[dict]:
    """Shard URLs for one (rank, worker), epoch after epoch, forever.

    Passes shuffle the list with (seed, epoch) and deal it over all ranks x workers; resampled mode
    draws with (seed, rank, worker). With fewer shards than readers every reader gets every shard and
    ``keep_share`` deals samples instead.
    """
    readers, me = cfg.world_size * workers, cfg.rank * workers + worker
    if cfg.resampled:
        rng = _rng(cfg.seed, "resample", cfg.rank, worker)
        while True:
            yield dict(url=rng.choice(urls))
    for epoch in count():
        order = list(urls)
        _rng(cfg.seed, "shards", epoch).shuffle(order)
        yield from (dict(url=u) for u in (order[me::readers] if len(urls) >= readers else order))


def read_tars(
    sources: Iterable[dict], handler: Callable[[BaseException], bool], expected: dict[str, int] | None = None
) -> Iterator[dict]:
    """Samples (member bytes keyed by extension) from opened tars; unreadable data goes to ``handler``.

    A damaged stretch of a tar is read past (``longcat_data.tars``), and reported once the tar ends as
    a ``DamagedShard`` counting the samples lost: ``expected`` (sample count by local path, see
    ``expected_samples``) minus those read, or one per damaged stretch when the count is unknown.
    """
    return group_by_keys(_tar_files(sources, handler, expected or {}), handler=handler)


def open_shard(url: str):
    """A shard opened for sequential reading: a store fsspec reads (``s3://``, ``gs://``, ...) by
    ranged requests as it is read, everything else (a path, ``pipe:``, ``http(s)://``) by webdataset."""
    if storage.is_remote(url) and storage.knows_protocol(url) and not url.startswith(("http://", "https://")):
        return storage.open_input(url)
    return gopen(url)


def _opened(sources: Iterable[dict], handler: Callable[[BaseException], bool]) -> Iterator[dict]:
    """webdataset's ``url_opener`` with ``open_shard``: a shard that cannot be opened goes to ``handler``."""
    for source in sources:
        url = source["url"]
        try:
            source.update(stream=open_shard(url))
        except Exception as exn:
            exn.args = exn.args + (url,)
            if handler(exn):
                continue
            break
        yield source


def _tar_files(
    sources: Iterable[dict], handler: Callable[[BaseException], bool], expected: dict[str, int]
) -> Iterator[dict]:
    for source in _opened(sources, handler):
        url, stream = source["url"], source["stream"]
        damage: list[Damage] = []
        keys: set[str] = set()
        try:
            for name, data in tar_members(stream, damage.append):
                key, _ = base_plus_ext(name)
                if key is None or re.match(r"__[^/]*__($|/)", name):
                    continue
                keys.add(key)
                yield {"fname": name, "data": data, "__url__": url}
        except OSError as exn:  # the stream itself failed (a vanished file, a network error)
            damage.append(Damage(0, None))
            log.debug("reading %s: %s", url, exn)
        finally:
            try:
                stream.close()
            except OSError as exn:  # a pipe: command that failed
                damage.append(Damage(0, None))
                log.debug("closing %s: %s", url, exn)
        yield {}  # the end of a tar: group_by_keys never joins samples across it
        if damage:
            known = expected.get(_shard_id(url)) if not url.startswith("pipe:") else None
            lost = max(0, known - len(keys)) if known is not None else len(damage)
            count = f"{lost} samples lost" if known is not None else f"at least {lost} sample(s) lost"
            handler(DamagedShard(f"{url}: {damage[0].describe()}; {count}", lost))


def keep_share(samples: Iterable[dict], me: int, readers: int) -> Iterator[dict]:
    """Every ``readers``-th sample, for when there are too few shards to split by shard."""
    for i, sample in enumerate(samples):
        if i % readers == me:
            yield sample


def check_samples(
    samples: Iterable[dict], cfg: StreamConfig, handler: Callable[[BaseException], bool]
) -> Iterator[dict]:
    """Validate members from their headers and tag each sample with its bucket (latent shape).

    Corrupt or incomplete samples go to ``handler``; samples from other encoders or longer than the
    configured clip stop the run with a ShardError.
    """
    for sample in samples:
        try:
            shape = ShardSample.check_members(sample, need_cond=cfg.need_cond)
            meta = json.loads(sample[META]) if META in sample else {}
        except Exception as exn:
            exn.args = (f"{sample.get('__url__')}: sample {sample.get('__key__')}: {exn}",)
            if handler(exn):
                continue
            raise
        where = f"{sample.get('__url__')} (sample {sample['__key__']})"
        if cfg.max_latent_frames is not None and shape[1] > cfg.max_latent_frames:
            raise ShardError(
                f"{where} has {shape[1]} latent frames, more than the config's {cfg.max_latent_frames}; "
                f"set frames to match the shards or re-run longcat-prep shard"
            )
        if cfg.min_latent_frames is not None and shape[1] < cfg.min_latent_frames:
            raise ShardError(
                f"{where} has {shape[1]} latent frames, fewer than the {cfg.min_latent_frames} the config "
                "needs (continuation: the cond_frames condition plus one); lower cond_frames or re-run "
                "longcat-prep shard without clips this short"
            )
        found = meta.get("encoders")
        if cfg.encoders is not None and found is not None and found != cfg.encoders:
            raise ShardError(f"{where} was encoded with other encoders than --model ({found.get('model')!r})")
        sample["__shape__"] = shape
        yield sample


def shuffle_samples(samples: Iterable[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Reservoir shuffle: fill a buffer, then emit a random element for each new sample."""
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = sample
    rng.shuffle(buffer)
    yield from buffer


def bucket_batches(samples: Iterable[dict], batch_size: int) -> Iterator[list[dict]]:
    """Batches whose samples share one latent shape; each bucket fills independently."""
    pending: dict[tuple[int, ...], list[dict]] = {}
    for sample in samples:
        group = pending.setdefault(sample["__shape__"], [])
        group.append(sample)
        if len(group) == batch_size:
            yield pending.pop(sample["__shape__"])


def skip_batches(batches: Iterable[list[dict]], n: int) -> Iterator[list[dict]]:
    """Drop the first n batches undecoded: the resume fast-forward."""
    it = iter(batches)
    for _ in range(n):
        next(it)
    yield from it


class TextCache:
    """Caption -> [L, D] embeddings for shards stored without ``t5.safetensors`` (see ``write_text_cache``).

    Opened lazily, so each DataLoader worker maps the file itself.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._file = None

    def _open(self):
        if self._file is None:
            self._file = safetensors.safe_open(self.path, framework="pt")
        return self._file

    def has(self, caption: str) -> bool:
        return caption_key(caption) in self._open().keys()

    def __getitem__(self, caption: str) -> torch.Tensor:
        return self._open().get_tensor(caption_key(caption))

    def __getstate__(self) -> dict:
        return {"path": self.path, "_file": None}


def caption_key(caption: str) -> str:
    return hashlib.sha1(caption.encode("utf-8")).hexdigest()


def decode_batch(samples: list[dict], text_cache: TextCache | None) -> dict:
    """Raw samples of one bucket -> tensors: latents [B,16,T,h,w], cond_latents [B,16,1,h,w] (when
    present), embeds [B,L,D] + embeds_mask [B,L] for the real tokens, keys and captions."""
    loaded = [decode_tensors(s) for s in samples]
    captions = [s[CAPTION].decode("utf-8") if CAPTION in s else "" for s in samples]
    embeds = []
    for tensors, sample, caption in zip(loaded, samples, captions, strict=True):
        if "text_embeds" in tensors:
            embeds.append(tensors["text_embeds"])
        elif text_cache is not None:
            embeds.append(text_cache[caption])
        else:
            raise ShardError(
                f"sample {sample['__key__']} has no {TEXT_EMBEDS} and no text-embedding cache was built"
            )
    padded, mask = pad_text_embeds(embeds)
    batch = {
        "latents": torch.stack([t["latents"] for t in loaded]),
        "embeds": padded,
        "embeds_mask": mask,
        "keys": [s["__key__"] for s in samples],
        "captions": captions,
    }
    if all("cond_latents" in t for t in loaded):
        batch["cond_latents"] = torch.stack([t["cond_latents"] for t in loaded])
    return batch


# ---------------------------------------------------------------- the dataset


def logical_worker(slot: int, workers: int, start_batch: int) -> tuple[int, int]:
    """(logical worker id, batches it already produced) for DataLoader worker ``slot`` resuming at a
    global batch index ``start_batch`` of this rank."""
    worker = (slot + start_batch) % workers
    return worker, max(0, (start_batch - worker + workers - 1) // workers)


class ShardStream(IterableDataset):
    """Infinite stream of same-bucket batches for one rank; see the module docstring for the order."""

    def __init__(
        self,
        urls: Sequence[str],
        cfg: StreamConfig,
        *,
        start_batch: int = 0,
        text_cache: str | Path | None = None,
    ) -> None:
        super().__init__()
        if not urls:
            raise ShardError("empty shard list")
        self.urls = list(urls)
        self.cfg = cfg
        self.start_batch = start_batch
        self.text_cache = TextCache(text_cache) if text_cache is not None else None
        self.expected = expected_samples(self.urls)

    def raw_batches(
        self, worker: int, workers: int, handler: Callable[[BaseException], bool]
    ) -> Iterator[list[dict]]:
        """Undecoded batches of logical ``worker`` from the start of the stream."""
        cfg = self.cfg
        readers, me = cfg.world_size * workers, cfg.rank * workers + worker
        # An infinite stream over shards that give no sample would hang the trainer silently.
        since_sample = 0

        def counted(sources: Iterator[dict]) -> Iterator[dict]:
            nonlocal since_sample
            for source in sources:
                since_sample += 1
                if since_sample > 2 * len(self.urls) + 2:
                    raise ShardError(
                        f"rank {cfg.rank} worker {worker}: no readable sample in {since_sample - 1} shard reads "
                        f"of {len(self.urls)} shard(s)"
                        + (" (fewer samples than ranks x workers?)" if readers > 1 else "")
                    )
                yield source

        def mark(samples: Iterator[dict]) -> Iterator[dict]:
            nonlocal since_sample
            for sample in samples:
                since_sample = 0
                yield sample

        samples = read_tars(counted(shard_urls(self.urls, cfg, worker, workers)), handler, self.expected)
        if not cfg.resampled and len(self.urls) < readers:
            # Every reader gets every shard, so deal samples: else two readers train on the same clips.
            samples = keep_share(samples, me, readers)
        samples = mark(check_samples(samples, cfg, handler))
        samples = shuffle_samples(samples, cfg.shuffle_buffer, _rng(cfg.seed, "samples", cfg.rank, worker))
        return bucket_batches(samples, cfg.batch_size)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        slot, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        worker, done = logical_worker(slot, workers, self.start_batch)
        handler = SkipCounter()
        for batch in skip_batches(self.raw_batches(worker, workers, handler), done):
            out = decode_batch(batch, self.text_cache)
            out["skipped"] = handler.count
            out["worker"] = worker
            yield out


def _ignore_stop_signals(worker_id: int) -> None:
    """A loader worker shares the terminal's Ctrl-C and a scheduler's group SIGTERM with the trainer,
    which answers them by finishing its step and saving; a worker dying of them first would end the
    run instead. So workers ignore the stop signals, except a SIGTERM from their own parent: the
    loader's shutdown and the interpreter's exit end workers with it."""
    for signum in STOP_SIGNALS:
        if signum != signal.SIGTERM:
            signal.signal(signum, signal.SIG_IGN)
    parent = os.getppid()
    # Blocked here, and so in every thread started later; one thread takes each SIGTERM and its sender.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def obey_parent() -> None:
        while True:
            sender = signal.sigwaitinfo({signal.SIGTERM}).si_pid
            if sender == parent or os.getppid() != parent:
                os._exit(0)  # asked to by the parent: a normal end, nothing to report

    threading.Thread(target=obey_parent, name="sigterm-from-parent", daemon=True).start()


def make_loader(dataset: ShardStream, num_workers: int = 2, pin_memory: bool | None = None) -> DataLoader:
    """A DataLoader over the stream: batching is the stream's, so ``batch_size=None``. Its workers
    ignore the stop signals (``defaults.STOP_SIGNALS``): the main process decides when the stream ends."""
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin,
        prefetch_factor=4 if num_workers > 0 else None,
        # The order must not depend on the global torch RNG (resume restores it after this is built).
        generator=torch.Generator().manual_seed(0),
        worker_init_fn=_ignore_stop_signals,
    )


def write_text_cache(path: str | Path, embeds: dict[str, torch.Tensor]) -> Path:
    """Store caption -> [L, D] embeddings where every loader worker can map them (atomic rename)."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    safetensors.torch.save_file(
        {caption_key(c): e.to(torch.bfloat16).contiguous().cpu() for c, e in embeds.items()}, str(tmp)
    )
    tmp.replace(path)
    return path


def captions_without_embeds(urls: Sequence[str]) -> list[str]:
    """Captions of samples that carry no ``t5.safetensors``, read from the tars in order (unique)."""
    handler = SkipCounter()
    sources = (dict(url=u) for u in urls)
    found: dict[str, None] = {}
    for sample in read_tars(sources, handler):
        if TEXT_EMBEDS not in sample and CAPTION in sample:
            found.setdefault(sample[CAPTION].decode("utf-8"))
    return list(found)
