"""The benchmark's probes, peers and bfloat16 cases (issue 17). Tiny shapes; no timing is
asserted (speed is what the suite reports), only what the numbers mean and how they are gated."""

import math

import numpy as np
import pytest

import attnext
from attnext import _core
from attnext.bench import cases as bench_cases
from attnext.bench import lowp_cases, machine, peers, report, runner, validate
from conftest import BF16_CAPS, bf16_cap


@pytest.fixture
def keep_threads():
    before = attnext.get_num_threads()
    yield
    attnext.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# probes

@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_fma_probe_reports_a_rate_and_what_ran(dtype):
    gflops, isa = _core.probe_peak_gflops(dtype, 1, runs=1)
    assert gflops > 0 and math.isfinite(gflops)
    assert isa
    if dtype == "bfloat16":  # the loop of the path the kernels take (each path this CPU has), said so
        for cap in BF16_CAPS:
            with bf16_cap(cap):
                _, isa = _core.probe_peak_gflops(dtype, 1, runs=1)
                path = attnext.build_info()["bf16"]
                assert ("tdpbf16ps" in isa) == (path == "amx_bf16")
                assert isa.startswith("avx512_bf16 vdpbf16ps") == path.startswith("avx512_bf16")
                assert isa.startswith("float32 fallback") == path.startswith("float32 fallback")


def test_probe_arguments_are_checked():
    with pytest.raises(ValueError, match="dtype must be"):
        _core.probe_peak_gflops("int8", 1)
    with pytest.raises(ValueError, match="threads must be at least 1"):
        _core.probe_peak_gflops("float32", 0)
    with pytest.raises(ValueError, match="nbytes must be at least 4096"):
        _core.probe_read_gbs(16, 1)
    assert _core.probe_read_min_bytes == 4096 and _core.probe_read_gbs(_core.probe_read_min_bytes, 1, runs=1) > 0
    with pytest.raises(ValueError, match="runs must be at least 1"):
        _core.probe_read_gbs(1 << 20, 1, runs=0)


def test_read_probe_reports_a_bandwidth():
    assert _core.probe_read_gbs(1 << 20, 2, runs=1) > 0


def test_llc_size_parses_sysfs_units():
    assert machine._parse_size("32768K") == 32 * 2 ** 20
    assert machine._parse_size("1M") == 2 ** 20
    assert machine._parse_size("4096") == 4096
    llc = machine.llc_bytes()
    assert llc is None or llc >= 2 ** 16


def test_run_probes_peaks_are_the_max_of_loop_and_gemm():
    p = machine.run_probes(1, "tiny")
    validate({"schema": "attnext-bench/1", "created": "", "suite": "tiny", "contenders": {}, "cases": [],
              "machine": {"cpu_model": "x", "cores_logical": 1, "cores_available": 1, "simd": "x",
                          "versions": {"python": "3", "numpy": "2", "attnext": "0", "torch": None},
                          "threads": {"requested": 1, "attnext": 1, "torch": None, "blas": 1, "blas_method": "x"}},
              "peak": p})
    gemm = max(p["gemm_f32_gflops"], p.get("torch_gemm_f32_gflops", 0.0))
    assert p["peak_gflops_float32"] == max(p["fma_f32_gflops"], gemm)
    assert p["peak_gflops_float64"] == max(p["fma_f64_gflops"], p["gemm_f64_gflops"])
    assert p["peak_gflops_bfloat16"] >= p["peak_gflops_float32"]
    assert p["read_set_bytes"] >= 4 * (p["llc_bytes"] or machine.UNKNOWN_LLC_BYTES)
    if p["llc_bytes"]:
        assert p["peak_read_gbs_llc"] > 0 and p["llc_read_set_bytes"] == p["llc_bytes"] // 2
    if machine.l2_bytes():
        assert p["l2_bytes"] == machine.l2_bytes() and p["l2_read_set_bytes"] == p["l2_bytes"] // 2
        assert p["peak_read_gbs_l2"] > 0


def _case(**kw):
    base = dict(name="c", group="sdpa", description="d", dtype="float32", params={}, metric="GB/s", work=1.0,
                setup=None)
    base.update(kw)
    return bench_cases.Case(**base)


