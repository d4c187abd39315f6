"""T-Patcher (chapter 7): patch neurons on GPT-2 and gated (Llama) MLPs, its losses, exact undo, bad input."""
import pytest
import torch

import kedit_lite as ke
from kedit_lite import adapters, t_patcher
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
    res = ke.edit(model, tok, req, method="t-patcher", steps=5)
    with_contrast = res.info["memory_size"]
    res.undo()
    res = ke.edit(model, tok, req, method="t-patcher", steps=5, contrast=False)
    assert with_contrast - res.info["memory_size"] == q.shape[0]
    res.undo()


def test_smol_patch_fires_on_edit_not_on_memory(smol):
    model, tok = smol
    case = ke.lecture_case("space-needle-taipei")
    saved, before = snapshot(model), ke.evaluate(model, tok, case)
    res = ke.edit(model, tok, case.request, method="t-patcher")
    patch = res.info["patch"]
    q_mem = t_patcher.memory_queries(model, tok)
    assert patch.scores(q_mem).max().item() <= -1.0 + 1e-3        # below beta on every memory query
    assert min(res.info["edit_activation"]) > 1.0 and res.info["memory_fired"] == 0
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
    (dict(lr=-1.0), "lr: expected a finite number"),
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
    monkeypatch.setattr(t_patcher, "_losses", boom)
    with pytest.raises(RuntimeError, match="boom"):
        ke.edit(tiny_gpt2, tok, GOOD, method="t-patcher")
    assert t_patcher.patches(tiny_gpt2) == []
    assert_same_weights(tiny_gpt2, saved)
    assert torch.equal(_logits(tiny_gpt2, tok), logits0)


def test_activations_without_patch_is_a_clear_error(tiny_gpt2, tok):
    with pytest.raises(EditError, match="patch: no T-Patcher patch is installed"):
        t_patcher.activations(tiny_gpt2, tok, ["hello"])
