"""Your loop, our pieces (issue 24, item 1): a masked forward for context k (``RoutedModel.use``,
``masked_forward``), any torch optimizer made per-context (``ContextOptimizer``), and data from a
``DataLoader`` or any re-iterable (``as_stream``). The key test: a plain PyTorch loop written with
these pieces reproduces ``joint_retrain`` bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from routing_lottery.errors import DataError
from routing_lottery.masks import MaskSet
from routing_lottery.pruning import prunable_names
from routing_lottery.routed import RoutedModel, masked_forward
from routing_lottery.training import (ContextOptimizer, OptimizerConfig, Stream, SubnetworkOptimizer, as_stream,
                                      context_optimizers, generator, joint_retrain, rewound, seeded_global_rng,
                                      snapshot, train)
from toy import toy_stream

CPU = torch.device("cpu")


def bn_model() -> nn.Module:
    """The toy regression net with BatchNorm (shared running statistics) and dropout (global generator)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))


def random_masks(model: nn.Module, contexts: int = 3, density: float = 0.5, seed: int = 1) -> MaskSet:
    """Overlapping masks over the Linear weights: every context has shared and private positions."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    names = prunable_names(model)
    assert names == ["0.weight", "4.weight"]  # BatchNorm's and the biases stay dense
    return MaskSet.from_tickets([{n: torch.rand(params[n].shape, generator=g) < density for n in names}
                                 for _ in range(contexts)], [f"c{k}" for k in range(contexts)])


def streams(contexts: int = 3) -> list[Stream]:
    return [toy_stream(k, n=32 + 8 * k) for k in range(contexts)]  # unequal batch counts: smaller ones cycle


def own_loop(model: nn.Module, theta0: dict, masks: MaskSet, data: list[Stream], epochs: int, make_optimizer,
             seed: int, forward: str) -> list[ContextOptimizer]:
    """Algorithm 2 as a user writes it, with public pieces only, in joint_retrain's order: θ from θ₀ on
    the union of the masks; per epoch, per round m, per context k, one step on k's m-th batch."""
    model.load_state_dict(rewound(theta0, masks.union()))
    routed = RoutedModel(model, masks).train()
    opts = context_optimizers(model, masks, make_optimizer)
    for epoch in range(epochs):
        batches = [list(s.epoch(generator(seed, k, epoch))) for k, s in enumerate(data)]
        with seeded_global_rng(CPU, seed, "global", epoch):  # dropout draws as joint_retrain's do
            for m in range(max(len(b) for b in batches)):
                for k, stream in enumerate(data):
                    x, y = batches[k][m % len(batches[k])]
                    opts[k].zero_grad()
                    if forward == "use":
                        with routed.use(k):
                            out = routed(x)
                    else:
                        out = masked_forward(model, routed.mask(k), x)
                    stream.loss(out, y).backward()
                    opts[k].step()
    return opts


# -- (a) the key test: a plain loop reproduces joint_retrain ------------------------------------
@pytest.mark.parametrize("forward", ["use", "masked_forward"])
@pytest.mark.parametrize("config, make", [
    (OptimizerConfig(lr=1e-2, weight_decay=0.05), lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.05)),
    (OptimizerConfig(name="sgd", lr=1e-2, momentum=0.9),
     lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, weight_decay=0.0)),
], ids=["adam", "sgd"])
def test_a_plain_loop_with_the_pieces_reproduces_joint_retrain_bit_for_bit(forward, config, make):
    reference = bn_model()
    theta0 = snapshot(reference)
    masks = random_masks(reference)
    kept = {}
    joint_retrain(reference, theta0, masks, streams(), 3, config, seed=7, on_epoch=lambda e, o: kept.update(opts=o))

    model = bn_model()
    opts = own_loop(model, theta0, masks, streams(), 3, make, seed=7, forward=forward)
    got, want = model.state_dict(), reference.state_dict()
    assert list(got) == list(want)
    for name, value in want.items():  # parameters and BatchNorm's buffers (running stats, batch count)
        assert torch.equal(got[name], value), name
    for mine, theirs in zip(opts, kept["opts"]):  # the per-context optimizer states too
        a, b = mine.state_dict()["state"], theirs.state_dict()["state"]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[i][key], b[i][key]) for i in a for key in a[i])


