"""Benchmarks of routing-lottery: what RTL costs next to the dense / single-model alternative.

Run ``python benchmarks/bench_rtl.py`` (under 2 minutes on 2 CPU cores) or ``--quick`` (about
30 s); ``--json PATH`` also writes the summary as JSON. Every figure is a ratio printed next to
its target, and nothing is hard-coded: all numbers come from this run.

1. **Masked training step / dense step.** GhostNetTruncated (width 0.5, 1 input channel, 16x16,
   batch 64, 10 outputs): one ``training.masked_step`` (Adam) with a ~50 %-sparse mask --
   the step ``training.train`` takes, re-mask included -- against one plain dense step of an
   identical model on the same batch. Target <= 1.2x.
2. **Routed inference / dense inference.** ``RoutedModel(model, masks).eval()`` under
   ``torch.no_grad()`` on 1,000 images whose context ids are drawn at random from all K = 10,
   against the dense model's forward on the same batch, for the demo GhostNet and a small ViT
   (``nn.TransformerEncoder``), masks ~50 % sparse. The mixed batch runs three ways side by side:
   ``mixed_path="vmap"`` (all contexts in one vmapped call), ``"loop"`` (one context group at a
   time) and ``"auto"`` (the default: it times both on the first batch of a shape and keeps the
   faster, vmap only if clearly so; its choice and the time it took are printed). Target <= 1.2x
   for auto on GhostNet. The single-context routed forward is reported beside it for reference.
3. **Storage.** ``save_tickets`` of K = 10 masks on the full-scale GhostNet (width 1.0, 3 input
   channels, 125,832 prunable weights) at 25 / 50 / 75 % sparsity, masks drawn around the
   weight magnitudes so that contexts overlap the way IMP tickets do. ``tickets.safetensors``
   is compared with the bound ``4*|union| + K*ceil(n/8)`` per masked tensor plus the dense rest
   of the state_dict at its element size (target: <= 1.0 plus the safetensors header); beside it,
   how many times more K separate IMP models would need.
4. **Whole pipeline: RTL / single-model IMP** on the packaged digits config (methods restricted
   to ``[rtl]`` and to ``[single_imp]``, fresh temporary run directories). Both see the same
   number of training samples by construction (a detector epoch is 2*|D_k| samples; the
   classifier trains twice the epochs). Target <= 1.5x on the whole wall time, which includes
   data loading, stage 1, stage 2, evaluation (RTL: K detector passes over the test set per
   level) and writing results/checkpoints; training-only time (evaluation and ticket saving
   subtracted) is reported beside it.
5. **Memory of joint retraining / dense training.** The section-1 network, K = 10 overlapping
   masks (~50 % sparse, drawn as in section 3), one joint-retraining epoch of a few Adam steps per
   context (``training.joint_retrain``) against dense training of the same network. Memory is
   counted, not sampled: bytes of the distinct tensor storages (deduplicated by ``data_ptr``) of
   the parameters plus every optimizer's state after the steps. Reported beside it, by the same
   counter, what the previous implementation held: K full Adam optimizers over all parameters.
   No target; the masks themselves are printed apart.

Timing method: sections 1 and 2 run their variants interleaved in rounds (A then B, B then A in
alternate rounds) after a warm-up, each round timing a few calls of each with
``time.perf_counter``; the figures are the medians over rounds, so machine noise and drift hit
both variants alike. Section 4 runs each pipeline twice, in the order rtl, single_imp,
single_imp, rtl, after an untimed warm-up of the process, and reports the medians (of two runs,
i.e. their means). ``torch.set_num_threads(2)``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import statistics
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from routing_lottery.io import INDEX_FILE, WEIGHTS_FILE, save_tickets
from routing_lottery.masks import MaskSet
from routing_lottery.models.ghostnet import GhostNetTruncated
from routing_lottery import training
from routing_lottery.pruning import prunable_names
from routing_lottery.routed import RoutedModel, masked_forward

K = 10
RESULTS: list[dict[str, Any]] = []


# -- helpers ----------------------------------------------------------------------------------
def interleaved(variants: dict[str, Callable[[], Any]], rounds: int, inner: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each variant, measured in alternating-order rounds."""
    names = list(variants)
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


