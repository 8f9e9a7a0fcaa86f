"""VAE and text encoder: loading (checkpoint dir, hub id, tiny), batched encoding, latent normalisation.

Latents follow the LongCat-Video convention: pixels in [-1, 1], the VAE posterior mean, normalised per
channel as ``(z - latents_mean) / latents_std`` from the VAE config. Text embeddings are umT5 encoder
hidden states of the real tokens only (the prompt is padded to ``max_length`` for the forward pass, as
the official pipeline does, then the padding rows are dropped).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import string
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from longcat_data.captions import clean_caption
from longcat_data.defaults import DEFAULT_MODEL, TEXT_MAX_LENGTH, TINY, TINY_SEED

if TYPE_CHECKING:
    # diffusers and transformers are imported where a model is built: importing them takes seconds (and
    # with torchao installed, prints warnings), which `longcat-prep --help` and the readers should not pay.
    from diffusers import AutoencoderKLWan
    from transformers import PreTrainedTokenizerBase, T5Tokenizer, UMT5EncoderModel

log = logging.getLogger(__name__)


# The 8x spatial / 4x temporal compression of the real Wan VAE with far fewer channels, so tests and the
# demo run in seconds on a CPU while exercising the same class and the same causal first-frame handling.
TINY_VAE_CONFIG = {
    "base_dim": 8,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 1,
    "temperal_downsample": [False, True, True],
}
TINY_TEXT_CONFIG = {
    "d_model": 64,
    "d_kv": 32,
    "d_ff": 128,
    "num_layers": 2,
    "num_heads": 2,
    "dropout_rate": 0.0,
    "feed_forward_proj": "gated-gelu",
}

# The tiny tokenizer's vocabulary is derived from this text by counting, not by training: the tokenizers
# Unigram trainer is multi-threaded and gives slightly different scores from run to run.
TINY_CORPUS = """
a cat walks across a sunny garden while the camera slowly pans to the left
a red car drives along a wet road at night with neon lights reflecting on the street
close up of a woman smiling in soft window light with a shallow depth of field
a dog runs on the beach and waves roll onto the sand under a blue sky
the camera moves forward through a dense green forest as sunlight falls between the trees
a man in a black jacket turns his head and looks at the camera
time lapse of clouds moving over snowy mountains at sunset
a bird flies over a calm lake and its reflection follows it on the water
people walk through a busy city square in the rain holding umbrellas
a child plays with a yellow ball in a small room with white walls
slow motion of water drops falling into a glass
an old train crosses a stone bridge in the autumn countryside
the scene is bright and colorful with smooth natural motion
a hand pours coffee into a cup on a wooden table in the morning
fireworks explode above a river and light up the dark sky
a horse gallops across an open field of tall grass
aerial view of waves breaking against rocky cliffs
a girl dances in a long dress and the fabric swirls around her
cinematic shot of a spaceship flying above a desert planet
the camera zooms in on a flower as a bee lands on it
"""
_TINY_SPECIALS = ("<pad>", "</s>", "<unk>")
_SPACE = "\u2581"  # sentencepiece's word-start marker


# Graphs torch.compile may keep for the VAE encoder: a few chunk kinds for each of up to ~20 buckets.
RECOMPILE_LIMIT = 64


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on GPU (the official inference dtype), fp32 on CPU (bf16 convolutions are slow there)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    # Fixed weights for `tiny` without disturbing the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ---------------------------------------------------------------- model resolution


def resolve_checkpoint(model: str, subfolders: Sequence[str]) -> Path:
    """A checkpoint directory holding ``subfolders``: ``model`` itself, or a hub snapshot of only those."""
    path = Path(model).expanduser()
    if path.is_dir():
        missing = [s for s in subfolders if not (path / s).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"{path} is not a LongCat-Video checkpoint: missing {', '.join(f'{m}/' for m in missing)} "
                f"(expected the official layout: dit/, vae/, text_encoder/, tokenizer/)"
            )
        return path
    if model.startswith(("/", ".", "~")) or model.count("/") != 1:
        raise FileNotFoundError(
            f"--model {model!r}: no such directory, and not a hub id of the form user/name "
            f"(use 'tiny', a checkpoint directory, or e.g. {DEFAULT_MODEL})"
        )
    from huggingface_hub import snapshot_download

    log.info("fetching %s from the hub (%s)", model, ", ".join(subfolders))
    return Path(snapshot_download(model, allow_patterns=[f"{s}/*" for s in subfolders]))


# ---------------------------------------------------------------- tiny models


def tiny_vocab(corpus: str = TINY_CORPUS) -> list[tuple[str, float]]:
    """Unigram pieces with log-probability scores: specials, whole corpus words, then single characters.

    Words score above characters, so known words stay one token and anything else (within printable
    ASCII) still tokenises, character by character.
    """
    words = Counter(corpus.split())
    total = sum(words.values())
    pieces = [(tok, 0.0) for tok in _TINY_SPECIALS]
    pieces.append((_SPACE, -8.0))
    for word, count in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        pieces.append((_SPACE + word, math.log(count / total)))
    for ch in string.ascii_letters + string.digits + string.punctuation:
        pieces.append((_SPACE + ch, -11.0))
        pieces.append((ch, -12.0))
    # A corpus word that is also a single character would otherwise appear twice.
    seen: set[str] = set()
    return [p for p in pieces if not (p[0] in seen or seen.add(p[0]))]


def tiny_tokenizer() -> T5Tokenizer:
    """A T5 (Unigram, </s>-terminated) tokenizer built in memory from ``TINY_CORPUS``."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=tiny_vocab(), extra_ids=0, model_max_length=TEXT_MAX_LENGTH)


