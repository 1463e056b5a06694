"""The pretrained-language-model experiment (``configs/lm.yaml``): one mask per text domain vs one shared mask.

One copy of a pretrained causal LM; every ``nn.Linear`` inside its blocks is masked. Compared on
every domain's held-out test sequences, at each pattern (``50%`` unstructured per output row, or
N:M such as ``2:4``):

- ``dense``: no pruning;  ``magnitude``: |W|, one mask for all domains (needs no data);
- ``shared``: one mask of the configured one-shot score (Wanda) from calibration sequences of all
  domains pooled, as many as one domain's own mask sees;
- ``own``: each domain's mask from its own calibration sequences, scored on every domain (the
  mask x domain matrix), and routed without an oracle by the configured routers;
- with ``retraining.steps_per_domain > 0``: ``own`` jointly retrained (Algorithm 2: the domains
  take turns, per-domain optimizer state at the mask's positions) as ``rtl``, and the shared mask
  fine-tuned on pooled data for the same number of steps as ``shared_ft``.

Each calibration draw takes other calibration sequences (the documents are split once, by
document). Every (draw, pattern) is one record in ``records/``, written atomically and stamped with
the settings that made it: a re-run resumes from the finished ones, and a record made under other
settings (say, another retraining budget) is recomputed, never mixed in. ``results.json`` holds the
mean and 95 % interval over draws; ``rows.json`` every measurement; figures beside them.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.nn import functional as F

from ..config import load_yaml
from ..errors import CheckpointError, ConfigError, brief
from ..fingerprint import fingerprint
from ..io import atomic_write_json, atomic_write_text, read_json
from ..lm import routing
from ..lm.data import TextDomains
from ..lm.evaluate import applied_mask, perplexity
from ..lm.model import load_causal_lm, masked_linear_names
from ..lm.retraining import finetune_shared, retrain_domains, save_domain_set
from ..lm.serving import MaskedCausalLM
from ..masks import MaskSet, jaccard
from ..plotting import save_png
from ..scores import compute_scores, input_norms, needs_activations, one_shot_mask, resolve_score
from ..settings import _deep_merge, apply_scale, build, plain_data
from ..statistics import mean_interval
from ..store import IDENTITY_VERSION, CheckpointDirectory
from ..tickets import model_identity
from .directory import resolve_device

__all__ = ["LMExperimentConfig", "is_lm_config", "load_lm_config", "run_lm_experiment", "summarize"]

DEFAULT_CACHE = "~/.cache/routing-lottery/lm"
ROUTERS = ("learned", "perplexity")
LAYER_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# -- configuration ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LMDataConfig:
    root: str | None = None  # the set-up cache (scripts/setup.sh lm); None: $RTL_LM_CACHE, else ~/.cache/routing-lottery/lm
    domains: tuple[str, ...] = ()  # () : every domain folder in root
    seq_len: int = 256  # tokens per sequence (documents joined with EOS, cut into chunks)
    calibration: int = 8  # calibration sequences per mask and draw (the shared mask gets as many, pooled)
    retraining: int = 16  # retraining sequences per domain (the shared fine-tuning pools them all)
    test: int = 4  # held-out test sequences per domain
    prompt_tokens: int = 64  # what a router sees of a test sequence: its first tokens
    split_seed: int = 0  # the by-document split into calibration / retraining / test

    def __post_init__(self) -> None:
        for key in ("seq_len", "calibration", "retraining", "test", "prompt_tokens"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"data.{key} must be a positive integer, got {value!r}")
        if not 2 <= self.prompt_tokens <= self.seq_len:
            raise ConfigError(f"data.prompt_tokens must lie in [2, seq_len={self.seq_len}], got {self.prompt_tokens}")


@dataclass(frozen=True)
class LMModelConfig:
    name: str = "smollm2"  # smollm2 (from the cache), tiny-random (untrained, for smoke runs), or a model directory
    include: tuple[str, ...] = ("*.layers.*",)  # module-name patterns of the masked nn.Linear layers
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class LMPruningConfig:
    patterns: tuple[str, ...] = ("50%", "2:4")  # "P%": unstructured per output row; "N:M": N kept of every M
    score: str = "wanda"  # the one-shot score of the shared and per-domain masks (scores.SCORES)
    draws: int = 3  # calibration draws (the interval is over them)

    def __post_init__(self) -> None:
        if not self.patterns:
            raise ConfigError("pruning.patterns must name at least one pattern, e.g. ['50%', '2:4']")
        for pattern in self.patterns:
            parse_pattern(pattern)
        if isinstance(self.draws, bool) or not isinstance(self.draws, int) or not 1 <= self.draws <= 100:
            raise ConfigError(f"pruning.draws must be an integer in [1, 100], got {self.draws!r}")


@dataclass(frozen=True)
class LMRetrainingConfig:
    steps_per_domain: int = 0  # 0: one-shot only; else Algorithm 2's steps per domain (the shared baseline: K times as many)
    batch_size: int = 2
    lr: float = 1e-5
    patterns: tuple[str, ...] = ()  # the patterns retrained (() : every pattern of pruning.patterns)

    def __post_init__(self) -> None:
        if isinstance(self.steps_per_domain, bool) or not isinstance(self.steps_per_domain, int) \
                or self.steps_per_domain < 0:
            raise ConfigError(f"retraining.steps_per_domain must be an integer >= 0, got {self.steps_per_domain!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"retraining.batch_size must be a positive integer, got {self.batch_size!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"retraining.lr must be a positive number, got {self.lr!r}")


@dataclass(frozen=True)
class LMExperimentConfig:
    name: str = "lm"
    task: str = "lm"
    seed: int = 0
    threads: int | None = None
    device: str = "auto"  # where the model runs (auto: CUDA when present); not part of the run's identity
    batch_size: int = 2  # sequences per forward when scoring
    data: LMDataConfig = field(default_factory=LMDataConfig)
    model: LMModelConfig = field(default_factory=LMModelConfig)
    pruning: LMPruningConfig = field(default_factory=LMPruningConfig)
    retraining: LMRetrainingConfig = field(default_factory=LMRetrainingConfig)
    routers: tuple[str, ...] = ROUTERS  # how a domain is chosen without an oracle (besides the given domain)
    checkpoint: bool = True  # keep draw 0's set per pattern: the weights once + K packed masks (checkpoints/)

    def __post_init__(self) -> None:
        if self.task != "lm":
            raise ConfigError(f"an LM experiment config has task: lm, got {self.task!r}")
        unknown = [r for r in self.routers if r not in ROUTERS]
        if unknown:
            raise ConfigError(f"routers {unknown} unknown; choose among {list(ROUTERS)}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        unknown = [p for p in self.retraining.patterns if p not in self.pruning.patterns]
        if unknown:
            raise ConfigError(f"retraining.patterns {unknown} are not among pruning.patterns {list(self.pruning.patterns)}")

    @property
    def cache(self) -> Path:
        return Path(self.data.root or os.environ.get("RTL_LM_CACHE") or DEFAULT_CACHE).expanduser()

    def to_dict(self) -> dict[str, Any]:
        return plain_data(asdict(self), "")


def parse_pattern(pattern: str) -> tuple[float | None, tuple[int, int] | None]:
    """``"50%"`` -> (0.5, None); ``"2:4"`` -> (None, (2, 4)); anything else a ``ConfigError``."""
    if isinstance(pattern, str) and (m := re.fullmatch(r"(\d+(?:\.\d+)?)%", pattern)):
        level = float(m.group(1)) / 100
        if 0 < level < 1:
            return level, None
    if isinstance(pattern, str) and (m := re.fullmatch(r"(\d+):(\d+)", pattern)):
        n, m_ = int(m.group(1)), int(m.group(2))
        if 0 < n < m_ <= 64:
            return None, (n, m_)
    raise ConfigError(f"pruning pattern {brief(pattern)} is neither 'P%' with 0 < P < 100 nor 'N:M' with 0 < N < M")


def _tag(pattern: str) -> str:
    """A file-name-safe form of a pattern: ``50%`` -> ``p50``, ``2:4`` -> ``2of4``."""
    return pattern.replace("%", "").replace(":", "of") if ":" in pattern else "p" + pattern.rstrip("%")


def is_lm_config(path: str | Path) -> bool:
    """Whether the YAML file at ``path`` is an LM experiment (``task: lm``), read without building it."""
    try:
        raw = load_yaml(Path(path).read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError, ConfigError):
        return False  # the generic loader reports what is wrong with it
    return isinstance(raw, Mapping) and raw.get("task") == "lm"


def load_lm_config(path: str | Path, scale: str | None = None,
                   overrides: Mapping[str, Any] | None = None) -> LMExperimentConfig:
    """The LM config at ``path`` with a scale (``scales:`` of the file) and ``--set`` overrides merged in."""
    raw = load_yaml(Path(path).read_text(encoding="utf-8"), str(path))
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a mapping of settings, got {brief(raw)}")
    raw = apply_scale(plain_data(raw, "", depth=1), scale, str(path))
    if overrides:
        raw = _deep_merge(raw, plain_data(overrides, "", depth=1))
    try:
        return build(LMExperimentConfig, raw)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path}: {err}") from None


# -- the experiment -----------------------------------------------------------------------------------------
Log = Callable[[str], None]


@dataclass
class _Setup:
    """What every record of a run shares: the model, its pretrained weights, the masked names and the data."""

    model: nn.Module
    tokenizer: Any
    names: tuple[str, ...]
    weights: dict[str, torch.Tensor]  # the pretrained values of the masked weights, restored after each mask
    domains: list[str]
    calibration: dict[str, torch.Tensor]
    retraining: dict[str, torch.Tensor]
    test: dict[str, torch.Tensor]
    documents: str  # fingerprint of the domains' documents and their split
    out: Path  # the run directory
    # The latest (draw, pattern)'s one-shot masks (shared, per domain): its one-shot and retrained records
    # both start from them, and one entry is kept (K masks of every masked weight are not small).
    masks: dict[tuple[int, str], tuple[dict[str, torch.Tensor], MaskSet]] = field(default_factory=dict)


def run_lm_experiment(config: LMExperimentConfig, out: str | Path, log: Log = print) -> list[dict[str, Any]]:
    """Run (or resume) the experiment into ``out``; returns the summary records (also in ``results.json``)."""
    out = Path(out)
    start = time.perf_counter()
    setup = _prepare(config, out, log)
    directory = CheckpointDirectory(out, log=log)
    with directory.locked():
        # The identity is which weights and which documents; how many sequences of what length each record
        # used is in its stamp, so a run that only adds (draws, patterns, retraining) reuses what it shares.
        identity = {"version": IDENTITY_VERSION, "kind": "lm", "seed": config.seed, "model": asdict(config.model), "score": config.pruning.score,
                    "network": model_identity(setup.model), "weights": fingerprint(setup.weights),
                    "data_fingerprint": setup.documents}
        directory.claim(identity, {"config.yaml": yaml.safe_dump(config.to_dict(), sort_keys=False)})
        rows: list[dict[str, Any]] = []
        for unit, stamp, compute in _units(config, setup, log):
            rows.extend(_record(out / "records" / f"{unit}.json", stamp, compute, log))
            log(f"{unit} done at {time.perf_counter() - start:.0f} s")
        summary = summarize(rows, setup.domains)
        atomic_write_json(out / "rows.json", rows)
        atomic_write_json(out / "results.json", summary)
        atomic_write_text(out / "results.md", results_markdown(summary, config))
        _figures(out, rows, summary, setup.domains, log)
        log(f"finished in {time.perf_counter() - start:.0f} s")
    return summary


def _prepare(config: LMExperimentConfig, out: Path, log: Log) -> _Setup:
    device = resolve_device(config.device)
    model, tokenizer = load_causal_lm(config.model.name, config.cache, seed=config.seed)
    model.to(device)
    names = masked_linear_names(model, config.model.include, config.model.exclude)
    log(names.describe())
    root = config.cache
    data = config.data
    texts = TextDomains.from_folder(root, list(data.domains) or None, seed=data.split_seed)
    need = data.calibration * config.pruning.draws
    calibration = texts.sequences(tokenizer, data.seq_len, "calibration", max_sequences=need)
    short = {d: len(s) for d, s in calibration.items() if len(s) < need}
    if short:
        raise ConfigError(f"domains {short} have fewer calibration sequences of {data.seq_len} tokens than "
                          f"{data.calibration} x {config.pruning.draws} draws = {need}; lower data.calibration, "
                          f"pruning.draws or data.seq_len, or add documents")
    retraining = (texts.sequences(tokenizer, data.seq_len, "retraining", max_sequences=data.retraining)
                  if config.retraining.steps_per_domain else {})
    test = texts.sequences(tokenizer, data.seq_len, "test", max_sequences=data.test)
    calibration, retraining, test = ({d: s.to(device) for d, s in split.items()}
                                      for split in (calibration, retraining, test))
    parameters = dict(model.named_parameters())
    weights = {n: parameters[n].detach().clone() for n in names}
    log(f"domains: {', '.join(f'{d} ({len(test[d])} test sequences)' for d in texts.names)}")
    return _Setup(model, tokenizer, tuple(names), weights, list(texts.names), calibration, retraining, test,
                  texts.fingerprint(), out)


def _record(path: Path, stamp: dict[str, Any], compute: Callable[[], list[dict[str, Any]]],
            log: Log) -> list[dict[str, Any]]:
    """The rows of one unit: read from ``path`` when it was made under ``stamp``, else computed and written."""
    if path.exists():
        try:
            saved = read_json(path)
            if isinstance(saved, dict) and saved.get("stamp") == stamp and isinstance(saved.get("rows"), list):
                return saved["rows"]
            log(f"{path.name} was made under other settings: recomputing it")
        except (CheckpointError, ValueError, OSError) as err:
            log(f"{path.name} is unreadable ({err}): recomputing it")
    rows = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"stamp": stamp, "rows": rows})
    return rows


def _units(config: LMExperimentConfig, setup: _Setup, log: Log):
    """(name, stamp, compute) of every record in order: dense, magnitude per pattern, then per draw and pattern."""
    base = {"seq_len": config.data.seq_len, "test": config.data.test}
    yield "dense", base, lambda: _score_masks(config, setup, {"-": None}, "dense", "dense", 0)
    for pattern in config.pruning.patterns:
        yield (f"magnitude_{_tag(pattern)}", base | {"pattern": pattern},
               lambda pattern=pattern: _score_masks(config, setup, {"-": _magnitude(setup, pattern)},
                                                    pattern, "magnitude", 0))
    for draw in range(config.pruning.draws):
        for pattern in config.pruning.patterns:
            stamp = base | {"pattern": pattern, "draw": draw, "calibration": config.data.calibration,
                            "score": config.pruning.score, "routers": list(config.routers),
                            "prompt_tokens": config.data.prompt_tokens}
            yield (f"oneshot_d{draw}_{_tag(pattern)}", stamp,
                   lambda draw=draw, pattern=pattern: _one_shot(config, setup, draw, pattern, log))
            if config.retraining.steps_per_domain and pattern in (config.retraining.patterns or config.pruning.patterns):
                budget = {k: v for k, v in asdict(config.retraining).items() if k != "patterns"}
                yield (f"retrained_d{draw}_{_tag(pattern)}", stamp | {"retraining": budget,
                                                                      "retraining_sequences": config.data.retraining},
                       lambda draw=draw, pattern=pattern: _retrained(config, setup, draw, pattern, log))


def _magnitude(setup: _Setup, pattern: str) -> dict[str, torch.Tensor]:
    level, n_m = parse_pattern(pattern)
    return one_shot_mask({n: w.abs() for n, w in setup.weights.items()}, level, n_m=n_m)


def _calibration_batches(config: LMExperimentConfig, setup: _Setup, draw: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """This draw's calibration sequences per domain, and as many pooled from all domains (seeded by the draw)."""
    picked = slice(draw * config.data.calibration, (draw + 1) * config.data.calibration)
    own = {d: setup.calibration[d][picked] for d in setup.domains}
    pooled = torch.cat(list(own.values()))
    g = torch.Generator().manual_seed(config.seed * 1000 + draw)
    return own, pooled[torch.randperm(len(pooled), generator=g)[:config.data.calibration]]


