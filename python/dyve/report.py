"""What dyve.bench shows of a summary.json (its layout: docs/bench.md): summary.md
(:func:`render_markdown`), effort.png (:func:`plot_effort`), a tuner's tuning.png
(:func:`plot_tuning`), and the paper-style table of several summaries
(:func:`merge_table`, read back by :func:`parse_table`); and a tuning run's search.md
(:func:`tuning_markdown`, :func:`paper_tuning_markdown`)."""
import json
import os
import sys

import numpy as np

from dyve import files
from dyve.effort import KNOB_NEURONS, KNOBS
from dyve.engines import FILLER_SEED
from dyve.errors import BenchError

NO_WEIGHTS_LABEL = "no weights: dense-path overhead only"

SCHEMA_VERSION = 1

# Keys (and types) every summary.json has; tests and --table rely on them.
REQUIRED_KEYS = {
    "net": str, "images": int, "baseline_top1": (float, type(None)),
    "dyve_top1": (float, type(None)), "ops_dense": int, "ops_executed": int,
    "ops_reduction": float, "speedup": dict, "effort": dict, "timings": dict,
    "accuracy": dict, "machine": dict, "command": str,
}


def _json_default(obj):
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def write_json(path, obj):
    files.write_atomic(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def write_report(summary, out_dir):
    """summary.json, summary.md and effort.png in `out_dir`; tuning.png too when a tuner
    ran for the net (out_dir/tune/search.json)."""
    # summary.json is the record the others belong to: an old one goes first, the new one
    # comes last, so a full disk never leaves a summary without its plot and table.
    os.makedirs(out_dir, exist_ok=True)
    files.remove_if_present(os.path.join(out_dir, "summary.json"))
    plot_effort(summary, os.path.join(out_dir, "effort.png"))
    search = os.path.join(out_dir, "tune", "search.json")
    if os.path.isfile(search):  # a tuner ran for this net: plot its search too
        try:
            plot_tuning(search, os.path.join(out_dir, "tuning.png"))
        except (BenchError, ValueError, TypeError, KeyError) as error:
            print(f"warning: no tuning plot from {search}: {error}", file=sys.stderr)
    files.write_atomic(os.path.join(out_dir, "summary.md"), render_markdown(summary))
    write_json(os.path.join(out_dir, "summary.json"), summary)


def _read_json(path, what):
    if not os.path.isfile(path):
        raise BenchError(f"{what} {path} does not exist" if not os.path.exists(path)
                         else f"{what} {path} is not a file")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise BenchError(f"{path} is not JSON: {error}") from None


def _pct(v, digits=2):
    return "—" if v is None else f"{100 * v:.{digits}f} %"


def _x(v, digits=2):
    return "—" if v is None else f"{v:.{digits}f}×"


def _ms(v):
    if v is None:
        return "—"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _big(v):
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.2f} {unit}"
    return f"{v:.0f}"


def _reference_threads(summary):
    threads = summary.get("threads") or []
    return 1 if 1 in threads else (min(threads) if threads else None)


def _speedup(summary, batch, threads):
    return (summary.get("speedup") or {}).get(str(batch), {}).get(str(threads))


def _dyve_over_onnx(summary, batch, threads):
    """DyVE's time / ONNX Runtime's, or None where ORT was not measured."""
    return (summary.get("dyve_over_onnx") or {}).get(str(batch), {}).get(str(threads))


def _over_onnx(summary, batch, threads):
    """The table cell of _dyve_over_onnx: the ratio, or why there is none."""
    v = _dyve_over_onnx(summary, batch, threads)
    if v is not None:
        return _x(v)
    return "not measured" if summary.get("onnx") else "—"


def _benchmark_label(summary):
    label = summary["net"]
    if not summary.get("weights"):
        label += f" ({NO_WEIGHTS_LABEL})"
    return label


def _paper_row(summary):
    t = _reference_threads(summary)
    batches = summary.get("batches") or []
    sp = " / ".join(_x(_speedup(summary, b, t)) for b in batches)
    top1 = lambda v: _pct(v) if summary.get("weights") else "—"
    return (f"| {_benchmark_label(summary)} | {top1(summary.get('baseline_top1'))} | "
            f"{top1(summary.get('dyve_top1'))} | {_x(summary['ops_reduction'])} | {sp} |")


