"""Prep throughput: `longcat-prep shard` end to end vs the VAE alone, at LongCat-Video's real size.

    python benchmarks/prep.py --device cuda [--clips 24] [--workers 8] [--text-encoder full|tiny|none]
    python benchmarks/prep.py --small --compile-backend aot_eager   # a CPU smoke run with the tiny encoders
    python benchmarks/prep.py --device cuda --engine ray   # + the Ray engine, one GPU actor
    python benchmarks/prep.py ... --store s3 --moto   # also through S3 (a local moto server), vs local disk

Writes synthetic H.264 source videos (larger than the bucket, so decode, resize and crop are real work),
builds the full-size Wan2.1 VAE (diffusers' default `AutoencoderKLWan` config) with random weights and,
with `--text-encoder full`, a random umT5-XXL encoder (d_model 4096, 24 layers; the
tokenizer is the tiny local one, whose ids are valid for the real vocabulary). Then measures:

- vae_only: `encode_video` on a clip already on the device, back to back: the ceiling.
- end_to_end: `run_shard` on the source files (decode workers, start-frame and text encoding, tar
  writing), after a warm-up run; clips/s over the whole run including start-up.
- gpu_busy: share of the end-to-end wall time the main process spent in encoding calls (which end in a
  device sync), i.e. how well decoding and writing hide behind the VAE. Target: ratio >= 0.9.
- with `--engine ray`: the same prep on the Ray engine (a local Ray instance, one encoder actor on one
  GPU, decode tasks on the other cores) after the single-process run, and both steady rates (first
  clip written to last, so Ray's start-up and the actor's model build are left out of both). The actor
  builds its encoders itself, compiled when the last of `--modes` is, like the local run it is set beside.
  Target: ray_to_local >= 0.95. Needs `pip install -e ".[ray]"`.
- with ``--store s3``: the same run again with the videos read from and the shards written to S3
  (``s3://.../videos`` -> ``s3://.../shards``, through ``longcat_data.storage``): its clips/s and its ratio
  to the local-disk run, the cost of the store. ``--moto`` starts a moto S3 server on localhost (a
  process of its own); without it the ``AWS_*`` environment names the store and ``--s3-url`` the prefix.

Each is measured for the eager VAE encoder, then for the compiled one (`encode.compile_vae_encoder`,
what `longcat-prep shard` does on CUDA unless `--no-compile-vae`; it turns cuDNN's algorithm search on),
side by side in one run on the same weights and clips (`--modes` picks). The compiled warm-ups include
the compilation; the timed runs do not. `speedup_end_to_end` is compiled over eager end-to-end clips/s.

Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path

import torch
from _shared import prep_encoders  # benchmarks/_shared.py

from longcat_data import encode, prep, storage
from longcat_data.config import PrepConfig
from longcat_data.demo import CLIP_ENCODING, synthetic_frames
from longcat_data.video import write_mp4


def write_sources(
    directory: Path, count: int, height: int, width: int, frames: int, distinct: int = 4
) -> None:
    """``count`` videos; only ``distinct`` are encoded, the rest are hard links (H.264 encoding is slow)."""
    directory.mkdir(parents=True, exist_ok=True)
    originals = []
    for i in range(min(distinct, count)):
        clip = synthetic_frames(height, width, frames, seed=i)
        path = write_mp4(clip, directory / f"clip_{i:04d}.mp4", 30, **CLIP_ENCODING)
        path.with_suffix(".txt").write_text(
            f"a synthetic test pattern, take {i}, with a bouncing yellow disc\n"
        )
        originals.append(path)
    for i in range(len(originals), count):
        source = originals[i % len(originals)]
        (directory / f"clip_{i:04d}.mp4").hardlink_to(source)
        (directory / f"clip_{i:04d}.txt").hardlink_to(source.with_suffix(".txt"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def vae_only_rate(
    enc: prep.Encoders, frames: int, height: int, width: int, repeats: int, device: torch.device
) -> float:
    clip = torch.from_numpy(synthetic_frames(height, width, frames))[None].to(device)
    encode.encode_video(enc.vae, clip)  # warm-up: cuDNN algorithm search, allocator
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        encode.encode_video(enc.vae, clip)
    sync(device)
    return repeats / (time.perf_counter() - start)


@contextmanager
def moto_server() -> Iterator[str]:
    """A moto S3 server on a free localhost port, in its own process (so serving uploads does not share
    the encoding process's interpreter); the AWS_* variables point s3fs at it. Yields a new bucket URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{port}",
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(
                        "the moto server did not start (pip install 'moto[s3]' flask flask-cors)"
                    ) from None
                time.sleep(0.2)
        fs, _ = storage.remote_fs("s3://prep-bench")
        fs.mkdir("prep-bench")
        yield "s3://prep-bench"
    finally:
        server.terminate()
        server.wait(30)


def upload_sources(local: Path, url: str) -> None:
    store = storage.folder(url)
    for path in sorted(local.iterdir()):
        store.fs.put_file(str(path), f"{store.root}/{path.name}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--small", action="store_true", help="tiny encoders, 128x192x9 clips: a CPU smoke run"
    )
    parser.add_argument(
        "--clips", type=int, default=None, help="clips in the timed run (default 24, small 4)"
    )
    parser.add_argument("--workers", type=int, default=8, help="decode processes")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument(
        "--text-encoder",
        choices=["full", "tiny", "none"],
        default=None,
        help="umT5 size (default: full on GPU, tiny with --small)",
    )
    parser.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="let cuDNN time its conv algorithms per shape from the start (the compiled encoder turns it on)",
    )
    parser.add_argument(
        "--modes",
        type=lambda text: text.split(","),
        default=["eager", "compiled"],
        help="VAE encoders to measure, in order: eager,compiled (default both)",
    )
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend of the compiled mode (aot_eager: a CPU smoke run without inductor's build)",
    )
    parser.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="ray: also run the Ray engine (one encoder actor) and compare its rate with the local one",
    )
    parser.add_argument("--keep", type=Path, default=None, help="keep sources and shards in this folder")
    parser.add_argument(
        "--store",
        choices=["local", "s3"],
        default="local",
        help="s3: run again with videos and shards in S3 and report its rate beside local disk's",
    )
    parser.add_argument("--moto", action="store_true", help="with --store s3: a moto S3 server on localhost")
    parser.add_argument("--s3-url", default=None, help="with --store s3 and no --moto: s3://bucket/prefix")
    args = parser.parse_args()
    if args.store == "s3" and not (args.moto or args.s3_url):
        parser.error("--store s3 needs --moto or --s3-url")
    if not args.modes or not set(args.modes) <= {"eager", "compiled"}:
        parser.error(f"--modes: eager, compiled or eager,compiled, got {','.join(args.modes)}")

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    dtype = encode.default_dtype(device)
    height, width, frames = (128, 192, 9) if args.small else (480, 832, 93)
    source_hw = (160, 240) if args.small else (544, 960)  # larger than the bucket: resize + crop are real
    clips = args.clips or (4 if args.small else 24)
    text_encoder = args.text_encoder or ("tiny" if args.small else "full")
    root = args.keep or Path(tempfile.mkdtemp(prefix="prep-bench-"))

    write_sources(root / "videos", clips, *source_hw, frames + 4)
    write_sources(root / "warmup", 2, *source_hw, frames + 4)

    def factory(compile_backend: str | None) -> prep.EncoderFactory:
        build = partial(prep_encoders, args.small, text_encoder, args.cudnn_benchmark, compile_backend)
        return prep.EncoderFactory(build, {"model": f"random-{text_encoder}"})

    enc = factory(None).build(device, dtype)
    # The Ray actor builds its own encoders: compiled as the local run it is compared with was.
    ray_factory = factory(args.compile_backend if args.modes[-1] == "compiled" else None)

    def run_prep(videos: Path | str, out: Path | str, engine: str = "local") -> prep.PrepStats:
        cfg = PrepConfig(
            str(videos),
            str(out),
            model="benchmark",
            frames=frames,
            area=f"{height}x{width}",
            workers=args.workers,
            batch_size=args.batch_size,
            device=str(device),
            text_embeds=text_encoder != "none",
            engine=engine,
            ray_encoders=1,
            staging_dir=str(root / "staging"),
        )
        return prep.run_shard(cfg, encoders=enc if engine == "local" else ray_factory)

    modes: dict[str, dict] = {}
    for mode in args.modes:
        if mode == "compiled":
            encode.compile_vae_encoder(enc.vae, backend=args.compile_backend)
        vae_rate = vae_only_rate(enc, frames, height, width, repeats=max(2, clips // 4), device=device)
        run_prep(root / "warmup", root / f"warmup_shards_{mode}")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        stats = run_prep(root / "videos", root / f"shards_{mode}")
        e2e_rate = stats.written / stats.wall_seconds
        modes[mode] = {
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "clips": stats.written,
            "vae_only_clips_per_s": round(vae_rate, 4),
            "end_to_end_clips_per_s": round(e2e_rate, 4),
            "ratio_to_vae_only": round(e2e_rate / vae_rate, 3),
            "gpu_busy": round(stats.encode_seconds / stats.wall_seconds, 3),
            "wall_s": round(stats.wall_seconds, 2),
            "shard_mb": round(
                sum(p.stat().st_size for p in (root / f"shards_{mode}").glob("*.tar")) / 1e6, 1
            ),
        }
        if device.type == "cuda":
            modes[mode]["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "clip": f"{height}x{width}x{frames}",
        "source": f"{source_hw[0]}x{source_hw[1]} h264",
        "vae": "tiny" if args.small else "Wan2.1 AutoencoderKLWan() config, random weights",
        "text_encoder": {"full": "umT5-XXL encoder, random weights", "tiny": "tiny umT5", "none": "none"}[
            text_encoder
        ],
        "dtype": str(dtype).removeprefix("torch."),
        "workers": args.workers,
        "batch_size": args.batch_size,
        **modes,
    }
    if {"eager", "compiled"} <= modes.keys():
        eager, compiled = modes["eager"], modes["compiled"]
        result["speedup_vae_only"] = round(
            compiled["vae_only_clips_per_s"] / eager["vae_only_clips_per_s"], 3
        )
        result["speedup_end_to_end"] = round(
            compiled["end_to_end_clips_per_s"] / eager["end_to_end_clips_per_s"], 3
        )
    if args.store == "s3":
        with moto_server() if args.moto else nullcontext(args.s3_url.rstrip("/")) as url:
            upload_sources(root / "videos", f"{url}/videos")
            s3_stats = run_prep(f"{url}/videos", f"{url}/shards")
        s3_rate = s3_stats.written / s3_stats.wall_seconds
        result["s3"] = {
            "endpoint": "moto on localhost" if args.moto else os.environ.get("AWS_ENDPOINT_URL_S3", "AWS"),
            "clips": s3_stats.written,
            "end_to_end_clips_per_s": round(s3_rate, 4),
            "ratio_to_local": round(s3_rate / e2e_rate, 3),
            "gpu_busy": round(s3_stats.encode_seconds / s3_stats.wall_seconds, 3),
            "wall_s": round(s3_stats.wall_seconds, 2),
        }
    if args.engine == "ray":
        del enc  # the actor builds its own copy on the same GPU
        if device.type == "cuda":
            torch.cuda.empty_cache()
        ray_stats = run_prep(root / "videos", root / "ray_shards", engine="ray")
        local_rate, ray_rate = stats.steady_rate, ray_stats.steady_rate
        result["ray"] = {
            "encoder_actors": 1,
            "clips": ray_stats.written,
            "local_steady_clips_per_s": round(local_rate, 4),
            "ray_steady_clips_per_s": round(ray_rate, 4),
            "ray_to_local": round(ray_rate / local_rate, 3) if local_rate else None,
            "ray_end_to_end_clips_per_s": round(ray_stats.written / ray_stats.wall_seconds, 4),
            "ray_wall_s": round(ray_stats.wall_seconds, 2),
        }
    print(json.dumps(result, indent=1))
    if args.keep is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
