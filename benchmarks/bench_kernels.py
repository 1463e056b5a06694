"""Benchmark of kernels.prepare: what a pruned network gains from per-layer sparse kernels on this CPU.

Run ``python benchmarks/bench_kernels.py`` (about a minute on one core) or ``--quick`` (about 20 s);
``--json PATH`` also writes the figures as JSON; ``--threads N`` measures on N threads (default 1,
since the decision and the gain depend on the thread count). Nothing is hard-coded: every number
comes from this run.

1. **One 1024x1024 Linear, batch 32**, unstructured random masks (exact counts, uniform positions)
   at 50 / 75 / 90 / 95 % sparsity. ``prepare`` chooses dense, CSR or BSR for it; the prepared
   module is then timed against the dense one.
2. **The demo network**: ``GhostNetTruncated(num_classes=10, in_channels=1, width=0.5)`` on 16x16
   images, batch 32, random unstructured masks on its prunable weights (every conv but the
   squeeze-excite ones) at 50 and 90 %; the whole prepared forward against the dense forward.

3. **Channel tickets on the demo network**: 25 / 50 / 75 % of its prunable channels removed
   (``ChannelStructure.prune``, layerwise, on its initial weights: speed does not depend on which
   channels go) and the network sliced (``channels.slice_model``); the sliced forward against the
   dense one, its safetensors file against the dense file. Limits beside them: the ratio of
   multiply-accumulates (a forward that cost nothing but arithmetic) and of parameters. Targets:
   at 50 %, >= 1.6x faster and <= 0.5x the file.

Each row prints dense ms, prepared ms, their ratio dense / prepared (> 1 is faster), the kernels
chosen and the physical limit 1 / density (a kernel that skipped every zero for free). Targets,
from the issue: never slower than dense at 50 % (ratio >= 0.95, leaving 5 % for timing noise) and
at least 2x faster than dense at 90 % on one thread.

Timing method: dense and prepared run interleaved in rounds (A then B, B then A in alternate
rounds) after a warm-up, each round timing a few calls with ``time.perf_counter`` under
``torch.no_grad()``; the figures are medians over rounds. ``prepare`` decides by the rule of
``routing_lottery.timing`` (dense unless clearly faster): a sparse form replaces a layer only if
it measured >= 1.15x dense on the medians, on the per-round pairs and on the fastest samples
alike, and the whole prepared network is then checked against the dense one (>= 1.05x, else every
layer goes back to dense). The "kernels chosen" column says when that whole-module check fell
back; the note of each figure gives the rule's three ratios for the whole network.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from routing_lottery.kernels import WHOLE_MODULE_NOTE, KernelChoice, prepare
from routing_lottery.models.ghostnet import GhostNetTruncated
from routing_lottery.pruning import prunable_names

RESULTS: list[dict[str, Any]] = []
LOWER_50 = 0.95  # "never slower than dense at 50 %", with 5 % for noise
LOWER_90 = 2.0  # ">= 2x faster than dense at 90 % on one thread"


# -- helpers ----------------------------------------------------------------------------------
def interleaved(variants: dict[str, Callable[[], Any]], rounds: int, inner: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each variant, measured in alternating-order rounds."""
    names = list(variants)
    with torch.no_grad():
        for _ in range(warmup):
            for name in names:
                variants[name]()
        samples: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                fn = variants[name]
                start = time.perf_counter()
                for _ in range(inner):
                    fn()
                samples[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(s) for name, s in samples.items()}


def target_for(sparsity: float) -> float | None:
    return {0.5: LOWER_50, 0.9: LOWER_90}.get(round(sparsity, 2))


def report(name: str, ratio: float, target: float | None, detail: dict[str, Any], note: str = "") -> None:
    """Print one dense/prepared ratio next to its target (higher is better) and keep it for the summary."""
    verdict = "" if target is None else ("PASS" if ratio >= target else "FAIL")
    target_text = "reference" if target is None else f"target >= {target:g}x"
    print(f"  {name}: {ratio:.2f}x ({target_text})  {verdict}{'  ' + note if note else ''}", flush=True)
    RESULTS.append({"name": name, "ratio": round(ratio, 4), "target": target,
                    "pass": None if target is None else ratio >= target, **detail})


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def random_masks_(model: nn.Module, names: list[str], sparsity: float, gen: torch.Generator) -> float:
    """Zero exactly round(sparsity * numel) uniformly chosen entries of each named tensor; the
    resulting density over all of them."""
    params = dict(model.named_parameters())
    kept = total = 0
    with torch.no_grad():
        for n in names:
            p = params[n]
            keep = torch.zeros(p.numel(), dtype=torch.bool)
            keep[torch.randperm(p.numel(), generator=gen)[: round((1 - sparsity) * p.numel())]] = True
            p.mul_(keep.reshape(p.shape).to(p.dtype))
            kept += int(keep.sum())
            total += p.numel()
    return kept / total


