"""SimpleTuner configs for ``longcat-train``: a ``config.json`` (bare or ``--``-prefixed keys) and its
``multidatabackend.json`` translated into ``TrainConfig`` values.

Keys that mean the same thing are declared on the TrainConfig fields (``simpletuner=``); values we only
approximate (optimizers, schedulers, attention kernels) are translated with a warning, and every key left
unused is logged by name, so nothing a user set is dropped silently.
"""

from __future__ import annotations

import json
import logging
import typing
from pathlib import Path
from typing import Any

from longcat_data.flags import ConfigError, coerce_text, simpletuner_keys
from longcat_train.architecture import ATTENTION_BACKENDS
from longcat_train.config import BASE_PRECISIONS, TrainConfig, choices_of

log = logging.getLogger(__name__)

SIMPLETUNER_MARKERS = frozenset(
    {"model_family", "model_type", "data_backend_config", "pretrained_model_name_or_path"}
)
# SimpleTuner key -> our field, for keys whose values mean the same thing (declared on the fields).
SIMPLETUNER_KEYS = simpletuner_keys(TrainConfig)
# Keys we read to check or translate, so they are not reported as ignored.
_SIMPLETUNER_HANDLED = {
    "model_family",
    "model_flavour",
    "model_type",
    "data_backend_config",
    "eval_dataset_id",
    "lr_scheduler",
    "optimizer",
    "report_to",
    "flow_use_uniform_schedule",
    "validation_using_datasets",
    "lora_type",
}
# SimpleTuner's mixed_precision -> ours: "no" trains in fp32; fp16 and fp8 have no counterpart here.
_SIMPLETUNER_PRECISIONS = {"bf16": "bf16", "no": "fp32", "fp32": "fp32"}
_APPROXIMATE_PRECISIONS = {"fp16": "bf16", "fp8": "bf16"}
LONGCAT_FLAVOURS = ("final",)
# Values meaning the same thing here; the approximations below them are taken with a warning.
_SIMPLETUNER_OPTIMIZERS = {
    "adamw": "adamw",
    "optimi-adamw": "adamw",
    "adamw8bit": "adamw8bit",
    "bnb-adamw8bit": "adamw8bit",
    "bnb-adamw-8bit": "adamw8bit",
}
_APPROXIMATE_OPTIMIZERS = {"adamw_bf16": "adamw", "adamw_schedulefree": "adamw"}
# Our warmup is always linear from 0 (lr_warmup_steps), so "_with_warmup" is the plain schedule.
_SIMPLETUNER_SCHEDULERS = {"constant": "constant", "constant_with_warmup": "constant", "cosine": "cosine"}
_APPROXIMATE_SCHEDULERS = {"cosine_with_restarts": "cosine"}


def is_simpletuner(values: dict[str, Any]) -> bool:
    keys = {k.lstrip("-") for k in values}
    return any(k.startswith("--") for k in values) or bool(keys & SIMPLETUNER_MARKERS)


def from_simpletuner(values: dict[str, Any], base_dir: str | Path = ".") -> dict[str, Any]:
    """TrainConfig keyword arguments from a SimpleTuner config.json dict (+ its multidatabackend.json).

    Keys sharing a meaning map directly; dataset entries become ``shards`` (training clips),
    ``validation_source`` (``eval_dataset_id``) and ``i2v`` (``is_i2v``). Every key left unused is
    logged by name, as are values we translate approximately.
    """
    st = {k.lstrip("-"): v for k, v in values.items()}
    if st.get("model_family", "longcat_video") != "longcat_video":
        raise ConfigError(
            f"SimpleTuner model_family = {st['model_family']!r}: longcat-train trains longcat_video only"
        )
    if st.get("model_type", "lora") != "lora":
        raise ConfigError(f"SimpleTuner model_type = {st['model_type']!r}: longcat-train trains LoRA only")
    if st.get("lora_type", "standard") != "standard":
        raise ConfigError(
            f"SimpleTuner lora_type = {st['lora_type']!r}: longcat-train trains standard (peft) LoRA only"
        )
    if st.get("model_flavour") not in (None, *LONGCAT_FLAVOURS):
        raise ConfigError(
            f"SimpleTuner model_flavour = {st['model_flavour']!r}: LongCat-Video has one flavour, "
            f"{', '.join(LONGCAT_FLAVOURS)} (image-to-video comes from is_i2v datasets)"
        )
    out: dict[str, Any] = {}
    for key, ours in SIMPLETUNER_KEYS.items():
        if key in st and st[key] is not None:
            out[ours] = _convert(ours, st[key])
    if "optimizer" in st:
        out["optimizer"] = _translate(
            "optimizer", st["optimizer"], _SIMPLETUNER_OPTIMIZERS, _APPROXIMATE_OPTIMIZERS, "adamw"
        )
    if "lr_scheduler" in st:
        out["lr_scheduler"] = _translate(
            "lr_scheduler", st["lr_scheduler"], _SIMPLETUNER_SCHEDULERS, _APPROXIMATE_SCHEDULERS, "constant"
        )
    if st.get("flow_use_uniform_schedule"):
        out["sigma_sampling"] = "uniform"
    if "report_to" in st:
        out["report_to"] = _translate(
            "report_to", st["report_to"], {c: c for c in choices_of("report_to")}, {}, "tensorboard"
        )
    if out.get("base_model_precision") not in (None, *BASE_PRECISIONS):
        log.warning(
            "SimpleTuner base_model_precision %r is not supported: using no_change",
            out["base_model_precision"],
        )
        out["base_model_precision"] = "no_change"
    if out.get("attention") not in (None, *ATTENTION_BACKENDS):
        log.warning("SimpleTuner attention_implementation %r: using sdpa", out["attention"])
        out["attention"] = "sdpa"
    if "mixed_precision" in out:
        out["mixed_precision"] = _translate(
            "mixed_precision",
            out["mixed_precision"],
            _SIMPLETUNER_PRECISIONS,
            _APPROXIMATE_PRECISIONS,
            None,
        )
    if out.get("resume") is not None and str(out["resume"]).lower() in ("latest", "true"):
        out["resume"] = "latest"

    if "data_backend_config" in st:
        out.update(_datasets(st, Path(base_dir)))
    elif "eval_dataset_id" in st:
        log.warning(
            "SimpleTuner eval_dataset_id %r ignored: no data_backend_config to find it in",
            st["eval_dataset_id"],
        )
    _validation_datasets(st, out)

    ignored = sorted(k for k in st if k not in SIMPLETUNER_KEYS and k not in _SIMPLETUNER_HANDLED)
    if ignored:
        log.warning("SimpleTuner keys not used by longcat-train: %s", ", ".join(ignored))
    return out


