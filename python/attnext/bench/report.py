"""Rendering results: the terminal table, CSV, Markdown, the speedup chart, and comparisons."""

from __future__ import annotations

import csv
import json

from .cases import CONTENDERS, NO_IMPLEMENTATION
from .schema import validate


def load(path) -> dict:
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    return validate(doc)


def save_json(doc: dict, path) -> None:
    validate(doc)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")


def fmt_time(seconds) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1.0:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def fmt_rate(value, metric) -> str:
    return "-" if value is None else f"{value:.3g} {metric}"


def fmt_ratio(r) -> str:
    return "-" if r is None else (f"{r:.2f}x" if r < 100 else f"{r:.0f}x")


def _spread(res) -> str:
    """The interquartile range as +- percent of the median."""
    half = (res["q3_s"] - res["q1_s"]) / 2
    if res["median_s"] <= 0:
        return "-"
    pct = 100 * half / res["median_s"]
    return f"+-{pct:.0f}%" if pct < 1000 else ">+-999%"


def machine_lines(doc) -> list:
    m, p = doc["machine"], doc["peak"]
    v, t = m["versions"], m["threads"]
    lines = [
        f"machine: {m['cpu_model']}, {m['cores_available']} of {m['cores_logical']} cores, SIMD {m['simd']}",
        f"versions: attnext {v['attnext']}, numpy {v['numpy']}, torch {v['torch'] or '-'}, python {v['python']}",
        f"threads: attnext {t['attnext']}, torch {t['torch'] if t['torch'] is not None else '-'}, "
        f"BLAS {t['blas'] if t['blas'] is not None else '?'} ({t['blas_method']})",
    ]
    if "peak_gflops_float32" in p:
        lines.append(_peak_line(p))
    loads = [x for x in (m.get("load_avg_before"), m.get("load_avg")) if x is not None]
    if loads and max(loads) > m["cores_available"] + 0.5:
        lines.append(f"WARNING: the machine was busy (load average up to {max(loads):.1f} on "
                     f"{m['cores_available']} cores): other processes competed for the cores, so these "
                     "timings are unreliable.")
    return lines


def _peak_line(p: dict) -> str:
    """The probed peaks; runs saved by earlier versions had GEMM probes only."""
    if "fma_f32_gflops" not in p:
        return (f"peak: GEMM {p['peak_gflops_float32']:.0f} GFLOP/s float32 (NumPy {p['gemm_f32_gflops']:.0f}" +
                (f", torch {p['torch_gemm_f32_gflops']:.0f}" if "torch_gemm_f32_gflops" in p else "") +
                f"), {p['peak_gflops_float64']:.0f} GFLOP/s float64; read {p['peak_read_gbs']:.1f} GB/s")
    gemm = max(p.get("gemm_f32_gflops", 0.0), p.get("torch_gemm_f32_gflops", 0.0))
    llc = (f", {p['peak_read_gbs_llc']:.0f} GB/s from the last-level cache ({p['llc_bytes'] / 2 ** 20:.0f} MiB)"
           if "peak_read_gbs_llc" in p else "")
    if "peak_read_gbs_l2" in p:
        llc += f", {p['peak_read_gbs_l2']:.0f} GB/s from the threads' L2 ({p['l2_bytes'] / 2 ** 20:.0f} MiB)"
    return (f"peak ({p['f32_isa']} loop, best GEMM float32 {gemm:.0f}): {p['peak_gflops_float32']:.0f} GFLOP/s "
            f"float32, {p['peak_gflops_float64']:.0f} float64, {p['peak_gflops_bfloat16']:.0f} bfloat16 "
            f"({p['bf16_isa']}); read {p['peak_read_gbs']:.1f} GB/s from memory{llc}")


def _target_note(bw: dict, key: str, fmt) -> str:
    """' (target >= X: met)' for a measure with a target in a fwd+bwd case's summary."""
    target = bw.get("targets", {}).get(key)
    if target is None or key not in bw.get("met", {}):
        return ""
    return f" (target >= {fmt(target)}: {'met' if bw['met'][key] else 'MISSED'})"


