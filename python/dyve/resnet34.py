"""dlib's ImageNet ResNet-34 as a Caffe net: conversion, the check against dlib, DyVE on it.

    python3 -m dyve.resnet34 convert        # fetch, build the dumper, dump, convert
    python3 -m dyve.resnet34 check [--max-images N]   # Caffe against dlib itself
    python3 -m dyve.resnet34 dyve           # tune on one half of the photos, bench the other

Everything lands in build/resnet34/ (the model, the dumper, its dump, the Caffe files) and
reports/resnet34/ (the check, the tuning, the benchmark). docs/resnet34.md has the
layer-by-layer mapping, the input convention and the measured figures.

The model comes from Debian's dlib source package (scripts/fetch_dlib_models.py, pinned by
SHA-256). tools/dlib_resnet34.cpp, built against Debian's libdlib-dev, deserializes it into
the network type of dlib's examples/dnn_imagenet_ex.cpp and writes its parameters
(`dump`), and runs dlib's own forward pass on given pixels (`run`). This module turns the
dump into the Caffe net of dyve.nets.resnet34:

* con + affine -> Convolution with the affine folded in (W' = gamma W, b' = gamma b + beta,
  per output channel, in float64 then rounded to float32);
* conv1 also takes dlib's input normalisation: dlib feeds (pixel - mean) / 256 in RGB order,
  the Caffe net gets BGR pixel - mean (the same float32 mean values), so conv1's weights
  are divided by 256 (exact: a power of two) and their input channels reversed;
* avg_pool 2x2/2 + add_prev's zero channels -> Pooling AVE FLOOR + Power 0 + Concat (no
  weights); relu -> ReLU; avg_pool_everything -> global AVE Pooling;
* fc -> InnerProduct: dlib's [inputs + 1][outputs] matrix transposed, the last row the bias.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("GLOG_minloglevel", "2")

from dyve import nets  # noqa: E402
from dyve.tools import BUILD_DIR, REPO_ROOT  # noqa: E402

sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))
import fetch_dlib_models  # noqa: E402

NAME = "resnet34"
WORK_DIR = os.path.join(BUILD_DIR, NAME)
TOOL_SOURCE = os.path.join(REPO_ROOT, "tools", "dlib_resnet34.cpp")
TOOL = os.path.join(WORK_DIR, "dlib_resnet34")
DUMP_DIR = os.path.join(WORK_DIR, "dump")
DEPLOY = os.path.join(WORK_DIR, "resnet34_deploy.prototxt")
DYVE_DEPLOY = os.path.join(WORK_DIR, "resnet34_dyve_deploy.prototxt")
CAFFEMODEL = os.path.join(WORK_DIR, "resnet34.caffemodel")
INFO = os.path.join(WORK_DIR, "conversion.json")
REPORT_DIR = os.path.join(REPO_ROOT, "reports", NAME)
INPUT_SIZE = 227
CLASSES = 1000
# Caffe's input: BGR pixel minus dlib's mean, as caffe_io's --mean values.
MEAN_ARG = ",".join(f"{v:g}" for v in nets.DLIB_MEAN_BGR)


class ConversionError(RuntimeError):
    """The dump does not have the layer stack dyve.nets.resnet34 expects, or a step failed."""


def shared_dir():
    from dyve import data
    return data.shared_data_dir()


def default_images():
    return os.path.join(shared_dir(), "imagenet-sample-dev")


# ----------------------------------------------------------------------------- the dumper

def build_tool(tool=TOOL, source=TOOL_SOURCE, quiet=False):
    """Compile tools/dlib_resnet34.cpp against Debian's libdlib-dev unless up to date."""
    if os.path.isfile(tool) and os.path.getmtime(tool) >= os.path.getmtime(source):
        return tool
    try:
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", "dlib-1"], check=True,
                               capture_output=True, text=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        raise ConversionError("pkg-config finds no dlib-1: install libdlib-dev (make deps)") \
            from None
    os.makedirs(os.path.dirname(tool), exist_ok=True)
    command = ["g++", "-O2", "-std=c++14", "-o", tool + ".part", source, *flags]
    if not quiet:
        print("+", " ".join(command), flush=True)
    if subprocess.run(command).returncode != 0:
        raise ConversionError(f"compiling {source} failed")
    os.replace(tool + ".part", tool)
    return tool