def _paper_header(summary):
    t = _reference_threads(summary)
    b = " / ".join(f"batch {x}" for x in summary.get("batches") or [])
    return ("| benchmark | baseline top-1 | DyVE top-1 | ops reduction | "
            f"speedup ({b}, {t} thread{'s' if t != 1 else ''}) |\n|---|---|---|---|---|")


def render_markdown(s):
    lines = [f"# DyVE benchmark: {s['net']}", ""]
    if not s.get("weights"):
        lines += [f"**{NO_WEIGHTS_LABEL}**: filler weights (seed {FILLER_SEED}), so accuracy "
                  "is meaningless and omitted; the timings measure the DyVE layers' cost "
                  "against stock Caffe on the same work.", ""]
    lines += [f"Stock `{s['stock']}` vs DyVE `{s['dyve']}`, weights "
              f"`{s.get('weights') or 'none'}`, {s['images']} images of `{s['images_source']}`.",
              "", _paper_header(s), _paper_row(s), ""]
    acc = s["accuracy"]
    if s.get("weights"):
        lines += ["## Accuracy (paired, same images)", "",
                  "| metric | stock | DyVE | DyVE − stock | 95 % CI | right→wrong | wrong→right |"
                  + (" OpenCV |" if s.get("opencv") else ""),
                  "|---|---|---|---|---|---|---|" + ("---|" if s.get("opencv") else "")]
        for k in ("top1", "top5"):
            if k in acc:
                a = acc[k]
                lo, hi = a["diff_ci95"]
                lines.append(f"| {k} | {_pct(a['stock'])} | {_pct(a['dyve'])} | "
                             f"{100 * a['diff']:+.2f} pts | [{100 * lo:+.2f}, {100 * hi:+.2f}] | "
                             f"{a['flips_right_to_wrong']} | {a['flips_wrong_to_right']} |"
                             + (f" {_pct(a.get('opencv'))} |" if s.get("opencv") else ""))
        lines.append("")
    lines += [f"Stock/DyVE top-1 prediction agreement: {_pct(acc['agreement_top1'])}"
              + (f"; stock/OpenCV: {_pct(acc['agreement_top1_opencv'])}"
                 if "agreement_top1_opencv" in acc else "")
              + (f"; stock/ONNX Runtime: {_pct(acc['agreement_top1_onnx'])} (largest "
                 f"|ONNX Runtime − Caffe| of an output {acc['onnx_max_abs_diff']:.2g})"
                 if "agreement_top1_onnx" in acc else "") + ".", ""]

    ort = s.get("onnx")  # ONNX Runtime asked for (measured, or the reason it is not)
    lines += ["## Wall time (ms per image, median of interleaved rounds)", "",
              "| batch | threads | stock Caffe | DyVE | speedup | round speedups (min–max)"
              + (" | OpenCV dnn | stock/OpenCV" if s.get("opencv") else "")
              + (" | ONNX Runtime | stock/ORT | DyVE ÷ ORT" if ort else "") + " |",
              "|---|---|---|---|---|---|" + ("---|---|" if s.get("opencv") else "")
              + ("---|---|---|" if ort else "")]
    for b, per in s["timings"].items():
        for t, tm in per.items():
            ms = tm["ms_per_image"]
            rng = tm.get("round_speedup_range")
            row = (f"| {b} | {t} | {_ms(ms['stock'])} | {_ms(ms['dyve'])} | {_x(tm['speedup'])} "
                   f"| {_x(rng[0]) + '–' + _x(rng[1]) if rng else '—'}")
            if s.get("opencv"):
                row += f" | {_ms(ms.get('opencv'))} | {_x(tm.get('speedup_opencv'))}"
            if ort and s.get("onnx_measured"):
                row += (f" | {_ms(ms.get('onnx'))} | {_x(tm.get('speedup_onnx'))} | "
                        f"{_x(tm.get('dyve_over_onnx'))}")
            elif ort:
                row += " | not measured | — | —"
            lines.append(row + " |")
    lines += ["", f"Timed on the first {s['time_images']} images, {s['repeats']} rounds after a "
              "warm-up; each round runs the engines one batch after the other."
              + (" DyVE ÷ ORT is DyVE's time over ONNX Runtime's (above 1×: DyVE is slower)."
                 if ort else ""), ""]
    if ort and not s.get("onnx_measured"):
        lines += [f"**ONNX Runtime not measured:** {s.get('onnx_status')}", ""]

    eff = s["effort"]
    n = eff["images"]
    lines += ["## Effort per layer (per image, accuracy pass)", "",
              "| layer | DyVE | dense MACs | executed MACs | skipped spet | exact | sdss | sfma "
              "| overhead ops | ops reduction |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in eff["layers"].items():
        dense = r["macs_dense"]
        sk = " | ".join(f"{100 * r['macs_skipped'][k] / dense:.1f} %" if dense else "—"
                        for k in KNOBS)
        lines.append(f"| {name} | {'yes' if r['dyve'] else 'no'} | {_big(dense / n)} | "
                     f"{_big(r['macs_executed'] / n)} | {sk} | "
                     f"{_big(sum(r['ops_overhead'].values()) / n)} | {_x(r['ops_reduction'])} |")
    lines += ["", f"Ops reduction: DyVE layers only {_x(s['ops_reduction_dyve_layers'], 3)}, "
              f"whole net {_x(s['ops_reduction'], 3)} ({_big(s['ops_dense_per_image'])} → "
              f"{_big(s['ops_executed_per_image'])} ops per image).", "",
              "| knob | MACs skipped | overhead ops | net saved | share of dense ops | neurons |",
              "|---|---|---|---|---|---|"]
    for k, r in eff["knobs"].items():
        lines.append(f"| {k} | {_big(r['macs_skipped'] / n)} | {_big(r['ops_overhead'] / n)} | "
                     f"{_big(r['net_ops_saved'] / n)} | {100 * r['share_of_dense']:.2f} % | "
                     f"{KNOB_NEURONS[k]} {_big(r[KNOB_NEURONS[k]] / n)} |")
    lines += ["", "## Per layer wall time (DyVE layer vs the stock layer it replaces)", "",
              "The stock time includes the in-place ReLU after the layer when the DyVE "
              "layer fuses it (`relu: true`).", "",
              "| batch | threads | layer | stock ms | DyVE ms | speedup | ops reduction | "
              "skipping efficiency |", "|---|---|---|---|---|---|---|---|"]
    for b, per in s["timings"].items():
        for t, tm in per.items():
            for name, r in tm["layers"].items():
                eff_v = r["skipping_efficiency"]
                lines.append(f"| {b} | {t} | {name} | {_ms(r['stock_ms'])} | {_ms(r['dyve_ms'])}"
                             f" | {_x(r['speedup'])} | {_x(r['ops_reduction'])} | "
                             f"{'—' if eff_v is None else f'{eff_v:.2f}'} |")
    m = s["machine"]
    ob = m.get("openblas") or {}
    lines += ["", "## Machine", "",
              f"* CPU: {m.get('cpu_model')}, {m.get('cores')} cores "
              f"({', '.join(m.get('cpu_flags') or [])})",
              f"* OpenBLAS: {ob.get('config')} ({ob.get('library')}); threads per run: "
              + ", ".join(f"{t} → OpenBLAS {per.get('openblas_threads')}"
                          for t, per in next(iter(s['timings'].values()), {}).items()),
              f"* OpenCV {m.get('opencv')}, numpy {m.get('numpy')}, Python {m.get('python')}"
              + (f"; ONNX Runtime {s['onnxruntime']} (build/onnx-venv, intra-op threads = "
                 "the OpenBLAS thread count)" if s.get("onnxruntime") else ""),
              f"* load average at start {m.get('loadavg')} (shared machine: compare ratios, "
              "not absolute times)", "", "## Command", "", f"    {s['command']}", ""]
    if s.get("warnings"):
        lines += ["## Warnings", ""] + [f"* {w}" for w in s["warnings"]] + [""]
    return "\n".join(lines)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save_png(plt, fig, out_png):
    fig.tight_layout()
    try:
        with files.atomic_path(out_png) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)


