"""The benchmark suite: runs end to end on tiny cases, its JSON matches the schema, CSV,
Markdown, --compare. No timing is asserted (speed is what the suite reports, not tests)."""

import copy
import csv
import json

import numpy as np
import pytest

import attnext
from attnext.__main__ import main
from attnext.bench import SCHEMA, SchemaError, run_suite, validate
from attnext.bench import cases as bench_cases
from attnext.bench import machine, report


@pytest.fixture
def keep_threads():
    """Benchmarks set thread counts process-wide: put them back afterwards."""
    before = attnext.get_num_threads()
    try:
        import torch
        torch_before = torch.get_num_threads()
    except ImportError:
        torch = None
    yield
    attnext.set_num_threads(before)
    if torch is not None:
        torch.set_num_threads(torch_before)


@pytest.fixture(scope="module")
def tiny_doc(tmp_path_factory):
    """One full run of the hidden tiny suite through the command line, probes included."""
    d = tmp_path_factory.mktemp("bench")
    paths = {k: str(d / f"r.{k}") for k in ("json", "csv", "md")}
    before = attnext.get_num_threads()
    rc = main(["bench", "--suite", "tiny", "--quiet", "--json", paths["json"], "--csv", paths["csv"],
               "--markdown", paths["md"]])
    attnext.set_num_threads(before)
    assert rc == 0
    with open(paths["json"], encoding="utf-8") as f:
        return json.load(f), paths


def test_json_validates_against_the_schema(tiny_doc):
    doc, _ = tiny_doc
    validate(doc)
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(doc, SCHEMA)


def test_every_case_and_contender_is_reported(tiny_doc):
    doc, _ = tiny_doc
    names = [c["name"] for c in doc["cases"]]
    assert names == [c.name for c in bench_cases.select("tiny")]
    for case in doc["cases"]:
        assert set(case["results"]) == set(bench_cases.CONTENDERS)
        for cname, res in case["results"].items():
            # inaccurate: a peer outside the case's tolerance (OpenVINO's default is bfloat16 on
            # CPUs with AVX512_BF16), reported and not timed
            allowed = ("ok", "skipped", "inaccurate") if cname in bench_cases.PEERS else ("ok", "skipped")
            assert res["status"] in allowed, (case["name"], cname, res)
            if res["status"] == "ok":
                assert res["min_s"] <= res["q1_s"] <= res["median_s"] <= res["q3_s"] <= res["max_s"]
                assert len(res["times_s"]) == res["repeats"]
                assert res["rate"] == pytest.approx(case["work"] / res["median_s"] / 1e9)
            else:
                assert res["reason"]
        ok = [c for c, r in case["results"].items() if r["status"] == "ok"]
        assert set(case["ratios"]) == {f"{a}_vs_{b}" for a in ok for b in ok if a != b}
    assert doc["machine"]["threads"]["attnext"] >= 1
    assert doc["peak"]["peak_gflops_float32"] > 0 and doc["peak"]["peak_read_gbs"] > 0


def test_memory_bound_fractions_use_the_larger_of_two_read_probes(tiny_doc):
    doc, _ = tiny_doc
    seen = 0
    for case in doc["cases"]:
        if case["metric"] != "GB/s" or case["results"]["attnext"]["status"] != "ok":
            assert "read_probe" not in case
            continue
        probe = case["read_probe"]
        assert probe["at_start"] == doc["peak"][probe["level"]] and probe["after_case"] > 0
        assert probe["set_bytes"] >= 1  # the case's working set (test_l5_bench_peers checks the choice)
        res = case["results"]["attnext"]
        raw = res["rate"] / max(probe["at_start"], probe["after_case"])
        assert res["fraction_of_peak"] == pytest.approx(min(raw, 1.0))
        seen += 1
    assert seen >= 3  # the decode, KV-cache and softmax cases


def test_contenders_agree_on_the_same_inputs(tiny_doc):
    doc, _ = tiny_doc
    checked = 0
    for case in doc["cases"]:
        for cname, check in case["check"].items():
            if case["results"][cname]["status"] == "inaccurate":  # a peer, flagged and not timed
                assert check["max_rel_diff"] > case["tolerance"], (case["name"], cname, check)
                continue
            tol = {"float32": 1e-4, "float64": 1e-10, "bfloat16": 2 ** -5}[case["dtype"]]
            assert case["tolerance"] == tol
            assert check["max_rel_diff"] <= tol, (case["name"], cname, check)
            checked += 1
    assert checked >= len(doc["cases"])


