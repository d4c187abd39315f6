"""MEMIT (chapter 5): several facts in one batched update over a range of layers; undo; bad input."""
import pytest
import torch

import kedit_lite as ke
from kedit_lite import adapters, keys_values, memit
from kedit_lite.requests import EditError
from tests.conftest import assert_same_weights, make_tiny, snapshot
from tests.test_rome import FAST, REQUEST, TOLERANCE, _tok

BATCH = [
    dict(prompt="{} is located in the city of", subject="The Space Needle", target_new="Taipei"),
    dict(prompt="The Eiffel Tower is located in the city of", subject="The Eiffel Tower", target_new="Rome"),
    dict(prompt="{} is located in the city of", subject="The Colosseum", target_new="London"),
]


def test_memit_batch_edits_several_facts(smol):
    model, tok = smol
    saved = snapshot(model)
    prompts = [ke.EditRequest(**r).prompt_text for r in BATCH]
    targets = [r["target_new"] for r in BATCH]
    before = ke.metrics.teacher_forced(model, tok, prompts, targets)
    # our options (bare prompt's keys, a ridge for 2000 tokens of statistics): published MEMIT barely moves these
    result = ke.edit(model, tok, BATCH, method="memit", layers=[3, 4, 5], **dict(FAST, **memit.IMPROVED))
    assert result.touched == [adapters.mlp_out_weight_name(model, layer) for layer in (3, 4, 5)]
    changed = [n for n in result.touched if not torch.equal(dict(model.named_parameters())[n], saved[n])]
    assert changed == result.touched                      # every layer of the range took part
    after = ke.metrics.teacher_forced(model, tok, prompts, targets)
    assert all(a["logprob"] > b["logprob"] for a, b in zip(after, before))       # every fact moves
    assert sum(a["logprob"] > b["logprob"] + 2 for a, b in zip(after, before)) >= 2   # most by > 2 nats
    # an unrelated fact survives the batch
    assert "Paris" in ke.generate(model, tok, ["The Louvre is a museum in the city of"], max_new_tokens=4)[0]
    result.undo()
    assert_same_weights(model, saved)


def test_memit_tiny_gpt2_and_default_layers():
    model, tok = make_tiny("gpt2"), _tok()
    saved = snapshot(model)
    result = ke.edit(model, tok, BATCH[:2], method="memit", layers=[0, 1], **FAST)
    assert result.touched == ["transformer.h.0.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.weight"]
    result.undo()
    assert_same_weights(model, saved)
    assert memit.default_layers(model) == [0, 1, 2]       # clipped to a 3-layer model


def test_memit_keep_shared_removes_the_batch_mean_of_delta():
    """keep_shared = 0 writes each fact's δ minus the batch mean (chapter 5); 1 leaves MEMIT's δ as they are."""
    model, tok = make_tiny("llama"), _tok()
    saved = snapshot(model)
    used = {}
    for keep in (1.0, 0.0):
        result = ke.edit(model, tok, BATCH, method="memit", layers=[0, 1], keep_shared=keep, **FAST)
        used[keep] = result.info["deltas"]
        result.undo()
        assert_same_weights(model, saved)
    full, own = used[1.0], used[0.0]
    assert full.mean(0).norm() > 1e-3                     # the facts' δ do share a part ...
    assert own.mean(0).norm() < 1e-5 * full.norm()        # ... which keep_shared = 0 removes
    assert torch.allclose(full - own, full.mean(0, keepdim=True).expand_as(full), atol=1e-5)


def test_memit_center_deltas_optimises_delta_without_the_batch_mean():
    """center_deltas asks the optimiser for δ whose batch mean is zero (chapter 5), instead of removing it after."""
    model, tok = make_tiny("llama"), _tok()
    saved = snapshot(model)
    used = {}
    for center in (False, True):
        result = ke.edit(model, tok, BATCH, method="memit", layers=[0, 1], center_deltas=center, **FAST)
        used[center] = result.info["deltas"]
        result.undo()
        assert_same_weights(model, saved)
    full, own = used[False], used[True]
    assert own.mean(0).norm() < 1e-5 * own.norm()         # the facts' δ share no part ...
    # ... and were re-optimised under that constraint, not the same δ with the mean subtracted afterwards
    assert (own - (full - full.mean(0, keepdim=True))).norm() > 1e-2 * own.norm()
    # 3 facts with chunk=2 form one chunk of 3: no fact is alone in a chunk, where its δ would be removed whole
    result = ke.edit(model, tok, BATCH, method="memit", layers=[0, 1], center_deltas=True, chunk=2, **FAST)
    assert result.info["deltas"].norm(dim=-1).min() > 1e-3 * own.norm()
    result.undo()
    assert_same_weights(model, saved)


def test_memit_protect_subjects_leaves_other_subjects_keys_alone():
    """protect_subjects: the update moves the keys of other subjects (written alone) much less (chapter 5)."""
    model, tok = make_tiny("llama"), _tok()
    saved = snapshot(model)
    others = ["Albert Einstein", "Mount Fuji", "the Louvre", "Nokia", "Lake Baikal", "The Colosseum"]
    keys = keys_values.subject_start_keys(model, tok, [0, 1], others[:-1])
    assert {k: v.shape for k, v in keys.items()} == {0: (5, 64), 1: (5, 64)}
    moved = {}
    for weight in (0.0, 10.0):
        # "The Colosseum" is a subject of the batch: it is left out of what is protected
        result = ke.edit(model, tok, BATCH, method="memit", layers=[0, 1], protect_subjects=weight,
                         other_subjects=others, **FAST)
        params = dict(model.named_parameters())
        for layer in (0, 1):
            name = adapters.mlp_out_weight_name(model, layer)
            update = adapters.as_out_in(model, params[name]).detach() - adapters.as_out_in(model, saved[name])
            moved[weight, layer] = (keys[layer] @ update.T).norm() / (update.norm() * keys[layer].norm())
        result.undo()
        assert_same_weights(model, saved)
    for layer in (0, 1):
        assert moved[10.0, layer] < 0.3 * moved[0.0, layer], moved


