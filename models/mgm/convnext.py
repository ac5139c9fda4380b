"""The ConvNeXt trunk of Mini-Gemini's high-resolution tower, in plain torch.

Mini-Gemini keeps only the stem and the four stages of open_clip's timm ConvNeXt (``convnext_large_d_320``).
This module uses timm's parameter names (``stem.*``, ``stages.{s}.downsample.*``, ``stages.{s}.blocks.{j}.*``)
so timm / open_clip state dicts load as they are, without timm (which drags torchvision into the CPU stack).
Drop-path is a training-time regulariser and does not exist here: this trunk is inference only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPS = 1e-6  # timm's ConvNeXt default


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtMlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 conv -> LayerNorm -> MLP (x4) -> LayerScale, plus the residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = ConvNeXtMlp(dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_dw(x).permute(0, 2, 3, 1)  # [N, H, W, C]
        x = self.mlp(self.norm(x)).permute(0, 3, 1, 2)
        return shortcut + x * self.gamma.reshape(1, -1, 1, 1)


class ConvNeXtStage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int):
        super().__init__()
        # Stage 0 follows the stride-4 stem directly; the others halve the resolution first.
        if in_dim == dim:
            self.downsample = nn.Identity()
        else:
            self.downsample = nn.Sequential(
                LayerNorm2d(in_dim, eps=LAYER_NORM_EPS), nn.Conv2d(in_dim, dim, kernel_size=2, stride=2)
            )
        self.blocks = nn.Sequential(*(ConvNeXtBlock(dim) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ConvNeXtTrunk(nn.Module):
    """Stem + 4 stages; returns every stage's map upsampled to the stage-0 size and concatenated on channels.

    For an input [N, 3, S, S] the output is [N, sum(dims), S/4, S/4] (ConvNeXt-L: 2880 channels).
    """

    def __init__(self, depths: tuple[int, ...], dims: tuple[int, ...]):
        super().__init__()
        self.depths, self.dims = tuple(depths), tuple(dims)
        self.stem = nn.Sequential(
            nn.Conv2d(3, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0], eps=LAYER_NORM_EPS)
        )
        in_dims = (dims[0], *dims[:-1])
        self.stages = nn.Sequential(
            *(ConvNeXtStage(in_dim, dim, depth) for in_dim, dim, depth in zip(in_dims, dims, depths))
        )

    @property
    def hidden_size(self) -> int:
        return sum(self.dims)

    @classmethod
    def from_state_dict_shapes(cls, state_dict: dict[str, torch.Tensor]) -> "ConvNeXtTrunk":
        """Size a trunk from timm-named weights (``stem.*``, ``stages.*``): depths and dims are in the shapes."""
        n_stages = 1 + max(int(key.split(".")[1]) for key in state_dict if key.startswith("stages."))
        dims, depths = [], []
        for s in range(n_stages):
            blocks = {int(k.split(".")[3]) for k in state_dict if k.startswith(f"stages.{s}.blocks.")}
            depths.append(1 + max(blocks))
            dims.append(state_dict[f"stages.{s}.blocks.0.gamma"].shape[0])
        return cls(tuple(depths), tuple(dims))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.stem(pixel_values)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        size = features[0].shape[-2:]
        # The official tower interpolates in fp32 and casts back, whatever the model's dtype.
        upsampled = [features[0]] + [
            F.interpolate(f.float(), size=size, mode="bilinear", align_corners=False).to(f.dtype)
            for f in features[1:]
        ]
        return torch.cat(upsampled, dim=1)
