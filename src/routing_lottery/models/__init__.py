"""Networks, and the registry a config's ``model.name`` is looked up in.

A model factory is called as ``factory(num_outputs=K, input_shape=(...), **model.options)`` and
returns an ``nn.Module`` with K outputs. Register one with ``@MODELS.register("name")``, or name
any such callable in a config as ``package.module:callable``. (The INR and speech tasks build the
paper's coordinate MLP and U-Net themselves.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from ..registry import Registry
from .ghostnet import GhostNetTruncated

ModelFactory = Callable[..., nn.Module]
MODELS: Registry[ModelFactory] = Registry("model", setting="model.name")


@MODELS.register("ghostnet")
def ghostnet(num_outputs: int, input_shape: Sequence[int], width: float = 1.0) -> nn.Module:
    """The paper's truncated GhostNet over images ``(C, H, W)``; ``width`` scales every channel count."""
    if len(input_shape) != 3:
        raise ValueError(f"ghostnet takes images (C, H, W); the data's rows have shape {tuple(input_shape)}: "
                         "name a model for them in model.name (a registered name or package.module:callable)")
    if not width > 0:
        raise ValueError(f"model.options.width must be > 0; got {width}")
    return GhostNetTruncated(num_classes=num_outputs, in_channels=input_shape[0], width=width)
