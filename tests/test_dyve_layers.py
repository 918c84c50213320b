"""The C++ DyVE layers against the numpy oracle (dyve.pylayers), through pycaffe.

Outputs must agree to float32 rounding and the effort counters must be equal, integer
for integer, on random nets and settings and on real CIFAR-10 images. Also covered:
live settings and counters from Python, weights assigned after set-up, and the caffe
CLI on DyVE prototxts.
"""
import json
import os
import subprocess
import sys
import tarfile

import cv2
import numpy as np
import pytest
from google.protobuf import text_format

import caffe
from caffe.proto import caffe_pb2

from dyve import data, live, pylayers
from dyve.tools import caffe_tool

SHARED_CIFAR = os.path.join(data.shared_data_dir(), "cifar10-images.tar.gz")


def dyve_param_text(settings):
    return text_format.MessageToString(live.settings_to_proto(settings), as_one_line=True)


def conv_net(tmp_path, shape, geo, settings, name="net.prototxt"):
    kernel_h, kernel_w = geo["kernel_size"]
    text = f"""
layer {{ name: "x" type: "Input" top: "x" input_param {{ shape {{ {' '.join(f'dim: {d}' for d in shape)} }} }} }}
layer {{ name: "conv" type: "DyveConvolution" bottom: "x" top: "conv"
  convolution_param {{ num_output: {geo['num_output']} kernel_h: {kernel_h} kernel_w: {kernel_w}
    stride: {geo['stride']} pad: {geo['pad']} dilation: {geo['dilation']} group: {geo['group']}
    bias_term: {str(geo['bias_term']).lower()} }}
  dyve_param {{ {dyve_param_text(settings)} }} }}
"""
    path = tmp_path / name
    path.write_text(text)
    return caffe.Net(str(path), caffe.TEST)


def ip_net(tmp_path, shape, num_output, settings, transpose=False):
    text = f"""
layer {{ name: "x" type: "Input" top: "x" input_param {{ shape {{ {' '.join(f'dim: {d}' for d in shape)} }} }} }}
layer {{ name: "fc" type: "DyveInnerProduct" bottom: "x" top: "fc"
  inner_product_param {{ num_output: {num_output} transpose: {str(transpose).lower()} }}
  dyve_param {{ {dyve_param_text(settings)} }} }}
"""
    path = tmp_path / "ip.prototxt"
    path.write_text(text)
    return caffe.Net(str(path), caffe.TEST)


def random_case(rng):
    """A random convolution geometry, input and knob settings."""
    group = int(rng.choice([1, 1, 2, 3]))
    channels = group * int(rng.randint(1, 5))
    outputs = group * int(rng.randint(1, 4))
    kernel = [int(rng.randint(1, 4)), int(rng.randint(1, 4))]
    geo = dict(num_output=outputs, kernel_size=kernel, stride=int(rng.randint(1, 3)),
               pad=int(rng.randint(0, 2)), dilation=int(rng.randint(1, 3)), group=group,
               bias_term=bool(rng.rand() < 0.8))
    height, width = int(rng.randint(6, 12)), int(rng.randint(6, 12))
    shape = (int(rng.randint(1, 3)), channels, height, width)
    exact = bool(rng.rand() < 0.5)
    x = rng.uniform(0 if exact else -1, 1, shape)
    for n in range(shape[0]):  # nearly constant maps for SFMA to find
        for c in range(channels):
            if rng.rand() < 0.3:
                x[n, c] = abs(rng.uniform(-1, 1)) + rng.uniform(0, 0.05, (height, width))
    settings = {
        "relu": True,
        "spet": {"enabled": bool(rng.rand() < 0.6), "fraction": float(rng.choice([0.25, 0.5, 0.7, 1.0])),
                 "threshold": float(rng.uniform(-0.2, 0.3)),
                 "ordering": str(rng.choice(["PER_LAYER", "PER_OUTPUT"])), "exact": exact,
                 "check_interval": int(rng.choice([1, 3, 16]))},
        "sdss": {"enabled": bool(rng.rand() < 0.6), "stride": int(rng.randint(1, 4)),
                 "threshold": float(rng.uniform(0, 0.3)), "fill": str(rng.choice(["MEAN", "ZERO"]))},
        "sfma": {"enabled": bool(rng.rand() < 0.6), "threshold": float(rng.uniform(0, 0.06)),
                 "spread": str(rng.choice(["RANGE", "STD"]))},
    }
    # The BOUND gate needs approximate SPET and PER_LAYER; THRESHOLD ignores bound_scale.
    settings["spet"]["bound_scale"] = float(rng.choice([0.0, 0.25, 1.0]))
    if settings["spet"]["enabled"] and rng.rand() < 0.5:
        settings["spet"].update(gate="BOUND", ordering="PER_LAYER")
    # The paper's variants (drawn after the rest, so the draws above are unchanged).
    if rng.rand() < 0.35:
        settings["spet"]["ordering"] = "INTERLEAVED"      # with either gate
    if rng.rand() < 0.5:
        settings["sdss"]["range_threshold"] = float(rng.choice([0.0, rng.uniform(0, 0.3)]))
    if rng.rand() < 0.3:
        settings["sfma"]["spread"] = "VARIANCE"
        settings["sfma"]["threshold"] = float(rng.uniform(0, 0.002))
    if rng.rand() < 0.5:
        # around the kernels' sums of |w| (weights ~ N(0, 0.5): 0.4 per tap on average)
        settings["sfma"]["kernel_threshold"] = float(rng.uniform(0.2, 0.8) * kernel[0] * kernel[1])
    return shape, geo, x.astype(np.float32), settings


