"""MEND (chapter 6): rank-one gradients, the editor network's shapes, checkpoints, refusal, undo, bad input."""
import pytest
import torch

import kedit_lite as ke
from kedit_lite import mend
from kedit_lite.adapters import as_out_in, get_module
from kedit_lite.tokens import answer_nll, encode_pairs
from tests.conftest import assert_same_weights, make_tiny, snapshot

REQ = ke.EditRequest("{} is located in the city of", "The Space Needle", "Taipei", "Seattle")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gradient_is_sum_of_rank_one_terms(family, tok):
    model = make_tiny(family)
    names = mend.edited_parameters(model, 2)
    batch = encode_pairs(tok, ["The Space Needle is in", "Paris is the capital of"], ["Taipei", "France"])
    x, delta, _, _ = mend.gradient_factors(model, names, batch)
    weights = [get_module(model, n) for n in names]
    for w in weights:
        w.requires_grad_(True)
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp = torch.log_softmax(logits, -1).gather(-1, batch["labels"].clamp(min=0)[..., None])[..., 0]
        m = batch["answer_mask"]
        row_nll = -(logp * m).sum(1) / m.sum(1)            # each row's mean answer NLL, the loss MEND uses
        grads = torch.autograd.grad(row_nll.sum(), weights)
    finally:
        for w in weights:
            w.requires_grad_(False)
    for name, g in zip(names, grads):
        outer = torch.einsum("bto,bti->oi", delta[name], x[name])  # Σ over rows and tokens of δ xᵀ
        assert torch.allclose(as_out_in(model, g), outer, atol=1e-6, rtol=1e-4), name
        one = torch.outer(delta[name][0, 2], x[name][0, 2])
        assert torch.linalg.matrix_rank(one).item() <= 1
        n_tokens = int(batch["attention_mask"].sum())
        assert torch.linalg.matrix_rank(outer).item() <= n_tokens


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_editor_shapes_identity_init_and_functional_edit(family, tok):
    model = make_tiny(family)
    editor = mend.MENDEditor.for_model(model, n_layers=2, rank=8)
    a = ke.get_adapter(model)
    assert len(editor.names) == 2 * (len(a.mlp_in) + 1)
    assert len(editor.transforms) == 2  # one network per shape: (d_mlp, d_model) and (d_model, d_mlp)
    for name, shape in zip(editor.names, editor.shapes):
        assert shape == tuple(as_out_in(model, get_module(model, name)).shape)
    batch = encode_pairs(tok, ["The Space Needle is in"], ["Taipei"])
    x, delta, _, _ = mend.gradient_factors(model, editor.names, batch)
    mask = batch["attention_mask"].bool()
    editor.update_stats(x, delta, mask)
    deltas = editor(x, delta, mask)
    for name, shape in zip(editor.names, editor.shapes):
        assert deltas[name].shape == (1,) + shape
        t = editor.transforms[mend.shape_key(shape)]
        xt, dt = t(x[name], delta[name], 0)  # identity at initialisation: the normalised inputs come back
        assert torch.allclose(xt, t.norm_x(x[name]), atol=1e-6) and torch.allclose(dt, t.norm_d(delta[name]), atol=1e-6)
    # The functional edit (hooks adding x Δᵀ) equals writing W + Δ into the weights (checks Conv1D orientation).
    probe = encode_pairs(tok, ["Paris is the capital of"], ["France"])
    with torch.no_grad(), mend.apply_deltas(model, deltas):
        functional = model(input_ids=probe["input_ids"]).logits
    saved = snapshot(model)
    result = ke.edit(model, tok, ke.EditRequest("{} is in", "The Space Needle", "Taipei"), method="mend",
                     checkpoint=editor)
    assert sorted(result.touched) == sorted(editor.names)
    with torch.no_grad():
        in_place = model(input_ids=probe["input_ids"]).logits
    assert torch.allclose(functional, in_place, atol=1e-4)
    result.undo()
    assert_same_weights(model, saved)


def test_meta_training_lowers_the_loss_on_a_tiny_model(tok):
    model = make_tiny("llama")
    cases = [ke.EditCase(ke.EditRequest(f"{s} is located in", s, t), [ke.Probe(f"Where is {s}? In", t)],
                         locality=[ke.Probe("The sky is", "blue")])
             for s, t in [("Zorblat", "Paris"), ("Quimby", "Tokyo"), ("Mervale", "Lima")]]
    editor = mend.MENDEditor.for_model(model, n_layers=2, rank=8, lr_init=1e-3)
    before = mend.meta_step(model, tok, editor, cases, update_stats=True)[0].item()
    editor, history = mend.train(model, tok, cases, steps=25, batch_size=3, lr=1e-2, lr_lr=5e-2, editor=editor)
    after = mend.meta_step(model, tok, editor, cases, update_stats=False)[0].item()
    assert len(history) == 25 and after < before - 0.5, (before, after)


