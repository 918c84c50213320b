"""Export a stock Caffe net to ONNX (``python3 -m dyve.export_onnx``).

    python3 -m dyve.export_onnx --model prototxt/cifar10_quick_deploy.prototxt \\
        --weights models/cifar10_quick.caffemodel --out cifar10_quick.onnx

The deploy prototxt and the caffemodel are read here, with pycaffe (so the weights load
exactly as Caffe loads them: V1 and HDF5 models, legacy blob shapes, the same checks as
dyve.tune and dyve.bench). Each TEST-phase layer becomes ONNX nodes (:func:`convert`),
written as plain numpy arrays and a node list; the `onnx` package, which needs a protobuf
newer than pycaffe's, then builds, checks and writes the model in its own virtual
environment (build/onnx-venv, ``make onnx-venv``; :mod:`dyve.onnx_worker`). The .onnx is
written atomically (temporary file + rename). The same worker runs ONNX Runtime for
dyve.bench and the tests (:class:`OrtRunner`).

How Caffe's layers map (opset 17; docs/bench.md has the checks):

* tensor names are Caffe's blob names; an in-place top (ReLU, Dropout, BatchNorm, Scale
  writing its bottom) needs a fresh name in ONNX: every version of a blob but the last
  is called ``<blob>/<layer that wrote it>``, so the final one, the one pycaffe's
  ``net.blobs`` holds, keeps the blob's name;
* the batch dimension is symbolic (``batch``) unless ``--batch`` fixes it;
* Pooling: Caffe's output size (ceil by default, ``round_mode: FLOOR``, and the clip of
  a last window that would start in the padding) is computed here and matched by
  ``ceil_mode`` 1 or 0; AVE divides by the window clipped to the padded input, which is
  ``count_include_pad=1`` when no window reaches past the padding and
  ``count_include_pad=0`` otherwise (after an explicit zero ``Pad`` when there is
  padding); MAX ignores padding in both;
* LRN ACROSS_CHANNELS is ONNX LRN; WITHIN_CHANNEL, which ONNX lacks, is Caffe's own
  formula: x * (1 + alpha * avgpool(x * x))^-beta, the average over local_size x
  local_size with padding (local_size - 1) / 2 counted (Caffe builds it from Power,
  Pooling AVE, Power and Eltwise PROD layers, and ignores k there);
* InnerProduct is Flatten + Gemm; BatchNorm (global statistics) is BatchNormalization
  with Caffe's scale factor folded into mean and variance; Scale is Mul (+ Add); Power
  is Mul, Add, Pow in Caffe's order, or a constant where Caffe fills one (scale 0).

A layer type without an ONNX form here (the DyVE layers, Python layers, ...) is refused
with an error naming the layer and its type; nothing is dropped silently.
"""
import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np

os.environ.setdefault("GLOG_minloglevel", "2")  # before Caffe loads: no net-init log

from dyve import files  # noqa: E402
from dyve.errors import DyveError, InputError  # noqa: E402
from dyve.settings import DYVE_TYPES  # noqa: E402
from dyve.tools import BUILD_DIR, REPO_ROOT  # noqa: E402

OPSET = 17
ONNX_VENV = os.environ.get("DYVE_ONNX_VENV", os.path.join(BUILD_DIR, "onnx-venv"))
BATCH_DIM = "batch"
SUPPORTED_TYPES = ("Input", "Convolution", "InnerProduct", "ReLU", "Sigmoid", "TanH",
                   "Pooling", "LRN", "Softmax", "Dropout", "Eltwise", "BatchNorm", "Scale",
                   "Concat", "Flatten", "Split", "Power")


class ExportError(DyveError):
    """A net that cannot be exported, or a failed export step."""


# ----------------------------------------------------------------------------- layers

def _state_meets_rule(rule, phase):
    """Caffe's Net::StateMeetsRule for a TEST-phase state at level 0 with no stages."""
    if rule.HasField("phase") and rule.phase != phase:
        return False
    if rule.HasField("min_level") and 0 < rule.min_level:
        return False
    if rule.HasField("max_level") and 0 > rule.max_level:
        return False
    return not rule.stage  # no stage of the rule is in the (empty) state


def test_layers(param):
    """The layers of a NetParameter that Caffe builds in the TEST phase (include/exclude
    rules), in order."""
    from caffe.proto import caffe_pb2
    phase = caffe_pb2.TEST
    kept = []
    for layer in param.layer:
        if layer.include:
            included = any(_state_meets_rule(r, phase) for r in layer.include)
        else:
            included = not any(_state_meets_rule(r, phase) for r in layer.exclude)
        if included:
            kept.append(layer)
    return kept