def _percent(x) -> str:
    return f"{100 * x:.0f}%"


def backward_lines(doc) -> list:
    """One line per fwd+bwd case: the fwd+bwd throughput, its share of attnext's own forward's
    on the same inputs, and the speedup over PyTorch's fwd+bwd, each against the issue's target."""
    lines = []
    for case in doc["cases"]:
        bw = case.get("backward")
        if bw is None:
            continue
        words = [f"{case['name']}:"]
        if "fraction_of_forward" in bw:
            words.append(f"fwd+bwd {bw['fwd_bwd_rate']:.3g} GFLOP/s = {_percent(bw['fraction_of_forward'])} of "
                         f"attnext's forward ({bw['forward_rate']:.3g} GFLOP/s, {fmt_time(bw['forward_median_s'])})"
                         + _target_note(bw, "fraction_of_forward", _percent) + ";")
        else:
            why = f"its forward failed: {bw['forward_error']}" if "forward_error" in bw else "see the table"
            words.append(f"attnext not measured ({why});")
        if "attnext_vs_torch" in bw:
            words.append(f"vs torch fwd+bwd {fmt_ratio(bw['attnext_vs_torch'])}" +
                         _target_note(bw, "attnext_vs_torch", fmt_ratio))
        else:
            words.append("no ratio vs torch")
        lines.append(" ".join(words))
    return lines


def _present(doc) -> list:
    """Contenders that ran (or tried to) in some case, less those unavailable for the whole run."""
    available = {c: info.get("available", True) for c, info in doc.get("contenders", {}).items()}
    return [c for c in CONTENDERS if available.get(c, True) and
            any(case["results"].get(c, {"status": "skipped"})["status"] != "skipped" for case in doc["cases"])]


def _fmt_peak(res) -> str:
    """'% peak' of a result; a rate above the probed peak shows as 100%! (see lowp/over-peak notes)."""
    frac = res.get("fraction_of_peak")
    if frac is None:
        return "-"
    return "100%!" if "over_peak" in res else f"{100 * frac:.0f}%"


def table(doc) -> str:
    """The terminal table: one row per case and contender. A contender missing from the whole run
    (PyTorch not importable) has no rows: the list below the table names it once, with why."""
    present = _present(doc)
    header = ["case", "contender", "median", "IQR", "rate", "% peak"] + [f"vs {c}" for c in present]
    rows = []
    for case in doc["cases"]:
        first = True
        for cname in present:
            res = case["results"].get(cname)
            if res is None or res.get("reason") == NO_IMPLEMENTATION:
                continue
            label = case["name"] if first else ""
            first = False
            if res["status"] != "ok":
                rows.append([label, cname, f"{res['status']}: {res.get('reason') or ''}"])
                continue
            row = [label, cname, fmt_time(res["median_s"]), _spread(res), fmt_rate(res["rate"], case["metric"]),
                   _fmt_peak(res)]
            for other in present:
                row.append("" if other == cname else fmt_ratio(case["ratios"].get(f"{cname}_vs_{other}")))
            rows.append(row)
    full = [r for r in rows if len(r) == len(header)]
    widths = [max(len(str(r[i])) for r in [header] + full) for i in range(len(header))]
    widths[0] = max(widths[0], max((len(r[0]) for r in rows), default=0))
    out = machine_lines(doc) + [""]
    out.append("  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    out.append("  ".join("-" * w for w in widths))
    for r in rows:
        if len(r) != len(header):  # skipped / error: the reason spans the remaining columns
            out.append(f"{r[0].ljust(widths[0])}  {r[1].ljust(widths[1])}  {r[2]}")
        else:
            out.append("  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)
                                 for i, (c, w) in enumerate(zip(r, widths))))
    out.append("")
    out.append("vs X: how many times faster this contender is than X (X's median time / this one's).")
    out.extend(over_peak_lines(doc))
    lowp = lowp_lines(doc)
    if lowp:
        out.append("bfloat16 cases (speedup over attnext's float32 in the same run; error vs float64):")
        out.extend(f"  {line}" for line in lowp)
    backward = backward_lines(doc)
    if backward:
        out.append("fwd+bwd cases (rate = 3.5 x the forward's flops / time; attnext's forward timed alone on the "
                   "same inputs):")
        out.extend(f"  {line}" for line in backward)
    skipped = skipped_summary(doc)
    if skipped:
        out.append("skipped:")
        out.extend(f"  {line}" for line in skipped)
    return "\n".join(out)


