"""One context's subnetwork as files that run without this library: ``rtl export RUN --context NAME``.

A ticket is a dense module with zeros; what a device serving one context needs is smaller. The
export directory holds

- ``weights.safetensors``: the compact checkpoint. Each masked tensor is stored as its kept values
  (float, in row-major order) plus its mask bit-packed, 1 bit per weight, so at density d a
  tensor costs ``4 d + 1/8`` bytes per weight instead of 4; the other tensors are stored as they
  are. The metadata carries each tensor's shape and a sha256 over everything, checked on load.
- ``load_weights.py``: the loader, standalone (torch, NumPy and safetensors only): it rebuilds the
  dense state dict, exact zeros included, for the user's own copy of the architecture.
- ``model.pt2``: the subnetwork as a ``torch.export`` program (graph and weights; ``torch.export.load``
  runs it with torch alone), where the model can be exported.
- ``export.json``: what was exported, each file's size and sha256, the dense size beside it, and
  the verification: the outputs of the reloaded files against the routed model's on that context.
"""

from __future__ import annotations

import copy
import inspect
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .channels import ChannelStructure, slice_model
from .errors import CheckpointError, ConfigError
from .io import atomic_write_bytes, atomic_write_json, atomic_write_text
from .routed import RoutedModel, as_tuple

FORMAT = "routing-lottery-compact/1"
WEIGHTS_FILE, LOADER_FILE, PROGRAM_FILE, INDEX_FILE = "weights.safetensors", "load_weights.py", "model.pt2", "export.json"
PREPARED_FILE = "prepared.pt"


def compact_digest(tensors: dict) -> str:
    """sha256 over names, dtypes, shapes and bytes of ``tensors`` (standalone: copied into ``load_weights.py``)."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensors[name].shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def compact_state(model: nn.Module, mask: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of ``weights.safetensors`` for ``model``'s state with ``mask`` applied.

    The masked tensors travel as two: ``masked::values`` (every kept value, tensor after tensor in
    ``masked`` order, row-major) and ``masked::mask`` (their masks, concatenated and bit-packed); a
    file of one small network would otherwise be mostly per-tensor headers.
    """
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    order = [name for name in state if name in mask]
    if len({state[n].dtype for n in order}) > 1:
        raise ValueError(f"masked tensors of several dtypes {sorted({str(state[n].dtype) for n in order})}; "
                         "export them in one dtype")
    bits = [mask[n].detach().cpu().bool().reshape(-1) for n in order]
    tensors = {name: value for name, value in state.items() if name not in mask}
    if order:
        tensors["masked::values"] = torch.cat([state[n].reshape(-1)[b] for n, b in zip(order, bits)])
        tensors["masked::mask"] = torch.from_numpy(np.packbits(torch.cat(bits).numpy()))
    shapes = {n: list(state[n].shape) for n in order}  # a JSON object keeps its order: the order of the concatenation
    return tensors, {"format": FORMAT, "shapes": json.dumps(shapes), "sha256": compact_digest(tensors)}


def load_compact_state(path: str) -> dict:
    """The dense state dict in a ``weights.safetensors`` written by routing-lottery's export.

    Standalone on purpose (torch, NumPy and safetensors only): ``rtl export`` writes this
    function's source and ``compact_digest``'s as ``load_weights.py`` beside the weights. Masked tensors come back dense,
    pruned positions exactly zero. Raises ValueError when the file is not such an export or its
    checksum does not match (a corrupt or edited file).
    """
    import json

    import numpy as np
    import torch
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # noqa: BLE001 -- safetensors has its own error types
        raise ValueError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err})") from None
    if meta.get("format") != "routing-lottery-compact/1":
        raise ValueError(f"{path} is not a routing-lottery compact export (format {meta.get('format')!r})")
    if compact_digest(tensors) != meta.get("sha256"):
        raise ValueError(f"{path}: checksum mismatch; the file is corrupt or was edited")
    shapes = json.loads(meta["shapes"])
    state = {}
    if shapes:
        values, packed = tensors.pop("masked::values"), tensors.pop("masked::mask")
        total = sum(int(np.prod(shape)) for shape in shapes.values())
        kept = torch.from_numpy(np.unpackbits(packed.numpy(), count=total).astype(bool))
        if int(kept.sum()) != values.numel():
            raise ValueError(f"{path}: the masks keep {int(kept.sum())} weights but {values.numel()} values are stored")
        dense = torch.zeros(total, dtype=values.dtype)
        dense[kept] = values
        offset = 0
        for name, shape in shapes.items():
            numel = int(np.prod(shape))
            state[name] = dense[offset:offset + numel].reshape(shape).clone()
            offset += numel
    state.update(tensors)
    return state