def _mask_from(config: LMExperimentConfig, setup: _Setup, sequences: torch.Tensor, pattern: str) -> dict[str, torch.Tensor]:
    """The one-shot mask of the configured score from calibration ``sequences`` (on the pretrained weights)."""
    level, n_m = parse_pattern(pattern)
    score = resolve_score(config.pruning.score)
    activations = None
    if needs_activations(score):
        activations = input_norms(setup.model, setup.names, sequences.split(config.batch_size),
                                  forward=lambda model, x: model(input_ids=x))
    return one_shot_mask(compute_scores(score, setup.weights, activations), level, n_m=n_m)


def _score_masks(config: LMExperimentConfig, setup: _Setup, masks: Mapping[str, dict[str, torch.Tensor] | None],
                 pattern: str, method: str, draw: int, domains: Sequence[str] | None = None,
                 weights: Mapping[str, torch.Tensor] | None = None) -> list[dict[str, Any]]:
    """Rows of each mask's perplexity on each domain's test sequences (``weights``: the shared values, default pretrained)."""
    rows = []
    for mask_of, mask in masks.items():
        with applied_mask(setup.model, mask, weights or setup.weights):
            for domain in domains or setup.domains:
                rows.append({"draw": draw, "pattern": pattern, "method": method, "mask": mask_of, "domain": domain,
                             "perplexity": perplexity(setup.model, setup.test[domain], config.batch_size)})
    return rows