def dump(model, out_dir=DUMP_DIR, tool=TOOL):
    os.makedirs(out_dir, exist_ok=True)
    subprocess.run([tool, "dump", model, out_dir], check=True, stdout=subprocess.DEVNULL)
    return out_dir


def _value(text):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def read_dump(dump_dir=DUMP_DIR):
    """[{"kind", "index", field: value, ..., "values": float32 array}] in input-to-output
    order, and the label strings."""
    params = np.fromfile(os.path.join(dump_dir, "params.f32"), dtype="<f4")
    layers = []
    with open(os.path.join(dump_dir, "layers.txt")) as f:
        for line in f:
            index, kind, *fields = line.split()
            entry = {"index": int(index), "kind": kind}
            entry.update({k: _value(v) for k, v in (x.split("=", 1) for x in fields)})
            entry["values"] = params[entry["offset"]:entry["offset"] + entry["count"]]
            layers.append(entry)
    if sum(e["count"] for e in layers) != params.size:
        raise ConversionError(f"{dump_dir}: layers.txt accounts for "
                              f"{sum(e['count'] for e in layers)} values, params.f32 holds "
                              f"{params.size}")
    with open(os.path.join(dump_dir, "labels.txt")) as f:
        labels = [line.rstrip("\n") for line in f]
    return layers, labels


def expected_stack():
    """The computational layers dlib's dnn_imagenet_ex.cpp net must have, input to output,
    each (kind, {field: value}) with the Caffe layer (conv/fc name) it becomes."""
    def con(n, k, size, stride):
        pad = 0 if stride != 1 else size // 2  # dlib's default padding rule
        return ("con", dict(num_filters=n, k=k, nr=size, nc=size, stride_y=stride,
                            stride_x=stride, padding_y=pad, padding_x=pad))

    def pool(kind, size, stride):
        return (kind, dict(nr=size, nc=size, stride_y=stride, stride_x=stride,
                           padding_y=0, padding_x=0))

    stack = [("input_rgb_image_sized", dict(nr=INPUT_SIZE, nc=INPUT_SIZE, scale=256)),
             con(64, 3, 7, 2) + ("conv1",), ("affine", dict(mode="CONV", k=64)), ("relu", {}),
             pool("max_pool", 3, 2)]
    k = 64
    for stage, width, blocks in nets.RESNET34_STAGES:
        for b in range(blocks):
            name = f"res{stage}{chr(ord('a') + b)}"
            down = b == 0 and stage > 2
            stack += [con(width, k, 3, 2 if down else 1) + (name + "_branch2a",),
                      ("affine", dict(mode="CONV", k=width)), ("relu", {}),
                      con(width, width, 3, 1) + (name + "_branch2b",),
                      ("affine", dict(mode="CONV", k=width))]
            if down:
                stack.append(pool("avg_pool", 2, 2))
            stack += [("add_prev", dict(tag=2 if down else 1)), ("relu", {})]
            k = width
    stack += [pool("avg_pool", 0, 1),
              ("fc", dict(num_outputs=CLASSES, num_inputs=k, bias=1), "fc1000")]
    return stack


def check_stack(layers):
    """Refuse a dump whose layer stack differs from expected_stack() in any field."""
    stack = expected_stack()
    if len(layers) != len(stack):
        raise ConversionError(f"the dlib net has {len(layers)} computational layers, "
                              f"ResNet-34 as dnn_imagenet_ex.cpp builds it has {len(stack)}")
    for entry, (kind, fields, *_) in zip(layers, stack):
        wrong = {k: (entry.get(k), v) for k, v in fields.items() if entry.get(k) != v}
        if entry["kind"] != kind or wrong:
            raise ConversionError(f"dlib layer {entry['index']} is {entry['kind']} "
                                  f"{ {k: entry.get(k) for k in fields} }, expected {kind} "
                                  f"{fields}")


