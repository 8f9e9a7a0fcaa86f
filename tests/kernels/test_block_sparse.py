"""Block-sparse attention against a dense reference under the same block mask: the torch path on CPU,
the Triton kernels under the Triton interpreter on CPU, and the Triton kernels on CUDA (`-m gpu`)."""

import importlib.util
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from longcat_kernels import block_selection, block_sparse_attention, dense_attention, masked_attention
from longcat_kernels.selection import selection_mask

HAS_TRITON = importlib.util.find_spec("triton") is not None


def reference(q, k, v, layout, indices, counts, scale):
    """Softmax attention in float64 under the selection's token mask, written out by hand."""
    tiles = selection_mask(indices, counts, layout.num_tiles)
    allowed = tiles[:, :, layout.token_tile][:, :, :, layout.token_tile]
    logits = (q.double() @ k.double().transpose(-1, -2)) * scale
    weights = torch.softmax(logits.masked_fill(~allowed, -math.inf), dim=-1)
    return weights @ v.double()


def relative_error(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def qkv(batch, heads, tokens, dim, dtype=torch.float32, device="cpu", seed=0):
    generator = torch.Generator(device).manual_seed(seed)
    return [
        torch.randn(batch, heads, tokens, dim, generator=generator, device=device).to(dtype) for _ in range(3)
    ]


@pytest.mark.parametrize("cond", [0, 1])
def test_torch_path_matches_reference(cond):
    shape = (6, 5, 9)  # 5 and 9 leave partial blocks
    q, k, v = qkv(2, 3, math.prod(shape), 16)
    for x in (q, k, v):
        x.requires_grad_()
    out = block_sparse_attention(q, k, v, shape, density=0.25, num_cond_latents=cond, implementation="torch")
    layout, indices, counts = block_selection(q, k, shape, density=0.25, num_cond_latents=cond)
    ref = reference(q, k, v, layout, indices, counts, 16**-0.5)
    assert relative_error(out, ref) < 1e-5
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad.double())
    for g, w in zip(got, want, strict=True):
        assert relative_error(g, w) < 1e-5


def test_full_density_is_dense_attention():
    shape = (5, 6, 7)
    q, k, v = qkv(1, 2, math.prod(shape), 16)
    out = block_sparse_attention(q, k, v, shape, density=1.0, implementation="torch")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    out = block_sparse_attention(q, k, v, shape, density=1.0, num_cond_latents=2, implementation="torch")
    torch.testing.assert_close(out, dense_attention(q, k, v, shape, num_cond_latents=2))


def test_dense_attention_condition_split():
    shape = (4, 3, 5)
    q, k, v = qkv(1, 2, math.prod(shape), 8)
    cond = 15  # one frame of 3 x 5 tokens
    allowed = torch.ones(60, 60, dtype=torch.bool)
    allowed[:cond, cond:] = False
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    torch.testing.assert_close(dense_attention(q, k, v, shape, num_cond_latents=1), expected)


def test_auto_on_cpu_is_the_torch_path():
    shape = (5, 6, 7)
    q, k, v = qkv(1, 2, math.prod(shape), 16)
    auto = block_sparse_attention(q, k, v, shape, num_cond_latents=1)
    torch.testing.assert_close(
        auto, block_sparse_attention(q, k, v, shape, num_cond_latents=1, implementation="torch")
    )


def test_bad_arguments():
    q, k, v = qkv(1, 1, 60, 8)
    with pytest.raises(ValueError, match="tokens"):
        block_sparse_attention(q, k, v, (4, 4, 4))
    with pytest.raises(ValueError, match="one shape"):  # noisy queries alone against all keys: refused
        block_sparse_attention(q[:, :, 15:], k, v, (3, 3, 5))
    with pytest.raises(ValueError, match="implementation"):
        block_sparse_attention(q, k, v, (4, 3, 5), implementation="flash")
    with pytest.raises(RuntimeError, match="Triton"):
        block_sparse_attention(q, k, v, (4, 3, 5), implementation="triton")


