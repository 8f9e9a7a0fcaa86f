"""Image-to-video sampling, video files, and validation during training.

The sampler follows the official LongCat-Video I2V pipeline: the start image, fitted to the nearest
aspect bucket, is VAE-encoded alone and normalised; it is latent frame 0 of every DiT input (timestep 0,
``num_cond_latents=1``), so the first frame never drifts. The remaining latent frames start as noise
and follow flow-match Euler steps over ``linspace(1, 0.001, steps)`` sigmas shifted by ``shift`` (12 at
480p). With guidance > 1 the conditional and unconditional (empty prompt) passes run as one batch and
are combined with CFG-Zero*. The DiT predicts ``x0 - eps``; the flow velocity ``dx/dsigma`` is its
negative.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from peft.tuners.lora import LoraLayer
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError
from torch.distributed.fsdp import FSDPModule
from tqdm.auto import tqdm
from webdataset.handlers import reraise_exception

from longcat_data.buckets import (
    VAE_TEMPORAL_STRIDE,
    InputTooSmall,
    aspect_distance,
    choose_bucket,
    cover_scale,
    latent_frames,
    make_buckets,
)
from longcat_data.encode import (
    DEFAULT_MODEL,
    decode_latents,
    default_dtype,
    encode_image,
    encode_text,
    load_text_encoder,
    load_vae,
    pad_text_embeds,
)
from longcat_data.shards import CAPTION, COND_IMAGE
from longcat_data.stream import expand_shard_spec, read_tars
from longcat_data.video import IMAGE_EXTENSIONS, resize_center_crop
from longcat_train.attention import warn_if_unavailable
from longcat_train.config import (
    DEFAULT_AREA,
    DEFAULT_FPS,
    DEFAULT_FRAMES,
    DEFAULT_GUIDANCE,
    DEFAULT_SHIFT,
    DEFAULT_STEPS,
    SampleConfig,
)
from longcat_train.loading import load_dit
from longcat_train.lora import ADAPTER as LORA_ADAPTER
from longcat_train.lora import load_lora
from longcat_train.offload import BlockSwap, apply_block_swap

log = logging.getLogger(__name__)

# Sampling may enlarge a start image a little (unlike data prep, which never invents pixels), but past
# 2x most of the condition frame would be interpolation and the video inherits the blur.
MAX_UPSCALE = 2.0
# Cropping a start image to its bucket may drop at most half of it; beyond that the video would start
# from a different picture than the one the user chose.
MIN_KEPT_FRACTION = 0.5

StepCallback = Callable[[int, int], None]


class SampleInputError(ValueError):
    """Input the sampler refuses; the message is one line a user can act on."""


# ---------------------------------------------------------------- schedule and guidance


def flow_scheduler(steps: int, shift: float = DEFAULT_SHIFT) -> FlowMatchEulerDiscreteScheduler:
    """Flow-match Euler over ``linspace(1, 0.001, steps)`` shifted: s' = shift*s / (1 + (shift-1)*s).

    ``scheduler.sigmas`` holds the ``steps`` shifted sigmas and a final 0; ``scheduler.timesteps`` is
    1000 * sigma. Built fresh per video because the scheduler counts its own steps.
    """
    if steps < 1:
        raise SampleInputError(f"steps must be at least 1, got {steps}")
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    # torch's float32 linspace, as upstream builds it (numpy's differs in the last bit for some steps).
    scheduler.set_timesteps(steps, sigmas=torch.linspace(1.0, 0.001, steps).numpy())
    return scheduler


def cfg_zero_star(cond: torch.Tensor, uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """CFG-Zero*: ``st * u + g * (c - st * u)`` with ``st = <c, u> / ||u||^2`` per sample.

    ``st`` rescales the unconditional prediction onto the conditional one before guiding, which keeps
    early, inaccurate steps from overshooting. Computed over the whole prediction, condition frame
    included, as upstream does.
    """
    batch = cond.shape[0]
    c = cond.reshape(batch, -1).float()
    u = uncond.reshape(batch, -1).float()
    st = (c * u).sum(dim=1) / (u.square().sum(dim=1) + 1e-8)
    st = st.view(batch, *([1] * (cond.ndim - 1)))
    return st * uncond + guidance * (cond - st * uncond)


def round_frames(frames: int) -> int:
    """A 4k+1 frame count (the VAE's temporal stride): others are rounded to the nearest, with a warning."""
    if frames < 1 + VAE_TEMPORAL_STRIDE:
        raise SampleInputError(f"frames must be at least {1 + VAE_TEMPORAL_STRIDE}, got {frames}")
    k = max(1, round((frames - 1) / VAE_TEMPORAL_STRIDE))
    rounded = 1 + VAE_TEMPORAL_STRIDE * k
    if rounded != frames:
        log.warning("frames must be 4k+1 for the VAE: using %d instead of %d", rounded, frames)
    return rounded


# ---------------------------------------------------------------- start image


def load_image(path: str | Path) -> np.ndarray:
    """A start image as uint8 [H, W, 3] RGB, upright (EXIF orientation applied)."""
    path = Path(path)
    if not path.is_file():
        raise SampleInputError(f"start image not found: {path}")
    return decode_image(path.read_bytes(), name=str(path))


def decode_image(data: bytes, name: str = "upload") -> np.ndarray:
    """Image file bytes (PNG, JPEG, WebP, ...) as uint8 [H, W, 3] RGB, upright."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            return np.asarray(ImageOps.exif_transpose(opened).convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise SampleInputError(f"{name} is not an image that can be read (PNG, JPEG or WebP expected)") from err


def fit_start_image(image: np.ndarray, area: tuple[int, int] = DEFAULT_AREA) -> np.ndarray:
    """Resize and centre-crop a start image to the bucket of ``area`` nearest its aspect ratio."""
    h, w = image.shape[:2]
    buckets = make_buckets(area)
    try:
        bucket = choose_bucket(h, w, buckets, allow_upscale=True)
    except InputTooSmall as err:  # raised only for sizes that are not positive
        raise SampleInputError(f"start image: {err}") from err
    kept = math.exp(-aspect_distance(h, w, bucket))
    if kept < MIN_KEPT_FRACTION:
        raise SampleInputError(
            f"start image {w}x{h} (WxH) has an extreme aspect ratio {max(w, h) / min(w, h):.1f}:1; its nearest "
            f"bucket {bucket[1]}x{bucket[0]} would crop away {1 - kept:.0%} of it. Crop it to at most "
            f"{max(bucket) / min(bucket):.0f}:1 first"
        )
    scale = cover_scale(h, w, bucket)
    if scale > MAX_UPSCALE:
        least_w, least_h = math.ceil(bucket[1] / MAX_UPSCALE), math.ceil(bucket[0] / MAX_UPSCALE)
        raise SampleInputError(
            f"start image {w}x{h} (WxH) is too small for --size {area[0]}x{area[1]}: its bucket {bucket[1]}x{bucket[0]} "
            f"would need {scale:.1f}x upscaling (at most {MAX_UPSCALE:g}x, so at least {least_w}x{least_h}). "
            f"Use a larger image or a smaller --size"
        )
    if scale > 1.0:
        log.info("start image %dx%d upscaled %.2fx to its bucket %dx%d", w, h, scale, bucket[1], bucket[0])
    return resize_center_crop(image, *bucket)[0]


# ---------------------------------------------------------------- denoising


def _model_device(model: torch.nn.Module) -> torch.device:
    # The embedders stay on the compute device even when block swap parks the blocks on the CPU.
    return next(model.parameters()).device


def initial_noise(shape: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
    """fp32 noise [B, *shape]; sample i comes from its own CPU generator seeded ``seeds[i]``.

    Per-sample CPU generators make a video depend only on its own seed: the same on any device and
    whatever else shares its batch.
    """
    noise = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.stack(noise)


@torch.no_grad()
def denoise(
    model: torch.nn.Module,
    cond_latents: torch.Tensor,
    prompt_embeds: Sequence[torch.Tensor],
    negative_embeds: torch.Tensor | None,
    *,
    frames: int,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    shift: float = DEFAULT_SHIFT,
    seeds: Sequence[int] = (0,),
    on_step: StepCallback | None = None,
    on_latents: Callable[[int, torch.Tensor], None] | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Latents [B, 16, T, h, w] (normalised, fp32) for B start frames and prompts.

    ``cond_latents`` [B, 16, 1, h, w] are the encoded start frames; ``prompt_embeds`` B real-token
    embeddings [L_i, D]; ``negative_embeds`` [L, D] is the empty prompt's, required when guidance > 1.
    ``on_step(i, steps)`` is called after each step; ``on_latents(i, latents)`` sees the full latents
    (condition frame included) the model is given at step i.
    """
    batch = cond_latents.shape[0]
    if len(prompt_embeds) != batch or len(seeds) != batch:
        raise ValueError(f"{batch} start frames need as many prompts and seeds, got {len(prompt_embeds)}, {len(seeds)}")
    use_cfg = guidance > 1.0
    if use_cfg and negative_embeds is None:
        raise ValueError("guidance > 1 needs the empty negative prompt's embedding")
    # Latents and text stay fp32 here: the DiT casts its inputs to its own dtype, as upstream does.
    device = _model_device(model)
    cond = cond_latents.to(device, torch.float32)
    _, channels, _, h, w = cond.shape

    # The unconditional half comes first, as upstream orders it; one forward serves both halves.
    texts = ([negative_embeds] * batch if use_cfg else []) + list(prompt_embeds)
    text, mask = pad_text_embeds([t.to(device, torch.float32) for t in texts])

    noisy = initial_noise((channels, latent_frames(frames) - 1, h, w), seeds).to(device)
    scheduler = flow_scheduler(steps, shift)
    for i, t in enumerate(tqdm(scheduler.timesteps, desc="sampling", unit="step", disable=not progress)):
        # The clean condition frame is put back in front of the noisy frames at every step.
        latents = torch.cat([cond, noisy], dim=2)
        if on_latents is not None:
            on_latents(i, latents)
        x = torch.cat([latents, latents]) if use_cfg else latents
        timestep = t.to(device).expand(x.shape[0])  # the model sets the condition frame's to 0
        pred = model(
            hidden_states=x,
            timestep=timestep,
            encoder_hidden_states=text,
            encoder_attention_mask=mask,
            num_cond_latents=1,
        ).float()
        if use_cfg:
            uncond, pred = pred.chunk(2)
            pred = cfg_zero_star(pred, uncond, guidance)
        # The DiT predicts x0 - eps; the Euler step wants d x / d sigma = eps - x0.
        noisy = scheduler.step(-pred[:, :, 1:], t, noisy).prev_sample
        if on_step is not None:
            on_step(i + 1, steps)
    return torch.cat([cond, noisy], dim=2)


def sample_i2v(
    model: torch.nn.Module,
    vae: torch.nn.Module,
    image: np.ndarray,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
    *,
    frames: int = DEFAULT_FRAMES,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    shift: float = DEFAULT_SHIFT,
    seed: int = 0,
    area: tuple[int, int] = DEFAULT_AREA,
    on_step: StepCallback | None = None,
    progress: bool = True,
) -> np.ndarray:
    """One video, uint8 [F, H, W, 3], from a start image (any size; fitted to its bucket) and a prompt."""
    frames = round_frames(frames)
    start = fit_start_image(image, area)
    cond = encode_image(vae, start[None])
    latents = denoise(
        model,
        cond,
        [prompt_embeds],
        negative_embeds,
        frames=frames,
        steps=steps,
        guidance=guidance,
        shift=shift,
        seeds=[seed],
        on_step=on_step,
        progress=progress,
    )
    return decode_latents(vae, latents)[0].numpy()


# ---------------------------------------------------------------- loaded models


class Sampler:
    """The DiT, VAE and text encoder loaded once, for the CLI and the preview page.

    The DiT stays on ``device``. With ``offload`` the text encoder and VAE live on the CPU and visit the
    device only for their own step, so the DiT's activations at 480x832x93 have the GPU to themselves.
    ``block_swap`` N keeps the weights of the DiT's last N blocks in host memory and streams them in
    (``longcat_train.offload``), for GPUs smaller than the bf16 model; it is applied at the first video,
    after the LoRA is merged, and fixes the weights from then on.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        offload: bool = True,
        vae_tiling: bool = False,
        block_swap: int = 0,
        attention: str = "sdpa",
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or default_dtype(self.device)
        self.offload = offload and self.device.type != "cpu"
        self.vae_tiling = vae_tiling
        self.block_swap = block_swap if self.device.type != "cpu" else 0
        home = "cpu" if self.offload else self.device
        log.info("loading %s (DiT on %s, %s; text encoder and VAE on %s)", model, self.device, self.dtype, home)
        self.tokenizer, self.text_encoder = load_text_encoder(model, device=home, dtype=self.dtype)
        self.vae = load_vae(model, device=home, dtype=self.dtype)
        self.model = model
        dit_home = "cpu" if self.block_swap else self.device
        self.dit: torch.nn.Module = load_dit(model, dtype=self.dtype, device=dit_home).eval().requires_grad_(False)
        self.dit.config.attention_implementation = attention
        warn_if_unavailable(attention)
        self.lora: tuple[str, float] | None = None  # the unmerged LoRA and strength now on the DiT
        self.merged: str | None = None
        self.swap: BlockSwap | None = None

    @classmethod
    def from_config(cls, config: SampleConfig) -> Sampler:
        """The models ``longcat-sample`` (once, or behind the preview page) loads for ``config``."""
        return cls(
            config.model, device=config.device, vae_tiling=config.vae_tiling, block_swap=config.block_swap,
            attention=config.attention,
        )

    def use_lora(self, path: str | None, strength: float = 1.0, *, merge: bool = False) -> None:
        """Sample with the LoRA file at ``path`` (ours or the official format; None: the base model), its
        update scaled by ``strength``.

        ``merge`` folds it into the base weights: no extra cost per step, but it stays for good (the CLI,
        which makes one set of videos). Unmerged, the next call can swap or rescale it (the preview page).
        """
        if self.merged is not None or self.swap is not None:
            fixed = f"LoRA {self.merged} is merged" if self.merged else "block swap has packed the weights"
            raise SampleInputError(f"{fixed}; the LoRA cannot change now (choose it before the first video)")
        if self.lora is not None and (path is None or self.lora[0] != path):
            self.dit = self.dit.unload()  # back to the untouched base weights
            self.lora = None
        if path is None:
            return
        if self.lora is None:
            if not Path(path).is_file():
                raise SampleInputError(f"LoRA file not found: {path}")
            try:
                self.dit = load_lora(self.dit, path).eval()
            except (ValueError, OSError) as err:
                raise SampleInputError(f"LoRA {path} does not fit the DiT of --model {self.model}: {err}") from err
        for module in self.dit.modules():
            if isinstance(module, LoraLayer):
                module.set_scale(LORA_ADAPTER, strength)
        self.lora = (path, strength)
        log.info("LoRA %s at strength %g%s", path, strength, " (merged)" if merge else "")
        if merge:
            self.dit = self.dit.merge_and_unload()
            self.lora, self.merged = None, path

    @contextmanager
    def _visiting(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        if not self.offload:
            yield module
            return
        module.to(self.device)
        try:
            yield module
        finally:
            module.to("cpu")
            torch.cuda.empty_cache()

    def generate(
        self,
        image: np.ndarray,
        prompts: Sequence[str],
        *,
        frames: int = DEFAULT_FRAMES,
        steps: int = DEFAULT_STEPS,
        guidance: float = DEFAULT_GUIDANCE,
        shift: float = DEFAULT_SHIFT,
        seed: int = 0,
        area: tuple[int, int] = DEFAULT_AREA,
        negative_prompt: str = "",
        on_step: StepCallback | None = None,
        progress: bool = True,
    ) -> np.ndarray:
        """uint8 [B, F, H, W, 3]: one video per prompt from the same start image; prompt i uses seed + i."""
        prompts = [p.strip() for p in prompts]
        if not prompts or not all(prompts):
            raise SampleInputError("the prompt is empty: describe what should happen in the video")
        frames = round_frames(frames)
        start = fit_start_image(image, area)
        use_cfg = guidance > 1.0
        with self._visiting(self.text_encoder) as text_encoder:
            texts = prompts + ([negative_prompt] if use_cfg else [])
            embeds = encode_text(self.tokenizer, text_encoder, texts)
        negative = embeds.pop() if use_cfg else None
        with self._visiting(self.vae) as vae:
            cond = encode_image(vae, start[None]).expand(len(prompts), -1, -1, -1, -1)
        if self.block_swap and self.swap is None:
            self.swap = apply_block_swap(self.dit, self.block_swap, "cpu", compute_device=self.device)
        latents = denoise(
            self.dit,
            cond,
            embeds,
            negative,
            frames=frames,
            steps=steps,
            guidance=guidance,
            shift=shift,
            seeds=[seed + i for i in range(len(prompts))],
            on_step=on_step,
            progress=progress,
        )
        with self._visiting(self.vae) as vae:
            if self.vae_tiling:
                vae.enable_tiling()
            try:
                # One video at a time: decoding memory grows with the batch, and the batch gains nothing.
                videos = [decode_latents(vae, latents[i : i + 1])[0].numpy() for i in range(len(prompts))]
            finally:
                vae.disable_tiling()
        return np.stack(videos)


# ---------------------------------------------------------------- the longcat-sample command


def check_sample_config(config: SampleConfig) -> np.ndarray | None:
    """Refuse bad input before any model loads; returns the start image (None when serving)."""
    for lora in config.lora:
        if not Path(lora).is_file():
            raise SampleInputError(f"LoRA file not found: {lora}")
    if config.steps < 1:
        raise SampleInputError(f"--steps must be at least 1, got {config.steps}")
    config.frames = round_frames(config.frames)
    if config.block_swap < 0:
        raise SampleInputError(f"--block-swap must be >= 0, got {config.block_swap}")
    if config.serve:
        if config.block_swap and config.lora:
            raise SampleInputError("--serve with --block-swap cannot switch LoRAs (swapped weights are fixed)")
        return None
    if len(config.lora) > 1:
        raise SampleInputError("give one --lora to sample with (several are for --serve, which offers them all)")
    if config.image is None:
        raise SampleInputError("--image is required: the start frame of the video")
    image = load_image(config.image)
    fit_start_image(image, config.area)
    if not config.prompts or not all(p.strip() for p in config.prompts):
        raise SampleInputError("--prompt is empty: describe what should happen in the video")
    if Path(config.output).suffix.lower() != ".mp4":
        raise SampleInputError(f"-o {config.output}: the output must be an .mp4 file")
    return image


def output_paths(output: str | Path, count: int) -> list[Path]:
    """``out.mp4`` for one video; ``out_0.mp4``, ``out_1.mp4``, ... for several prompts."""
    output = Path(output)
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{i}{output.suffix}") for i in range(count)]


def run_sample(config: SampleConfig) -> list[Path]:
    """Make one video per prompt from the start image and write them (plus GIF / frames if asked)."""
    image = check_sample_config(config)
    sampler = Sampler.from_config(config)
    if config.lora:
        sampler.use_lora(config.lora[0], config.lora_strength, merge=True)
    videos = sampler.generate(
        image,
        config.prompts,
        frames=config.frames,
        steps=config.steps,
        guidance=config.guidance,
        shift=config.shift,
        seed=config.seed,
        area=config.area,
        negative_prompt=config.negative_prompt,
    )
    written = []
    for video, path in zip(videos, output_paths(config.output, len(videos)), strict=True):
        written.append(write_mp4(video, path, fps=config.fps))
        if config.gif:
            written.append(write_gif(video, path.with_suffix(".gif"), fps=config.fps))
        if config.save_frames:
            write_frames(video, path.with_suffix(""))
            written.append(path.with_suffix(""))
        log.info("wrote %s (%d frames, %dx%d, %d fps)", path, len(video), video.shape[2], video.shape[1], config.fps)
    return written


# ---------------------------------------------------------------- video files


def _partial_path(path: Path) -> Path:
    # Written under a temporary name in the same folder and renamed, so a reader (the web page, a
    # watcher of the validation folder) never sees half a file.
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def write_mp4(frames: np.ndarray, path: str | Path, fps: int = DEFAULT_FPS, crf: int = 18) -> Path:
    """uint8 [F, H, W, 3] -> H.264 MP4 (yuv420p, playable in browsers), ``fps`` frames per second."""
    path = Path(path)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"write_mp4 wants uint8 [F, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    tmp = _partial_path(path)
    # faststart puts the index first so a browser can start playing before the download ends.
    with av.open(str(tmp), "w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return tmp.replace(path)


def read_mp4(path: str | Path) -> np.ndarray:
    """All frames of a video file as uint8 [F, H, W, 3]."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def write_gif(frames: np.ndarray, path: str | Path, fps: int = DEFAULT_FPS, max_side: int = 320) -> Path:
    """A small looping GIF preview, scaled so its longer side is at most ``max_side``."""
    path = Path(path)
    h, w = frames.shape[1:3]
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    images = [Image.fromarray(f).resize(size, Image.Resampling.BICUBIC) for f in frames]
    tmp = _partial_path(path)
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return tmp.replace(path)


def write_frames(frames: np.ndarray, directory: str | Path) -> list[Path]:
    """Each frame as ``directory/frame_00000.png``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"frame_{i:05d}.png" for i in range(len(frames))]
    for frame, p in zip(frames, paths, strict=True):
        Image.fromarray(frame).save(p)
    return paths


# ---------------------------------------------------------------- validation


@dataclass
class ValidationPair:
    """A fixed (start image, prompt) the trainer samples at every validation."""

    key: str
    image: np.ndarray  # uint8 [H, W, 3]
    prompt: str


def _safe_key(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._") or "pair"


def load_validation_pairs(source: str, limit: int) -> list[ValidationPair]:
    """Up to ``limit`` pairs, in a fixed order, from a folder of images + same-stem ``.txt`` captions,
    or from eval shards (``cond.png`` + ``txt`` of each sample; any spec ``expand_shard_spec`` takes)."""
    folder = Path(source).expanduser()
    # A shard folder also holds images (longcat-prep inspect's contact sheet): tars decide.
    is_shard_dir = folder.is_dir() and any(folder.glob("*.tar"))
    if folder.is_dir() and not is_shard_dir and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir()):
        pairs = _folder_pairs(folder, limit)
    else:
        pairs = _shard_pairs(source, limit)
    if not pairs:
        raise SampleInputError(f"no validation pairs in {source} (expected images with .txt captions, or eval shards)")
    log.info("validation: %d pairs from %s", len(pairs), source)
    return pairs


def _folder_pairs(folder: Path, limit: int) -> list[ValidationPair]:
    pairs = []
    for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)[:limit]:
        caption = image.with_suffix(".txt")
        if not caption.is_file():
            raise SampleInputError(f"validation image {image} has no caption: write its prompt to {caption}")
        prompt = caption.read_text(encoding="utf-8").strip()
        if not prompt:
            raise SampleInputError(f"validation caption {caption} is empty")
        pairs.append(ValidationPair(_safe_key(image.stem), load_image(image), prompt))
    return pairs


def _shard_pairs(spec: str, limit: int) -> list[ValidationPair]:
    pairs: list[ValidationPair] = []
    # Shards in the order listed, samples in file order, no shuffling: the same pairs every run.
    sources = ({"url": url} for url in expand_shard_spec(spec))
    for sample in read_tars(sources, handler=reraise_exception):
        if COND_IMAGE not in sample or CAPTION not in sample:
            continue
        key = sample["__key__"]
        image = decode_image(sample[COND_IMAGE], name=f"{key}/{COND_IMAGE}")
        pairs.append(ValidationPair(_safe_key(key), image, sample[CAPTION].decode("utf-8").strip()))
        if len(pairs) == limit:
            break
    return pairs


def contact_sheet(
    start: np.ndarray, rows: Sequence[tuple[str, np.ndarray]], columns: int = 4, height: int = 160
) -> np.ndarray:
    """A PNG-ready uint8 sheet: per row a label, the start frame, then ``columns`` evenly spaced frames."""
    scale = height / start.shape[0]
    width = max(1, round(start.shape[1] * scale))
    label_w, gap = 72, 4
    cells = 1 + columns
    sheet = Image.new("RGB", (label_w + cells * (width + gap), len(rows) * (height + gap) + 18), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((label_w, 2), "start", fill="black")

    def paste(frame: np.ndarray, col: int, row: int) -> None:
        cell = Image.fromarray(frame).resize((width, height), Image.Resampling.BICUBIC)
        sheet.paste(cell, (label_w + col * (width + gap), 18 + row * (height + gap)))

    for r, (label, video) in enumerate(rows):
        draw.text((4, 18 + r * (height + gap) + height // 2), label, fill="black")
        paste(start, 0, r)
        for c, index in enumerate(np.linspace(0, len(video) - 1, columns).round().astype(int)):
            if r == 0:
                draw.text((label_w + (c + 1) * (width + gap), 2), f"frame {index}", fill="black")
            paste(video[index], c + 1, r)
    return np.asarray(sheet)


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def run_validation(
    model: torch.nn.Module,
    vae: torch.nn.Module,
    pairs: Sequence[ValidationPair],
    embeds: dict[str, torch.Tensor],
    *,
    step: int,
    output_dir: str | Path,
    frames: int = DEFAULT_FRAMES,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    seed: int = 0,
    tb_writer: object | None = None,
    shift: float = DEFAULT_SHIFT,
    area: tuple[int, int] = DEFAULT_AREA,
    fps: int = DEFAULT_FPS,
) -> list[Path]:
    """Sample every pair with the model as it is (LoRA on) and, where the model carries a peft adapter,
    with the adapter off; write ``validation/step_NNNNNN/<key>.mp4`` and ``<key>_sheet.png``.

    ``embeds`` maps each prompt, and ``""`` (the negative prompt) when guidance > 1, to its [L, D]
    embedding. Base-model videos do not change during training, so each is sampled once and kept in
    ``validation/base/`` under a name carrying its settings. Returns the files written.
    """
    root = Path(output_dir) / "validation"
    step_dir = root / f"step_{step:06d}"
    negative = embeds.get("") if guidance > 1.0 else None
    if guidance > 1.0 and negative is None:
        raise KeyError('validation embeds need the empty negative prompt "" when guidance > 1')
    settings = dict(frames=frames, steps=steps, guidance=guidance, shift=shift, seed=seed, area=area, progress=False)
    has_adapter = hasattr(model, "disable_adapter")
    written: list[Path] = []
    with _eval_mode(model):
        for pair in pairs:
            if pair.prompt not in embeds:
                raise KeyError(f"validation embeds have no entry for the prompt of {pair.key!r}")
            video = sample_i2v(model, vae, pair.image, embeds[pair.prompt], negative, **settings)
            written.append(write_mp4(video, step_dir / f"{pair.key}.mp4", fps=fps))
            rows = [("LoRA" if has_adapter else "model", video)]
            if has_adapter:
                rows.insert(0, ("base", _base_video(model, vae, pair, embeds, negative, root, settings, fps)))
            sheet = contact_sheet(fit_start_image(pair.image, area), rows)
            sheet_path = step_dir / f"{pair.key}_sheet.png"
            Image.fromarray(sheet).save(sheet_path)
            written.append(sheet_path)
            if tb_writer is not None:
                # add_video needs moviepy, which this project does not install; the sheet shows the same.
                tb_writer.add_image(f"validation/{pair.key}", sheet, global_step=step, dataformats="HWC")
    log.info("validation at step %d: %d files in %s", step, len(written), step_dir)
    return written


def _base_video(
    model: torch.nn.Module,
    vae: torch.nn.Module,
    pair: ValidationPair,
    embeds: dict[str, torch.Tensor],
    negative: torch.Tensor | None,
    root: Path,
    settings: dict,
    fps: int,
) -> np.ndarray:
    # The name carries everything the base video depends on, so a changed pair or setting resamples.
    identity = hashlib.sha256(pair.image.tobytes() + repr((pair.image.shape, pair.prompt, sorted(settings.items()))).encode())
    name = f"{pair.key}_{identity.hexdigest()[:12]}.mp4"
    cached = root / "base" / name
    # With FSDP every rank runs each forward together, but only rank 0 writes (and so finds) the cache;
    # sharded models therefore always sample, so all ranks make the same calls.
    sharded = any(isinstance(m, FSDPModule) for m in model.modules())
    if cached.is_file() and not sharded:
        return read_mp4(cached)
    with model.disable_adapter():
        video = sample_i2v(model, vae, pair.image, embeds[pair.prompt], negative, **settings)
    write_mp4(video, cached, fps=fps)
    return video
