"""The stock-to-DyVE graph rewrite: a stock NetParameter in, its DyVE form out.

Every Convolution / InnerProduct whose output is rectified becomes the DyVE layer of
dyve.settings.STOCK_TO_DYVE with the same parameters and blobs (so a stock caffemodel
loads into the result unchanged) and a `dyve_param` validated by dyve.settings.
"""
import copy

from caffe.proto import caffe_pb2
from google.protobuf import json_format

from dyve import settings as dyve_settings


def supported():
    """Whether the built caffe_pb2 has LayerParameter.dyve_param (needed for DyVE forms)."""
    return "dyve_param" in caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name


def _readers(net, index, blob):
    """Indices of the layers after `index` that read `blob`, up to (including) one that
    rewrites it out of place (after that the name holds something else)."""
    found = []
    for j in range(index + 1, len(net.layer)):
        layer = net.layer[j]
        if blob in layer.bottom:
            found.append(j)
        if blob in layer.top and blob not in layer.bottom:
            break
    return found


def _through_relu(net, index):
    """Whether the single output of layer `index` is read first by a ReLU that rectifies
    it for every reader: in place, or out of place as its only reader."""
    layer = net.layer[index]
    readers = _readers(net, index, layer.top[0]) if len(layer.top) == 1 else []
    if not readers or net.layer[readers[0]].type != "ReLU":
        return False
    relu = net.layer[readers[0]]
    return relu.top[0] == layer.top[0] or len(readers) == 1


def _rectified(net, index):
    """Whether the output of layer `index` only reaches the rest of the net through a
    ReLU, directly or after a max-pool (max commutes with ReLU: relu(max x) =
    max(relu x)), so fusing the ReLU into the layer changes nothing downstream."""
    if _through_relu(net, index):
        return True
    layer = net.layer[index]
    readers = _readers(net, index, layer.top[0]) if len(layer.top) == 1 else []
    if len(readers) != 1:
        return False
    pool = net.layer[readers[0]]
    return (pool.type == "Pooling" and len(pool.top) == 1
            and pool.pooling_param.pool == caffe_pb2.PoolingParameter.MAX
            and _through_relu(net, readers[0]))


def dyve_layers(net):
    """Names of the layers of `net` (a NetParameter) that the DyVE form converts: every
    Convolution / InnerProduct whose output is rectified (see _rectified)."""
    return [layer.name for i, layer in enumerate(net.layer)
            if layer.type in dyve_settings.STOCK_TO_DYVE and _rectified(net, i)]


def _non_default(values, defaults):
    """The fields of `values` (a normalized settings dict, or one of its knobs) that differ
    from `defaults`; a knob with none left out."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            value = _non_default(value, defaults[key])
            if value:
                out[key] = value
        elif value != defaults[key]:
            out[key] = value
    return out


def _dyve_param(knobs, layer_type):
    """The dyve_param dict of a layer of stock type `layer_type`: `knobs` with relu forced
    on, validated by dyve.settings.normalize for the layer kind, and only its non-default
    fields, so that all knobs off gives `relu: true` alone."""
    if knobs is None:
        knobs = {}
    if not isinstance(knobs, dict):
        raise ValueError(f"must be a dict, got {type(knobs).__name__}")
    if "relu" in knobs:
        dyve_settings.normalize({"relu": knobs["relu"]})  # its type; the value is forced
    normalized = dyve_settings.normalize(dict(knobs, relu=True), layer_type)
    return _non_default(normalized, dyve_settings.DEFAULTS)


def to_dyve(net, settings=None):
    """The DyVE form of the stock NetParameter `net` (a new message; `net` is untouched).

    Every layer and layer name is kept, ReLU layers included (they are no-ops on the
    rectified output). Each layer of dyve_layers(net) becomes DyveConvolution /
    DyveInnerProduct (dyve.settings.STOCK_TO_DYVE) with the same
    param/convolution_param/inner_product_param and a `dyve_param` made from
    settings[name], a dict using the field names of DyveParameter
    (caffe_dyve/proto/messages.proto), e.g. {"conv2": {"spet": {"enabled": True,
    "fraction": 0.5}}}; enums as strings ("PER_OUTPUT"). `relu` is always forced to true
    (SPET and SDSS need rectified outputs). Each layer's settings are checked by
    dyve.settings.normalize with the layer's kind (no SDSS, SFMA or BOUND gate on an inner
    product) and only their non-default fields are written. Raises ValueError naming the
    layer for settings on a layer that does not exist or is not DyVE-able, and naming the
    layer and the field for a bad setting.
    """
    if not supported():
        raise RuntimeError("this caffe_pb2 has no LayerParameter.dyve_param: rebuild Caffe "
                           "with caffe_dyve's caffe.proto")
    settings = dict(settings or {})
    out = copy.deepcopy(net)
    convertible = set(dyve_layers(out))
    names = {layer.name for layer in out.layer}
    for name in settings:
        if name not in names:
            raise ValueError(f"DyVE settings for layer '{name}', which is not in net "
                             f"'{net.name}'")
        if name not in convertible:
            raise ValueError(f"DyVE settings for layer '{name}' of net '{net.name}', which is "
                             f"not a DyVE layer (one of: {', '.join(sorted(convertible))})")
    for layer in out.layer:
        if layer.name not in convertible:
            continue
        try:
            param = _dyve_param(settings.get(layer.name), layer.type)
        except ValueError as error:
            raise ValueError(f"bad DyVE settings for layer '{layer.name}': {error}") from None
        json_format.ParseDict(param, layer.dyve_param)
        layer.type = dyve_settings.STOCK_TO_DYVE[layer.type]
    if out.name:
        out.name = out.name + "_DyVE"
    return out
