"""Per-layer DyVE threshold tuner under an accuracy budget (``python3 -m dyve.tune``).

Given a trained net (a DyVE deploy prototxt, or a stock one, converted with
``nets.to_dyve`` with every knob off), its caffemodel and a calibration set (an LMDB, or an
image folder ``<class>/*.jpg|png``; never the test set), the tuner picks, per DyVE layer,
the knob settings that save the most operations while the top-1 accuracy loss against the
dense net stays within ``--budget`` percentage points, with statistical confidence. One
pycaffe net is loaded once; every setting is applied with ``dyve.live.set_settings`` (no
reload) and measured with the layers' effort counters.

The search
----------
1. **Baseline.** The net with every knob off is run on every calibration image: its
   predictions ``p0`` and the labels are the reference of every comparison. The images are
   split deterministically (``numpy.random.RandomState(seed)``) into a *search* part and a
   *holdout* part (``--holdout``, default 30 %) that the search never sees.
2. **Exact floor** (only with ``--knobs`` naming ``exact``; not by default, because exact
   mode's per-neuron, sign-ordered gathered dots run several times slower than the dense
   layer: see docs/performance.md). Exact mode (sign-ordered early termination, ``spet.exact``) never
   changes a ReLU output, but needs non-negative inputs. It is enabled on every DyVE layer
   whose bottom is provably non-negative from the net's structure (produced by a ReLU, a
   DyVE layer, or pooling / LRN / dropout / concat / ... of such blobs) *and* was >= 0 on
   every calibration image (``conv1`` reads mean-subtracted pixels: not eligible). Its
   predictions must equal ``p0`` on every image (search and holdout); a mismatch that is
   not a float-rounding tie of the two top scores (gap <= 1e-4) is a bug and stops the
   tuner. The floor is the base of everything below.
3. **Sensitivity sweep.** Each DyVE layer has one track per approximate knob (SPET, SDSS,
   SFMA; SDSS and SFMA on convolutions only, SDSS not on 1x1 output maps). Its ladder of
   levels is scaled to the layer's own activations, measured in numpy from the layer's
   input blob and weights on a few search images (up to 64 images, 256 output positions
   each):

   * SPET on a convolution: fraction f in {0.25, 0.5, 0.75}, the BOUND gate (docs/knobs.md)
     with T = 0 and bound scale s in {1, 0.5, 0.25, 0.1, 0} (15 levels). s = 1 is exact on
     a rectified input; smaller s trusts the bound of the remaining channels less. On
     cifar10_quick's conv2 (f = 0.5) the bound predicted 54.5 % of neurons zero with
     0.13 % wrongly zeroed at s = 0.25, where a plain threshold T = 0 zeroes 68.6 % with
     2.5 % wrong: the bound ranks neurons far better per error than one threshold.
   * SPET on an inner product (THRESHOLD gate): f as above; threshold T = m * std of the
     partial sum over the prefix inputs plus bias, m in {-1, -0.5, -0.25, 0, 0.25}.
     A fraction whose prefix is every input channel (nothing to skip), or the same prefix as
     a smaller fraction, is left out (conv1 of CIFAR-10, 3 channels: f = 0.25 and 0.5).
   * SDSS: stride 2, fill MEAN, T = 0 and the 10/25/50 % quantiles of the layer's positive
     post-ReLU outputs.
   * SFMA: spread RANGE, T = the 5/10/20/35/50 % quantiles of the per-map ranges of the
     layer's input, plus T = 0 (exact: only constant maps) when some maps are constant.

   Every level is evaluated alone on top of the floor over the search images (or the
   first ``--sweep-images`` of them), in increasing aggressiveness; once a level's *lower*
   confidence bound (loss - z * SE) is over the budget, the more aggressive levels of the
   same sub-ladder (one SPET fraction, or the SDSS / SFMA thresholds) are skipped. Each
   evaluation measures ops per image (effort counters: ``macs_executed + ops_spet +
   ops_exact + ops_sdss + ops_sfma``, summed over the DyVE layers) and paired statistics
   against ``p0``: ``n_rw`` (right -> wrong), ``n_wr`` (wrong -> right), ``loss = (n_rw -
   n_wr) / n``, its standard error from the paired differences ``d_i`` in {-1, 0, 1}
   (``SE = std(d, ddof=1) / sqrt(n)``) and the one-sided upper confidence bound ``UCB =
   loss + z * SE`` (z from ``--confidence``). Losses are in percentage points.

   The search accepts on ``gate = max(loss, 0) + z * SE * sqrt(n / n_holdout)`` rather
   than the plain UCB, for two reasons. An approximation is not expected to *improve*
   accuracy, so a measured gain (more wrong -> right than right -> wrong flips) is noise;
   banking it would let the greedy spend it on later steps, the failure mode of a greedy
   search on noisy calibration losses (``--bank-gains`` keeps the sign). And the final
   choice must pass the holdout check, whose interval is wider than the search part's
   (fewer images): projecting the SE to the holdout's size (same flip rate) makes the
   search accept what the holdout can confirm, instead of overshooting and being undone.
   Flips in both directions widen the gate, so it is the budgeted quantity: a track's
   greedy ladder is the Pareto front of its levels in (ops, gate), least aggressive first,
   without levels that save nothing or whose gate alone is already over the budget.
4. **Greedy combination.** From the floor, each round tries advancing every (layer, knob)
   track one level of its ladder on top of the current combined setting (fixed order: net
   order of layers, then spet, sdss, sfma). Among the candidates whose gate <= budget and
   that save ops, it takes the one with the most ops saved per unit of added loss, the
   loss being measured by the gate (added gate floored at 1/n, so a step that changes no
   prediction is ranked by its savings; ties go to the earlier track). It stops when no
   candidate fits. A track whose candidate is refused ``--patience`` rounds in a row
   (default 1; 0 = never) is retired: adding other approximations rarely makes a refused
   step fit again, and it saves most of the evaluations. Only the layers from the changed one onwards are re-run: the inputs of each
   DyVE layer under the current setting are cached (``--cache-mb``), and the counters of
   the layers before it are reused.
5. **Holdout verification.** The final setting is evaluated on the holdout images (loss,
   SE, two-sided confidence interval, plain UCB: no selection happened on these images).
   If the UCB exceeds the budget, the greedy steps are undone from the last one backwards,
   each undo re-verified, until it fits (the floor always does); the undos are recorded.

Ctrl-C (or SIGTERM, from the command line) stops cleanly: the best setting accepted so far
is written, with ``"interrupted": true`` in search.json. The search is deterministic for a
seed: fixed candidate order, and the only randomness (split, position sample) comes from
seeded generators.

Outputs (each written to a temporary file and moved in place with ``os.replace``), in
``--out-dir`` (default ``reports/<net-name>/tune``):

* ``tuned_deploy.prototxt``: the DyVE deploy net with the tuned ``dyve_param`` per layer
  (layer names kept, so the stock caffemodel loads);
* ``tuned_train_val.prototxt`` with ``--train-val``: the same settings in a train_val net;
* ``search.json``: every setting evaluated (stage, layer, knob, settings, ops per image,
  n_rw, n_wr, loss, SE, UCB, accepted), baseline accuracy, the floor, the ladders, the
  greedy steps, the final settings per layer and the holdout verification;
* ``search.md``: a short human summary.

Library use: ``tune(model, weights, calib, ...) -> dict`` (the content of search.json).
"""
import argparse
import copy
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
import warnings

if __name__ == "__main__":  # quiet Caffe's log before pycaffe loads glog
    os.environ.setdefault("GLOG_minloglevel", "2")

import numpy as np
from google.protobuf import json_format, text_format
from tqdm import tqdm

import caffe
from caffe.proto import caffe_pb2

from dyve import files as dyve_files
from dyve import live, nets
from dyve import settings as dyve_settings

KNOBS = ("exact", "spet", "sdss", "sfma")
APPROX_KNOBS = ("spet", "sdss", "sfma")
DEFAULT_KNOBS = APPROX_KNOBS  # exact mode is opt-in: it saves MACs but costs wall time

# Ladders (see the module docstring). Thresholds are rounded to 6 significant digits.
SPET_FRACTIONS = (0.25, 0.5, 0.75)
SPET_STD_MULTIPLES = (-1.0, -0.5, -0.25, 0.0, 0.25)  # THRESHOLD gate (inner products)
SPET_BOUND_SCALES = (1.0, 0.5, 0.25, 0.1, 0.0)       # BOUND gate (convolutions)
SDSS_STRIDE = 2
SDSS_QUANTILES = (0.1, 0.25, 0.5)
SFMA_QUANTILES = (0.05, 0.1, 0.2, 0.35, 0.5)
STATS_IMAGES = 64           # images for the layer statistics (fewer for big inputs)
STATS_BYTES = 64 << 20      # at most this much input sample per layer
STATS_POSITIONS = 256       # output positions sampled per image and layer
TIE_TOLERANCE = 1e-4        # exact mode may flip a prediction only on a tie this close

