"""What a training run reports as it goes: the progress bar, ``metrics.jsonl``, tensorboard and wandb."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm import tqdm

from longcat_train.config import TrainConfig
from longcat_train.parallel import Dist
from longcat_train.runs import METRICS_FILE

log = logging.getLogger(__name__)


class Metrics:
    """Progress bar, tensorboard, optional wandb and ``metrics.jsonl``; everything on rank 0 only."""

    def __init__(self, cfg: TrainConfig, d: Dist, start: int, total: int) -> None:
        self.active = d.main
        self.tb = self.wandb = None
        self.bar = tqdm(
            total=total, initial=start, disable=not (d.main and cfg.progress), unit="step", dynamic_ncols=True
        )
        if not self.active:
            return
        out = Path(cfg.output_dir)
        self.jsonl = open(out / METRICS_FILE, "a", encoding="utf-8")
        if cfg.report_to != "none":
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        if cfg.report_to == "wandb":
            try:
                import wandb
            except ImportError:
                log.warning("report_to wandb, but wandb is not installed: tensorboard only")
            else:
                self.wandb = wandb.init(
                    project=cfg.wandb_project, config=cfg.to_dict(), dir=str(out), resume="allow"
                )

    def log(self, step: int, values: dict[str, float], postfix: dict[str, str]) -> None:
        self.bar.update(1)
        if not self.active:
            return
        self.bar.set_postfix(postfix, refresh=False)
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(f"train/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.bar.close()
        if self.active:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()
            if self.wandb is not None:
                self.wandb.finish()
