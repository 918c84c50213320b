"""One settings contract on both sides: the Python validator (dyve.settings) accepts and
refuses exactly what the C++ one (ValidateDyveParameter, reached through SetDyveParam)
does, per layer kind; and the C++ counter order is the Python list."""
import math

import numpy as np
import pytest

import caffe
from caffe.proto import caffe_pb2
from google.protobuf import json_format, text_format

from dyve import caffe_io, live
from dyve import effort as dyve_effort
from dyve import settings as dyve_settings

NET = """
name: "parity"
input: "data" input_shape { dim: 1 dim: 2 dim: 5 dim: 5 }
layer { name: "conv" type: "DyveConvolution" bottom: "data" top: "conv"
        convolution_param { num_output: 3 kernel_size: 3 } dyve_param { relu: true } }
layer { name: "ip" type: "DyveInnerProduct" bottom: "conv" top: "ip"
        inner_product_param { num_output: 4 } dyve_param { relu: true } }
"""

ON = {"enabled": True}
# (case, settings); each runs on a convolution and on an inner product.
CASES = [
    ("defaults", {}),
    ("relu only", {"relu": True}),
    ("spet", {"relu": True, "spet": {"enabled": True, "fraction": 0.5}}),
    ("spet fraction 1", {"relu": True, "spet": {"enabled": True, "fraction": 1.0}}),
    ("spet fraction 0", {"relu": True, "spet": {"enabled": True, "fraction": 0.0}}),
    ("spet fraction 1.5", {"relu": True, "spet": {"fraction": 1.5}}),
    ("spet fraction -0.1", {"relu": True, "spet": {"fraction": -0.1}}),
    ("spet without relu", {"spet": ON}),
    ("exact", {"relu": True, "spet": {"exact": True}}),
    ("exact without relu", {"spet": {"exact": True}}),
    ("check_interval 0", {"relu": True, "spet": {"exact": True, "check_interval": 0}}),
    ("check_interval 1", {"relu": True, "spet": {"exact": True, "check_interval": 1}}),
    ("spet threshold -2", {"relu": True, "spet": {"enabled": True, "threshold": -2.0}}),
    ("spet threshold inf", {"relu": True, "spet": {"enabled": True, "threshold": math.inf}}),
    ("spet threshold -inf", {"relu": True, "spet": {"threshold": -math.inf}}),
    ("per-output order", {"relu": True, "spet": {"enabled": True, "ordering": "PER_OUTPUT"}}),
    ("bound gate", {"relu": True, "spet": {"enabled": True, "gate": "BOUND",
                                           "bound_scale": 0.25}}),
    ("bound gate scale 0", {"relu": True, "spet": {"enabled": True, "gate": "BOUND",
                                                   "bound_scale": 0.0}}),
    ("bound gate off", {"relu": True, "spet": {"gate": "BOUND"}}),
    ("bound gate per output", {"relu": True, "spet": {"enabled": True, "gate": "BOUND",
                                                      "ordering": "PER_OUTPUT"}}),
    ("bound scale -1", {"relu": True, "spet": {"enabled": True, "bound_scale": -1.0}}),
    ("bound scale inf", {"relu": True, "spet": {"enabled": True, "bound_scale": math.inf}}),
    ("sdss", {"relu": True, "sdss": ON}),
    ("sdss without relu", {"sdss": ON}),
    ("sdss stride 0", {"relu": True, "sdss": {"enabled": True, "stride": 0}}),
    ("sdss stride 0, off", {"sdss": {"stride": 0}}),
    ("sdss zero fill", {"relu": True, "sdss": {"enabled": True, "fill": "ZERO",
                                               "stride": 3, "threshold": 0.5}}),
    ("sdss threshold -1", {"relu": True, "sdss": {"threshold": -1.0}}),
    ("sfma", {"sfma": {"enabled": True, "threshold": 0.05}}),
    ("sfma std", {"relu": True, "sfma": {"enabled": True, "spread": "STD"}}),
    ("sfma threshold -0.5", {"sfma": {"threshold": -0.5}}),
    ("all knobs", {"relu": True, "spet": {"enabled": True, "fraction": 0.25},
                   "sdss": {"enabled": True}, "sfma": {"enabled": True}}),
    # The paper's variants (issue 12).
    ("interleaved order", {"relu": True, "spet": {"enabled": True, "ordering": "INTERLEAVED"}}),
    ("interleaved exact", {"relu": True, "spet": {"enabled": True, "exact": True,
                                                  "ordering": "INTERLEAVED"}}),
    ("bound gate interleaved", {"relu": True, "spet": {"enabled": True, "gate": "BOUND",
                                                       "ordering": "INTERLEAVED"}}),
    ("interleaved without relu", {"spet": {"enabled": True, "ordering": "INTERLEAVED"}}),
    ("sdss range_threshold", {"relu": True, "sdss": {"enabled": True, "range_threshold": 0.5}}),
    ("sdss range_threshold 0", {"relu": True, "sdss": {"enabled": True, "range_threshold": 0.0}}),
    ("sdss range_threshold inf", {"relu": True, "sdss": {"enabled": True,
                                                         "range_threshold": math.inf}}),
    ("sdss range_threshold, off", {"sdss": {"range_threshold": 2.0}}),
    ("sdss range_threshold -1", {"relu": True, "sdss": {"enabled": True,
                                                        "range_threshold": -1.0}}),
    ("sdss range_threshold -1, off", {"sdss": {"range_threshold": -1.0}}),
    ("sdss range_threshold -inf", {"sdss": {"range_threshold": -math.inf}}),
    ("sdss range_threshold nan", {"sdss": {"range_threshold": math.nan}}),
    ("sfma variance", {"sfma": {"enabled": True, "spread": "VARIANCE", "threshold": 0.01}}),
    ("sfma kernel_threshold", {"sfma": {"enabled": True, "kernel_threshold": 1.5}}),
    ("sfma kernel_threshold 0", {"sfma": {"enabled": True, "kernel_threshold": 0.0}}),
    ("sfma kernel_threshold inf", {"sfma": {"enabled": True, "kernel_threshold": math.inf}}),
    ("sfma kernel_threshold, off", {"sfma": {"kernel_threshold": 3.0}}),
    ("sfma kernel_threshold -0.5", {"sfma": {"enabled": True, "kernel_threshold": -0.5}}),
    ("sfma kernel_threshold -0.5, off", {"sfma": {"kernel_threshold": -0.5}}),
    ("sfma kernel_threshold nan", {"sfma": {"enabled": True, "kernel_threshold": math.nan}}),
    # Bounds of the counts the kernels hold in int, and finite main thresholds (issue 16).
    ("check_interval 2^31-1", {"relu": True, "spet": {"exact": True,
                                                      "check_interval": 2 ** 31 - 1}}),
    ("check_interval 2^31", {"relu": True, "spet": {"exact": True, "check_interval": 2 ** 31}}),
    ("check_interval 2^32-1, off", {"spet": {"check_interval": 2 ** 32 - 1}}),
    ("sdss stride 2^31, off", {"sdss": {"stride": 2 ** 31}}),
    ("sdss stride 2^32-1", {"relu": True, "sdss": {"enabled": True, "stride": 2 ** 32 - 1}}),
    ("sdss threshold inf", {"relu": True, "sdss": {"enabled": True, "threshold": math.inf}}),
    ("sdss threshold inf, off", {"sdss": {"threshold": math.inf}}),
    ("sfma threshold inf", {"sfma": {"enabled": True, "threshold": math.inf}}),
    ("paper variants", {"relu": True,
                        "spet": {"enabled": True, "fraction": 0.5, "ordering": "INTERLEAVED"},
                        "sdss": {"enabled": True, "threshold": 0.1, "range_threshold": 0.2},
                        "sfma": {"enabled": True, "spread": "VARIANCE", "threshold": 0.01,
                                 "kernel_threshold": 1.0}}),
]


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    path = tmp_path_factory.mktemp("parity") / "net.prototxt"
    path.write_text(NET)
    return caffe_io.load_net(str(path))