def test_layer_cases_run_attnext_against_the_reference(tiny_doc):
    doc, _ = tiny_doc
    by_name = {c["name"]: c for c in doc["cases"]}
    for name in ("tiny-additive", "tiny-mha", "tiny-kvcache"):
        case = by_name[name]
        assert case["results"]["attnext"]["status"] == "ok", case["results"]["attnext"]
        assert case["check"]["attnext"]["max_rel_diff"] <= 1e-5
        assert "attnext_vs_reference" in case["ratios"]
    kv = by_name["tiny-kvcache"]["extra"]
    assert set(kv["attnext"]) == {"first_1_tokens_ms_per_token", "last_1_tokens_ms_per_token"}


def test_csv_has_one_row_per_case_and_contender(tiny_doc):
    doc, paths = tiny_doc
    with open(paths["csv"], newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(len(c["results"]) for c in doc["cases"])
    assert {r["cpu_model"] for r in rows} == {doc["machine"]["cpu_model"]}
    first = doc["cases"][0]
    row = next(r for r in rows if r["case"] == first["name"] and r["contender"] == "attnext")
    assert float(row["median_s"]) == pytest.approx(first["results"]["attnext"]["median_s"])


def test_markdown_table_comes_from_the_json(tiny_doc, tmp_path, capsys):
    doc, paths = tiny_doc
    with open(paths["md"], encoding="utf-8") as f:
        text = f.read()
    assert all(f"`{c['name']}`" in text for c in doc["cases"])
    out = tmp_path / "again.md"
    assert main(["bench", "--from", paths["json"], "--markdown", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == text


def test_schema_rejects_broken_documents(tiny_doc):
    doc, _ = tiny_doc
    bad = copy.deepcopy(doc)
    del bad["machine"]["cpu_model"]
    with pytest.raises(SchemaError, match="cpu_model"):
        validate(bad)
    bad = copy.deepcopy(doc)
    bad["cases"][0]["results"]["attnext"]["status"] = "fine"
    with pytest.raises(SchemaError, match=r"cases\[0\]\.results\.attnext\.status"):
        validate(bad)
    bad = copy.deepcopy(doc)
    bad["cases"][0]["ratios"]["attnext_vs_torch"] = "fast"
    with pytest.raises(SchemaError, match="expected number"):
        validate(bad)
    bad = copy.deepcopy(doc)
    backward = next(i for i, c in enumerate(bad["cases"]) if "backward" in c)
    bad["cases"][backward]["backward"]["met"]["attnext_vs_torch"] = "yes"
    with pytest.raises(SchemaError, match=rf"cases\[{backward}\]\.backward\.met"):
        validate(bad)
    bad = copy.deepcopy(doc)
    bad["schema"] = "attnext-bench/0"
    with pytest.raises(SchemaError, match="schema"):
        validate(bad)


def _slowed(doc, factor):
    b = copy.deepcopy(doc)
    for case in b["cases"]:
        res = case["results"]["attnext"]
        if res["status"] == "ok":
            for key in ("median_s", "q1_s", "q3_s", "min_s", "max_s"):
                res[key] *= factor
    return b


def test_compare_prints_the_change_per_case(tiny_doc, tmp_path, capsys):
    doc, paths = tiny_doc
    slow = tmp_path / "slow.json"
    report.save_json(_slowed(doc, 2.0), slow)
    capsys.readouterr()
    assert main(["bench", "--compare", paths["json"], str(slow)]) == 0
    out = capsys.readouterr().out
    assert "+100.0%  slower" in out
    assert main(["bench", "--compare", paths["json"], str(slow), "--fail-slower", "50"]) == 1
    assert main(["bench", "--compare", paths["json"], paths["json"], "--fail-slower", "50"]) == 0
    text, rows = report.compare(doc, _slowed(doc, 0.5))
    assert {round(r[4], 6) for r in rows if r[1] == "attnext"} == {-0.5}


def test_skipped_torch_is_listed_with_its_reason(monkeypatch, keep_threads):
    monkeypatch.setattr(machine, "torch_or_reason", lambda: (None, "PyTorch not importable (test)"))
    doc = run_suite("tiny", ["tiny-softmax"], progress=False, probe=False)
    validate(doc)
    assert doc["contenders"]["torch"] == {"available": False, "reason": "PyTorch not importable (test)"}
    assert doc["cases"][0]["results"]["torch"] == {"status": "skipped", "reason": "PyTorch not importable (test)"}
    assert "torch: PyTorch not importable (test)" in report.table(doc)
    assert doc["cases"][0]["results"]["attnext"]["fraction_of_peak"] is None


def test_threads_apply_to_every_contender(keep_threads):
    doc = run_suite("tiny", ["tiny-sdpa"], threads=1, progress=False, probe=False)
    t = doc["machine"]["threads"]
    assert t["requested"] == 1 and t["attnext"] == 1
    if t["torch"] is not None:
        assert t["torch"] == 1


def test_case_globs_and_errors(capsys):
    assert [c.name for c in bench_cases.select("tiny", ["tiny-sdpa*"])] == \
        ["tiny-sdpa", "tiny-sdpa-causal-gqa", "tiny-sdpa-decode-float64"]
    with pytest.raises(ValueError, match="no case of suite 'tiny' matches nope.*tiny-softmax"):
        bench_cases.select("tiny", ["nope"])
    assert main(["bench", "--suite", "tiny", "--case", "nope"]) == 2
    assert main(["bench", "--suite", "quick", "--list"]) == 0
    listed = capsys.readouterr().out
    assert "sdpa-1x8x1024x1024x64" in listed and "tiny-" not in listed


def test_suites_cover_the_issue_shapes():
    full = {c.name: c for c in bench_cases.select("full")}
    for name in ("sdpa-1x8x1024x1024x64", "sdpa-4x12x512x512x64", "sdpa-1x8x4096x4096x64",
                 "sdpa-1x8x4096x4096x64-causal", "sdpa-1x8x2048x2048x128", "sdpa-32x8x1x4096x64-decode",
                 "sdpa-8x1x128x128x256", "sdpa-1x8x1024x1024x64-float64", "sdpa-1x32:8x1024x1024x64-gqa",
                 "additive-8x128x128x256", "mha-4x512x512h8", "kvcache-4x512h8-t512", "softmax-64x1024x1024",
                 "score_additive-8x128x128x256"):
        assert name in full
    causal = full["sdpa-1x8x4096x4096x64-causal"]
    assert causal.work == 2 * 8 * 4096 * 4096 * 64 and causal.metric == "GFLOP/s"
    decode = full["sdpa-32x8x1x4096x64-decode"]
    assert decode.metric == "GB/s" and decode.work == 2 * 32 * 8 * 4096 * 64 * 4
    quick = bench_cases.select("quick")
    assert {c.group for c in quick} == {c.group for c in full.values()}


def test_suites_hold_the_issue_15_fwd_bwd_cases():
    full = {c.name: c for c in bench_cases.select("full")}
    sdpa = ("fwdbwd-sdpa-1x8x1024x1024x64", "fwdbwd-sdpa-4x12x512x512x64", "fwdbwd-sdpa-1x8x4096x4096x64-causal",
            "fwdbwd-sdpa-1x8x2048x2048x128")
    for name in sdpa + ("fwdbwd-additive-8x128x128x256", "fwdbwd-mha-4x512x512h8"):
        case = full[name]
        assert case.group == "backward" and case.metric == "GFLOP/s" and case.params["pass"] == "fwd+bwd"
        assert case.work == 3.5 * case.backward["forward_work"]
    causal = full["fwdbwd-sdpa-1x8x4096x4096x64-causal"]
    assert causal.backward["forward_work"] == 2 * 8 * 4096 * 4096 * 64 and causal.params["causal"] is True
    assert full["fwdbwd-mha-4x512x512h8"].backward["forward_work"] == full["mha-4x512x512h8"].work
    assert full["fwdbwd-additive-8x128x128x256"].backward["forward_work"] == full["additive-8x128x128x256"].work
    for name in sdpa:
        assert full[name].backward["targets"] == {"attnext_vs_torch": 1.5, "fraction_of_forward": 0.6}
    assert full["fwdbwd-additive-8x128x128x256"].backward["targets"] == {"attnext_vs_torch": 15.0}
    assert full["fwdbwd-mha-4x512x512h8"].backward["targets"] == {"attnext_vs_torch": 1.5}
    quick = [c.name for c in bench_cases.select("quick") if c.group == "backward"]
    assert quick == ["fwdbwd-sdpa-1x8x512x512x64"]


TINY_BACKWARD = ("tiny-fwdbwd-sdpa", "tiny-fwdbwd-sdpa-causal-gqa", "tiny-fwdbwd-additive", "tiny-fwdbwd-mha")


def test_fwd_bwd_cases_check_the_output_and_every_gradient(tiny_doc):
    doc, _ = tiny_doc
    by_name = {c["name"]: c for c in doc["cases"]}
    parts = {"tiny-fwdbwd-sdpa": 4, "tiny-fwdbwd-sdpa-causal-gqa": 4, "tiny-fwdbwd-additive": 7,
             "tiny-fwdbwd-mha": 6}  # the output, then one gradient per input or parameter
    for name in TINY_BACKWARD:
        case = by_name[name]
        assert case["results"]["attnext"]["status"] == "ok", case["results"]["attnext"]
        assert case["results"]["reference"]["status"] == "ok", case["results"]["reference"]
        assert case["check"]["attnext"]["against"] == "reference"
        assert case["check"]["attnext"]["max_rel_diff"] <= 1e-4
        assert 0 <= case["check"]["attnext"]["part"] < parts[name]
        if doc["contenders"]["torch"]["available"]:
            assert case["results"]["torch"]["status"] == "ok", case["results"]["torch"]
            assert case["check"]["torch"]["max_rel_diff"] <= 1e-4


def test_fwd_bwd_cases_report_throughput_against_the_forward(tiny_doc):
    doc, _ = tiny_doc
    torch_ok = doc["contenders"]["torch"]["available"]
    for case in (c for c in doc["cases"] if c["group"] == "backward"):
        bw = case["backward"]
        attnext = case["results"]["attnext"]
        assert case["work"] == pytest.approx(3.5 * bw["forward_work"])
        assert bw["fwd_bwd_rate"] == attnext["rate"]
        assert bw["forward_rate"] == pytest.approx(bw["forward_work"] / bw["forward_median_s"] / 1e9)
        assert bw["fraction_of_forward"] == pytest.approx(bw["fwd_bwd_rate"] / bw["forward_rate"])
        # 3.5 forwards' flops in fwd+bwd: the fraction is 3.5 x forward time / fwd+bwd time
        assert bw["fraction_of_forward"] == pytest.approx(3.5 * bw["forward_median_s"] / attnext["median_s"])
        if torch_ok:
            assert bw["attnext_vs_torch"] == case["ratios"]["attnext_vs_torch"]
            assert set(bw["met"]) == set(bw["targets"])
        for key, met in bw["met"].items():
            assert met == (bw[key] >= bw["targets"][key])
    assert all(c["group"] != "backward" or "backward" in c for c in doc["cases"])
    assert not any("backward" in c for c in doc["cases"] if c["group"] != "backward")


def test_fwd_bwd_lines_in_the_table_and_the_markdown(tiny_doc):
    doc, paths = tiny_doc
    text = report.table(doc)
    assert "fwd+bwd cases (rate = 3.5 x the forward's flops / time" in text
    with open(paths["md"], encoding="utf-8") as f:
        md = f.read()
    assert "Forward + backward (rate = 3.5 × the forward's flops / time):" in md
    for name in TINY_BACKWARD:
        line = next(x for x in text.splitlines() if x.strip().startswith(f"{name}:"))
        assert "of attnext's forward" in line
        assert md.count(f"`{name}`") == 2  # the main table and the fwd+bwd table
    if doc["contenders"]["torch"]["available"]:
        assert "(target >= 1.50x: " in text and "(target >= 60%: " in text
    with open(paths["csv"], newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["case"] == TINY_BACKWARD[0] and r["contender"] == "attnext"]
    assert float(rows[0]["fwd_bwd_fraction_of_forward"]) == pytest.approx(
        next(c for c in doc["cases"] if c["name"] == TINY_BACKWARD[0])["backward"]["fraction_of_forward"])


def test_check_outputs_flags_a_wrong_gradient():
    out, dq, dk = np.ones((2, 3)), np.full((2, 3), 4.0), np.arange(6.0).reshape(2, 3)
    ref = bench_cases.Parts((out, dq, dk))
    bad = bench_cases.Parts((out, dq, dk + 1.0))  # off by 1 where the largest magnitude is 5
    res = bench_cases.check_outputs({"reference": ref, "attnext": bad, "torch": ref})
    assert res["attnext"] == {"against": "reference", "max_rel_diff": pytest.approx(0.2), "part": 2}
    assert res["torch"] == {"against": "reference", "max_rel_diff": 0.0, "part": 0}
    res = bench_cases.check_outputs({"reference": ref, "attnext": bench_cases.Parts((out, dq))})
    assert res["attnext"]["error"] == "2 results vs 3"
    nan = bench_cases.Parts((out, dq * np.nan, dk))
    assert np.isnan(bench_cases.check_outputs({"reference": ref, "attnext": nan})["attnext"]["max_rel_diff"])


def test_schema_command_prints_json(capsys):
    assert main(["bench", "--schema"]) == 0
    assert json.loads(capsys.readouterr().out)["$id"] == "attnext-bench/1"


def test_speedup_plot(tiny_doc, tmp_path):
    pytest.importorskip("matplotlib")
    doc, paths = tiny_doc
    out = tmp_path / "speedup.png"
    assert main(["bench", "--from", paths["json"], "--plot", str(out)]) == 0
    assert out.stat().st_size > 1000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_check_outputs_flags_disagreement():
    a = np.ones((2, 3))
    res = bench_cases.check_outputs({"reference": a, "attnext": a * 1.5, "torch": a})
    assert res["attnext"] == {"against": "reference", "max_rel_diff": pytest.approx(0.5)}
    assert res["torch"]["max_rel_diff"] == 0.0
