"""The accuracy-per-operation frontier of tuning runs (``python3 -m dyve.frontier``).

For each tuning run (a search.json of dyve.tune, either protocol) the settings its search
evaluated are reduced to their Pareto front in (ops, loss on the search's own images); each
front point, and the run's chosen setting, is then measured on the report images (the test
set; for the paper's protocol without its tuning images): ops reduction against the dense
net and top-1 loss with its 95 % interval. Writes frontier.json (every point with its
settings, so that ``dyve.tune --pick`` can turn any of them into a prototxt) and
frontier.png (the points, the chosen ones and the paper's 2.1-2.6x band).
"""
import argparse
import json
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("GLOG_minloglevel", "2")

import numpy as np

from dyve import caffe_io, files, parallel, stats, tuned
from dyve import settings as dyve_settings
from dyve.errors import DyveError, InputError
from dyve.evaluator import Evaluator

PAPER_BAND = (2.1, 2.6)   # the paper's ops reductions at < 0.5 % loss
MAX_POINTS = 10           # front points measured per run (evenly spread along the front)


def read_search(path):
    """A search.json of dyve.tune, checked for what the frontier reads."""
    try:
        with open(path) as f:
            doc = json.load(f)
        doc["evaluations"], doc["final_settings"], doc["baseline"]["dense_macs"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(f"--search: {path} is not a search.json of dyve.tune "
                         f"({type(error).__name__}: {error})") from None
    return doc


def front_points(doc, max_points=MAX_POINTS):
    """[(search record, ...)] of the Pareto front of a search's evaluations: no other
    evaluated setting has fewer-or-equal ops and a lower-or-equal loss; least
    aggressive first, at most `max_points` spread evenly."""
    records = [r for r in doc["evaluations"]
               if r.get("subset") in ("search", "tune") and r.get("loss") is not None
               and r.get("stage") != "sweep"]
    records.sort(key=lambda r: (r["ops"], r["loss"], r["id"]))
    front, best = [], np.inf
    for r in records:  # by ops ascending: keep a point when its loss beats every cheaper
        if r["loss"] < best - 1e-12:
            front.append(r)
            best = r["loss"]
    front.reverse()  # least aggressive (most ops) first
    if len(front) > max_points:
        keep = np.unique(np.linspace(0, len(front) - 1, max_points).round().astype(int))
        front = [front[i] for i in keep]
    return front


def full_settings(compact, dyve_layers, base):
    """Normalized settings of every DyVE layer from a record's compact settings."""
    return {n: dyve_settings.normalize(dict(compact[n], relu=True)) if n in compact
            else base[n] for n in dyve_layers}


def measure(model, weights, images, mean, runs, batch=100, exclude=None, progress=True,
            max_images=None, workers=1):
    """{run name: {"points": [...], "chosen": {...}}} of each run's front and chosen
    setting on the report images; `runs` = {name: search.json document}; `exclude`:
    {name: image indices that run tuned on} (left out of its measurement); `workers`:
    local worker processes (dyve.parallel; the same numbers for any count)."""
    net_param, _ = caffe_io.dyve_net_param(model)
    net = caffe_io.load_net(net_param, weights, model_name=model)
    shape = tuple(net.blobs[caffe_io.input_blob(net)].data.shape[1:])
    x, labels = caffe_io.load_images(images, shape, mean, max_images)
    caffe_io.check_labels(labels, net.blobs[caffe_io.output_blob(net)].data[0].size, images)
    batch = min(batch, len(x), caffe_io.max_batch(shape))
    net_spec = parallel.net_spec(net_param, weights, model)
    out = {}
    for name, doc in runs.items():
        keep = np.ones(len(x), bool)
        if exclude and name in exclude:
            tuned_on = np.asarray(exclude[name], np.int64)
            keep[tuned_on[tuned_on < len(x)]] = False
        idx = np.nonzero(keep)[0]
        ev = Evaluator(net, x, batch, idx, [], cache_mb=0, progress=progress,
                       workers=workers, net_spec=net_spec)
        try:
            out[name] = _measure_run(ev, name, doc, labels[idx])
        finally:
            ev.close()
    return out


def _measure_run(ev, name, doc, y):
    """One run's front points and chosen setting, measured by `ev` on its images `y`."""
    dense = ev.evaluate(ev.base, "search", desc=f"{name}: dense")
    ref = dense["preds"] == y
    dense_ops = sum(dense["effort"][n]["macs_dense"] for n in ev.dyve) / dense["n"]

    def point(compact, source):
        res = ev.evaluate(full_settings(compact, ev.dyve, ev.base), "search",
                          desc=f"{name}: point")
        st = stats.paired(ref, res["preds"] == y, 0.95, unit=100.0)
        return {"settings": compact, "ops": res["ops"],
                "ops_reduction": dense_ops / res["ops"],
                **{k: st[k] for k in ("loss", "ci_low", "ci_high", "n_rw", "n_wr")},
                **source}

    points = [point(r["settings"], {"record": r["id"], "search_loss": r["loss"],
                                    "search_ops": r["ops"]})
              for r in front_points(doc)]
    chosen = point(doc["final_settings"], {"record": None})
    for i, p in enumerate(points):
        p["id"] = f"{name}:{i}"
    chosen["id"] = f"{name}:chosen"
    return {"points": points, "chosen": chosen, "images": int(len(y)),
            "dense_top1": 100.0 * float(ref.mean()), "dense_ops": dense_ops}


def plot(frontier, out_png, title):
    from dyve.report import _pyplot, _save_png
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.axvspan(*PAPER_BAND, color="tab:green", alpha=0.12, label="paper: 2.1-2.6x")
    for (name, run), color in zip(frontier["runs"].items(),
                                  ("tab:blue", "tab:orange", "tab:purple", "tab:brown")):
        pts = sorted(run["points"], key=lambda p: p["ops_reduction"])
        xs = [p["ops_reduction"] for p in pts]
        ax.errorbar(xs, [p["loss"] for p in pts],
                    yerr=[[p["loss"] - p["ci_low"] for p in pts],
                          [p["ci_high"] - p["loss"] for p in pts]],
                    fmt="o-", ms=4, lw=1, capsize=2, color=color, alpha=0.8,
                    label=f"{name}: search front")
        c = run["chosen"]
        ax.scatter([c["ops_reduction"]], [c["loss"]], marker="*", s=180, color=color,
                   edgecolors="black", zorder=4, label=f"{name}: chosen")
    ax.axhline(0.5, color="tab:red", ls="--", lw=1, label="0.5 pp")
    ax.set_xlabel("ops reduction vs the dense net (DyVE layers)")
    ax.set_ylabel("top-1 loss on the report images (pp, 95 % CI)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save_png(plt, fig, out_png)


def write(frontier, out_dir, title):
    """frontier.png, then frontier.json (the record the plot belongs to)."""
    os.makedirs(out_dir, exist_ok=True)
    files.remove_if_present(os.path.join(out_dir, "frontier.json"))
    plot(frontier, os.path.join(out_dir, "frontier.png"), title)
    files.write_atomic(os.path.join(out_dir, "frontier.json"),
                       json.dumps(tuned.jsonable(frontier), indent=1) + "\n")


def find_point(frontier_path, point_id):
    """The compact settings of point `point_id` (e.g. 'paper:3', 'certified:chosen')."""
    try:
        with open(frontier_path) as f:
            doc = json.load(f)
        runs = doc["runs"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(f"--frontier: {frontier_path} is not a frontier.json "
                         f"({type(error).__name__}: {error})") from None
    ids = []
    for run in runs.values():
        for p in run["points"] + [run["chosen"]]:
            ids.append(p["id"])
            if p["id"] == point_id:
                return p
    raise InputError(f"--pick: no point '{point_id}' in {frontier_path} (points: "
                     f"{', '.join(ids)})")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python3 -m dyve.frontier", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the DyVE deploy prototxt tuned")
    parser.add_argument("--weights", required=True, help="its caffemodel")
    parser.add_argument("--images", required=True, help="the report images (test set)")
    parser.add_argument("--mean", help="mean.binaryproto, or per-channel values 'b,g,r'")
    parser.add_argument("--search", action="append", required=True, metavar="NAME=JSON",
                        help="a tuning run's search.json, named (repeatable)")
    parser.add_argument("--batch", type=int, default=100, help="default %(default)s")
    parser.add_argument("--max-images", type=int, help="measure on the first N report "
                        "images only (default: all)")
    parser.add_argument("--out-dir", required=True, help="where frontier.json/.png go")
    parser.add_argument("--title", help="plot title (default: the model's name)")
    parser.add_argument("--workers", type=int, default=parallel.default_workers(),
                        help="local worker processes, one OpenBLAS thread each (default: "
                             "the cores; the same numbers for any count, docs/parallel.md)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    try:
        runs, exclude = {}, {}
        for item in args.search:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise InputError(f"--search wants NAME=search.json, got {item!r}")
            runs[name] = read_search(path)
            if runs[name].get("protocol") == "paper":
                exclude[name] = runs[name]["tune_indices"]
        files.ensure_writable_dir(args.out_dir)
        measured = measure(args.model, args.weights, args.images, args.mean, runs,
                           args.batch, exclude, progress=not args.quiet,
                           max_images=args.max_images, workers=args.workers)
        frontier = {"model": args.model, "weights": args.weights, "images": args.images,
                    "paper_band": list(PAPER_BAND), "runs": measured,
                    "searches": {n: item.partition("=")[2] for n, item in
                                 zip(runs, args.search)}}
        write(frontier, args.out_dir, args.title or os.path.basename(args.model))
    except DyveError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for name, run in measured.items():
        c = run["chosen"]
        print(f"{name}: chosen {c['ops_reduction']:.2f}x at {c['loss']:+.2f} pp "
              f"[{c['ci_low']:+.2f}, {c['ci_high']:+.2f}] on {run['images']} images; "
              f"{len(run['points'])} front points")
    print(f"wrote {os.path.join(args.out_dir, 'frontier.json')}, frontier.png",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