def test_memory_bound_cases_use_the_bandwidth_of_their_cache_level():
    peaks = {"llc_bytes": 32 << 20, "peak_read_gbs_llc": 200.0, "peak_read_gbs": 20.0, "peak_gflops_float32": 100.0,
             "peak_gflops_bfloat16": 200.0}
    assert machine.peak_for(_case(working_set=12 << 20), peaks) == 200.0
    assert machine.peak_for(_case(working_set=512 << 20), peaks) == 20.0
    assert machine.peak_for(_case(working_set=None), peaks) == 20.0
    peaks.update(l2_bytes=4 << 20, peak_read_gbs_l2=400.0)
    assert machine.peak_for(_case(working_set=3 << 20), peaks) == 400.0
    assert machine.peak_for(_case(working_set=12 << 20), peaks) == 200.0
    flops = _case(metric="GFLOP/s", dtype="bfloat16")
    assert machine.peak_for(flops, peaks) == 200.0
    assert machine.peak_for(flops, peaks, "attnext-float32") == 100.0


def test_memory_bound_cases_probe_their_working_set_again_after_their_timings():
    big = _case(working_set=8 << 20)
    low = {"llc_bytes": None, "peak_read_gbs": 1e-3, "read_set_bytes": 1 << 20}
    peaks, rec = machine.reprobe_read(big, low, 1, "tiny")
    assert rec["level"] == "peak_read_gbs" and rec["at_start"] == 1e-3 and rec["after_case"] > 1e-3
    assert rec["set_bytes"] == 8 << 20  # the case's own working set, not the level's probe set
    assert peaks["peak_read_gbs"] == rec["after_case"] and low["peak_read_gbs"] == 1e-3  # a copy
    high = dict(low, peak_read_gbs=1e9)
    peaks, rec = machine.reprobe_read(big, high, 1, "tiny")
    assert rec["after_case"] < 1e9 and peaks["peak_read_gbs"] == 1e9  # the larger of the two
    l2 = dict(low, l2_bytes=4 << 20, peak_read_gbs_l2=1e-3, l2_read_set_bytes=1 << 20)
    assert machine.reprobe_read(_case(working_set=1 << 20), l2, 1, "tiny")[1]["level"] == "peak_read_gbs_l2"
    tiny = machine.reprobe_read(_case(working_set=16), low, 1, "tiny")[1]
    assert tiny["set_bytes"] == _core.probe_read_min_bytes  # the probe's smallest set, not an error
    unsized = machine.reprobe_read(_case(working_set=None), low, 1, "tiny")[1]
    assert unsized["set_bytes"] == 1 << 20  # the level's probe set when the case has no working set
    assert machine.reprobe_read(_case(metric="GFLOP/s"), low, 1, "tiny") == (low, None)
    assert machine.reprobe_read(_case(working_set=None), {"peak_read_gbs": 5.0}, 1, "tiny") == (
        {"peak_read_gbs": 5.0}, None)


def test_no_result_shows_above_100_percent():
    assert runner._fraction_of_peak(50.0, 100.0) == {"fraction_of_peak": 0.5}
    assert runner._fraction_of_peak(120.0, 100.0) == {"fraction_of_peak": 1.0, "over_peak": pytest.approx(1.2)}
    assert runner._fraction_of_peak(1.0, None) == {"fraction_of_peak": None}
    assert report._fmt_peak({"fraction_of_peak": 1.0, "over_peak": 1.2}) == "100%!"
    doc = {"cases": [{"name": "k", "results": {"attnext": {"fraction_of_peak": 1.0, "over_peak": 1.1}}}]}
    lines = report.over_peak_lines(doc)
    assert "probed peak" in lines[0] and "k attnext: 110%" in lines[1]


def test_kvcache_case_working_set_is_weights_plus_cache():
    case = bench_cases.kvcache_case("k", 4, 512, 8, 512)
    assert case.working_set == (4 * 512 * 512 + 4 * 512) * 4 + 2 * 4 * 512 * 512 * 4
    decode = bench_cases.sdpa_case("d", 32, 8, 1, 4096, 64)
    assert decode.working_set == decode.work == 2 * 32 * 8 * 4096 * 64 * 4


