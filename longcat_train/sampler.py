"""The sampler behind ``longcat-sample`` and its preview page: models loaded once, LoRAs, the command.

``Sampler`` owns what only a standalone sampler has: the text encoder, the VAE and the DiT loaded from
``--model``, their placement on the GPU (offload, block swap), and the LoRAs to sample with. The
sampling itself is ``sampling.generate_videos``, shared with the trainer's validation.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from longcat_data.defaults import DEFAULT_MODEL
from longcat_data.encode import default_dtype, encode_text, load_text_encoder, load_vae
from longcat_data.files import NotWritable, check_writable
from longcat_data.flags import check_config
from longcat_data.video import write_frames, write_gif, write_mp4
from longcat_train.attention import warn_if_unavailable
from longcat_train.config import ConfigError, RefineSettings, VideoSettings
from longcat_train.continuation import (
    SegmentCallback,
    check_cond_frames,
    generate_long_video,
    read_condition_video,
    segment_prompts,
)
from longcat_train.loading import load_dit
from longcat_train.lora_apply import LoadedLoras, NamedLora, load_loras, lora_targets
from longcat_train.lora_formats import check_file, read_file
from longcat_train.lora_spec import STRENGTH_RANGE, parse_lora_spec, strength_allowed
from longcat_train.lowrank import LowRankSet
from longcat_train.offload import BlockSwap, apply_block_swap
from longcat_train.quant import check_fp8_matmuls
from longcat_train.refine import refine_bucket, refine_videos
from longcat_train.sample_config import SampleConfig
from longcat_train.sampling import (
    SampleInputError,
    StepCallback,
    distill_sigmas,
    fit_start_image,
    generate_videos,
    read_start_image,
    round_frames,
)
from longcat_train.techniques import apply_fast_paths

log = logging.getLogger(__name__)


class Sampler:
    """The DiT, VAE and text encoder loaded once, for the CLI and the preview page.

    The DiT stays on ``device``. With ``offload`` the text encoder and VAE live on the CPU and visit the
    device only for their own step, so the DiT's activations at 480x832x93 have the GPU to themselves.
    ``block_swap`` N keeps the weights of the DiT's last N blocks in host memory and streams them in
    (``longcat_train.offload``), for GPUs smaller than the bf16 model; it is applied at the first video,
    after the LoRAs are merged, and fixes the weights from then on (hooked LoRAs still switch).
    ``fp8_matmuls`` and ``compile`` are the trainer's (``techniques.apply_fast_paths``), applied at load.
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
        fp8_matmuls: bool = False,
        compile: bool = False,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or default_dtype(self.device)
        self.offload = offload and self.device.type != "cpu"
        self.vae_tiling = vae_tiling
        self.block_swap = block_swap if self.device.type != "cpu" else 0
        home = "cpu" if self.offload else self.device
        log.info(
            "loading %s (DiT on %s, %s; text encoder and VAE on %s)", model, self.device, self.dtype, home
        )
        self.tokenizer, self.text_encoder = load_text_encoder(model, device=home, dtype=self.dtype)
        self.vae = load_vae(model, device=home, dtype=self.dtype)
        self.model = model
        dit_home = "cpu" if self.block_swap else self.device
        self.dit: torch.nn.Module = (
            load_dit(model, dtype=self.dtype, device=dit_home).eval().requires_grad_(False)
        )
        self.dit.attention_implementation = attention
        warn_if_unavailable(attention)
        apply_fast_paths(self.dit, self.device, fp8_matmuls=fp8_matmuls, compile=compile)
        self.loras: list[tuple[str, float]] = []  # the LoRA files and strengths on the DiT now
        self._loaded: LoadedLoras | None = None
        self._files: dict[str, LowRankSet] = {}  # every LoRA file read so far, checked against the DiT
        self.swap: BlockSwap | None = None

    @classmethod
    def from_config(cls, config: SampleConfig) -> Sampler:
        """The models ``longcat-sample`` (once, or behind the preview page) loads for ``config``."""
        return cls(
            config.model,
            device=config.device,
            vae_tiling=config.vae_tiling,
            block_swap=config.block_swap,
            attention=config.attention,
            fp8_matmuls=config.fp8_matmuls,
            compile=config.compile,
        )

    def use_loras(self, loras: Sequence[tuple[str, float]], *, merge: bool = False) -> None:
        """Sample with these LoRA files (ours, peft or the official format), each update scaled by its
        strength; none: the base model. The DiT changes only once every file is known to fit it.

        ``merge`` folds them into the base weights: no extra cost per step (the CLI); a later call takes
        them out again (fp32, to rounding) unless block swap has packed the weights. Unmerged, they are
        hooked on and the next call switches them exactly (the preview page, where jobs differ).
        """
        wanted = [(str(path), float(strength)) for path, strength in loras]
        for path, strength in wanted:
            if not strength_allowed(strength):
                low, high = STRENGTH_RANGE
                raise SampleInputError(
                    f"LoRA {path}: strength {strength} must be a finite number in [{low:g}, {high:g}]"
                )
        merged = self._loaded is not None and self._loaded.merged
        if wanted == self.loras and (merged == merge or not wanted):
            return
        if self.swap is not None and (merged or merge):
            raise SampleInputError(
                "block swap has packed the merged weights; the LoRAs cannot change now (choose them before "
                "the first video)"
            )
        named = [NamedLora(path, self._lora_file(path), strength) for path, strength in wanted]
        if self._loaded is not None:
            self._loaded.remove()
            self._loaded, self.loras = None, []
        if named:
            self._loaded = load_loras(self.dit, named, merge=merge, device=self.device)
        self.loras = wanted

    def _lora_file(self, path: str) -> LowRankSet:
        """The LoRA at ``path``, read once and checked against the DiT; SampleInputError when it is not a
        LoRA or does not fit."""
        if path not in self._files:
            check_lora(path)
            try:
                lora = read_file(path)
            except (ValueError, OSError) as err:
                raise SampleInputError(f"LoRA {err}") from err
            try:
                lora_targets(self.dit, NamedLora(path, lora, 1.0))
            except ValueError as err:
                detail = str(err).removeprefix(f"LoRA {path}: ").removeprefix(f"{path}: ")
                raise SampleInputError(
                    f"LoRA {path} does not fit the DiT of --model {self.model}: {detail}"
                ) from err
            self._files[path] = lora
        return self._files[path]

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
        settings: VideoSettings,
        *,
        negative_prompt: str = "",
        on_step: StepCallback | None = None,
        progress: bool = True,
    ) -> np.ndarray:
        """uint8 [B, F, H, W, 3]: one video per prompt from the same start image; prompt i uses
        ``settings.seed + i``."""
        embeds, negative = self._prompt_embeds(prompts, settings, negative_prompt)
        return generate_videos(
            self.dit,
            self.vae,
            image,
            embeds,
            negative,
            settings,
            on_step=on_step,
            progress=progress,
            visiting=self._visiting,
            tiled_decode=self.vae_tiling,
        )

    def generate_long(
        self,
        prompts: Sequence[str],
        settings: VideoSettings,
        *,
        image: np.ndarray | None = None,
        video: np.ndarray | None = None,
        negative_prompt: str = "",
        on_step: StepCallback | None = None,
        on_segment: SegmentCallback | None = None,
        progress: bool = True,
    ) -> np.ndarray:
        """uint8 [F', H, W, 3]: ``len(prompts)`` segments chained into one video
        (``continuation.generate_long_video``), from a start ``image`` or continuing ``video`` (its
        condition frames, ``continuation.read_condition_video``); segment s uses prompt s."""
        embeds, negative = self._prompt_embeds(prompts, settings, negative_prompt)
        return generate_long_video(
            self.dit,
            self.vae,
            embeds,
            negative,
            settings,
            image=image,
            video=video,
            on_step=on_step,
            on_segment=on_segment,
            progress=progress,
            visiting=self._visiting,
            tiled_decode=self.vae_tiling,
        )

    def _prompt_embeds(
        self, prompts: Sequence[str], settings: VideoSettings, negative_prompt: str
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The prompts' embeddings and, with guidance, the negative prompt's; block swap set up on first use."""
        prompts = [p.strip() for p in prompts]
        if not prompts or not all(prompts):
            raise SampleInputError("the prompt is empty: describe what should happen in the video")
        use_cfg = settings.guidance > 1.0
        with self._visiting(self.text_encoder) as text_encoder:
            embeds = encode_text(
                self.tokenizer, text_encoder, prompts + ([negative_prompt] if use_cfg else [])
            )
        negative = embeds.pop() if use_cfg else None
        if self.block_swap and self.swap is None:
            self.swap = apply_block_swap(self.dit, self.block_swap, "cpu", compute_device=self.device)
        return embeds, negative

    def refine(
        self,
        videos: np.ndarray,
        image: np.ndarray,
        prompts: Sequence[str],
        settings: RefineSettings,
        *,
        on_step: StepCallback | None = None,
        progress: bool = True,
    ) -> np.ndarray:
        """uint8 [B, F', H, W, 3]: ``videos`` [B, F, h, w, 3], made by :meth:`generate` from ``image``
        and ``prompts``, refined at 720p (``refine.refine_videos``) with the DiT as it is now: switch to
        the refinement LoRA first (:meth:`use_loras`)."""
        with self._visiting(self.text_encoder) as text_encoder:
            embeds = encode_text(self.tokenizer, text_encoder, [p.strip() for p in prompts])
        return refine_videos(
            self.dit,
            self.vae,
            videos,
            image,
            embeds,
            settings,
            on_step=on_step,
            progress=progress,
            visiting=self._visiting,
            tiled_decode=self.vae_tiling,
        )


# ---------------------------------------------------------------- the longcat-sample command


def check_sample_config(config: SampleConfig) -> np.ndarray | None:
    """Refuse bad input before any model loads: values, the device, LoRA files, the start image or the
    video to continue, every path the command writes; when serving, the page's folder and address.
    Returns the start image, or with ``--video`` its condition frames (None when serving)."""
    check_config(config)  # as parsing the flags did: a config built in Python gets the same checks
    _check_device(config.device)
    for spec in config.lora:
        check_lora(parse_lora_spec(spec).path)
    config.frames = round_frames(config.frames)
    if config.compile and config.block_swap:
        raise SampleInputError(
            "--compile with --block-swap: block swap's hooks break the compiled block graph; leave out one of them"
        )
    if config.fp8_matmuls:
        try:
            check_fp8_matmuls(torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu")))
        except ConfigError as err:
            raise SampleInputError(f"--fp8-matmuls: {err}") from None
    if config.distill:
        distill_sigmas(config.steps)  # refuses step counts the distilled schedule does not have
        if config.guidance > 1:
            log.warning(
                "--distill with --guidance %g: the distilled model was trained without guidance (CFG); "
                "its setting is --guidance 1",
                config.guidance,
            )
    if config.refine:
        _check_refine(config)
    elif config.refine_lora or config.refine_temporal:
        flag = "--refine-lora" if config.refine_lora else "--refine-temporal"
        raise SampleInputError(f"{flag} is a setting of --refine: add --refine, or leave {flag} out")
    chaining = config.video is not None or config.segments > 1
    if chaining:
        _check_chaining(config)
    if config.serve:
        _check_output("--serve-dir", config.serve_dir, folder=True)
        _check_address(config.host, config.port)
        return None
    if not config.prompts or not all(p.strip() for p in config.prompts):
        raise SampleInputError("--prompt is empty: describe what should happen in the video")
    if chaining:
        segment_prompts(config.prompts, config.segments)
    if config.video is not None:
        start = read_condition_video(config.video, config.cond_frames, config.fps, config.area)
        stage = start.shape[1:3]
    elif config.image is None:
        raise SampleInputError("--image is required: the start frame of the video (or --video to continue)")
    else:
        start = read_start_image(config.image)
        stage = fit_start_image(start, config.area).shape[:2]
    if config.refine:
        refine_bucket(*stage, config.refine_area)
    if Path(config.output).suffix.lower() != ".mp4":
        raise SampleInputError(f"-o {config.output}: the output must be an .mp4 file")
    for path in output_paths(config.output, 1 if chaining else len(config.prompts)):
        _check_output("-o", path)
        if config.gif:
            _check_output("--gif", path.with_suffix(".gif"))
        if config.save_frames:
            _check_output("--save-frames", path.with_suffix(""), folder=True)
        if config.refine:
            _check_output("--refine", stage_path(path, stage))
    return start


def _check_chaining(config: SampleConfig) -> None:
    """The settings of a continuation (``--video``) or a long video (``--segments`` > 1)."""
    flag = "--video" if config.video is not None else "--segments"
    if config.video is not None and config.image is not None:
        raise SampleInputError("--image and --video: a video starts from one of them; leave out the other")
    if config.video is not None and config.serve:
        raise SampleInputError("--video with --serve: upload the video to continue on the page instead")
    if config.refine:
        raise SampleInputError(f"--refine with {flag}: continuations are not refined; leave out --refine")
    check_cond_frames(config.cond_frames, config.frames)


def lora_entries(config: SampleConfig) -> list[tuple[str, float]]:
    """``(path, strength)`` of every ``--lora``; ``--lora-strength`` for those given without one."""
    return [parse_lora_spec(spec).entry(config.lora_strength) for spec in config.lora]


def _check_refine(config: SampleConfig) -> None:
    if config.serve:
        raise SampleInputError("--refine with --serve: the preview page does not refine; leave out --refine")
    if config.block_swap:
        raise SampleInputError(
            "--refine with --block-swap: block swap fixes the weights, so the refinement LoRA cannot take "
            "the video's place; leave out one of them"
        )
    if not config.refine_lora:
        raise SampleInputError(
            "--refine needs --refine-lora PATH, the refinement LoRA (the official checkpoint's "
            "lora/refinement_lora.safetensors)"
        )
    check_lora(config.refine_lora, flag="--refine-lora")


def check_lora(path: str, flag: str = "--lora") -> None:
    """A SampleInputError unless ``path`` is a LoRA safetensors file (its header alone is read)."""
    if not Path(path).is_file():
        raise SampleInputError(f"LoRA file not found: {path}")
    try:
        check_file(path)
    except ValueError as err:
        raise SampleInputError(f"{flag} {err}") from None


def _check_output(flag: str, path: str | Path, *, folder: bool = False) -> None:
    try:
        check_writable(path, folder=folder)
    except NotWritable as err:
        raise SampleInputError(f"{flag} {path}: {err}; choose another path") from None


def _check_device(device: str | None) -> None:
    if device is None:
        return
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise SampleInputError(f"--device {device}: not a device name (cpu, cuda, cuda:N)") from None
    if chosen.type == "cuda" and (chosen.index or 0) >= torch.cuda.device_count():
        visible = torch.cuda.device_count()
        raise SampleInputError(
            f"--device {device}: {visible or 'no'} CUDA GPU{'' if visible == 1 else 's'} visible; "
            "use --device cpu or another GPU"
        )


def _check_address(host: str, port: int) -> None:
    """The page's address must be free now, not found taken once the models have loaded."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as err:
        raise SampleInputError(f"--host {host}: not an address of this machine ({err})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as err:
            raise SampleInputError(
                f"--host {host} --port {port}: cannot listen there ({err.strerror}); choose another --port or --host"
            ) from None


def output_paths(output: str | Path, count: int) -> list[Path]:
    """``out.mp4`` for one video; ``out_0.mp4``, ``out_1.mp4``, ... for several prompts."""
    output = Path(output)
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{i}{output.suffix}") for i in range(count)]


def stage_path(path: Path, size: tuple[int, int]) -> Path:
    """Where ``--refine`` keeps the video before refinement: ``out.mp4`` -> ``out_480p.mp4`` (the short
    side of ``size``)."""
    return path.with_name(f"{path.stem}_{min(size)}p{path.suffix}")


def run_sample(config: SampleConfig) -> list[Path]:
    """Make one video per prompt from the start image and write them (plus GIF / frames if asked); with
    ``--refine``, write those first beside the outputs, then refine them into the outputs."""
    image = check_sample_config(config)
    sampler = Sampler.from_config(config)
    # Hooked when a refinement follows: it takes the LoRAs off again and puts its own on.
    sampler.use_loras(lora_entries(config), merge=not config.refine)
    if config.video is not None or config.segments > 1:
        return _run_long(sampler, config, image)
    videos = sampler.generate(
        image,
        config.prompts,
        config.video_settings,
        negative_prompt=config.negative_prompt,
    )
    paths = output_paths(config.output, len(videos))
    if not config.refine:
        return _write_videos(videos, paths, config, config.fps)
    # Written before the refinement starts, so its failure loses none of them.
    stages = [stage_path(path, videos.shape[2:4]) for path in paths]
    written = _write_videos(videos, stages, config, config.fps, extras=False)
    sampler.use_loras([(config.refine_lora, 1.0)])
    refined = sampler.refine(videos, image, config.prompts, config.refine_settings)
    fps = config.fps * (2 if config.refine_temporal else 1)
    return written + _write_videos(refined, paths, config, fps)


def _run_long(sampler: Sampler, config: SampleConfig, start: np.ndarray) -> list[Path]:
    """A continuation or long video: the MP4 (re)written after every segment, so a failure in a later
    segment keeps the ones before; the GIF and frames once the last segment is done."""
    path = Path(config.output)

    def write_so_far(frames: np.ndarray) -> None:
        write_mp4(frames, path, fps=config.fps)
        log.info("wrote %s (%d frames so far)", path, len(frames))

    video = sampler.generate_long(
        segment_prompts(config.prompts, config.segments),
        config.video_settings,
        image=None if config.video is not None else start,
        video=start if config.video is not None else None,
        negative_prompt=config.negative_prompt,
        on_segment=write_so_far,
    )
    return _write_videos(video[None], [path], config, config.fps)


def _write_videos(
    videos: np.ndarray, paths: Sequence[Path], config: SampleConfig, fps: int, *, extras: bool = True
) -> list[Path]:
    """Each video as an MP4 at its path; with ``extras``, the GIF and frames the config asks for too."""
    written = []
    for video, path in zip(videos, paths, strict=True):
        written.append(write_mp4(video, path, fps=fps))
        if extras and config.gif:
            written.append(write_gif(video, path.with_suffix(".gif"), fps=fps))
        if extras and config.save_frames:
            write_frames(video, path.with_suffix(""))
            written.append(path.with_suffix(""))
        log.info("wrote %s (%d frames, %dx%d, %d fps)", path, len(video), video.shape[2], video.shape[1], fps)
    return written
