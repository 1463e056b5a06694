"""The script entry point the three examples share: the front door on an example's config.

The config names the example's loader and model; ``build_tasks`` turns them into the library's
classification task, whose per-context streams are the paper's one-vs-rest detectors (a context's
rows plus as many fresh negatives each epoch, binary cross-entropy on output k). The script
extracts the tickets, retrains them jointly, routes the test set as one mixed batch by context
name and prints each subnetwork's balanced accuracy. ``rtl run <config>`` runs the same tickets
beside the baselines.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from routing_lottery import AdaptiveTickets
from routing_lottery.experiments import load_config
from routing_lottery.run import build_tasks
from routing_lottery.run.experiment import seeded_models
from routing_lottery.training import derive_seed


def main(config_path: str | Path, argv: Sequence[str] | None = None) -> dict[str, float]:
    """Fit the example's tickets, print each context's balanced accuracy; returns them by context name."""
    parser = argparse.ArgumentParser(description=f"Adaptive tickets on {Path(config_path).name}")
    parser.add_argument("--smoke", action="store_true", help="the config's smoke scale (seconds)")
    parser.add_argument("--out", type=Path, default=None, help="save the tickets here (AdaptiveTickets.save)")
    args = parser.parse_args(argv)
    config = load_config(config_path, "smoke" if args.smoke else None)
    task = build_tasks(config)[0]  # the example's loader and model factory, one context per class
    names = list(task.context_names)

    model, _ = seeded_models(task, derive_seed(config.seed, "init"))  # the same θ₀ as `rtl run` gives
    rtl = AdaptiveTickets(model, config)
    print(rtl.describe())
    routed = rtl.fit({name: task.context_stream(k) for k, name in enumerate(names)}).routed

    test = task.test_set
    with torch.no_grad():  # one mixed batch, every row through its own context's subnetwork
        own = routed(test.inputs, [names[c] for c in task.test_context])
    row = task.score_routed(lambda k, x: routed(x, k), "rtl")[0]
    scores = {name: row[f"balanced_accuracy_context_{k}"] for k, name in enumerate(names)}
    print(f"\n{len(names)} subnetworks at {rtl.level:.0%} sparsity, balanced accuracy on {len(test)} test rows:")
    for name, value in scores.items():
        print(f"  {name:>14}  {value:.3f}")
    hits = (own.gather(1, task.test_context[:, None]) > 0).float().mean().item()
    print(f"  mean {row['balanced_accuracy']:.3f}; rows their own subnetwork accepts: {hits:.1%}")
    if args.out is not None:
        print(f"tickets saved to {rtl.save(args.out)}")
    return scores
