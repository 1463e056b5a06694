"""The router registry: routers built, fitted, saved and loaded by name or import path, never by class."""

import json

import pytest
import torch
from test_router import K, blobs, detector_inputs, detector_toy, thresholds

from routing_lottery.errors import CheckpointError
from routing_lottery.registry import RegistryError
from routing_lottery.router import (
    REFIT_ROUTER,
    ROUTER_KIND,
    ROUTERS,
    STRATEGIES,
    DetectorRouter,
    EntropyRouter,
    LearnedRouter,
    build_router,
    fit_router,
    flatten_features,
    load_router,
    needs_fitting,
    router_name,
    router_problem,
    save_router,
)

# pytest puts tests/ on sys.path and imports this file as `test_router_registry`: the import path
# a config (or a kind.json) would use for a user's router defined here.
HERE = __name__


class FixedRouter:
    """A user's router with state of its own: every row goes to one context, kept in ``fixed.json``."""

    name, passes = "fixed", 0

    def __init__(self, context: int = 0) -> None:
        self.context = context

    def __call__(self, routed, x):
        return torch.full((len(x),), self.context, dtype=torch.long)

    def save(self, directory):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "fixed.json").write_text(json.dumps({"context": self.context}))

    @classmethod
    def load(cls, directory, offset: int = 0):
        return cls(json.loads((directory / "fixed.json").read_text())["context"] + offset)


class LastRouter:
    """A user's router registered by name, with nothing to save: every row goes to context K - 1."""

    name, passes = "last", 0

    def __init__(self, num_contexts: int = K) -> None:
        self.num_contexts = num_contexts

    def __call__(self, routed, x):
        return torch.full((len(x),), self.num_contexts - 1, dtype=torch.long)


class BrokenLoadRouter(FixedRouter):
    @classmethod
    def load(cls, directory):
        raise KeyError("context")  # a user's load that fails in its own code


@pytest.fixture
def last_registered():
    """``LastRouter`` registered as "test-registry-last" for one test; the process-wide registry is left as found."""
    ROUTERS.register("test-registry-last")(LastRouter)
    yield "test-registry-last"
    del ROUTERS._entries["test-registry-last"]  # the registry has no public unregister: a user never needs one


def write_kind(directory, **fields):
    directory.mkdir(parents=True, exist_ok=True)
    kind = {"format": "routing-lottery/router", "version": 1, "router": "detectors", **fields}
    (directory / ROUTER_KIND).write_text(json.dumps(kind))


# -- lookup and construction ----------------------------------------------------------------------
def test_built_in_routers_are_registered_under_their_report_names(last_registered):
    assert STRATEGIES == ("detectors", "entropy", "learned")
    for name, cls in zip(STRATEGIES, (DetectorRouter, EntropyRouter, LearnedRouter)):
        assert ROUTERS.get(name) is cls and cls.name == name
    t = thresholds([0.0, 1.0, 2.0])
    assert ROUTERS.call("detectors", thresholds=t).thresholds is t
    assert last_registered in ROUTERS and last_registered not in STRATEGIES  # a user's name adds no strategy


def test_a_router_is_found_by_import_path_and_unknown_names_are_named():
    assert ROUTERS.get(f"{HERE}:FixedRouter") is FixedRouter
    assert build_router(f"{HERE}:FixedRouter", context=2, thresholds=None).context == 2
    with pytest.raises(RegistryError, match=r"unknown router 'nearest'; registered: \['detectors', 'entropy'"):
        ROUTERS.get("nearest")
    with pytest.raises(RegistryError, match=f"'{HERE}' has no attribute 'Missing'"):
        ROUTERS.get(f"{HERE}:Missing")


def test_build_router_gives_each_router_the_options_it_names(last_registered):
    t = thresholds([0.0, 1.0, 2.0])
    detectors = build_router("detectors", thresholds=t, features=flatten_features)
    assert isinstance(detectors, DetectorRouter) and detectors.thresholds is t
    entropy = build_router("entropy", thresholds=t, chunk_size=4)
    assert isinstance(entropy, EntropyRouter) and entropy.chunk_size == 4
    assert build_router(last_registered, thresholds=t).num_contexts == K


def test_only_routers_with_fit_are_fitted_and_fit_router_matches_the_class():
    assert [needs_fitting(n) for n in STRATEGIES] == [False, False, True]
    assert not needs_fitting(f"{HERE}:FixedRouter")
    x, c = blobs(15)
    fitted = fit_router("learned", x, c, K, features=flatten_features, seed=0, thresholds=None)
    direct = LearnedRouter.fit(x, c, K, features=flatten_features, seed=0)
    assert torch.equal(fitted.logits(x), direct.logits(x))
    with pytest.raises(TypeError, match="router 'detectors' has no fit"):
        fit_router("detectors", x, c, K)


# -- saving and loading ---------------------------------------------------------------------------
def test_detector_and_entropy_routers_save_their_name_and_come_back(tmp_path):
    routed = detector_toy()
    x, true = detector_inputs()
    t = thresholds([0.5, 0.5, 0.5])
    assert save_router(DetectorRouter(thresholds=t), tmp_path / "d") == tmp_path / "d"
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [ROUTER_KIND]
    loaded = load_router(tmp_path / "d", thresholds=t, features=flatten_features)
    assert isinstance(loaded, DetectorRouter) and loaded.thresholds is t
    assert torch.equal(loaded(routed, x), true)  # the toy's detectors route every row right
    save_router(EntropyRouter(), tmp_path / "e")
    assert isinstance(load_router(tmp_path / "e", thresholds=t), EntropyRouter)
    assert router_problem(tmp_path / "d") is None and router_problem(tmp_path / "e") is None


