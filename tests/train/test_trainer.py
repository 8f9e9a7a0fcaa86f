import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, load_file, save, save_file
from webdataset import TarWriter
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from longcat_data.shards import ShardError
from longcat_data.stream import ShardStream, StreamConfig, expand_shard_spec
from longcat_train.cli import train_main
from longcat_train.config import ConfigError, TrainConfig
from longcat_train.loading import load_dit
from longcat_train.lora_apply import load_loras
from longcat_train.lora_formats import read_file
from longcat_train.techniques import check_techniques
from longcat_train.trainer import lr_factor, train, training_loss

pytestmark = pytest.mark.usefixtures("single_thread")

CPU = torch.device("cpu")
TINY_FRAMES = 9  # the conftest's shards (see the tiny_frames fixture, checked below)


def test_shards_are_the_size_these_tests_assume(tiny_frames):
    assert tiny_frames == TINY_FRAMES


def tiny_config(shards: Path, out: Path, **kw) -> TrainConfig:
    values = dict(
        model="tiny",
        shards=[str(shards)],
        frames=TINY_FRAMES,
        output_dir=str(out),
        num_workers=0,
        progress=False,
        report_to="none",
        checkpointing_steps=0,
        max_train_steps=3,
        shuffle_buffer=4,
    )
    return TrainConfig(**{**values, **kw})


def one_batch(shards: Path, size: int = 2) -> dict:
    return next(iter(ShardStream(expand_shard_spec(str(shards)), StreamConfig(batch_size=size))))


def rewrite_shard(directory: Path, change) -> None:
    """Rewrite every tar of ``directory`` with ``change(sample) -> sample | None`` applied, and its
    manifest record with it (the trainer refuses shards whose size differs from the record)."""
    sizes = {}
    for tar in directory.glob("*.tar"):
        samples = list(group_by_keys(tar_file_expander(url_opener([dict(url=str(tar))]))))
        with TarWriter(str(tar), encoder=False) as out:
            for s in samples:
                s = change({k: v for k, v in s.items() if k != "__url__"})
                if s is not None:
                    out.write(s)
        sizes[tar.name] = tar.stat().st_size
    manifest_path = directory / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        for shard in manifest["shards"]:
            shard["bytes"] = sizes.get(shard["name"], shard["bytes"])
        manifest_path.write_text(json.dumps(manifest))


# ---------------------------------------------------------------- pure parts


def test_lr_schedule_is_a_function_of_the_step():
    assert [lr_factor(s, warmup=4, total=10, schedule="constant") for s in (0, 1, 3, 4, 9)] == [
        0.25,
        0.5,
        1,
        1,
        1,
    ]
    cosine = [lr_factor(s, warmup=2, total=12, schedule="cosine") for s in range(13)]
    assert cosine[:3] == [0.5, 1.0, 1.0] and cosine[-1] == 0.0
    assert all(a >= b for a, b in zip(cosine[2:], cosine[3:], strict=False))
    assert lr_factor(7, warmup=2, total=12, schedule="cosine") == pytest.approx(0.5)


# ---------------------------------------------------------------- the loss on real shard batches


class Oracle(torch.nn.Module):
    """Knows x0 and returns exactly x0 - eps; with ``frame0`` set, returns that on latent frame 0 instead."""

    def __init__(self, x0: torch.Tensor, sign: float = 1.0, frame0: float | None = None) -> None:
        super().__init__()
        self.x0, self.sign, self.frame0 = x0, sign, frame0
        self.calls: list[dict] = []

    def forward(
        self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, num_cond_latents
    ):
        self.calls.append(dict(x_t=hidden_states.clone(), num_cond=num_cond_latents))
        s = (timestep / 1000).view(-1, 1, 1, 1, 1)
        eps = (hidden_states - (1 - s) * self.x0) / s
        out = self.sign * (self.x0 - eps)
        if self.frame0 is not None:
            out[:, :, 0] = self.frame0
        return out


