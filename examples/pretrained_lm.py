"""One mask per text domain over one copy of a pretrained language model: does it beat one shared mask?

SmolLM2-135M (from ``scripts/setup.sh lm``'s cache; nothing is downloaded here) is pruned one-shot,
with no training, at 50 % unstructured (per output row, as Wanda) and at 2:4, over every
``nn.Linear`` inside its blocks. The masks compared on every domain's held-out test sequences:

- ``dense``: no pruning;
- ``magnitude``: |W|, one mask for all domains (needs no data);
- ``shared wanda``: one Wanda mask from calibration sequences drawn from all domains pooled, as many
  tokens as one domain's own mask sees;
- ``own wanda``: each domain's Wanda mask from its own calibration sequences (``AdaptiveTickets``
  with ``pruning.score: wanda``), scored on its own domain and on every other one.

Each calibration draw takes other calibration sequences (the documents are split once, by
document); the table gives the mean and a 95 % Student t interval over the draws of the
perplexity, and of own / shared per domain. Run from the repository root::

    RTL_LM_CACHE=~/.cache/routing-lottery/lm python -m examples.pretrained_lm --draws 3 --out lm_results.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.nn import functional as F

from routing_lottery import AdaptiveTickets, PruningConfig, RTLConfig, input_norms, masked_forward, one_shot_mask, \
    tensor_stream
from routing_lottery.lm.data import TextDomains
from routing_lottery.lm.model import load_smollm2, masked_linear_names
from routing_lottery.scores import wanda


def perplexity(model: torch.nn.Module, mask: dict[str, torch.Tensor] | None, sequences: torch.Tensor,
               batch: int = 2) -> float:
    """exp of the mean next-token negative log-likelihood of ``sequences`` under the subnetwork ``mask``."""
    total, count = 0.0, 0
    fmask = None if mask is None else {n: m.float() for n, m in mask.items()}
    with torch.no_grad():
        for chunk in sequences.split(batch):
            out = model(chunk) if fmask is None else masked_forward(model, fmask, chunk)
            logits = out.logits[:, :-1].float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum")
            total, count = total + float(nll), count + chunk[:, 1:].numel()
    return math.exp(total / count)


def interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and a 95 % Student t interval (the mean alone for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean
    t = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776}.get(len(values), 2.571)
    half = t * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="per-domain vs shared one-shot masks on SmolLM2-135M")
    parser.add_argument("--cache", default=os.environ.get("RTL_LM_CACHE", "~/.cache/routing-lottery/lm"))
    parser.add_argument("--domains", nargs="*", default=None, help="default: every domain in the cache")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calibration", type=int, default=8, help="calibration sequences per mask and draw")
    parser.add_argument("--test", type=int, default=4, help="test sequences per domain")
    parser.add_argument("--draws", type=int, default=3, help="calibration draws")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write every measurement as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    cache = Path(args.cache).expanduser()
    model, tokenizer = load_smollm2(cache)
    names = masked_linear_names(model)
    print(names.describe())
    domains = TextDomains.from_folder(cache, args.domains, seed=0)
    need = args.calibration * args.draws
    calib = domains.sequences(tokenizer, args.seq_len, "calibration", max_sequences=need)
    test = domains.sequences(tokenizer, args.seq_len, "test", max_sequences=args.test)
    short = [d for d, s in calib.items() if len(s) < need]
    if short:
        raise SystemExit(f"domains {short} have fewer than {need} calibration sequences of {args.seq_len} tokens")
    masked = set(names)
    weights = {n: p.detach() for n, p in model.named_parameters() if n in masked}
    settings = [("50%", 0.5, None), ("2:4", None, (2, 4))]
    rows: list[dict] = []

    def record(draw: int, pattern: str, method: str, mask_of: str, mask: dict | None) -> None:
        for domain, sequences in test.items():
            rows.append({"draw": draw, "pattern": pattern, "method": method, "mask": mask_of, "domain": domain,
                         "perplexity": perplexity(model, mask, sequences)})

    record(0, "dense", "dense", "-", None)
    for pattern, level, n_m in settings:
        record(0, pattern, "magnitude", "-", one_shot_mask({n: w.abs() for n, w in weights.items()}, level, n_m=n_m))
    for draw in range(args.draws):
        picked = slice(draw * args.calibration, (draw + 1) * args.calibration)
        streams = {d: tensor_stream(d, s[picked], s[picked], F.cross_entropy, batch_size=2) for d, s in calib.items()}
        g = torch.Generator().manual_seed(draw)
        pooled = torch.cat([s[picked] for s in calib.values()])
        pooled = pooled[torch.randperm(len(pooled), generator=g)[:args.calibration]]  # one domain's token count
        shared_norms = input_norms(model, names, pooled.split(2))
        for pattern, level, n_m in settings:
            shared = one_shot_mask(wanda(weights, shared_norms), level, n_m=n_m)
            record(draw, pattern, "shared wanda", "pooled", shared)
            recipe = RTLConfig(seed=draw, pruning=PruningConfig(sparsities=(0.5,), score="wanda", n_m=n_m,
                                                                include=tuple(names)))
            masks = AdaptiveTickets(model, recipe).extract(streams)[0.5]
            for k, domain in enumerate(masks.context_names):
                record(draw, pattern, "own wanda", domain, masks[k])
        print(f"draw {draw + 1}/{args.draws} done at {time.perf_counter() - start:.0f} s", flush=True)
    summary = summarize(rows, list(test))
    if args.out is not None:
        args.out.write_text(json.dumps({"rows": rows, "summary": summary, "seq_len": args.seq_len,
                                        "calibration": args.calibration, "test": args.test, "draws": args.draws,
                                        "seconds": time.perf_counter() - start}, indent=1))
    return summary


def summarize(rows: list[dict], domains: list[str]) -> dict:
    """Per pattern and domain: each method's perplexity (mean, interval over draws), own domain vs shared."""
    def values(pattern: str, method: str, domain: str, mask: str | None = None) -> list[float]:
        return [r["perplexity"] for r in rows if r["pattern"] == pattern and r["method"] == method
                and r["domain"] == domain and (mask is None or r["mask"] == mask)]

    summary: dict = {}
    print("\nperplexity on each domain's test sequences (mean [95 % interval] over calibration draws)")
    for pattern in ("50%", "2:4"):
        print(f"\n{pattern}: domain | dense | magnitude | shared wanda | own wanda | own / shared")
        for domain in domains:
            dense = values("dense", "dense", domain)[0]
            magnitude = values(pattern, "magnitude", domain)[0]
            shared = values(pattern, "shared wanda", domain)
            own = values(pattern, "own wanda", domain, mask=domain)
            ratio = [o / s for o, s in zip(own, shared)]
            others = [r["perplexity"] for r in rows if r["pattern"] == pattern and r["method"] == "own wanda"
                      and r["domain"] == domain and r["mask"] != domain]
            entry = {"dense": dense, "magnitude": magnitude, "shared": interval(shared), "own": interval(own),
                     "own_over_shared": interval(ratio), "other_domains_masks": interval(others)}
            summary[f"{pattern} {domain}"] = entry
            fmt = lambda t: f"{t[0]:.2f} [{t[1]:.2f}, {t[2]:.2f}]"  # noqa: E731
            print(f"  {domain:>12} | {dense:.2f} | {magnitude:.2f} | {fmt(entry['shared'])} | {fmt(entry['own'])} | "
                  f"{fmt(entry['own_over_shared'])} (other domains' masks: {fmt(entry['other_domains_masks'])})")
    return summary


if __name__ == "__main__":
    if not __package__:  # run as a file: make the repository root importable, as `python -m` does
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