def run_conv(net, x, weights, bias):
    net.blobs["x"].data[...] = x
    net.params["conv"][0].data[...] = weights
    if bias is not None:
        net.params["conv"][1].data[...] = bias
    live.reset_effort(net)
    net.forward()
    return net.blobs["conv"].data.copy(), live.effort(net, "conv")


def expect_same(cpp_out, cpp_effort, oracle_out, oracle_effort):
    # float32 sums of hundreds of terms: the error scales with the outputs' magnitude.
    np.testing.assert_allclose(cpp_out, oracle_out, rtol=2e-5,
                               atol=2e-5 * max(1.0, float(np.abs(oracle_out).max())))
    oracle_effort = dict(oracle_effort, forward_passes=1)
    assert cpp_effort == oracle_effort


RANDOM_CASES = 60
# Further cases drawn the same way, then with approximate SPET in a per-layer or
# interleaved order on one group: the ones whose prefix oneDNN computes.
SPLIT_SEEDS = range(1000, 1030)


def check_random_case(tmp_path, seed):
    """Random case `seed` against the oracle; returns (the prefix path it ran, whether
    SPET splits its rows into one prefix and rest on one group, so that oneDNN can take
    the prefix: docs/kernels.md)."""
    rng = np.random.RandomState(seed)
    shape, geo, x, settings = random_case(rng)
    if seed in SPLIT_SEEDS:
        geo["group"] = 1
        settings["spet"].update(enabled=True, exact=False)
        if settings["spet"]["ordering"] == "PER_OUTPUT":
            settings["spet"]["ordering"] = "PER_LAYER"
    out_h, out_w = pylayers.conv_output_shape(shape[2], shape[3], pylayers.conv_geometry(geo))
    if out_h * out_w == 1:
        settings["sdss"]["enabled"] = False
    net = conv_net(tmp_path, shape, geo, settings)
    weights = rng.normal(0, 0.5, net.params["conv"][0].data.shape).astype(np.float32)
    bias = rng.normal(0, 0.2, geo["num_output"]).astype(np.float32) if geo["bias_term"] else None
    cpp_out, cpp_effort = run_conv(net, x, weights, bias)
    oracle_out, oracle_effort = pylayers.conv_forward(x, weights, bias, geo, settings)
    expect_same(cpp_out, cpp_effort, oracle_out, oracle_effort)
    spet = settings["spet"]
    splits = (spet["enabled"] and not spet["exact"] and spet["ordering"] != "PER_OUTPUT"
              and geo["group"] == 1)
    return live.kernel_paths(net, "conv")["prefix"], splits