def test_target_sign_model_predicting_x0_minus_eps_has_zero_loss(tiny_shards, tmp_path):
    batch = one_batch(tiny_shards)
    cfg = tiny_config(tiny_shards, tmp_path)
    x0 = batch["latents"].float()
    right = training_loss(Oracle(x0), batch, cfg, torch.Generator().manual_seed(0), None, CPU)
    wrong = training_loss(Oracle(x0, sign=-1.0), batch, cfg, torch.Generator().manual_seed(0), None, CPU)
    assert right.item() < 1e-6 and wrong.item() > 0.5


@pytest.mark.parametrize("i2v", [True, False])
def test_condition_frame_is_the_clean_start_frame_and_not_in_the_loss(tiny_shards, tmp_path, i2v):
    batch = one_batch(tiny_shards)
    cfg = tiny_config(tiny_shards, tmp_path, conditioning="i2v" if i2v else "t2v")
    oracle = Oracle(batch["latents"].float(), frame0=1e3)  # garbage on frame 0
    loss = training_loss(oracle, batch, cfg, torch.Generator().manual_seed(0), None, CPU)
    call = oracle.calls[0]
    if i2v:
        assert call["num_cond"] == 1 and loss.item() < 1e-6
        assert torch.equal(call["x_t"][:, :, :1], batch["cond_latents"].float())
    else:
        assert call["num_cond"] == 0 and loss.item() > 1e4  # T2V: frame 0 is noisy and counted
        assert not torch.equal(call["x_t"][:, :, :1], batch["cond_latents"].float())


# ---------------------------------------------------------------- training runs


def test_loss_falls_when_overfitting_two_clips(tiny_shards, tmp_path):
    cfg = tiny_config(tiny_shards, tmp_path, max_train_steps=30, learning_rate=3e-3, train_batch_size=2)
    result = train(cfg)
    batch = one_batch(tiny_shards)

    def fixed_noise_loss(model):
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return sum(training_loss(model, batch, cfg, g, None, CPU).item() for _ in range(8)) / 8

    before = fixed_noise_loss(load_dit("tiny", torch.float32))
    trained = load_dit("tiny", torch.float32)
    load_loras(trained, [(result.lora_path, 1.0)], merge=True)
    after = fixed_noise_loss(trained)
    assert after < 0.85 * before, (before, after)
    assert len(result.losses) == 30 and result.skipped_steps == 0
    out = Path(cfg.output_dir)
    assert (out / "lora.safetensors").is_file() and (out / "lora_longcat.safetensors").is_file()
    comfyui, ours = read_file(out / "lora_comfyui.safetensors"), read_file(out / "lora.safetensors")
    assert comfyui.format == "comfyui" and comfyui.deltas.keys() == ours.deltas.keys()
    for name, delta in ours.deltas.items():
        assert torch.equal(comfyui.deltas[name].weight(), delta.weight()), name
    assert json.loads((out / "train_config.json").read_text())["learning_rate"] == 3e-3
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 30


# mixed: each sample of a batch of two draws one of three tasks, so the batches split into per-task calls.
MIXED = dict(
    conditioning="mixed", cond_frames=5, conditioning_mix="i2v=1,continuation=1,t2v=1", train_batch_size=2
)


@pytest.mark.parametrize("conditioning", [{}, MIXED], ids=["i2v", "mixed"])
def test_resume_matches_an_uninterrupted_run_bit_for_bit(tiny_shards, tmp_path, conditioning):
    """Stop at step 3 (the checkpoint an interrupted run leaves) and resume: steps 4-7 equal the
    uninterrupted run exactly. Two loader workers (resuming at batch 9 rotates them), gradient
    accumulation, LoRA dropout (global RNG), caption dropout (noise generator + text encoder), warmup +
    cosine (schedule); mixed conditioning (the task draws)."""
    kw = dict(
        **conditioning,
        max_train_steps=7,
        checkpointing_steps=3,
        num_workers=2,
        lora_dropout=0.1,
        caption_dropout=0.3,
        lr_scheduler="cosine",
        lr_warmup_steps=2,
        learning_rate=1e-3,
        gradient_accumulation_steps=3,
    )
    full = train(tiny_config(tiny_shards, tmp_path / "full", **kw))

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(
        tmp_path / "full" / "checkpoints" / "step-0000003", resumed_dir / "checkpoints" / "step-0000003"
    )
    resumed = train(tiny_config(tiny_shards, resumed_dir, resume="latest", **kw))

    assert sorted(resumed.losses) == [4, 5, 6, 7]
    assert [resumed.losses[s] for s in (4, 5, 6, 7)] == [full.losses[s] for s in (4, 5, 6, 7)]
    a, b = load_file(str(full.lora_path)), load_file(str(resumed.lora_path))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The schedule horizon may change on resume; what the model sees may not.
    with pytest.raises(ConfigError, match="learning_rate: 0.001 -> 0.002"):
        train(tiny_config(tiny_shards, resumed_dir, resume="latest", **{**kw, "learning_rate": 2e-3}))