def _python_accepts(settings, layer_type):
    try:
        dyve_settings.normalize(settings, layer_type)
        return True
    except ValueError:
        return False


def _json_nan(value):
    """json_format's spelling of NaN (live._json_floats spells the infinities)."""
    if isinstance(value, dict):
        return {k: _json_nan(v) for k, v in value.items()}
    return "NaN" if isinstance(value, float) and math.isnan(value) else value


def _cpp_accepts(net, name, settings):
    """SetDyveParam on the live layer, with no Python validation in front of it."""
    layer = net.layers[list(net._layer_names).index(name)]
    message = json_format.ParseDict(_json_nan(live._json_floats(settings)),
                                    caffe_pb2.DyveParameter())
    try:
        caffe._caffe._dyve_set_param(layer, message.SerializeToString())
    except ValueError as error:
        assert f"layer '{name}'" in str(error), error  # names the layer
        return False
    caffe._caffe._dyve_set_param(layer, caffe_pb2.DyveParameter(relu=True)
                                 .SerializeToString())
    return True


@pytest.mark.parametrize("case,settings", CASES, ids=[c for c, _ in CASES])
@pytest.mark.parametrize("name,layer_type", [("conv", "DyveConvolution"),
                                             ("ip", "DyveInnerProduct")])
def test_python_and_cpp_validators_agree(net, name, layer_type, case, settings):
    assert _python_accepts(settings, layer_type) == _cpp_accepts(net, name, settings)