def plot_effort(summary, out_png):
    """Stacked bars per layer (per image): MACs executed, skipped by each knob, and the
    knobs' overhead ops; non-DyVE conv/fc layers in grey."""
    plt = _pyplot()
    eff = summary["effort"]
    n = eff["images"]
    names = list(eff["layers"])
    rows = [eff["layers"][k] for k in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(names) + 2), 4.5))
    executed = np.array([r["macs_executed"] / n for r in rows]) / 1e6
    colors = ["tab:blue" if r["dyve"] else "tab:gray" for r in rows]
    ax.bar(x, executed, color=colors, label="MACs executed")
    if not all(r["dyve"] for r in rows):
        ax.bar([0], [0], color="tab:gray", label="MACs, non-DyVE layer")  # legend entry
    bottom = executed.copy()
    for k, color in zip(KNOBS, ("tab:orange", "tab:green", "tab:red", "tab:purple")):
        vals = np.array([r["macs_skipped"][k] / n for r in rows]) / 1e6
        if vals.any():
            ax.bar(x, vals, bottom=bottom, color=color, alpha=0.6, label=f"skipped: {k}")
            bottom += vals
    over = np.array([sum(r["ops_overhead"].values()) / n for r in rows]) / 1e6
    if over.any():
        ax.bar(x + 0.3, over, width=0.25, color="black", label="overhead ops")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=45 if len(names) > 8 else 0, ha="right"
                       if len(names) > 8 else "center")
    ax.set_ylabel("M ops per image")
    title = f"{summary['net']}: ops reduction {summary['ops_reduction']:.2f}× (whole net)"
    if not summary.get("weights"):
        title += f"\n({NO_WEIGHTS_LABEL})"
    ax.set_title(title)
    ax.legend(fontsize=8)
    _save_png(plt, fig, out_png)


