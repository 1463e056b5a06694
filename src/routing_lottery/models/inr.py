"""Coordinate networks for implicit neural representations (INR): pixel (x, y) -> RGB.

The paper's INR experiment fits one image with a ReLU MLP on Fourier features (not a SIREN):
(x, y) is encoded to 34 numbers (the raw coordinates plus sine and cosine at 8 octaves) and a
five-layer MLP 34 -> 128 -> 128 -> 128 -> 128 -> 3 maps them to colour. Every linear weight is
prunable: 34*128 + 3*128*128 + 128*3 = 53,888 weights, which is what the paper's single-IMP
counts (about 40.5K / 27.0K / 13.5K kept at 25 / 50 / 75 %) are fractions of.

Two networks live here:

``CoordinateMLP``
    The shared network of RTL (and of dense / multiple-IMP): it sees only the coordinates. Each
    region of the image is a context; its ticket is a mask over this one network.
``RegionEmbeddingMLP``
    The paper's single-mask baseline: the same network, but a learned 16-d embedding of the
    pixel's region is concatenated to the encoded input (first layer 50 -> 128), so one mask can
    still tell regions apart. ``RegionEmbeddingMLP.from_coordinate_mlp`` builds it so that every
    weight it shares with a ``CoordinateMLP`` starts from that network's values: the comparison
    with RTL then differs in the method, not in the draw of the initial weights.

Input convention (shared with ``routing_lottery.tasks.inr``): a batch of inputs is a float
tensor ``(N, 3)`` whose columns are ``x, y, region id`` (the id stored as a float; exact for any
id below 2**24). ``CoordinateMLP`` also accepts ``(N, 2)`` and ignores a third column: a routed
subnetwork knows its region through its mask, not through its input. ``RegionEmbeddingMLP``
reads the id from the third column, or from an explicit ``region_ids`` argument.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["FourierFeatures", "CoordinateMLP", "RegionEmbeddingMLP", "region_ids_of"]


def region_ids_of(inputs: Tensor) -> Tensor:
    """The region id column of an ``(N, 3)`` input batch, as int64 (see the module's input convention)."""
    if inputs.dim() != 2 or inputs.shape[1] != 3:
        raise ValueError(f"inputs must be (N, 3) with columns x, y, region id; got shape {tuple(inputs.shape)}")
    return inputs[:, 2].round().long()


class FourierFeatures(nn.Module):
    """Encode coordinates in [-1, 1] with sines and cosines at octave frequencies ``2**i * pi``.

    A plain ReLU MLP on raw (x, y) is biased towards very smooth functions ("spectral bias")
    and cannot fit an image's edges; feeding it sin/cos of the coordinates at doubling
    frequencies lets it represent detail down to the highest octave.

    Layout of the output (``2 + 4 * octaves`` columns; 34 at 8 octaves), with ``c = (x, y)``
    and ``f_i = 2**i * pi`` for ``i = 0 .. octaves-1``::

        [ x, y,
          sin(f_0 x), sin(f_0 y), sin(f_1 x), sin(f_1 y), ..., sin(f_7 x), sin(f_7 y),
          cos(f_0 x), cos(f_0 y), cos(f_1 x), cos(f_1 y), ..., cos(f_7 x), cos(f_7 y) ]

    i.e. column ``2 + 2*i + j`` is ``sin(f_i c_j)`` and column ``2 + 2*octaves + 2*i + j`` is
    ``cos(f_i c_j)``. With pixel centres on an ``n``-pixel axis, octave ``i`` has ``2**i`` periods
    across the axis, so octaves with ``2**i >= n / 2`` sit at or beyond the Nyquist rate (at 64 px
    octaves 6 and 7 are constant over the pixel grid and act as biases; at 256 px all 8 vary).
    The encoding has no parameters: it is a fixed function and never pruned.
    """

    def __init__(self, octaves: int = 8) -> None:
        super().__init__()
        if octaves < 0:
            raise ValueError(f"octaves must be >= 0; got {octaves}")
        self.octaves = octaves
        # Not persistent: the frequencies follow from ``octaves``, so checkpoints stay minimal.
        self.register_buffer("frequencies", (2.0 ** torch.arange(octaves, dtype=torch.float32)) * math.pi,
                             persistent=False)

    @property
    def out_features(self) -> int:
        return 2 + 4 * self.octaves

    def forward(self, coords: Tensor) -> Tensor:
        if coords.dim() != 2 or coords.shape[1] != 2:
            raise ValueError(f"coords must be (N, 2); got shape {tuple(coords.shape)}")
        angles = (coords[:, None, :] * self.frequencies[None, :, None]).flatten(1)  # (N, 2*octaves): f_i c_j at 2i+j
        return torch.cat([coords, torch.sin(angles), torch.cos(angles)], dim=1)


def _init_linear(layer: nn.Linear) -> None:
    """Kaiming (He) uniform weights for ReLU and zero biases: the paper's Kaiming initialization.

    PyTorch's default Linear init (``a = sqrt(5)``) shrinks activations by about 6x per ReLU layer,
    which leaves a five-layer coordinate MLP nearly constant at the start of every IMP round.
    """
    nn.init.kaiming_uniform_(layer.weight, nonlinearity="relu")
    nn.init.zeros_(layer.bias)


def _mlp_layers(in_features: int, hidden: int, depth: int, out: int) -> nn.ModuleList:
    if depth < 1:
        raise ValueError(f"depth (hidden layers) must be >= 1; got {depth}")
    if hidden < 1 or out < 1:
        raise ValueError(f"hidden and out must be >= 1; got hidden={hidden}, out={out}")
    widths = [in_features] + [hidden] * depth + [out]
    layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
    for layer in layers:
        _init_linear(layer)
    return layers


def _run_layers(layers: nn.ModuleList, h: Tensor) -> Tensor:
    for i, layer in enumerate(layers):
        h = layer(h)
        if i < len(layers) - 1:
            h = F.relu(h)
    return h


class CoordinateMLP(nn.Module):
    """Fourier features of (x, y), then ``depth`` ReLU layers of width ``hidden``, then a linear output.

    At the defaults: 34 -> 128 -> 128 -> 128 -> 128 -> 3, five linear layers ``layers.0`` ..
    ``layers.4``, all prunable (53,888 weights; biases stay dense). The output is linear (no
    sigmoid): evaluation clamps colours to [0, 1], and a linear head keeps gradients alive for
    pixels near black or white, which a sigmoid would saturate.

    Parameters
    ----------
    hidden : width of every hidden layer.
    depth : number of hidden layers (so ``depth + 1`` linear layers).
    octaves : Fourier octaves; the encoding has ``2 + 4 * octaves`` features.
    out : output channels (3 for RGB).

    Initialization draws from torch's global generator: seed it (``torch.manual_seed``) first.

    Example
    -------
    >>> net = CoordinateMLP()
    >>> rgb = net(torch.tensor([[0.0, 0.0], [0.5, -0.5]]))   # (2, 3)
    """

    def __init__(self, hidden: int = 128, depth: int = 4, octaves: int = 8, out: int = 3) -> None:
        super().__init__()
        self.hidden, self.depth, self.octaves, self.out = hidden, depth, octaves, out
        self.encoding = FourierFeatures(octaves)
        self.layers = _mlp_layers(self.encoding.out_features, hidden, depth, out)

    def prunable_names(self) -> list[str]:
        """Every linear weight, first and last layer included (the paper prunes all five)."""
        return [f"layers.{i}.weight" for i in range(len(self.layers))]

    def forward(self, inputs: Tensor) -> Tensor:
        if inputs.dim() != 2 or inputs.shape[1] not in (2, 3):
            raise ValueError(f"inputs must be (N, 2) coordinates or (N, 3) with a region id column; "
                             f"got shape {tuple(inputs.shape)}")
        return _run_layers(self.layers, self.encoding(inputs[:, :2]))


class RegionEmbeddingMLP(nn.Module):
    """The single-mask baseline: ``CoordinateMLP`` with a learned region embedding concatenated to its input.

    The first layer reads ``[FourierFeatures(x, y), embedding[region]]``: 34 + 16 = 50 -> 128 at
    the defaults. Columns ``0 .. 33`` of ``layers.0.weight`` (the *shared columns*) play exactly the
    role of ``CoordinateMLP``'s first layer; columns ``34 ..`` read the embedding.

    Prunable: every linear weight (55,936 at the defaults: the 53,888 of ``CoordinateMLP`` plus
    the 16 * 128 embedding columns of the first layer). The embedding table itself stays dense,
    like biases: it is a per-region input, not a connection, and pruning its entries would merely
    zero a region's code.

    Parameters
    ----------
    num_regions : number of regions (contexts) the embedding table holds.
    embed_dim : embedding size (the paper: 16).
    hidden, depth, octaves, out : as ``CoordinateMLP``.
    embedding_std : standard deviation of the initial embedding. The default 0 makes the network,
        at initialization, compute exactly what the ``CoordinateMLP`` with the same shared weights
        computes (the embedding columns see zeros); the embedding then learns from its gradient
        through the non-zero embedding columns.
    """

    def __init__(
        self,
        num_regions: int,
        embed_dim: int = 16,
        hidden: int = 128,
        depth: int = 4,
        octaves: int = 8,
        out: int = 3,
        embedding_std: float = 0.0,
    ) -> None:
        super().__init__()
        if num_regions < 1:
            raise ValueError(f"num_regions must be >= 1; got {num_regions}")
        if embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1; got {embed_dim}")
        if embedding_std < 0:
            raise ValueError(f"embedding_std must be >= 0; got {embedding_std}")
        self.num_regions, self.embed_dim = num_regions, embed_dim
        self.hidden, self.depth, self.octaves, self.out = hidden, depth, octaves, out
        self.encoding = FourierFeatures(octaves)
        self.embedding = nn.Embedding(num_regions, embed_dim)
        self.layers = _mlp_layers(self.encoding.out_features + embed_dim, hidden, depth, out)
        with torch.no_grad():
            if embedding_std == 0:
                self.embedding.weight.zero_()
            else:
                self.embedding.weight.normal_(0.0, embedding_std)
            # The shared columns get the bound of a first layer with the *coordinate* fan-in (as in
            # CoordinateMLP), so the two networks' shared weights come from one distribution.
            bound = math.sqrt(6.0 / self.encoding.out_features)
            self.layers[0].weight.uniform_(-bound, bound)

    @property
    def shared_columns(self) -> int:
        """How many leading input columns of ``layers.0.weight`` correspond to ``CoordinateMLP``'s."""
        return self.encoding.out_features

    @classmethod
    def from_coordinate_mlp(
        cls,
        base: CoordinateMLP,
        num_regions: int,
        embed_dim: int = 16,
        embedding_std: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> RegionEmbeddingMLP:
        """A baseline whose shared weights are copies of ``base``'s (call it on RTL's *initial* network).

        Copied: the first ``base`` input columns of ``layers.0.weight``, ``layers.0.bias`` and every
        later layer's weight and bias. Drawn fresh from ``generator`` (torch's global generator
        when ``None``): the embedding columns of ``layers.0.weight`` (Kaiming uniform with the
        coordinate fan-in, as the shared columns) and, if ``embedding_std > 0``, the embedding.
        ``base`` is not modified and the two networks share no storage.
        """
        net = cls(num_regions, embed_dim, base.hidden, base.depth, base.octaves, base.out, embedding_std=0.0)
        shared = net.shared_columns
        bound = math.sqrt(6.0 / shared)
        with torch.no_grad():
            first = net.layers[0].weight
            first[:, shared:] = torch.rand(first.shape[0], embed_dim, generator=generator) * (2 * bound) - bound
            first[:, :shared] = base.layers[0].weight
            for mine, theirs in zip(net.layers, base.layers):
                if mine is not net.layers[0]:
                    mine.weight.copy_(theirs.weight)
                mine.bias.copy_(theirs.bias)
            if embedding_std > 0:
                net.embedding.weight.copy_(torch.randn(num_regions, embed_dim, generator=generator) * embedding_std)
        return net

    def prunable_names(self) -> list[str]:
        """Every linear weight (the embedding columns of the first layer included); the embedding table stays dense."""
        return [f"layers.{i}.weight" for i in range(len(self.layers))]

    def forward(self, inputs: Tensor, region_ids: Tensor | None = None) -> Tensor:
        """RGB for ``inputs``: ``(N, 3)`` rows ``x, y, region id``, or ``(N, 2)`` coordinates plus ``region_ids``."""
        if region_ids is None:
            region_ids = region_ids_of(inputs)
        elif inputs.dim() != 2 or inputs.shape[1] not in (2, 3):
            raise ValueError(f"inputs must be (N, 2) or (N, 3); got shape {tuple(inputs.shape)}")
        if region_ids.shape != (inputs.shape[0],):
            raise ValueError(f"region_ids must be ({inputs.shape[0]},); got {tuple(region_ids.shape)}")
        region_ids = region_ids.long()
        if len(region_ids) and not 0 <= int(region_ids.min()) <= int(region_ids.max()) < self.num_regions:
            raise ValueError(f"region ids must lie in 0..{self.num_regions - 1}; got "
                             f"{int(region_ids.min())}..{int(region_ids.max())}")
        features = torch.cat([self.encoding(inputs[:, :2]), self.embedding(region_ids)], dim=1)
        return _run_layers(self.layers, features)
