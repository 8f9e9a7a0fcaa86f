"""Console scripts: ``longcat-train`` (train_main) and ``longcat-sample`` (sample_main)."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _one_line(err: BaseException) -> str:
    # An error raised in a DataLoader worker arrives wrapped with the worker's traceback; its last line
    # is "module.ErrorType: message".
    lines = str(err).strip().splitlines() or [type(err).__name__]
    last = lines[-1]
    return last.split(": ", 1)[1] if len(lines) > 1 and ": " in last else last


def _is_user_error(err: BaseException) -> bool:
    from longcat_data.stream import ShardError
    from longcat_train.config import ConfigError

    return isinstance(err, (ConfigError, ShardError, FileNotFoundError))


def train_main(argv: list[str] | None = None) -> int:
    """``longcat-train``: parse flags (and --config), train, print user errors as one line (exit 2)."""
    # Buckets change tensor shapes from step to step and block swap streams weights in and out: without
    # expandable segments the caching allocator fragments (3.4 GiB reserved but unusable in our 24 GB
    # run). Read when CUDA first allocates, so it is set before anything imports a model.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    rank = int(os.environ.get("RANK", 0))
    tag = f"[rank {rank}] " if "WORLD_SIZE" in os.environ else ""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s {tag}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from longcat_train.config import parse_args

    try:
        cfg = parse_args(argv)
        # Imported after parsing, so that --help and flag errors answer at once, without the model and data
        # stack's imports (diffusers, peft, torchao) and their warnings.
        from longcat_train.trainer import train

        train(cfg)
    except Exception as err:
        if not _is_user_error(err):
            raise
        print(f"longcat-train: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("longcat-train: interrupted; resume with --resume (from the last checkpoint)", file=sys.stderr)
        return 130
    return 0


def _size(text: str) -> tuple[int, int]:
    from longcat_data.cli import parse_area

    try:
        return parse_area(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants HxW, e.g. 480x832; got {text!r}") from None


def sample_parser() -> argparse.ArgumentParser:
    from longcat_train.attention import IMPLEMENTATIONS
    from longcat_train.config import SampleConfig

    d = SampleConfig.__dataclass_fields__
    parser = argparse.ArgumentParser(
        prog="longcat-sample",
        description="Image-to-video with LongCat-Video (and a LoRA): one MP4 per prompt, or --serve a preview page.",
    )
    parser.add_argument("--model", default=d["model"].default, help="'tiny', a checkpoint directory or a hub id")
    parser.add_argument("--image", help="start frame (PNG, JPEG or WebP); resized and cropped to the nearest bucket")
    parser.add_argument(
        "--prompt", dest="prompts", action="append", default=[],
        help="what happens in the video; repeat for several videos of the same start frame (seeds seed, seed+1, ...)",
    )  # fmt: skip
    parser.add_argument("--negative-prompt", default=d["negative_prompt"].default, help="default: empty, as upstream")
    parser.add_argument("-o", "--output", default=d["output"].default, help="MP4 path (several prompts: out_0.mp4, ...)")
    parser.add_argument(
        "--lora", action="append", default=[],
        help="LoRA safetensors, ours or the official format; with --serve, repeat to offer several on the page",
    )  # fmt: skip
    parser.add_argument("--lora-strength", type=float, default=d["lora_strength"].default, help="LoRA multiplier")
    parser.add_argument("--frames", type=int, help="4k+1 frames (others are rounded); default 93, 17 for tiny")
    parser.add_argument("--steps", type=int, default=d["steps"].default, help="Euler steps")
    parser.add_argument("--guidance", type=float, default=d["guidance"].default, help="CFG-Zero* scale; 1 = off")
    parser.add_argument("--shift", type=float, default=d["shift"].default, help="sigma shift (12 at 480p)")
    parser.add_argument("--seed", type=int, default=d["seed"].default)
    parser.add_argument(
        "--size", type=_size, help="bucket area HxW; the start image's shape picks the bucket (default 480x832, 192x320 for tiny)"
    )
    parser.add_argument("--fps", type=int, default=d["fps"].default, help="frame rate of the MP4")
    parser.add_argument("--gif", action="store_true", help="also write a small GIF preview beside the MP4")
    parser.add_argument("--save-frames", action="store_true", help="also write every frame as PNG into out/")
    parser.add_argument("--vae-tiling", action="store_true", help="decode in spatial tiles: less memory, a bit slower")
    parser.add_argument(
        "--block-swap", type=int, default=0, metavar="N",
        help="keep the last N DiT blocks in host memory and stream them in (GPUs smaller than the model)",
    )  # fmt: skip
    parser.add_argument(
        "--attention", choices=IMPLEMENTATIONS, default=d["attention"].default,
        help="DiT self-attention: sdpa (dense, as the model was trained) or block_sparse (our kernel at 1/16 "
             "density: 149 s instead of 266 s for 480x832x93 on an H100, a different computation; judge by eye)",
    )  # fmt: skip
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    web = parser.add_argument_group("preview page")
    web.add_argument("--serve", action="store_true", help="serve the preview page instead of sampling once")
    web.add_argument("--host", default=d["host"].default)
    web.add_argument("--port", type=int, default=d["port"].default)
    web.add_argument("--serve-dir", default=d["serve_dir"].default, help="where the page's videos are written")
    web.add_argument("--max-upload-mb", type=float, default=d["max_upload_mb"].default)
    return parser


def sample_main(argv: list[str] | None = None) -> int:
    """``longcat-sample``: parse flags, sample (or serve the page), print user errors as one line (exit 2)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from longcat_train.config import SampleConfig

    config = SampleConfig(**vars(sample_parser().parse_args(argv)))
    # After parsing, as in train_main: --help answers without the model stack's imports.
    from longcat_train.sample import SampleInputError, run_sample

    try:
        if config.serve:
            from longcat_train.webui import serve_sampler

            serve_sampler(config)
        else:
            for path in run_sample(config):
                print(path)
    except (SampleInputError, FileNotFoundError) as err:
        print(f"longcat-sample: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
