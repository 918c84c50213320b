"""Every bad dyve_param is refused naming the layer and the field, through all three front
ends: a prototxt loaded by pycaffe (a CHECK in LayerSetUp: run in a subprocess), the
caffe CLI, and dyve.live.set_settings on a live net. No crash without a message, no
hang (each case has a timeout), and a refused set_settings leaves the layer unchanged."""
import os
import subprocess
import sys

import pytest

from dyve import caffe_io, live, tools

TIMEOUT_S = 60

NET = """name: "bad"
layer {{ name: "data" type: "Input" top: "data"
        input_param {{ shape {{ dim: 1 dim: 3 dim: 7 dim: 7 }} }} }}
layer {{ name: "conv" type: "DyveConvolution" bottom: "data" top: "conv"
        convolution_param {{ num_output: 4 kernel_size: 3 }} {conv} }}
layer {{ name: "ip" type: "DyveInnerProduct" bottom: "conv" top: "ip"
        inner_product_param {{ num_output: 3 }} {ip} }}
"""

# (case, layer, dyve_param text, the same as a settings dict, a word of the field's name)
CASES = [
    ("fraction 0", "conv", "relu: true spet { enabled: true fraction: 0 }",
     {"relu": True, "spet": {"enabled": True, "fraction": 0.0}}, "fraction"),
    ("fraction 2", "ip", "relu: true spet { enabled: true fraction: 2 }",
     {"relu": True, "spet": {"enabled": True, "fraction": 2.0}}, "fraction"),
    ("check_interval 0", "conv", "relu: true spet { exact: true check_interval: 0 }",
     {"relu": True, "spet": {"exact": True, "check_interval": 0}}, "check_interval"),
    ("check_interval 2^31", "conv",
     "relu: true spet { exact: true check_interval: 2147483648 }",
     {"relu": True, "spet": {"exact": True, "check_interval": 2 ** 31}}, "check_interval"),
    ("check_interval 2^32-1", "ip",
     "relu: true spet { exact: true check_interval: 4294967295 }",
     {"relu": True, "spet": {"exact": True, "check_interval": 2 ** 32 - 1}},
     "check_interval"),
    ("sdss stride 0", "conv", "relu: true sdss { enabled: true stride: 0 }",
     {"relu": True, "sdss": {"enabled": True, "stride": 0}}, "stride"),
    ("sdss stride 2^31", "conv", "relu: true sdss { enabled: true stride: 2147483648 }",
     {"relu": True, "sdss": {"enabled": True, "stride": 2 ** 31}}, "stride"),
    ("sdss stride 2^32-1", "conv", "relu: true sdss { enabled: true stride: 4294967295 }",
     {"relu": True, "sdss": {"enabled": True, "stride": 2 ** 32 - 1}}, "stride"),
    ("sdss stride over the map", "conv", "relu: true sdss { enabled: true stride: 6 }",
     {"relu": True, "sdss": {"enabled": True, "stride": 6}}, "stride"),
    ("spet threshold inf", "conv", "relu: true spet { enabled: true threshold: inf }",
     {"relu": True, "spet": {"enabled": True, "threshold": float("inf")}}, "threshold"),
    ("sdss threshold inf", "conv", "relu: true sdss { enabled: true threshold: inf }",
     {"relu": True, "sdss": {"enabled": True, "threshold": float("inf")}}, "threshold"),
    ("sfma threshold inf", "conv", "sfma { enabled: true threshold: inf }",
     {"sfma": {"enabled": True, "threshold": float("inf")}}, "threshold"),
    ("sdss threshold -1", "conv", "relu: true sdss { threshold: -1 }",
     {"relu": True, "sdss": {"threshold": -1.0}}, "threshold"),
    ("sfma threshold nan", "conv", "sfma { threshold: nan }",
     {"sfma": {"threshold": float("nan")}}, "threshold"),
    ("bound scale -1", "conv", "relu: true spet { enabled: true bound_scale: -1 }",
     {"relu": True, "spet": {"enabled": True, "bound_scale": -1.0}}, "bound_scale"),
    ("bound gate without spet", "conv", "relu: true spet { gate: BOUND }",
     {"relu": True, "spet": {"gate": "BOUND"}}, "gate"),
    ("sdss on an inner product", "ip", "relu: true sdss { enabled: true }",
     {"relu": True, "sdss": {"enabled": True}}, "sdss"),
    ("sfma on an inner product", "ip", "sfma { enabled: true }",
     {"sfma": {"enabled": True}}, "sfma"),
    ("spet without relu", "conv", "spet { enabled: true }",
     {"spet": {"enabled": True}}, "relu"),
    ("sdss without relu", "conv", "sdss { enabled: true }",
     {"sdss": {"enabled": True}}, "relu"),
    ("range threshold -1", "conv",
     "relu: true sdss { enabled: true range_threshold: -1 }",
     {"relu": True, "sdss": {"enabled": True, "range_threshold": -1.0}}, "range_threshold"),
    ("kernel threshold nan", "conv", "sfma { enabled: true kernel_threshold: nan }",
     {"sfma": {"enabled": True, "kernel_threshold": float("nan")}}, "kernel_threshold"),
]
IDS = [c[0] for c in CASES]
LAYER_TYPE = {"conv": "DyveConvolution", "ip": "DyveInnerProduct"}


