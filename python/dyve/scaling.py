"""Scaling of the data-parallel evaluation loop (``python3 -m dyve.scaling``).

A benchmark, not a timed test: it times the loop that dyve.tune and dyve.bench run for
every candidate setting (dyve.evaluator.Evaluator.evaluate over an image subset) with 1
and 2 workers on both backends (local worker processes, and Ray actors on a two-node
cluster it starts on this machine, or the one at --ray), checks that every
configuration gives the same predictions and counters bit for bit, and prints the
speedup ratios. From the measured costs (per image, and per shard dispatched) it
extrapolates the evaluation time of a 50,000-image ImageNet tune on 8 and 64 nodes.
Writes <out-dir>/scaling.json and scaling.md (docs/parallel.md).
"""
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ["OPENBLAS_NUM_THREADS"] = "1"  # the coordinator too: one thread each
    os.environ["OMP_NUM_THREADS"] = "1"       # (oneDNN's dense path threads with OpenMP)
    if "--no-ray" not in sys.argv[1:] and "-h" not in sys.argv and "--help" not in sys.argv:
        if not any(a == "--ray" or a.startswith("--ray=") for a in sys.argv):
            # the cluster started here is token-authenticated, and Ray reads the auth
            # mode when it is imported
            import secrets
            os.environ.setdefault("RAY_AUTH_MODE", "token")
            os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
        # Ray's pinned dependencies (build/ray-site) before any Debian copy of them
        from dyve.parallel import ParallelError, import_ray
        try:
            import_ray()
        except ParallelError as error:
            sys.exit(f"error: {error} (or pass --no-ray)")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dyve import caffe_io, files, parallel  # noqa: E402
from dyve.errors import DyveError  # noqa: E402
from dyve.evaluator import Evaluator  # noqa: E402
from dyve.machine import _loadavg, machine_facts, openblas_info  # noqa: E402
from dyve.tools import REPO_ROOT  # noqa: E402

TARGET_EFFICIENCY = 0.8    # the target: >= 0.8 x linear from 1 to 2 workers
IMAGENET_IMAGES = 50_000   # ILSVRC-2012 validation images
IMAGENET_NETS = {"alexnet": "prototxt/alexnet_dyve_deploy.prototxt",
                 "vgg16": "prototxt/vgg16_dyve_deploy.prototxt"}


def _repo(*parts):
    return os.path.join(REPO_ROOT, *parts)