def test_the_loop_differs_when_contexts_share_one_optimizer():
    """The comparison above can fail: one Adam for all contexts gives other weights."""
    reference = bn_model()
    theta0 = snapshot(reference)
    masks = random_masks(reference)
    joint_retrain(reference, theta0, masks, streams(), 2, OptimizerConfig(lr=1e-2), seed=7)
    model = bn_model()
    shared = torch.optim.Adam(model.parameters(), lr=1e-2)
    own_loop(model, theta0, masks, streams(), 2, lambda p: shared, seed=7, forward="use")
    assert not torch.equal(model[0].weight, reference[0].weight)


def test_subnetwork_optimizer_is_the_context_optimizer_of_a_config():
    model = bn_model()
    masks = random_masks(model)
    opt = SubnetworkOptimizer(model, masks[0], OptimizerConfig(lr=0.5))
    assert isinstance(opt, ContextOptimizer) and opt.compact
    assert isinstance(opt.optimizer, torch.optim.Adam) and opt.param_groups[0]["lr"] == 0.5


# -- (b) AdamW, weight decay, a scheduler and clipping in the user's loop ------------------------
def _steps(model: nn.Module, masks: MaskSet, opts, schedulers, epochs: int = 2):
    """Joint steps through ``routed.use`` with clipping; yields (k, weights before, weights after) per step."""
    routed = RoutedModel(model, masks).train()
    params = dict(model.named_parameters())
    data = streams()
    for epoch in range(epochs):
        batches = [list(s.epoch(generator(0, k, epoch))) for k, s in enumerate(data)]
        for m in range(max(len(b) for b in batches)):
            for k, stream in enumerate(data):
                x, y = batches[k][m % len(batches[k])]
                opts[k].zero_grad()
                with routed.use(k):
                    loss = stream.loss(routed(x), y)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
                before = {n: params[n].detach().clone() for n in masks.tensor_names}
                opts[k].step()
                schedulers[k].step()
                yield k, before, {n: params[n].detach().clone() for n in masks.tensor_names}


def _adamw_setup(compact: bool = True):
    model = bn_model()
    masks = random_masks(model)
    model.load_state_dict(rewound(snapshot(model), masks.union()))
    make = lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)  # noqa: E731
    if compact is None:  # the trap: a plain AdamW per context over every parameter
        opts = [make(list(model.parameters())) for _ in range(masks.num_contexts)]
        inner = opts
    else:
        opts = context_optimizers(model, masks, make, compact=compact)
        inner = [o.optimizer for o in opts]
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20) for o in inner]
    return model, masks, opts, schedulers


@pytest.mark.parametrize("compact", [True, False], ids=["compact", "full"])
def test_adamw_scheduler_and_clipping_never_move_weights_outside_the_stepping_context(compact):
    model, masks, opts, schedulers = _adamw_setup(compact)
    union = masks.union()
    moved_own = 0
    for k, before, after in _steps(model, masks, opts, schedulers):
        for n in masks.tensor_names:
            assert torch.all(after[n][~union[n]] == 0), "weights outside every mask stay exactly zero"
            outside = ~masks[k][n]
            assert torch.equal(after[n][outside], before[n][outside]), f"context {k}'s step moved weights outside m_{k}"
            moved_own += int((after[n] != before[n])[masks[k][n]].any())
    assert moved_own > 0
    for opt in opts:
        assert opt.param_groups[0]["lr"] < 1e-2  # the scheduler drives the wrapped optimizer
    params = dict(model.named_parameters())
    for k, opt in enumerate(opts):  # state grows with the mask's density (compact) or is full-shape
        state, names = opt.state_dict()["state"], [n for n, _ in model.named_parameters()]
        for i, entry in state.items():
            n = names[i]
            want = int(masks[k][n].sum()) if compact and n in masks.tensor_names else params[n].numel()
            assert entry["exp_avg"].numel() == entry["exp_avg_sq"].numel() == want, (k, n)


def test_the_same_loop_with_plain_adamw_moves_weights_of_other_contexts():
    """The control that fails: without the wrapper, AdamW's decay and momentum move m_j off m_k's step."""
    model, masks, opts, schedulers = _adamw_setup(compact=None)
    moved = 0
    for k, before, after in _steps(model, masks, opts, schedulers, epochs=1):
        moved += sum(int((after[n] != before[n])[~masks[k][n]].any()) for n in masks.tensor_names)
    assert moved > 0


# -- (c) compact=False with an optimizer that is not elementwise ---------------------------------
class TrustRatio(torch.optim.Optimizer):
    """A LAMB-like step written by a user: per tensor, the update scaled by ||w|| / ||update||."""

    def __init__(self, params, lr: float = 0.05, weight_decay: float = 0.1) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad + group["weight_decay"] * p
                w, u = p.norm(), update.norm()
                ratio = w / u if w > 0 and u > 0 else torch.tensor(1.0)
                self.state[p]["ratio"] = ratio
                p.sub_(group["lr"] * ratio * update)
        return loss