def over_peak_lines(doc) -> list:
    """A line per result faster than its probed peak (shown as 100%!): the probe fell short."""
    lines = [f"{case['name']} {cname}: {100 * res['over_peak']:.0f}% of the probed peak"
             for case in doc["cases"] for cname, res in case["results"].items() if "over_peak" in res]
    if lines:
        lines.insert(0, "100%!: faster than the probed peak (the probe underestimates this machine; raw fractions):")
    return lines


def lowp_lines(doc) -> list:
    """Per case with targets: each ratio against its target, and the recorded errors vs float64."""
    lines = []
    for case in doc["cases"]:
        tg = case.get("targets")
        if not tg and not case.get("accuracy"):
            continue
        words = [f"{case['name']}:"]
        for key, target in (tg or {}).get("targets", {}).items():
            ratio = case["ratios"].get(key)
            state = "not measured" if ratio is None else ("met" if tg["met"][key] else "MISSED")
            words.append(f"{key.replace('_vs_', ' vs ')} {fmt_ratio(ratio)} (target >= {fmt_ratio(target)}: "
                         f"{state});")
        for cname, acc in case.get("accuracy", {}).items():
            words.append(f"{cname} error {acc['error']};" if "error" in acc else
                         f"{cname} max abs err {acc['max_abs_err']:.2g}, mean {acc['mean_abs_err']:.2g};")
        lines.append(" ".join(words).rstrip(";"))
    return lines


def skipped_summary(doc) -> list:
    lines = []
    for cname, info in doc["contenders"].items():
        if not info["available"]:
            lines.append(f"{cname}: {info['reason']}")
    seen = {}
    for case in doc["cases"]:
        for cname, res in case["results"].items():
            # A contender with no implementation for a case (a peer in a softmax case) is not news.
            if res.get("reason") == NO_IMPLEMENTATION:
                continue
            if res["status"] != "ok" and doc["contenders"].get(cname, {}).get("available", True):
                seen.setdefault((cname, res["status"], res.get("reason")), []).append(case["name"])
    for (cname, status, reason), names in seen.items():
        lines.append(f"{cname} {status} in {', '.join(names)}: {reason}")
    return lines


CSV_MACHINE = ("cpu_model", "cores_available", "simd")


