"""GRACE (chapter 7): codebook entries on every model family, the paper's add / expand / split rules, vectorised
lookup, the fast path equal to the reference, exact undo (in any order, or a clear refusal), bad input."""
import dataclasses

import pytest
import torch

import kedit_lite as ke
from kedit_lite import adapters, grace, hooks, metrics
from kedit_lite.requests import EditError
from tests.conftest import assert_same_weights, make_tiny, snapshot

GOOD = dict(prompt="{} is located in the city of", subject="The Space Needle", target_new="Rome")
OTHER = "The Eiffel Tower is located in the city of"
SMALL = dict(eps_init=1e-3, steps=30)     # tiny random models' keys lie ~0.01-1 apart: a radius that keeps them apart


def _logits(model, tok, text):
    ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
    with torch.no_grad():
        return model(input_ids=ids).logits[0]


def _next_token(model, tok, text):
    return _logits(model, tok, text)[-1].argmax().item()


def _assert_no_hooks(model):
    """No hook of any kind on any submodule, and no instance-level forward left behind."""
    for name, module in model.named_modules():
        for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            assert not getattr(module, kind), f"{name} still has {kind}"
        assert "forward" not in module.__dict__, name


def test_edit_makes_the_target_the_argmax_on_every_family_and_undo_is_exact(tiny, tok):
    req = ke.EditRequest(**GOOD)
    target = tok(" Rome", add_special_tokens=False).input_ids[0]
    saved, other0 = snapshot(tiny), _logits(tiny, tok, OTHER)
    assert _next_token(tiny, tok, req.prompt_text) != target
    res = ke.edit(tiny, tok, req, method="grace", **SMALL)
    assert res.touched == [] and res.adds_modules and res.info["reached"] == [True]
    assert _next_token(tiny, tok, req.prompt_text) == target
    assert ke.evaluate(tiny, tok, ke.EditCase(req), generation=True)["reliability"] == {"token_acc": 1.0, "gen": 1.0}
    assert torch.equal(_logits(tiny, tok, OTHER), other0)      # outside every radius: the layer runs untouched
    assert_same_weights(tiny, saved)
    assert list(grace.codebooks(tiny)) == [2] and grace.describe(tiny)[2]["size"] == 1
    res.undo()
    assert grace.codebooks(tiny) == {} and grace.describe(tiny) == {}
    assert_same_weights(tiny, saved)
    _assert_no_hooks(tiny)
    assert _next_token(tiny, tok, req.prompt_text) != target


def test_batch_is_one_entry_per_request_and_info_reports_the_codebook(tok):
    model = make_tiny("gpt2")
    reqs = [GOOD, dict(GOOD, subject="Big Ben", target_new="Oslo"), dict(GOOD, subject="The Louvre", target_new="Lima")]
    res = ke.edit(model, tok, reqs, method="grace", **SMALL)
    d_out, d_in = adapters.mlp_dims(model)
    info = res.info
    assert [a["action"] for a in info["actions"]] == ["add", "add", "add"] and info["reached"] == [True] * 3
    assert info["codebook_size"] == info["size"] == 3 and len(set(info["entries_added"])) == 3
    assert info["radii"] == pytest.approx([1e-3] * 3) and info["layer"] == 2 and info["replacement"] == "last"
    assert info["parameters_added"] == info["parameters"] == 3 * (d_in + d_out + 1)
    assert info["module"] == "transformer.h.2.mlp.c_proj" and len(info["losses"]) == info["steps"] == 30
    for r in reqs:
        req = ke.EditRequest(**r)
        assert _next_token(model, tok, req.prompt_text) == tok(" " + req.target_new).input_ids[0]
    res.undo()
    _assert_no_hooks(model)


def test_default_layer_is_the_papers_depth(tok):
    """GPT2-XL: block 35 of 48; SmolLM2's 30 blocks: 21; the tiny models' 3: 2."""
    model = make_tiny("llama")
    assert grace.resolve_layer(model, None) == 2 == int(grace.PAPER_DEPTH * 3)
    assert int(grace.PAPER_DEPTH * 48) == 35 and int(grace.PAPER_DEPTH * 30) == 21
    assert grace.resolve_layer(model, 1) == 1


def _unit(d, i, scale):
    v = torch.zeros(d)
    v[i] = scale
    return v


