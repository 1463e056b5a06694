"""The vision network of "Routing the Lottery": a truncated GhostNet (v1).

The paper prunes a small GhostNet (Han et al., 2020, laid out as in timm's ``ghostnet``) cut
after its ninth Ghost bottleneck, so that one shared weight tensor is small enough to hold many
masks. The layout is: stem conv 3->16 (stride 2), nine Ghost bottlenecks up to 80 channels, a
1x1 conv 80->184, global average pool, a 1x1 "head" conv 184->128 (with bias) and a linear
classifier 128->num_classes.

What may be pruned is every convolution weight except the squeeze-excite convs; BatchNorm,
squeeze-excite, biases and the classifier stay dense. At width 1.0 with 3 input channels that
is exactly 125,832 weights, which is what makes the paper's 94K / 63K / 31K kept-weight counts
at 25 / 50 / 75 % sparsity come out.

All convolutions pad by ``kernel // 2`` so the stride-2 stages shrink an 8x8 image to 1x1 and
never to 0x0: the same network runs on scikit-learn digits (8x8) and on CIFAR (32x32).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# One row per Ghost bottleneck at width 1.0: (in, mid, out, depthwise kernel, stride, SE ratio).
# These are GhostNet v1's first nine bottlenecks; the 0.25 entries carry squeeze-excite.
_BOTTLENECKS: tuple[tuple[int, int, int, int, int, float], ...] = (
    (16, 16, 16, 3, 1, 0.0),
    (16, 48, 24, 3, 2, 0.0),
    (24, 72, 24, 3, 1, 0.0),
    (24, 72, 40, 5, 2, 0.25),
    (40, 120, 40, 5, 1, 0.25),
    (40, 240, 80, 3, 2, 0.0),
    (80, 200, 80, 3, 1, 0.0),
    (80, 184, 80, 3, 1, 0.0),
    (80, 184, 80, 3, 1, 0.0),
)
_STEM_CHANNELS = 16
_LAST_CONV_CHANNELS = 184
_HEAD_CHANNELS = 128
_DIVISOR = 4  # GhostNet rounds every channel count to a multiple of 4.


def make_divisible(value: float, divisor: int = _DIVISOR) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (at least ``divisor``), as GhostNet does.

    Rounding may not lose more than 10 % of ``value``; if it would, one more ``divisor`` is added.
    This is the rule GhostNet uses both for width-scaled channel counts and for the
    squeeze-excite bottleneck width, so scaled models keep hardware-friendly channel counts.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class _ConvBnAct(nn.Sequential):
    """Conv (no bias, since BN follows) -> BatchNorm -> optional ReLU; padding ``kernel // 2``."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, relu: bool = True
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class _GhostModule(nn.Module):
    """GhostNet's cheap replacement for a 1x1 conv ``in_ch -> out_ch``.

    A 1x1 "primary" conv produces ``ceil(out_ch / 2)`` intrinsic maps; a depthwise 3x3 "cheap"
    conv derives as many "ghost" maps from them; the two are concatenated and sliced back to
    ``out_ch`` (the slice only bites when ``out_ch`` is odd). This halves the weights of a plain
    1x1 conv, which is where most of the network's parameters would otherwise sit.
    """

    def __init__(self, in_ch: int, out_ch: int, relu: bool) -> None:
        super().__init__()
        self.out_ch = out_ch
        init_ch = math.ceil(out_ch / 2)
        self.primary_conv = _ConvBnAct(in_ch, init_ch, 1, relu=relu)
        self.cheap_operation = _ConvBnAct(init_ch, init_ch, 3, groups=init_ch, relu=relu)

    def forward(self, x: Tensor) -> Tensor:
        intrinsic = self.primary_conv(x)
        ghosts = self.cheap_operation(intrinsic)
        return torch.cat([intrinsic, ghosts], dim=1)[:, : self.out_ch]