def _spatial(repeated, h, w, has_h, has_w, default, what, layer, axes=2):
    """Per-axis values of a Caffe convolution/pooling field: the _h/_w pair when given,
    else the repeated field (one value for every axis, or one per axis), else default."""
    if has_h or has_w:
        if not (has_h and has_w):
            raise ExportError(f"layer '{layer.name}': {what}_h and {what}_w must be given "
                              "together")
        return [int(h), int(w)]
    values = [int(v) for v in repeated]
    if not values:
        return [default] * axes
    if len(values) == 1:
        return values * axes
    if len(values) != axes:
        raise ExportError(f"layer '{layer.name}': {len(values)} values of {what} for "
                          f"{axes} spatial axes")
    return values


class Graph:
    """ONNX nodes, initializers and tensor names of a Caffe net being converted."""

    def __init__(self, writes):
        self.nodes = []
        self.arrays = {}
        self.shapes = {}  # ONNX tensor -> Caffe blob shape without the batch dimension
        self.current = {}  # Caffe blob -> ONNX tensor holding its current version
        self.used = set()
        self.writes = writes  # Caffe blob -> [layers writing it, in order]

    def unique(self, name):
        base, i = name, 1
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name

    def top_name(self, blob, layer_name):
        """The ONNX name of `blob` as written by `layer_name`: the blob's own name for its
        last writer, ``<blob>/<layer>`` for the earlier (in-place) ones."""
        last = self.writes[blob][-1] == layer_name
        return self.unique(blob if last else f"{blob}/{layer_name}")

    def bottom(self, blob, layer):
        if blob not in self.current:
            raise ExportError(f"layer '{layer.name}' ({layer.type}) reads blob '{blob}', "
                              "which no earlier layer produces")
        return self.current[blob]

    def const(self, name, array, dtype=np.float32):
        name = self.unique(name)
        self.arrays[name] = np.ascontiguousarray(np.array(array, dtype=dtype))
        return name

    def tmp(self, name):
        return self.unique(name)

    def node(self, op, inputs, outputs, name, **attrs):
        self.nodes.append({"op": op, "inputs": list(inputs), "outputs": list(outputs),
                           "name": self.unique(f"node:{name}"), "attrs": attrs})


def _params(net, layer, count=None):
    if layer.name not in net.params:
        raise ExportError(f"layer '{layer.name}' ({layer.type}) has no parameter blobs")
    blobs = [np.array(b.data, np.float32, copy=True) for b in net.params[layer.name]]
    if count is not None and len(blobs) < count:
        raise ExportError(f"layer '{layer.name}' ({layer.type}) has {len(blobs)} parameter "
                          f"blobs, expected {count}")
    return blobs


def _one_io(layer):
    if len(layer.bottom) != 1 or len(layer.top) != 1:
        raise ExportError(f"layer '{layer.name}' ({layer.type}): only one bottom and one "
                          f"top are supported, it has {len(layer.bottom)} and "
                          f"{len(layer.top)}")


def _convolution(g, layer, net, shapes, x, y):
    _one_io(layer)
    p = layer.convolution_param
    if p.axis != 1:
        raise ExportError(f"layer '{layer.name}' (Convolution): axis {p.axis} is not "
                          "supported (only 1)")
    if len(shapes[layer.bottom[0]]) != 4:
        raise ExportError(f"layer '{layer.name}' (Convolution): only 2-d convolutions "
                          f"(N x C x H x W) are supported")
    kernel = _spatial(p.kernel_size, p.kernel_h, p.kernel_w, p.HasField("kernel_h"),
                      p.HasField("kernel_w"), None, "kernel", layer)
    if None in kernel:
        raise ExportError(f"layer '{layer.name}' (Convolution): no kernel size")
    pad = _spatial(p.pad, p.pad_h, p.pad_w, p.HasField("pad_h"), p.HasField("pad_w"), 0,
                   "pad", layer)
    stride = _spatial(p.stride, p.stride_h, p.stride_w, p.HasField("stride_h"),
                      p.HasField("stride_w"), 1, "stride", layer)
    dilation = _spatial(p.dilation, 0, 0, False, False, 1, "dilation", layer)
    blobs = _params(net, layer, 2 if p.bias_term else 1)
    inputs = [x[0], g.const(f"{layer.name}/weight", blobs[0])]
    if p.bias_term:
        inputs.append(g.const(f"{layer.name}/bias", blobs[1].reshape(-1)))
    g.node("Conv", inputs, y, layer.name, kernel_shape=kernel, pads=pad + pad,
           strides=stride, dilations=dilation, group=int(p.group))


