"""KN, Knowledge Neurons (chapter 5): the shared integrated gradients (fast == plain), neuron selection, the value
update, edits on GPT-2 and gated (Llama) MLPs, the fast path equal to the reference, exact undo, bad input."""
import copy
import dataclasses

import pytest
import torch

import kedit_lite as ke
from kedit_lite import adapters, attribution, hooks, kn, privacy
from kedit_lite.requests import EditError
from kedit_lite.tokens import encode_pairs
from tests.conftest import assert_same_weights, make_tiny, snapshot

GOOD = dict(prompt="{} is located in the city of", subject="The Space Needle", target_new="Tokyo")
TEXT = "The Space Needle is located in the city of"
# Random tiny models have tiny activations: λ2 scaled up to their size (the paper's 8 suits BERT-base).
TINY = dict(lambda2=100.0, n_prefixes=2, ig_steps=6, relation_subjects=("Marie Curie", "the Louvre", "Volkswagen"))


@pytest.fixture(scope="module")
def tok():
    """SmolLM2's tokenizer alone: these tests edit tiny models, so no per-test snapshot of the shared SmolLM2."""
    return ke.load_model()[1]


def _firing(model):
    """GPT-2 whose MLP neurons fire positively (GELU inputs shifted up), as BERT's knowledge neurons do."""
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.c_fc.bias += 2.0
    return model


def _rank(model, tok, answer, text=TEXT):
    logits = _last_logits(model, tok, text)
    return int((logits > logits[kn.first_token(tok, text, answer)]).sum())


def _ids(tok, text=TEXT):
    return torch.tensor([tok(text, add_special_tokens=False).input_ids])


def _last_logits(model, tok, text=TEXT):
    with torch.no_grad():
        return model(input_ids=_ids(tok, text)).logits[0, -1]


def _no_hooks_left(model):
    """No forward/backward hook and no instance-level forward on any submodule."""
    for name, module in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs"):
            assert not getattr(module, attr, {}), f"{name or 'model'}.{attr} is not empty"
        assert "forward" not in module.__dict__, f"{name or 'model'} keeps an overridden forward"


@pytest.mark.parametrize("model_type,options", [("llama", dict(layers=[2])), ("gpt2-firing", {}),
                                                ("llama", dict(signed=True)), ("gpt2", dict(signed=True))])
def test_edit_makes_the_target_the_argmax_and_undo_is_exact(model_type, options, tok):
    """The published update where the knowledge neurons fire positively; `signed` (ours) wherever they fire."""
    model = _firing(make_tiny("gpt2")) if model_type == "gpt2-firing" else make_tiny(model_type)
    saved = snapshot(model)
    assert _rank(model, tok, "Tokyo") > 100
    res = ke.edit(model, tok, GOOD, method="kn", **{**TINY, **options})
    assert _rank(model, tok, "Tokyo") == 0                             # the target is now the argmax
    neurons = res.info["neurons"]
    assert 1 <= len(neurons) <= 5 and res.info["columns_changed"] == len(set(neurons))
    layers = options.get("layers", range(3))
    assert res.touched == [adapters.mlp_out_weight_name(model, layer) for layer in layers]
    assert set(res.info["changed"]) == {adapters.mlp_out_weight_name(model, layer) for layer, _ in neurons}
    before = res.saved_weights()
    for name in res.touched:                                           # exactly the neurons' value columns moved
        now = adapters.as_out_in(model, dict(model.named_parameters())[name])
        moved = (now != adapters.as_out_in(model, before[name])).any(0).nonzero().flatten().tolist()
        assert moved == sorted(i for layer, i in neurons if adapters.mlp_out_weight_name(model, layer) == name)
    _no_hooks_left(model)
    res.undo()
    assert_same_weights(model, saved)
    _no_hooks_left(model)


def test_published_update_pushes_the_wrong_way_where_neurons_fire_negatively(tok):
    """Why `signed` exists: with a_i < 0, a_i·(v_i + λ2·E[new]) lowers the new answer (plain tiny GPT-2 here)."""
    model = make_tiny("gpt2")
    rank = _rank(model, tok, "Tokyo")
    res = ke.edit(model, tok, GOOD, method="kn", **TINY)
    assert sum(a < 0 for a in res.info["requests"][0]["activation"]) >= 3
    assert _rank(model, tok, "Tokyo") > rank
    res.undo()


