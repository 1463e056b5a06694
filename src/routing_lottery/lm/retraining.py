"""Joint retraining of per-domain masks on a pretrained causal LM, its equal-steps baseline, and the whole set on disk.

Issue 25, items 4 and 7. Algorithm 2 on the pretrained weights: the domains take turns, one
optimizer step each, every step through its own mask only, with one optimizer state per domain kept
at its mask's positions (``training.joint_retrain`` and ``training.ContextOptimizer``, reused as they
are). The fair baseline is one shared mask fine-tuned on the pooled sequences for the same number of
optimizer steps (:func:`equal_steps`), through the same loop. The whole set is saved as the library's
ticket checkpoint (``io.save_tickets``): the shared weights once, K bits per masked weight, a header.

What trains: only the masked weights (the block ``nn.Linear`` weights by default). Embeddings, norms
and a tied ``lm_head`` are frozen during retraining, for two reasons. Memory: every dense parameter
would get a full Adam state per domain (SmolLM2's tied embedding alone is 28 M weights, 0.9 GB of
state for 4 domains), where the masked weights' state grows with the masks' density. And the
comparison: a domain's step would move the dense weights every other domain uses, so what one
domain learns would leak into the others through them; frozen, the domains differ only in their masks,
and the shared-mask baseline trains exactly the same tensors.

Example (a domain's sequences are ``(n, seq_len)`` token ids, e.g. ``TextDomains.sequences``)::

    done = retrain_domains(model, masks, {"code": code_ids, "mail": mail_ids}, steps_per_domain=50,
                           batch_size=4, lr=1e-4, seed=0)
    pooled = torch.cat([code_ids, mail_ids])
    base = finetune_shared(shared_model, shared_mask, pooled, steps=equal_steps(2, 50), batch_size=4,
                           lr=1e-4, seed=0)
    assert base.total_steps == done.total_steps
    save_domain_set(model, masks, "domains/")
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from routing_lottery.io import load_tickets, save_tickets
from routing_lottery.masks import MaskSet
from routing_lottery.training import (
    SILENT, ContextOptimizer, Loss, OptimizerConfig, ProgressSink, Stream, joint_retrain,
)

__all__ = ["Retraining", "causal_lm_loss", "equal_steps", "finetune_shared", "load_domain_set", "retrain_domains",
           "save_domain_set"]

SHARED = "shared"
"""The context name of the shared mask in :func:`finetune_shared`'s result."""


