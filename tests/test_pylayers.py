"""Tests of the numpy oracle of the DyVE layers (python/dyve/pylayers.py, settings.py).

Knobs off is checked against stock Caffe layers run through pycaffe; each knob is checked
on hand-made cases whose outputs and counters are counted by hand (docs/knobs.md).
Run: PYTHONPATH=build/caffe-src/python:python /usr/bin/python3 -m pytest -q tests/test_pylayers.py
"""
import json
import os
import sys

import numpy as np
import pytest

os.environ.setdefault("GLOG_minloglevel", "2")  # keep Caffe's net-construction log quiet
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Caffe imports a Python layer's module from sys.path of this same interpreter.
sys.path.insert(0, os.path.join(REPO, "python"))

import caffe  # noqa: E402
from dyve import pylayers, settings  # noqa: E402

RELU = {"relu": True}
MACS_SKIPPED = ("macs_skipped_spet", "macs_skipped_exact", "macs_skipped_sdss",
                "macs_skipped_sfma")
DENSE_ONLY = ("forward_passes", "images", "outputs", "macs_dense", "macs_executed")


def make_net(tmp_path, input_shape, layers_text):
    """A pycaffe TEST net: Input blob 'x' of input_shape followed by layers_text."""
    dims = " ".join(f"dim: {d}" for d in input_shape)
    text = (f'layer {{ name: "x" type: "Input" top: "x" input_param {{ shape {{ {dims} }} }} }}\n'
            + layers_text)
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    return caffe.Net(str(path), caffe.TEST)


def layer_by_name(net, name):
    # Caffe may insert Split layers, so look the layer up by name rather than position.
    return net.layers[list(net._layer_names).index(name)]


def check_invariant(effort):
    assert all(isinstance(v, int) for v in effort.values())
    assert set(effort) == set(pylayers.EFFORT_KEYS)
    assert effort["macs_dense"] == effort["macs_executed"] + sum(effort[k] for k in MACS_SKIPPED)


def conv_text(name, geo, bottom="x"):
    """convolution_param text for a stock Caffe Convolution layer with geometry geo."""
    kh, kw = geo["kernel"]
    sh, sw = geo["stride"]
    ph, pw = geo["pad"]
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
            f'convolution_param {{ num_output: {geo["out"]} kernel_h: {kh} kernel_w: {kw} '
            f'stride_h: {sh} stride_w: {sw} pad_h: {ph} pad_w: {pw} dilation: {geo["dilation"]} '
            f'group: {geo["group"]} bias_term: {str(geo["bias"]).lower()} '
            f'weight_filler {{ type: "gaussian" std: 0.5 }} '
            f'bias_filler {{ type: "gaussian" std: 0.5 }} }} }}\n')


def oracle_geometry(geo):
    return {"stride": list(geo["stride"]), "pad": list(geo["pad"]),
            "dilation": geo["dilation"], "group": geo["group"]}


def geo_case(out=6, kernel=(3, 3), stride=(1, 1), pad=(0, 0), dilation=1, group=1, bias=True,
             shape=(2, 4, 7, 8)):
    return {"out": out, "kernel": kernel, "stride": stride, "pad": pad, "dilation": dilation,
            "group": group, "bias": bias, "shape": shape}


CONV_CASES = [
    geo_case(),
    geo_case(pad=(1, 1), group=2),
    geo_case(stride=(2, 2), pad=(1, 1)),
    geo_case(dilation=2, pad=(2, 1)),
    geo_case(kernel=(1, 1)),
    geo_case(kernel=(2, 3), stride=(1, 2), bias=False),
    geo_case(out=4, kernel=(3, 3), stride=(2, 1), pad=(1, 0), dilation=2, group=2, bias=False),
]


# ---------------------------------------------------------------------------------------
# Knobs off == stock Caffe
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("geo", CONV_CASES)
@pytest.mark.parametrize("relu", [False, True])
def test_conv_knobs_off_matches_stock_caffe(tmp_path, geo, relu):
    net = make_net(tmp_path, geo["shape"], conv_text("conv", geo))
    rng = np.random.RandomState(0)
    net.blobs["x"].data[...] = rng.standard_normal(geo["shape"])
    net.forward()
    stock = net.blobs["conv"].data.copy()
    W = net.params["conv"][0].data
    b = net.params["conv"][1].data if geo["bias"] else None

    top, effort = pylayers.conv_forward(net.blobs["x"].data, W, b, oracle_geometry(geo),
                                        {"relu": relu})
    np.testing.assert_allclose(top, np.maximum(stock, 0) if relu else stock, atol=1e-4)
    fan_in = W.shape[1] * W.shape[2] * W.shape[3]
    assert effort["outputs"] == stock.size
    assert effort["macs_dense"] == effort["macs_executed"] == stock.size * fan_in
    assert effort["forward_passes"] == 1 and effort["images"] == geo["shape"][0]
    assert all(v == 0 for k, v in effort.items() if k not in DENSE_ONLY)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_ip_knobs_off_matches_stock_caffe(tmp_path, transpose, bias):
    text = ('layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip" '
            f'inner_product_param {{ num_output: 5 transpose: {str(transpose).lower()} '
            f'bias_term: {str(bias).lower()} weight_filler {{ type: "gaussian" std: 0.5 }} '
            'bias_filler { type: "gaussian" std: 0.5 } } }\n')
    net = make_net(tmp_path, (3, 2, 2, 3), text)
    net.blobs["x"].data[...] = np.random.RandomState(1).standard_normal((3, 2, 2, 3))
    net.forward()
    W = net.params["ip"][0].data
    b = net.params["ip"][1].data if bias else None
    top, effort = pylayers.ip_forward(net.blobs["x"].data, W, b, {}, transpose=transpose)
    np.testing.assert_allclose(top, net.blobs["ip"].data, atol=1e-4)
    assert effort["macs_dense"] == effort["macs_executed"] == 3 * 5 * 12
    assert all(v == 0 for k, v in effort.items() if k not in DENSE_ONLY)


# ---------------------------------------------------------------------------------------
# The Python layers inside a pycaffe net
# ---------------------------------------------------------------------------------------

def python_layer_text(name, layer_class, params, bottom="x"):
    return (f'layer {{ name: "{name}" type: "Python" bottom: "{bottom}" top: "{name}" '
            f"python_param {{ module: \"dyve.pylayers\" layer: \"{layer_class}\" "
            f"param_str: '{json.dumps(params)}' }} }}\n")


