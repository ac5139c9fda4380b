"""Patch info mining in half precision (what GPUs run: fp16 on T4/V100, bf16 on A100/H100), on the CPU."""

import copy

import pytest
import torch
from test_modeling import picture

from mgmflow.models.mgm.modeling import region_attention

FP16_MAX = torch.finfo(torch.float16).max  # 65504


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@torch.inference_mode()
def test_mining_in_half_precision_matches_float32(tiny_mgm, dtype):
    """The same tower features mined by fp32 and by half-precision projectors.

    Tolerance: each stage (the features' rounding to the format, LayerNorm, three projections, the logits, the
    softmax, the weighted sum) rounds its result once, a relative error of at most eps/2 (sums accumulate in
    fp32 inside CPU kernels and tensor cores). About eight such roundings, with the softmax turning an absolute
    logit error (logits here are O(1)) into a relative weight error of the same size, bound the output at a few
    eps of its scale: 4 eps of the largest output (fp16 4e-3, bf16 3e-2). Measured: about eps/2 for both.
    """
    model, processor = tiny_mgm
    images, images_aux = processor.preprocess([picture(3)])
    clip, aux = model.clip_features(images), model.aux_features(images_aux)
    reference = model.mine_patch_info(clip, aux)
    half = copy.deepcopy(model).to(dtype)
    mined = half.mine_patch_info(clip.to(dtype), aux.to(dtype))
    assert mined.dtype == dtype and torch.isfinite(mined).all()
    scale = reference.abs().max()
    assert (mined.float() - reference).abs().max() <= 4 * torch.finfo(dtype).eps * scale


def test_mining_logits_do_not_overflow_in_fp16_where_the_scaled_ones_fit():
    """The official code scales the key by 1/sqrt(C) before the product; scaling after it lets fp16 overflow at
    a 32x smaller activation (C = 1024): every logit becomes inf, nan_to_num makes them all 65504, and the
    attention goes uniform instead of to the best-matching pixel."""
    width = 1024  # the released mining width (CLIP-L)
    query = torch.full((1, 1, width), 12.0)
    offsets = torch.tensor([0.0, 0.05, 0.1, 0.2])  # keys 6.0 .. 6.2: logits 2304 .. 2381 once scaled
    key = (6.0 + offsets)[None, None, :, None].expand(1, 1, 4, width)
    value = torch.arange(4.0)[None, None, :, None].expand(1, 1, 4, width)
    half = [t.to(torch.float16) for t in (query, key, value)]

    assert torch.isinf(half[0][:, :, None] @ half[1].transpose(-1, -2)).all()  # the old order overflows
    assert (query[:, :, None] @ key.transpose(-1, -2) / width**0.5).max() < FP16_MAX  # the scaled logits fit

    reference = region_attention(query, key, value)  # fp32: all weight on the last key (gaps of 19+ logits)
    assert torch.allclose(reference, torch.full((1, 1, width), 3.0))
    mined = region_attention(*half)
    assert torch.isfinite(mined).all()
    assert torch.equal(mined.float(), reference)
