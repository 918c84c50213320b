"""Per-layer convolution kernels side by side (docs/kernels.md).

For each DyveConvolution of the given nets' DyVE deploy prototxts (shapes from the
stock deploy prototxt: prototxt/<net>_deploy.prototxt, or build/resnet34/ for
resnet34, which `make resnet34` converts), at each batch size and thread count, in one
run, in interleaved repeats (every column once per repeat, medians over repeats):

* the C++ tool build/bin/kernel_bench (`make kernel-bench`, tools/kernel_bench.cpp):
  Caffe's im2col + OpenBLAS SGEMM, oneDNN (NCHW re-layouts timed, and its kernel alone
  in its blocked layout), oneDNN forced to NCHW, oneDNN Winograd, libxsmm; conv + bias +
  ReLU on rectified random data;
* pycaffe, the real layers on real activations (CIFAR-10 test images, or the report
  half of the ImageNet photos for resnet34; one layer at a time, the net
  run once before): stock Convolution, DyveConvolution with every knob off (the dense
  path this build picks: oneDNN), the same with DYVE_DENSE=caffe (Caffe's im2col + BLAS,
  in a second process), and DyveConvolution at the tuned settings (with its effort
  counters, hence the op reduction) in both processes: SPET's prefix on oneDNN where it
  applies, and on gathered rows under DYVE_DENSE=caffe;
* ONNX Runtime on a Conv + Relu model of each layer with the trained weights and the
  same activations, in build/onnx-venv (`make onnx-venv`) when it exists.

Writes OUT.json and OUT.md (default reports/kernels/kernel_bench) and prints the
Markdown. Run with pycaffe on the path: eval "$(make -s env)"; python3 scripts/kernel_bench.py
"""
import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_BIN = os.path.join(ROOT, "build", "bin", "kernel_bench")
ORT_PYTHON = os.path.join(ROOT, "build", "onnx-venv", "bin", "python")

# SPET f = 1/2 with the BOUND gate at s = 0.25 (docs/performance.md), used on conv2 and
# conv3 when no tuned prototxt (reports/<net>/tune/tuned_deploy.prototxt) exists.
REPRESENTATIVE = {"relu": True, "spet": {"enabled": True, "fraction": 0.5, "gate": "BOUND",
                                         "bound_scale": 0.25, "threshold": 0.0}}


def cpu_name():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = re.search(r"Model name:\s*(.+)", out).group(1).strip()
        flags = re.search(r"Flags:\s*(.+)", out).group(1).split()
    except (OSError, AttributeError):
        return platform.processor(), []
    simd = [f for f in ("avx", "avx2", "fma", "avx512f", "avx512_vnni") if f in flags]
    return name, simd


def net_files(net_name, images=None, mean=None):
    """The files of a benchmarked net: stock and DyVE deploy prototxts, caffemodel, the
    images whose activations are timed and their mean (`images`/`mean` override)."""
    if net_name == "resnet34":
        sys.path.insert(0, os.path.join(ROOT, "python"))
        from dyve import resnet34
        files = dict(stock=resnet34.DEPLOY, dyve=resnet34.DYVE_DEPLOY,
                     weights=resnet34.CAFFEMODEL,
                     images=os.path.join(resnet34.WORK_DIR, "photos", "eval"),
                     mean=resnet34.MEAN_ARG)
        missing = [f for f in files.values() if "/" in f and not os.path.exists(f)]
        if missing:
            raise SystemExit(f"kernel_bench: {missing[0]} is missing: run make resnet34")
    else:
        files = dict(stock=os.path.join(ROOT, "prototxt", f"{net_name}_deploy.prototxt"),
                     dyve=os.path.join(ROOT, "prototxt", f"{net_name}_dyve_deploy.prototxt"),
                     weights=os.path.join(ROOT, "models", f"{net_name}.caffemodel"),
                     images=os.path.join(ROOT, "data", "cifar10", "cifar10_test_lmdb"),
                     mean=os.path.join(ROOT, "data", "cifar10", "mean.binaryproto"))
    if images:
        files["images"] = images
    if mean:
        files["mean"] = mean
    return files


