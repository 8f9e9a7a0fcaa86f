"""LoRA file layouts: every reader against a file built the way its project writes it, every writer read
back, the round trips between our three layouts, and the official loader on our split files."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from lora_files import (
    official_state,
    peft_injected,
    peft_state,
    random_lora,
    simpletuner_comfyui,
    simpletuner_header,
    videox_fun_kohya,
    videox_fun_network,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from longcat_train import checkpoints, lora, lora_formats, lora_layouts
from longcat_train.config import DEFAULT_LORA_TARGETS
from longcat_train.dit_config import DiTConfig
from longcat_train.loading import tiny_dit
from longcat_train.lora_formats import LoraFormatError, read_file, write
from longcat_train.lora_pieces import one_piece, split_block_diagonal
from longcat_train.lora_tool import module_shapes
from longcat_train.lowrank import LowRankDelta, LowRankPiece, LowRankSet
from longcat_train.model import FP32Linear

pytestmark = pytest.mark.usefixtures("single_thread")

OFFICIAL_DIR = Path(os.environ.get("LONGCAT_OFFICIAL_DIR") or Path(__file__).parents[2] / ".official")
OFFICIAL_LORA_UTILS = OFFICIAL_DIR / "longcat_video/modules/lora_utils.py"


def assert_same_lora(ours: LowRankSet, theirs: LowRankSet, *, exact: bool = True) -> None:
    """The same modules with the same pieces (bit-exact tensors when ``exact``) and scales."""
    assert sorted(ours.deltas) == sorted(theirs.deltas)
    for name, delta in ours.deltas.items():
        other = theirs.deltas[name]
        assert len(delta.pieces) == len(other.pieces), name
        for a, b in zip(delta.pieces, other.pieces, strict=True):
            if exact:
                assert torch.equal(a.down, b.down) and torch.equal(a.up, b.up), name
            else:
                torch.testing.assert_close(a.down.float(), b.down.float())
                torch.testing.assert_close(a.up.float(), b.up.float())
        assert delta.scale == pytest.approx(other.scale, rel=1e-6), name


def assert_same_update(ours: LowRankSet, theirs: LowRankSet) -> None:
    assert sorted(ours.deltas) == sorted(theirs.deltas)
    for name, delta in ours.deltas.items():
        torch.testing.assert_close(delta.weight(), theirs.deltas[name].weight(), rtol=1e-5, atol=1e-5)


def trained_adapter(rank: int = 4, alpha: float = 8) -> tuple[dict[str, torch.Tensor], dict]:
    """The canonical weights and settings of a trained adapter (random values) on the tiny DiT."""
    model = lora.apply_lora(tiny_dit(), rank=rank, alpha=alpha, targets=list(DEFAULT_LORA_TARGETS))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return lora.lora_weights(model), lora.adapter_settings(model)


def trained_peft(tmp_path: Path, rank: int = 4, alpha: float = 8) -> tuple[Path, Path]:
    """Our two training outputs of a trained adapter (lora.safetensors, lora_longcat.safetensors)."""
    weights, settings = trained_adapter(rank, alpha)
    return (
        lora.save_diffusers(weights, tmp_path / "lora.safetensors", settings),
        lora.save_official(weights, tmp_path / "lora_longcat.safetensors", settings),
    )


# ---------------------------------------------------------------- our files and round trips


def test_our_two_files_read_as_the_adapter_that_wrote_them(tmp_path):
    expected = lora_formats.from_peft_weights(*trained_adapter())
    for path in trained_peft(tmp_path):
        ours = read_file(path)
        assert ours.format == ("official" if "longcat" in path.name else "peft")
        assert_same_update(ours, expected)


def test_peft_to_official_to_comfyui_to_peft_is_bit_exact(tmp_path):
    peft_file, _ = trained_peft(tmp_path)
    start = read_file(peft_file)
    path = tmp_path / "official.safetensors"
    for to in ("official", "comfyui", "peft"):
        assert (
            write(read_file(path if to != "official" else peft_file), path.with_name(f"{to}.safetensors"), to)
            == []
        )
        path = path.with_name(f"{to}.safetensors")
        assert_same_lora(start, read_file(path))
    # The final file has our layout to the byte: the same keys and tensors as lora.safetensors.
    first, last = load_file(str(peft_file)), load_file(str(path))
    assert first.keys() == last.keys() and all(torch.equal(first[k], last[k]) for k in first)


def test_split_official_lora_keeps_its_pieces_through_comfyui_and_peft(tmp_path):
    """The official split modules (qkv 3, kv 2, adaLN 6, final adaLN 2, each piece its own down) survive
    official -> comfyui -> official and official -> peft -> official tensor for tensor."""
    source = random_lora()
    original = tmp_path / "split_longcat.safetensors"
    save_file(official_state(source), str(original))
    assert_same_lora(source, read_file(original))
    for middle in ("comfyui", "peft"):
        write(read_file(original), tmp_path / f"{middle}.safetensors", middle)
        write(
            read_file(tmp_path / f"{middle}.safetensors"), tmp_path / f"back_{middle}.safetensors", "official"
        )
        before, after = load_file(str(original)), load_file(str(tmp_path / f"back_{middle}.safetensors"))
        assert before.keys() == after.keys(), middle
        for key in before:
            if key.endswith("alpha_scale"):
                assert after[key].item() == pytest.approx(before[key].item(), rel=1e-6)
            else:
                assert torch.equal(before[key], after[key]), (middle, key)


def test_peft_writer_states_differing_ranks_and_alphas_as_peft_patterns(tmp_path):
    source = random_lora(split=True)
    write(source, tmp_path / "p.safetensors", "peft")
    with safe_open(str(tmp_path / "p.safetensors"), "pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    # Split modules become one block-diagonal pair of rank n*r: rank_pattern; per-module scales: alpha_pattern.
    assert config["transformer.r"] == 4
    assert config["transformer.rank_pattern"]["blocks.0.attn.qkv"] == 12
    assert config["transformer.rank_pattern"]["blocks.1.adaLN_modulation.1"] == 24
    assert config["transformer.alpha_pattern"]
    assert_same_lora(source, read_file(tmp_path / "p.safetensors"))


def test_official_writer_pads_smaller_ranks_to_the_one_rank_the_official_loader_takes(tmp_path):
    source = random_lora(split=False)
    small = LowRankDelta((LowRankPiece(torch.ones(2, 128), torch.ones(128, 2)),), 0.5)
    source.deltas["blocks.0.attn.proj"] = small
    write(source, tmp_path / "o.safetensors", "official")
    raw = load_file(str(tmp_path / "o.safetensors"))
    downs = {k: v.shape[0] for k, v in raw.items() if k.endswith("lora_down.weight")}
    assert set(downs.values()) == {4}
    assert_same_update(source, read_file(tmp_path / "o.safetensors"))


@pytest.mark.skipif(not OFFICIAL_LORA_UTILS.is_file(), reason="official LongCat-Video code not checked out")
def test_official_loader_reads_our_split_file_strictly_and_computes_our_update(tmp_path):
    spec = importlib.util.spec_from_file_location("official_lora_utils", OFFICIAL_LORA_UTILS)
    official = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(official)
    source = random_lora()
    # Through comfyui first: the official file is rebuilt from the wrapper layout.
    write(source, tmp_path / "c.safetensors", "comfyui")
    write(read_file(tmp_path / "c.safetensors"), tmp_path / "o.safetensors", "official")
    state = load_file(str(tmp_path / "o.safetensors"))
    model = tiny_dit()
    for (
        module
    ) in model.modules():  # the official model's fp32 layers are plain nn.Linear, as its loader expects
        if isinstance(module, FP32Linear):
            module.__class__ = torch.nn.Linear
    network = official.create_lora_network(model, state, 1.0, 4, 64)
    network.load_state_dict(state, strict=True)
    assert len(network.loras) == len(source.deltas)
    for module in network.loras:
        name = module.lora_name.removeprefix("lora___lorahyphen___").replace("___lorahyphen___", ".")
        delta = source.deltas[name]
        x = torch.randn(3, delta.in_features)
        theirs = module.lora_up(module.lora_down(x)) * module.multiplier * module.alpha_scale
        torch.testing.assert_close(theirs, x @ delta.weight().T, rtol=1e-4, atol=1e-4)


def test_the_layout_tables_name_every_linear_and_convolution_of_the_dit():
    for name in module_shapes(DiTConfig.tiny()):
        assert lora_layouts.is_official(name) and lora_layouts.wrapper_names(name), name
        assert lora_layouts.official_part(name) == (name, 0, 1)
        for i, wrapper in enumerate(lora_layouts.wrapper_names(name)):
            assert lora_layouts.official_part(wrapper)[:2] == (name, i)
            assert lora_layouts.resolve_underscored(wrapper.replace(".", "_")) == wrapper


def test_block_diagonal_pieces_come_back_but_an_untrained_up_is_no_split():

    split = random_lora().deltas["blocks.0.adaLN_modulation.1"]
    whole = one_piece(split)
    assert len(whole.pieces) == 1 and whole.rank == 24
    back = split_block_diagonal(whole, 6)
    assert all(
        torch.equal(a.up, b.up) and torch.equal(a.down, b.down)
        for a, b in zip(back.pieces, split.pieces, strict=True)
    )
    untrained = LowRankDelta((LowRankPiece(torch.randn(24, 64), torch.zeros(768, 24)),), 1.0)
    assert split_block_diagonal(untrained, 6) is untrained


# ---------------------------------------------------------------- files other projects write


def test_simpletuner_comfyui_file_reads_and_its_convolution_lora_is_reported(tmp_path, caplog):
    """SimpleTuner's default targets (qkv, proj, q_linear, kv_linear: peft suffix matching, so proj also
    wraps the Conv3d x_embedder.proj) saved with lora_format=comfyui: diffusion_model. + official names +
    .alpha. The convolution LoRA is not a matrix pair: skipped with a warning naming it."""
    model = peft_injected(["qkv", "proj", "q_linear", "kv_linear"], rank=4, alpha=2)
    state = {f"transformer.{k}": v for k, v in peft_state(model).items()}
    assert any(v.ndim == 5 for v in state.values())  # the x_embedder.proj convolution
    metadata = {"r": 4, "lora_alpha": 2, "target_modules": ["qkv", "proj", "q_linear", "kv_linear"]}
    save_file(
        simpletuner_comfyui(state, metadata), str(tmp_path / "st.safetensors"), simpletuner_header(metadata)
    )
    read = read_file(tmp_path / "st.safetensors")
    assert "x_embedder.proj" in caplog.text and "matrix pair" in caplog.text
    expected = {k: v for k, v in peft_state(model).items() if not k.startswith("x_embedder")}
    assert_same_update(read, lora_formats.from_peft_weights(expected, {"r": 4, "lora_alpha": 2}))
    assert {d.scale for d in read.deltas.values()} == {0.5}


def test_simpletuner_diffusers_file_takes_alpha_from_the_prefixed_metadata(tmp_path):
    model = peft_injected(["ffn.w1", "ffn.w3"], rank=4, alpha=6)
    state = {f"transformer.{k}": v for k, v in peft_state(model).items()}
    header = {
        "lora_adapter_metadata": '{"transformer.r": 4, "transformer.lora_alpha": 6, "transformer.use_rslora": true}'
    }
    save_file(state, str(tmp_path / "d.safetensors"), header)
    read = read_file(tmp_path / "d.safetensors")
    assert read.format == "peft" and {d.scale for d in read.deltas.values()} == {
        6 / 2
    }  # rsLoRA: alpha / sqrt(r)


def test_videox_fun_files_without_alpha_are_refused_until_it_is_given(tmp_path):
    """VideoX-Fun --use_peft_lora saves checkpoint-N.safetensors (peft keys, no alpha) and the kohya
    -compatible_with_comfyui file (no alpha): reading either asks for the alpha."""
    model = peft_injected(["qkv", "q_linear", "kv_linear", "ffn.w1", "ffn.w2", "ffn.w3"], rank=4, alpha=2)
    state = peft_state(model)
    save_file(state, str(tmp_path / "checkpoint-10.safetensors"), {"format": "pt"})
    save_file(
        videox_fun_kohya(state),
        str(tmp_path / "checkpoint-10-compatible_with_comfyui.safetensors"),
        {"format": "pt"},
    )
    expected = lora_formats.from_peft_weights(state, {"r": 4, "lora_alpha": 2})
    for name, layout in (("checkpoint-10", "peft"), ("checkpoint-10-compatible_with_comfyui", "kohya")):
        path = tmp_path / f"{name}.safetensors"
        with pytest.raises(LoraFormatError, match="states no alpha .*--alpha A"):
            read_file(path)
        read = read_file(path, alpha=2)
        assert read.format == layout
        assert_same_lora(read, expected)
        assert {d.scale for d in read_file(path, alpha="rank").deltas.values()} == {1.0}


def test_videox_fun_network_file_with_alpha(tmp_path):
    source = random_lora(split=False)
    save_file(videox_fun_network(source, alpha=3.0), str(tmp_path / "n.safetensors"))
    read = read_file(tmp_path / "n.safetensors")
    assert read.format == "kohya"
    assert {d.scale for d in read.deltas.values()} == {3.0 / 4}
    for name, delta in source.deltas.items():
        assert torch.equal(read.deltas[name].pieces[0].up, delta.pieces[0].up)


def test_diffsynth_file_is_alpha_rank(tmp_path):
    """DiffSynth-Studio: peft injected with lora_alpha = rank (diffusion/training_module.py:94-105), the
    trainable parameters saved with pipe.dit. removed: blocks.0.attn.qkv.lora_A.default.weight."""
    targets = ["adaLN_modulation.1", "attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear"]
    model = peft_injected(targets, rank=4, alpha=4)
    state = {k: p.detach().clone() for k, p in model.named_parameters() if "lora_" in k}
    assert next(iter(state)).endswith(".lora_A.default.weight")
    save_file(state, str(tmp_path / "epoch-0.safetensors"), {"format": "pt"})
    read = read_file(tmp_path / "epoch-0.safetensors")
    assert read.format == "diffsynth" and {d.scale for d in read.deltas.values()} == {1.0}
    assert_same_update(read, lora_formats.from_peft_weights(peft_state(model), {"r": 4, "lora_alpha": 4}))


@pytest.mark.parametrize("style", ["comfyui", "kohya", "transformer-down-up"])
def test_wrapper_layout_files_in_every_spelling_map_onto_the_fused_modules(tmp_path, style):
    source = random_lora()
    write(source, tmp_path / "c.safetensors", "comfyui")
    raw = load_file(str(tmp_path / "c.safetensors"))
    if style == "kohya":  # lora_unet_blocks_0_self_attn_q.lora_down.weight (ComfyUI's lora_unet_ map)
        raw = {
            "lora_unet_" + k.removeprefix("diffusion_model.").rsplit(".", 2)[0].replace(".", "_") + "."
            + ".".join(k.rsplit(".", 2)[1:]).replace("lora_A", "lora_down").replace("lora_B", "lora_up"): v
            for k, v in raw.items() if not k.endswith(".alpha")
        } | {
            "lora_unet_" + k.removeprefix("diffusion_model.").removesuffix(".alpha").replace(".", "_") + ".alpha": v
            for k, v in raw.items() if k.endswith(".alpha")
        }  # fmt: skip
    elif style == "transformer-down-up":
        raw = {
            k.replace("diffusion_model.", "transformer.")
            .replace("lora_A", "lora_down")
            .replace("lora_B", "lora_up"): v
            for k, v in raw.items()
        }
    save_file(raw, str(tmp_path / "w.safetensors"))
    read = read_file(tmp_path / "w.safetensors")
    assert read.format == "comfyui"
    assert_same_lora(source, read)


def test_wrapper_parts_missing_or_at_other_scales_still_give_the_fused_update(tmp_path):
    """A Wan-style LoRA on q and v only, v at another alpha: k is a zero piece, scales are folded."""
    g = torch.Generator().manual_seed(1)
    a_q, b_q, a_v, b_v = (torch.randn(s, generator=g) for s in ((4, 128), (128, 4), (2, 128), (128, 2)))
    raw = {
        "diffusion_model.blocks.0.self_attn.q.lora_A.weight": a_q,
        "diffusion_model.blocks.0.self_attn.q.lora_B.weight": b_q,
        "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(4.0),
        "diffusion_model.blocks.0.self_attn.v.lora_A.weight": a_v,
        "diffusion_model.blocks.0.self_attn.v.lora_B.weight": b_v,
        "diffusion_model.blocks.0.self_attn.v.alpha": torch.tensor(1.0),
    }
    save_file(raw, str(tmp_path / "qv.safetensors"))
    delta = read_file(tmp_path / "qv.safetensors").deltas["blocks.0.attn.qkv"]
    expected = torch.cat([b_q @ a_q, torch.zeros(128, 128), 0.5 * b_v @ a_v])
    torch.testing.assert_close(delta.weight(), expected)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        (
            {"blocks.0.attn.qkv.weight": torch.zeros(3, 3)},
            "not a LongCat-Video LoRA .*key blocks.0.attn.qkv.weight",
        ),
        (
            {"transformer.blocks.0.attn.qkv.lora_A.weight": torch.zeros(2, 3)},
            "blocks.0.attn.qkv has no up matrix",
        ),
        (
            {
                "blocks.0.ffn.w1.lora_A.weight": torch.zeros(2, 3),
                "blocks.0.ffn.w1.lora_B.weight": torch.zeros(4, 5),
            },
            "do not fit",
        ),
        (
            {
                "transformer.x_embedder.proj.lora_A.weight": torch.zeros(2, 16, 1, 2, 2),
                "transformer.x_embedder.proj.lora_B.weight": torch.zeros(128, 2, 1, 1, 1),
            },
            "none of its LoRA modules can be applied .*x_embedder.proj.lora_A.weight: not a matrix pair",
        ),
        (
            {
                "transformer.blocks.0.ffn.w1.lora_A.weight": torch.zeros(2, 3),
                "blocks.0.ffn.w1.lora_A.weight": torch.zeros(2, 3),
            },
            "give the same down of blocks.0.ffn.w1",
        ),
    ],
)
def test_files_that_are_no_whole_lora_are_one_line_errors(tmp_path, tensors, message):
    save_file(tensors, str(tmp_path / "x.safetensors"))
    with pytest.raises(LoraFormatError, match=message) as err:
        read_file(tmp_path / "x.safetensors", alpha=1.0)
    assert "\n" not in str(err.value) and str(tmp_path / "x.safetensors") in str(err.value)


def test_a_file_that_is_not_safetensors_is_one_line(tmp_path):
    (tmp_path / "x.ckpt").write_bytes(b"\x80\x02not safetensors")
    with pytest.raises(LoraFormatError, match="not a safetensors file"):
        read_file(tmp_path / "x.ckpt")


# ---------------------------------------------------------------- the comfyui writer and training


def test_comfyui_writer_reports_what_the_wrapper_cannot_take(tmp_path):
    source = random_lora(split=False)
    source.deltas["x_embedder.proj"] = LowRankDelta(
        (LowRankPiece(torch.ones(2, 64), torch.ones(128, 2)),), 1.0
    )
    source.deltas["vace_blocks.0.proj"] = LowRankDelta(
        (LowRankPiece(torch.ones(2, 8), torch.ones(8, 2)),), 1.0
    )
    notes = write(source, tmp_path / "c.safetensors", "comfyui")
    assert len(notes) == 2 and "Control-LoRA" in notes[0] and "vace_blocks.0.proj" in notes[1]
    keys = load_file(str(tmp_path / "c.safetensors")).keys()
    assert not any("patch_embedding" in k or "vace" in k for k in keys)


@pytest.mark.parametrize("to", ["peft", "official"])
def test_matrix_layouts_report_a_convolution_update_and_refuse_an_empty_lora(tmp_path, to):
    source = random_lora(split=False)
    source.deltas["x_embedder.proj"] = LowRankDelta(
        (LowRankPiece(torch.ones(2, 64), torch.ones(128, 2)),), 1.0
    )
    notes = write(source, tmp_path / "x.safetensors", to)
    assert len(notes) == 1 and notes[0].startswith("x_embedder.proj: a convolution")
    assert "x_embedder.proj" not in read_file(tmp_path / "x.safetensors").deltas
    with pytest.raises(LoraFormatError, match="nothing of this LoRA can be written"):
        write(LowRankSet({}, "peft"), tmp_path / "empty.safetensors", to)
    assert not (tmp_path / "empty.safetensors").exists()


def test_training_export_writes_the_comfyui_file_beside_the_others(tmp_path):
    peft_file, _ = trained_peft(tmp_path / "src")
    checkpoints.write_lora_files(*trained_adapter(), tmp_path)
    assert_same_lora(read_file(tmp_path / "lora_comfyui.safetensors"), read_file(peft_file))
    assert read_file(tmp_path / "lora_comfyui.safetensors").format == "comfyui"
