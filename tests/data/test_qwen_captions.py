"""Qwen-2.5-VL captioning end to end on a tiny random model: frames in, text out, files written.

The model, tokenizer and processors are the real transformers classes at toy sizes, built offline; the
captions are noise, so only the path is checked (decode, prompt, batch, generate, write, resume).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2TokenizerFast
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.utils import is_torchvision_available

from longcat_data import qwen_captions as captions
from longcat_data.captions import load_caption_mapping, resolve_caption
from longcat_data.demo import CLIP_ENCODING, synthetic_frames
from longcat_data.qwen_captions import QwenCaptioner, caption_videos
from longcat_data.video import write_mp4

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The shape of Qwen's chat format, small enough to read: role headers, vision placeholders, text.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PIXELS = {"shortest_edge": 28 * 28, "longest_edge": 56 * 56}  # one to four merged patches per frame

MODES = [
    pytest.param(False, id="frames-as-images"),
    pytest.param(
        True,
        id="video",
        marks=pytest.mark.skipif(
            not is_torchvision_available(), reason="transformers' video processor needs torchvision"
        ),
    ),
]


def save_tiny_qwen(directory: Path) -> Path:
    """A random Qwen2.5-VL with a 400-token BPE vocabulary, saved like a hub checkpoint."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(["a dog runs across the park while the camera pans left"] * 8, trainer)
    tokenizer = Qwen2TokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    Qwen2VLImageProcessorPil(size=PIXELS).save_pretrained(directory)
    if is_torchvision_available():
        from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

        Qwen2_5_VLProcessor(
            image_processor=Qwen2VLImageProcessor(size=PIXELS),
            tokenizer=tokenizer,
            video_processor=Qwen2VLVideoProcessor(size=PIXELS),
            chat_template=CHAT_TEMPLATE,
        ).save_pretrained(directory)

    ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 4096,
            # head dim 16 -> 8 rotary pairs split over (time, height, width)
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": ids[0],
            "eos_token_id": ids[2],
            "pad_token_id": ids[0],
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 32,
            "fullatt_block_indexes": [1],
            "window_size": 56,
        },
        image_token_id=ids[5],
        video_token_id=ids[6],
        vision_start_token_id=ids[3],
        vision_end_token_id=ids[4],
    )
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen"))


@pytest.fixture(scope="module", params=MODES)
def captioner(request: pytest.FixtureRequest, tiny_qwen: Path) -> QwenCaptioner:
    return QwenCaptioner(str(tiny_qwen), max_new_tokens=6, max_pixels=56 * 56, video_input=request.param)


@pytest.fixture
def videos(tmp_path: Path) -> Path:
    """Three short clips, one already captioned by its user, and one file that is not a video."""
    folder = tmp_path / "videos"
    (folder / "sub").mkdir(parents=True)
    write_mp4(synthetic_frames(48, 80, 30, seed=1), folder / "walk.mp4", fps=12, **CLIP_ENCODING)
    write_mp4(synthetic_frames(64, 64, 20, seed=2), folder / "sub" / "pan.mp4", fps=10, **CLIP_ENCODING)
    write_mp4(synthetic_frames(48, 48, 12, seed=3), folder / "kept.mp4", fps=12, **CLIP_ENCODING)
    (folder / "kept.txt").write_text("a caption the user wrote\n")
    (folder / "broken.mp4").write_bytes(b"not a video")
    return folder


SOURCES = ["broken.mp4", "kept.mp4", "sub/pan.mp4", "walk.mp4"]


def test_frames_are_sampled_at_a_few_fps_and_capped(videos: Path) -> None:
    clip = captions.sample_caption_frames(videos / "walk.mp4", fps=2.0, max_frames=16, max_pixels=56 * 56)
    assert clip.fps == 2.0 and len(clip.frames) == 5  # 30 frames at 12 fps: 0, 0.5, ... 2.0 s
    assert clip.frames.dtype.name == "uint8" and clip.frames.shape[1] * clip.frames.shape[2] <= 56 * 56

    capped = captions.sample_caption_frames(videos / "walk.mp4", fps=8.0, max_frames=3)
    assert len(capped.frames) == 3 and capped.fps < 8.0
    assert capped.frames.shape[1:] == (48, 80, 3)  # small frames are never upscaled
    assert len(captions.sample_caption_frames(videos / "walk.mp4", max_frames=1).frames) == 1


def test_frames_in_text_out(captioner: QwenCaptioner, videos: Path) -> None:
    clips = [captioner.load(videos / "walk.mp4"), captioner.load(videos / "sub" / "pan.mp4")]
    texts = captioner.caption(clips)
    assert len(texts) == 2 and all(isinstance(t, str) and t and "\n" not in t for t in texts)
    # Batching pads on the left, so a clip's caption does not depend on its batch neighbours.
    assert captioner.caption(clips[1:]) == texts[1:]


def test_captioner_is_the_caption_hook(captioner: QwenCaptioner, videos: Path) -> None:
    caption, source = resolve_caption(videos / "walk.mp4", "captioner", captioner=captioner)
    assert caption and source == "captioner"


