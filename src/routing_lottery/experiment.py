"""Run an experiment config end to end in a run directory, resuming whatever already finished.

Layout of a run directory::

    config.yaml                     the resolved config (a different config in the same directory is refused)
    theta0.safetensors              the shared initialization θ₀ (and rewind.safetensors when rewinding to θ_j)
    imp/<stream>/round_NNN.safetensors   the bit-packed mask after every IMP round
    train/<method>_<level>.pt       joint-retraining state after the last finished epoch
    records/<method>_<level>.json   one finished result record
    checkpoints/rtl_<level>/        the RTL tickets: shared weights + packed masks (see ``io``)
    results.json / .csv / .md       all records

Every file is written atomically, and every loop is seeded by its position, so a killed run
restarted on the same directory ends with the same masks as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import yaml
from torch import nn

from .config import ExperimentConfig, SpeechConfig
from .io import (
    CheckpointError, atomic_torch_save, atomic_write_bytes, atomic_write_json, atomic_write_text, read_json,
    save_tickets, torch_load,
)
from .masks import Mask, MaskSet, ones_like
from .methods import Accounting, account, train_single
from .pruning import levels_reached, prunable_names, pruning_schedule, random_mask_like
from .report import write_results
from .routed import RoutedModel, masked_forward
from .tasks.base import RoutedPredict, Row, Task
from .tasks.classification import ClassificationTask
from .training import SILENT, ProgressSink, Stream, derive_seed, extract_ticket, generator, joint_retrain, snapshot, train

Log = Callable[[str], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_task(config: ExperimentConfig) -> Task:
    """The configured data wrapped as the config's task (classification or speech; INR: ``build_inr_tasks``)."""
    if config.task == "speech":
        return build_speech_task(config)
    if config.task != "classification":
        raise ValueError(f"task {config.task!r} runs through make_runner")
    from .data.images import stratified_subset

    data = config.data
    if data.name == "digits":
        from .data.digits import load_digits_splits

        splits = load_digits_splits(seed=config.seed, image_size=data.image_size)
    elif data.name in ("cifar10", "cifar100"):
        from .data.cifar import load_cifar10, load_cifar100

        if data.root is None:
            raise ValueError(f"data.root must name the directory holding the {data.name} python pickles "
                             "(pass --data DIR or set data.root in the config)")
        splits = load_cifar10(data.root) if data.name == "cifar10" else load_cifar100(data.root)
    else:
        raise ValueError(f"data.name {data.name!r} is not an image classification dataset")
    if config.training.batch_size is None:
        raise ValueError("training.batch_size must be a number for classification")
    train_set = stratified_subset(splits.train, data.train_per_class, seed=config.seed)
    test_set = stratified_subset(splits.test, data.test_per_class, seed=config.seed)
    context_of_class, context_names, partition = class_contexts(config, list(train_set.class_names))
    return ClassificationTask(train_set, test_set, context_of_class, context_names,
                              batch_size=config.training.batch_size, negative_ratio=config.training.negative_ratio,
                              width=config.model.width, partition=partition,
                              context_members=None if partition is None else [list(c) for c in partition.clusters()])


def class_contexts(config: ExperimentConfig, class_names: list[str]) -> tuple[list[int], list[str], Any]:
    """Class -> context map, context names and (for groups of classes) the ``Partition`` they come from.

    ``data.contexts``: ``classes`` (one per class), ``paper`` / ``superclasses`` (CIFAR-100's
    published partitions), ``clusters`` (class names clustered offline; the partition is saved as
    ``partition.json`` in the run directory when run through the CLI), or a partition.json path.
    """
    how = config.data.contexts
    if how == "classes":
        return list(range(len(class_names))), class_names, None
    from .contexts.clustering import Partition, partition_names, reference_partition

    if how in ("paper", "superclasses"):
        partition = reference_partition(how)
    elif how == "clusters":
        partition = partition_names(class_names, target=config.data.clusters, seed=config.seed)
    elif how.endswith(".json"):
        partition = Partition.load(how)
    else:
        raise ValueError(f"data.contexts must be classes, paper, superclasses, clusters or a partition.json path; "
                         f"got {how!r}")
    missing = [n for n in class_names if n not in partition.names]
    if missing:
        raise ValueError(f"the {how!r} partition does not cover the classes {missing[:5]}")
    context_of_class = list(partition.contexts_for(class_names))
    clusters = partition.clusters()
    names = list(partition.titles) or [f"cluster {k} ({', '.join(c[:2])}{', ...' if len(c) > 2 else ''})"
                                       for k, c in enumerate(clusters)]
    return context_of_class, names, partition