def conv_layers(files):
    """[{name, c, h, w, k, kernel, pad, stride, index}] of the net's convolutions that its
    DyVE deploy prototxt makes DyveConvolution (ResNet-34 keeps branch2b stock)."""
    import caffe
    from google.protobuf import text_format
    from caffe.proto import caffe_pb2
    param, dyve_param = caffe_pb2.NetParameter(), caffe_pb2.NetParameter()
    with open(files["stock"]) as f:
        text_format.Merge(f.read(), param)
    with open(files["dyve"]) as f:
        text_format.Merge(f.read(), dyve_param)
    dyve_layers = {l.name for l in dyve_param.layer if l.type == "DyveConvolution"}
    net = caffe.Net(files["stock"], caffe.TEST)
    net_name = param.name
    layers = []
    for layer in param.layer:
        if layer.type != "Convolution" or layer.name not in dyve_layers:
            continue
        cp = layer.convolution_param
        one = lambda field, default: (list(field) or [default])[0]
        _, c, h, w = net.blobs[layer.bottom[0]].data.shape
        if cp.group != 1 or one(cp.dilation, 1) != 1 or cp.kernel_h or cp.stride_h:
            raise SystemExit(f"kernel_bench: {net_name} {layer.name}: only square, "
                             "ungrouped, undilated convolutions are benchmarked")
        layers.append(dict(name=layer.name, c=int(c), h=int(h), w=int(w),
                           k=int(cp.num_output), kernel=int(one(cp.kernel_size, 1)),
                           pad=int(one(cp.pad, 0)), stride=int(one(cp.stride, 1))))
    return layers


# ------------------------------------------------------------------- pycaffe worker

def _calibrate(net, index, min_s):
    """Calls of layer `index` alone per timed round (about min_s seconds)."""
    net._forward(index, index)
    start = time.perf_counter()
    net._forward(index, index)
    return max(1, int(min_s / max(time.perf_counter() - start, 1e-6)))


def _time_layer(net, index, count):
    """Seconds per call of layer `index` alone, over `count` calls."""
    start = time.perf_counter()
    for _ in range(count):
        net._forward(index, index)
    return (time.perf_counter() - start) / count