def _file_entry(path: Path) -> dict[str, Any]:
    import hashlib

    return {"file": path.name, "bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def export_context(routed: RoutedModel, context: int | str, out: str | Path, example: Any,
                   verify: Any | None = None, metadata: Mapping[str, Any] | None = None,
                   kernels: bool = False, channels: ChannelStructure | None = None) -> dict[str, Any]:
    """Write context ``context``'s subnetwork to ``out`` (see the module docstring); return ``export.json``.

    Parameters
    ----------
    routed : the routed model (its masks and trained shared weights).
    context : the context's index or name.
    out : the export directory (created; files replaced atomically).
    example : inputs of the right shape for ``torch.export`` (a tensor or a tuple of tensors).
    verify : inputs of that context to compare outputs on (default: ``example``).
    metadata : extra fields for ``export.json`` (the run, the level).
    kernels : also choose dense, CSR or BSR per layer by measuring on ``verify`` (``kernels.prepare``),
        save the prepared module as ``prepared.pt`` (``torch.load(..., weights_only=False)``; it needs
        ``routing_lottery.kernels`` to unpickle) and record each layer's choice and the whole
        module's measured speed against the dense one.
    channels : for channel tickets, their ``ChannelStructure``: the subnetwork is sliced into a
        smaller dense network (``channels.slice_model``), whose state dict is ``weights.safetensors``
        (no masks left to store) and whose architecture travels in ``model.pt2``.
    """
    from safetensors.torch import save as safetensors_save

    k = routed.masks.check_context(context)
    name = routed.masks.context_names[k]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    module = routed.standalone(k).eval()
    mask = {n: m.bool() for n, m in routed.mask(k).items()}
    # the same state written densely in the same format: what the compact file is measured against
    dense_bytes = len(safetensors_save({n: v.detach().cpu().contiguous() for n, v in module.state_dict().items()}))
    dense_parameters = sum(p.numel() for p in module.parameters())
    sliced = None
    if channels is not None:
        sliced = slice_model(module, channels, _channels_of(channels, mask), example)
        module, mask = sliced, {}
    tensors, meta = compact_state(module, mask)
    atomic_write_bytes(out / WEIGHTS_FILE, safetensors_save(tensors, metadata=meta))
    atomic_write_text(out / LOADER_FILE, '"""Rebuild the dense state dict of a routing-lottery compact export (needs torch, '
                      'numpy, safetensors).\n\nUsage: state = load_compact_state("weights.safetensors"); '
                      'model.load_state_dict(state)\n"""\n\n\n' + inspect.getsource(compact_digest) + "\n\n"
                      + inspect.getsource(load_compact_state))
    example_inputs = tuple(t.detach().cpu() for t in as_tuple(example))
    program_note = ""
    try:
        # any batch size (torch specializes sizes 0 and 1, so the example needs two or more rows)
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(module.cpu(), example_inputs, dynamic_shapes=tuple({0: batch} for _ in example_inputs))
        tmp = out / f".{PROGRAM_FILE}.partial.pt2"
        torch.export.save(program, str(tmp))
        tmp.replace(out / PROGRAM_FILE)
    except Exception as err:  # noqa: BLE001 -- torch.export refuses many dynamic models; the weights still export
        (out / PROGRAM_FILE).unlink(missing_ok=True)
        program_note = f"torch.export failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    check = tuple(t.detach().cpu() for t in as_tuple(verify if verify is not None else example))
    verification = verify_export(out, routed, k, check, into=sliced)
    masked = sum(m.numel() for m in mask.values())
    kept = sum(int(m.sum()) for m in mask.values())
    index = {"format": FORMAT, "context": name, "context_index": k, **dict(metadata or {}),
             "granularity": "weight" if channels is None else "channel",
             "masked_weights": masked, "kept_weights": kept, "density": kept / max(masked, 1),
             "parameters": sum(p.numel() for p in module.parameters()), "dense_parameters": dense_parameters,
             "dense_file_bytes": dense_bytes,
             "files": [_file_entry(out / f) for f in (WEIGHTS_FILE, LOADER_FILE, PROGRAM_FILE) if (out / f).exists()],
             "program": program_note or "model.pt2 (torch.export.load)", "verification": verification}
    index["compact_ratio"] = index["files"][0]["bytes"] / dense_bytes
    if sliced is not None:
        index["sliced_shapes"] = {n: list(p.shape) for n, p in sliced.named_parameters()}
        index["loader"] = ("the weights are the sliced network's state dict; its architecture is in model.pt2 "
                           "(sliced_shapes lists each tensor's new shape)")
    if kernels:
        index["kernels"] = _prepare_kernels(module.cpu(), check, out)
        index["files"].append(_file_entry(out / PREPARED_FILE))
    atomic_write_json(out / INDEX_FILE, index)
    if not verification["equal"]:
        raise CheckpointError(f"{out}: the exported subnetwork's outputs differ from the routed model's "
                              f"(max |diff| {verification['max_abs_diff']:.3g}); the export is kept for inspection")
    return index


