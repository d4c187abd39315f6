"""Hostile-but-fair input through the public API: a clear error naming the field, and the model untouched.

Each bad case asserts the error type, that the message names the field, and that weights, requires_grad, .grad
and forward hooks are exactly as before. Then: inputs that used to be refused, requires_grad/.grad kept by edit and
undo, and stacked edits undone in every order (exact, or refused naming the edit to undo first).
"""
import json
import random

import numpy as np
import pytest
import torch

import kedit_lite as ke
from kedit_lite import mend
from kedit_lite.requests import EditError
from tests.conftest import make_tiny

G = dict(prompt="{} is located in the city of", subject="The Space Needle", target_new="Taipei")
G2 = dict(prompt="{} is located in the city of", subject="The Louvre", target_new="Rome")
FT = dict(method="ft", layers=1, steps=2)
ROME = dict(method="rome", layer=1, steps=3, n_prefixes=0, wordings=(), mom2_adjustment=False)
MEMIT = dict(method="memit", layers=[0, 1], steps=3, n_prefixes=0, wordings=(), mom2_adjustment=False)
TP = dict(method="t-patcher", steps=3, memory=["The sky is blue."], contrast=False)


@pytest.fixture(scope="module")
def model():
    """Tiny Llama with one trainable parameter that already holds a .grad (both must survive every call)."""
    m = make_tiny("llama")
    m.model.norm.weight.requires_grad_(True)
    m.model.norm.weight.grad = torch.full_like(m.model.norm.weight, 0.25)
    return m


def state(m):
    """Weights, requires_grad, .grad (copies) and the number of hooks of every module."""
    hooks = sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())
    return ({k: v.detach().clone() for k, v in m.state_dict().items()},
            {n: p.requires_grad for n, p in m.named_parameters()},
            {n: None if p.grad is None else p.grad.clone() for n, p in m.named_parameters()}, hooks)


def assert_state(m, saved):
    weights, flags, grads, hooks = saved
    now = state(m)
    assert [k for k in weights if not torch.equal(weights[k], now[0][k])] == []
    assert now[1] == flags
    assert {n for n, g in grads.items() if g is None} == {n for n, g in now[2].items() if g is None}
    assert all(torch.equal(g, now[2][n]) for n, g in grads.items() if g is not None)
    assert now[3] == hooks


def _mend_file(tmp_path):
    path = tmp_path / "editor.safetensors"
    path.write_bytes(b"this is a pickle, honest")
    return path


