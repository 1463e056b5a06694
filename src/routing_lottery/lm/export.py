"""Export one domain of a masked causal LM as a plain ``transformers`` model directory.

The directory is what ``save_pretrained`` writes (config, generation config, safetensors weights,
tokenizer files when a tokenizer is given) with every masked weight replaced by ``W ⊙ m_k``, its
pruned positions exactly ``+0.0``. Anyone loads it with ``AutoModelForCausalLM.from_pretrained``
without this library. Embeddings, norms and a tied ``lm_head`` stay dense and tied (the masks
cannot name a tied weight: ``serving.masked_linears`` refuses it).

The export is checked before it is reported done: the directory is loaded back with
``from_pretrained`` and its logits compared with the routed model's for that domain on given
``input_ids``; the pruned positions are checked to be zero in the loaded weights. The result is
returned and written beside the weights as ``routing_lottery_export.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..masks import MaskSet
from ..routed import masked_forward
from .serving import MaskedCausalLM, masked_linears

REPORT_NAME = "routing_lottery_export.json"
"""The verification record written beside the exported weights."""


@dataclass(frozen=True)
class DomainExport:
    """What ``export_domain`` wrote and how it checked it."""

    directory: str
    domain: str
    domain_index: int
    masked_tensors: int
    kept: int
    maskable: int
    max_abs_logit_diff: float  # loaded model vs the routed model for this domain
    pruned_exactly_zero: bool
    tied_embeddings: bool
    verify_shape: tuple[int, ...]

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.maskable if self.maskable else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "verify_shape": list(self.verify_shape), "sparsity": self.sparsity}


def _domain(model: nn.Module, masks: MaskSet | None, domain: int | str) -> tuple[nn.Module, dict[str, torch.Tensor], int, str]:
    """(dense model, domain mask, index, name) from a ``MaskedCausalLM`` or a plain model and a MaskSet."""
    if isinstance(model, MaskedCausalLM):
        if masks is not None:
            raise ValueError("pass masks=None with a MaskedCausalLM: it holds its own masks")
        k = model.domain_index(domain)
        return model.model, model.domain_mask(k), k, model.domain_names[k]
    if masks is None:
        raise ValueError("masks is required unless model is a MaskedCausalLM")
    masked_linears(model, masks)  # the same refusals as serving: only untied Linear weights
    k = masks.check_context(domain)
    return model, masks[k], k, masks.context_names[k]


def _masked_state(model: nn.Module, mask: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's state dict with ``W ⊙ m`` for masked tensors; tied entries keep sharing storage.

    ``torch.where`` rather than ``W * m``: a negative weight times 0 is ``-0.0``, and exported
    pruned weights should be the plain zero a reader counts.
    """
    state = model.state_dict()
    for name, m in mask.items():
        weight = state[name]
        state[name] = torch.where(m, weight, torch.zeros((), dtype=weight.dtype))
    return state


def _reference_logits(model: nn.Module, dense: nn.Module, mask: Mapping[str, torch.Tensor], k: int,
                      input_ids: torch.Tensor) -> torch.Tensor:
    """The routed model's logits for domain k (the wrapper itself when given, else a masked call)."""
    with torch.no_grad():
        if isinstance(model, MaskedCausalLM):
            return model(input_ids, domains=k).logits
        floats = {n: m.to(dense.dtype) for n, m in mask.items()}
        return masked_forward(dense, floats, input_ids=input_ids).logits


def _loaded_zeros(loaded: nn.Module, mask: Mapping[str, torch.Tensor]) -> bool:
    params = dict(loaded.named_parameters())
    return all(bool((params[n][~m] == 0).all()) for n, m in mask.items())


def _tied(model: nn.Module) -> bool:
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    return outputs is not None and outputs.weight is inputs.weight


def export_domain(model: nn.Module, masks: MaskSet | None, k: int | str, out_dir: str | Path, *,
                  tokenizer: Any = None, input_ids: torch.Tensor | None = None) -> DomainExport:
    """Write domain ``k`` as a plain ``transformers`` model directory in ``out_dir``, verified.

    Parameters
    ----------
    model: a ``MaskedCausalLM`` (pass ``masks=None``) or the plain model with ``masks``.
    masks: the domains' masks over the model's Linear weights (``None`` with a ``MaskedCausalLM``).
    k: the domain, an index or a name.
    out_dir: the directory to write (created; files ``save_pretrained`` writes are replaced).
    tokenizer: saved beside the weights when given (``tokenizer.save_pretrained``).
    input_ids: (batch, tokens) ids to verify on; a short ramp of token ids when omitted.

    Returns
    -------
    A ``DomainExport``, also written to ``out_dir / REPORT_NAME``. ``max_abs_logit_diff`` is the
    largest logit difference between the loaded directory and the routed model for domain k
    (0.0 when the loader rebuilds the same float32 model).
    """
    from transformers import AutoModelForCausalLM

    dense, mask, index, name = _domain(model, masks, k)
    if input_ids is None:
        input_ids = torch.arange(min(16, dense.config.vocab_size)).unsqueeze(0)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dense.save_pretrained(out, state_dict=_masked_state(dense, mask))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=dense.dtype).eval()
    with torch.no_grad():
        got = loaded(input_ids=input_ids).logits
    want = _reference_logits(model, dense, mask, index, input_ids)
    result = DomainExport(
        directory=str(out), domain=name, domain_index=index, masked_tensors=len(mask),
        kept=int(sum(int(m.sum()) for m in mask.values())), maskable=int(sum(m.numel() for m in mask.values())),
        max_abs_logit_diff=float((got - want).abs().max()), pruned_exactly_zero=_loaded_zeros(loaded, mask),
        tied_embeddings=_tied(loaded), verify_shape=tuple(input_ids.shape),
    )
    (out / REPORT_NAME).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result
