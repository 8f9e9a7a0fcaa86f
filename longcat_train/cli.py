"""Console scripts: ``longcat-train`` (train_main) and ``longcat-sample`` (sample_main).

Each parses its flags into its config dataclass (``longcat_train.config``; the flags come from the fields,
``longcat_data.flags``), checks them, and dispatches to the trainer or the sampler. Nothing heavy is
imported before the flags are parsed, so ``--help`` and flag errors answer at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from longcat_data.flags import ConfigError, add_flags, from_dict, known_keys, parse, read_config_file
from longcat_train.config import TrainConfig
from longcat_train.runs import CONFIG_FILE, resume_base, resume_candidates
from longcat_train.sample_config import SampleConfig
from longcat_train.simpletuner import from_simpletuner, is_simpletuner
from longcat_train.stopping import TrainingStopped
from longcat_train.techniques import check_techniques


def config_file_values(path: str | Path) -> dict[str, Any]:
    """``--config``: the TrainConfig values our TOML/JSON file sets, or a SimpleTuner config.json
    (detected by its keys) translates to."""
    values = read_config_file(path)
    if is_simpletuner(values):
        return from_simpletuner(values, base_dir=Path(path).parent)
    return known_keys(TrainConfig, values, str(path))


def load_config(path: str | Path) -> TrainConfig:
    """The TrainConfig of a ``--config`` file alone (checked)."""
    return from_dict(TrainConfig, config_file_values(path), str(path))


TRAIN_EPILOG = """\
examples:
  longcat-train --model tiny --shards shards/ --max-train-steps 30 --output-dir run/   # CPU, no downloads
  longcat-train --shards shards/ --output-dir run/ --validation-source val_shards/ --validation-every 250
  longcat-train --config config.json            # a SimpleTuner config.json + its multidatabackend.json
  longcat-train --resume latest --output-dir run/   # continue a stopped run (its saved settings)
  torchrun --nproc-per-node 8 -m longcat_train.cli --shards shards/ --fsdp

frames, validation_frames and validation_area default to what the shards were made with. Quantised bases
(--base-model-precision int8-quanto / fp8-torchao) need pip install -e ".[quant]".
"""

SAMPLE_EPILOG = """\
examples:
  longcat-sample --model tiny --image start.png --prompt "a cat walks" -o cat.mp4        # CPU, no downloads
  longcat-sample --image start.png --prompt "waves roll in" --lora run/lora.safetensors:0.8 --gif
  longcat-sample --image start.png --prompt "..." --distill --lora cfg_step_lora.safetensors
  longcat-sample --serve --lora run/lora.safetensors --port 7860   # the preview page (pip install -e ".[web]")
"""


def train_parser(prog: str = "longcat-train") -> argparse.ArgumentParser:
    """A flag per TrainConfig field, plus ``--config``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train a LongCat-Video LoRA from longcat-prep shards.",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", default=argparse.SUPPRESS, help="TOML/JSON config, or a SimpleTuner config.json"
    )
    add_flags(parser, TrainConfig)
    return parser


def parse_train_args(argv: list[str] | None = None) -> TrainConfig:
    """The config of ``longcat-train ARGV``: typed flags over ``--config``'s file over the defaults;
    when resuming, over the saved config of the run resumed instead of the defaults (so ``--resume
    latest --output-dir OUT`` alone continues a run, and only what was typed or filed can differ from
    it). Checked: ConfigError with one line per problem."""
    args = train_parser().parse_args(argv)
    path = getattr(args, "config", None)
    file_values = config_file_values(path) if path else {}
    cfg = parse(TrainConfig, args, file_values)
    saved = resume_base(cfg)
    if saved is not None:
        cfg = parse(TrainConfig, args, {**saved, **file_values})
    cfg.validate()
    check_techniques(cfg)
    return cfg


def sample_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longcat-sample",
        description="Image-to-video with LongCat-Video (and a LoRA): one MP4 per prompt, or --serve a preview page.",
        epilog=SAMPLE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_flags(parser, SampleConfig)
    return parser