def caffe_weights(layers):
    """{Caffe layer: (weights, bias)} float32 from the dump (see the module docstring)."""
    check_stack(layers)
    stack = expected_stack()
    inp = layers[0]
    mean_rgb = np.array([inp["avg_red"], inp["avg_green"], inp["avg_blue"]], np.float32)
    if not np.array_equal(mean_rgb[::-1], np.array(nets.DLIB_MEAN_BGR, np.float32)):
        raise ConversionError(f"the model's input mean (RGB) {mean_rgb.tolist()} is not "
                              f"dyve.nets.DLIB_MEAN_BGR reversed {nets.DLIB_MEAN_BGR}")
    out = {}
    for i, (entry, (kind, _fields, *caffe_name)) in enumerate(zip(layers, stack)):
        if kind == "con":
            n, k, size = entry["num_filters"], entry["k"], entry["nr"]
            v = entry["values"].astype(np.float64)
            w = v[:n * k * size * size].reshape(n, k, size, size)
            b = v[n * k * size * size:] if entry["bias"] else np.zeros(n)
            affine = layers[i + 1]
            gamma = affine["values"][:n].astype(np.float64)
            beta = affine["values"][n:].astype(np.float64)
            w = w * gamma[:, None, None, None]
            b = b * gamma + beta
            if caffe_name[0] == "conv1":
                w = w[:, ::-1] / float(inp["scale"])  # RGB -> BGR, dlib's / 256
            out[caffe_name[0]] = (w.astype(np.float32), b.astype(np.float32))
        elif kind == "fc":
            m = entry["values"].reshape(entry["num_inputs"] + 1, entry["num_outputs"])
            out[caffe_name[0]] = (np.ascontiguousarray(m[:-1].T), m[-1].copy())
    return out


def check_labels(labels, wnids_file=None):
    """dlib's class order must be Caffe's (sorted wnids): compare its label strings, by
    position, with the names of ilsvrc2012_wnids.txt (names are not unique, so a
    name-by-name match at every position is the check)."""
    wnids_file = wnids_file or os.path.join(shared_dir(), "ilsvrc2012_wnids.txt")
    with open(wnids_file) as f:
        names = [line.split()[1] if len(line.split()) > 1 else "" for line in f if line.strip()]
    if len(labels) != len(names):
        raise ConversionError(f"the model has {len(labels)} labels, {wnids_file} "
                              f"{len(names)} classes")
    bad = [i for i, (a, b) in enumerate(zip(labels, names)) if a != b]
    if bad:
        i = bad[0]
        raise ConversionError(f"{len(bad)} of the model's labels differ from {wnids_file} "
                              f"(first: class {i}, dlib '{labels[i]}', wnids file "
                              f"'{names[i]}'): dlib's class order is not Caffe's")
    return len(labels)


def convert(work_dir=WORK_DIR, fetch=True, quiet=False):
    """Fetch (verified), build the dumper, dump, convert: writes the deploy prototxts (stock
    and DyVE with every knob off; batch 1), the caffemodel and conversion.json."""
    import caffe
    from dyve import caffe_io
    started = time.time()
    model = fetch_dlib_models.model_path(fetch=fetch,
                                         model_dir=work_dir)
    tool = build_tool(os.path.join(work_dir, "dlib_resnet34"), quiet=quiet)
    dump_dir = dump(model, os.path.join(work_dir, "dump"), tool)
    layers, labels = read_dump(dump_dir)
    n_labels = check_labels(labels)
    weights = caffe_weights(layers)
    deploy = os.path.join(work_dir, os.path.basename(DEPLOY))
    dyve_deploy = os.path.join(work_dir, os.path.basename(DYVE_DEPLOY))
    caffemodel = os.path.join(work_dir, os.path.basename(CAFFEMODEL))
    header = ("# Generated by python3 -m dyve.resnet34 convert (dyve.nets.resnet34) for "
              "dlib's resnet34_1000_imagenet_classifier.dnn; do not edit.\n")
    for path, dyve in ((deploy, None), (dyve_deploy, {})):
        with open(path + ".part", "w") as f:
            f.write(header + nets.to_text(nets.resnet34("deploy", dyve=dyve, deploy_batch=1)))
        os.replace(path + ".part", path)
    net = caffe_io.load_net(deploy)
    if set(net.params) != set(weights):
        raise ConversionError(f"Caffe layers with weights {sorted(net.params)} != converted "
                              f"{sorted(weights)}")
    for name, (w, b) in weights.items():
        blobs = net.params[name]
        if blobs[0].data.shape != w.shape or blobs[1].data.shape != b.shape:
            raise ConversionError(f"{name}: Caffe shapes {blobs[0].data.shape}, "
                                  f"{blobs[1].data.shape}; converted {w.shape}, {b.shape}")
        blobs[0].data[...] = w
        blobs[1].data[...] = b
    net.save(caffemodel + ".part")
    os.replace(caffemodel + ".part", caffemodel)
    info = {"model": model, "model_sha256": fetch_dlib_models.MODEL_SHA256,
            "tarball_sha256": fetch_dlib_models.MODELS_SHA256,
            "dlib_layers": len(layers), "labels": n_labels,
            "parameters_dlib": int(sum(e["count"] for e in layers)),
            "parameters_caffe": int(sum(w.size + b.size for w, b in weights.values())),
            "deploy": deploy, "dyve_deploy": dyve_deploy, "caffemodel": caffemodel,
            "elapsed_s": round(time.time() - started, 1)}
    with open(os.path.join(work_dir, "conversion.json"), "w") as f:
        json.dump(info, f, indent=1)
    if not quiet:
        print(f"resnet34: {len(layers)} dlib layers -> {len(weights)} Caffe layers with "
              f"weights; wrote {deploy}, {dyve_deploy}, {caffemodel}")
    return info