@pytest.mark.parametrize("family", ["gpt2", "gptj", "llama"])
def test_meta_step_replaying_unedited_blocks_is_exact(family, tok, monkeypatch):
    """The post-edit pass replays the blocks below the edit; losses and gradients match recomputing them."""
    model = make_tiny(family)
    cases = [ke.EditCase(ke.EditRequest(f"{s} is located in", s, t), [ke.Probe(f"Where is {s}? In", t)],
                         locality=[ke.Probe("The sky is", "blue")]) for s, t in [("Zorblat", "Paris"), ("Quimby", "Tokyo")]]
    editor = mend.MENDEditor.for_model(model, n_layers=1, rank=8, lr_init=1e-3)
    assert mend.unedited_blocks(model, editor.names) == [f"{name}.{j}" for name, j in
                                                          [(ke.adapters.get_adapter(model).layers, 0),
                                                           (ke.adapters.get_adapter(model).layers, 1)]]

    def losses():
        editor.zero_grad()
        edit, loc = mend.meta_step(model, tok, editor, cases, update_stats=False)
        (edit + loc).backward()
        grads = torch.cat([p.grad.flatten() for p in editor.parameters() if p.grad is not None])
        return torch.stack([edit, loc]).detach(), grads
    fast, fast_grad = losses()
    monkeypatch.setattr(mend, "unedited_blocks", lambda model, names: [])
    slow, slow_grad = losses()
    assert fast_grad.abs().max() > 0
    assert torch.allclose(fast, slow, atol=1e-5) and torch.allclose(fast_grad, slow_grad, atol=1e-5, rtol=1e-4)


def test_checkpoint_round_trip_and_wrong_model_refusal(tmp_path, tok):
    llama, gpt2 = make_tiny("llama"), make_tiny("gpt2")
    editor = mend.MENDEditor.for_model(llama, n_layers=2, rank=8)
    with torch.no_grad():
        for p in editor.parameters():
            p.add_(torch.randn_like(p))
    batch = encode_pairs(tok, ["The Space Needle is in"], ["Taipei"])
    x, delta, _, _ = mend.gradient_factors(llama, editor.names, batch)
    editor.update_stats(x, delta, batch["attention_mask"].bool())
    path = tmp_path / "editor.safetensors"
    mend.save_editor(editor, path)
    loaded = mend.load_editor(path)
    assert loaded.names == editor.names and loaded.shapes == editor.shapes and loaded.meta == editor.meta
    a, b = editor.state_dict(), loaded.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert mend.get_editor(str(path)) is mend.get_editor(str(path))  # cached in memory
    with pytest.raises(ke.EditError, match="checkpoint: this MEND editor was trained for 'llama'"):
        ke.edit(gpt2, tok, REQ, method="mend", checkpoint=str(path))
    bigger = mend.MENDEditor(editor.names, [(s[0] * 2, s[1]) for s in editor.shapes], 8, meta=editor.meta)
    with pytest.raises(ke.EditError, match="checkpoint: the editor expects weight"):
        bigger.check_model(llama)


def test_bad_inputs(tmp_path, tok):
    model = make_tiny("llama")
    saved = snapshot(model)
    with pytest.raises(ke.EditError, match="checkpoint: expected a path"):
        ke.edit(model, tok, REQ, method="mend", checkpoint=42)
    with pytest.raises(ke.EditError, match="does not exist"):
        ke.edit(model, tok, REQ, method="mend", checkpoint=str(tmp_path / "missing.safetensors"))
    (tmp_path / "plain.safetensors").write_bytes(b"")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ke.EditError, match="not a kedit_lite MEND checkpoint"):
        ke.edit(model, tok, REQ, method="mend", checkpoint=str(tmp_path / "plain.safetensors"))
    with pytest.raises(ke.EditError, match="hparams"):
        ke.edit(model, tok, REQ, method="mend", lr=1.0)
    for bad in (0, -1.0, float("nan"), True, "2"):
        with pytest.raises(ke.EditError, match="scale: expected a positive number"):
            ke.edit(model, tok, REQ, method="mend", scale=bad)
    with pytest.raises(ke.EditError, match="n_layers"):
        mend.edited_parameters(model, 7)
    with pytest.raises(ke.EditError, match="cases"):
        mend.train(model, tok, [ke.EditCase(REQ)], steps=1)
    assert_same_weights(model, saved)