def _prepare_kernels(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: Path) -> dict[str, Any]:
    """Per-layer kernels for ``module`` measured on ``inputs``; the prepared module saved and checked."""
    import io
    import statistics

    from .kernels import prepare

    prepared, choices = prepare(module, inputs)
    with torch.no_grad():
        if not torch.allclose(prepared(*inputs), module(*inputs), atol=1e-4, rtol=1e-4):
            raise CheckpointError("the kernel-prepared subnetwork's outputs differ from the dense one's")
        timings: dict[str, list[float]] = {"dense": [], "prepared": []}
        for _ in range(7):  # interleaved, so load on the machine hits both alike
            for name, net in (("dense", module), ("prepared", prepared)):
                start = time.perf_counter()
                net(*inputs)
                timings[name].append(time.perf_counter() - start)
    buffer = io.BytesIO()
    torch.save(prepared, buffer)
    atomic_write_bytes(out / PREPARED_FILE, buffer.getvalue())
    dense, fast = statistics.median(timings["dense"]), statistics.median(timings["prepared"])
    return {"batch": int(inputs[0].shape[0]), "threads": torch.get_num_threads(), "dense_seconds": dense,
            "prepared_seconds": fast, "speedup": dense / fast, "layers": [c.to_dict() for c in choices]}


def verify_export(out: Path, routed: RoutedModel, k: int, inputs: tuple[torch.Tensor, ...],
                  atol: float = 1e-5, rtol: float = 1e-4, into: nn.Module | None = None) -> dict[str, Any]:
    """Reload the exported files and compare their outputs with ``routed(inputs, k)``.

    ``into``: the network the weights file is loaded into (default: the routed model's own
    architecture; for channel tickets, the sliced network).
    """
    with torch.no_grad():
        device = next(routed.model.parameters()).device
        expected = routed(tuple(t.to(device) for t in inputs) if len(inputs) > 1 else inputs[0].to(device), k).cpu()
        module = (copy.deepcopy(into) if into is not None else routed.standalone(k)).cpu().eval()
        module.load_state_dict(load_compact_state(str(out / WEIGHTS_FILE)))
        from_weights = module(*inputs)
        diffs = {"weights": float((from_weights - expected).abs().max())}
        ok = torch.allclose(from_weights, expected, atol=atol, rtol=rtol)
        if (out / PROGRAM_FILE).exists():
            start = time.perf_counter()
            program = torch.export.load(str(out / PROGRAM_FILE)).module()
            from_program = program(*inputs)
            diffs["program"] = float((from_program - expected).abs().max())
            diffs["program_load_seconds"] = time.perf_counter() - start
            ok = ok and torch.allclose(from_program, expected, atol=atol, rtol=rtol)
    return {"rows": int(inputs[0].shape[0]), "equal": bool(ok), "atol": atol, "rtol": rtol,
            "max_abs_diff": max(v for key, v in diffs.items() if not key.endswith("seconds")), **diffs}