def test_info_lists_what_was_located(tok):
    model = make_tiny("llama")
    res = ke.edit(model, tok, dict(GOOD, target_true="Seattle"), method="kn", **TINY)
    found, = res.info["requests"]
    assert found["neurons"] == res.info["neurons"] and found["n_prompts"] == 3
    assert found["old_token"] == kn.first_token(tok, TEXT, "Seattle")          # target_true is the old answer
    assert found["new_token"] == kn.first_token(tok, TEXT, "Tokyo")
    assert len(found["attribution"]) == len(found["activation"]) == len(found["neurons"])
    assert all(a > 0 for a in found["attribution"]) and 0 <= found["share"] <= 0.7
    assert not set(found["neurons"]) & set(found["relation_neurons"])
    res.undo()
    old, _ = kn.answers(model, tok, ke.EditRequest(**GOOD))                      # no target_true: the model's own
    assert old == int(_last_logits(model, tok).argmax())


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gpt_neox"])
def test_fast_path_equals_the_reference(model_type, tok):
    """apply (batched IG, cached prefix, replayed blocks, tensor selection) == reference_edit (plain loops, sets)."""
    fast_model = make_tiny(model_type)
    ref_model = copy.deepcopy(fast_model)
    cfg = kn.Config(**TINY)
    res = ke.edit(fast_model, tok, GOOD, method="kn", config=cfg)
    info = kn.reference_edit(ref_model, tok, GOOD, cfg)
    fast, ref = res.info["requests"][0], info["requests"][0]
    assert fast["neurons"] == ref["neurons"] and fast["neurons"]
    assert fast["share"] == ref["share"] and fast["relation_neurons"] == ref["relation_neurons"]
    assert fast["attribution"] == pytest.approx(ref["attribution"], rel=1e-4)
    fast_p, ref_p = dict(fast_model.named_parameters()), dict(ref_model.named_parameters())
    assert all(torch.equal(fast_p[n], ref_p[n]) for n in fast_p)       # same neurons, same update: same weights


@pytest.mark.parametrize("start,rule", [(0, "midpoint"), (-1, "right"), (3, "left")])
def test_batched_attribution_equals_the_plain_one_on_every_family(tiny, tok, start, rule):
    ids = _ids(tok)
    start = start % ids.shape[1]
    score = attribution.next_token_prob(kn.first_token(tok, TEXT, "Paris"))
    ref = attribution.reference_attribution(tiny, ids, [0, 1, 2], score, steps=4, start=start, rule=rule)
    fast = attribution.attribution(tiny, ids, [2, 0, 1], score, steps=4, start=start, rule=rule, max_tokens=50)
    assert fast.shape == (3, adapters.mlp_dims(tiny)[1]) and ref.abs().max() > 0
    assert torch.allclose(fast[[1, 2, 0]], ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())


def test_attribution_sums_to_the_score_change(tok):
    """Completeness of integrated gradients: Σ_i attr_i ≈ s(a) − s(0) (one layer's activations zeroed)."""
    model = make_tiny("gpt2")
    ids, target = _ids(tok), kn.first_token(tok, TEXT, "Paris")
    score = attribution.next_token_prob(target)
    attr = attribution.attribution(model, ids, [1], score, steps=200, start=ids.shape[1] - 1)
    name = adapters.module_name(model, "mlp_out", 1)

    def zero_last(x):
        x = x.clone()
        x[:, -1] = 0
        return x
    with torch.no_grad(), hooks.patch(model, name, zero_last, what="input"):
        off = score(model(input_ids=ids).logits)
    on = score(model(input_ids=ids).logits)
    assert attr.sum().item() == pytest.approx((on - off).item(), rel=1e-2)