# Keys of search.json that depend on the clock or the output location.
VOLATILE_KEYS = ("elapsed_s", "time_s", "started", "finished", "out_dir", "files")


class TuneError(RuntimeError):
    """Bad input or an inconsistency, with a message for the user."""


# ============================================================================ statistics

def z_value(confidence, two_sided=False):
    """Normal quantile for a one-sided (or two-sided) bound at `confidence`."""
    if not 0.0 < confidence < 1.0:
        raise TuneError(f"--confidence must be in (0, 1), got {confidence}")
    p = 1.0 - (1.0 - confidence) / 2.0 if two_sided else confidence
    return statistics.NormalDist().inv_cdf(p)


def paired_stats(p0, p, labels, confidence=0.95, se_scale=1.0, clamp=True):
    """Paired accuracy loss of predictions `p` against the reference `p0` on `labels`.

    d_i = [p0_i correct] - [p_i correct] in {-1, 0, 1}. Returns a dict with n, n_rw (right
    -> wrong), n_wr (wrong -> right), n_changed (any prediction change), and in percentage
    points: loss = mean(d), se = std(d, ddof=1) / sqrt(n), ucb = loss + z * se (one-sided,
    z at `confidence`), gate = max(loss, 0) + z * se * se_scale (the search's acceptance
    bound: a measured gain is not banked unless clamp is False; se_scale projects the SE to
    another number of images), ci_low / ci_high (two-sided interval at `confidence`),
    acc0, acc.
    """
    p0, p, labels = (np.asarray(a).ravel() for a in (p0, p, labels))
    if not len(p0) == len(p) == len(labels):
        raise ValueError("paired_stats: p0, p and labels must have the same length")
    n = len(p0)
    if n == 0:
        raise ValueError("paired_stats: no images")
    right0, right = p0 == labels, p == labels
    n_rw = int(np.sum(right0 & ~right))
    n_wr = int(np.sum(~right0 & right))
    mean = (n_rw - n_wr) / n
    var = max(0.0, (n_rw + n_wr - n * mean * mean) / (n - 1)) if n > 1 else 0.0
    se = math.sqrt(var / n)
    z1, z2 = z_value(confidence), z_value(confidence, two_sided=True)
    return {"n": n, "n_rw": n_rw, "n_wr": n_wr, "n_changed": int(np.sum(p0 != p)),
            "loss": 100.0 * mean, "se": 100.0 * se, "ucb": 100.0 * (mean + z1 * se),
            "gate": 100.0 * ((max(mean, 0.0) if clamp else mean) + z1 * se * se_scale),
            "ci_low": 100.0 * (mean - z2 * se), "ci_high": 100.0 * (mean + z2 * se),
            "acc0": 100.0 * float(np.mean(right0)), "acc": 100.0 * float(np.mean(right))}


def _fits(stats, budget, key="ucb"):
    return stats[key] <= budget + 1e-9


def _round(value, digits=6):
    """A float rounded to `digits` significant digits (thresholds, readable JSON)."""
    value = float(value)
    return 0.0 if value == 0 else float(f"{value:.{digits}g}")


# ============================================================================ input checks

def _read_net_param(path, what="--model"):
    if not path or not os.path.isfile(path):
        raise TuneError(f"{what}: prototxt {path!r} does not exist")
    param = caffe_pb2.NetParameter()
    try:
        with open(path) as f:
            text_format.Merge(f.read(), param)
    except (text_format.ParseError, UnicodeDecodeError) as error:
        raise TuneError(f"{what}: {path} is not a valid NetParameter prototxt: {error}") \
            from None
    if param.layers:
        raise TuneError(f"{what}: {path} uses the V1 'layers' format; upgrade it with "
                        "upgrade_net_proto_text first")
    known = set(caffe.layer_type_list())
    for layer in param.layer:
        if layer.type not in known:
            raise TuneError(f"{what}: {path}: layer '{layer.name}' has type "
                            f"'{layer.type}', which this Caffe does not know")
    return param


def _is_dyve_type(layer_type):
    return layer_type in live.DYVE_TYPES


def prepare_model(path, what="--model"):
    """(DyVE NetParameter, converted) from a DyVE or stock prototxt."""
    param = _read_net_param(path, what)
    if any(_is_dyve_type(layer.type) for layer in param.layer):
        return param, False
    try:
        dyve = nets.to_dyve(param, {})
    except ValueError as error:
        raise TuneError(f"{what}: {path}: {error}") from None
    if not any(_is_dyve_type(layer.type) for layer in dyve.layer):
        raise TuneError(f"{what}: {path} has no layer DyVE can convert (a Convolution or "
                        "InnerProduct followed by a ReLU)")
    return dyve, True


def _proto_shape(blob):
    """Shape of a BlobProto and whether it is a legacy 4-D one."""
    if blob.HasField("num") or blob.HasField("channels") or blob.HasField("height") \
            or blob.HasField("width"):
        return (blob.num, blob.channels, blob.height, blob.width), True
    return tuple(blob.shape.dim), False


def _shape_equals(target, source, legacy):
    """Blob::ShapeEquals of Caffe (legacy shapes index from the end, padded with 1)."""
    target = tuple(target)
    if legacy:
        return len(target) <= 4 and (1,) * (4 - len(target)) + target == tuple(source)
    return target == tuple(source)


def _weight_layers(weights):
    """{layer name: [(shape, legacy, count)]} of a caffemodel or a Caffe HDF5 file."""
    with open(weights, "rb") as f:
        head = f.read(8)
    if head == b"\x89HDF\r\n\x1a\n":
        try:
            import h5py
        except ImportError:
            raise TuneError(f"--weights: {weights} is an HDF5 file and h5py is missing") \
                from None
        out = {}
        with h5py.File(weights, "r") as h5:
            if "data" not in h5:
                raise TuneError(f"--weights: {weights} is an HDF5 file without a 'data' "
                                "group (not a Caffe snapshot)")
            for name, group in h5["data"].items():
                blobs = []
                for i in range(len(group)):
                    if str(i) not in group:
                        raise TuneError(f"--weights: {weights}: layer '{name}' lacks "
                                        f"blob {i}")
                    shape = tuple(group[str(i)].shape)
                    blobs.append((shape, False, int(np.prod(shape, dtype=np.int64))))
                out[name] = [blobs]
        return out
    param = caffe_pb2.NetParameter()
    try:
        with open(weights, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("error")  # a partial parse only warns
            param.ParseFromString(f.read())
    except Exception as error:  # protobuf DecodeError and friends
        raise TuneError(f"--weights: {weights} is not a caffemodel (binary NetParameter): "
                        f"{error}") from None
    out = {}
    for layer in list(param.layer) + list(param.layers):
        blobs = []
        for blob in layer.blobs:
            shape, legacy = _proto_shape(blob)
            count = len(blob.double_data) or len(blob.data)
            blobs.append((shape, legacy, count))
        out.setdefault(layer.name, []).append(blobs)  # Caffe copies every same-name layer
    return out


def check_weights(net, weights, dyve_names=()):
    """Refuse a caffemodel that does not fit `net` (Caffe would abort the process).

    Every layer of the caffemodel whose name is in the net must have the net's number of
    blobs and their shapes (and as many values); every net layer with parameters must have
    weights in the caffemodel.
    """
    if not weights or not os.path.isfile(weights):
        raise TuneError(f"--weights: caffemodel {weights!r} does not exist")
    source = _weight_layers(weights)
    names = list(net._layer_names)
    problems = []
    for name, blobs in ((name, blobs) for name, versions in source.items()
                        for blobs in versions):
        if name not in names:
            continue  # Caffe ignores source layers the net does not have
        target = net.params[name] if name in net.params else []
        if len(target) != len(blobs):
            problems.append(f"layer '{name}' has {len(target)} parameter blob(s) in the "
                            f"prototxt but {len(blobs)} in the caffemodel")
            continue
        for i, (shape, legacy, count) in enumerate(blobs):
            want = tuple(target[i].data.shape)
            if not _shape_equals(want, shape, legacy):
                problems.append(f"layer '{name}' blob {i}: prototxt shape {want}, "
                                f"caffemodel shape {tuple(shape)}")
            elif count != int(np.prod(want, dtype=np.int64)):
                problems.append(f"layer '{name}' blob {i}: caffemodel holds {count} values "
                                f"for shape {want}")
    missing = [name for name in net.params if not any(source.get(name, []))]
    for name in missing:
        kind = "DyVE layer" if name in dyve_names else "layer"
        problems.append(f"{kind} '{name}' has no weights in the caffemodel")
    if problems:
        raise TuneError(f"--weights: {weights} does not match the prototxt: "
                        + "; ".join(problems))


def load_net(net_param, weights):
    """A TEST-phase pycaffe net of `net_param` with `weights`, checked first."""
    fd, path = tempfile.mkstemp(suffix=".prototxt", prefix="dyve_tune_")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text_format.MessageToString(net_param))
        net = caffe.Net(path, caffe.TEST)
    finally:
        os.remove(path)
    check_weights(net, weights, dyve_names=list(live.dyve_layers(net)))
    net.copy_from(weights)
    return net