def test_the_table_has_both_verdicts_on_each_kind(net):
    for name, layer_type in (("conv", "DyveConvolution"), ("ip", "DyveInnerProduct")):
        verdicts = {_python_accepts(s, layer_type) for _, s in CASES}
        assert verdicts == {True, False}
    # The kind rules are what tell the two layer kinds apart.
    assert _python_accepts({"relu": True, "sdss": ON}, "DyveConvolution")
    assert not _python_accepts({"relu": True, "sdss": ON}, "DyveInnerProduct")


def test_numpy_scalars_are_numbers():
    s = dyve_settings.normalize({"relu": np.bool_(True), "spet": {
        "enabled": True, "fraction": np.float32(0.5), "check_interval": np.int64(8)}})
    assert s["spet"]["fraction"] == 0.5 and type(s["spet"]["fraction"]) is float
    assert s["spet"]["check_interval"] == 8 and type(s["spet"]["check_interval"]) is int
    assert s["relu"] is True
    with pytest.raises(ValueError, match="spet.check_interval must be an integer"):
        dyve_settings.normalize({"spet": {"check_interval": np.float64(2.0)}})


def test_cpp_counter_order_is_the_python_list(net):
    layers = live.dyve_layers(net)
    assert list(layers) == ["conv", "ip"]
    for name, layer in layers.items():
        assert list(caffe._caffe._dyve_effort(layer)) == list(dyve_effort.COUNTERS), name


def test_ops_formula_by_hand():
    counters = dict(dyve_effort.zero(), macs_dense=100, macs_executed=40, ops_spet=3,
                    ops_exact=2, ops_sdss=5, ops_sfma=1)
    assert dyve_effort.overhead(counters) == 11
    assert dyve_effort.ops(counters) == 51


@pytest.mark.parametrize("value", [math.inf, 0.25])
def test_new_thresholds_round_trip_through_the_live_layer(net, value):
    """set_settings / get_settings carry an inf (json_format's "Infinity") and a finite
    value of the paper's second thresholds; the prototxt text form parses back too."""
    given = {"relu": True, "sdss": {"enabled": True, "range_threshold": value},
             "sfma": {"enabled": True, "spread": "VARIANCE", "kernel_threshold": value},
             "spet": {"enabled": True, "ordering": "INTERLEAVED"}}
    live.set_settings(net, "conv", given)
    got = live.get_settings(net, "conv")
    assert got == dyve_settings.normalize(given)
    assert got["sdss"]["range_threshold"] == np.float32(value)
    assert got["sfma"]["kernel_threshold"] == np.float32(value)
    text = text_format.MessageToString(live.settings_to_proto(given))
    assert live.proto_to_settings(text_format.Parse(text, caffe_pb2.DyveParameter())) == got
    live.set_settings(net, "conv", {"relu": True})
    assert live.get_settings(net, "conv") == dyve_settings.normalize({"relu": True})
    assert live.get_settings(net, "conv")["sdss"]["range_threshold"] == math.inf


def test_proto_defaults_are_the_python_defaults():
    """messages.proto's [default = ...] values, as pycaffe's protobuf reads them."""
    assert live.proto_to_settings(caffe_pb2.DyveParameter()) == dyve_settings.DEFAULTS
    message = caffe_pb2.DyveParameter()
    assert math.isinf(message.sdss.range_threshold) and message.sdss.range_threshold > 0
    assert math.isinf(message.sfma.kernel_threshold) and message.sfma.kernel_threshold > 0