# ----------------------------------------------------------------------------- the check

def load_crops(images_dir, limit=None, seed=1701):
    """(uint8 N x 227 x 227 x 3 RGB crops, labels, float32 N x 3 x 227 x 227 Caffe input),
    preprocessed exactly as dyve.tune / dyve.bench load a photo folder (caffe_io): OpenCV
    decode, bilinear resize to 256 x 256, centre 227 x 227 crop; the Caffe input is that
    crop in BGR minus dlib's mean."""
    from dyve import caffe_io
    x, labels = caffe_io.load_images(images_dir, (3, INPUT_SIZE, INPUT_SIZE), mean=None,
                                     limit=limit, seed=seed)
    rgb = np.ascontiguousarray(x[:, ::-1].transpose(0, 2, 3, 1)).astype(np.uint8)
    if not np.array_equal(rgb.astype(np.float32), x[:, ::-1].transpose(0, 2, 3, 1)):
        raise ConversionError("the loaded crops are not whole pixel values")
    caffe_in = x - np.array(nets.DLIB_MEAN_BGR, np.float32).reshape(1, 3, 1, 1)
    return rgb, labels, caffe_in


def dlib_logits(rgb, model, tool=TOOL):
    """dlib's own fc outputs for uint8 RGB crops (its input layer normalises them)."""
    with tempfile.TemporaryDirectory(prefix="dyve-dlib-") as tmp:
        images, out = os.path.join(tmp, "images.u8"), os.path.join(tmp, "logits.f32")
        rgb.tofile(images)
        n, h, w, _ = rgb.shape
        subprocess.run([tool, "run", model, images, str(n), str(h), str(w), out], check=True)
        return np.fromfile(out, dtype="<f4").reshape(n, CLASSES)


def caffe_logits(x, deploy=DEPLOY, caffemodel=CAFFEMODEL, batch=10):
    from dyve import caffe_io
    net = caffe_io.load_net(deploy, caffemodel)
    out = []
    for start in range(0, len(x), batch):
        part = x[start:start + batch]
        caffe_io.reshape(net, len(part))
        net.blobs["data"].data[...] = part
        net.forward()
        out.append(net.blobs["fc1000"].data.reshape(len(part), -1).copy())
    return np.concatenate(out)


def _topk(scores, labels, k):
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.mean((top == labels[:, None]).any(axis=1)))