def test_python_conv_layer_in_net(tmp_path):
    geo = geo_case(pad=(1, 1), group=2, shape=(2, 4, 6, 6))
    dyve_params = {"num_output": 6, "kernel_size": 3, "pad": 1, "group": 2, "relu": True,
                   "spet": {"enabled": True, "fraction": 0.5, "ordering": "PER_OUTPUT"}}
    net = make_net(tmp_path, geo["shape"],
                   conv_text("ref", geo)
                   + python_layer_text("dyve", "DyveConvolution", dyve_params))
    assert [p.data.shape for p in net.params["dyve"]] == [(6, 2, 3, 3), (6,)]
    # The stock weights are assigned after setup: the layer's channel order must follow them.
    for i in range(2):
        net.params["dyve"][i].data[...] = net.params["ref"][i].data
    x = np.random.RandomState(2).standard_normal(geo["shape"])
    net.blobs["x"].data[...] = x
    net.forward()
    layer = layer_by_name(net, "dyve")
    expected, effort = pylayers.conv_forward(
        net.blobs["x"].data, net.params["ref"][0].data, net.params["ref"][1].data,
        {"pad": 1, "group": 2}, {"relu": True, "spet": dyve_params["spet"]})
    np.testing.assert_allclose(net.blobs["dyve"].data, expected, atol=1e-5)
    assert layer.effort == effort and effort["spet_zeroed"] > 0
    # Non-zeroed neurons are exact: equal to the stock convolution after ReLU.
    computed = net.blobs["dyve"].data > 0
    np.testing.assert_allclose(net.blobs["dyve"].data[computed],
                               net.blobs["ref"].data[computed], atol=1e-4)

    net.forward()
    assert layer.effort == {k: 2 * v for k, v in effort.items()}
    layer.reset_effort()
    assert set(layer.effort.values()) == {0}
    with pytest.raises(NotImplementedError, match="inference-only"):
        layer.backward([], [], [])


def test_python_ip_layer_in_net(tmp_path):
    params = {"num_output": 4, "transpose": True, "relu": True,
              "spet": {"exact": True, "check_interval": 1}}
    text = ('layer { name: "ref" type: "InnerProduct" bottom: "x" top: "ref" '
            'inner_product_param { num_output: 4 transpose: true '
            'weight_filler { type: "gaussian" std: 1 } '
            'bias_filler { type: "gaussian" std: 1 } } }\n'
            + python_layer_text("dyve", "DyveInnerProduct", params))
    net = make_net(tmp_path, (3, 10), text)
    assert [p.data.shape for p in net.params["dyve"]] == [(10, 4), (4,)]
    for i in range(2):
        net.params["dyve"][i].data[...] = net.params["ref"][i].data
    net.blobs["x"].data[...] = np.abs(np.random.RandomState(3).standard_normal((3, 10)))
    net.forward()
    np.testing.assert_allclose(net.blobs["dyve"].data, np.maximum(net.blobs["ref"].data, 0),
                               atol=1e-5)
    effort = layer_by_name(net, "dyve").effort
    check_invariant(effort)
    assert effort["exact_stopped"] > 0


@pytest.mark.parametrize("layer_class, params, shape, message", [
    ("DyveConvolution", {"num_output": 2, "kernel_size": 3, "relu": True,
                         "sdss": {"enabled": True}}, (1, 1, 3, 3), "1x1 output"),
    ("DyveConvolution", {"num_output": 2, "kernel_size": 3, "spet": {"enabled": True}},
     (1, 1, 5, 5), "spet.enabled requires relu"),
    ("DyveConvolution", {"num_output": 2}, (1, 1, 5, 5), "kernel_size is required"),
    ("DyveConvolution", {"num_output": 3, "kernel_size": 1, "group": 2}, (1, 2, 5, 5),
     "not divisible by group"),
    ("DyveConvolution", {"num_output": 2, "kernel_size": 1, "padding": 1}, (1, 1, 5, 5),
     "unknown DyVE setting 'padding'"),
    ("DyveInnerProduct", {"num_output": 2, "sfma": {"enabled": True}}, (1, 4), "sfma"),
    ("DyveInnerProduct", {"num_output": 2, "relu": True,
                          "spet": {"enabled": True, "gate": "BOUND"}}, (1, 4),
     "spet.gate BOUND is for convolution layers only"),
    ("DyveConvolution", {"num_output": 2, "kernel_size": 1, "relu": True,
                         "spet": {"enabled": True, "gate": "BOUND", "ordering": "PER_OUTPUT"}},
     (1, 2, 5, 5), "spet.gate BOUND needs spet.ordering PER_LAYER"),
])
def test_python_layer_refuses_invalid_setup(tmp_path, layer_class, params, shape, message):
    with pytest.raises(ValueError, match=message) as info:
        make_net(tmp_path, shape, python_layer_text("bad", layer_class, params))
    assert layer_class in str(info.value)  # the message names the layer (class and param_str)


# ---------------------------------------------------------------------------------------
# SPET
# ---------------------------------------------------------------------------------------

# Inner product, K = 4, O = 2, f = 0.5 -> P = 2, T = 0. Significance |W| per input:
# o0 [2, 0, 0, 1], o1 [0, 3, 1, 0], summed [2, 3, 1, 1].
# PER_LAYER order [1, 0, 2, 3] (prefix {1, 0}); PER_OUTPUT o0 [0, 3, 1, 2] (prefix {0, 3}),
# o1 [1, 2, 0, 3] (prefix {1, 2}).
SPET_W = np.array([[2.0, 0.0, 0.0, -1.0], [0.0, -3.0, 1.0, 0.0]])
SPET_X = np.array([[1.0, 1.0, 1.0, 4.0], [0.0, 1.0, 4.0, 0.0]])


def test_spet_hand_counted_per_layer():
    st = {"relu": True, "spet": {"enabled": True, "fraction": 0.5, "ordering": "PER_LAYER"}}
    top, effort = pylayers.ip_forward(SPET_X, SPET_W, np.zeros(2), st)
    # image 0: o0 prefix 2 >= 0, rest -4 -> relu(-2) = 0; o1 prefix -3 < 0 -> zeroed
    # image 1: o0 prefix 0 >= 0, rest 0 -> 0; o1 prefix -3 < 0 -> zeroed (dense would be 1)
    np.testing.assert_array_equal(top, [[0, 0], [0, 0]])
    assert effort["spet_zeroed"] == 2 and effort["ops_spet"] == 4
    assert effort["macs_executed"] == 4 + 2 + 4 + 2 and effort["macs_skipped_spet"] == 4
    check_invariant(effort)


def test_spet_hand_counted_per_output():
    st = {"relu": True, "spet": {"enabled": True, "fraction": 0.5, "ordering": "PER_OUTPUT"}}
    top, effort = pylayers.ip_forward(SPET_X, SPET_W, np.zeros(2), st)
    # image 0: o0 prefix {0,3}: 2 - 4 < 0 -> zeroed; o1 prefix {1,2}: -3 + 1 < 0 -> zeroed
    # image 1: o0 prefix 0 -> rest 0 -> 0; o1 prefix -3 + 4 = 1 -> rest 0 -> 1
    np.testing.assert_array_equal(top, [[0, 0], [0, 1]])
    assert effort["spet_zeroed"] == 2 and effort["ops_spet"] == 4
    assert effort["macs_executed"] == 2 + 2 + 4 + 4 and effort["macs_skipped_spet"] == 4
    check_invariant(effort)


