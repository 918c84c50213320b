"""Side-by-side benchmark of a stock Caffe net and its DyVE form (``python3 -m dyve.bench``).

One run compares, with the same weights on the same images:

* **accuracy** (one pass, batch ``--batch``): top-1 (and top-5 when the net has >= 100
  classes) of the stock net, the DyVE net and, with ``--opencv``, OpenCV's dnn module
  reading the stock deploy prototxt; the DyVE - stock difference with its paired flips
  (right->wrong, wrong->right) and a 95 % confidence interval from the paired standard
  error; and the DyVE effort counters (``dyve.live.effort``, reset first) per layer and
  per knob. Operation counts:

  - ``ops_dense`` = sum of ``macs_dense`` over the DyVE layers + the MACs of the stock
    net's other Convolution / InnerProduct layers (from their shapes);
  - ``ops_executed`` = sum of (``macs_executed`` + every ``ops_*`` overhead) over the
    DyVE layers + the same non-DyVE MACs;
  - ``ops_reduction`` = ops_dense / ops_executed ("whole net"), and the same restricted
    to the DyVE layers (``ops_reduction_dyve_layers``). All three are totals over the
    accuracy pass (``*_per_image`` divides by the images).

* **wall time**: for each thread count a worker process of this module (hidden
  ``--worker`` mode) starts with ``OPENBLAS_NUM_THREADS`` (and ``OMP_NUM_THREADS``,
  ``cv2.setNumThreads``) set, since OpenBLAS reads it when it loads. At batch 1 and at
  batch N it warms up, then for ``--repeats`` rounds runs the engines interleaved
  (stock, DyVE[, OpenCV], stock, DyVE, ... one batch each) over the same fixed images
  (the first ``--time-images``), and takes the median over the rounds of each engine's
  per-image wall time; speedup = stock / DyVE. Per layer it times each DyVE layer against
  the stock layer of the same name (``net._forward(i, i)``, the DyVE layer fed the stock
  net's bottom blobs, interleaved, median), giving ms per image, speedup and the
  *skipping efficiency* = layer speedup / layer op reduction (1.0: wall time falls as
  fast as the operation count).

Without ``--weights`` ("no weights" mode) the stock net's parameters get seeded filler
values (He-normal weights, zero biases, where the deploy prototxt gives none) that are
saved to a temporary caffemodel and loaded by the DyVE net (and OpenCV); accuracy is
then meaningless and left out of the tables (top-1 is null in the JSON; the stock/DyVE
prediction agreement is still reported), and the row is labelled
"no weights: dense-path overhead only".

Outputs (written atomically): ``<out-dir>/summary.json``, ``summary.md`` and
``effort.png`` (per-layer MACs executed vs skipped by knob). ``--table FILE...`` merges
several summaries into the paper-style table (markdown with ``--table-md``, a plain
whitespace-separated table on stdout that :func:`parse_table` reads back).

summary.json (``SCHEMA_VERSION`` 1), main keys:
    net, label, schema_version, created, command, weights (path or null), stock, dyve,
    images_source, mean, images (accuracy-pass images), num_classes, batch, repeats,
    threads [int], batches [int], time_images,
    baseline_top1, dyve_top1, opencv_top1 (float in [0, 1] or null), baseline_top5,
    dyve_top5, opencv_top5 (or null), accuracy {top1: {stock, dyve, diff, diff_ci95,
    se, flips_right_to_wrong, flips_wrong_to_right}, top5: ..., opencv_vs_stock: ...,
    agreement_top1},
    ops_dense, ops_executed (int totals), ops_reduction (float, whole net),
    ops_dense_dyve_layers, ops_executed_dyve_layers, ops_reduction_dyve_layers,
    ops_dense_per_image, ops_executed_per_image,
    effort {layers: {name: {dyve, type, macs_dense, macs_executed, macs_skipped{knob},
    ops_overhead{knob}, ops_dense, ops_executed, ops_reduction, neurons{...}, settings}},
    knobs: {knob: {macs_skipped, ops_overhead, neurons}}},
    speedup {"<batch>": {"<threads>": float}}, speedup_opencv (stock/OpenCV, same keys),
    timings {"<batch>": {"<threads>": {ms_per_image {engine: median}, rounds_ms
    {engine: [...]}, round_speedups [...], layers {name: {stock_ms, dyve_ms, speedup,
    ops_reduction, skipping_efficiency}}, openblas_threads, loadavg}}},
    machine {cpu_model, cores, openblas {library, config, corename, threads}, opencv,
    numpy, python, loadavg}, warnings [str].
"""
import argparse
import contextlib
import ctypes
import datetime
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("GLOG_minloglevel", "2")  # before Caffe loads: no net-init log

from dyve import files  # noqa: E402
from dyve.tools import REPO_ROOT  # noqa: E402

SCHEMA_VERSION = 1
KNOBS = ("spet", "exact", "sdss", "sfma")
# Neurons decided by each knob (docs/knobs.md counters).
KNOB_NEURONS = {"spet": "spet_zeroed", "exact": "exact_stopped", "sdss": "sdss_filled",
                "sfma": "sfma_maps"}
STOCK_TO_DYVE = {"Convolution": "DyveConvolution", "InnerProduct": "DyveInnerProduct"}
WEIGHTED_TYPES = tuple(STOCK_TO_DYVE) + tuple(STOCK_TO_DYVE.values())
ENGINES = ("stock", "dyve", "opencv")
NO_WEIGHTS_LABEL = "no weights: dense-path overhead only"
FILLER_SEED = 1704

# Keys (and types) every summary.json has; tests and --table rely on them.
REQUIRED_KEYS = {
    "net": str, "images": int, "baseline_top1": (float, type(None)),
    "dyve_top1": (float, type(None)), "ops_dense": int, "ops_executed": int,
    "ops_reduction": float, "speedup": dict, "effort": dict, "timings": dict,
    "accuracy": dict, "machine": dict, "command": str,
}


class BenchError(RuntimeError):
    """Bad input or a failed step, with a message for the user."""


def _progress(iterable=None, **kwargs):
    from tqdm import tqdm
    return tqdm(iterable, disable=None, **kwargs)  # a bar on a terminal only