def tiny_vae() -> AutoencoderKLWan:
    from diffusers import AutoencoderKLWan

    with _seeded(TINY_SEED):
        return AutoencoderKLWan(**TINY_VAE_CONFIG).eval()


def tiny_text_encoder(vocab_size: int) -> UMT5EncoderModel:
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(vocab_size=vocab_size, **TINY_TEXT_CONFIG)
    with _seeded(TINY_SEED):
        return UMT5EncoderModel(config).eval()


def save_tiny_encoders(directory: str | Path) -> Path:
    """Write the tiny ``vae/``, ``text_encoder/``, ``tokenizer/`` so the directory loads like a checkpoint."""
    directory = Path(directory)
    tokenizer = tiny_tokenizer()
    tiny_vae().save_pretrained(directory / "vae")
    tiny_text_encoder(len(tokenizer)).save_pretrained(directory / "text_encoder")
    tokenizer.save_pretrained(directory / "tokenizer")
    return directory


# ---------------------------------------------------------------- loading


def load_vae(
    model: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> AutoencoderKLWan:
    if model == TINY:
        vae = tiny_vae()
        if dtype != torch.float32:
            vae = vae.to(dtype=dtype)
    else:
        from diffusers import AutoencoderKLWan

        root = resolve_checkpoint(model, ["vae"])
        vae = AutoencoderKLWan.from_pretrained(root, subfolder="vae", torch_dtype=dtype)
    # Tiling stays off (the diffusers default): it changes latents at tile seams. Callers short of memory
    # opt in with vae.enable_tiling().
    return vae.to(device).eval().requires_grad_(False)


def load_text_encoder(
    model: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedTokenizerBase, UMT5EncoderModel]:
    if model == TINY:
        tokenizer = tiny_tokenizer()
        encoder = tiny_text_encoder(len(tokenizer))
    else:
        from transformers import AutoTokenizer, UMT5EncoderModel

        root = resolve_checkpoint(model, ["text_encoder", "tokenizer"])
        tokenizer = AutoTokenizer.from_pretrained(root, subfolder="tokenizer")
        encoder = UMT5EncoderModel.from_pretrained(root, subfolder="text_encoder", dtype=dtype)
    return tokenizer, encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)


def compile_vae_encoder(vae: AutoencoderKLWan, **compile_kwargs) -> AutoencoderKLWan:
    """``vae`` with its encoder compiled in place (``torch.compile``; ``compile_kwargs`` go there) and,
    on CUDA, cuDNN timing its convolution algorithms once per input shape (``cudnn.benchmark``) and
    keeping the fastest. Latents stay those of the eager encoder within bf16 rounding.

    The Wan encoder runs a clip in causal chunks (the first frame, then 4 frames at a time) whose frame
    caches differ between the first chunks, so each clip shape takes a few graphs, compiled (minutes on
    the first clip of a shape, then reused) with shapes kept static: one graph per bucket and chunk
    kind, which ``RECOMPILE_LIMIT`` leaves room for.
    """
    import torch._dynamo

    if vae.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    vae.encoder.compile(**{"dynamic": False, **compile_kwargs})
    return vae


# ---------------------------------------------------------------- latents


def _channel_stats(z: torch.Tensor, vae: AutoencoderKLWan) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, -1, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32, device=z.device).view(shape)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32, device=z.device).view(shape)
    return mean, std


def normalize_latents(z: torch.Tensor, vae: AutoencoderKLWan) -> torch.Tensor:
    mean, std = _channel_stats(z, vae)
    return ((z.float() - mean) / std).to(z.dtype)


def denormalize_latents(z: torch.Tensor, vae: AutoencoderKLWan) -> torch.Tensor:
    mean, std = _channel_stats(z, vae)
    return (z.float() * std + mean).to(z.dtype)


def _as_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    # torch wants writable memory; PIL hands out read-only arrays.
    return torch.from_numpy(np.require(x, requirements=["C", "W"])) if isinstance(x, np.ndarray) else x


