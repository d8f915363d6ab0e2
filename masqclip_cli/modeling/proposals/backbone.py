"""detectron2-layout ResNet backbone (frozen batch norm), in plain PyTorch.

Module and parameter names equal the official checkpoint keys with the ``backbone.`` prefix removed
(``stem.conv1.weight``, ``stem.conv1.norm.running_var``, ``res2.0.conv1.weight``, ``res2.0.shortcut.norm.bias``, ...),
so an official state_dict loads with ``strict=True`` after stripping the prefix.

Channel rule (detectron2): stem output = ``stem_out_channels``; output of res{k} = ``res2_out_channels * 2**(k-2)``;
bottleneck width of res{k} = ``num_groups * width_per_group * 2**(k-2)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from masqclip_cli.modeling.proposals.backbones import register_backbone

__all__ = [
    "BLOCKS_PER_STAGE",
    "BasicBlock",
    "BasicStem",
    "BottleneckBlock",
    "ConvNorm2d",
    "FrozenBatchNorm2d",
    "ResNet",
    "build_resnet",
    "load_torchvision_resnet",
    "torchvision_resnet_key",
]

#: Blocks per stage (res2, res3, res4, res5) for each supported depth.
BLOCKS_PER_STAGE: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters, all stored as buffers (detectron2 ``FrozenBN``).

    ``y = x * w / sqrt(var + eps) + (b - mean * w / sqrt(var + eps))``.

    Args:
        num_features: channel count C.
        eps: added to ``running_var`` (1e-5 as in detectron2).

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``; output dtype = input dtype.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, C, H, W) -> (B, C, H, W)``.

        Same dtype as the buffers: ``F.batch_norm`` in inference mode (bit-identical to the official float32 CPU
        outputs of case_a's res2/res3); otherwise (e.g. bf16 input, float32 buffers) the folded ``x * scale + shift``
        with scale/shift computed in the buffers' dtype and cast to ``x``'s dtype.
        """
        if x.dtype == self.weight.dtype:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.to(x.dtype).view(1, -1, 1, 1) + shift.to(x.dtype).view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class ConvNorm2d(nn.Conv2d):
    """``nn.Conv2d`` that owns an optional ``norm`` child and an optional activation (detectron2 ``Conv2d``).

    State-dict keys: ``weight`` (+ ``bias``) and ``norm.*``. ``forward``: conv -> norm -> activation.

    Args:
        *args, **kwargs: as for ``nn.Conv2d``.
        norm: module applied after the convolution (e.g. :class:`FrozenBatchNorm2d`, ``nn.GroupNorm``) or None.
        activation: callable applied last (e.g. ``F.relu``) or None. Not a module, so it adds no keys.
    """

    def __init__(
        self,
        *args,
        norm: nn.Module | None = None,
        activation: Callable[[Tensor], Tensor] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, C_in, H, W) -> (B, C_out, H', W')``."""
        x = self._conv_forward(x, self.weight, self.bias)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def _conv_fbn(
    in_ch: int,
    out_ch: int,
    kernel: int,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    groups: int = 1,
) -> ConvNorm2d:
    conv = ConvNorm2d(
        in_ch,
        out_ch,
        kernel_size=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=False,
        norm=FrozenBatchNorm2d(out_ch),
    )
    # c2_msra_fill (kaiming normal, fan_out); real weights get loaded anyway.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


class BasicStem(nn.Module):
    """``conv1`` (7x7/2, no bias) + FrozenBN + ReLU, then 3x3/2 max-pool with padding 1.

    Shapes: ``(B, in_channels, H, W) -> (B, out_channels, ceil(H/4), ceil(W/4))`` (exactly H/4, W/4 for multiples
    of 4).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 64) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.conv1 = _conv_fbn(in_channels, out_channels, 7, stride=2, padding=3)

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, C_in, H, W) -> (B, C_stem, H/4, W/4)``."""
        x = F.relu_(self.conv1(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class BasicBlock(nn.Module):
    """Two 3x3 convs (stride on the first) + identity / projection shortcut (ResNet-18/34).

    Shapes: ``(B, in_channels, H, W) -> (B, out_channels, H/stride, W/stride)``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.stride = int(in_channels), int(out_channels), int(stride)
        self.shortcut = (
            _conv_fbn(in_channels, out_channels, 1, stride=stride)
            if in_channels != out_channels or stride != 1
            else None
        )
        self.conv1 = _conv_fbn(in_channels, out_channels, 3, stride=stride, padding=1)
        self.conv2 = _conv_fbn(out_channels, out_channels, 3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, C_in, H, W) -> (B, C_out, H/stride, W/stride)``."""
        out = F.relu_(self.conv1(x))
        out = self.conv2(out)
        identity = self.shortcut(x) if self.shortcut is not None else x
        return F.relu_(out + identity)


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 (grouped, dilated) -> 1x1 bottleneck + identity / projection shortcut (ResNet-50/101/152).

    The stride sits in ``conv1`` when ``stride_in_1x1`` else in ``conv2`` (the official setting).

    Shapes: ``(B, in_channels, H, W) -> (B, out_channels, H/stride, W/stride)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        bottleneck_channels: int,
        stride: int = 1,
        num_groups: int = 1,
        stride_in_1x1: bool = False,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.stride = int(in_channels), int(out_channels), int(stride)
        self.shortcut = (
            _conv_fbn(in_channels, out_channels, 1, stride=stride)
            if in_channels != out_channels or stride != 1
            else None
        )
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = _conv_fbn(in_channels, bottleneck_channels, 1, stride=stride_1x1)
        self.conv2 = _conv_fbn(
            bottleneck_channels,
            bottleneck_channels,
            3,
            stride=stride_3x3,
            padding=dilation,
            dilation=dilation,
            groups=num_groups,
        )
        self.conv3 = _conv_fbn(bottleneck_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, C_in, H, W) -> (B, C_out, H/stride, W/stride)``."""
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        identity = self.shortcut(x) if self.shortcut is not None else x
        return F.relu_(out + identity)


