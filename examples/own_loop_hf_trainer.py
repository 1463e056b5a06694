"""Your Trainer: RTL masks retrained jointly by a ``transformers.Trainer`` on a tiny BERT.

A ``Trainer`` owns the loop (batching, gradient clipping, the learning-rate schedule, logging);
Algorithm 2 needs three things from it, each a small override of ``ContextTrainer`` below:

- **batches of one context each, the contexts in turn** (``get_train_dataloader`` with the
  ``ContextTurns`` batch sampler);
- **context k's subnetwork for a batch of context k** (``compute_loss`` runs the model inside
  ``with routed.use(k):``, called with the Trainer's keyword inputs as any transformers model);
- **context k's own optimizer for that step** (``create_optimizer`` gives the Trainer
  ``TurnTaking``, which hands each step, at the Trainer's scheduled learning rate, to that
  context's ``ContextOptimizer``; a step of k never moves a weight outside m_k).

The model is built from a config object (no download): a 2-layer BertForSequenceClassification.
Two contexts over the same token sequences ask different questions (is token 5 in it? is token
7?); the front door's stage 1 gives each its mask. Run from the repository root::

    python -m examples.own_loop_hf_trainer      # about 20 s on one CPU thread

It needs ``transformers`` and ``accelerate`` (the Trainer's own dependency).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from routing_lottery import AdaptiveTickets, PruningConfig, RoutedModel, RTLConfig, TrainingConfig, tensor_stream
from routing_lottery.training import ContextOptimizer, OptimizerConfig, context_optimizers, rewound, snapshot

CONTEXTS = {"has_5": 5, "has_7": 7}  # context name -> the token whose presence it detects
VOCAB, LENGTH = 24, 12


def sequences(rows: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per context: token ids, attention mask (variable lengths) and labels, half of them positive."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, token in CONTEXTS.items():
        ids = torch.randint(8, VOCAB, (rows, LENGTH), generator=g)  # tokens 5 and 7 only where planted
        lengths = torch.randint(LENGTH // 2, LENGTH + 1, (rows,), generator=g)
        attention = (torch.arange(LENGTH) < lengths[:, None]).long()
        labels = torch.arange(rows) % 2
        for i in range(rows):
            other = 7 if token == 5 else 5  # the other context's token is noise here
            ids[i, torch.randint(0, int(lengths[i]), (1,), generator=g)] = token if labels[i] else other
        ids[attention == 0] = 0
        out[name] = (ids, attention, labels)
    return out


def tiny_bert() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=LENGTH, num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


class Rows(Dataset):
    """The Trainer's dataset: one dict per row, its context id included (the collator stacks them)."""

    def __init__(self, data: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        self.rows = [{"input_ids": ids[i], "attention_mask": att[i], "labels": y[i], "context": torch.tensor(k)}
                     for k, (ids, att, y) in enumerate(data.values()) for i in range(len(y))]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


class ContextTurns(Sampler[list[int]]):
    """Algorithm 2's order as a batch sampler: round m gives every context its m-th batch (a context
    with fewer rows starts over); each context's rows reshuffled every epoch from ``seed``."""

    def __init__(self, contexts: torch.Tensor, batch_size: int, seed: int) -> None:
        self.members = [(contexts == k).nonzero(as_tuple=True)[0] for k in range(int(contexts.max()) + 1)]
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0

    def __len__(self) -> int:
        return len(self.members) * max(-(-len(m) // self.batch_size) for m in self.members)

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        batches = [m[torch.randperm(len(m), generator=g)].split(self.batch_size) for m in self.members]
        for r in range(max(len(b) for b in batches)):
            for b in batches:
                yield b[r % len(b)].tolist()


class TurnTaking(torch.optim.Optimizer):
    """The optimizer the Trainer steps: each step goes to the context whose batch it was, at the
    learning rate the Trainer's scheduler set here (one group over the real parameters)."""

    def __init__(self, model: torch.nn.Module, per_context: Sequence[ContextOptimizer]) -> None:
        super().__init__(list(model.parameters()), {"lr": per_context[0].param_groups[0]["lr"]})
        self.per_context = list(per_context)
        self.context: int | None = None

    def step(self, closure: Any = None) -> Any:
        if self.context is None:
            raise RuntimeError("no context for this step: compute_loss sets it from the batch")
        chosen = self.per_context[self.context]
        for group in chosen.param_groups:
            group["lr"] = self.param_groups[0]["lr"]
        return chosen.step(closure)


def _trainer_class() -> type:
    from transformers import Trainer

    class ContextTrainer(Trainer):
        """A Trainer whose every step is one context's: its batch, its subnetwork, its optimizer."""

        def __init__(self, *args: Any, routed: RoutedModel, per_context: Sequence[ContextOptimizer],
                     turns: ContextTurns, **kwargs: Any) -> None:
            super().__init__(*args, model=routed, **kwargs)
            self.routed, self.per_context, self.turns = routed, per_context, turns
            self.model_accepts_loss_kwargs = False  # compute_loss returns a per-batch mean

        def get_train_dataloader(self) -> DataLoader:
            return DataLoader(self.train_dataset, batch_sampler=self.turns, collate_fn=self.data_collator)

        def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
            if self.optimizer is None:  # kept as turn_taking too: accelerate wraps what self.optimizer holds
                self.optimizer = self.turn_taking = TurnTaking(self.routed, self.per_context)
            return self.optimizer

        def compute_loss(self, model: Any, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            contexts = inputs.pop("context")
            k = int(contexts[0])
            if not bool((contexts == k).all()):
                raise ValueError(f"a batch mixes contexts {sorted(set(contexts.tolist()))}: one context per step")
            self.turn_taking.context = k  # the Trainer's next optimizer.step() is context k's
            with self.routed.use(k):  # context k's subnetwork, w * m_k, the model's own keyword inputs
                outputs = self.routed(**inputs)
            return (outputs.loss, outputs) if return_outputs else outputs.loss

    return ContextTrainer


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Masks from the front door, joint retraining by a Trainer; prints and returns each context's test accuracy."""
    parser = argparse.ArgumentParser(description="RTL masks retrained jointly by a transformers Trainer")
    parser.add_argument("--epochs", type=int, default=12, help="Trainer epochs of joint retraining")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from transformers import TrainingArguments, default_data_collator

    torch.set_num_threads(1)
    train, test = sequences(256, args.seed), sequences(128, args.seed + 1)

    # 1. Masks: the front door's stage 1, the model called positionally on (ids, attention mask).
    torch.manual_seed(args.seed)
    bert = tiny_bert()
    theta0 = snapshot(bert)
    recipe = RTLConfig(seed=args.seed, pruning=PruningConfig(sparsities=(args.sparsity,), step=0.5),
                       training=TrainingConfig(imp_epochs=4, optimizer=OptimizerConfig(lr=3e-3)))
    streams = {name: tensor_stream(name, (ids, att), y, lambda out, y: F.cross_entropy(out.logits, y), batch_size=32)
               for name, (ids, att, y) in train.items()}
    masks = AdaptiveTickets(bert, recipe).extract(streams)[args.sparsity]
    print(f"masks over {len(masks.tensor_names)} tensors: {masks.counts()} of {masks.size()} weights kept")

    # 2. Joint retraining by the Trainer: θ from θ₀ on the union of the masks.
    bert.load_state_dict(rewound(theta0, masks.union()))
    routed = RoutedModel(bert, masks)
    per_context = context_optimizers(bert, masks, lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.01))
    dataset = Rows(train)
    turns = ContextTurns(torch.stack([row["context"] for row in dataset.rows]), batch_size=32, seed=args.seed)
    with tempfile.TemporaryDirectory() as out:
        arguments = TrainingArguments(output_dir=out, num_train_epochs=args.epochs, learning_rate=3e-3,
                                      lr_scheduler_type="cosine", max_grad_norm=1.0, use_cpu=True, report_to=[],
                                      save_strategy="no", logging_strategy="epoch", disable_tqdm=True,
                                      remove_unused_columns=False, seed=args.seed, dataloader_num_workers=0)
        trainer = _trainer_class()(args=arguments, train_dataset=dataset, data_collator=default_data_collator,
                                   routed=routed, per_context=per_context, turns=turns)
        trainer.train()

    # 3. Each context's test rows through its own subnetwork.
    routed.eval()
    scores = {}
    with torch.no_grad():
        for name, (ids, att, y) in test.items():
            logits = routed(context=name, input_ids=ids, attention_mask=att).logits
            scores[name] = (logits.argmax(1) == y).float().mean().item()
    params = dict(bert.named_parameters())
    revived = sum(int((params[n][~u] != 0).sum()) for n, u in masks.union().items())
    print(f"weights outside every mask that are not zero: {revived}")
    print(f"test accuracy per context at {args.sparsity:.0%} sparsity:")
    for name, value in scores.items():
        print(f"  {name:>6}  {value:.3f}")
    return scores


if __name__ == "__main__":
    if not __package__:  # run as a file: make the repository root importable, as `python -m` does
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
