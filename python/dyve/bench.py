"""Side-by-side benchmark of a stock Caffe net and its DyVE form (``python3 -m dyve.bench``).

With the same weights on the same images: accuracy (paired flips, 95 % interval), the DyVE
effort counters as operation counts, and interleaved wall-time medians per batch size and
OpenBLAS thread count (dyve.timing), written as summary.json, summary.md and effort.png
(dyve.report). The operation counts, the timing method, the no-weights mode and the
summary.json layout are in docs/bench.md.
"""
import argparse
import datetime
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("GLOG_minloglevel", "2")  # before Caffe loads: no net-init log

from dyve import files  # noqa: E402
from dyve.machine import _loadavg, machine_facts  # noqa: E402
from dyve.tools import REPO_ROOT  # noqa: E402

KNOBS = ("spet", "exact", "sdss", "sfma")
# Neurons decided by each knob (docs/knobs.md counters).
KNOB_NEURONS = {"spet": "spet_zeroed", "exact": "exact_stopped", "sdss": "sdss_filled",
                "sfma": "sfma_maps"}
STOCK_TO_DYVE = {"Convolution": "DyveConvolution", "InnerProduct": "DyveInnerProduct"}
WEIGHTED_TYPES = tuple(STOCK_TO_DYVE) + tuple(STOCK_TO_DYVE.values())
ENGINES = ("stock", "dyve", "opencv")
NO_WEIGHTS_LABEL = "no weights: dense-path overhead only"
FILLER_SEED = 1704


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
    from dyve import live, report, timing  # they import this module: not at its top
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
    report.write_report(summary, args.out_dir)
    return summary


def _display_path(path):
    """Relative to the repository when inside it, else absolute."""
    path = os.path.abspath(path)
    rel = os.path.relpath(path, REPO_ROOT)
    return path if rel.startswith(os.pardir) else rel


def main(argv=None):
    from dyve import report, timing  # they import this module: not at its top
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
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
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = args.out_dir
    print(report.render_markdown(summary).split("\n## ")[0].rstrip())
    print(f"\nwrote {os.path.join(out, 'summary.json')}, summary.md, effort.png")
    return 0


if __name__ == "__main__":
    # Run as the module dyve.bench, which dyve.report and dyve.timing import, so that the
    # BenchError they raise is the one main() catches.
    from dyve import bench
    sys.exit(bench.main())
