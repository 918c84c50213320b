"""Numpy reference ("oracle") of the DyVE layers, also usable as Caffe Python layers.

The semantics and the effort counters follow docs/knobs.md exactly; the C++ layers must
match this module output for output (up to float rounding) and counter for counter.
The code is deliberately plain: it loops over image, group, output channel and position
and evaluates one neuron at a time, in float64. It is a reference, not fast.

Pure functions (usable without a net):
    conv_forward(x, W, b, geometry, settings) -> (top, effort)
    ip_forward(x, W, b, settings, transpose=False) -> (top, effort)

Caffe Python layers (`type: "Python"`, `python_param { module: "dyve.pylayers"
layer: "DyveConvolution" param_str: '<json>' }`): DyveConvolution, DyveInnerProduct.
param_str holds the knob settings (dyve.settings format) plus the geometry that the stock
layer takes from convolution_param / inner_product_param. The layers are inference-only:
backward always raises NotImplementedError.
"""
import json
import math

import caffe
import numpy as np

from dyve import effort as dyve_effort
from dyve import ladders
from dyve import settings as dyve_settings

# The counter table of docs/knobs.md, in DyveEffort's order.
EFFORT_KEYS = dyve_effort.COUNTERS

# Geometry keys of param_str and their defaults (None: required), as in caffe.proto.
CONV_GEOMETRY = {"num_output": None, "kernel_size": None, "stride": 1, "pad": 0,
                 "dilation": 1, "group": 1, "bias_term": True}
IP_GEOMETRY = {"num_output": None, "bias_term": True, "transpose": False}


def new_effort():
    """A counter dict with every counter of docs/knobs.md at 0."""
    return dyve_effort.zero()


def _as_float32(value):
    # Thresholds and the fraction are float fields of the proto, so the C++ layer sees
    # them rounded to float32 (e.g. 0.1 -> 0.100000001...); use the same values here.
    return float(np.float32(value))


# ---------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------

def _positive_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _pair(name, value, minimum):
    """An int or [h, w] geometry value as a validated (h, w) tuple."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an integer or [h, w], got {value!r}")
        return tuple(_positive_int(name, v, minimum) for v in value)
    value = _positive_int(name, value, minimum)
    return value, value


def conv_geometry(geometry):
    """Validate a convolution geometry dict and fill its defaults.

    Keys: num_output, kernel_size (required), stride, pad, dilation (int or [h, w]),
    group, bias_term. Returns the same keys with kernel_size, stride, pad and dilation
    as (h, w) tuples.
    """
    unknown = sorted(set(geometry) - set(CONV_GEOMETRY))
    if unknown:
        raise ValueError(f"unknown convolution geometry key(s): {', '.join(unknown)}")
    geo = dict(CONV_GEOMETRY, **geometry)
    for key in ("num_output", "kernel_size"):
        if geo[key] is None:
            raise ValueError(f"{key} is required")
    out = {
        "num_output": _positive_int("num_output", geo["num_output"], 1),
        "kernel_size": _pair("kernel_size", geo["kernel_size"], 1),
        "stride": _pair("stride", geo["stride"], 1),
        "pad": _pair("pad", geo["pad"], 0),
        "dilation": _pair("dilation", geo["dilation"], 1),
        "group": _positive_int("group", geo["group"], 1),
        "bias_term": geo["bias_term"],
    }
    if not isinstance(out["bias_term"], bool):
        raise ValueError(f"bias_term must be true or false, got {out['bias_term']!r}")
    if out["num_output"] % out["group"]:
        raise ValueError(f"num_output {out['num_output']} is not divisible by group {out['group']}")
    return out


def conv_output_shape(height, width, geo):
    """Output (H_out, W_out) as Caffe computes it: (H + 2p - (d(k-1)+1)) / s + 1."""
    sizes = []
    for size, k, s, p, d in zip((height, width), geo["kernel_size"], geo["stride"],
                                geo["pad"], geo["dilation"]):
        extent = d * (k - 1) + 1
        if size + 2 * p < extent:
            raise ValueError(f"kernel extent {extent} exceeds the padded input {size + 2 * p}")
        sizes.append((size + 2 * p - extent) // s + 1)
    return tuple(sizes)


def _im2col(x_group, geo, out_h, out_w):
    """Patches of one image and group: [H_out, W_out, C_g * KK], tap index c*KK + ky*kw + kx.

    Taps in the zero padding are 0 (they are still MACs of the dense layer).
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (geo["kernel_size"], geo["stride"],
                                              geo["pad"], geo["dilation"])
    padded = np.pad(x_group, ((0, 0), (ph, ph), (pw, pw)))
    cols = np.empty((out_h, out_w, x_group.shape[0], kh, kw))
    for ky in range(kh):
        for kx in range(kw):
            window = padded[:, ky * dh: ky * dh + sh * (out_h - 1) + 1: sh,
                            kx * dw: kx * dw + sw * (out_w - 1) + 1: sw]
            cols[:, :, :, ky, kx] = window.transpose(1, 2, 0)
    return cols.reshape(out_h, out_w, -1)