def causal_lm_loss(outputs: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: position t's logits predict token t + 1 of ``input_ids``.

    ``outputs`` is a ``transformers`` output (its ``.logits``) or a raw ``(batch, seq, vocab)`` logits
    tensor. It is the ``loss(outputs, targets)`` of a ``training.Stream`` whose batches are
    ``(sequences, sequences)``: a causal LM's targets are its inputs, shifted here. Targets equal to
    -100 are ignored (``F.cross_entropy``'s default), as ``transformers`` does for padding.
    """
    logits = getattr(outputs, "logits", outputs)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        found = (f"a tensor of shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor)
                 else type(logits).__name__)
        raise TypeError(f"outputs must be a model output with .logits or a (batch, seq, vocab) tensor; got {found}")
    if input_ids.shape != logits.shape[:2]:
        raise ValueError(f"input_ids of shape {tuple(input_ids.shape)} do not match logits of shape "
                         f"{tuple(logits.shape)}: expected (batch, seq) = {tuple(logits.shape[:2])}")
    if logits.shape[1] < 2:
        raise ValueError(f"sequences of {logits.shape[1]} token have no next token to predict; need at least 2")
    shifted = logits[:, :-1].float()
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), input_ids[:, 1:].reshape(-1))


@dataclass(frozen=True)
class Retraining:
    """What a masked retraining did: the model (trained in place), and per context its steps and losses.

    ``steps[c]`` counts the optimizer steps context ``c`` took (measured, one per loss evaluated);
    ``losses[c]`` is its training loss at each of them; ``state_numel[c]`` is the number of optimizer
    state values it kept (Adam: two per position of its mask, since only masked weights train).
    """

    model: nn.Module
    steps: dict[str, int]
    losses: dict[str, list[float]]
    state_numel: dict[str, int] = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        """Optimizer steps over all contexts: what :func:`equal_steps` makes equal between the two methods."""
        return sum(self.steps.values())


def equal_steps(num_domains: int, steps_per_domain: int) -> int:
    """The shared-mask baseline's step count that matches :func:`retrain_domains`: ``K x steps_per_domain``.

    >>> equal_steps(4, 25)
    100
    """
    for name, value in (("num_domains", num_domains), ("steps_per_domain", steps_per_domain)):
        _check_positive_int(name, value)
    return num_domains * steps_per_domain


def retrain_domains(model: nn.Module, masks: MaskSet, sequences: Mapping[str, torch.Tensor], *,
                    steps_per_domain: int, batch_size: int, lr: float, optimizer: Literal["adam", "sgd"] = "adam",
                    weight_decay: float = 0.0, seed: int, progress: ProgressSink | None = None) -> Retraining:
    """Algorithm 2 on the pretrained weights: the domains take turns, one masked step each, round-robin.

    ``model`` is trained in place from its current (pretrained) weights, which are θ₀: no rewind
    training. First every masked weight outside the union of the masks is set to exactly 0 (no domain
    keeps it, and the set stores only the union); then ``steps_per_domain`` rounds, in each of which
    every domain, in ``masks.context_names`` order, takes one step on ``batch_size`` of its own
    sequences through its own mask (``training.joint_retrain``). Each domain has its own optimizer
    state, kept only at its mask's positions (``ContextOptimizer``, compact): a domain's step moves no
    weight outside its mask, so weights outside the union stay 0 and a weight only another domain keeps
    is not moved, whatever the momentum. Only the masked weights train (see the module docstring).

    Parameters
    ----------
    model : a causal LM (``model(input_ids).logits``); its mode is restored afterwards.
    masks : one mask per domain over some of ``model``'s parameters (``lm.model.masked_linear_names``).
    sequences : domain name -> ``(n, seq_len)`` int64 token ids, one entry per mask; a domain's batches
        come from passes over its sequences, each pass in a fresh random order (remainder dropped).
    steps_per_domain, batch_size : optimizer steps each domain takes, and sequences per step.
    lr, optimizer, weight_decay : the optimizer (``training.OptimizerConfig``; Adam's weight decay is
        L2 added to the gradient, which with the default 0 makes it the same as AdamW).
    seed : every draw of batches; the same seed gives bit-identical weights.
    progress : receives one ``advance`` per round (``training.ProgressSink``).

    Returns
    -------
    Retraining
        The model and what each domain did.
    """
    _check_positive_int("steps_per_domain", steps_per_domain)
    _check_sequences(sequences, masks.context_names, batch_size)
    ordered = {name: sequences[name] for name in masks.context_names}
    return _masked_finetune(model, masks, ordered, steps_per_domain, batch_size,
                            OptimizerConfig(optimizer, lr, weight_decay), seed, progress or SILENT)


def finetune_shared(model: nn.Module, mask: Mapping[str, torch.Tensor], sequences: torch.Tensor, *, steps: int,
                    batch_size: int, lr: float, optimizer: Literal["adam", "sgd"] = "adam", weight_decay: float = 0.0,
                    seed: int, progress: ProgressSink | None = None) -> Retraining:
    """The fair baseline: one shared mask fine-tuned on the pooled sequences of all domains for ``steps`` steps.

    The same loop, optimizer and batch size as :func:`retrain_domains`, with one context: give it
    ``steps=equal_steps(K, steps_per_domain)`` and both take the same number of optimizer steps
    (compare their ``total_steps``). ``model`` is trained in place from its current weights, with the
    weights ``mask`` prunes set to exactly 0 first; its result's only context is named ``"shared"``.
    """
    if not isinstance(mask, Mapping) or not mask:
        raise TypeError(f"mask must be one mask, a non-empty mapping name -> bool tensor; got {type(mask).__name__}")
    _check_positive_int("steps", steps)
    _check_sequences({SHARED: sequences}, [SHARED], batch_size)
    masks = MaskSet.from_tickets([{n: m.to(torch.bool) for n, m in mask.items()}], [SHARED])
    return _masked_finetune(model, masks, {SHARED: sequences}, steps, batch_size,
                            OptimizerConfig(optimizer, lr, weight_decay), seed, progress or SILENT)


def _masked_finetune(model: nn.Module, masks: MaskSet, sequences: Mapping[str, torch.Tensor], steps: int,
                     batch_size: int, optimizer: OptimizerConfig, seed: int, progress: ProgressSink) -> Retraining:
    """``joint_retrain`` for one epoch in which every context takes exactly ``steps`` steps, only the
    masked weights trainable; what each context did, measured."""
    _check_masks(model, masks)
    recorded: dict[str, list[torch.Tensor]] = {name: [] for name in sequences}
    streams = [_sequence_stream(name, seqs, steps, batch_size, _recording(causal_lm_loss, recorded[name]))
               for name, seqs in sequences.items()]
    state_numel: dict[str, int] = {}

    def measure(epoch: int, optimizers: Sequence[ContextOptimizer]) -> None:
        state_numel.update({name: _state_numel(opt) for name, opt in zip(sequences, optimizers)})

    with _only_trainable(model, set(masks.tensor_names)):
        # θ₀ is the model's own weights: its state_dict holds references, so no copy is kept beside
        # the one joint_retrain makes to zero what lies outside the union.
        joint_retrain(model, model.state_dict(), masks, streams, 1, optimizer, seed, progress, on_epoch=measure)
    losses = {name: [float(v) for v in values] for name, values in recorded.items()}
    return Retraining(model, {name: len(v) for name, v in losses.items()}, losses, state_numel)


@contextlib.contextmanager
def _only_trainable(model: nn.Module, names: set[str]) -> Iterator[None]:
    """Only the parameters ``names`` require gradients inside the block; flags and train/eval mode restored after.

    A frozen parameter gets no gradient, so the wrapped optimizer skips it and keeps no state for it.
    """
    params = dict(model.named_parameters())
    before = {n: p.requires_grad for n, p in params.items()}
    training = model.training
    try:
        for n, p in params.items():
            p.requires_grad_(n in names)
        yield
    finally:
        for n, p in params.items():
            p.requires_grad_(before[n])
        model.train(training)


def _sequence_stream(name: str, sequences: torch.Tensor, steps: int, batch_size: int, loss: Loss) -> Stream:
    """A ``Stream`` of exactly ``steps`` batches of ``(ids, ids)``: passes over the sequences, each in a fresh
    random order and cut into batches with the remainder dropped (a ``DataLoader`` with ``shuffle`` and
    ``drop_last``), as many passes as the steps need."""
    n = len(sequences)
    per_pass = n // batch_size

    def epoch(gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
        passes = [torch.randperm(n, generator=gen)[:per_pass * batch_size] for _ in range(math.ceil(steps / per_pass))]
        rows = torch.cat(passes)[:steps * batch_size].view(steps, batch_size)
        return [(sequences[r], sequences[r]) for r in rows]

    return Stream(name, epoch, loss, steps)


def _recording(loss: Callable[[Any, torch.Tensor], torch.Tensor], into: list[torch.Tensor]) -> Loss:
    """``loss``, with each value appended to ``into`` (detached): one per optimizer step, read once at the end."""

    def recorded(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        value = loss(outputs, targets)
        into.append(value.detach())
        return value

    return recorded


def _state_numel(optimizer: ContextOptimizer) -> int:
    """Optimizer state values held, not counting per-parameter scalars (Adam's step counter)."""
    state = optimizer.state_dict()["state"]
    return sum(v.numel() for entry in state.values() for v in entry.values() if torch.is_tensor(v) and v.dim())


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")


def _check_masks(model: nn.Module, masks: MaskSet) -> None:
    if not isinstance(masks, MaskSet):
        raise TypeError(f"masks must be a MaskSet; got {type(masks).__name__}")
    params = dict(model.named_parameters())
    missing = [n for n in masks.tensor_names if n not in params]
    if missing:
        raise ValueError(f"masks name tensors the model does not have: {missing[:5]}")
    wrong = {n: (s, tuple(params[n].shape)) for n, s in masks.shapes.items() if s != tuple(params[n].shape)}
    if wrong:
        raise ValueError(f"mask shapes differ from their parameters' (mask, parameter): {wrong}")


def _check_sequences(sequences: Mapping[str, torch.Tensor], names: Sequence[str], batch_size: int) -> None:
    """One ``(n, seq_len)`` integer tensor per name, ``n >= batch_size``, ``seq_len >= 2``; else a clear error."""
    _check_positive_int("batch_size", batch_size)
    if not isinstance(sequences, Mapping):
        raise TypeError(f"sequences must be a mapping domain name -> token ids; got {type(sequences).__name__}")
    if set(sequences) != set(names):
        raise ValueError(f"sequences are given for domains {sorted(sequences)}, the masks' domains are {list(names)}")
    for name in names:
        ids = sequences[name]
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"sequences of {name!r} must be a tensor of token ids; got {type(ids).__name__}")
        if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"sequences of {name!r} must be a (num_sequences, seq_len) tensor of token ids; "
                            f"got a {ids.dtype} tensor of shape {tuple(ids.shape)}")
        if ids.shape[1] < 2:
            raise ValueError(f"sequences of {name!r} have {ids.shape[1]} token each; "
                             "next-token training needs at least 2")
        if len(ids) < batch_size:
            raise ValueError(f"domain {name!r} has {len(ids)} sequences, fewer than batch_size {batch_size}")


def save_domain_set(model: nn.Module, masks: MaskSet, directory: str | Path,
                    metadata: Mapping[str, Any] | None = None) -> Path:
    """The whole set in ``directory``: the shared weights once, the K masks bit-packed, and a header.

    The library's ticket checkpoint (``io.save_tickets``): per masked tensor the shared weight at the
    union of the masks and K bits per position, every other tensor of the state dict as it is, and
    ``tickets.json`` with the domain names, the masked tensors' shapes, the model's state-dict
    signature, checksums and ``metadata``; written atomically. Returns the directory.
    """
    return save_tickets(directory, model, masks, metadata)


def load_domain_set(directory: str | Path, model: nn.Module) -> MaskSet:
    """Load a set saved by :func:`save_domain_set` into ``model`` (same architecture); returns its masks.

    Weights outside the union of the masks come back as exactly 0. A missing, truncated, corrupt or
    edited file, or a set saved for another architecture, raises ``CheckpointError`` naming the file,
    before ``model`` is touched.
    """
    masks, _ = load_tickets(directory, model)
    return masks
