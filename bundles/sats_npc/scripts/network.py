"""SATS networks: the shared U-shaped encoder-decoder, the projection head and the Siamese wrapper.

The papers' backbone is nnU-Net's: their 30.70 M parameters (Table 1 gives the same count for
nnU-Net and SATS) are exactly nnU-Net's plain 3D U-Net for a 56 x 192 x 192 patch at 3 mm slices.
:class:`SATSUNet` (the default ``network_def``) is that network, built with
``dynamic-network-architectures`` (the network library of nnU-Net itself):

============  ==================================================================
stages        6: features 32, 64, 128, 256, 320, 320, two convolutions per stage
kernels       [3,3,1], then [3,3,3] x 5        (our (X, Y, Z) order; nnU-Net's [1,3,3])
strides       [1,1,1], [2,2,1], [2,2,2], [2,2,2], [2,2,2], [2,2,1]
blocks        conv (bias) -> InstanceNorm (affine) -> LeakyReLU(0.01); transposed-conv up-sampling
outputs       2 classes (softmax); a 1x1x1 head per decoder stage for deep supervision
parameters    30,703,498  (= the papers' 30.70 M)
============  ==================================================================

The papers' text describes residual encoder blocks and "four down-samplings"; that reading gives
16.7 M parameters and does not match their count. It is kept as an option: :class:`SATSNet`, MONAI's
residual :class:`~monai.networks.nets.DynUNet` (``configs/backbone_residual.yaml``: five
down-samplings, 30,972,257 parameters with two outputs; ``configs/backbone_residual4.yaml``: four
down-samplings). Both classes offer the same interface: ``forward(x)`` returns one tensor (the
full-resolution logits: inference, ``verify_net_in_out``, TorchScript, MONAI Label) and
``forward_features(x)`` returns ``(logits, features)`` for training, where ``logits`` is the list of
deep-supervision outputs (full resolution first) and ``features`` the decoder's last feature map
(the input of the projection head).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet  # the U-Net module only (no timm)
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from monai.networks.nets import DynUNet

__all__ = ["SATSUNet", "SATSNet", "ProjectionHead", "SATSSiamese", "count_parameters", "DEFAULT_NET_KWARGS"]

#: the paper-size configuration (our (X, Y, Z) order; patch [192, 192, 56]).
DEFAULT_NET_KWARGS = dict(
    spatial_dims=3,
    in_channels=1,
    out_channels=2,
    kernel_size=[[3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
    strides=[[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 1]],
    upsample_kernel_size=[[2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 1]],
    filters=[32, 64, 128, 256, 320, 320],
)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


class SATSUNet(PlainConvUNet):
    """nnU-Net's plain 3D U-Net (``PlainConvUNet`` of dynamic-network-architectures), SATS's backbone.

    Args:
        in_channels: input channels (1: normalised CT).
        out_channels: classes (2: background, GTVp; softmax).
        features: channels per stage (the number of stages is its length).
        kernel_sizes: per-stage kernels, our ``(X, Y, Z)`` order.
        strides: per-stage strides (the first is usually 1).
        n_conv_per_stage: convolutions per encoder stage.
        n_conv_per_stage_decoder: convolutions per decoder stage.
        deep_supervision: build the outputs of every decoder stage in :meth:`forward_features`
            (the 1x1x1 heads exist, and count, either way, as in nnU-Net).
        negative_slope: LeakyReLU slope.

    Shapes:
        input ``(B, in_channels, X, Y, Z)``, each spatial size divisible by the product of that axis's
        strides; :meth:`forward` returns ``(B, out_channels, X, Y, Z)`` logits.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        features: Sequence[int] = (32, 64, 128, 256, 320, 320),
        kernel_sizes: Sequence = DEFAULT_NET_KWARGS["kernel_size"],
        strides: Sequence = DEFAULT_NET_KWARGS["strides"],
        n_conv_per_stage: int = 2,
        n_conv_per_stage_decoder: int = 2,
        deep_supervision: bool = True,
        negative_slope: float = 0.01,
    ):
        n = len(features)
        if len(kernel_sizes) != n or len(strides) != n:
            raise ValueError(f"features ({n}), kernel_sizes ({len(kernel_sizes)}) and strides ({len(strides)}) need one entry per stage")
        if n < 2:
            raise ValueError(f"the U-Net needs at least 2 stages, got {n}")
        super().__init__(
            input_channels=in_channels,
            n_stages=n,
            features_per_stage=list(features),
            conv_op=nn.Conv3d,
            kernel_sizes=[list(k) for k in kernel_sizes],
            strides=[list(st) for st in strides],
            n_conv_per_stage=[int(n_conv_per_stage)] * n,
            num_classes=out_channels,
            n_conv_per_stage_decoder=[int(n_conv_per_stage_decoder)] * (n - 1),
            conv_bias=True,
            norm_op=nn.InstanceNorm3d,
            norm_op_kwargs={"eps": 1e-5, "affine": True},
            nonlin=nn.LeakyReLU,
            nonlin_kwargs={"negative_slope": negative_slope, "inplace": True},
            deep_supervision=bool(deep_supervision),
        )
        self.apply(InitWeights_He(1e-2))  # nnU-Net's initialisation
        self.features = [int(f) for f in features]

    @property
    def feature_channels(self) -> int:
        """Channels of the decoder's last feature map (``features[0]``)."""
        return self.features[0]

    @property
    def output_layers(self) -> list[nn.Module]:
        """The 1x1x1 output convolutions, full resolution first."""
        return list(self.decoder.seg_layers)[::-1]

    def _decode(self, x: torch.Tensor, all_outputs: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        skips = self.encoder(x)
        lres = skips[-1]
        outputs: list[torch.Tensor] = []
        n = len(self.decoder.stages)
        for s, (up, stage, seg) in enumerate(zip(self.decoder.transpconvs, self.decoder.stages, self.decoder.seg_layers)):
            lres = stage(torch.cat((up(lres), skips[-(s + 2)]), 1))
            if all_outputs or s == n - 1:
                outputs.append(seg(lres))
        return outputs[::-1], lres

    def forward_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Deep-supervision logits (full resolution first; only it without deep supervision) and features.

        Args:
            x: ``(B, in_channels, X, Y, Z)``.

        Returns:
            ``([logits (B, out, X, Y, Z), (B, out, X/2, Y/2, Z), ...], features (B, features[0], X, Y, Z))``.
        """
        return self._decode(x, self.decoder.deep_supervision)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, X, Y, Z)`` -> full-resolution logits ``(B, out_channels, X, Y, Z)``."""
        return self._decode(x, False)[0][0]


class SATSNet(DynUNet):
    """Residual U-shaped encoder-decoder of SATS (a :class:`DynUNet` returning one tensor).

    Args:
        spatial_dims: number of spatial dimensions (3).
        in_channels: input channels (1: normalised CT).
        out_channels: output channels (2: background and GTVp logits, softmax).
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
        out_channels: int = 2,
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

    @property
    def output_layers(self) -> list[nn.Module]:
        """The output convolution (one: this network has no deep supervision)."""
        return [self.output_block.conv.conv]

    def forward_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Logits (a one-element list: no deep supervision) and the decoder's last feature map.

        Args:
            x: ``(B, in_channels, X, Y, Z)``.

        Returns:
            ``([logits (B, out_channels, X, Y, Z)], features (B, filters[0], X, Y, Z))``.
        """
        feats = self.skip_layers(x)
        return [self.output_block(feats)], feats

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
        ``(logits, logits_flipped, emb, emb_flipped)``; ``logits`` and ``logits_flipped`` are lists of
        deep-supervision outputs (full resolution ``(B, out, X, Y, Z)`` first; one entry without deep
        supervision), embeddings ``(B, E, X, Y, Z)`` or None.
    """

    def __init__(self, backbone: SATSUNet | SATSNet, head: nn.Module | None = None, embed: str = "head"):
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
        mine, mirrored = [lg[:b] for lg in logits], [lg[b:] for lg in logits]
        if emb is None:
            return mine, mirrored, None, None
        return mine, mirrored, emb[:b], emb[b:]