@pytest.mark.slow
def test_shipped_checkpoint_edits_smollm2_and_undo_is_exact(smol):
    model, tok = smol
    if not mend.DEFAULT_CHECKPOINT.exists():
        pytest.fail("the shipped checkpoint kedit_lite/checkpoints/mend_smollm2.safetensors is missing")
    saved = snapshot(model)
    batch = encode_pairs(tok, [REQ.prompt_text], [REQ.target_new])
    with torch.no_grad():
        nll_before = answer_nll(model, batch).item()
    result = ke.edit(model, tok, REQ, method="mend")
    assert len(result.touched) == 9 and all(".mlp." in n for n in result.touched)
    with torch.no_grad():
        nll_after = answer_nll(model, batch).item()
    assert nll_after < nll_before - 1.0, (nll_before, nll_after)
    edited = {n: dict(model.named_parameters())[n].detach().clone() for n in result.touched}
    result.undo()
    assert_same_weights(model, saved)
    doubled = ke.edit(model, tok, REQ, method="mend", scale=2.0)     # scale multiplies the learned step sizes
    for n in doubled.touched:
        step = edited[n] - saved[n]
        assert torch.allclose(dict(model.named_parameters())[n] - saved[n], 2 * step, atol=1e-6), n
    doubled.undo()
    assert_same_weights(model, saved)
    with pytest.raises(ke.EditError, match="trained for"):
        ke.edit(make_tiny("llama"), tok, REQ, method="mend")


def _seeded_editor(model, tok, seed=0):
    """An untrained editor with random (seeded) blocks and statistics, so every part of g is exercised."""
    torch.manual_seed(seed)
    editor = mend.MENDEditor.for_model(model, n_layers=2, rank=8, lr_init=1e-2)
    with torch.no_grad():
        for block in (b for t in editor.transforms.values() for b in t.blocks):
            block.U.normal_(0, 0.3)
            block.b.normal_(0, 0.3)
            block.scale.uniform_(0.5, 1.5)
            block.shift.normal_(0, 0.1)
        editor.log_lr.uniform_(-5, -3)
    batch = encode_pairs(tok, ["The Eiffel Tower is in", "Paris is the capital of"], ["Rome", "France"])
    x, delta, _, _ = mend.gradient_factors(model, editor.names, batch)
    editor.update_stats(x, delta, batch["attention_mask"].bool())
    return editor


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("n_requests", [1, 2])
def test_fast_apply_equals_the_plain_reference(family, n_requests, tok):
    """apply (one addmm_ per weight over all tokens) == reference_edit (per request, per token outer products).

    Same float32 sums in another order (about T·rank terms each): relative differences are ~1e-6, so rtol 1e-4
    with an absolute floor of 1e-5 of the largest entry is tight enough to catch any missing term or factor.
    """
    model = make_tiny(family)
    editor = _seeded_editor(model, tok)
    requests = [REQ, ke.EditRequest("{} is the capital of", "Paris", "Spain")][:n_requests]
    saved = snapshot(model)
    want = mend.reference_edit(model, tok, requests, editor, scale=1.5)
    assert_same_weights(model, saved)                        # the reference only computes
    result = ke.edit(model, tok, requests, method="mend", checkpoint=editor, scale=1.5)
    params = dict(model.named_parameters())
    for name in editor.names:
        got = as_out_in(model, params[name] - saved[name])
        ref = want[name]
        assert ref.abs().max() > 0, name
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item()), name
    result.undo()
    assert_same_weights(model, saved)


def test_reference_gradient_factors_match_the_fast_ones(tok):
    """reference_factors (autograd on the recorded outputs) and gradient_factors (zero leaves) agree."""
    model = make_tiny("llama")
    names = mend.edited_parameters(model, 2)
    u, d = mend.reference_factors(model, tok, REQ, names)
    batch = encode_pairs(tok, [REQ.prompt_text], [REQ.target_new])
    x, delta, _, _ = mend.gradient_factors(model, names, batch)
    for n in names:  # cross_entropy vs log_softmax + gather round differently: 1e-4 of the largest δ entry
        assert torch.allclose(u[n], x[n][0], atol=1e-6)
        assert torch.allclose(d[n], delta[n][0], rtol=1e-4, atol=1e-4 * d[n].abs().max().item())
    assert not any(p.requires_grad for p in model.parameters())     # the reference put requires_grad back