# ============================================================================ calibration data

def _is_image_file(name):
    return name.lower().endswith((".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff"))


def _fit_image(img, shape, target_hw=None):
    """uint8 C x H x W -> the net's C x H x W: resize to target_hw if given and different,
    or to the input size when smaller than it, then centre-crop."""
    import cv2
    c, h, w = shape
    if img.shape[0] != c:
        raise TuneError(f"calibration images have {img.shape[0]} channels, the net wants {c}")
    ih, iw = img.shape[1:]
    th, tw = target_hw if target_hw else (ih, iw)
    if ih < h or iw < w:
        th, tw = max(th, h), max(tw, w)
    if (th, tw) != (ih, iw):
        hwc = img.transpose(1, 2, 0)
        hwc = cv2.resize(hwc, (tw, th), interpolation=cv2.INTER_LINEAR)
        img = hwc.reshape(th, tw, c).transpose(2, 0, 1)
    y0, x0 = (img.shape[1] - h) // 2, (img.shape[2] - w) // 2
    return np.ascontiguousarray(img[:, y0:y0 + h, x0:x0 + w])


def load_calibration(path, shape, max_images=None, seed=1701, target_hw=None):
    """(uint8 N x C x H x W images, int64 labels, info) of an LMDB or an image folder.

    LMDB: labels from the datums, the first `max_images` in key order (the project's
    LMDBs are shuffled). Folder: classes are the sorted sub-folder names (label = index),
    files sorted; `max_images` takes a seeded random subset. Images are fitted to the
    net input (see _fit_image).
    """
    from dyve import data as dyve_data
    if not path or not os.path.exists(path):
        raise TuneError(f"--calib: {path!r} does not exist")
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "data.mdb")):
        try:
            images, labels = dyve_data.read_lmdb(path, limit=max_images)
        except dyve_data.DataError as error:
            raise TuneError(f"--calib: {error}") from None
        if len(images) == 0:
            raise TuneError(f"--calib: calibration set {path} is empty (no images)")
        fitted = np.stack([_fit_image(img, shape, target_hw) for img in images])
        return fitted, labels.astype(np.int64), {"kind": "lmdb", "path": path,
                                                 "count": int(len(labels))}
    if not os.path.isdir(path):
        raise TuneError(f"--calib: {path} is neither an LMDB nor a folder of class folders")
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    items = []
    for label, cls in enumerate(classes):
        for name in sorted(os.listdir(os.path.join(path, cls))):
            if _is_image_file(name):
                items.append((os.path.join(path, cls, name), label))
    if not items:
        raise TuneError(f"--calib: calibration set {path} is empty (no <class>/*.jpg|png)")
    if max_images is not None and max_images < len(items):
        keep = np.sort(np.random.RandomState(seed).permutation(len(items))[:max_images])
        items = [items[i] for i in keep]
    import cv2
    flag = cv2.IMREAD_GRAYSCALE if shape[0] == 1 else cv2.IMREAD_COLOR
    images = []
    for file, _ in items:
        img = cv2.imread(file, flag)
        if img is None:
            raise TuneError(f"--calib: cannot read image {file}")
        img = img[None] if img.ndim == 2 else img.transpose(2, 0, 1)
        images.append(_fit_image(img, shape, target_hw))
    labels = np.array([label for _, label in items], np.int64)
    return np.stack(images), labels, {"kind": "folder", "path": path, "classes": classes,
                                      "count": len(items)}


def load_mean(spec, shape):
    """float32 array broadcastable to C x H x W: a mean.binaryproto (centre-cropped to the
    input, or its per-channel mean when the sizes do not fit) or "v1,v2,v3" per channel."""
    if spec is None:
        return None, None
    c, h, w = shape
    if os.path.isfile(spec):
        from dyve import data as dyve_data
        try:
            mean = dyve_data.read_mean(spec)
        except Exception as error:
            raise TuneError(f"--mean: {spec} is not a mean.binaryproto: {error}") from None
        if mean.shape[0] != c:
            raise TuneError(f"--mean: {spec} has {mean.shape[0]} channels, the net wants {c}")
        mh, mw = mean.shape[1:]
        if mh >= h and mw >= w:
            y0, x0 = (mh - h) // 2, (mw - w) // 2
            return np.ascontiguousarray(mean[:, y0:y0 + h, x0:x0 + w]), (mh, mw)
        return mean.mean(axis=(1, 2)).reshape(c, 1, 1).astype(np.float32), None
    try:
        values = [float(v) for v in spec.split(",")]
    except ValueError:
        raise TuneError(f"--mean: {spec!r} is neither a file nor comma-separated values") \
            from None
    if len(values) not in (1, c):
        raise TuneError(f"--mean: {len(values)} values for {c} channels")
    return np.array(values, np.float32).reshape(-1, 1, 1), None


def split_indices(n, holdout, seed):
    """(search, holdout) sorted index arrays, a seeded permutation of range(n)."""
    n_hold = int(round(holdout * n))
    if n - n_hold < 1:
        raise TuneError(f"--holdout {holdout} leaves no search image out of {n}")
    perm = np.random.RandomState(seed).permutation(n)
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


# ============================================================================ net structure

def _nonneg_producers(net, net_param):
    """{blob position}: whether the bottom of each DyVE layer is provably >= 0."""
    names = list(net._layer_names)
    types = [layer.type for layer in net.layers]
    params = {layer.name: layer for layer in net_param.layer}
    tops, bottoms = net.top_names, net.bottom_names

    def nonneg(blob, before):
        for j in range(before - 1, -1, -1):
            if blob not in tops[names[j]]:
                continue
            t, p = types[j], params.get(names[j])
            ins = list(bottoms[names[j]])
            if t == "ReLU":
                return p is None or p.relu_param.negative_slope == 0
            if t in live.DYVE_TYPES:
                return p is None or p.dyve_param.relu
            if t in ("Softmax", "Sigmoid", "AbsVal"):
                return True
            if t in ("Pooling", "LRN", "Dropout", "Flatten", "Reshape", "Split",
                     "Concat", "Crop"):
                sources = ins[:1] if t == "Crop" else ins
                return all(nonneg(b, j) for b in sources)
            if t == "Eltwise" and p is not None:
                op = p.eltwise_param.operation
                if op == caffe_pb2.EltwiseParameter.MAX:
                    return any(nonneg(b, j) for b in ins)
                if op == caffe_pb2.EltwiseParameter.SUM:
                    coeffs = list(p.eltwise_param.coeff) or [1.0] * len(ins)
                    return all(c >= 0 for c in coeffs) and all(nonneg(b, j) for b in ins)
                if op == caffe_pb2.EltwiseParameter.PROD:
                    return all(nonneg(b, j) for b in ins)
            return False
        return False  # a net input

    out = {}
    for name in live.dyve_layers(net):
        j = names.index(name)
        out[name] = all(nonneg(b, j) for b in bottoms[name])
    return out


# ============================================================================ evaluation

def compact(settings):
    """The enabled knobs of a settings dict (relu omitted; it is always on)."""
    s = dyve_settings.normalize(settings)
    out = {}
    spet = s["spet"]
    if spet["enabled"] or spet["exact"]:
        d = {}
        if spet["enabled"]:
            d.update(enabled=True, fraction=spet["fraction"], threshold=spet["threshold"])
            if spet["ordering"] != "PER_LAYER":
                d["ordering"] = spet["ordering"]
            if spet["gate"] != "THRESHOLD":
                d.update(gate=spet["gate"], bound_scale=spet["bound_scale"])
        if spet["exact"]:
            d["exact"] = True
            if spet["check_interval"] != dyve_settings.DEFAULTS["spet"]["check_interval"]:
                d["check_interval"] = spet["check_interval"]
        out["spet"] = d
    if s["sdss"]["enabled"]:
        out["sdss"] = dict(s["sdss"])
    if s["sfma"]["enabled"]:
        out["sfma"] = dict(s["sfma"])
    return out


def _ops(counters):
    return (counters["macs_executed"] + counters["ops_spet"] + counters["ops_exact"]
            + counters["ops_sdss"] + counters["ops_sfma"])


def _per_image(effort, n):
    """Effort counters per image, per layer (for the report)."""
    return {name: {k: v / n for k, v in sorted(c.items())
                   if k not in ("forward_passes", "images")} for name, c in effort.items()}


def _add_effort(a, b):
    return {k: a.get(k, 0) + b.get(k, 0) for k in set(a) | set(b)}


