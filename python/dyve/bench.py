"""Side-by-side benchmark of a stock Caffe net and its DyVE form (``python3 -m dyve.bench``),
with OpenCV dnn (--opencv) and ONNX Runtime (--onnx: the stock net exported by
dyve.export_onnx, run in build/onnx-venv) beside them.

With the same weights on the same images: accuracy (paired flips, 95 % interval), the DyVE
effort counters as operation counts, and interleaved wall-time medians per batch size and
OpenBLAS thread count (dyve.timing), written as summary.json, summary.md and effort.png
(dyve.report). The operation counts, the timing method, the no-weights mode and the
summary.json layout are in docs/bench.md.
"""
import argparse
import datetime
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time

import numpy as np

os.environ.setdefault("GLOG_minloglevel", "2")  # before Caffe loads: no net-init log
if __name__ == "__main__" and any(a == "--ray" or a.startswith("--ray=") for a in sys.argv):
    # Ray's pinned dependencies (build/ray-site) must load before any Debian copy of them
    from dyve.parallel import import_ray  # noqa: E402
    import_ray()

from dyve import caffe_io, engines, export_onnx, files, live, parallel, stats  # noqa: E402
from dyve import effort as dyve_effort  # noqa: E402
from dyve import settings as dyve_settings  # noqa: E402
from dyve.errors import BenchError, DyveError  # noqa: E402
from dyve.machine import _loadavg, machine_facts  # noqa: E402
from dyve.report import NO_WEIGHTS_LABEL  # noqa: E402
from dyve.tools import REPO_ROOT  # noqa: E402

# At or under this many times chance, a baseline's top-1 means wrong weights or inputs.
CHANCE_FACTOR = 2.0


def _progress(iterable=None, **kwargs):
    from tqdm import tqdm
    return tqdm(iterable, disable=None, **kwargs)  # a bar on a terminal only


# ----------------------------------------------------------------------------- nets

def check_net_pair(stock_param, dyve_param, stock_path, dyve_path):
    """Before building: the same layer names in the same order, and types that are equal
    or a stock layer and its DyVE counterpart."""
    a = [(l.name, l.type) for l in stock_param.layer]
    b = [(l.name, l.type) for l in dyve_param.layer]
    names_a, names_b = [n for n, _ in a], [n for n, _ in b]
    if names_a != names_b:
        only_a = [n for n in names_a if n not in names_b]
        only_b = [n for n in names_b if n not in names_a]
        detail = []
        if only_a:
            detail.append(f"only in the stock net: {', '.join(only_a)}")
        if only_b:
            detail.append(f"only in the DyVE net: {', '.join(only_b)}")
        if not detail:
            detail.append("same names in a different order")
        raise BenchError(f"stock {stock_path} and DyVE {dyve_path} have different layers ("
                         + "; ".join(detail) + ")")
    for (name, ta), (_, tb) in zip(a, b):
        if ta != tb and dyve_settings.STOCK_TO_DYVE.get(ta) != tb:
            raise BenchError(f"layer '{name}' is {ta} in the stock net {stock_path} but {tb} "
                             f"in the DyVE net {dyve_path}")


def check_built_pair(stock, dyve, stock_path, dyve_path):
    """After building (no weights yet): equal parameter and blob shapes."""
    for name, params in stock.params.items():
        ours = [tuple(p.data.shape) for p in params]
        theirs = [tuple(p.data.shape) for p in dyve.params.get(name, [])] \
            if name in dyve.params else None
        if ours != theirs:
            raise BenchError(f"layer '{name}': parameter shapes {ours} in the stock net "
                             f"{stock_path} but {theirs} in the DyVE net {dyve_path}")
    for name, blob in stock.blobs.items():
        if name not in dyve.blobs or dyve.blobs[name].data.shape != blob.data.shape:
            other = dyve.blobs[name].data.shape if name in dyve.blobs else "missing"
            raise BenchError(f"blob '{name}': shape {blob.data.shape} in the stock net "
                             f"{stock_path} but {other} in the DyVE net {dyve_path}")