@pytest.mark.parametrize("seed", [*range(RANDOM_CASES), *SPLIT_SEEDS])
def test_conv_matches_oracle_on_random_cases(tmp_path, seed):
    prefix_path, splits = check_random_case(tmp_path, seed)
    # make deps installs oneDNN (libdnnl-dev), so the build has it.
    assert prefix_path.startswith("oneDNN") == splits, prefix_path


def test_conv_matches_oracle_on_the_rows_path(tmp_path):
    """The random cases again where oneDNN is refused (DYVE_DENSE=caffe): SPET's prefix
    then comes from gathered rows, as for double blobs and builds without oneDNN."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys, json, pathlib; sys.path.insert(0, {here!r}); "
            f"import test_dyve_layers as t; "
            f"print(json.dumps([t.check_random_case(pathlib.Path({str(tmp_path)!r}), seed) "
            f"for seed in [*range(t.RANDOM_CASES), *t.SPLIT_SEEDS]]))")
    env = dict(os.environ, DYVE_DENSE="caffe", GLOG_minloglevel="2")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    paths = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(paths) == RANDOM_CASES + len(SPLIT_SEEDS)
    assert {path for path, _ in paths} == {"rows"}
    assert sum(splits for _, splits in paths) >= 40  # cases the kernel would take


@pytest.mark.parametrize("dense", ["onednn", "caffe"])
def test_conv_matches_oracle_split_over_threads(tmp_path, dense):
    """The random cases again at 3 BLAS threads (`make test` runs at 1) with every layer
    split (DYVE_SPLIT_MACS=0): their batches of 1 or 2 images split each image's
    positions over the threads instead, by rows of SDSS's grid (docs/kernels.md), on
    oneDNN's prefix in bands and on the rows."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys, json, pathlib; sys.path.insert(0, {here!r}); "
            f"import test_dyve_layers as t; from dyve import live; "
            f"print(json.dumps([t.check_random_case(pathlib.Path({str(tmp_path)!r}), seed) "
            f"for seed in [*range(t.RANDOM_CASES), *t.SPLIT_SEEDS]]))")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="3", DYVE_SPLIT_MACS="0",
               GLOG_minloglevel="2")  # these layers are far below the default
    if dense == "caffe":
        env["DYVE_DENSE"] = "caffe"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    paths = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(paths) == RANDOM_CASES + len(SPLIT_SEEDS)
    banded = [path for path, _ in paths if path.endswith(" in row bands")]
    if dense == "caffe":
        assert {path for path, _ in paths} == {"rows"}
    else:
        assert len(banded) >= 15, paths  # the prefix kernel in bands of grid rows (20)
        assert all(path.startswith("oneDNN") == splits for path, splits in paths)


@pytest.mark.parametrize("seed", range(16))
def test_inner_product_matches_oracle(tmp_path, seed):
    rng = np.random.RandomState(100 + seed)
    shape = (int(rng.randint(1, 5)), int(rng.randint(1, 4)), 3, 3)
    outputs, transpose, exact = int(rng.randint(1, 20)), bool(seed % 2), bool(rng.rand() < 0.5)
    settings = {"relu": True,
                "spet": {"enabled": bool(seed % 3 != 0), "fraction": float(rng.choice([0.2, 0.5, 1.0])),
                         "threshold": float(rng.uniform(-0.2, 0.3)),
                         "ordering": str(rng.choice(["PER_LAYER", "PER_OUTPUT"])),
                         "exact": exact, "check_interval": int(rng.choice([1, 4]))}}
    if rng.rand() < 0.4:
        settings["spet"]["ordering"] = "INTERLEAVED"
    net = ip_net(tmp_path, shape, outputs, settings, transpose)
    x = rng.uniform(0 if exact else -1, 1, shape).astype(np.float32)
    weights = rng.normal(0, 0.5, net.params["fc"][0].data.shape).astype(np.float32)
    bias = rng.normal(0, 0.2, outputs).astype(np.float32)
    net.blobs["x"].data[...] = x
    net.params["fc"][0].data[...] = weights
    net.params["fc"][1].data[...] = bias
    net.forward()
    oracle_out, oracle_effort = pylayers.ip_forward(x, weights, bias, settings, transpose=transpose)
    expect_same(net.blobs["fc"].data, live.effort(net, "fc"), oracle_out, oracle_effort)