def test_spet_prefix_size_ceil_rule():
    assert pylayers.prefix_size(0.5, 3) == 2
    assert pylayers.prefix_size(0.5, 4) == 2
    assert pylayers.prefix_size(0.3, 10) == 3      # float32(0.3) * 10 = 3.0000001
    assert pylayers.prefix_size(0.1, 30) == 3      # float32(0.1) * 30 = 3.00000004
    assert pylayers.prefix_size(0.01, 3) == 1      # at least one channel
    assert pylayers.prefix_size(1.0, 7) == 7


@pytest.mark.parametrize("ordering", ["PER_LAYER", "PER_OUTPUT", "INTERLEAVED"])
@pytest.mark.parametrize("threshold", [0.0, 0.7])
def test_spet_zeroes_exactly_the_predicted_neurons(ordering, threshold):
    """Conv with groups: zeroed <=> prefix partial sum (bias included) < T, the rest exact."""
    rng = np.random.RandomState(4)
    x = rng.standard_normal((2, 6, 5, 5))
    W = rng.standard_normal((4, 3, 3, 3))
    b = rng.standard_normal(4)
    geometry = {"pad": 1, "group": 2}
    fraction, c_g, kk = 0.5, 3, 9
    n_prefix = 2                                    # ceil(0.5 * 3)
    # Independent prefix masks: significance per output, summed per group for PER_LAYER.
    significance = np.abs(W).sum(axis=(2, 3))       # [O, C_g]
    mask = np.zeros_like(W)
    for o in range(4):
        group_outputs = slice(0, 2) if o < 2 else slice(2, 4)
        score = significance[group_outputs].sum(axis=0) if ordering == "PER_LAYER" \
            else significance[o]
        prefix = np.argsort(-score, kind="stable")[:n_prefix]
        if ordering == "INTERLEAVED":
            prefix = [1, 0]                         # odd channels first: 1, then 0, 2
        mask[o, prefix] = 1
    partial, _ = pylayers.conv_forward(x, W * mask, b, geometry, {})
    dense, _ = pylayers.conv_forward(x, W, b, geometry, {})

    st = {"relu": True, "spet": {"enabled": True, "fraction": fraction, "threshold": threshold,
                                 "ordering": ordering}}
    top, effort = pylayers.conv_forward(x, W, b, geometry, st)
    zeroed = partial < threshold
    np.testing.assert_allclose(top, np.where(zeroed, 0, np.maximum(dense, 0)), atol=1e-12)
    assert effort["spet_zeroed"] == zeroed.sum() > 0
    assert effort["ops_spet"] == top.size
    assert effort["macs_executed"] == (top.size * n_prefix * kk
                                       + (~zeroed).sum() * (c_g - n_prefix) * kk)
    assert effort["macs_skipped_spet"] == zeroed.sum() * (c_g - n_prefix) * kk
    check_invariant(effort)


def test_interleaved_order_is_odd_then_even():
    spet = settings.normalize({"relu": True, "spet": {"enabled": True,
                                                      "ordering": "INTERLEAVED"}})["spet"]
    for n, expected in ((1, [0]), (2, [1, 0]), (5, [1, 3, 0, 2, 4]), (6, [1, 3, 5, 0, 2, 4])):
        orders = pylayers.channel_orders(np.random.RandomState(n).standard_normal((3, n, 4)),
                                         spet)
        assert orders == [expected] * 3


# 5 inputs, f = 0.5 -> P = 3. INTERLEAVED prefix {1, 3, 0}, rest {2, 4}; PER_LAYER (summed
# |W| 2, 3, 6, 3, 0) prefix {2, 1, 3}.
INTERLEAVED_W = np.array([[1.0, -2.0, 5.0, -2.0, 0.0], [1.0, 1.0, -1.0, 1.0, 0.0]])


def test_spet_interleaved_hand_counted():
    x = np.ones((1, 5))
    st = {"relu": True, "spet": {"enabled": True, "fraction": 0.5, "ordering": "INTERLEAVED"}}
    top, effort = pylayers.ip_forward(x, INTERLEAVED_W, None, st)
    # o0: prefix 1 - 2 - 2 = -3 < 0 -> zeroed (its full sum is 2); o1: prefix 3, + rest -1.
    np.testing.assert_array_equal(top, [[0, 2]])
    assert effort["spet_zeroed"] == 1 and effort["ops_spet"] == 2
    assert effort["macs_executed"] == 3 + 3 + 2 and effort["macs_skipped_spet"] == 2
    check_invariant(effort)
    top, _ = pylayers.ip_forward(x, INTERLEAVED_W, None,
                                 dict(st, spet=dict(st["spet"], ordering="PER_LAYER")))
    np.testing.assert_array_equal(top, [[2, 2]])   # prefix {2, 1, 3}: 1 >= 0, kept


def test_bound_gate_with_interleaved_order():
    """BOUND works on the INTERLEAVED order as on PER_LAYER (one order per group): the
    same bound, over the odd-channels-first prefix; at s = 1 it never changes an output."""
    rng = np.random.RandomState(12)
    x = np.maximum(rng.standard_normal((2, 5, 6, 6)), 0)
    W = rng.standard_normal((4, 5, 3, 3))
    b = rng.standard_normal(4) - 1.0
    st = bound_settings(ordering="INTERLEAVED")
    top, effort = pylayers.conv_forward(x, W, b, {"pad": 1}, st)
    dense, _ = pylayers.conv_forward(x, W, b, {"pad": 1}, RELU)
    np.testing.assert_allclose(top, dense, atol=1e-12)
    assert effort["spet_zeroed"] > 0
    # rest = channels {2, 4}: per neuron 2 U terms + 1 compare; per row 2 * 9 maxima.
    assert effort["ops_spet"] == top.size * 3 + 2 * 36 * 2 * 9
    # The prefix channels are 1, 3, 0: the gate is decided on them alone plus the bound.
    partial, _ = pylayers.conv_forward(x, W * np.array([1, 1, 0, 1, 0])[None, :, None, None],
                                       b, {"pad": 1}, {})
    assert effort["spet_zeroed"] <= (partial < 0).sum()
    check_invariant(effort)


def test_spet_order_follows_current_weights():
    x = np.array([[1.0, 1.0]])
    # f = 0.5 -> only the most significant input is in the prefix; it decides the zeroing.
    st = {"relu": True, "spet": {"enabled": True, "fraction": 0.5}}
    top, _ = pylayers.ip_forward(x, np.array([[-2.0, 3.0]]), None, st)    # prefix: input 1
    assert top[0, 0] == 1.0
    top, _ = pylayers.ip_forward(x, np.array([[-3.0, 2.0]]), None, st)    # prefix: input 0
    assert top[0, 0] == 0.0


# ---------------------------------------------------------------------------------------
# The BOUND gate of SPET (convolutions)
# ---------------------------------------------------------------------------------------