def caffe_worker(spec_path):
    """Times the spec's layers in the stock, knobs-off and tuned nets; writes JSON."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    with open(spec_path) as f:
        spec = json.load(f)
    import caffe
    from dyve import caffe_io, live
    x = np.load(spec["images"])["x"][:spec["batch"]]
    nets = {}
    # The DyVE deploy prototxts have every knob off (relu: true).
    for kind, model in (("stock", spec["stock_model"]), ("knobs_off", spec["dyve_model"]),
                        ("tuned", spec["tuned_model"] or spec["dyve_model"])):
        net = caffe.Net(model, spec["weights"], caffe.TEST)
        net.blobs[caffe_io.input_blob(net)].reshape(*x.shape)
        net.reshape()
        if kind == "tuned" and not spec["tuned_model"]:
            for name, settings in spec["tuned_settings"].items():
                live.set_settings(net, name, settings)
        net.blobs[caffe_io.input_blob(net)].data[...] = x
        net.forward()
        nets[kind] = net
    # The tuned net's effort over this batch, per layer.
    live.reset_effort(nets["tuned"])
    nets["tuned"].forward()
    effort = live.effort(nets["tuned"])
    result = {"layers": {}}
    kinds = ("stock", "knobs_off", "tuned")
    for layer in spec["layers"]:
        index = {kind: list(nets[kind]._layer_names).index(layer) for kind in kinds}
        count = {kind: _calibrate(nets[kind], index[kind], spec["min_s"])
                 for kind in kinds}
        times = {kind: [] for kind in kinds}
        for _ in range(spec["rounds"]):  # the three interleaved
            for kind in kinds:
                times[kind].append(_time_layer(nets[kind], index[kind], count[kind]))
        row = {kind: statistics.median(times[kind]) * 1e3 for kind in kinds}
        row["tuned_settings"] = live.get_settings(nets["tuned"], layer)
        row["tuned_prefix_path"] = live.kernel_paths(nets["tuned"], layer).get("prefix")
        e = effort.get(layer, {})
        overhead = sum(e.get(f"ops_{k}", 0) for k in ("spet", "exact", "sdss", "sfma"))
        ops = e.get("macs_executed", 0) + overhead
        row["op_reduction"] = e["macs_dense"] / ops if ops else None
        row["macs_executed_share"] = (e["macs_executed"] / e["macs_dense"]
                                      if e.get("macs_dense") else None)
        result["layers"][layer] = row
        if spec.get("save_inputs"):
            net = nets["stock"]
            bottom = net.bottom_names[layer][0]
            np.savez(os.path.join(spec["save_inputs"], f"{layer}.npz"),
                     x=net.blobs[bottom].data, w=net.params[layer][0].data,
                     b=net.params[layer][1].data)
    with open(spec["out"], "w") as f:
        json.dump(result, f)


# ----------------------------------------------------------------------- ORT worker

ORT_CODE = r"""
import json, statistics, sys, time
import numpy as np, onnx, onnxruntime as ort
from onnx import helper, numpy_helper, TensorProto
spec = json.load(open(sys.argv[1]))
result = {"onnxruntime": ort.__version__, "layers": {}}
for layer in spec["layers"]:
    d = np.load(f"{spec['inputs']}/{layer['name']}.npz")
    x, w, b = d["x"].astype(np.float32), d["w"].astype(np.float32), d["b"].astype(np.float32)
    p, s = layer["pad"], layer["stride"]
    conv = helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=list(w.shape[2:]),
                            pads=[p, p, p, p], strides=[s, s])
    relu = helper.make_node("Relu", ["c"], ["y"])
    n, c, h, wd = x.shape
    oh, ow = (h + 2 * p - w.shape[2]) // s + 1, (wd + 2 * p - w.shape[3]) // s + 1
    graph = helper.make_graph([conv, relu], "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, w.shape[0], oh, ow])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = spec["threads"]
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    feed = {"x": x}
    session.run(None, feed)
    start = time.perf_counter(); session.run(None, feed)
    count = max(1, int(spec["min_s"] / max(time.perf_counter() - start, 1e-6)))
    times = []
    for _ in range(spec["rounds"]):
        start = time.perf_counter()
        for _ in range(count):
            session.run(None, feed)
        times.append((time.perf_counter() - start) / count)
    result["layers"][layer["name"]] = statistics.median(times) * 1e3
json.dump(result, open(spec["out"], "w"))
"""


# --------------------------------------------------------------------------- driver

def tuned_settings(net_name, layers, path=None):
    """(tuned prototxt or None, {layer: settings} to apply otherwise, source): `path`,
    else the tuner's reports/<net>/tune/tuned_deploy.prototxt (`make reproduce`, `make
    resnet34`) if it exists, else REPRESENTATIVE on conv2 and conv3 (CIFAR-10) or on
    every branch2a (ResNet-34)."""
    path = path or os.path.join(ROOT, "reports", net_name, "tune", "tuned_deploy.prototxt")
    if os.path.exists(path):
        return path, {}, os.path.relpath(path, ROOT)
    names = [l["name"] for l in layers]
    picked = {name: REPRESENTATIVE for name in names
              if name in ("conv2", "conv3") or name.endswith("_branch2a")}
    return None, picked, "representative (no tuned prototxt): conv2, conv3 or every " \
        "branch2a, SPET f=0.5 BOUND s=0.25 T=0"


def run(cmd, env=None, timeout=900):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"kernel_bench: {' '.join(cmd[:3])} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", default="cifar10_quick,cifar10_full")
    parser.add_argument("--batches", default="1,100")
    parser.add_argument("--threads", default="1")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved repeats of every column (medians over them)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per repeat")
    parser.add_argument("--min-ms", type=float, default=20, help="per timed round")
    parser.add_argument("--images", help="images whose activations are timed (default: "
                        "the CIFAR-10 test LMDB; for resnet34 the report-half photos)")
    parser.add_argument("--mean", help="their mean (default: the net's)")
    parser.add_argument("--tuned", action="append", default=[], metavar="NET=PROTOTXT",
                        help="the tuned DyVE prototxt of NET (default "
                             "reports/<net>/tune/tuned_deploy.prototxt)")
    parser.add_argument("--out", default=os.path.join(ROOT, "reports", "kernels",
                                                      "kernel_bench"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("GLOG_minloglevel", "2")
    if args.worker:
        return caffe_worker(args.worker)
    from dyve import caffe_io
    if not os.path.exists(BENCH_BIN):
        raise SystemExit(f"kernel_bench: {BENCH_BIN} is missing: run make kernel-bench")
    have_ort = os.path.exists(ORT_PYTHON)
    nets = args.nets.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    thread_counts = [int(t) for t in args.threads.split(",")]
    cpu, simd = cpu_name()
    tuned_paths = {}
    for item in args.tuned:
        name, sep, path = item.partition("=")
        if not sep or not os.path.isfile(path):
            raise SystemExit(f"kernel_bench: --tuned {item}: want NET=PROTOTXT (a file)")
        tuned_paths[name] = path
    work = tempfile.mkdtemp(prefix="kernel_bench.")
    report = {"cpu": cpu, "simd": simd, "nproc": os.cpu_count(), "nets": {},
              "repeats": args.repeats, "rounds": args.rounds, "min_ms": args.min_ms,
              "load_average_start": os.getloadavg(), "configs": []}
    import caffe
    for net_name in nets:
        files = net_files(net_name, args.images, args.mean)
        layers = conv_layers(files)
        tuned_model, tuned, source = tuned_settings(net_name, layers,
                                                    tuned_paths.get(net_name))
        stock = caffe.Net(files["stock"], caffe.TEST)
        input_shape = stock.blobs[caffe_io.input_blob(stock)].data.shape[1:]
        del stock
        x, _ = caffe_io.load_images(files["images"], input_shape, mean=files["mean"],
                                    limit=max(batches))
        images = os.path.join(work, f"{net_name}_images.npz")
        np.savez(images, x=x)
        report["nets"][net_name] = {"images": files["images"], "mean": files["mean"]}
        for batch in batches:
            for threads in thread_counts:
                env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads),
                           OMP_NUM_THREADS=str(threads), GLOG_minloglevel="2")
                config = {"net": net_name, "batch": batch, "threads": threads,
                          "tuned_source": source,
                          "layers": [dict(l) for l in layers], "repeats": []}
                inputs = os.path.join(work, f"{net_name}_{batch}")
                os.makedirs(inputs, exist_ok=True)
                for repeat in range(args.repeats):
                    rep = {}
                    cmd = [BENCH_BIN, "--batch", str(batch), "--threads", str(threads),
                           "--rounds", str(args.rounds), "--min-ms", str(args.min_ms)]
                    for l in layers:
                        cmd += ["--layer", "{name},{c},{h},{w},{k},{kernel},{pad},{stride}"
                                .format(**l)]
                    rep["cpp"] = json.loads(run(cmd, env))
                    for dense in ("onednn", "caffe"):
                        spec = dict(
                            images=images, batch=batch, stock_model=files["stock"],
                            dyve_model=files["dyve"], weights=files["weights"],
                            tuned_model=tuned_model,
                            tuned_settings=tuned, layers=[l["name"] for l in layers],
                            rounds=args.rounds, min_s=args.min_ms / 1e3,
                            save_inputs=inputs if repeat == 0 and dense == "onednn"
                            else None,
                            out=os.path.join(work, f"caffe_{dense}.json"))
                        spec_path = os.path.join(work, f"spec_{dense}.json")
                        with open(spec_path, "w") as f:
                            json.dump(spec, f)
                        worker_env = dict(env)
                        if dense == "caffe":
                            worker_env["DYVE_DENSE"] = "caffe"
                        else:
                            worker_env.pop("DYVE_DENSE", None)
                        run([sys.executable, os.path.abspath(__file__), "--worker",
                             spec_path], worker_env)
                        with open(spec["out"]) as f:
                            rep[f"caffe_{dense}"] = json.load(f)
                    if have_ort:
                        spec = dict(layers=layers, inputs=inputs, threads=threads,
                                    rounds=args.rounds, min_s=args.min_ms / 1e3,
                                    out=os.path.join(work, "ort.json"))
                        spec_path = os.path.join(work, "spec_ort.json")
                        with open(spec_path, "w") as f:
                            json.dump(spec, f)
                        code_path = os.path.join(work, "ort_worker.py")
                        with open(code_path, "w") as f:
                            f.write(ORT_CODE)
                        run([ORT_PYTHON, code_path, spec_path], env)
                        with open(spec["out"]) as f:
                            rep["ort"] = json.load(f)
                    config["repeats"].append(rep)
                    print(f"kernel_bench: {net_name} batch {batch} threads {threads} "
                          f"repeat {repeat + 1}/{args.repeats}", file=sys.stderr)
                summarize(config)
                report["configs"].append(config)
    report["load_average_end"] = os.getloadavg()
    report["openblas"] = report["configs"][0]["repeats"][0]["cpp"]["openblas"]
    report["onednn"] = report["configs"][0]["repeats"][0]["cpp"]["onednn"]
    if have_ort:
        report["onnxruntime"] = report["configs"][0]["repeats"][0]["ort"]["onnxruntime"]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=1)
    text = markdown(report)
    with open(args.out + ".md", "w") as f:
        f.write(text)
    print(text)


CPP_COLUMNS = ("caffe_im2col_openblas", "onednn_nchw", "onednn_blocked", "onednn_plain",
               "onednn_winograd", "libxsmm")


def summarize(config):
    """Medians over the repeats, per layer and column, and the ratios."""
    rows = []
    for l in config["layers"]:
        name = l["name"]
        flop = 2.0 * config["batch"] * l["k"] * l["c"] * l["kernel"] ** 2 * \
            ((l["h"] + 2 * l["pad"] - l["kernel"]) // l["stride"] + 1) * \
            ((l["w"] + 2 * l["pad"] - l["kernel"]) // l["stride"] + 1)
        row = {"layer": name, "gflop": flop / 1e9, "ms": {}, "notes": {}}
        for cand in CPP_COLUMNS:
            values = []
            for rep in config["repeats"]:
                for lay in rep["cpp"]["layers"]:
                    if lay["name"] != name:
                        continue
                    for c in lay["candidates"]:
                        if c["name"] == cand:
                            row["notes"][cand] = c["note"]
                            if c["ok"]:
                                values.append(c["ms"])
            if values:
                row["ms"][cand] = statistics.median(values)
        med = lambda key, sub: statistics.median(
            rep[key]["layers"][name][sub] for rep in config["repeats"])
        row["ms"]["caffe_stock_layer"] = med("caffe_onednn", "stock")
        row["ms"]["dyve_knobs_off"] = med("caffe_onednn", "knobs_off")
        row["ms"]["dyve_knobs_off_caffe_path"] = med("caffe_caffe", "knobs_off")
        # The tuned layer in each process: SPET's prefix on oneDNN where it applies, and
        # on gathered rows under DYVE_DENSE=caffe.
        row["ms"]["dyve_tuned"] = med("caffe_onednn", "tuned")
        row["ms"]["dyve_tuned_caffe_path"] = med("caffe_caffe", "tuned")
        if "ort" in config["repeats"][0]:
            row["ms"]["onnxruntime"] = statistics.median(
                rep["ort"]["layers"][name] for rep in config["repeats"])
        row["op_reduction"] = config["repeats"][0]["caffe_onednn"]["layers"][name][
            "op_reduction"]
        ms = row["ms"]
        ratio = lambda a, b: (ms[a] / ms[b]) if a in ms and b in ms and ms[b] else None
        row["kernel_gain"] = ratio("caffe_stock_layer", "dyve_knobs_off")
        row["knobs_off_vs_ort"] = ratio("dyve_knobs_off", "onnxruntime")
        speed_caffe = ratio("dyve_knobs_off_caffe_path", "dyve_tuned_caffe_path")
        speed_new = ratio("dyve_knobs_off", "dyve_tuned")
        red = row["op_reduction"]
        first = config["repeats"][0]["caffe_onednn"]["layers"][name]
        row["tuned_settings"] = first["tuned_settings"]
        row["tuned_prefix_path"] = first.get("tuned_prefix_path")
        knobs = row["tuned_settings"] or {}
        tuned_on = bool(knobs.get("spet", {}).get("enabled") or
                        knobs.get("spet", {}).get("exact") or
                        knobs.get("sdss", {}).get("enabled") or
                        knobs.get("sfma", {}).get("enabled"))
        # Skipping efficiency = layer speedup / op reduction, each against the dense path
        # of the same kernel base: oneDNN's, and Caffe's (DYVE_DENSE=caffe).
        row["tuned_speedup_vs_onednn_dense"] = speed_new if tuned_on else None
        row["tuned_speedup_vs_caffe_dense"] = speed_caffe if tuned_on else None
        row["skipping_efficiency"] = (speed_new / red) if tuned_on and red and \
            speed_new else None
        row["skipping_efficiency_caffe_path"] = (speed_caffe / red) if tuned_on and red \
            and speed_caffe else None
        row["tuned_vs_ort"] = ratio("dyve_tuned", "onnxruntime")
        row["gflops"] = {k: row["gflop"] / (v / 1e3) for k, v in ms.items() if v}
        rows.append(row)
    config["rows"] = rows


LABELS = (("caffe_stock_layer", "stock Caffe layer"),
          ("caffe_im2col_openblas", "im2col+OpenBLAS (C++)"),
          ("onednn_nchw", "oneDNN, NCHW re-layouts timed"),
          ("onednn_blocked", "oneDNN kernel alone (blocked)"),
          ("onednn_plain", "oneDNN forced NCHW (gemm)"),
          ("libxsmm", "libxsmm (NCHW copies timed)"),
          ("dyve_knobs_off", "DyVE knobs off (oneDNN)"),
          ("dyve_knobs_off_caffe_path", "DyVE knobs off, DYVE_DENSE=caffe"),
          ("dyve_tuned", "DyVE tuned"),
          ("dyve_tuned_caffe_path", "DyVE tuned, DYVE_DENSE=caffe"),
          ("onnxruntime", "ONNX Runtime"))


def fmt(v, digits=3):
    return "–" if v is None else f"{v:.{digits}f}"


def markdown(report):
    out = [f"# Convolution kernels per layer (scripts/kernel_bench.py)", "",
           f"CPU: {report['cpu']} ({report['nproc']} cores; {', '.join(report['simd'])}; "
           f"no AVX-512 unless listed), {report['openblas']}, oneDNN {report['onednn']}"
           + (f", ONNX Runtime {report['onnxruntime']}" if "onnxruntime" in report else "")
           + f". Load average {report['load_average_start'][0]:.2f} at the start, "
           f"{report['load_average_end'][0]:.2f} at the end (a shared machine). "
           f"Medians of {report['repeats']} interleaved repeats of {report['rounds']} "
           f"rounds (>= {report['min_ms']:g} ms each). Times are ms per batch; "
           "every column is conv + bias + ReLU.", ""]
    for config in report["configs"]:
        out += [f"## {config['net']}, batch {config['batch']}, {config['threads']} "
                f"thread{'s' if config['threads'] > 1 else ''} (OPENBLAS_NUM_THREADS = "
                f"OMP_NUM_THREADS = ORT intra-op = {config['threads']})", "",
                f"Tuned settings: {config['tuned_source']}.", ""]
        cols = [k for k, _ in LABELS if any(k in r["ms"] for r in config["rows"])]
        out.append("| layer | GFLOP | " + " | ".join(dict(LABELS)[k] for k in cols) + " |")
        out.append("|---|---|" + "---|" * len(cols))
        for r in config["rows"]:
            cells = [f"{fmt(r['ms'].get(k))} ({fmt(r['gflops'].get(k), 0)})"
                     if k in r["ms"] else "–" for k in cols]
            out.append(f"| {r['layer']} | {r['gflop']:.4f} | " + " | ".join(cells) + " |")
        out += ["", "ms (GFLOP/s). Ratios:", "",
                "| layer | kernel gain (stock ÷ DyVE knobs off) | DyVE knobs off ÷ ORT | "
                "op reduction (tuned) | SPET prefix path (tuned) | "
                "tuned speedup vs oneDNN dense | skipping efficiency (oneDNN) | "
                "tuned speedup vs Caffe-path dense | skipping efficiency (Caffe path) | "
                "DyVE tuned ÷ ORT |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in config["rows"]:
            out.append(f"| {r['layer']} | {fmt(r['kernel_gain'], 2)} | "
                       f"{fmt(r['knobs_off_vs_ort'], 2)} | {fmt(r['op_reduction'], 2)} | "
                       f"{r.get('tuned_prefix_path') or '–'} | "
                       f"{fmt(r['tuned_speedup_vs_onednn_dense'], 2)} | "
                       f"{fmt(r['skipping_efficiency'], 2)} | "
                       f"{fmt(r['tuned_speedup_vs_caffe_dense'], 2)} | "
                       f"{fmt(r['skipping_efficiency_caffe_path'], 2)} | "
                       f"{fmt(r.get('tuned_vs_ort'), 2)} |")
        out.append("")
    notes = report["configs"][0]["rows"][0]["notes"]
    out += ["Candidate notes (first layer): " + "; ".join(
        f"{k}: {v}" for k, v in notes.items()), ""]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