def _inside_taps(out_len, in_len, k, s, p, d):
    """Per output coordinate, the [lo, hi) range of kernel taps that fall inside the input.

    With dilation the inside taps are still contiguous, so in 2-D they form a rectangle.
    An output whose taps all fall into the padding gets the empty range (0, 0).
    """
    ranges = []
    for o in range(out_len):
        inside = [t for t in range(k) if 0 <= o * s - p + t * d < in_len]
        ranges.append((inside[0], inside[-1] + 1) if inside else (0, 0))
    return ranges


# ---------------------------------------------------------------------------------------
# Knob pieces shared by convolution and inner product
# ---------------------------------------------------------------------------------------

def channel_orders(w3, spet):
    """Evaluation order of the input channels for each output of one group.

    w3: weights of the group as [O_g, C_g, KK]. Returns a list of O_g lists of channel
    indices. Without approximate SPET the order is the natural one; otherwise channels are
    sorted by significance (L1 norm of the kernel slice) descending, ties by index
    (Python's sort is stable), per group (PER_LAYER) or per output (PER_OUTPUT); or, with
    INTERLEAVED, the paper's order, not weight-derived: odd-indexed channels first, then
    the even-indexed ones (ladders.interleaved_order), per group.
    """
    n_out, n_chan = w3.shape[:2]
    if not spet["enabled"]:
        return [list(range(n_chan))] * n_out
    if spet["ordering"] == "INTERLEAVED":
        return [[int(c) for c in ladders.interleaved_order(n_chan)]] * n_out
    significance = np.abs(w3).sum(axis=2)                    # s[o][c]
    if spet["ordering"] == "PER_LAYER":
        total = significance.sum(axis=0)
        order = sorted(range(n_chan), key=lambda c: -total[c])
        return [order] * n_out
    return [sorted(range(n_chan), key=lambda c: -significance[o][c]) for o in range(n_out)]


def prefix_size(fraction, n_chan):
    """P = ceil(f * C_g - 1e-6), at least 1."""
    return max(1, math.ceil(_as_float32(fraction) * n_chan - 1e-6))


def _taps(channels, kk):
    return np.array([c * kk + t for c in channels for t in range(kk)], dtype=np.int64)


def _neuron_plan(w, order, n_prefix, constant, kk, spet):
    """Which taps a neuron of this output channel evaluates, and in which order.

    w: the output's flat weights [C_g * KK]; order: its channel order; constant: bool per
    channel (SFMA maps, never evaluated). Returns a dict with 'prefix' (None without
    approximate SPET), 'rest', with the BOUND gate 'bound' (per live rest channel, its taps
    and Pw = the sum of its positive weights), and in exact mode 'pos' and 'neg_chunks'.
    """
    live = [c for c in order if not constant[c]]
    if spet["enabled"]:
        prefix_channels = set(order[:n_prefix])
        rest_channels = [c for c in live if c not in prefix_channels]
        plan = {"prefix": _taps([c for c in live if c in prefix_channels], kk),
                "rest": _taps(rest_channels, kk)}
        if spet["gate"] == "BOUND":
            plan["bound"] = []
            for c in rest_channels:
                taps = _taps([c], kk)
                plan["bound"].append((taps, float(np.maximum(w[taps], 0).sum())))
    else:
        plan = {"prefix": None, "rest": _taps(live, kk)}
    if spet["exact"]:
        rest = plan["rest"]
        neg = rest[w[rest] < 0]
        # Most negative weight first, so the sum falls below 0 as early as possible.
        neg = neg[np.argsort(w[neg], kind="stable")]
        plan["pos"] = rest[w[rest] >= 0]
        step = spet["check_interval"]
        plan["neg_chunks"] = [neg[i:i + step] for i in range(0, len(neg), step)]
    return plan


