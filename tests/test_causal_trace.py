"""Causal tracing (chapter 4): the fast trace equals the plain reference loop, validation, seeding, windows."""
import contextlib

import pytest
import torch

import kedit_lite as ke
from kedit_lite import tracing as ct
from kedit_lite.requests import EditError
from tests.conftest import assert_same_weights, make_tiny, snapshot

PROMPT = "The Space Needle is located in the city of"
SUBJECT = "The Space Needle"
TINY_PROMPT = "Hello there, The Space Needle is in"


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny_model(request):
    return make_tiny(request.param)


@pytest.mark.parametrize("kind", ct.KINDS)
def test_fast_matches_reference_on_tiny_models(tiny_model, tok, kind):
    """Same grid as the plain loop; random tiny models give tiny probabilities, so compare relatively."""
    ref = ct.reference_trace(tiny_model, tok, TINY_PROMPT, "Space Needle", kind, samples=3, window=2)
    fast = ke.causal_trace(tiny_model, tok, TINY_PROMPT, subject="Space Needle", kind=kind, samples=3, window=2)
    assert fast.scores.shape == ref.scores.shape == (len(fast.tokens), 3)
    assert torch.allclose(fast.scores, ref.scores, rtol=1e-4, atol=1e-9)
    assert fast.low == pytest.approx(ref.low, rel=1e-6) and fast.high == pytest.approx(ref.high, rel=1e-6)
    first, _ = fast.subject_range
    assert fast.scores[first:].std() > 0, "restores after the subject start must change something"
    assert torch.allclose(fast.scores[:first], torch.full_like(fast.scores[:first], fast.low), rtol=1e-5)


@pytest.mark.parametrize("kind", ct.KINDS)
def test_fast_matches_reference_on_every_family(tiny, tok, kind):
    """GPT-2, GPT-J, GPT-NeoX, Llama, Qwen2, Mistral: the cache reuse, growing rows and trimmed last MLP are exact."""
    ref = ct.reference_trace(tiny, tok, TINY_PROMPT, "Space Needle", kind, samples=2, window=2)
    fast = ke.causal_trace(tiny, tok, TINY_PROMPT, subject="Space Needle", kind=kind, samples=2, window=2)
    assert torch.allclose(fast.scores, ref.scores, rtol=1e-4, atol=1e-9)
    assert not any("forward" in vars(m) for m in tiny.modules())  # every temporary forward is removed


def test_hidden_restore_at_last_layer_before_last_token_is_low(tiny_model, tok):
    """Skipped without computing: the last block's output at t < T-1 never reaches the last position."""
    ref = ct.reference_trace(tiny_model, tok, TINY_PROMPT, "Space Needle", "hidden", samples=2, tokens=[5, 6])
    fast = ke.causal_trace(tiny_model, tok, TINY_PROMPT, subject="Space Needle", samples=2, tokens=[5, 6])
    assert fast.scores[5, -1].item() == fast.low and fast.scores[6, -1].item() == fast.low
    assert ref.scores[5:7, -1].tolist() == pytest.approx([ref.low] * 2, rel=1e-6)


@pytest.mark.parametrize("kind", ct.KINDS)
def test_fast_matches_reference_on_smollm2(smol, kind):
    model, tok = smol
    prompt, subject = "The Eiffel Tower is in", "The Eiffel Tower"
    saved = snapshot(model)
    # The full grid for hidden states; for mlp/attn the two rows that matter (last subject token, last token).
    rows = None if kind == "hidden" else [3, 5]
    ref = ct.reference_trace(model, tok, prompt, subject, kind, samples=2, window=6, tokens=rows)
    fast = ke.causal_trace(model, tok, prompt, subject=subject, kind=kind, samples=2, window=6, tokens=rows)
    assert fast.scores.shape == (6, 30) and fast.subject_range == (0, 4)  # The | E | iffel | Tower
    diff = (fast.scores - ref.scores).abs()
    assert torch.equal(diff.isnan(), ref.scores.isnan()) and diff.nan_to_num().max() <= 1e-4
    assert (fast.scores.nan_to_num() - fast.low).max() > 0.01 * (fast.high - fast.low)  # a grid worth comparing
    assert fast.answer.strip() == "Paris" and fast.low < fast.high
    assert_same_weights(model, saved)  # the skipped-block trick must leave the model untouched
    assert not any("forward" in vars(b) for b in model.model.layers)


def test_restoring_last_layer_at_last_token_gives_clean_probability(smol):
    """The last block's output at the last token decides the logits: restoring it recovers P_clean exactly."""
    model, tok = smol
    res = ke.causal_trace(model, tok, PROMPT, subject=SUBJECT, samples=2, tokens=[len(tok(PROMPT).input_ids) - 1])
    assert res.scores[-1, -1].item() == pytest.approx(res.high, abs=1e-5)
    assert torch.isnan(res.scores[0]).all()  # rows not asked for are left empty