def test_random_cases_draw_the_paper_variants():
    """The random cases above do exercise each new option (and its default)."""
    drawn = [random_case(np.random.RandomState(seed))[3] for seed in range(60)]

    def count(test):
        return sum(1 for st in drawn if test(st))
    assert count(lambda st: st["spet"]["enabled"] and st["spet"]["ordering"] == "INTERLEAVED") >= 5
    assert count(lambda st: st["spet"].get("gate") == "BOUND" and st["spet"]["ordering"] == "INTERLEAVED") >= 2
    assert count(lambda st: st["sdss"]["enabled"] and "range_threshold" in st["sdss"]) >= 5
    assert count(lambda st: st["sfma"]["enabled"] and st["sfma"]["spread"] == "VARIANCE") >= 5
    assert count(lambda st: st["sfma"]["enabled"] and "kernel_threshold" in st["sfma"]) >= 5


def single_conv(tmp_path, x, weights, bias, settings, pad=0, name="hand.prototxt"):
    geo = dict(num_output=weights.shape[0], kernel_size=list(weights.shape[2:]), stride=1,
               pad=pad, dilation=1, group=1, bias_term=bias is not None)
    net = conv_net(tmp_path, x.shape, geo, settings, name=name)
    cpp_out, cpp_effort = run_conv(net, x.astype(np.float32), weights.astype(np.float32),
                                   None if bias is None else bias.astype(np.float32))
    oracle_out, oracle_effort = pylayers.conv_forward(x, weights, bias, geo, settings)
    expect_same(cpp_out, cpp_effort, oracle_out, oracle_effort)
    return cpp_out, cpp_effort


def test_paper_variants_hand_cases(tmp_path):
    """The hand-counted cases of test_pylayers, through the C++ layer."""
    # SDSS: a 4x4 map where the range test decides (see test_pylayers).
    x = np.full((1, 1, 4, 4), 7.0)
    for (y, x_), value in {(0, 0): 0.1, (0, 2): 0.4, (2, 0): 0.2, (2, 2): 0.25}.items():
        x[0, 0, y, x_] = value
    one = np.ones((1, 1, 1, 1))
    base = {"relu": True, "sdss": {"enabled": True, "stride": 2, "threshold": 0.5}}
    _, effort = single_conv(tmp_path, x, one, None, base)
    assert effort["sdss_filled"] == 12 and effort["ops_sdss"] == 42       # as before
    for range_threshold, filled, ops in ((0.2, 10, 21 + 42 + 15), (0.0, 5, 21 + 42 + 5)):
        st = dict(base, sdss=dict(base["sdss"], range_threshold=range_threshold))
        out, effort = single_conv(tmp_path, x, one, None, st)
        assert effort["sdss_filled"] == filled and effort["ops_sdss"] == ops
    assert out[0, 0, 0, 1] == 7 and out[0, 0, 1, 1] == 7

    # SFMA: channel kernels whose largest sum of |w| is just under / over the threshold.
    w = np.zeros((2, 2, 3, 3))
    w[0, 0, 0, 0], w[0, 0, 1, 1], w[1, 0, 0, 2] = 0.5, -0.5, -2.0      # K[0] = 2.0
    w[0, 1, 0, 0], w[1, 1, 2, 2] = 2.25, 0.25                          # K[1] = 2.25
    x = np.empty((2, 2, 5, 5))
    x[:, 0], x[:, 1] = 0.75, -1.5
    for kernel_threshold, maps in ((1.999, 0), (2.0, 2), (2.249, 2), (2.25, 4), (np.inf, 4)):
        st = {"sfma": {"enabled": True, "threshold": 0.0, "kernel_threshold": kernel_threshold}}
        _, effort = single_conv(tmp_path, x, w, np.array([0.5, -0.25]), st, pad=1)
        assert effort["sfma_maps"] == maps
    # VARIANCE: 15/256 for one 1.0 in a 4x4 map of zeros, over the STD threshold 0.1.
    x = np.zeros((1, 2, 4, 4))
    x[0, 0, 0, 0], x[0, 1] = 1.0, 2.0
    for spread, maps in (("STD", 1), ("VARIANCE", 2)):
        _, effort = single_conv(tmp_path, x, np.ones((1, 2, 3, 3)), None,
                                {"sfma": {"enabled": True, "threshold": 0.1, "spread": spread}})
        assert effort["sfma_maps"] == maps

    # INTERLEAVED on 5 channels: the prefix is {1, 3, 0} (f = 0.5), with either gate.
    rng = np.random.RandomState(21)
    x = np.maximum(rng.standard_normal((2, 5, 6, 6)), 0)
    w = rng.standard_normal((4, 5, 3, 3))
    b = rng.standard_normal(4) - 0.5
    st = {"relu": True, "spet": {"enabled": True, "fraction": 0.5, "ordering": "INTERLEAVED"}}
    out, effort = single_conv(tmp_path, x, w, b, st, pad=1)
    partial, _ = pylayers.conv_forward(x, w * np.array([1, 1, 0, 1, 0])[None, :, None, None],
                                       b, {"pad": 1}, {})
    assert effort["spet_zeroed"] == int((partial < 0).sum()) > 0
    st["spet"].update(gate="BOUND", bound_scale=1.0)
    out, effort = single_conv(tmp_path, x, w, b, st, pad=1)
    dense, _ = pylayers.conv_forward(x, w, b, {"pad": 1}, {"relu": True})
    np.testing.assert_allclose(out, dense, rtol=1e-4, atol=1e-4)     # s = 1: exact
    assert effort["spet_zeroed"] > 0


