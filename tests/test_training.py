import pytest
import torch
from torch import nn

from routing_lottery.masks import MaskSet, count, is_nested, size
from routing_lottery.pruning import prunable_names, pruning_schedule
from routing_lottery.training import OptimizerConfig, Stream, extract_ticket, joint_retrain, rewound, snapshot, train
from toy import toy_model, toy_stream

ADAM = OptimizerConfig(lr=1e-2)


def _extract(model, theta0, context, schedule, **kw):
    return extract_ticket(model, theta0, prunable_names(model), toy_stream(context), schedule, 2, ADAM, seed=7, **kw)


def test_imp_hits_exact_sparsity_with_nested_masks():
    model = toy_model()
    theta0 = snapshot(model)
    total = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    schedule = pruning_schedule(total, [0.25, 0.5, 0.75], 0.3)
    masks = _extract(model, theta0, 0, schedule)
    assert len(masks) == len(schedule)
    for m, pruned in zip(masks, schedule):
        assert size(m) - count(m) == pruned
    for inner, outer in zip(masks[1:], masks):
        assert is_nested(inner, outer)


def test_rewound_state_is_theta0_on_survivors_and_zero_elsewhere():
    model = toy_model()
    theta0 = snapshot(model)
    mask = _extract(model, theta0, 0, [20])[-1]
    state = rewound(theta0, mask)
    for n, m in mask.items():
        assert torch.equal(state[n][m], theta0[n][m])
        assert torch.all(state[n][~m] == 0)
    assert torch.equal(state["0.bias"], theta0["0.bias"])


def test_masked_training_keeps_pruned_weights_exactly_zero_even_with_weight_decay():
    model = toy_model()
    theta0 = snapshot(model)
    mask = _extract(model, theta0, 0, [30])[-1]
    model.load_state_dict(rewound(theta0, mask))
    train(model, mask, toy_stream(1), 3, OptimizerConfig(lr=1e-2, weight_decay=0.1), seed=0)
    params = dict(model.named_parameters())
    for n, m in mask.items():
        assert torch.all(params[n][~m] == 0)


def _joint_setup():
    model = toy_model()
    theta0 = snapshot(model)
    tickets = [_extract(model, theta0, k, [40])[-1] for k in range(3)]
    return model, theta0, MaskSet.from_tickets(tickets), [toy_stream(k, n=32 + 8 * k) for k in range(3)]


def test_joint_retraining_respects_every_mask():
    model, theta0, masks, streams = _joint_setup()
    joint_retrain(model, theta0, masks, streams, 2, ADAM, seed=3)
    params = dict(model.named_parameters())
    union = masks.union()
    for n, u in union.items():
        assert torch.all(params[n][~u] == 0), "weights outside every mask must stay exactly zero"
        assert not torch.equal(params[n][u], theta0[n][u]), "shared weights should have trained"


def test_step_on_context_j_leaves_weights_only_context_i_uses():
    """The Adam trap: after context i has built momentum on its private weights, a step taken by
    context j must not move them. Each loss call happens right after the previous step, so the
    loss functions can watch every single step."""
    model, theta0, masks, streams = _joint_setup()
    params = dict(model.named_parameters())
    private = [{n: masks[i][n] & ~torch.stack([masks[j][n] for j in range(3) if j != i]).any(0)
                for n in masks.tensor_names} for i in range(3)]
    assert all(sum(int(v.sum()) for v in p.values()) > 0 for p in private)
    last = {}
    checked = {"steps": 0, "moved_own": 0}

    def watching(k, loss):
        def wrapped(out, y):
            if last:
                j = last["k"]
                for i in range(3):
                    for n in masks.tensor_names:
                        changed = (params[n].detach() != last["w"][n])[private[i][n]]
                        if i != j:
                            assert not changed.any(), f"context {j}'s step moved weights only context {i} uses"
                        elif changed.any():
                            checked["moved_own"] += 1
                checked["steps"] += 1
            last.update(k=k, w={n: params[n].detach().clone() for n in masks.tensor_names})
            return loss(out, y)
        return wrapped

    watched = [type(s)(s.name, s.epoch, watching(k, s.loss), s.num_batches) for k, s in enumerate(streams)]
    joint_retrain(model, theta0, masks, watched, 2, ADAM, seed=3)
    assert checked["steps"] > 20 and checked["moved_own"] > 0