# (id, request(s), edit options, error, field the message must name)
EDITS = [
    ("subject-zero-width", dict(G, subject="\u200b"), FT, EditError, "subject: empty"),
    ("subject-invisible-mix", dict(G, subject="\u200b\u2060\ufeff"), FT, EditError, "subject: empty"),
    ("target-zero-width", dict(G, target_new="\u200b\u200b"), FT, EditError, "target_new: empty"),
    ("target_true-invisible", dict(G, target_true="\u200b"), FT, EditError, "target_true: empty"),
    ("target_true-empty", dict(G, target_true=""), FT, EditError, "target_true: empty"),
    ("subject-9000-words", dict(G, subject=" ".join(["word"] * 9000)), FT, EditError, "subject: 44999 characters"),
    ("target-lone-surrogate", dict(G, target_new="Taip\udc80ei"), FT, EditError, "target_new: .*surrogate"),
    ("subject-lone-surrogate", dict(G, subject="The \ud800Needle"), FT, EditError, "subject: .*surrogate"),
    ("prompt-lone-surrogate", dict(G, prompt="{} is \udfff in"), FT, EditError, "prompt: .*surrogate"),
    ("request-empty-dict", {}, FT, EditError, "prompt: missing"),
    ("request-no-target", dict(prompt=G["prompt"], subject=G["subject"]), FT, EditError, "target_new: missing"),
    ("method-list", G, dict(method=["rome"]), EditError, "method: expected a method name"),
    ("method-none", G, dict(method=None), EditError, "method: expected a method name"),
    ("ft-lr-inf", G, dict(FT, lr=float("inf")), EditError, "lr: expected a positive"),
    ("ft-lr-1e30", G, dict(FT, lr=1e30), EditError, "lr: .*above 10"),
    ("ft-lr-nan", G, dict(FT, lr=float("nan")), EditError, "lr: expected"),
    ("ft-lr-bool", G, dict(FT, lr=True), EditError, "lr: expected"),
    ("ft-steps-true", G, dict(FT, steps=True), EditError, "steps: expected a positive integer"),
    ("ft-steps-float", G, dict(FT, steps=2.0), EditError, "steps: expected a positive integer"),
    ("ft-target_loss-str", G, dict(FT, target_loss="0.1"), EditError, "target_loss: expected"),
    ("ft-norm-str", G, dict(FT, norm_constraint="abc"), EditError, "norm_constraint: expected"),
    ("ft-layers-bool", G, dict(FT, layers=[True]), EditError, "layers: expected an integer"),
    ("ft-layers-float", G, dict(FT, layers=1.0), EditError, "layers: expected"),
    ("ft-conflict", [G, dict(G, target_new="Paris")], FT, EditError, "requests: requests 0 and 1"),
    ("ft-conflict-case", [G, dict(G, prompt="{}  is located in the city of", target_new="Paris")], FT, EditError,
     "requests: requests 0 and 1"),
    ("rome-conflict", [G, dict(G, target_new="Paris")], ROME, EditError, "requests: requests 0 and 1"),
    ("memit-conflict", [G, G2, dict(G, target_new="Paris")], MEMIT, EditError, "requests: requests 0 and 2"),
    ("rome-mom2-empty-texts", G, dict(ROME, mom2_source=["", ""], mom2_adjustment=True), EditError, "mom2_source"),
    ("rome-lr-1e30", G, dict(ROME, lr=1e30), EditError, "lr: .*above 10"),
    ("rome-steps-true", G, dict(ROME, steps=True), EditError, "steps: expected a positive integer"),
    ("rome-layer-bool", G, dict(ROME, layer=True), EditError, "layer: expected an integer"),
    ("memit-keep_shared-bool", G, dict(MEMIT, keep_shared=True), EditError, "keep_shared: expected"),
    ("memit-chunk-float", G, dict(MEMIT, chunk=2.5), EditError, "chunk: expected a positive integer"),
    ("tp-lr-inf", G, dict(TP, lr=float("inf")), EditError, "lr: expected"),
    ("tp-lr-1e30", G, dict(TP, lr=1e30), EditError, "lr: .*above 10"),
    ("tp-steps-true", G, dict(TP, steps=True), EditError, "steps: expected a positive integer"),
    ("mend-scale-inf", G, dict(method="mend", scale=float("inf")), EditError, "scale: expected a positive"),
    ("mend-not-safetensors", G, dict(method="mend", checkpoint="<file>"), EditError, "checkpoint: .*not a safetensors"),
    ("ike-k-bool", G, dict(method="ike", k=True), EditError, "k: expected"),
    ("unknown-option", G, dict(FT, learning_rate=1e-3), EditError, "hparams: unknown option"),
]


@pytest.mark.parametrize("requests,options,error,field", [e[1:] for e in EDITS], ids=[e[0] for e in EDITS])
def test_bad_edit_names_field_and_changes_nothing(model, tok, tmp_path, requests, options, error, field):
    if options.get("checkpoint") == "<file>":
        options = dict(options, checkpoint=str(_mend_file(tmp_path)))
    saved = state(model)
    with pytest.raises(error, match=field):
        ke.edit(model, tok, requests, **options)
    assert_state(model, saved)


def test_bad_model_or_tokenizer(model, tok):
    saved = state(model)
    with pytest.raises(EditError, match="model: expected a loaded language model"):
        ke.edit(None, tok, G, **FT)
    with pytest.raises(EditError, match="tok: expected the model's tokenizer"):
        ke.edit(model, None, G, **FT)
    assert_state(model, saved)


def test_subject_longer_than_a_short_context(tok):
    """A subject within the character limit that a 128-token model cannot read: refused before any weight moves."""
    small = make_tiny("gpt2")
    saved = state(small)
    for method in ({"method": "ft", "layers": 1, "steps": 2}, dict(TP)):
        with pytest.raises(EditError, match="subject: request 0 is .* at most 128 tokens"):
            ke.edit(small, tok, dict(G, subject=" ".join(["a"] * 95)), **method)
    assert_state(small, saved)