# The Triton interpreter of triton 3.6 turns a loaded scalar into a 1-element array, which numpy 2
# refuses to convert with int(); the patch reads the element instead. Interpreter only, never on GPU.
INTERPRETED = textwrap.dedent(
    """
    import math, torch
    import triton.runtime.interpreter as interpreter
    patch_tensor = interpreter._patch_lang_tensor
    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    interpreter._patch_lang_tensor = patched

    import longcat_kernels.dispatch
    from longcat_kernels import block_selection, block_sparse_attention, masked_attention
    from longcat_kernels.block_sparse import pool_tiles_triton, select_blocks_triton
    from longcat_kernels.selection import block_layout, pool_tiles, select_blocks, selection_mask

    torch.manual_seed(0)
    shape, dim = (6, 5, 7), 64
    # fp16: the interpreter's bf16 dot is wrong (numpy has no bf16); the kernels are dtype-generic
    q, k, v = (torch.randn(1, 2, math.prod(shape), dim).half() for _ in range(3))
    layout = block_layout(shape, (4, 4, 4), 1)
    pooled_q, pooled_k = pool_tiles_triton(q, k, layout)
    torch.testing.assert_close(pooled_q, pool_tiles(q, layout))
    torch.testing.assert_close(pooled_k, pool_tiles(k, layout))
    got = select_blocks_triton(pooled_q, pooled_k, layout, 0.3)
    want = select_blocks(pooled_q, pooled_k, layout, 0.3)
    torch.testing.assert_close(got[1], want[1])
    # the same key tiles (random scores have no ties), and listed in ascending order
    assert torch.equal(selection_mask(*got, layout.num_tiles), selection_mask(*want, layout.num_tiles))
    assert all(row[:n].diff().gt(0).all() for row, n in zip(got[0].flatten(0, 2), got[1].flatten()))

    layout, indices, counts = block_selection(q, k, shape, density=0.3, num_cond_latents=1)
    ref_inputs = [x.float().requires_grad_() for x in (q, k, v)]
    ref = masked_attention(*ref_inputs, layout, indices, counts, dim**-0.5)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    # the interpreter runs the kernels on CPU tensors: let the custom op take its Triton path there
    longcat_kernels.dispatch.triton_supported = lambda q: True

    def run(q, k, v):
        return block_sparse_attention(
            q, k, v, shape, density=0.3, num_cond_latents=1, implementation="triton"
        )

    # eager, and compiled around the opaque op (its fake and autograd registrations)
    for fn in (run, torch.compile(run, fullgraph=True, backend="aot_eager")):
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        out = fn(*inputs)
        assert out.transpose(1, 2).is_contiguous()  # laid out as [B, N, H, D]
        out.backward(grad.half())
        for got, want in [(out, ref)] + [(a.grad, b.grad) for a, b in zip(inputs, ref_inputs)]:
            error = float((got.detach().float() - want.detach()).norm() / want.detach().norm())
            assert error < 2e-3, error
    print("ok")
    """
)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


GPU_CASES = [
    ((6, 5, 9), 0, 64, torch.bfloat16, (4, 4, 4)),
    ((9, 10, 11), 1, 128, torch.bfloat16, (4, 4, 4)),
    ((9, 10, 11), 2, 128, torch.float16, (4, 4, 4)),
    ((9, 10, 11), 1, 128, torch.bfloat16, (4, 4, 8)),  # 128-token tiles (the official default block)
    ((9, 10, 11), 0, 64, torch.bfloat16, (2, 4, 4)),  # 32-token tiles
    ((13, 30, 52), 1, 128, torch.bfloat16, (4, 4, 4)),
]


@pytest.mark.gpu
@pytest.mark.parametrize(("shape", "cond", "dim", "dtype", "block"), GPU_CASES)
def test_triton_matches_masked_reference(shape, cond, dim, dtype, block):
    batch = 2 if math.prod(shape) < 5000 else 1  # the reference's N x N mask and weights must fit
    q, k, v = qkv(batch, 2, math.prod(shape), dim, dtype=dtype, device="cuda", seed=sum(shape) + cond)
    selection = {"density": 1 / 16, "block": block, "num_cond_latents": cond}
    inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    out = block_sparse_attention(*inputs, shape, **selection, implementation="triton")
    grad = torch.randn_like(out)
    out.backward(grad)
    layout, indices, counts = block_selection(q, k, shape, **selection, use_triton=True)
    ref_inputs = [x.float().requires_grad_() for x in (q, k, v)]
    ref = masked_attention(*ref_inputs, layout, indices, counts, dim**-0.5)
    ref.backward(grad.float())
    assert relative_error(out, ref) < 1e-2
    for a, b in zip(inputs, ref_inputs, strict=True):
        assert relative_error(a.grad, b.grad) < 1e-2