def save_csv(doc, path) -> None:
    """One row per case and contender; machine and version columns repeat on every row."""
    m = doc["machine"]
    fields = ["case", "group", "dtype", "contender", "status", "reason", "median_s", "q1_s", "q3_s", "min_s",
              "max_s", "repeats", "metric", "rate", "fraction_of_peak", "over_peak", "forward_median_s",
              "fwd_bwd_fraction_of_forward"] + \
             [f"{c}_vs_{o}" for c in CONTENDERS for o in CONTENDERS if c != o] + \
             list(CSV_MACHINE) + ["threads", "attnext_version", "numpy_version", "torch_version", "created"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for case in doc["cases"]:
            for cname, res in case["results"].items():
                row = {"case": case["name"], "group": case["group"], "dtype": case["dtype"], "contender": cname,
                       "status": res["status"], "reason": res.get("reason") or "", "metric": case["metric"],
                       **{k: res.get(k, "") for k in ("median_s", "q1_s", "q3_s", "min_s", "max_s", "repeats",
                                                       "rate", "fraction_of_peak", "over_peak")}}
                for key, value in case["ratios"].items():
                    if key.startswith(cname + "_vs_"):
                        row[key] = value
                bw = case.get("backward") or {}
                if cname == "attnext":
                    row.update(forward_median_s=bw.get("forward_median_s"),
                               fwd_bwd_fraction_of_forward=bw.get("fraction_of_forward"))
                row.update({k: m[k] for k in CSV_MACHINE})
                row.update(threads=m["threads"]["requested"], attnext_version=m["versions"]["attnext"],
                           numpy_version=m["versions"]["numpy"], torch_version=m["versions"]["torch"] or "",
                           created=doc["created"])
                w.writerow({k: ("" if v is None else v) for k, v in row.items()})


def markdown(doc) -> str:
    """The README results table: one row per case, attnext's rate and its speedups (a contender
    missing from the whole run has no column; the line under the table says why, once)."""
    present = _present(doc)
    others = [c for c in present if c != "attnext"]
    lines = [f"Suite `{doc['suite']}`, {doc['created']}. " + " ".join(f"{x}." for x in machine_lines(doc)), ""]
    head = ["case", "dtype"] + [f"{c} (median)" for c in present] + ["attnext rate", "% of peak"] + \
           [f"attnext vs {c}" for c in others]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(" --- " if i < 2 else " ---: " for i in range(len(head))) + "|")
    for case in doc["cases"]:
        row = [f"`{case['name']}`", case["dtype"]]
        for c in present:
            res = case["results"].get(c, {"status": "skipped"})
            row.append(fmt_time(res["median_s"]) if res["status"] == "ok" else res["status"])
        a = case["results"].get("attnext", {})
        if a.get("status") == "ok":
            row += [fmt_rate(a["rate"], case["metric"]), _fmt_peak(a)]
        else:
            row += ["-", "-"]
        row += [fmt_ratio(case["ratios"].get(f"attnext_vs_{c}")) for c in others]
        lines.append("| " + " | ".join(row) + " |")
    lines += _backward_markdown(doc)
    lowp = lowp_lines(doc)
    if lowp:
        lines += ["", "bfloat16 cases (speedup over attnext's float32 in the same run; error vs float64):", ""]
        lines += [f"- {x}" for x in lowp]
    over = over_peak_lines(doc)
    if over:
        lines += ["", over[0], ""] + [f"- {x}" for x in over[1:]]
    skipped = skipped_summary(doc)
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped) + "."]
    return "\n".join(lines) + "\n"


def _backward_markdown(doc) -> list:
    """The fwd+bwd cases' own table: speedup over PyTorch and the share of the forward's throughput."""
    rows = []
    for case in doc["cases"]:
        bw = case.get("backward")
        if bw is None:
            continue
        targets = bw.get("targets", {})
        vs = bw.get("attnext_vs_torch")
        frac = bw.get("fraction_of_forward")
        rows.append("| " + " | ".join([
            f"`{case['name']}`",
            fmt_ratio(vs), "-" if "attnext_vs_torch" not in targets else f"≥ {fmt_ratio(targets['attnext_vs_torch'])}",
            "-" if frac is None else f"{bw['fwd_bwd_rate']:.3g} GFLOP/s",
            "-" if frac is None else f"{bw['forward_rate']:.3g} GFLOP/s",
            "-" if frac is None else _percent(frac),
            "-" if "fraction_of_forward" not in targets else f"≥ {_percent(targets['fraction_of_forward'])}",
        ]) + " |")
    if not rows:
        return []
    return ["", "Forward + backward (rate = 3.5 × the forward's flops / time):", "",
            "| case | attnext vs torch | target | attnext fwd+bwd | attnext forward | fwd+bwd / forward | target |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"] + rows


