"""FT, IKE, debias, GRACE, CaliNET, SERAC and KN Configs (every field's bad value named), FT's reference equal to the
fast path, the shared clamped Adam, the one edit -> score -> undo loop (metrics.score_edit), tokens.chat and the caches."""
import copy
import dataclasses
import math

import pytest
import torch

import kedit_lite as ke
from kedit_lite import caches, calinet, checks, debias, ft, grace, ike, kn, optimise, retrieval, serac, tokens, tracing  # noqa: F401,E501
from kedit_lite.metrics import EditScore, score_edit
from kedit_lite.requests import EditError
from tests.conftest import assert_same_weights, make_tiny, snapshot

G = dict(prompt="{} is located in the city of", subject="The Space Needle", target_new="Taipei")
CASE = ke.EditCase(ke.EditRequest(**G), paraphrase=[ke.Probe("The Space Needle stands in the city of", "Taipei")],
                   locality=[ke.Probe("The Eiffel Tower is located in the city of", "Paris")])
POOL = [ke.EditCase(ke.EditRequest(prompt="{} is located in the city of", subject="The Louvre", target_new="Rome"),
                    paraphrase=[ke.Probe("The Louvre can be found in the city of", "Rome")],
                    locality=[ke.Probe("The Colosseum is located in the city of", "Rome")])]

# (Config class, field, a bad value): every field of every Config appears at least once (checked below)
BAD_VALUES = [
    (ft.Config, "layers", "1"), (ft.Config, "layers", []), (ft.Config, "layers", [True]), (ft.Config, "layers", 1.0),
    (ft.Config, "params", "attention"), (ft.Config, "params", ["mlp"]),
    (ft.Config, "lr", True), (ft.Config, "lr", math.inf), (ft.Config, "lr", -1e-3), (ft.Config, "lr", 100.0),
    (ft.Config, "steps", True), (ft.Config, "steps", 0), (ft.Config, "steps", 2.0),
    (ft.Config, "norm_constraint", 0), (ft.Config, "norm_constraint", "abc"), (ft.Config, "norm_constraint", math.nan),
    (ft.Config, "target_loss", "0.1"), (ft.Config, "target_loss", -1.0), (ft.Config, "progress", "yes"),
    (ike.Config, "k", True), (ike.Config, "k", -1), (ike.Config, "k", 2.0),
    (ike.Config, "mix", "nope"), (ike.Config, "mix", (1, 2)), (ike.Config, "mix", {"copy": -1}),
    (ike.Config, "pool", "nope"), (ike.Config, "pool", []), (ike.Config, "pool", 5),
    (ike.Config, "chat", "yes"), (ike.Config, "seed", 1.5), (ike.Config, "seed", True),
    (ike.Config, "reserve_tokens", 0), (ike.Config, "reserve_tokens", "8"),
    (debias.Config, "steps", 0), (debias.Config, "steps", True), (debias.Config, "lr", math.inf),
    (debias.Config, "lr", True), (debias.Config, "kl_weight", -1.0), (debias.Config, "kl_weight", "1"),
    (debias.Config, "norm_constraint", 0), (debias.Config, "norm_constraint", None),
    (grace.Config, "layer", 1.5), (grace.Config, "layer", "2"), (grace.Config, "eps_init", 0),
    (grace.Config, "eps_init", math.nan), (grace.Config, "eps_init", True), (grace.Config, "steps", 0),
    (grace.Config, "steps", 2.0), (grace.Config, "lr", math.inf), (grace.Config, "lr", 100.0),
    (grace.Config, "replacement", "all"), (grace.Config, "replacement", None), (grace.Config, "value_init", "hot"),
    (grace.Config, "seed", -1), (grace.Config, "seed", 1.5), (grace.Config, "radius_margin", -1e-3),
    (grace.Config, "radius_margin", "0"), (grace.Config, "progress", 1),
    (calinet.Config, "layers", []), (calinet.Config, "layers", [True]), (calinet.Config, "layers", "1"),
    (calinet.Config, "n_slots", 0), (calinet.Config, "n_slots", 2.0), (calinet.Config, "steps", True),
    (calinet.Config, "lr", -1e-2), (calinet.Config, "lr", math.nan), (calinet.Config, "target_loss", "0"),
    (calinet.Config, "n_prefixes", -1), (calinet.Config, "templates", "{} is in"),
    (calinet.Config, "templates", ["no subject"]), (calinet.Config, "templates", ["{} is in "]),
    (calinet.Config, "seed", 1.5), (calinet.Config, "progress", 1),
    (serac.Config, "checkpoint", 5), (serac.Config, "checkpoint", ["g.safetensors"]),
    (serac.Config, "threshold", 0), (serac.Config, "threshold", 1), (serac.Config, "threshold", True),
    (serac.Config, "threshold", "0.5"), (serac.Config, "threshold", math.nan),
    (serac.Config, "demos", -1), (serac.Config, "demos", 2.0), (serac.Config, "demos", True),
    (serac.Config, "pool", "nope"), (serac.Config, "pool", []), (serac.Config, "pool", 5),
    (kn.Config, "layers", "1"), (kn.Config, "layers", []), (kn.Config, "layers", [True]), (kn.Config, "layers", [2, 2]),
    (kn.Config, "ig_steps", 0), (kn.Config, "ig_steps", True), (kn.Config, "threshold", 1.5),
    (kn.Config, "threshold", "0.2"), (kn.Config, "share", -0.1), (kn.Config, "share", math.nan),
    (kn.Config, "min_neurons", 0), (kn.Config, "max_neurons", 2.5), (kn.Config, "max_neurons", 1),
    (kn.Config, "lambda1", -1.0), (kn.Config, "lambda2", math.inf), (kn.Config, "n_prefixes", -1),
    (kn.Config, "prefix_len", 0), (kn.Config, "relation_subjects", "Paris"), (kn.Config, "relation_subjects", [""]),
    (kn.Config, "relation_share", 2.0), (kn.Config, "scale_by_value_norm", 1), (kn.Config, "signed", "yes"),
    (kn.Config, "progress", None),
]


