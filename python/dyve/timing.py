"""Wall time of a stock net and its DyVE form, whole net and per layer (docs/bench.md).

:func:`run_worker` starts one worker process per OpenBLAS thread count (the library reads
``OPENBLAS_NUM_THREADS`` when it loads); the worker (:func:`worker_main`, started as
``python3 -m dyve.bench --worker SPEC``) times interleaved rounds of the engines and of
each DyVE layer against the stock layers it replaces, and writes the raw rounds;
:func:`timing_summary` reduces them to medians and ratios.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np

from dyve import caffe_io, files
from dyve.engines import opencv_net
from dyve.errors import BenchError
from dyve.machine import _loadavg, openblas_info
from dyve.settings import DYVE_TYPES

_clock = time.perf_counter


def _progress(iterable, **kwargs):
    from tqdm import tqdm
    return tqdm(iterable, disable=None, **kwargs)  # a bar on a terminal only


def _median(values):
    return float(np.median(values)) if len(values) else None


def _ratio(a, b):
    return a / b if a is not None and b else None


def _time_caffe(net, x):
    """Seconds of one whole-net forward of a Caffe net already shaped for `x`."""
    net.blobs[caffe_io.input_blob(net)].data[...] = x
    t0 = _clock()
    net._forward(0, len(net.layers) - 1)
    return _clock() - t0


def _time_opencv(net, x):
    net.setInput(x)
    t0 = _clock()
    net.forward()
    return _clock() - t0


def _stock_span(stock, dyve, name):
    """(first, last) index of the stock layers that DyVE layer `name` replaces: the stock
    layer of that name, plus the in-place ReLU right after it when the DyVE layer has
    relu: true (it does both)."""
    from dyve import live
    names = list(stock._layer_names)
    i = names.index(name)
    top = stock.top_names[name]
    nxt = names[i + 1] if i + 1 < len(stock.layers) else None
    if (nxt is not None and stock.layers[i + 1].type == "ReLU"
            and list(stock.bottom_names[nxt]) == list(top) == list(stock.top_names[nxt])
            and live.get_settings(dyve, name).get("relu")):
        return i, i + 1
    return i, i


def interleaved_rounds(engines, chunks, repeats, desc):
    """{engine: [ms per image of each round]}: after a warm-up, each of `repeats` rounds
    runs the engines one after the other on each batch of `chunks` (stock, DyVE[, OpenCV]
    [, ONNX Runtime], stock, DyVE, ...). `engines`: {name: function(batch) -> seconds}."""
    images = sum(len(x) for x in chunks)
    for fn in engines.values():  # warm-up
        for x in chunks[:2] * 2:
            fn(x)
    rounds = {e: [] for e in engines}
    for _ in _progress(range(repeats), desc=desc, unit=" round"):
        total = dict.fromkeys(engines, 0.0)
        for x in chunks:  # interleaved: stock, DyVE[, OpenCV] on each batch
            for e, fn in engines.items():
                total[e] += fn(x)
        for e in engines:
            rounds[e].append(1e3 * total[e] / images)
    return rounds


def layer_rounds(stock, dyve, spans, chunks, repeats, desc):
    """{DyVE layer: {"stock"|"dyve": [ms per image of each round]}}: on each batch, every
    DyVE layer is fed the stock net's bottom blobs and run `repeats` times against the
    stock layers it replaces. `spans`: {name: (first stock layer, last stock layer, DyVE
    layer index)}."""
    images = sum(len(x) for x in chunks)
    raw = {n: {"stock": [0.0] * repeats, "dyve": [0.0] * repeats} for n in spans}
    for x in _progress(chunks, desc=desc, unit=" batch"):
        _time_caffe(stock, x)
        _time_caffe(dyve, x)
        for name, (i, i_end, j) in spans.items():
            for bottom in dyve.bottom_names[name]:
                dyve.blobs[bottom].data[...] = stock.blobs[bottom].data
            for r in range(repeats):
                # Alternate which layer runs first: the second one finds the
                # caches filled by the first (measured: up to 10 % either way).
                order = ((stock, i, i_end, "stock"), (dyve, j, j, "dyve"))
                for net, k, k_end, engine in (order if r % 2 == 0 else order[::-1]):
                    t0 = _clock()
                    net._forward(k, k_end)
                    raw[name][engine][r] += _clock() - t0
    return {n: {e: [1e3 * v / images for v in vals] for e, vals in d.items()}
            for n, d in raw.items()}


def worker_main(spec_path):
    """The timing worker: one thread count, all batch sizes; writes spec['out']."""
    with open(spec_path) as f:
        spec = json.load(f)
    caffe = caffe_io.caffe_module()
    threads = spec["threads"]
    stock = caffe.Net(spec["stock"], spec["weights"], caffe.TEST)
    dyve = caffe.Net(spec["dyve"], spec["weights"], caffe.TEST)
    images = np.load(spec["images"])
    cv_net = opencv_net(spec["stock"], spec["weights"], threads) if spec["opencv"] else None
    result = {"threads": threads, "openblas": openblas_info(), "loadavg_before": _loadavg(),
              "batches": {}}
    if cv_net is not None:
        import cv2
        result["opencv_threads"] = cv2.getNumThreads()
    repeats = spec["repeats"]
    spans = {name: (*_stock_span(stock, dyve, name), j)
             for j, (name, layer) in enumerate(zip(dyve._layer_names, dyve.layers))
             if layer.type in DYVE_TYPES}
    engines = {"stock": lambda x: _time_caffe(stock, x),
               "dyve": lambda x: _time_caffe(dyve, x)}
    if cv_net is not None:
        engines["opencv"] = lambda x: _time_opencv(cv_net, x)
    ort = None
    if spec.get("onnx"):
        # ONNX Runtime runs in its own process (build/onnx-venv); it times session.run
        # itself, so the batch's trip through the pipe is outside the measured span.
        from dyve.export_onnx import OrtRunner
        ort = OrtRunner(spec["onnx"], threads)
        result["onnx_runtime"] = ort.info
        engines["onnx"] = ort.time
    try:
        _time_batches(spec, stock, dyve, engines, spans, images, repeats, threads, result)
    finally:
        if ort is not None:
            ort.close()
    result["loadavg_after"] = _loadavg()
    files.write_atomic(spec["out"], json.dumps(result))
    return 0


def _time_batches(spec, stock, dyve, engines, spans, images, repeats, threads, result):
    """Whole-net and per-layer rounds of every batch size into result["batches"]."""
    for batch in spec["batches"]:
        chunks = [images[i:i + batch] for i in range(0, len(images), batch)]
        for net in (stock, dyve):
            caffe_io.reshape(net, batch)
        result["batches"][str(batch)] = {
            "images": len(images), "chunks": len(chunks),
            "rounds_ms": interleaved_rounds(engines, chunks, repeats,
                                            f"timing {threads}t b{batch}"),
            "layers_rounds_ms": layer_rounds(stock, dyve, spans, chunks, repeats,
                                             f"layers {threads}t b{batch}")}


def run_worker(spec, threads, tmp_dir):
    """Run the timing worker for one thread count in a fresh process."""
    spec = dict(spec, threads=threads,
                out=os.path.join(tmp_dir, f"worker_{threads}.json"))
    spec_path = os.path.join(tmp_dir, f"worker_{threads}_spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               GLOG_minloglevel=os.environ.get("GLOG_minloglevel", "2"))
    import caffe
    import dyve
    paths = [os.path.dirname(os.path.dirname(os.path.abspath(m.__file__)))
             for m in (caffe, dyve)]
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])
    proc = subprocess.Popen([sys.executable, "-m", "dyve.bench", "--worker", spec_path],
                            env=env)
    try:
        proc.wait()
    except BaseException:  # Ctrl-C or SIGTERM (bench turns it into KeyboardInterrupt)
        proc.terminate()  # passed on, so no worker outlives the benchmark
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    if proc.returncode != 0 or not os.path.isfile(spec["out"]):
        raise BenchError(f"timing worker with {threads} thread(s) failed (exit "
                         f"{proc.returncode}); see its messages above")
    with open(spec["out"]) as f:
        return json.load(f)


def time_threads(spec, thread_counts, layer_reduction, tmp_dir, warnings):
    """{"<batch>": {"<threads>": timing_summary}} of one worker per thread count; a warning
    appended to `warnings` where a worker's OpenBLAS ran another thread count."""
    timings = {str(b): {} for b in spec["batches"]}
    for t in thread_counts:
        worker = run_worker(spec, t, tmp_dir)
        if worker["openblas"].get("threads") not in (None, t):
            warnings.append(f"asked for {t} OpenBLAS threads, the worker had "
                            f"{worker['openblas']['threads']}")
        for b, tm in timing_summary(worker, layer_reduction).items():
            timings[b][str(t)] = tm
    return timings