def load_nets(stock_path, dyve_path, weights, tmp_dir):
    """Build both nets, check them against each other and the weights, load the weights.

    Returns (stock, dyve, weights_file) where weights_file is `weights` or, without it, a
    temporary caffemodel of the filled stock net (also used by the workers and OpenCV).
    """
    stock_param = caffe_io.read_net_param(stock_path, "--stock")
    dyve_param = caffe_io.read_net_param(dyve_path, "--dyve")
    check_net_pair(stock_param, dyve_param, stock_path, dyve_path)
    if not caffe_io.has_dyve_layers(dyve_param):
        raise BenchError(f"--dyve: {dyve_path} has no DyveConvolution / DyveInnerProduct "
                         "layer")
    stock = caffe_io.load_net(stock_path)
    dyve = caffe_io.load_net(dyve_path)
    check_built_pair(stock, dyve, stock_path, dyve_path)
    if weights:
        for net, path in ((stock, stock_path), (dyve, dyve_path)):
            caffe_io.check_weights(net, weights, "--weights", path)
            net.copy_from(weights)
            caffe_io.check_finite(net, weights)
        return stock, dyve, weights
    engines.fill_weights(stock)
    path = os.path.join(tmp_dir, "filler_weights.caffemodel")
    stock.save(path)
    dyve.copy_from(path)
    return stock, dyve, path


# ----------------------------------------------------------------------------- accuracy

def paired_entry(correct_ref, correct_new):
    """summary.json's paired comparison of two engines (fractions; diff = new - ref, the
    negative of stats.paired's loss, with its 95 % interval)."""
    st = stats.paired(correct_ref, correct_new, 0.95)
    return {"ref": st["acc_ref"], "new": st["acc_new"], "diff": -st["loss"], "se": st["se"],
            "diff_ci95": [-st["ci_high"], -st["ci_low"]],
            "flips_right_to_wrong": st["n_rw"], "flips_wrong_to_right": st["n_wr"]}


def accuracy_pass(stock, dyve, images, labels, batch, cv_net=None, ort=None, backend=None):
    """Scores of every engine over `images` (batches of `batch`) and the DyVE effort.
    `ort`: an export_onnx.OrtRunner of the stock net (ONNX Runtime), or None.
    `backend` (dyve.parallel): the stock and DyVE nets run on its workers, in shards of
    whole batches merged in batch order, so the scores and counters are those of the
    serial pass bit for bit; OpenCV and ONNX Runtime stay in this process."""
    live.reset_effort(dyve)
    scores, effort = {}, None
    if backend is not None:
        bar = _progress(total=len(images), desc="accuracy pass (workers)", unit=" img")
        try:
            scores, effort = parallel.scores_pass(
                backend, len(images), batch, ("stock", "dyve"), "dyve", bar.update)
        finally:
            bar.close()
    # The engines run here, batch by batch: the Caffe nets unless the workers ran them.
    here = {} if backend is not None else {"stock": lambda x: caffe_io.forward(stock, x),
                                          "dyve": lambda x: caffe_io.forward(dyve, x)}
    if cv_net is not None:
        here["opencv"] = lambda x: engines.opencv_forward(cv_net, x)
    if ort is not None:
        def onnx_forward(x):
            out = ort.run(x, [caffe_io.output_blob(stock)])
            return next(iter(out.values())).reshape(len(x), -1)
        here["onnx"] = onnx_forward
    if here:
        parts = {engine: [] for engine in here}
        for start in _progress(range(0, len(images), batch), desc="accuracy pass",
                               unit=" batch"):
            x = images[start:start + batch]
            for engine, forward in here.items():
                parts[engine].append(forward(x))
        scores.update({k: np.concatenate(v) for k, v in parts.items()})
    return scores, effort if backend is not None else live.effort(dyve)


# The engines scored beside stock and DyVE, each against stock.
OTHER_ENGINES = ("opencv", "onnx")