TRACES = [
    ("tokens-str", dict(tokens=["a"]), "tokens: expected"),
    ("tokens-int", dict(tokens=5), "tokens: expected a list"),
    ("tokens-bool", dict(tokens=[True]), "tokens: expected"),
    ("samples-true", dict(samples=True), "samples: expected a positive integer"),
    ("noise-inf", dict(noise=float("inf")), "noise: expected a positive"),
    ("subject-invisible", dict(subject="\u200b"), "subject: empty"),
    ("answer-surrogate", dict(answer="\udc80"), "answer: .*surrogate"),
]


@pytest.mark.parametrize("kwargs,field", [t[1:] for t in TRACES], ids=[t[0] for t in TRACES])
def test_bad_trace(model, tok, kwargs, field):
    saved = state(model)
    args = dict(prompt="The Space Needle is located in the city of", subject="The Space Needle", samples=2)
    with pytest.raises(EditError, match=field):
        ke.causal_trace(model, tok, **dict(args, **kwargs))
    assert_state(model, saved)


def _write(root, name, filename, content):
    path = root / name / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


CF = dict(case_id=0, prompt="The Space Needle is located in the city of", subject="The Space Needle",
          target_new="Taipei", ground_truth="Seattle", rephrase_prompt="The Space Needle can be found in",
          locality_prompt="The Eiffel Tower is in", locality_ground_truth="Paris")
ZSRE = dict(subject="The Space Needle", src="Which city is The Space Needle in?", alt="Taipei", answers=["Seattle"],
            rephrase="Where is The Space Needle?", loc="nq question: who wrote hamlet?", loc_ans="Shakespeare")
LOADS = [
    ("cf-not-json", "counterfact", "{oops", {}, ValueError, "val.json is not a JSON file"),
    ("cf-object", "counterfact", {"records": [CF]}, {}, ValueError, "val.json holds a JSON dict"),
    ("cf-missing-field", "counterfact", [CF, {k: v for k, v in CF.items() if k != "subject"}], {}, ValueError,
     "val.json record 1 has no field 'subject'"),
    ("cf-record-str", "counterfact", [CF, "oops"], {}, ValueError, "val.json record 1 is malformed"),
    ("cf-bad-target", "counterfact", [dict(CF, target_new="\u200b")], {}, EditError, "record 0: target_new: empty"),
    ("cf-n-str", "counterfact", [CF], dict(n="5"), EditError, "n: expected a positive integer"),
    ("cf-n-zero", "counterfact", [CF], dict(n=0), EditError, "n: expected a positive integer"),
    ("zsre-missing-field", "zsre", [{k: v for k, v in ZSRE.items() if k != "alt"}], {}, ValueError,
     "sample.json record 0 has no field 'alt'"),
    ("zsre-not-json", "zsre", "", {}, ValueError, "sample.json is not a JSON file"),
]


@pytest.mark.parametrize("name,content,kwargs,error,field", [c[1:] for c in LOADS], ids=[c[0] for c in LOADS])
def test_bad_data_file_names_file_and_record(tmp_path, name, content, kwargs, error, field):
    _write(tmp_path, name, "val.json" if name == "counterfact" else "sample.json", content)
    load = ke.load_counterfact if name == "counterfact" else ke.load_zsre
    with pytest.raises(error, match=field):
        load(data_dir=tmp_path, **kwargs)


def test_good_data_files_still_load(tmp_path):
    _write(tmp_path, "counterfact", "val.json", [CF, dict(CF, case_id=1, subject="Big Ben", prompt="Big Ben is in")])
    _write(tmp_path, "zsre", "sample.json", [ZSRE, ZSRE])
    assert [c.meta["id"] for c in ke.load_counterfact(data_dir=tmp_path, n=np.int64(5))] == [0, 1]
    assert [c.meta["id"] for c in ke.load_zsre(data_dir=tmp_path, n=1, seed=0)] == [0]


def test_lecture_n_too_large_names_n_and_count():
    n = len(ke.load_lecture())
    with pytest.raises(ValueError, match=f"n: asked for 1000 lecture cases, but there are {n}"):
        ke.load_cases("lecture", n=1000)
    assert len(ke.load_cases("lecture", n=n)) == n
    with pytest.raises(EditError, match="n: expected a positive integer"):
        ke.load_course_facts(n=True)


def test_load_model_bad_device_and_empty_directory(tmp_path):
    with pytest.raises(ValueError, match="device: 'nope' is not a device"):
        ke.load_model(device="nope")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device: 'cuda' is not available"):
            ke.load_model(device="cuda")
    with pytest.raises(OSError, match="model: could not load .* no config.json"):
        ke.load_model(str(tmp_path))