def _inner_product(g, layer, net, shapes, x, y):
    _one_io(layer)
    p = layer.inner_product_param
    ndim = len(shapes[layer.bottom[0]])
    if p.axis not in (1, 1 - ndim):
        raise ExportError(f"layer '{layer.name}' (InnerProduct): axis {p.axis} is not "
                          "supported (only 1)")
    blobs = _params(net, layer, 2 if p.bias_term else 1)
    a = x[0]
    if ndim != 2:
        a = g.tmp(f"{layer.name}/flat")
        g.node("Flatten", [x[0]], [a], f"{layer.name}/flatten", axis=1)
    inputs = [a, g.const(f"{layer.name}/weight", blobs[0].reshape(blobs[0].shape[-2:]))]
    if p.bias_term:
        inputs.append(g.const(f"{layer.name}/bias", blobs[1].reshape(-1)))
    # Caffe: y = x W^T + b with W N x K; transpose: true stores W as K x N.
    g.node("Gemm", inputs, y, layer.name, transB=0 if p.transpose else 1)


def _relu(g, layer, net, shapes, x, y):
    _one_io(layer)
    slope = float(layer.relu_param.negative_slope)
    if slope:
        g.node("LeakyRelu", x, y, layer.name, alpha=slope)
    else:
        g.node("Relu", x, y, layer.name)


def _elementwise(op):
    def convert(g, layer, net, shapes, x, y):
        _one_io(layer)
        g.node(op, x, y, layer.name)
    return convert


