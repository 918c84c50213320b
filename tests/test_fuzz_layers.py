"""A seeded differential fuzz of DyveConvolution against Caffe's own Convolution on random
shapes (group, stride, pad, dilation included), on each dispatch: the SIMD and oneDNN
kernels this CPU picks, the portable kernels with oneDNN held to SSE4.1, and Caffe's
dense path (DYVE_DENSE=caffe): knobs off == stock, exact mode == relu(stock), the BOUND
gate at scale 1 == relu(stock) on rectified inputs. Also: a NaN anywhere in exact mode's
input is refused with a message, not silently turned into 0."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

CASES_PER_RUN = 150
SEED = 20261203
TOLERANCE = 1e-4  # relative to the largest |stock output| of the case

NET = """name: "fuzz"
layer {{ name: "data" type: "Input" top: "data"
        input_param {{ shape {{ dim: {n} dim: {c} dim: {h} dim: {w} }} }} }}
layer {{ name: "stock" type: "Convolution" bottom: "data" top: "stock"
        convolution_param {{ {geometry} }} }}
layer {{ name: "dyve" type: "DyveConvolution" bottom: "data" top: "dyve"
        convolution_param {{ {geometry} }} dyve_param {{ relu: false }} }}
"""


def _case(rng):
    group = int(rng.choice([1, 1, 2, 3]))
    c = group * int(rng.randint(1, 5))
    o = group * int(rng.randint(1, 4))
    k, dilation = int(rng.randint(1, 4)), int(rng.choice([1, 1, 2]))
    pad, stride = int(rng.randint(0, 2)), int(rng.choice([1, 1, 2]))
    reach = dilation * (k - 1) + 1
    h = int(rng.randint(max(1, reach - 2 * pad), reach + 6))
    w = int(rng.randint(max(1, reach - 2 * pad), reach + 6))
    geometry = (f"num_output: {o} kernel_size: {k} stride: {stride} pad: {pad} "
                f"dilation: {dilation} group: {group}")
    return dict(n=int(rng.randint(1, 3)), c=c, h=h, w=w, geometry=geometry)


def run_cases(seed, count, out_path):
    """Worker: `count` random cases; writes {check: [max error, ...]} as JSON."""
    import tempfile
    os.environ.setdefault("GLOG_minloglevel", "2")
    import caffe
    from dyve import live
    rng = np.random.RandomState(seed)
    errors = {"knobs off": [], "exact": [], "bound s=1": []}
    for i in range(count):
        case = _case(rng)
        with tempfile.NamedTemporaryFile("w", suffix=".prototxt") as f:
            f.write(NET.format(**case))
            f.flush()
            net = caffe.Net(f.name, caffe.TEST)
        for blob_stock, blob_dyve in zip(net.params["stock"], net.params["dyve"]):
            blob_stock.data[...] = rng.randn(*blob_stock.data.shape)
            blob_dyve.data[...] = blob_stock.data
        x = rng.randn(*net.blobs["data"].data.shape).astype(np.float32)
        checks = (("knobs off", x, {"relu": False}),
                  ("exact", np.abs(x), {"relu": True, "spet": {
                      "exact": True, "check_interval": int(rng.randint(1, 5))}}),
                  ("bound s=1", np.abs(x), {"relu": True, "spet": {
                      "enabled": True, "gate": "BOUND", "bound_scale": 1.0, "threshold": 0.0,
                      "fraction": float(rng.choice([0.25, 0.5, 0.75]))}}))
        for name, data, settings in checks:
            live.set_settings(net, "dyve", settings)
            net.blobs["data"].data[...] = data
            net.forward()
            ref = net.blobs["stock"].data
            ref = ref if name == "knobs off" else np.maximum(ref, 0)
            scale = max(float(np.abs(ref).max()), 1e-6)
            errors[name].append(float(np.abs(net.blobs["dyve"].data - ref).max()) / scale)
    with open(out_path, "w") as f:
        json.dump(errors, f)


# The dispatch variants: the project's SIMD kernels and oneDNN's (knobs off) as this CPU
# picks them; the portable kernels with oneDNN held to its lowest x86 ISA (SSE4.1, what a
# CPU without AVX gets); Caffe's im2col + BLAS dense path instead of oneDNN.
DISPATCH = {"dispatched": {},
            "portable": {"DYVE_SIMD": "portable", "ONEDNN_MAX_CPU_ISA": "SSE41"},
            "caffe dense": {"DYVE_DENSE": "caffe"}}


def _run(tmp_path, simd):
    out = tmp_path / f"fuzz_{simd.replace(' ', '_')}.json"
    env = dict(os.environ)
    for name in ("DYVE_SIMD", "ONEDNN_MAX_CPU_ISA", "DYVE_DENSE"):
        env.pop(name, None)
    env.update(DISPATCH[simd])
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path.insert(0, {here!r}); import test_fuzz_layers as t; "
            f"t.run_cases({SEED}, {CASES_PER_RUN}, {str(out)!r})")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("simd", list(DISPATCH))
def test_random_shapes_match_stock(tmp_path, simd):
    errors = _run(tmp_path, simd)
    for check, values in errors.items():
        assert len(values) == CASES_PER_RUN
        worst = int(np.argmax(values))
        assert values[worst] <= TOLERANCE, f"{check}: case {worst} off by {values[worst]:.3g}"


def test_nan_in_exact_mode_input_is_refused(tmp_path):
    code = """
import numpy as np, caffe, tempfile
from dyve import live
net_text = '''%s'''
with tempfile.NamedTemporaryFile("w", suffix=".prototxt") as f:
    f.write(net_text)
    f.flush()
    net = caffe.Net(f.name, caffe.TEST)
live.set_settings(net, "dyve", {"relu": True, "spet": {"exact": True}})
x = np.ones(net.blobs["data"].data.shape, np.float32)
x.flat[7] = np.nan  # not the first element
net.blobs["data"].data[...] = x
net.forward()
""" % NET.format(n=1, c=2, h=5, w=5, geometry="num_output: 2 kernel_size: 3")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0, "a NaN input passed exact mode's check"
    assert "layer 'dyve'" in proc.stderr and "nan" in proc.stderr, proc.stderr[-2000:]
