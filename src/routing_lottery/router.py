"""Routers: choose each input's context without an oracle, so a deployed RTL model runs on raw inputs.

``RoutedModel(x, context)`` needs the context of every row. At deployment nobody hands it over, so
a *router* infers it: ``router(routed, x) -> (N,)`` context ids in ``0..K-1``, one per row (a batch
may mix contexts). Set one on the routed model and ``routed(x)`` routes by itself::

    routed.router = LearnedRouter.fit(train_x, train_contexts, routed.num_contexts)
    y = routed(x)                                       # == routed(x, routed.router(routed, x))

Three strategies, by what they spend (``passes``: network forward passes per input to choose):

``DetectorRouter`` ("detectors", K passes)
    Runs every subnetwork and asks each how sure it is about its own context; the most confident
    wins. With one-vs-rest detectors (subnetwork k's output k says "this is context k") it is the
    K-way decision of the detectors, optionally on calibrated margins (``calibration.Thresholds``).
``EntropyRouter`` ("entropy", 2 passes: one forward, one backward)
    SupSup's one-shot task inference (Wortsman et al. 2020, "Supermasks in Superposition"), per
    example: superpose the K masks with equal weights, and pick the mask whose weight, increased,
    lowers the output entropy most. Needs no training and no detector outputs, only a model whose
    outputs are confident on the right subnetwork.
``LearnedRouter`` ("learned", 0 passes)
    A small classifier of its own (standardise, PCA, multinomial logistic regression) fitted on
    the training contexts, applied in pure torch; it never runs the network.

Routers are registered by name in ``ROUTERS``, as models, methods and tasks are (``registry.py``), so
a config's ``deploy.routers`` and a saved ticket set name them the same way. Adding one is one class
and one line; a class that is not registered is named by its import path instead::

    @ROUTERS.register("nearest")            # or, unregistered, "my_package.routers:NearestRouter"
    class NearestRouter:
        name, passes = "nearest", 0
        def __init__(self, thresholds=None): ...           # keyword options (build_router offers them)
        def __call__(self, routed, x): ...                  # (N,) context ids
        # optional: fit(inputs, contexts, num_contexts, **options) if it learns from labelled contexts,
        # save(directory) + classmethod load(directory, **options) if it has state to keep

``save_router`` / ``load_router`` write and read any of them through the registry (a ``kind.json``
naming it, plus what its own ``save`` writes), so nothing outside this module names a router class.

``inject_errors`` corrupts true contexts at a chosen rate, to measure how routed accuracy degrades
with routing errors independently of any router; ``routing_accuracy`` and ``plot_confusion``
score a router against the true contexts.
"""

from __future__ import annotations

import hashlib
import inspect
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import safetensors.torch
import torch
from torch.func import functional_call, grad, vmap

from .errors import CheckpointError, DataError, RoutingLotteryError, brief, shorten
from .io import atomic_write_bytes, atomic_write_json, read_json
from .metrics import confusion_matrix
from .plotting import save_png
from .registry import Registry, RegistryError
from .routed import Inputs, Router, _vmappable_attention, as_tuple, lacks_batching_rule

if TYPE_CHECKING:
    from .calibration import Thresholds
    from .routed import RoutedModel


ROUTERS: Registry[Callable[..., Router]] = Registry("router", setting="deploy.routers")
"""Router classes (or factories) by name: ``ROUTERS.call("detectors", thresholds=t)`` builds one from keyword
options, and ``ROUTERS.get("my_package.routers:MyRouter")`` finds a user's class by import path. Optional
capabilities, found on the class: ``fit(inputs, contexts, num_contexts, **options)`` (a router learned from
labelled contexts, ``fit_router``), ``save(directory)`` and a classmethod ``load(directory, **options)``
(state kept with the tickets, ``save_router`` / ``load_router``)."""


# -- detectors: K forward passes -------------------------------------------------------------------
Confidence = Callable[[int, torch.Tensor], torch.Tensor]
"""``(k, outputs of subnetwork k) -> (N,)`` score: how sure subnetwork k is that each row is its context."""


def output_logit(k: int, outputs: torch.Tensor) -> torch.Tensor:
    """Output k of subnetwork k: the detector logit of context k in one-vs-rest classification."""
    if outputs.dim() != 2 or outputs.shape[1] <= k:
        raise ValueError(
            f"DetectorRouter's default confidence reads output {k} of subnetwork {k} (one-vs-rest detectors), so "
            f"outputs must be (N, >= K); subnetwork {k} gave shape {tuple(outputs.shape)}. Pass confidence=, "
            "e.g. lambda k, out: -softmax_entropy(out)"
        )
    return outputs[:, k]


