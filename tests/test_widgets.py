"""The Edit Lab, driven like a user would: set fields, click buttons."""
import pytest

import kedit_lite as ke
from kedit_lite import widgets
from kedit_lite.requests import EditError
from tests.conftest import assert_same_weights, snapshot


def test_parse_and_format_probes_round_trip():
    case = ke.lecture_case("space-needle-taipei")
    parsed = widgets.parse_probes(widgets.format_probes(case))
    assert [p.prompt for p in parsed["locality"]] == [p.prompt for p in case.locality]
    with pytest.raises(EditError, match="probes: line 1"):
        widgets.parse_probes("locality | no answer")
    with pytest.raises(EditError, match="unknown kind 'sideways'"):
        widgets.parse_probes("sideways | a | b")


@pytest.fixture()
def lab(smol):
    model, tok = smol
    lab = widgets.EditLab(model, tok, case=ke.lecture_case("space-needle-taipei"), methods=["ft"])
    lab.probes.value = "paraphrase | The Space Needle can be found in the city of | Taipei\n" \
                       "locality | The Eiffel Tower is located in the city of | Paris"
    return lab


def test_apply_then_undo(lab, smol):
    model, _ = smol
    saved = snapshot(model)
    lab.apply_button.click()
    assert "Applied ft" in lab.status.value, lab.status.value
    assert lab.after["reliability"]["gen"] == 1.0 and lab.before["reliability"]["gen"] == 0.0
    assert "Taipei" in lab.table.value and not lab.undo_button.disabled
    lab.undo_button.click()
    assert "Undone" in lab.status.value and lab.undo_button.disabled
    assert_same_weights(model, saved)


def test_bad_input_shows_message_weights_unchanged(lab, smol):
    model, _ = smol
    saved = snapshot(model)
    lab.prompt.value = "The tower is located in the city of"
    lab.apply_button.click()
    assert "Not applied" in lab.status.value and "subject" in lab.status.value
    lab.prompt.value, lab.target.value = "{} is located in the city of", ""
    lab.apply_button.click()
    assert "target_new: empty" in lab.status.value
    assert lab.result is None
    assert_same_weights(model, saved)


def test_user_text_is_escaped(lab, smol):
    model, _ = smol
    saved = snapshot(model)
    lab.prompt.value = "The tower is located in the city of"
    lab.subject.value = "<script>alert(1)</script>"
    lab.apply_button.click()
    assert "Not applied" in lab.status.value
    assert "<script>" not in lab.status.value and "&lt;script&gt;" in lab.status.value
    lab.subject.value, lab.prompt.value = "The Space Needle", "{} is located in the city of"
    lab.probes.value = "paraphrase | <script>alert(2)</script> The Space Needle is in | <script>"
    lab.apply_button.click()
    assert "<script>" not in lab.table.value and "&lt;script&gt;" in lab.table.value
    lab.undo_button.click()
    assert_same_weights(model, saved)


def test_compare_methods_view(lab, smol):
    model, _ = smol
    saved = snapshot(model)
    frame = lab.compare()
    assert list(frame.index) == ["(before)", "ft"] and frame.loc["ft", "reliability"] == 1.0
    assert "ft" in lab.table.value
    assert_same_weights(model, saved)


def test_edit_lab_has_edit_and_trace_tabs(smol):
    lab = ke.edit_lab(*smol, case=ke.lecture_case("space-needle-taipei"), methods=["ft"])
    assert lab.tabs.titles == ("Edit", "Causal trace") and lab.subject.value == "The Space Needle"