def _prototxt(tmp_path, layer, text):
    params = {"conv": "dyve_param { relu: true }", "ip": "dyve_param { relu: true }"}
    params[layer] = f"dyve_param {{ {text} }}"
    path = tmp_path / "bad.prototxt"
    path.write_text(NET.format(**params))
    return str(path)


def _refused(proc, layer, needle):
    out = proc.stderr + proc.stdout
    assert proc.returncode != 0, f"accepted:\n{out[-2000:]}"
    assert proc.returncode not in (-11, 139), f"crashed (SIGSEGV):\n{out[-2000:]}"
    lines = [line for line in out.splitlines() if f"layer '{layer}'" in line]
    assert lines and any(needle in line for line in lines), out[-2000:]


@pytest.mark.parametrize("case,layer,text,settings,needle", CASES, ids=IDS)
def test_prototxt_through_pycaffe(tmp_path, case, layer, text, settings, needle):
    path = _prototxt(tmp_path, layer, text)
    code = f"import caffe; caffe.Net({path!r}, caffe.TEST)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=TIMEOUT_S, env=dict(os.environ, GLOG_minloglevel="0"))
    _refused(proc, layer, needle)


@pytest.mark.parametrize("case,layer,text,settings,needle", CASES, ids=IDS)
def test_prototxt_through_the_caffe_cli(tmp_path, case, layer, text, settings, needle):
    path = _prototxt(tmp_path, layer, text)
    proc = subprocess.run([tools.caffe_tool("caffe"), "time", "-model", path,
                           "-iterations", "1"], capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    _refused(proc, layer, needle)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    path = tmp_path_factory.mktemp("live") / "net.prototxt"
    path.write_text(NET.format(conv="dyve_param { relu: true }",
                               ip="dyve_param { relu: true }"))
    return caffe_io.load_net(str(path))


@pytest.mark.parametrize("case,layer,text,settings,needle", CASES, ids=IDS)
def test_live_set_settings(net, case, layer, text, settings, needle):
    before = live.get_settings(net, layer)
    with pytest.raises(ValueError) as error:
        live.set_settings(net, layer, settings)
    message = str(error.value)
    assert f"layer '{layer}'" in message and needle in message, message
    assert live.get_settings(net, layer) == before


STOCK_WITH_KNOBS = """name: "stock_knobs"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 1 dim: 3 dim: 7 dim: 7 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 }
        dyve_param { relu: true spet { enabled: true } sdss { enabled: true } } }
"""


def test_dyve_param_on_a_stock_layer_is_refused(tmp_path):
    path = tmp_path / "stock_knobs.prototxt"
    path.write_text(STOCK_WITH_KNOBS)
    code = f"import caffe; caffe.Net({str(path)!r}, caffe.TEST)"
    for command in ([sys.executable, "-c", code],
                    [tools.caffe_tool("caffe"), "time", "-model", str(path), "-iterations",
                     "1"]):
        proc = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
        _refused(proc, "conv", "dyve_param")
    with pytest.raises(caffe_io.InputError, match="Convolution layer 'conv' has a dyve_param"):
        caffe_io.read_net_param(str(path))