class ResNet(nn.Module):
    """detectron2 ResNet with FrozenBN, returning ``res2..res5``.

    Args:
        depth: 18, 34 (basic blocks), 50, 101 or 152 (bottleneck blocks).
        stem_out_channels: stem output channels (= res2 input channels).
        res2_out_channels: res2 output channels; res{k} outputs ``res2_out_channels * 2**(k-2)``. Must be 64 for
            depth 18/34 (as in detectron2).
        num_groups, width_per_group: bottleneck width of res{k} = ``num_groups * width_per_group * 2**(k-2)``;
            ``num_groups`` is the group count of every 3x3 conv (unused by basic blocks).
        stride_in_1x1: put the stride in the first 1x1 conv instead of the 3x3 conv.
        res5_dilation: 1 or 2; with 2, res5 keeps stride 16 and dilates its 3x3 convs (bottleneck only).
        in_channels: image channels.

    Attributes:
        out_channels: ``{"res2": C2, ..., "res5": C5}``.
        strides: ``{"res2": 4, "res3": 8, "res4": 16, "res5": 32}`` (res5 16 when dilated).

    Raises:
        ValueError: unsupported depth / dilation, or res2_out_channels != 64 / res5_dilation != 1 with depth 18/34.
    """

    def __init__(
        self,
        depth: int = 50,
        stem_out_channels: int = 64,
        res2_out_channels: int = 256,
        num_groups: int = 1,
        width_per_group: int = 64,
        stride_in_1x1: bool = False,
        res5_dilation: int = 1,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if depth not in BLOCKS_PER_STAGE:
            raise ValueError(f"unsupported ResNet depth {depth}; known: {sorted(BLOCKS_PER_STAGE)}")
        if res5_dilation not in (1, 2):
            raise ValueError(f"res5_dilation must be 1 or 2, got {res5_dilation}")
        basic = depth in (18, 34)
        if basic and res2_out_channels != 64:
            raise ValueError(f"ResNet-{depth} needs res2_out_channels = 64 (detectron2), got {res2_out_channels}")
        if basic and res5_dilation != 1:
            raise ValueError(f"ResNet-{depth} needs res5_dilation = 1 (detectron2), got {res5_dilation}")
        self.depth = int(depth)
        self.stem = BasicStem(in_channels, stem_out_channels)
        self.out_channels: dict[str, int] = {}
        self.strides: dict[str, int] = {}
        self.stage_names: tuple[str, ...] = ("res2", "res3", "res4", "res5")

        cur_in, cur_out = int(stem_out_channels), int(res2_out_channels)
        bottleneck = int(num_groups) * int(width_per_group)
        stride_total = 4  # stem
        for idx, name in enumerate(self.stage_names):
            dilation = res5_dilation if name == "res5" else 1
            first_stride = 1 if idx == 0 or (name == "res5" and dilation == 2) else 2
            blocks: list[nn.Module] = []
            for b in range(BLOCKS_PER_STAGE[depth][idx]):
                stride = first_stride if b == 0 else 1
                if basic:
                    blocks.append(BasicBlock(cur_in, cur_out, stride=stride))
                else:
                    blocks.append(
                        BottleneckBlock(
                            cur_in,
                            cur_out,
                            bottleneck,
                            stride=stride,
                            num_groups=num_groups,
                            stride_in_1x1=stride_in_1x1,
                            dilation=dilation,
                        )
                    )
                cur_in = cur_out
            self.add_module(name, nn.Sequential(*blocks))
            stride_total *= first_stride
            self.out_channels[name] = cur_out
            self.strides[name] = stride_total
            cur_out *= 2
            bottleneck *= 2

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """``x (B, in_channels, H, W)`` -> ``{"res2": (B, C2, H/4, W/4), "res3": (B, C3, H/8, W/8),
        "res4": (B, C4, H/16, W/16), "res5": (B, C5, H/32, W/32)}`` (H, W multiples of 32)."""
        if x.dim() != 4:
            raise ValueError(f"ResNet expects (B, C, H, W), got shape {tuple(x.shape)}")
        out: dict[str, Tensor] = {}
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
            out[name] = x
        return out


_TV_NORM = {"bn1": "conv1.norm", "bn2": "conv2.norm", "bn3": "conv3.norm"}


def torchvision_resnet_key(key: str) -> str | None:
    """Our key for a torchvision ResNet state_dict key (None: a key we do not use, ``fc.*`` and
    ``num_batches_tracked``). ``conv1``/``bn1`` → ``stem.conv1(.norm)``, ``layer{k}.{b}.conv{i}``/``bn{i}`` →
    ``res{k+1}.{b}.conv{i}(.norm)``, ``downsample.0``/``.1`` → ``shortcut(.norm)``."""
    if key.startswith("fc.") or key.endswith("num_batches_tracked"):
        return None
    parts = key.split(".")
    if parts[0] == "conv1":
        return "stem.conv1." + ".".join(parts[1:])
    if parts[0] == "bn1":
        return "stem.conv1.norm." + ".".join(parts[1:])
    if parts[0].startswith("layer") and len(parts) >= 4:
        stage = f"res{int(parts[0][5:]) + 1}.{parts[1]}"
        name, rest = parts[2], parts[3:]
        if name == "downsample":
            return f"{stage}.shortcut{'.norm' if rest[0] == '1' else ''}." + ".".join(rest[1:])
        if name in _TV_NORM:
            return f"{stage}.{_TV_NORM[name]}." + ".".join(rest)
        return f"{stage}.{name}." + ".".join(rest)
    return key


def load_torchvision_resnet(backbone: ResNet, state_dict: dict[str, Tensor]) -> list[str]:
    """Load an ImageNet torchvision ResNet ``state_dict`` (the weights Mask2Former's R-50 starts from; torchvision
    puts the stride in the 3×3 conv, so use ``stride_in_1x1=False``) into ``backbone``. Returns the torchvision keys
    that were not used. Raises ValueError when a backbone tensor is missing or has another shape."""
    own = backbone.state_dict()
    mapped: dict[str, Tensor] = {}
    unused = []
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        ours = torchvision_resnet_key(key)
        if ours is None or ours not in own:
            unused.append(key)
            continue
        if tuple(own[ours].shape) != tuple(value.shape):
            raise ValueError(f"backbone weight {key}: shape {tuple(value.shape)} does not fit {ours} "
                             f"{tuple(own[ours].shape)}")
        mapped[ours] = value
    missing = sorted(set(own) - set(mapped))
    if missing:
        raise ValueError(f"the ResNet weights lack {len(missing)} backbone tensors, e.g. {missing[:3]}")
    backbone.load_state_dict(mapped, strict=True)
    return unused


@register_backbone("resnet")
def build_resnet(config: Mapping[str, Any]) -> ResNet:
    """The detectron2-layout ResNet of a proposal config's ``backbone`` section: ``depth, stem_out_channels,
    res2_out_channels, num_groups, width_per_group, stride_in_1x1, res5_dilation`` (optional ``in_channels`` = 3,
    ``norm`` = ``"FrozenBN"``, the only norm supported)."""
    if config.get("norm", "FrozenBN") != "FrozenBN":
        raise ValueError(f"only FrozenBN backbones are supported, got norm {config['norm']!r}")
    return ResNet(
        depth=int(config["depth"]),
        stem_out_channels=int(config["stem_out_channels"]),
        res2_out_channels=int(config["res2_out_channels"]),
        num_groups=int(config["num_groups"]),
        width_per_group=int(config["width_per_group"]),
        stride_in_1x1=bool(config.get("stride_in_1x1", False)),
        res5_dilation=int(config.get("res5_dilation", 1)),
        in_channels=int(config.get("in_channels", 3)),
    )