def report(name: str, ratio: float, target: float | None, detail: dict[str, Any], note: str = "",
           digits: int = 2, target_text: str | None = None) -> None:
    """Print one ratio next to its target and remember it for the summary."""
    verdict = "" if target is None else ("PASS" if ratio <= target else "FAIL")
    if target_text is None:
        target_text = "reference" if target is None else f"target <= {target:g}x"
    print(f"  {name}: {ratio:.{digits}f}x ({target_text})  {verdict}{'  ' + note if note else ''}", flush=True)
    RESULTS.append({"name": name, "ratio": round(ratio, 4), "target": target, "target_text": target_text,
                    "digits": digits, "pass": None if target is None else ratio <= target, **detail})


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def random_mask(params: dict[str, torch.Tensor], names: list[str], keep: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Per tensor, exactly round(keep * numel) positions kept, chosen uniformly."""
    out = {}
    for n in names:
        p = params[n]
        flat = torch.zeros(p.numel(), dtype=torch.bool)
        flat[torch.randperm(p.numel(), generator=gen)[:round(keep * p.numel())]] = True
        out[n] = flat.reshape(p.shape)
    return out


def small_model(seed: int) -> GhostNetTruncated:
    torch.manual_seed(seed)
    return GhostNetTruncated(num_classes=K, in_channels=1, width=0.5)


# -- 1. masked vs dense training step -------------------------------------------------------------
def bench_train_step(quick: bool) -> None:
    print("\n[1] training step: masked (~50% sparse) vs dense -- GhostNet w0.5, 1x16x16, batch 64", flush=True)
    gen = torch.Generator().manual_seed(1)
    dense_model = small_model(0).train()
    masked_model = copy.deepcopy(dense_model).train()
    names = prunable_names(masked_model)
    params = dict(masked_model.named_parameters())
    fmask = {n: m.float() for n, m in random_mask(params, names, 0.5, gen).items()}
    with torch.no_grad():
        for n, m in fmask.items():
            params[n].mul_(m)
    x = torch.randn(64, 1, 16, 16, generator=gen)
    y = torch.randint(0, K, (64,), generator=gen)
    opt_dense = torch.optim.Adam(dense_model.parameters(), lr=1e-4)
    opt_masked = torch.optim.Adam(masked_model.parameters(), lr=1e-4)

    def dense_step() -> None:
        loss = F.cross_entropy(dense_model(x), y)
        opt_dense.zero_grad(set_to_none=True)
        loss.backward()
        opt_dense.step()

    def masked_step() -> None:  # what training.train does per batch when given a mask
        training.masked_step(masked_model, params, fmask, opt_masked, F.cross_entropy, x, y)

    rounds, inner, warmup = (12, 2, 4) if quick else (40, 3, 8)
    t = interleaved({"masked": masked_step, "dense": dense_step}, rounds, inner, warmup)
    kept = sum(int(m.sum()) for m in fmask.values()) / sum(m.numel() for m in fmask.values())
    print(f"  dense step {ms(t['dense'])}, masked step {ms(t['masked'])} "
          f"(mask keeps {kept:.1%} of {sum(m.numel() for m in fmask.values()):,} prunable weights; "
          f"median of {rounds} interleaved rounds x {inner} steps)")
    report("masked step / dense step", t["masked"] / t["dense"], 1.2,
           {"dense_s": t["dense"], "masked_s": t["masked"], "rounds": rounds, "inner": inner})


# -- 2. routed vs dense inference -------------------------------------------------------------------
class SmallViT(torch.nn.Module):
    """A small vision transformer on 1x16x16 images (4x4 patches, 2 layers of width 32): the kind of
    model whose mixed batches ran faster one context group at a time than vmapped."""

    def __init__(self, classes: int = K, width: int = 32) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(16, width)
        layer = torch.nn.TransformerEncoderLayer(width, 4, 2 * width, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = x.unfold(2, 4, 4).unfold(3, 4, 4).reshape(x.shape[0], 16, 16)  # (N, 16 patches, 4*4 pixels)
        return self.head(self.encoder(self.embed(patches)).mean(1))


def mixed_models() -> list[tuple[str, torch.nn.Module, list[str]]]:
    """(label, model in eval mode, names of its masked tensors) for section 2."""
    ghost = small_model(0).eval()
    torch.manual_seed(0)
    vit = SmallViT().eval()
    vit_names = [n for n, p in vit.named_parameters() if n.endswith("weight") and p.dim() == 2]
    return [("GhostNet w0.5", ghost, prunable_names(ghost)), ("small ViT", vit, vit_names)]


def bench_inference(quick: bool) -> None:
    print("\n[2] inference: RoutedModel on a batch mixing all K=10 contexts vs dense, 1x16x16 images; both mixed-batch "
          "paths (vmap, loop) and the one mixed_path='auto' measured and chose", flush=True)
    for label, model, names in mixed_models():
        gen = torch.Generator().manual_seed(2)
        params = dict(model.named_parameters())
        masks = MaskSet.from_tickets([random_mask(params, names, 0.5, gen) for _ in range(K)])
        routed = {path: RoutedModel(model, masks, mixed_path=path).eval() for path in ("auto", "vmap", "loop")}
        # The 1,000-image batch carries the target; in the full run a 10,000-image batch (about
        # 1,000 rows per context) shows how much of the gap is per-context sub-batch size.
        for batch, (rounds, inner, warmup) in ([(1000, (8, 1, 2))] if quick
                                               else [(1000, (24, 2, 4)), (10000, (6, 1, 1))]):
            mixed_row(label, model, routed, batch, (rounds, inner, warmup), gen)


def mixed_row(label: str, model: torch.nn.Module, routed: dict[str, RoutedModel], batch: int,
              timing: tuple[int, int, int], gen: torch.Generator) -> None:
    """One model and batch size: dense, the routed paths, a single context and the dense model per group."""
    x = torch.randn(batch, 1, 16, 16, generator=gen)
    context = torch.randint(0, K, (batch,), generator=gen)
    groups = [(context == k).nonzero(as_tuple=True)[0] for k in range(K)]

    def dense_grouped() -> torch.Tensor:  # the dense model on the same per-context groups, no masks
        out = torch.empty(batch, K)
        for rows in groups:
            out[rows] = model(x[rows])
        return out

    with torch.no_grad():
        start = time.perf_counter()
        routed["auto"](x, context)  # the first batch of its shape: auto measures both paths here
        choose_s = time.perf_counter() - start
        (decision,) = routed["auto"].path_decisions.values() or [None]
        t = interleaved({"dense": lambda: model(x), "auto": lambda: routed["auto"](x, context),
                         "vmap": lambda: routed["vmap"](x, context), "loop": lambda: routed["loop"](x, context),
                         "single": lambda: routed["loop"](x, 3), "dense_grouped": dense_grouped}, *timing)
    rounds, inner, _ = timing
    chosen = "loop (vmap not eligible)" if decision is None else decision.describe()
    print(f"  {label}, batch {batch:,} (~{batch // K:,} rows per context): dense {ms(t['dense'])}; mixed: "
          f"vmap {ms(t['vmap'])} ({t['vmap'] / t['dense']:.2f}x), loop {ms(t['loop'])} "
          f"({t['loop'] / t['dense']:.2f}x), auto {ms(t['auto'])} ({t['auto'] / t['dense']:.2f}x); single context "
          f"{ms(t['single'])}; dense per group {ms(t['dense_grouped'])} (median of {rounds} interleaved rounds x "
          f"{inner})", flush=True)
    print(f"    auto chose {chosen}, measuring for {choose_s * 1e3:.0f} ms on the first batch", flush=True)
    detail = {"model": label, "batch": batch, "dense_s": t["dense"], "auto_s": t["auto"], "vmap_s": t["vmap"],
              "loop_s": t["loop"], "routed_single_s": t["single"], "dense_grouped_s": t["dense_grouped"],
              "auto_path": None if decision is None else decision.path, "auto_choose_s": choose_s,
              "rounds": rounds, "inner": inner}
    name = f"{label}, {batch:,} images"
    target = 1.2 if batch == 1000 and label.startswith("GhostNet") else None
    report(f"routed mixed, auto / dense ({name})", t["auto"] / t["dense"], target, detail,
           note="the default, mixed_path='auto'")
    report(f"routed mixed, vmap / dense ({name})", t["vmap"] / t["dense"], None, detail)
    report(f"routed mixed, loop / dense ({name})", t["loop"] / t["dense"], None, detail)
    report(f"routed single-context / dense ({name})", t["single"] / t["dense"], None, detail)
    report(f"dense per context group / dense ({name})", t["dense_grouped"] / t["dense"], None, detail,
           note="the cost of splitting the batch alone, without masks")


# -- 3. storage -------------------------------------------------------------------------------------
def overlapping_masks(params: dict[str, torch.Tensor], names: list[str], sparsity: float,
                      gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """K global-magnitude masks, each ranking |w| times its own log-normal noise (overlapping tickets)."""
    flat = torch.cat([params[n].detach().abs().reshape(-1) for n in names])
    keep = flat.numel() - round(sparsity * flat.numel())
    tickets = []
    for _ in range(K):
        score = flat * torch.exp(0.75 * torch.randn(flat.shape, generator=gen))
        kept = torch.zeros(flat.numel(), dtype=torch.bool)
        kept[torch.topk(score, keep).indices] = True
        mask, offset = {}, 0
        for n in names:
            numel = params[n].numel()
            mask[n] = kept[offset:offset + numel].reshape(params[n].shape)
            offset += numel
        tickets.append(mask)
    return tickets


def bench_storage(quick: bool) -> None:
    print("\n[3] storage: save_tickets of K=10 masks on the full-scale GhostNet (w1.0, 3 channels)", flush=True)
    torch.manual_seed(3)
    model = GhostNetTruncated(num_classes=K, in_channels=3, width=1.0)
    names = prunable_names(model)
    params = dict(model.named_parameters())
    state = model.state_dict()
    total = sum(params[n].numel() for n in names)
    dense_rest = sum(v.numel() * v.element_size() for k, v in state.items() if k not in set(names))
    dense_rest_4 = 4 * sum(v.numel() for k, v in state.items() if k not in set(names))
    bits = sum(K * math.ceil(params[n].numel() / 8) for n in names)
    print(f"  {total:,} prunable weights in {len(names)} tensors; dense rest of the state_dict "
          f"{dense_rest:,} bytes; K masks bit-packed {bits:,} bytes")
    gen = torch.Generator().manual_seed(3)
    for sparsity in (0.25, 0.5, 0.75):
        masks = MaskSet.from_tickets(overlapping_masks(params, names, sparsity, gen))
        union = masks.union()
        bound = sum(4 * int(union[n].sum()) for n in names) + bits + dense_rest
        counts = masks.counts()
        imp = 4 * sum(counts) + K * dense_rest_4 + K * sum(math.ceil(params[n].numel() / 8) for n in names)
        jac = masks.jaccard_matrix()
        mean_jaccard = float((jac.sum() - jac.diagonal().sum()) / (K * (K - 1)))
        with tempfile.TemporaryDirectory() as tmp:
            save_tickets(tmp, model, masks)
            size = (Path(tmp) / WEIGHTS_FILE).stat().st_size
            index_size = (Path(tmp) / INDEX_FILE).stat().st_size
            with open(Path(tmp) / WEIGHTS_FILE, "rb") as f:
                header = 8 + struct.unpack("<Q", f.read(8))[0]
        payload = size - header
        print(f"  sparsity {sparsity:.0%}: union {masks.union_count():,} of {total:,} weights "
              f"(each context keeps {counts[0]:,}; mean pairwise Jaccard {mean_jaccard:.2f}); "
              f"file {size:,} B = payload {payload:,} B + header {header:,} B; bound {bound:,} B; "
              f"tickets.json {index_size:,} B")
        # Target: the payload may not exceed the bound; only the safetensors header (names,
        # dtypes, shapes, offsets of every entry) comes on top of it.
        report(f"tickets.safetensors / bound @ {sparsity:.0%}", size / bound, 1.0 + header / bound,
               {"file_bytes": size, "header_bytes": header, "payload_bytes": payload, "bound_bytes": bound,
                "index_bytes": index_size, "union": masks.union_count(), "kept_per_context": counts,
                "mean_jaccard": mean_jaccard},
               digits=4, target_text=f"target <= 1.0x + {header:,} B header = {1.0 + header / bound:.4f}x",
               note=f"payload/bound {payload / bound:.4f}")
        report(f"K separate IMP models / tickets.safetensors @ {sparsity:.0%}", imp / size, None,
               {"imp_bytes": imp, "file_bytes": size},
               note=f"(4*sum nonzeros + K*dense + K*ceil(n/8) = {imp:,} B)")


# -- 4. whole pipeline --------------------------------------------------------------------------------
def data_available() -> bool:
    return all(importlib.util.find_spec(m) is not None
               for m in ("routing_lottery.data.digits", "routing_lottery.run"))


def pipeline_config(method: str, quick: bool):
    from routing_lottery.config import config_from_dict

    raw = yaml.safe_load((Path(importlib.util.find_spec("routing_lottery").origin).parent
                          / "configs" / "digits.yaml").read_text())
    overrides: dict[str, Any] = {"methods": [method], "device": "cpu"}
    if quick:
        overrides["training"] = {"imp_epochs": 1, "epochs": 1}
        overrides["data"] = {"train_per_class": 60}
        overrides["pruning"] = {"sparsities": [0.5], "step": 0.25}
    else:
        overrides["training"] = {"imp_epochs": 1, "epochs": 2}
    return config_from_dict(raw, overrides=overrides)


def timed(fn: Callable[..., Any], timers: dict[str, float], key: str) -> Callable[..., Any]:
    """``fn``, adding the seconds each call takes to ``timers[key]``."""
    def call(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            timers[key] += time.perf_counter() - start
    return call


def time_pipeline(method: str, quick: bool) -> dict[str, float]:
    """Wall time of one fresh run, with evaluation and ticket saving timed apart."""
    import routing_lottery.tickets as tickets
    from routing_lottery.run import make_runner

    config = pipeline_config(method, quick)
    timers = {"eval_s": 0.0, "save_s": 0.0}
    real_save = tickets.save_tickets

    with tempfile.TemporaryDirectory() as tmp:
        tickets.save_tickets = timed(real_save, timers, "save_s")
        try:
            start = time.perf_counter()
            exp = make_runner(config, tmp)
            setup = time.perf_counter() - start
            exp.task.logits = timed(exp.task.logits, timers, "eval_s")
            steps = exp.planned_steps()
            exp.run_all()
            total = time.perf_counter() - start
        finally:
            tickets.save_tickets = real_save
    return {"total_s": total, "setup_s": setup, "steps": steps,
            "train_s": total - setup - timers["eval_s"] - timers["save_s"], **timers}


def warm_up_process() -> None:
    """Pay one-time costs (lazy imports torch pulls in on the first optimizer, kernel set-up) untimed.

    Without it, whichever pipeline runs first in a fresh process is charged about a second and a
    half for importing ``torch._dynamo`` when its first Adam optimizer is built.
    """
    model = small_model(0).train()
    names = prunable_names(model)
    fmask = {n: torch.ones_like(p) for n, p in model.named_parameters() if n in set(names)}
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(8, 1, 16, 16)
    loss = F.binary_cross_entropy_with_logits(masked_forward(model, fmask, x)[:, 0], torch.ones(8))
    loss.backward()
    opt.step()
    with torch.no_grad():
        RoutedModel(model, MaskSet.from_tickets([{n: m.bool() for n, m in fmask.items()}] * 2)).eval()(x, 1)


def bench_pipeline(quick: bool) -> None:
    print("\n[4] whole pipeline on digits: methods [rtl] vs [single_imp], same sample budget", flush=True)
    if not data_available():
        print("  SKIPPED: routing_lottery.data.digits / run are not importable yet")
        RESULTS.append({"name": "rtl pipeline / single_imp pipeline", "skipped": "data loaders missing"})
        return
    cfg = pipeline_config("rtl", quick)
    print(f"  config: width {cfg.model.options.get('width')}, image {cfg.data.image_size}px, train_per_class "
          f"{cfg.data.train_per_class}, sparsities {list(cfg.pruning.sparsities)}, step {cfg.pruning.step}, "
          f"imp_epochs {cfg.training.imp_epochs}, epochs {cfg.training.epochs}")
    warm_up_process()
    order = ["rtl", "single_imp", "single_imp", "rtl"]  # alternated, so drift hits both alike
    runs: dict[str, list[dict[str, float]]] = {"rtl": [], "single_imp": []}
    for method in order:
        runs[method].append(time_pipeline(method, quick))
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}
    for m in ("rtl", "single_imp"):
        r = med[m]
        print(f"  {m:>10}: total {r['total_s']:.2f} s = setup {r['setup_s']:.2f} s + training "
              f"{r['train_s']:.2f} s + evaluation {r['eval_s']:.2f} s + save_tickets "
              f"{r['save_s']:.2f} s; {int(r['steps'])} optimizer steps (median of {len(runs[m])} runs)")
    rtl, single = med["rtl"], med["single_imp"]
    report("rtl pipeline / single_imp pipeline (wall, all included)", rtl["total_s"] / single["total_s"], 1.5,
           {"rtl": rtl, "single_imp": single, "runs": len(runs["rtl"])},
           note="paper's implementation: about 8x")
    report("rtl / single_imp, training only (setup, eval, save excluded)", rtl["train_s"] / single["train_s"], None,
           {"rtl_train_s": rtl["train_s"], "single_train_s": single["train_s"]})
    report("rtl / single_imp, per optimizer step", (rtl["train_s"] / rtl["steps"]) / (single["train_s"] / single["steps"]),
           None, {"rtl_steps": rtl["steps"], "single_steps": single["steps"]})


# -- 5. memory of joint retraining ------------------------------------------------------------------
def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``: a view or a shared tensor counts once."""
    storages = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def optimizer_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in opt.state.values() for v in state.values() if torch.is_tensor(v)]