def kernel_summary(choices: list[KernelChoice]) -> str:
    """'csr 3, bsr 8x8 1, dense 20 of 24' style count of what prepare chose, and whether its
    whole-module check put every layer back to dense."""
    counts = collections.Counter(c.kernel if c.block is None else f"{c.kernel} {c.block[0]}x{c.block[1]}"
                                 for c in choices)
    order = sorted(counts, key=lambda k: (k == "dense", k))
    summary = ", ".join(f"{k} {counts[k]}" for k in order) + f" (of {len(choices)} layers)"
    if any(whole_module_fell_back(c) for c in choices):
        summary += "; whole-module check: not faster than dense, all dense"
    return summary


def whole_module_fell_back(choice: KernelChoice) -> bool:
    """Whether prepare kept this layer sparse alone but put it back because the whole network was not faster."""
    return WHOLE_MODULE_NOTE in choice.note and "every layer left dense" in choice.note


def whole_module_note(choices: list[KernelChoice]) -> str:
    """The whole-module check's own words from prepare's notes ('' when no layer went sparse)."""
    for c in choices:
        if WHOLE_MODULE_NOTE in c.note:
            return c.note[c.note.index(WHOLE_MODULE_NOTE):]
    return ""


def header() -> None:
    print(f"  {'sparsity':>8}  {'dense ms':>9}  {'prepared ms':>11}  {'dense/prep':>10}  {'limit 1/d':>9}  "
          f"{'target':>9}  {'prepare s':>9}  kernels chosen")


def row(sparsity: float, dense_s: float, prepared_s: float, density: float, prepare_s: float, kernels: str) -> None:
    target = target_for(sparsity)
    target_text = "-" if target is None else f">= {target:g}x"
    print(f"  {sparsity:>8.0%}  {ms(dense_s):>9}  {ms(prepared_s):>11}  {dense_s / prepared_s:>9.2f}x  "
          f"{1 / density:>8.2f}x  {target_text:>9}  {prepare_s:>9.1f}  {kernels}", flush=True)


# -- 1. one large Linear ------------------------------------------------------------------------
def bench_linear(quick: bool, threads: int) -> None:
    print("\n[1] Linear 1024x1024, batch 32, unstructured random masks", flush=True)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 1024, generator=gen)
    repeats, (rounds, inner, warmup) = (7, (25, 10, 5)) if quick else (20, (60, 20, 10))
    header()
    rows = []
    for sparsity in (0.5, 0.75, 0.9, 0.95):
        torch.manual_seed(0)
        dense = nn.Sequential(nn.Linear(1024, 1024)).eval()
        density = random_masks_(dense, ["0.weight"], sparsity, gen)
        start = time.perf_counter()
        prepared, choices = prepare(dense, x, repeats=repeats, threads=threads)
        prepare_s = time.perf_counter() - start
        t = interleaved({"dense": lambda: dense(x), "prepared": lambda: prepared(x)}, rounds, inner, warmup)
        (choice,) = choices
        row(sparsity, t["dense"], t["prepared"], density, prepare_s, kernel_summary(choices))
        rows.append((sparsity, t, density, choice, prepare_s))
    for sparsity, t, density, choice, prepare_s in rows:
        report(f"Linear 1024x1024 @ {sparsity:.0%}: dense / prepared", t["dense"] / t["prepared"],
               target_for(sparsity),
               {"section": "linear", "sparsity": sparsity, "density": density, "dense_s": t["dense"],
                "prepared_s": t["prepared"], "limit": 1 / density, "prepare_s": prepare_s,
                "choice": choice.to_dict()},
               note=(f"{choice.kernel}; prepare measured {choice.speedup:.2f}x on the layer" if choice.kernel != "dense"
                     else f"dense kept ({choice.note}): prepared and dense are the same layer, so this ratio is "
                          f"timing noise"))