BAD_OPTIONS = [("checkpoint", 42), ("checkpoint", 1.5), ("scale", 0), ("scale", -1.0), ("scale", float("nan")),
               ("scale", True), ("scale", "2")]
BAD_TRAIN_OPTIONS = [("steps", 0), ("steps", True), ("batch_size", 0), ("batch_size", 2.0), ("c_loc", -1.0),
                     ("c_loc", "1"), ("lr", 0), ("lr", float("inf")), ("lr_lr", -1e-2), ("lr_lr", True),
                     ("rank", 0), ("rank", 8.5), ("n_layers", 0), ("n_layers", True), ("lr_init", 0),
                     ("lr_init", 100.0), ("grad_clip", 0), ("grad_clip", None), ("seed", -1), ("seed", 1.0),
                     ("max_seconds", 0), ("max_seconds", "60")]


def test_every_option_has_a_bad_value_tested():
    import dataclasses
    assert {f.name for f in dataclasses.fields(mend.Config)} == {n for n, _ in BAD_OPTIONS}
    assert {f.name for f in dataclasses.fields(mend.TrainConfig)} == {n for n, _ in BAD_TRAIN_OPTIONS}


@pytest.mark.parametrize("field, value", BAD_OPTIONS)
def test_bad_edit_option_is_refused_by_name(field, value, tok):
    model = make_tiny("llama")
    saved = snapshot(model)
    with pytest.raises(ke.EditError, match=f"^{field}: expected"):
        mend.Config(**{field: value})
    with pytest.raises(ke.EditError, match=f"^{field}: expected"):
        ke.edit(model, tok, REQ, method="mend", **{field: value})
    assert_same_weights(model, saved)


@pytest.mark.parametrize("field, value", BAD_TRAIN_OPTIONS)
def test_bad_training_option_is_refused_by_name(field, value):
    with pytest.raises(ke.EditError, match=f"^{field}: expected"):
        mend.TrainConfig(**{field: value})


def test_options_come_as_config_or_keywords(tok):
    model = make_tiny("llama")
    editor = _seeded_editor(model, tok)
    cfg = ke.editing.method_config("mend", mend.Config(checkpoint=editor), scale=2.0)
    assert cfg == mend.Config(checkpoint=editor, scale=2.0)
    with pytest.raises(ke.EditError, match=r"hparams: unknown option\(s\) \['steps'\]"):
        ke.edit(model, tok, REQ, method="mend", checkpoint=editor, steps=3)   # a training option, not an edit one
    with pytest.raises(ke.EditError, match=r"unknown option\(s\) \['scale'\]"):
        mend.train(model, tok, [], scale=2.0)


def test_gradient_factors_leave_no_hook_behind(tok):
    model = make_tiny("gpt2")
    names = mend.edited_parameters(model, 1)
    batch = encode_pairs(tok, [REQ.prompt_text], [REQ.target_new])
    mend.gradient_factors(model, names, batch)
    with torch.no_grad(), mend.apply_deltas(model, {n: torch.zeros((1,) + mend.weight_shape(model, n))
                                                     for n in names}):
        pass
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_training_script_builds_its_flags_from_train_config(tmp_path):
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("train_mend", Path(mend.__file__).parents[1] / "scripts" /
                                                  "train_mend.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args, cfg = script.parse(["--steps", "7", "--c-loc", "3", "--max-seconds", "60", "--out", str(tmp_path / "e")])
    assert cfg == mend.TrainConfig(steps=7, c_loc=3.0, max_seconds=60.0) and args.out == str(tmp_path / "e")
    assert script.parse([])[1] == mend.TrainConfig()
    with pytest.raises(ke.EditError, match="^steps: expected"):
        script.parse(["--steps", "0"])


def test_python_m_kedit_lite_mend_train_runs_the_script():
    """Chapter 9 names `python -m kedit_lite.mend train ...`: it is the training script's command line."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(mend.__file__).parents[1]
    out = subprocess.run([sys.executable, "-m", "kedit_lite.mend", "train", "--help"], cwd=root, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "scripts/train_mend.py" in out.stdout and "--c-loc" in out.stdout and "--max-seconds" in out.stdout