def test_memit_protect_subjects_bad_input(monkeypatch, tmp_path):
    """No subjects to protect, or no CounterFact to take them from: a clear error, weights untouched."""
    model, tok = make_tiny("llama"), _tok()
    saved = snapshot(model)
    with pytest.raises(EditError, match="other_subjects: every name is a subject of this batch"):
        ke.edit(model, tok, BATCH, method="memit", layers=[0, 1], protect_subjects=1.0,
                other_subjects=["The Colosseum"], **FAST)
    monkeypatch.setenv("KEDIT_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(ke.data, "_download", lambda name, dest: (_ for _ in ()).throw(FileNotFoundError("offline")))
    with pytest.raises(EditError, match="other_subjects: 'counterfact' needs the CounterFact data"):
        ke.edit(model, tok, BATCH, method="memit", layers=[0, 1], protect_subjects=1.0,
                other_subjects="counterfact", **FAST)
    assert_same_weights(model, saved)


@pytest.mark.parametrize("hparams,message", [
    (dict(layers=[1, 1]), r"layers: \[1, 1\] repeats a layer"),
    (dict(layers=[]), "layers: expected an int or a non-empty list"),
    (dict(layers=[0, 5]), "layers: layer 5 is out of range"),
    (dict(mom2_update_weight=0), "mom2_update_weight: expected a positive number"),
    (dict(chunk=0), "chunk: expected a positive integer"),
    (dict(keep_shared=1.5), "keep_shared: expected a number from 0 to 1"),
    (dict(keep_shared=float("nan")), "keep_shared: expected a number from 0 to 1"),
    (dict(center_deltas=1), "center_deltas: expected True or False"),
    (dict(center_deltas=True), "center_deltas: needs a batch of 2 or more facts"),
    (dict(protect_subjects=-1), "protect_subjects: expected a non-negative number"),
    (dict(other_subjects=[]), "other_subjects: expected a non-empty list of subject names"),
    (dict(other_subjects="Paris"), "other_subjects: expected a non-empty list of subject names"),
    (dict(protect_subjects=1.0), "other_subjects: protect_subjects needs subjects to protect"),
    (dict(steps=-2), "steps: expected a positive integer"),
])
def test_memit_bad_hparams(hparams, message):
    model = make_tiny("llama")
    saved = snapshot(model)
    with pytest.raises(EditError, match=message):
        ke.edit(model, _tok(), [REQUEST], method="memit", **hparams)
    assert_same_weights(model, saved)


# Same tolerance as ROME's reference test (tests/test_rome.py): float32 sums in another order, through Adam.
# The fast path optimises the facts' δ together; each stops at stop_loss on its own, as the reference's do.
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_reference_memit_equals_fast_path(kind):
    model, tok = make_tiny(kind), _tok()
    saved = snapshot(model)
    options = dict(FAST, layers=[0, 1])
    fast = ke.edit(model, tok, BATCH[:2], method="memit", **options)
    names = [adapters.mlp_out_weight_name(model, layer) for layer in (0, 1)]
    fast_updates = [(dict(model.named_parameters())[n] - saved[n]).float() for n in names]
    fast.undo()
    ref = memit.reference_edit(model, tok, [ke.EditRequest(**r) for r in BATCH[:2]], memit.Config(**options))
    ref_updates = [(dict(model.named_parameters())[n] - saved[n]).float() for n in names]
    model.load_state_dict(saved)
    tolerance = TOLERANCE[kind]
    assert (ref["deltas"] - fast.info["deltas"]).norm() <= tolerance * fast.info["deltas"].norm()
    for r, f in zip(ref_updates, fast_updates):
        assert f.norm() > 0 and (r - f).norm() <= tolerance * f.norm()


def test_memit_defaults_are_the_published_algorithm():
    cfg = memit.Config()
    assert (cfg.wordings, cfg.bare_key, cfg.ridge, cfg.keep_shared, cfg.center_deltas, cfg.protect_subjects) == \
        ((), False, 0.0, 1.0, False, 0.0)
    assert memit.Config.improved().bare_key is True and memit.Config.improved().wordings == memit.WORDINGS


MEMIT_BAD = {"layers": [], "mom2_update_weight": 0.0, "bare_key": "no", "ridge": -1.0, "keep_shared": 2.0,
             "center_deltas": 0, "protect_subjects": -1.0, "other_subjects": "Paris", "chunk": 0, "progress": 1,
             "steps": 0, "lr": -1.0, "kl_factor": -1.0, "weight_decay": -1.0, "clamp_factor": 0.0,
             "n_prefixes": 1.5, "prefix_len": 0, "stop_loss": -1.0, "wordings": "{}", "mom2_n_tokens": 0,
             "mom2_source": 3, "mom2_adjustment": None}


def test_every_memit_config_field_has_a_bad_value_here():
    import dataclasses
    assert set(MEMIT_BAD) == {f.name for f in dataclasses.fields(memit.Config)}


@pytest.mark.parametrize("field,value", sorted(MEMIT_BAD.items()))
def test_memit_config_refuses_a_bad_value_naming_the_field(field, value):
    with pytest.raises(EditError, match=f"^{field}: "):
        memit.Config(**{field: value})
