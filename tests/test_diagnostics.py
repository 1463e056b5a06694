"""Diagnostics: Jaccard and similarity scores on hand-made masks, the collapse rule on synthetic
curves with known breaks, the Mantel test on matrices of known correlation, WordNet similarity,
and every figure written as a real PNG."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from routing_lottery.diagnostics import (
    CollapseSettings,
    SimilarityReport,
    WordNetUnavailable,
    depth_groups,
    detect_collapse,
    layer_alignment,
    mantel_spearman,
    metric_drop_level,
    similarity_report,
    similarity_scores,
)
from routing_lottery.diagnostics import figures, semantic
from routing_lottery.masks import MaskSet


def _bool(*rows):
    return torch.tensor(rows, dtype=torch.bool)


# -- similarity --------------------------------------------------------------------------------
def test_jaccard_identical_disjoint_nested():
    masks = MaskSet({
        "same": _bool([1, 1, 0, 1], [1, 1, 0, 1]),
        "apart": _bool([1, 1, 0, 0], [0, 0, 1, 1]),
        "nested": _bool([1, 0, 0, 0], [1, 1, 1, 0]),  # small ⊂ big: |small| / |big| = 1/3
    }, ["a", "b"])
    report = similarity_report(masks)
    assert report.per_layer["same"][0, 1] == 1.0
    assert report.per_layer["apart"][0, 1] == 0.0
    assert report.per_layer["nested"][0, 1] == pytest.approx(1 / 3)
    # over all weights: intersection 3 + 0 + 1, union 3 + 4 + 3
    assert report.overall[0, 1] == pytest.approx(4 / 10)
    assert np.allclose(np.diag(report.overall), 1.0)


def test_similarity_scores_three_contexts_exact():
    # A = 111100, B = 111000, C = 000111: J(A,B) = 3/4, J(A,C) = 1/6, J(B,C) = 0
    masks = MaskSet({
        "conv": _bool([1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]),
        "fc": _bool([1, 0], [1, 0], [1, 0]),  # identical in this layer
    }, ["A", "B", "C"])
    report = similarity_report(masks)
    conv = report.layer_scores["conv"]
    assert conv.tolist() == pytest.approx([(3 / 4 + 1 / 6) / 2, 3 / 8, 1 / 12])
    assert report.layer_mean["conv"] == pytest.approx(11 / 36)
    assert report.layer_scores["fc"].tolist() == [1.0, 1.0, 1.0]
    assert report.layer_mean["fc"] == 1.0
    # all weights: A∩B = 4 of 5, A∩C = 2 of 7 (index 3 and the fc weight), B∩C = 1 of 7
    assert report.scores.tolist() == pytest.approx([(4 / 5 + 2 / 7) / 2, (4 / 5 + 1 / 7) / 2, (2 / 7 + 1 / 7) / 2])
    assert report.mean_score == pytest.approx(report.scores.mean())
    assert report.sparsity == pytest.approx((1 - 5 / 8, 1 - 4 / 8, 1 - 4 / 8))


def test_similarity_scores_validate_and_need_two_contexts():
    assert similarity_scores([[1, 0.5], [0.5, 1]]).tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match="square"):
        similarity_scores([[1, 0.5, 0.2]])
    with pytest.raises(ValueError, match="at least 2 contexts"):
        similarity_report(MaskSet({"w": _bool([1, 0])}))


def test_report_writes_json_and_csv_and_round_trips(tmp_path):
    masks = MaskSet({
        "features.0.weight": _bool([1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 1]),
        "features.3.weight": _bool([1, 1, 1, 0], [1, 1, 0, 1], [1, 1, 1, 1]),
        "head.weight": _bool([0, 0, 1, 1], [1, 1, 0, 0], [0, 1, 0, 1]),
    }, ["cat", "dog", "truck"])
    report = similarity_report(masks)
    paths = report.write(tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["context_names"] == ["cat", "dog", "truck"]
    assert [layer["group"] for layer in data["layers"]] == ["shallow", "middle", "deep"]
    back = SimilarityReport.from_dict(data)
    assert np.allclose(back.overall, report.overall)
    assert back.layer_mean == pytest.approx(report.layer_mean)
    assert paths["matrix:all"].read_text().splitlines()[0] == "context,cat,dog,truck"
    assert paths["matrix:features.0.weight"].name == "jaccard_00_features.0.weight.csv"
    assert paths["scores"].read_text().splitlines()[0].split(",")[:3] == ["context", "sparsity", "all"]
    assert len(paths["layers"].read_text().splitlines()) == 1 + 3 + 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_depth_groups_split_in_thirds_by_order():
    assert depth_groups(list("abcdefg")) == {"shallow": ["a", "b", "c"], "middle": ["d", "e"], "deep": ["f", "g"]}
    assert depth_groups(["x", "y"]) == {"shallow": ["x"], "middle": ["y"]}


# -- collapse ------------------------------------------------------------------------------------
LEVELS = [1 - 0.8 ** r for r in range(1, 15)]  # IMP at 20 % per round: 20 % ... 95.6 %


def _trend(levels, slope=0.04, start=0.3):
    return [start + slope * -math.log(1 - s) for s in levels]


def test_collapse_fires_at_an_upward_break_not_before():
    scores = _trend(LEVELS)
    scores = [y + 0.004 * (-1) ** i for i, y in enumerate(scores)]  # small wiggle
    for i in range(8, len(scores)):
        scores[i] += 0.15 + 0.05 * (i - 8)  # the masks converge from level 8 on
    warning = detect_collapse(LEVELS, scores)
    assert warning.fired and warning.index == 8 and warning.level == pytest.approx(LEVELS[8])
    assert warning.direction == "rise" and warning.residual == pytest.approx(0.15, abs=0.02)
    assert all(not c.flagged for c in warning.checks if c.index < 8)
    assert "least-squares line" in warning.rule and "3 x max" in warning.rule
    # judged online, level by level, the warning appears exactly when level 8 arrives
    assert detect_collapse(LEVELS[:8], scores[:8]).level is None
    assert detect_collapse(LEVELS[:9], scores[:9]).index == 8


def test_collapse_fires_on_a_downward_break():
    scores = _trend(LEVELS, slope=0.02, start=0.5)
    for i in range(10, len(scores)):
        scores[i] -= 0.2  # masks fall apart, towards disjoint (the paper's INR case)
    warning = detect_collapse(LEVELS, scores)
    assert warning.index == 10 and warning.direction == "fall" and warning.residual < -0.15
    assert "drifting apart" in warning.message()


def test_collapse_is_quiet_on_smooth_trends():
    rng = np.random.default_rng(0)
    linear = np.array(_trend(LEVELS)) + rng.normal(0, 0.003, len(LEVELS))
    assert not detect_collapse(LEVELS, linear).fired
    curved = [0.25 + 0.2 * s ** 2 for s in LEVELS]  # smooth but not linear on either axis
    assert detect_collapse(LEVELS, curved).level is None
    assert detect_collapse(LEVELS, curved, CollapseSettings(axis="sparsity")).level is None


def test_collapse_needs_history_and_skips_the_dense_level():
    assert detect_collapse([0.2, 0.4, 0.6], [0.3, 0.3, 0.9]).checks == ()
    # dense masks have Jaccard 1: the level is ignored instead of bending the trend
    levels = [0.0, *LEVELS[:6]]
    assert detect_collapse(levels, [1.0, *_trend(LEVELS[:6])]).level is None
    with pytest.raises(ValueError, match="ascending"):
        detect_collapse([0.5, 0.4, 0.6, 0.7], [0.1, 0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="threshold"):
        CollapseSettings(threshold=0)


def test_metric_drop_level():
    levels = [0.2, 0.4, 0.6, 0.8, 0.9]
    assert metric_drop_level(levels, [0.78, 0.80, 0.79, 0.74, 0.60], tolerance=0.02) == 0.8
    assert metric_drop_level(levels, [0.78, 0.80, 0.79, 0.785, 0.79], tolerance=0.02) is None
    # lower is better (a loss): a rise is the drop
    assert metric_drop_level(levels, [1.0, 0.9, 0.95, 1.3, 2.0], tolerance=0.1, higher_is_better=False) == 0.8
    # a dip that recovers is a drop only when not asked for a sustained one
    dip = [0.80, 0.70, 0.81, 0.60, 0.50]
    assert metric_drop_level(levels, dip, tolerance=0.02) == 0.4
    assert metric_drop_level(levels, dip, tolerance=0.02, sustained=True) == 0.8


# -- Mantel ----------------------------------------------------------------------------------------
def _random_similarity(k, seed):
    rng = np.random.default_rng(seed)
    m = rng.random((k, k))
    m = (m + m.T) / 2
    np.fill_diagonal(m, 1.0)
    return m


def test_mantel_monotone_transform_gives_rho_one_and_small_p():
    a = _random_similarity(10, 1)
    result = mantel_spearman(a, np.exp(3 * a), n_permutations=999, seed=0)
    assert result.rho == pytest.approx(1.0)
    assert result.p_value == pytest.approx(1 / 1000)
    assert result.n_pairs == 45 and not result.exact


def test_mantel_matches_spearman_and_is_high_p_on_unrelated_matrices():
    a, b = _random_similarity(10, 2), _random_similarity(10, 3)
    iu = np.triu_indices(10, 1)
    result = mantel_spearman(a, b, n_permutations=499, seed=0)
    assert result.rho == pytest.approx(spearmanr(a[iu], b[iu])[0])
    assert result.p_value > 0.2
    # shuffling the contexts of a matrix destroys its correlation with the original
    perm = np.random.default_rng(5).permutation(10)
    shuffled = mantel_spearman(a, a[np.ix_(perm, perm)], n_permutations=499, seed=0)
    assert shuffled.p_value > 0.2
    assert mantel_spearman(a, b, n_permutations=499, seed=0) == result  # seeded: reproducible


def test_mantel_small_k_is_exact_and_flat_matrix_is_nan():
    x = np.array([[1, .9, .1, .2], [.9, 1, .3, .4], [.1, .3, 1, .8], [.2, .4, .8, 1]])
    exact = mantel_spearman(x, x ** 2, n_permutations=999)
    assert exact.exact and exact.n_permutations == 24 and exact.rho == pytest.approx(1.0)
    flat = np.full((4, 4), 1 / 3)
    np.fill_diagonal(flat, 1.0)
    assert math.isnan(mantel_spearman(x, flat).rho)
    assert mantel_spearman(x, flat).to_dict()["rho"] is None
    with pytest.raises(ValueError, match="symmetric"):
        mantel_spearman(x, np.triu(x))
    per_layer = layer_alignment({"l0": x, "l1": x[::-1, ::-1]}, x, n_permutations=50)
    assert list(per_layer) == ["l0", "l1"]


# -- WordNet ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wordnet(tmp_path_factory):
    try:
        return semantic.load_wordnet(cache_dir=tmp_path_factory.mktemp("nltk_data"))
    except WordNetUnavailable as err:
        pytest.skip(f"WordNet 3.0 database not installed: {err}")


@pytest.mark.slow
def test_wordnet_dog_cat_closer_than_dog_truck(wordnet):
    for measure in ("path", "wup"):
        m = semantic.semantic_similarity_matrix(["dog", "cat", "truck"], measure=measure, wordnet=wordnet)
        assert m[0, 1] > m[0, 2]
        assert np.allclose(m, m.T) and np.allclose(np.diag(m), 1.0)
    path = semantic.semantic_similarity_matrix(["cat", "dog"], wordnet=wordnet)
    assert path[0, 1] == pytest.approx(0.2)  # the documented value of cat.n.01 ~ dog.n.01


@pytest.mark.slow
def test_wordnet_synset_choices(wordnet):
    chosen = {n: semantic.synset_for(n, wordnet) for n in semantic.KNOWN_SYNSETS}
    assert chosen["automobile"].name() == "car.n.01"
    assert chosen["zero"].hypernyms()[0].name() == "digit.n.01"
    assert chosen["whale"].lexname() == "noun.animal"  # not "a very large person"
    assert semantic.synset_for("Maple tree", wordnet).name() == "maple.n.02"
    assert semantic.synset_for("aquarium-fish", wordnet).name() == "fish.n.01"
    assert semantic.synset_for("oak_tree", wordnet, overrides={}).lexname() == "noun.plant"
    assert semantic.synset_for("shiny_truck", wordnet).name() == "truck.n.01"  # head-noun fallback
    assert semantic.synset_for("mouse", wordnet, overrides={"mouse": "mouse.n.04"}).lexname() == "noun.artifact"
    with pytest.raises(ValueError, match="overrides"):
        semantic.synset_for("qwzx", wordnet)
    group = semantic.semantic_similarity_matrix([["dog", "cat"], ["truck", "bus"], ["wolf"]], wordnet=wordnet)
    assert group[0, 2] > group[1, 2]


def test_missing_wordnet_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("RTL_WORDNET_DIR", str(tmp_path / "empty"))
    with pytest.raises(WordNetUnavailable, match="apt-get install wordnet-base wordnet-sense-index"):
        semantic.load_wordnet(cache_dir=tmp_path / "cache")
    assert not semantic.wordnet_available()


def test_lexnames_has_the_45_lexicographer_files():
    lines = semantic.lexnames_text().splitlines()
    assert len(lines) == 45
    assert lines[0] == "00\tadj.all\t3" and lines[5] == "05\tnoun.animal\t1" and lines[44] == "44\tadj.ppl\t3"


# -- figures ---------------------------------------------------------------------------------------
def _is_png(path):
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_every_figure_writes_a_png(tmp_path):
    names = ["airplane", "automobile", "bird", "cat"]
    matrix = _random_similarity(4, 0)
    paths = [figures.plot_similarity_heatmap(matrix, names, tmp_path / "heat.png", title="all weights")]

    masks = MaskSet({
        "stem": _bool(*[[1, 1, 0, 1]] * 4),
        "mid": _bool([1, 0, 1, 0], [0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 1, 1]),
        "head": _bool([1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]),
    }, names)
    paths += figures.plot_report_heatmaps(similarity_report(masks), tmp_path / "heatmaps").values()

    levels = LEVELS[:10]
    scores = np.array(_trend(levels))[:, None] + np.linspace(-0.05, 0.05, 4)[None, :]
    metric = np.linspace(0.8, 0.6, 10)[:, None] + np.zeros((1, 4))
    paths.append(figures.plot_collapse_sweep(levels, scores, tmp_path / "sweep.png", names, metric=metric,
                                             metric_name="balanced accuracy", warning_level=levels[6],
                                             drop_level=levels[8]))
    paths.append(figures.plot_collapse_sweep(levels, scores.mean(axis=1), tmp_path / "sweep_mean.png"))
    paths.append(figures.plot_collapse_sweep(levels, scores, tmp_path / "sweep_headline.png", names,
                                             metric=np.linspace(30, 25, 10), metric_name="psnr",
                                             metric_per_context=metric * 40))
    with pytest.raises(ValueError, match="metric_per_context must have shape"):
        figures.plot_collapse_sweep(levels, scores, tmp_path / "bad.png", metric=metric[:, 0],
                                    metric_per_context=metric[:5])

    layers = [f"layer{i}" for i in range(6)]
    semantic_matrix = _random_similarity(4, 9)
    alignment = layer_alignment({"all": matrix, **{n: _random_similarity(4, i) for i, n in enumerate(layers)}},
                                semantic_matrix, n_permutations=24)
    paths.append(figures.plot_alignment_by_depth(alignment, tmp_path / "depth.png"))
    sweep_alignment = [layer_alignment({n: _random_similarity(4, 10 * j + i) for i, n in enumerate(layers)},
                                       semantic_matrix, n_permutations=24) for j in range(3)]
    paths.append(figures.plot_alignment_vs_sparsity(levels[:3], sweep_alignment, tmp_path / "groups.png"))

    assert len(paths) == 1 + 4 + 3 + 2
    for path in paths:
        assert path.exists() and _is_png(path), path
    assert not list(tmp_path.rglob(".*.png"))  # no temp files left behind


def test_context_metric_by_level_reads_keys_or_environment_rows():
    from routing_lottery.diagnose import rtl_context_metric_by_level

    names = ("indoor", "outdoor")
    keyed = [{"method": "rtl", "sparsity": 0.5, "psnr": 30.0, "psnr_context_0": 29.0, "psnr_context_1": 33.0},
             {"method": "single_imp", "sparsity": 0.5, "psnr": 1.0, "psnr_context_0": 1.0, "psnr_context_1": 1.0},
             {"method": "rtl", "sparsity": 0.75, "psnr": 28.0, "psnr_context_0": 27.0}]  # incomplete: left out
    assert rtl_context_metric_by_level(keyed, "psnr", names) == {0.5: [29.0, 33.0]}
    rows = [{"method": "rtl", "sparsity": 0.5, "environment": env, "si_snri": v}
            for env, v in (("all", 2.0), ("outdoor", 3.0), ("indoor", 1.0))]
    rows.append({"method": "rtl", "sparsity": 0.75, "environment": "indoor", "si_snri": 0.5})  # outdoor missing
    assert rtl_context_metric_by_level(rows, "si_snri", names) == {0.5: [1.0, 3.0]}


def test_heatmap_colours_follow_the_off_diagonal_range_and_cells_are_annotated():
    names = ["a", "b", "c", "d"]
    matrix = np.full((4, 4), 0.88)
    matrix[0, 1] = matrix[1, 0] = 0.87
    matrix[2, 3] = matrix[3, 2] = 0.89
    np.fill_diagonal(matrix, 1.0)
    fig = figures.similarity_heatmap_figure(matrix, names)
    image = fig.axes[0].images[0]
    assert image.get_clim() == pytest.approx((0.87, 0.89))  # not 0-1: the 0.87-0.89 cells get distinct colours
    assert "off-diagonal 0.87–0.89" in fig.axes[1].get_ylabel()  # the colour bar says how it is scaled
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert len(texts) == 16 and texts[1] == "0.87" and texts[0] == "1.00"
    dark, light = fig.axes[0].texts[1], fig.axes[0].texts[11]  # 0.87: darkest viridis; 0.89: yellow
    assert (dark.get_color(), light.get_color()) == ("white", "black")

    fixed = figures.similarity_heatmap_figure(matrix, names, vmin=0.0, vmax=1.0)
    assert fixed.axes[0].images[0].get_clim() == (0.0, 1.0)
    many = [f"c{i}" for i in range(13)]
    assert not figures.similarity_heatmap_figure(np.eye(13) + 0.5, many).axes[0].texts  # K > 12: no numbers
    assert figures.similarity_heatmap_figure(np.ones((2, 2)), ["a", "b"]).axes[0].images[0].get_clim() == pytest.approx((0.995, 1.005))
    assert figures.similarity_heatmap_figure(np.ones((1, 1)), ["a"]).axes[0].images[0].get_clim() == (0.0, 1.0)
