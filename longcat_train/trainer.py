"""The LoRA training loop: named parts assembled in ``train``, one short ``train_step``.

Parts, in the order ``train`` builds them: process group (``parallel``), shards and their checks
(``longcat_data.stream``), text embeddings the shards lack (encoded once, encoder freed), the DiT with its
LoRA (``lora``), placement (device / block swap / DDP / FSDP2), AdamW, the lr schedule (a pure function
of the step), the data loader positioned at the resume point, metrics, validation, checkpoints.

Exact resume (``longcat_train.checkpoints``): the loader restarted at a checkpoint's stream position yields
exactly the batches the uninterrupted run would have, and every RNG continues where it was, so on the CPU
a run stopped at step k and resumed reproduces the uninterrupted losses bit for bit.
"""

from __future__ import annotations

import gc
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.contrib.logging import logging_redirect_tqdm

from longcat_data.buckets import latent_frames
from longcat_data.manifest import check_shard_folders, find_manifest
from longcat_data.stream import (
    ShardStream,
    StreamConfig,
    TextCache,
    captions_without_embeds,
    expand_shard_spec,
    make_loader,
    write_text_cache,
)
from longcat_train import conditioning, flow, parallel
from longcat_train.checkpoints import (
    CheckpointError,
    TrainState,
    base_lora_digests,
    check_resumable,
    export_lora,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from longcat_train.config import ConfigError, TrainConfig, save_config
from longcat_train.lora_formats import check_file
from longcat_train.lora_spec import parse_lora_spec
from longcat_train.loss_curve import write_loss_curve
from longcat_train.metrics import Metrics
from longcat_train.parallel import Dist
from longcat_train.planning import device_gpu, largest_bucket, resolve_auto, with_saved_autos
from longcat_train.runs import (
    CHECKPOINTS,
    COMFYUI_LORA_FILE,
    CONFIG_FILE,
    LORA_FILE,
    OFFICIAL_LORA_FILE,
    clear_run,
    drop_after,
    read_saved_config,
    resume_candidates,
    used_output,
)
from longcat_train.stopping import StopSignals, TrainingStopped
from longcat_train.techniques import apply_techniques, check_techniques, load_device
from longcat_train.validation import Validation

log = logging.getLogger(__name__)

TEXT_CACHE = "text_embeds.safetensors"


# ---------------------------------------------------------------- schedule and optimizer


def lr_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based): linear warmup to 1,
    then constant, or cosine down to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    params: list[nn.Parameter], cfg: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    kwargs = dict(
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
    )
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            log.warning("optimizer adamw8bit needs bitsandbytes, which is not installed: using torch AdamW")
        else:
            return bitsandbytes.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, fused=device.type == "cuda", **kwargs)


# ---------------------------------------------------------------- model


def weight_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """bf16 base weights on GPU (the official dtype); fp32 on CPU, where bf16 matmuls are slow and inexact."""
    return torch.bfloat16 if device.type == "cuda" and cfg.mixed_precision == "bf16" else torch.float32


# ---------------------------------------------------------------- loss


def training_loss(
    model: nn.Module,
    batch: dict,
    cfg: TrainConfig,
    generator: torch.Generator,
    empty_embeds: torch.Tensor | None,
    device: torch.device,
    task: str | None = None,
) -> torch.Tensor:
    """Flow-matching loss of one batch as ``task`` (default: the config's one task): predict x0 - eps."""
    (task,) = [task] if task is not None else cfg.tasks
    x0 = batch["latents"].to(device, torch.float32, non_blocking=True)
    cond = conditioning.condition_latents(task, {**batch, "latents": x0}, cfg.cond_frames)
    cond = cond.to(device, torch.float32, non_blocking=True) if cond is not None else None
    embeds = batch["embeds"].to(device, non_blocking=True)
    mask = batch["embeds_mask"].to(device, non_blocking=True)
    if empty_embeds is not None:
        embeds, mask = flow.drop_captions(
            embeds, mask, empty_embeds.to(device), cfg.caption_dropout, generator
        )
    x_t, timestep, target, num_cond = flow.noisy_inputs(
        x0,
        cond,
        mode=cfg.sigma_sampling,
        logit_mean=cfg.logit_mean,
        logit_std=cfg.logit_std,
        shift=cfg.flow_schedule_shift,
        generator=generator,
    )
    pred = model(
        hidden_states=x_t,
        timestep=timestep,
        encoder_hidden_states=embeds,
        encoder_attention_mask=mask,
        num_cond_latents=num_cond,
    )
    return flow.flow_loss(pred, target, num_cond)


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    updated: bool
    data_wait: float  # seconds spent waiting for batches
    samples: int
    keys: list[str] = field(default_factory=list)  # this rank's samples of the step
    non_finite_keys: list[str] = field(default_factory=list)  # of micro-batches whose own loss was not finite


