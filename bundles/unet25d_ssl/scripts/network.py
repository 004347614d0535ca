"""UNet-2.5D of Domoguen et al. (2022), its shared-encoder ensemble and the pretext-task heads.

Tensor layout follows MONAI: ``(B, C, X, Y, Z)`` with ``Z`` the slice (cranio-caudal) axis, so the
paper's in-plane ``3x3x1`` kernels are ``(3, 3, 1)`` here and its ``1x2x2`` pooling is ``(2, 2, 1)``.

Exact configuration (reproduces the paper's Table 5 counts, 3,845,058 parameters for the full
network and 895,122 for the decoder alone):

* channels 16, 32, 64, 128, 256; every block = two (convolution with bias -> BatchNorm -> ReLU);
* encoder blocks 1-4 use in-plane ``(3, 3, 1)`` kernels, block 5 (bottleneck) ``(3, 3, 3)``;
* max pooling ``(2, 2, 1)`` after blocks 1-3 and ``(2, 2, 2)`` into the bottleneck;
* up-sampling: transposed convolution ``(2, 2, 2)`` out of the bottleneck, then three ``(2, 2, 1)``,
  each followed by BatchNorm and ReLU;
* decoder blocks take the concatenation with the skip (``2C -> C``), ``(3, 3, 1)`` kernels;
* output layer: ``(3, 3, 1)`` convolution to 2 classes (logits).

The activation is the paper's ReLU (section 2.1: "conv -> BN -> RELU"), written as
``LeakyReLU(negative_slope)`` with ``negative_slope = 0`` (:data:`PAPER_SLOPE`, exactly ReLU);
``negative_slope = 0.01`` gives the LeakyReLU of the authors' published code. The slope has no
parameters, so it does not change any count, and a weights file does not record it: the training
writes it into ``ensemble.json`` and inference reads it from there.

The encoder (blocks 1-5 with the pooling) is the named submodule ``encoder``; the rest is
``decoder``. An input must have ``X`` and ``Y`` divisible by 16 and ``Z`` divisible by 2
(:data:`DIVISOR`); the inferers and pads in the configs take care of that.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "CHANNELS",
    "PAPER_SLOPE",
    "DIVISOR",
    "UNet25DEncoder",
    "UNet25DDecoder",
    "UNet25D",
    "UNet25DEnsemble",
    "PretextNet",
    "count_parameters",
    "prepare_network",
]

CHANNELS = (16, 32, 64, 128, 256)
# an input's spatial size must be a multiple of this (X, Y, Z)
DIVISOR = (16, 16, 2)
IN_PLANE = (3, 3, 1)
#: negative slope of the activations: 0 is the paper's ReLU (0.01: the authors' code's LeakyReLU)
PAPER_SLOPE = 0.0
FULL_3D = (3, 3, 3)


def _pad(kernel: Sequence[int]) -> tuple[int, ...]:
    return tuple(k // 2 for k in kernel)


class ConvBlock(nn.Sequential):
    """Two ``conv (bias) -> BatchNorm -> (Leaky)ReLU`` units.

    Args:
        in_channels: input channels ``C_in``.
        out_channels: output channels ``C``.
        kernel: 3D kernel size, e.g. ``(3, 3, 1)``.
        negative_slope: activation slope for negative inputs (0: ReLU, the paper's; 0.01: the authors' code).

    Shapes: ``(B, C_in, X, Y, Z) -> (B, C, X, Y, Z)``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int], negative_slope: float = PAPER_SLOPE):
        pad = _pad(kernel)
        super().__init__(
            nn.Conv3d(in_channels, out_channels, tuple(kernel), padding=pad, bias=True),
            nn.BatchNorm3d(out_channels),
            nn.LeakyReLU(negative_slope, inplace=True),
            nn.Conv3d(out_channels, out_channels, tuple(kernel), padding=pad, bias=True),
            nn.BatchNorm3d(out_channels),
            nn.LeakyReLU(negative_slope, inplace=True),
        )


