"""Your loop, your optimizer: masks from the front door, joint retraining in a plain PyTorch loop.

The front door (``AdaptiveTickets.extract``) finds one mask per context; then a loop you could
have written for any model retrains them jointly (the paper's Algorithm 2): the contexts take
turns, each step runs one context's subnetwork (``with routed.use(k):``) and steps that context's
own optimizer. Everything else is ordinary PyTorch: ``DataLoader``s, AdamW with weight decay, a
cosine schedule, gradient clipping, your loss. ``context_optimizers`` is what keeps it correct:
a step of context k never moves a weight outside its mask m_k (AdamW's decay and momentum would
otherwise move the weights other contexts own), and its state covers only m_k.

The data: scikit-learn's digits (8x8 images, no download), three contexts by digit (0-2, 3-5,
6-9), one 10-way MLP shared by all. Run from the repository root::

    python -m examples.own_loop_adamw           # about 10 s on one CPU thread
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from routing_lottery import AdaptiveTickets, PruningConfig, RoutedModel, RTLConfig, TrainingConfig, tensor_stream
from routing_lottery.training import OptimizerConfig, context_optimizers, rewound, snapshot

CONTEXTS = {"zero_to_two": (0, 1, 2), "three_to_five": (3, 4, 5), "six_to_nine": (6, 7, 8, 9)}


Rows = dict[str, tuple[torch.Tensor, torch.Tensor]]  # context name -> (inputs, labels)


def digits(seed: int) -> tuple[Rows, Rows]:
    """Train and test rows per context: standardized pixels with the training split's statistics."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float32)
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    is_test = torch.rand(len(y), generator=torch.Generator().manual_seed(seed)) < 0.25
    mean, std = x[~is_test].mean(0), x[~is_test].std(0).clamp_min(1e-6)
    x = (x - mean) / std
    split = {}
    for part, rows in (("train", ~is_test), ("test", is_test)):
        split[part] = {name: (x[rows & torch.isin(y, torch.tensor(d))], y[rows & torch.isin(y, torch.tensor(d))])
                       for name, d in CONTEXTS.items()}
    return split["train"], split["test"]


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def turns(loaders: Sequence[DataLoader]) -> Iterator[tuple[int, tuple[torch.Tensor, torch.Tensor]]]:
    """One epoch in Algorithm 2's order: round m gives every context its m-th batch; a context with
    fewer batches starts its loader over (a fresh shuffle)."""
    running = [iter(loader) for loader in loaders]
    for _ in range(max(len(loader) for loader in loaders)):
        for k, loader in enumerate(loaders):
            batch = next(running[k], None)
            if batch is None:
                running[k] = iter(loader)
                batch = next(running[k])
            yield k, batch


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Extract masks, retrain them jointly in a plain loop, print each context's test accuracy; returns them."""
    parser = argparse.ArgumentParser(description="RTL masks retrained in your own loop (AdamW, cosine schedule)")
    parser.add_argument("--epochs", type=int, default=8, help="joint retraining epochs")
    parser.add_argument("--sparsity", type=float, default=0.75, help="fraction of the masked weights pruned")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    train, test = digits(args.seed)
    names = list(CONTEXTS)

    # 1. Masks: the front door's stage 1 (iterative magnitude pruning per context).
    torch.manual_seed(args.seed)
    model = mlp()
    theta0 = snapshot(model)  # AdaptiveTickets takes the model's current weights as θ₀
    recipe = RTLConfig(seed=args.seed, pruning=PruningConfig(sparsities=(args.sparsity,), step=0.5),
                       training=TrainingConfig(imp_epochs=2, optimizer=OptimizerConfig(lr=3e-3)))
    streams = {name: tensor_stream(name, *train[name], F.cross_entropy, batch_size=64) for name in names}
    masks = AdaptiveTickets(model, recipe).extract(streams)[args.sparsity]
    print(f"masks: {len(names)} contexts, {masks.counts()} of {masks.size()} weights kept")

    # 2. Joint retraining, your loop: θ from θ₀ on the union of the masks, then turns of the contexts.
    model.load_state_dict(rewound(theta0, masks.union()))
    routed = RoutedModel(model, masks).train()
    loaders = [DataLoader(TensorDataset(*train[name]), batch_size=64, shuffle=True,
                          generator=torch.Generator().manual_seed(args.seed + k)) for k, name in enumerate(names)]
    optimizers = context_optimizers(model, masks, lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.01))
    steps = args.epochs * max(len(loader) for loader in loaders)  # each context steps once per round
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(o.optimizer, T_max=steps) for o in optimizers]
    for epoch in range(args.epochs):
        for k, (x, y) in turns(loaders):
            optimizers[k].zero_grad()
            with routed.use(k):  # context k's subnetwork, w * m_k
                loss = F.cross_entropy(routed(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            optimizers[k].step()  # moves m_k and the dense biases only
            schedulers[k].step()
        lr = optimizers[0].param_groups[0]["lr"]
        print(f"epoch {epoch + 1}/{args.epochs}: last loss {loss.item():.3f}, learning rate {lr:.2e}")

    # 3. Each context's rows through its own subnetwork.
    routed.eval()
    scores = {}
    with torch.no_grad():
        for name in names:
            x, y = test[name]
            scores[name] = (routed(x, name).argmax(1) == y).float().mean().item()
    params = dict(model.named_parameters())
    revived = sum(int((params[n][~u] != 0).sum()) for n, u in masks.union().items())
    print(f"weights outside every mask that are not zero: {revived}")
    print(f"test accuracy per context at {args.sparsity:.0%} sparsity:")
    for name, value in scores.items():
        print(f"  {name:>14}  {value:.3f}")
    return scores


if __name__ == "__main__":
    if not __package__:  # run as a file: make the repository root importable, as `python -m` does
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
