"""CaliNET (chapter 7): calibration slots on GPT-2 and gated (Llama) MLPs, batch edits, the fast path equal to the
reference, exact undo with no hook left behind, bad input."""
import dataclasses

import pytest
import torch
from transformers.activations import NewGELUActivation, SiLUActivation

import kedit_lite as ke
from kedit_lite import adapters, calinet, hooks, keys_values, tokens
from kedit_lite.requests import EditError
from tests.conftest import assert_same_weights, make_tiny, snapshot

GOOD = dict(prompt="{} is located in the city of", subject="The Space Needle", target_new="London")
OTHER = dict(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="Chinese")
# Tiny random models have near-uniform logits that a final norm caps, so they need a larger step than SmolLM2.
FAST = dict(steps=30, lr=0.05)


def _logits(model, tok, text="The Space Needle is located in the city of London. The Eiffel Tower is"):
    ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
    with torch.no_grad():
        return model(input_ids=ids).logits


def _argmax_hits(model, tok, req):
    """(answer tokens the greedy argmax gets right, answer tokens) for the request's prompt."""
    r = ke.EditRequest(**req)
    batch = tokens.encode_pairs(tok, [r.prompt_text], [r.target_new])
    with torch.no_grad():
        _, correct, n, _ = tokens.answer_logprobs(model, batch)
    return correct.item(), n.item()