def _caffe():
    os.environ.setdefault("GLOG_minloglevel", "2")
    import caffe
    caffe.set_mode_cpu()
    return caffe


# ----------------------------------------------------------------------------- checks

def _need_file(path, what):
    if not path:
        raise BenchError(f"no {what} given")
    if not os.path.exists(path):
        raise BenchError(f"{what} {path} does not exist")
    return path


def read_prototxt(path, what="prototxt"):
    """A NetParameter parsed from a text prototxt (a clear error instead of Caffe's abort)."""
    from caffe.proto import caffe_pb2
    from google.protobuf import text_format
    _need_file(path, what)
    if os.path.isdir(path):
        raise BenchError(f"{what} {path} is a folder, not a prototxt")
    net = caffe_pb2.NetParameter()
    try:
        with open(path) as f:
            text_format.Merge(f.read(), net)
    except (text_format.ParseError, UnicodeDecodeError) as error:
        raise BenchError(f"{what} {path} is not a valid NetParameter prototxt: {error}") \
            from None
    if not net.layer:
        raise BenchError(f"{what} {path} has no layers (old V1 'layers' format? upgrade it "
                         "with upgrade_net_proto_text)")
    return net


def caffemodel_shapes(path):
    """{layer name: [blob shape tuple, ...]} of a caffemodel (binary NetParameter, or HDF5
    when the name ends in .h5). Legacy 4-d blobs (num/channels/height/width) come back as
    ("legacy", n, c, h, w)."""
    _need_file(path, "weights file")
    if path.endswith((".h5", ".hdf5")):
        import h5py
        shapes = {}
        try:
            with h5py.File(path, "r") as f:
                for name, group in f["data"].items():
                    shapes[name] = [tuple(group[str(i)].shape) for i in range(len(group))]
        except (OSError, KeyError) as error:
            raise BenchError(f"weights file {path} is not a Caffe HDF5 model: {error}") \
                from None
        return shapes
    from caffe.proto import caffe_pb2
    from google.protobuf.message import DecodeError
    model = caffe_pb2.NetParameter()
    try:
        with open(path, "rb") as f:
            model.ParseFromString(f.read())
    except DecodeError as error:
        raise BenchError(f"weights file {path} is not a binary caffemodel: {error}") from None
    layers = list(model.layer) or list(model.layers)  # V1 models keep "layers"
    if not layers:
        raise BenchError(f"weights file {path} holds no layers (not a caffemodel?)")
    shapes = {}
    for layer in layers:
        blobs = []
        for blob in layer.blobs:
            if blob.HasField("shape"):
                blobs.append(tuple(blob.shape.dim))
            else:
                blobs.append(("legacy", blob.num, blob.channels, blob.height, blob.width))
        shapes[layer.name] = blobs
    return shapes


def _shape_equal(model_shape, net_shape):
    """Caffe's Blob::ShapeEquals: legacy blobs compare as 4-d with leading ones."""
    if model_shape and model_shape[0] == "legacy":
        return tuple(model_shape[1:]) == (1,) * (4 - len(net_shape)) + tuple(net_shape) \
            if len(net_shape) <= 4 else False
    return tuple(model_shape) == tuple(net_shape)


def _fmt_shape(shape):
    if shape and shape[0] == "legacy":
        shape = shape[1:]
    return "x".join(str(d) for d in shape)


def check_weights(net, model_shapes, weights_path, proto_path):
    """Compare a loaded-without-weights net's params with the caffemodel's blobs, as
    Net::CopyTrainedLayersFrom would (it aborts on a count or shape mismatch; a layer with
    parameters but no weights would silently keep zeros, also refused here)."""
    problems = []
    for name, params in net.params.items():
        if name not in model_shapes:
            problems.append(f"layer '{name}' has parameters but the caffemodel has no layer "
                            f"'{name}'")
            continue
        theirs = model_shapes[name]
        ours = [tuple(p.data.shape) for p in params]
        if len(theirs) != len(ours):
            problems.append(f"layer '{name}': {len(ours)} parameter blobs in the prototxt, "
                            f"{len(theirs)} in the caffemodel")
            continue
        for i, (a, b) in enumerate(zip(theirs, ours)):
            if not _shape_equal(a, b):
                problems.append(f"layer '{name}' blob {i}: prototxt {_fmt_shape(b)}, "
                                f"caffemodel {_fmt_shape(a)}")
    if problems:
        raise BenchError(f"weights {weights_path} do not match {proto_path}:\n  "
                         + "\n  ".join(problems))


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
        if ta != tb and STOCK_TO_DYVE.get(ta) != tb:
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


# ----------------------------------------------------------------------------- images

def _is_lmdb(path):
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "data.mdb"))


def _read_folder(path, limit, size):
    """Images of a folder (labels from wnid file-name prefixes), resized to `size`."""
    import cv2
    from dyve import data
    try:
        items = data.imagenet_labels(path)
    except data.DataError as error:
        raise BenchError(f"{path}: {error}") from None
    if limit:
        items = items[:limit]
    images = []
    for rel, _ in _progress(items, desc="reading", unit=" img"):
        img = cv2.imread(os.path.join(path, rel), cv2.IMREAD_COLOR)
        if img is None:
            raise BenchError(f"{os.path.join(path, rel)}: OpenCV cannot read it")
        images.append(cv2.resize(img, (size[1], size[0])).transpose(2, 0, 1))
    return np.stack(images), np.asarray([label for _, label in items], np.int64)


