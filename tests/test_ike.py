"""IKE (chapter 3): demonstration construction, retrieval, context-window handling, bad input, weights untouched."""
from types import SimpleNamespace

import pytest

import kedit_lite as ke
from kedit_lite import ike, retrieval
from kedit_lite.caches import Cache
from kedit_lite.requests import EditCase, EditRequest, Probe
from tests.conftest import assert_same_weights, make_tiny, snapshot

SPACE_NEEDLE = EditRequest("{} is located in the city of", "The Space Needle", "Taipei", "Seattle")


def _case(subject, prompt, new, para, loc, loc_answer):
    return EditCase(EditRequest(prompt, subject, new), paraphrase=[Probe(para, new)] if para else [],
                    locality=[Probe(loc, loc_answer)] if loc else [])


# A small pool: three towers, and facts about other things that should rank below them.
POOL = [
    _case("The Eiffel Tower", "{} is located in the city of", "Rome", "The Eiffel Tower stands in",
          "The Louvre is located in the city of", "Paris"),
    _case("The CN Tower", "{} is located in the city of", "Berlin", "The CN Tower can be found in",
          "Niagara Falls is located in the country of", "Canada"),
    _case("Tokyo Tower", "{} is located in the city of", "Madrid", "Tokyo Tower stands in",
          "Mount Fuji is located in the country of", "Japan"),
    _case("Lionel Messi", "{} plays the sport of", "tennis", "Lionel Messi is a professional",
          "Cristiano Ronaldo plays the sport of", "football"),
    _case("Sushi", "{} is a dish from the country of", "Mexico", None,
          "Pizza is a dish from the country of", "Italy"),
    _case("Python", "{} was created by", "Linus Torvalds", "The programming language Python was designed by",
          None, None),
    _case("The Space Needle", "{} is located in the city of", "Paris", "The Space Needle stands in",
          "Pike Place Market is in the city of", "Seattle"),
]


@pytest.fixture(scope="module")
def pool():
    return ike.resolve_pool(POOL)


def test_demo_counts_follow_the_mix():
    assert ike.demo_counts(32) == {"copy": 4, "update": 12, "retain": 16}   # the paper's split
    assert ike.demo_counts(8) == {"copy": 1, "update": 3, "retain": 4}
    assert ike.demo_counts(0) == {"copy": 0, "update": 0, "retain": 0}
    assert ike.demo_counts(5, {"update": 1, "retain": 1}) == {"copy": 0, "update": 3, "retain": 2}
    assert ike.demo_counts(6, (1, 1, 1)) == {"copy": 2, "update": 2, "retain": 2}
    assert sum(ike.demo_counts(7).values()) == 7


def test_demonstration_format():
    rec = ike.PoolRecord("The Eiffel Tower", "The Eiffel Tower is located in the city of", "Rome",
                         "The Eiffel Tower stands in", "The Louvre is located in the city of", "Paris")
    fact = "New Fact: The Eiffel Tower is located in the city of Rome\n"
    assert ike.format_demo(rec, "copy") == fact + "Prompt: The Eiffel Tower is located in the city of Rome\n\n"
    assert ike.format_demo(rec, "update") == fact + "Prompt: The Eiffel Tower stands in Rome\n\n"
    assert ike.format_demo(rec, "retain") == fact + "Prompt: The Louvre is located in the city of Paris\n\n"
    two = [SPACE_NEEDLE, EditRequest("{} is located in the city of", "The Colosseum", "London")]
    assert ike.new_fact_line(two) == ("New Fact: The Space Needle is located in the city of Taipei. "
                                      "The Colosseum is located in the city of London")


def test_clean_prompt_removes_counterfact_noise():
    noisy = "Yverdon 1781st\n Le développement de la raison . Beijing Airport, named after"
    assert ike.clean_prompt(noisy, "Beijing Airport") == "Beijing Airport, named after"
    assert ike.clean_prompt("What is the twin city of Oslo? It is", "Oslo") == "What is the twin city of Oslo? It is"


def test_retrieval_ranks_similar_facts_first(pool):
    _, records, emb = pool
    assert emb.shape == (len(POOL), 384)
    assert abs(float(emb[0].norm()) - 1.0) < 1e-4
    query = retrieval.embed("The Sky Tower is located in the city of Auckland")
    order, scores = retrieval.nearest(query, emb, 3)
    assert {records[i].subject for i in order} <= {"The Eiffel Tower", "The CN Tower", "Tokyo Tower",
                                                   "The Space Needle"}
    assert scores == sorted(scores, reverse=True)
    # Cached on disk by content: a second call returns the same tensor without recomputing.
    again = retrieval.cached_embed([r.fact for r in records])
    assert (again == emb).all()


def test_select_demos_kinds_order_and_own_record_excluded(pool):
    _, records, emb = pool
    demos = ike.select_demos([SPACE_NEEDLE], records, emb, k=4, mix=(1, 1, 2), seed=0)
    kinds = sorted(d["kind"] for d in demos)
    assert kinds == ["copy", "retain", "retain", "update"]
    assert all(d["record"].subject != "The Space Needle" for d in demos)   # the edit's own subject never shows
    sims = [d["similarity"] for d in demos]
    assert sims[-1] == max(sims)                                          # nearest demonstration last
    for d in demos:
        assert d["record"].supports(d["kind"])
    # Sushi has no paraphrase, Python no neighbour: they cannot fill those slots.
    many = ike.select_demos([SPACE_NEEDLE], records, emb, k=6, mix=(0, 1, 0))
    assert "Sushi" not in {d["record"].subject for d in many} and len(many) == 5
    assert ike.select_demos([SPACE_NEEDLE], records, emb, k=0) == []


