"""longcat-prep: the command line of the prep tools; it parses flags and dispatches, nothing more.

Each subcommand is a config dataclass (``longcat_data.config``, its fields the flags) and a ``run_*``
function here that calls into the module doing the work: ``prep`` (shard), ``inspection`` (inspect),
``manifest`` (merge), ``captions`` (caption), ``hub`` (push), ``demo``. Those are imported inside the
``run_*`` functions, so ``--help`` answers without loading torch. Adding a subcommand: write its config
dataclass and a ``run_<name>`` function, and add one line to ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from longcat_data.config import (
    CaptionConfig,
    DemoConfig,
    InspectConfig,
    MergeConfig,
    PrepConfig,
    PushConfig,
)
from longcat_data.defaults import DEMO_AREA, DEMO_FRAMES
from longcat_data.flags import add_commands, parse
from longcat_data.interrupts import Interrupted


def run_demo(cfg: DemoConfig) -> None:
    from longcat_data.demo import write_demo_clips

    paths = write_demo_clips(cfg.out_dir)
    out = Path(cfg.out_dir)
    print(f"wrote {len(paths)} demo clips to {out}")
    print(
        f"next: longcat-prep shard {out} {out.with_name(out.name + '_shards')} --model tiny "
        f"--area {DEMO_AREA[0]}x{DEMO_AREA[1]} --frames {DEMO_FRAMES}"
    )


def run_shard(cfg: PrepConfig) -> None:
    from longcat_data import prep

    prep.limit_encoding_threads(cfg)
    if cfg.simpletuner is not None:
        run_simpletuner_datasets(cfg)
        return
    stats = prep.run_shard(cfg)
    print(stats.summary())
    failure = stats.failure()
    if failure:
        raise prep.NothingWritten(f"{cfg.videos_dir}: {failure}")


def run_simpletuner_datasets(cfg: PrepConfig) -> None:
    from longcat_data import prep
    from longcat_data.simpletuner import report, run_simpletuner

    lines, failure = report(run_simpletuner(cfg, prep.run_shard), Path(str(cfg.out_dir)))
    print("\n".join(lines))
    if failure:
        raise prep.NothingWritten(failure)


def run_inspect(cfg: InspectConfig) -> None:
    from longcat_data.inspection import run_inspect

    run_inspect(cfg)


def run_merge(cfg: MergeConfig) -> None:
    from longcat_data.manifest import merge_manifest

    manifest = merge_manifest(cfg.out_dir)
    samples = sum(s["samples"] for s in manifest["shards"])
    state = "complete" if manifest["complete"] else "INCOMPLETE (a rank has not finished, or see the warning)"
    print(f"{cfg.out_dir}/manifest.json: {samples} samples in {len(manifest['shards'])} shards, {state}")


def caption_prompt(cfg: CaptionConfig) -> str:
    """``--prompt-template``: the text itself, ``@FILE`` to read it, or the default template."""
    from longcat_data.qwen_captions import DEFAULT_PROMPT_TEMPLATE

    if cfg.prompt_template is None:
        return DEFAULT_PROMPT_TEMPLATE
    if cfg.prompt_template.startswith("@"):
        return Path(cfg.prompt_template[1:]).read_text(encoding="utf-8").strip()
    return cfg.prompt_template


def run_caption(cfg: CaptionConfig) -> None:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from longcat_data.clips import list_videos
    from longcat_data.qwen_captions import QwenCaptioner, caption_videos

    videos_dir = Path(cfg.videos_dir)
    if not videos_dir.is_dir():
        raise FileNotFoundError(f"videos folder {videos_dir} does not exist")
    captioner = QwenCaptioner(
        cfg.model,
        prompt_template=caption_prompt(cfg),
        fps=cfg.fps,
        max_frames=cfg.max_frames,
        max_pixels=cfg.max_pixels,
        max_new_tokens=cfg.max_new_tokens,
        device=cfg.device,
    )
    with logging_redirect_tqdm():
        report = caption_videos(
            videos_dir,
            sorted(list_videos(videos_dir)),
            captioner,
            jsonl=cfg.jsonl,
            overwrite=cfg.overwrite,
            batch_size=cfg.batch_size,
        )
    for source, reason in report.failed:
        print(f"  failed {source}: {reason}")
    print(report.summary())


def run_push(cfg: PushConfig) -> None:
    from huggingface_hub.errors import HfHubHTTPError

    from longcat_data import hub

    try:
        files = hub.push_dataset(
            cfg.out_dir, cfg.repo_id, private=cfg.private, license=cfg.license, dry_run=cfg.dry_run
        )
    except HfHubHTTPError as err:
        # The hub's own message says what failed; the usual cause is a missing or read-only token.
        raise hub.PushError(f"{err} (log in with `hf auth login` or set HF_TOKEN to a write token)") from err
    from longcat_data.storage import join

    card = join(cfg.out_dir, hub.CARD)
    if cfg.dry_run:
        print(f"wrote {card}; a push would upload {len(files)} files to datasets/{cfg.repo_id}")
        return
    print(f"pushed {len(files)} files to https://huggingface.co/datasets/{cfg.repo_id}")
    print(f"train on it: longcat-train --shards hf://datasets/{cfg.repo_id}")


# ---------------------------------------------------------------- parser

SHARD_EPILOG = """\
examples:
  longcat-prep shard videos/ shards/ --model tiny --area 192x320 --frames 17     # CPU, no downloads
  longcat-prep shard videos/ shards/ --conditioning-dir start_frames/ --shard-size 500MB
  longcat-prep shard videos/ shards/ --captions jsonl:metadata.jsonl --fps 16 --clips-per-video 3
  torchrun --nproc-per-node 8 -m longcat_data.cli shard videos/ shards/    # one slice per GPU
  longcat-prep shard videos/ shards/ --rank 1 --world-size 4   # by hand, e.g. one per machine; then merge
  longcat-prep shard --simpletuner config.json --output-dir shards/   # SimpleTuner datasets -> shards/<id>/
  longcat-prep shard s3://bucket/videos s3://bucket/shards --staging-dir /scratch/stage   # any fsspec URL