def compare(dlib, caffe_scores, labels):
    """Agreement figures of two N x 1000 logit arrays on the same images."""
    diff = np.abs(dlib.astype(np.float64) - caffe_scores)
    scale = np.abs(dlib).max(axis=1)
    return {
        "images": int(len(labels)),
        "top1_agreement": float(np.mean(dlib.argmax(1) == caffe_scores.argmax(1))),
        "top5_set_agreement": float(np.mean(
            [set(a) == set(b) for a, b in zip(np.argsort(-dlib, 1)[:, :5],
                                              np.argsort(-caffe_scores, 1)[:, :5])])),
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "max_rel_logit_diff": float((diff.max(axis=1) / scale).max()),
        "logit_abs_max": float(np.abs(dlib).max()),
        "dlib": {"top1": _topk(dlib, labels, 1), "top5": _topk(dlib, labels, 5)},
        "caffe": {"top1": _topk(caffe_scores, labels, 1),
                  "top5": _topk(caffe_scores, labels, 5)},
    }


def check(images_dir=None, limit=None, work_dir=WORK_DIR, threads=None):
    """Run dlib and the converted Caffe net on the same crops; the compare() figures plus
    the timing of each side."""
    images_dir = images_dir or default_images()
    info_path = os.path.join(work_dir, "conversion.json")
    with open(info_path) as f:
        info = json.load(f)
    model = fetch_dlib_models.model_path(fetch=False, model_dir=work_dir)  # re-verified
    rgb, labels, x = load_crops(images_dir, limit)
    t0 = time.time()
    d = dlib_logits(rgb, model, os.path.join(work_dir, "dlib_resnet34"))
    t1 = time.time()
    c = caffe_logits(x, info["deploy"], info["caffemodel"])
    t2 = time.time()
    result = compare(d, c, labels)
    result.update({"images_dir": images_dir, "dlib_s": round(t1 - t0, 1),
                   "caffe_s": round(t2 - t1, 1),
                   "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS")})
    from dyve.machine import machine_facts
    facts = machine_facts()
    result["cpu"] = f"{facts.get('cpu_model')}, {facts.get('cores')} cores"
    return result


def format_check(r):
    return (f"ResNet-34, dlib vs converted Caffe on {r['images']} photos of "
            f"{r['images_dir']} ({r.get('cpu')}, OPENBLAS_NUM_THREADS="
            f"{r.get('openblas_threads')}):\n"
            f"  top-1 agreement {100 * r['top1_agreement']:.2f} %, top-5 set agreement "
            f"{100 * r['top5_set_agreement']:.2f} %\n"
            f"  logits: max |diff| {r['max_abs_logit_diff']:.3g}, mean |diff| "
            f"{r['mean_abs_logit_diff']:.3g}, max |diff| / max |logit| per image "
            f"{r['max_rel_logit_diff']:.3g} (max |logit| {r['logit_abs_max']:.3g})\n"
            f"  dlib:  top-1 {100 * r['dlib']['top1']:.2f} %, top-5 "
            f"{100 * r['dlib']['top5']:.2f} %  ({r['dlib_s']} s)\n"
            f"  Caffe: top-1 {100 * r['caffe']['top1']:.2f} %, top-5 "
            f"{100 * r['caffe']['top5']:.2f} %  ({r['caffe_s']} s)")


# ----------------------------------------------------------------------------- DyVE

def split_halves(images_dir=None, work_dir=WORK_DIR):
    """Two folders of symlinks: tune/ (the photos at even positions in sorted order) and
    eval/ (odd positions), so the tuner never sees a measured photo."""
    from dyve import data
    images_dir = os.path.abspath(images_dir or default_images())
    items = data.imagenet_labels(images_dir)
    out = {}
    for half, parity in (("tune", 0), ("eval", 1)):
        folder = os.path.join(work_dir, "photos", half)
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        os.makedirs(folder)
        for rel, _ in items[parity::2]:
            os.symlink(os.path.join(images_dir, rel),
                       os.path.join(folder, os.path.basename(rel)))
        out[half] = folder
    return out


VIEWS_LMDB = os.path.join(WORK_DIR, "photos", "tune_views_lmdb")
VIEWS_PER_PHOTO = 10  # caffe.io.oversample: the four corner crops, the centre, their mirrors