def test_sidecars_written_resumed_and_overwritten(captioner: QwenCaptioner, videos: Path) -> None:
    report = caption_videos(videos, SOURCES, captioner, batch_size=2)
    assert (report.written, report.skipped) == (2, 1)
    assert [source for source, _ in report.failed] == ["broken.mp4"]
    assert (videos / "kept.txt").read_text() == "a caption the user wrote\n"
    written = {s: (videos / s).with_suffix(".txt") for s in ("walk.mp4", "sub/pan.mp4")}
    assert all(path.read_text().strip() for path in written.values())
    assert not list(videos.rglob(".*.tmp"))

    stamps = {s: path.stat().st_mtime_ns for s, path in written.items()}
    again = caption_videos(videos, SOURCES, captioner, batch_size=2)
    assert (again.written, again.skipped) == (0, 3)
    assert {s: path.stat().st_mtime_ns for s, path in written.items()} == stamps

    redo = caption_videos(videos, SOURCES, captioner, batch_size=2, overwrite=True)
    assert (redo.written, redo.skipped) == (3, 0)
    assert (videos / "kept.txt").read_text() != "a caption the user wrote\n"


def test_an_interrupted_run_resumes_where_it_stopped(
    captioner: QwenCaptioner, videos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_caption = captioner.caption
    calls = []

    def crash_on_second_batch(clips):
        calls.append(len(clips))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_caption(clips)

    monkeypatch.setattr(captioner, "caption", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        caption_videos(videos, ["walk.mp4", "sub/pan.mp4"], captioner, batch_size=1)
    assert (videos / "walk.txt").is_file() and not (videos / "sub" / "pan.txt").exists()

    monkeypatch.setattr(captioner, "caption", real_caption)
    report = caption_videos(videos, ["walk.mp4", "sub/pan.mp4"], captioner, batch_size=1)
    assert (report.written, report.skipped) == (1, 1)
    assert (videos / "sub" / "pan.txt").is_file()


def test_jsonl_output_is_a_caption_mapping(captioner: QwenCaptioner, videos: Path, tmp_path: Path) -> None:
    jsonl = tmp_path / "captions.jsonl"
    report = caption_videos(videos, SOURCES, captioner, jsonl=jsonl, batch_size=3)
    # Sidecars do not count as captioned here: the jsonl is the store asked for.
    assert (report.written, report.skipped, len(report.failed)) == (3, 0, 1)
    assert not (videos / "walk.txt").exists()
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert sorted(row["file_name"] for row in rows) == ["kept.mp4", "sub/pan.mp4", "walk.mp4"]

    mapping = load_caption_mapping(jsonl)
    caption, source = resolve_caption(
        videos / "sub" / "pan.mp4", "mapping", videos_dir=videos, mapping=mapping
    )
    assert caption == mapping["sub/pan.mp4"] and source == "mapping"

    again = caption_videos(videos, SOURCES, captioner, jsonl=jsonl)
    assert (again.written, again.skipped) == (0, 3)
    redo = caption_videos(videos, SOURCES, captioner, jsonl=jsonl, overwrite=True)
    assert redo.written == 3 and len(jsonl.read_text().splitlines()) == 3  # replaced, not appended


def test_precomputed_captions_serve_the_hook(captioner: QwenCaptioner, videos: Path, tmp_path: Path) -> None:
    cache = tmp_path / "out" / ".prep" / "captions.jsonl"
    hook = captions.precompute_captions(videos, SOURCES, captioner, cache)
    caption, source = resolve_caption(videos / "sub" / "pan.mp4", "captioner", captioner=hook)
    assert caption and source == "captioner"
    with pytest.raises(captions.CaptionError, match="could not caption"):
        resolve_caption(videos / "broken.mp4", "captioner", captioner=hook)
    assert pickle.loads(pickle.dumps(hook)) == hook  # it travels to prep's decode workers


def test_caption_command(
    tiny_qwen: Path, videos: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from longcat_data import cli

    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Say what moves.\n")
    common = ["--model", str(tiny_qwen), "--max-new-tokens", "4", "--max-pixels", "3136", "--device", "cpu"]
    assert cli.main(["caption", str(videos), "--prompt-template", f"@{prompt}", *common]) == 0
    assert "captioned 2, already captioned 1, failed 1" in capsys.readouterr().out
    assert (videos / "walk.txt").read_text().strip() and (videos / "sub" / "pan.txt").is_file()

    jsonl = tmp_path / "captions.jsonl"
    assert cli.main(["caption", str(videos), "--jsonl", str(jsonl), "--overwrite", *common]) == 0
    assert sorted(load_caption_mapping(jsonl)) == ["kept.mp4", "sub/pan.mp4", "walk.mp4"]


def test_shard_with_qwen_captions(tiny_qwen: Path, videos: Path, tmp_path: Path) -> None:
    """`longcat-prep shard --captions qwen`: Qwen captions every video before encoding, through the hook."""
    from longcat_data import cli, stream
    from longcat_data.manifest import STATE_DIR
    from longcat_data.shards import ShardSample

    (videos / "broken.mp4").unlink()
    out = tmp_path / "shards"
    args = [
        "shard",
        str(videos),
        str(out),
        "--model",
        "tiny",
        "--area",
        "64x64",
        "--frames",
        "5",
        "--workers",
        "0",
    ]
    assert cli.main([*args, "--captions", "qwen", "--caption-model", str(tiny_qwen)]) == 0

    cached = load_caption_mapping(next((out / STATE_DIR).glob("captions-*.jsonl")))
    assert sorted(cached) == ["kept.mp4", "sub/pan.mp4", "walk.mp4"]  # the user's sidecar is not used here
    samples = [
        ShardSample.from_members(s)
        for s in stream.read_tars(({"url": str(p)} for p in sorted(out.glob("*.tar"))), None)
    ]
    assert {s.meta["caption_source"] for s in samples} == {"captioner"}
    assert [s.meta["source"] for s in samples] == ["sub/pan.mp4"]  # the only clip as big as a 64x64 bucket
    assert samples[0].caption == cached["sub/pan.mp4"]