def accuracy_summary(scores, labels, with_accuracy, images_path="--images"):
    classes = scores["stock"].shape[1]
    result = {"num_classes": int(classes),
              "agreement_top1": float((scores["dyve"].argmax(1)
                                       == scores["stock"].argmax(1)).mean())}
    others = [e for e in OTHER_ENGINES if e in scores]
    for engine in others:
        result[f"agreement_top1_{engine}"] = float((scores[engine].argmax(1)
                                                    == scores["stock"].argmax(1)).mean())
    if "onnx" in scores:
        result["onnx_max_abs_diff"] = export_onnx.output_max_abs_diff(scores["onnx"],
                                                                      scores["stock"])
    if not with_accuracy:
        return result
    caffe_io.check_labels(labels, classes, images_path)
    ks = (1, 5) if classes >= 100 else (1,)
    for k in ks:
        correct = {e: stats.topk_correct(s, labels, k) for e, s in scores.items()}
        entry = paired_entry(correct["stock"], correct["dyve"])
        entry = {"stock": entry.pop("ref"), "dyve": entry.pop("new"), **entry}
        for engine in others:
            entry[engine] = float(correct[engine].mean())
            entry[f"{engine}_vs_stock"] = paired_entry(correct["stock"], correct[engine])
        result[f"top{k}"] = entry
    top1 = result["top1"]["stock"]
    if len(labels) >= 50 and top1 <= CHANCE_FACTOR / classes:
        raise BenchError(f"the stock net's top-1 is {100 * top1:.2f} % on {len(labels)} "
                         f"images of {images_path}, at chance level for {classes} classes: "
                         "wrong weights, mean or images for this net?")
    return result


# ----------------------------------------------------------------------------- main