def _hooks(model):
    """Every hook registered on any submodule, as 'module.kind' (empty when none is left)."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
             "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")
    return [f"{name}.{kind}" for name, m in model.named_modules() for kind in kinds if getattr(m, kind, None)]


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_edit_makes_the_target_the_argmax_and_undo_is_exact(model_type, tok):
    model = make_tiny(model_type)
    saved, logits0 = snapshot(model), _logits(model, tok)
    assert _argmax_hits(model, tok, GOOD) == (0, 1)              # London is not the model's answer before
    res = ke.edit(model, tok, GOOD, method="calinet", **FAST)
    assert _argmax_hits(model, tok, GOOD) == (1, 1)              # ...and is after
    assert res.touched == [] and res.adds_modules and calinet.installed(model) == res.info["slots"]
    assert_same_weights(model, saved)                            # base weights untouched while the slots are in
    assert _hooks(model) == ["transformer.h.2.mlp._forward_hooks", "transformer.h.2.mlp._forward_hooks_with_kwargs"] \
        if model_type == "gpt2" else _hooks(model)               # the slots live in a hook on the last MLP
    res.undo()
    assert calinet.installed(model) == [] and not _hooks(model)
    assert_same_weights(model, saved)
    assert torch.equal(_logits(model, tok), logits0)             # outputs exactly as before


@pytest.mark.parametrize("model_type,activation", [("gpt2", NewGELUActivation), ("llama", SiLUActivation)])
def test_slots_shapes_activation_and_info(model_type, activation, tok):
    model = make_tiny(model_type)
    d_model, _ = adapters.mlp_dims(model)
    res = ke.edit(model, tok, GOOD, method="calinet", n_slots=8, n_prefixes=2, **FAST)
    (slots,) = res.info["slots"]
    assert res.info["layers"] == [2] and slots.layer == 2       # the last block by default
    assert slots.key.shape == slots.value.shape == (8, d_model) and isinstance(slots.act, activation)
    assert res.info["parameters_added"] == calinet.parameters_added(model) == 2 * 8 * d_model
    assert res.info["n_prompts"] == 3 and res.info["steps"] == len(res.info["losses"]) <= 30
    assert res.info["final_loss"] < res.info["losses"][0]
    res.undo()


def test_several_layers_get_their_own_slots(tok):
    model = make_tiny("llama")
    saved = snapshot(model)
    res = ke.edit(model, tok, GOOD, method="calinet", layers=[2, 1], n_slots=4, **FAST)
    assert res.config.layers == (1, 2) and [s.layer for s in res.info["slots"]] == [1, 2]
    assert res.info["parameters_added"] == 2 * (2 * 4 * 32)
    res.undo()
    assert not _hooks(model)
    assert_same_weights(model, saved)


def test_batch_edit_trains_one_set_of_slots_for_all_requests(tok):
    model = make_tiny("llama")
    assert _argmax_hits(model, tok, OTHER)[0] == 0
    res = ke.edit(model, tok, [GOOD, OTHER], method="calinet", n_prefixes=1, **FAST)
    assert len(res.info["slots"]) == 1 and len(calinet.installed(model)) == 1
    assert res.info["n_prompts"] == 2 * 2                       # each request, bare and after one prefix
    assert _argmax_hits(model, tok, GOOD)[0] == 1 and _argmax_hits(model, tok, OTHER)[0] >= 1
    res.undo()


def test_calibration_data_is_each_prompt_in_each_context_and_template(tok):
    model = make_tiny("gpt2")
    cfg = calinet.Config(n_prefixes=2, templates=["{} can be found in the city of"])
    reqs = [ke.EditRequest(**GOOD), ke.EditRequest(**OTHER)]
    batch = calinet.calibration_batch(model, tok, reqs, cfg)
    prefixes = keys_values.context_prefixes(model, tok, 2)
    assert len(prefixes) == 3 and prefixes[0] == ""
    texts = [tok.decode(row[:n]) for row, n in zip(batch["input_ids"], batch["prompt_lengths"])]
    assert texts[0] == "The Space Needle is located in the city of"
    assert texts[1] == f"{prefixes[1]}. The Space Needle is located in the city of"
    assert texts[3] == "The Space Needle can be found in the city of" and len(texts) == 2 * 2 * 3
    assert texts[6] == "The mother tongue of Danielle Darrieux is"


def test_sequential_edits_add_slots_and_undo_in_any_order(tok):
    model = make_tiny("gpt2")
    saved, logits0 = snapshot(model), _logits(model, tok)
    first = ke.edit(model, tok, GOOD, method="calinet", **FAST)
    second = ke.edit(model, tok, OTHER, method="calinet", layers=1, **FAST)
    assert calinet.installed(model) == first.info["slots"] + second.info["slots"]
    first.undo()
    assert calinet.installed(model) == second.info["slots"]
    second.undo()
    assert not _hooks(model)
    assert_same_weights(model, saved)
    assert torch.equal(_logits(model, tok), logits0)


def test_remove_all_takes_every_slot_out(tok):
    model = make_tiny("gpt2")
    logits0 = _logits(model, tok)
    ke.edit(model, tok, GOOD, method="calinet", steps=2)
    ke.edit(model, tok, OTHER, method="calinet", steps=2)
    calinet.remove_all(model)
    assert calinet.installed(model) == [] and not _hooks(model)
    assert torch.equal(_logits(model, tok), logits0)


def test_slots_live_on_model_dtype(tok):
    model = make_tiny("llama").to(torch.bfloat16)
    res = ke.edit(model, tok, GOOD, method="calinet", **FAST)
    assert {p.dtype for p in res.info["slots"][0].parameters()} == {torch.bfloat16}
    assert torch.isfinite(_logits(model, tok).float()).all()
    res.undo()


def test_slots_start_from_the_seed(tok):
    model = make_tiny("gpt2")
    a = calinet.new_slots(model, (2,), calinet.Config(n_slots=4))[0]
    b = calinet.new_slots(model, (2,), calinet.Config(n_slots=4))[0]
    c = calinet.new_slots(model, (2,), calinet.Config(n_slots=4, seed=1))[0]
    assert torch.equal(a.key, b.key) and torch.equal(a.value, b.value) and not torch.equal(a.key, c.key)
    assert a.key.abs().max() <= 32 ** -0.5 and a.value.abs().max() <= 4 ** -0.5   # nn.Linear's init bounds


@pytest.fixture(scope="module")
def tiny_gpt2():
    return make_tiny("gpt2")


BAD = [
    (dict(layers=3), "layers: layer 3 is out of range; this model has 3 layers"),
    (dict(layers=[1, 3]), "layers: layer 3 is out of range"),
    (dict(layers=-1), "layers: layer -1 is out of range"),
    (dict(layers="2"), "layers: expected a layer index"),
    (dict(layers=[1, 1]), "layers: expected a layer index or a list of distinct ones"),
    (dict(n_slots=0), "n_slots: expected a positive integer"),
    (dict(steps=2.5), "steps: expected a positive integer"),
    (dict(lr=0), "lr: expected a positive"),
    (dict(target_loss=float("nan")), "target_loss: expected a finite number"),
    (dict(n_prefixes=-1), "n_prefixes: expected a non-negative integer"),
    (dict(templates=["no slot here"]), "templates: 'no slot here' is not a wording"),
    (dict(templates="{} is in"), "templates: expected a list"),
    (dict(slots=4), r"hparams: unknown option\(s\) \['slots'\]"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_config_is_a_clear_error_and_nothing_is_installed(tiny_gpt2, tok, kwargs, message):
    saved = snapshot(tiny_gpt2)
    with pytest.raises(EditError, match=message):
        ke.edit(tiny_gpt2, tok, GOOD, method="calinet", **kwargs)
    assert_same_weights(tiny_gpt2, saved)
    assert calinet.installed(tiny_gpt2) == [] and not _hooks(tiny_gpt2)


@pytest.mark.parametrize("request_, message", [
    (dict(GOOD, target_new=" "), "target_new: empty"),
    (dict(GOOD, prompt="The Space Needle is in", subject="Big Ben"), "prompt: the subject 'Big Ben' does not occur"),
    (dict(GOOD, extra=1), r"request: unknown field\(s\) \['extra'\]"),
    ([], "requests: empty list"),
    ([GOOD, dict(GOOD, target_new="Paris")], "requests: requests 0 and 1 both edit"),
])
def test_bad_requests_are_clear_errors(tiny_gpt2, tok, request_, message):
    with pytest.raises(EditError, match=message):
        ke.edit(tiny_gpt2, tok, request_, method="calinet")
    assert calinet.installed(tiny_gpt2) == []


def test_failure_during_training_removes_the_slots(tiny_gpt2, tok, monkeypatch):
    saved, logits0 = snapshot(tiny_gpt2), _logits(tiny_gpt2, tok)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")
    monkeypatch.setattr(calinet, "clamped_adam", boom)
    with pytest.raises(RuntimeError, match="boom"):
        ke.edit(tiny_gpt2, tok, GOOD, method="calinet")
    assert calinet.installed(tiny_gpt2) == [] and not _hooks(tiny_gpt2)
    assert_same_weights(tiny_gpt2, saved)
    assert torch.equal(_logits(tiny_gpt2, tok), logits0)


# Every Config field with a value it must refuse; the error names the field.
BAD_FIELDS = {"layers": [0.5], "n_slots": True, "steps": 0, "lr": float("inf"), "target_loss": -0.1,
              "n_prefixes": 1.5, "templates": ["{} and {}"], "seed": -1, "progress": "no"}


def test_bad_fields_cover_the_config():
    assert set(BAD_FIELDS) == {f.name for f in dataclasses.fields(calinet.Config)}


@pytest.mark.parametrize("name", sorted(BAD_FIELDS))
def test_every_config_field_refuses_a_bad_value_by_name(name):
    with pytest.raises(EditError, match=f"^{name}: "):
        calinet.Config(**{name: BAD_FIELDS[name]})


def test_config_is_frozen_hashable_and_reaches_apply(tiny_gpt2, tok):
    cfg = calinet.Config(layers=1, n_slots=4, steps=3, target_loss=0.0, templates=["{} lies in the city of"])
    assert cfg.layers == (1,) and cfg.templates == ("{} lies in the city of",) and hash(cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 4
    res = ke.edit(tiny_gpt2, tok, GOOD, method="calinet", config=cfg, n_prefixes=0)
    assert res.config == dataclasses.replace(cfg, n_prefixes=0) and res.info["steps"] == 3
    assert res.info["n_prompts"] == 2 and res.info["layers"] == [1]
    res.undo()


@pytest.mark.parametrize("model_type,layers", [("gpt2", None), ("llama", None), ("gpt2", (1,)), ("llama", (0, 2))])
def test_fast_path_equals_reference(model_type, layers, tok):
    """apply() (blocks below replayed, logits at the answer positions only) trains the same slots as reference_edit.

    Both start from the same seeded slots and take the same Adam steps; they differ only in float rounding (the LM
    head on a few rows instead of all, the same blocks replayed instead of recomputed), ~1e-7 per step. Adam moves
    each weight by about lr per step whatever the gradient's size, so after 20 steps of lr 0.05 we allow 1e-4.
    """
    model = make_tiny(model_type)
    cfg = calinet.Config(layers=layers, n_slots=8, steps=20, lr=0.05, target_loss=0.0, n_prefixes=2)
    reference, losses = calinet.reference_edit(model, tok, [GOOD, OTHER], cfg)
    assert calinet.installed(model) == [] and not _hooks(model)   # the reference installs nothing
    res = ke.edit(model, tok, [GOOD, OTHER], method="calinet", config=cfg)
    assert len(losses) == res.info["steps"] == 20
    assert losses == pytest.approx(res.info["losses"], rel=1e-5, abs=1e-6)
    for ref_slots, fast_slots in zip(reference, res.info["slots"], strict=True):
        assert ref_slots.layer == fast_slots.layer
        start = calinet.new_slots(model, (ref_slots.layer,), cfg)[0]
        assert not torch.allclose(fast_slots.value, start.value, atol=1e-3)   # it trained: the check can fail
        for ref_p, fast_p in zip(ref_slots.parameters(), fast_slots.parameters()):
            assert torch.allclose(ref_p, fast_p, atol=1e-4, rtol=0)
    res.undo()


def test_fast_path_runs_the_blocks_below_the_slots_once(tok):
    """Each step recomputes only the calibrated block onwards: the MLPs below run a fixed number of times."""
    model = make_tiny("llama")
    blocks = [adapters.module_name(model, "mlp", j) for j in range(3)]
    keys_values.context_prefixes(model, tok, 4)                 # sampled once, cached from here on
    counts = {}
    for steps in (2, 12):
        calls = dict.fromkeys(blocks, 0)
        with hooks.on_forward(model, blocks, lambda name, _: calls.__setitem__(name, calls[name] + 1)):
            res = ke.edit(model, tok, GOOD, method="calinet", steps=steps, target_loss=0.0)
        assert res.info["steps"] == steps
        res.undo()
        counts[steps] = calls
    assert counts[2][blocks[0]] == counts[12][blocks[0]] and counts[2][blocks[1]] == counts[12][blocks[1]]
    assert counts[12][blocks[2]] - counts[2][blocks[2]] == 10       # one last-block run per extra step


def test_smol_edit_is_reliable_and_undo_exact(smol):
    model, tok = smol
    case = ke.lecture_case("space-needle-taipei")
    saved, before = snapshot(model), ke.evaluate(model, tok, case, generation=False)
    res = ke.edit(model, tok, case.request, method="calinet")
    assert res.info["final_loss"] < 0.05 and res.info["parameters_added"] == 2 * 64 * 576
    after = res.evaluate(model, tok, case, before=before, generation=False)
    assert after["reliability"]["token_acc"] == 1.0
    res.undo()
    assert_same_weights(model, saved)
    assert not _hooks(model)
    again = ke.evaluate(model, tok, case, generation=False)
    assert again["details"]["reliability"][0]["logprob"] == before["details"]["reliability"][0]["logprob"]