@ROUTERS.register("detectors")
class DetectorRouter:
    """Run all K subnetworks and pick, per row, the one most confident about its own context.

    Parameters
    ----------
    confidence : ``(k, outputs_k) -> (N,)`` score of subnetwork k; default ``output_logit`` (output
        k of subnetwork k, the one-vs-rest detector of context k). Higher means more confident.
    thresholds : calibrated detector thresholds (``calibration.fit_thresholds``). With them the
        rule is the largest margin ``score - thresholds[k]``, as ``calibration.decide(...,
        "most_confident")``: raw logits of detectors that fire at different levels are not
        comparable, margins above their own thresholds are.

    Notes
    -----
    ``passes`` is K, the number of contexts: known once the router has seen a routed model (with
    ``thresholds``, from the start); reading it before raises ``AttributeError``.

    Examples
    --------
    >>> from routing_lottery import MaskSet, RoutedModel
    >>> masks = MaskSet({"weight": torch.rand(3, 3, 8) < 0.5}, ["a", "b", "c"])
    >>> routed = RoutedModel(torch.nn.Linear(8, 3), masks).eval()   # output k: the detector of context k
    >>> routed.router = DetectorRouter()
    >>> y = routed(torch.randn(5, 8))   # every subnetwork scores x, then each row runs through its winner
    >>> routed.router.passes
    3
    """

    name = "detectors"

    def __init__(self, confidence: Confidence | None = None, thresholds: Thresholds | None = None) -> None:
        self.confidence = confidence
        self.thresholds = thresholds
        self._num_contexts: int | None = thresholds.num_contexts if thresholds is not None else None

    @property
    def passes(self) -> int:
        if self._num_contexts is None:
            raise AttributeError("DetectorRouter.passes is K, the number of contexts: known after the first call")
        return self._num_contexts

    @torch.no_grad()
    def scores(self, routed: RoutedModel, x: Inputs) -> torch.Tensor:
        """(N, K) scores (margins with ``thresholds``): what ``__call__`` takes the argmax of."""
        k_total = routed.num_contexts
        if self.thresholds is not None and self.thresholds.num_contexts != k_total:
            raise ValueError(f"thresholds are for {self.thresholds.num_contexts} detectors; "
                             f"the routed model has {k_total} contexts")
        rows = as_tuple(x)[0].shape[0]
        columns = []
        for k in range(k_total):
            outputs = routed(x, k)
            score = self.confidence(k, outputs) if self.confidence is not None else output_logit(k, outputs)
            if not isinstance(score, torch.Tensor) or tuple(score.shape) != (rows,):
                found = tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__
                raise ValueError(f"confidence must return one score per row, shape ({rows},); got {found} for context {k}")
            columns.append(score)
        self._num_contexts = k_total
        return self._margins(torch.stack(columns, dim=1))

    def _margins(self, scores: torch.Tensor) -> torch.Tensor:
        if self.thresholds is None:
            return scores
        # float64 on the CPU, as calibration.decide computes margins: the same decisions.
        return scores.detach().to("cpu", torch.float64) - self.thresholds.thresholds.to(torch.float64)

    def __call__(self, routed: RoutedModel, x: Inputs) -> torch.Tensor:
        device = as_tuple(x)[0].device
        return self.scores(routed, x).argmax(dim=1).to(device=device, dtype=torch.long)

    def choose_from_logits(self, logits: torch.Tensor) -> torch.Tensor | None:
        """The choice from detector logits computed already, without running the network again.

        ``logits`` is (N, K), column k subnetwork k's own output k -- what the K passes of
        ``__call__`` would compute with the default confidence, so an evaluation that scored the
        detectors once routes from the same numbers. None with a custom ``confidence``, which
        needs the whole outputs.
        """
        if self.confidence is not None:
            return None
        if logits.dim() != 2 or (self.thresholds is not None and logits.shape[1] != self.thresholds.num_contexts):
            raise ValueError(f"choose_from_logits needs (N, K) detector logits; got {tuple(logits.shape)}")
        self._num_contexts = logits.shape[1]
        return self._margins(logits).argmax(dim=1).to(dtype=torch.long)


# -- entropy: superposed masks, one forward and one backward -------------------------------------
def softmax_entropy(outputs: torch.Tensor) -> torch.Tensor:
    """(N,) entropy of the softmax over the last dimension (averaged over any dimensions between).

    The uncertainty SupSup minimises: a subnetwork that knows its input gives a peaked softmax.
    """
    if outputs.dim() < 2:
        raise ValueError(f"softmax_entropy needs outputs of shape (N, ..., C); got {tuple(outputs.shape)}")
    logp = torch.log_softmax(outputs, dim=-1)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    return entropy.reshape(entropy.shape[0], -1).mean(dim=1)