def pooling_output_size(size, kernel, pad, stride, ceil):
    """Caffe's PoolingLayer::Reshape for one axis: ceil (CEIL, the default) or floor of
    (size + 2 pad - kernel) / stride, plus 1; with padding, a last window that would start
    in the padding is dropped."""
    q = float(np.float32(size + 2 * pad - kernel) / np.float32(stride))
    out = int(np.ceil(q) if ceil else np.floor(q)) + 1
    if pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _pooling(g, layer, net, shapes, x, y):
    from caffe.proto import caffe_pb2
    P = caffe_pb2.PoolingParameter
    p = layer.pooling_param
    if len(layer.top) != 1:
        raise ExportError(f"layer '{layer.name}' (Pooling): a second top (the max mask) "
                          "is not supported")
    _one_io(layer)
    shape = shapes[layer.bottom[0]]
    if len(shape) != 4:
        raise ExportError(f"layer '{layer.name}' (Pooling): input is not N x C x H x W")
    if p.pool not in (P.MAX, P.AVE):
        raise ExportError(f"layer '{layer.name}' (Pooling): pool method "
                          f"{P.PoolMethod.Name(p.pool)} has no ONNX form (MAX and AVE do)")
    pad = _spatial([p.pad], p.pad_h, p.pad_w, p.HasField("pad_h"), p.HasField("pad_w"), 0,
                   "pad", layer)
    stride = _spatial([p.stride], p.stride_h, p.stride_w, p.HasField("stride_h"),
                      p.HasField("stride_w"), 1, "stride", layer)
    hw = list(shape[2:])
    if p.global_pooling:
        if any(pad) or stride != [1, 1]:
            raise ExportError(f"layer '{layer.name}' (Pooling): global pooling with "
                              "padding or stride")
        g.node("GlobalMaxPool" if p.pool == P.MAX else "GlobalAveragePool", x, y,
               layer.name)
        return
    kernel = _spatial([p.kernel_size] if p.HasField("kernel_size") else [], p.kernel_h,
                      p.kernel_w, p.HasField("kernel_h"), p.HasField("kernel_w"), None,
                      "kernel", layer)
    if None in kernel:
        raise ExportError(f"layer '{layer.name}' (Pooling): no kernel size")
    ceil = p.round_mode == P.CEIL
    out = [pooling_output_size(s, k, q, t, ceil)
           for s, k, q, t in zip(hw, kernel, pad, stride)]
    for s, k, q, t, o in zip(hw, kernel, pad, stride, out):
        if (o - 1) * t - q >= s:
            raise ExportError(f"layer '{layer.name}' (Pooling): its last window starts "
                              f"past the input (size {s}, kernel {k}, stride {t}, pad {q}); "
                              "Caffe's output there is not defined")
    want = tuple(shapes[layer.top[0]][2:])
    if tuple(out) != want:
        raise ExportError(f"layer '{layer.name}' (Pooling): computed output {out}, Caffe "
                          f"has {list(want)}")
    # ONNX has one ceil_mode for both axes: ceil when an axis needs it. An axis where
    # Caffe then has fewer windows (its clip of a last window starting in the padding,
    # or floor rounding beside a ceil axis) loses the extra last window to a Slice; the
    # windows before it are the same in both rounding modes.
    floor_out = [(s + 2 * q - k) // t + 1 for s, k, q, t in zip(hw, kernel, pad, stride)]
    ceil_mode = int(any(o > f for o, f in zip(out, floor_out)))
    onnx_out = [-(-(s + 2 * q - k) // t) + 1 if ceil_mode else f
                for s, k, q, t, f in zip(hw, kernel, pad, stride, floor_out)]
    sliced = onnx_out != out
    z = [g.tmp(f"{layer.name}/unsliced")] if sliced else y
    common = dict(kernel_shape=kernel, strides=stride, ceil_mode=ceil_mode)
    if p.pool == P.MAX:  # ONNX MaxPool ignores padding, as Caffe does
        g.node("MaxPool", x, z, layer.name, pads=pad + pad, **common)
    else:
        # Caffe's AVE divisor: the window clipped to [-pad, size + pad) (padding counted,
        # the ceil overhang past the padding not).
        overhang = any((o - 1) * t + k > s + 2 * q
                       for s, k, q, t, o in zip(hw, kernel, pad, stride, out))
        if not overhang:
            g.node("AveragePool", x, z, layer.name, pads=pad + pad, count_include_pad=1,
                   **common)
        else:
            a = x[0]
            if any(pad):  # zeros that count, then only the in-tensor part of a window
                a = g.tmp(f"{layer.name}/padded")
                pads = g.const(f"{layer.name}/pads", [0, 0] + pad + [0, 0] + pad, np.int64)
                g.node("Pad", [x[0], pads], [a], f"{layer.name}/pad", mode="constant")
            g.node("AveragePool", [a], z, layer.name, pads=[0, 0, 0, 0],
                   count_include_pad=0, **common)
    if sliced:
        g.node("Slice", [z[0], g.const(f"{layer.name}/starts", [0, 0], np.int64),
                         g.const(f"{layer.name}/ends", out, np.int64),
                         g.const(f"{layer.name}/axes", [2, 3], np.int64)], y,
               f"{layer.name}/slice")


def _lrn(g, layer, net, shapes, x, y):
    from caffe.proto import caffe_pb2
    _one_io(layer)
    p = layer.lrn_param
    size = int(p.local_size)
    if size % 2 == 0:
        raise ExportError(f"layer '{layer.name}' (LRN): local_size {size} is even; Caffe "
                          "supports odd sizes only")
    if p.norm_region == caffe_pb2.LRNParameter.ACROSS_CHANNELS:
        g.node("LRN", x, y, layer.name, size=size, alpha=float(p.alpha),
               beta=float(p.beta), bias=float(p.k))
        return
    # WITHIN_CHANNEL: x * (1 + alpha * mean of x^2 over the size x size window)^-beta,
    # the mean over the padded window (pad (size - 1) / 2, stride 1: every window fits).
    if len(shapes[layer.bottom[0]]) != 4:
        raise ExportError(f"layer '{layer.name}' (LRN): input is not N x C x H x W")
    pad = (size - 1) // 2
    n = layer.name
    sq, avg, scaled, shifted, power = (g.tmp(f"{n}/{s}") for s in
                                       ("square", "pool", "scale", "shift", "power"))
    g.node("Mul", [x[0], x[0]], [sq], f"{n}/square")
    g.node("AveragePool", [sq], [avg], f"{n}/pool", kernel_shape=[size, size],
           pads=[pad] * 4, strides=[1, 1], count_include_pad=1)
    g.node("Mul", [avg, g.const(f"{n}/alpha", p.alpha)], [scaled], f"{n}/scale")
    g.node("Add", [scaled, g.const(f"{n}/one", 1.0)], [shifted], f"{n}/shift")
    g.node("Pow", [shifted, g.const(f"{n}/minus_beta", -p.beta)], [power], f"{n}/power")
    g.node("Mul", [x[0], power], y, n)


def _power(g, layer, net, shapes, x, y):
    _one_io(layer)
    p = layer.power_param
    power, scale, shift = float(p.power), float(p.scale), float(p.shift)
    n = layer.name
    if power * scale == 0:
        # Caffe fills the top with a constant, whatever the input (even NaN or inf).
        value = 1.0 if power == 0 else float(np.float32(shift) ** np.float32(power))
        shape = g.tmp(f"{n}/shape")
        g.node("Shape", x, [shape], f"{n}/shape")
        g.node("ConstantOfShape", [shape], y, n,
               value={"tensor_float": [value]})
        return
    steps = [("Mul", scale, 1.0), ("Add", shift, 0.0), ("Pow", power, 1.0)]
    steps = [(op, v) for op, v, neutral in steps if v != neutral]
    if not steps:
        g.node("Identity", x, y, n)
        return
    a = x[0]
    for i, (op, v) in enumerate(steps):  # Caffe's order: scale, shift, power
        out = y if i == len(steps) - 1 else [g.tmp(f"{n}/{op.lower()}")]
        g.node(op, [a, g.const(f"{n}/{op.lower()}_value", v)], out, f"{n}/{op.lower()}")
        a = out[0]


def _softmax(g, layer, net, shapes, x, y):
    _one_io(layer)
    # Opset 13+ Softmax normalizes over one axis, as Caffe does.
    g.node("Softmax", x, y, layer.name, axis=int(layer.softmax_param.axis))


def _dropout(g, layer, net, shapes, x, y):
    _one_io(layer)
    g.node("Identity", x, y, layer.name)  # TEST phase: Caffe copies the input


def _split(g, layer, net, shapes, x, y):
    if len(layer.bottom) != 1:
        raise ExportError(f"layer '{layer.name}' (Split) has {len(layer.bottom)} bottoms")
    for i, top in enumerate(y):
        g.node("Identity", x, [top], f"{layer.name}/{i}")


def _eltwise(g, layer, net, shapes, x, y):
    from caffe.proto import caffe_pb2
    E = caffe_pb2.EltwiseParameter
    p = layer.eltwise_param
    if len(layer.top) != 1 or len(x) < 2:
        raise ExportError(f"layer '{layer.name}' (Eltwise) needs two or more bottoms and "
                          "one top")
    if p.operation == E.SUM:
        coeff = list(p.coeff) or [1.0] * len(x)
        if len(coeff) != len(x):
            raise ExportError(f"layer '{layer.name}' (Eltwise): {len(coeff)} coefficients "
                              f"for {len(x)} bottoms")
        terms = []
        for i, (t, c) in enumerate(zip(x, coeff)):
            if c == 1:
                terms.append(t)
                continue
            scaled = g.tmp(f"{layer.name}/term{i}")
            g.node("Mul", [t, g.const(f"{layer.name}/coeff{i}", c)], [scaled],
                   f"{layer.name}/coeff{i}")
            terms.append(scaled)
        g.node("Sum", terms, y, layer.name)
    elif p.operation == E.PROD:
        acc = x[0]
        for i, t in enumerate(x[1:], 1):
            out = y if i == len(x) - 1 else [g.tmp(f"{layer.name}/prod{i}")]
            g.node("Mul", [acc, t], out, f"{layer.name}/prod{i}")
            acc = out[0]
    elif p.operation == E.MAX:
        g.node("Max", x, y, layer.name)
    else:
        raise ExportError(f"layer '{layer.name}' (Eltwise): operation {p.operation}")


def _channel_shape(shape, axis, num_axes, layer):
    """Broadcast shape (without the batch axis) of a Scale/Bias parameter."""
    axis = axis if axis >= 0 else len(shape) + axis
    if axis < 1:
        raise ExportError(f"layer '{layer.name}' ({layer.type}): axis {axis} (the batch "
                          "axis) is not supported")
    end = len(shape) if num_axes == -1 else axis + num_axes
    return list(shape[axis:end]) + [1] * (len(shape) - end)


def _batch_norm(g, layer, net, shapes, x, y):
    _one_io(layer)
    p = layer.batch_norm_param
    if p.HasField("use_global_stats") and not p.use_global_stats:
        raise ExportError(f"layer '{layer.name}' (BatchNorm): use_global_stats: false "
                          "normalizes with each batch's own statistics; only global "
                          "statistics have an ONNX form")
    if len(shapes[layer.bottom[0]]) < 2:
        raise ExportError(f"layer '{layer.name}' (BatchNorm): input has no channel axis")
    mean, var, factor = _params(net, layer, 3)[:3]
    # Caffe: (x - mean * s) / sqrt(var * s + eps), s = 1 / factor (0 when factor is 0).
    f = factor.reshape(-1)[0]
    s = np.float32(0 if f == 0 else 1 / f)
    channels = mean.size
    n = layer.name
    g.node("BatchNormalization",
           [x[0], g.const(f"{n}/scale", np.ones(channels)), g.const(f"{n}/bias",
            np.zeros(channels)), g.const(f"{n}/mean", mean.reshape(-1) * s),
            g.const(f"{n}/var", var.reshape(-1) * s)],
           y, n, epsilon=float(p.eps))


def _scale(g, layer, net, shapes, x, y):
    _one_io(layer)
    p = layer.scale_param
    blobs = _params(net, layer, 2 if p.bias_term else 1)
    bshape = _channel_shape(shapes[layer.bottom[0]], p.axis, p.num_axes, layer)
    n = layer.name
    out = y if not p.bias_term else [g.tmp(f"{n}/scaled")]
    g.node("Mul", [x[0], g.const(f"{n}/scale", blobs[0].reshape(bshape))], out, n)
    if p.bias_term:
        g.node("Add", [out[0], g.const(f"{n}/bias", blobs[1].reshape(bshape))], y,
               f"{n}/bias")


def _concat(g, layer, net, shapes, x, y):
    p = layer.concat_param
    axis = int(p.axis) if p.HasField("axis") or not p.HasField("concat_dim") \
        else int(p.concat_dim)
    if len(layer.top) != 1:
        raise ExportError(f"layer '{layer.name}' (Concat) needs one top")
    if len(x) == 1:
        g.node("Identity", x, y, layer.name)
    else:
        g.node("Concat", x, y, layer.name, axis=axis)


def _flatten(g, layer, net, shapes, x, y):
    _one_io(layer)
    p = layer.flatten_param
    ndim = len(shapes[layer.bottom[0]])
    axis = p.axis if p.axis >= 0 else ndim + p.axis
    end = p.end_axis if p.end_axis >= 0 else ndim + p.end_axis
    if axis < 1:
        raise ExportError(f"layer '{layer.name}' (Flatten): flattening the batch axis is "
                          "not supported")
    if end == ndim - 1:
        g.node("Flatten", x, y, layer.name, axis=int(axis))
        return
    target = [0] + list(shapes[layer.top[0]][1:])  # 0: keep the batch dimension
    g.node("Reshape", [x[0], g.const(f"{layer.name}/shape", target, np.int64)], y,
           layer.name)


CONVERTERS = {
    "Convolution": _convolution, "InnerProduct": _inner_product, "ReLU": _relu,
    "Sigmoid": _elementwise("Sigmoid"), "TanH": _elementwise("Tanh"),
    "Pooling": _pooling, "LRN": _lrn, "Softmax": _softmax, "Dropout": _dropout,
    "Eltwise": _eltwise, "BatchNorm": _batch_norm, "Scale": _scale, "Concat": _concat,
    "Flatten": _flatten, "Split": _split, "Power": _power,
}
assert set(CONVERTERS) | {"Input"} == set(SUPPORTED_TYPES)


def refusal(layer, where=""):
    """The error for a layer type without an ONNX form."""
    msg = (f"{where}layer '{layer.name}' has type '{layer.type}', which has no ONNX form in "
           "dyve.export_onnx")
    if layer.type in DYVE_TYPES:
        msg += (" (a DyVE layer skips work input by input; export the stock deploy "
                "prototxt, e.g. prototxt/<net>_deploy.prototxt, with the same caffemodel)")
    else:
        msg += f" (supported: {', '.join(SUPPORTED_TYPES)})"
    return ExportError(msg)


def convert(param, net, batch=None, extra_outputs=(), where=""):
    """The ONNX graph of a Caffe net, as plain data for dyve.onnx_worker.

    `param`: the NetParameter of the deploy prototxt; `net`: the pycaffe net built from it
    (TEST phase) with its weights; `batch`: a fixed batch size, else symbolic;
    `extra_outputs`: Caffe blobs to expose as graph outputs too (their final version).
    Returns (spec dict, {initializer name: numpy array}).
    """
    layers = test_layers(param)
    for layer in layers:  # refuse before any work, naming every layer that cannot go
        if layer.type not in SUPPORTED_TYPES:
            raise refusal(layer, where)
    shapes = {name: tuple(int(d) for d in blob.data.shape) for name, blob in net.blobs.items()}
    writes = {}
    for layer in layers:
        for top in layer.top:
            writes.setdefault(top, []).append(layer.name)
    g = Graph(writes)
    inputs = []
    for name in list(param.input):  # the old-style net inputs
        g.current[name] = g.unique(name)
        inputs.append(name)
    for layer in layers:
        if layer.type == "Input":
            for top in layer.top:
                g.current[top] = g.top_name(top, layer.name)
                inputs.append(top)
            continue
        for blob in list(layer.bottom) + list(layer.top):
            if blob not in shapes:
                raise ExportError(f"{where}layer '{layer.name}': blob '{blob}' is not in "
                                  "the Caffe net")
        x = [g.bottom(b, layer) for b in layer.bottom]
        y = [g.top_name(t, layer.name) for t in layer.top]
        try:
            CONVERTERS[layer.type](g, layer, net, shapes, x, y)
        except ExportError as error:
            raise ExportError(f"{where}{error}") from None
        for top, name in zip(layer.top, y):
            g.current[top] = name
            g.shapes[name] = shapes[top][1:]
    if not inputs:
        raise ExportError(f"{where}the net has no Input layer (nor net-level input)")
    outputs = list(dict.fromkeys(list(net.outputs) + list(extra_outputs)))
    for name in outputs:
        if name not in g.current:
            raise ExportError(f"{where}blob '{name}' is not produced by the net")
    first = int(batch) if batch else BATCH_DIM
    spec = {
        "opset": OPSET, "name": param.name or "caffe_net",
        "inputs": [{"name": g.current[n], "shape": [first] + list(shapes[n][1:])}
                   for n in inputs],
        "outputs": [{"name": g.current[n], "shape": [first] + list(shapes[n][1:])}
                    for n in outputs],
        "nodes": g.nodes,
        "shapes": g.shapes,
    }
    return spec, g.arrays


# ----------------------------------------------------------------------------- the venv

def venv_python():
    """The Python of build/onnx-venv, or an ExportError saying how to make it."""
    python = os.path.join(ONNX_VENV, "bin", "python")
    if not os.access(python, os.X_OK):
        raise ExportError(f"the ONNX virtual environment {ONNX_VENV} is missing: run "
                          "'make onnx-venv' (it installs onnx and onnxruntime there)")
    return python


def _worker_env(threads=None):
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO_ROOT, "python"),
               PYTHONNOUSERSITE="1")
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    return env