@pytest.mark.gpu
def test_triton_pooling_and_selection_match_torch():
    from longcat_kernels.block_sparse import pool_tiles_triton, select_blocks_triton
    from longcat_kernels.selection import block_layout, pool_tiles, select_blocks, selection_mask

    shape = (24, 30, 52)
    q, k, _ = qkv(1, 4, math.prod(shape), 128, dtype=torch.bfloat16, device="cuda")
    layout = block_layout(shape, (4, 4, 4), 1, "cuda:0")
    pooled_q, pooled_k = pool_tiles_triton(q, k, layout)
    torch.testing.assert_close(pooled_q, pool_tiles(q, layout), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled_k, pool_tiles(k, layout), rtol=1e-5, atol=1e-5)
    got = select_blocks_triton(pooled_q, pooled_k, layout, 1 / 16)
    want = select_blocks(pooled_q, pooled_k, layout, 1 / 16)
    assert torch.equal(got[1], want[1])
    assert torch.equal(selection_mask(*got, layout.num_tiles), selection_mask(*want, layout.num_tiles))


@pytest.mark.gpu
def test_strided_inputs_from_a_fused_qkv():
    shape = (9, 10, 11)
    batch, heads, dim, tokens = 1, 4, 128, math.prod(shape)
    qkv_out = torch.randn(batch, tokens, 3, heads, dim, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv_out.permute(2, 0, 3, 1, 4).unbind(0)  # the model's views: [B, H, N, D], not contiguous
    out = block_sparse_attention(q, k, v, shape, implementation="triton")
    ref = block_sparse_attention(
        q.contiguous(), k.contiguous(), v.contiguous(), shape, implementation="triton"
    )
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("cond", [0, 1])
def test_custom_op_passes_opcheck(cond):
    """Schema, fake (shapes, dtypes and strides against the real outputs), autograd registration and
    AOT dispatch of the op, on its torch path."""
    shape = (4, 3, 5)
    q, k, v = (x.requires_grad_() for x in qkv(1, 2, math.prod(shape), 8))
    args = (q, k, v, list(shape), [2, 2, 2], cond, 0.5, None, "auto")
    torch.library.opcheck(torch.ops.longcat.block_sparse_attention.default, args)
    with torch.no_grad():  # the backward op is not differentiable itself (no double backward)
        out, lse, indices, counts = torch.ops.longcat.block_sparse_attention(*args)
    saved = (q.detach(), k.detach(), v.detach(), out, lse, indices, counts)
    grad_args = (torch.randn_like(out), *saved, list(shape), [2, 2, 2], cond, None, False)
    torch.library.opcheck(torch.ops.longcat.block_sparse_attention_backward.default, grad_args)


def test_compiled_torch_path_matches_eager():
    shape = (4, 3, 5)
    q, k, v = qkv(1, 2, math.prod(shape), 8)

    def run(q, k, v):
        return block_sparse_attention(q, k, v, shape, density=0.5, block=(2, 2, 2), num_cond_latents=1)

    results = []
    for fn in (run, torch.compile(run, fullgraph=True, backend="aot_eager")):
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        out = fn(*inputs)
        assert out.transpose(1, 2).is_contiguous()  # laid out as [B, N, H, D], as on the Triton path
        out.square().sum().backward()
        results.append([out.detach()] + [x.grad for x in inputs])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


def test_a_second_copy_of_the_package_is_refused_before_it_breaks_the_first(tmp_path) -> None:
    # Another copy registering the op again would free the first copy's registration under it.
    import longcat_kernels

    package = os.path.dirname(longcat_kernels.__file__)
    code = textwrap.dedent(
        f"""
        import importlib.util, sys, torch
        import longcat_kernels
        spec = importlib.util.spec_from_file_location(
            "kernels", {os.path.join(package, "__init__.py")!r}, submodule_search_locations=[{package!r}]
        )
        copy = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = copy
        try:
            spec.loader.exec_module(copy)
        except ImportError as err:
            print("refused:", err)
        q = k = v = torch.randn(1, 2, 60, 16)
        longcat_kernels.block_sparse_attention(q, k, v, (4, 3, 5), density=1.0, block=(2, 2, 2))
        print("first copy works")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused: kernels.dispatch (" in out.stdout and "already registered" in out.stdout
    assert "first copy works" in out.stdout


def test_hugging_face_kernels_lookup_does_not_import_this_package() -> None:
    # transformers looks for the hub's `kernels` package by that name: ours must not answer to it, even
    # from the repository root (on sys.path when running `python -m ...` there).
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = (
        "import sys, importlib.util; spec = importlib.util.find_spec('kernels'); "
        "print(spec.origin if spec else None)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=60)
    assert out.returncode == 0, out.stderr
    assert root not in out.stdout