def test_inner_product_interleaved_hand_case(tmp_path):
    settings = {"relu": True, "spet": {"enabled": True, "fraction": 0.5, "ordering": "INTERLEAVED"}}
    net = ip_net(tmp_path, (1, 5), 2, settings)
    weights = np.array([[1.0, -2.0, 5.0, -2.0, 0.0], [1.0, 1.0, -1.0, 1.0, 0.0]], np.float32)
    net.blobs["x"].data[...] = 1.0
    net.params["fc"][0].data[...] = weights
    net.params["fc"][1].data[...] = 0.0
    net.forward()
    np.testing.assert_array_equal(net.blobs["fc"].data, [[0, 2]])
    effort = live.effort(net, "fc")
    assert effort["spet_zeroed"] == 1 and effort["macs_executed"] == 8
    oracle_out, oracle_effort = pylayers.ip_forward(np.ones((1, 5)), weights, np.zeros(2), settings)
    expect_same(net.blobs["fc"].data, effort, oracle_out, oracle_effort)


def cifar_images(count):
    """The first `count` JPEG images of the shared CIFAR-10 copy, as BGR float arrays."""
    images = []
    with tarfile.open(SHARED_CIFAR) as archive:
        for member in archive:
            if member.isfile() and member.name.endswith(".jpg"):
                data = np.frombuffer(archive.extractfile(member).read(), np.uint8)
                images.append(cv2.imdecode(data, cv2.IMREAD_COLOR).transpose(2, 0, 1))
                if len(images) == count:
                    break
    return np.array(images, dtype=np.float32)