def test_joint_resume_gives_the_same_weights():
    model, theta0, masks, streams = _joint_setup()
    joint_retrain(model, theta0, masks, streams, 3, ADAM, seed=5)
    full = snapshot(model)

    model2, _, _, _ = _joint_setup()
    saved = {}

    def keep(epoch, opts):
        if epoch == 0:
            saved["state"] = snapshot(model2)
            saved["opts"] = [o.state_dict() for o in opts]
            raise KeyboardInterrupt

    try:
        joint_retrain(model2, theta0, masks, streams, 3, ADAM, seed=5, on_epoch=keep)
    except KeyboardInterrupt:
        pass
    import copy
    model2.load_state_dict(saved["state"])
    joint_retrain(model2, theta0, masks, streams, 3, ADAM, seed=5, resume=(0, copy.deepcopy(saved["opts"])))
    for k, v in full.items():
        assert torch.allclose(v, model2.state_dict()[k], atol=1e-6), k


def test_joint_resume_of_a_model_with_dropout_is_exact():
    """Dropout draws from torch's global generator, which no checkpoint holds: each epoch seeds it."""
    def dropout_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 16), nn.Sequential(nn.ReLU(), nn.Dropout(0.5)), nn.Linear(16, 3))

    _, _, masks, streams = _joint_setup()
    model = dropout_model()
    theta0 = snapshot(model)
    joint_retrain(model, theta0, masks, streams, 3, ADAM, seed=5)
    full = snapshot(model)

    killed, saved = dropout_model(), {}

    def stop_after_first(epoch, opts):
        saved.update(state=snapshot(killed), opts=[o.state_dict() for o in opts])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        joint_retrain(killed, theta0, masks, streams, 3, ADAM, seed=5, on_epoch=stop_after_first)
    torch.rand(100)  # the resumed process's global generator is wherever it happens to be
    resumed = dropout_model()
    resumed.load_state_dict(saved["state"])
    joint_retrain(resumed, theta0, masks, streams, 3, ADAM, seed=5, resume=(0, saved["opts"]))
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in full.items())


def test_imp_resume_gives_the_same_masks():
    model = toy_model()
    theta0 = snapshot(model)
    schedule = [10, 20, 30, 40]
    uninterrupted = _extract(model, theta0, 1, schedule)
    seen = {}

    def stop_after_second(r, mask):
        seen[r] = mask
        if r == 1:
            raise KeyboardInterrupt

    try:
        _extract(model, theta0, 1, schedule, on_round=stop_after_second)
    except KeyboardInterrupt:
        pass
    rest = _extract(model, theta0, 1, schedule, resume=(1, seen[1]))
    for a, b in zip(uninterrupted[2:], rest):
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_derived_seeds_differ_for_names_sharing_a_prefix():
    from routing_lottery.training import derive_seed

    seeds = {derive_seed(0, "imp", f"context_{k:02d}") for k in range(10)}
    assert len(seeds) == 10
    assert derive_seed(0, "rtl", "0.25") != derive_seed(0, "rtl", "0.2500001")


def _reference_joint_retrain(model, init_state, masks, streams, epochs, optimizer, seed, on_epoch=None):
    """The first implementation of Algorithm 2, kept as the oracle: K full optimizers over all
    parameters, and after each step every masked weight outside m_k put back with torch.where."""
    from routing_lottery.routed import masked_forward
    from routing_lottery.training import generator

    params = dict(model.named_parameters())
    optimizers = [optimizer.build(list(model.parameters())) for _ in streams]
    model.load_state_dict(rewound(init_state, masks.union()))
    model.train()
    for epoch in range(epochs):
        batches = [list(s.epoch(generator(seed, k, epoch))) for k, s in enumerate(streams)]
        for m in range(max(len(b) for b in batches)):
            for k, stream in enumerate(streams):
                x, y = batches[k][m % len(batches[k])]
                fmask = {n: v.float() for n, v in masks[k].items()}
                loss = stream.loss(masked_forward(model, fmask, x), y)
                optimizers[k].zero_grad(set_to_none=True)
                loss.backward()
                before = {n: params[n].detach().clone() for n in masks.tensor_names}
                optimizers[k].step()
                with torch.no_grad():
                    for n, old in before.items():
                        params[n].copy_(torch.where(masks[k][n], params[n], old))
        if on_epoch is not None:
            on_epoch(epoch, optimizers)


@pytest.mark.parametrize("config", [OptimizerConfig(lr=1e-2, weight_decay=0.05),
                                    OptimizerConfig(name="sgd", lr=1e-2, momentum=0.9, weight_decay=0.05)],
                         ids=["adam_wd", "sgd_momentum_wd"])