def test_fast_attribution_replays_the_blocks_below(tok):
    """The blocks below the lowest scaled layer run twice (prefix and the recorded pass), whatever the steps."""
    model = make_tiny("llama")
    mlp0 = adapters.module_name(model, "mlp", 0)
    score = attribution.next_token_prob(5)
    for steps in (2, 9):
        calls = []
        with hooks.on_forward(model, mlp0, lambda name, x: calls.append(x.shape[0])):
            attribution.attribution(model, _ids(tok), [2], score, steps=steps, start=4)
        assert calls == [1, 1]


def test_privacy_attribution_is_the_shared_one(tok):
    model = make_tiny("llama")
    prompt, secret = "Zorblax Quentin's phone number is", "555-0142"
    got = privacy.neuron_attribution(model, tok, prompt, secret, layers=[0, 2], steps=3)
    batch = encode_pairs(tok, [prompt], [secret])
    mask = batch["answer_mask"][0]
    score = attribution.answer_logprob(mask, batch["labels"][0, mask])
    ref = attribution.reference_attribution(model, batch["input_ids"], [0, 2], score, steps=3,
                                            attributed=mask.nonzero())
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-9)


def test_alphas_follow_the_rule():
    assert attribution.alphas(4, "right").tolist() == [0.25, 0.5, 0.75, 1.0]      # the paper's k/m, k = 1..m
    assert attribution.alphas(4, "left").tolist() == [0.0, 0.25, 0.5, 0.75]       # the authors' code
    assert attribution.alphas(2).tolist() == [0.25, 0.75]
    with pytest.raises(EditError, match="steps: expected a positive integer"):
        attribution.alphas(0)
    with pytest.raises(EditError, match="rule: expected one of"):
        attribution.alphas(3, "trapezoid")


def test_selection_threshold_share_and_limits():
    layers = [4, 7]
    scores = torch.zeros(3, 2, 6)
    scores[:, 0, 0] = torch.tensor([1.0, 1.0, 1.0])      # top everywhere
    scores[:, 1, 2] = torch.tensor([0.5, 0.5, 0.1])      # above 0.2·max in 2 of 3 prompts
    scores[:, 1, 3] = torch.tensor([0.3, 0.0, 0.0])      # in 1 of 3
    scores[:, 0, 5] = torch.tensor([0.15, 0.15, 0.15])   # below 0.2·max
    for select in (kn.select_neurons, kn.reference_select):
        cfg = kn.Config(min_neurons=1)
        assert select(scores, layers, cfg) == ([(4, 0)], 0.7)                    # 2/3 is not more than 0.7
        assert select(scores, layers, kn.Config(min_neurons=2)) == ([(4, 0), (7, 2)], 0.65)   # p lowered once
        assert select(scores, layers, kn.Config(min_neurons=3)) == ([(4, 0), (7, 2), (7, 3)], 0.3)
        assert select(scores, layers, kn.Config(min_neurons=2, max_neurons=2, share=0.0))[0] == [(4, 0), (7, 2)]
        assert select(scores, layers, kn.Config(min_neurons=2), {(4, 0)}) == ([(7, 2), (7, 3)], 0.3)
        assert select(-scores, layers, cfg) == ([], 0.0)                         # nothing positive: no neuron


def test_selection_fast_equals_plain_on_random_scores():
    torch.manual_seed(0)
    for trial in range(20):
        scores = torch.randn(5, 3, 40) ** 3
        cfg = kn.Config(threshold=0.3 + 0.02 * trial, min_neurons=1 + trial % 4, max_neurons=6)
        exclude = frozenset({(1, i) for i in range(0, 40, 3)})
        assert kn.select_neurons(scores, [0, 1, 2], cfg, exclude) == kn.reference_select(scores, [0, 1, 2], cfg,
                                                                                         exclude)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_update_moves_each_value_by_the_embeddings(model_type):
    model = make_tiny(model_type)
    E = model.get_output_embeddings().weight
    column = lambda layer, i: adapters.as_out_in(model, adapters.layer_module(model, "mlp_out", layer).weight)[:, i]
    v0, v1 = column(1, 3).clone(), column(2, 5).clone()
    kn.update_values(model, [(1, 3), (2, 5)], 10, 20, kn.Config(lambda1=1.0, lambda2=8.0))
    assert torch.allclose(column(1, 3), v0 - E[10] + 8 * E[20], atol=1e-6)
    assert torch.allclose(column(2, 5), v1 - E[10] + 8 * E[20], atol=1e-6)
    v0 = column(1, 3).clone()
    kn.update_values(model, [(1, 3)], 10, 20, kn.Config(), signs=[-1.0])              # `signed`: reversed
    assert torch.allclose(column(1, 3), v0 + E[10] - 8 * E[20], atol=1e-6)
    v0 = column(1, 3).clone()
    kn.update_values(model, [(1, 3)], 10, 20, kn.Config(lambda2=2.0, scale_by_value_norm=True))
    step = v0.norm() * (2 * E[20] / E[20].norm() - E[10] / E[10].norm())               # the authors' code
    assert torch.allclose(column(1, 3), v0 + step, atol=1e-5)