# -- 2. the demo network --------------------------------------------------------------------------
def bench_ghostnet(quick: bool, threads: int) -> None:
    print("\n[2] GhostNetTruncated (w0.5, 1 channel, 10 classes), 16x16, batch 32, random masks on prunable weights",
          flush=True)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(32, 1, 16, 16, generator=gen)
    repeats, (rounds, inner, warmup) = (5, (20, 3, 3)) if quick else (20, (40, 5, 5))
    header()
    rows = []
    for sparsity in (0.5, 0.9):
        torch.manual_seed(0)
        dense = GhostNetTruncated(num_classes=10, in_channels=1, width=0.5).eval()
        names = prunable_names(dense)
        density = random_masks_(dense, names, sparsity, gen)
        start = time.perf_counter()
        prepared, choices = prepare(dense, x, repeats=repeats, threads=threads)
        prepare_s = time.perf_counter() - start
        with torch.no_grad():
            err = float((prepared(x) - dense(x)).abs().max())
        t = interleaved({"dense": lambda: dense(x), "prepared": lambda: prepared(x)}, rounds, inner, warmup)
        row(sparsity, t["dense"], t["prepared"], density, prepare_s, kernel_summary(choices))
        rows.append((sparsity, t, density, choices, prepare_s, err, len(names)))
    for sparsity, t, density, choices, prepare_s, err, masked in rows:
        sparse = [c for c in choices if c.kernel != "dense"]
        saved = sum(c.dense_seconds - c.chosen_seconds for c in sparse if c.dense_seconds and c.chosen_seconds)
        measured = sum(c.dense_seconds for c in choices if c.dense_seconds)
        ceiling = t["dense"] / max(t["dense"] - measured, 1e-9)
        whole = whole_module_note(choices)
        report(f"GhostNet w0.5 @ {sparsity:.0%}: dense / prepared", t["dense"] / t["prepared"], target_for(sparsity),
               {"section": "ghostnet", "sparsity": sparsity, "density": density, "dense_s": t["dense"],
                "prepared_s": t["prepared"], "limit": 1 / density, "prepare_s": prepare_s, "max_abs_err": err,
                "masked_tensors": masked, "pruned_layers_s": measured, "saved_s": saved, "ceiling": ceiling,
                "whole_module_check": whole, "choices": [c.to_dict() for c in choices]},
               note=f"{len(sparse)} of {len(choices)} layers sparse, saving {saved * 1e3:.2f} ms of the "
                    f"{measured * 1e3:.2f} ms its pruned layers take alone (prepare's timings); even at zero cost "
                    f"for those layers the ratio would be <= {ceiling:.1f}x; max |diff| {err:.1e}"
                    + (f"; {whole}" if whole else ""))