def _one_shot_masks(config: LMExperimentConfig, setup: _Setup, draw: int,
                    pattern: str) -> tuple[dict[str, torch.Tensor], MaskSet]:
    """The shared mask and the domains' masks of this draw and pattern, computed once (``_Setup.masks``)."""
    key = (draw, pattern)
    if key not in setup.masks:
        own, pooled = _calibration_batches(config, setup, draw)
        shared = _mask_from(config, setup, pooled, pattern)
        masks = MaskSet.from_tickets([_mask_from(config, setup, own[d], pattern) for d in setup.domains],
                                     setup.domains)
        setup.masks.clear()
        setup.masks[key] = shared, masks
    return setup.masks[key]


def _one_shot(config: LMExperimentConfig, setup: _Setup, draw: int, pattern: str, log: Log) -> list[dict[str, Any]]:
    shared, masks = _one_shot_masks(config, setup, draw, pattern)
    log(f"draw {draw} {pattern}: one-shot {config.pruning.score} masks of {len(setup.domains)} domains and pooled")
    rows = _score_masks(config, setup, {"pooled": shared}, pattern, "shared", draw)
    rows += _score_masks(config, setup, {d: masks[k] for k, d in enumerate(setup.domains)}, pattern, "own", draw)
    rows += _routed_rows(config, setup, masks, pattern, "own", draw, setup.weights)
    rows += _overlap_rows(masks, pattern, "own", draw)
    _keep(config, setup, masks, draw, f"own_{_tag(pattern)}")
    return rows