def _trust_ratio_run(compact: bool) -> tuple[nn.Module, int]:
    model = bn_model()
    masks = random_masks(model)
    model.load_state_dict(rewound(snapshot(model), masks.union()))
    opts = context_optimizers(model, masks, TrustRatio, compact=compact)
    schedulers = [torch.optim.lr_scheduler.StepLR(o.optimizer, step_size=100) for o in opts]
    moved_own = 0
    for k, before, after in _steps(model, masks, opts, schedulers, epochs=1):
        for n in masks.tensor_names:
            outside = ~masks[k][n]
            assert torch.equal(after[n][outside], before[n][outside]), f"context {k} moved weights outside m_{k}"
            moved_own += int((after[n] != before[n])[masks[k][n]].any())
    return model, moved_own


def test_full_state_wraps_a_per_tensor_norm_optimizer_without_moving_weights_outside_the_mask():
    full, moved_own = _trust_ratio_run(compact=False)
    assert moved_own > 0
    # compact proxies would take the norm over m_k's positions only: another optimizer, other weights
    compact, _ = _trust_ratio_run(compact=True)
    assert not torch.equal(full[0].weight, compact[0].weight)


@pytest.mark.parametrize("compact", [True, False], ids=["compact", "full"])
def test_step_with_a_closure_returns_its_loss_and_keeps_the_mask(compact):
    model = bn_model()
    masks = random_masks(model, contexts=2)
    routed = RoutedModel(model, masks).train()
    make = (lambda p: torch.optim.Adam(p, lr=1e-2)) if compact else (lambda p: torch.optim.LBFGS(p, lr=0.1, max_iter=3))
    opt = ContextOptimizer(model, masks[1], make, compact=compact)
    x, y = toy_stream(1).epoch(generator(0))[0]
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        with routed.use(1):
            loss = F.mse_loss(routed(x), y)
        loss.backward()
        return loss

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = opt.step(closure)
    assert torch.is_tensor(loss) and calls
    for n in masks.tensor_names:
        w = dict(model.named_parameters())[n]
        assert torch.equal(w[~masks[1][n]], before[n][~masks[1][n]])
        assert not torch.equal(w[masks[1][n]], before[n][masks[1][n]])


def test_full_state_steps_through_a_grad_scaler_as_without_one():
    """float16 training's GradScaler unscales the gradients it finds in ``param_groups``: the real
    parameters with ``compact=False``, so a scaled step equals the unscaled one (SGD feels any scale)."""
    scaler_cls = getattr(torch.amp, "GradScaler", None)
    if scaler_cls is None:
        pytest.skip("torch.amp.GradScaler needs torch >= 2.3")
    x, y = toy_stream(0).epoch(generator(0))[0]
    weights = []
    for scaler in (None, scaler_cls("cpu", init_scale=1024.0)):
        model = bn_model()
        masks = random_masks(model)
        routed = RoutedModel(model, masks).train()
        opt = ContextOptimizer(model, masks[0], lambda p: torch.optim.SGD(p, lr=0.1), compact=False)
        with routed.use(0):
            loss = F.mse_loss(routed(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        weights.append(snapshot(model))
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])


def test_context_optimizer_refuses_a_foreign_mask_or_a_builder_that_is_no_optimizer():
    model = bn_model()
    with pytest.raises(ValueError, match="does not have"):
        ContextOptimizer(model, {"9.weight": torch.ones(3, 3, dtype=torch.bool)}, torch.optim.Adam)
    with pytest.raises(ValueError, match="shapes"):
        ContextOptimizer(model, {"0.weight": torch.ones(3, 3, dtype=torch.bool)}, torch.optim.Adam)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        ContextOptimizer(model, random_masks(model)[0], lambda p: "adam")


# -- (d) data from a DataLoader or any re-iterable ----------------------------------------------
def _table(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 4, generator=g)
    return x, x @ torch.randn(4, 3, generator=g)


class _Reiterable:
    """Batches with ``__iter__`` and no ``__len__``: counted on the first pass."""

    def __init__(self, batches) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def test_as_stream_on_an_unseeded_dataloader_follows_the_epoch_generator():
    x, y = _table()
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    stream = as_stream("table", loader, F.mse_loss)
    assert stream.num_batches == len(loader) == 5

    state = torch.get_rng_state()
    first = list(stream.epoch(generator(3, 0)))
    assert torch.equal(torch.get_rng_state(), state), "an epoch leaves the caller's global generator alone"
    again, other = list(stream.epoch(generator(3, 0))), list(stream.epoch(generator(3, 1)))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other)), "each epoch reshuffles"
    assert torch.equal(torch.cat([b[0] for b in first]).sort(0).values, x.sort(0).values)  # every row once
    assert isinstance(first[0], tuple) and torch.equal(stream.epoch(generator(3, 0))[0][1], first[0][1])