def write_views(photos_dir, out=VIEWS_LMDB):
    """An LMDB of the 10 standard crops and flips of every photo in `photos_dir`, for the
    tuner's label-free search (the dense net's predictions on them are the labels).

    Each photo is read as dyve.tune reads a folder (OpenCV, bilinear resize to 256 x 256),
    then caffe.io.oversample cuts the 227 x 227 views, so view 4 is the centre crop the
    tuner and the bench see. Keys are "<view>_<photo>", view-major: the first N records
    (what --search-count reads) cover every photo before any photo's next view. Written to
    a temporary folder, then moved into place. Returns {"path", "photos", "views"}."""
    import cv2
    import lmdb
    import caffe.io
    from caffe.proto import caffe_pb2  # noqa: F401  (array_to_datum needs it loaded)
    from dyve import data
    items = data.imagenet_labels(photos_dir)
    if not items:
        raise ConversionError(f"--images: no wnid-named photos in {photos_dir}")
    size = max(INPUT_SIZE, 256)  # caffe_io's stored size for ImageNet inputs
    tmp = data._tmp_name(out)
    data._remove(tmp)
    bytes_per_view = 3 * INPUT_SIZE * INPUT_SIZE + 64
    env = lmdb.open(tmp, map_size=2 * bytes_per_view * VIEWS_PER_PHOTO * len(items) + (1 << 24))
    try:
        with env.begin(write=True) as txn:
            for index, (rel, label) in enumerate(items):
                path = os.path.join(photos_dir, rel)
                img = cv2.imread(path, cv2.IMREAD_COLOR)
                if img is None:
                    raise ConversionError(f"OpenCV cannot read the photo {path}")
                img = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
                views = caffe.io.oversample([img], (INPUT_SIZE, INPUT_SIZE))
                for view, crop in enumerate(views):
                    datum = caffe.io.array_to_datum(
                        crop.astype(np.uint8).transpose(2, 0, 1), int(label))
                    txn.put(f"{view:02d}_{index:05d}".encode(), datum.SerializeToString())
    finally:
        env.close()
    data._replace(tmp, out)
    return {"path": out, "photos": len(items), "views": VIEWS_PER_PHOTO * len(items)}


# The tuning run of docs/resnet34.md: ResNet-34 costs about 0.1 s per image per pass here,
# so the tuner sees 150 of the 250 tuning photos (105 search + 45 holdout), sweeps each
# level on 20 of them, and uses SPET and SDSS (SFMA's sweep would add 85 evaluations).
TUNE_OPTIONS = dict(budget=0.5, knobs=("spet", "sdss"), max_images=150, sweep_images=20,
                    batch=15, cache_mb=6000, seed=1701)
# The label-free run (`--search views`): the sweep and the greedy are judged by agreement
# with the dense net on the tuning photos' crops and flips (write_views), the first
# search_count of them in view-major order (2 views of each of the 250 photos); every one
# of the 250 labelled tuning photos then certifies the greedy path's walk-back
# (docs/tuner.md, Label-free search). The search budget is looser than the budget: it only
# orders the steps. Two workers with one OpenBLAS thread each.
TUNE_VIEWS_OPTIONS = dict(budget=0.5, knobs=("spet", "sdss"), max_images=None,
                          search_count=500, search_budget=3.0, sweep_images=100, batch=25,
                          cache_mb=8000, seed=1701, workers=2)
SEARCHES = ("labels", "views")
BENCH_OPTIONS = ["--batch", "10", "--time-images", "10", "--repeats", "5"]