def train_step(
    train_model: nn.Module,
    batches: Iterator[dict],
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    cfg: TrainConfig,
    generator: torch.Generator,
    empty_embeds: torch.Tensor | None,
    d: Dist,
) -> StepResult:
    """Accumulate gradients over micro-batches, clip, and update unless the loss or gradient is not finite."""
    autocast = torch.autocast(
        "cuda", torch.bfloat16, enabled=d.device.type == "cuda" and cfg.mixed_precision == "bf16"
    )
    total, waited, samples = torch.zeros((), device=d.device), 0.0, 0
    micro_losses: list[tuple[list[str], torch.Tensor]] = []
    for micro in range(cfg.gradient_accumulation_steps):
        start = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - start
        size = batch["latents"].shape[0]
        samples += size
        # Each sample draws its task; a model call has one condition length, so one call per task.
        groups = conditioning.task_groups(conditioning.draw_tasks(cfg.tasks, size, generator))
        for group, (task, indices) in enumerate(groups):
            piece, share = conditioning.sub_batch(batch, indices), len(indices) / size
            last = micro == cfg.gradient_accumulation_steps - 1 and group == len(groups) - 1
            with parallel.grad_sync(train_model, last), autocast:
                loss = training_loss(train_model, piece, cfg, generator, empty_embeds, d.device, task)
            (loss * share / cfg.gradient_accumulation_steps).backward()
            total += loss.detach() * share
            micro_losses.append((list(piece.get("keys", [])), loss.detach()))
    loss = parallel.mean_across(total / cfg.gradient_accumulation_steps, d)
    grad_norm = parallel.total_grad_norm(params, cfg.max_grad_norm)
    # Every rank sees the same reduced loss and gradients, so all take the same branch.
    updated = bool(torch.isfinite(loss) & torch.isfinite(grad_norm))
    if updated:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    keys = [k for batch_keys, _ in micro_losses for k in batch_keys]
    # Looked at only when the step failed: reading each micro-batch's loss waits for the device.
    non_finite = [] if updated else [k for ks, v in micro_losses if not torch.isfinite(v) for k in ks]
    return StepResult(loss.item(), grad_norm.item(), updated, waited, samples, keys, non_finite)


# ---------------------------------------------------------------- text embeddings


def prepare_text(
    cfg: TrainConfig, d: Dist, urls: list[str], shards_lack_text: bool, prompts: list[str]
) -> TextCache | None:
    """Encode what the shards do not carry (captions without ``t5.safetensors``, the empty prompt, the
    validation prompts) once, on rank 0, into ``output_dir/text_embeds.safetensors``; the text encoder
    is freed right after. Every rank then reads the file. Reused as is when it already holds them all.
    The arguments are the same on every rank, so all ranks agree on whether to wait for rank 0."""
    if not (shards_lack_text or prompts):
        return None
    path = Path(cfg.output_dir) / TEXT_CACHE
    if d.main:
        captions = captions_without_embeds(urls) if shards_lack_text else []
        needed = list(dict.fromkeys([*captions, *prompts]))
        cache = TextCache(path) if path.is_file() else None
        missing = needed if cache is None else [t for t in needed if not cache.has(t)]
        if missing:
            existing = {t: cache[t] for t in needed if t not in missing} if cache is not None else {}
            write_text_cache(path, {**existing, **encode_texts(cfg.model, missing, d.device)})
    parallel.barrier(d)
    return TextCache(path)