def test_joint_retrain_and_train_take_dataloader_streams_and_repeat():
    def loaders():
        return [as_stream(f"c{k}", DataLoader(TensorDataset(*toy_stream(k).epoch(generator(0))[0]), batch_size=4,
                                              shuffle=True), F.mse_loss) for k in range(3)]

    results = []
    for _ in range(2):
        model = bn_model()
        theta0 = snapshot(model)
        masks = random_masks(model)
        torch.rand(7)  # wherever the global generator happens to be
        joint_retrain(model, theta0, masks, loaders(), 2, OptimizerConfig(lr=1e-2), seed=1)
        results.append(snapshot(model))
        union = masks.union()
        assert all(torch.all(dict(model.named_parameters())[n][~u] == 0) for n, u in union.items())
    same = all(torch.equal(results[0][n], results[1][n]) for n in results[0])
    assert same, "an unseeded loader's order follows the seed"

    model = bn_model()
    before = snapshot(model)
    train(model, random_masks(model)[0], loaders()[0], 1, OptimizerConfig(lr=1e-2), seed=0)
    assert not torch.equal(before["0.weight"], model[0].weight)


def test_train_takes_an_epoch_of_any_iterable_and_refuses_an_empty_one():
    x, y = _table()
    model = bn_model()
    before = snapshot(model)
    lazy = Stream("lazy", lambda g: (b for b in [(x[:8], y[:8]), (x[8:16], y[8:16])]), F.mse_loss, 2)
    train(model, None, lazy, 1, OptimizerConfig(lr=1e-2), seed=0)
    assert not torch.equal(before["0.weight"], model[0].weight)
    with pytest.raises(DataError, match="no training batches"):
        train(model, None, Stream("none", lambda g: iter(()), F.mse_loss, 1), 1, OptimizerConfig(), seed=0)


def test_as_stream_on_a_list_and_on_an_unsized_iterable():
    x, y = _table()
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 40, 8)]
    listed = as_stream("list", batches, F.mse_loss)
    assert listed.num_batches == 5 and len(listed.epoch(generator(0))) == 5
    assert all(torch.equal(a[0], b[0]) for a, b in zip(listed.epoch(generator(0)), batches))
    counted = as_stream("unsized", _Reiterable(batches[:3]), F.mse_loss)
    assert counted.num_batches == 3 and len(list(counted.epoch(generator(1)))) == 3
    assert as_stream("given", batches, F.mse_loss, num_batches=2).num_batches == 2


class _Pairs(Dataset):
    """Rows of two inputs, as ``((x1, x2), y)``: a DataLoader collates the pair into a list."""

    def __init__(self) -> None:
        self.x, self.y = _table(12)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return (self.x[i], self.x[i] > 0), self.y[i]


def test_as_stream_takes_several_inputs_and_names_a_batch_that_is_no_pair():
    (x1, x2), y = next(iter(as_stream("pairs", DataLoader(_Pairs(), batch_size=4), F.mse_loss).epoch(generator(0))))
    assert x1.shape == x2.shape == (4, 4) and y.shape == (4, 3)
    x, y = _table(12)
    triples = as_stream("triples", DataLoader(TensorDataset(x, x, y), batch_size=4), F.mse_loss)
    with pytest.raises(TypeError, match=r"batch 0 must be \(inputs, targets\).*list of 3"):
        list(triples.epoch(generator(0)))


def test_as_stream_refuses_one_shot_iterators_empty_sources_and_bad_counts():
    x, y = _table()
    batches = [(x[:8], y[:8])]
    with pytest.raises(TypeError, match="one-shot iterator.*re-iterable"):
        as_stream("gen", (b for b in batches), F.mse_loss)
    with pytest.raises(TypeError, match="one-shot iterator"):
        as_stream("iter", iter(batches), F.mse_loss)
    with pytest.raises(TypeError, match="iterable"):
        as_stream("number", 5, F.mse_loss)
    with pytest.raises(ValueError, match="no batches"):
        as_stream("empty", [], F.mse_loss)
    with pytest.raises(ValueError, match="no batches"):
        as_stream("empty", _Reiterable([]), F.mse_loss)
    with pytest.raises(ValueError, match="no batches"):
        as_stream("empty", DataLoader(TensorDataset(x[:0], y[:0]), batch_size=4), F.mse_loss)
    with pytest.raises(ValueError, match="num_batches"):
        as_stream("zero", batches, F.mse_loss, num_batches=0)


