"""FT on SmolLM2: it edits, it is measured, and undo is bit-identical; plus the metric helpers."""
import pytest
import torch

import kedit_lite as ke
from kedit_lite import metrics, tokens
from tests.conftest import assert_same_weights, snapshot


def test_normalize_and_answer_in():
    assert metrics.normalize("The Space-Needle.") == "space needle"
    assert metrics.answer_in(" Taipei, Taiwan, and", "Taipei")
    assert not metrics.answer_in(" New York", "Taipei")


def test_encode_pairs_marks_answer_tokens(tok):
    batch = tokens.encode_pairs(tok, ["The Space Needle is in", "Hi"], ["Taipei", "there friend"])
    n_answer = [len(tok(" Taipei", add_special_tokens=False).input_ids),
                len(tok(" there friend", add_special_tokens=False).input_ids)]
    assert batch["answer_mask"].sum(1).tolist() == n_answer
    ids = batch["input_ids"][0]
    assert tok.decode(ids[batch["answer_mask"][0].roll(1)]).strip() == "Taipei"
    with pytest.raises(ValueError, match="answers"):
        tokens.encode_pairs(tok, ["a"], ["b", "c"])


def test_subject_token_positions(tok):
    text = "The Space Needle is located in the city of"
    first, end = tokens.subject_token_range(tok, text, "The Space Needle")
    assert tok.decode(tok(text).input_ids[first:end]) == "The Space Needle"
    assert tokens.subject_last_index(tok, "I love the Space Needle", "Space Needle") == end - 1 + 2
    with pytest.raises(ValueError, match="subject"):
        tokens.subject_last_index(tok, text, "Eiffel")


def test_ft_edit_evaluate_undo(smol):
    model, tok = smol
    case = ke.lecture_case("space-needle-taipei")
    saved = snapshot(model)
    before = ke.evaluate(model, tok, case)
    assert before["reliability"]["token_acc"] < 1.0 and before["reliability"]["gen"] == 0.0
    res = ke.edit(model, tok, case.request, method="ft", layers=4, lr=1e-3, steps=30)
    after = res.evaluate(model, tok, case, before=before)
    assert after["reliability"]["token_acc"] == 1.0 and after["reliability"]["gen"] == 1.0
    assert after["reliability"]["prob_wins"] == 1.0
    assert 0.0 <= after["locality"]["token_acc"] <= 1.0
    assert res.seconds > 0 and res.touched == ["model.layers.4.mlp.down_proj.weight"]
    assert not torch.equal(model.model.layers[4].mlp.down_proj.weight, saved["model.layers.4.mlp.down_proj.weight"])
    res.undo()
    assert_same_weights(model, saved)
    with pytest.raises(RuntimeError, match="already undone"):
        res.undo()
    assert ke.evaluate(model, tok, case)["details"]["reliability"][0]["logprob"] == pytest.approx(
        before["details"]["reliability"][0]["logprob"], abs=1e-6)


def test_ft_norm_constraint_bounds_every_weight_change(smol):
    model, tok = smol
    saved = snapshot(model)
    res = ke.edit(model, tok, ke.lecture_case("space-needle-taipei").request, method="ft", layers=4,
                  norm_constraint=1e-3, steps=5)
    name = res.touched[0]
    delta = (dict(model.named_parameters())[name] - saved[name]).abs().max().item()
    assert 0 < delta <= 1e-3 + 1e-7
    res.undo()
    assert_same_weights(model, saved)


def test_locality_against_before_is_agreement(smol):
    model, tok = smol
    case = ke.lecture_case("space-needle-taipei")
    before = ke.evaluate(model, tok, case)
    same = ke.evaluate(model, tok, case, before=before)
    assert same["locality"]["token_acc"] == 1.0 and same["locality"]["gen"] == 1.0


def test_summarize_averages():
    s = metrics.summarize([{"reliability": {"token_acc": 1.0}}, {"reliability": {"token_acc": 0.0}}])
    assert s == {"reliability.token_acc": 0.5}


def test_bench_runs_and_writes_json(tmp_path, capsys):
    from kedit_lite import bench
    out = tmp_path / "r.json"
    results = bench.main(["--method", "ft", "--data", "lecture", "--n", "2", "--no-generation",
                          "--hparams", '{"steps": 3}', "--json", str(out)])
    printed = capsys.readouterr().out
    assert "reliability.token_acc" in printed and "median s/edit" in printed
    assert out.exists() and results[0]["n"] == 2 and results[0]["median_seconds_per_edit"] > 0
    with pytest.raises(SystemExit):
        bench.main(["--method", "nope"])


def test_prob_wins_on_edit_prompt_and_paraphrases(smol):
    """CounterFact's efficacy/paraphrase scores: share of prompts where P(new) > P(true), from the same log-probs."""
    model, tok = smol
    case = ke.lecture_case("space-needle-taipei")
    scores = ke.evaluate(model, tok, case, generation=False)
    for kind in ("reliability", "paraphrase"):
        rows = scores["details"][kind]
        true = metrics.teacher_forced(model, tok, [r["prompt"] for r in rows], [case.request.target_true] * len(rows))
        assert [r["logprob_true"] for r in rows] == pytest.approx([t["logprob"] for t in true], abs=1e-5)
        wins = sum(r["logprob"] > t["logprob"] for r, t in zip(rows, true)) / len(rows)
        assert scores[kind]["prob_wins"] == wins
    assert scores["paraphrase"]["prob_wins"] < 0.5          # before the edit the model prefers Seattle ...
    res = ke.edit(model, tok, case.request, method="rome")
    after = res.evaluate(model, tok, case, generation=False)
    res.undo()
    assert after["paraphrase"]["prob_wins"] > scores["paraphrase"]["prob_wins"]   # ... after it, Taipei more often
    no_true = ke.evaluate(model, tok, dict(prompt=case.request.prompt, subject=case.request.subject,
                                           target_new="Taipei"), generation=False)
    assert "prob_wins" not in no_true["reliability"]