def dyve(images_dir=None, out_dir=REPORT_DIR, threads="1,2", tune_options=None,
         work_dir=WORK_DIR, time_limit=None, search="labels"):
    """Tune the DyVE form on one half of the photos and measure it against the stock
    converted net on the other with dyve.bench; returns the bench summary.json path.
    `search`: "labels" judges the search on labelled tuning photos (TUNE_OPTIONS);
    "views" judges it label-free on their crops and flips (TUNE_VIEWS_OPTIONS).
    `time_limit` (seconds): stop the tuner then, keeping the best setting so far."""
    import signal
    from dyve import tune
    info_path = os.path.join(work_dir, "conversion.json")
    if not os.path.isfile(info_path):
        convert(work_dir)
    with open(info_path) as f:
        info = json.load(f)
    fetch_dlib_models.model_path(fetch=False, model_dir=work_dir)  # re-verified
    halves = split_halves(images_dir, work_dir)
    if search not in SEARCHES:
        raise ConversionError(f"--search must be one of {', '.join(SEARCHES)}, got {search!r}")
    tune_dir = os.path.join(out_dir, "tune")
    if search == "views":
        views = write_views(halves["tune"], os.path.join(work_dir, "photos", "tune_views_lmdb"))
        print(f"resnet34: {views['views']} views of {views['photos']} tuning photos in "
              f"{views['path']}", flush=True)
        options = dict(TUNE_VIEWS_OPTIONS, search_images=views["path"], **(tune_options or {}))
    else:
        options = dict(TUNE_OPTIONS, **(tune_options or {}))
    started = time.time()
    if time_limit:
        def stop(signum, frame):
            raise KeyboardInterrupt
        signal.signal(signal.SIGALRM, stop)
        signal.alarm(int(time_limit))
    try:
        tune.tune(info["dyve_deploy"], info["caffemodel"], halves["tune"], mean=MEAN_ARG,
                  out_dir=tune_dir, progress=False, **options)
    finally:
        if time_limit:
            signal.alarm(0)
    print(f"resnet34: tuned in {(time.time() - started) / 60:.1f} min", flush=True)
    command = [sys.executable, "-m", "dyve.bench", "--net", NAME,
               "--weights", info["caffemodel"], "--stock", info["deploy"],
               "--dyve", os.path.join(tune_dir, "tuned_deploy.prototxt"),
               "--images", halves["eval"], "--mean-value", MEAN_ARG,
               "--threads", threads, "--onnx", "--out-dir", out_dir, *BENCH_OPTIONS]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO_ROOT)
    return os.path.join(out_dir, "summary.json")


def reproduce_row(reports_dir, images_dir, threads):
    """dyve.reproduce's ResNet-34 row: the summary.json path, or None (with the reason
    printed) when dlib's model cannot be downloaded."""
    try:
        convert(quiet=True)
    except fetch_dlib_models.FetchError as error:
        if error.status != fetch_dlib_models.EXIT_UNAVAILABLE:
            raise
        print(f"reproduce: resnet34 skipped: dlib's model cannot be downloaded ({error})",
              flush=True)
        return None
    return dyve(images_dir, os.path.join(reports_dir, NAME), threads)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 -m dyve.resnet34",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="fetch, dump and convert into build/resnet34")
    c.add_argument("--no-fetch", action="store_true", help="never download")
    k = sub.add_parser("check", help="the converted net against dlib itself")
    k.add_argument("--images", help="wnid-named photos (default: the shared sample)")
    k.add_argument("--max-images", type=int, help="a seeded subset of N photos")
    k.add_argument("--out", default=os.path.join(REPORT_DIR, "conversion_check.json"),
                   help="where to write the figures (default %(default)s)")
    s = sub.add_parser("split", help="tune/eval halves of the photos (symlinks)")
    s.add_argument("--images", help="wnid-named photos (default: the shared sample)")
    d = sub.add_parser("dyve", help="tune on the tune half, dyve.bench on the eval half")
    d.add_argument("--images", help="wnid-named photos (default: the shared sample)")
    d.add_argument("--threads", default="1,2", help="OpenBLAS threads timed (default 1,2)")
    d.add_argument("--out-dir", default=REPORT_DIR, help="default %(default)s")
    d.add_argument("--time-limit", type=float,
                   help="stop the tuner after this many seconds (best setting so far, "
                        "not certified)")
    d.add_argument("--search-time", type=float, metavar="SECONDS",
                   help="start no greedy round after this many seconds; what was accepted "
                        "is still certified (dyve.tune --search-time)")
    d.add_argument("--search", choices=SEARCHES, default="labels",
                   help="judge the search on labelled tuning photos, or label-free on "
                        "their crops and flips (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            convert(fetch=not args.no_fetch)
        elif args.command == "check":
            result = check(args.images, args.max_images)
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
            print(format_check(result))
        elif args.command == "dyve":
            extra = {} if args.search_time is None else {"search_time": args.search_time}
            dyve(args.images, args.out_dir, args.threads, time_limit=args.time_limit,
                 search=args.search, tune_options=extra)
        elif args.command == "split":
            for half, folder in split_halves(args.images).items():
                print(f"{half}: {folder}")
    except (ConversionError, fetch_dlib_models.FetchError) as error:
        print(f"error: {error}", file=sys.stderr)
        return getattr(error, "status", 1) or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