class RunDirectory:
    """Paths and resumable state of one run."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def claim(self, config: ExperimentConfig) -> bool:
        """Write the config, or check it matches the one already there. True when resuming."""
        path = self.path / "config.yaml"
        wanted = config.to_dict()
        if path.exists():
            found = yaml.safe_load(path.read_text())
            if found != wanted:
                diff = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
                raise ValueError(f"{self.path} holds a run of a different config (differs in {diff}); "
                                 "choose another output directory to start a new run")
            return True
        atomic_write_text(path, yaml.safe_dump(wanted, sort_keys=False))
        return False

    def state_dict_file(self, name: str) -> Path:
        return self.path / f"{name}.safetensors"

    def round_file(self, stream: str, r: int) -> Path:
        return self.path / "imp" / stream / f"round_{r:03d}.safetensors"

    def record_file(self, method: str, level: float) -> Path:
        return self.path / "records" / f"{method}_{level:.4f}.json"

    def train_state_file(self, method: str, level: float) -> Path:
        return self.path / "train" / f"{method}_{level:.4f}.pt"

    # -- state dicts -----------------------------------------------------------------------
    def save_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        atomic_write_bytes(self.state_dict_file(name), safetensors.torch.save({k: v.contiguous() for k, v in state.items()}))

    def load_state(self, name: str) -> dict[str, torch.Tensor] | None:
        path = self.state_dict_file(name)
        if not path.exists():
            return None
        try:
            return safetensors.torch.load(path.read_bytes())
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"{path} is truncated or corrupt ({err}); delete it to start this run over") from None

    # -- IMP rounds ------------------------------------------------------------------------
    def save_round(self, stream: str, r: int, mask: Mask) -> None:
        ms = MaskSet.from_tickets([mask])
        meta = {"shapes": json.dumps({n: list(s) for n, s in ms.shapes.items()})}
        tensors = {n: p.contiguous() for n, p in ms.packed().items()}
        atomic_write_bytes(self.round_file(stream, r), safetensors.torch.save(tensors, metadata=meta))

    def load_round(self, stream: str, r: int, order: Sequence[str] | None = None) -> Mask | None:
        """The mask saved after round ``r``, its tensors in ``order`` (the model's) when given."""
        path = self.round_file(stream, r)
        if not path.exists():
            return None
        try:
            with safetensors.safe_open(str(path), "pt") as f:
                shapes = json.loads(f.metadata()["shapes"])
                packed = {n: f.get_tensor(n) for n in f.keys()}
        except Exception as err:
            raise CheckpointError(f"{path} is truncated or corrupt ({err}); delete it to redo that round") from None
        mask = MaskSet.from_packed(packed, shapes, ["ticket"])[0]
        return mask if order is None else {n: mask[n] for n in order}


class Experiment:
    """One configured comparison: stage 1 per stream, then every method at every sparsity level."""

    def __init__(self, config: ExperimentConfig, out: str | Path, progress: ProgressSink = SILENT,
                 log: Log = lambda message: None, task: Task | None = None) -> None:
        self.config = config
        self.run = RunDirectory(out)
        self.progress = progress
        self.log = log
        self.device = resolve_device(config.device)
        self.task = task if task is not None else build_task(config)
        if hasattr(self.task, "output_dir"):
            self.task.output_dir = self.run.path / "outputs"
        self.model = self.task.build_model(derive_seed(config.seed, "init")).to(self.device)
        shared = self.task.build_shared_model(self.model)
        self.shared_model = shared if shared is self.model else shared.to(self.device)
        if self.shared_model is not self.model and config.pruning.rewind_steps:
            raise ValueError("pruning.rewind_steps needs the baselines to share the RTL network; this task's differ")
        self.prunable = prunable_names(self.model)
        self.shared_prunable = prunable_names(self.shared_model)
        params = dict(self.model.named_parameters())
        self.total = sum(params[n].numel() for n in self.prunable)
        self.levels = sorted(set(config.pruning.sparsities))
        positive = [s for s in self.levels if round(s * self.total) > 0]
        self.schedule = pruning_schedule(self.total, positive, config.pruning.step) if positive else []
        self.level_round = levels_reached(self.schedule, self.total, positive)
        self.shared_positive = [s for s in self.levels if round(s * self.shared_total) > 0]
        self.shared_schedule = (pruning_schedule(self.shared_total, self.shared_positive, config.pruning.step)
                                if self.shared_positive else [])
        self.shared_level_round = levels_reached(self.shared_schedule, self.shared_total, self.shared_positive)
        self.classifier = self.task.shared_stream()
        self.detectors = [self.task.context_stream(k) for k in range(self.num_contexts)]
        self.factor = self.task.shared_epoch_factor
        self._initial: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None
        self._rounds: tuple[list[Mask], list[list[Mask]]] | None = None

    @property
    def num_contexts(self) -> int:
        return len(self.task.context_names)

    @property
    def description(self) -> str:
        return (f"{self.num_contexts} contexts, {self.total:,} prunable weights, sparsities "
                f"{', '.join(f'{s:.0%}' for s in self.levels)}, {len(self.schedule)} IMP rounds, device {self.device}")

    @property
    def shared_total(self) -> int:
        params = dict(self.shared_model.named_parameters())
        return sum(params[n].numel() for n in self.shared_prunable)

    # -- planning, for progress bars --------------------------------------------------------
    def planned_steps(self) -> int:
        """Training steps the whole run takes (used for the progress bar's total and ETA)."""
        t, methods = self.config.training, self.config.methods
        steps = self.config.pruning.rewind_steps
        if "single_imp" in methods:
            steps += len(self.shared_schedule) * self.factor * t.imp_epochs * self.classifier.num_batches
        if {"rtl", "multi_imp", "random"} & set(methods):
            steps += len(self.schedule) * t.imp_epochs * sum(s.num_batches for s in self.detectors)
        if "dense" in methods:
            steps += self.method_steps("dense")
        return steps + len(self.levels) * sum(self.method_steps(m) for m in methods if m != "dense")

    def method_steps(self, method: str) -> int:
        """Training steps of one method at one level."""
        epochs = self.config.training.epochs
        if method in ("dense", "single_imp"):
            return self.factor * epochs * self.classifier.num_batches
        if method == "multi_imp":
            return epochs * sum(s.num_batches for s in self.detectors)
        return epochs * self.num_contexts * max(s.num_batches for s in self.detectors)

    # -- stage 1 ----------------------------------------------------------------------------
    def initial_state(self, name: str, model: nn.Module) -> dict[str, torch.Tensor]:
        """θ₀ of ``model``: from the run directory when there, else the model's own (and saved)."""
        state = self.run.load_state(name)
        if state is None:
            state = snapshot(model)
            self.run.save_state(name, state)
        return {k: v.to(self.device) for k, v in state.items()}

    def initial_states(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """θ₀ and the rewind point (θ₀ itself, or θ_j after j dense steps on all data)."""
        if self._initial is None:
            self._initial = self._make_initial_states()
        return self._initial

    def _make_initial_states(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        theta0 = self.initial_state("theta0", self.model)
        j = self.config.pruning.rewind_steps
        if j == 0:
            return theta0, theta0
        rewind = self.run.load_state("rewind")
        if rewind is None:
            self.log(f"rewind point: {j} dense steps on all data")
            self.model.load_state_dict(theta0)
            train(self.model, None, self.classifier, 10**9, self.config.training.optimizer,
                  derive_seed(self.config.seed, "rewind"), self.progress, max_steps=j)
            rewind = snapshot(self.model)
            self.run.save_state("rewind", rewind)
        else:
            self.progress.advance(j, "rewind point (resumed)")
        return theta0, {k: v.to(self.device) for k, v in rewind.items()}

    def extract(self, stream_id: str, stream: Stream, epochs: int, model: nn.Module, rewind: dict[str, torch.Tensor],
                prunable: list[str], schedule: list[int]) -> list[Mask]:
        """All IMP rounds of one stream, loading finished rounds from disk."""
        done: list[Mask] = []
        for r in range(len(schedule)):
            mask = self.run.load_round(stream_id, r, prunable)
            if mask is None:
                break
            done.append(mask)
        skipped = len(done) * epochs * stream.num_batches
        if skipped:
            self.progress.advance(skipped, f"{stream_id}: {len(done)} rounds on disk")
        if len(done) < len(schedule):
            self.log(f"IMP {stream_id}: rounds {len(done) + 1}..{len(schedule)}")
            resume = (len(done) - 1, done[-1]) if done else None
            done += extract_ticket(
                model, rewind, prunable, stream, schedule, epochs, self.config.training.optimizer,
                derive_seed(self.config.seed, "imp", stream_id), self.config.pruning.scope, self.progress,
                resume=resume, on_round=lambda r, m: self.run.save_round(stream_id, r, m))
        return done

    def mask_at(self, rounds: Sequence[Mask], level: float, shared: bool = False) -> Mask:
        model, total, level_round = ((self.shared_model, self.shared_total, self.shared_level_round) if shared
                                     else (self.model, self.total, self.level_round))
        if round(level * total) == 0:
            params = dict(model.named_parameters())
            return ones_like({n: params[n] for n in (self.shared_prunable if shared else self.prunable)})
        return rounds[level_round[level]]

    # -- stage 2 and scoring ------------------------------------------------------------------
    def extract_all(self) -> tuple[list[Mask], list[list[Mask]]]:
        """Stage 1: the single-mask IMP rounds and every context's IMP rounds (from disk where finished)."""
        if self._rounds is None:
            self._rounds = self._extract_all()
        return self._rounds

    def _extract_all(self) -> tuple[list[Mask], list[list[Mask]]]:
        self.run.claim(self.config)
        t, methods = self.config.training, self.config.methods
        _, rewind = self.initial_states()
        single_rounds: list[Mask] = []
        context_rounds: list[list[Mask]] = []
        if "single_imp" in methods:
            single_rounds = self.extract("single", self.classifier, self.factor * t.imp_epochs, self.shared_model,
                                         self.shared_initial_state(rewind), self.shared_prunable, self.shared_schedule)
        if {"rtl", "multi_imp", "random"} & set(methods):
            context_rounds = [self.extract(f"context_{k:02d}", s, t.imp_epochs, self.model, rewind, self.prunable,
                                           self.schedule) for k, s in enumerate(self.detectors)]
        return single_rounds, context_rounds

    def save_partition(self) -> str:
        """When contexts group classes: ``partition.json``/``.txt`` and its agreement with the shipped references.

        Returns the text for the results' report ("" when contexts are single classes)."""
        partition = getattr(self.task, "partition", None)
        if partition is None:
            return ""
        from .contexts.clustering import Partition, format_partition, reference_scores

        path = self.run.path / "partition.json"
        if path.exists():
            started = Partition.load(path)
            if (started.names, started.assignment) != (partition.names, partition.assignment):
                raise ValueError(f"the class contexts differ from {path}, which this run started with "
                                 "(clustering on another machine or library version?); use data.contexts: "
                                 f"{path} to resume with the original contexts")
        partition.save(path)
        scores = reference_scores(partition)
        text = format_partition(partition) + "".join(f"\nadjusted Rand index vs {k}: {v:.3f}" for k, v in scores.items())
        atomic_write_text(self.run.path / "partition.txt", text + "\n")
        self.log("contexts:\n" + text)
        return f"Contexts (members; * = HDBSCAN noise reassigned to the nearest cluster centroid):\n\n```\n{text}\n```"

    def context_masks(self, context_rounds: list[list[Mask]]) -> dict[float, MaskSet]:
        """The K tickets at every configured sparsity level."""
        return {level: MaskSet.from_tickets([self.mask_at(r, level) for r in context_rounds], self.task.context_names)
                for level in self.levels}

    def shared_initial_state(self, rewind: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return rewind if self.shared_model is self.model else self.initial_state("theta0_shared", self.shared_model)

    def run_all(self) -> list[dict[str, Any]]:
        single_rounds, context_rounds = self.extract_all()
        contexts_note = self.save_partition()
        methods = self.config.methods
        _, rewind = self.initial_states()
        shared_rewind = self.shared_initial_state(rewind)
        level_masks = self.context_masks(context_rounds) if context_rounds else {}
        records = []
        if "dense" in methods:
            records += self.finished("dense", 0.0, lambda: self.fit_shared_network("dense", 0.0, None, shared_rewind))
        for level in self.levels:
            if "single_imp" in methods:
                mask = self.mask_at(single_rounds, level, shared=True)
                records += self.finished("single_imp", level,
                                         lambda: self.fit_shared_network("single_imp", level, mask, shared_rewind))
            masks = level_masks.get(level)
            if "multi_imp" in methods:
                records += self.finished("multi_imp", level, lambda: self.fit_multi(level, masks, rewind))
            if "rtl" in methods:
                records += self.finished("rtl", level, lambda: self.fit_joint("rtl", level, masks, rewind))
            if "random" in methods:
                randoms = MaskSet.from_tickets(
                    [random_mask_like(masks[k], generator(self.config.seed, "random", k, str(level)))
                     for k in range(masks.num_contexts)], self.task.context_names)
                records += self.finished("random", level, lambda: self.fit_joint("random", level, randoms, rewind))
        write_results(self.run.path, records, self.config, summary=contexts_note)
        if hasattr(self.task, "write_figures"):
            self.task.write_figures()
        return records

    def finished(self, method: str, level: float, compute: Callable[[], tuple[list[Row], Accounting]]) -> list[Row]:
        """The rows of (method, level): from disk when a previous run finished them, else computed."""
        path = self.run.record_file(method, level)
        if path.exists():
            self.progress.advance(self.method_steps(method), f"{method} {level:.0%} (on disk)")
            return read_json(path)
        self.log(f"{method} at {level:.0%} sparsity")
        start = time.perf_counter()
        rows, accounting = compute()
        seconds = round(time.perf_counter() - start, 2)
        records = [{"experiment": self.config.name, "method": method, "sparsity": level, **row, **vars(accounting),
                    "train_seconds": seconds} for row in rows]
        atomic_write_json(path, records)
        return records

    def fit_shared_network(self, method: str, level: float, mask: Mask | None, rewind) -> tuple[list[Row], Accounting]:
        """Dense (``mask=None``) or single-mask IMP: the shared network trained on all data."""
        t, model = self.config.training, self.shared_model
        train_single(model, rewind, mask, self.classifier, self.factor * t.epochs, t.optimizer,
                     derive_seed(self.config.seed, method, str(level)), self.progress)
        model.eval()
        fmask = {n: m.to(self.device, torch.float32) for n, m in (mask or {}).items()}
        with torch.no_grad():
            rows = self.task.score_shared(
                lambda x: masked_forward(model, fmask, x.to(self.device)) if fmask else model(x.to(self.device)),
                f"{method}_{level:.4f}")
        return rows, account(method, model, self.shared_prunable, mask)

    def fit_multi(self, level: float, masks: MaskSet, rewind) -> tuple[list[Row], Accounting]:
        """K independent networks, network k trained on context k only; each input goes to its context's."""
        t = self.config.training
        states = []
        for k, stream in enumerate(self.detectors):
            train_single(self.model, rewind, masks[k], stream, t.epochs, t.optimizer,
                         derive_seed(self.config.seed, "multi_imp", k, str(level)), self.progress)
            states.append(snapshot(self.model))
        self.model.eval()
        current: list[int] = [-1]

        def predict(k: int, x: torch.Tensor) -> torch.Tensor:
            if current[0] != k:  # the scorer asks context by context: swap networks only when k changes
                self.model.load_state_dict(states[k])
                current[0] = k
            return self.model(x.to(self.device))

        with torch.no_grad():
            rows = self.task.score_routed(predict, f"multi_imp_{level:.4f}")
        return rows, account("multi_imp", self.model, self.prunable, masks)

    def fit_joint(self, method: str, level: float, masks: MaskSet, rewind) -> tuple[list[Row], Accounting]:
        """RTL (or the random-ticket control): K masks over one θ, retrained jointly (Algorithm 2)."""
        t = self.config.training
        state_file = self.run.train_state_file(method, level)
        resume = None
        if state_file.exists():
            saved = torch_load(state_file)
            self.model.load_state_dict(saved["model"])
            resume = (saved["epoch"], saved["optimizers"])
            self.progress.advance((saved["epoch"] + 1) * self.method_steps(method) // t.epochs,
                                  f"{method} {level:.0%}: epoch {saved['epoch'] + 1} on disk")

        def checkpoint(epoch: int, optimizers) -> None:
            atomic_torch_save(state_file, {"epoch": epoch, "model": snapshot(self.model),
                                           "optimizers": [o.state_dict() for o in optimizers]})

        joint_retrain(self.model, rewind, masks, self.detectors, t.epochs, t.optimizer,
                      derive_seed(self.config.seed, method, str(level)), self.progress, resume=resume, on_epoch=checkpoint)
        routed = RoutedModel(self.model, masks).eval()
        predict: RoutedPredict = lambda k, x: routed(x.to(self.device), k)
        with torch.no_grad():
            rows = self.task.score_routed(predict, f"{method}_{level:.4f}")
        if method == "rtl":
            save_tickets(self.run.path / "checkpoints" / f"rtl_{level:.4f}", self.model, masks,
                         {"experiment": self.config.name, "sparsity": level,
                          "context_members": getattr(self.task, "context_members", None)})
        state_file.unlink(missing_ok=True)
        return rows, account(method, self.model, self.prunable, masks)


def build_speech_task(config: ExperimentConfig) -> Task:
    """Speech enhancement: synthetic speech in generated noise (default), or DNS speech + TAU noise folders."""
    from .data.speech import FolderSpeechConfig, SpeechMixConfig, folder_speech_dataset, synthetic_speech_dataset
    from .tasks.speech import SpeechTask

    speech = config.speech or SpeechConfig()
    mix = SpeechMixConfig(**{f.name: getattr(speech, f.name) for f in dataclasses.fields(SpeechMixConfig)})
    if config.data.root is None:
        if speech.noise_root is not None:
            raise ValueError("speech.noise_root is set but data.root (the clean speech folder) is not; "
                             "pass --data DNS_DIR, or drop noise_root for the synthetic default")
        data = synthetic_speech_dataset(mix)
    else:
        if speech.noise_root is None:
            raise ValueError("speech.noise_root must name the TAU Urban Acoustic Scenes 2020 folder "
                             "(clean speech comes from data.root)")
        data = folder_speech_dataset(FolderSpeechConfig(config.data.root, speech.noise_root, mix))
    if config.training.batch_size is None:
        raise ValueError("training.batch_size must be a number for speech")
    return SpeechTask(data, batch_size=config.training.batch_size, n_fft=speech.n_fft, hop_length=speech.hop_length,
                      examples_per_environment=speech.examples_per_environment)


def build_inr_tasks(config: ExperimentConfig) -> list[Any]:
    """One INR task per image: the embedded photographs with unsupervised regions, or an ADE20K folder."""
    from .data.regions import EMBEDDED_IMAGES, load_ade20k_folder, load_embedded_images
    from .tasks.inr import InrTask

    data = config.data
    if data.name == "skimage":
        images = load_embedded_images(data.image_size, data.regions, names=data.images or EMBEDDED_IMAGES)
    elif data.name == "ade20k":
        if data.root is None:
            raise ValueError("data.root must name a folder of ADE20K images and label maps (pass --data DIR)")
        images = load_ade20k_folder(data.root, size=data.image_size, limit=data.limit)
    else:
        raise ValueError(f"data.name {data.name!r} is not an INR image source (skimage, ade20k)")
    return [InrTask(image, batch_size=config.training.batch_size) for image in images]


class ImageSetExperiment:
    """INR: one independent experiment per image (own θ₀, regions and masks), then the mean over images.

    Each image runs in ``images/<name>/`` exactly like a single experiment (and resumes the same
    way); the top-level ``results.json`` holds every image's records plus ``image: "mean"`` rows,
    the mean of per-image PSNRs (how the paper computes its headline).
    """

    def __init__(self, config: ExperimentConfig, out: str | Path, progress: ProgressSink = SILENT,
                 log: Log = lambda message: None, tasks: Sequence[Task] | None = None) -> None:
        self.config = config
        self.run = RunDirectory(out)
        tasks = list(tasks) if tasks is not None else build_inr_tasks(config)
        self.parts = [Experiment(config, self.run.path / "images" / t.image.name, progress, log, task=t) for t in tasks]
        self._progress, self._log = progress, log

    # The CLI attaches its progress bar and log after construction; every image's run shares them.
    @property
    def progress(self) -> ProgressSink:
        return self._progress

    @progress.setter
    def progress(self, sink: ProgressSink) -> None:
        self._progress = sink
        for part in self.parts:
            part.progress = sink

    @property
    def log(self) -> Log:
        return self._log

    @log.setter
    def log(self, log: Log) -> None:
        self._log = log
        for part in self.parts:
            part.log = log

    @property
    def description(self) -> str:
        first = self.parts[0]
        return (f"{len(self.parts)} images, {', '.join(str(p.num_contexts) for p in self.parts)} regions, "
                f"{first.total:,} prunable weights, {len(first.schedule)} IMP rounds, device {first.device}")

    @property
    def levels(self) -> list[float]:
        return self.parts[0].levels

    def planned_steps(self) -> int:
        return sum(p.planned_steps() for p in self.parts)

    def run_all(self) -> list[dict[str, Any]]:
        self.run.claim(self.config)
        records: list[dict[str, Any]] = []
        for part in self.parts:
            self.log(f"image {part.task.image.name}")
            records += part.run_all()
        records += mean_over_images(records)
        self.summary = rtl_wins(records)
        write_results(self.run.path, records, self.config, summary=self.summary,
                      columns=["image", "psnr", "parameters", "storage_bytes"])
        return records


def mean_over_images(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One ``image: "mean"`` row per (method, sparsity): the mean of per-image PSNRs and parameters."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["method"], r["sparsity"]), []).append(r)
    rows = []
    for (method, level), rs in groups.items():
        rows.append({"experiment": rs[0]["experiment"], "method": method, "sparsity": level, "image": "mean",
                     "psnr": sum(r["psnr"] for r in rs) / len(rs), "images": len(rs),
                     "parameters": round(sum(r["parameters"] for r in rs) / len(rs)),
                     "storage_bytes": round(sum(r["storage_bytes"] for r in rs) / len(rs))})
    return rows


def rtl_wins(records: Sequence[dict[str, Any]]) -> str:
    """On how many images RTL's PSNR beat the single mask's, at each sparsity."""
    psnr = {(r["method"], r["sparsity"], r["image"]): r["psnr"] for r in records if r.get("image") != "mean"}
    lines = []
    for level in sorted({lv for m, lv, _ in psnr if m == "rtl"}):
        images = [i for m, lv, i in psnr if m == "rtl" and lv == level and ("single_imp", lv, i) in psnr]
        wins = sum(psnr[("rtl", level, i)] > psnr[("single_imp", level, i)] for i in images)
        if images:
            lines.append(f"At {level:.0%} sparsity RTL beat the single mask on {wins} of {len(images)} images.")
    return "\n".join(lines)


def make_runner(config: ExperimentConfig, out: str | Path, progress: ProgressSink = SILENT,
                log: Log = lambda message: None) -> Experiment | ImageSetExperiment:
    """The runner of ``config``'s task (INR runs one experiment per image)."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    if config.task == "inr":
        return ImageSetExperiment(config, out, progress, log)
    return Experiment(config, out, progress, log)


def run_experiment(config: ExperimentConfig, out: str | Path, progress: ProgressSink = SILENT,
                   log: Log = lambda message: None) -> list[dict[str, Any]]:
    """Run (or resume) ``config`` in directory ``out``; return the result records."""
    return make_runner(config, out, progress, log).run_all()