def load_images(path, input_shape, mean_file=None, mean_value=None, limit=None):
    """(float32 N x C x H x W preprocessed as Caffe's TEST data layer, int64 labels).

    `path`: a Datum LMDB (dyve.data) or a folder of images with wnid-prefixed names.
    Mean subtraction (a mean image, or per-channel `mean_value`), then a centre crop to
    the net's input H x W. A mean image of the crop's size is subtracted after the crop.
    """
    from dyve import data
    c, h, w = input_shape
    mean = None
    if mean_file:
        _need_file(mean_file, "mean file")
        try:
            mean = data.read_mean(mean_file)
        except Exception as error:  # protobuf decode errors
            raise BenchError(f"mean file {mean_file} is not a mean.binaryproto: {error}") \
                from None
    _need_file(path, "images")
    if _is_lmdb(path):
        try:
            images, labels = data.read_lmdb(path, limit=limit)
        except data.DataError as error:
            raise BenchError(str(error)) from None
    elif os.path.isdir(path):
        if mean is not None and mean.shape[1] >= h and mean.shape[2] >= w:
            size = mean.shape[1:]  # as the mean was made (e.g. 256x256), then centre crop
        elif h > 64:
            size = (max(h, 256), max(w, 256))  # the ImageNet convention
        else:
            size = (h, w)
        images, labels = _read_folder(path, limit, size)
    else:
        raise BenchError(f"images {path} is neither an LMDB nor a folder of images")
    if not len(images):
        raise BenchError(f"no images in {path}")
    n, ci, hi, wi = images.shape
    if ci != c:
        raise BenchError(f"images in {path} have {ci} channels, the net wants {c}")
    if hi < h or wi < w:
        raise BenchError(f"images in {path} are {hi}x{wi}, smaller than the net's input "
                         f"{h}x{w}")
    x = images.astype(np.float32)
    y0, x0 = (hi - h) // 2, (wi - w) // 2
    if mean is not None:
        if mean.shape[0] != c:
            raise BenchError(f"mean {mean_file} has {mean.shape[0]} channels, the net wants {c}")
        if mean.shape[1:] == (hi, wi):
            x -= mean
        elif mean.shape[1:] != (h, w):
            raise BenchError(f"mean {mean_file} is {mean.shape[1]}x{mean.shape[2]}, neither "
                             f"the images' {hi}x{wi} nor the input's {h}x{w}")
    x = np.ascontiguousarray(x[:, :, y0:y0 + h, x0:x0 + w])
    if mean is not None and mean.shape[1:] == (h, w) and (hi, wi) != (h, w):
        x -= mean
    if mean_value is not None:
        if len(mean_value) not in (1, c):
            raise BenchError(f"--mean-value needs 1 or {c} values, got {len(mean_value)}")
        x -= np.asarray(mean_value, np.float32).reshape(-1, 1, 1)
    return x, labels


# ----------------------------------------------------------------------------- nets

def fill_weights(net, seed=FILLER_SEED):
    """Seeded filler values for parameter blobs that are all zero (deploy prototxts have
    no fillers): He-normal weights (std sqrt(2 / fan-in)), biases stay 0."""
    rng = np.random.RandomState(seed)
    for name, params in net.params.items():
        for i, blob in enumerate(params):
            if i == 0 and not blob.data.any():
                fan_in = int(np.prod(blob.data.shape[1:])) or 1
                blob.data[...] = rng.normal(0.0, math.sqrt(2.0 / fan_in),
                                            blob.data.shape).astype(np.float32)


def layer_macs(net):
    """{layer name: MACs per image} of every (Dyve)Convolution / (Dyve)InnerProduct layer,
    from shapes: outputs per image x weights per output (weight shape[1:])."""
    macs = {}
    for name, layer in zip(net._layer_names, net.layers):
        if layer.type not in WEIGHTED_TYPES:
            continue
        top = net.blobs[net.top_names[name][0]].data
        weight = net.params[name][0].data
        per_image = top.size // top.shape[0]
        macs[name] = int(per_image) * int(np.prod(weight.shape[1:]))
    return macs


def load_nets(stock_path, dyve_path, weights, tmp_dir):
    """Build both nets, check them against each other and the weights, load the weights.

    Returns (stock, dyve, weights_file) where weights_file is `weights` or, without it, a
    temporary caffemodel of the filled stock net (also used by the workers and OpenCV).
    """
    caffe = _caffe()
    stock_param = read_prototxt(stock_path, "stock prototxt")
    dyve_param = read_prototxt(dyve_path, "DyVE prototxt")
    check_net_pair(stock_param, dyve_param, stock_path, dyve_path)
    if not any(l.type in STOCK_TO_DYVE.values() for l in dyve_param.layer):
        raise BenchError(f"DyVE prototxt {dyve_path} has no DyveConvolution / "
                         "DyveInnerProduct layer")
    model_shapes = caffemodel_shapes(weights) if weights else None
    stock = caffe.Net(stock_path, caffe.TEST)
    dyve = caffe.Net(dyve_path, caffe.TEST)
    check_built_pair(stock, dyve, stock_path, dyve_path)
    if weights:
        check_weights(stock, model_shapes, weights, stock_path)
        check_weights(dyve, model_shapes, weights, dyve_path)
        stock.copy_from(weights)
        dyve.copy_from(weights)
        return stock, dyve, weights
    fill_weights(stock)
    path = os.path.join(tmp_dir, "filler_weights.caffemodel")
    stock.save(path)
    dyve.copy_from(path)
    return stock, dyve, path


def _input_name(net):
    return net.inputs[0]


def _reshape(net, batch):
    blob = net.blobs[_input_name(net)]
    if blob.data.shape[0] != batch:
        blob.reshape(batch, *blob.data.shape[1:])
        net.reshape()


def _caffe_forward(net, x):
    _reshape(net, len(x))
    net.blobs[_input_name(net)].data[...] = x
    net._forward(0, len(net.layers) - 1)
    return net.blobs[net.outputs[-1]].data.reshape(len(x), -1).copy()


def _opencv_net(stock_path, weights, threads=None):
    import cv2
    if threads is not None:
        cv2.setNumThreads(int(threads))
    try:
        net = cv2.dnn.readNetFromCaffe(stock_path, weights)
    except cv2.error as error:
        raise BenchError(f"OpenCV dnn cannot read {stock_path} with {weights}: "
                         f"{str(error).strip()}") from None
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    return net


def _opencv_forward(net, x):
    net.setInput(x)
    return np.asarray(net.forward()).reshape(len(x), -1).copy()


# ----------------------------------------------------------------------------- accuracy

def paired_stats(correct_ref, correct_new):
    """Paired comparison of two 0/1 vectors on the same images: accuracies, difference
    new - ref, flips and a 95 % confidence interval from the paired standard error."""
    a = np.asarray(correct_ref, np.float64)
    b = np.asarray(correct_new, np.float64)
    n = len(a)
    d = b - a
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    diff = float(d.mean()) if n else 0.0
    return {"ref": float(a.mean()), "new": float(b.mean()), "diff": diff, "se": se,
            "diff_ci95": [diff - 1.96 * se, diff + 1.96 * se],
            "flips_right_to_wrong": int(((a == 1) & (b == 0)).sum()),
            "flips_wrong_to_right": int(((a == 0) & (b == 1)).sum())}


