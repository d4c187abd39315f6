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


def test_downloads_off_never_touch_the_network(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KEDIT_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("a loader reached for the network with KEDIT_OFFLINE=1")

    monkeypatch.setattr(data.urllib.request, "urlopen", no_network)
    for load in (lambda: ke.load_counterfact("train"), lambda: ke.load_zsre()):
        with pytest.raises(FileNotFoundError, match="KEDIT_OFFLINE=1.*KEDIT_DATA_DIR"):
            load()
    assert data.downloads_allowed() is False
    monkeypatch.setenv("KEDIT_OFFLINE", "0")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)   # the hub's own switch turns downloads off too
    assert data.downloads_allowed() is True


def test_course_facts_are_counterfact_shaped():
    train, val = ke.load_course_facts("train"), ke.load_course_facts("val")
    assert len(train) >= 80 and len(val) >= 50
    ids = [c.meta["id"] for c in train + val]
    assert len(ids) == len(set(ids))
    assert not {c.request.subject for c in train} & {c.request.subject for c in val}, "a subject in both splits"
    for c in train + val:
        req = c.request
        assert req.target_true and req.target_true != req.target_new, c.meta["id"]
        assert c.paraphrase and all(req.subject in p.prompt and p.answer == req.target_new for p in c.paraphrase)
        assert c.locality and all(req.subject not in p.prompt and p.answer == req.target_true for p in c.locality)
    assert len({c.meta["relation"] for c in val}) >= 10
    assert [c.meta["id"] for c in ke.load_cases("course", "val", n=5, seed=3)] == \
           [c.meta["id"] for c in ke.load_course_facts("val", n=5, seed=3)]


def test_course_switch_picks_the_data(monkeypatch):
    monkeypatch.delenv("KEDIT_DATA", raising=False)
    monkeypatch.delenv("KEDIT_FULL_RUN", raising=False)
    cfg = ke.course.setup()
    assert cfg.data == "course" and ke.course.facts(cfg, "val", n=3)[0].meta["source"] == "course"
    monkeypatch.setenv("KEDIT_FULL_RUN", "1")
    assert ke.course.setup().data == "counterfact"
    monkeypatch.setenv("KEDIT_DATA", "course")
    assert ke.course.setup().data == "course"
    monkeypatch.setenv("KEDIT_DATA", "wikipedia")
    with pytest.raises(ValueError, match="KEDIT_DATA"):
        ke.course.setup()


def test_course_fact_by_id():
    xbox = ke.course_fact("maker-xbox")
    assert xbox.request.prompt_text == "Xbox is produced by" and xbox.request.target_true == "Microsoft"
    with pytest.raises(KeyError, match="case_id"):
        ke.course_fact("nope")