def _run_worker(args, what):
    proc = subprocess.run([venv_python(), "-m", "dyve.onnx_worker", *args],
                          env=_worker_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
        detail = lines[-1] if lines else f"exit {proc.returncode}"
        if detail.startswith("error: "):
            detail = detail[len("error: "):]
        raise ExportError(f"{what}: {detail}")
    return proc.stdout


def write_model(spec, arrays, out, metadata=None):
    """Build, check (onnx.checker, shape inference against Caffe's shapes) and write the
    ONNX model atomically, in the venv. Returns the worker's report (dict)."""
    spec = dict(spec, metadata=metadata or {})
    with tempfile.TemporaryDirectory(prefix="dyve-onnx-") as tmp:
        spec_path = os.path.join(tmp, "graph.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        np.savez(os.path.join(tmp, "arrays.npz"), **arrays)
        out_dir = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(out_dir):
            raise ExportError(f"--out: folder {out_dir} does not exist")
        stdout = _run_worker(["build", spec_path, os.path.join(tmp, "arrays.npz"),
                              os.path.abspath(out)], f"building {out}")
    return json.loads(stdout.strip().splitlines()[-1])


def export_net(param, net, out, batch=None, extra_outputs=(), metadata=None, where=""):
    """Export a loaded pycaffe net (built from `param`) to `out`; returns the report."""
    spec, arrays = convert(param, net, batch, extra_outputs, where)
    return write_model(spec, arrays, out, metadata)


def export(model, weights, out, batch=None):
    """Export the deploy prototxt `model` with the caffemodel `weights` to `out`."""
    from dyve import caffe_io
    param = caffe_io.read_net_param(model, "--model")
    for layer in test_layers(param):  # refuse before building a net (and its weights)
        if layer.type not in SUPPORTED_TYPES:
            raise refusal(layer, f"--model {model}: ")
    net = caffe_io.load_net(model, weights, "--weights", model)
    meta = {"caffe_prototxt": os.path.basename(model),
            "caffe_weights": os.path.basename(weights)}
    return export_net(param, net, out, batch, metadata=meta, where=f"--model {model}: ")


def export_for_bench(stock_path, net, out):
    """dyve.bench's ONNX Runtime engine: export the loaded stock `net` of `stock_path` to
    `out`. Returns (out, None), or (None, reason) when ONNX Runtime cannot run it (no
    venv, a layer without an ONNX form): the report then says why the column is empty
    instead of the benchmark failing."""
    from dyve import caffe_io
    try:
        param = caffe_io.read_net_param(stock_path, "--stock")
        export_net(param, net, out, where=f"--stock {stock_path}: ")
    except ExportError as error:
        return None, str(error)
    return out, None


def output_max_abs_diff(ort_scores, caffe_scores):
    """Largest |ONNX Runtime - Caffe| of two score arrays (inf where a value is NaN in
    only one of them)."""
    a, b = np.asarray(ort_scores, np.float64), np.asarray(caffe_scores, np.float64)
    if a.shape != b.shape:
        raise ExportError(f"ONNX Runtime's output has shape {a.shape}, Caffe's {b.shape}")
    if (np.isnan(a) != np.isnan(b)).any():
        return float("inf")
    d = np.abs(np.nan_to_num(a) - np.nan_to_num(b))
    return float(d.max()) if d.size else 0.0


# ----------------------------------------------------------------------------- ONNX Runtime

class OrtRunner:
    """ONNX Runtime on one model in a worker process of the venv (dyve.onnx_worker serve).

    `threads` sets intra_op_num_threads (inter_op 1, sequential execution); `spinning`
    lets ORT's pool threads busy-wait between runs (off by default: docs/bench.md).
    :meth:`time` returns the seconds of one ``session.run`` as the worker measured them
    (the transfer of the batch is outside the timed span); :meth:`run` returns outputs.
    """

    def __init__(self, model, threads=1, spinning=False):
        self.proc = subprocess.Popen(
            [venv_python(), "-m", "dyve.onnx_worker", "serve", os.path.abspath(model),
             "--threads", str(int(threads))] + (["--spinning"] if spinning else []),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_worker_env(threads))
        self.info = self._receive()[0]

    def _send(self, header, payload=b""):
        data = json.dumps(header).encode()
        try:
            self.proc.stdin.write(struct.pack("<II", len(data), len(payload)) + data)
            self.proc.stdin.write(payload)
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise ExportError("the ONNX Runtime worker ended; see its messages above") \
                from None

    def _receive(self):
        head = self.proc.stdout.read(8)
        if len(head) < 8:
            code = self.proc.wait()
            raise ExportError(f"the ONNX Runtime worker ended (exit {code}); see its "
                              "messages above")
        n, m = struct.unpack("<II", head)
        header = json.loads(self.proc.stdout.read(n))
        payload = self.proc.stdout.read(m) if m else b""
        if "error" in header:
            raise ExportError(f"ONNX Runtime: {header['error']}")
        return header, payload

    def _request(self, x, want):
        x = np.ascontiguousarray(x, np.float32)
        self._send({"cmd": "run", "shape": list(x.shape), "want": want}, x.tobytes())
        return self._receive()

    def time(self, x):
        """Seconds of one run on the batch `x`."""
        return self._request(x, [])[0]["seconds"]

    def run(self, x, names=None):
        """{output name: array} for the batch `x` (all graph outputs without `names`)."""
        header, payload = self._request(x, list(names) if names else None)
        out, offset = {}, 0
        for item in header["outputs"]:
            size = int(np.prod(item["shape"], dtype=np.int64)) * 4
            out[item["name"]] = np.frombuffer(payload, np.float32, size // 4, offset) \
                .reshape(item["shape"]).copy()
            offset += size
        return out

    def close(self):
        if self.proc.poll() is None:
            try:
                self._send({"cmd": "quit"})
            except ExportError:
                pass
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------- command

def build_parser():
    p = argparse.ArgumentParser(
        prog="python3 -m dyve.export_onnx",
        description="Export a stock Caffe net (deploy prototxt + caffemodel) to ONNX (opset "
                    f"{OPSET}), checked with onnx's checker and shape inference against "
                    "Caffe's blob shapes. Layer types without an ONNX form (DyVE layers, "
                    "Python layers, ...) are refused, naming the layer. onnx runs in "
                    "build/onnx-venv (make onnx-venv).")
    p.add_argument("--model", required=True, help="deploy prototxt (stock layers)")
    p.add_argument("--weights", required=True, help="caffemodel (binary or HDF5)")
    p.add_argument("--out", required=True, help="the .onnx file to write (atomically)")
    p.add_argument("--batch", type=int, help="fix the batch dimension (default: symbolic "
                   f"'{BATCH_DIM}')")
    p.add_argument("--verify", action="store_true", help="run the model in ONNX Runtime "
                   "and Caffe on one seeded random batch and print the largest difference")
    return p


def verify(model, weights, out, batch=2, seed=0):
    """Largest |ONNX Runtime - Caffe| over the net's outputs on a seeded random batch."""
    from dyve import caffe_io
    net = caffe_io.load_net(model, weights, "--weights", model)
    shape = net.blobs[caffe_io.input_blob(net)].data.shape[1:]
    x = np.random.RandomState(seed).normal(0, 50, (batch,) + shape).astype(np.float32)
    caffe_io.reshape(net, batch)
    net.blobs[caffe_io.input_blob(net)].data[...] = x
    net.forward()
    with OrtRunner(out) as ort:
        got = ort.run(x)
    return {name: float(np.abs(got[name] - net.blobs[name].data).max()) for name in got}


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.batch is not None and args.batch < 1:
            raise InputError("--batch must be at least 1")
        report = export(args.model, args.weights, args.out, args.batch)
        print(f"wrote {args.out}: {report['nodes']} nodes, {report['initializers']} "
              f"initializers, opset {report['opset']}, onnx {report['onnx']}")
        if args.verify:
            for name, diff in verify(args.model, args.weights, args.out,
                                     args.batch or 2).items():
                print(f"verify: output '{name}': max |ONNX Runtime - Caffe| = {diff:.3g}")
    except DyveError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