def test_codebook_rules_add_expand_split():
    """The paper's rules on hand-placed keys: far -> add; near, same label -> expand; near, other label -> split."""
    cb = grace.Codebook(make_tiny("llama"), 1, "last")
    d = cb.keys.shape[1]
    cfg, edit = grace.Config(eps_init=1.0), grace.CodebookEdit(1, "test")
    zero = lambda q: torch.zeros(cb.values.shape[1])  # noqa: E731
    assert grace.codebook_rules(cb, _unit(d, 0, 0.0), (1,), cfg, zero, edit) == ("add", 0, None)
    assert edit.added == cb.ids and edit.changed == {}
    other = grace.CodebookEdit(1, "later")
    action, row, dist = grace.codebook_rules(cb, _unit(d, 0, 1.5), (1,), cfg, zero, other)  # 1.5 <= 1 + 1
    assert (action, row, dist) == ("expand", 0, pytest.approx(1.5)) and cb.radii.tolist() == pytest.approx([1.5])
    assert other.changed == {cb.ids[0]: (1.0, other.changed[cb.ids[0]][1])}    # the radius before, for undo
    action, row, dist = grace.codebook_rules(cb, _unit(d, 1, 2.4), (2,), cfg, zero, other)  # 2.4 <= 1 + 1.5
    assert (action, row) == ("split", 1) and dist == pytest.approx(2.4)
    assert cb.radii.tolist() == pytest.approx([1.2 - grace.SPLIT_GAP, 1.2])
    assert other.changed[cb.ids[0]][0] == 1.0                                  # the first "before" is kept
    assert grace.codebook_rules(cb, _unit(d, 2, 10.0), (2,), cfg, zero, other)[:2] == ("add", 2)
    assert other.added == cb.ids[1:] and list(other.changed) == cb.ids[:1]
    assert cb.radii.tolist() == pytest.approx([1.2 - grace.SPLIT_GAP, 1.2, 1.0]) and cb.labels == [(1,), (2,), (2,)]
    hit, rows = cb.match(torch.stack([_unit(d, 0, 1.1), _unit(d, 1, 1.3), _unit(d, 3, 5.0)])[None])
    assert hit.tolist() == [[True, True, False]] and rows[0, :2].tolist() == [0, 1]


def test_vectorised_lookup_equals_a_loop_over_entries():
    torch.manual_seed(0)
    cb = grace.Codebook(make_tiny("gpt2"), 1, "last")
    d_in, d_out = cb.keys.shape[1], cb.values.shape[1]
    for k in torch.randn(300, d_in):
        cb.append(k, torch.randn(d_out), float(torch.rand(()) * 14), (0,))
    x = torch.cat([cb.keys[:20] + 0.5 * torch.randn(20, d_in), torch.randn(40, d_in)]).view(3, 20, d_in)
    hit, rows = cb.match(x)
    entries = [{"key": k, "radius": r} for k, r in zip(cb.keys, cb.radii.tolist())]
    for b in range(3):
        for s in range(20):
            plain = grace._plain_hit(entries, x[b, s])
            assert hit[b, s].item() == (plain is not None)
            if plain is not None:
                assert torch.equal(cb.keys[rows[b, s]], plain["key"])
    assert 0 < hit.sum() < hit.numel()                                         # both cases occur
    out = torch.zeros(3, 20, d_out)
    replaced = cb.output(x, out)
    assert torch.equal(replaced[hit], cb.values[rows[hit]]) and torch.equal(replaced[~hit], out[~hit])


def test_prompt_replacement_carries_a_match_back_to_the_positions_before_it():
    hit = torch.tensor([[False, False, True, False, True, False], [False] * 6])
    rows = torch.tensor([[9, 9, 3, 9, 5, 9], [9] * 6])
    covered, chosen = grace.spread_back(hit, rows)
    assert covered.tolist() == [[True, True, True, True, True, False], [False] * 6]
    assert chosen[0, :5].tolist() == [3, 3, 3, 5, 5]
    cb = grace.Codebook(make_tiny("llama"), 1, "prompt")
    d_in, d_out = cb.keys.shape[1], cb.values.shape[1]
    x = torch.randn(1, 6, d_in)
    cb.append(x[0, 3], torch.ones(d_out), 1e-3, (0,))
    out = cb.output(x, torch.zeros(1, 6, d_out))
    assert out[0, :4].eq(1).all() and out[0, 4:].eq(0).all()


