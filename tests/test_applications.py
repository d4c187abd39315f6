"""Chapter 8's machinery: neuron attribution/deactivation (right to be forgotten), debiasing, undoable weight edits."""
import pytest
import torch

import kedit_lite as ke
from kedit_lite import adapters, debias, privacy
from kedit_lite.editing import edit_weights
from kedit_lite.metrics import perplexity
from kedit_lite.requests import EditError
from tests.conftest import assert_same_weights, make_tiny, snapshot


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_deactivate_neurons_zeroes_columns_and_undoes(family):
    model = make_tiny(family)
    saved = snapshot(model)
    result = privacy.deactivate_neurons(model, [(1, 3), (1, 7), (2, 0)])
    w1 = adapters.as_out_in(model, adapters.layer_module(model, "mlp_out", 1).weight)
    assert torch.all(w1[:, [3, 7]] == 0) and torch.any(w1[:, 4] != 0)   # only the chosen keys are silenced
    assert torch.all(adapters.as_out_in(model, adapters.layer_module(model, "mlp_out", 2).weight)[:, 0] == 0)
    assert sorted(result.touched) == [adapters.mlp_out_weight_name(model, 1), adapters.mlp_out_weight_name(model, 2)]
    result.undo()
    assert_same_weights(model, saved)


def test_attribution_shape_top_neurons_and_bad_steps(tok):
    model = make_tiny("llama")
    scores = privacy.neuron_attribution(model, tok, "Zorblax Quentin's phone number is", "555-0142", layers=[0, 2],
                                        steps=2)
    assert scores.shape == (2, adapters.mlp_dims(model)[1]) and torch.isfinite(scores).all()
    top = privacy.top_neurons(scores, [0, 2], k=5)
    assert len(top) == 5 and all(layer in (0, 2) for layer, _ in top)
    best_layer, best_index = top[0]
    assert scores[[0, 2].index(best_layer), best_index] == scores.max()
    with pytest.raises(EditError, match="steps"):
        privacy.neuron_attribution(model, tok, "a b", "c", steps=0)


def test_edit_weights_rolls_back_on_error():
    model = make_tiny("llama")
    saved = snapshot(model)
    name = adapters.mlp_out_weight_name(model, 0)

    def half_done(params):
        params[name].mul_(2)
        raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError, match="interrupted"):
        edit_weights(model, [name], half_done)
    assert_same_weights(model, saved)


def test_equalize_shrinks_the_gap_and_undoes(tok):
    model = make_tiny("llama", seed=1)
    saved = snapshot(model)
    jobs = ["nurse", "engineer", "pilot", "librarian"]
    spread = lambda: torch.tensor(list(debias.pronoun_gaps(model, tok, jobs).values())).std().item()
    before = spread()
    result = debias.equalize(model, tok, layers=[1, 2], professions=jobs, neutral_texts=["The sun is warm today."],
                             steps=15, lr=1e-2, norm_constraint=0.05)
    assert spread() < 0.5 * before
    assert result.info["losses"][-1] < result.info["losses"][0]
    result.undo()
    assert_same_weights(model, saved)
    with pytest.raises(EditError, match="professions"):
        debias.equalize(model, tok, layers=[1], professions=["nurse"])
    with pytest.raises(ValueError, match="layers: layer 9 is out of range"):
        debias.equalize(model, tok, layers=[9])
    assert_same_weights(model, saved)


def test_perplexity_rejects_one_token_text(tok):
    model = make_tiny("llama")
    assert perplexity(model, tok, ["The weather is nice today."]) > 1
    with pytest.raises(ValueError, match="texts"):
        perplexity(model, tok, ["Hi"])