def encode_texts(model: str, texts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    from longcat_data.encode import default_dtype, encode_text, load_text_encoder

    log.info("encoding %d caption(s)/prompt(s) with the text encoder of %s", len(texts), model)
    tokenizer, encoder = load_text_encoder(model, device=device, dtype=default_dtype(device))
    out: dict[str, torch.Tensor] = {}
    for i in range(0, len(texts), 8):
        chunk = texts[i : i + 8]
        out.update(zip(chunk, (e.cpu() for e in encode_text(tokenizer, encoder, chunk)), strict=True))
    del tokenizer, encoder
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------- the run


def build_loader(
    cfg: TrainConfig, d: Dist, urls: list[str], encoders: dict, start_batch: int, text_cache: str | None
) -> Iterator[dict]:
    """This rank's batches from micro-batch ``start_batch`` on (0 for a fresh run)."""
    stream_cfg = StreamConfig(
        batch_size=cfg.train_batch_size,
        seed=cfg.seed,
        rank=d.rank,
        world_size=d.world_size,
        resampled=cfg.resampled,
        shuffle_buffer=cfg.shuffle_buffer,
        need_cond=conditioning.needs_start_frame(cfg.tasks),
        max_latent_frames=latent_frames(cfg.frames),
        min_latent_frames=conditioning.min_latent_frames(cfg.tasks, cfg.cond_frames),
        encoders=encoders,
    )
    stream = ShardStream(urls, stream_cfg, start_batch=start_batch, text_cache=text_cache)
    return iter(make_loader(stream, cfg.num_workers, cfg.pin_memory and d.device.type == "cuda"))


def seed_rngs(seed: int) -> None:
    """The process-wide generators (LoRA dropout draws from torch's) start from the run's seed."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@dataclass
class TrainResult:
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss (mean over ranks)
    lora_path: Path | None = None
    checkpoint: Path | None = None
    skipped_steps: int = 0
    corrupt_samples: int = 0


def shard_checks(cfg: TrainConfig) -> tuple[list[str], dict | None, dict]:
    """Shard URLs, the manifest (None for remote shards without one) and the model's encoder ids;
    ShardError when the shards were made for other encoders or another frame count. Fills the
    frames and validation settings left unset from the manifest (``TrainConfig.take_shard_settings``)."""
    from longcat_data.encode import encoder_ids

    if not cfg.shards:
        raise ConfigError(
            "no shards: pass --shards DIR|PATTERN|hf://datasets/user/name (made by longcat-prep shard)"
        )
    urls = expand_shard_spec(cfg.shards, allow_missing=cfg.allow_missing_shards)
    manifest = find_manifest(urls)
    encoders = encoder_ids(cfg.model)
    cfg.take_shard_settings(manifest)
    cfg.validate()  # the rules between frames and the rest, now that frames are known
    folders = check_shard_folders(
        urls, encoders=encoders, frames=cfg.frames, allow_missing=cfg.allow_missing_shards
    )
    for directory, folder_manifest in folders:
        conditioning.check_clip_lengths(cfg.tasks, cfg.cond_frames, folder_manifest, directory)
    return urls, manifest, encoders


def check_frozen_loras(cfg: TrainConfig) -> None:
    """ConfigError unless every ``base_lora`` and ``validation_lora`` names a LoRA file (its header is
    read) other than the one this run trains (its exports and checkpoints, rewritten and pruned)."""
    out = Path(cfg.output_dir).resolve()
    trained = {out / LORA_FILE, out / OFFICIAL_LORA_FILE, out / COMFYUI_LORA_FILE}
    for setting in ("base_lora", "validation_lora", "validation_distill_lora"):
        specs = getattr(cfg, setting)
        for path in (
            parse_lora_spec(spec).path for spec in ([specs] if isinstance(specs, str) else specs or [])
        ):
            if not Path(path).is_file():
                raise ConfigError(f"{setting} {path}: no such LoRA file")
            real = Path(path).resolve()
            if real in trained or (out / CHECKPOINTS) in real.parents:
                raise ConfigError(
                    f"{setting} {path} is the LoRA this run trains: one LoRA trains at a time; copy it "
                    "elsewhere to train a new one on top of it"
                )
            try:
                check_file(path)
            except ValueError as err:
                raise ConfigError(f"{setting} {err}") from None


def resolve_defaults(
    cfg: TrainConfig, d: Dist, total_steps: int, area: tuple[int, int] | None
) -> tuple[TrainConfig, tuple[str, ...] | None]:
    """``cfg`` with its autos resolved for this device and run (``planning.resolve_auto``, logged once),
    checked again by the rules, and the per-block checkpointing its memory budget plans (None: none)."""
    resolved = resolve_auto(cfg, device_gpu(d.device), steps=total_steps, area=area)
    if resolved.problem:
        raise ConfigError(resolved.problem)
    for line in (resolved.line, resolved.plan):
        if line and d.main:
            log.info("%s", line)
    if resolved.warning and d.main:
        log.warning("%s", resolved.warning)
    check_techniques(resolved.cfg)
    return resolved.cfg, resolved.checkpointing


def train(cfg: TrainConfig) -> TrainResult:
    cfg.validate()
    check_techniques(cfg)
    check_frozen_loras(cfg)
    d = parallel.init_distributed()
    try:
        return _train(cfg, d)
    finally:
        parallel.shutdown(d)


def _train(cfg: TrainConfig, d: Dist) -> TrainResult:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    candidates = resume_candidates(cfg)
    if cfg.resume is not None and not candidates:
        log.info("resume: no checkpoint in %s yet, starting from scratch", out)
    resumed = load_checkpoint(candidates, d) if candidates else None
    overwritten = used_output(cfg, resuming=cfg.resume is not None)
    if resumed is not None:
        cfg = with_saved_autos(cfg, read_saved_config(resumed.path))
        check_resumable(resumed.path, cfg, d)

    urls, manifest, encoders = shard_checks(cfg)
    epoch_samples = cfg.epoch_samples or (sum(s["samples"] for s in manifest["shards"]) if manifest else 0)
    per_step = cfg.train_batch_size * cfg.gradient_accumulation_steps * d.world_size
    total_steps = cfg.total_steps(epoch_samples, d.world_size)
    if total_steps <= 0:
        raise ConfigError(
            "num_train_epochs needs the sample count: set epoch_samples (no manifest found) or max_train_steps"
        )

    cfg, checkpointing = resolve_defaults(cfg, d, total_steps, largest_bucket(manifest, cfg.frames))
    validation = Validation(cfg, d, weight_dtype(cfg, d.device))
    # Only now, with every check passed, does the folder change.
    if d.main:
        clear_run(out, overwritten)
        if cfg.resume is not None:
            drop_after(out, resumed.state.step if resumed is not None else 0)
    parallel.barrier(d)
    shards_lack_text = manifest is not None and manifest.get("settings", {}).get("text_embeds") is False
    prompts = ([""] if cfg.caption_dropout > 0 else []) + validation.prompts
    text = prepare_text(cfg, d, urls, shards_lack_text, prompts)
    empty_embeds = text[""] if cfg.caption_dropout > 0 else None

    from longcat_train.loading import load_dit

    if resumed is not None:
        state = resumed.state
    else:  # what the run trains on top of, checked again on resume
        digests = base_lora_digests([parse_lora_spec(spec).path for spec in cfg.base_lora])
        state = TrainState(world_size=d.world_size, base_lora_sha256=digests)
    base = load_dit(cfg.model, dtype=weight_dtype(cfg, d.device), device=load_device(cfg, d.device))
    train_model, model = apply_techniques(
        base, cfg, d, lora_weights=resumed.lora if resumed else None, checkpointing=checkpointing
    )
    validation.attach(train_model)
    params = [p for p in train_model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg, d.device)
    if resumed is not None:
        parallel.load_optimizer_state(train_model, optimizer, resumed.optimizer)
    if d.main:
        save_config(cfg, out / CONFIG_FILE)

    batches = build_loader(cfg, d, urls, encoders, state.batches, text.path if shards_lack_text else None)
    generator = torch.Generator(d.device).manual_seed(cfg.seed + d.rank)
    seed_rngs(cfg.seed + d.rank)
    if resumed is not None:
        set_rng_state(resumed.rng, generator)  # last, so nothing after it draws before the first step
        resumed = None  # the optimizer state and LoRA weights are in the model now
    train_model.train()
    result = TrainResult(skipped_steps=state.skipped_steps)
    corrupt: dict[int, int] = {}
    log.info(
        "training %d steps of %d samples (%d per GPU x %d accumulation x %d GPUs) from step %d",
        total_steps,
        per_step,
        cfg.train_batch_size,
        cfg.gradient_accumulation_steps,
        d.world_size,
        state.step,
    )
    metrics = Metrics(cfg, d, state.step, total_steps)  # its bar starts after the lines above

    def counted(it: Iterator[dict]) -> Iterator[dict]:
        for batch in it:
            state.batches += 1
            corrupt[batch["worker"]] = batch["skipped"]
            yield batch

    def checkpoint() -> Path:
        return save_checkpoint(cfg, state, train_model, model, optimizer, generator, d)

    def checkpoint_or_warn() -> Path | None:
        """A checkpoint the run can do without: a refused write is a warning, training goes on."""
        try:
            return checkpoint()
        except CheckpointError as err:
            log.warning("%s; training goes on", err)
            return None

    data = counted(batches)
    start_step = state.step
    # Validation's bars and log lines print between the training bar's updates without tearing it.
    with StopSignals() as stop, logging_redirect_tqdm():
        try:
            while state.step < total_steps:
                start = time.perf_counter()
                for group in optimizer.param_groups:
                    group["lr"] = cfg.learning_rate * lr_factor(
                        state.step, warmup=cfg.lr_warmup_steps, total=total_steps, schedule=cfg.lr_scheduler
                    )
                step = train_step(train_model, data, optimizer, params, cfg, generator, empty_embeds, d)
                state.step += 1
                state.samples += step.samples * d.world_size
                if not step.updated:
                    state.skipped_steps += 1
                    _warn_skipped(state, step)
                result.losses[state.step] = step.loss
                seconds = time.perf_counter() - start
                metrics.log(
                    state.step,
                    _step_values(step, optimizer, seconds, state, epoch_samples, d),
                    _postfix(step, optimizer, seconds, d),
                )
                if state.step == total_steps:
                    break
                # A collective at every step boundary: all ranks stop at the same step.
                signum = parallel.agree(stop.signum, d, op="max")
                if signum:
                    raise TrainingStopped(state.step, checkpoint(), signum, cfg.output_dir)
                if cfg.checkpointing_steps and state.step % cfg.checkpointing_steps == 0:
                    result.checkpoint = checkpoint_or_warn() or result.checkpoint
                if validation.due(state.step, total_steps):
                    validation(train_model, state.step, text, metrics.tb)
            # The LoRA is on disk before the last validation, which may take long or fail.
            if state.step > start_step:
                result.checkpoint = checkpoint_or_warn() or result.checkpoint
            export_lora(train_model, model, out, d)
            if validation.due(state.step, total_steps):
                if parallel.agree(stop.signum, d, op="max"):
                    log.warning("stop requested after the last step: final validation skipped")
                else:
                    validation(train_model, state.step, text, metrics.tb)
        finally:
            metrics.close()

    result.lora_path = out / LORA_FILE
    result.skipped_steps = state.skipped_steps
    result.corrupt_samples = sum(corrupt.values())
    if result.corrupt_samples:
        log.warning("skipped %d corrupt sample(s) or shard read(s) in this run", result.corrupt_samples)
    if d.main:
        try:
            curve = write_loss_curve(out)
            if curve is not None:
                log.info("loss per step: %s", curve)
        except OSError as err:  # a chart is worth less than the run's exit status
            log.warning("loss curve not written: %s", err)
        log.info(
            "done: LoRA in %s, %s (official) and %s (ComfyUI-WanVideoWrapper)",
            out / LORA_FILE,
            out / OFFICIAL_LORA_FILE,
            out / COMFYUI_LORA_FILE,
        )
    return result


def _warn_skipped(state: TrainState, step: StepResult) -> None:
    if step.non_finite_keys:
        culprits = f"non-finite loss on sample(s) {', '.join(step.non_finite_keys)}"
    else:
        culprits = f"this rank's samples: {', '.join(step.keys) or '?'}"
    log.warning(
        "step %d: loss %s, grad norm %s: update skipped (%d so far); %s",
        state.step,
        step.loss,
        step.grad_norm,
        state.skipped_steps,
        culprits,
    )


def _step_values(
    step: StepResult,
    optimizer: torch.optim.Optimizer,
    seconds: float,
    state: TrainState,
    epoch_samples: int,
    d: Dist,
) -> dict[str, float]:
    values = {
        "loss": step.loss,
        "lr": optimizer.param_groups[0]["lr"],
        "grad_norm": step.grad_norm,
        "step_seconds": seconds,
        "data_wait_seconds": step.data_wait,
        "samples_per_second": step.samples * d.world_size / seconds,
    }
    if epoch_samples:
        values["epoch"] = state.samples / epoch_samples
    if d.device.type == "cuda":
        values["gpu_memory_gib"] = torch.cuda.max_memory_allocated(d.device) / 2**30
    return values


def _postfix(step: StepResult, optimizer: torch.optim.Optimizer, seconds: float, d: Dist) -> dict[str, str]:
    postfix = {
        "loss": f"{step.loss:.4f}",
        "lr": f"{optimizer.param_groups[0]['lr']:.2e}",
        "samples/s": f"{step.samples * d.world_size / seconds:.2f}",
        "wait": f"{100 * step.data_wait / seconds:.0f}%",
    }
    if d.device.type == "cuda":
        postfix["mem"] = f"{torch.cuda.max_memory_allocated(d.device) / 2**30:.1f}G"
    return postfix