def _required(d, path, where, *keys):
    """The values of `keys` in `d`, the object at `where` in the search.json `path`; an
    error naming the file and the key when one is missing."""
    for key in keys:
        if not isinstance(d, dict) or key not in d:
            raise BenchError(f"{path}: no key '{where}{key}' (not a search.json written by "
                             "dyve.tune?)")
    return [d[key] for key in keys]


def plot_tuning(search_json_path, out_png):
    """Accuracy loss vs ops saved of every setting dyve.tune tried, from its search.json.

    Reads ``evaluations`` (records with "ops" per image of the DyVE layers, "loss",
    "subset", "accepted"; those of subset "holdout" are drawn apart from the search
    points), ``baseline.dense_macs`` (ops saved are in % of it), ``config.budget``,
    ``units.loss`` and the chosen setting ``summary.final_ops`` / ``summary.search_loss``.
    Returns the number of search points plotted.
    """
    path = search_json_path
    doc = _read_json(path, "search json")
    if not isinstance(doc, dict):
        raise BenchError(f"{path}: a JSON {type(doc).__name__}, not the object dyve.tune "
                         "writes")
    evaluations, baseline, config, summary, units = _required(
        doc, path, "", "evaluations", "baseline", "config", "summary", "units")
    if not isinstance(evaluations, list):
        raise BenchError(f"{path}: 'evaluations' is not a list")
    dense, = _required(baseline, path, "baseline.", "dense_macs")
    if not isinstance(dense, (int, float)) or dense <= 0:
        raise BenchError(f"{path}: baseline.dense_macs is {dense!r}, not a positive count")
    budget, = _required(config, path, "config.", "budget")
    unit, = _required(units, path, "units.", "loss")
    final_ops, = _required(summary, path, "summary.", "final_ops")

    def saved(ops):
        return 100.0 * (1.0 - ops / dense)

    pts, holdout = [], []
    for i, e in enumerate(evaluations):
        ops, loss, subset, accepted = _required(e, path, f"evaluations[{i}].", "ops", "loss",
                                                "subset", "accepted")
        (holdout if subset == "holdout" else pts).append(
            (saved(ops), float(loss), bool(accepted)))
    if not pts:
        raise BenchError(f"{path}: no search evaluation to plot (only holdout checks, or "
                         "none)")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    xs = np.array([p[0] for p in pts])
    ys = np.array([p[1] for p in pts])
    acc = np.array([p[2] for p in pts])
    ax.scatter(xs[~acc], ys[~acc], s=14, color="tab:gray", alpha=0.6, label="tried")
    if acc.any():
        ax.scatter(xs[acc], ys[acc], s=24, color="tab:blue", label="accepted")
    if holdout:
        ax.scatter([p[0] for p in holdout], [p[1] for p in holdout], s=40, marker="D",
                   facecolors="none", edgecolors="tab:green", label="holdout check")
    # Pareto front: the points no other point beats on both saving and loss.
    front, best = [], -np.inf
    for i in np.lexsort((-xs, ys)):  # by loss, then by saving descending
        if xs[i] > best:
            best = xs[i]
            front.append(i)
    if len(front) > 1:
        ax.step(xs[front], ys[front], where="pre", color="tab:blue", lw=1, alpha=0.7,
                label="Pareto front")
    ax.axhline(budget, color="tab:red", ls="--", lw=1, label=f"budget {budget:g}")
    if final_ops is not None and summary.get("search_loss") is not None:
        ax.scatter([saved(final_ops)], [summary["search_loss"]], marker="*", s=160,
                   color="tab:orange", zorder=3, label="chosen")
    ax.set_xlabel("ops saved (% of dense)")
    ax.set_ylabel(f"accuracy loss ({unit})")
    net_dir = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    ax.set_title(f"tuning search: {os.path.basename(net_dir) or path}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save_png(plt, fig, out_png)
    return len(pts)


# ----------------------------------------------------------------------------- tables

TABLE_COLUMNS = ("net", "protocol", "weights", "images", "baseline_top1", "dyve_top1",
                 "delta_top1", "delta_ci_low", "delta_ci_high", "ops_reduction", "speedup_b1",
                 "speedup_bN", "N", "threads", "dyve_over_ort_b1", "dyve_over_ort_bN")


def load_summary(path):
    s = _read_json(path, "summary")
    missing = [k for k in REQUIRED_KEYS if k not in s]
    if missing:
        raise BenchError(f"{path} is not a dyve.bench summary (missing {', '.join(missing)})")
    return s


def merge_table(paths):
    """(markdown, plain text) paper-style table of several summary.json files."""
    summaries = [load_summary(p) for p in paths]
    md = ["# DyVE results", "", "| benchmark | tuning protocol | baseline top-1 | DyVE top-1 | "
          "change (95 % CI) | ops reduction | speedup (batch 1, 1 thread) | "
          "speedup (batch N, 1 thread) | N | DyVE ÷ ONNX Runtime (batch 1 / N, 1 thread) |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for s in summaries:
        t = _reference_threads(s)
        bn = max(s.get("batches") or [1])
        has = bool(s.get("weights"))
        top1 = lambda v: _pct(v) if has else "—"
        ci = (s.get("accuracy", {}).get("top1") or {}).get("diff_ci95") if has else None
        change = "—" if ci is None else (f"{100 * (s['dyve_top1'] - s['baseline_top1']):+.2f} "
                                         f"[{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}] pp")
        md.append(f"| {_benchmark_label(s)} | {s.get('protocol') or '—'} | "
                  f"{top1(s.get('baseline_top1'))} | {top1(s.get('dyve_top1'))} | {change} | "
                  f"{_x(s['ops_reduction'])} | "
                  f"{_x(_speedup(s, 1, t))} | {_x(_speedup(s, bn, t))} | {bn} | "
                  f"{_over_onnx(s, 1, t)} / {_over_onnx(s, bn, t)} |")
        num = lambda v, f: "-" if v is None else f.format(v)
        b1, d1 = (s.get("baseline_top1"), s.get("dyve_top1")) if has else (None, None)
        rows.append({
            "net": s["net"], "protocol": s.get("protocol") or "-",
            "weights": "yes" if has else "none", "images": str(s["images"]),
            "baseline_top1": num(100 * b1 if b1 is not None else None, "{:.2f}"),
            "dyve_top1": num(100 * d1 if d1 is not None else None, "{:.2f}"),
            "delta_top1": num(100 * (d1 - b1) if None not in (b1, d1) else None, "{:+.2f}"),
            "delta_ci_low": num(None if ci is None else 100 * ci[0], "{:+.2f}"),
            "delta_ci_high": num(None if ci is None else 100 * ci[1], "{:+.2f}"),
            "ops_reduction": f"{s['ops_reduction']:.3f}",
            "speedup_b1": num(_speedup(s, 1, t), "{:.3f}"),
            "speedup_bN": num(_speedup(s, bn, t), "{:.3f}"),
            "N": str(bn), "threads": str(t),
            "dyve_over_ort_b1": num(_dyve_over_onnx(s, 1, t), "{:.3f}"),
            "dyve_over_ort_bN": num(_dyve_over_onnx(s, bn, t), "{:.3f}")})
    md += ["", "Every batch/thread combination (ms per image, median of interleaved rounds; "
           "speedup = stock Caffe / DyVE; DyVE ÷ ORT = DyVE's time over ONNX Runtime's):", "",
           "| benchmark | batch | threads | stock ms | DyVE ms | speedup | OpenCV ms | "
           "ONNX Runtime ms | DyVE ÷ ORT |",
           "|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        for b, per in s["timings"].items():
            for t, tm in per.items():
                ms = tm["ms_per_image"]
                md.append(f"| {s['net']} | {b} | {t} | {_ms(ms['stock'])} | {_ms(ms['dyve'])} | "
                          f"{_x(tm['speedup'])} | {_ms(ms.get('opencv'))} | "
                          f"{_ms(ms.get('onnx'))} | {_x(tm.get('dyve_over_onnx'))} |")
    widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in TABLE_COLUMNS}
    plain = ["# dyve.bench table: top-1 in %, delta (and its 95 % interval) in points, "
             "speedup = stock/DyVE at batch 1 and batch N with `threads` OpenBLAS threads; "
             "dyve_over_ort = DyVE's time / ONNX Runtime's; '-' = not measured",
             "  ".join(c.ljust(widths[c]) for c in TABLE_COLUMNS)]
    plain += ["  ".join(r[c].ljust(widths[c]) for c in TABLE_COLUMNS).rstrip() for r in rows]
    return "\n".join(md) + "\n", "\n".join(plain) + "\n"


def parse_table(text):
    """Rows of merge_table's plain-text table as dicts (numbers as float/int, '-' as None)."""
    rows, header = [], None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cells = line.split()
        if header is None:
            header = cells
            continue
        if len(cells) != len(header):
            raise ValueError(f"table row has {len(cells)} cells, header {len(header)}: {line!r}")
        row = {}
        for k, v in zip(header, cells):
            if v == "-":
                row[k] = None
            elif k in ("images", "N", "threads"):
                row[k] = int(v)
            elif k in ("net", "protocol", "weights"):
                row[k] = v
            else:
                row[k] = float(v)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- tuning

def _fmt_knobs(c):
    parts = []
    spet = c.get("spet", {})
    if spet.get("enabled"):
        gate = f" bound×{spet['bound_scale']:g}" if spet.get("gate") == "BOUND" else ""
        parts.append(f"SPET f={spet['fraction']:g} T={spet['threshold']:g}{gate}")
    if spet.get("exact"):
        parts.append("exact")
    if "sdss" in c:
        parts.append(f"SDSS s={c['sdss']['stride']} T={c['sdss']['threshold']:g}")
    if "sfma" in c:
        parts.append(f"SFMA T={c['sfma']['threshold']:g}")
    return ", ".join(parts) or "off"


def tuning_markdown(result):
    """search.md of a dyve.tune run (certified protocol): the final settings and the key
    numbers."""
    s = result.get("summary", {})
    b = result.get("baseline", {})
    lines = [f"# DyVE tuning: {result.get('net') or result['model']}", ""]
    if result.get("interrupted"):
        lines += [f"**Interrupted** during {result['interrupted_in']}: the settings below "
                  "are the best accepted so far" + ("" if s.get("holdout_verified")
                                                   else " (not verified on the holdout)")
                  + ".", ""]
    cfg = result["config"]
    lines += [f"- model `{result['model']}`, weights `{result['weights']}`",
              f"- calibration `{result['calib']['path']}`: {result['images']['search']} search + "
              f"{result['images']['holdout']} holdout images (seed {cfg['seed']})",
              (f"- budget {cfg['budget']} pp top-1 on the holdout's measured loss "
               f"(--certify estimate; its UCB at {100 * cfg['confidence']:g} % reported)"
               if cfg.get("certify") == "estimate" else
               f"- budget {cfg['budget']} pp top-1 at {100 * cfg['confidence']:g} % "
               f"confidence (one-sided UCB, z = {cfg['z']:.3f})")
              + f"; knobs {', '.join(result['knobs'])}",
              f"- {result['n_evaluations']} evaluations in {result['elapsed_s']:.0f} s"]
    greedy = result.get("greedy", {})
    if greedy.get("stopped_by") == "search time":
        lines.append(f"- the greedy stopped at the search time ({cfg['search_time']:g} s) "
                     f"after {greedy['rounds']} round(s); the steps accepted by then were "
                     "certified")
    if b:
        lines.append(f"- baseline top-1 {b['accuracy']:.2f} % on the calibration images")
    lines.append("")
    lines += ["| layer | tuned settings | ops/image: dense | exact floor | tuned |",
              "|---|---|---|---|---|"]
    per = [b.get("ops_per_layer", {}), result.get("floor", {}).get("ops_per_layer", {}),
           s.get("final_ops_per_layer", {})]
    for name, c in result["final_settings"].items():
        cells = [f"{p[name] / 1e6:.3f} M" if name in p else "" for p in per]
        lines.append(f"| {name} | {_fmt_knobs(c)} | {' | '.join(cells)} |")
    lines.append("")
    if s.get("final_ops"):
        lines += ["| ops per image (DyVE layers) | value |", "|---|---|",
                  f"| dense | {s['dense_ops'] / 1e6:.3f} M |",
                  f"| exact floor | {s['floor_ops'] / 1e6:.3f} M |",
                  f"| tuned (search images) | {s['final_ops'] / 1e6:.3f} M |",
                  f"| reduction vs dense | {s['reduction_vs_dense']:.2f}x "
                  f"(whole net {s['reduction_vs_dense_whole_net']:.2f}x) |", ""]
    h = s.get("holdout")
    if h:
        conf = 100 * cfg["confidence"]
        verdict = "passed" if s.get("holdout_verified") else "over budget"
        lines += [f"Holdout ({result['images']['holdout']} images): loss {h['loss']:+.2f} pp "
                  f"({conf:g} % CI [{h['ci_low']:+.2f}, {h['ci_high']:+.2f}], UCB "
                  f"{h['ucb']:.2f}), {h['n_rw']} right->wrong, {h['n_wr']} wrong->right; "
                  f"{verdict}; {result['holdout']['undone_steps']} greedy step(s) undone.", ""]
    steps = result.get("greedy", {}).get("steps", [])
    if steps:
        lines += ["Greedy steps on the search images (loss and bounds cumulative, vs the "
                  "dense net; gate = max(loss, 0) + z*SE projected to the holdout's size is "
                  "what the search accepts on):", "",
                  "| step | layer | knob | setting | ops/image | right->wrong / wrong->right "
                  "| loss (pp) | UCB (pp) | gate (pp) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for i, st in enumerate(steps, 1):
            setting = _fmt_knobs({st["knob"]: st["set"]})
            lines.append(f"| {i} | {st['layer']} | {st['knob']} | {setting} | "
                         f"{st['ops'] / 1e6:.3f} M | {st['n_rw']} / {st['n_wr']} | "
                         f"{st['loss']:+.2f} | {st['ucb']:.2f} | {st['gate']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def paper_tuning_markdown(result):
    """search.md of a `dyve.tune --protocol paper` run."""
    s, b, cfg = result["summary"], result["baseline"], result["config"]
    r = s["report"]
    lines = [f"# DyVE tuning, the paper's protocol: {result.get('net') or result['model']}",
             "",
             f"- model `{result['model']}`, weights `{result['weights']}`",
             f"- tuned on {result['images']['tune']} test images ({100 * cfg['tune_fraction']:g} "
             f"%, seed {cfg['seed']}), reported on the other {result['images']['report']}",
             f"- budget: top-1 loss < {cfg['budget']} pp on the tuning images (no confidence "
             "bound, as in the paper)",
             f"- threshold ranges from {cfg['train_sample']} images of `{result['train_images']}`",
             f"- {result['n_evaluations']} evaluations in {result['elapsed_s']:.0f} s",
             f"- dense top-1 {b['accuracy_report']:.2f} % on the report images", "",
             "| layer | SFMA variance, kernel sum | SDSS max, range | SPET threshold |",
             "|---|---|---|---|"]
    fmt = lambda v: "off" if v is None else (", ".join(f"{x:g}" for x in v)
                                             if isinstance(v, (list, tuple)) else f"{v:g}")
    for name, t in result["thresholds"].items():
        lines.append(f"| {name} | {fmt(t['sfma'])} | {fmt(t['sdss'])} | {fmt(t['spet'])} |")
    lines += ["", f"Report images: loss {r['loss']:+.2f} pp (95 % CI [{r['ci_low']:+.2f}, "
                  f"{r['ci_high']:+.2f}]), {r['n_rw']} right->wrong, {r['n_wr']} "
                  f"wrong->right; ops reduction {s['reduction_vs_dense']:.2f}x in the DyVE "
                  f"layers ({s['reduction_vs_dense_whole_net']:.2f}x whole net). Tuning "
                  f"images: loss {s['tune']['loss']:+.2f} pp.", ""]
    return "\n".join(lines)