def cross_entropy_stream(k: int, batches: int, gen: torch.Generator) -> training.Stream:
    data = [(torch.randn(16, 1, 16, 16, generator=gen), torch.randint(0, K, (16,), generator=gen))
            for _ in range(batches)]
    return training.Stream(f"context_{k}", lambda g: data, F.cross_entropy, batches)


def bench_joint_memory(quick: bool) -> None:
    print("\n[5] memory: joint retraining with K=10 masks (~50% sparse) vs dense training -- GhostNet w0.5", flush=True)
    gen = torch.Generator().manual_seed(5)
    batches = 1 if quick else 3
    streams = [cross_entropy_stream(k, batches, gen) for k in range(K)]
    dense = small_model(0).train()
    names = prunable_names(dense)
    masks = MaskSet.from_tickets(overlapping_masks(dict(dense.named_parameters()), names, 0.5, gen))
    config = training.OptimizerConfig()

    opt = config.build(list(dense.parameters()))
    for x, y in (b for s in streams for b in s.epoch(gen)):
        training.masked_step(dense, {}, {}, opt, F.cross_entropy, x, y)
    dense_bytes = tensor_bytes([*dense.parameters(), *optimizer_tensors(opt)])

    joint = small_model(0)
    kept: list[training.SubnetworkOptimizer] = []
    training.joint_retrain(joint, training.snapshot(joint), masks, streams, 1, config, seed=5,
                           on_epoch=lambda epoch, opts: kept.extend(opts))
    joint_bytes = tensor_bytes([*joint.parameters(), *(t for o in kept for t in optimizer_tensors(o.optimizer))])

    # What the K full optimizers of the previous implementation held: each one's state over every
    # parameter after one masked step of its context.
    full = small_model(0).train()
    fulls = [config.build(list(full.parameters())) for _ in range(K)]
    full_params = dict(full.named_parameters())
    for k, opt_k in enumerate(fulls):
        fmask = {n: m.float() for n, m in masks[k].items()}
        training.masked_step(full, full_params, fmask, opt_k, F.cross_entropy, *streams[k].epoch(gen)[0])
    full_bytes = tensor_bytes([*full.parameters(), *(t for o in fulls for t in optimizer_tensors(o))])

    masked, total = masks.size(), sum(p.numel() for p in dense.parameters())
    density = sum(masks.counts()) / (K * masked)
    print(f"  {total:,} parameters ({masked:,} masked, mean mask density {density:.1%}); bytes of params + "
          f"optimizer state (Adam), distinct storages: dense {dense_bytes:,} B, joint {joint_bytes:,} B, "
          f"K full optimizers {full_bytes:,} B; {K * batches} joint steps")
    print(f"  masks held beside them (not in the ratios): now the MaskSet's bool masks, {K * masked:,} B; the "
          f"previous implementation also kept K float and K bool copies, {5 * K * masked:,} B")
    report("joint retraining state / dense training state (K=10)", joint_bytes / dense_bytes, None,
           {"dense_bytes": dense_bytes, "joint_bytes": joint_bytes, "full_copies_bytes": full_bytes,
            "full_copies_ratio": full_bytes / dense_bytes, "parameters": total, "masked": masked, "density": density},
           note=f"previous K full optimizers: {full_bytes / dense_bytes:.2f}x")