def test_result_fields_and_plot(smol):
    model, tok = smol
    res = ke.causal_trace(model, tok, PROMPT, subject=SUBJECT, kind="mlp", samples=1, window=4,
                          tokens=[2])
    n_tokens = len(tok(PROMPT, add_special_tokens=False).input_ids)
    assert res.scores.shape == (n_tokens, ke.num_layers(model))
    assert "".join(res.tokens) == PROMPT and res.subject_range == (0, 4)  # The | Space | Need | le
    assert res.answer == tok.decode([res.answer_id]) and 0 <= res.low <= 1 and 0 <= res.high <= 1
    import matplotlib
    matplotlib.use("Agg")
    ax = res.plot()
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[:4] == ["The*", " Space*", " Need*", "le*"] and not labels[4].endswith("*")


def test_answer_argument_traces_that_token(smol):
    model, tok = smol
    own = ke.causal_trace(model, tok, PROMPT, subject=SUBJECT, samples=1, tokens=[2])
    seattle = ke.causal_trace(model, tok, PROMPT, subject=SUBJECT, samples=1, tokens=[2], answer="Seattle")
    assert seattle.answer_id == tok(" Seattle", add_special_tokens=False).input_ids[0]
    assert seattle.answer != own.answer and seattle.high < own.high  # the model believes something else


def test_same_seed_same_grid_other_seed_other_grid(tiny_model, tok):
    a = ke.causal_trace(tiny_model, tok, TINY_PROMPT, subject="Space Needle", samples=2, seed=1)
    b = ke.causal_trace(tiny_model, tok, TINY_PROMPT, subject="Space Needle", samples=2, seed=1)
    c = ke.causal_trace(tiny_model, tok, TINY_PROMPT, subject="Space Needle", samples=2, seed=2)
    assert torch.equal(a.scores, b.scores) and a.low == b.low
    assert not torch.allclose(a.scores, c.scores, rtol=1e-6, atol=0)


def test_windows_centred_and_clipped():
    assert ct.window_layers(10, 10, 30) == list(range(5, 15))
    assert ct.window_layers(0, 10, 30) == list(range(0, 5))
    assert ct.window_layers(29, 10, 30) == list(range(24, 30))
    assert ct.window_layers(3, 1, 30) == [3]
    assert ct.window_layers(3, 3, 30) == [2, 3, 4]


def test_window_one_mlp_equals_single_layer_restore(tiny_model, tok):
    """window=1 restores exactly one MLP: the grid is the reference's with that single patch."""
    fast = ke.causal_trace(tiny_model, tok, TINY_PROMPT, subject="Space Needle", kind="mlp", samples=2, window=1)
    wide = ke.causal_trace(tiny_model, tok, TINY_PROMPT, subject="Space Needle", kind="mlp", samples=2, window=3)
    ref = ct.reference_trace(tiny_model, tok, TINY_PROMPT, "Space Needle", "mlp", samples=2, window=1)
    assert torch.allclose(fast.scores, ref.scores, rtol=1e-4, atol=1e-9)
    assert not torch.allclose(fast.scores, wide.scores, rtol=1e-6, atol=0)


