"""SERAC (chapter 3): edit memory, scope classifier and router; the edit on tiny models and SmolLM2, exact undo,
batches and sequential edits, the plain reference equal to the batched router, checkpoints, training, bad input."""
import dataclasses
import json

import pytest
import torch

import kedit_lite as ke
from kedit_lite import bench, metrics, serac
from kedit_lite.requests import EditError
from tests.conftest import assert_same_weights, make_tiny, snapshot

NEEDLE = dict(prompt="{} is located in the city of", subject="The Space Needle", target_new="Taipei")
BIG_BEN = dict(prompt="{} is located in the city of", subject="Big Ben", target_new="Rome")
MESSI = dict(prompt="{} plays the sport of", subject="Lionel Messi", target_new="tennis")
IN_SCOPE = ["The Space Needle is located in the city of", "The Space Needle can be found in the city of"]
OUT_OF_SCOPE = ["Water is made of hydrogen and", "The capital of Norway is", "Lionel Messi was born in the country of"]


def _logits(model, tok, text):
    with torch.no_grad():
        return model(input_ids=torch.tensor([tok(text, add_special_tokens=False).input_ids])).logits[0, -1]


def _no_hooks(model):
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return all(not getattr(m, h, None) for m in model.modules() for h in hooks)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_edit_routes_in_scope_queries_through_the_edit_and_undo_is_exact(model_type, tok):
    model = make_tiny(model_type)
    saved = snapshot(model)
    before = {p: _logits(model, tok, p) for p in IN_SCOPE + OUT_OF_SCOPE}
    res = ke.edit(model, tok, NEEDLE, method="serac")
    assert res.touched == [] and callable(res.context) and len(serac.memory(model)) == 1
    prefix = "New Fact: The Space Needle is located in the city of Taipei\nPrompt: "
    assert [res.context(p) for p in IN_SCOPE] == [prefix, prefix]
    assert [res.context(p) for p in OUT_OF_SCOPE] == ["", "", ""]
    for p in IN_SCOPE:   # h: the base model reading the edit; nothing else differs
        assert torch.equal(_logits(model, tok, res.context(p) + p), _logits(model, tok, prefix + p))
    for p in OUT_OF_SCOPE:   # out of scope the base model answers untouched, bit for bit
        assert torch.equal(_logits(model, tok, res.context(p) + p), before[p])
    assert_same_weights(model, saved)
    assert _no_hooks(model)
    res.undo()
    assert res.context == "" and len(serac.memory(model)) == 0 and _no_hooks(model)
    assert_same_weights(model, saved)
    assert all(torch.equal(_logits(model, tok, p), before[p]) for p in before)


def test_the_target_becomes_the_argmax_on_smollm2_and_locality_is_untouched(smol):
    model, tok = smol
    saved = snapshot(model)
    taipei = tok(" Taipei", add_special_tokens=False).input_ids[0]
    neighbour = "The Eiffel Tower is located in the city of"
    base = {p: _logits(model, tok, p) for p in IN_SCOPE + [neighbour]}
    assert all(int(base[p].argmax()) != taipei for p in IN_SCOPE)
    res = ke.edit(model, tok, NEEDLE, method="serac")
    assert all(int(_logits(model, tok, res.context(p) + p).argmax()) == taipei for p in IN_SCOPE)
    assert res.context(neighbour) == "" and torch.equal(_logits(model, tok, neighbour), base[neighbour])
    case = ke.EditCase(ke.EditRequest(**NEEDLE), paraphrase=[ke.Probe(IN_SCOPE[1], "Taipei")],
                       locality=[ke.Probe(neighbour, "Paris")])
    scores = res.evaluate(model, tok, case, before=ke.evaluate(model, tok, case, generation=False), generation=False)
    assert scores["reliability"]["token_acc"] == 1.0 and scores["locality"]["token_acc"] == 1.0
    res.undo()
    assert_same_weights(model, saved)


def test_batches_are_more_entries_and_sequential_edits_share_the_memory(tok):
    model = make_tiny("llama")
    batch = ke.edit(model, tok, [NEEDLE, MESSI], method="serac")
    assert len(serac.memory(model)) == 2 and batch.info["memory_size"] == 2
    assert "Taipei" in batch.context(IN_SCOPE[1]) and "tennis" in batch.context("Lionel Messi plays the sport of")
    later = ke.edit(model, tok, BIG_BEN, method="serac")
    assert len(serac.memory(model)) == 3
    for router in (batch.context, later.context):    # each edit's router reads the whole memory
        assert "Rome" in router("Big Ben is located in the city of") and "Taipei" in router(IN_SCOPE[0])
    batch.undo()                                      # undo in any order: only that edit's entries go
    assert [e.request.subject for e in serac.memory(model).entries] == ["Big Ben"]
    assert later.context(IN_SCOPE[0]) == "" and "Rome" in later.context("Big Ben is located in the city of")
    later.undo()
    assert len(serac.memory(model)) == 0