def _topk_correct(scores, labels, k):
    if k == 1:
        return scores.argmax(axis=1) == labels
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return (top == labels[:, None]).any(axis=1)


def accuracy_pass(stock, dyve, images, labels, batch, cv_net=None):
    """Scores of every engine over `images` (batches of `batch`) and the DyVE effort."""
    from dyve import live
    live.reset_effort(dyve)
    scores = {"stock": [], "dyve": []}
    if cv_net is not None:
        scores["opencv"] = []
    for start in _progress(range(0, len(images), batch), desc="accuracy pass",
                           unit=" batch"):
        x = images[start:start + batch]
        scores["stock"].append(_caffe_forward(stock, x))
        scores["dyve"].append(_caffe_forward(dyve, x))
        if cv_net is not None:
            scores["opencv"].append(_opencv_forward(cv_net, x))
    scores = {k: np.concatenate(v) for k, v in scores.items()}
    effort = live.effort(dyve)
    return scores, effort


def accuracy_summary(scores, labels, with_accuracy):
    classes = scores["stock"].shape[1]
    result = {"num_classes": int(classes),
              "agreement_top1": float((scores["dyve"].argmax(1)
                                       == scores["stock"].argmax(1)).mean())}
    if "opencv" in scores:
        result["agreement_top1_opencv"] = float((scores["opencv"].argmax(1)
                                                 == scores["stock"].argmax(1)).mean())
    if not with_accuracy:
        return result
    if labels.max() >= classes or labels.min() < 0:
        raise BenchError(f"labels go up to {labels.max()} but the net has {classes} outputs "
                         "(wrong images for this net?)")
    ks = (1, 5) if classes >= 100 else (1,)
    for k in ks:
        correct = {e: _topk_correct(s, labels, k) for e, s in scores.items()}
        stats = paired_stats(correct["stock"], correct["dyve"])
        entry = {"stock": stats["ref"], "dyve": stats["new"], "diff": stats["diff"],
                 "se": stats["se"], "diff_ci95": stats["diff_ci95"],
                 "flips_right_to_wrong": stats["flips_right_to_wrong"],
                 "flips_wrong_to_right": stats["flips_wrong_to_right"]}
        if "opencv" in correct:
            entry["opencv"] = float(correct["opencv"].mean())
            entry["opencv_vs_stock"] = paired_stats(correct["stock"], correct["opencv"])
        result[f"top{k}"] = entry
    return result


# ----------------------------------------------------------------------------- effort

def effort_summary(effort, macs, types, settings, images):
    """Per-layer and per-knob operation counts over the accuracy pass (see module doc).

    `effort`: live.effort of the DyVE net; `macs`: layer_macs of the stock net (per image);
    `types`: {name: DyVE net layer type}; `settings`: {DyVE layer: knob settings}.
    Returns (effort dict, totals dict, warnings)."""
    warnings = []
    layers = {}
    for name, per_image in macs.items():
        if name in effort:
            e = effort[name]
            skipped = {k: int(e[f"macs_skipped_{k}"]) for k in KNOBS}
            overhead = {k: int(e[f"ops_{k}"]) for k in KNOBS}
            dense = int(e["macs_dense"])
            executed_macs = int(e["macs_executed"])
            ops_exec = executed_macs + sum(overhead.values())
            if dense != executed_macs + sum(skipped.values()):
                warnings.append(f"{name}: macs_dense {dense} != macs_executed + skipped "
                                f"{executed_macs + sum(skipped.values())}")
            if dense != per_image * images:
                warnings.append(f"{name}: macs_dense {dense} != {per_image} MACs per image x "
                                f"{images} images from the stock net's shapes")
            if int(e["images"]) != images:
                warnings.append(f"{name}: effort counted {e['images']} images, the pass had "
                                f"{images}")
            layers[name] = {
                "dyve": True, "type": types.get(name), "images": int(e["images"]),
                "macs_dense": dense, "macs_executed": executed_macs,
                "macs_skipped": skipped, "ops_overhead": overhead,
                "ops_dense": dense, "ops_executed": ops_exec,
                "ops_reduction": dense / ops_exec if ops_exec else float("inf"),
                "neurons": {"outputs": int(e["outputs"]),
                            **{KNOB_NEURONS[k]: int(e[KNOB_NEURONS[k]]) for k in KNOBS}},
                "settings": settings.get(name)}
        else:
            dense = per_image * images
            layers[name] = {
                "dyve": False, "type": types.get(name), "images": images,
                "macs_dense": dense, "macs_executed": dense,
                "macs_skipped": {k: 0 for k in KNOBS}, "ops_overhead": {k: 0 for k in KNOBS},
                "ops_dense": dense, "ops_executed": dense, "ops_reduction": 1.0,
                "neurons": None, "settings": None}
    dyve_rows = [r for r in layers.values() if r["dyve"]]
    dense_dyve = sum(r["ops_dense"] for r in dyve_rows)
    exec_dyve = sum(r["ops_executed"] for r in dyve_rows)
    other = sum(r["ops_dense"] for r in layers.values() if not r["dyve"])
    totals = {
        "ops_dense": dense_dyve + other, "ops_executed": exec_dyve + other,
        "ops_dense_dyve_layers": dense_dyve, "ops_executed_dyve_layers": exec_dyve,
        "ops_non_dyve_layers": other,
    }
    totals["ops_reduction"] = totals["ops_dense"] / totals["ops_executed"]
    totals["ops_reduction_dyve_layers"] = dense_dyve / exec_dyve if exec_dyve else 1.0
    totals["ops_dense_per_image"] = totals["ops_dense"] / images
    totals["ops_executed_per_image"] = totals["ops_executed"] / images
    knobs = {}
    for k in KNOBS:
        skipped = sum(r["macs_skipped"][k] for r in dyve_rows)
        over = sum(r["ops_overhead"][k] for r in dyve_rows)
        knobs[k] = {"macs_skipped": skipped, "ops_overhead": over,
                    "net_ops_saved": skipped - over,
                    "share_of_dense": skipped / totals["ops_dense"],
                    KNOB_NEURONS[k]: sum(r["neurons"][KNOB_NEURONS[k]] for r in dyve_rows)}
    return {"images": images, "layers": layers, "knobs": knobs}, totals, warnings