EVALS = [
    ("empty-dict", {}, {}, "prompt: missing"),
    ("probe-empty-prompt", "para-empty", {}, r"paraphrase\[0\].prompt: empty"),
    ("probe-int", "para-int", {}, r"paraphrase\[0\]: expected a Probe"),
    ("probe-triple", "para-triple", {}, r"paraphrase\[0\]: expected a Probe"),
    ("probes-not-list", "para-str", {}, "paraphrase: expected a list"),
    ("before-without-locality", "with-locality", dict(before="no-locality"), "before: it has no locality scores"),
]


def _case(kind):
    if not isinstance(kind, str):
        return kind
    req = ke.EditRequest(**G)
    return {"para-empty": ke.EditCase(req, paraphrase=[ke.Probe("", "Taipei")]),
            "para-int": ke.EditCase(req, paraphrase=[3]),
            "para-triple": ke.EditCase(req, paraphrase=[("a", "b", "c")]),
            "para-str": ke.EditCase(req, paraphrase="The Space Needle can be found in"),
            "with-locality": ke.EditCase(req, locality=[ke.Probe("The Eiffel Tower is in", "Paris")]),
            "no-locality": ke.EditCase(req)}[kind]


@pytest.mark.parametrize("case,kwargs,field", [e[1:] for e in EVALS], ids=[e[0] for e in EVALS])
def test_bad_evaluate(model, tok, case, kwargs, field):
    saved = state(model)
    if kwargs.get("before") == "no-locality":
        kwargs = dict(before=ke.evaluate(model, tok, _case("no-locality"), generation=False))
    with pytest.raises(EditError, match=field):
        ke.evaluate(model, tok, _case(case), generation=False, **kwargs)
    assert_state(model, saved)


def test_probes_as_pairs_are_read_like_probes(model, tok):
    req = ke.EditRequest(**G)
    pairs = ke.evaluate(model, tok, ke.EditCase(req, paraphrase=[("The Space Needle can be found in", "Taipei")]),
                        generation=False)
    probes = ke.evaluate(model, tok, ke.EditCase(req, paraphrase=[ke.Probe("The Space Needle can be found in",
                                                                           "Taipei")]), generation=False)
    assert pairs["paraphrase"] == probes["paraphrase"]


@pytest.mark.parametrize("argv,flag", [(["--device", "nope"], "--device: 'nope' is not a device"),
                                       (["--hparams", '{"nope": 1}'], "--hparams: hparams: unknown option")])
def test_bench_usage_errors_without_traceback(capsys, argv, flag):
    from kedit_lite import bench
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--method", "ft", "--data", "lecture", "--n", "1"] + argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and flag in err and "Traceback" not in err


def test_edit_lab_shows_the_library_message(model, tok):
    pytest.importorskip("ipywidgets")
    from kedit_lite.widgets import EditLab
    lab = EditLab(model, tok, methods=["ft"])
    lab.prompt.value, lab.subject.value, lab.target.value = G["prompt"], G["subject"], "Taip\udc80ei"
    saved = state(model)
    assert lab.apply() is None
    assert "target_new: contains an unpaired surrogate" in lab.status.value
    assert_state(model, saved)


# ---------------------------------------------------------------- once refused, now accepted


def test_numpy_integers_are_integers(model, tok):
    """layer / layers / steps as numpy integers give the very same edit as Python ints."""
    for options, numpy_options in ((dict(ROME), dict(ROME, layer=np.int64(1), steps=np.int32(3))),
                                   (dict(FT), dict(FT, layers=np.int64(1), steps=np.int64(2)))):
        saved = state(model)
        a = ke.edit(model, tok, G, **options)
        after_int = {k: v.clone() for k, v in model.state_dict().items()}
        a.undo()
        b = ke.edit(model, tok, G, **numpy_options)
        assert all(torch.equal(v, after_int[k]) for k, v in model.state_dict().items())
        b.undo()
        assert_state(model, saved)


def test_rome_default_layer_on_an_unnamed_tiny_gpt2(tok):
    """The table's 'gpt2' entry (layer 5 of 12) is for the real GPT-2, not any model whose type is gpt2."""
    small = make_tiny("gpt2")
    result = ke.edit(small, tok, G, method="rome", steps=2, n_prefixes=0, wordings=(), mom2_adjustment=False)
    assert result.touched == ["transformer.h.0.mlp.c_proj.weight"]
    result.undo()