# -- (e) RoutedModel.use: one context's subnetwork inside any loop -------------------------------
def test_use_gives_the_outputs_of_routing_to_that_context_and_nests():
    model = bn_model()
    masks = random_masks(model)
    routed = RoutedModel(model, masks)
    x = torch.randn(6, 4)
    with torch.no_grad():
        expected = [routed(x, k) for k in range(3)]
        assert not torch.equal(expected[0], expected[1])
        with routed.use("c0"):
            assert torch.equal(routed(x), expected[0])
            with routed.use(2):
                assert routed.active_context == 2 and torch.equal(routed(x), expected[2])
            assert torch.equal(routed(x), expected[0])
        assert routed.active_context is None
        with pytest.raises(ValueError, match="no router set.*routed.use"):
            routed(x)
        with pytest.raises(ValueError, match="unknown context"):
            with routed.use("c9"):
                pass


def test_use_restores_the_context_after_an_exception():
    model = bn_model()
    routed = RoutedModel(model, random_masks(model))
    with routed.use(0):
        with pytest.raises(RuntimeError, match="inside"):
            with routed.use(1):
                raise RuntimeError("inside")
        assert routed.active_context == 0
    assert routed.active_context is None


def test_use_in_training_mode_is_differentiable_with_masked_gradients():
    model = bn_model()
    masks = random_masks(model)
    routed = RoutedModel(model, masks).train()
    x, y = toy_stream(0).epoch(generator(0))[0]
    with routed.use(1):
        F.mse_loss(routed(x), y).backward()
    for n in masks.tensor_names:
        grad = dict(model.named_parameters())[n].grad
        assert torch.all(grad[~masks[1][n]] == 0) and grad[masks[1][n]].abs().sum() > 0


class _Keywords(nn.Module):
    """Called as transformers models are: ``model(input_ids=..., scale=...)``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, input_ids: torch.Tensor, scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = self.body(input_ids)
        return {"logits": out if scale is None else out * scale}


def test_keyword_inputs_run_one_context():
    model = _Keywords()
    g = torch.Generator().manual_seed(0)
    masks = MaskSet.from_tickets([{n: torch.rand(p.shape, generator=g) < 0.5 for n, p in model.named_parameters()
                                   if n.endswith("weight")} for _ in range(2)])
    routed = RoutedModel(model, masks)
    x, scale = torch.randn(5, 4), torch.tensor(3.0)
    with torch.no_grad():
        want = masked_forward(model, routed.mask(1), input_ids=x, scale=scale)["logits"]
        with routed.use(1):
            assert torch.equal(routed(input_ids=x, scale=scale)["logits"], want)
            assert torch.equal(routed(x, scale=scale)["logits"], want)
        assert torch.equal(routed(context=1, input_ids=x, scale=scale)["logits"], want)
        assert torch.equal(routed(x, "1", scale=scale)["logits"], want)
        assert not torch.equal(routed(x, 0, scale=scale)["logits"], want)
        with pytest.raises(ValueError, match="keyword inputs.*one context"):
            routed(x, torch.tensor([0, 1, 0, 1, 1]), scale=scale)
        with pytest.raises(ValueError, match="keyword inputs"):
            routed(input_ids=x)



def test_the_front_door_takes_data_loaders_in_place_of_streams():
    from routing_lottery import AdaptiveTickets, PruningConfig, RTLConfig

    g = torch.Generator().manual_seed(0)
    loaders = {name: torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(24, 4, generator=g), torch.randint(0, 3, (24,), generator=g)),
        batch_size=8) for name in ("a", "b")}
    recipe = RTLConfig(pruning=PruningConfig(sparsities=(0.5,), step=0.5))
    torch.manual_seed(0)
    rtl = AdaptiveTickets(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)), recipe,
                          loss=torch.nn.functional.cross_entropy).fit(loaders)
    assert list(rtl.masks.context_names) == ["a", "b"] and rtl.routed(torch.zeros(2, 4), ["a", "b"]).shape == (2, 3)
    torch.manual_seed(0)
    without_loss = AdaptiveTickets(torch.nn.Sequential(torch.nn.Linear(4, 3)), recipe)
    with pytest.raises(ValueError, match=r"DataLoader with AdaptiveTickets\(\.\.\., loss=\.\.\.\)"):
        without_loss.fit(loaders)