# -- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and a smaller pipeline (~30 s)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the summary as JSON")
    parser.add_argument("--only", nargs="*", choices=["step", "inference", "storage", "pipeline", "memory"],
                        help="run only these sections")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    start = time.perf_counter()
    print(f"routing-lottery benchmarks ({'quick' if args.quick else 'full'}): torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    sections = {"step": bench_train_step, "inference": bench_inference, "storage": bench_storage,
                "pipeline": bench_pipeline, "memory": bench_joint_memory}
    failed = False
    for name, fn in sections.items():
        if args.only is None or name in args.only:
            try:
                fn(args.quick)
            except Exception as err:  # keep the other sections' figures and the summary
                traceback.print_exc()
                RESULTS.append({"name": f"section {name!r}", "skipped": f"error: {type(err).__name__}: {err}"})
                failed = True
    elapsed = time.perf_counter() - start

    print(f"\nsummary ({elapsed:.0f} s)")
    width = max(len(r["name"]) for r in RESULTS)
    print(f"  {'figure':<{width}}  {'ratio':>8}  {'target':>10}  result")
    for r in RESULTS:
        if "skipped" in r:
            print(f"  {r['name']:<{width}}  {'-':>8}  {'':>10}  SKIPPED ({r['skipped']})")
            continue
        target = "-" if r["target"] is None else f"<= {r['target']:.{r['digits']}f}x"
        verdict = "ref" if r["pass"] is None else ("PASS" if r["pass"] else "FAIL")
        print(f"  {r['name']:<{width}}  {r['ratio']:>7.{r['digits']}f}x  {target:>10}  {verdict}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"quick": args.quick, "seconds": elapsed, "torch": torch.__version__,
                                         "threads": torch.get_num_threads(), "results": RESULTS}, indent=2) + "\n")
        print(f"  written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