# 2 input channels, 2x2 kernel, 2 outputs, 3x3 input -> 2x2 output; f = 0.5 -> P = 1.
# Significance: c0 6 + 2 = 8, c1 2 + 1 = 3 -> PER_LAYER order [0, 1]: prefix {c0}, rest {c1}.
# Pw[o][c1] (sum of the positive weights of c1): o0 1 + 1 = 2, o1 0.5.
BOUND_W = np.array([[[[-2.0, -1.0], [-1.0, -2.0]], [[1.0, 0.0], [0.0, 1.0]]],
                    [[[1.0, -1.0], [0.0, 0.0]], [[0.5, 0.0], [0.0, -0.5]]]])
BOUND_B = np.array([-0.5, 0.0])
BOUND_X = np.array([[[[1.0, 0.0, 2.0], [0.0, 1.0, 0.0], [3.0, 0.0, 0.0]],
                     [[1.0, 2.0, 0.0], [0.0, 0.0, 1.0], [0.0, 5.0, 0.0]]]])
# Per position (0,0), (0,1), (1,0), (1,1): c1's taps [1,2,0,0], [2,0,0,1], [0,0,0,5],
# [0,1,5,0], so m[c1] = 2, 2, 5, 5.
# o0: bias + prefix -4.5, -3.5, -4.5, -2.5; U = 2m = 4, 4, 10, 10; rest 1, 3, 5, 0.
# o1: bias + prefix  1,   -2,   -1,    1;   U = 0.5m = 1, 1, 2.5, 2.5; rest 0.5, 0.5, -2.5, 0.
BOUND_DENSE = [[[0.0, 0.0], [0.5, 0.0]], [[1.5, 0.0], [0.0, 1.0]]]    # relu(prefix + rest)


def bound_settings(scale=1.0, threshold=0.0, gate="BOUND", **spet):
    return {"relu": True, "spet": dict({"enabled": True, "fraction": 0.5, "threshold": threshold,
                                        "gate": gate, "bound_scale": scale}, **spet)}


def test_bound_gate_scale_1_is_exact_hand_counted():
    top, effort = pylayers.conv_forward(BOUND_X, BOUND_W, BOUND_B, {}, bound_settings())
    # z + U: o0 -0.5 (zeroed), 0.5, 5.5, 7.5; o1 2, -1 (zeroed), 1.5, 3.5.
    np.testing.assert_array_equal(top[0], BOUND_DENSE)
    dense, _ = pylayers.conv_forward(BOUND_X, BOUND_W, BOUND_B, {}, RELU)
    np.testing.assert_array_equal(top, dense)
    assert effort["spet_zeroed"] == 2
    assert effort["macs_skipped_spet"] == 2 * 4                  # L - Lp = 4 per zeroed neuron
    assert effort["macs_executed"] == 8 * 4 + 6 * 4              # prefix of all, rest of 6
    # Per neuron: 1 multiply-add of U (one rest channel) + the compare; per row (4 positions
    # of the one image and group): R = 4 compares for the maximum of c1's taps.
    assert effort["ops_spet"] == 8 * (1 + 1) + 4 * 4
    assert effort["ops_exact"] == effort["ops_sdss"] == effort["ops_sfma"] == 0
    check_invariant(effort)

    # The THRESHOLD gate zeroes every o0 (prefix < 0), losing o0 (1, 0) = 0.5, and o1's
    # (0, 1) and (1, 0); it counts the compares only.
    top, effort = pylayers.conv_forward(BOUND_X, BOUND_W, BOUND_B, {},
                                        bound_settings(gate="THRESHOLD"))
    np.testing.assert_array_equal(top[0], [[[0, 0], [0, 0]], [[1.5, 0], [0, 1]]])
    assert effort["spet_zeroed"] == 6 and effort["ops_spet"] == 8
    check_invariant(effort)


def test_bound_gate_smaller_scale_zeroes_more():
    # 1 output, 2x2 input = 2x2 kernel: one position. Prefix c0 (significance 8 > 2).
    x = np.array([[[[1.0, 1.0], [1.0, 1.0]], [[3.0, 0.0], [0.0, 3.0]]]])
    W = np.array([[[[-2.0, -2.0], [-2.0, -2.0]], [[1.0, 0.0], [0.0, 1.0]]]])
    b = np.array([3.5])
    # bias + prefix = 3.5 - 8 = -4.5; rest = 6 -> dense 1.5; Pw = 2, m = 3 -> U = 6.
    top, effort = pylayers.conv_forward(x, W, b, {}, bound_settings(1.0))
    assert top[0, 0, 0, 0] == 1.5                                # -4.5 + 6 = 1.5 >= 0: kept
    assert effort["spet_zeroed"] == 0 and effort["macs_executed"] == 8
    assert effort["ops_spet"] == (1 + 1) + 4
    top, effort = pylayers.conv_forward(x, W, b, {}, bound_settings(0.5))
    assert top[0, 0, 0, 0] == 0.0                                # -4.5 + 3 = -1.5 < 0: zeroed
    assert effort["spet_zeroed"] == 1 and effort["macs_skipped_spet"] == 4
    assert effort["macs_executed"] == 4 and effort["ops_spet"] == (1 + 1) + 4
    check_invariant(effort)
    # s = 0 decides as the THRESHOLD gate does (but still counts the bound's work).
    top, effort = pylayers.conv_forward(x, W, b, {}, bound_settings(0.0))
    assert top[0, 0, 0, 0] == 0.0 and effort["spet_zeroed"] == 1
    assert effort["ops_spet"] == (1 + 1) + 4
    # The bound uses the prefix partial sum, the output the full sum: T is compared with
    # z + s*U only. T = 1.6 > 1.5 = -4.5 + 6: zeroed at s = 1.
    top, effort = pylayers.conv_forward(x, W, b, {}, bound_settings(1.0, threshold=1.6))
    assert top[0, 0, 0, 0] == 0.0 and effort["spet_zeroed"] == 1


def test_bound_gate_rows_with_sdss_hand_counted():
    # 1x1 kernel, 2 channels, 1x5 map, SDSS stride 2 (grid x = 0, 2, 4), T = 0.
    # W o0 = [2, 1], o1 = [-2, 1]: significance c0 4, c1 2 -> prefix {c0}, rest {c1},
    # Pw = 1 for both outputs, R = 1 tap per row.
    x = np.array([[[[0.0, 7.0, 0.0, 7.0, 1.0]], [[0.0, 7.0, 0.0, 7.0, 0.0]]]])
    W = np.array([[2.0, 1.0], [-2.0, 1.0]]).reshape(2, 2, 1, 1)
    st = dict(bound_settings(), sdss={"enabled": True, "stride": 2})
    top, effort = pylayers.conv_forward(x, W, None, {}, st)
    # Grid: o0 0, 0, 2; o1 0, 0 and x = 4 zeroed (-2 + U 0 < 0).
    # x = 1: both outputs see neighbours 0, 0 -> filled: no row.
    # x = 3: o0 sees 0 then 2 -> computed (14 + U 7 >= 0; 21); o1 sees 0, 0 -> filled.
    np.testing.assert_array_equal(top[0, :, 0], [[0, 0, 0, 21, 2], [0, 0, 0, 0, 0]])
    assert effort["sdss_filled"] == 3 and effort["macs_skipped_sdss"] == 3 * 2
    assert effort["spet_zeroed"] == 1 and effort["macs_skipped_spet"] == 1
    assert effort["macs_executed"] == 7 * 1 + 6 * 1             # 7 computed, 6 not zeroed
    assert effort["ops_sdss"] == 4 * 2 + 3 * 2                   # compares + MEAN fills
    # 7 computed neurons * (1 U term + 1 compare) + 4 rows (x = 0, 2, 4, 3) * R = 1.
    assert effort["ops_spet"] == 7 * 2 + 4 * 1
    check_invariant(effort)
    _, effort = pylayers.conv_forward(x, W, None, {},
                                      dict(st, spet=dict(st["spet"], gate="THRESHOLD")))
    assert effort["ops_spet"] == 7