@pytest.mark.parametrize("config_class, name, value", BAD_VALUES,
                         ids=[f"{c.__module__.split('.')[-1]}-{n}-{v!r}" for c, n, v in BAD_VALUES])
def test_every_bad_config_value_is_an_edit_error_naming_the_field(config_class, name, value):
    with pytest.raises(EditError, match=f"^{name}: ") as err:
        config_class(**{name: value})
    assert type(err.value) is EditError


@pytest.mark.parametrize("config_class", [ft.Config, ike.Config, debias.Config, grace.Config, calinet.Config,
                                          serac.Config, kn.Config],
                         ids=lambda c: c.__module__)
def test_every_config_field_has_a_bad_value_above_and_defaults_are_valid(config_class):
    fields = {f.name for f in dataclasses.fields(config_class)}
    assert fields == {n for c, n, _ in BAD_VALUES if c is config_class}
    config = config_class()
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(config, sorted(fields)[0], None)


def test_ft_options_reach_apply_through_the_config(tok):
    model = make_tiny("llama")
    saved = snapshot(model)
    res = ke.edit(model, tok, G, method="ft", config=ft.Config(layers=[1, 2], steps=2), lr=1e-2)
    assert isinstance(res.config, ft.Config) and res.config.layers == (1, 2) and res.config.lr == 1e-2
    assert res.touched == ["model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"]
    assert res.info["steps"] == 2 and not res.adds_modules
    res.undo()
    assert_same_weights(model, saved)
    with pytest.raises(EditError, match="layers: layer 3 is out of range") as err:
        ke.edit(model, tok, G, method="ft", layers=[1, 3])
    assert type(err.value) is EditError
    with pytest.raises(EditError, match="config: expected a Config"):
        ke.edit(model, tok, G, method="ft", config=ike.Config())
    assert_same_weights(model, saved)


