"""T-Patcher (chapter 7): patch neurons on GPT-2 and gated (Llama) MLPs, its losses, the fast path equal to the
reference, exact undo, bad input."""
import dataclasses

import pytest
import torch

import kedit_lite as ke
from kedit_lite import adapters, hooks, t_patcher
from kedit_lite.requests import EditError
from tests.conftest import assert_same_weights, make_tiny, snapshot

GOOD = dict(prompt="{} is located in the city of", subject="The Space Needle", target_new="Taipei")
FAST = dict(steps=40, lr=0.05)


def _logits(model, tok, text="The Space Needle is located in the city of Taipei. The Eiffel Tower is"):
    ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_patch_shapes_and_exact_undo_on_both_mlp_styles(model_type, tok):
    model = make_tiny(model_type)
    saved, logits0 = snapshot(model), _logits(model, tok)
    res = ke.edit(model, tok, GOOD, method="t-patcher", **FAST)
    d_model, _ = adapters.mlp_dims(model)
    n_target = len(tok(" Taipei", add_special_tokens=False).input_ids)
    patch = res.info["patch"]
    assert res.touched == [] and res.info["layer"] == 2 and patch.layer == 2
    assert patch.key.shape == (n_target, d_model) and patch.value.shape == (n_target, d_model)
    assert patch.bias.shape == (n_target,) and res.info["parameters_added"] == n_target * (2 * d_model + 1)
    assert t_patcher.patches(model) == [patch]
    assert_same_weights(model, saved)                       # base weights untouched while the patch is in
    assert not torch.equal(_logits(model, tok), logits0)     # ...yet the model's outputs changed
    res.undo()
    assert t_patcher.patches(model) == []
    assert_same_weights(model, saved)
    assert torch.equal(_logits(model, tok), logits0)         # outputs exactly as before


def test_patch_lives_on_model_dtype(tok):
    model = make_tiny("llama").to(torch.bfloat16)
    res = ke.edit(model, tok, GOOD, method="t-patcher", **FAST)
    assert {p.dtype for p in res.info["patch"].parameters()} == {torch.bfloat16}
    assert torch.isfinite(_logits(model, tok).float()).all()
    res.undo()


def test_sequential_edits_add_patches_and_undo_in_any_order(tok):
    model = make_tiny("gpt2")
    saved, logits0 = snapshot(model), _logits(model, tok)
    first = ke.edit(model, tok, GOOD, method="t-patcher", **FAST)
    second = ke.edit(model, tok, dict(GOOD, subject="Big Ben", target_new="London"), method="t-patcher", layer=1,
                     **FAST)
    assert t_patcher.patches(model) == [first.info["patch"], second.info["patch"]]
    assert t_patcher.parameters_added(model) == first.info["parameters_added"] + second.info["parameters_added"]
    first.undo()
    assert t_patcher.patches(model) == [second.info["patch"]]
    second.undo()
    assert_same_weights(model, saved)
    assert torch.equal(_logits(model, tok), logits0)


def test_losses_behave():
    """Activation loss falls as the edit score rises; memory losses are zero exactly when the constraints hold."""
    torch.manual_seed(0)
    q_edit = torch.randn(1, 8)
    patch = t_patcher.PatchNeurons(q_edit, layer=0)
    q_mem = torch.randn(5, 8)
    with torch.no_grad():
        patch.key.copy_(q_edit / q_edit.norm())
        patch.bias.fill_(-100.0)                            # everything far below beta: memory losses vanish
    assert torch.all(patch.activation(q_mem) == 0) and torch.all(patch(q_mem) == 0)
    s_mem, s_edit = patch.scores(q_mem), patch.scores(q_edit).diagonal()
    assert torch.relu(s_mem - (-1.0)).sum() == 0
    low = torch.exp(-s_edit.clamp(min=-30)).item()
    with torch.no_grad():
        patch.bias.fill_(10.0)                              # now the memory queries fire: hinge > 0
    assert torch.relu(patch.scores(q_mem) - (-1.0)).sum() > 0
    assert torch.exp(-patch.scores(q_edit).diagonal()).item() < low