def test_sequential_edits_undo_in_any_order_when_they_share_no_entry(tok):
    model = make_tiny("llama")
    saved, other0 = snapshot(model), _logits(model, tok, OTHER)
    first = ke.edit(model, tok, GOOD, method="grace", **SMALL)
    second = ke.edit(model, tok, dict(GOOD, subject="Big Ben", target_new="Oslo"), method="grace", **SMALL)
    assert second.info["codebook_size"] == 2 and [a["action"] for a in second.info["actions"]] == ["add"]
    first.undo()                                                # the earlier one first: its entry alone goes
    cb = grace.codebooks(model)[2]
    assert len(cb) == 1 and cb.ids == second.info["entries_added"] and cb.handle is not None
    assert _next_token(model, tok, "Big Ben is located in the city of") == tok(" Oslo").input_ids[0]
    second.undo()
    assert grace.codebooks(model) == {} and torch.equal(_logits(model, tok, OTHER), other0)
    assert_same_weights(model, saved)
    _assert_no_hooks(model)


@pytest.mark.parametrize("later_target,action", [("Rome", "expand"), ("Oslo", "split")])
def test_undo_refuses_while_a_later_edit_changed_the_same_entry(tok, later_target, action):
    model = make_tiny("gpt2")
    saved = snapshot(model)
    first = ke.edit(model, tok, GOOD, method="grace", eps_init=10.0, steps=5)
    cb = grace.codebooks(model)[2]
    after_first = cb.state()
    later = ke.edit(model, tok, dict(GOOD, subject="Big Ben", target_new=later_target), method="grace",
                    eps_init=10.0, steps=5)
    assert [a["action"] for a in later.info["actions"]] == [action]
    before_refusal = cb.state()
    with pytest.raises(EditError, match=r"undo: GRACE edit \('The Space Needle' -> 'Rome'\) cannot be undone yet: "
                                        r"later GRACE edits .*'Big Ben'"):
        first.undo()
    assert not first.undone and all(torch.equal(a, b) if torch.is_tensor(a) else a == b
                                    for a, b in zip(cb.state(), before_refusal))
    later.undo()                                                # puts back the radius (and value) it changed
    for a, b in zip(cb.state(), after_first):
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b
    first.undo()
    assert_same_weights(model, saved)
    _assert_no_hooks(model)


def _same_codebook(entries, cb, atol):
    assert len(entries) == len(cb) and [e["label"] for e in entries] == cb.labels
    for e, key, value, radius in zip(entries, cb.keys, cb.values, cb.radii.tolist()):
        assert torch.equal(e["key"], key) and e["radius"] == pytest.approx(radius, abs=1e-6)
        assert torch.allclose(e["value"], value, atol=atol, rtol=0)


@pytest.mark.parametrize("model_type,replacement,value_init", [("gpt2", "last", "cold"), ("llama", "last", "cold"),
                                                                ("gpt2", "prompt", "warm"), ("llama", "prompt", "cold"),
                                                                ("llama", "last", "warm")])
def test_fast_path_equals_reference(tok, model_type, replacement, value_init):
    """apply() (nearest entry by one matrix product, blocks below replayed, LM head on the answer rows) builds the
    same codebook as reference_edit (loops over entries and positions, full forwards), add, expand and split alike.

    Keys are the same recorded inputs (equal); values take the same Adam steps and differ by float rounding only:
    ~1e-7 per step, and Adam moves each coordinate by about lr per step, so after 10 steps of lr 1 we allow 1e-4.
    """
    model = make_tiny(model_type)
    cfg = grace.Config(eps_init=10.0, steps=10, replacement=replacement, value_init=value_init)
    batch = [dict(GOOD, subject="Big Ben"), dict(GOOD, subject="The Louvre", target_new="Oslo"),
             dict(GOOD, subject="Mount Fuji", target_new="Oslo")]
    results = []
    for requests in ([GOOD], batch):                            # first into an empty codebook, then on top of it
        size = len(grace.codebooks(model).get(2, []))
        entries, losses = grace.reference_edit(model, tok, requests, cfg)
        assert len(grace.codebooks(model).get(2, [])) == size          # the reference changed nothing live
        res = ke.edit(model, tok, requests, method="grace", config=cfg)
        assert len(res.info["losses"]) == len(losses) == 10
        assert losses == pytest.approx(res.info["losses"], rel=1e-5, abs=1e-6)
        _same_codebook(entries, grace.codebooks(model)[2], atol=1e-4)
        results.append(res)
    actions = [a["action"] for r in results for a in r.info["actions"]]
    assert actions[0] == "add" and {"expand", "split"} <= set(actions[1:])
    trained = grace.codebooks(model)[2].values
    assert not torch.allclose(trained[0], grace.new_values(model, 2, cfg)(grace.codebooks(model)[2].keys[0]))
    for res in reversed(results):
        res.undo()
    _assert_no_hooks(model)