# --------------------------------------------------------------------------------------------
# peers

def _inputs(rng, b=1, hq=2, hk=2, l=8, s=8, d=8):
    return (rng.standard_normal((b, hq, l, d)).astype(np.float32),
            rng.standard_normal((b, hk, s, d)).astype(np.float32),
            rng.standard_normal((b, hk, s, d)).astype(np.float32))


@pytest.mark.parametrize("causal,hk", [(False, 2), (True, 2), (False, 1)])
def test_peers_compute_sdpa(causal, hk):
    q, k, v = _inputs(np.random.default_rng(0), hq=4, hk=hk)
    want = attnext.reference.scaled_dot_product_attention(q.astype(np.float64), k.astype(np.float64),
                                                          v.astype(np.float64), is_causal=causal,
                                                          enable_gqa=hk != 4)
    runs = peers.sdpa_contenders(q, k, v, causal=causal, threads=1, dtype="float32")
    assert set(runs) == set(peers.PEERS)
    ran = 0
    for name, fn in runs.items():
        if isinstance(fn, peers.Unavailable):
            assert str(fn)
            continue
        out = np.asarray(fn(), dtype=np.float64)
        tol = 1e-5 if name in ("onnxruntime", "openvino-f32") else 2 ** -5
        assert np.max(np.abs(out - want)) <= tol * np.max(np.abs(want)), name
        ran += 1
    if all(why is None for why in peers.availability().values()):
        assert ran == 3  # onnxruntime, openvino-f32, openvino-default (bf16 runs on bfloat16 cases)


def test_peers_skip_types_they_do_not_run():
    q, k, v = _inputs(np.random.default_rng(1))
    runs = peers.sdpa_contenders(q, k, v, causal=False, threads=1, dtype="float64")
    assert all(isinstance(fn, peers.Unavailable) and "float64" in str(fn) for fn in runs.values())
    runs = peers.sdpa_contenders(q, k, v, causal=False, threads=1, dtype="bfloat16")
    assert isinstance(runs["onnxruntime"], peers.Unavailable) and isinstance(runs["openvino-f32"], peers.Unavailable)


def test_a_peer_outside_tolerance_is_reported_not_timed():
    case = _case(metric="GFLOP/s")
    record = {"results": {}, "check": {"openvino-default": {"against": "reference", "max_rel_diff": 5e-3},
                                       "onnxruntime": {"against": "reference", "max_rel_diff": 1e-7},
                                       "torch": {"against": "reference", "max_rel_diff": 5e-3}}}
    live = {"openvino-default": lambda: 0, "onnxruntime": lambda: 0, "torch": lambda: 0}
    runner._drop_inaccurate_peers(case, record, live, runner.Progress(1, enabled=False))
    assert set(live) == {"onnxruntime", "torch"}  # torch is not a peer: not gated
    res = record["results"]["openvino-default"]
    assert res["status"] == "inaccurate" and "0.005" in res["reason"] and "0.0001" in res["reason"]


def test_peers_listed_as_contenders_with_reasons(monkeypatch, keep_threads):
    monkeypatch.setattr(peers, "availability", lambda: {p: "not installed (test)" for p in peers.PEERS})
    doc = runner.run_suite("tiny", ["tiny-sdpa"], progress=False, probe=False)
    validate(doc)
    for p in peers.PEERS:
        assert doc["contenders"][p] == {"available": False, "reason": "not installed (test)"}
    text = report.table(doc)
    assert "onnxruntime: not installed (test)" in text and "vs onnxruntime" not in text


def test_markdown_shows_every_peer_that_ran(keep_threads):
    doc = runner.run_suite("tiny", ["tiny-sdpa"], progress=False, probe=False)
    md = report.markdown(doc)
    for p in peers.PEERS:
        if doc["contenders"][p]["available"] and doc["cases"][0]["results"][p]["status"] == "ok":
            assert f"{p} (median)" in md and f"attnext vs {p}" in md


# --------------------------------------------------------------------------------------------
# bfloat16 cases

