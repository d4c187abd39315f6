"""The benchmark harness (kedit_lite.bench) and the committed results chapter 9 reads."""
import json
import shlex
from pathlib import Path

import pytest

from kedit_lite import bench
from kedit_lite.editing import METHODS

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = sorted((ROOT / "book" / "results").glob("*.json"))
META = ("schema", "command", "date", "model", "data", "split", "n", "platform", "cpu_count", "torch_threads",
        "torch", "device", "methods")
RESULT = ("method", "n", "batch_size", "n_edits", "how", "changes_weights", "adds_modules", "uses_context",
          "before", "after", "median_seconds_per_edit", "seconds_per_request", "seconds_per_edit",
          "eval_seconds_per_query", "peak_memory_mb", "per_case")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """FT (3 steps) and IKE (the fact alone, no demonstrations) on two lecture cases, teacher-forced only."""
    out = tmp_path_factory.mktemp("bench") / "r.json"
    argv = ["--method", "ft", "--method", "ike", "--data", "lecture", "--n", "2", "--no-generation",
            "--hparams", '{"ft": {"steps": 3}, "ike": {"k": 0}}', "--json", str(out), "--markdown"]
    results = bench.main(argv)
    return results, json.loads(out.read_text(encoding="utf-8")), argv


def check_layout(data):
    """Fields chapter 9 needs are present and agree with each other."""
    meta = data["meta"]
    for key in META:
        assert key in meta, f"meta lacks {key}"
    assert meta["schema"] == bench.SCHEMA and meta["command"].startswith("python -m kedit_lite.bench")
    assert [r["method"] for r in data["results"]] == meta["methods"]
    for r in data["results"]:
        for key in RESULT:
            assert key in r, f"{r['method']} lacks {key}"
        assert r["n"] == meta["n"] == len(r["per_case"])
        assert r["n_edits"] == len(r["seconds_per_edit"]) == -(-r["n"] // r["batch_size"])
        assert r["median_seconds_per_edit"] > 0 and r["eval_seconds_per_query"] > 0
        for key, value in r["after"].items():
            assert 0.0 <= value <= 1.0, f"{r['method']} {key}={value}"


def test_json_fields_are_present_and_consistent(tiny_run):
    results, data, argv = tiny_run
    check_layout(data)
    assert data["meta"]["n"] == 2 and data["meta"]["generation"] is False
    assert data["meta"]["command"] == "python -m kedit_lite.bench " + shlex.join(argv)
    by = {r["method"]: r for r in data["results"]}
    assert by["ft"]["changes_weights"] and by["ft"]["touched_parameters"] > 0
    assert not by["ike"]["changes_weights"] and by["ike"]["uses_context"]
    assert by["ft"]["batch_size"] == by["ike"]["batch_size"] == 1
    assert [c["id"] for c in by["ft"]["per_case"]] == [c["id"] for c in by["ike"]["per_case"]]
    assert results[0]["method"] == "ft" and "reliability.gen" not in by["ft"]["after"]


def test_markdown_table_printed(tiny_run, capsys):
    results, _, _ = tiny_run
    text = bench.format_table(results, markdown=True)
    lines = text.splitlines()
    assert lines[0] == "| metric | ft | ike |" and lines[1] == "|---|--:|--:|"
    assert all(line.startswith("| ") and line.count("|") == 4 for line in lines[2:])
    assert any(line.startswith("| changes weights | yes | no |") for line in lines)


def test_plain_table_aligned():
    fake = [{"method": m, "n": 4, "batch_size": b, "after": {"reliability.token_acc": 0.5, "locality.gen": 1.0},
             "median_seconds_per_edit": 1.25, "peak_memory_mb": 3.0} for m, b in (("ft", 1), ("memit", 4))]
    lines = bench.format_table(fake).splitlines()
    assert lines[0].split() == ["metric", "ft", "memit"] and len({len(line) for line in lines}) == 1
    assert "edits x batch" in lines[-1] and lines[-1].split()[-2:] == ["4x1", "1x4"]


def test_default_batch_and_hparams():
    assert bench.default_batch_size("memit", 50) == 50 and bench.default_batch_size("rome", 50) == 1
    assert bench.hparams_for("ft", {"ft": {"steps": 3}}) == {"steps": 3} and bench.hparams_for("mend", {"ft": {}}) == {}
    assert bench.hparams_for("rome", {"steps": 3}) == {"steps": 3}


@pytest.mark.parametrize("argv, message", [
    (["--method", "nope"], "unknown method 'nope'"),
    (["--n", "0"], "--n: expected a positive number"),
    (["--hparams", "{oops"], "--hparams: not valid JSON"),
    (["--hparams", "[1]"], "--hparams: expected a JSON object"),
    (["--batch-size", "0"], "--batch-size: expected a positive integer"),
    (["--threads", "0"], "--threads: expected a positive integer"),
    (["--method", "ft+ours"], "'ft' has no options of ours"),
])
def test_bad_arguments_error_clearly(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert message in capsys.readouterr().err


def test_ours_is_the_paper_method_with_the_modules_improved_options():
    from kedit_lite import memit, rome
    assert bench.method_and_options("rome+ours") == ("rome", rome.IMPROVED)
    assert bench.method_and_options("memit+ours", {"layers": [3]}) == ("memit", {**memit.IMPROVED, "layers": [3]})
    assert bench.method_and_options("rome", {"lr": 0.1}) == ("rome", {"lr": 0.1})   # the paper's, untouched
    assert set(bench.variants()) == {"rome+ours", "memit+ours", "t-patcher+ours"}
    assert bench.hparams_for("rome+ours", {"rome+ours": {"steps": 3}, "rome": {}}) == {"steps": 3}


def test_committed_results_cover_every_method():
    names = {p.name for p in COMMITTED}
    assert {"counterfact_val.json", "lecture.json"} <= names, f"book/results holds only {sorted(names)}"
    for path in COMMITTED:
        data = bench.load_results(path.name)
        check_layout(data)
        missing = sorted(set(METHODS) - set(data["meta"]["methods"]))
        assert not missing and not data["meta"]["failed"], f"{path.name}: no results for {missing}; rerun " \
                                                          f"{data['meta']['command']}"
    assert "portability.token_acc" in bench.load_results("lecture.json")["results"][0]["after"]


def test_load_results_names_the_problem(tmp_path):
    (tmp_path / "old.json").write_text('{"meta": {"schema": 1}, "results": []}')
    with pytest.raises(ValueError, match="schema 1"):
        bench.load_results("old.json", results_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="results_dir: .*missing.json does not exist"):
        bench.load_results("missing.json", results_dir=tmp_path)


def _run(method, scores, ids=None):
    """A run_method-like result whose cases score `scores` on paraphrase token accuracy."""
    ids = ids or list(range(len(scores)))
    return {"method": method, "per_case": [{"id": i, "paraphrase": {"token_acc": s}} for i, s in zip(ids, scores)]}


def test_paired_difference_is_the_standard_error_of_the_per_case_differences():
    a, b = _run("a", [1.0, 1.0, 0.5, 0.0, 1.0]), _run("b", [1.0, 0.0, 0.5, 0.0, 0.0])
    got = bench.paired_difference(a, b, "paraphrase.token_acc")
    diffs = [0.0, 1.0, 0.0, 0.0, 1.0]
    mean = sum(diffs) / 5
    assert got["difference"] == pytest.approx(0.4)
    assert got["standard_error"] == pytest.approx((sum((d - mean) ** 2 for d in diffs) / 4 / 5) ** 0.5)
    assert got["cases_differ"] == 2 and got["n"] == 5
    # a constant gap over every case has no spread, so no error
    assert bench.paired_difference(_run("a", [1.0] * 4), _run("b", [0.5] * 4))["standard_error"] == 0


def test_paired_difference_bad_input_names_the_field():
    a = _run("a", [1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="b: its 3 cases are not a.s 3 in the same order"):
        bench.paired_difference(a, _run("b", [1.0, 0.0, 1.0], ids=[0, 1, 5]))
    with pytest.raises(ValueError, match="score: expected 'kind.mode'"):
        bench.paired_difference(a, a, "paraphrase")
    with pytest.raises(ValueError, match="score: 'locality.token_acc' was not measured"):
        bench.paired_difference(a, a, "locality.token_acc")
    with pytest.raises(ValueError, match="a: a standard error needs 2"):
        bench.paired_difference(_run("a", [1.0]), _run("b", [0.0]))


def test_paired_difference_on_the_committed_runs():
    """ROME beats FT-L on paraphrase by many standard errors in chapter 9's file (the chapter says so)."""
    by = {r["method"]: r for r in bench.load_results("counterfact_val.json")["results"]}
    got = bench.paired_difference(by["rome"], by["ft"], "paraphrase.token_acc")
    assert got["difference"] > 3 * got["standard_error"] > 0


def test_bench_runs_offline_on_the_course_facts(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_DATA_DIR", str(tmp_path))   # no CounterFact reachable: the shipped facts suffice
    monkeypatch.setenv("KEDIT_OFFLINE", "1")
    out = tmp_path / "course.json"
    bench.main(["--method", "ike", "--data", "course", "--n", "2", "--no-generation", "--hparams", '{"k": 0}',
                "--json", str(out)])
    data = json.loads(out.read_text(encoding="utf-8"))
    check_layout(data)
    assert data["meta"]["data"] == "course" and data["meta"]["n"] == 2


def test_update_replaces_only_the_rerun_rows_and_records_the_rerun(tiny_run, tmp_path):
    _, data, _ = tiny_run
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    ike_before = data["results"][1]
    bench.main(["--method", "ft", "--data", "lecture", "--n", "2", "--no-generation",
                "--hparams", '{"steps": 2}', "--update", str(path)])
    new = json.loads(path.read_text(encoding="utf-8"))
    check_layout(new)
    assert new["meta"]["methods"] == ["ft", "ike"] and new["results"][1] == ike_before
    assert new["results"][0]["seconds_per_edit"] != data["results"][0]["seconds_per_edit"]
    (rerun,) = new["meta"]["reruns"]
    assert rerun["methods"] == ["ft"] and "--update" in rerun["command"]
    assert new["meta"]["command"] == data["meta"]["command"]


def test_update_refuses_a_file_of_other_cases(tiny_run, tmp_path, capsys):
    _, data, _ = tiny_run
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(SystemExit):
        bench.main(["--method", "ft", "--data", "lecture", "--n", "3", "--no-generation", "--update", str(path)])
    err = capsys.readouterr().err
    assert "--update" in err and "has n=2" in err
    assert json.loads(path.read_text(encoding="utf-8")) == data