def test_a_learned_router_saves_its_files_and_its_name_and_loads_identically(tmp_path):
    x, c = blobs(20)
    router = LearnedRouter.fit(x, c, K)
    save_router(router, tmp_path / "r")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [ROUTER_KIND, "router.json", "router.safetensors"]
    assert json.loads((tmp_path / "r" / ROUTER_KIND).read_text())["router"] == "learned"
    loaded = load_router(tmp_path / "r", features=flatten_features, thresholds=None)
    assert isinstance(loaded, LearnedRouter) and torch.equal(loaded.logits(x), router.logits(x))


def test_a_learned_router_saved_before_the_registry_still_loads(tmp_path):
    x, c = blobs(20)
    router = LearnedRouter.fit(x, c, K)
    router.save(tmp_path / "old")  # router.json + router.safetensors, no kind.json
    assert not (tmp_path / "old" / ROUTER_KIND).exists()
    loaded = load_router(tmp_path / "old")
    assert isinstance(loaded, LearnedRouter) and torch.equal(loaded.logits(x), router.logits(x))
    assert router_problem(tmp_path / "old") is None


def test_user_routers_round_trip_by_import_path_and_by_registered_name(tmp_path, last_registered):
    x = torch.randn(5, 3)
    save_router(FixedRouter(context=1), tmp_path / "f")
    assert json.loads((tmp_path / "f" / ROUTER_KIND).read_text())["router"] == f"{HERE}:FixedRouter"
    loaded = load_router(tmp_path / "f", offset=1, features=None)  # its own load takes offset, not features
    assert isinstance(loaded, FixedRouter) and loaded.context == 2
    save_router(LastRouter(num_contexts=4), tmp_path / "l")
    assert json.loads((tmp_path / "l" / ROUTER_KIND).read_text())["router"] == last_registered
    assert torch.equal(load_router(tmp_path / "l", num_contexts=4)(None, x), torch.full((5,), 3))


def test_nothing_saved_is_nothing_loaded_and_unnameable_routers_are_refused(tmp_path):
    assert save_router(None, tmp_path / "none") is None and not (tmp_path / "none").exists()
    assert load_router(tmp_path / "none") is None
    assert router_problem(tmp_path / "none") is not None  # a run refits a router that is not there

    class Local(FixedRouter):
        pass

    with pytest.raises(ValueError, match="Local cannot be saved: its class is not registered"):
        save_router(Local(), tmp_path / "local")
    with pytest.raises(ValueError, match="Local cannot be saved"):
        router_name(Local())


def test_an_unknown_router_name_is_a_checkpoint_error_naming_it_and_the_registered_ones(tmp_path):
    write_kind(tmp_path / "u", router="nearest")
    with pytest.raises(CheckpointError, match=r"kind.json names router 'nearest', which is not registered here "
                                              r"\(registered: \['detectors', 'entropy', 'learned'"):
        load_router(tmp_path / "u")
    assert "'nearest'" in router_problem(tmp_path / "u")
    write_kind(tmp_path / "p", router="no_such_package_xyz.routers:Nearest")
    with pytest.raises(CheckpointError, match=r"kind.json names router 'no_such_package_xyz.routers:Nearest', which "
                                              r"cannot be found: cannot import 'no_such_package_xyz.routers'"):
        load_router(tmp_path / "p")


@pytest.mark.parametrize("content, message", [
    (b'{"format": "routing-lottery/router", "version": 1, "rou', "is not valid JSON"),
    (b"[1, 2]", "is not a router's kind file"),
    (b'{"format": "routing-lottery/router", "version": 2, "router": "learned"}', "has version 2"),
    (b'{"format": "routing-lottery/router", "version": true, "router": "learned"}', "has version True"),
    (b'{"format": "routing-lottery/router", "version": 1, "router": 7}', "field 'router' is 7"),
    (b'{"format": "routing-lottery/router", "version": 1, "router": ""}', "field 'router' is ''"),
])
def test_a_corrupt_kind_file_is_a_checkpoint_error_naming_it(tmp_path, content, message):
    x, c = blobs(10)
    save_router(LearnedRouter.fit(x, c, K), tmp_path)
    (tmp_path / ROUTER_KIND).write_bytes(content)
    with pytest.raises(CheckpointError, match=f"kind.json.*{message}|{message}.*kind.json") as err:
        load_router(tmp_path)
    assert router_problem(tmp_path) == str(err.value)


def test_a_router_that_fails_to_load_in_its_own_code_is_a_checkpoint_error_naming_the_file(tmp_path):
    save_router(BrokenLoadRouter(), tmp_path)
    with pytest.raises(CheckpointError, match=rf"kind.json: router '{HERE}:BrokenLoadRouter' does not load here "
                                              r"\(KeyError: 'context'\)"):
        load_router(tmp_path)
    write_kind(tmp_path / "c", router="json:dumps")  # importable, but not a router
    with pytest.raises(CheckpointError, match="does not load here"):
        load_router(tmp_path / "c")


def test_router_problem_reports_a_corrupt_learned_router_without_the_remedy_load_adds(tmp_path):
    x, c = blobs(20)
    save_router(LearnedRouter.fit(x, c, K), tmp_path)
    weights = tmp_path / "router.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    weights.write_bytes(bytes(blob))
    problem = router_problem(tmp_path)
    assert problem is not None and "router.safetensors is truncated or corrupt" in problem
    assert REFIT_ROUTER not in problem  # each caller says its own remedy (a run refits)
    with pytest.raises(CheckpointError) as err:
        load_router(tmp_path)
    assert str(err.value) == f"{problem}. {REFIT_ROUTER}"
