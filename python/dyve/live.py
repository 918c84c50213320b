"""DyVE layers of a live pycaffe net: effort counters and knob settings.

Changing settings here keeps the loaded weights (no net reload), which is what the
threshold tuner relies on. Settings are dicts in the `dyve.settings` format, i.e. the
field names of `DyveParameter` (see docs/knobs.md).
"""
import math

from google.protobuf import json_format

import caffe
from caffe.proto import caffe_pb2

from dyve import settings as dyve_settings


def dyve_layers(net):
    """{layer name: layer} of the net's C++ DyVE layers, in net order."""
    return {name: layer for name, layer in zip(net._layer_names, net.layers)
            if layer.type in dyve_settings.DYVE_TYPES}


def _layer(net, name):
    layers = dyve_layers(net)
    if name not in layers:
        raise KeyError(f"no DyVE layer named '{name}' in this net (DyVE layers: "
                       f"{', '.join(layers) or 'none'})")
    return layers[name]


def _json_floats(value):
    """json_format's spelling of non-finite floats ("Infinity", "-Infinity")."""
    if isinstance(value, dict):
        return {k: _json_floats(v) for k, v in value.items()}
    if isinstance(value, float) and math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _from_json_floats(value):
    """Back from json_format's strings for non-finite floats."""
    if isinstance(value, dict):
        return {k: _from_json_floats(v) for k, v in value.items()}
    if value in ("Infinity", "-Infinity", "NaN"):
        return float(value.replace("Infinity", "inf"))
    return value


def settings_to_proto(settings, layer_type=None):
    """A DyveParameter message from a settings dict (validated first)."""
    return json_format.ParseDict(_json_floats(dyve_settings.normalize(settings, layer_type)),
                                 caffe_pb2.DyveParameter())


def proto_to_settings(message):
    """A complete settings dict from a DyveParameter message."""
    as_dict = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return dyve_settings.normalize(_from_json_floats(as_dict))


def get_settings(net, name):
    message = caffe_pb2.DyveParameter()
    message.ParseFromString(caffe._caffe._dyve_get_param(_layer(net, name)))
    return proto_to_settings(message)


def set_settings(net, name, settings):
    """Applies knob settings to layer `name`; raises ValueError naming layer and field."""
    layer = _layer(net, name)
    try:
        message = settings_to_proto(settings, layer.type)
    except ValueError as error:
        raise ValueError(f"layer '{name}': {error}") from None
    caffe._caffe._dyve_set_param(layer, message.SerializeToString())


def effort(net, name=None):
    """Counters of one DyVE layer, or {name: counters} of all of them."""
    if name is not None:
        return dict(caffe._caffe._dyve_effort(_layer(net, name)))
    return {layer_name: dict(caffe._caffe._dyve_effort(layer))
            for layer_name, layer in dyve_layers(net).items()}


def kernel_paths(net, name):
    """{"dense": ..., "prefix": ...}: the kernels DyveConvolution `name` ran on its last
    forward pass (docs/kernels.md): the knobs-off path ("oneDNN jit:avx2", or "caffe" for
    im2col + BLAS) and where SPET's prefix sums came from ("oneDNN ..." or "rows").
    {} for a DyveInnerProduct."""
    return dict(caffe._caffe._dyve_kernel_paths(_layer(net, name)))


def reset_effort(net):
    for layer in dyve_layers(net).values():
        caffe._caffe._dyve_reset_effort(layer)