def test_compact_optimizer_state_gives_the_full_state_weights(config):
    """Per-context state kept only inside each mask must give the weights of K full optimizers
    whose steps outside the mask are undone (Adam and SGD are elementwise)."""
    model, theta0, masks, streams = _joint_setup()
    joint_retrain(model, theta0, masks, streams, 2, config, seed=3)
    reference, _, _, _ = _joint_setup()
    _reference_joint_retrain(reference, theta0, masks, streams, 2, config, seed=3)
    for n, v in reference.state_dict().items():
        assert torch.allclose(model.state_dict()[n], v, rtol=0, atol=1e-6), n


def test_optimizer_state_covers_only_the_mask_and_dense_parameters():
    model, theta0, masks, streams = _joint_setup()
    seen = {}
    joint_retrain(model, theta0, masks, streams, 1, ADAM, seed=3, on_epoch=lambda e, opts: seen.update(opts=opts))
    names = [n for n, _ in model.named_parameters()]
    for k, opt in enumerate(seen["opts"]):
        for i, entry in opt.state_dict()["state"].items():
            n = names[i]
            expected = int(masks[k][n].sum()) if n in masks.tensor_names else dict(model.named_parameters())[n].numel()
            assert entry["exp_avg"].numel() == entry["exp_avg_sq"].numel() == expected, (k, n)


def test_joint_resume_from_full_optimizer_states_saved_before_compact_state():
    """Checkpoints written by the full-optimizer implementation resume to the same weights."""
    model, theta0, masks, streams = _joint_setup()
    joint_retrain(model, theta0, masks, streams, 2, ADAM, seed=5)
    saved = {}

    def keep(epoch, opts):
        if epoch == 0:
            saved.update(state=snapshot(old), opts=[o.state_dict() for o in opts])

    old, _, _, _ = _joint_setup()
    _reference_joint_retrain(old, theta0, masks, streams, 1, ADAM, seed=5, on_epoch=keep)
    resumed, _, _, _ = _joint_setup()
    resumed.load_state_dict(saved["state"])
    joint_retrain(resumed, theta0, masks, streams, 2, ADAM, seed=5, resume=(0, saved["opts"]))
    for n, v in model.state_dict().items():
        assert torch.allclose(resumed.state_dict()[n], v, rtol=0, atol=1e-6), n


def test_resume_with_other_masks_is_refused():
    model, theta0, masks, streams = _joint_setup()
    seen = {}
    joint_retrain(model, theta0, masks, streams, 1, ADAM, seed=3,
                  on_epoch=lambda e, opts: seen.update(opts=[o.state_dict() for o in opts]))
    shifted = MaskSet.from_tickets([masks[(k + 1) % 3] for k in range(3)])
    with pytest.raises(ValueError, match="other masks"):
        joint_retrain(model, theta0, shifted, streams, 2, ADAM, seed=3, resume=(0, seen["opts"]))


class _Gated(nn.Module):
    """Two inputs, like token ids with a padding mask: features and a 0/1 gate per feature."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return self.body(x * gate)


def _gated_stream(context: int, n: int = 32, batch: int = 8) -> Stream:
    g = torch.Generator().manual_seed(200 + context)
    x = torch.randn(n, 4, generator=g)
    gate = (torch.rand(n, 4, generator=g) > 0.3).float()
    y = (x * gate) @ torch.randn(4, 3, generator=g)

    def epoch(gen: torch.Generator):
        order = torch.randperm(n, generator=gen)
        return [((x[order[i:i + batch]], gate[order[i:i + batch]]), y[order[i:i + batch]]) for i in range(0, n, batch)]

    return Stream(f"gated{context}", epoch, nn.functional.mse_loss, n // batch)


def test_inputs_may_be_a_tuple_of_tensors():
    torch.manual_seed(0)
    model = _Gated()
    theta0 = snapshot(model)
    names = prunable_names(model)
    tickets = [extract_ticket(model, theta0, names, _gated_stream(k), [30], 1, ADAM, seed=k)[-1] for k in range(2)]
    masks = MaskSet.from_tickets(tickets)
    joint_retrain(model, theta0, masks, [_gated_stream(k) for k in range(2)], 2, ADAM, seed=1)
    params = dict(model.named_parameters())
    for n, u in masks.union().items():
        assert torch.all(params[n][~u] == 0)
        assert not torch.equal(params[n][u], theta0[n][u])
    (x, gate), _ = _gated_stream(0).epoch(torch.Generator().manual_seed(0))[0]
    assert not torch.equal(model(x, gate), model(x, torch.ones_like(gate))), "the second input must reach the model"