def _evaluate_neuron(xcol, w, plan, z, st, effort):
    """One computed neuron (docs/knobs.md, Neuron evaluation). z: bias + SFMA term."""
    spet = st["spet"]
    if plan["prefix"] is not None:
        prefix = plan["prefix"]
        z += float(np.dot(xcol[prefix], w[prefix]))
        effort["macs_executed"] += len(prefix)
        effort["ops_spet"] += 1
        z_gate = z
        if spet["gate"] == "BOUND":
            # U = sum over the live rest channels of Pw * (max of the channel's taps here):
            # with inputs >= 0 the rest adds at most U (docs/knobs.md, The BOUND gate).
            bound = 0.0
            for taps, positive_weight in plan["bound"]:
                bound += positive_weight * float(xcol[taps].max())
            effort["ops_spet"] += len(plan["bound"])
            z_gate = z + _as_float32(spet["bound_scale"]) * bound
        if z_gate < _as_float32(spet["threshold"]):
            effort["spet_zeroed"] += 1
            effort["macs_skipped_spet"] += len(plan["rest"])
            return 0.0
    if spet["exact"]:
        pos = plan["pos"]
        z += float(np.dot(xcol[pos], w[pos]))
        effort["macs_executed"] += len(pos)
        chunks = plan["neg_chunks"]
        for i, chunk in enumerate(chunks):
            effort["ops_exact"] += 1
            if z < 0:
                # Inputs are >= 0 and the remaining weights < 0: z can only fall further.
                effort["exact_stopped"] += 1
                effort["macs_skipped_exact"] += sum(len(c) for c in chunks[i:])
                return 0.0
            z += float(np.dot(xcol[chunk], w[chunk]))
            effort["macs_executed"] += len(chunk)
    else:
        rest = plan["rest"]
        z += float(np.dot(xcol[rest], w[rest]))
        effort["macs_executed"] += len(rest)
    return max(z, 0.0) if st["relu"] else z


def _check_exact_input(x, st):
    if st["spet"]["exact"] and x.size and x.min() < 0:
        raise ValueError(f"spet.exact requires a non-negative bottom (inputs after a ReLU), "
                         f"found {x.min():g}")


def _count_dense(effort, num, n_outputs, fan_in):
    effort["forward_passes"] += 1
    effort["images"] += num
    effort["outputs"] += n_outputs
    effort["macs_dense"] += n_outputs * fan_in


# ---------------------------------------------------------------------------------------
# Convolution
# ---------------------------------------------------------------------------------------

def sfma_kernel_allowed(W, group, sfma):
    """SFMA's weight-time table: per input channel (all groups), whether its kernel may be
    replaced: max over the outputs o of its group of sum_taps |W[o, c, tap]| <=
    kernel_threshold. All True with the default inf."""
    n_out, c_g = W.shape[:2]
    threshold = _as_float32(sfma["kernel_threshold"])
    if math.isinf(threshold):
        return np.ones(group * c_g, dtype=bool)
    o_g = n_out // group
    sums = np.abs(W).reshape(n_out, c_g, -1).sum(axis=2)          # [O, C_g]
    largest = sums.reshape(group, o_g, c_g).max(axis=1)           # [group, C_g]
    return (largest <= threshold).reshape(group * c_g)