def process_cpu_s(pid):
    """User + system CPU seconds of a process on this machine (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dispatch_cost(backend, rounds=50):
    """Seconds per shard of a task that carries no batch: the backend's own round trip
    (pickling, pipe or object store, scheduling), with one shard per worker."""
    tasks = [(s, {"kind": "scores", "batches": [], "nets": [], "effort_net": None})
             for s in range(backend.n_workers)]
    backend.run(tasks)
    t0 = time.perf_counter()
    for _ in range(rounds):
        backend.run(tasks)
    return (time.perf_counter() - t0) / rounds


def imagenet_per_image(net_key, batch, images, threads=1):
    """Seconds per image of one forward pass of an ImageNet DyVE net (every knob off,
    filler weights: the dense cost, which is what a tune's baseline pays) at `batch`."""
    from dyve import engines
    path = _repo(IMAGENET_NETS[net_key])
    net = caffe_io.load_net(path)
    engines.fill_weights(net)
    shape = net.blobs[caffe_io.input_blob(net)].data.shape[1:]
    x = np.random.RandomState(0).randn(batch, *shape).astype(np.float32)
    caffe_io.forward(net, x)  # warm-up
    times = []
    for _ in range(max(1, images // batch)):
        t0 = time.perf_counter()
        caffe_io.forward(net, x)
        times.append((time.perf_counter() - t0) / batch)
    return statistics.median(times)


def extrapolate(per_image, dispatch, nodes, cores_per_node, images=IMAGENET_IMAGES,
                batch=10, evaluations=300):
    """Evaluation time of a tune of `evaluations` candidate settings over `images`
    images on `nodes` nodes of `cores_per_node` workers each.

    One evaluation = the slowest shard (ceil(batches / workers) batches of `batch`
    images at `per_image` s each) + the driver's dispatch of one shard per worker
    (`dispatch` s per shard, measured, paid serially by the driver). Every evaluation
    is counted as a full forward pass: the tuner's re-runs from the changed layer only
    make it cheaper, so this is an upper bound of the work, not of the overheads
    (network transfers of results are in `dispatch` only as measured on one machine).
    """
    workers = nodes * cores_per_node
    batches = math.ceil(images / batch)
    per_eval = math.ceil(batches / workers) * batch * per_image + workers * dispatch
    serial = batches * batch * per_image
    return {"nodes": nodes, "workers": workers, "evaluation_s": per_eval,
            "tune_s": per_eval * evaluations, "tune_h": per_eval * evaluations / 3600,
            "serial_tune_h": serial * evaluations / 3600,
            "speedup": serial / per_eval, "efficiency": serial / per_eval / workers}


def run(args):
    started = time.time()
    machine = machine_facts()
    net_param, converted = caffe_io.dyve_net_param(args.model)
    net = caffe_io.load_net(net_param, args.weights, model_name=args.model)
    in_shape = tuple(net.blobs[caffe_io.input_blob(net)].data.shape[1:])
    x, _ = caffe_io.load_images(args.images, in_shape, args.mean, args.max_images)
    n = len(x)
    spec = parallel.net_spec(net_param, args.weights, args.model)
    rows, results = [], {}

    def open_config(label, backend_name, workers, ray=None):
        ev = Evaluator(net, x, args.batch, np.arange(n), [], cache_mb=0, progress=False,
                       workers=workers, ray=ray, net_spec=spec, actor_cpus=0.5)
        if backend_name == "local-processes" and workers == 1:
            # one worker *process*, not the in-process backend: the same overheads as
            # with two, so the ratio is the loop's scaling alone
            ev.backend.close()
            ev.backend = parallel.LocalProcesses(1, {"nets": {"net": spec}, "images": x,
                                                     "meta": ev._meta()})
        return {"label": label, "backend": backend_name, "workers": workers, "ev": ev,
                "times": [], "cpu": []}

    def measure(configs):
        """Interleaved rounds (each configuration once per round, after a warm-up), so
        that a change in the machine's load hits every configuration alike."""
        settings = configs[0]["ev"].full(configs[0]["ev"].applied)
        for c in configs:
            c["ev"].evaluate(settings, "all")  # warm-up: first touch of images and nets
        for _ in tqdm(range(args.repeats), desc="rounds", leave=False, disable=None):
            for c in configs:
                pids = [] if c["backend"] == "in-process" else c["ev"].backend.worker_pids()
                w0 = [process_cpu_s(pid) for pid in pids]
                t0, p0 = time.perf_counter(), time.process_time()
                results[c["label"]] = c["ev"].evaluate(settings, "all")
                c["times"].append(time.perf_counter() - t0)
                driver = time.process_time() - p0
                worker = [process_cpu_s(pid) - a for pid, a in zip(pids, w0)] or [driver]
                c["cpu"].append({"driver_s": driver, "workers_s": worker})
        for c in configs:
            ev = c["ev"]
            rtt = dispatch_cost(ev.backend) if c["backend"] != "in-process" else 0.0
            info = ev.backend.describe()
            median = statistics.median(c["times"])
            # What an idle machine would take: the busiest worker's CPU time plus the
            # driver's (its merge is serial); robust to the other jobs sharing the cores.
            busy = statistics.median(max(x["workers_s"]) for x in c["cpu"])
            driver = 0.0 if c["backend"] == "in-process" else \
                statistics.median(x["driver_s"] for x in c["cpu"])
            rows.append({"label": c["label"], "backend": c["backend"], "workers": c["workers"],
                         "median_s": median, "times_s": c["times"], "cpu": c["cpu"],
                         "busiest_worker_cpu_s": busy, "driver_cpu_s": driver,
                         "cpu_critical_path_s": busy + driver,
                         "per_image_ms": 1e3 * median / n, "dispatch_s_per_shard": rtt,
                         "blas_threads": info.get("blas_threads"),
                         "nodes": len(info.get("nodes", [])) or 1})
            tqdm.write(f"{c['label']}: {median:.3f} s per evaluation of {n} images "
                       f"(dispatch {1e3 * rtt:.2f} ms per shard)", file=sys.stderr)

    def run_all(address=None):
        configs = [open_config("in-process", "in-process", 1),
                   open_config("local x1", "local-processes", 1),
                   open_config("local x2", "local-processes", 2)]
        if address:
            configs += [open_config("ray x1", "ray", 1, ray=address),
                        open_config("ray x2", "ray", 2, ray=address)]
        try:
            measure(configs)
        finally:
            for c in reversed(configs):  # the first Ray backend owns the connection
                c.pop("ev").close()

    load_start = _loadavg()
    ray_info = None
    if args.no_ray:
        run_all()
    elif args.ray:
        run_all(args.ray)
        ray_info = {"address": args.ray, "started_here": False}
    else:
        with tempfile.TemporaryDirectory(prefix="dyve-scaling-ray-") as tmp, \
                parallel.local_ray_cluster(tmp, nodes=2, cpus_per_node=1) as cluster:
            run_all(cluster["address"])
        ray_info = {"address": "127.0.0.1 (2 nodes, 1 CPU each, started here)",
                    "started_here": True}

    # The same answer everywhere: predictions and counters, bit for bit.
    ref = results["in-process"]
    identical = {label: bool(np.array_equal(r["preds"], ref["preds"])
                             and r["effort"] == ref["effort"] and r["ops"] == ref["ops"])
                 for label, r in results.items()}
    by = {r["label"]: r for r in rows}
    scaling = {}
    for name in ("local", "ray"):
        if f"{name} x1" in by:
            s = by[f"{name} x1"]["median_s"] / by[f"{name} x2"]["median_s"]
            c = by[f"{name} x1"]["cpu_critical_path_s"] / by[f"{name} x2"]["cpu_critical_path_s"]
            scaling[name] = {"speedup_1_to_2": s, "efficiency": s / 2,
                             "meets_target": s / 2 >= TARGET_EFFICIENCY,
                             "cpu_speedup_1_to_2": c, "cpu_efficiency": c / 2,
                             "cpu_meets_target": c / 2 >= TARGET_EFFICIENCY}
    scaling["local_vs_in_process"] = by["in-process"]["median_s"] / by["local x2"]["median_s"]

    # Extrapolation to ImageNet: per-image cost of the ImageNet nets measured here.
    dispatch = max(r["dispatch_s_per_shard"] for r in rows)
    imagenet = {}
    for key in args.imagenet_nets:
        per_image = imagenet_per_image(key, args.imagenet_batch, args.imagenet_images)
        imagenet[key] = {
            "per_image_s": per_image, "batch": args.imagenet_batch,
            "projections": [extrapolate(per_image, dispatch, nodes, args.cores_per_node,
                                        batch=args.imagenet_batch,
                                        evaluations=args.evaluations)
                            for nodes in (1, 8, 64)]}
        tqdm.write(f"{key}: {1e3 * per_image:.1f} ms per image (1 thread)", file=sys.stderr)
    summary = {
        "tool": "dyve.scaling",
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "model": args.model, "weights": args.weights, "images_source": args.images,
        "images": n, "batch": args.batch, "repeats": args.repeats,
        "converted_from_stock": converted, "cpu": machine.get("cpu_model"),
        "cores": os.cpu_count(), "openblas_threads_per_worker": 1,
        "coordinator_blas": openblas_info(), "rows": rows, "scaling": scaling,
        "bit_identical": identical, "all_bit_identical": all(identical.values()),
        "ray": ray_info, "target_efficiency": TARGET_EFFICIENCY,
        "imagenet": {"images": IMAGENET_IMAGES, "evaluations": args.evaluations,
                     "cores_per_node": args.cores_per_node,
                     "dispatch_s_per_shard": dispatch, "nets": imagenet},
        "machine": machine, "loadavg_start": load_start, "loadavg_end": _loadavg(),
        "elapsed_s": round(time.time() - started, 1),
    }
    return summary


def markdown(s):
    cpu = f"{s['cpu']} ({s['cores']} cores), OpenBLAS 1 thread per worker"
    lines = [f"# Evaluation-loop scaling ({s['created']})", "",
             f"CPU: {cpu}. Net {s['model']}, {s['images']} images of {s['images_source']}, "
             f"batch {s['batch']}, median of {s['repeats']} interleaved rounds. Load average "
             f"(1, 5, 15 min) at the start {s['loadavg_start']}, at the end "
             f"{s['loadavg_end']}.", "",
             "| configuration | workers | nodes | wall s / evaluation | ms / image | busiest "
             "worker CPU s | driver CPU s | dispatch ms / shard | bit-identical |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        lines.append(f"| {r['label']} | {r['workers']} | {r['nodes']} | {r['median_s']:.3f} | "
                     f"{r['per_image_ms']:.3f} | {r['busiest_worker_cpu_s']:.3f} | "
                     f"{r['driver_cpu_s']:.3f} | {1e3 * r['dispatch_s_per_shard']:.2f} | "
                     f"{'yes' if s['bit_identical'][r['label']] else '**NO**'} |")
    lines += ["", "Speedup 1 → 2 workers: in wall time (what the shared machine gave), and "
              "from CPU time (busiest worker + driver: what an idle machine gives).", "",
              "| backend | wall speedup | × linear | CPU-time speedup | × linear | target ≥ "
              f"{s['target_efficiency']} (wall / CPU) |", "|---|---|---|---|---|---|"]
    for name in ("local", "ray"):
        if name in s["scaling"]:
            sc = s["scaling"][name]
            lines.append(f"| {name} | {sc['speedup_1_to_2']:.2f}× | {sc['efficiency']:.2f} | "
                         f"{sc['cpu_speedup_1_to_2']:.2f}× | {sc['cpu_efficiency']:.2f} | "
                         f"{'met' if sc['meets_target'] else 'missed'} / "
                         f"{'met' if sc['cpu_meets_target'] else 'missed'} |")
    im = s["imagenet"]
    if im["nets"]:
        lines += ["", f"## Extrapolation: a {im['images']:,}-image ImageNet tune, "
                  f"{im['evaluations']} evaluations", "",
                  f"Nodes like this one ({im['cores_per_node']} workers each, {cpu}); "
                  f"per-image cost measured here (dense forward, every evaluation a full "
                  f"pass: an upper bound of the work); dispatch "
                  f"{1e3 * im['dispatch_s_per_shard']:.2f} ms per shard, the slowest "
                  "backend's, paid serially by the driver.", "",
                  "| net | ms / image | nodes | workers | s / evaluation | tune (h) | "
                  "speedup | × linear |", "|---|---|---|---|---|---|---|---|"]
        for key, v in im["nets"].items():
            for p in v["projections"]:
                lines.append(f"| {key} | {1e3 * v['per_image_s']:.1f} | {p['nodes']} | "
                             f"{p['workers']} | {p['evaluation_s']:.1f} | {p['tune_h']:.2f} | "
                             f"{p['speedup']:.1f}× | {p['efficiency']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python3 -m dyve.scaling",
        description="Time the tuner's evaluation loop with 1 and 2 workers on local worker "
                    "processes and on Ray (a 2-node cluster started on this machine, or "
                    "--ray), check the answers are bit-identical, print the speedups and "
                    "extrapolate to a 50,000-image ImageNet tune on 8 and 64 nodes. Writes "
                    "<out-dir>/scaling.json and scaling.md.")
    p.add_argument("--model", default=_repo("prototxt", "cifar10_quick_dyve_deploy.prototxt"),
                   help="DyVE (or stock) deploy prototxt (default %(default)s)")
    p.add_argument("--weights", default=_repo("models", "cifar10_quick.caffemodel"),
                   help="caffemodel (default %(default)s)")
    p.add_argument("--images", default=_repo("data", "cifar10", "cifar10_test_lmdb"),
                   help="LMDB or image folder (default %(default)s)")
    p.add_argument("--mean", default=_repo("data", "cifar10", "mean.binaryproto"),
                   help="mean.binaryproto or 'b,g,r' (default %(default)s)")
    p.add_argument("--max-images", type=int, default=5000, help="default %(default)s")
    p.add_argument("--batch", type=int, default=100, help="default %(default)s")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed evaluations per configuration (default %(default)s)")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="an existing Ray cluster (default: start 2 nodes on 127.0.0.1)")
    p.add_argument("--no-ray", action="store_true", help="local processes only")
    p.add_argument("--imagenet-nets", default="alexnet,vgg16",
                   type=lambda t: [k for k in t.split(",") if k],
                   help=f"nets whose per-image cost is measured for the extrapolation "
                        f"({', '.join(IMAGENET_NETS)}; '' for none; default %(default)s)")
    p.add_argument("--imagenet-batch", type=int, default=10, help="default %(default)s")
    p.add_argument("--imagenet-images", type=int, default=30,
                   help="images timed per ImageNet net (default %(default)s)")
    p.add_argument("--evaluations", type=int, default=300,
                   help="candidate settings of the extrapolated tune (default %(default)s)")
    p.add_argument("--cores-per-node", type=int, default=os.cpu_count() or 1,
                   help="workers per node in the extrapolation (default: this machine's "
                        "cores, %(default)s)")
    p.add_argument("--out-dir", default=_repo("reports", "scaling"),
                   help="default %(default)s")
    args = p.parse_args(argv)
    bad = [k for k in args.imagenet_nets if k not in IMAGENET_NETS]
    if bad:
        p.error(f"--imagenet-nets: unknown {', '.join(bad)}; choose from "
                f"{', '.join(IMAGENET_NETS)}")
    try:
        for flag, path in (("--model", args.model), ("--weights", args.weights)):
            caffe_io.need_file(path, flag, "file")
        caffe_io.image_source(args.images, "--images")
        files.ensure_writable_dir(args.out_dir)
        summary = run(args)
    except DyveError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    md = markdown(summary)
    files.write_atomic(os.path.join(args.out_dir, "scaling.json"),
                       json.dumps(summary, indent=1, default=float) + "\n")
    files.write_atomic(os.path.join(args.out_dir, "scaling.md"), md)
    print(md)
    print(f"wrote {os.path.join(args.out_dir, 'scaling.json')}, scaling.md", file=sys.stderr)
    return 0 if summary["all_bit_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