def _keep(config: LMExperimentConfig, setup: _Setup, masks: MaskSet, draw: int, name: str) -> None:
    """Draw 0's whole set as the library's checkpoint (``lm.retraining.save_domain_set``), from the weights the
    model holds now: loadable with ``load_domain_set`` into the same model, served with ``MaskedCausalLM``."""
    if config.checkpoint and draw == 0:
        save_domain_set(setup.model, masks, setup.out / "checkpoints" / name,
                        metadata={"model": config.model.name, "score": config.pruning.score})


def _retrained(config: LMExperimentConfig, setup: _Setup, draw: int, pattern: str, log: Log) -> list[dict[str, Any]]:
    shared, masks = _one_shot_masks(config, setup, draw, pattern)
    training = config.retraining
    steps = training.steps_per_domain
    seed = config.seed * 1000 + draw
    rows: list[dict[str, Any]] = []
    parameters = dict(setup.model.named_parameters())
    saved = {n: p.detach().clone() for n, p in parameters.items() if p.requires_grad}
    try:
        retrain_domains(setup.model, masks, setup.retraining, steps_per_domain=steps, batch_size=training.batch_size,
                        lr=training.lr, seed=seed)
        tuned = {n: parameters[n].detach().clone() for n in setup.names}
        log(f"draw {draw} {pattern}: joint retraining, {steps} steps per domain")
        rows += _score_masks(config, setup, {d: masks[k] for k, d in enumerate(setup.domains)}, pattern, "rtl", draw,
                             weights=tuned)
        rows += _routed_rows(config, setup, masks, pattern, "rtl", draw, tuned)
        _keep(config, setup, masks, draw, f"rtl_{_tag(pattern)}")
        _restore(parameters, saved)
        pooled_training = torch.cat([setup.retraining[d] for d in setup.domains])
        finetune_shared(setup.model, shared, pooled_training, steps=steps * len(setup.domains),
                        batch_size=training.batch_size, lr=training.lr, seed=seed)
        tuned = {n: parameters[n].detach().clone() for n in setup.names}
        log(f"draw {draw} {pattern}: shared mask fine-tuned, {steps * len(setup.domains)} steps on pooled data")
        rows += _score_masks(config, setup, {"pooled": shared}, pattern, "shared_ft", draw, weights=tuned)
    finally:
        _restore(parameters, saved)
    return rows