def test_reference_installs_nothing(tok):
    model = make_tiny("llama")
    entries, losses = grace.reference_edit(model, tok, GOOD, grace.Config(steps=3))
    assert len(entries) == 1 and len(losses) == 3 and grace.codebooks(model) == {}
    _assert_no_hooks(model)


def test_fast_path_runs_the_blocks_below_the_layer_once(tok):
    """Each step recomputes the wrapped block onwards only: the MLPs below run a fixed number of times."""
    model = make_tiny("llama")
    blocks = [adapters.module_name(model, "mlp", j) for j in range(3)]
    counts = {}
    for steps in (2, 12):
        calls = dict.fromkeys(blocks, 0)
        with hooks.on_forward(model, blocks, lambda name, _: calls.__setitem__(name, calls[name] + 1)):
            ke.edit(model, tok, GOOD, method="grace", steps=steps).undo()
        counts[steps] = calls
    assert counts[2][blocks[0]] == counts[12][blocks[0]] and counts[2][blocks[1]] == counts[12][blocks[1]]
    assert counts[12][blocks[2]] - counts[2][blocks[2]] == 10


def test_radius_margin_keeps_a_re_edited_prompt_inside_its_entry(tok):
    """Re-editing a prompt splits at distance 0: the paper leaves the new entry a radius of 0, the margin 1e-3."""
    model = make_tiny("llama")
    first = ke.edit(model, tok, GOOD, method="grace", **SMALL)
    paper = ke.edit(model, tok, dict(GOOD, target_new="Oslo"), method="grace", **SMALL)
    assert paper.info["actions"][0]["action"] == "split" and paper.info["actions"][0]["nearest_distance"] == 0.0
    assert paper.info["radii"] == pytest.approx([-grace.SPLIT_GAP, 0.0], abs=1e-9)
    assert paper.info["reached"] == [True]                      # two equal keys: the lookup takes the newer one
    paper.undo()
    ours = ke.edit(model, tok, dict(GOOD, target_new="Oslo"), method="grace", radius_margin=1e-3, **SMALL)
    assert ours.info["radii"] == pytest.approx([-grace.SPLIT_GAP, 1e-3], abs=1e-9)
    rows = metrics.teacher_forced(model, tok, ["Big Ben is in", ke.EditRequest(**GOOD).prompt_text],
                                     ["London", "Oslo"])    # another batch shape: the key moves by rounding
    assert rows[1]["token_acc"] == 1.0
    ours.undo()
    first.undo()
    _assert_no_hooks(model)


def test_bfloat16_model(tok):
    model = make_tiny("llama").to(torch.bfloat16)
    res = ke.edit(model, tok, GOOD, method="grace", **SMALL)
    assert grace.codebooks(model)[2].values.dtype == torch.float32
    assert torch.isfinite(_logits(model, tok, ke.EditRequest(**GOOD).prompt_text).float()).all()
    res.undo()
    _assert_no_hooks(model)


@pytest.fixture(scope="module")
def tiny_gpt2():
    return make_tiny("gpt2")