def test_bound_gate_empty_rest():
    # As in test_bound_gate_smaller_scale_zeroes_more, but the rest channel c1 is a constant
    # map (SFMA): U = 0 and R = 0. bias + SFMA term + prefix = 3.5 + 3 * 2 - 8 = 1.5.
    x = np.array([[[[2.0, 0.0], [1.0, 1.0]], [[3.0, 3.0], [3.0, 3.0]]]])
    W = np.array([[[[-2.0, -2.0], [-2.0, -2.0]], [[1.0, 0.0], [0.0, 1.0]]]])
    st = dict(bound_settings(), sfma={"enabled": True})
    top, effort = pylayers.conv_forward(x, W, np.array([3.5]), {}, st)
    assert top[0, 0, 0, 0] == 1.5
    assert effort["ops_spet"] == 1 and effort["sfma_maps"] == 1
    check_invariant(effort)
    # f = 1: no rest at all; the gate sees the full sum (5 of the 8 are negative).
    st = bound_settings(fraction=1.0)
    top, effort = pylayers.conv_forward(BOUND_X, BOUND_W, BOUND_B, {}, st)
    np.testing.assert_array_equal(top[0], BOUND_DENSE)
    assert effort["ops_spet"] == 8
    assert effort["spet_zeroed"] == 5 and effort["macs_skipped_spet"] == 0


@pytest.mark.parametrize("geo", CONV_CASES)
def test_bound_gate_scale_1_never_changes_an_output(geo):
    """Non-negative inputs, s = 1, T = 0: the output is the dense ReLU convolution."""
    rng = np.random.RandomState(9)
    x = np.maximum(rng.standard_normal(geo["shape"]), 0)
    c_g = geo["shape"][1] // geo["group"]
    W = rng.standard_normal((geo["out"], c_g) + geo["kernel"])
    b = rng.standard_normal(geo["out"]) - 1.0 if geo["bias"] else None
    top, effort = pylayers.conv_forward(x, W, b, oracle_geometry(geo),
                                        bound_settings(fraction=0.5))
    dense, _ = pylayers.conv_forward(x, W, b, oracle_geometry(geo), RELU)
    np.testing.assert_allclose(top, dense, atol=1e-12)
    assert effort["spet_zeroed"] > 0
    # Without SDSS every position of every image and group is a row.
    kk = geo["kernel"][0] * geo["kernel"][1]
    n_rest = c_g - pylayers.prefix_size(0.5, c_g)
    rows = geo["shape"][0] * geo["group"] * top.shape[2] * top.shape[3]
    assert effort["ops_spet"] == top.size * (1 + n_rest) + rows * n_rest * kk
    check_invariant(effort)

# ---------------------------------------------------------------------------------------
# Exact mode
# ---------------------------------------------------------------------------------------

def test_exact_hand_counted():
    st = {"relu": True, "spet": {"exact": True, "check_interval": 2}}
    x = np.ones((1, 6))
    W = np.array([
        [3, -1, -1, -1, -1, -1],   # pos 3; check, -2 -> 1; check, -2 -> -1; check: stop (1 left)
        [1, -1, -1, 0, 0, 0],      # pos {0,3,4,5} = 1; check, -2 -> -1; no check after the last
        [-1, -1, -1, -1, -1, 2],   # pos 2; check, -2 -> 0; check, -2 -> -2; check: stop (1 left)
        [1, 1, 1, 1, 1, 1],        # no negative tap: no check
    ], dtype=float)
    top, effort = pylayers.ip_forward(x, W, np.zeros(4), st)
    np.testing.assert_array_equal(top, [[0, 0, 0, 6]])
    assert effort["ops_exact"] == 3 + 1 + 3 + 0
    assert effort["exact_stopped"] == 2
    assert effort["macs_skipped_exact"] == 1 + 1
    assert effort["macs_executed"] == 5 + 6 + 5 + 6
    check_invariant(effort)


def test_exact_equals_relu_of_stock_conv(tmp_path):
    geo = geo_case(out=8, pad=(1, 1), shape=(2, 8, 6, 6))
    net = make_net(tmp_path, geo["shape"], conv_text("conv", geo))
    net.blobs["x"].data[...] = np.abs(np.random.RandomState(5).standard_normal(geo["shape"]))
    net.params["conv"][1].data[...] -= 1.0          # more negative neurons to stop early
    net.forward()
    for spet in ({"exact": True}, {"exact": True, "check_interval": 1},
                 {"exact": True, "enabled": True, "fraction": 0.5, "threshold": -1e30}):
        top, effort = pylayers.conv_forward(net.blobs["x"].data, net.params["conv"][0].data,
                                            net.params["conv"][1].data, {"pad": 1},
                                            {"relu": True, "spet": spet})
        np.testing.assert_allclose(top, np.maximum(net.blobs["conv"].data, 0), atol=1e-4)
        assert effort["exact_stopped"] > 0
        assert effort["macs_executed"] < effort["macs_dense"]
        check_invariant(effort)


def test_exact_refuses_negative_input():
    with pytest.raises(ValueError, match="non-negative"):
        pylayers.conv_forward(-np.ones((1, 1, 3, 3)), np.ones((1, 1, 1, 1)), None, {},
                              {"relu": True, "spet": {"exact": True}})


# ---------------------------------------------------------------------------------------
# SDSS: 1 channel, 1x1 kernel of weight 1, so the output is relu(input) where computed.
# ---------------------------------------------------------------------------------------

SDSS_GRID = {(0, 0): 0.2, (0, 2): 0.4, (0, 4): 1.0, (2, 0): 0.0, (2, 2): 0.3, (2, 4): 0.0,
             (4, 0): 0.1, (4, 2): 2.0, (4, 4): 0.0}
# Stride 2, T = 0.5; every non-grid input is 7 so a computed position shows 7.
SDSS_MEAN = [[0.2, 0.3, 0.4, 7, 1.0],
             [0.1, 0.225, 0.35, 7, 7],
             [0.0, 0.15, 0.3, 0.15, 0.0],
             [0.05, 7, 7, 7, 0.0],
             [0.1, 7, 2.0, 7, 0.0]]