def compare(a: dict, b: dict, names=("A", "B")) -> tuple:
    """Per case and contender, B's median against A's. Returns (text, rows) where each row is
    (case, contender, median A, median B, change) and change = B / A - 1 (negative = faster)."""
    rows = []
    a_cases = {c["name"]: c for c in a["cases"]}
    for case in b["cases"]:
        old = a_cases.get(case["name"])
        if old is None:
            continue
        for cname, res in case["results"].items():
            ores = old["results"].get(cname, {})
            if res["status"] == "ok" and ores.get("status") == "ok":
                rows.append((case["name"], cname, ores["median_s"], res["median_s"],
                             res["median_s"] / ores["median_s"] - 1.0))
    out = [f"{names[0]}: {a['created']} {a['machine']['cpu_model']} (attnext {a['machine']['versions']['attnext']})",
           f"{names[1]}: {b['created']} {b['machine']['cpu_model']} (attnext {b['machine']['versions']['attnext']})"]
    if a["machine"]["cpu_model"] != b["machine"]["cpu_model"] or \
            a["machine"]["threads"]["requested"] != b["machine"]["threads"]["requested"]:
        out.append("note: different machines or thread counts; the change mixes code and hardware.")
    out.append("")
    if not rows:
        out.append("no case and contender measured in both runs")
        return "\n".join(out), rows
    wc = max(len("case"), *(len(r[0]) for r in rows))
    out.append(f"{'case'.ljust(wc)}  {'contender':<9}  {names[0]:>9}  {names[1]:>9}  {'change':>8}")
    out.append("  ".join("-" * w for w in (wc, 9, 9, 9, 8)))
    for case, cname, ta, tb, ch in rows:
        flag = "  slower" if ch > 0.05 else ("  faster" if ch < -0.05 else "")
        out.append(f"{case.ljust(wc)}  {cname:<9}  {fmt_time(ta):>9}  {fmt_time(tb):>9}  {100 * ch:+7.1f}%{flag}")
    out.append("")
    out.append("change: B's median time relative to A's (negative = B faster); +-5% is within noise here.")
    missing = sorted(set(a_cases) ^ {c["name"] for c in b["cases"]})
    if missing:
        out.append("in one run only: " + ", ".join(missing))
    return "\n".join(out), rows


def plot(doc, path) -> None:
    """A horizontal bar chart of attnext's speedup over each other contender, per case (log scale)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ImportError('--plot needs matplotlib, the optional extra: pip install "attnext[plot]"') from exc
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    others = [c for c in _present(doc) if c != "attnext"]
    names = [c["name"] for c in doc["cases"]]
    fig = Figure(figsize=(9, 1.2 + 0.45 * max(len(names), 1)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    height = 0.8 / max(len(others), 1)
    colors = {"torch": "#ee4c2c", "reference": "#4c72b0", "attnext-float32": "#55a868", "onnxruntime": "#8172b3",
              "openvino-f32": "#937860", "openvino-bf16": "#da8bc3", "openvino-default": "#8c8c8c"}
    for k, other in enumerate(others):
        ys, xs = [], []
        for i, case in enumerate(doc["cases"]):
            r = case["ratios"].get(f"attnext_vs_{other}")
            if r is not None:
                ys.append(i + (k - (len(others) - 1) / 2) * height)
                xs.append(r)
        if xs:
            ax.barh(ys, xs, height=height, label=f"vs {other}", color=colors.get(other))
            for y, x in zip(ys, xs):
                ax.text(x, y, " " + fmt_ratio(x), va="center", fontsize=7)
    for i, case in enumerate(doc["cases"]):
        res = case["results"].get("attnext", {})
        if res.get("status") != "ok":
            ax.text(1.0, i, f"  attnext {res.get('status', 'skipped')}: {res.get('reason') or ''}", va="center",
                    fontsize=7, color="gray")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("attnext speedup (other's median time / attnext's; > 1 = attnext faster)")
    m = doc["machine"]
    ax.set_title(f"attnext {m['versions']['attnext']} on {m['cpu_model']}, {m['threads']['requested']} threads",
                 fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=120)