@pytest.fixture(scope="module")
def tiny_llama():
    return make_tiny("llama")


def test_context_window_drops_demos_then_errors(tiny_llama, tok, pool):
    model = tiny_llama
    saved = snapshot(model)
    full = ke.edit(model, tok, SPACE_NEEDLE, method="ike", k=6, mix=(1, 1, 1), pool=POOL, reserve_tokens=16)
    assert full.info["dropped"] == 0 and full.touched == []
    n_full = full.info["context_tokens"]
    window = model.config.max_position_embeddings
    try:
        model.config.max_position_embeddings = n_full - 20 + 16   # room for about half the demonstrations
        small = ke.edit(model, tok, SPACE_NEEDLE, method="ike", k=6, mix=(1, 1, 1), pool=POOL, reserve_tokens=16)
        assert 0 < small.info["dropped"] < 6
        assert small.info["context_tokens"] <= small.info["budget_tokens"] == n_full - 20
        assert small.info["counts"]["copy"] == full.info["counts"]["copy"] == 2   # copy demonstrations go last
        assert small.context.endswith("New Fact: The Space Needle is located in the city of Taipei\nPrompt: ")
        model.config.max_position_embeddings = 20                    # not even the new fact fits
        with pytest.raises(ke.EditError, match="reserve_tokens"):
            ke.edit(model, tok, SPACE_NEEDLE, method="ike", k=6, pool=POOL, reserve_tokens=16)
    finally:
        model.config.max_position_embeddings = window
    assert_same_weights(model, saved)


def test_fit_to_window_never_cuts_the_question(tok, pool):
    _, records, emb = pool
    demos = ike.select_demos([SPACE_NEEDLE], records, emb, k=6, mix=(1, 1, 1))
    fake = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=10**6))
    kept, budget, length = ike.fit_to_window(fake, tok, [SPACE_NEEDLE], demos, False, 100)
    assert kept == demos and budget == 10**6 - 100


@pytest.mark.parametrize("hparams, field", [
    ({"k": -1}, "k"), ({"k": 2.5}, "k"), ({"k": True}, "k"), ({"mix": "balanced"}, "mix"),
    ({"mix": {"copy": 1, "paraphrase": 2}}, "mix"), ({"mix": (1, 2)}, "mix"), ({"mix": (0, 0, 0)}, "mix"),
    ({"mix": {"retain": -1}}, "mix"), ({"chat": "yes"}, "chat"), ({"reserve_tokens": 0}, "reserve_tokens"),
    ({"pool": "wikipedia"}, "pool"), ({"pool": []}, "pool"), ({"pool": [1, 2]}, "pool"), ({"seed": "0"}, "seed"),
    ({"temperature": 1.0}, "hparams"),
])
def test_bad_hparams_raise_clear_errors(tiny_llama, tok, hparams, field):
    saved = snapshot(tiny_llama)
    with pytest.raises(ke.EditError, match=field):
        ke.edit(tiny_llama, tok, SPACE_NEEDLE, method="ike", **hparams)
    assert_same_weights(tiny_llama, saved)


def test_chat_needs_a_chat_template(tiny_llama, tok):
    plain = SimpleNamespace(chat_template=None)
    with pytest.raises(ke.EditError, match="chat"):
        ike.build_context(plain, [SPACE_NEEDLE], [], chat=True)


def test_ike_on_smollm2_changes_answers_not_weights(smol):
    model, tok = smol
    case = ke.lecture_case("space-needle-taipei")
    saved = snapshot(model)
    before = ke.evaluate(model, tok, case.request)
    assert before["reliability"]["gen"] == 0.0                      # it says New York, not Taipei
    # k=0: the context is the new fact alone, which this small model copies (chapter 3 measures demonstrations).
    res = ke.edit(model, tok, case.request, method="ike", k=0)
    assert res.touched == [] and res.info["counts"] == {"copy": 0, "update": 0, "retain": 0}
    assert res.context == "New Fact: The Space Needle is located in the city of Taipei\nPrompt: "
    after = res.evaluate(model, tok, case.request)
    assert after["reliability"]["gen"] == 1.0 and after["reliability"]["prob_wins"] == 1.0
    # evaluate() really reads context + prompt: the same call without the context gives the old answer back.
    assert ke.evaluate(model, tok, case.request)["reliability"]["gen"] == 0.0
    res.undo()
    assert res.context == "" and res.undone
    assert_same_weights(model, saved)
    demo = ke.edit(model, tok, case.request, method="ike", k=2, pool=POOL)
    assert demo.info["counts"] == {"copy": 0, "update": 1, "retain": 1} and demo.context.startswith("New Fact: ")
    assert demo.context.count("New Fact: ") == 3 and demo.touched == []
    chat = ke.edit(model, tok, case.request, method="ike", k=2, pool=POOL, chat=True)
    assert chat.context.startswith("<|im_start|>system\n") and chat.context.endswith("assistant\nPrompt: ")
    assert "New Fact: The Space Needle is located in the city of Taipei<|im_end|>" in chat.context
    assert_same_weights(model, saved)


def test_default_pool_falls_back_to_the_course_facts_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KEDIT_OFFLINE", "1")
    monkeypatch.setattr(ike, "_POOLS", Cache("test: empty ike pools"))           # nothing loaded earlier in this process
    name, records, emb = ike.resolve_pool(None)
    assert name == "course" and len(records) == len(ke.load_course_facts("train")) == emb.shape[0]
    assert all(r.paraphrase and r.neighbour and r.neighbour_answer for r in records)
