"""Shards for the trainer tests, made once per session by the real `longcat-prep demo` + `shard --model tiny`."""

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from longcat_data import cli as prep

# Two demo clips at the smallest useful size: 64x64 pixels, 9 frames -> latents [16, 3, 8, 8].
TINY_FRAMES = 9
TINY_AREA = "64x64"
CLIPS = ("beach_waves", "spinning_top")


@contextmanager
def _threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles as a fresh process would: the compiled block step is one code object, and the
    graphs earlier tests built (a mode, a backend, a shape each) would count toward dynamo's recompile
    limit."""
    yield
    torch._dynamo.reset()


@pytest.fixture
def single_thread():
    """One intra-op thread for tiny models: on a small shared machine torch's spinning pool threads and the
    loader processes oversubscribe the cores, and a millisecond step takes seconds."""
    with _threads(1):
        yield


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """A shard directory (manifest + one tar) holding two clips with text embeddings."""
    with _threads(1):
        return _make_tiny_shards(tmp_path_factory.mktemp("prep"))


def _make_tiny_shards(root: Path) -> Path:
    assert prep.main(["demo", str(root / "demo")]) == 0
    videos = root / "two_clips"
    videos.mkdir()
    for name in CLIPS:
        for suffix in (".mp4", ".txt"):
            shutil.copy(root / "demo" / f"{name}{suffix}", videos / f"{name}{suffix}")
    out = root / "shards"
    code = prep.main(
        [
            "shard",
            str(videos),
            str(out),
            "--model",
            "tiny",
            "--frames",
            str(TINY_FRAMES),
            "--area",
            TINY_AREA,
            "--workers",
            "0",
        ]
    )
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(s["samples"] for s in manifest["shards"]) == len(CLIPS)
    return out


@pytest.fixture
def applied_checkpointing(monkeypatch) -> list[tuple[str, ...]]:
    """The per-block checkpointing modes of every model the trainer builds, in order (it records what
    ``apply_techniques`` applied)."""
    from longcat_train import trainer
    from longcat_train.model import transformer_of

    applied: list[tuple[str, ...]] = []
    apply = trainer.apply_techniques

    def recording(base, *args, **kwargs):
        out = apply(base, *args, **kwargs)
        applied.append(transformer_of(out[0]).block_checkpointing)
        return out

    monkeypatch.setattr(trainer, "apply_techniques", recording)
    return applied


@pytest.fixture
def tiny_frames() -> int:
    return TINY_FRAMES


@pytest.fixture
def shard_copy(tiny_shards, tmp_path) -> Path:
    """A private copy of the session shards that a test may damage."""
    return Path(shutil.copytree(tiny_shards, tmp_path / "shards", ignore=shutil.ignore_patterns(".prep")))


@pytest.fixture(scope="module")
def tiny() -> dict:
    """The tiny DiT and VAE, and the tiny text encoder's embeddings of a prompt and of the empty prompt."""
    from longcat_data.encode import encode_text, load_text_encoder, load_vae
    from longcat_train.loading import tiny_dit

    model = tiny_dit().eval()
    tokenizer, text_encoder = load_text_encoder("tiny")
    prompt, negative = encode_text(tokenizer, text_encoder, ["a cat walks across a sunny garden", ""])
    return dict(model=model, vae=load_vae("tiny"), prompt=prompt, negative=negative)


def _write_official_lora(
    path: Path, model: torch.nn.Module, modules: dict[str, int], rank: int, seed: int
) -> str:
    """A random LoRA in the official layout on ``modules`` (path -> row blocks n; n > 1 written as the
    official loader's split ``lora_up.blocks.{i}``), a different alpha_scale per module."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, (module, n) in enumerate(modules.items()):
        linear = model.get_submodule(module)
        name = "lora___lorahyphen___" + module.replace(".", "___lorahyphen___")
        tensors[f"{name}.lora_down.weight"] = torch.randn(n * rank, linear.in_features, generator=g) * 0.2
        ups = [torch.randn(linear.out_features // n, rank, generator=g) * 0.2 for _ in range(n)]
        if n == 1:
            tensors[f"{name}.lora_up.weight"] = ups[0]
        else:
            tensors |= {f"{name}.lora_up.blocks.{b}.weight": up for b, up in enumerate(ups)}
        tensors[f"{name}.alpha_scale"] = torch.tensor(0.25 + 0.25 * i)
    save_file(tensors, str(path))
    return str(path)


@pytest.fixture
def official_lora_file():
    """``(path, model, {module: row blocks}, rank, seed) -> path``: writes a random official-layout LoRA."""
    return _write_official_lora


OFFICIAL_DIR = os.environ.get("LONGCAT_OFFICIAL_DIR")


class OfficialFacing(torch.nn.Module):
    """Our DiT behind the official pipeline's call: prompt embeddings arrive as [B, 1, L, C]."""

    cp_split_hw = None
    dtype = torch.float32
    config = SimpleNamespace(in_channels=16)

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.inputs: list[torch.Tensor] = []  # hidden_states of every call

    def forward(
        self,
        hidden_states,
        timestep,
        encoder_hidden_states,
        encoder_attention_mask=None,
        num_cond_latents=0,
        return_kv=False,
        kv_cache_dict=None,
        skip_crs_attn=False,
        offload_kv_cache=False,
    ):
        from longcat_train.kv_cache import cache_condition

        if return_kv:  # the official continuation's condition pass: our cache stands in for its dict
            cache = cache_condition(self.model, hidden_states, encoder_hidden_states.squeeze(1), None)
            return None, {"ours": cache}
        self.inputs.append(hidden_states.clone())
        cached = {"cond_cache": kv_cache_dict["ours"]} if kv_cache_dict else {}
        return self.model(
            hidden_states,
            timestep,
            encoder_hidden_states.squeeze(1),
            encoder_attention_mask,
            num_cond_latents,
            **cached,
        )


@pytest.fixture
def official(tiny: dict, monkeypatch) -> SimpleNamespace:
    """The official pipeline module and a ``LongCatVideoPipeline`` driving our tiny DiT (``.dit``, an
    ``OfficialFacing``) with the tiny VAE and text encoder, on the CPU; ``.tokenizer`` / ``.text_encoder``.
    Skips the test unless ``LONGCAT_OFFICIAL_DIR`` names an official checkout."""
    if not OFFICIAL_DIR:
        pytest.skip("set LONGCAT_OFFICIAL_DIR to an official checkout")
    for module in ("einops", "ftfy", "loguru", "regex"):
        pytest.importorskip(module)
    monkeypatch.syspath_prepend(OFFICIAL_DIR)
    module = pytest.importorskip("longcat_video.pipeline_longcat_video")
    from longcat_data.encode import load_text_encoder

    tokenizer, text_encoder = load_text_encoder("tiny")
    pipe = module.LongCatVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=tiny["vae"],
        scheduler=module.FlowMatchEulerDiscreteScheduler(shift=12.0),
        dit=OfficialFacing(tiny["model"]),
    )
    pipe.device = "cpu"  # the official class assumes CUDA
    return SimpleNamespace(module=module, pipe=pipe, tokenizer=tokenizer, text_encoder=text_encoder)