# ----------------------------------------------------------------------------- machine

def openblas_info():
    """The libopenblas this process loaded (from /proc/self/maps): path, config string,
    core name and current thread count."""
    paths = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                if "openblas" in os.path.basename(path).lower() and path not in paths:
                    paths.append(path)
    except OSError:
        pass
    paths.sort(key=lambda p: (not os.path.basename(p).startswith("libopenblas"), p))
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
            lib.openblas_get_config.restype = ctypes.c_char_p
            info = {"library": os.path.realpath(path),
                    "config": lib.openblas_get_config().decode(),
                    "threads": int(lib.openblas_get_num_threads())}
            with contextlib.suppress(AttributeError):
                lib.openblas_get_corename.restype = ctypes.c_char_p
                info["corename"] = lib.openblas_get_corename().decode()
            return info
        except (OSError, AttributeError):
            continue
    return {"library": None, "config": None, "threads": None}


def _loadavg():
    with contextlib.suppress(OSError):
        return [float(v) for v in open("/proc/loadavg").read().split()[:3]]
    return None


def machine_facts():
    model = None
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    flags = []
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in ("avx", "avx2", "fma", "avx512f", "avx512_vnni") if f in have]
                break
    if shutil.which("lscpu"):
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
            m = re.search(r"^Model name:\s*(.+)$", out, re.M)
            model = model or (m and m.group(1).strip())
    facts = {"cpu_model": model, "cores": os.cpu_count(), "cpu_flags": flags,
             "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else None,
             "openblas": openblas_info(), "python": sys.version.split()[0],
             "numpy": np.__version__, "loadavg": _loadavg(),
             "env": {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}}
    with contextlib.suppress(ImportError):
        import cv2
        facts["opencv"] = cv2.__version__
    return facts


# ----------------------------------------------------------------------------- timing

def _median(values):
    return float(np.median(values)) if len(values) else None


def _ratio(a, b):
    return a / b if a is not None and b else None


def worker_main(spec_path):
    """Hidden --worker mode: one thread count, all batch sizes; writes spec['out']."""
    with open(spec_path) as f:
        spec = json.load(f)
    caffe = _caffe()
    threads = spec["threads"]
    stock = caffe.Net(spec["stock"], spec["weights"], caffe.TEST)
    dyve = caffe.Net(spec["dyve"], spec["weights"], caffe.TEST)
    images = np.load(spec["images"])
    cv_net = _opencv_net(spec["stock"], spec["weights"], threads) if spec["opencv"] else None
    result = {"threads": threads, "openblas": openblas_info(), "loadavg_before": _loadavg(),
              "batches": {}}
    if cv_net is not None:
        import cv2
        result["opencv_threads"] = cv2.getNumThreads()
    repeats = spec["repeats"]
    from dyve import live
    stock_index = {n: i for i, n in enumerate(stock._layer_names)}

    def stock_span(name):
        """The stock layer, plus the in-place ReLU right after it: a DyVE layer with
        relu: true does both, so that is what it replaces."""
        i = stock_index[name]
        top = stock.top_names[name]
        nxt = stock._layer_names[i + 1] if i + 1 < len(stock.layers) else None
        if (nxt is not None and stock.layers[i + 1].type == "ReLU"
                and list(stock.bottom_names[nxt]) == list(top) == list(stock.top_names[nxt])
                and live.get_settings(dyve, name).get("relu")):
            return i, i + 1
        return i, i
    dyve_layers = [(n, i) for i, (n, l) in enumerate(zip(dyve._layer_names, dyve.layers))
                   if l.type in STOCK_TO_DYVE.values()]
    clock = time.perf_counter

    for batch in spec["batches"]:
        chunks = [images[i:i + batch] for i in range(0, len(images), batch)]
        for net in (stock, dyve):
            _reshape(net, batch)

        def run_caffe(net, x):
            net.blobs[_input_name(net)].data[...] = x
            t0 = clock()
            net._forward(0, len(net.layers) - 1)
            return clock() - t0

        def run_cv(x):
            cv_net.setInput(x)
            t0 = clock()
            cv_net.forward()
            return clock() - t0

        engines = {"stock": lambda x: run_caffe(stock, x), "dyve": lambda x: run_caffe(dyve, x)}
        if cv_net is not None:
            engines["opencv"] = run_cv
        for fn in engines.values():  # warm-up
            for x in chunks[:2] * 2:
                fn(x)
        rounds = {e: [] for e in engines}
        for _ in _progress(range(repeats), desc=f"timing {threads}t b{batch}", unit=" round"):
            total = dict.fromkeys(engines, 0.0)
            for x in chunks:  # interleaved: stock, DyVE[, OpenCV] on each batch
                for e, fn in engines.items():
                    total[e] += fn(x)
            for e in engines:
                rounds[e].append(1e3 * total[e] / len(images))
        # Per layer: the DyVE layer on the stock net's bottoms, interleaved with the stock one.
        layer_rounds = {n: {"stock": [0.0] * repeats, "dyve": [0.0] * repeats}
                        for n, _ in dyve_layers}
        for x in _progress(chunks, desc=f"layers {threads}t b{batch}", unit=" batch"):
            run_caffe(stock, x)
            run_caffe(dyve, x)
            for name, j in dyve_layers:
                i, i_end = stock_span(name)
                for bottom in dyve.bottom_names[name]:
                    dyve.blobs[bottom].data[...] = stock.blobs[bottom].data
                for r in range(repeats):
                    # Alternate which layer runs first: the second one finds the
                    # caches filled by the first (measured: up to 10 % either way).
                    order = ((stock, i, i_end, "stock"), (dyve, j, j, "dyve"))
                    for net, k, k_end, engine in (order if r % 2 == 0 else order[::-1]):
                        t0 = clock()
                        net._forward(k, k_end)
                        layer_rounds[name][engine][r] += clock() - t0
        result["batches"][str(batch)] = {
            "images": len(images), "chunks": len(chunks), "rounds_ms": rounds,
            "layers_rounds_ms": {n: {e: [1e3 * v / len(images) for v in vals]
                                     for e, vals in d.items()}
                                 for n, d in layer_rounds.items()}}
    result["loadavg_after"] = _loadavg()
    tmp = spec["out"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, spec["out"])
    return 0


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
    proc = subprocess.run([sys.executable, "-m", "dyve.bench", "--worker", spec_path], env=env)
    if proc.returncode != 0 or not os.path.isfile(spec["out"]):
        raise BenchError(f"timing worker with {threads} thread(s) failed (exit "
                         f"{proc.returncode}); see its messages above")
    with open(spec["out"]) as f:
        return json.load(f)


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
            "round_speedups": paired,
            "round_speedup_range": [min(paired), max(paired)] if paired else None,
            "images": raw["images"], "layers": layers,
            "openblas_threads": worker["openblas"].get("threads"),
            "opencv_threads": worker.get("opencv_threads"),
            "loadavg": [worker.get("loadavg_before"), worker.get("loadavg_after")]}
    return out