def test_signed_follows_the_activation_sign(tok):
    """With `signed`, a neuron whose activation is negative gets the change reversed (so a_i·v_i still gains E[new])."""
    model = make_tiny("llama")
    res = ke.edit(model, tok, GOOD, method="kn", signed=True, **TINY)
    found = res.info["requests"][0]
    E = model.get_output_embeddings().weight
    change = TINY["lambda2"] * E[found["new_token"]] - E[found["old_token"]]
    for (layer, i), a in zip(found["neurons"], found["activation"]):
        name = adapters.mlp_out_weight_name(model, layer)
        now = adapters.as_out_in(model, dict(model.named_parameters())[name])[:, i]
        old = adapters.as_out_in(model, res.saved_weights()[name])[:, i]
        assert torch.allclose(now - old, change if a >= 0 else -change, atol=1e-5)
    res.undo()
    assert found["activation"] == pytest.approx(kn.activations(model, _ids(tok), found["neurons"]), abs=1e-6)


def test_sequential_requests_and_undo_order(tok):
    model = make_tiny("gpt2")
    saved = snapshot(model)
    two = [GOOD, dict(GOOD, subject="Big Ben", target_new="London")]
    res = ke.edit(model, tok, two, method="kn", **TINY)
    assert len(res.info["requests"]) == 2
    assert res.info["neurons"] == res.info["requests"][0]["neurons"] + res.info["requests"][1]["neurons"]
    later = ke.edit(model, tok, dict(GOOD, subject="The Louvre", target_new="Rome"), method="kn", **TINY)
    with pytest.raises(EditError, match="later edits changed the same weights"):
        res.undo()                                        # KN names every searched layer: undo newest first
    later.undo()
    res.undo()
    assert_same_weights(model, saved)


def test_layers_restrict_the_search_and_the_touched_weights(tok):
    model = make_tiny("llama")
    res = ke.edit(model, tok, GOOD, method="kn", layers=[2], **TINY)
    assert res.touched == [adapters.mlp_out_weight_name(model, 2)]
    assert all(layer == 2 for layer, _ in res.info["neurons"]) and res.config.layers == (2,)
    res.undo()
    assert ke.editing.touched_parameters(model, GOOD, "kn") == [adapters.mlp_out_weight_name(model, j)
                                                                for j in range(3)]


@pytest.fixture(scope="module")
def tiny_llama():
    return make_tiny("llama")