def _restore(parameters: Mapping[str, nn.Parameter], saved: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, value in saved.items():
            parameters[name].copy_(value)


def _routed_rows(config: LMExperimentConfig, setup: _Setup, masks: MaskSet, pattern: str, method: str, draw: int,
                 weights: Mapping[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Each router's choice of a mask for every test sequence (from its first ``prompt_tokens``), its accuracy,
    and the perplexity of every domain's test sequences served in one mixed batch under the masks it chose.

    The model's masked weights hold ``weights`` when this is called (pretrained, or retrained)."""
    if not config.routers:
        return []
    sequences = torch.cat([setup.test[d] for d in setup.domains])
    truth = torch.cat([torch.full((len(setup.test[d]),), k) for k, d in enumerate(setup.domains)])
    prompts = sequences[:, :config.data.prompt_tokens]
    rows = []
    routed = MaskedCausalLM(setup.model, masks)
    try:
        for router in config.routers:
            chosen = _choose(router, routed, prompts, _router_training(config, setup, draw), config.batch_size)
            nll = _routed_nll(routed, sequences, chosen, config.batch_size)
            for k, domain in enumerate(setup.domains):
                rows_k = truth == k
                rows.append({"draw": draw, "pattern": pattern, "method": f"{method}+{router}", "mask": "routed",
                             "domain": domain, "perplexity": math.exp(float(nll[rows_k].mean())),
                             "routing_accuracy": float((chosen[rows_k] == k).double().mean())})
    finally:
        routed.unwrap()
    return rows


def _choose(router: str, routed: Any, prompts: torch.Tensor, training: Mapping[str, torch.Tensor],
            batch_size: int) -> torch.Tensor:
    """Domain indices chosen for ``prompts`` by ``router`` (``learned``: fitted on ``training`` prompts)."""
    if router == "perplexity":  # K forwards of the prompts, one per mask
        return torch.cat([routing.lowest_perplexity_domains(routed, chunk) for chunk in prompts.split(4 * batch_size)])
    return routing.fit_prompt_router(routed.model, training, routed.domain_names).route(prompts)


def _routed_nll(routed: Any, sequences: torch.Tensor, domains: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Mean next-token NLL of each row of ``sequences`` under the mask of its domain, in mixed batches."""
    out = []
    with torch.no_grad():
        for ids, chosen in zip(sequences.split(batch_size), domains.split(batch_size)):
            logits = routed(ids, chosen).logits[:, :-1].float()
            out.append(F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").double().mean(1))
    return torch.cat(out)


def _router_training(config: LMExperimentConfig, setup: _Setup, draw: int) -> dict[str, torch.Tensor]:
    """What a learned router fits on: this draw's calibration sequences' prompts (never test text)."""
    own, _ = _calibration_batches(config, setup, draw)
    return {d: s[:, :config.data.prompt_tokens] for d, s in own.items()}


def _overlap_rows(masks: MaskSet, pattern: str, method: str, draw: int) -> list[dict[str, Any]]:
    """The mean pairwise Jaccard similarity of the domains' masks, per masked tensor (layer type and depth)."""
    rows = []
    k = masks.num_contexts
    for name, stacked in masks.stacked.items():
        pairs = [jaccard(stacked[i], stacked[j]) for i in range(k) for j in range(i + 1, k)]
        depth = re.search(r"\.layers\.(\d+)\.", name)
        rows.append({"draw": draw, "pattern": pattern, "method": method, "tensor": name,
                     "layer_type": next((t for t in LAYER_TYPES if t in name), name.rsplit(".", 2)[-2]),
                     "depth": int(depth.group(1)) if depth else -1,
                     "jaccard": sum(pairs) / len(pairs) if pairs else 1.0})
    return rows


# -- summary, table and figures -----------------------------------------------------------------------------
BASELINE_OF = {"own": "shared", "rtl": "shared_ft"}  # what each per-domain method is compared with, at equal steps
METHOD_ORDER = ("dense", "magnitude", "shared", "own", "shared_ft", "rtl")


def _sparsity(pattern: str) -> float:
    if pattern == "dense":
        return 0.0
    level, n_m = parse_pattern(pattern)
    return level if level is not None else round(1 - n_m[0] / n_m[1], 4)


def _per_domain(rows: Sequence[Mapping[str, Any]], pattern: str, method: str, domain: str) -> dict[int, float]:
    """draw -> perplexity of ``method``'s own-domain mask (or the routed / shared one) on ``domain``."""
    own = method in ("own", "rtl")
    return {r["draw"]: r["perplexity"] for r in rows if r.get("pattern") == pattern and r["method"] == method
            and r.get("domain") == domain and "perplexity" in r and (not own or r["mask"] == domain)}


def _interval_fields(prefix: str, values: Sequence[float]) -> dict[str, Any]:
    interval = mean_interval(values)
    return {prefix: interval.mean, f"{prefix}_low": interval.low, f"{prefix}_high": interval.high}


def summarize(rows: Sequence[Mapping[str, Any]], domains: Sequence[str]) -> list[dict[str, Any]]:
    """One record per (pattern, method, domain): perplexity mean and 95 % interval over draws; for a
    per-domain method, the paired ratio to its equal-budget shared baseline (below 1: the own mask wins);
    for a router, its routing accuracy."""
    records = []
    order = list(dict.fromkeys(r["pattern"] for r in rows))  # the config's order
    keys = sorted({(r["pattern"], r["method"]) for r in rows if "perplexity" in r},
                  key=lambda pm: (order.index(pm[0]), _method_rank(pm[1]), pm[1]))
    for pattern, method in keys:
        for domain in domains:
            values = _per_domain(rows, pattern, method, domain)
            if not values:
                continue
            record: dict[str, Any] = {"pattern": pattern, "sparsity": _sparsity(pattern), "method": method,
                                      "domain": domain, "draws": len(values),
                                      **_interval_fields("perplexity", list(values.values()))}
            baseline = BASELINE_OF.get(method.split("+")[0])
            if baseline is not None:
                base = _per_domain(rows, pattern, baseline, domain)
                paired = [values[d] / base[d] for d in sorted(values) if d in base]
                if paired:
                    record.update(_interval_fields(f"vs_{baseline}", paired))
            accuracy = [r["routing_accuracy"] for r in rows if r.get("pattern") == pattern and r["method"] == method
                        and r.get("domain") == domain and "routing_accuracy" in r]
            if accuracy:
                record["routing_accuracy"] = sum(accuracy) / len(accuracy)
            records.append(record)
    return records


def _method_rank(method: str) -> tuple[int, str]:
    base, _, router = method.partition("+")
    return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER), router)


def _cell(record: Mapping[str, Any] | None, key: str = "perplexity") -> str:
    if record is None or key not in record:
        return "-"
    low, high = record.get(f"{key}_low"), record.get(f"{key}_high")
    digits = 3 if key.startswith("vs_") else 2
    text = f"{record[key]:.{digits}f}"
    return text if low is None else f"{text} [{low:.{digits}f}, {high:.{digits}f}]"


def results_markdown(records: Sequence[Mapping[str, Any]], config: LMExperimentConfig | None = None) -> str:
    """Per pattern: each domain's perplexity under every method (mean [95 % interval] over draws), each
    per-domain method's ratio to its shared baseline, and each router's accuracy."""
    lines = ["# Per-domain masks vs one shared mask on a pretrained language model", ""]
    if config is not None:
        lines += [f"model {config.model.name}, score {config.pruning.score}, {config.pruning.draws} calibration "
                  f"draw(s) of {config.data.calibration} x {config.data.seq_len}-token sequences per mask, "
                  f"{config.data.test} test sequences per domain; "
                  + (f"retraining: {config.retraining.steps_per_domain} steps per domain (batch "
                     f"{config.retraining.batch_size}, lr {config.retraining.lr:g}), the shared mask as many in all."
                     if config.retraining.steps_per_domain else "one-shot (no retraining)."), ""]
    by = {(r["pattern"], r["method"], r["domain"]): r for r in records}
    patterns = list(dict.fromkeys(r["pattern"] for r in records if r["pattern"] != "dense"))
    domains = list(dict.fromkeys(r["domain"] for r in records))
    for pattern in patterns:
        methods = sorted({r["method"] for r in records if r["pattern"] == pattern}, key=_method_rank)
        ratios = [m for m in methods if BASELINE_OF.get(m.split("+")[0])]
        header = ["domain", "dense", *methods, *[f"{m} / {BASELINE_OF[m.split('+')[0]]}" for m in ratios]]
        lines += [f"## {pattern}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for domain in domains:
            cells = [domain, _cell(by.get(("dense", "dense", domain)))]
            cells += [_cell(by.get((pattern, m, domain))) for m in methods]
            cells += [_cell(by.get((pattern, m, domain)), f"vs_{BASELINE_OF[m.split('+')[0]]}") for m in ratios]
            lines.append("| " + " | ".join(cells) + " |")
        routed = [m for m in methods if "+" in m]
        if routed:
            lines += ["", "routing accuracy (test prompts): " + "; ".join(
                f"{m} {sum(by[(pattern, m, d)]['routing_accuracy'] for d in domains) / len(domains):.3f}"
                for m in routed)]
        lines.append("")
    return "\n".join(lines)


def _figures(out: Path, rows: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]],
             domains: Sequence[str], log: Log) -> None:
    if importlib.util.find_spec("matplotlib") is None:
        log("matplotlib is not installed: no figures")
        return
    patterns = list(dict.fromkeys(r["pattern"] for r in records if r["pattern"] != "dense"))
    _perplexity_figure(out / "perplexity.png", records, patterns, domains)
    _matrix_figure(out / "mask_domain.png", rows, patterns, domains)
    _jaccard_figure(out / "jaccard_layers.png", rows, patterns)
    log(f"figures: {out / 'perplexity.png'}, {out / 'mask_domain.png'}, {out / 'jaccard_layers.png'}")


def _perplexity_figure(path: Path, records: Sequence[Mapping[str, Any]], patterns: Sequence[str],
                       domains: Sequence[str]) -> None:
    """Perplexity per domain and method (bars, 95 % intervals; a method's colour the same in every panel),
    one panel per pattern."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5 * len(patterns), 3.6), layout="constrained")
    palette = colormaps["tab10"]
    axes = fig.subplots(1, len(patterns), squeeze=False)[0]
    by = {(r["pattern"], r["method"], r["domain"]): r for r in records}
    for ax, pattern in zip(axes, patterns):
        methods = ["dense", *sorted({r["method"] for r in records if r["pattern"] == pattern and "+" not in r["method"]},
                                    key=_method_rank)]
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            cells = [by.get(("dense" if method == "dense" else pattern, method, d)) for d in domains]
            x = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(domains))]
            y = [c["perplexity"] if c else float("nan") for c in cells]
            err = [[(c["perplexity"] - c["perplexity_low"]) if c and c.get("perplexity_low") is not None else 0
                    for c in cells],
                   [(c["perplexity_high"] - c["perplexity"]) if c and c.get("perplexity_high") is not None else 0
                    for c in cells]]
            ax.bar(x, y, width, yerr=err, label=method, capsize=2, color=palette(_method_rank(method)[0]))
        ax.set_xticks(range(len(domains)), domains, rotation=30, ha="right")
        ax.set_yscale("log")
        ax.set_title(pattern)
        ax.set_ylabel("test perplexity")
        ax.legend(fontsize=7)
    save_png(fig, path)


def _matrix_figure(path: Path, rows: Sequence[Mapping[str, Any]], patterns: Sequence[str],
                   domains: Sequence[str]) -> None:
    """Every domain's mask on every domain: perplexity / the shared baseline's on that domain (below 1: better)."""
    from matplotlib.figure import Figure

    panels = [(p, m) for p in patterns for m in ("own", "rtl")
              if any(r["method"] == m and r.get("pattern") == p and "perplexity" in r for r in rows)]
    fig = Figure(figsize=(3.2 * len(panels) + 1, 3.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (pattern, method) in zip(axes, panels):
        baseline = BASELINE_OF[method]
        matrix = torch.full((len(domains), len(domains)), float("nan"))
        for i, mask_of in enumerate(domains):
            for j, domain in enumerate(domains):
                ratios = []
                base = _per_domain(rows, pattern, baseline, domain)
                for r in rows:
                    if (r.get("pattern"), r["method"], r.get("mask"), r.get("domain")) == (pattern, method, mask_of, domain) \
                            and r["draw"] in base and "perplexity" in r:
                        ratios.append(r["perplexity"] / base[r["draw"]])
                if ratios:
                    matrix[i, j] = sum(ratios) / len(ratios)
        image = ax.imshow(matrix.numpy(), cmap="RdBu_r", vmin=0.7, vmax=1.3)
        for i in range(len(domains)):
            for j in range(len(domains)):
                ax.text(j, i, f"{float(matrix[i, j]):.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(domains)), domains, rotation=30, ha="right", fontsize=7)
        ax.set_yticks(range(len(domains)), domains, fontsize=7)
        ax.set_xlabel("scored on")
        ax.set_ylabel("mask of")
        ax.set_title(f"{method} / {baseline}, {pattern}", fontsize=9)
    fig.colorbar(image, ax=list(axes), shrink=0.8)
    save_png(fig, path)


def _jaccard_figure(path: Path, rows: Sequence[Mapping[str, Any]], patterns: Sequence[str]) -> None:
    """Mean pairwise Jaccard of the domains' one-shot masks per layer type (rows) and depth (columns)."""
    from matplotlib.figure import Figure

    overlap = [r for r in rows if "jaccard" in r]
    depths = sorted({r["depth"] for r in overlap})
    types = [t for t in LAYER_TYPES if any(r["layer_type"] == t for r in overlap)] + \
        sorted({r["layer_type"] for r in overlap} - set(LAYER_TYPES))
    fig = Figure(figsize=(max(4.0, 0.25 * len(depths) + 2), 2.4 * len(patterns)), layout="constrained")
    axes = fig.subplots(len(patterns), 1, squeeze=False)[:, 0]
    image = None
    for ax, pattern in zip(axes, patterns):
        matrix = torch.full((len(types), len(depths)), float("nan"))
        for i, t in enumerate(types):
            for j, depth in enumerate(depths):
                values = [r["jaccard"] for r in overlap if r["pattern"] == pattern and r["layer_type"] == t
                          and r["depth"] == depth]
                if values:
                    matrix[i, j] = sum(values) / len(values)
        image = ax.imshow(matrix.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_yticks(range(len(types)), types, fontsize=7)
        ax.set_xticks(range(len(depths)), [str(d) for d in depths], fontsize=6)
        ax.set_xlabel("block")
        ax.set_title(f"mask Jaccard between domains, {pattern}", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.8)
    save_png(fig, path)


def print_summary(records: Sequence[Mapping[str, Any]], console: Any) -> None:
    """The results as ``rtl run`` and ``rtl report`` print them (the Markdown tables of ``results.md``)."""
    console.print(results_markdown(records))
