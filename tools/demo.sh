#!/usr/bin/env bash
# The whole job end to end on the embedded tiny default, on the CPU, with no downloads:
# generated clips -> shards -> LoRA training (with validation) -> an image-to-video sample with that LoRA.
# Usage: bash tools/demo.sh [OUT_DIR]        (default: demo_out; a rerun trains again from the start)
set -euo pipefail
out="${1:-demo_out}"
export HF_HUB_OFFLINE=1

longcat-prep demo "$out/videos"
longcat-prep shard "$out/videos" "$out/shards" --model tiny --area 192x320 --frames 17 --workers 1
longcat-prep inspect "$out/shards"
longcat-train --model tiny --shards "$out/shards" --frames 17 --max-train-steps 30 \
  --learning-rate 1e-3 --checkpointing-steps 10 --num-workers 1 --output-dir "$out/run" --overwrite \
  --validation-source "$out/shards" --validation-limit 1 --validation-frames 17 \
  --validation-inference-steps 8 --validation-resolution 192x320

# A start frame the model has not seen as a condition image: frame 10 of the first demo clip.
python - "$out" <<'PY'
import sys
from pathlib import Path

from PIL import Image

from longcat_data.video import read_frames

out = Path(sys.argv[1])
clip = sorted((out / "videos").glob("*.mp4"))[0]
Image.fromarray(read_frames(clip, 10, 1)[0]).save(out / "start.png")
PY
longcat-sample --model tiny --lora "$out/run/lora.safetensors" --image "$out/start.png" \
  --prompt "a bright square drifts to the right" --frames 17 --steps 8 --size 192x320 -o "$out/sample.mp4"
echo "demo done: shards in $out/shards, LoRA in $out/run, video in $out/sample.mp4"
echo "The tiny models are random (no downloads): every video here is noise, and the sheets' base and LoRA"
echo "rows look alike. What the run changes is the loss: $out/run/validation/loss_curve.png (train loss per"
echo "step), beside the sheets (validation/step_*/*_sheet.png). Real videos need --model meituan-longcat/LongCat-Video."