# ----------------------------------------------------------------------------- output

def _json_default(obj):
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def write_json(path, obj):
    files.write_atomic(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


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
                 if "agreement_top1_opencv" in acc else "") + ".", ""]

    lines += ["## Wall time (ms per image, median of interleaved rounds)", "",
              "| batch | threads | stock Caffe | DyVE | speedup | round speedups (min–max)"
              + (" | OpenCV dnn | stock/OpenCV" if s.get("opencv") else "") + " |",
              "|---|---|---|---|---|---|" + ("---|---|" if s.get("opencv") else "")]
    for b, per in s["timings"].items():
        for t, tm in per.items():
            ms = tm["ms_per_image"]
            rng = tm.get("round_speedup_range")
            row = (f"| {b} | {t} | {_ms(ms['stock'])} | {_ms(ms['dyve'])} | {_x(tm['speedup'])} "
                   f"| {_x(rng[0]) + '–' + _x(rng[1]) if rng else '—'}")
            if s.get("opencv"):
                row += f" | {_ms(ms.get('opencv'))} | {_x(tm.get('speedup_opencv'))}"
            lines.append(row + " |")
    lines += ["", f"Timed on the first {s['time_images']} images, {s['repeats']} rounds after a "
              "warm-up; each round runs the engines one batch after the other.", ""]

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
              f"* OpenCV {m.get('opencv')}, numpy {m.get('numpy')}, Python {m.get('python')}",
              f"* load average at start {m.get('loadavg')} (shared machine: compare ratios, "
              "not absolute times)", "", "## Command", "", f"    {s['command']}", ""]
    if s.get("warnings"):
        lines += ["## Warnings", ""] + [f"* {w}" for w in s["warnings"]] + [""]
    return "\n".join(lines)