@torch.inference_mode()
def encode_video(vae: AutoencoderKLWan, video: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 [B, F, H, W, 3] -> normalised posterior mean, fp32 [B, 16, 1 + (F-1)/4, H/8, W/8]."""
    video = _as_tensor(video)
    if video.dtype != torch.uint8 or video.ndim != 5 or video.shape[-1] != 3:
        raise ValueError(f"encode_video wants uint8 [B, F, H, W, 3], got {video.dtype} {tuple(video.shape)}")
    # Move as uint8 (4x fewer bytes than fp32), convert on the device.
    x = video.to(vae.device, non_blocking=True).permute(0, 4, 1, 2, 3)
    return encode_pixels(vae, x.to(vae.dtype) / 127.5 - 1.0)


# no_grad, not inference_mode: the refinement writes into these latents in place outside inference mode,
# which inference tensors do not allow.
@torch.no_grad()
def encode_pixels(vae: AutoencoderKLWan, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels [B, 3, F, H, W] in [-1, 1] (any float dtype, any device) -> normalised posterior mean,
    fp32 [B, 16, 1 + (F-1)/4, H/8, W/8]: for videos made in floating point (resampled, blended)."""
    z = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
    return normalize_latents(z.float(), vae)


def encode_image(vae: AutoencoderKLWan, image: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> [B, 16, 1, H/8, W/8]: the start frame encoded alone, as a 1-frame video."""
    return encode_video(vae, _as_tensor(image).unsqueeze(1))


@torch.inference_mode()
def decode_latents(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents [B, 16, T, h, w] -> uint8 [B, 1 + 4(T-1), 8h, 8w, 3] on the CPU."""
    z = denormalize_latents(latents.to(vae.device, torch.float32), vae).to(vae.dtype)
    x = vae.decode(z).sample.float()
    pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 4, 1).cpu()


# ---------------------------------------------------------------- text


@torch.inference_mode()
def encode_text(
    tokenizer: PreTrainedTokenizerBase,
    text_encoder: UMT5EncoderModel,
    prompts: Sequence[str],
    max_length: int = TEXT_MAX_LENGTH,
) -> list[torch.Tensor]:
    """One fp32 [L_i, D] tensor per prompt (real tokens incl. </s>, no padding), on the encoder's device."""
    tokens = tokenizer(
        [clean_caption(p) for p in prompts],
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    ids = tokens.input_ids.to(text_encoder.device)
    mask = tokens.attention_mask.to(text_encoder.device)
    hidden = text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    lengths = mask.sum(dim=1).tolist()
    # Clone so each result owns its memory instead of pinning the whole padded batch.
    return [h[:n].clone() for h, n in zip(hidden, lengths, strict=True)]


def token_counts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[int]:
    """Tokens each prompt has before ``encode_text`` cuts it at ``max_length`` (</s> included)."""
    tokens = tokenizer([clean_caption(p) for p in prompts], add_special_tokens=True, verbose=False)
    return [len(ids) for ids in tokens.input_ids]


def pad_text_embeds(
    embeds: Sequence[torch.Tensor], length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack [L_i, D] embeddings into zero-padded [B, L, D] and a mask [B, L] (1 real, 0 pad)."""
    longest = max(e.shape[0] for e in embeds)
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"a text embedding has {longest} tokens, more than the padded length {length}")
    first = embeds[0]
    out = first.new_zeros(len(embeds), length, first.shape[1])
    mask = torch.zeros(len(embeds), length, dtype=torch.long, device=first.device)
    for i, e in enumerate(embeds):
        out[i, : e.shape[0]] = e
        mask[i, : e.shape[0]] = 1
    return out, mask


# ---------------------------------------------------------------- identity


# Config keys that record how a model was saved (library version, weight dtype, entry class), not what
# it computes; diffusers marks its own with a leading underscore.
_BOOKKEEPING_KEYS = frozenset({"architectures", "dtype", "torch_dtype", "transformers_version"})


def _config_hash(config: dict) -> str:
    public = {k: v for k, v in config.items() if not k.startswith("_") and k not in _BOOKKEEPING_KEYS}
    return hashlib.sha256(json.dumps(public, sort_keys=True, default=str).encode()).hexdigest()[:16]


@lru_cache(maxsize=8)
def _encoder_ids(model: str) -> tuple[tuple[str, str], ...]:
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5Config

    if model == TINY:
        tokenizer = tiny_tokenizer()
        vae_config = dict(tiny_vae().config)
        text_config = UMT5Config(vocab_size=len(tokenizer), **TINY_TEXT_CONFIG).to_dict()
        source = TINY
    else:
        root = resolve_checkpoint(model, ["vae", "text_encoder", "tokenizer"])
        tokenizer = AutoTokenizer.from_pretrained(root, subfolder="tokenizer")
        vae_config = AutoencoderKLWan.load_config(root, subfolder="vae")
        text_config = UMT5Config.from_pretrained(root, subfolder="text_encoder").to_dict()
        source = str(root.resolve()) if Path(model).expanduser().is_dir() else model
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return (
        ("model", source),
        ("vae", "AutoencoderKLWan"),
        ("vae_config", _config_hash(vae_config)),
        ("text_encoder", "UMT5EncoderModel"),
        ("text_encoder_config", _config_hash(text_config)),
        ("tokenizer", type(tokenizer).__name__),
        ("tokenizer_vocab", hashlib.sha256(vocab.encode()).hexdigest()[:16]),
    )


def encoder_ids(model: str) -> dict[str, str]:
    """What produced the latents and embeddings; equal dicts mean interchangeable shards."""
    return dict(_encoder_ids(model))