def test_text_embeddings_encoded_when_the_shards_have_none(shard_copy, tmp_path):
    rewrite_shard(shard_copy, lambda s: {k: v for k, v in s.items() if k != "t5.safetensors"})
    manifest = json.loads((shard_copy / "manifest.json").read_text())
    manifest["settings"]["text_embeds"] = False
    (shard_copy / "manifest.json").write_text(json.dumps(manifest))
    result = train(tiny_config(shard_copy, tmp_path, max_train_steps=2))
    assert len(result.losses) == 2 and (tmp_path / "text_embeds.safetensors").is_file()


def test_validation_runs_through_the_sampler(tiny_shards, tmp_path):
    cfg = tiny_config(
        tiny_shards,
        tmp_path,
        max_train_steps=2,
        validation_source=str(tiny_shards),
        validation_limit=1,
        validation_every=1,
        validation_frames=5,
        validation_inference_steps=2,
        validation_area="64x64",
    )
    train(cfg)
    videos = sorted(p.relative_to(tmp_path).parts[1] for p in (tmp_path / "validation").rglob("*.mp4"))
    assert "step_000001" in videos and "step_000002" in videos


def test_simpletuner_config_trains_from_the_cli(tiny_shards, tmp_path):
    backends = [
        {
            "id": "clips",
            "type": "local",
            "dataset_type": "video",
            "is_i2v": True,
            "instance_data_dir": str(tiny_shards),
            "cache_dir_vae": "/unused",
        }
    ]
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backends))
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "--model_family": "longcat_video",
                "--model_type": "lora",
                "--lora_rank": 4,
                "--learning_rate": 1e-4,
                "--max_train_steps": 2,
                "--output_dir": str(tmp_path / "out"),
                "--train_batch_size": 1,
                "--data_backend_config": "multidatabackend.json",
                "--report_to": "none",
            }
        )
    )
    code = train_main(
        [
            "--config",
            str(tmp_path / "config.json"),
            "--model",
            "tiny",
            "--frames",
            str(TINY_FRAMES),
            "--num-workers",
            "0",
            "--no-progress",
        ]
    )
    assert code == 0
    saved = json.loads((tmp_path / "out" / "train_config.json").read_text())
    assert saved["lora_rank"] == 4 and saved["shards"] == [str(tiny_shards)] and saved["max_train_steps"] == 2


# ---------------------------------------------------------------- bad input


def test_corrupt_member_is_skipped_and_counted(shard_copy, tmp_path):
    def damage(sample):
        if sample["__key__"].startswith("beach"):
            sample["latents.safetensors"] = sample["latents.safetensors"][:-100]
        return sample

    rewrite_shard(shard_copy, damage)
    result = train(tiny_config(shard_copy, tmp_path, max_train_steps=3))
    assert len(result.losses) == 3 and result.corrupt_samples >= 1


def test_non_finite_loss_skips_the_update_and_training_goes_on(shard_copy, tmp_path, caplog):
    def poison(sample):
        if sample["__key__"].startswith("beach"):
            latents = load(sample["latents.safetensors"])["latents"]
            sample["latents.safetensors"] = save({"latents": torch.full_like(latents, float("nan"))})
        return sample

    rewrite_shard(shard_copy, poison)
    result = train(tiny_config(shard_copy, tmp_path, max_train_steps=4))
    assert 1 <= result.skipped_steps < 4 and "update skipped" in caplog.text
    assert "non-finite loss on sample(s) beach_waves" in caplog.text  # the warning names the sample
    finite = [v for v in result.losses.values() if v == v]
    assert len(finite) == 4 - result.skipped_steps
    assert all(torch.isfinite(w).all() for w in load_file(str(result.lora_path)).values())


