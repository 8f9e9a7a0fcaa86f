"""The DiT's structure and its runtime choices by name, declared without torch.

Configs, flags and ``--help`` name these; ``model.py`` builds exactly these blocks and ``attention.py``
implements exactly these backends (both checked by tests), so a name here is the one place to look up
what a target or choice means.
"""

from __future__ import annotations

# The class name of the official DiT, written into the config.json of a saved dit/ folder.
OFFICIAL_CLASS_NAME = "LongCatVideoTransformer3DModel"

# The projections of one transformer block, by path inside the block, in the order it runs them: nearly
# all of the 13.6B weights. LoRA's default targets; what base quantisation and float8 matmuls replace.
BLOCK_LINEARS = (
    "attn.qkv",
    "attn.proj",
    "cross_attn.q_linear",
    "cross_attn.kv_linear",
    "cross_attn.proj",
    "ffn.w1",
    "ffn.w2",
    "ffn.w3",
)

# Attention kernels the DiT can run (``longcat_train.attention.BACKENDS`` implements each).
ATTENTION_BACKENDS = ("sdpa", "xformers", "block_sparse")

# Activation checkpointing per block: keep the self-attention outputs and recompute the rest, recompute
# everything, keep every matmul and attention output and recompute only the elementwise work, or keep
# everything.
CHECKPOINT_MODES = ("selective", "full", "elementwise", "none")
