"""Self-check quizzes: every chapter has one, well formed, gradable, and displayable with and without widgets."""
import pytest

from kedit_lite import quiz
from kedit_lite.checks import EditError

CHAPTERS = [f"ch{i}" for i in range(1, 10)]


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_every_chapter_has_three_to_five_questions(chapter):
    questions = quiz.load(chapter)
    assert 3 <= len(questions) <= 5
    assert all(q.why and len(set(q.options)) == len(q.options) for q in questions)


def test_grade_names_right_wrong_and_unanswered():
    qs = quiz.load("ch5")
    right, wrong = qs[0].answer, (qs[0].answer + 1) % len(qs[0].options)
    results = quiz.grade(qs[:3], [right, wrong, None])
    assert [ok for ok, _ in results] == [True, False, False]
    assert results[1][1].startswith("not quite") and results[2][1] == "not answered yet"


def test_static_form_folds_every_answer():
    qs = quiz.load("ch2")
    page = quiz.as_html(qs)
    assert page.count("<details>") == len(qs) and page.count("<li>") == sum(len(q.options) for q in qs)


def test_widget_checks_the_choices():
    q = quiz.show("ch1")
    bundle = q._repr_mimebundle_()
    assert "text/html" in bundle and "application/vnd.jupyter.widget-view+json" in bundle
    for radio, question in zip(q.radios, q.questions):
        radio.value = question.answer
    q.check()
    assert "4 of 4 right" in q._widget.children[-1].children[1].value


def test_bad_quiz_data_is_refused():
    with pytest.raises(EditError, match="answer index"):
        quiz.Question("q", ("a", "b"), 2, "why")
    with pytest.raises(EditError, match="chapter"):
        quiz.load("ch99")