BAD = [
    (dict(layers=[3]), "layers: layer 3 is out of range; this model has 3 layers"),
    (dict(layers=[-1]), "layers: layer -1 is out of range"),
    (dict(layers="2"), "layers: expected None or 'all'"),
    (dict(layers=[1, 1]), "layers: expected None or 'all'"),
    (dict(ig_steps=0), "ig_steps: expected a positive integer"),
    (dict(threshold=1.5), "threshold: expected a fraction"),
    (dict(share=-0.1), "share: expected a fraction"),
    (dict(min_neurons=3, max_neurons=2), "max_neurons: expected at least min_neurons"),
    (dict(lambda2=float("nan")), "lambda2: expected a non-negative number"),
    (dict(relation_subjects="Paris"), "relation_subjects: expected a list"),
    (dict(signed="yes"), "signed: expected True or False"),
    (dict(lr=1.0), r"hparams: unknown option\(s\) \['lr'\]"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_options_are_clear_errors_and_change_nothing(tiny_llama, tok, kwargs, message):
    saved = snapshot(tiny_llama)
    with pytest.raises(EditError, match=message) as err:
        ke.edit(tiny_llama, tok, GOOD, method="kn", **kwargs)
    assert type(err.value) is EditError
    assert_same_weights(tiny_llama, saved)
    _no_hooks_left(tiny_llama)


@pytest.mark.parametrize("request_,message", [
    (dict(GOOD, target_new=""), "target_new: empty"),
    (dict(GOOD, prompt="The Eiffel Tower is in"), "prompt: the subject 'The Space Needle' does not occur"),
    (dict(GOOD, target_true="Tokyo"), "target_new: equals target_true"),
    ([], "requests: empty list"),
])
def test_bad_requests_are_clear_errors(tiny_llama, tok, request_, message):
    saved = snapshot(tiny_llama)
    with pytest.raises(EditError, match=message):
        ke.edit(tiny_llama, tok, request_, method="kn")
    assert_same_weights(tiny_llama, saved)


def test_failure_while_locating_restores_everything(tiny_llama, tok, monkeypatch):
    saved = snapshot(tiny_llama)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")
    monkeypatch.setattr(kn, "update_values", boom)
    with pytest.raises(RuntimeError, match="boom"):
        ke.edit(tiny_llama, tok, GOOD, method="kn", **TINY)
    assert_same_weights(tiny_llama, saved)
    _no_hooks_left(tiny_llama)


# Every Config field with a value it must refuse; the error names the field.
BAD_FIELDS = {"layers": [0.5], "ig_steps": 2.0, "threshold": -0.1, "share": 2, "min_neurons": 0, "max_neurons": True,
              "lambda1": -1.0, "lambda2": "8", "n_prefixes": -1, "prefix_len": 0, "relation_subjects": ["", "x"],
              "relation_share": 1.5, "scale_by_value_norm": 1, "signed": None, "progress": "no"}


def test_bad_fields_cover_the_config():
    assert set(BAD_FIELDS) == {f.name for f in dataclasses.fields(kn.Config)}


@pytest.mark.parametrize("name", sorted(BAD_FIELDS))
def test_every_config_field_refuses_a_bad_value_by_name(name):
    with pytest.raises(EditError, match=f"^{name}: "):
        kn.Config(**{name: BAD_FIELDS[name]})


def test_config_defaults_are_the_papers():
    cfg = kn.Config()
    assert (cfg.ig_steps, cfg.threshold, cfg.share, cfg.lambda1, cfg.lambda2) == (20, 0.2, 0.7, 1.0, 8.0)
    assert cfg.layers is None and not cfg.signed and not cfg.scale_by_value_norm and cfg.relation_share == 0.1
    assert kn.Config(layers="all").layers is None and kn.Config(layers=1).layers == (1,)
    assert kn.IMPROVED == {"signed": True, "lambda2": 4.0} and kn.Config(**kn.IMPROVED).signed


def test_smol_knowledge_neurons_and_the_signed_edit(smol):
    """On SmolLM2 (a gated MLP) knowledge neurons have activations of both signs; the signed edit raises P(new)."""
    model, tok = smol
    case = ke.lecture_case("space-needle-taipei")
    saved = snapshot(model)
    before = ke.evaluate(model, tok, case, generation=False)
    fast = dict(layers=list(range(18, 30)), ig_steps=4, n_prefixes=1, relation_subjects=(), max_neurons=5)
    res = ke.edit(model, tok, case.request, method="kn", signed=True, **fast)
    found = res.info["requests"][0]
    assert len(found["neurons"]) >= 2 and all(18 <= layer < 30 for layer, _ in found["neurons"])
    after = res.evaluate(model, tok, case, before=before, generation=False)
    logp = lambda s: s["details"]["reliability"][0]["logprob"]
    assert logp(after) > logp(before)
    res.undo()
    assert_same_weights(model, saved)
