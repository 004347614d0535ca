"""Networks of the Heterogeneous Cascade Framework (HCF): the slice classifier and SANet.

Both networks are 2D and work on axial CT slices of shape ``(B, 1, H, W)``; ``H`` and ``W`` must be
multiples of 16 for SANet (the encoder's output stride with the dilated last stage).

* :func:`slice_classifier` -- ResNet18, one input channel, two classes (slice contains GTV or not).
* :class:`SANet` -- ResNet18 encoder whose last stage has stride 1 and dilation 2, a Pyramid Pooling
  Module (bins 1, 2, 3, 6), a top-down decoder with three :class:`SpatialAlignmentModule` and
  1x1 Conv-BN-ReLU skip connections (128 channels), a multi-level fusion at 1/4 resolution and a
  final x4 bilinear up-sampling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import ResNet

__all__ = [
    "slice_classifier",
    "resnet18_encoder",
    "ConvBNReLU",
    "PyramidPooling",
    "SpatialAlignmentModule",
    "SANet",
    "count_parameters",
]


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (``requires_grad`` only when ``trainable_only``); buffers are not counted."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def slice_classifier(in_channels: int = 1, num_classes: int = 2) -> ResNet:
    """ResNet18 slice classifier (He et al. 2016) built with MONAI's ``ResNet``.

    The construction is the original ImageNet ResNet18 (7x7 stride-2 stem, max-pool, four stages
    of two basic blocks, projection shortcuts without bias, global average pooling, one linear
    layer) with one input channel and two outputs: 11,171,266 parameters, the paper's 11.17 M.

    Args:
        in_channels: input channels (1 for CT).
        num_classes: output logits (2: slice without / with GTV).

    Returns:
        a module mapping ``(B, in_channels, H, W)`` to logits ``(B, num_classes)``.
    """
    if in_channels < 1 or num_classes < 1:
        raise ValueError(f"in_channels and num_classes must be positive, got {in_channels}, {num_classes}")
    return ResNet(
        block="basic",
        layers=[2, 2, 2, 2],
        block_inplanes=[64, 128, 256, 512],
        spatial_dims=2,
        n_input_channels=in_channels,
        conv1_t_size=7,
        conv1_t_stride=2,
        shortcut_type="B",
        bias_downsample=False,
        num_classes=num_classes,
    )


def resnet18_encoder(in_channels: int = 1, last_stage_dilation: int = 2) -> ResNet:
    """ResNet18 without its classification head, last stage dilated instead of strided.

    Every convolution of the fourth stage gets stride 1 (the 3x3 ones dilation
    ``last_stage_dilation`` with matching padding, the 1x1 projection stride 1), so the output
    stride is 16 instead of 32 and the stage keeps its parameter count.

    Args:
        in_channels: input channels.
        last_stage_dilation: dilation of the fourth stage's 3x3 convolutions (1 gives plain
            ResNet18 with output stride 32).
    """
    if last_stage_dilation < 1:
        raise ValueError(f"last_stage_dilation must be >= 1, got {last_stage_dilation}")
    net = ResNet(
        block="basic",
        layers=[2, 2, 2, 2],
        block_inplanes=[64, 128, 256, 512],
        spatial_dims=2,
        n_input_channels=in_channels,
        conv1_t_size=7,
        conv1_t_stride=2,
        shortcut_type="B",
        bias_downsample=False,
        feed_forward=False,
    )
    if last_stage_dilation > 1:
        d = int(last_stage_dilation)
        for block in net.layer4:
            for conv in (block.conv1, block.conv2):
                conv.stride = (1, 1)
                conv.dilation = (d, d)
                conv.padding = (d, d)
            block.stride = 1
            if block.downsample is not None:
                block.downsample[0].stride = (1, 1)
    return net


class ConvBNReLU(nn.Sequential):
    """``Conv2d (no bias) -> BatchNorm2d -> ReLU`` with 'same' padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class PyramidPooling(nn.Module):
    """Pyramid Pooling Module (Zhao et al. 2017) as described in the HCF paper, section 3.2.2.

    Each bin ``n`` adaptive-average-pools the input to ``n x n``, reduces it with a 1x1
    convolution + BN to ``in_channels // len(bins)`` channels, and up-samples it bilinearly back.
    The pooled maps are concatenated with the input and a Conv-BN-ReLU maps the result to
    ``out_channels``.

    Args:
        in_channels: channels of the encoder output (512).
        out_channels: channels of the pyramid feature (128, the decoder width).
        bins: pooled grid sizes.
        bottleneck_kernel: kernel of the final Conv-BN-ReLU (3 as in PSPNet).

    Shapes:
        ``(B, in_channels, h, w) -> (B, out_channels, h, w)``.
    """

    def __init__(self, in_channels: int = 512, out_channels: int = 128, bins: Sequence[int] = (1, 2, 3, 6), bottleneck_kernel: int = 3):
        super().__init__()
        if not bins:
            raise ValueError("bins must not be empty")
        reduced = in_channels // len(bins)
        self.bins = [int(b) for b in bins]
        self.stages = nn.ModuleList(
            [
                nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(in_channels, reduced, 1, bias=False), nn.BatchNorm2d(reduced))
                for b in self.bins
            ]
        )
        self.bottleneck = ConvBNReLU(in_channels + reduced * len(self.bins), out_channels, bottleneck_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = (int(x.shape[2]), int(x.shape[3]))
        feats = [x]
        for stage in self.stages:
            feats.append(F.interpolate(stage(x), size=size, mode="bilinear", align_corners=False))
        return self.bottleneck(torch.cat(feats, dim=1))


def offsets_to_grid(offset: torch.Tensor) -> torch.Tensor:
    """Turn a pixel offset field on an ``H x W`` grid into a ``grid_sample`` grid.

    The regular grid is made of the output pixel centres in the normalised ``[-1, 1]`` frame of
    ``grid_sample(..., align_corners=False)``: pixel ``k`` of ``W`` sits at ``(2k + 1) / W - 1``.
    One output pixel is ``2 / W`` (x) or ``2 / H`` (y) in that frame, so the offsets are scaled by
    these factors. Channel 0 of ``offset`` is the shift along the width (``grid[..., 0]``, x),
    channel 1 along the height (``grid[..., 1]``, y).

    Args:
        offset: ``(B, 2, H, W)`` offsets in output pixels.

    Returns:
        ``(B, H, W, 2)`` sampling grid (x, y) for ``grid_sample`` with ``align_corners=False``.
    """
    b, _, h, w = offset.shape
    ys = (torch.arange(h, dtype=offset.dtype, device=offset.device) * 2 + 1) / h - 1
    xs = (torch.arange(w, dtype=offset.dtype, device=offset.device) * 2 + 1) / w - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    base = torch.stack((gx, gy), dim=-1).unsqueeze(0)  # (1, H, W, 2)
    scale = torch.tensor([2.0 / w, 2.0 / h], dtype=offset.dtype, device=offset.device)
    return base + offset.permute(0, 2, 3, 1) * scale


class SpatialAlignmentModule(nn.Module):
    """Spatial Alignment Module (SAM, paper eqs. 1-3): learnable up-sampling of a coarse map.

    The fine map ``X_i`` and the coarse map ``X_j`` (same channels ``C``) are compressed to
    ``C / 2`` channels with 1x1 convolutions, the coarse one is bilinearly up-sampled to the fine
    size, both are concatenated and a 3x3 convolution predicts a 2-channel offset field
    ``Delta_i`` (in fine-grid pixels). The coarse map is then resampled with ``grid_sample`` at the
    regular grid ``Omega_i`` plus ``Delta_i``.

    (Compressing before up-sampling equals the paper's up-sample-then-compress exactly: a 1x1
    convolution without bias and bilinear interpolation are both linear and act on different axes.)

    The offset convolution is initialised to zero, so an untrained SAM is plain bilinear
    up-sampling (``align_corners=False``, border padding), identical to
    ``F.interpolate(x_j, size, mode="bilinear", align_corners=False)``.

    Args:
        channels: ``C``, channels of both inputs and of the output.

    Shapes:
        ``fine (B, C, H_i, W_i)``, ``coarse (B, C, H_j, W_j)`` -> ``(B, C, H_i, W_i)``.
    """

    def __init__(self, channels: int = 128):
        super().__init__()
        if channels < 2:
            raise ValueError(f"channels must be >= 2, got {channels}")
        half = channels // 2
        self.compress_fine = nn.Conv2d(channels, half, 1, bias=False)
        self.compress_coarse = nn.Conv2d(channels, half, 1, bias=False)
        self.offset = nn.Conv2d(2 * half, 2, 3, padding=1, bias=False)
        nn.init.zeros_(self.offset.weight)

    def predict_offset(self, fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """Offset field ``(B, 2, H_i, W_i)`` in fine-grid pixels (channel 0: x/width, 1: y/height)."""
        size = (int(fine.shape[2]), int(fine.shape[3]))
        c = F.interpolate(self.compress_coarse(coarse), size=size, mode="bilinear", align_corners=False)
        return self.offset(torch.cat((self.compress_fine(fine), c), dim=1))

    @staticmethod
    def warp(coarse: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Resample ``coarse (B, C, h, w)`` on the fine grid shifted by ``offset (B, 2, H, W)``."""
        grid = offsets_to_grid(offset).to(coarse.dtype)
        return F.grid_sample(coarse, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def forward(self, fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        return self.warp(coarse, self.predict_offset(fine, coarse))


class SANet(nn.Module):
    """Spatial Alignment Network (HCF paper, section 3.2, Fig. 3).

    Encoder: ResNet18 (stride-2 7x7 stem + max-pool, stages S1-S4 at 1/4, 1/8, 1/16, 1/16; S4 uses
    stride 1 and dilation 2). Bridge: :class:`PyramidPooling` (bins 1, 2, 3, 6) to ``width``
    channels. Decoder: the S1-S3 maps go through 1x1 Conv-BN-ReLU skips to ``width`` channels;
    three SAMs align the current top-down map to S3 (1/16), S2 (1/8) and S1 (1/4) and the skip map
    is added after each. The PPM map and the three aligned maps are up-sampled to 1/4, concatenated,
    fused by a Conv-BN-ReLU, classified by a 1x1 convolution and up-sampled x4 (bilinear).

    Args:
        in_channels: input channels (1 for CT).
        out_channels: classes (2: background, GTV); the output is logits.
        width: decoder width (128 in the paper).
        bins: PPM bins.
        ppm_kernel: kernel of the PPM's final Conv-BN-ReLU.
        fuse_kernel: kernel of the fusion Conv-BN-ReLU.
        use_sam: False replaces every SAM by plain bilinear up-sampling (paper's "w/o SAM" ablation).
        use_ppm: False replaces the PPM by a 1x1 Conv-BN-ReLU (paper's "w/o PPM" ablation).

    Shapes:
        ``(B, in_channels, H, W) -> (B, out_channels, H, W)`` with ``H, W`` multiples of 16.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        width: int = 128,
        bins: Sequence[int] = (1, 2, 3, 6),
        ppm_kernel: int = 3,
        fuse_kernel: int = 1,
        use_sam: bool = True,
        use_ppm: bool = True,
    ):
        super().__init__()
        if in_channels < 1 or out_channels < 1 or width < 2:
            raise ValueError(f"bad SANet sizes: in_channels={in_channels}, out_channels={out_channels}, width={width}")
        enc = resnet18_encoder(in_channels, last_stage_dilation=2)
        self.stem = nn.Sequential(enc.conv1, enc.bn1, enc.act, enc.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = enc.layer1, enc.layer2, enc.layer3, enc.layer4
        self.ppm = PyramidPooling(512, width, bins, ppm_kernel) if use_ppm else ConvBNReLU(512, width, 1)
        self.skips = nn.ModuleList([ConvBNReLU(c, width, 1) for c in (256, 128, 64)])  # S3, S2, S1
        self.use_sam = bool(use_sam)
        self.sams = nn.ModuleList([SpatialAlignmentModule(width) for _ in range(3)]) if use_sam else nn.ModuleList()
        self.fuse = ConvBNReLU(4 * width, width, fuse_kernel)
        self.classifier = nn.Conv2d(width, out_channels, 1)

    def _align(self, idx: int, fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        if self.use_sam:
            for i, sam in enumerate(self.sams):
                if i == idx:
                    return sam(fine, coarse)
        return F.interpolate(coarse, size=(int(fine.shape[2]), int(fine.shape[3])), mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segment slices, or a volume slice by slice.

        Args:
            x: slices ``(B, C, H, W)`` or a volume ``(B, C, H, W, D)`` (axial slices along the last
                axis, as the cascade's pipeline holds them); ``H`` and ``W`` multiples of 16.

        Returns:
            logits ``(B, K, H, W)``, or ``(B, K, H, W, D)`` for a volume (each slice on its own).
        """
        if x.dim() == 5:
            b, d = int(x.shape[0]), int(x.shape[4])
            slices = x.permute(0, 4, 1, 2, 3).reshape(b * d, int(x.shape[1]), int(x.shape[2]), int(x.shape[3]))
            y = self._forward_slices(slices)
            return y.reshape(b, d, int(y.shape[1]), int(y.shape[2]), int(y.shape[3])).permute(0, 2, 3, 4, 1)
        return self._forward_slices(x)

    def _forward_slices(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if h % 16 != 0 or w % 16 != 0:
            raise ValueError(f"SANet input height and width must be multiples of 16, got {h} x {w}")
        s1 = self.layer1(self.stem(x))  # 1/4, 64
        s2 = self.layer2(s1)  # 1/8, 128
        s3 = self.layer3(s2)  # 1/16, 256
        s4 = self.layer4(s3)  # 1/16 (dilated), 512
        top = self.ppm(s4)
        levels = [top]
        current = top
        i = 0
        for skip, feat in zip(self.skips, (s3, s2, s1)):
            lateral = skip(feat)
            current = self._align(i, lateral, current) + lateral
            levels.append(current)
            i += 1
        size = (int(s1.shape[2]), int(s1.shape[3]))
        ups = [F.interpolate(lv, size=size, mode="bilinear", align_corners=False) for lv in levels[:-1]]
        ups.append(levels[-1])
        fused = self.fuse(torch.cat(ups, dim=1))
        logits = self.classifier(fused)
        return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
