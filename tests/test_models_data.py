"""The embedded default model, its cache, and the datasets."""
import json

import pytest
import torch

import kedit_lite as ke
from kedit_lite import data, models


def test_default_model_is_smollm2_and_knows_paris(smol):
    model, tok = smol
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.config.intermediate_size == 1536
    out = ke.generate(model, tok, ["The Eiffel Tower is located in the city of"], max_new_tokens=3)[0]
    assert "Paris" in out


def test_default_model_cached_as_safetensors(smol):
    cached = models.cache_dir() / "models" / models.DEFAULT_MODEL
    assert (cached / "model.safetensors").exists()
    assert not list(cached.glob("*.bin")) and not list(cached.glob("*.pt")), "no pickled weights"
    model, _ = ke.load_model()  # from the cache (its speed is measured by scripts/bench_load.py)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), smol[0].parameters()))


def test_unknown_model_clear_error(tmp_path):
    with pytest.raises(OSError, match="model: could not load"):
        ke.load_model(str(tmp_path / "no-such-model"))
    with pytest.raises(TypeError, match="name"):
        ke.load_model(123)


def test_pick_device():
    assert ke.pick_device("cpu").type == "cpu"
    assert ke.pick_device().type in ("cpu", "cuda", "mps")


def test_lecture_cases_complete():
    cases = ke.load_lecture()
    assert len(cases) >= 40
    ids = [c.meta["id"] for c in cases]
    assert len(ids) == len(set(ids))
    for c in cases:
        assert c.paraphrase and c.reverse and c.portability and c.locality, c.meta["id"]
    needle = ke.lecture_case("space-needle-taipei")
    assert needle.request.target_new == "Taipei" and needle.meta["zh"]
    assert any("Hung-yi Lee" == c.request.target_new for c in cases)
    assert any("zebra" in c.request.subject.lower() for c in cases)
    with pytest.raises(KeyError, match="case_id"):
        ke.lecture_case("nope")


@pytest.mark.skipif(data.data_dir() is None, reason="no local CounterFact copy (../shared/data or KEDIT_DATA_DIR)")
def test_counterfact_and_zsre_loaders():
    val = ke.load_counterfact("val", n=5)
    assert len(val) == 5 and val[0].request.subject in val[0].request.prompt_text
    assert val[0].paraphrase and val[0].locality and val[0].request.target_true
    again = ke.load_counterfact("val", n=5, seed=1)
    assert [c.meta["id"] for c in again] == [c.meta["id"] for c in ke.load_counterfact("val", n=5, seed=1)]
    assert len(ke.load_counterfact("train", n=3)) == 3
    z = ke.load_zsre(n=4)
    assert len(z) == 4 and z[0].paraphrase[0].answer == z[0].request.target_new


def test_counterfact_missing_dir_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_dir"):
        ke.load_counterfact("val", data_dir=tmp_path)
    with pytest.raises(ValueError, match="split"):
        ke.load_counterfact("test", data_dir=tmp_path)


def test_counterfact_reads_any_directory(tmp_path):
    rec = {"case_id": 1, "prompt": "Foo Bar plays", "subject": "Foo Bar", "target_new": "chess",
           "ground_truth": "go", "rephrase_prompt": "Foo Bar is good at", "locality_prompt": "Baz plays",
           "locality_ground_truth": "go"}
    (tmp_path / "counterfact").mkdir()
    (tmp_path / "counterfact" / "val.json").write_text(json.dumps([rec]))
    (case,) = ke.load_counterfact("val", data_dir=tmp_path)
    assert case.request.template == "{} plays" and case.locality[0].answer == "go"


def test_offline_without_data_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "SOURCES", {"counterfact": "http://127.0.0.1:9/none.json",
                                          "zsre": "http://127.0.0.1:9/none.json"})
    with pytest.raises(FileNotFoundError, match="KEDIT_DATA_DIR"):
        ke.load_counterfact("val")
