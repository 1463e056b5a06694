"""Serving a mixed-domain batch over one copy of an LM's weights: time and memory against dense.

Issue 25's targets, on a mid-size random Llama (SmolLM2's shape scaled down: grouped-query
attention, tied embeddings; built from a config, nothing downloaded): a batch of 8 x 256 tokens
from 4 domains, each domain's mask Wanda-like at 50 % sparsity (|W| times a per-domain input-feature
norm, top half per output row, so the masks overlap as real per-domain Wanda masks do), and

- time: the routed forward over the dense forward, per design (interleaved repeats, medians);
  also a short greedy ``generate`` with the KV cache, where each step has only 8 rows;
- memory: peak resident memory of a forward in a fresh process (the routed model's over the dense
  model's, each above the process's memory before the model was built), and the bytes the wrapper
  holds (parameters and buffers) over the dense model's.

Targets: time <= 1.3x dense, memory <= 1.25x dense. Run:

    OMP_NUM_THREADS=2 python benchmarks/bench_lm_serving.py [--repeats 7] [--quick]

``--smollm2 CACHE`` measures the real SmolLM2-135M from ``scripts/setup.sh lm``'s cache instead of
the random model (the same Wanda-like masks over its 210 block Linears; load about 30 s per process).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

THREADS = 2
DOMAINS = 4
BATCH, TOKENS = 8, 256
SPARSITY = 0.5
DOMAIN_SPREAD = 0.2
"""Log-normal spread of each domain's input-feature norms around the shared ones: it sets how much
the domains' masks overlap (about 0.85 Jaccard here, as measured on SmolLM2 in issue 25)."""


SMOLLM2: str | None = None
"""The cache ``--smollm2`` names: measure SmolLM2-135M instead of the random model."""


def build_model(quick: bool) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    if SMOLLM2 is not None:
        from routing_lottery.lm.model import load_smollm2

        return load_smollm2(SMOLLM2)[0]
    torch.manual_seed(0)
    hidden, layers = (128, 2) if quick else (256, 4)
    config = LlamaConfig(vocab_size=2048, hidden_size=hidden, intermediate_size=hidden * 5 // 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def wanda_like_masks(model: torch.nn.Module) -> Any:
    """One mask per domain: |W_ij| * a_kj, top half per output row (Wanda's comparison group)."""
    from routing_lottery.masks import MaskSet

    g = torch.Generator().manual_seed(1)
    stacked = {}
    for name, w in model.named_parameters():
        if ".layers." not in name or not name.endswith("proj.weight"):
            continue
        shared = torch.exp(torch.randn(w.shape[1], generator=g))  # feature norms common to all text
        per_domain = []
        for _ in range(DOMAINS):
            norms = shared * torch.exp(DOMAIN_SPREAD * torch.randn(w.shape[1], generator=g))
            score = w.detach().abs() * norms
            keep = int(w.shape[1] * (1 - SPARSITY))
            top = score.topk(keep, dim=1).indices
            per_domain.append(torch.zeros(w.shape, dtype=torch.bool).scatter_(1, top, True))
        stacked[name] = torch.stack(per_domain)
    return MaskSet(stacked, [f"domain{k}" for k in range(DOMAINS)])


def mean_jaccard(masks: Any) -> float:
    j = masks.jaccard_matrix()
    off = j[~torch.eye(len(masks), dtype=torch.bool)]
    return float(off.mean())


def inputs(vocab: int) -> tuple[torch.Tensor, list[int]]:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, vocab, (BATCH, TOKENS), generator=g)
    return ids, [r % DOMAINS for r in range(BATCH)]  # every domain in the batch, interleaved rows


def variants(quick: bool) -> tuple[dict[str, Any], dict[str, int]]:
    """name -> a forward(ids, domains) and generate(ids, domains); and name -> bytes held."""
    from routing_lottery.lm.serving import DESIGNS, MaskedCausalLM, dense_bytes

    dense = build_model(quick)
    masks = wanda_like_masks(dense)
    print(f"model: {sum(p.numel() for p in dense.parameters()) / 1e6:.2f} M parameters, "
          f"{masks.size() / 1e6:.2f} M masked; {DOMAINS} domains at {SPARSITY:.0%} sparsity, "
          f"mean Jaccard {mean_jaccard(masks):.3f}")
    out: dict[str, Any] = {"dense": (lambda ids, d: dense(input_ids=ids), lambda ids, d, **kw: dense.generate(ids, **kw))}
    held = {"dense": dense_bytes(dense)}
    for design in DESIGNS:
        routed = MaskedCausalLM(copy.deepcopy(dense), masks, design=design)
        out[design] = (lambda ids, d, r=routed: r(ids, d), lambda ids, d, r=routed, **kw: r.generate(ids, d, **kw))
        held[design] = routed.state_bytes()
    return out, held


def timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_interleaved(calls: dict[str, Any], repeats: int) -> dict[str, float]:
    """Median seconds per variant; each round runs all variants, in a rotated order."""
    names = list(calls)
    for name in names:  # warm-up, untimed
        calls[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            samples[name].append(timed(calls[name]))
    return {n: statistics.median(s) for n, s in samples.items()}


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_probe(variant: str, quick: bool) -> dict[str, float]:
    """In a fresh process: MiB above the post-import baseline, after building and at the forward's peak."""
    from routing_lottery.lm.serving import MaskedCausalLM

    torch.set_num_threads(THREADS)
    with torch.no_grad():  # load what the first model and forward load lazily, before the baseline
        from transformers import LlamaConfig, LlamaForCausalLM

        warm = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1))
        warm(input_ids=torch.ones(1, 4, dtype=torch.long))
        del warm
    gc.collect()
    base = rss_kib("VmRSS")
    model = build_model(quick)
    if variant != "dense":
        masks = wanda_like_masks(model)
        model = MaskedCausalLM(model, masks, design=variant)
        del masks  # the MaskSet's bool tensors are the caller's, not the server's
    gc.collect()
    held = rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    ids, domains = inputs(2048)
    with torch.no_grad():
        model(ids, domains) if variant != "dense" else model(input_ids=ids)
    return {"held_mib": (held - base) / 1024, "peak_mib": (rss_kib("VmHWM") - base) / 1024}


def run_probe(variant: str, quick: bool) -> dict[str, float]:
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS),
               # large blocks straight from mmap, so freed mask-building scratch leaves the RSS
               MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    cmd = [sys.executable, __file__, "--probe", variant] + (["--quick"] if quick else []) + (
        ["--smollm2", SMOLLM2] if SMOLLM2 is not None else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="a smaller model, for a smoke run")
    parser.add_argument("--smollm2", metavar="CACHE", help="measure SmolLM2-135M from this cache (scripts/setup.sh lm)")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global SMOLLM2
    SMOLLM2 = args.smollm2
    if args.probe:
        print(json.dumps(memory_probe(args.probe, args.quick)))
        return
    torch.set_num_threads(THREADS)
    calls, held = variants(args.quick)
    ids, domains = inputs(2048)
    prompt = ids[:, :32]
    with torch.no_grad():
        forward = time_interleaved({n: (lambda f=f: f[0](ids, domains)) for n, f in calls.items()}, args.repeats)
        decode = time_interleaved({n: (lambda f=f: f[1](prompt, domains, max_new_tokens=16, do_sample=False,
                                                        pad_token_id=0)) for n, f in calls.items()},
                                  max(3, args.repeats // 2))
    memory = {n: run_probe(n, args.quick) for n in calls}
    print(f"batch {BATCH} x {TOKENS} tokens, rows from {DOMAINS} domains interleaved; torch threads {THREADS}")
    print(f"{'':8} {'forward s':>10} {'x dense':>8} {'decode s':>9} {'x dense':>8} "
          f"{'held MiB':>9} {'x dense':>8} {'peak MiB':>9} {'x dense':>8} {'bytes x dense':>13}")
    for n in calls:
        print(f"{n:8} {forward[n]:10.3f} {forward[n] / forward['dense']:8.2f} {decode[n]:9.3f} "
              f"{decode[n] / decode['dense']:8.2f} {memory[n]['held_mib']:9.1f} "
              f"{memory[n]['held_mib'] / memory['dense']['held_mib']:8.2f} {memory[n]['peak_mib']:9.1f} "
              f"{memory[n]['peak_mib'] / memory['dense']['peak_mib']:8.2f} {held[n] / held['dense']:13.3f}")
    print("targets: forward <= 1.30x dense, peak memory <= 1.25x dense "
          "(decode: 16 greedy tokens from 32-token prompts, KV cache)")


if __name__ == "__main__":
    main()