def _convert(name: str, value: Any) -> Any:
    """SimpleTuner configs mirror its command line, so numbers and booleans often come as text."""
    if name == "gradient_checkpointing" and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return coerce_text(value, typing.get_type_hints(TrainConfig)[name])


def _translate(
    key: str, value: Any, same: dict[str, str], approximate: dict[str, str], fallback: str | None
) -> str:
    """``value`` mapped through ``same`` (silently), ``approximate`` (with a warning), else ``fallback``
    (a warning) or, without one, a ConfigError naming the values accepted."""
    if value in same:
        return same[value]
    if value in approximate:
        log.warning(
            "SimpleTuner %s %r: longcat-train has no such setting; using %s", key, value, approximate[value]
        )
        return approximate[value]
    if fallback is None:
        known = ", ".join([*same, *approximate])
        raise ConfigError(f"SimpleTuner {key} = {value!r}: must be one of {known}")
    log.warning("SimpleTuner %s %r has no counterpart: using %s", key, value, fallback)
    return fallback


def _validation_datasets(st: dict[str, Any], out: dict[str, Any]) -> None:
    """``validation_using_datasets``: validation here always samples start frames and prompts of a
    dataset (``eval_dataset_id``); say so when the setting asks for something else or has no dataset."""
    using = st.get("validation_using_datasets")
    if using is None:
        return
    if str(using).lower() in ("false", "0", "no"):
        log.warning(
            "SimpleTuner validation_using_datasets = false: longcat-train validates only on dataset pairs "
            "(start frame + prompt of eval_dataset_id)%s",
            "" if out.get("validation_source") else "; no validation",
        )
    elif not out.get("validation_source"):
        log.warning(
            "SimpleTuner validation_using_datasets = true without a usable eval_dataset_id: no validation "
            "(set eval_dataset_id to a dataset of start frames + captions)"
        )


def _datasets(st: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Translate the multidatabackend.json entries."""
    path = Path(st["data_backend_config"]).expanduser()
    if not path.is_absolute() and not path.is_file():
        path = base_dir / path
    if not path.is_file():
        raise ConfigError(
            f"SimpleTuner data_backend_config {st['data_backend_config']} not found (also tried {path})"
        )
    backends = json.loads(path.read_text(encoding="utf-8"))
    out: dict[str, Any] = {}
    shards: list[str] = []
    eval_id = st.get("eval_dataset_id")
    found_eval = False
    for entry in backends:
        name = entry.get("id", "?")
        if entry.get("disabled") or entry.get("disable"):
            log.info("dataset %s is disabled: skipped", name)
            continue
        location = _dataset_location(entry)
        if name == eval_id:
            found_eval = True
            out["validation_source"] = location
        elif entry.get("dataset_type") == "conditioning":
            log.info(
                "dataset %s (conditioning): start frames come from the shards' cond.safetensors, not used",
                name,
            )
        elif entry.get("dataset_type", "video") in ("video", "image") and location is not None:
            _check_prepped(name, location)
            shards.append(location)
            if "is_i2v" in entry:
                out["i2v"] = bool(entry["is_i2v"])
            unused = sorted(
                set(entry)
                - {
                    "id",
                    "type",
                    "dataset_type",
                    "is_i2v",
                    "instance_data_dir",
                    "dataset_name",
                    "conditioning_data",
                    "disabled",
                }
            )
            if unused:
                log.info(
                    "dataset %s: keys used by longcat-prep, not the trainer: %s", name, ", ".join(unused)
                )
        else:
            log.warning("dataset %s (type %s) not used", name, entry.get("type"))
    if shards:
        out["shards"] = shards
    if eval_id is not None and not found_eval:
        log.warning("SimpleTuner eval_dataset_id %r is not in %s: no validation source", eval_id, path)
    return out


def _check_prepped(name: str, location: str) -> None:
    """A local dataset folder must hold shards: SimpleTuner's own datasets are videos, which
    ``longcat-prep shard --simpletuner`` turns into shards and a config pointing at them."""
    path = Path(location).expanduser()
    if path.is_dir() and not (path / "manifest.json").is_file() and not any(path.glob("*.tar")):
        raise ConfigError(
            f"SimpleTuner dataset {name}: {location} holds no shards; prep the datasets first: "
            "longcat-prep shard --simpletuner config.json --output-dir OUT, then train with "
            "longcat-train --config OUT/config.json"
        )


def _dataset_location(entry: dict[str, Any]) -> str | None:
    if entry.get("type") == "huggingface" and entry.get("dataset_name"):
        return f"hf://datasets/{entry['dataset_name']}"
    return entry.get("instance_data_dir")