# -- 3. channel tickets, sliced ------------------------------------------------------------------
CHANNEL_SPEED, CHANNEL_SIZE = 1.6, 0.5  # ">= 1.6x faster than dense and <= 0.5x its file size" at 50 % of channels


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict as one safetensors file (what an export writes)."""
    from safetensors.torch import save

    return len(save({n: v.detach().contiguous() for n, v in model.state_dict().items()}))


def bench_channels(quick: bool, threads: int) -> None:
    print("\n[3] channel tickets: GhostNetTruncated sliced (batch 32): the demo network (w0.5, 1x16x16) at 25 / 50 / 75 "
          "% of its channels, the full-scale one (w1.0, 3x32x32) at 50 %", flush=True)
    rounds, inner, warmup = (20, 3, 3) if quick else (40, 5, 5)
    print(f"  {'network':>9}  {'channels':>8}  {'dense ms':>9}  {'sliced ms':>9}  {'speed-up':>8}  {'MAC limit':>9}  "
          f"{'file':>6}  {'params':>6}  groups (channels)")
    for label, width, shape, levels in (("demo", 0.5, (1, 16, 16), (0.25, 0.5, 0.75)), ("full", 1.0, (3, 32, 32), (0.5,))):
        for sparsity in levels:
            channel_row(label, width, shape, sparsity, (rounds, inner, warmup))


def channel_row(label: str, width: float, shape: tuple[int, int, int], sparsity: float,
                timing: tuple[int, int, int]) -> None:
    """One sliced network against its dense one: speed, multiply-accumulates, file and parameters."""
    from routing_lottery.channels import ChannelStructure, slice_model

    x = torch.randn(32, *shape, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    dense = GhostNetTruncated(num_classes=10, in_channels=shape[0], width=width).eval()
    structure = ChannelStructure.trace(dense, x[:2], prunable_names(dense))
    mask = structure.prune(dict(dense.named_parameters()), structure.ones(), round(sparsity * structure.total),
                           "layerwise")
    with torch.no_grad():
        for n, p in dense.named_parameters():
            if n in mask:
                p.mul_(mask[n].to(p.dtype))
        sliced = slice_model(dense, structure, structure.channels(mask), x[:2])
        err = float((sliced(x) - dense(x)).abs().max())
    limit = conv_macs(dense, x) / conv_macs(sliced, x)
    t = interleaved({"dense": lambda: dense(x), "sliced": lambda: sliced(x)}, *timing)
    size = state_bytes(sliced) / state_bytes(dense)
    params = sum(p.numel() for p in sliced.parameters()) / sum(p.numel() for p in dense.parameters())
    print(f"  {label:>9}  {sparsity:>8.0%}  {ms(t['dense']):>9}  {ms(t['sliced']):>9}  {t['dense'] / t['sliced']:>7.2f}x  "
          f"{limit:>8.2f}x  {size:>5.2f}x  {params:>5.2f}x  {len(structure.groups)} ({structure.total})", flush=True)
    detail = {"section": "channels", "network": label, "sparsity": sparsity, "dense_s": t["dense"],
              "sliced_s": t["sliced"], "file_ratio": size, "parameter_ratio": params, "max_abs_err": err}
    target = CHANNEL_SPEED if sparsity == 0.5 and label == "demo" else None
    report(f"channel ticket, {label} @ {sparsity:.0%} of channels: dense / sliced", t["dense"] / t["sliced"], target,
           {**detail, "limit": limit}, note=f"multiply-accumulates {limit:.2f}x fewer; max |diff| {err:.1e}")
    if sparsity == 0.5 and label == "demo":
        # Where the time goes: oneDNN's convolution costs about the same per call whatever the channel
        # count at these sizes; torch's plain kernels scale with the arithmetic (and are slower).
        torch.backends.mkldnn.enabled = False
        try:
            plain = interleaved({"dense": lambda: dense(x), "sliced": lambda: sliced(x)}, *timing)
        finally:
            torch.backends.mkldnn.enabled = True
        print(f"  {'(no oneDNN)':>9}  {sparsity:>8.0%}  {ms(plain['dense']):>9}  {ms(plain['sliced']):>9}  "
              f"{plain['dense'] / plain['sliced']:>7.2f}x  {limit:>8.2f}x   torch's plain convolution kernels", flush=True)
        report(f"channel ticket, demo @ 50%, plain kernels (no oneDNN): dense / sliced", plain["dense"] / plain["sliced"],
               None, {**detail, "limit": limit, "dense_s": plain["dense"], "sliced_s": plain["sliced"]},
               note=f"the sliced network on torch's plain kernels: {ms(plain['sliced'])} ms against "
                    f"{ms(t['sliced'])} ms with oneDNN")
        passed = size <= CHANNEL_SIZE
        RESULTS.append({"name": "channel ticket, demo @ 50% of channels: file / dense file", "ratio": round(size, 4),
                        **detail, "target": CHANNEL_SIZE, "pass": passed, "limit": params, "lower": True})
        print(f"  channel ticket, demo @ 50% of channels: file {size:.2f}x the dense file, parameters {params:.2f}x "
              f"(target <= {CHANNEL_SIZE}x)  {'PASS' if passed else 'FAIL'}", flush=True)


def conv_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of the model's convolutions and linear layers on ``x`` (forward hooks)."""
    total = [0]

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            per = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total[0] += output.numel() * per
        elif isinstance(module, nn.Linear):
            total[0] += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total[0]


# -- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and rounds (~20 s)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for measuring and timing (default 1)")
    parser.add_argument("--only", nargs="*", choices=["linear", "ghostnet", "channels"], help="run only these sections")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"kernels.prepare benchmark ({'quick' if args.quick else 'full'}): torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")
    failed = False
    for name, fn in {"linear": bench_linear, "ghostnet": bench_ghostnet, "channels": bench_channels}.items():
        if args.only is None or name in args.only:
            try:
                fn(args.quick, args.threads)
            except Exception as err:  # keep the other section's figures and the summary
                traceback.print_exc()
                RESULTS.append({"name": f"section {name!r}", "skipped": f"error: {type(err).__name__}: {err}"})
                failed = True
    elapsed = time.perf_counter() - start

    print(f"\nsummary ({elapsed:.0f} s; ratio = dense time / prepared time, higher is faster)")
    width = max(len(r["name"]) for r in RESULTS)
    print(f"  {'figure':<{width}}  {'ratio':>7}  {'limit':>7}  {'target':>9}  result")
    for r in RESULTS:
        if "skipped" in r:
            print(f"  {r['name']:<{width}}  {'-':>7}  {'':>7}  {'':>9}  SKIPPED ({r['skipped']})")
            continue
        target = "-" if r["target"] is None else f"{'<=' if r.get('lower') else '>='} {r['target']:g}x"
        verdict = "ref" if r["pass"] is None else ("PASS" if r["pass"] else "FAIL")
        print(f"  {r['name']:<{width}}  {r['ratio']:>6.2f}x  {r['limit']:>6.2f}x  {target:>9}  {verdict}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"quick": args.quick, "seconds": elapsed, "torch": torch.__version__,
                                         "threads": torch.get_num_threads(), "results": RESULTS}, indent=2) + "\n")
        print(f"  written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