def parse_sample_args(argv: list[str] | None = None) -> SampleConfig:
    """The checked config of ``longcat-sample ARGV`` (ConfigError, one line per problem)."""
    return parse(SampleConfig, sample_parser().parse_args(argv))


def _one_line(err: BaseException) -> str:
    # An error raised in a DataLoader worker arrives wrapped with the worker's traceback; its last line
    # is "module.ErrorType: message".
    lines = str(err).strip().splitlines() or [type(err).__name__]
    last = lines[-1]
    return last.split(": ", 1)[1] if len(lines) > 1 and ": " in last else last


def _is_user_error(err: BaseException) -> bool:
    if isinstance(err, ConfigError | FileNotFoundError):
        return True
    # Imported only for the errors that can be one: a refused flag loads no torch.
    from longcat_data.shards import ShardError
    from longcat_train.checkpoints import CheckpointError

    return isinstance(err, ShardError | CheckpointError)


def _error_lines(err: BaseException) -> list[str]:
    """A ConfigError lists one problem per line; anything else is reported by its last line."""
    if isinstance(err, ConfigError):
        return str(err).strip().splitlines() or [type(err).__name__]
    return [_one_line(err)]


def train_main(argv: list[str] | None = None) -> int:
    """``longcat-train``: parse flags (and --config), train, print user errors as one line (exit 2)."""
    # Buckets change tensor shapes from step to step and block swap streams weights in and out: without
    # expandable segments the caching allocator fragments, leaving reserved memory unusable. Read when
    # CUDA first allocates, so it is set before anything imports a model.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    rank = int(os.environ.get("RANK", 0))
    tag = f"[rank {rank}] " if "WORLD_SIZE" in os.environ else ""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s {tag}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    cfg: TrainConfig | None = None
    try:
        cfg = parse_train_args(argv)
        if cfg.plan:
            from longcat_train.planning import plan_report

            for line in plan_report(cfg, sys.argv[1:] if argv is None else argv):
                print(line)
            return 0
        # Imported after parsing, so that --help and flag errors answer at once, without the model and data
        # stack's imports (diffusers, peft, torchao) and their warnings.
        from longcat_train.trainer import train

        train(cfg)
    except TrainingStopped as stopped:
        if rank == 0:
            print(f"longcat-train: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except Exception as err:
        if not _is_user_error(err):
            raise
        for line in _error_lines(err):
            print(f"longcat-train: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"longcat-train: interrupted; {resume_hint(cfg)}", file=sys.stderr)
        return 130
    return 0


def resume_hint(cfg: TrainConfig | None) -> str:
    """The command that continues an interrupted run: ``--resume latest`` once its output folder holds
    what a resume reads (a checkpoint or the saved config), else the same command again."""
    if (
        cfg is None
        or not (Path(cfg.output_dir) / CONFIG_FILE).is_file()
        and not resume_candidates(replace(cfg, resume="latest"))
    ):
        return "nothing was saved yet: run the same command again"
    return f"continue with: longcat-train --resume latest --output-dir {shlex.quote(cfg.output_dir)}"


def sample_main(argv: list[str] | None = None) -> int:
    """``longcat-sample``: parse flags, sample (or serve the page), print user errors as one line (exit 2)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    try:
        config = parse_sample_args(argv)
    except ConfigError as err:
        for line in _error_lines(err):
            print(f"longcat-sample: error: {line}", file=sys.stderr)
        return 2
    # After parsing, as in train_main: --help answers without the model stack's imports.
    from tqdm.contrib.logging import logging_redirect_tqdm

    from longcat_train.sampler import run_sample
    from longcat_train.sampling import SampleInputError

    try:
        if config.serve:
            from longcat_train.webui import serve_sampler

            serve_sampler(config)
        else:
            with logging_redirect_tqdm():
                paths = run_sample(config)
            for path in paths:
                print(path)
    except (SampleInputError, ConfigError, FileNotFoundError) as err:
        print(f"longcat-sample: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