def _sfma_constant_maps(x_image, sfma, allowed, effort):
    """SFMA step 1-2 for one image: (constant flag, mean) per input channel; `allowed`
    is sfma_kernel_allowed's table."""
    n_chan, height, width = x_image.shape
    threshold = _as_float32(sfma["threshold"])
    constant = np.zeros(n_chan, dtype=bool)
    means = np.zeros(n_chan)
    for c in range(n_chan):
        values = x_image[c]
        means[c] = values.mean()
        if sfma["spread"] == "RANGE":
            spread = values.max() - values.min()
        elif sfma["spread"] == "STD":
            spread = values.std()
        else:                                   # VARIANCE: population variance
            spread = values.var()
        constant[c] = spread <= threshold and allowed[c]
    effort["ops_sfma"] += n_chan * (3 * height * width + 1)
    effort["sfma_maps"] += int(constant.sum())
    return constant, means


def _sdss_neighbours(y, x, stride, out_h, out_w):
    """Grid neighbours of a non-grid position, in the order (y0,x0), (y0,x1), (y1,x0), (y1,x1)."""
    def coords(v, limit):
        v0 = stride * (v // stride)
        return [v0, v0 + stride] if v % stride and v0 + stride < limit else [v0]
    return [(ny, nx) for ny in coords(y, out_h) for nx in coords(x, out_w)]


def _output_map(compute, out_h, out_w, sdss, fan_in, effort):
    """One output map of one image: grid positions first, then SDSS for the others.

    compute(y, x) evaluates the neuron at (y, x). Without SDSS every position is a grid
    position (stride 1).
    """
    stride = sdss["stride"] if sdss["enabled"] else 1
    threshold = _as_float32(sdss["threshold"])
    range_threshold = _as_float32(sdss["range_threshold"])
    check_range = not math.isinf(range_threshold)
    out = np.zeros((out_h, out_w))
    for y in range(0, out_h, stride):
        for x in range(0, out_w, stride):
            out[y, x] = compute(y, x)
    if stride == 1:
        return out
    for y in range(out_h):
        for x in range(out_w):
            if y % stride == 0 and x % stride == 0:
                continue
            neighbours = _sdss_neighbours(y, x, stride, out_h, out_w)
            significant = False
            for ny, nx in neighbours:
                effort["ops_sdss"] += 1
                if out[ny, nx] > threshold:
                    significant = True
                    break
            if not significant and check_range:
                # The paper's second test: max and min over the neighbours, the
                # subtraction and the compare.
                effort["ops_sdss"] += 2 * len(neighbours)
                values = [out[ny, nx] for ny, nx in neighbours]
                significant = max(values) - min(values) > range_threshold
            if significant:
                out[y, x] = compute(y, x)
                continue
            effort["sdss_filled"] += 1
            effort["macs_skipped_sdss"] += fan_in
            if sdss["fill"] == "MEAN":
                out[y, x] = np.mean([out[ny, nx] for ny, nx in neighbours])
                effort["ops_sdss"] += len(neighbours)
            # ZERO fill: out[y, x] stays 0.
    return out


def conv_forward(x, W, b, geometry, settings):
    """DyVE convolution of a batch, following docs/knobs.md.

    x: [N, C, H, W]; W: [O, C/group, kh, kw]; b: [O] or None (no bias).
    geometry: dict of stride, pad, dilation (int or [h, w]) and group; num_output,
    kernel_size and bias_term may be omitted (taken from W and b) and must agree if given.
    settings: knob settings (dyve.settings format, defaults filled in).
    Returns (top [N, O, H_out, W_out] float64, effort dict of this call).
    """
    st = dyve_settings.normalize(settings)
    x = np.asarray(x, dtype=np.float64)
    W = np.asarray(W, dtype=np.float64)
    b = None if b is None else np.asarray(b, dtype=np.float64)
    if x.ndim != 4 or W.ndim != 4:
        raise ValueError(f"convolution needs a 4-D bottom and weights, got {x.shape} and {W.shape}")
    geo = dict(geometry or {})
    geo.setdefault("num_output", W.shape[0])
    geo.setdefault("kernel_size", list(W.shape[2:]))
    geo.setdefault("bias_term", b is not None)
    geo = conv_geometry(geo)

    num, channels, height, width = x.shape
    group, n_out = geo["group"], geo["num_output"]
    if channels % group:
        raise ValueError(f"bottom channels {channels} are not divisible by group {group}")
    c_g, o_g = channels // group, n_out // group
    kh, kw = geo["kernel_size"]
    kk = kh * kw
    fan_in = c_g * kk
    if W.shape != (n_out, c_g, kh, kw):
        raise ValueError(f"weights have shape {W.shape}, expected {(n_out, c_g, kh, kw)}")
    if (b is not None) != geo["bias_term"]:
        raise ValueError(f"bias_term is {geo['bias_term']} but the bias is "
                         f"{'absent' if b is None else 'given'}")
    if b is not None and b.shape != (n_out,):
        raise ValueError(f"bias has shape {b.shape}, expected {(n_out,)}")
    out_h, out_w = conv_output_shape(height, width, geo)
    if st["sdss"]["enabled"] and out_h == 1 and out_w == 1:
        raise ValueError("sdss cannot be used on a 1x1 output map")
    _check_exact_input(x, st)

    effort = new_effort()
    _count_dense(effort, num, num * n_out * out_h * out_w, fan_in)
    top = np.zeros((num, n_out, out_h, out_w))
    orders = [channel_orders(W[g * o_g:(g + 1) * o_g].reshape(o_g, c_g, kk), st["spet"])
              for g in range(group)]
    n_prefix = prefix_size(st["spet"]["fraction"], c_g)
    # In-bounds tap ranges per output row / column, for the SFMA border correction.
    row_taps = _inside_taps(out_h, height, kh, geo["stride"][0], geo["pad"][0], geo["dilation"][0])
    col_taps = _inside_taps(out_w, width, kw, geo["stride"][1], geo["pad"][1], geo["dilation"][1])

    allowed = sfma_kernel_allowed(W, group, st["sfma"])

    for n in range(num):
        constant, means = np.zeros(channels, dtype=bool), np.zeros(channels)
        if st["sfma"]["enabled"]:
            constant, means = _sfma_constant_maps(x[n], st["sfma"], allowed, effort)
        for g in range(group):
            c0 = g * c_g
            patches = _im2col(x[n, c0:c0 + c_g], geo, out_h, out_w)
            const_g, means_g = constant[c0:c0 + c_g], means[c0:c0 + c_g]
            n_const = int(const_g.sum())
            if n_const:
                effort["ops_sfma"] += o_g * (n_const * kk + kk)
            rows = set()            # positions of this image and group with a computed neuron
            for o_local in range(o_g):
                o = g * o_g + o_local
                w = W[o].reshape(fan_in)
                plan = _neuron_plan(w, orders[g][o_local], n_prefix, const_g, kk, st["spet"])
                # Summed kernel of the constant maps: Ks[tap] = sum_c mu_c * W[o, c, tap].
                summed_kernel = np.tensordot(means_g * const_g, W[o], axes=1)
                bias = 0.0 if b is None else float(b[o])

                # Called only within this iteration, so the closure sees this o's values.
                def compute(y, x_):
                    rows.add((y, x_))
                    z = bias
                    if n_const:
                        (ky0, ky1), (kx0, kx1) = row_taps[y], col_taps[x_]
                        z += float(summed_kernel[ky0:ky1, kx0:kx1].sum())
                        border = (ky0, ky1) != (0, kh) or (kx0, kx1) != (0, kw)
                        effort["ops_sfma"] += 4 if border else 1
                        effort["macs_skipped_sfma"] += n_const * kk
                    return _evaluate_neuron(patches[y, x_], w, plan, z, st, effort)

                top[n, o] = _output_map(compute, out_h, out_w, st["sdss"], fan_in, effort)
            if st["spet"]["enabled"] and st["spet"]["gate"] == "BOUND":
                # Per row, the maxima of the live rest channels: R = their taps (L - Lp).
                # PER_LAYER, INTERLEAVED: every output of the group has the same rest (the
                # last plan's).
                effort["ops_spet"] += len(rows) * len(plan["rest"])
    return top, effort


# ---------------------------------------------------------------------------------------
# Inner product
# ---------------------------------------------------------------------------------------

def _check_ip_settings(st):
    for knob in ("sdss", "sfma"):
        if st[knob]["enabled"]:
            raise ValueError(f"{knob} is for convolution layers only")
    if st["spet"]["gate"] == "BOUND":
        raise ValueError("spet.gate BOUND is for convolution layers only")


def ip_forward(x, W, b, settings, transpose=False):
    """DyVE inner product of a batch, following docs/knobs.md (C_g = K, KK = 1).

    x: [N, ...] (flattened from axis 1 to K inputs); W: [O, K], or [K, O] with transpose;
    b: [O] or None. Returns (top [N, O] float64, effort dict of this call).
    """
    st = dyve_settings.normalize(settings)
    _check_ip_settings(st)
    x = np.asarray(x, dtype=np.float64)
    x = x.reshape(x.shape[0], -1)
    W = np.asarray(W, dtype=np.float64)
    W = W.T if transpose else W
    num, k = x.shape
    n_out = W.shape[0]
    if W.ndim != 2 or W.shape[1] != k:
        raise ValueError(f"weights (as [O, K]) have shape {W.shape}, the bottom has K = {k}")
    if b is not None and np.shape(b) != (n_out,):
        raise ValueError(f"bias has shape {np.shape(b)}, expected {(n_out,)}")
    _check_exact_input(x, st)

    effort = new_effort()
    _count_dense(effort, num, num * n_out, k)
    top = np.zeros((num, n_out))
    orders = channel_orders(W.reshape(n_out, k, 1), st["spet"])
    n_prefix = prefix_size(st["spet"]["fraction"], k)
    no_constant = np.zeros(k, dtype=bool)
    plans = [_neuron_plan(W[o], orders[o], n_prefix, no_constant, 1, st["spet"])
             for o in range(n_out)]
    for n in range(num):
        for o in range(n_out):
            bias = 0.0 if b is None else float(b[o])
            top[n, o] = _evaluate_neuron(x[n], W[o], plans[o], bias, st, effort)
    return top, effort


# ---------------------------------------------------------------------------------------
# Caffe Python layers
# ---------------------------------------------------------------------------------------

class _DyveLayer(caffe.Layer):
    """Common part: param_str parsing, error messages, counters, no backward."""

    GEOMETRY = {}

    def _error(self, message):
        # pycaffe gives a Python layer no access to its name; the class and param_str
        # identify it (Caffe's log names the layer being created just before).
        return ValueError(f"{type(self).__name__} (param_str {self.param_str!r}): {message}")

    def _parse_param_str(self):
        """Split param_str into (geometry dict, normalized settings)."""
        try:
            params = json.loads(self.param_str) if self.param_str.strip() else {}
        except json.JSONDecodeError as err:
            raise self._error(f"param_str is not valid JSON: {err}") from None
        if not isinstance(params, dict):
            raise self._error("param_str must be a JSON object")
        geometry = {k: v for k, v in params.items() if k in self.GEOMETRY}
        knobs = {k: v for k, v in params.items() if k not in self.GEOMETRY}
        try:
            return geometry, dyve_settings.normalize(knobs)
        except ValueError as err:
            raise self._error(str(err)) from None

    def _check_counts(self, bottom, top):
        if len(bottom) != 1 or len(top) != 1:
            raise self._error(f"needs exactly one bottom and one top, "
                              f"got {len(bottom)} and {len(top)}")

    def _fill_blobs(self, weight_shape, fan_in):
        """Seeded random weights (He scale) and zero bias; a loaded model overwrites them."""
        rng = np.random.RandomState(1704)
        self.blobs.add_blob(*weight_shape)
        self.blobs[0].data[...] = rng.standard_normal(weight_shape) * math.sqrt(2.0 / fan_in)
        if self.geometry["bias_term"]:
            self.blobs.add_blob(self.geometry["num_output"])
            self.blobs[1].data[...] = 0

    def _bias(self):
        return self.blobs[1].data if self.geometry["bias_term"] else None

    def reset_effort(self):
        """Set every counter back to 0."""
        self.effort = new_effort()

    def _accumulate(self, effort):
        for key in EFFORT_KEYS:
            self.effort[key] += effort[key]

    def backward(self, top, propagate_down, bottom):
        raise NotImplementedError(
            f"{type(self).__name__} is the inference-only numpy oracle of the DyVE layers; "
            f"backward is not implemented (train with the stock layer)")


class DyveConvolution(_DyveLayer):
    """Convolution with the DyVE knobs (and optional fused ReLU)."""

    GEOMETRY = CONV_GEOMETRY

    def setup(self, bottom, top):
        self._check_counts(bottom, top)
        geometry, self.settings = self._parse_param_str()
        try:
            self.geometry = conv_geometry(geometry)
        except ValueError as err:
            raise self._error(str(err)) from None
        if len(bottom[0].shape) != 4:
            raise self._error(f"bottom must be 4-D, got shape {tuple(bottom[0].shape)}")
        channels, group = bottom[0].shape[1], self.geometry["group"]
        if channels % group:
            raise self._error(f"bottom channels {channels} are not divisible by group {group}")
        kh, kw = self.geometry["kernel_size"]
        shape = (self.geometry["num_output"], channels // group, kh, kw)
        self._fill_blobs(shape, shape[1] * kh * kw)
        self.reset_effort()

    def reshape(self, bottom, top):
        num, channels, height, width = bottom[0].shape
        if channels != self.blobs[0].shape[1] * self.geometry["group"]:
            raise self._error(f"bottom has {channels} channels, the weights expect "
                              f"{self.blobs[0].shape[1] * self.geometry['group']}")
        try:
            out_h, out_w = conv_output_shape(height, width, self.geometry)
        except ValueError as err:
            raise self._error(str(err)) from None
        if self.settings["sdss"]["enabled"] and out_h == 1 and out_w == 1:
            raise self._error("sdss cannot be used on a 1x1 output map")
        top[0].reshape(num, self.geometry["num_output"], out_h, out_w)

    def forward(self, bottom, top):
        try:
            out, effort = conv_forward(bottom[0].data, self.blobs[0].data, self._bias(),
                                       self.geometry, self.settings)
        except ValueError as err:
            raise self._error(str(err)) from None
        top[0].data[...] = out
        self._accumulate(effort)


class DyveInnerProduct(_DyveLayer):
    """Inner product with the DyVE knobs (SPET only; SDSS and SFMA are refused)."""

    GEOMETRY = IP_GEOMETRY

    def setup(self, bottom, top):
        self._check_counts(bottom, top)
        geometry, self.settings = self._parse_param_str()
        geo = dict(IP_GEOMETRY, **geometry)
        try:
            if geo["num_output"] is None:
                raise ValueError("num_output is required")
            _positive_int("num_output", geo["num_output"], 1)
            for key in ("bias_term", "transpose"):
                if not isinstance(geo[key], bool):
                    raise ValueError(f"{key} must be true or false, got {geo[key]!r}")
            _check_ip_settings(self.settings)
        except ValueError as err:
            raise self._error(str(err)) from None
        self.geometry = geo
        k = int(np.prod(bottom[0].shape[1:]))
        n_out = geo["num_output"]
        self._fill_blobs((k, n_out) if geo["transpose"] else (n_out, k), k)
        self.reset_effort()

    def reshape(self, bottom, top):
        k = int(np.prod(bottom[0].shape[1:]))
        expected = self.blobs[0].shape[0 if self.geometry["transpose"] else 1]
        if k != expected:
            raise self._error(f"bottom has {k} inputs per item, the weights expect {expected}")
        top[0].reshape(bottom[0].shape[0], self.geometry["num_output"])

    def forward(self, bottom, top):
        try:
            out, effort = ip_forward(bottom[0].data, self.blobs[0].data, self._bias(),
                                     self.settings, self.geometry["transpose"])
        except ValueError as err:
            raise self._error(str(err)) from None
        top[0].data[...] = out
        self._accumulate(effort)