@pytest.mark.skipif(not os.path.exists(SHARED_CIFAR), reason="needs ../shared/data")
def test_conv_matches_oracle_on_cifar10_activations(tmp_path):
    """cifar10_quick's conv1 -> pool -> relu on real images feeds a DyVE conv2."""
    rng = np.random.RandomState(7)
    images = cifar_images(4) - 120.0
    conv1 = rng.normal(0, 0.02, (32, 3, 5, 5)).astype(np.float32)
    first, _ = pylayers.conv_forward(images, conv1, None, dict(pad=2), {})
    pooled = first.reshape(4, 32, 16, 2, 16, 2).max(axis=(3, 5))
    activations = np.maximum(pooled, 0).astype(np.float32)
    geo = dict(num_output=32, kernel_size=[5, 5], stride=1, pad=2, dilation=1, group=1,
               bias_term=True)
    weights = rng.normal(0, 0.01, (32, 32, 5, 5)).astype(np.float32)
    bias = rng.normal(0, 0.1, 32).astype(np.float32)
    scale = float(np.percentile(activations, 75))
    # SFMA's threshold: the 30th percentile of the maps' ranges, so some maps qualify.
    ranges = activations.max(axis=(2, 3)) - activations.min(axis=(2, 3))
    flat_map = float(np.percentile(ranges, 30))
    cases = [
        {"relu": True, "spet": {"exact": True}},
        {"relu": True, "spet": {"enabled": True, "fraction": 0.5, "threshold": 0.0}},
        {"relu": True, "sdss": {"enabled": True, "stride": 2, "threshold": 0.0}},
        {"relu": True, "sfma": {"enabled": True, "threshold": flat_map}},
        # s = 1 zeroes nothing here (the bound is loose on 16 rest channels of 5x5 taps).
        {"relu": True, "spet": {"enabled": True, "fraction": 0.5, "gate": "BOUND", "bound_scale": 0.1},
         "sdss": {"enabled": True, "stride": 2, "threshold": 0.0}},
        {"relu": True, "spet": {"enabled": True, "exact": True, "threshold": -0.1 * scale},
         "sdss": {"enabled": True, "threshold": 0.1 * scale}, "sfma": {"enabled": True, "threshold": flat_map}},
    ]
    for index, settings in enumerate(cases):
        net = conv_net(tmp_path, activations.shape, geo, settings, name=f"case{index}.prototxt")
        cpp_out, cpp_effort = run_conv(net, activations, weights, bias)
        oracle_out, oracle_effort = pylayers.conv_forward(activations, weights, bias, geo, settings)
        expect_same(cpp_out, cpp_effort, oracle_out, oracle_effort)
        assert cpp_effort["macs_executed"] < cpp_effort["macs_dense"], settings


def test_live_settings_counters_and_reset(tmp_path):
    geo = dict(num_output=4, kernel_size=[3, 3], stride=1, pad=1, dilation=1, group=1, bias_term=True)
    net = conv_net(tmp_path, (2, 3, 8, 8), geo, {"relu": True})
    rng = np.random.RandomState(3)
    x = rng.uniform(0, 1, (2, 3, 8, 8)).astype(np.float32)
    weights = rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32)
    dense_out, dense_effort = run_conv(net, x, weights, np.full(4, -0.5, np.float32))
    assert dense_effort["macs_executed"] == dense_effort["macs_dense"] == 2 * 4 * 64 * 27

    live.set_settings(net, "conv", {"relu": True, "spet": {"exact": True}})
    assert live.get_settings(net, "conv")["spet"]["exact"] is True
    net.forward()
    exact_effort = live.effort(net, "conv")
    np.testing.assert_allclose(net.blobs["conv"].data, dense_out, rtol=1e-5, atol=1e-5)
    assert exact_effort["macs_executed"] < dense_effort["macs_dense"] + exact_effort["macs_dense"]
    assert exact_effort["exact_stopped"] > 0 and exact_effort["forward_passes"] == 2
    live.reset_effort(net)
    assert set(live.effort(net, "conv").values()) == {0}

    with pytest.raises(ValueError, match="'conv'.*spet.fraction"):
        live.set_settings(net, "conv", {"relu": True, "spet": {"enabled": True, "fraction": 0}})
    # Past the Python-side check, the C++ layer refuses on its own, naming layer and field.
    no_relu = caffe_pb2.DyveParameter()
    no_relu.sdss.enabled = True
    with pytest.raises(ValueError, match="DyveConvolution layer 'conv'.*sdss.*relu"):
        caffe._caffe._dyve_set_param(live.dyve_layers(net)["conv"], no_relu.SerializeToString())
    with pytest.raises(KeyError, match="no DyVE layer named 'nope'"):
        live.effort(net, "nope")
    assert live.get_settings(net, "conv")["spet"]["exact"] is True  # unchanged by the refusals