SDSS_COMPARES = 35      # e.g. (3,3): 0.3, 0.0, then 2.0 > T stops -> 3 compares
SDSS_FILLED = 8
SDSS_MEAN_ADDS = 18     # sum of the filled positions' neighbour counts


def sdss_input():
    x = np.full((1, 1, 5, 5), 7.0)
    for (y, x_), value in SDSS_GRID.items():
        x[0, 0, y, x_] = value
    return x


@pytest.mark.parametrize("fill", ["MEAN", "ZERO"])
def test_sdss_hand_counted(fill):
    st = {"relu": True, "sdss": {"enabled": True, "stride": 2, "threshold": 0.5, "fill": fill}}
    top, effort = pylayers.conv_forward(sdss_input(), np.ones((1, 1, 1, 1)), np.zeros(1), {}, st)
    expected = np.array(SDSS_MEAN)
    if fill == "ZERO":
        filled = (sdss_input()[0, 0] == 7.0) & (expected != 7.0)
        expected[filled] = 0.0
    np.testing.assert_allclose(top[0, 0], expected, atol=1e-12)
    assert effort["sdss_filled"] == SDSS_FILLED
    assert effort["macs_skipped_sdss"] == SDSS_FILLED
    assert effort["macs_executed"] == 25 - SDSS_FILLED
    assert effort["ops_sdss"] == SDSS_COMPARES + (SDSS_MEAN_ADDS if fill == "MEAN" else 0)
    check_invariant(effort)


def test_sdss_last_row_and_column_have_one_neighbour_side():
    # 4x4 map, stride 2, everything 0: all 12 non-grid positions are filled. Row/column 3
    # has only the grid line 2 as neighbour (4 is outside): neighbours per axis are
    # 1, 2, 1, 1 for coordinates 0..3, so 5 * 5 - 4 grid = 21 compares.
    st = {"relu": True, "sdss": {"enabled": True, "stride": 2}}
    top, effort = pylayers.conv_forward(np.zeros((1, 1, 4, 4)), np.ones((1, 1, 1, 1)), None,
                                        {}, st)
    assert not top.any()
    assert effort["sdss_filled"] == 12
    assert effort["ops_sdss"] == 21 + 21
    check_invariant(effort)


# 4x4 map, stride 2, T = 0.5: every grid value is insignificant; the range test decides.
# Grid (0,0) 0.1, (0,2) 0.4, (2,0) 0.2, (2,2) 0.25; the other inputs are 7.
SDSS_RANGE_GRID = {(0, 0): 0.1, (0, 2): 0.4, (2, 0): 0.2, (2, 2): 0.25}


def sdss_range_input():
    x = np.full((1, 1, 4, 4), 7.0)
    for (y, x_), value in SDSS_RANGE_GRID.items():
        x[0, 0, y, x_] = value
    return x


def test_sdss_range_threshold_hand_counted():
    st = {"relu": True, "sdss": {"enabled": True, "stride": 2, "threshold": 0.5,
                                 "range_threshold": 0.2}}
    top, effort = pylayers.conv_forward(sdss_range_input(), np.ones((1, 1, 1, 1)), None, {}, st)
    # (0,1) sees 0.1, 0.4 (range 0.3) and (1,1) all four (range 0.3): computed; every
    # other position has a range <= 0.2 and is filled with its neighbours' mean.
    np.testing.assert_allclose(top[0, 0], [[0.1, 7, 0.4, 0.4],
                                           [0.15, 7, 0.325, 0.325],
                                           [0.2, 0.225, 0.25, 0.25],
                                           [0.2, 0.225, 0.25, 0.25]], atol=1e-12)
    assert effort["sdss_filled"] == 10 and effort["macs_skipped_sdss"] == 10
    assert effort["macs_executed"] == 4 + 2
    # 21 significance compares (all pass), 2 * 21 for the range tests, and the 10 fills'
    # neighbours: 21 - 2 - 4 = 15.
    assert effort["ops_sdss"] == 21 + 2 * 21 + 15
    check_invariant(effort)
    # inf (the default): no range test, no count; all 12 filled as before.
    for range_threshold in (None, float("inf")):
        sdss = dict(st["sdss"])
        if range_threshold is None:
            del sdss["range_threshold"]
        else:
            sdss["range_threshold"] = range_threshold
        top, effort = pylayers.conv_forward(sdss_range_input(), np.ones((1, 1, 1, 1)), None,
                                            {}, dict(st, sdss=sdss))
        assert effort["sdss_filled"] == 12 and effort["ops_sdss"] == 21 + 21
    # A failed significance test makes no range test: T = 0.3 makes (0,2) = 0.4
    # significant for the 5 positions that see it.
    _, effort = pylayers.conv_forward(sdss_range_input(), np.ones((1, 1, 1, 1)), None, {},
                                      dict(st, sdss=dict(st["sdss"], threshold=0.3)))
    # (0,1) 2 compares, (0,3) 1, (1,1) 2, (1,2) 1, (1,3) 1 stop at 0.4; the other 7 pass
    # with 2 + 2 + 1 + 1 + 2 + 1 + 1 = 10 compares and 2 * 10 range ops.
    assert effort["sdss_filled"] == 7
    assert effort["ops_sdss"] == (7 + 10) + 2 * 10 + 10
    # range_threshold 0: only the one-neighbour positions (range 0) are filled.
    _, effort = pylayers.conv_forward(sdss_range_input(), np.ones((1, 1, 1, 1)), None, {},
                                      dict(st, sdss=dict(st["sdss"], range_threshold=0.0)))
    assert effort["sdss_filled"] == 5


def test_sdss_refuses_1x1_output():
    with pytest.raises(ValueError, match="1x1"):
        pylayers.conv_forward(np.ones((1, 1, 3, 3)), np.ones((1, 1, 3, 3)), None, {},
                              {"relu": True, "sdss": {"enabled": True}})


# ---------------------------------------------------------------------------------------
# SFMA
# ---------------------------------------------------------------------------------------

def test_sfma_constant_map_hand_counted():
    rng = np.random.RandomState(6)
    x = rng.standard_normal((2, 2, 5, 5))
    x[:, 0] = 0.7                                    # channel 0 constant in both images
    W = rng.standard_normal((3, 2, 3, 3))
    b = rng.standard_normal(3)
    st = {"sfma": {"enabled": True, "threshold": 0.0}}
    top, effort = pylayers.conv_forward(x, W, b, {"pad": 1}, st)
    dense, _ = pylayers.conv_forward(x, W, b, {"pad": 1}, {})
    np.testing.assert_allclose(top, dense, atol=1e-12)          # border corrected: exact
    # Interior: the constant map contributes its mean times the kernel sum.
    only_live, _ = pylayers.conv_forward(x[:, 1:], W[:, 1:], b, {"pad": 1}, {})
    interior = only_live + 0.7 * W[:, 0].sum(axis=(1, 2))[None, :, None, None]
    np.testing.assert_allclose(top[:, :, 1:4, 1:4], interior[:, :, 1:4, 1:4], atol=1e-12)

    assert effort["sfma_maps"] == 2
    outputs = 2 * 3 * 25
    assert effort["macs_skipped_sfma"] == outputs * 9
    assert effort["macs_executed"] == outputs * 9
    per_image = 2 * (3 * 25 + 1) + 3 * (1 * 9 + 9) + 3 * (9 * 1 + 16 * 4)
    assert effort["ops_sfma"] == 2 * per_image
    check_invariant(effort)


