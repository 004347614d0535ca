"""SATS networks: the shared residual U-shaped encoder-decoder and the projection head.

The encoder-decoder is MONAI's :class:`~monai.networks.nets.DynUNet` with residual blocks
(``res_block=True``: two convolutions, InstanceNorm, LeakyReLU, strided-convolution down-sampling).
:class:`SATSNet` only adds :meth:`SATSNet.forward_features`, which also returns the decoder's last
feature map (the input of the 1x1x1 output convolution) so the projection head can be applied to it
during training. ``forward`` returns one tensor, so the same class is the inference ``network_def``
(``verify_net_in_out``, TorchScript export, MONAI Label).

Default configuration (see ``configs/train.yaml``), our axis order ``(X, Y, Z)``:

============  ==================================================================
filters       32, 64, 128, 256, 320, 320   (doubling, capped at 320)
kernel_size   [3,3,1], then [3,3,3] x 5    (in-plane only at full resolution)
strides       [1,1,1], [2,2,1], [2,2,2], [2,2,2], [2,2,2], [2,2,1]
parameters    30,972,257  (paper Table 1: 30.70 M; +0.89 %)
============  ==================================================================
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import DynUNet

__all__ = ["SATSNet", "ProjectionHead", "SATSSiamese", "count_parameters", "DEFAULT_NET_KWARGS"]

#: the paper-size configuration (our (X, Y, Z) order; patch [192, 192, 56]).
DEFAULT_NET_KWARGS = dict(
    spatial_dims=3,
    in_channels=1,
    out_channels=1,
    kernel_size=[[3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
    strides=[[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 1]],
    upsample_kernel_size=[[2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 1]],
    filters=[32, 64, 128, 256, 320, 320],
)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


class SATSNet(DynUNet):
    """Residual U-shaped encoder-decoder of SATS (a :class:`DynUNet` returning one tensor).

    Args:
        spatial_dims: number of spatial dimensions (3).
        in_channels: input channels (1: windowed CT).
        out_channels: output channels (1: GTV logit, sigmoid activation).
        kernel_size: per-level convolution kernel sizes.
        strides: per-level strides (the first is the input block's, usually 1).
        upsample_kernel_size: transposed-convolution kernels (``strides[1:]``).
        filters: channels per level; default doubles from 32 and stays at the cap.
        norm_name: normalisation (InstanceNorm as the paper).
        act_name: activation (LeakyReLU as the paper).
        res_block: residual blocks of two convolutions (True as the paper).
        kwargs: passed to :class:`DynUNet` (``deep_supervision`` must stay False).

    Shapes:
        input ``(B, in_channels, X, Y, Z)`` with each spatial size divisible by the product of
        that axis's strides; output ``(B, out_channels, X, Y, Z)`` logits.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 1,
        kernel_size: Sequence = DEFAULT_NET_KWARGS["kernel_size"],
        strides: Sequence = DEFAULT_NET_KWARGS["strides"],
        upsample_kernel_size: Sequence = DEFAULT_NET_KWARGS["upsample_kernel_size"],
        filters: Sequence[int] | None = DEFAULT_NET_KWARGS["filters"],
        norm_name="instance",
        act_name=("leakyrelu", {"negative_slope": 0.01, "inplace": True}),
        res_block: bool = True,
        **kwargs,
    ):
        if kwargs.get("deep_supervision", False):
            raise ValueError("SATSNet returns one tensor; deep_supervision is not supported")
        if len(kernel_size) != len(strides) or len(upsample_kernel_size) != len(strides) - 1:
            raise ValueError(
                f"kernel_size ({len(kernel_size)}), strides ({len(strides)}) and upsample_kernel_size "
                f"({len(upsample_kernel_size)}) must describe the same number of levels (upsample: levels - 1)"
            )
        if filters is not None and len(filters) != len(strides):
            raise ValueError(f"filters has {len(filters)} entries but the network has {len(strides)} levels")
        super().__init__(
            spatial_dims,
            in_channels,
            out_channels,
            kernel_size=kernel_size,
            strides=strides,
            upsample_kernel_size=upsample_kernel_size,
            filters=filters,
            norm_name=norm_name,
            act_name=act_name,
            res_block=res_block,
            **kwargs,
        )

    @property
    def feature_channels(self) -> int:
        """Channels of the decoder's last feature map (``filters[0]``)."""
        return int(self.filters[0])

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the decoder's last feature map.

        Args:
            x: ``(B, in_channels, X, Y, Z)``.

        Returns:
            ``(logits (B, out_channels, X, Y, Z), features (B, filters[0], X, Y, Z))``.
        """
        feats = self.skip_layers(x)
        return self.output_block(feats), feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, X, Y, Z)`` -> logits ``(B, out_channels, X, Y, Z)``."""
        return self.output_block(self.skip_layers(x))


