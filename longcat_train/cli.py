"""Console scripts: ``longcat-train`` (train_main) and ``longcat-sample`` (sample_main)."""

from __future__ import annotations

import logging
import os
import sys


def _one_line(err: BaseException) -> str:
    # An error raised in a DataLoader worker arrives wrapped with the worker's traceback; its last line
    # is "module.ErrorType: message".
    lines = str(err).strip().splitlines() or [type(err).__name__]
    last = lines[-1]
    return last.split(": ", 1)[1] if len(lines) > 1 and ": " in last else last


def train_main(argv: list[str] | None = None) -> int:
    """``longcat-train``: parse flags (and --config), train, print user errors as one line (exit 2)."""
    rank = int(os.environ.get("RANK", 0))
    tag = f"[rank {rank}] " if "WORLD_SIZE" in os.environ else ""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s {tag}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from longcat_data.stream import ShardError
    from longcat_train.config import ConfigError, parse_args
    from longcat_train.trainer import train

    user_errors: tuple[type[BaseException], ...] = (ConfigError, ShardError, FileNotFoundError)
    try:
        train(parse_args(argv))
    except user_errors as err:
        print(f"longcat-train: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("longcat-train: interrupted; resume with --resume (from the last checkpoint)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