@pytest.mark.parametrize("geo", CONV_CASES + [geo_case(kernel=(1, 1), pad=(1, 1))])
def test_sfma_is_exact_on_constant_maps_for_any_geometry(geo):
    rng = np.random.RandomState(7)
    x = rng.standard_normal(geo["shape"])
    x[0, 0] = 0.5
    x[1, 1:3] = -1.25                               # constant maps in both groups
    c_g = geo["shape"][1] // geo["group"]
    W = rng.standard_normal((geo["out"], c_g) + geo["kernel"])
    b = rng.standard_normal(geo["out"]) if geo["bias"] else None
    top, effort = pylayers.conv_forward(x, W, b, oracle_geometry(geo),
                                        {"sfma": {"enabled": True}})
    dense, _ = pylayers.conv_forward(x, W, b, oracle_geometry(geo), {})
    np.testing.assert_allclose(top, dense, atol=1e-12)
    assert effort["sfma_maps"] == 3
    check_invariant(effort)


def test_sfma_spread_range_and_std():
    x = np.zeros((1, 2, 4, 4))
    x[0, 0, 0, 0] = 1.0           # range 1, population std sqrt(15)/16 ~ 0.242
    x[0, 1] = 2.0
    W = np.ones((1, 2, 3, 3))
    counts = {}
    for spread in ("RANGE", "STD"):
        _, effort = pylayers.conv_forward(x, W, None, {},
                                          {"sfma": {"enabled": True, "threshold": 0.5,
                                                    "spread": spread}})
        counts[spread] = effort["sfma_maps"]
    assert counts == {"RANGE": 1, "STD": 2}


def test_sfma_variance_is_std_squared():
    x = np.zeros((1, 2, 4, 4))
    x[0, 0, 0, 0] = 1.0           # population variance 15/256 ~ 0.0586, std ~ 0.242
    x[0, 1] = 2.0
    W = np.ones((1, 2, 3, 3))
    counts, ops = {}, {}
    for spread in ("RANGE", "STD", "VARIANCE"):
        _, effort = pylayers.conv_forward(x, W, None, {},
                                          {"sfma": {"enabled": True, "threshold": 0.1,
                                                    "spread": spread}})
        counts[spread], ops[spread] = effort["sfma_maps"], effort["ops_sfma"]
    assert counts == {"RANGE": 1, "STD": 1, "VARIANCE": 2}
    # The statistics cost the same; the per-neuron SFMA ops follow the replaced maps.
    _, std_effort = pylayers.conv_forward(x, W, None, {}, {"sfma": {
        "enabled": True, "threshold": 0.25, "spread": "STD"}})
    assert std_effort["sfma_maps"] == 2 and std_effort["ops_sfma"] == ops["VARIANCE"]
    # 15/256 is the boundary: <= keeps it.
    _, effort = pylayers.conv_forward(x, W, None, {}, {"sfma": {
        "enabled": True, "threshold": 15 / 256, "spread": "VARIANCE"}})
    assert effort["sfma_maps"] == 2


# 2 outputs, 2 channels, 3x3 taps. Per (o, c) sum of |W|: c0 1.0 (o0), 2.0 (o1) -> K = 2.0;
# c1 2.25 (o0), 0.25 (o1) -> K = 2.25.
KERNEL_W = np.zeros((2, 2, 3, 3))
KERNEL_W[0, 0, 0, 0], KERNEL_W[0, 0, 1, 1] = 0.5, -0.5
KERNEL_W[1, 0, 0, 2] = -2.0
KERNEL_W[0, 1, 0, 0] = 2.25
KERNEL_W[1, 1, 2, 2] = 0.25


@pytest.mark.parametrize("kernel_threshold, maps", [
    (1.9, 0), (2.0, 1), (2.2, 1), (2.25, 2), (float("inf"), 2)])
def test_sfma_kernel_threshold_hand_counted(kernel_threshold, maps):
    x = np.empty((2, 2, 5, 5))
    x[:, 0], x[:, 1] = 0.75, -1.5                   # both maps constant in both images
    b = np.array([0.5, -0.25])
    st = {"sfma": {"enabled": True, "threshold": 0.0, "kernel_threshold": kernel_threshold}}
    top, effort = pylayers.conv_forward(x, KERNEL_W, b, {"pad": 1}, st)
    dense, _ = pylayers.conv_forward(x, KERNEL_W, b, {"pad": 1}, {})
    np.testing.assert_allclose(top, dense, atol=1e-12)          # constant maps: exact
    per_image = maps                                # c0 passes first (K 2.0), then c1
    assert effort["sfma_maps"] == 2 * per_image
    outputs = 2 * 2 * 25
    assert effort["macs_skipped_sfma"] == outputs * 9 * per_image
    stats = 2 * 2 * (3 * 25 + 1)                    # every channel of every image
    table = 2 * 2 * (per_image * 9 + 9) if per_image else 0
    neurons = 2 * 2 * (9 * 1 + 16 * 4) if per_image else 0
    assert effort["ops_sfma"] == stats + table + neurons
    check_invariant(effort)


def test_sfma_kernel_table_is_per_group():
    W = np.array([1.0, 3.0, 0.5, 0.5]).reshape(4, 1, 1, 1)    # group 2: c0 <- o0, o1
    sfma = settings.normalize({"sfma": {"enabled": True, "kernel_threshold": 1.0}})["sfma"]
    assert list(pylayers.sfma_kernel_allowed(W, 2, sfma)) == [False, True]
    assert list(pylayers.sfma_kernel_allowed(-W, 1, sfma)) == [False]   # |W|: max 3
    sfma["kernel_threshold"] = float("inf")
    assert list(pylayers.sfma_kernel_allowed(W, 2, sfma)) == [True, True]


# ---------------------------------------------------------------------------------------
# All knobs together: the invariant and the counters' consistency on random cases
# ---------------------------------------------------------------------------------------