def test_ike_options_reach_apply_through_the_config(tok):
    model = make_tiny("llama")
    res = ke.edit(model, tok, G, method="ike", k=1, pool=POOL, mix=(0, 1, 0))
    assert isinstance(res.config, ike.Config) and res.info["counts"] == {"copy": 0, "update": 1, "retain": 0}
    assert res.context.count("New Fact: ") == 2 and res.touched == []


@pytest.mark.parametrize("model_type", sorted(["gpt2", "gptj", "gpt_neox", "llama", "qwen2", "mistral"]))
@pytest.mark.parametrize("norm_constraint", [None, 2e-3])
def test_ft_fast_path_equals_the_hand_written_reference(tok, model_type, norm_constraint):
    """torch's Adam and Algorithm 1 by hand agree to float rounding: sqrt(v/bc2) vs sqrt(v)/sqrt(bc2) differ by
    about one ulp per step, so after 4 steps of lr 1e-2 the weights agree to ~1e-7; 1e-6 leaves room, far below
    the 1e-2-sized changes being compared."""
    fast_model = make_tiny(model_type)
    ref_model = copy.deepcopy(fast_model)
    cfg = ft.Config(layers=1, lr=1e-2, steps=4, norm_constraint=norm_constraint)
    res = ke.edit(fast_model, tok, G, method="ft", config=cfg)
    losses = ft.reference_edit(ref_model, tok, [ke.EditRequest(**G)], cfg)
    assert losses == pytest.approx(res.info["losses"], rel=1e-5)
    fast, ref, before = dict(fast_model.named_parameters()), dict(ref_model.named_parameters()), res.saved_weights()
    for name in res.touched:
        assert (fast[name] - before[name]).abs().max() > 1e-3          # the edit really moved the weight
        assert torch.allclose(fast[name], ref[name], rtol=0, atol=1e-6), name
    untouched = [n for n in ref if n not in res.touched]
    assert all(torch.equal(ref[n], fast[n]) for n in untouched)


def test_clamped_adam_bounds_stops_early_and_leaves_no_grad():
    torch.manual_seed(0)
    w = torch.zeros(5)
    w0 = w.clone()
    target = torch.tensor([1.0, -1.0, 0.5, 0.0, 2.0])
    losses = optimise.clamped_adam([w], lambda: ((w - target) ** 2).sum(), steps=50, lr=0.1, bound=0.3)
    assert len(losses) == 50 and losses[-1] < losses[0]
    assert (w - w0).abs().max() <= 0.3 + 1e-7 and torch.allclose(w[:3], torch.tensor([0.3, -0.3, 0.3]))
    assert not w.requires_grad and w.grad is None
    v = torch.zeros(2)
    early = optimise.clamped_adam([v], lambda: ((v - 1) ** 2).sum(), steps=500, lr=0.1, stop_below=1e-2)
    assert len(early) < 500 and early[-1] < 1e-2 <= early[-2]


def test_score_edit_scores_before_after_and_undoes(tok):
    model = make_tiny("llama")
    saved = snapshot(model)
    scored = score_edit(model, tok, CASE, "ft", generation=False, layers=1, lr=1e-2, steps=3)
    assert isinstance(scored, EditScore) and scored.result.undone and scored.result.method == "ft"
    assert scored.seconds == scored.result.seconds > 0 and scored.eval_seconds > 0 and scored.context == ""
    logp = lambda s: s["details"]["reliability"][0]["logprob"]
    assert logp(scored.after) > logp(scored.before)                    # the edit made Taipei likelier
    assert "locality" in scored.after and "gen" not in scored.after["reliability"]
    assert_same_weights(model, saved)
    again = score_edit(model, tok, CASE, "ft", before=scored.before, generation=False, layers=1, lr=1e-2, steps=3)
    assert again.before is scored.before and logp(again.after) == pytest.approx(logp(scored.after), abs=1e-6)
    with pytest.raises(EditError, match="steps"):
        score_edit(model, tok, CASE, "ft", steps=0)
    assert_same_weights(model, saved)