def test_memory_queries_cached_once(tok):
    model = make_tiny("llama")
    first = t_patcher.memory_queries(model, tok, layer=1)
    n_tokens = sum(len(tok(t, add_special_tokens=False).input_ids) for t in t_patcher.MEMORY_TEXT)
    assert first.shape == (n_tokens, 32) and n_tokens >= 300 and first.dtype == torch.float32
    assert t_patcher.memory_queries(model, tok, layer=1) is first
    assert t_patcher.memory_queries(model, tok, layer=2) is not first


def test_contrast_queries_fill_the_template_with_other_subjects(tok):
    model = make_tiny("llama")
    req = ke.EditRequest(**GOOD)
    q = t_patcher.contrast_queries(model, tok, [req], layer=1)
    texts = [req.template.replace("{}", s) for s in t_patcher.CONTRAST_SUBJECTS]
    assert q.shape == (sum(len(tok(t, add_special_tokens=False).input_ids) for t in texts), 32)
    res = ke.edit(model, tok, req, method="t-patcher", steps=5, contrast=True)
    with_contrast = res.info["memory_size"]
    res.undo()
    res = ke.edit(model, tok, req, method="t-patcher", steps=5, contrast=False)
    assert with_contrast - res.info["memory_size"] == q.shape[0]
    res.undo()


def test_smol_patch_fires_on_edit_not_on_memory(smol):
    model, tok = smol
    case = ke.lecture_case("space-needle-taipei")
    saved, before = snapshot(model), ke.evaluate(model, tok, case)
    ours = ke.edit(model, tok, case.request, method="t-patcher", **t_patcher.IMPROVED)
    q_mem = t_patcher.memory_queries(model, tok)
    assert ours.info["patch"].scores(q_mem).max().item() <= -1.0 + 1e-3   # ours: below beta on every memory query
    assert ours.info["memory_fired"] == 0
    ours.undo()
    res = ke.edit(model, tok, case.request, method="t-patcher")     # the paper's memory loss
    patch = res.info["patch"]
    assert min(res.info["edit_activation"]) > 1.0
    assert res.info["memory_fired"] <= 0.01 * res.info["memory_size"]    # (a few of its memory queries may fire)
    act = t_patcher.activations(model, tok, [case.request.prompt_text, "The capital of Spain is"], patch)
    assert act[0].max() > 1.0 and act[1].max() == 0.0             # the switch: on for the edit, off elsewhere
    after = res.evaluate(model, tok, case, before=before)
    assert after["reliability"]["token_acc"] == 1.0 and after["reliability"]["gen"] == 1.0
    assert after["locality"]["token_acc"] >= 2 / 3
    res.undo()
    assert_same_weights(model, saved)
    assert ke.evaluate(model, tok, case, generation=False)["details"]["reliability"][0]["logprob"] == \
        before["details"]["reliability"][0]["logprob"]


@pytest.fixture(scope="module")
def tiny_gpt2():
    return make_tiny("gpt2")