def plot_effort(summary, out_png):
    """Stacked bars per layer (per image): MACs executed, skipped by each knob, and the
    knobs' overhead ops; non-DyVE conv/fc layers in grey."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    fig.tight_layout()
    try:
        with files.atomic_path(out_png) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)


# Keys plot_tuning accepts (first found wins).
_LIST_KEYS = ("evaluations", "trials", "tried", "search", "history", "points", "results",
              "settings", "steps")
_OPS_KEYS = ("ops_per_image", "ops", "ops_executed_per_image", "ops_executed")
_DENSE_KEYS = ("ops_dense_per_image", "ops_dense", "dense_ops_per_image", "dense_ops",
               "dense_macs")
_LOSS_KEYS = ("loss", "accuracy_loss", "top1_loss")


def _first(d, keys):
    for k in keys:
        if isinstance(d, dict) and d.get(k) is not None:
            return d[k], k
    return None, None


def _nested_first(doc, keys, parents=("", "baseline", "summary", "config")):
    """The first of `keys` at the top level of `doc` or inside one of its `parents`."""
    for parent in parents:
        value, _ = _first(doc.get(parent) if parent else doc, keys)
        if value is not None:
            return value
    return None


def plot_tuning(search_json_path, out_png):
    """Accuracy loss vs ops saved of every setting a tuner tried.

    Reads dyve.tune's search.json: ``evaluations`` = [{stage, subset, layer, knob,
    settings, ops (per image, DyVE layers), loss (points of top-1, paired), accepted,
    ...}], ``baseline.dense_macs`` (dense MACs per image of the DyVE layers),
    ``config.budget``, ``summary.final_ops`` / ``summary.search_loss`` (the chosen setting)
    and ``summary.holdout`` {ops, loss} (its check on held-out images); evaluations of
    ``subset`` "holdout" are drawn apart from the search points.

    Tolerant of other layouts: a top-level list of entries, or the list under one of
    "trials", "tried", "search", "history", "points", "results", "settings", "steps".
    An entry: ``ops_per_image`` / ``ops`` / ``ops_executed_per_image`` / ``ops_executed``,
    ``loss`` / ``accuracy_loss`` / ``top1_loss`` (plotted as given), optional
    ``ops_dense_per_image`` / ``ops_dense``, ``ops_reduction``, ``accepted`` / ``kept`` /
    ``chosen`` (bool). Dense ops per image may also sit at the top level (same keys, or
    ``dense_ops`` / ``dense_macs``), the budget under ``budget`` / ``loss_budget``, the
    chosen setting under ``chosen`` / ``final`` (an entry). The x axis is ops saved in %
    of dense when a dense count is known, else the ops reduction, else the raw ops per
    image. Returns the number of points plotted.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    _need_file(search_json_path, "search json")
    try:
        with open(search_json_path) as f:
            doc = json.load(f)
    except json.JSONDecodeError as error:
        raise BenchError(f"{search_json_path} is not JSON: {error}") from None
    entries = doc if isinstance(doc, list) else _first(doc, _LIST_KEYS)[0]
    if not isinstance(entries, list):
        raise BenchError(f"{search_json_path}: no list of tried settings (a top-level list or "
                         f"one of the keys {', '.join(_LIST_KEYS)})")
    top = doc if isinstance(doc, dict) else {}
    dense_top = _nested_first(top, _DENSE_KEYS)

    def x_of(entry, ops):
        dense = _first(entry, _DENSE_KEYS)[0] or dense_top
        red = entry.get("ops_reduction") if isinstance(entry, dict) else None
        if ops is not None and dense:
            return 100.0 * (1.0 - ops / dense), "saved"
        if red is not None:
            return float(red), "reduction"
        return (float(ops), "ops") if ops is not None else (None, None)

    pts, holdout = [], []
    for e in entries:
        if not isinstance(e, dict):
            continue
        loss, _ = _first(e, _LOSS_KEYS)
        x, mode = x_of(e, _first(e, _OPS_KEYS)[0])
        if loss is None or x is None:
            continue
        accepted = bool(_first(e, ("accepted", "kept", "chosen"))[0])
        (holdout if e.get("subset") == "holdout" else pts).append(
            (x, float(loss), accepted, mode))
    if not pts:
        raise BenchError(f"{search_json_path}: no entry with a loss and an ops count "
                         f"(keys {'/'.join(_LOSS_KEYS)} and {'/'.join(_OPS_KEYS)})")
    modes = [p[3] for p in pts]
    mode = max(set(modes), key=modes.count)  # mixed entries: keep the most common kind
    pts = [p for p in pts if p[3] == mode]
    holdout = [p for p in holdout if p[3] == mode]
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
    gain = xs if mode != "ops" else -xs  # larger is better
    front, best = [], -np.inf
    for i in np.lexsort((-gain, ys)):  # by loss, then by gain descending
        if gain[i] > best:
            best = gain[i]
            front.append(i)
    if len(front) > 1:
        ax.step(xs[front], ys[front], where="pre", color="tab:blue", lw=1, alpha=0.7,
                label="Pareto front")
    budget = _nested_first(top, ("budget", "loss_budget"))
    if isinstance(budget, (int, float)):
        ax.axhline(budget, color="tab:red", ls="--", lw=1, label=f"budget {budget:g}")
    chosen, _ = _first(top, ("chosen", "final"))
    if not isinstance(chosen, dict) and isinstance(top.get("summary"), dict) \
            and top["summary"].get("final_ops") is not None:
        chosen = {"ops": top["summary"]["final_ops"], "loss": top["summary"].get("search_loss")}
    if isinstance(chosen, dict):
        loss, _ = _first(chosen, _LOSS_KEYS)
        cx, cmode = x_of(chosen, _first(chosen, _OPS_KEYS)[0])
        if loss is not None and cx is not None and cmode == mode:
            ax.scatter([cx], [loss], marker="*", s=160, color="tab:orange", zorder=3,
                       label="chosen")
    ax.set_xlabel({"saved": "ops saved (% of dense)", "reduction": "ops reduction (×)",
                   "ops": "ops per image"}[mode])
    if mode == "ops":
        ax.invert_xaxis()
    unit = (top.get("units") or {}).get("loss") if isinstance(top.get("units"), dict) else None
    ax.set_ylabel(f"accuracy loss ({unit})" if unit else "accuracy loss")
    net_dir = os.path.dirname(os.path.dirname(os.path.abspath(search_json_path)))
    ax.set_title(f"tuning search: {os.path.basename(net_dir) or search_json_path}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with files.atomic_path(out_png) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
    return len(pts)


# ----------------------------------------------------------------------------- tables

TABLE_COLUMNS = ("net", "weights", "images", "baseline_top1", "dyve_top1", "delta_top1",
                 "ops_reduction", "speedup_b1", "speedup_bN", "N", "threads")


def load_summary(path):
    _need_file(path, "summary")
    try:
        with open(path) as f:
            s = json.load(f)
    except json.JSONDecodeError as error:
        raise BenchError(f"{path} is not JSON: {error}") from None
    missing = [k for k in REQUIRED_KEYS if k not in s]
    if missing:
        raise BenchError(f"{path} is not a dyve.bench summary (missing {', '.join(missing)})")
    return s


def merge_table(paths):
    """(markdown, plain text) paper-style table of several summary.json files."""
    summaries = [load_summary(p) for p in paths]
    md = ["# DyVE results", "", "| benchmark | baseline top-1 | DyVE top-1 | ops reduction | "
          "speedup (batch 1, 1 thread) | speedup (batch N, 1 thread) | N |",
          "|---|---|---|---|---|---|---|"]
    rows = []
    for s in summaries:
        t = _reference_threads(s)
        bn = max(s.get("batches") or [1])
        has = bool(s.get("weights"))
        top1 = lambda v: _pct(v) if has else "—"
        md.append(f"| {_benchmark_label(s)} | {top1(s.get('baseline_top1'))} | "
                  f"{top1(s.get('dyve_top1'))} | {_x(s['ops_reduction'])} | "
                  f"{_x(_speedup(s, 1, t))} | {_x(_speedup(s, bn, t))} | {bn} |")
        num = lambda v, f: "-" if v is None else f.format(v)
        b1, d1 = (s.get("baseline_top1"), s.get("dyve_top1")) if has else (None, None)
        rows.append({
            "net": s["net"], "weights": "yes" if has else "none", "images": str(s["images"]),
            "baseline_top1": num(100 * b1 if b1 is not None else None, "{:.2f}"),
            "dyve_top1": num(100 * d1 if d1 is not None else None, "{:.2f}"),
            "delta_top1": num(100 * (d1 - b1) if None not in (b1, d1) else None, "{:+.2f}"),
            "ops_reduction": f"{s['ops_reduction']:.3f}",
            "speedup_b1": num(_speedup(s, 1, t), "{:.3f}"),
            "speedup_bN": num(_speedup(s, bn, t), "{:.3f}"),
            "N": str(bn), "threads": str(t)})
    md += ["", "Every batch/thread combination (ms per image, median of interleaved rounds; "
           "speedup = stock Caffe / DyVE):", "",
           "| benchmark | batch | threads | stock ms | DyVE ms | speedup | OpenCV ms |",
           "|---|---|---|---|---|---|---|"]
    for s in summaries:
        for b, per in s["timings"].items():
            for t, tm in per.items():
                ms = tm["ms_per_image"]
                md.append(f"| {s['net']} | {b} | {t} | {_ms(ms['stock'])} | {_ms(ms['dyve'])} | "
                          f"{_x(tm['speedup'])} | {_ms(ms.get('opencv'))} |")
    widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in TABLE_COLUMNS}
    plain = ["# dyve.bench table: top-1 in %, delta in points, speedup = stock/DyVE at "
             "batch 1 and batch N with `threads` OpenBLAS threads; '-' = not measured",
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
            elif k in ("net", "weights"):
                row[k] = v
            else:
                row[k] = float(v)
        rows.append(row)
    return rows


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
        description="Stock Caffe vs DyVE (and OpenCV dnn) on the same weights and images: "
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
    p.add_argument("--max-images", type=int, help="use the first N images (default: all)")
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
    _need_file(args.stock, "stock prototxt")
    _need_file(args.dyve, "DyVE prototxt")
    if args.weights:
        _need_file(args.weights, "weights file")
        if os.path.isdir(args.weights):
            raise BenchError(f"weights file {args.weights} is a folder")
    _need_file(args.images, "images")
    if args.mean:
        _need_file(args.mean, "mean file")


def run(args, argv):
    """The benchmark; returns the summary dict (also written to args.out_dir)."""
    from dyve import live
    _resolve_defaults(args)
    started = time.time()
    machine = machine_facts()
    tmp_dir = tempfile.mkdtemp(prefix="dyve-bench-")
    try:
        stock, dyve, weights_file = load_nets(args.stock, args.dyve, args.weights, tmp_dir)
        shape = stock.blobs[_input_name(stock)].data.shape[1:]
        images, labels = load_images(args.images, shape, args.mean, args.mean_value,
                                     args.max_images)
        n = len(images)
        batch = min(args.batch, n)
        if args.opencv and weights_file.endswith((".h5", ".hdf5")):
            # OpenCV reads binary caffemodels only: hand it a copy of the loaded weights.
            weights_file = os.path.join(tmp_dir, "weights_for_opencv.caffemodel")
            stock.save(weights_file)
        cv_net = _opencv_net(args.stock, weights_file) if args.opencv else None

        scores, effort = accuracy_pass(stock, dyve, images, labels, batch, cv_net)
        acc = accuracy_summary(scores, labels, with_accuracy=bool(args.weights))
        macs = layer_macs(stock)
        types = dict(zip(dyve._layer_names, (l.type for l in dyve.layers)))
        settings = {name: live.get_settings(dyve, name) for name in live.dyve_layers(dyve)}
        eff, totals, warnings = effort_summary(effort, macs, types, settings, n)
        del cv_net

        time_n = args.time_images or batch
        time_n = min(n, max(batch, -(-time_n // batch) * batch))
        time_n -= time_n % batch  # whole batches only
        np.save(os.path.join(tmp_dir, "timing_images.npy"), images[:time_n])
        batches = list(dict.fromkeys([1, batch]))
        spec = {"stock": os.path.abspath(args.stock), "dyve": os.path.abspath(args.dyve),
                "weights": os.path.abspath(weights_file),
                "images": os.path.join(tmp_dir, "timing_images.npy"),
                "batches": batches, "repeats": args.repeats, "opencv": bool(args.opencv)}
        layer_red = {k: r["ops_reduction"] for k, r in eff["layers"].items() if r["dyve"]}
        timings = {str(b): {} for b in batches}
        for t in args.threads:
            worker = run_worker(spec, t, tmp_dir)
            if worker["openblas"].get("threads") not in (None, t):
                warnings.append(f"asked for {t} OpenBLAS threads, the worker had "
                                f"{worker['openblas']['threads']}")
            for b, tm in timing_summary(worker, layer_red).items():
                timings[b][str(t)] = tm
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

    speedup = {b: {t: tm["speedup"] for t, tm in per.items()} for b, per in timings.items()}
    summary = {
        "schema_version": SCHEMA_VERSION, "net": args.net,
        "label": args.net if args.weights else f"{args.net} ({NO_WEIGHTS_LABEL})",
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in
                            [os.path.basename(sys.executable), "-m", "dyve.bench"] + argv),
        "weights": _display_path(args.weights) if args.weights else None,
        "filler_seed": None if args.weights else FILLER_SEED,
        "stock": _display_path(args.stock),
        "dyve": _display_path(args.dyve),
        "images_source": _display_path(args.images),
        "mean": args.mean and _display_path(args.mean),
        "mean_value": args.mean_value,
        "images": int(n), "num_classes": acc["num_classes"], "batch": batch,
        "batches": batches, "repeats": args.repeats, "threads": args.threads,
        "time_images": int(time_n), "opencv": bool(args.opencv),
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
        "timings": timings,
        "machine": machine,
        "elapsed_s": round(time.time() - started, 1),
        "warnings": warnings,
    }
    summary["machine"]["loadavg_end"] = _loadavg()
    os.makedirs(args.out_dir, exist_ok=True)
    write_json(os.path.join(args.out_dir, "summary.json"), summary)
    files.write_atomic(os.path.join(args.out_dir, "summary.md"), render_markdown(summary))
    plot_effort(summary, os.path.join(args.out_dir, "effort.png"))
    search = os.path.join(args.out_dir, "tune", "search.json")
    if os.path.isfile(search):  # a tuner ran for this net: plot its search too
        try:
            plot_tuning(search, os.path.join(args.out_dir, "tuning.png"))
        except (BenchError, ValueError, TypeError, KeyError) as error:
            print(f"warning: no tuning plot from {search}: {error}", file=sys.stderr)
    return summary


def _display_path(path):
    """Relative to the repository when inside it, else absolute."""
    path = os.path.abspath(path)
    rel = os.path.relpath(path, REPO_ROOT)
    return path if rel.startswith(os.pardir) else rel


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.worker:
            return worker_main(args.worker)
        if args.table:
            md, plain = merge_table(args.table)
            if args.table_md:
                files.write_atomic(args.table_md, md)
            sys.stdout.write(plain)
            return 0
        if args.plot_tuning:
            count = plot_tuning(*args.plot_tuning)
            print(f"{count} settings plotted to {args.plot_tuning[1]}")
            return 0
        summary = run(args, argv)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = args.out_dir
    print(render_markdown(summary).split("\n## ")[0].rstrip())
    print(f"\nwrote {os.path.join(out, 'summary.json')}, summary.md, effort.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