def test_bfloat16_cases_cover_the_issue_shapes():
    full = {c.name: c for c in bench_cases.select("full")}
    for name in ("sdpa-1x8x1024x1024x64-bfloat16", "sdpa-4x12x512x512x64-bfloat16", "sdpa-1x8x4096x4096x64-bfloat16",
                 "sdpa-1x32:8x1024x1024x64-gqa-bfloat16", "sdpa-1x8x2048x2048x128-bfloat16",
                 "sdpa-32x8x1x4096x64-decode-bfloat16", "mha-4x512x512h8-bfloat16", "kvcache-1x512h8-t128-bfloat16"):
        assert full[name].dtype == "bfloat16" and full[name].targets, name
    assert full["sdpa-1x8x2048x2048x128-bfloat16"].targets["attnext_vs_attnext-float32"] == 1.6
    assert full["sdpa-32x8x1x4096x64-decode-bfloat16"].targets == {"attnext_vs_attnext-float32": 1.8}
    decode = full["sdpa-32x8x1x4096x64-decode-bfloat16"]
    assert decode.metric == "GB/s" and decode.work == 2 * 32 * 8 * 4096 * 64 * 2
    assert full["sdpa-1x8x1024x1024x64-bfloat16"].tolerance == 2 ** -5


def test_bfloat16_cases_skip_cleanly_without_ml_dtypes(monkeypatch):
    def no_ml_dtypes():
        raise ImportError("No module named 'ml_dtypes' (test)")

    monkeypatch.setattr(lowp_cases, "_bf16", no_ml_dtypes)
    env = bench_cases.Env()
    for name in ("tiny-bfloat16-sdpa", "tiny-bfloat16-mha", "tiny-bfloat16-kvcache"):
        case = bench_cases.select("tiny", [name])[0]
        run = case.setup(np.random.default_rng(0), env)
        assert set(run) == set(bench_cases.CONTENDERS)
        assert all(isinstance(s, bench_cases.Skip) and "ml_dtypes" in s.reason for s in run.values())


def test_bfloat16_tiny_cases_run_and_record_accuracy(keep_threads):
    pytest.importorskip("ml_dtypes")
    doc = runner.run_suite("tiny", ["tiny-bfloat16-*"], progress=False, probe=False)
    validate(doc)
    by_name = {c["name"]: c for c in doc["cases"]}
    sdpa = by_name["tiny-bfloat16-sdpa"]
    assert sdpa["results"]["attnext-float32"]["status"] == "ok"
    attnext_ok = sdpa["results"]["attnext"]["status"] == "ok"
    if attnext_ok:
        assert "attnext_vs_attnext-float32" in sdpa["ratios"]
        assert set(sdpa["targets"]["met"]) <= set(sdpa["targets"]["targets"])
        acc = sdpa["accuracy"]["attnext"]
        assert "error" not in acc, acc
        # out_dtype=float32 from bfloat16 inputs: within a few bfloat16 roundoffs of float64
        assert 0 <= acc["mean_abs_err"] <= acc["max_abs_err"] < 2 ** -5
    else:
        assert "bfloat16" in sdpa["results"]["attnext"]["reason"]
    if sdpa["results"]["openvino-bf16"]["status"] == "ok":
        assert sdpa["accuracy"]["openvino-bf16"]["max_abs_err"] < 2 ** -4
    for name in ("tiny-bfloat16-mha", "tiny-bfloat16-kvcache"):
        assert by_name[name]["results"]["attnext-float32"]["status"] == "ok"
        assert by_name[name]["results"]["reference"]["status"] == "skipped"
    text = report.table(doc)
    assert "bfloat16 cases (speedup over attnext's float32" in text
    assert "tiny-bfloat16-sdpa: attnext vs attnext-float32" in text


def test_the_peers_switch_leaves_them_out(monkeypatch):
    monkeypatch.setenv(peers.PEERS_SWITCH, "0")
    reasons = peers.availability()
    assert set(reasons) == set(peers.PEERS) and all("left out" in why for why in reasons.values())
    q, k, v = _inputs(np.random.default_rng(2))
    runs = peers.sdpa_contenders(q, k, v, causal=False, threads=1, dtype="float32")
    assert all(isinstance(fn, peers.Unavailable) for fn in runs.values())