BAD = [
    (dict(layer=3), "layer: layer 3 is out of range; this model has 3 layers"),
    (dict(layer=-1), "layer: layer -1 is out of range"),
    (dict(layer="2"), "layer: expected an integer"),
    (dict(eps_init=0), "eps_init: expected a positive number"),
    (dict(eps_init=float("inf")), "eps_init: expected a positive number"),
    (dict(steps=0), "steps: expected a positive integer"),
    (dict(lr=0), "lr: expected a positive"),
    (dict(replacement="all"), r"replacement: expected one of \['last', 'prompt'\]"),
    (dict(value_init="hot"), r"value_init: expected one of \['cold', 'warm'\]"),
    (dict(seed=-1), "seed: expected a non-negative integer"),
    (dict(radius_margin=-1e-3), "radius_margin: expected a finite number >= 0"),
    (dict(progress="yes"), "progress: expected True or False"),
    (dict(eps=1.0), r"hparams: unknown option\(s\) \['eps'\]"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_options_clear_error_nothing_added(tiny_gpt2, tok, kwargs, message):
    saved = snapshot(tiny_gpt2)
    with pytest.raises(EditError, match=message):
        ke.edit(tiny_gpt2, tok, GOOD, method="grace", **kwargs)
    assert_same_weights(tiny_gpt2, saved)
    assert grace.codebooks(tiny_gpt2) == {}


@pytest.mark.parametrize("request_,message", [(dict(GOOD, target_new=""), "target_new: empty"),
                                               (dict(GOOD, prompt="Where is it?"), "prompt: the subject"),
                                               (dict(GOOD, subject=" x"), "subject: ")])
def test_bad_requests_clear_error_nothing_added(tiny_gpt2, tok, request_, message):
    with pytest.raises(EditError, match=message):
        ke.edit(tiny_gpt2, tok, request_, method="grace")
    assert grace.codebooks(tiny_gpt2) == {}


def test_a_layer_keeps_one_replacement_setting(tiny_gpt2, tok):
    res = ke.edit(tiny_gpt2, tok, GOOD, method="grace", steps=2)
    state = grace.codebooks(tiny_gpt2)[2].state()
    with pytest.raises(EditError, match="replacement: layer 2's codebook replaces 'last' positions"):
        ke.edit(tiny_gpt2, tok, dict(GOOD, subject="Big Ben"), method="grace", replacement="prompt", steps=2)
    assert grace.codebooks(tiny_gpt2)[2].ids == state[4]
    other = ke.edit(tiny_gpt2, tok, dict(GOOD, subject="Big Ben"), method="grace", replacement="prompt", layer=1,
                    steps=2)
    assert sorted(grace.codebooks(tiny_gpt2)) == [1, 2]
    other.undo()
    res.undo()
    _assert_no_hooks(tiny_gpt2)


@pytest.mark.parametrize("with_live_entry", [False, True])
def test_failure_during_training_puts_the_codebook_back(tiny_gpt2, tok, monkeypatch, with_live_entry):
    live = ke.edit(tiny_gpt2, tok, GOOD, method="grace", eps_init=10.0, steps=2) if with_live_entry else None
    before = grace.codebooks(tiny_gpt2)[2].state() if live else None

    def boom(*args, **kwargs):
        raise RuntimeError("boom")
    monkeypatch.setattr(grace, "clamped_adam", boom)
    with pytest.raises(RuntimeError, match="boom"):
        ke.edit(tiny_gpt2, tok, [dict(GOOD, subject="Big Ben"), dict(GOOD, subject="Big Ben", target_new="Oslo",
                                                                      prompt="{} stands in")], method="grace",
                eps_init=10.0)
    if live is None:
        assert grace.codebooks(tiny_gpt2) == {}
        _assert_no_hooks(tiny_gpt2)
        return
    cb = grace.codebooks(tiny_gpt2)[2]
    assert cb.training is None and cb.handle is not None
    for a, b in zip(cb.state(), before):
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b
    live.undo()
    _assert_no_hooks(tiny_gpt2)


def test_remove_all_and_a_later_undo(tok):
    model = make_tiny("llama")
    res = ke.edit(model, tok, GOOD, method="grace", steps=2)
    grace.remove_all(model)
    _assert_no_hooks(model)
    res.undo()                                                  # nothing left to take out: a no-op, not an error
    assert res.undone


def test_config_is_frozen_and_reaches_apply(tiny_gpt2, tok):
    cfg = grace.Config(steps=3, eps_init=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 4
    res = ke.edit(tiny_gpt2, tok, GOOD, method="grace", config=cfg, layer=1)
    assert res.config == dataclasses.replace(cfg, layer=1) and res.info["steps"] == 3
    assert res.info["layer"] == 1 and res.info["radii"] == [0.5]
    res.undo()


def test_smol_edit_holds_on_its_prompt_and_leaves_other_prompts(smol):
    model, tok = smol
    case = ke.lecture_case("space-needle-taipei")
    saved, before = snapshot(model), ke.evaluate(model, tok, case)
    res = ke.edit(model, tok, case.request, method="grace")
    assert res.info["layer"] == 21 and res.info["reached"] == [True] and res.info["losses"][-1] < 0.05
    after = res.evaluate(model, tok, case, before=before)
    assert after["reliability"]["token_acc"] == 1.0 and after["reliability"]["gen"] == 1.0
    assert after["locality"]["token_acc"] == 1.0 and after["locality"]["gen"] == 1.0
    res.undo()
    assert_same_weights(model, saved)
    _assert_no_hooks(model)