def test_score_edit_on_several_cases_is_one_edit_and_keeps_ike_context(tok):
    model = make_tiny("llama")
    saved = snapshot(model)
    other = ke.EditCase(ke.EditRequest(prompt="{} is located in the city of", subject="Big Ben", target_new="Paris"))
    scored = score_edit(model, tok, [CASE, other], "ft", generation=False, layers=1, steps=2)
    assert len(scored.before) == len(scored.after) == 2 and len(scored.result.requests) == 2
    assert_same_weights(model, saved)
    ike_scored = score_edit(model, tok, CASE, "ike", generation=False, k=0)
    assert ike_scored.context.startswith("New Fact: ") and ike_scored.result.context == ""


def test_bench_records_what_the_edit_changed(tok):
    from kedit_lite import bench
    model = make_tiny("llama")
    tp = bench.run_method(model, tok, [CASE], "t-patcher", generation=False,
                          hparams=dict(steps=3, memory=["The sky is blue."], contrast=False))
    assert tp["adds_modules"] and not tp["changes_weights"] and not tp["uses_context"]
    ik = bench.run_method(model, tok, [CASE], "ike", generation=False, hparams=dict(k=0))
    assert ik["uses_context"] and not ik["adds_modules"] and not ik["changes_weights"]


def test_chat_begins_the_assistant_answer(tok):
    plain = tokens.chat(tok, "What is your name?")
    assert plain.startswith("<|im_start|>") and "What is your name?" in plain and plain == plain.rstrip()
    assert plain.endswith("assistant") and tokens.join(plain, "SmolLM") == " SmolLM"
    begun = tokens.chat(tok, "What is your name?", "My name is")
    assert begun == plain + "\nMy name is"

    class NoTemplate:
        chat_template = None
    with pytest.raises(EditError, match="tok: this tokenizer has no chat template"):
        tokens.chat(NoTemplate(), "Hi")


def test_range_words_use_the_right_article():
    with pytest.raises(EditError, match=r"x: expected an integer from 0 to 5, got 7"):
        checks.integer("x", 7, 0, 5)
    with pytest.raises(EditError, match=r"x: expected a number >= 2"):
        checks.number("x", 1, 2)


def test_tracing_and_ike_caches_are_library_caches(tok):
    model = make_tiny("llama")
    sigma = tracing.embedding_std(model, tok)
    names = caches.all_caches()
    assert {"tracing sigma", "ike pools", "retrieval encoders"} <= set(names)
    assert names["tracing sigma"] >= 1
    ke.clear_caches()
    assert caches.all_caches()["tracing sigma"] == 0
    assert tracing.embedding_std(model, tok) == sigma


POOL5 = [ke.EditCase(ke.EditRequest(prompt="{} is located in the city of", subject=s, target_new=t),
                     paraphrase=[ke.Probe(f"{s} can be found in the city of", t)],
                     locality=[ke.Probe(f"The museum next to {s} is in the city of", old)])
         for s, t, old in [("The Louvre", "Rome", "Paris"), ("Big Ben", "Tokyo", "London"),
                           ("The Colosseum", "Oslo", "Rome"), ("The Sydney Opera House", "Lima", "Sydney"),
                           ("The Golden Gate Bridge", "Cairo", "San Francisco")]]


@pytest.mark.parametrize("options", [dict(k=3), dict(k=4, mix=(1, 1, 1), seed=3), dict(k=2, mix=(0, 0, 1)),
                                     dict(k=4, chat=True)], ids=str)
def test_ike_context_equals_the_plain_reference(tok, options):
    """Retrieval with cached embeddings and top-k gives exactly the reference's context (string equality)."""
    model = make_tiny("llama")
    res = ke.edit(model, tok, G, method="ike", pool=POOL5, **options)
    records = ike.resolve_pool(POOL5)[1]
    assert res.info["dropped"] == 0 and len(res.info["demonstrations"]) == options["k"]
    assert res.context == ike.reference_context(tok, [ke.EditRequest(**G)], records, res.config)