def test_weights_assigned_after_forward_rebuild_the_orders(tmp_path):
    geo = dict(num_output=6, kernel_size=[3, 3], stride=1, pad=0, dilation=1, group=1, bias_term=False)
    settings = {"relu": True, "spet": {"enabled": True, "fraction": 0.5, "threshold": 0.0}}
    net = conv_net(tmp_path, (1, 4, 7, 7), geo, settings)
    rng = np.random.RandomState(11)
    x = rng.uniform(-1, 1, (1, 4, 7, 7)).astype(np.float32)
    net.blobs["x"].data[...] = x
    net.forward()  # orders from the set-up filler
    for trial in range(2):
        # Channels 0 and 1 dominate in one trial, 2 and 3 in the other.
        scale = np.array([5, 5, 0.1, 0.1] if trial == 0 else [0.1, 0.1, 5, 5], np.float32)
        weights = (rng.normal(0, 1, (6, 4, 3, 3)) * scale[None, :, None, None]).astype(np.float32)
        cpp_out, cpp_effort = run_conv(net, x, weights, None)
        oracle_out, oracle_effort = pylayers.conv_forward(x, weights, None, geo, settings)
        expect_same(cpp_out, cpp_effort, oracle_out, oracle_effort)


def write_cli_nets(tmp_path):
    """A small Input net, stock and DyVE forms, plus the stock net's caffemodel."""
    body = """
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 2 dim: 3 dim: 8 dim: 8 }} }} }}
layer {{ name: "conv1" type: "{conv}" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 4 kernel_size: 3 pad: 1 weight_filler {{ type: "gaussian" std: 0.3 }}
    bias_filler {{ type: "constant" value: 0.1 }} }} {dyve} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc"
  inner_product_param {{ num_output: 2 weight_filler {{ type: "gaussian" std: 0.3 }} }} }}
"""
    stock = tmp_path / "stock.prototxt"
    stock.write_text(body.format(conv="Convolution", dyve=""))
    dyve = tmp_path / "dyve.prototxt"
    dyve.write_text(body.format(conv="DyveConvolution",
                                dyve="dyve_param { relu: true spet { exact: true } sdss { enabled: true } }"))
    net = caffe.Net(str(stock), caffe.TEST)
    weights = tmp_path / "stock.caffemodel"
    net.save(str(weights))
    return stock, dyve, weights


def test_caffe_cli_runs_dyve_prototxts(tmp_path):
    _stock, dyve, weights = write_cli_nets(tmp_path)
    env = dict(os.environ, GLOG_minloglevel="0", GLOG_logtostderr="1")
    tested = subprocess.run([caffe_tool("caffe"), "test", "-model", str(dyve), "-weights", str(weights),
                             "-iterations", "2"], capture_output=True, text=True, env=env, timeout=120)
    assert tested.returncode == 0, tested.stderr[-2000:]
    assert "Batch 1, fc = " in tested.stderr
    effort_lines = [line for line in tested.stderr.splitlines() if "DyVE effort conv1:" in line]
    assert len(effort_lines) == 1
    assert "images 4, MACs executed" in effort_lines[0]
    timed = subprocess.run([caffe_tool("caffe"), "time", "-model", str(dyve), "-iterations", "2"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert timed.returncode == 0, timed.stderr[-2000:]
    assert "conv1\tforward:" in timed.stderr and "DyVE effort conv1:" in timed.stderr


def test_stock_caffemodel_loads_into_dyve_net(tmp_path):
    stock, dyve, weights = write_cli_nets(tmp_path)
    stock_net = caffe.Net(str(stock), str(weights), caffe.TEST)
    dyve_net = caffe.Net(str(dyve), str(weights), caffe.TEST)
    x = np.random.RandomState(5).uniform(0, 1, (2, 3, 8, 8))  # exact mode wants x >= 0
    for net in (stock_net, dyve_net):
        net.blobs["data"].data[...] = x
        net.forward()
    np.testing.assert_array_equal(stock_net.params["conv1"][0].data, dyve_net.params["conv1"][0].data)
    # Exact mode is the stock ReLU output; SDSS (T = 0) only fills next to zeros.
    live.set_settings(dyve_net, "conv1", {"relu": True, "spet": {"exact": True}})
    dyve_net.forward()
    np.testing.assert_allclose(dyve_net.blobs["conv1"].data, stock_net.blobs["conv1"].data,
                               rtol=1e-5, atol=1e-6)