# ---------------------------------------------------------------- requires_grad and .grad


@pytest.mark.parametrize("options", [FT, ROME, TP, dict(method="mend")], ids=["ft", "rome", "t-patcher", "mend"])
def test_edit_and_undo_keep_requires_grad_and_grad(tok, options):
    m = make_tiny("llama")
    for p in m.parameters():
        p.requires_grad_(True)
    target = m.model.layers[1].mlp.down_proj.weight
    target.grad = torch.ones_like(target)
    if options["method"] == "mend":
        options = dict(options, checkpoint=mend.MENDEditor.for_model(m, n_layers=2, rank=8, lr_init=1e-3))
    saved = state(m)
    result = ke.edit(m, tok, G, **options)
    assert all(p.requires_grad for p in m.parameters())
    assert torch.equal(target.grad, torch.ones_like(target)) and sum(p.grad is not None for p in m.parameters()) == 1
    result.undo()
    assert_state(m, saved)


# ---------------------------------------------------------------- undo order


def _edits(m, tok, editor):
    return {"rome1": lambda: ke.edit(m, tok, G, **ROME),
            "rome1b": lambda: ke.edit(m, tok, G2, **ROME),
            "ft1": lambda: ke.edit(m, tok, G2, **FT),
            "ft2": lambda: ke.edit(m, tok, G, **dict(FT, layers=2)),
            "rome0": lambda: ke.edit(m, tok, G2, **dict(ROME, layer=0)),
            "mend": lambda: ke.edit(m, tok, G, method="mend", checkpoint=editor),
            "mend2": lambda: ke.edit(m, tok, G2, method="mend", checkpoint=editor),
            "tp": lambda: ke.edit(m, tok, G2, **TP),
            "ike": lambda: ke.edit(m, tok, G, method="ike", k=0)}


@pytest.fixture
def stack(model, tok):
    editor = mend.MENDEditor.for_model(model, n_layers=2, rank=8, lr_init=1e-3)
    return model, _edits(model, tok, editor)


@pytest.mark.parametrize("first,second,blocked", [
    ("rome1", "ft1", True), ("rome1", "rome1b", True), ("mend", "mend2", True), ("mend", "rome1", True),
    ("rome0", "ft2", False), ("rome1", "tp", False), ("tp", "rome1", False), ("ike", "ft1", False),
    ("ft1", "ike", False)])
def test_stacked_undo_in_wrong_order(stack, first, second, blocked):
    """Undoing the older edit first is exact when the later one touched other weights, else refused unchanged."""
    m, edits = stack
    original = state(m)
    a = edits[first]()
    after_a = {k: v.clone() for k, v in m.state_dict().items()}
    b = edits[second]()
    after_both = state(m)
    if blocked:
        with pytest.raises(EditError, match=f"undo: edit #{a._serial} .* undo them first.*edit #{b._serial} "
                                            f"\\({b.method}"):
            a.undo()
        assert_state(m, after_both)
        assert not a.undone
        b.undo()
        assert all(torch.equal(v, after_a[k]) for k, v in m.state_dict().items())
        a.undo()
    else:
        a.undo()
        now = m.state_dict()
        assert all(torch.equal(now[n], original[0][n]) for n in a.touched)       # A's weights exactly as before A
        assert all(torch.equal(now[n], after_both[0][n]) for n in b.touched)     # B's change kept
        b.undo()
    assert_state(m, original)


def test_dropped_later_edit_blocks_undo(stack):
    m, edits = stack
    original = state(m)
    a = edits["rome1"]()
    edits["ft1"]()   # result dropped: its change can never be undone, so A's cannot either
    after_both = state(m)
    with pytest.raises(EditError, match="no longer referenced"):
        a.undo()
    assert_state(m, after_both)
    m.load_state_dict(original[0])


def test_random_stacks_undo_exactly(stack):
    """Random edits, undone in random order: each undo is exact or refused with the model unchanged."""
    m, edits = stack
    original = state(m)
    rng = random.Random(0)
    names = ["rome1", "ft1", "ft2", "tp", "ike", "mend"]
    for _ in range(3):
        live = [edits[n]() for n in rng.sample(names, 4)]
        while live:
            pick = rng.choice(live)
            before = state(m)
            try:
                pick.undo()
                live.remove(pick)
            except EditError:
                assert_state(m, before)
        assert_state(m, original)
