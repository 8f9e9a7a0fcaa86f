"""``longcat-lora``: inspect a LoRA file or convert it between layouts; parses flags and dispatches.

Each subcommand is a config dataclass (``longcat_train.lora_config``) and a function of
``longcat_train.lora_tool``, imported after the flags are parsed so ``--help`` loads no torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

from longcat_data.flags import ConfigError, add_commands, parse
from longcat_train.lora_config import ConvertLoraConfig, InspectLoraConfig


def _inspect(cfg: InspectLoraConfig) -> None:
    from longcat_train.lora_tool import run_inspect

    run_inspect(cfg)


def _convert(cfg: ConvertLoraConfig) -> None:
    from longcat_train.lora_tool import run_convert

    for note in run_convert(cfg):
        print(f"longcat-lora convert: warning: {note}", file=sys.stderr)


INSPECT_EPILOG = """\
examples:
  longcat-lora inspect run/lora.safetensors
  longcat-lora inspect some_lora.safetensors --model tiny     # does it fit the tiny DiT's shapes?
"""

CONVERT_EPILOG = """\
examples:
  longcat-lora convert run/lora.safetensors lora_comfyui.safetensors --to comfyui
  longcat-lora convert kohya_lora.safetensors lora.safetensors --to peft --alpha rank
"""

COMMANDS: dict[str, tuple[type, Callable[[Any], None], str, str]] = {
    "inspect": (
        InspectLoraConfig,
        _inspect,
        "layout, modules, ranks, alpha, split modules, the model it fits, what ComfyUI would drop",
        INSPECT_EPILOG,
    ),
    "convert": (
        ConvertLoraConfig,
        _convert,
        "rewrite a LoRA in another layout (peft, official, comfyui)",
        CONVERT_EPILOG,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longcat-lora",
        description="LongCat-Video LoRA files: ours, the official one, ComfyUI-WanVideoWrapper's, other trainers'.",
        epilog="e.g. longcat-lora convert out/lora.safetensors lora_comfyui.safetensors --to comfyui",
    )
    add_commands(parser, COMMANDS)
    return parser


def _is_user_error(err: BaseException) -> bool:
    # Imported once an error is raised: --help loads none of the modules defining them.
    from longcat_data.files import NotWritable
    from longcat_train.lora_formats import LoraFormatError

    return isinstance(err, ConfigError | LoraFormatError | NotWritable | FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cls, run, _, _ = COMMANDS[args.command]
    try:
        run(parse(cls, args))
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        if not _is_user_error(err):
            raise
        for line in str(err).strip().splitlines() or [type(err).__name__]:
            print(f"longcat-lora {args.command}: error: {line}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