def _threads_list(text):
    try:
        values = [int(v) for v in text.replace("<nproc>", str(os.cpu_count() or 1)).split(",")
                  if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--threads wants integers like 1,2, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--threads wants positive integers, got {text!r}")
    return list(dict.fromkeys(values))


def _floats(text):
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 104,117,123, got {text!r}")


def build_parser():
    p = argparse.ArgumentParser(
        prog="python3 -m dyve.bench",
        description="Stock Caffe vs DyVE (and OpenCV dnn, ONNX Runtime) on the same weights "
                    "and images: "
                    "accuracy with paired flips, effort counters (ops reduction), and "
                    "interleaved wall-time medians per batch size and OpenBLAS thread count. "
                    "Writes <out-dir>/summary.json, summary.md and effort.png.")
    p.add_argument("--net", help="benchmark label, e.g. cifar10_quick (also picks defaults)")
    p.add_argument("--stock", help="stock deploy prototxt (default prototxt/<net>_deploy.prototxt)")
    p.add_argument("--dyve", help="DyVE deploy prototxt, e.g. a tuned one (default "
                   "prototxt/<net>_dyve_deploy.prototxt: every knob off)")
    p.add_argument("--weights", help="caffemodel; without it: filler weights, no accuracy "
                   f"('{NO_WEIGHTS_LABEL}')")
    p.add_argument("--images", help="LMDB or folder of wnid-prefixed images (default for "
                   "cifar10_*: data/cifar10/cifar10_test_lmdb)")
    p.add_argument("--mean", help="mean.binaryproto (default for cifar10_*: "
                   "data/cifar10/mean.binaryproto)")
    p.add_argument("--mean-value", type=_floats, help="per-channel mean instead, e.g. "
                   "103.939,116.779,123.68")
    p.add_argument("--max-images", type=int, help="use the first N images of an LMDB, or a "
                   "seeded random N of a folder (default: all)")
    p.add_argument("--protocol", help="the tuning protocol that made --dyve (a label for "
                   "the table, e.g. certified or paper)")
    p.add_argument("--exclude-tuning", metavar="SEARCH_JSON", help="leave out the test "
                   "images a `dyve.tune --protocol paper` run tuned on (its search.json)")
    p.add_argument("--batch", type=int, default=100, help="batch N (default %(default)s); "
                   "timed at batch 1 and batch N")
    p.add_argument("--repeats", type=int, default=7, help="interleaved timing rounds "
                   "(default %(default)s)")
    p.add_argument("--time-images", type=int, help="images timed per round (default: N; "
                   "rounded up to a multiple of N)")
    p.add_argument("--threads", type=_threads_list, default=None,
                   help="OpenBLAS thread counts, comma-separated (default 1,<nproc>)")
    p.add_argument("--opencv", action="store_true", help="add OpenCV dnn (stock prototxt) as "
                   "a third engine")
    p.add_argument("--onnx", action="store_true", help="add ONNX Runtime as an engine: the "
                   "stock net exported by dyve.export_onnx, run in build/onnx-venv (make "
                   "onnx-venv); without that venv the report says why the column is empty")
    p.add_argument("--workers", type=int, default=None, help="run the accuracy pass's "
                   "stock and DyVE nets over N worker processes, one OpenBLAS thread each "
                   "(default: the number of cores; 1 = in this process; with --ray: the "
                   "number of Ray actors); the result does not depend on it")
    p.add_argument("--ray", metavar="ADDRESS", help="run the accuracy pass on the Ray "
                   "cluster at ADDRESS (or 'auto'); needs `make ray-site`")
    p.add_argument("--out-dir", help="output folder (default reports/<net>)")
    p.add_argument("--table", nargs="+", metavar="SUMMARY_JSON", help="merge summaries into "
                   "the paper-style table (plain text to stdout) and exit")
    p.add_argument("--table-md", metavar="PATH", help="with --table: also write the markdown")
    p.add_argument("--plot-tuning", nargs=2, metavar=("SEARCH_JSON", "OUT_PNG"),
                   help="plot a tuner's search.json (loss vs ops saved) and exit")
    p.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    return p


def _resolve_defaults(args):
    if not args.net:
        raise BenchError("--net is required (a label such as cifar10_quick)")
    if not re.fullmatch(r"[\w.+-]+", args.net):
        raise BenchError(f"--net {args.net!r}: use letters, digits, '_', '-', '.', '+'")
    repo = lambda *p: os.path.join(REPO_ROOT, *p)
    args.stock = args.stock or repo("prototxt", f"{args.net}_deploy.prototxt")
    args.dyve = args.dyve or repo("prototxt", f"{args.net}_dyve_deploy.prototxt")
    if args.net.startswith("cifar10"):
        args.images = args.images or repo("data", "cifar10", "cifar10_test_lmdb")
        if args.mean_value is None:
            args.mean = args.mean or repo("data", "cifar10", "mean.binaryproto")
    if not args.images:
        raise BenchError(f"--images is required for {args.net}")
    args.out_dir = args.out_dir or repo("reports", args.net)
    args.threads = args.threads or _threads_list("1,<nproc>")
    for name in ("batch", "repeats"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name} must be at least 1")
    if args.max_images is not None and args.max_images < 1:
        raise BenchError("--max-images must be at least 1")
    if args.mean and args.mean_value is not None:
        raise BenchError("give --mean or --mean-value, not both")
    caffe_io.need_file(args.stock, "--stock", "prototxt")
    caffe_io.need_file(args.dyve, "--dyve", "prototxt")
    if args.weights:
        caffe_io.need_file(args.weights, "--weights", "caffemodel")
    caffe_io.image_source(args.images)
    if args.mean:
        caffe_io.need_file(args.mean, "--mean", "mean file")
    if args.exclude_tuning:
        caffe_io.need_file(args.exclude_tuning, "--exclude-tuning", "search.json")
    files.ensure_writable_dir(args.out_dir)


def tuning_indices(search_json):
    """The test-set indices a paper-protocol tuning run tuned on (its search.json)."""
    import json
    try:
        with open(search_json) as f:
            indices = json.load(f)["tune_indices"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BenchError(f"--exclude-tuning: {search_json} is not the search.json of a "
                         f"--protocol paper run ({type(error).__name__}: {error})") from None
    return np.asarray(indices, np.int64)


def run(args, argv):
    """The benchmark; returns the summary dict (also written to args.out_dir)."""
    from dyve import report, timing
    _resolve_defaults(args)
    started = time.time()
    machine = machine_facts()
    tmp_dir = tempfile.mkdtemp(prefix="dyve-bench-")
    try:
        stock, dyve, weights_file = load_nets(args.stock, args.dyve, args.weights, tmp_dir)
        shape = stock.blobs[caffe_io.input_blob(stock)].data.shape[1:]
        mean = args.mean_value if args.mean_value is not None else args.mean
        images, labels = caffe_io.load_images(args.images, shape, mean, args.max_images)
        excluded = 0
        if args.exclude_tuning:  # the paper protocol reports on the images it did not tune
            keep = np.ones(len(images), bool)
            tuned_on = tuning_indices(args.exclude_tuning)
            keep[tuned_on[tuned_on < len(images)]] = False
            excluded = int((~keep).sum())
            images, labels = images[keep], labels[keep]
        n = len(images)
        batch = min(args.batch, n)
        if args.opencv and weights_file.endswith((".h5", ".hdf5")):
            # OpenCV reads binary caffemodels only: hand it a copy of the loaded weights.
            weights_file = os.path.join(tmp_dir, "weights_for_opencv.caffemodel")
            stock.save(weights_file)
        cv_net = engines.opencv_net(args.stock, weights_file) if args.opencv else None
        onnx_model, onnx_status, ort_info = None, None, None
        if args.onnx:  # the stock net as loaded (weights or filler), exported for ORT
            onnx_model, onnx_status = export_onnx.export_for_bench(
                args.stock, stock, os.path.join(tmp_dir, "stock.onnx"))
            if onnx_status:
                print(f"warning: ONNX Runtime not measured: {onnx_status}", file=sys.stderr)

        ort = export_onnx.OrtRunner(onnx_model, threads=1) if onnx_model else None
        backend = _accuracy_backend(args, weights_file, images)
        try:
            ort_info = ort and ort.info
            scores, effort = accuracy_pass(stock, dyve, images, labels, batch, cv_net, ort,
                                           backend)
            parallel_info = backend.describe() if backend else {"backend": "in-process",
                                                                "workers": 1}
        finally:
            if ort is not None:
                ort.close()
            if backend is not None:
                backend.close()
        acc = accuracy_summary(scores, labels, with_accuracy=bool(args.weights),
                               images_path=args.images)
        macs = caffe_io.layer_macs(stock)
        types = dict(zip(dyve._layer_names, (l.type for l in dyve.layers)))
        settings = {name: live.get_settings(dyve, name) for name in live.dyve_layers(dyve)}
        eff, totals, warnings = dyve_effort.summarize(effort, macs, types, settings, n)
        del cv_net

        time_n = args.time_images or batch
        time_n = min(n, max(batch, -(-time_n // batch) * batch))
        time_n -= time_n % batch  # whole batches only
        np.save(os.path.join(tmp_dir, "timing_images.npy"), images[:time_n])
        batches = list(dict.fromkeys([1, batch]))
        spec = {"stock": os.path.abspath(args.stock), "dyve": os.path.abspath(args.dyve),
                "weights": os.path.abspath(weights_file),
                "images": os.path.join(tmp_dir, "timing_images.npy"),
                "batches": batches, "repeats": args.repeats, "opencv": bool(args.opencv),
                "onnx": onnx_model}
        layer_red = {k: r["ops_reduction"] for k, r in eff["layers"].items() if r["dyve"]}
        timings = timing.time_threads(spec, args.threads, layer_red, tmp_dir, warnings)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

    speedup = {b: {t: tm["speedup"] for t, tm in per.items()} for b, per in timings.items()}
    summary = {
        "schema_version": report.SCHEMA_VERSION, "net": args.net,
        "label": args.net if args.weights else f"{args.net} ({NO_WEIGHTS_LABEL})",
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in
                            [os.path.basename(sys.executable), "-m", "dyve.bench"] + argv),
        "weights": _display_path(args.weights) if args.weights else None,
        "filler_seed": None if args.weights else engines.FILLER_SEED,
        "stock": _display_path(args.stock),
        "dyve": _display_path(args.dyve),
        "images_source": _display_path(args.images),
        "protocol": args.protocol,
        "excluded_tuning_images": excluded,
        "exclude_tuning": args.exclude_tuning and _display_path(args.exclude_tuning),
        "mean": args.mean and _display_path(args.mean),
        "mean_value": args.mean_value,
        "images": int(n), "num_classes": acc["num_classes"], "batch": batch,
        "batches": batches, "repeats": args.repeats, "threads": args.threads,
        "time_images": int(time_n), "opencv": bool(args.opencv),
        "onnx": bool(args.onnx), "onnx_measured": bool(onnx_model),
        "onnx_status": onnx_status,
        "onnxruntime": ort_info and ort_info.get("onnxruntime"),
        "onnx_top1": acc["top1"].get("onnx") if "top1" in acc else None,
        "onnx_max_abs_diff": acc.get("onnx_max_abs_diff"),
        "baseline_top1": acc["top1"]["stock"] if "top1" in acc else None,
        "dyve_top1": acc["top1"]["dyve"] if "top1" in acc else None,
        "opencv_top1": acc["top1"].get("opencv") if "top1" in acc else None,
        "baseline_top5": acc["top5"]["stock"] if "top5" in acc else None,
        "dyve_top5": acc["top5"]["dyve"] if "top5" in acc else None,
        "opencv_top5": acc["top5"].get("opencv") if "top5" in acc else None,
        "accuracy": acc,
        **totals,
        "effort": eff,
        "speedup": speedup,
        "speedup_opencv": {b: {t: tm["speedup_opencv"] for t, tm in per.items()}
                           for b, per in timings.items()},
        "speedup_onnx": {b: {t: tm.get("speedup_onnx") for t, tm in per.items()}
                         for b, per in timings.items()},
        "dyve_over_onnx": {b: {t: tm.get("dyve_over_onnx") for t, tm in per.items()}
                           for b, per in timings.items()},
        "timings": timings,
        "accuracy_pass_parallel": parallel_info,
        "machine": machine,
        "elapsed_s": round(time.time() - started, 1),
        "warnings": warnings,
    }
    summary["machine"]["loadavg_end"] = _loadavg()
    report.write_report(summary, args.out_dir)
    return summary


def _accuracy_backend(args, weights_file, images):
    """The accuracy pass's workers (dyve.parallel), or None for the serial pass in this
    process (--workers 1 without --ray)."""
    workers = args.workers if args.workers is not None or args.ray else \
        parallel.default_workers()
    if workers is not None and workers < 1:
        raise BenchError(f"--workers must be at least 1, got {workers}")
    if workers == 1 and not args.ray:
        return None
    nets = {key: parallel.net_spec(caffe_io.read_net_param(path, flag), weights_file, path)
            for key, path, flag in (("stock", args.stock, "--stock"),
                                    ("dyve", args.dyve, "--dyve"))}
    spec = lambda: {"nets": nets, "images": images}  # noqa: E731
    return parallel.make_backend(workers, args.ray, spec, local=None)


def _display_path(path):
    """Relative to the repository when inside it, else absolute."""
    path = os.path.abspath(path)
    rel = os.path.relpath(path, REPO_ROOT)
    return path if rel.startswith(os.pardir) else rel


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # unwinds through the worker's wait and the temp-dir cleanup


def main(argv=None):
    from dyve import report, timing
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if not args.worker and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.worker:
            return timing.worker_main(args.worker)
        if args.table:
            md, plain = report.merge_table(args.table)
            if args.table_md:
                files.write_atomic(args.table_md, md)
            sys.stdout.write(plain)
            return 0
        if args.plot_tuning:
            count = report.plot_tuning(*args.plot_tuning)
            print(f"{count} settings plotted to {args.plot_tuning[1]}")
            return 0
        summary = run(args, argv)
    except DyveError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing written", file=sys.stderr)
        return 130
    out = args.out_dir
    print(report.render_markdown(summary).split("\n## ")[0].rstrip())
    print(f"\nwrote {os.path.join(out, 'summary.json')}, summary.md, effort.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