class Evaluator:
    """Runs one pycaffe net over image subsets under per-layer settings.

    It keeps a *committed* setting with, per DyVE layer, the blobs that flow into it
    (its "live-in" blobs) for every search image and the per-batch effort counters, so a
    setting that differs from the committed one only from layer L on is evaluated by
    running the net from L.
    """

    def __init__(self, net, images, mean, batch, search, holdout, cache_mb=2048,
                 progress=True):
        self.net, self.images, self.mean = net, images, mean
        self.batch = int(batch)
        self.subsets = {"search": np.asarray(search), "holdout": np.asarray(holdout),
                        "all": np.arange(len(images))}
        self.progress = progress
        self.names = list(net._layer_names)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.dyve = list(live.dyve_layers(net))
        if len(net.inputs) != 1:
            raise TuneError(f"--model: the net must have exactly one input blob, it has "
                            f"{list(net.inputs)}")
        self.input = net.inputs[0]
        self.output = "prob" if "prob" in net.outputs else net.outputs[0]
        self.live_in = {name: self._live_in(self.index[name]) for name in self.dyve}
        self.applied = {name: live.get_settings(net, name) for name in self.dyve}
        # Knobs off, with the prototxt's relu (a DyVE layer without it takes no SPET/SDSS).
        self.base = {name: {"relu": self.applied[name]["relu"]} for name in self.dyve}
        self._reshape(self.batch)
        self.cacheable = self._choose_cache(cache_mb)
        self.committed = None

    # -- structure
    def _live_in(self, k):
        produced, needed = set(), []
        for j in range(k, len(self.names)):
            for blob in self.net.bottom_names[self.names[j]]:
                if blob not in produced and blob not in needed:
                    needed.append(blob)
            produced.update(self.net.top_names[self.names[j]])
        return needed

    def _reshape(self, n):
        blob = self.net.blobs[self.input]
        if blob.data.shape[0] != n:
            blob.reshape(n, *blob.data.shape[1:])
            self.net.reshape()

    def _choose_cache(self, cache_mb):
        """DyVE layers whose live-in blobs are cached, deepest first within cache_mb."""
        n = len(self.subsets["search"])
        budget = cache_mb * (1 << 20)
        chosen = set()
        for name in reversed(self.dyve):
            if self.index[name] <= 1:
                continue  # only the input layer before it: nothing to save
            blobs = [self.net.blobs[b] for b in self.live_in[name]]
            if any(b.data.ndim == 0 or b.data.shape[0] != self.batch for b in blobs):
                continue
            size = n * sum(b.data[0].nbytes for b in blobs)
            if size <= budget:
                chosen.add(name)
                budget -= size
        return chosen

    # -- settings
    def apply(self, settings):
        for name in self.dyve:
            want = dyve_settings.normalize(settings.get(name, self.base[name]))
            if want != self.applied[name]:
                live.set_settings(self.net, name, want)
                self.applied[name] = want

    def _batch_input(self, sel):
        x = self.images[sel].astype(np.float32)
        if self.mean is not None:
            x -= self.mean
        return x

    # -- running
    def evaluate(self, settings, subset="search", start_layer=None, capture=False,
                 count=None, sample=None, desc=None):
        """Run `settings` on a subset; returns a dict with preds, effort (per layer,
        summed), ops (per image), n, and, when capture, the live-in cache of the DyVE
        layers after the start layer (search only).

        `count` limits the subset to its first images (rounded up to whole batches);
        `sample` = {DyVE layer: k} also returns, for the first k images, each layer's
        bottom, the minimum of each such layer's bottom over the subset, and the output gap
        between the two top scores (baseline bookkeeping).
        """
        self.apply(settings)
        idx = self.subsets[subset]
        if count is not None and count < len(idx):
            idx = idx[:min(len(idx), -(-count // self.batch) * self.batch)]
        n = len(idx)
        start = 0
        c = self.committed
        if (start_layer is not None and subset == "search" and c is not None
                and start_layer in self.cacheable and start_layer in c["cache"]
                and all(dyve_settings.normalize(settings.get(l, self.base[l]))
                        == dyve_settings.normalize(c["settings"].get(l, self.base[l]))
                        for l in self.dyve[:self.dyve.index(start_layer)])):
            start = self.index[start_layer]
        captures = [name for name in self.dyve if self.index[name] > start
                    and name in self.cacheable] if capture else []
        if sample is not None and start > 0:
            raise ValueError("sampling needs a run from the first layer")
        stops = sorted({self.index[nm] for nm in captures}
                       | ({self.index[nm] for nm in sample} if sample else set()))
        cache = {name: {b: None for b in self.live_in[name]} for name in captures}
        preds = np.empty(n, np.int64)
        gaps = np.empty(n, np.float64) if sample else None
        mins = {name: np.inf for name in sample} if sample else None
        bottoms = {}
        batch_effort = []
        live.reset_effort(self.net)
        last = len(self.names) - 1
        bar = tqdm(total=n, desc=desc or subset, unit=" img", leave=False,
                   disable=not self.progress)
        try:
            for b0 in range(0, n, self.batch):
                sel = idx[b0:b0 + self.batch]
                nb = len(sel)
                self._reshape(nb)
                if start == 0:
                    self.net.blobs[self.input].data[...] = self._batch_input(sel)
                else:
                    for blob in self.live_in[start_layer]:
                        self.net.blobs[blob].data[...] = c["cache"][start_layer][blob][b0:b0 + nb]
                before = live.effort(self.net)
                cur = start
                for k in stops:
                    if k > cur:
                        self.net._forward(cur, k - 1)
                        cur = k
                    name = self.names[k]
                    if name in cache:
                        for blob in self.live_in[name]:
                            data = self.net.blobs[blob].data
                            if cache[name][blob] is None:
                                cache[name][blob] = np.empty((n,) + data.shape[1:], np.float32)
                            cache[name][blob][b0:b0 + nb] = data
                    if sample is not None and name in sample:
                        bottom = self.net.blobs[self.net.bottom_names[name][0]].data
                        mins[name] = min(mins[name], float(bottom.min()))
                        if b0 < sample[name]:
                            take = bottom[:min(nb, sample[name] - b0)].copy()
                            bottoms.setdefault(name, []).append(take)
                self.net._forward(cur, last)
                out = self.net.blobs[self.output].data.reshape(nb, -1)
                preds[b0:b0 + nb] = out.argmax(axis=1)
                if sample:
                    top2 = np.sort(out, axis=1)[:, -2:] if out.shape[1] > 1 else \
                        np.concatenate([out, out], axis=1)
                    gaps[b0:b0 + nb] = top2[:, 1] - top2[:, 0]
                after = live.effort(self.net)
                batch_effort.append({name: {k: after[name][k] - before[name][k]
                                            for k in after[name]} for name in self.dyve})
                bar.update(nb)
        finally:
            bar.close()
        # Layers before the start were not run: their counters are the committed ones.
        if start > 0:
            nbatches = len(batch_effort)
            for i in range(nbatches):
                for name in self.dyve:
                    if self.index[name] < start:
                        batch_effort[i][name] = dict(c["batch_effort"][i][name])
        effort = {name: {} for name in self.dyve}
        for be in batch_effort:
            for name in self.dyve:
                effort[name] = _add_effort(effort[name], be[name])
        ops = sum(_ops(effort[name]) for name in self.dyve) / n
        result = {"preds": preds, "effort": effort, "ops": ops, "n": n, "start": start,
                  "batch_effort": batch_effort}
        if capture:
            result["cache"] = cache
        if sample:
            result.update(gaps=gaps, mins=mins,
                          bottoms={k: np.concatenate(v) for k, v in bottoms.items()})
        return result

    def commit(self, settings, changed_layer=None, desc="commit"):
        """Make `settings` the committed setting on the search images (re-running from
        `changed_layer` when the cache allows) and return its evaluation."""
        result = self.evaluate(settings, "search", start_layer=changed_layer, capture=True,
                               desc=desc)
        cache = {}
        if self.committed is not None:
            for name, blobs in self.committed["cache"].items():
                if self.index[name] <= result["start"]:
                    cache[name] = blobs
        cache.update(result.pop("cache"))
        self.committed = {"settings": copy.deepcopy(settings), "cache": cache,
                          "batch_effort": result["batch_effort"]}
        return result


# ============================================================================ layer statistics

def _conv_geometry(layer):
    cp = layer.convolution_param

    def pair(rep, h, w, default):
        if cp.HasField(h) or cp.HasField(w):
            return getattr(cp, h), getattr(cp, w)
        vals = list(getattr(cp, rep))
        if not vals:
            return default, default
        return (vals[0], vals[0]) if len(vals) == 1 else (vals[0], vals[1])

    stride = pair("stride", "stride_h", "stride_w", 1)
    pad = pair("pad", "pad_h", "pad_w", 0)
    dil = list(cp.dilation)
    dilation = (1, 1) if not dil else ((dil[0], dil[0]) if len(dil) == 1 else tuple(dil[:2]))
    return {"stride": stride, "pad": pad, "dilation": dilation, "group": cp.group or 1}


def _prefix_count(f, total):
    return max(1, int(math.ceil(f * total - 1e-6)))


def layer_stats(layer, weights, bias, bottom, rng, fractions=SPET_FRACTIONS,
                positions=STATS_POSITIONS):
    """Samples of a DyVE layer's pre-activations and SPET partial sums, from its input.

    Returns {"z": full pre-activations, "partial": {f: partial sums (prefix channels of
    the per-layer order, plus bias)}, "ranges": per-map input ranges (conv),
    "fan_channels": input channels per group (inputs of an inner product)}.
    """
    w = np.asarray(weights, np.float64)
    b = np.zeros(w.shape[0]) if bias is None else np.asarray(bias, np.float64)
    x = np.asarray(bottom, np.float64)
    z_all, part_all, ranges = [], {f: [] for f in fractions}, None
    bound_all = {f: [] for f in fractions}
    if layer.type == "DyveInnerProduct":
        ipp = layer.inner_product_param
        axis = ipp.axis if ipp.HasField("axis") else 1
        xs = x.reshape(int(np.prod(x.shape[:axis])), -1)
        w = w.T if ipp.transpose else w
        w = w.reshape(w.shape[0], -1)
        fan = w.shape[1]
        order = np.argsort(-np.abs(w).sum(axis=0), kind="stable")
        z_all.append((xs @ w.T + b).ravel())
        for f in fractions:
            pre = order[:_prefix_count(f, w.shape[1])]
            part_all[f].append((xs[:, pre] @ w[:, pre].T + b).ravel())
    else:
        g = _conv_geometry(layer)
        (sh, sw), (ph, pw), (dh, dw), groups = g["stride"], g["pad"], g["dilation"], g["group"]
        o, cg, kh, kw = w.shape
        fan = cg
        og = o // groups
        n, c, h, wd = x.shape
        ho = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
        wo = (wd + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
        ranges = (x.max(axis=(2, 3)) - x.min(axis=(2, 3))).ravel()
        wg = w.reshape(groups, og, cg, kh * kw)
        orders = [np.argsort(-np.abs(wg[gi]).sum(axis=(0, 2)), kind="stable")
                  for gi in range(groups)]
        for i in range(n):
            xp = np.pad(x[i], ((0, 0), (ph, ph), (pw, pw)))
            pos = np.sort(rng.choice(ho * wo, size=min(positions, ho * wo), replace=False))
            oy, ox = np.divmod(pos, wo)
            cols = np.empty((c, kh * kw, len(pos)))
            for a in range(kh):
                for bb in range(kw):
                    cols[:, a * kw + bb, :] = xp[:, oy * sh + a * dh, ox * sw + bb * dw]
            for gi in range(groups):
                cgrp = cols[gi * cg:(gi + 1) * cg]
                bg = b[gi * og:(gi + 1) * og, None]
                z_all.append((np.einsum("ock,ckp->op", wg[gi], cgrp) + bg).ravel())
                for f in fractions:
                    pre = orders[gi][:_prefix_count(f, cg)]
                    rest = orders[gi][_prefix_count(f, cg):]
                    part_all[f].append((np.einsum("ock,ckp->op", wg[gi][:, pre],
                                                  cgrp[pre]) + bg).ravel())
                    # BOUND gate: positive weight sums times the taps' maxima
                    bound_all[f].append(np.einsum(
                        "oc,cp->op", np.maximum(wg[gi][:, rest], 0).sum(axis=2),
                        cgrp[rest].max(axis=1)).ravel())
    return {"z": np.concatenate(z_all),
            "partial": {f: np.concatenate(v) for f, v in part_all.items()},
            "bound": {f: np.concatenate(v) for f, v in bound_all.items() if v},
            "ranges": ranges, "fan_channels": fan}


def build_levels(layer, stats, knobs, top_shape):
    """{knob: [level dicts]} for one DyVE layer, plus a per-level description."""
    levels = {}
    z = stats["z"]
    if "spet" in knobs:
        items, prefixes = [], set()
        for f in SPET_FRACTIONS:
            prefix = _prefix_count(f, stats["fan_channels"])
            if prefix >= stats["fan_channels"] or prefix in prefixes:
                continue  # the prefix is every channel (nothing to skip), or seen already
            prefixes.add(prefix)
            p = stats["partial"][f]
            if layer.type == "DyveConvolution":
                u = stats["bound"][f]
                for s in SPET_BOUND_SCALES:
                    zero = p + np.float32(s) * u < 0
                    items.append({"set": {"enabled": True, "fraction": f, "threshold": 0.0,
                                           "gate": "BOUND", "bound_scale": s},
                                  "scale": {"bound_scale": s,
                                            "predicted_zero": _round(float(np.mean(zero)), 4),
                                            "wrongly_zeroed": _round(float(np.mean(zero & (z > 0))), 4)}})
                continue
            sd = float(np.std(p)) or 1.0
            for m in SPET_STD_MULTIPLES:
                t = _round(m * sd)
                zero = p < t
                items.append({"set": {"enabled": True, "fraction": f, "threshold": t},
                              "scale": {"std_multiple": m, "partial_std": _round(sd),
                                        "predicted_zero": _round(float(np.mean(zero)), 4),
                                        "wrongly_zeroed": _round(float(np.mean(zero & (z > 0))), 4)}})
        levels["spet"] = items
    is_conv = layer.type == "DyveConvolution"
    if "sdss" in knobs and is_conv and int(np.prod(top_shape[2:])) > 1:
        pos = z[z > 0]
        ts = [(0.0, None)] + ([(_round(np.quantile(pos, q)), q) for q in SDSS_QUANTILES]
                              if len(pos) else [])
        items, seen = [], set()
        for t, q in ts:
            if t in seen:
                continue
            seen.add(t)
            items.append({"set": {"enabled": True, "stride": SDSS_STRIDE, "threshold": t,
                                  "fill": "MEAN"},
                          "scale": {"positive_output_quantile": q}})
        levels["sdss"] = items
    if "sfma" in knobs and is_conv and stats["ranges"] is not None:
        r = stats["ranges"]
        ts = ([(0.0, None)] if np.any(r <= 0) else []) + \
            [(_round(np.quantile(r, q)), q) for q in SFMA_QUANTILES]
        items, seen = [], set()
        for t, q in ts:
            if t in seen:
                continue
            seen.add(t)
            items.append({"set": {"enabled": True, "threshold": t, "spread": "RANGE"},
                          "scale": {"input_range_quantile": q,
                                    "maps_replaced": _round(float(np.mean(r <= t)), 4)}})
        levels["sfma"] = items
    return levels


def pareto_ladder(points, floor_ops, budget):
    """Indices of sweep points forming a track's greedy ladder, least aggressive first.

    `points` = [(ops, cost, bound)] (the search uses the gate for both). Drops points that
    save nothing or whose bound alone is over the budget, then keeps the Pareto front (no
    other point with fewer-or-equal ops and lower-or-equal cost), by decreasing ops.
    """
    ok = [i for i, (ops, loss, bound) in enumerate(points)
          if ops < floor_ops and bound <= budget + 1e-9]
    ok.sort(key=lambda i: (points[i][0], points[i][1], i))
    front, best = [], math.inf
    for i in ok:
        if points[i][1] < best - 1e-12:
            front.append(i)
            best = points[i][1]
    return list(reversed(front))


# ============================================================================ the search

def _with_level(settings, layer, knob, level):
    out = copy.deepcopy(settings)
    s = dyve_settings.normalize(out.get(layer, {"relu": True}))
    s[knob].update(level)
    out[layer] = s
    return out


def net_name(model):
    """reports/<net-name>: the prototxt's base name without _dyve / _deploy."""
    base = os.path.basename(model)
    if base.endswith(".prototxt"):
        base = base[:-len(".prototxt")]
    changed = True
    while changed:
        changed = False
        for suffix in ("_deploy", "_dyve", "_train_val", "_tuned"):
            if base.endswith(suffix) and len(base) > len(suffix):
                base, changed = base[:-len(suffix)], True
    return base


def _apply_to_param(net_param, final, what):
    out = copy.deepcopy(net_param)
    by_name = {layer.name: layer for layer in out.layer}
    for name, s in final.items():
        layer = by_name.get(name)
        if layer is None or not _is_dyve_type(layer.type):
            raise TuneError(f"{what}: no DyVE layer named '{name}' to carry the tuned "
                            "settings")
        param = dict(compact(s), relu=True)
        layer.ClearField("dyve_param")
        json_format.ParseDict(param, layer.dyve_param)
    return out


def _other_macs(net, dyve):
    """MACs per image of the stock Convolution / InnerProduct layers (not DyVE)."""
    total = 0
    for name, layer in zip(net._layer_names, net.layers):
        if name in dyve or layer.type not in ("Convolution", "InnerProduct"):
            continue
        top = net.blobs[net.top_names[name][0]].data
        w = net.params[name][0].data
        fan_in = int(np.prod(w.shape[1:])) if layer.type == "Convolution" else \
            int(w.size // (top.size // top.shape[0]))
        total += (top.size // top.shape[0]) * fan_in
    return int(total)


def tune(model, weights, calib, mean=None, budget=0.5, knobs=DEFAULT_KNOBS, seed=1701,
         holdout=0.3, confidence=0.95, batch=100, max_images=None, out_dir=None,
         train_val=None, patience=1, sweep_images=None, cache_mb=2048, bank_gains=False,
         progress=True, hook=None, write=True):
    """Tune the DyVE knobs of `model` with `weights` on `calib` (see the module docstring).

    `hook`, if given, is called with each evaluation record (a dict) right after it is
    made; raising KeyboardInterrupt from it stops the search as Ctrl-C does (for tests).
    Returns the search.json content; writes the outputs into `out_dir` when `write`.
    """
    t_start = time.time()
    if budget is None or not budget >= 0:
        raise TuneError(f"--budget must be >= 0 percentage points, got {budget}")
    knobs = tuple(knobs)
    bad = [k for k in knobs if k not in KNOBS]
    if bad or not knobs:
        raise TuneError(f"--knobs: unknown knob(s) {', '.join(bad) or '(none given)'}; "
                        f"choose from {', '.join(KNOBS)}")
    if not 0 <= holdout < 1:
        raise TuneError(f"--holdout must be in [0, 1), got {holdout}")
    z_value(confidence)
    if batch < 1:
        raise TuneError(f"--batch must be >= 1, got {batch}")
    if max_images is not None and max_images < 1:
        raise TuneError(f"--max-images must be >= 1, got {max_images}")
    if not weights or not os.path.isfile(weights):
        raise TuneError(f"--weights: caffemodel {weights!r} does not exist")
    if calib is None or not os.path.exists(calib):
        raise TuneError(f"--calib: {calib!r} does not exist")
    net_param, converted = prepare_model(model)
    tv_param = None
    if train_val:
        tv_param, _ = prepare_model(train_val, what="--train-val")
    out_dir = out_dir or os.path.join("reports", net_name(model), "tune")

    net = load_net(net_param, weights)
    in_shape = tuple(net.blobs[net.inputs[0]].data.shape[1:]) if len(net.inputs) == 1 \
        else None
    if in_shape is None or len(in_shape) != 3:
        raise TuneError("--model: the net needs one image input blob (N x C x H x W)")
    mean_arr, mean_hw = load_mean(mean, in_shape)
    images, labels, calib_info = load_calibration(calib, in_shape, max_images, seed,
                                                  target_hw=mean_hw)
    search_idx, hold_idx = split_indices(len(images), holdout, seed)
    ev = Evaluator(net, images, mean_arr, batch, search_idx, hold_idx, cache_mb, progress)
    if not ev.dyve:
        raise TuneError(f"--model: {model} has no DyVE layer")
    layer_params = {layer.name: layer for layer in net_param.layer}
    approx = [k for k in APPROX_KNOBS if k in knobs]
    rng = np.random.RandomState(seed)
    def say(text):
        if progress:
            tqdm.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)
    n_hold = len(hold_idx)

    def paired(p0, preds, y, projected=True):
        """Paired statistics; the gate is projected to the holdout's size (same flip rate)
        so that what the search accepts is what the holdout can confirm."""
        scale = math.sqrt(len(y) / n_hold) if projected and n_hold else 1.0
        return paired_stats(p0, preds, y, confidence, se_scale=scale, clamp=not bank_gains)

    result = {
        "tool": "dyve.tune", "model": model, "weights": weights, "calib": calib_info,
        "mean": mean, "converted_from_stock": converted, "net": net_param.name,
        "dyve_layers": ev.dyve, "knobs": list(knobs),
        "config": {"budget": budget, "seed": seed, "holdout": holdout,
                   "confidence": confidence, "z": z_value(confidence), "batch": batch,
                   "max_images": max_images, "patience": patience,
                   "sweep_images": sweep_images, "cache_mb": cache_mb,
                   "bank_gains": bank_gains,
                   "gate_se_scale": (math.sqrt(len(search_idx) / len(hold_idx))
                                     if len(hold_idx) else 1.0)},
        "units": {"loss": "percentage points of top-1 (paired, vs the dense net)",
                  "ops": "per image: macs_executed + ops_spet + ops_exact + ops_sdss + "
                         "ops_sfma, summed over the DyVE layers"},
        "images": {"total": int(len(images)), "search": int(len(search_idx)),
                   "holdout": int(len(hold_idx))},
        "cached_layers": sorted(ev.cacheable, key=ev.dyve.index),
        "interrupted": False, "interrupted_in": None,
        "evaluations": [], "out_dir": out_dir,
    }
    evals = result["evaluations"]
    y_s, y_h = labels[search_idx], labels[hold_idx]
    off = {n: dict(ev.base[n]) for n in ev.dyve}
    state = {"phase": "baseline", "best": copy.deepcopy(off), "steps": []}

    def record(stage, settings, res, p0, y, layer=None, knob=None, level=None,
               accepted=None, subset="search", t0=None, **extra):
        st = paired(p0, res["preds"], y, projected=subset == "search") \
            if p0 is not None else None
        rec = {"id": len(evals), "stage": stage, "subset": subset, "layer": layer,
               "knob": knob, "level": level,
               "settings": {n: compact(s) for n, s in settings.items() if compact(s)},
               "n": res["n"], "ops": res["ops"]}
        if st:
            rec.update({k: st[k] for k in ("n_rw", "n_wr", "n_changed", "loss", "se",
                                           "ucb", "gate", "acc")})
        rec["accepted"] = accepted
        rec.update(extra)
        rec["time_s"] = round(time.time() - t0, 3) if t0 else None
        evals.append(rec)
        if hook is not None:
            hook(rec)
        return rec, st

    try:
        # ---------------------------------------------------------------- 1. baseline
        t0 = time.time()
        k_stats = {}
        for name in ev.dyve:
            bottom = net.blobs[net.bottom_names[name][0]].data
            per_image = max(1, bottom[0].nbytes)
            k_stats[name] = max(4, min(STATS_IMAGES, STATS_BYTES // per_image))
        base = ev.evaluate(off, "all", sample=k_stats, desc="baseline")
        p0_all = base["preds"]
        p0_s, p0_h = p0_all[search_idx], p0_all[hold_idx]
        dense = sum(base["effort"][n]["macs_dense"] for n in ev.dyve) / base["n"]
        record("baseline", off, base, p0_all, labels, subset="all", accepted=True, t0=t0)
        result["baseline"] = {
            "accuracy": 100.0 * float(np.mean(p0_all == labels)),
            "accuracy_search": 100.0 * float(np.mean(p0_s == y_s)),
            "accuracy_holdout": (100.0 * float(np.mean(p0_h == y_h)) if len(hold_idx)
                                 else None),
            "ops": base["ops"], "dense_macs": dense,
            "other_macs": _other_macs(net, ev.dyve),
            "ops_per_layer": {n: _ops(base["effort"][n]) / base["n"] for n in ev.dyve}}
        say(f"baseline: top-1 {result['baseline']['accuracy']:.2f} % on {len(images)} "
            f"calibration images, {dense / 1e6:.3f} M MACs/image in DyVE layers")

        # ---------------------------------------------------------------- 2. exact floor
        state["phase"] = "floor"
        structural = _nonneg_producers(net, net_param)
        eligibility = {}
        floor = copy.deepcopy(off)
        for name in ev.dyve:
            lowest = base["mins"][name]
            ok = structural[name] and lowest >= 0 and ev.base[name]["relu"]
            eligibility[name] = {"structurally_nonnegative": structural[name],
                                 "min_bottom": lowest,
                                 "exact": bool(ok and "exact" in knobs)}
            if ok and "exact" in knobs:
                floor[name] = {"relu": True, "spet": {"exact": True}}
        state["best"] = copy.deepcopy(floor)
        t0 = time.time()
        fl = ev.commit(floor, desc="floor (search)")
        _, st = record("floor", floor, fl, p0_s, y_s, accepted=True, t0=t0)
        fl_hold = None
        if len(hold_idx):
            t0 = time.time()
            fl_hold = ev.evaluate(floor, "holdout", desc="floor (holdout)")
            record("floor", floor, fl_hold, p0_h, y_h, subset="holdout", accepted=True,
                   t0=t0)
        gaps, ties = base["gaps"], {}
        for part, res, idx in (("search", fl, search_idx), ("holdout", fl_hold, hold_idx)):
            if res is None:
                continue
            bad_img = np.nonzero(res["preds"] != p0_all[idx])[0]
            real = [int(idx[i]) for i in bad_img if gaps[idx[i]] > TIE_TOLERANCE]
            if real:
                raise TuneError(f"exact mode changed {len(real)} prediction(s) on "
                                f"{part} images (e.g. image {real[0]}); exact mode must not "
                                "change any output: this is a bug in the DyVE layers")
            ties[part] = int(len(bad_img))
        state["floor_checked"] = fl_hold is not None
        result["floor"] = {"settings": {n: compact(s) for n, s in floor.items()},
                           "eligibility": eligibility, "ops": fl["ops"],
                           "rounding_ties": ties,
                           "effort_per_image": _per_image(fl["effort"], fl["n"]),
                           "ops_per_layer": {n: _ops(fl["effort"][n]) / fl["n"]
                                             for n in ev.dyve}}
        state["steps"] = [{"settings": copy.deepcopy(floor), "ops": fl["ops"],
                           "loss": st["loss"], "ucb": st["ucb"], "gate": st["gate"],
                           "ops_per_layer": {n: _ops(fl["effort"][n]) / fl["n"]
                                             for n in ev.dyve},
                           "effort": _per_image(fl["effort"], fl["n"])}]
        floor_ops = fl["ops"]
        say(f"exact floor on {', '.join(n for n in ev.dyve if eligibility[n]['exact']) or 'no layer'}: "
            f"{floor_ops / 1e6:.3f} M ops/image (predictions unchanged)")

        # ---------------------------------------------------------------- 3. sweep
        state["phase"] = "sweep"
        tracks, ladders = [], {}
        result["levels"] = {}
        sweep_count = sweep_images if sweep_images else None
        floor_sweep = fl
        if sweep_count is not None and sweep_count < len(search_idx):
            floor_sweep = ev.evaluate(floor, "search", start_layer=ev.dyve[-1],
                                      count=sweep_count, desc="floor (sweep images)")
        n_sweep = floor_sweep["n"]
        p0_sw, y_sw = p0_s[:n_sweep], y_s[:n_sweep]
        all_levels = {}
        for name in ev.dyve:
            layer = layer_params[name]
            sample = base["bottoms"][name][:k_stats[name]]
            w = net.params[name][0].data
            b = net.params[name][1].data if len(net.params[name]) > 1 else None
            top_shape = net.blobs[net.top_names[name][0]].data.shape
            stats = layer_stats(layer, w, b, sample, rng)
            lv = build_levels(layer, stats, approx if ev.base[name]["relu"] else
                              [k for k in approx if k == "sfma"], top_shape)
            all_levels[name] = lv
            result["levels"][name] = {
                "stats_images": int(len(sample)),
                "z_std": _round(float(np.std(stats["z"]))),
                "positive_fraction": _round(float(np.mean(stats["z"] > 0)), 4),
                "ladders": {k: [dict(level=i, **item) for i, item in enumerate(v)]
                            for k, v in lv.items()}}
        total = sum(len(v) for lv in all_levels.values() for v in lv.values())
        bar = tqdm(total=total, desc="sweep", unit=" level", disable=not progress)
        try:
            for name in ev.dyve:
                for knob in APPROX_KNOBS:
                    items = all_levels[name].get(knob)
                    if not items:
                        continue
                    points, hopeless = [], set()
                    for i, item in enumerate(items):
                        group = item["set"].get("fraction")  # a monotone sub-ladder
                        if group in hopeless:
                            points.append((math.inf, math.inf, math.inf))
                            result["levels"][name]["ladders"][knob][i]["skipped"] = True
                            bar.update(1)
                            continue
                        s = _with_level(floor, name, knob, item["set"])
                        t0 = time.time()
                        res = ev.evaluate(s, "search", start_layer=name, count=n_sweep,
                                          desc=f"{name} {knob} {i}")
                        rec, st = record("sweep", s, res, p0_sw, y_sw, layer=name, knob=knob,
                                         level=i, accepted=False, t0=t0)
                        lcb = st["loss"] - z_value(confidence) * st["se"]
                        points.append((res["ops"], st["gate"], st["gate"]))
                        item["record"] = rec["id"]
                        if lcb > budget:
                            hopeless.add(group)  # the next levels only skip more
                        bar.update(1)
                    ladder = pareto_ladder(points, floor_sweep["ops"], budget)
                    for i in ladder:
                        evals[items[i]["record"]]["accepted"] = True
                    ladders[(name, knob)] = [items[i]["set"] for i in ladder]
                    result["levels"][name]["ladders"][knob + "_greedy"] = ladder
                    say(f"sweep {name} {knob}: {len(items)} levels "
                        f"({sum(1 for p in points if p[0] == math.inf)} skipped), "
                        f"greedy ladder {ladder}")
                    if ladder:
                        tracks.append((name, knob))
        finally:
            bar.close()

        # ---------------------------------------------------------------- 4. greedy
        state["phase"] = "greedy"
        current, cur_res = copy.deepcopy(floor), fl
        cur_stats = paired(p0_s, fl["preds"], y_s)
        position = {t: -1 for t in tracks}
        refusals = {t: 0 for t in tracks}
        retired = set()
        n_s = len(search_idx)
        result["greedy"] = {"tracks": [list(t) for t in tracks], "rounds": 0, "steps": [],
                            "retired": []}
        rnd = 0
        while True:
            active = [t for t in tracks if t not in retired
                      and position[t] + 1 < len(ladders[t])]
            if not active:
                break
            rnd += 1
            result["greedy"]["rounds"] = rnd
            candidates = []
            for order, t in enumerate(active):
                name, knob = t
                level = position[t] + 1
                s = _with_level(current, name, knob, ladders[t][level])
                t0 = time.time()
                res = ev.evaluate(s, "search", start_layer=name,
                                  desc=f"round {rnd}: {name} {knob} -> {level}")
                st = paired(p0_s, res["preds"], y_s)
                saved = cur_res["ops"] - res["ops"]
                added = (st["gate"] - cur_stats["gate"]) / 100.0
                fits = _fits(st, budget, "gate") and saved > 0
                eff = saved / max(added, 1.0 / n_s)
                reason = None if fits else ("no ops saved" if saved <= 0 else
                                            "gate over budget")
                rec, _ = record("greedy", s, res, p0_s, y_s, layer=name, knob=knob,
                                level=level, accepted=False, round=rnd,
                                ops_saved=saved, added_gate=100.0 * added,
                                efficiency=eff if fits else None, refused=reason, t0=t0)
                if fits:
                    candidates.append((-eff, order, t, level, s, res, st, rec))
                    refusals[t] = 0
                else:
                    refusals[t] += 1
                    if patience and refusals[t] >= patience:
                        retired.add(t)
                        result["greedy"]["retired"].append([name, knob, rnd])
            if not candidates:
                break
            candidates.sort(key=lambda c: (c[0], c[1]))
            _, _, t, level, s, res, st, rec = candidates[0]
            rec["accepted"] = True
            position[t] = level
            current, cur_stats = s, st
            state["best"] = copy.deepcopy(current)
            result["greedy"]["steps"].append(
                {"round": rnd, "layer": t[0], "knob": t[1], "level": level,
                 "record": rec["id"], "set": ladders[t][level], "ops": res["ops"],
                 "loss": st["loss"], "se": st["se"], "ucb": st["ucb"], "gate": st["gate"],
                 "n_rw": st["n_rw"], "n_wr": st["n_wr"]})
            state["steps"].append({"settings": copy.deepcopy(current), "ops": res["ops"],
                                   "loss": st["loss"], "ucb": st["ucb"], "gate": st["gate"],
                                   "ops_per_layer": {n: _ops(res["effort"][n]) / res["n"]
                                                     for n in ev.dyve},
                                   "effort": _per_image(res["effort"], res["n"])})
            cur_res = ev.commit(current, changed_layer=t[0], desc=f"round {rnd}: commit")
            if not np.array_equal(cur_res["preds"], res["preds"]):
                raise TuneError(f"re-running the accepted setting of round {rnd} gave "
                                "different predictions: the net is not deterministic")
            say(f"round {rnd}: {t[0]} {t[1]} -> level {level}: "
                f"{res['ops'] / 1e6:.3f} M ops/image, loss {st['loss']:+.2f} "
                f"(UCB {st['ucb']:.2f}) pp")

        # ---------------------------------------------------------------- 5. holdout
        state["phase"] = "holdout"
        verification = {"subset": "holdout", "n": int(len(hold_idx)), "checks": [],
                        "undone_steps": 0, "passed": None}
        result["holdout"] = verification
        k = len(state["steps"]) - 1
        if len(hold_idx) == 0:
            verification["passed"] = None
            verification["note"] = "no holdout images (--holdout 0): not verified"
        else:
            while True:
                step = state["steps"][k]
                stage = "holdout" if k == len(state["steps"]) - 1 else "undo"
                if k == 0:  # the floor: measured on the holdout already
                    res = fl_hold
                    rec, st = record(stage, step["settings"], res, p0_h, y_h,
                                     subset="holdout", accepted=True, step=k, reused=True)
                else:
                    t0 = time.time()
                    res = ev.evaluate(step["settings"], "holdout",
                                      desc=f"holdout (step {k})")
                    rec, st = record(stage, step["settings"], res, p0_h, y_h,
                                     subset="holdout", accepted=None, step=k, t0=t0)
                ok = _fits(st, budget)
                rec["accepted"] = ok
                verification["checks"].append(
                    {"step": k, "record": rec["id"], "ops": res["ops"],
                     **{x: st[x] for x in ("n_rw", "n_wr", "loss", "se", "ucb",
                                           "ci_low", "ci_high", "acc0", "acc")}})
                state["best"] = copy.deepcopy(step["settings"])
                if ok or k == 0:
                    verification["passed"] = bool(ok)
                    break
                say(f"holdout: UCB {st['ucb']:.2f} pp over the budget at step {k}; "
                    "undoing it")
                k -= 1
                verification["undone_steps"] += 1
                state["best"] = copy.deepcopy(state["steps"][k]["settings"])
            verification["final_step"] = k
        result["final_step"] = k
        state["phase"] = "done"
    except KeyboardInterrupt:
        result["interrupted"] = True
        result["interrupted_in"] = state["phase"]
        tqdm.write(f"interrupted during {state['phase']}: writing the best setting so far")

    # -------------------------------------------------------------------- final
    final = {n: dyve_settings.normalize(state["best"].get(n, ev.base[n])) for n in ev.dyve}
    result["final_settings"] = {n: compact(s) for n, s in final.items()}
    result["final_settings_full"] = final
    summary = {"holdout_verified": bool(result.get("holdout", {}).get("passed"))}
    if state.get("floor_checked") and state["steps"] and all(
            dyve_settings.normalize(state["steps"][0]["settings"][n]) == final[n]
            for n in ev.dyve):
        summary["holdout_verified"] = True  # the exact floor: same predictions as dense
    # Search-set ops of the final setting: from the greedy step it corresponds to.
    final_ops = None
    for step in state.get("steps", []):
        if all(dyve_settings.normalize(step["settings"].get(n, ev.base[n])) == final[n]
               for n in ev.dyve):
            final_ops = step["ops"]
            summary.update(search_loss=step["loss"], search_ucb=step["ucb"],
                           search_gate=step["gate"],
                           final_ops_per_layer=step["ops_per_layer"],
                           final_effort_per_image=step["effort"])
    if "baseline" in result:
        b = result["baseline"]
        summary.update({"dense_ops": b["dense_macs"], "floor_ops": result.get(
            "floor", {}).get("ops"), "final_ops": final_ops})
        if final_ops:
            summary["reduction_vs_dense"] = b["dense_macs"] / final_ops
            summary["reduction_vs_dense_whole_net"] = \
                (b["dense_macs"] + b["other_macs"]) / (final_ops + b["other_macs"])
            if summary["floor_ops"]:
                summary["reduction_vs_floor"] = summary["floor_ops"] / final_ops
    checks = result.get("holdout", {}).get("checks") or []
    if checks and not result["interrupted"]:
        last = checks[-1]
        summary["holdout"] = {x: last[x] for x in ("loss", "se", "ci_low", "ci_high", "ucb",
                                                   "n_rw", "n_wr", "ops", "acc0", "acc")}
    result["summary"] = summary
    result["n_evaluations"] = len(evals)
    result["elapsed_s"] = round(time.time() - t_start, 1)

    if write:
        files = {}
        deploy = _apply_to_param(net_param, final, "--model")
        header = (f"# Tuned by python3 -m dyve.tune (budget {budget} pp, seed {seed}); "
                  "see search.json\n")
        files["deploy"] = os.path.join(out_dir, "tuned_deploy.prototxt")
        if tv_param is not None:
            files["train_val"] = os.path.join(out_dir, "tuned_train_val.prototxt")
        files["json"] = os.path.join(out_dir, "search.json")
        files["md"] = os.path.join(out_dir, "search.md")
        result["files"] = files
        dyve_files.write_atomic(files["deploy"], header + text_format.MessageToString(deploy))
        if tv_param is not None:
            tv = _apply_to_param(tv_param, final, "--train-val")
            dyve_files.write_atomic(files["train_val"], header + text_format.MessageToString(tv))
        dyve_files.write_atomic(files["json"], json.dumps(_jsonable(result), indent=1) + "\n")
        dyve_files.write_atomic(files["md"], markdown_summary(result))
    return result


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else str(value)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj


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


def markdown_summary(result):
    """search.md: the final settings and the key numbers."""
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
              f"- budget {cfg['budget']} pp top-1 at {100 * cfg['confidence']:g} % "
              f"confidence (one-sided UCB, z = {cfg['z']:.3f}); knobs {', '.join(result['knobs'])}",
              f"- {result['n_evaluations']} evaluations in {result['elapsed_s']:.0f} s"]
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


# ============================================================================ CLI

def _knob_list(text):
    items = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in items if k not in KNOBS]
    if bad or not items:
        raise argparse.ArgumentTypeError(
            f"unknown knob(s) {', '.join(bad) or '(none)'}; choose from {','.join(KNOBS)}")
    return tuple(k for k in KNOBS if k in items)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python3 -m dyve.tune",
        description="Tune the per-layer DyVE knob settings of a trained net under a top-1 "
                    "accuracy budget, on calibration images (never the test set). "
                    "Writes tuned_deploy.prototxt, search.json and search.md.")
    parser.add_argument("--model", required=True,
                        help="DyVE deploy prototxt (a stock deploy prototxt is converted "
                             "with every knob off)")
    parser.add_argument("--weights", required=True, help="caffemodel (or Caffe HDF5 snapshot)")
    parser.add_argument("--calib", required=True,
                        help="calibration LMDB, or a folder of <class>/*.jpg|png")
    parser.add_argument("--mean", help="mean.binaryproto, or per-channel values 'b,g,r'")
    parser.add_argument("--budget", type=float, default=0.5,
                        help="accuracy budget, percentage points of top-1 (default %(default)s)")
    parser.add_argument("--knobs", type=_knob_list, default=DEFAULT_KNOBS,
                        help="comma-separated subset of exact,spet,sdss,sfma (default: spet,sdss,sfma; "
                             "exact mode saves MACs but is slower in wall time)")
    parser.add_argument("--seed", type=int, default=1701, help="default %(default)s")
    parser.add_argument("--holdout", type=float, default=0.3,
                        help="fraction of the calibration images held back to confirm "
                             "the final choice (default %(default)s)")
    parser.add_argument("--confidence", type=float, default=0.95,
                        help="one-sided confidence of the loss bound (default %(default)s)")
    parser.add_argument("--batch", type=int, default=100, help="default %(default)s")
    parser.add_argument("--max-images", type=int,
                        help="use at most this many calibration images")
    parser.add_argument("--sweep-images", type=int,
                        help="sensitivity sweep on the first N search images only "
                             "(default: all search images)")
    parser.add_argument("--patience", type=int, default=1,
                        help="retire a track after this many refused greedy candidates in a "
                             "row; 0 = never (default %(default)s)")
    parser.add_argument("--cache-mb", type=int, default=2048,
                        help="memory for cached layer inputs (default %(default)s)")
    parser.add_argument("--out-dir", help="output folder (default reports/<net-name>/tune)")
    parser.add_argument("--train-val", help="train_val prototxt to emit a tuned copy of")
    parser.add_argument("--bank-gains", action="store_true",
                        help="let the search accept on the plain UCB (loss + z*SE), banking "
                             "measured accuracy gains; default: loss clamped at 0")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    def terminate(signum, frame):  # a kill (SIGTERM) stops cleanly, as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    if args.budget < 0:
        parser.error(f"--budget must be >= 0 percentage points, got {args.budget:g}")
    try:
        result = tune(args.model, args.weights, args.calib, mean=args.mean,
                      budget=args.budget, knobs=args.knobs, seed=args.seed,
                      holdout=args.holdout, confidence=args.confidence, batch=args.batch,
                      max_images=args.max_images, out_dir=args.out_dir,
                      train_val=args.train_val, patience=args.patience,
                      sweep_images=args.sweep_images, cache_mb=args.cache_mb,
                      bank_gains=args.bank_gains, progress=not args.quiet)
    except TuneError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown_summary(result))
    print(f"wrote {', '.join(result['files'].values())}", file=sys.stderr)
    return 130 if result["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