def timing_summary(worker, layer_reduction):
    """Medians and ratios of one worker's raw rounds, per batch."""
    out = {}
    for batch, raw in worker["batches"].items():
        med = {e: _median(v) for e, v in raw["rounds_ms"].items()}
        paired = [s / d for s, d in zip(raw["rounds_ms"]["stock"], raw["rounds_ms"]["dyve"])
                  if d]
        layers = {}
        for name, d in raw["layers_rounds_ms"].items():
            s_ms, d_ms = _median(d["stock"]), _median(d["dyve"])
            speed = _ratio(s_ms, d_ms)
            red = layer_reduction.get(name)
            layers[name] = {"stock_ms": s_ms, "dyve_ms": d_ms, "speedup": speed,
                            "ops_reduction": red,
                            "skipping_efficiency": _ratio(speed, red)}
        out[batch] = {
            "ms_per_image": med, "rounds_ms": raw["rounds_ms"],
            "speedup": _ratio(med["stock"], med["dyve"]),
            "speedup_opencv": _ratio(med["stock"], med.get("opencv")),
            # stock Caffe / ONNX Runtime, and DyVE / ONNX Runtime in time (above 1: DyVE
            # is slower than ONNX Runtime by that factor)
            "speedup_onnx": _ratio(med["stock"], med.get("onnx")),
            "dyve_over_onnx": _ratio(med["dyve"], med.get("onnx")),
            "round_speedups": paired,
            "round_speedup_range": [min(paired), max(paired)] if paired else None,
            "images": raw["images"], "layers": layers,
            "openblas_threads": worker["openblas"].get("threads"),
            "opencv_threads": worker.get("opencv_threads"),
            "onnx_threads": (worker.get("onnx_runtime") or {}).get("threads"),
            "loadavg": [worker.get("loadavg_before"), worker.get("loadavg_after")]}
    return out