class _SqueezeExcite(nn.Module):
    """Channel gating: pool, 1x1 reduce (+ReLU), 1x1 expand, hard-sigmoid gate.

    Its convs carry biases and are kept dense: they act on pooled statistics rather than on the
    feature maps, so the paper does not count them as prunable.
    """

    def __init__(self, channels: int, ratio: float) -> None:
        super().__init__()
        reduced = make_divisible(channels * ratio)
        self.conv_reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.conv_expand = nn.Conv2d(reduced, channels, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        gate = x.mean(dim=(2, 3), keepdim=True)
        gate = self.conv_expand(F.relu(self.conv_reduce(gate)))
        return x * F.hardsigmoid(gate)


class _GhostBottleneck(nn.Module):
    """GhostNet v1 bottleneck: ghost expand -> [strided depthwise] -> [SE] -> ghost project, + shortcut.

    The shortcut is the identity when shape is preserved, otherwise a depthwise conv (same kernel
    and stride as the main path) followed by a 1x1 conv, each with BatchNorm.
    """

    def __init__(
        self, in_ch: int, mid_ch: int, out_ch: int, dw_kernel: int, stride: int, se_ratio: float
    ) -> None:
        super().__init__()
        self.ghost1 = _GhostModule(in_ch, mid_ch, relu=True)
        self.conv_dw: nn.Module | None = None
        if stride > 1:
            self.conv_dw = _ConvBnAct(mid_ch, mid_ch, dw_kernel, stride, groups=mid_ch, relu=False)
        self.se: nn.Module | None = _SqueezeExcite(mid_ch, se_ratio) if se_ratio > 0 else None
        self.ghost2 = _GhostModule(mid_ch, out_ch, relu=False)
        if in_ch == out_ch and stride == 1:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                _ConvBnAct(in_ch, in_ch, dw_kernel, stride, groups=in_ch, relu=False),
                _ConvBnAct(in_ch, out_ch, 1, relu=False),
            )

    def forward(self, x: Tensor) -> Tensor:
        y = self.ghost1(x)
        if self.conv_dw is not None:
            y = self.conv_dw(y)
        if self.se is not None:
            y = self.se(y)
        y = self.ghost2(y)
        return y + self.shortcut(x)


class GhostNetTruncated(nn.Module):
    """GhostNet v1 cut after its ninth bottleneck: the paper's vision backbone for RTL.

    ``width`` multiplies every channel count (stem, bottleneck mids and outs, the 184-channel
    conv and the 128-channel head) through :func:`make_divisible`, so width 1.0 reproduces the
    paper's layout exactly and smaller widths give cheap models for tests and small data.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")

        def scaled(channels: int) -> int:
            return make_divisible(channels * width)

        stem_ch = scaled(_STEM_CHANNELS)
        self.stem = _ConvBnAct(in_channels, stem_ch, 3, stride=2)

        blocks: list[nn.Module] = []
        prev = stem_ch
        for _, mid, out, kernel, stride, se_ratio in _BOTTLENECKS:
            blocks.append(_GhostBottleneck(prev, scaled(mid), scaled(out), kernel, stride, se_ratio))
            prev = scaled(out)
        self.blocks = nn.Sequential(*blocks)

        last_ch = scaled(_LAST_CONV_CHANNELS)
        self.conv_last = _ConvBnAct(prev, last_ch, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        head_ch = scaled(_HEAD_CHANNELS)
        # The head conv has a bias (no BN follows it, as in GhostNet's conv_head).
        self.conv_head = nn.Conv2d(last_ch, head_ch, 1, bias=True)
        self.classifier = nn.Linear(head_ch, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """He (fan-out) init for convs, so deep ReLU stacks start with sane activations under masks.

        BatchNorm starts as the identity and the classifier keeps PyTorch's default init.
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Map images ``(N, in_channels, H, W)`` to logits ``(N, num_classes)``."""
        x = self.stem(x)
        x = self.blocks(x)
        x = self.conv_last(x)
        x = self.pool(x)
        x = F.relu(self.conv_head(x))
        return self.classifier(torch.flatten(x, 1))

    def prunable_names(self) -> list[str]:
        """Names (as in ``named_parameters()``) of the tensors a ticket may mask.

        These are the weights of every ``Conv2d`` outside squeeze-excite blocks, stem and head
        conv included, in ``named_parameters()`` order. BatchNorm, SE convs, biases and the
        classifier are left out: they are tiny, and the paper keeps them dense and shared.
        """
        se_prefixes = tuple(
            f"{name}." for name, module in self.named_modules() if isinstance(module, _SqueezeExcite)
        )
        return [
            f"{name}.weight"
            for name, module in self.named_modules()
            if isinstance(module, nn.Conv2d) and not f"{name}.".startswith(se_prefixes)
        ]