def export_run(run_dir: str | Path, context: str, level: float | None = None, out: str | Path | None = None,
               rows: int = 256, kernels: bool = False) -> dict[str, Any]:
    """``rtl export``: context ``context`` of a finished run's RTL tickets at ``level`` (default: the highest)."""
    from .config import load_config
    from .diagnose import rtl_checkpoints
    from .run.builders import build_tasks
    from .tickets import AdaptiveTickets

    run_dir = Path(run_dir)
    checkpoints = rtl_checkpoints(run_dir)
    if not checkpoints:
        raise CheckpointError(f"{run_dir} holds no RTL checkpoints (checkpoints/rtl_*); for a run with several seeds "
                              "or images, name one: RUN/seeds/<s> or RUN/images/<name>")
    if level is None:
        level = max(checkpoints)
    match = [lv for lv in checkpoints if abs(lv - level) < 5e-5]
    if not match:
        raise ValueError(f"no RTL checkpoint at sparsity {level}; {run_dir} has {sorted(checkpoints)}")
    level = match[0]
    config = load_config(run_dir / "config.yaml")
    tasks = build_tasks(config.replace(replicates=1))
    task = tasks[0] if len(tasks) == 1 else next((t for t in tasks if getattr(t, "name", None) == run_dir.name), None)
    if task is None:
        raise ConfigError(f"{run_dir}: cannot tell which of the config's parts this run is; export from its own directory")
    tickets = AdaptiveTickets.load(checkpoints[level], task.build_model())
    routed = tickets.routed
    channels = None
    # a name first (contexts may be named "0", "1", ...), else an index
    k = routed.masks.check_context(context if context in routed.masks.context_names or not context.isdigit()
                                   else int(context))
    example = _context_inputs(task, k, rows)
    first = example[:2] if isinstance(example, torch.Tensor) else tuple(t[:2] for t in example)
    if config.pruning.granularity == "channel":
        # the groups are a function of the architecture and the recipe's roots: traced again here
        channels = ChannelStructure.trace(tickets.model, first, tickets.selected)
    out = Path(out) if out is not None else run_dir / "export" / f"{routed.masks.context_names[k]}_{level:.4f}"
    return export_context(routed, k, out, first, verify=example,
                          metadata={"run": str(run_dir), "sparsity": level, "experiment": config.name},
                          kernels=kernels, channels=channels)


def _channels_of(structure: ChannelStructure, mask: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The channels ``mask`` keeps, after checking it is a channel ticket of ``structure`` (no stray weight)."""
    if set(mask) != set(structure.names):
        extra, missing = sorted(set(mask) - set(structure.names)), sorted(set(structure.names) - set(mask))
        raise ValueError(f"these masks are not channel tickets of this model's traced groups: they also cover "
                         f"{extra[:3]} and lack {missing[:3]} (made by another version of the trace?)")
    keep = structure.channels(mask)
    rebuilt = structure.expand(keep)
    if any(not torch.equal(rebuilt[n], mask[n].cpu()) for n in mask):
        raise ValueError("these masks are not whole channels of this model's groups (weight tickets?): "
                         "export them without channels=")
    return keep


def _context_inputs(task: Any, k: int, rows: int) -> Any:
    """Up to ``rows`` test inputs of context ``k`` (the task's ``context_examples``), else a training batch."""
    if callable(getattr(task, "context_examples", None)):
        inputs, contexts = task.context_examples("test")
        chosen = (torch.as_tensor(contexts) == k).nonzero(as_tuple=True)[0][:rows]
        if len(chosen):
            parts = as_tuple(inputs)
            picked = tuple(p[chosen] for p in parts)
            return picked if len(picked) > 1 else picked[0]
    batch = task.context_stream(k).epoch(torch.Generator().manual_seed(0))[0][0]
    return batch[:rows] if isinstance(batch, torch.Tensor) else tuple(t[:rows] for t in batch)


__all__ = ["export_context", "export_run", "load_compact_state", "verify_export"]