class ProjectionHead(nn.Module):
    """Non-linear projection g: three 1x1x1 convolutions (ReLU after the first two), then L2 unit norm.

    Args:
        in_channels: channels of the decoder feature map (32 by default).
        channels: channels of every convolution (16 as the paper).
        spatial_dims: 3.
        eps: guards the normalisation of an all-zero feature vector.

    Shapes:
        ``(B, in_channels, X, Y, Z)`` -> ``(B, channels, X, Y, Z)`` with unit L2 norm over channels.
    """

    def __init__(self, in_channels: int = 32, channels: int = 16, spatial_dims: int = 3, eps: float = 1e-12):
        super().__init__()
        if in_channels < 1 or channels < 1:
            raise ValueError(f"in_channels and channels must be positive, got {in_channels}, {channels}")
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}.get(spatial_dims)
        if conv is None:
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
        self.eps = eps
        self.layers = nn.Sequential(
            conv(in_channels, channels, 1),
            nn.ReLU(inplace=True),
            conv(channels, channels, 1),
            nn.ReLU(inplace=True),
            conv(channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.layers(x), p=2.0, dim=1, eps=self.eps)


class SATSSiamese(nn.Module):
    """The training-time Siamese model: one shared :class:`SATSNet` applied to I and its mirror I'.

    The weights are shared simply by calling the same backbone twice (in one batch of ``2B``).

    Args:
        backbone: the encoder-decoder.
        head: projection head, or None (then ``embed`` decides what the margin loss sees).
        embed: ``"head"`` (projected, unit-norm features), ``"features"`` (the decoder's last
            feature map, L2-normalised over channels so the margin has the same scale; ablation
            variant "margin loss without head") or ``"none"`` (no embedding, segmentation only).

    Shapes:
        ``forward(x, x_flipped)`` with both ``(B, C, X, Y, Z)`` returns
        ``(logits, logits_flipped, emb, emb_flipped)``; logits ``(B, out, X, Y, Z)``, embeddings
        ``(B, E, X, Y, Z)`` or None.
    """

    def __init__(self, backbone: SATSNet, head: nn.Module | None = None, embed: str = "head"):
        super().__init__()
        if embed not in ("head", "features", "none"):
            raise ValueError(f"embed must be 'head', 'features' or 'none', got {embed!r}")
        if embed == "head" and head is None:
            raise ValueError("embed='head' needs a projection head")
        self.backbone = backbone
        self.head = head
        self.embed = embed

    def forward(self, x: torch.Tensor, x_flipped: torch.Tensor):
        b = x.shape[0]
        logits, feats = self.backbone.forward_features(torch.cat([x, x_flipped], dim=0))
        if self.embed == "head":
            emb = self.head(feats)
        elif self.embed == "features":
            emb = F.normalize(feats, p=2.0, dim=1, eps=1e-12)
        else:
            emb = None
        if emb is None:
            return logits[:b], logits[b:], None, None
        return logits[:b], logits[b:], emb[:b], emb[b:]