def test_invariant_on_random_cases():
    rng = np.random.RandomState(8)
    for case in range(12):
        geo = CONV_CASES[case % len(CONV_CASES)]
        x = np.maximum(rng.standard_normal(geo["shape"]), 0)
        x[0, case % geo["shape"][1]] = 0.25 * case
        c_g = geo["shape"][1] // geo["group"]
        W = rng.standard_normal((geo["out"], c_g) + geo["kernel"])
        b = rng.standard_normal(geo["out"]) if geo["bias"] else None
        st = {"relu": True,
              "spet": {"enabled": bool(case % 2), "fraction": float(rng.uniform(0.2, 1)),
                       "threshold": float(rng.uniform(-1, 1)),
                       "ordering": ["PER_LAYER", "PER_OUTPUT"][case % 3 == 0],
                       "exact": case % 4 < 2, "check_interval": int(rng.randint(1, 5))},
              "sdss": {"enabled": case % 3 != 2, "stride": int(rng.randint(1, 4)),
                       "threshold": float(rng.uniform(0, 0.5)),
                       "fill": ["MEAN", "ZERO"][case % 2]},
              "sfma": {"enabled": case % 5 != 4, "threshold": 0.1,
                       "spread": ["RANGE", "STD"][case % 2]}}
        top, effort = pylayers.conv_forward(x, W, b, oracle_geometry(geo), st)
        check_invariant(effort)
        assert effort["outputs"] == top.size and (top >= 0).all()
        assert effort["ops_spet"] + effort["sdss_filled"] <= top.size

    for transpose in (False, True):
        x = np.abs(rng.standard_normal((4, 20)))
        W = rng.standard_normal((20, 7) if transpose else (7, 20))
        st = {"relu": True, "spet": {"enabled": True, "fraction": 0.3, "exact": True,
                                     "check_interval": 3, "ordering": "PER_OUTPUT"}}
        _, effort = pylayers.ip_forward(x, W, rng.standard_normal(7), st, transpose=transpose)
        check_invariant(effort)


# ---------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------

def test_settings_defaults_and_round_trip():
    full = settings.normalize({})
    assert full == settings.DEFAULTS and full is not settings.DEFAULTS
    assert full["sdss"]["range_threshold"] == full["sfma"]["kernel_threshold"] == float("inf")
    given = {"relu": True, "spet": {"enabled": True, "fraction": 1, "ordering": "PER_OUTPUT"},
             "sfma": {"spread": "STD"}}
    normalized = settings.normalize(given)
    assert normalized["spet"] == {"enabled": True, "fraction": 1.0, "threshold": 0.0,
                                  "ordering": "PER_OUTPUT", "exact": False,
                                  "check_interval": 16, "gate": "THRESHOLD",
                                  "bound_scale": 1.0}
    assert normalized["sdss"] == settings.DEFAULTS["sdss"]
    assert settings.normalize(normalized) == normalized
    assert settings.from_param_str(settings.to_json(given)) == normalized
    assert settings.from_param_str("") == full


@pytest.mark.parametrize("bad, message", [
    ({"spet": {"fraction": 0}}, r"spet.fraction must be in \(0, 1\], got 0"),
    ({"spet": {"fraction": 1.5}}, "spet.fraction"),
    ({"spet": {"check_interval": 0}}, r"spet.check_interval must be in \[1, 2147483647\], got 0"),
    ({"spet": {"check_interval": 2 ** 31}}, "spet.check_interval must be in"),
    ({"spet": {"check_interval": 2.5}}, "spet.check_interval must be an integer"),
    ({"sdss": {"stride": 0}}, r"sdss.stride must be in \[1, 2147483647\], got 0"),
    ({"sdss": {"stride": 2 ** 32 - 1}}, "sdss.stride must be in"),
    ({"sdss": {"threshold": -0.1}}, "sdss.threshold must be finite and >= 0"),
    ({"sdss": {"threshold": float("inf")}}, "sdss.threshold must be finite and >= 0, got inf"),
    ({"sfma": {"threshold": -1}}, "sfma.threshold must be finite and >= 0"),
    ({"sfma": {"threshold": float("inf")}}, "sfma.threshold must be finite and >= 0, got inf"),
    ({"spet": {"threshold": float("nan")}}, "spet.threshold must be a number"),
    ({"spet": {"enabled": True}}, "spet.enabled requires relu"),
    ({"spet": {"exact": True}}, "spet.exact requires relu"),
    ({"sdss": {"enabled": True}}, "sdss.enabled requires relu"),
    ({"spet": {"ordering": "PER_IMAGE"}}, "spet.ordering must be one of"),
    ({"sdss": {"fill": "mean"}}, "sdss.fill must be one of"),
    ({"sfma": {"spread": "MAD"}}, "sfma.spread must be one of"),
    ({"relu": 1}, "relu must be true or false"),
    ({"speed": 1}, "unknown DyVE setting 'speed'"),
    ({"spet": {"frac": 0.5}}, "unknown DyVE setting 'spet.frac'"),
    ({"spet": 0.5}, "spet must be an object"),
    ({"spet": {"gate": "bound"}}, "spet.gate must be one of THRESHOLD, BOUND"),
    ({"spet": {"bound_scale": -0.5}}, "spet.bound_scale must be finite and >= 0, got -0.5"),
    ({"spet": {"bound_scale": "1"}}, "spet.bound_scale must be a number"),
    ({"relu": True, "spet": {"gate": "BOUND"}}, "spet.gate BOUND needs spet.enabled"),
    ({"relu": True, "spet": {"gate": "BOUND", "exact": True}},
     "spet.gate BOUND needs spet.enabled"),
    ({"relu": True, "spet": {"enabled": True, "gate": "BOUND", "ordering": "PER_OUTPUT"}},
     "spet.gate BOUND needs spet.ordering PER_LAYER or INTERLEAVED"),
    ({"spet": {"ordering": "interleaved"}}, "spet.ordering must be one of"),
    ({"sfma": {"spread": "VAR"}}, "sfma.spread must be one of RANGE, STD, VARIANCE"),
    ({"sdss": {"range_threshold": -0.5}}, "sdss.range_threshold must be >= 0, got -0.5"),
    ({"sdss": {"range_threshold": float("nan")}}, "sdss.range_threshold must be a number"),
    ({"sdss": {"range_threshold": "inf"}}, "sdss.range_threshold must be a number"),
    ({"sfma": {"kernel_threshold": -1}}, "sfma.kernel_threshold must be >= 0, got -1"),
    ({"sfma": {"kernel_threshold": float("-inf")}}, "sfma.kernel_threshold must be >= 0"),
    ({"sfma": {"kernel_threshold": float("nan")}}, "sfma.kernel_threshold must be a number"),
])
def test_settings_reject_invalid(bad, message):
    with pytest.raises(ValueError, match=message):
        settings.normalize(bad)


def test_from_param_str_rejects_bad_json():
    with pytest.raises(ValueError, match="not valid JSON"):
        settings.from_param_str("{relu: true}")


def test_ip_refuses_feature_knobs():
    for knob in ("sdss", "sfma"):
        with pytest.raises(ValueError, match=f"{knob} is for convolution layers only"):
            pylayers.ip_forward(np.ones((1, 3)), np.ones((2, 3)), None,
                                {"relu": True, knob: {"enabled": True}})
    with pytest.raises(ValueError, match="spet.gate BOUND is for convolution layers only"):
        pylayers.ip_forward(np.ones((1, 3)), np.ones((2, 3)), None, bound_settings())