Remote folders (s3://, gs://, hf://, ...; credentials from the store's usual environment, e.g. AWS_*
and ~/.aws for s3) are read and written in place: videos are fetched one at a time per decode worker,
each shard is staged locally and uploaded whole under its name, manifest.json last; reruns resume from
the bucket. One writer per stream there too: a lock object OUT_DIR/.prep/STREAM.lock.

Captions: 'sidecar' reads VIDEO.txt beside each video (SimpleTuner's textfile), falling back to the
file name with a warning; jsonl/csv map file names to captions (file_name + caption/text columns);
'qwen' captions every video with Qwen-2.5-VL first (cached in OUT_DIR/.prep, so reruns skip it).
--frames is rounded down to 4k+1; shorter videos are kept at their own length (counted in the summary).
A run that rejects every video exits 2 with the most common reason and its fix. --simpletuner: see the
README ("SimpleTuner datasets") for how its keys map. Rerunning into the same OUT_DIR resumes: finished shards are kept and their videos skipped. A different
--model or content setting is refused. Bad inputs are reported, listed in manifest.json, and skipped.
SIGTERM/SIGHUP (a scheduler stopping the job) act like Ctrl-C: the shard in progress is closed with its
whole clips and the state saved; the exit code is 128 + the signal. One writer per output stream: a
second run into the same OUT_DIR is refused while the first runs (lock: OUT_DIR/.prep/STREAM.lock).
"""

CAPTION_EPILOG = """\
examples:
  longcat-prep caption videos/                          # VIDEO.txt beside each video that has none
  longcat-prep caption videos/ --jsonl captions.jsonl   # then: shard ... --captions jsonl:captions.jsonl
  longcat-prep caption videos/ --prompt-template @my_prompt.txt --overwrite

Each caption is written as soon as it exists, so an interrupted run resumes where it stopped. Needs a
GPU for real use (Qwen2.5-VL-7B runs in bf16). With torchvision installed the frames go in as a video;
without it, as a series of images.
"""

PUSH_EPILOG = """\
examples:
  longcat-prep push shards/ me/my-clips --private --license cc-by-4.0
  longcat-prep push shards/ me/my-clips --dry-run        # check the folder and write the card only

Pushes manifest.json, the shards it lists, the dataset card (README.md) and the contact sheet when
longcat-prep inspect made one. Refused when the folder is unfinished or mixes encoders. Rerunning after
an interruption resumes the upload. Then: longcat-train --shards hf://datasets/me/my-clips
"""

DEMO_EPILOG = f"""\
example:
  longcat-prep demo demo_videos     # then: longcat-prep shard demo_videos shards --model tiny --area \
{DEMO_AREA[0]}x{DEMO_AREA[1]} --frames {DEMO_FRAMES}
"""

INSPECT_EPILOG = """\
example:
  longcat-prep inspect shards/ --sheet sheet.png --max-images 24

Checks every shard the manifest lists (size, sample count) and exits 2 naming the first that differs.
"""

MERGE_EPILOG = """\
example:
  longcat-prep merge shards/     # after copying the ranks' outputs of several machines into one folder
"""

COMMANDS: dict[str, tuple[type, Callable[[Any], None], str, str]] = {
    "demo": (DemoConfig, run_demo, "write a few generated demo clips with captions", DEMO_EPILOG),
    "shard": (PrepConfig, run_shard, "encode a folder of videos into WebDataset shards", SHARD_EPILOG),
    "inspect": (
        InspectConfig,
        run_inspect,
        "counts, bucket table and a contact sheet of a shard folder",
        INSPECT_EPILOG,
    ),
    "merge": (
        MergeConfig,
        run_merge,
        "write one manifest.json for shards written by several ranks",
        MERGE_EPILOG,
    ),
    "caption": (
        CaptionConfig,
        run_caption,
        "caption videos with Qwen-2.5-VL into VIDEO.txt files",
        CAPTION_EPILOG,
    ),
    "push": (
        PushConfig,
        run_push,
        "upload a finished shard folder to a Hugging Face dataset repo",
        PUSH_EPILOG,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longcat-prep",
        description="Turn raw videos into WebDataset shards for LongCat-Video image-to-video LoRA training.",
        epilog="start here: longcat-prep demo demo_videos && longcat-prep shard --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_commands(parser, COMMANDS)
    return parser


def _is_user_error(err: BaseException) -> bool:
    """Errors printed as one line (exit 2) rather than a traceback; imported only once one is raised, so
    ``--help`` loads none of the modules that define them. ``RecordError`` and ``ShardError`` are
    ``ValueError``s; ``OutputError`` covers a failing disk and a locked output folder; any other
    ``OSError`` that gets this far is the system's (a disk, a permission), not a bug of ours."""
    from longcat_data.captions import CaptionError
    from longcat_data.files import OutputError
    from longcat_data.hub import PushError
    from longcat_data.manifest import OutputMismatch

    return isinstance(err, (ValueError, OSError, OutputMismatch, OutputError, CaptionError, PushError))


def _one_line(err: BaseException) -> str:
    """An OSError from the system (errno set) as file, cause and fix; any other error as its message."""
    from longcat_data.files import describe_os_error

    return describe_os_error(err) if isinstance(err, OSError) and err.errno else str(err)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    cls, run, _, _ = COMMANDS[args.command]
    try:
        cfg = parse(cls, args)
        run(cfg)
    except Interrupted as err:
        print(f"interrupted ({err.name}); re-run the same command to continue", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to continue", file=sys.stderr)
        return 130
    except Exception as err:
        if not _is_user_error(err):
            raise
        print(f"longcat-prep {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
