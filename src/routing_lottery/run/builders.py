"""From a config to the tasks it runs: the task and dataset registries and the built-in builders.

``config.task`` names a task builder -- ``classification``, ``inr``, ``speech``, or a user's
``package.module:callable`` -- called as ``builder(config)`` and returning one Task (or a list:
one independent experiment per part, as INR's one network per image). For classification,
``config.data.name`` names a dataset loader -- ``digits``, ``cifar10``, ``cifar100`` or a user's
``package.module:callable`` -- called as ``loader(data_config, seed)`` and returning train and
test ``LabelledDataset``s; ``config.model.name`` names the network (``models.MODELS``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from ..config import ExperimentConfig, SpeechConfig
from ..data.labelled import Splits, as_splits, stratified_holdout, stratified_subset
from ..errors import brief
from ..registries import DATASETS, TASKS
from ..contexts.clustering import partition_names
from ..contexts.partitions import Partition, reference_partition
from ..data.cifar import load_cifar10, load_cifar100
from ..data.digits import load_digits_splits
from ..data.fashion_mnist import fashion_mnist_dataset
from ..data.regions import EMBEDDED_IMAGES, load_ade20k_folder, load_embedded_images
from ..data.speech import FolderSpeechConfig, SpeechMixConfig, folder_speech_dataset, synthetic_speech_dataset
from ..tasks.classification import ClassificationTask
from ..tasks.inr import InrTask
from ..tasks.speech import SpeechTask
from ..contract import Task

TaskBuilder = Callable[[ExperimentConfig], "Task | Sequence[Task]"]
DatasetLoader = Callable[[Any, int], Any]



def build_tasks(config: ExperimentConfig) -> list[Task]:
    """The config's task(s): a list of one, or one per part (INR: per image)."""
    built = TASKS.call(config.task, config)  # an error inside a user's builder names config.task
    tasks = list(built) if isinstance(built, (list, tuple)) else [built]
    if not tasks:
        raise ValueError(f"task builder {brief(config.task)} returned no task")
    return tasks


# -- classification -----------------------------------------------------------------------------
@DATASETS.register("digits")
def _digits(data: Any, seed: int) -> Splits:
    return load_digits_splits(seed=seed, image_size=data.image_size)


def _cifar(name: str) -> DatasetLoader:
    def load(data: Any, seed: int) -> Splits:
        if data.root is None:
            raise ValueError(f"data.root must name the directory holding the {name} python pickles "
                             "(pass --data DIR or set data.root in the config)")
        return load_cifar10(data.root) if name == "cifar10" else load_cifar100(data.root)

    return load


DATASETS.register("cifar10")(_cifar("cifar10"))
DATASETS.register("cifar100")(_cifar("cifar100"))
DATASETS.register("fashion_mnist")(fashion_mnist_dataset)  # data.root, else Debian's folder


@TASKS.register("classification")
def build_classification(config: ExperimentConfig) -> Task:
    """Labelled data (any input shape) with one context per class or per class group, on any model."""
    data, training = config.data, config.training
    splits = as_splits(DATASETS.call(data.name, data, config.seed), f"dataset loader {brief(data.name)}")
    if training.batch_size is None:
        raise ValueError("training.batch_size must be a number for classification")
    train_set = stratified_subset(splits.train, data.train_per_class, seed=config.seed)
    train_set, calibration_set = stratified_holdout(train_set, data.calibration, seed=config.seed)
    test_set = stratified_subset(splits.test, data.test_per_class, seed=config.seed)
    context_of_class, context_names, partition = class_contexts(config, list(train_set.class_names))
    return ClassificationTask(train_set, test_set, context_of_class, context_names,
                              batch_size=training.batch_size, negative_ratio=training.negative_ratio,
                              model=config.model.name or "ghostnet", model_options=dict(config.model.options), partition=partition,
                              context_members=None if partition is None else [list(c) for c in partition.clusters()],
                              calibration_set=calibration_set if len(calibration_set) else None)


def class_contexts(config: ExperimentConfig, class_names: list[str]) -> tuple[list[int], list[str], Any]:
    """Class -> context map, context names and (for groups of classes) the ``Partition`` they come from.

    ``data.contexts``: ``classes`` (one per class), ``paper`` / ``superclasses`` (CIFAR-100's
    published partitions), ``clusters`` (class names clustered offline; the partition is saved as
    ``partition.json`` in the run directory), or a partition.json path.
    """
    how = config.data.contexts
    if how == "classes":
        return list(range(len(class_names))), class_names, None
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


# -- the paper's other two experiments ------------------------------------------------------------
def _require_model(config: ExperimentConfig, task: str, model: str) -> None:
    if config.model.name not in (None, model):
        raise ValueError(f"task {task} trains the paper's {model}; model.name {config.model.name!r} does not apply")


@TASKS.register("speech")
def build_speech_task(config: ExperimentConfig) -> Task:
    """Speech enhancement: synthetic speech in generated noise (default), or DNS speech + TAU noise folders."""
    _require_model(config, "speech", "unet")
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


@TASKS.register("inr")
def build_inr_tasks(config: ExperimentConfig) -> list[Task]:
    """One INR task per image: the embedded photographs with unsupervised regions, or an ADE20K folder."""
    _require_model(config, "inr", "coordinate_mlp")
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
