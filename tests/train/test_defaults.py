"""The default flags: compile, fp8_matmuls and gradient_checkpointing are auto, resolved per device by
``planning.resolve_auto`` (fake device descriptions here), by the trainer before it builds, and by --plan."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from longcat_train import memory_plan as mp
from longcat_train import planning
from longcat_train.cli import load_config, parse_train_args, train_main, train_parser
from longcat_train.config import AUTO, TrainConfig
from longcat_train.planning import Gpu, resolve_auto
from longcat_train.techniques import RULES, check_techniques

H200 = Gpu("NVIDIA H200", 141 * mp.GB, (9, 0))
A100 = Gpu("NVIDIA A100-SXM4-80GB", 80 * mp.GB, (8, 0))
RTX_4090 = Gpu("NVIDIA GeForce RTX 4090", 24 * mp.GB, (8, 9))
DEVICES = {"h200": H200, "a100": A100, "4090": RTX_4090, "cpu": None}
ROOT = Path(__file__).resolve().parents[2]


def _fits(resolved: planning.Resolved, gpu: Gpu) -> bool:
    cfg, cal = resolved.cfg, planning.calibration()
    shape = planning.shape_of(cfg)
    flags = replace(planning.flags_of(cfg, shape.depth), checkpointing=resolved.checkpointing)
    return mp.predict(shape, planning.workload(cfg), flags, cal).peak_bytes * cal.reserve <= gpu.memory_bytes


def test_the_defaults_are_auto_and_the_flags_set_them():
    cfg = TrainConfig()
    assert (cfg.compile, cfg.fp8_matmuls, cfg.gradient_checkpointing) == (None, None, AUTO)
    assert parse_train_args([]).compile is None
    typed = parse_train_args(["--no-compile", "--fp8-matmuls", "--gradient-checkpointing", "full"])
    assert (typed.compile, typed.fp8_matmuls, typed.gradient_checkpointing) == (False, True, "full")


def test_config_files_set_or_leave_the_autos(tmp_path):
    (tmp_path / "t.toml").write_text("compile = true\nfp8_matmuls = false\n")
    (tmp_path / "j.json").write_text(json.dumps({"compile": None, "gradient_checkpointing": "auto"}))
    toml, js = load_config(tmp_path / "t.toml"), load_config(tmp_path / "j.json")
    assert (toml.compile, toml.fp8_matmuls, toml.gradient_checkpointing) == (True, False, AUTO)
    assert (js.compile, js.fp8_matmuls) == (None, None)
    (tmp_path / "bad.json").write_text(json.dumps({"compile": "yes"}))
    with pytest.raises(ValueError, match="compile = 'yes': must be true or false or unset"):
        load_config(tmp_path / "bad.json")


def test_help_says_what_auto_resolves_to():
    text = " ".join(train_parser().format_help().split())
    assert "--gradient-checkpointing {auto,selective,full,elementwise,none}" in text
    assert (
        "under the GPU's memory (what --memory-budget auto does), elsewhere (or with --fsdp) selective [default: auto]"
        in text
    )
    assert (
        "default auto: on CUDA where Triton can build kernels, without block swap, activation offload or "
        "fsdp, when the run's steps save" in text
    )
    assert "default auto: on with compile on such a GPU" in text


def test_on_an_h200_the_defaults_compile_use_float8_and_plan_checkpointing_per_block():
    resolved = resolve_auto(TrainConfig(), H200, steps=1000)
    cfg = resolved.cfg
    assert (cfg.compile, cfg.fp8_matmuls, cfg.gradient_checkpointing, cfg.memory_budget) == (
        True,
        True,
        "selective",
        AUTO,
    )
    assert len(resolved.checkpointing) == 48 and "elementwise" in resolved.checkpointing
    assert _fits(resolved, H200)
    assert resolved.line.startswith(
        "auto flags on NVIDIA H200: --compile --fp8-matmuls --memory-budget auto ("
    )
    assert "checkpointing planned per block under 141 GB" in resolved.line
    assert resolved.plan.startswith(
        "memory budget 141 GB at 480x832x93: checkpointing per block elementwise x"
    )
    assert resolved.warning is None and resolved.problem is None


def test_on_an_a100_the_defaults_compile_in_bf16():
    resolved = resolve_auto(TrainConfig(), A100, steps=1000)
    assert (resolved.cfg.compile, resolved.cfg.fp8_matmuls) == (True, False)
    assert "full" in resolved.checkpointing and _fits(resolved, A100)
    assert "no float8 tensor cores (compute capability 8.0)" in resolved.line


def test_where_kernels_cannot_be_built_the_default_does_not_compile():
    # A compiled run without Triton or a C compiler would fail at its first step, after the model loaded.
    bare = replace(H200, no_compile="no C compiler (cc, gcc, clang) for Triton's kernel launchers")
    resolved = resolve_auto(TrainConfig(), bare, steps=1000)
    assert (resolved.cfg.compile, resolved.cfg.fp8_matmuls) == (False, False)
    assert "--no-compile --no-fp8-matmuls" in resolved.line
    assert "no compile: no C compiler (cc, gcc, clang) for Triton's kernel launchers" in resolved.line
    assert resolve_auto(TrainConfig(compile=True), bare, steps=1000).cfg.compile  # typed: the user's call


def test_what_compiling_needs_is_read_from_the_machine(monkeypatch):
    installed = {"triton": True}
    monkeypatch.setattr(planning.importlib.util, "find_spec", lambda name: installed.get(name) or None)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(planning.shutil, "which", lambda name: None)
    assert planning.compile_unavailable() == "no C compiler (cc, gcc, clang) for Triton's kernel launchers"
    monkeypatch.setenv("CC", "my-cc")
    assert planning.compile_unavailable() == "no C compiler (my-cc) for Triton's kernel launchers"
    monkeypatch.setattr(
        planning.shutil, "which", lambda name: f"/opt/bin/{name}" if name == "my-cc" else None
    )
    assert planning.compile_unavailable() is None
    monkeypatch.setattr(planning.sysconfig, "get_paths", lambda: {"include": "/nowhere"})
    assert planning.compile_unavailable() == (
        "no Python headers (/nowhere/Python.h; the python3-dev package) for Triton's kernel launchers"
    )
    installed["triton"] = False
    assert planning.compile_unavailable() == "triton is not installed"


def test_on_a_24gb_card_with_block_swap_nothing_compiles_and_swapped_blocks_stay_checkpointed():
    recipe = dict(base_model_precision="fp8-torchao", feed_forward_chunks=4, offload_activations=True)
    resolved = resolve_auto(TrainConfig(block_swap=40, **recipe), RTX_4090, steps=1000)
    assert (resolved.cfg.compile, resolved.cfg.fp8_matmuls) == (False, False)
    assert resolved.cfg.memory_budget == AUTO and _fits(resolved, RTX_4090)
    assert "none" not in resolved.checkpointing and "selective" in resolved.checkpointing
    assert "no compile with block_swap" in resolved.line
    check_techniques(resolved.cfg)


def test_a_24gb_card_that_nothing_fits_falls_back_to_full_checkpointing_with_a_warning():
    resolved = resolve_auto(TrainConfig(), RTX_4090, steps=1000)
    assert (resolved.cfg.gradient_checkpointing, resolved.cfg.memory_budget) == ("full", None)
    assert resolved.checkpointing is None and resolved.problem is None
    assert "the GPU's memory: even full checkpointing on every block is predicted not to fit 24 GB" in (
        resolved.warning
    )
    assert "--gradient-checkpointing full (nothing fits 24 GB" in resolved.line


def test_without_cuda_every_auto_is_off_or_selective():
    resolved = resolve_auto(TrainConfig(model="tiny"), None, steps=10**9)
    assert (resolved.cfg.compile, resolved.cfg.fp8_matmuls, resolved.cfg.gradient_checkpointing) == (
        False,
        False,
        "selective",
    )
    assert resolved.cfg.memory_budget is None and resolved.checkpointing is None
    assert resolved.line == (
        "auto flags without a CUDA device: --no-compile --no-fp8-matmuls --gradient-checkpointing selective"
    )


def test_compile_is_on_only_when_the_steps_repay_compiling():
    cal = planning.calibration()
    eager = resolve_auto(TrainConfig(compile=False), H200, steps=1).cfg
    compiled = resolve_auto(TrainConfig(compile=True), H200, steps=1)
    shape, work = planning.shape_of(eager), planning.workload(eager)

    def seconds(resolved: planning.Resolved) -> float:
        flags = replace(planning.flags_of(resolved.cfg, 48), checkpointing=resolved.checkpointing)
        return mp.predict(shape, work, flags, cal).step_seconds

    saving = seconds(resolve_auto(eager, H200)) - seconds(compiled)
    breakeven = mp.compile_cost(compiled.checkpointing, cal) / saving
    assert 1 < breakeven < 1000
    assert not resolve_auto(TrainConfig(), H200, steps=int(breakeven)).cfg.compile
    assert resolve_auto(TrainConfig(), H200, steps=int(breakeven) + 1).cfg.compile
    # gradient accumulation: each optimizer step runs several micro-steps, each saving as much
    accumulated = TrainConfig(gradient_accumulation_steps=4)
    assert resolve_auto(accumulated, H200, steps=int(breakeven / 4) + 1).cfg.compile
    assert resolve_auto(TrainConfig(), H200, steps=None).cfg.compile  # not known: long enough


def test_explicit_flags_win_over_the_autos():
    off = resolve_auto(TrainConfig(compile=False), H200, steps=1000).cfg
    assert (off.compile, off.fp8_matmuls) == (False, False)  # float8 matmuls only where compiled
    bf16 = resolve_auto(TrainConfig(fp8_matmuls=False), H200, steps=1000).cfg
    assert (bf16.compile, bf16.fp8_matmuls) == (True, False)
    short = resolve_auto(TrainConfig(compile=True), H200, steps=1).cfg
    assert (short.compile, short.fp8_matmuls) == (True, True)
    uniform = resolve_auto(TrainConfig(gradient_checkpointing="full"), H200, steps=1000)
    assert (uniform.cfg.gradient_checkpointing, uniform.cfg.memory_budget, uniform.checkpointing) == (
        "full",
        None,
        None,
    )
    budget = resolve_auto(TrainConfig(memory_budget="100"), H200, steps=1000)
    assert budget.cfg.memory_budget == "100" and budget.plan.startswith("memory budget 100 GB")
    assert "--gradient-checkpointing selective" in budget.line
    tight = resolve_auto(TrainConfig(memory_budget="1"), H200, steps=1000)
    assert tight.problem.startswith("memory_budget = 1: even full checkpointing")
    cpu = resolve_auto(TrainConfig(model="tiny", compile=True, fp8_matmuls=True), None)
    assert (cpu.cfg.compile, cpu.cfg.fp8_matmuls, cpu.cfg.gradient_checkpointing) == (True, True, "selective")
    explicit = TrainConfig(compile=True, fp8_matmuls=False, gradient_checkpointing="none")
    assert resolve_auto(explicit, H200, steps=1000).line is None


def test_float8_needs_bf16_and_an_unquantised_base():
    assert not resolve_auto(TrainConfig(mixed_precision="fp32"), H200, steps=1000).cfg.fp8_matmuls
    quantised = resolve_auto(TrainConfig(base_model_precision="int8-quanto"), H200, steps=1000)
    assert quantised.cfg.compile and not quantised.cfg.fp8_matmuls
    assert "no float8 matmuls with base_model_precision = int8-quanto" in quantised.line
    assert resolve_auto(TrainConfig(base_model_precision="bf16"), H200, steps=1000).cfg.fp8_matmuls


def test_auto_float8_says_why_it_is_off_under_full_checkpointing_or_a_tight_budget():
    full = resolve_auto(TrainConfig(gradient_checkpointing="full"), H200, steps=1000)
    assert full.cfg.compile and not full.cfg.fp8_matmuls
    assert "no float8 matmuls with gradient_checkpointing = full" in full.line
    # 64 GB: compiled float8 under selective on every block (float8 weights, ~60 GB) does not fit
    tight = resolve_auto(TrainConfig(), Gpu("a GPU with 64 GB", 64 * mp.GB), steps=1000)
    assert tight.cfg.compile and not tight.cfg.fp8_matmuls
    assert "which does not fit" in tight.line


def test_fsdp_keeps_selective_checkpointing_and_eager_blocks():
    resolved = resolve_auto(TrainConfig(fsdp=True), H200, steps=1000)
    assert (resolved.cfg.gradient_checkpointing, resolved.cfg.memory_budget, resolved.cfg.compile) == (
        "selective",
        None,
        False,
    )
    check_techniques(resolved.cfg)


AUTO_VALUES = {"compile": None, "fp8_matmuls": None, "gradient_checkpointing": AUTO}
AUTO_RULES = [r for r in RULES if set(r.example) & set(AUTO_VALUES)]


@pytest.mark.parametrize("device", DEVICES, ids=list(DEVICES))
@pytest.mark.parametrize("rule", AUTO_RULES, ids=["+".join(r.settings) for r in AUTO_RULES])
def test_an_auto_never_takes_a_value_a_rule_refuses(rule, device):
    """Every rule that a value of an auto field takes part in: with that field left auto, the rest of
    the example as typed, the resolution passes the rules on every device."""
    values = {k: AUTO_VALUES.get(k, v) for k, v in rule.example.items()}
    cfg = TrainConfig(**values)
    check_techniques(cfg)  # an auto passes the rules when the flags are read
    resolved = resolve_auto(cfg, DEVICES[device], steps=1000)
    check_techniques(resolved.cfg)
    assert not any(planning.is_auto(resolved.cfg, name) for name in planning.AUTO_FIELDS)


def test_an_explicit_compile_with_block_swap_is_still_refused():
    with pytest.raises(ValueError, match="compile and block_swap do not mix"):
        parse_train_args(["--compile", "--block-swap", "2"])
    parse_train_args(["--block-swap", "2"])  # auto: resolves off


def test_plan_prints_the_resolution_of_the_defaults_and_the_fastest_command(capsys, tmp_path):
    argv = ["--plan", "--gpu-memory", "141", "--shards", "/data/shards", "--output-dir", str(tmp_path / "o")]
    assert train_main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = resolve_auto(parse_train_args(argv), Gpu("a GPU with 141 GB", 141 * mp.GB), steps=1000)
    assert lines[1].startswith("current flags: peak") and "(fits)" in lines[1]
    assert lines[2] == f"  {expected.line}" and lines[3] == f"  {expected.plan}"
    assert "--compile --fp8-matmuls --memory-budget auto" in lines[2]
    command = next(line for line in lines if line.startswith("run: "))[5:].split()
    cfg = parse_train_args(command[1:])
    assert cfg.memory_budget == "141" and cfg.compile is True and cfg.fp8_matmuls is True


def test_plan_counts_the_steps_of_the_run(capsys, tmp_path):
    argv = ["--plan", "--gpu-memory", "141", "--shards", "/d", "--output-dir", str(tmp_path / "o")]
    assert train_main([*argv, "--max-train-steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "--no-compile --no-fp8-matmuls --memory-budget auto" in out and "3 steps save" in out
    assert "run: longcat-train" in out


def test_the_trainer_resolves_the_autos_and_saves_their_values(
    tiny_shards, tmp_path, monkeypatch, caplog, applied_checkpointing
):
    """On a (fake) GPU the defaults plan checkpointing per block for the shards' bucket; the saved config
    holds the resolved values, and a resume takes them over."""
    from longcat_train import trainer as trainer_module

    applied = applied_checkpointing
    monkeypatch.setattr(trainer_module, "device_gpu", lambda device: H200)
    out = tmp_path / "run"
    common = dict(model="tiny", shards=[str(tiny_shards)], output_dir=str(out), num_workers=0)
    common |= dict(progress=False, report_to="none", shuffle_buffer=4, checkpointing_steps=1)
    cfg = TrainConfig(max_train_steps=1, **common)
    with caplog.at_level("INFO", logger="longcat_train.trainer"):
        first = trainer_module.train(cfg)
    assert applied == [("none", "none")]  # all of the tiny model's activations fit
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("auto flags")]
    compiling = planning.calibration().compile_seconds  # one graph: every block keeps "none"
    assert lines == [
        "auto flags on NVIDIA H200: --no-compile --no-fp8-matmuls --memory-budget auto (checkpointing "
        f"planned per block under 141 GB; 1 steps save ~0 s, compiling takes ~{compiling:.0f} s)"
    ]
    for saved in (out / "train_config.json", first.checkpoint / "train_config.json"):
        values = json.loads(saved.read_text())
        assert (values["compile"], values["fp8_matmuls"]) == (False, False)
        assert (values["gradient_checkpointing"], values["memory_budget"]) == ("selective", AUTO)
    resumed = parse_train_args(["--resume", "latest", "--output-dir", str(out), "--max-train-steps", "2"])
    assert (resumed.compile, resumed.fp8_matmuls, resumed.memory_budget) == (False, False, AUTO)
    result = trainer_module.train(resumed)
    assert applied[-1] == ("none", "none") and sorted(result.losses) == [2]
    # A config left auto (not read through the command line) resumes with what the run resolved.
    again = trainer_module.train(replace(cfg, resume="latest", max_train_steps=3))
    assert applied[-1] == ("none", "none") and sorted(again.losses) == [3]


def test_the_trainer_on_the_cpu_saves_off_and_selective(tiny_shards, tmp_path):
    from longcat_train.trainer import train

    out = tmp_path / "run"
    cfg = TrainConfig(
        model="tiny",
        shards=[str(tiny_shards)],
        output_dir=str(out),
        num_workers=0,
        progress=False,
        report_to="none",
        max_train_steps=1,
        checkpointing_steps=0,
    )
    train(cfg)
    values = json.loads((out / "train_config.json").read_text())
    assert (values["compile"], values["fp8_matmuls"], values["gradient_checkpointing"]) == (
        False,
        False,
        "selective",
    )
    assert values["memory_budget"] is None


def test_the_step_benchmark_resolves_the_trainer_defaults_on_the_cpu(tmp_path):
    report = tmp_path / "step.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--quick", "--trainer-defaults"]
    command += ["--steps", "1", "--warmup", "1", "--no-naive", "--no-peer", "--num-workers", "0"]
    proc = subprocess.run([*command, "--out", str(report)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(report.read_text())
    defaults = data["config"]["trainer_defaults"]
    assert (defaults["compile"], defaults["fp8_matmuls"], defaults["gradient_checkpointing"]) == (
        False,
        False,
        "selective",
    )
    assert defaults["line"].startswith("auto flags without a CUDA device")
    assert data["ours"]["checkpointing"] == "selective" and len(data["ours"]["warmup_seconds"]) == 1


def test_a_resume_takes_the_values_the_run_resolved_its_autos_to():
    saved = TrainConfig(
        compile=True, fp8_matmuls=True, gradient_checkpointing="selective", memory_budget=AUTO
    )
    cfg = planning.with_saved_autos(TrainConfig(), saved.to_dict())
    assert (cfg.compile, cfg.fp8_matmuls, cfg.gradient_checkpointing, cfg.memory_budget) == (
        True,
        True,
        "selective",
        AUTO,
    )
    typed = planning.with_saved_autos(
        TrainConfig(compile=False, gradient_checkpointing="full"), saved.to_dict()
    )
    assert (typed.compile, typed.fp8_matmuls, typed.gradient_checkpointing, typed.memory_budget) == (
        False,
        True,
        "full",
        None,
    )
    assert planning.with_saved_autos(TrainConfig(), None) == TrainConfig()


@pytest.mark.gpu
def test_the_defaults_on_this_gpu_compile_and_use_float8_where_it_has_float8_tensor_cores():
    import torch

    from longcat_train.quant import check_fp8_matmuls

    gpu = planning.device_gpu(torch.device("cuda"))
    assert gpu.capability == torch.cuda.get_device_capability(0)
    assert gpu.memory_bytes == torch.cuda.get_device_properties(0).total_memory
    resolved = resolve_auto(TrainConfig(), gpu, steps=1000)
    if gpu.memory_bytes >= 80 * mp.GB:
        assert resolved.cfg.compile and resolved.cfg.memory_budget == AUTO
        assert resolved.cfg.fp8_matmuls == gpu.fp8
    if resolved.cfg.fp8_matmuls:
        check_fp8_matmuls(torch.device("cuda"))  # what apply_techniques runs: passes


def test_plan_on_a_small_gpu_answers_instead_of_sending_back_to_the_plan(capsys, tmp_path):
    """Where the defaults fit nothing, a run says to ask --plan; --plan itself gives the answer instead."""
    argv = ["--plan", "--gpu-memory", "24", "--shards", "/d", "--output-dir", str(tmp_path / "o")]
    assert train_main(argv) == 0
    out = capsys.readouterr().out
    assert "predicted not to fit 24 GB" in out and "fastest that fits: " in out
    assert "--plan" not in out
    warning = resolve_auto(parse_train_args(argv), Gpu("a GPU with 24 GB", 24 * mp.GB), steps=1000).warning
    assert warning and warning.endswith("run longcat-train --plan with the same flags for settings that do")