@ROUTERS.register("entropy")
class EntropyRouter:
    """SupSup one-shot context inference, per example (Wortsman et al. 2020).

    Each example gets its own superposition of the K masks, ``w * sum_k alpha[k] * mask_k`` with
    ``alpha = 1/K``; one forward and one backward give ``dH/dalpha`` for its uncertainty H, and the
    chosen context is ``argmin_k dH/dalpha_k``: the mask whose weight, increased, makes the output
    most confident. SupSup infers one task per batch (it sums H over the batch); doing it per
    example lets a batch mix contexts, at the price of one set of superposed weights per example
    in a chunk of rows vmapped at once.

    Parameters
    ----------
    uncertainty : ``outputs (N, ...) -> (N,)``, minimised; default ``softmax_entropy``.
    chunk_size : rows per vmapped call. Default: as many as keep the chunk's superposed weights
        within ``CHUNK_BYTES`` (256 MiB), between 1 and 1024 rows -- fewer, larger calls are
        faster, and a large model still fits.

    Notes
    -----
    The model must be in evaluation mode: a forward of one example in training mode would use
    BatchNorm statistics of a batch of one and move the shared running statistics.
    """

    name = "entropy"
    passes = 2
    CHUNK_BYTES = 256 * 2**20
    MAX_CHUNK = 1024

    def __init__(self, uncertainty: Callable[[torch.Tensor], torch.Tensor] = softmax_entropy,
                 chunk_size: int | None = None) -> None:
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None (sized by memory); got {chunk_size!r}")
        self.uncertainty = uncertainty
        self.chunk_size = chunk_size
        self._vmappable = True

    def gradients(self, routed: RoutedModel, x: Inputs) -> torch.Tensor:
        """(N, K) ``dH_i/dalpha_ik`` at ``alpha = 1/K``: what ``__call__`` takes the argmin of."""
        if routed.training or routed.model.training:
            raise RuntimeError("EntropyRouter needs the routed model in evaluation mode (routed.eval()): one example "
                               "at a time in training mode would use batch-of-one BatchNorm statistics and move the "
                               "shared running statistics")
        inputs = as_tuple(x)
        rows, k_total = inputs[0].shape[0], routed.num_contexts
        names = routed.masks.tensor_names
        stacked = routed.stacked_masks()
        params = {n: p.detach() for n, p in routed.model.named_parameters()}
        model = routed.model
        uncertainty = self.uncertainty

        def one_example(alpha: torch.Tensor, row: tuple[torch.Tensor, ...]) -> torch.Tensor:
            superposed = {n: params[n] * torch.tensordot(alpha, stacked[n], dims=1) for n in names}
            out = functional_call(model, {**params, **superposed}, tuple(t.unsqueeze(0) for t in row), strict=False)
            return uncertainty(out).sum()

        first = params[names[0]]
        alpha = torch.full((rows, k_total), 1.0 / k_total, dtype=first.dtype, device=first.device)
        chunk_size = self.chunk_size
        if chunk_size is None:  # one superposed copy of the masked weights per row in a chunk
            per_row = sum(params[n].numel() * params[n].element_size() for n in names)
            chunk_size = max(1, min(self.MAX_CHUNK, self.CHUNK_BYTES // max(per_row, 1)))
        chunks = []
        # The outer no_grad keeps autograd from recording the shared parameters; torch.func.grad
        # ignores it for its own input, alpha.
        with torch.no_grad(), _vmappable_attention():
            for start in range(0, rows, chunk_size):
                a = alpha[start:start + chunk_size]
                xs = tuple(t[start:start + chunk_size] for t in inputs)
                if self._vmappable:
                    try:
                        chunks.append(vmap(grad(one_example))(a, xs))
                        continue
                    except RuntimeError as err:
                        if not lacks_batching_rule(err):
                            raise
                        self._vmappable = False  # an op vmap cannot batch: one example at a time from now on
                chunks.append(torch.stack([grad(one_example)(a[i], tuple(t[i] for t in xs)) for i in range(len(a))]))
        return torch.cat(chunks) if chunks else alpha.new_empty((0, k_total))

    def __call__(self, routed: RoutedModel, x: Inputs) -> torch.Tensor:
        device = as_tuple(x)[0].device
        return self.gradients(routed, x).argmin(dim=1).to(device=device, dtype=torch.long)


# -- learned: a classifier of its own ---------------------------------------------------------------
def flatten_features(x: Inputs) -> torch.Tensor:
    """(N, F) float: each row flattened (for a tuple of per-row tensors, their flattenings side by side)."""
    parts = as_tuple(x)
    return torch.cat([t.reshape(len(t), -1).float() for t in parts], dim=1)


def spectrum_features(x: Inputs, n_fft: int = 1024, hop_length: int = 256) -> torch.Tensor:
    """(N, n_fft // 2 + 1) float: each waveform's log power per frequency bin, averaged over frames.

    For audio contexts (acoustic environments): an environment is a noise spectrum, and a
    waveform's samples (their phase) say nothing a linear router could use.
    """
    (wave,) = as_tuple(x)
    if wave.dim() != 2:
        raise ValueError(f"spectrum_features expects waveforms (N, T); got shape {tuple(wave.shape)}")
    window = torch.hann_window(n_fft, device=wave.device)
    spec = torch.stft(wave.float(), n_fft, hop_length, window=window, return_complex=True)
    return torch.log(spec.abs().pow(2).mean(dim=-1) + 1e-8)


ROUTER_FORMAT = "routing-lottery/learned-router"
ROUTER_VERSION = 1
ROUTER_WEIGHTS = "router.safetensors"
ROUTER_INDEX = "router.json"
_TENSORS = ("scaler_mean", "scaler_scale", "pca_mean", "pca_components", "coef", "intercept")


def _feature_name(features: Callable[..., Any]) -> str:
    """Where a feature function lives: recorded at save and compared at load."""
    return f"{getattr(features, '__module__', '?')}.{getattr(features, '__qualname__', type(features).__name__)}"


def _check_contexts(contexts: Any, rows: int, num_contexts: int) -> torch.Tensor:
    c = torch.as_tensor(contexts)
    if c.is_floating_point() or c.is_complex() or c.dtype == torch.bool:
        raise DataError(f"contexts must be integer ids; got a {c.dtype} tensor")
    if c.dim() != 1 or c.shape[0] != rows:
        raise DataError(f"contexts must be one id per input row: got shape {tuple(c.shape)} for {rows} rows")
    c = c.long().cpu()
    if rows and (int(c.min()) < 0 or int(c.max()) >= num_contexts):
        raise DataError(f"context ids must be in 0..{num_contexts - 1}; got {int(c.min())}..{int(c.max())}")
    return c


@ROUTERS.register("learned")
class LearnedRouter:
    """A small classifier of contexts of its own: standardise, PCA, multinomial logistic regression.

    Fitted with scikit-learn (``fit``), kept as six tensors so that routing is two matrix products
    in torch on the inputs' device, and saved without pickle (safetensors + a JSON index with the
    weights' sha256). It never runs the network: ``passes`` is 0.

    Examples
    --------
    >>> train_x = torch.cat([torch.randn(20, 6) - 2, torch.randn(20, 6) + 2])   # two contexts, apart
    >>> train_contexts = torch.arange(2).repeat_interleave(20)
    >>> router = LearnedRouter.fit(train_x, train_contexts, num_contexts=2)
    >>> directory = router.save("router/")
    >>> loaded = LearnedRouter.load(directory)           # then routed.router = loaded
    >>> loaded(None, torch.tensor([[-2.0] * 6, [2.0] * 6])).tolist()
    [0, 1]
    """

    name = "learned"
    passes = 0

    def __init__(self, scaler_mean: torch.Tensor, scaler_scale: torch.Tensor, pca_mean: torch.Tensor,
                 pca_components: torch.Tensor, coef: torch.Tensor, intercept: torch.Tensor,
                 features: Callable[[Inputs], torch.Tensor] = flatten_features) -> None:
        tensors = dict(zip(_TENSORS, (scaler_mean, scaler_scale, pca_mean, pca_components, coef, intercept)))
        _check_shapes(tensors)
        self.tensors = {n: t.detach().to("cpu", torch.float64).contiguous() for n, t in tensors.items()}
        self.features = features
        self._on_device: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    @property
    def num_contexts(self) -> int:
        return self.tensors["coef"].shape[0]

    @property
    def num_features(self) -> int:
        return self.tensors["scaler_mean"].shape[0]

    @classmethod
    def fit(cls, inputs: Inputs, contexts: Any, num_contexts: int,
            features: Callable[[Inputs], torch.Tensor] = flatten_features, max_components: int = 64,
            seed: int = 0) -> LearnedRouter:
        """Fit on training inputs and their true contexts.

        Parameters
        ----------
        inputs : (N, ...) tensor, or a tuple of per-row tensors; ``features(inputs)`` must be (N, F).
        contexts : (N,) integer ids in ``0..num_contexts-1``, every context at least once.
        num_contexts : K >= 2.
        features : inputs -> (N, F) float tensor; default ``flatten_features``. Pass the same one to
            ``load``.
        max_components : PCA keeps ``min(max_components, N - 1, F)`` components: enough to
            separate contexts, few enough that the logistic regression is well posed on small N.
        seed : PCA's ``random_state`` (the randomized solver on large inputs); the same seed gives
            the same router.

        Raises
        ------
        DataError
            For malformed contexts or features, naming contexts with no example.
        """
        from sklearn.decomposition import PCA
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        if isinstance(num_contexts, bool) or not isinstance(num_contexts, int) or num_contexts < 2:
            raise ValueError(f"num_contexts must be an integer >= 2 (with one context there is nothing to route); "
                             f"got {num_contexts!r}")
        if isinstance(max_components, bool) or not isinstance(max_components, int) or max_components < 1:
            raise ValueError(f"max_components must be a positive integer; got {max_components!r}")
        f = features(inputs)
        if not isinstance(f, torch.Tensor) or f.dim() != 2:
            found = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise DataError(f"features must return an (N, F) tensor; got {found}")
        c = _check_contexts(contexts, f.shape[0], num_contexts)
        present = torch.bincount(c, minlength=num_contexts)
        empty = [k for k in range(num_contexts) if int(present[k]) == 0]
        if empty:
            raise DataError(f"every context needs at least one training example; contexts {empty} have none")
        x = f.detach().to("cpu", torch.float64).numpy()
        if x.shape[1] == 0 or not np.isfinite(x).all():
            raise DataError("features must be finite, with at least one column")
        y = c.numpy()
        scaler = StandardScaler().fit(x)
        z = scaler.transform(x)
        pca = PCA(n_components=min(max_components, x.shape[0] - 1, x.shape[1]), random_state=seed).fit(z)
        p = pca.transform(z)
        logistic = LogisticRegression(max_iter=1000, random_state=seed).fit(p, y)
        coef, intercept = logistic.coef_, logistic.intercept_
        if num_contexts == 2:
            # scikit-learn keeps one row for two classes (the logit of class 1); split it in halves
            # so both classes have a row: same argmax, and the softmax equals its sigmoid.
            coef = np.concatenate([-coef / 2, coef / 2])
            intercept = np.concatenate([-intercept / 2, intercept / 2])
        as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))  # noqa: E731
        return cls(as_tensor(scaler.mean_), as_tensor(scaler.scale_), as_tensor(pca.mean_),
                   as_tensor(pca.components_), as_tensor(coef), as_tensor(intercept), features)

    def logits(self, x: Inputs) -> torch.Tensor:
        """(N, K) float64 logits of the contexts, on the features' device."""
        f = self.features(x)
        if not isinstance(f, torch.Tensor) or f.dim() != 2 or f.shape[1] != self.num_features:
            found = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise ValueError(f"this router was fitted on {self.num_features} features per row; features gave {found}")
        if f.device not in self._on_device:
            self._on_device[f.device] = tuple(self.tensors[n].to(f.device) for n in _TENSORS)
        mean, scale, pca_mean, components, coef, intercept = self._on_device[f.device]
        projected = ((f.to(mean.dtype) - mean) / scale - pca_mean) @ components.T
        return projected @ coef.T + intercept

    def route(self, x: Inputs) -> torch.Tensor:
        """(N,) int64 context ids: the argmax of the logits."""
        return self.logits(x).argmax(dim=1)

    def __call__(self, routed: RoutedModel | None, x: Inputs) -> torch.Tensor:
        if routed is not None and routed.num_contexts != self.num_contexts:
            raise ValueError(f"this router chooses among {self.num_contexts} contexts; "
                             f"the routed model has {routed.num_contexts}")
        return self.route(x)

    # -- files --------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``router.safetensors`` then ``router.json`` (which records the former's sha256), atomically.

        The index is written last, so an index that matches its weights always describes a
        complete file; a pair torn by a kill between the two writes is reported at load.
        """
        directory = Path(directory)
        blob = safetensors.torch.save(self.tensors)
        atomic_write_bytes(directory / ROUTER_WEIGHTS, blob)
        atomic_write_json(directory / ROUTER_INDEX, {
            "format": ROUTER_FORMAT,
            "version": ROUTER_VERSION,
            "num_contexts": self.num_contexts,
            "num_features": self.num_features,
            "components": int(self.tensors["pca_components"].shape[0]),
            "features": _feature_name(self.features),
            "weights_sha256": hashlib.sha256(blob).hexdigest(),
        })
        return directory

    @classmethod
    def load(cls, directory: str | Path, features: Callable[[Inputs], torch.Tensor] | None = None) -> LearnedRouter:
        """Read a router written by ``save``; any problem raises ``CheckpointError`` naming the file.

        ``features`` must be the function it was fitted with (compared by module and name): the
        linear model means nothing on other features. None: the built-in feature function the file
        names (``flatten_features``, ``spectrum_features``); a file never makes this import anything.
        The message ends with the remedy (refit; a run refits its own on resume), since a router
        file is reached from commands (``rtl export``, ``rtl calibrate``) that cannot repair it.
        """
        try:
            return cls._read(Path(directory), features)
        except CheckpointError as err:
            raise CheckpointError(f"{err}. {REFIT_ROUTER}") from None

    @classmethod
    def _read(cls, directory: Path, features: Callable[[Inputs], torch.Tensor] | None) -> LearnedRouter:
        """``load`` without the remedy: what ``router_problem`` reports before a run refits the router."""
        index_path, weights_path = directory / ROUTER_INDEX, directory / ROUTER_WEIGHTS
        if not index_path.is_file():
            raise CheckpointError(f"{index_path} is missing: {directory} is not a saved LearnedRouter")
        index = read_json(index_path, max_bytes=2**16)
        if not isinstance(index, dict) or index.get("format") != ROUTER_FORMAT:
            found = repr(index.get("format"))[:60] if isinstance(index, dict) else type(index).__name__
            raise CheckpointError(f"{index_path} is not a LearnedRouter index (format {found}, expected {ROUTER_FORMAT!r})")
        version = index.get("version")
        if type(version) is not int or version != ROUTER_VERSION:  # type(): True == 1
            raise CheckpointError(f"{index_path} has version {version!r:.40}; this library reads version {ROUTER_VERSION}")
        for key, kind in (("num_contexts", int), ("num_features", int), ("components", int), ("features", str),
                          ("weights_sha256", str)):
            if type(index.get(key)) is not kind:
                raise CheckpointError(f"{index_path} is corrupt: field {key!r} is {index.get(key)!r:.40}, "
                                      f"expected {'an integer' if kind is int else 'a string'}")
        if features is None:
            features = _BUILT_IN_FEATURES.get(index["features"])
            if features is None:
                raise CheckpointError(f"{index_path}: the router was fitted on features {index['features']!r}, not a "
                                      "built-in feature function; pass features= the function used in fit")
        if index["features"] != _feature_name(features):
            raise CheckpointError(f"{index_path}: the router was fitted on features {index['features']!r}; load was "
                                  f"given {_feature_name(features)!r}. Pass features= the function used in fit")
        if not weights_path.is_file():
            raise CheckpointError(f"{weights_path} is missing: {directory} is not a complete LearnedRouter")
        blob = weights_path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != index["weights_sha256"]:
            raise CheckpointError(f"{weights_path} is truncated or corrupt: its sha256 does not match the one "
                                  f"recorded in {index_path}")
        try:
            tensors = safetensors.torch.load(blob)
        except Exception as err:  # safetensors raises its own error types for unparsable files
            raise CheckpointError(f"{weights_path} is truncated or corrupt ({err})") from None
        try:
            if set(tensors) != set(_TENSORS):
                raise ValueError(f"it holds tensors {sorted(tensors)}, expected {sorted(_TENSORS)}")
            _check_shapes(tensors)
            expected = (index["num_contexts"], index["num_features"], index["components"])
            found = (tensors["coef"].shape[0], tensors["scaler_mean"].shape[0], tensors["pca_components"].shape[0])
            if found != expected:
                raise ValueError(f"(contexts, features, components) are {found}; {index_path} records {expected}")
        except ValueError as err:
            raise CheckpointError(f"{weights_path} is corrupt or does not belong to {index_path}: {err}") from None
        return cls(*(tensors[n] for n in _TENSORS), features=features)


_BUILT_IN_FEATURES = {_feature_name(f): f for f in (flatten_features, spectrum_features)}

REFIT_ROUTER = ("Refit the router (LearnedRouter.fit) and save it again; for a run's router, run the command that "
                "made the run (`rtl run CONFIG --out RUN`) again on its directory, which refits it")
"""The remedy every ``LearnedRouter.load`` error ends with."""


STRATEGIES: tuple[str, ...] = tuple(ROUTERS.names())
"""The built-in routers' names, as they appear in reports and in ``deploy.routers``: the registry's entries
once this module has registered its own (a user's later registrations do not change it)."""


# -- any router, through the registry: build, fit, save, load -------------------------------------
ROUTER_KIND = "kind.json"
"""The file ``save_router`` writes in a router's directory: which router it is (registered name or import path)."""
KIND_FORMAT = "routing-lottery/router"
KIND_VERSION = 1
LEGACY_ROUTER = "learned"
"""What a directory without ``kind.json`` holds: before the registry only ``LearnedRouter`` was saved."""


def _offered(function: Callable[..., Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """The options ``function`` takes by name; all of them if it takes ``**kwargs``.

    Callers that serve every router (a run's deployment, a ticket set's load) offer what they have --
    thresholds, a feature map -- and each router takes what it names: the detector router its
    thresholds, the learned one its features, a user's router either or neither.
    """
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: offer nothing rather than guess
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return dict(options)
    by_name = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = {p.name for p in parameters if p.kind in by_name}
    return {k: v for k, v in options.items() if k in named}


def build_router(name: str, **offered: Any) -> Router:
    """A new router ``name`` (registered, or ``package.module:Class``), given those of ``offered`` it takes.

    ``build_router("detectors", thresholds=t)`` is ``DetectorRouter(thresholds=t)``;
    ``build_router("entropy", thresholds=t)`` is ``EntropyRouter()``. An error of the router's own
    constructor names the setting (``deploy.routers``) and the router, as ``Registry.call`` does.
    """
    return ROUTERS.call(name, **_offered(ROUTERS.get(name), offered))


def needs_fitting(name: str) -> bool:
    """Whether router ``name`` is fitted on labelled contexts (its class has ``fit``), as ``LearnedRouter`` is.

    Such a router is a function of the training data, not of a routed model: a run fits it once and
    reuses it for every method, where the others are built per routed model (``build_router``).
    """
    return callable(getattr(ROUTERS.get(name), "fit", None))


def fit_router(name: str, inputs: Inputs, contexts: Any, num_contexts: int, **offered: Any) -> Router:
    """Router ``name`` fitted on training inputs and their true contexts: ``Class.fit(inputs, contexts,
    num_contexts, **options)`` with those of ``offered`` its ``fit`` takes (``features``, ``seed``...)."""
    entry = ROUTERS.get(name)
    fit = getattr(entry, "fit", None)
    if not callable(fit):
        raise TypeError(f"router {name!r} has no fit(inputs, contexts, num_contexts): it is built from options, "
                        "not fitted; use build_router (needs_fitting tells which)")
    return fit(inputs, contexts, num_contexts, **_offered(fit, offered))


def router_name(router: Router) -> str:
    """The name that finds ``router``'s class again: its registered name, else its import path ``module:Class``.

    ``ValueError`` for a class no name can reach from another process (defined inside a function, or
    shadowed in its module): register it, or define it at module level.
    """
    cls = type(router)
    for name in ROUTERS.names():
        if ROUTERS.get(name) is cls:
            return name
    path = f"{cls.__module__}:{cls.__qualname__}"
    module = sys.modules.get(cls.__module__)
    found: Any = module
    for part in cls.__qualname__.split("."):
        found = getattr(found, part, None)
    if found is not cls:
        raise ValueError(f"router {type(router).__qualname__} cannot be saved: its class is not registered and "
                         f"{path!r} does not lead back to it (a class defined inside a function?); register it with "
                         "@ROUTERS.register('name') or define it at module level")
    return path


def save_router(router: Router | None, directory: str | Path) -> Path | None:
    """Write ``router`` into ``directory`` so that ``load_router`` gives it back; None (nothing written) without one.

    What the router saves itself comes first (``router.save(directory)`` when its class has one:
    ``LearnedRouter`` writes ``router.json`` + ``router.safetensors``, the format it always had),
    then ``kind.json`` naming it (``router_name``), atomically and last, as an index after its data.

    A router with no ``save`` (``DetectorRouter``, ``EntropyRouter``) gets ``kind.json`` alone rather
    than nothing: a ticket set loaded later routes raw inputs again with the router it was saved
    with, and its thresholds travel with the tickets' own metadata (``load_router(...,
    thresholds=)``). Its functions are code, not state: a custom ``confidence`` or ``uncertainty``
    is not written, so pass it again to ``load_router`` (``confidence=f``), as ``LearnedRouter``
    takes its ``features``.
    """
    if router is None:
        return None
    name = router_name(router)
    directory = Path(directory)
    save = getattr(router, "save", None)
    if callable(save):
        save(directory)
    atomic_write_json(directory / ROUTER_KIND, {"format": KIND_FORMAT, "version": KIND_VERSION, "router": name})
    return directory


def load_router(directory: str | Path, **options: Any) -> Router | None:
    """The router ``save_router`` wrote in ``directory``; None when there is no such directory (none was saved).

    ``kind.json`` names the router; the registry resolves the name (an import path imports its
    module, as a config naming it would: load routers only from checkpoints you trust). Its class's
    ``load(directory, **options)`` reads it when it has one; otherwise the class is built anew.
    ``options`` are offered: each router takes those its ``load`` (or constructor) names
    (``features=`` the learned router, ``thresholds=`` the detector router). A directory without
    ``kind.json`` is a ``LearnedRouter`` saved before the registry, and loads as one.

    Raises ``CheckpointError`` naming the file for anything wrong with what was saved: ``kind.json``
    corrupt, a router name this process does not know (with the registered ones), a router's own
    files that do not load.
    """
    directory = Path(directory)
    if not directory.exists():
        return None
    return _load(directory, options)


def _load(directory: Path, options: Mapping[str, Any]) -> Router:
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} is a file, not a saved router's directory")
    kind_path = directory / ROUTER_KIND
    name = _saved_name(kind_path) if kind_path.is_file() else LEGACY_ROUTER
    entry = _saved_entry(kind_path, name)
    load = getattr(entry, "load", None)
    try:
        if callable(load):
            router = load(directory, **_offered(load, options))
        else:  # nothing of its own was saved: build it anew
            router = entry(**_offered(entry, options))
    except RoutingLotteryError:
        raise
    except Exception as err:  # noqa: BLE001 -- a user's router failed to come back: say which and from where
        raise CheckpointError(f"{kind_path}: router {brief(name)} does not load here ({type(err).__name__}: "
                              f"{shorten(str(err), 300)})") from err
    if not callable(router):
        raise CheckpointError(f"{kind_path}: router {brief(name)} loaded as a {type(router).__name__}, which is not "
                              "a router (a router is called as router(routed, x))")
    return router


def _saved_name(kind_path: Path) -> str:
    """The router name recorded in ``kind_path``; ``CheckpointError`` naming the file if it is not one."""
    kind = read_json(kind_path, max_bytes=2**12)
    if not isinstance(kind, dict) or kind.get("format") != KIND_FORMAT:
        found = brief(kind.get("format")) if isinstance(kind, dict) else type(kind).__name__
        raise CheckpointError(f"{kind_path} is not a router's kind file (format {found}, expected {KIND_FORMAT!r})")
    version = kind.get("version")
    if type(version) is not int or version != KIND_VERSION:  # type(): True == 1
        raise CheckpointError(f"{kind_path} has version {brief(version)}; this library reads version {KIND_VERSION}")
    name = kind.get("router")
    if not isinstance(name, str) or not name or len(name) > 300:
        raise CheckpointError(f"{kind_path} is corrupt: field 'router' is {brief(name)}, expected a router's "
                              "registered name or import path")
    return name


def _saved_entry(kind_path: Path, name: str) -> Callable[..., Router]:
    """The registry's entry for a name read from a file; ``CheckpointError`` when this process has none."""
    if ":" not in name and name not in ROUTERS:
        # A name registered by the user's own module, not imported in this process, lands here too.
        raise CheckpointError(f"{kind_path} names router {name!r}, which is not registered here (registered: "
                              f"{sorted(ROUTERS.names())}); import the module that registers it before loading")
    try:
        entry = ROUTERS.get(name)
    except RegistryError as err:
        raise CheckpointError(f"{kind_path} names router {brief(name)}, which cannot be found: {err}") from None
    if not callable(entry):
        raise CheckpointError(f"{kind_path} names {brief(name)}, which is a {type(entry).__name__}, not a router "
                              "class or factory")
    return entry


def router_problem(directory: str | Path, features: Callable[[Inputs], torch.Tensor] | None = None) -> str | None:
    """Why the router saved in ``directory`` does not load (missing, truncated, corrupt, unknown, other features);
    None if it does.

    Loads it completely (``load_router``: kind file, then the router's own files, for the learned
    router index, checksum, tensors and shapes), so None means ``load_router`` succeeds. A resuming
    run calls this on every reused checkpoint and refits the router when it fails, rather than
    leaving a file that only ``rtl export`` or ``rtl calibrate`` would trip on; a missing
    directory is a problem too (a learned router's ``router.json`` is missing). The message stops
    before ``LearnedRouter.load``'s remedy: each caller says its own (a run refits by itself).
    """
    try:
        _load(Path(directory), {"features": features})
    except CheckpointError as err:
        return str(err).removesuffix(f". {REFIT_ROUTER}")
    return None


def _check_shapes(tensors: dict[str, torch.Tensor]) -> None:
    """``ValueError`` unless the six tensors are float, finite and of consistent shapes, K >= 2."""
    for n in _TENSORS:
        t = tensors[n]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{n} must be a floating-point tensor; got {getattr(t, 'dtype', type(t).__name__)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{n} has non-finite values")
    mean, scale, pca_mean = tensors["scaler_mean"], tensors["scaler_scale"], tensors["pca_mean"]
    components, coef, intercept = tensors["pca_components"], tensors["coef"], tensors["intercept"]
    if mean.dim() != 1 or mean.shape[0] < 1:
        raise ValueError(f"scaler_mean must be (F,) with F >= 1; got {tuple(mean.shape)}")
    f = mean.shape[0]
    for n, t in (("scaler_scale", scale), ("pca_mean", pca_mean)):
        if tuple(t.shape) != (f,):
            raise ValueError(f"{n} must be ({f},) like scaler_mean; got {tuple(t.shape)}")
    if not bool((scale > 0).all()):
        raise ValueError("scaler_scale must be positive")
    if components.dim() != 2 or components.shape[1] != f or not 1 <= components.shape[0] <= f:
        raise ValueError(f"pca_components must be (C, {f}) with 1 <= C <= {f}; got {tuple(components.shape)}")
    c = components.shape[0]
    if coef.dim() != 2 or coef.shape[1] != c or coef.shape[0] < 2:
        raise ValueError(f"coef must be (K, {c}) with K >= 2; got {tuple(coef.shape)}")
    if tuple(intercept.shape) != (coef.shape[0],):
        raise ValueError(f"intercept must be ({coef.shape[0]},); got {tuple(intercept.shape)}")


# -- routing errors and scores ----------------------------------------------------------------------
def inject_errors(contexts: torch.Tensor, fraction: float, num_contexts: int, generator: torch.Generator) -> torch.Tensor:
    """A copy of ``contexts`` with exactly ``round(fraction * N)`` rows sent to a wrong context.

    The rows are chosen uniformly without replacement, and each gets a context drawn uniformly
    among the other K - 1: a router that errs at this rate with no preference among wrong
    contexts. Routing the true contexts through this measures what routing errors cost the routed
    model, apart from any particular router. The same generator state gives the same copy.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be a number in [0, 1]; got {fraction!r}")
    if isinstance(num_contexts, bool) or not isinstance(num_contexts, int) or num_contexts < 2:
        raise ValueError(f"num_contexts must be an integer >= 2 (with one context no error is possible); got {num_contexts!r}")
    c = torch.as_tensor(contexts)
    if c.is_floating_point() or c.is_complex() or c.dtype == torch.bool or c.dim() != 1:
        raise ValueError(f"contexts must be a 1-D tensor of integer ids; got {c.dtype} of shape {tuple(c.shape)}")
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= num_contexts):
        raise ValueError(f"context ids must be in 0..{num_contexts - 1}; got {int(c.min())}..{int(c.max())}")
    out = c.clone()
    changed = round(fraction * c.numel())
    if changed == 0:
        return out
    draw = generator.device
    rows = torch.randperm(c.numel(), generator=generator, device=draw)[:changed]
    shift = torch.randint(1, num_contexts, (changed,), generator=generator, device=draw)  # never 0: never the same
    rows, shift = rows.to(c.device), shift.to(c.device)
    out[rows] = (c[rows] + shift.to(c.dtype)) % num_contexts
    return out


def _pair(chosen: Any, true: Any) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = torch.as_tensor(chosen).cpu(), torch.as_tensor(true).cpu()
    if a.dim() != 1 or a.shape != b.shape or a.numel() == 0:
        raise ValueError(f"chosen and true must be non-empty 1-D tensors of one length; got {tuple(a.shape)} and {tuple(b.shape)}")
    return a.long(), b.long()


def routing_accuracy(chosen: Any, true: Any) -> float:
    """Fraction of rows routed to their true context."""
    a, b = _pair(chosen, true)
    return float((a == b).double().mean())


def plot_confusion(chosen: Any, true: Any, names: Sequence[str], path: str | Path,
                   title: str = "Context routing") -> Path:
    """One PNG: K x K routing confusion matrices, rows the true context, columns the chosen one.

    ``chosen`` is one router's choices or a mapping ``{router name: choices}``, drawn as panels of
    one figure sharing the colour scale: a run compares its routers at one level at a glance, and
    draws one figure instead of one per router (text-heavy figures cost a second each to render).
    Colours are row-normalised (the share of each true context's rows sent to each context), so a
    small context's errors show as plainly as a large one's; cells carry the counts. Written
    atomically (``plotting.save_png``); returns the path.
    """
    from matplotlib.figure import Figure


    panels = dict(chosen) if isinstance(chosen, Mapping) else {"": chosen}
    if not panels:
        raise ValueError("plot_confusion needs at least one router's choices")
    k = len(names)
    matrices = {}
    for router, choices in panels.items():
        a, b = _pair(choices, true)
        for what, t in (("chosen", a), ("true", b)):
            if int(t.min()) < 0 or int(t.max()) >= k:
                raise ValueError(f"{what} context ids must be in 0..{k - 1} for {k} names; got "
                                 f"{int(t.min())}..{int(t.max())}")
        counts = confusion_matrix(a, b, k).numpy()  # (predicted, actual): rows true, columns chosen
        totals = counts.sum(axis=1, keepdims=True)
        shares = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=np.float64), where=totals > 0)
        matrices[router] = (counts, shares, routing_accuracy(a, b), len(a))
    side = max(3.5, 0.42 * k + 1.8)  # inches per panel: cells stay readable at fontsize 8
    fig = Figure(figsize=(side * len(panels) + 1.0, side + 0.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]  # one set of row labels: fewer texts to draw
    for ax, (router, (counts, shares, accuracy, rows)) in zip(axes, matrices.items()):
        image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
        if k <= 20:
            for i, j in zip(*np.nonzero(counts)):  # empty cells stay blank: fewer texts, faster drawing
                ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=8,
                        color="white" if shares[i, j] > 0.5 else "black")
        ax.set_xticks(range(k), list(names), rotation=45, ha="right")
        ax.set_xlabel("chosen context")
        ax.set_title(f"{router + ' router: ' if router else ''}accuracy {accuracy:.3f}, {rows} rows")
    axes[0].set_yticks(range(k), list(names))
    axes[0].set_ylabel("true context")
    fig.colorbar(image, ax=list(axes), label="share of the true context's rows")
    fig.suptitle(title)
    return save_png(fig, path)


__all__ = [
    "REFIT_ROUTER", "ROUTERS", "ROUTER_KIND", "STRATEGIES", "DetectorRouter", "EntropyRouter", "LearnedRouter",
    "Router", "build_router", "fit_router", "flatten_features", "inject_errors", "load_router", "needs_fitting",
    "output_logit", "plot_confusion", "router_name", "router_problem", "routing_accuracy", "save_router",
    "softmax_entropy",
]