BAD = [
    (dict(layer=3), "layer: layer 3 is out of range; this model has 3 layers"),
    (dict(layer=-1), "layer: layer -1 is out of range"),
    (dict(layer="2"), "layer: expected an integer"),
    (dict(steps=0), "steps: expected a positive integer"),
    (dict(steps=2.5), "steps: expected a positive integer"),
    (dict(lr=-1.0), "lr: expected a positive number"),
    (dict(lr=0), "lr: expected a positive"),
    (dict(beta=0.5), "beta: expected a finite threshold <= 0"),
    (dict(gamma=float("nan")), "gamma: expected a finite number"),
    (dict(act_weight="1"), "act_weight: expected a finite number"),
    (dict(memory=[]), "memory: expected a non-empty list"),
    (dict(memory=["ok", ""]), "memory: expected a non-empty list"),
    (dict(contrast="yes"), "contrast: expected True or False"),
    (dict(layers=1), r"hparams: unknown option\(s\) \['layers'\]"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_input_clear_error_weights_unchanged(tiny_gpt2, tok, kwargs, message):
    saved = snapshot(tiny_gpt2)
    with pytest.raises(EditError, match=message):
        ke.edit(tiny_gpt2, tok, GOOD, method="t-patcher", **kwargs)
    assert_same_weights(tiny_gpt2, saved)
    assert t_patcher.patches(tiny_gpt2) == []


def test_failure_during_training_removes_the_patch(tiny_gpt2, tok, monkeypatch):
    saved, logits0 = snapshot(tiny_gpt2), _logits(tiny_gpt2, tok)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")
    monkeypatch.setattr(t_patcher, "patch_losses", boom)
    with pytest.raises(RuntimeError, match="boom"):
        ke.edit(tiny_gpt2, tok, GOOD, method="t-patcher")
    assert t_patcher.patches(tiny_gpt2) == []
    assert_same_weights(tiny_gpt2, saved)
    assert torch.equal(_logits(tiny_gpt2, tok), logits0)


def test_activations_without_patch_is_a_clear_error(tiny_gpt2, tok):
    with pytest.raises(EditError, match="patch: no T-Patcher patch is installed"):
        t_patcher.activations(tiny_gpt2, tok, ["hello"])


# Every Config field with a value it must refuse; the error names the field.
BAD_FIELDS = {"layer": 1.5, "steps": 0, "lr": float("inf"), "act_weight": -1.0, "memory_weight": "1",
              "beta": 0.1, "gamma": float("nan"), "target_loss": -0.1, "memory": "one text", "contrast": 1,
              "violators_mean": None, "progress": "no"}


def test_bad_fields_cover_the_config():
    assert set(BAD_FIELDS) == {f.name for f in dataclasses.fields(t_patcher.Config)}


@pytest.mark.parametrize("name", sorted(BAD_FIELDS))
def test_every_config_field_refuses_a_bad_value_by_name(name):
    with pytest.raises(EditError, match=f"^{name}: "):
        t_patcher.Config(**{name: BAD_FIELDS[name]})


def test_config_is_frozen_and_reaches_apply(tiny_gpt2, tok):
    cfg = t_patcher.Config(steps=3, memory=["The sky is blue."], contrast=False)
    assert cfg.memory == ("The sky is blue.",)                  # lists become tuples: the config stays hashable
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 4
    res = ke.edit(tiny_gpt2, tok, GOOD, method="t-patcher", config=cfg, lr=0.1)
    assert res.config == dataclasses.replace(cfg, lr=0.1) and res.info["steps"] == 3
    assert res.info["memory_size"] < 40                          # the one memory text, not MEMORY_TEXT
    res.undo()


@pytest.mark.parametrize("model_type,layer,violators_mean", [("gpt2", None, True), ("gpt2", None, False),
                                                              ("llama", None, True), ("llama", None, False),
                                                              ("gpt2", 1, True)])
def test_fast_path_equals_reference(model_type, layer, violators_mean, tok):
    """apply() (blocks below replayed, logits at the answer positions only) trains the same patch as reference_edit.

    Both start from the same patch and take the same Adam steps; they differ only in float rounding (the LM head
    on a few rows instead of all, the same blocks replayed instead of recomputed), ~1e-7 per step. Adam moves each
    weight by about lr per step whatever the gradient's size, so rounding grows with the steps: after 20 steps of
    lr 0.05 (a total move up to 1) we allow 1e-4.
    """
    model = make_tiny(model_type)
    cfg = t_patcher.Config(layer=layer, steps=20, violators_mean=violators_mean)
    reference, history = t_patcher.reference_edit(model, tok, GOOD, cfg)
    assert t_patcher.patches(model) == []                        # the reference installs nothing
    res = ke.edit(model, tok, GOOD, method="t-patcher", config=cfg)
    fast = res.info["patch"]
    assert len(history) == res.info["steps"] == 20
    for name in ("edit", "act", "mem_over", "mem_margin"):       # the very first losses agree tightly
        assert history[0][name] == pytest.approx(res.info["losses"][0][name], rel=1e-5, abs=1e-6)
    for ref_p, fast_p in zip(reference.parameters(), fast.parameters()):
        assert torch.allclose(ref_p, fast_p, atol=1e-4, rtol=0)
    assert not torch.allclose(fast.value, torch.zeros_like(fast.value))   # it trained: the comparison can fail
    res.undo()


def test_fast_path_runs_the_blocks_below_the_patch_once(tok):
    """Each step recomputes only the patched block onwards: the MLPs below run a fixed number of times, whatever steps.

    (Counted on the MLPs: a replayed block's own hooks still fire, but nothing inside it runs.)
    """
    model = make_tiny("llama")
    counts = {}
    blocks = [adapters.module_name(model, "mlp", j) for j in range(3)]
    t_patcher.memory_queries(model, tok)                        # cached from here on: both edits below see it
    for steps in (2, 12):
        calls = dict.fromkeys(blocks, 0)
        with hooks.on_forward(model, blocks, lambda name, _: calls.__setitem__(name, calls[name] + 1)):
            res = ke.edit(model, tok, GOOD, method="t-patcher", steps=steps, target_loss=0.0)
        assert res.info["steps"] == steps
        res.undo()
        counts[steps] = calls
    assert counts[2][blocks[0]] == counts[12][blocks[0]] and counts[2][blocks[1]] == counts[12][blocks[1]]
    assert counts[12][blocks[2]] - counts[2][blocks[2]] == 10     # one last-block run per extra step


def test_hinge_means_published_and_ours():
    """violators_mean=False is the paper's mean over all of D_M; True averages over the violating queries only."""
    patch = t_patcher.PatchNeurons(torch.tensor([[1.0, 0.0]]), layer=0)
    with torch.no_grad():
        patch.bias.fill_(0.0)
    q_edit = torch.tensor([[4.0, 0.0]])                         # score 4
    q_memory = torch.tensor([[-5.0, 0.0], [-5.0, 1.0], [1.0, 0.0], [0.0, 0.0]])   # scores -5, -5, 1, 0
    l_e = torch.tensor(0.5)
    for violators_mean, over, margin in ((False, (2 + 1) / 4, (0 + 0 + 0 + 0) / 4), (True, (2 + 1) / 2, 0.0)):
        cfg = t_patcher.Config(beta=-1.0, gamma=3.0, violators_mean=violators_mean)
        total, parts = t_patcher.patch_losses(l_e, patch, q_edit, q_memory, cfg)
        assert parts["mem_over"] == pytest.approx(over) and parts["mem_margin"] == pytest.approx(margin)
        assert total.item() == pytest.approx(0.5 + torch.exp(torch.tensor(-4.0)).item() + over + margin)
    cfg = t_patcher.Config(gamma=5.0, violators_mean=False)     # margin 5: s_i - 4 + 5 > 0 for s_i = 1 and 0
    assert t_patcher.patch_losses(l_e, patch, q_edit, q_memory, cfg)[1]["mem_margin"] == pytest.approx((2 + 1) / 4)


@pytest.mark.parametrize("layer", [None, 1])
def test_answer_logits_are_the_full_models_on_every_family(tiny, tok, layer):
    """The fast path's logits (blocks below replayed, LM head on the answer rows) are the full forward's, patch in."""
    req = ke.EditRequest(**GOOD)
    layer = t_patcher.resolve_layer(tiny, layer)
    batch = t_patcher.edit_batch(tiny, tok, [req])
    q_all, fixed = t_patcher.split_below(tiny, batch, layer)
    with torch.no_grad():
        plain = tiny(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    res = ke.edit(tiny, tok, req, method="t-patcher", layer=layer, steps=3, target_loss=0.0)   # the patch is in
    with torch.no_grad():
        full = tiny(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        fast = t_patcher.answer_logits(tiny, batch, fixed)
    res.undo()
    assert not torch.allclose(full, plain)                      # the patch acts, so the comparison means something
    assert fast.shape == (int(batch["answer_mask"].sum()), full.shape[-1])
    assert torch.allclose(fast, full[batch["answer_mask"]], atol=1e-5, rtol=1e-5)