def test_user_errors_are_one_line(tiny_shards, shard_copy, tmp_path, capsys):
    def run(*args: str) -> str:
        code = train_main(
            [
                "--model",
                "tiny",
                "--frames",
                str(TINY_FRAMES),
                "--output-dir",
                str(tmp_path / "o"),
                "--num-workers",
                "0",
                "--no-progress",
                "--report-to",
                "none",
                "--max-train-steps",
                "1",
                *args,
            ]
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        return err[0]

    assert "no shards" in run()
    assert "no shards (*.tar) in directory" in run("--shards", str(tmp_path))
    assert "match no Linear" in run("--shards", str(tiny_shards), "--lora-targets", "attn.qkvz")
    assert "trains on 13 frames" in run("--shards", str(tiny_shards), "--frames", "13")
    not_lora, other = tmp_path / "model.safetensors", tmp_path / "sdxl.safetensors"
    save_file({"blocks.0.attn.qkv.weight": torch.zeros(4, 4)}, str(not_lora))
    save_file(
        {
            "blocks.0.attn.qkv.lora_A.weight": torch.zeros(4, 32),
            "blocks.0.attn.qkv.lora_B.weight": torch.zeros(96, 4),
            "blocks.0.attn.qkv.alpha": torch.tensor(4.0),
        },
        str(other),
    )
    assert run("--shards", str(tiny_shards), "--base-lora", f"{not_lora}:0.5") == (
        f"longcat-train: error: base_lora {not_lora}: not a LongCat-Video LoRA in any layout this tool reads (e.g. key blocks.0.attn.qkv.weight)"
    )
    assert run("--shards", str(tiny_shards), "--validation-lora", "x.safetensors:inf") == (
        "longcat-train: error: --validation-lora 'x.safetensors:inf': must be PATH or PATH:STRENGTH, "
        "STRENGTH a finite number in [-4, 4]"
    )
    assert run("--shards", str(tiny_shards), "--base-lora", str(other)) == (
        f"longcat-train: error: base_lora: LoRA {other}: blocks.0.attn.qkv is [96, 32] in the LoRA but "
        "[384, 128] in the DiT (a LoRA for another model?)"
    )

    manifest = json.loads((shard_copy / "manifest.json").read_text())
    manifest["encoders"]["text_encoder_config"] = "0000"
    (shard_copy / "manifest.json").write_text(json.dumps(manifest))
    assert "other encoders" in run("--shards", str(shard_copy))


def test_sample_from_other_encoders_is_refused_without_a_manifest(shard_copy, tmp_path):
    def relabel(sample):
        meta = json.loads(sample["json"])
        meta["encoders"]["model"] = "someone-else"
        sample["json"] = json.dumps(meta).encode()
        return sample

    rewrite_shard(shard_copy, relabel)
    (shard_copy / "manifest.json").unlink()
    with pytest.raises(ShardError, match="other encoders"):
        train(tiny_config(shard_copy, tmp_path))


# ---------------------------------------------------------------- two processes


def torchrun(shards: Path, out: Path, *args: str) -> list[dict]:
    """Two CPU processes on gloo through torchrun (on a free port); returns rank 0's metrics lines."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "longcat_train.cli",
        "--model",
        "tiny",
        "--shards",
        str(shards),
        "--frames",
        str(TINY_FRAMES),
        "--output-dir",
        str(out),
        "--max-train-steps",
        "3",
        "--num-workers",
        "1",
        "--no-progress",
        "--checkpointing-steps",
        "2",
        "--report-to",
        "none",
        *args,
    ]
    proc = subprocess.run(
        cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_ddp_two_processes_on_gloo_and_exact_resume(tiny_shards, tmp_path):
    steps = torchrun(tiny_shards, tmp_path / "ddp")
    assert [s["step"] for s in steps] == [1, 2, 3]  # rank 0 logs, once per step
    final = tmp_path / "ddp" / "checkpoints" / "step-0000003"
    state = json.loads((final / "state.json").read_text())
    assert state["world_size"] == 2 and state["samples"] == 6 and state["batches"] == 3
    assert (final / "rng-rank00001.pt").is_file() and (tmp_path / "ddp" / "lora.safetensors").is_file()

    shutil.copytree(
        tmp_path / "ddp" / "checkpoints" / "step-0000002", tmp_path / "again" / "checkpoints" / "step-0000002"
    )
    resumed = torchrun(tiny_shards, tmp_path / "again", "--resume")
    assert [(s["step"], s["loss"]) for s in resumed] == [(3, steps[2]["loss"])]


@pytest.mark.parametrize("extra", [(), ("--fp8-matmuls",)], ids=["bf16", "fp8_matmuls"])
def test_fsdp2_two_processes_on_gloo(tiny_shards, tmp_path, extra):
    steps = torchrun(tiny_shards, tmp_path / "fsdp", "--fsdp", "--max-train-steps", "2", *extra)
    assert [s["step"] for s in steps] == [1, 2]
    weights = load_file(str(tmp_path / "fsdp" / "lora.safetensors"))
    assert len(weights) == 2 * 8 * 2 and all(v.dim() == 2 for v in weights.values())


def test_small_gpu_options_train_the_same_adapter(tiny_shards, tmp_path):
    """Block swap, activation offload and feed-forward chunks move and regroup work, not the math: the
    same steps give the same losses (up to matmul rounding) as the plain run."""
    plain = train(tiny_config(tiny_shards, tmp_path / "plain", max_train_steps=3))
    small = train(
        tiny_config(
            tiny_shards,
            tmp_path / "small",
            max_train_steps=3,
            block_swap=1,
            offload_activations=True,
            feed_forward_chunks=2,
            gradient_checkpointing="full",
        )
    )
    assert small.losses.keys() == plain.losses.keys() == {1, 2, 3}
    assert torch.allclose(
        torch.tensor(list(small.losses.values())), torch.tensor(list(plain.losses.values())), rtol=1e-5
    )


def test_activation_offload_with_compile_is_refused(tiny_shards, tmp_path):
    with pytest.raises(ConfigError, match="offload_activations"):
        check_techniques(tiny_config(tiny_shards, tmp_path, compile=True, offload_activations=True))


def test_compile_with_block_swap_is_refused_before_loading(tiny_shards, tmp_path):
    cfg = tiny_config(tiny_shards, tmp_path, compile=True, block_swap=1)
    with pytest.raises(ConfigError, match="compile and block_swap"):
        train(cfg)


def test_fp8_matmuls_train_the_adapter_close_to_the_plain_run(tiny_shards, tmp_path):
    """Float8 matmuls change the arithmetic of the frozen linears only: the same steps give nearly the same
    losses, and the exported adapter has the plain run's names and shapes."""
    plain = train(tiny_config(tiny_shards, tmp_path / "plain"))
    fp8 = train(tiny_config(tiny_shards, tmp_path / "fp8", fp8_matmuls=True))
    assert fp8.losses.keys() == plain.losses.keys() == {1, 2, 3}
    ours, theirs = torch.tensor(list(fp8.losses.values())), torch.tensor(list(plain.losses.values()))
    assert not torch.equal(ours, theirs) and torch.allclose(ours, theirs, rtol=0.05)
    a, b = (load_file(str(tmp_path / run / "lora.safetensors")) for run in ("plain", "fp8"))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_compile_tune_reaches_torch_compile(tiny_shards, tmp_path, monkeypatch):
    seen = []

    def fake_compile(fn, **kwargs):
        seen.append(kwargs)
        return fn  # eager: the options' path is what is tested here, not inductor

    monkeypatch.setattr(torch, "compile", fake_compile)
    train(tiny_config(tiny_shards, tmp_path, compile=True, compile_tune=True, max_train_steps=1))
    assert seen == [
        {"fullgraph": True, "options": {"triton.multi_kernel": 1, "coordinate_descent_tuning": True}}
    ]


@pytest.mark.parametrize(
    "command, flag", [("train_main", "--fp8-matmuls"), ("sample_main", "--lora-strength")]
)
def test_help_answers_without_importing_the_model_stack(command, flag):
    code = (
        f"import sys\nfrom longcat_train.cli import {command}\ntry:\n    {command}(['--help'])\n"
        "except SystemExit:\n    pass\nprint(sorted(m for m in ('diffusers', 'peft', 'torchao') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""
    assert flag in proc.stdout and proc.stdout.strip().endswith("[]")


# ---------------------------------------------------------------- training on top of other LoRAs


def _fixed_inputs() -> dict:
    g = torch.Generator().manual_seed(5)
    return dict(
        hidden_states=torch.randn(1, 16, 3, 4, 4, generator=g),
        timestep=torch.tensor([400.0]),
        encoder_hidden_states=torch.randn(1, 6, 64, generator=g),
        num_cond_latents=1,
    )


def test_base_lora_trains_underneath_and_stacks_at_inference(
    tiny_shards, tmp_path, monkeypatch, official_lora_file
):
    """A LoRA trained with --base-lora (an official split file) and --validation-lora saves only itself;
    base + both LoRAs sampled together is the model the run validated; the validation LoRA never acts in
    training; a changed base_lora is refused on resume."""
    from longcat_train import validation as validation_module
    from longcat_train.architecture import BLOCK_LINEARS
    from longcat_train.lora_formats import read_file

    tiny = load_dit("tiny", torch.float32)
    base_lora = official_lora_file(
        tmp_path / "distill.safetensors",
        tiny,
        {"blocks.0.attn.qkv": 3, "blocks.1.adaLN_modulation.1": 6},
        2,
        1,
    )
    extra = official_lora_file(tmp_path / "extra.safetensors", tiny, {"final_layer.linear": 1}, 2, 2)
    seen: dict = {}

    def probe(model, vae, pairs, embeds, settings, *, step, **kw):
        with torch.no_grad():
            seen["lora"] = model(**_fixed_inputs())
            with model.disable_adapter():
                seen["base"] = model(**_fixed_inputs())
        return []

    monkeypatch.setattr(validation_module, "run_validation", probe)
    common = dict(max_train_steps=2, learning_rate=1e-2, base_lora=[f"{base_lora}:0.8"])
    validating = dict(
        validation_source=str(tiny_shards), validation_limit=1, validation_area="64x64", validation_every=1
    )
    cfg = tiny_config(
        tiny_shards, tmp_path / "run", validation_lora=[f"{extra}:-1.5"], **common, **validating
    )
    result = train(cfg)
    saved = read_file(result.lora_path)
    assert set(saved.deltas) == {f"blocks.{i}.{name}" for i in range(2) for name in BLOCK_LINEARS}
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["base_lora"] == cfg.base_lora

    stacked = load_dit("tiny", torch.float32)
    load_loras(stacked, [(base_lora, 0.8), (result.lora_path, 1.0), (extra, -1.5)], merge=True)
    without_trained = load_dit("tiny", torch.float32)
    load_loras(without_trained, [(extra, -1.5), (base_lora, 0.8)], merge=False)
    with torch.no_grad():
        torch.testing.assert_close(stacked(**_fixed_inputs()), seen["lora"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(without_trained(**_fixed_inputs()), seen["base"], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(seen["lora"], seen["base"], atol=1e-3)

    plain = load_file(str(train(tiny_config(tiny_shards, tmp_path / "plain", **common)).lora_path))
    validated = load_file(str(result.lora_path))
    assert plain.keys() == validated.keys() and all(torch.equal(plain[k], validated[k]) for k in plain)
    changed = tiny_config(
        tiny_shards, tmp_path / "run", **{**common, "base_lora": [f"{base_lora}:0.5"], "max_train_steps": 3}
    )
    changed.resume = "latest"
    with pytest.raises(ConfigError, match="base_lora"):
        train(changed)
    # The same setting, but another file under the name: refused too.
    official_lora_file(
        Path(base_lora), tiny, {"blocks.0.attn.qkv": 3, "blocks.1.adaLN_modulation.1": 6}, 2, 9
    )
    same = tiny_config(tiny_shards, tmp_path / "run", **{**common, "max_train_steps": 3}, resume="latest")
    with pytest.raises(ConfigError, match=f"base_lora {base_lora} is not the file it trained on"):
        train(same)


def test_memory_budget_applies_the_plan_for_the_shards_bucket(
    tiny_shards, tmp_path, monkeypatch, applied_checkpointing
):
    """--memory-budget: the trainer plans per-block checkpointing for the manifest's bucket (64x64 here,
    not the 480x832 --area default) and trains bit for bit what no checkpointing trains (fp32)."""
    from dataclasses import replace

    from longcat_train import memory_plan, planning
    from longcat_train.dit_config import DiTConfig

    cfg = tiny_config(tiny_shards, tmp_path / "plain", gradient_checkpointing="none", max_train_steps=2)
    shape = planning.model_shape(DiTConfig.tiny(), list(cfg.lora_targets))
    work, cal = planning.workload(cfg, (64, 64)), planning.calibration()

    def peak(*modes: str) -> float:
        flags = replace(planning.flags_of(cfg, shape.depth), checkpointing=modes)
        return memory_plan.predict(shape, work, flags, cal).peak_bytes * cal.reserve

    budget_gb = (peak("none", "selective") + peak("none", "none")) / 2 / memory_plan.GB
    applied = applied_checkpointing
    plain = train(cfg)
    planned = train(
        replace(
            cfg,
            output_dir=str(tmp_path / "planned"),
            memory_budget=str(budget_gb),
            gradient_checkpointing="full",
        )
    )
    assert applied == [("none", "none"), ("none", "selective")]
    assert planned.losses == plain.losses
    with pytest.raises(ConfigError, match="memory_budget = 1e-06: even full checkpointing"):
        train(replace(cfg, output_dir=str(tmp_path / "small"), memory_budget="1e-06"))


def test_validation_distill_lora_samples_distilled_with_the_lora_on(
    tiny_shards, tmp_path, monkeypatch, official_lora_file
):
    """--validation-distill-lora: the validation videos use the distilled schedule at its 16 steps and
    guidance 1 (where the run keeps the plain defaults), with the LoRA on for both rows; training does
    not see it."""
    from longcat_train import validation as validation_module

    tiny = load_dit("tiny", torch.float32)
    distill = official_lora_file(tmp_path / "distill.safetensors", tiny, {"blocks.0.attn.qkv": 3}, 2, 3)
    seen: dict = {}

    def probe(model, vae, pairs, embeds, settings, *, step, **kw):
        seen["settings"], seen["prompts"] = settings, sorted(embeds)
        with torch.no_grad(), model.disable_adapter():
            seen["base"] = model(**_fixed_inputs())
        return []

    monkeypatch.setattr(validation_module, "run_validation", probe)
    validating = dict(validation_source=str(tiny_shards), validation_limit=1, validation_area="64x64")
    cfg = tiny_config(
        tiny_shards, tmp_path / "run", max_train_steps=1, validation_distill_lora=distill, **validating
    )
    assert cfg.validation_loras == [distill]
    train(cfg)
    settings = seen["settings"]
    assert settings.distill and (settings.steps, settings.guidance) == (16, 1.0)
    assert "" not in seen["prompts"]  # no negative pass without guidance
    with_distill = load_dit("tiny", torch.float32)
    load_loras(with_distill, [(distill, 1.0)], merge=False)
    with torch.no_grad():
        torch.testing.assert_close(with_distill(**_fixed_inputs()), seen["base"], rtol=1e-5, atol=1e-5)
    kept = tiny_config(
        tiny_shards,
        tmp_path / "b",
        validation_distill_lora=distill,
        validation_inference_steps=8,
        **validating,
    )
    assert (kept.validation_settings.steps, kept.validation_settings.guidance) == (8, 1.0)
    with pytest.raises(ConfigError, match="validation_distill_lora .*no such LoRA file"):
        train(tiny_config(tiny_shards, tmp_path / "c", validation_distill_lora="none.safetensors"))