BAD = [
    (dict(subject="Eiffel"), "subject: 'Eiffel' does not occur"),
    (dict(subject=""), "subject: empty"),
    (dict(subject="  "), "subject: empty"),
    (dict(kind="residual"), "kind: expected one of"),
    (dict(window=0), "window: expected a positive integer"),
    (dict(samples=0), "samples: expected a positive integer"),
    (dict(samples=2.5), "samples: expected a positive integer"),
    (dict(noise=-1.0), "noise: expected a positive"),
    (dict(answer=""), "answer: expected a non-empty string"),
    (dict(prompt=""), "prompt: expected a non-empty string"),
    (dict(tokens=[99]), "tokens: indices must lie in"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_inputs_clear_errors(tok, kwargs, message):
    model = make_tiny("llama")
    saved = snapshot(model)
    args = dict(prompt=PROMPT, subject=SUBJECT, samples=1)
    args.update(kwargs)
    with pytest.raises(EditError, match=message):
        ke.causal_trace(model, tok, **args)
    assert_same_weights(model, saved)


def test_embedding_std_cached_per_model(tok):
    model = make_tiny("llama")
    sigma = ct.embedding_std(model, tok)
    assert sigma == ct.embedding_std(model, tok) and ct._SIGMA.peek("lecture subjects", owner=model) == sigma
    assert sigma == pytest.approx(0.02, rel=0.2)  # HF initialises embeddings with std 0.02
    assert ct.embedding_std(model, tok, ["Paris"]) != sigma


def test_average_effects_and_suggest_layer_on_given_facts(tiny_model, tok):
    facts = [("The Space Needle is located in", "The Space Needle", "Paris"),
             {"prompt": "{} is in the city of", "subject": "The Colosseum"}]
    curve, per_fact = ct.average_effects(tiny_model, tok, facts, kind="attn", position="last", samples=2, window=1)
    assert curve.shape == (3,) and per_fact.shape == (2, 3)
    assert torch.allclose(curve, per_fact.mean(0))
    s = ke.suggest_layer(tiny_model, tok, facts=facts, samples=2, window=1, smooth=1)
    layer, smoothed = s
    assert layer == int(s.raw.argmax()) and torch.equal(smoothed, s.raw) and s.n_facts == 2
    with pytest.raises(EditError, match="facts: empty"):
        ct.average_effects(tiny_model, tok, [], samples=1)
    with pytest.raises(EditError, match="position"):
        ct.average_effects(tiny_model, tok, facts, position="first", samples=1)
    with pytest.raises(EditError, match="smooth"):
        ke.suggest_layer(tiny_model, tok, facts=facts, smooth=0)


def test_known_facts_are_known(smol):
    model, tok = smol
    facts = ct.known_facts(model, tok, sources=("lecture",))
    assert ct.known_facts(model, tok, sources=("lecture",), n=3, batch_size=2) == facts[:3]  # stops early, same facts
    subjects = {f["subject"] for f in facts}
    assert "The Eiffel Tower" in subjects and "The Space Needle" not in subjects  # it says New York
    for f in facts[:5]:
        res = ke.causal_trace(model, tok, f["prompt"], subject=f["subject"], samples=1, tokens=[0])
        assert tok.decode([res.answer_id]).strip() and res.answer.strip().lower() in f["answer"].lower()


def test_explorer_logic_and_widget(smol):
    model, tok = smol
    result, fig = ct.explore(model, tok, "The Colosseum is in the city of", "The Colosseum", "hidden", samples=1)
    assert result.answer.strip() == "Rome" and fig.axes
    none, message = ct.explore(model, tok, "The Colosseum is in the city of", "Eiffel", "hidden", samples=1)
    assert none is None and message.startswith("subject:")
    box = ct.explorer(model, tok)
    assert type(box).__name__ == "VBox"


# ------------------------------------------------------------------ severed experiment (ROME Fig. 7)

def _plain_severed(model, tok, prompt, subject, sever, samples):
    """The severed experiment the plain way: one full forward per layer, every sublayer at the subject frozen."""
    from kedit_lite.hooks import patch, set_at
    s = ct.prepare(model, tok, prompt, subject, samples, need_cache=False)
    first, end = s.subject_range
    blocks, out = ct._sites(model, "hidden"), []
    for layer, block in enumerate(blocks):
        with contextlib.ExitStack() as stack:
            stack.enter_context(set_at(model, block, end - 1, s.clean[block][0, end - 1]))
            for name in ct._sites(model, sever) if sever else []:
                def freeze(x, value=s.corrupt[name]):
                    x = x.clone()
                    x[:, first:end] = value[:, first:end]
                    return x
                stack.enter_context(patch(model, name, freeze))
            out.append(ct._prob(model(inputs_embeds=s.noisy).logits, s.answer_id))
    return torch.tensor(out) - s.low


@pytest.mark.parametrize("sever", ["mlp", "attn"])
def test_severed_matches_plain_loop(tiny, tok, sever):
    got = ct.severed_effects(tiny, tok, TINY_PROMPT, "Space Needle", sever=sever, samples=2)
    want = _plain_severed(tiny, tok, TINY_PROMPT, "Space Needle", sever, 2)
    assert got.shape == (ke.num_layers(tiny),)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-9)


def test_severed_none_is_the_hidden_trace_row(tiny_model, tok):
    t = 6  # Hello | there | , | The | Space | Need | le | is | in: "le" is the last subject token
    row = ke.causal_trace(tiny_model, tok, TINY_PROMPT, subject="Space Needle", samples=3, tokens=[t])
    assert row.subject_range[1] - 1 == t
    plain = ct.severed_effects(tiny_model, tok, TINY_PROMPT, "Space Needle", sever=None, samples=3)
    assert plain.shape == (3,) and torch.equal(plain, row.effects[t])
    severed = ct.severed_effects(tiny_model, tok, TINY_PROMPT, "Space Needle", sever="mlp", samples=3)
    assert not torch.equal(severed, plain)
    assert severed[-1] == plain[-1] == 0  # the last block's output at t < T-1 never reaches the answer


def test_severed_on_smollm2_matches_plain_loop_and_leaves_model_alone(smol):
    model, tok = smol
    saved = snapshot(model)
    prompt, subject = "The Eiffel Tower is in", "The Eiffel Tower"
    got = ct.severed_effects(model, tok, prompt, subject, sever="mlp", samples=2)
    want = _plain_severed(model, tok, prompt, subject, "mlp", 2)
    assert (got - want).abs().max() <= 1e-4
    assert_same_weights(model, saved)
    assert not any("forward" in vars(m) for m in model.modules())


@pytest.mark.parametrize("kwargs,message", [(dict(sever="residual"), "sever: expected None, 'mlp' or 'attn'"),
                                            (dict(sever="MLP"), "sever: expected"),
                                            (dict(subject="Eiffel"), "subject: 'Eiffel' does not occur"),
                                            (dict(samples=0), "samples: expected a positive integer")])
def test_severed_bad_inputs(tiny_model, tok, kwargs, message):
    args = dict(prompt=PROMPT, subject=SUBJECT, samples=1)
    args.update(kwargs)
    with pytest.raises(EditError, match=message):
        ct.severed_effects(tiny_model, tok, **args)