class UpBlock(nn.Sequential):
    """Transposed convolution (kernel = stride) -> BatchNorm -> (Leaky)ReLU.

    Shapes: ``(B, C_in, X, Y, Z) -> (B, C_out, X*sx, Y*sy, Z*sz)``.
    """

    def __init__(self, in_channels: int, out_channels: int, scale: Sequence[int], negative_slope: float = PAPER_SLOPE):
        super().__init__(
            nn.ConvTranspose3d(in_channels, out_channels, tuple(scale), stride=tuple(scale), bias=True),
            nn.BatchNorm3d(out_channels),
            nn.LeakyReLU(negative_slope, inplace=True),
        )


class UNet25DEncoder(nn.Module):
    """Encoder blocks 1-5 (the bottleneck included) with their max pooling.

    Args:
        in_channels: image channels (1 for CT).
        channels: five feature widths.
        negative_slope: activation slope for negative inputs (0: ReLU, the paper's; 0.01: the authors' code).

    ``forward(x)`` with ``x`` of shape ``(B, in_channels, X, Y, Z)`` returns the list of five feature
    maps ``[f1 (B,16,X,Y,Z), f2 (B,32,X/2,Y/2,Z), f3 (B,64,X/4,Y/4,Z), f4 (B,128,X/8,Y/8,Z),
    f5 (B,256,X/16,Y/16,Z/2)]``; ``f5`` is the bottleneck, ``f1..f4`` are the skips.
    """

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = CHANNELS, negative_slope: float = PAPER_SLOPE):
        super().__init__()
        if len(channels) != 5:
            raise ValueError(f"channels must list 5 widths, got {list(channels)}")
        c = list(channels)
        self.block1 = ConvBlock(in_channels, c[0], IN_PLANE, negative_slope)
        self.block2 = ConvBlock(c[0], c[1], IN_PLANE, negative_slope)
        self.block3 = ConvBlock(c[1], c[2], IN_PLANE, negative_slope)
        self.block4 = ConvBlock(c[2], c[3], IN_PLANE, negative_slope)
        self.bottleneck = ConvBlock(c[3], c[4], FULL_3D, negative_slope)
        self.pool_in_plane = nn.MaxPool3d((2, 2, 1))
        self.pool_3d = nn.MaxPool3d((2, 2, 2))
        self.out_channels = c[4]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f1 = self.block1(x)
        f2 = self.block2(self.pool_in_plane(f1))
        f3 = self.block3(self.pool_in_plane(f2))
        f4 = self.block4(self.pool_in_plane(f3))
        f5 = self.bottleneck(self.pool_3d(f4))
        return [f1, f2, f3, f4, f5]


class UNet25DDecoder(nn.Module):
    """Up-sampling path and output layer.

    ``forward(features)`` takes the encoder's list ``[f1, ..., f5]`` and returns logits
    ``(B, out_channels, X, Y, Z)``.
    """

    def __init__(self, out_channels: int = 2, channels: Sequence[int] = CHANNELS, negative_slope: float = PAPER_SLOPE):
        super().__init__()
        c = list(channels)
        self.up4 = UpBlock(c[4], c[3], (2, 2, 2), negative_slope)
        self.block4 = ConvBlock(2 * c[3], c[3], IN_PLANE, negative_slope)
        self.up3 = UpBlock(c[3], c[2], (2, 2, 1), negative_slope)
        self.block3 = ConvBlock(2 * c[2], c[2], IN_PLANE, negative_slope)
        self.up2 = UpBlock(c[2], c[1], (2, 2, 1), negative_slope)
        self.block2 = ConvBlock(2 * c[1], c[1], IN_PLANE, negative_slope)
        self.up1 = UpBlock(c[1], c[0], (2, 2, 1), negative_slope)
        self.block1 = ConvBlock(2 * c[0], c[0], IN_PLANE, negative_slope)
        self.output = nn.Conv3d(c[0], out_channels, IN_PLANE, padding=_pad(IN_PLANE), bias=True)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        f1, f2, f3, f4, f5 = features[0], features[1], features[2], features[3], features[4]
        x = self.block4(torch.cat([self.up4(f5), f4], dim=1))
        x = self.block3(torch.cat([self.up3(x), f3], dim=1))
        x = self.block2(torch.cat([self.up2(x), f2], dim=1))
        x = self.block1(torch.cat([self.up1(x), f1], dim=1))
        return self.output(x)


