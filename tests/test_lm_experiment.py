"""The pretrained-LM experiment end to end at smoke scale (an untrained tiny Llama over UTF-8 bytes), its
resume, its report, and one clear line for each malformed input."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from routing_lottery.errors import ConfigError, DataError  # noqa: E402
from routing_lottery.run.lm import load_lm_config, parse_pattern, run_lm_experiment, summarize  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "src" / "routing_lottery" / "configs" / "lm.yaml"
WORDS = {"code": "def return import class self lambda yield for in while", "mail": "hello regards thanks meeting "
         "please attached dear best wishes", "speech": "nation people congress america freedom union citizens"}


def text_folder(root: Path, documents: int = 12, words: int = 60) -> Path:
    rng = random.Random(0)
    for domain, vocabulary in WORDS.items():
        (root / domain).mkdir(parents=True)
        for i in range(documents):
            (root / domain / f"{i}.txt").write_text(" ".join(rng.choice(vocabulary.split()) for _ in range(words)))
    return root


def smoke_config(root: Path, **overrides):
    return load_lm_config(CONFIG, "smoke", {"data": {"root": str(root)}, "threads": 1, "device": "cpu", **overrides})


def test_patterns_parse_and_refuse():
    assert parse_pattern("50%") == (0.5, None) and parse_pattern("2:4") == (None, (2, 4))
    for bad in ("0%", "100%", "4:2", "2:2", "half", 50):
        with pytest.raises(ConfigError, match="pattern"):
            parse_pattern(bad)


@pytest.mark.slow
def test_smoke_run_measures_every_method_and_resumes_without_recomputing(tmp_path, monkeypatch):
    import routing_lottery.run.lm as lm_run

    root = text_folder(tmp_path / "text")
    config = smoke_config(root)
    out = tmp_path / "run"
    masks_made = []
    mask_from = lm_run._mask_from
    monkeypatch.setattr(lm_run, "_mask_from", lambda *args: masks_made.append(1) or mask_from(*args))
    records = run_lm_experiment(config, out, log=lambda message: None)
    # one shared + one mask per domain for each (draw, pattern), shared by its one-shot and retrained records
    assert len(masks_made) == config.pruning.draws * len(config.pruning.patterns) * (len(WORDS) + 1)
    methods = {r["method"] for r in records}
    assert {"dense", "magnitude", "shared", "own", "own+learned", "own+perplexity", "shared_ft", "rtl",
            "rtl+learned", "rtl+perplexity"} <= methods
    own = [r for r in records if r["method"] == "own"]
    assert all(r["draws"] == 2 and r["perplexity_low"] <= r["perplexity"] <= r["perplexity_high"] for r in own)
    # the paired ratio is own / shared draw by draw, then averaged
    rows = json.loads((out / "rows.json").read_text())
    code = [r for r in rows if r.get("pattern") == "50%" and r.get("domain") == "code" and r["mask"] in ("code", "pooled")
            and r["method"] in ("own", "shared")]
    by_draw = {d: {r["method"]: r["perplexity"] for r in code if r["draw"] == d} for d in (0, 1)}
    expected = sum(v["own"] / v["shared"] for v in by_draw.values()) / 2
    record = next(r for r in records if (r["pattern"], r["method"], r["domain"]) == ("50%", "own", "code"))
    assert record["vs_shared"] == pytest.approx(expected)
    # each mask scored on every domain: 3 masks x 3 domains per draw and pattern
    assert sum(1 for r in rows if r["method"] == "own" and r.get("pattern") == "2:4" and r["draw"] == 0
               and "perplexity" in r) == 9
    for name in ("results.json", "results.md", "perplexity.png", "mask_domain.png", "jaccard_layers.png"):
        assert (out / name).stat().st_size > 0
    from typer.testing import CliRunner

    from routing_lottery.cli import app

    shown = CliRunner().invoke(app, ["report", str(out)])
    assert shown.exit_code == 0 and "## 50%" in shown.output and "own / shared" in shown.output
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "records").iterdir()}
    again = run_lm_experiment(config, out, log=lambda message: None)
    assert again == records
    assert {p.name: p.stat().st_mtime_ns for p in (out / "records").iterdir()} == stamps  # nothing recomputed
    # a changed retraining budget recomputes the retrained records only
    more = smoke_config(root, retraining={"steps_per_domain": 3, "patterns": ["50%"]})
    run_lm_experiment(more, out, log=lambda message: None)
    changed = {p.name for p in (out / "records").iterdir() if p.stat().st_mtime_ns != stamps[p.name]}
    assert changed == {p for p in stamps if p.startswith("retrained_") and "p50" in p}  # 2:4 keeps its records


def test_summary_of_hand_made_rows():
    rows = [{"draw": d, "pattern": "50%", "method": m, "mask": mask, "domain": "a", "perplexity": p}
            for d, m, mask, p in [(0, "shared", "pooled", 10.0), (1, "shared", "pooled", 20.0),
                                  (0, "own", "a", 9.0), (1, "own", "a", 16.0), (0, "own", "b", 50.0)]]
    records = summarize(rows, ["a"])
    own = next(r for r in records if r["method"] == "own")
    assert own["perplexity"] == pytest.approx(12.5)  # the other domain's mask (50.0) is not "own"
    assert own["vs_shared"] == pytest.approx((0.9 + 0.8) / 2)
    assert own["vs_shared_low"] < own["vs_shared"] < own["vs_shared_high"]


@pytest.mark.slow
@pytest.mark.parametrize("problem, expected", [
    ("empty", "is empty"), ("binary", "binary file"), ("short", "fewer than one sequence"),
    ("unknown", "unknown domain 'nope'"), ("no_linear", "no nn.Linear module matches"),
])
def test_malformed_input_gets_one_clear_line(tmp_path, problem, expected):
    root = text_folder(tmp_path / "text")
    sets = ["--set", "threads=1", "--set", "device=cpu", "--set", "retraining.steps_per_domain=0", "--set", "routers=[]"]
    if problem == "empty":
        (root / "empty").mkdir()
    elif problem == "binary":
        (root / "code" / "0.txt").write_bytes(b"def \x00\x01\x02")
    elif problem == "short":
        (root / "tiny").mkdir()
        for i in range(4):
            (root / "tiny" / f"{i}.txt").write_text("hi")
    elif problem == "unknown":
        sets += ["--set", "data.domains=[code, nope]"]
    elif problem == "no_linear":
        sets += ["--set", "model.include=['*.nothing.*']"]
    result = subprocess.run([sys.executable, "-m", "routing_lottery.cli", "run", str(CONFIG), "--scale", "smoke",
                             "--data", str(root), "--out", str(tmp_path / "run"), *sets],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode != 0
    assert expected in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_smoke_scale_refuses_a_missing_folder(tmp_path):
    with pytest.raises((DataError, ConfigError, FileNotFoundError)):
        run_lm_experiment(smoke_config(tmp_path / "absent"), tmp_path / "run", log=lambda message: None)


def test_packaged_config_loads_at_every_scale():
    for scale in (None, "smoke", "retrain"):
        config = load_lm_config(CONFIG, scale)
        assert config.task == "lm" and config.pruning.patterns
    assert load_lm_config(CONFIG).retraining.steps_per_domain == 0  # the default is one-shot
    with pytest.raises(ConfigError, match="no scale"):
        load_lm_config(CONFIG, "huge")
    with pytest.raises(ConfigError, match="steps_per_domain"):
        load_lm_config(CONFIG, None, {"retraining": {"steps_per_domain": -1}})
    with pytest.raises(ConfigError, match=r"retraining.patterns \['3:4'\] are not among"):
        load_lm_config(CONFIG, None, {"retraining": {"patterns": ["3:4"]}})


def test_a_model_directory_loads_with_its_tokenizer_and_is_refused_without_one(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from routing_lottery.lm.model import load_causal_lm, tiny_random_llama

    model = tiny_random_llama(seed=3)
    model.save_pretrained(tmp_path / "model")
    with pytest.raises(DataError, match="holds no tokenizer"):
        load_causal_lm(str(tmp_path / "model"))
    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator(["a b c d"], trainers.WordLevelTrainer(special_tokens=["[UNK]", "<eos>"]))
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", eos_token="<eos>").save_pretrained(
        tmp_path / "model")
    loaded, tokenizer = load_causal_lm(str(tmp_path / "model"))
    assert len(tokenizer.encode("a b c", add_special_tokens=False)) == 3 and tokenizer.eos_token_id is not None
    for (name, a), (_, b) in zip(loaded.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(DataError, match="neither smollm2, tiny-random"):
        load_causal_lm(str(tmp_path / "absent"))


def test_an_lm_config_s_scales_are_checked_as_every_config_s(tmp_path):
    path = tmp_path / "lm.yaml"
    path.write_text("task: lm\nscales: {smoke: 3}\n")
    with pytest.raises(ConfigError, match="scale 'smoke' must be a mapping of settings"):
        load_lm_config(path, "smoke")
    path.write_text("task: lm\nscales: [smoke]\n")
    with pytest.raises(ConfigError, match="scales must be a mapping"):
        load_lm_config(path)