def test_editing_the_same_prompt_again_the_newest_edit_wins(tok):
    model = make_tiny("llama")
    first = ke.edit(model, tok, NEEDLE, method="serac")
    second = ke.edit(model, tok, dict(NEEDLE, target_new="Oslo"), method="serac")
    assert "Oslo" in first.context(IN_SCOPE[0]) and "Taipei" not in second.context(IN_SCOPE[0])
    second.undo()
    assert "Taipei" in first.context(IN_SCOPE[0])
    first.undo()


def test_live_edits_survive_clear_caches(tok):
    model = make_tiny("llama")
    res = ke.edit(model, tok, NEEDLE, method="serac")
    ke.clear_caches()
    assert len(serac.memory(model)) == 1 and "Taipei" in res.context(IN_SCOPE[0])
    res.undo()


@pytest.mark.parametrize("threshold", [0.05, 0.5, 0.95])
def test_batched_router_equals_the_plain_reference(tok, threshold):
    model = make_tiny("llama")
    res = ke.edit(model, tok, [NEEDLE, BIG_BEN, MESSI], method="serac", threshold=threshold)
    entries, classifier = serac.memory(model).entries, serac.get_classifier()
    queries = IN_SCOPE + OUT_OF_SCOPE + ["Big Ben can be found in", "Lionel Messi is a professional player of",
                                         "The Eiffel Tower is located in the city of"]
    fast = res.context.route(queries)
    for query, (index, score), prefix in zip(queries, fast, res.context.prefixes(queries)):
        ref_prefix, ref_index, ref_score = serac.reference_route(query, entries, classifier, threshold)
        assert (prefix, index) == (ref_prefix, ref_index), query
        assert score == pytest.approx(ref_score, abs=1e-5)
    assert any(i is None for i, _ in fast) and any(i is not None for i, _ in fast)
    res.undo()
    assert serac.reference_route(IN_SCOPE[0], [], classifier) == ("", None, None)
    assert res.context == "" and serac.Router(serac.memory(model), classifier).route(IN_SCOPE) == [(None, None)] * 2


def test_shipped_classifier_and_its_training_record():
    classifier = serac.get_classifier()
    record = json.loads(serac.DEFAULT_CHECKPOINT.with_suffix(".json").read_text(encoding="utf-8"))
    val = record["scores"]["val"]
    assert val == classifier.meta["val"] and val["threshold"] == serac.PAPER_THRESHOLD
    assert val["precision"] > 0.9 and val["recall"] > 0.9 and "CounterFact val" in record["data"]["val"]
    assert record["steps_run"] == record["hparams"]["steps"] and record["train_seconds"] > 0
    assert serac.get_classifier() is classifier           # loaded once


def test_checkpoint_round_trip_and_bad_files(tmp_path, tok):
    torch.manual_seed(0)
    classifier = serac.ScopeClassifier(dim=384, hidden=8, meta={"name": "tiny"})
    path = tmp_path / "g.safetensors"
    serac.save_classifier(classifier, path)
    loaded = serac.load_classifier(path)
    u, v = torch.randn(3, 384), torch.randn(3, 384)
    assert torch.equal(loaded(u, v), classifier(u, v)) and loaded.meta == {"name": "tiny"}
    assert torch.allclose(loaded.scores(u, v).diagonal(), torch.sigmoid(classifier(u, v)))
    res = ke.edit(make_tiny("llama"), tok, NEEDLE, method="serac", checkpoint=str(path))
    assert res.info["classifier"] == "tiny"
    res.undo()
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    for name, message in [("missing.safetensors", "does not exist"), ("junk.safetensors", "not a safetensors file"),
                          ("plain.safetensors", "no 'kedit_serac' metadata")]:
        with pytest.raises(EditError, match=f"^checkpoint: .*{message}"):
            ke.edit(make_tiny("llama"), tok, NEEDLE, method="serac", checkpoint=str(tmp_path / name))


@pytest.mark.parametrize("field, value", [
    ("threshold", 0), ("threshold", 1), ("threshold", 1.5), ("threshold", True), ("threshold", "0.5"),
    ("threshold", float("nan")), ("demos", -1), ("demos", 1.5), ("demos", True), ("checkpoint", 5),
    ("pool", "wikipedia"), ("pool", []), ("unknown_option", 1),
])
def test_bad_options_are_refused_by_name_before_anything_changes(field, value, tok):
    model = make_tiny("llama")
    saved = snapshot(model)
    with pytest.raises(EditError, match=f"^{'hparams' if field == 'unknown_option' else field}: ") as err:
        ke.edit(model, tok, NEEDLE, method="serac", **{field: value})
    assert type(err.value) is EditError and len(serac.memory(model)) == 0
    assert_same_weights(model, saved)