def _check_size(x: torch.Tensor) -> None:
    # written so that TorchScript can compile it
    if x.dim() != 5:
        raise ValueError("expected a (B, C, X, Y, Z) tensor, got shape " + str(x.shape))
    if x.shape[2] % 16 != 0 or x.shape[3] % 16 != 0 or x.shape[4] % 2 != 0:
        raise ValueError(
            "spatial size " + str(x.shape[2:]) + " must be divisible by (16, 16, 2) (pad the input or use an inferer)"
        )


class UNet25D(nn.Module):
    """The UNet-2.5D segmentation network: ``encoder`` + ``decoder``.

    Args:
        in_channels: image channels.
        out_channels: classes (2: background, GTV).
        channels: five feature widths.
        negative_slope: activation slope for negative inputs (0: ReLU, the paper's; 0.01: the authors' code).

    ``forward(x)``: ``(B, in_channels, X, Y, Z) -> (B, out_channels, X, Y, Z)`` logits, with
    ``X, Y`` divisible by 16 and ``Z`` by 2.

    When the encoder is frozen (:meth:`freeze_encoder`) it stays in ``eval`` mode even when the
    network is put in training mode, so its BatchNorm running statistics do not drift either.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 2, channels: Sequence[int] = CHANNELS, negative_slope: float = PAPER_SLOPE):
        super().__init__()
        self.encoder = UNet25DEncoder(in_channels, channels, negative_slope)
        self.decoder = UNet25DDecoder(out_channels, channels, negative_slope)
        self.encoder_frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_size(x)
        return self.decoder(self.encoder(x))

    def freeze_encoder(self, frozen: bool = True) -> UNet25D:
        """Stop (or restart) gradient flow into the encoder and keep it in eval mode."""
        self.encoder_frozen = bool(frozen)
        for p in self.encoder.parameters():
            p.requires_grad_(not frozen)
        self.train(self.training)
        return self

    def train(self, mode: bool = True) -> UNet25D:
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
        return self

    def load_encoder(self, path_or_state, map_location="cpu", strict: bool = True) -> UNet25D:
        """Load encoder weights from a file (``torch.load(weights_only=True)``) or a state dict.

        Accepts a bare encoder state dict, or a full UNet-2.5D state dict (its ``encoder.`` keys).
        """
        if isinstance(path_or_state, dict):
            state = path_or_state
        else:
            from npc_gtv.training import load_weights

            state = load_weights(path_or_state, map_location=map_location)
        if any(k.startswith("encoder.") for k in state):
            state = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
        self.encoder.load_state_dict(state, strict=strict)
        return self


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``module`` (only those with ``requires_grad`` when ``trainable_only``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def prepare_network(network: UNet25D, pretrained_encoder: str | None = None, freeze_encoder: bool = False, verbose: bool = True) -> UNet25D:
    """Optionally load a pretrained encoder and freeze it; print the parameter counts.

    Args:
        network: a :class:`UNet25D`.
        pretrained_encoder: encoder weights file written by ``pretrain.yaml`` (``encoder.pt``), or
            empty / None to start from random weights.
        freeze_encoder: freeze the encoder (decoder-only training, 895,122 trainable parameters).
        verbose: print ``trainable parameters: N of M``.

    Raises:
        ValueError: ``freeze_encoder`` without ``pretrained_encoder`` (a frozen random encoder is
            almost certainly a configuration mistake).
    """
    if pretrained_encoder:
        network.load_encoder(pretrained_encoder)
    if freeze_encoder:
        if not pretrained_encoder:
            raise ValueError("freeze_encoder=True needs pretrained_encoder (the encoder.pt written by pretrain.yaml)")
        network.freeze_encoder(True)
    if verbose:
        print(
            f"UNet-2.5D trainable parameters: {count_parameters(network, True):,} of {count_parameters(network):,}"
            + (" (encoder frozen)" if freeze_encoder else ""),
            flush=True,
        )
    return network


class UNet25DEnsemble(nn.Module):
    """Multi-scale ensemble of UNet-2.5D models, one tensor in, one tensor out.

    With ``shared_encoder=True`` the members are one encoder and ``num_members`` decoders (the
    frozen-SSL-encoder ensemble of the paper's section 2.4.3): the encoder runs once per input and
    is held once in memory and in the state dict (``encoder.*``, ``decoders.<i>.*``). With
    ``shared_encoder=False`` it holds ``num_members`` complete networks (``members.<i>.*``).

    ``forward(x)``: ``(B, in_channels, X, Y, Z)`` -> mean softmax probability over the members,
    ``(B, 2, X, Y, Z)``; with ``return_spread=True`` one more channel is appended, the per-voxel
    standard deviation of the members' foreground probability: ``(B, 3, X, Y, Z)``.

    Args:
        num_members: number of models (5 scales).
        shared_encoder: one encoder for all members.
        return_spread: append the uncertainty channel.
        in_channels, out_channels, channels, negative_slope: as :class:`UNet25D` (``out_channels``
            must be 2 when ``return_spread``).
    """

    def __init__(
        self,
        num_members: int = 5,
        shared_encoder: bool = True,
        return_spread: bool = False,
        in_channels: int = 1,
        out_channels: int = 2,
        channels: Sequence[int] = CHANNELS,
        negative_slope: float = PAPER_SLOPE,
    ):
        super().__init__()
        if return_spread and out_channels != 2:
            raise ValueError("return_spread needs out_channels == 2 (foreground = channel 1)")
        self.return_spread = bool(return_spread)
        self._dims = (int(in_channels), int(out_channels), tuple(channels), float(negative_slope))
        self._build(int(num_members), bool(shared_encoder))

    def _build(self, num_members: int, shared_encoder: bool) -> None:
        if num_members < 1:
            raise ValueError(f"num_members must be >= 1, got {num_members}")
        in_channels, out_channels, channels, slope = self._dims
        self.num_members = num_members
        self.shared_encoder = shared_encoder
        if shared_encoder:
            self.encoder = UNet25DEncoder(in_channels, channels, slope)
            self.decoders = nn.ModuleList([UNet25DDecoder(out_channels, channels, slope) for _ in range(num_members)])
            self.members = nn.ModuleList()
        else:
            self.encoder = None
            self.decoders = nn.ModuleList()
            self.members = nn.ModuleList([UNet25D(in_channels, out_channels, channels, slope) for _ in range(num_members)])

    @staticmethod
    def layout_of(state_dict) -> tuple[bool, int]:
        """``(shared_encoder, num_members)`` of an ensemble state dict."""
        shared = any(k.startswith("encoder.") for k in state_dict)
        prefix = "decoders." if shared else "members."
        idx = {int(k.split(".")[1]) for k in state_dict if k.startswith(prefix)}
        return shared, len(idx)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load an ensemble state dict; the module is first rebuilt to the file's layout if it differs.

        The weights file decides between one shared encoder + decoders and independent full
        members (and their number), so an inference config never needs to know how the ensemble
        was trained.
        """
        shared, n = self.layout_of(state_dict)
        if n >= 1 and (shared, n) != (self.shared_encoder, self.num_members):
            device = next(self.parameters()).device
            self._build(n, shared)
            self.to(device)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def member_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities of every member, ``(M, B, out_channels, X, Y, Z)``."""
        _check_size(x)
        probs: list[torch.Tensor] = []
        if self.encoder is not None:
            feats = self.encoder(x)
            for decoder in self.decoders:
                probs.append(torch.softmax(decoder(feats), dim=1))
        else:
            for member in self.members:
                probs.append(torch.softmax(member(x), dim=1))
        return torch.stack(probs, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.member_probabilities(x)
        mean = probs.mean(dim=0)
        if self.return_spread:
            spread = probs[:, :, 1:2].std(dim=0, unbiased=False)
            return torch.cat([mean, spread], dim=1)
        return mean

    def load_members(self, member_states: Sequence[dict], encoder_state: dict | None = None) -> UNet25DEnsemble:
        """Fill the ensemble from per-scale state dicts.

        Shared encoder: ``encoder_state`` is the (pretrained, frozen) encoder; each member state is
        a decoder state dict, or a full UNet-2.5D state dict whose ``decoder.*`` part is used.
        Independent members: each state is a full UNet-2.5D state dict.
        """
        if len(member_states) != self.num_members:
            raise ValueError(f"expected {self.num_members} member state dicts, got {len(member_states)}")
        if self.shared_encoder:
            if encoder_state is None:
                raise ValueError("a shared-encoder ensemble needs encoder_state")
            if any(k.startswith("encoder.") for k in encoder_state):
                encoder_state = {k[8:]: v for k, v in encoder_state.items() if k.startswith("encoder.")}
            self.encoder.load_state_dict(encoder_state)
            for decoder, state in zip(self.decoders, member_states):
                if any(k.startswith("decoder.") for k in state):
                    state = {k[8:]: v for k, v in state.items() if k.startswith("decoder.")}
                decoder.load_state_dict(state)
        else:
            for member, state in zip(self.members, member_states):
                member.load_state_dict(state)
        return self


class PretextNet(nn.Module):
    """Encoder + the two pretext heads of the self-supervised pretraining (section 2.4).

    The encoder's bottleneck features are global-average pooled to a 256-vector ``h``.

    * rotation head: ``h(rotated patch) -> 10`` logits (identity + 90/180/270 degrees about each axis);
    * RPL head: ``[h(centre patch), h(query patch)] -> 26`` logits (the query's position among the
      26 neighbours of the centre in a 3x3x3 grid).

    ``forward(inputs)`` takes a tuple ``(rot_image, centre, query)`` of ``(B, 1, X, Y, Z)`` tensors and
    returns ``(rot_logits (B, 10), rpl_logits (B, 26))``.
    """

    def __init__(self, encoder: UNet25DEncoder | None = None, hidden: int = 256, num_rotations: int = 10, num_locations: int = 26, dropout: float = 0.0,
                 negative_slope: float = PAPER_SLOPE, in_channels: int = 1):
        super().__init__()
        self.encoder = encoder if encoder is not None else UNet25DEncoder(in_channels, negative_slope=negative_slope)
        width = self.encoder.out_channels
        self.rot_head = nn.Sequential(nn.Linear(width, hidden), nn.LeakyReLU(0.01, inplace=True), nn.Dropout(dropout), nn.Linear(hidden, num_rotations))
        self.rpl_head = nn.Sequential(nn.Linear(2 * width, hidden), nn.LeakyReLU(0.01, inplace=True), nn.Dropout(dropout), nn.Linear(hidden, num_locations))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled bottleneck features ``(B, 256)`` of ``x`` ``(B, 1, X, Y, Z)``."""
        _check_size(x)
        return F.adaptive_avg_pool3d(self.encoder(x)[-1], 1).flatten(1)

    def forward(self, inputs):
        rot_image, centre, query = inputs
        rot_logits = self.rot_head(self.embed(rot_image))
        # centre and query go through the encoder in one batch (same BatchNorm statistics)
        both = self.embed(torch.cat([centre, query], dim=0))
        h_c, h_q = both[: centre.shape[0]], both[centre.shape[0] :]
        rpl_logits = self.rpl_head(torch.cat([h_c, h_q], dim=1))
        return rot_logits, rpl_logits