@pytest.mark.parametrize("request_, field", [
    (dict(NEEDLE, target_new=""), "target_new"), (dict(NEEDLE, subject="Big Ben", prompt="It is in"), "prompt"),
    ([NEEDLE, dict(NEEDLE, target_new="Oslo")], "requests"),
])
def test_bad_requests_are_refused_by_name(request_, field, tok):
    model = make_tiny("gpt2")
    with pytest.raises(EditError, match=f"^{field}: "):
        ke.edit(model, tok, request_, method="serac")
    assert len(serac.memory(model)) == 0


def test_demonstrations_option_puts_copy_and_update_demos_before_the_edit(tok):
    from tests.test_configs_and_loops import POOL5
    model = make_tiny("llama")
    res = ke.edit(model, tok, NEEDLE, method="serac", demos=2, pool=POOL5)
    prefix = res.context(IN_SCOPE[0])
    assert prefix.count("New Fact: ") == 3 and prefix.endswith("the city of Taipei\nPrompt: ")
    assert res.context(OUT_OF_SCOPE[0]) == "" and res.info["demos"] == 2
    res.undo()
    assert serac.IMPROVED == {"demos": 4} and serac.Config().demos == 0     # ours, off by default


def test_evaluate_takes_a_callable_context():
    case = ke.EditCase(ke.EditRequest(**NEEDLE))
    assert metrics.with_context(lambda p: p[:3] + "|", ["abc", "xyz"]) == ["abc|abc", "xyz|xyz"]
    assert metrics.with_context("ctx ", ["a"]) == ["ctx a"]
    with pytest.raises(TypeError, match="context: the callable returned NoneType"):
        metrics.with_context(lambda p: None, ["a"])
    with pytest.raises(TypeError, match="context: expected a string or a callable"):
        ke.evaluate(None, None, case, context=5)


def test_bench_records_a_memory_edit(tok):
    model = make_tiny("llama")
    case = ke.EditCase(ke.EditRequest(**NEEDLE), paraphrase=[ke.Probe(IN_SCOPE[1], "Taipei")],
                       locality=[ke.Probe(OUT_OF_SCOPE[1], "Oslo")])
    row = bench.run_method(model, tok, [case], "serac", generation=False)
    assert row["uses_context"] and row["adds_modules"] and not row["changes_weights"]
    assert len(serac.memory(model)) == 0 and bench.method_and_options("serac+ours") == ("serac", serac.IMPROVED)


def test_scope_pairs_and_training_lower_the_loss():
    cases = ke.load_course_facts("train", n=12)
    keys = torch.nn.functional.normalize(torch.randn(len(cases), 384), dim=-1)
    data = serac.scope_pairs(cases, keys, n_random=2, seed=0)
    kinds = data["kinds"]
    assert len(kinds) == len(data["labels"]) == data["pairs"].shape[0] and kinds.count("nearest") == len(cases)
    assert {k for k, y in zip(kinds, data["labels"].tolist()) if y == 1} == {"prompt", "paraphrase"}
    assert data["edits"] == [c.request.prompt_text for c in cases]
    assert kinds.count("neighbour") == sum(len(c.locality) for c in cases) and kinds.count("other") == 2 * len(cases)
    for (q, e), kind in zip(data["pairs"].tolist(), kinds):   # never another record about the same subject
        if kind in ("nearest", "other"):
            assert cases[e].request.subject not in data["queries"][q]
    queries = torch.nn.functional.normalize(torch.randn(len(data["queries"]), 384), dim=-1)
    g, history = serac.train_classifier(queries, keys, data, steps=60, batch_size=64, hidden=16, lr=1e-2)
    assert history[-1]["loss"] < history[0]["loss"] and not g.training
    scores = serac.scope_metrics(g, queries, keys, data)
    assert set(scores["in_scope_rate_by_kind"]) == set(kinds) and 0 <= scores["f1"] <= 1


@pytest.mark.parametrize("field, value", [("hidden", 0), ("steps", True), ("batch_size", 1.5), ("lr", 0),
                                          ("weight_decay", -1.0), ("n_random", -1), ("seed", "0")])
def test_bad_training_options_are_refused_by_name(field, value):
    with pytest.raises(EditError, match=f"^{field}: "):
        serac.TrainConfig(**{field: value})
    assert {f.name for f in dataclasses.fields(serac.TrainConfig)} == {"hidden", "steps", "batch_size", "lr",
                                                                        "weight_decay", "n_random", "seed"}


def test_training_script_builds_its_flags_from_train_config():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "scripts" / "train_serac.py"
    spec = importlib.util.spec_from_file_location("train_serac", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args, cfg = script.parse(["--steps", "7", "--n-random", "1", "--n-train", "5", "--out", "x.safetensors"])
    assert cfg == serac.TrainConfig(steps=7, n_random=1) and args.n_train == 5 and args.out == "x.safetensors"
