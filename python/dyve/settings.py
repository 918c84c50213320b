"""DyVE knob settings as plain Python dicts (the `dyve_param` of docs/knobs.md).

The dict uses the field names of `DyveParameter` (caffe_dyve/proto/messages.proto) and
enum values as strings, so `google.protobuf.json_format.ParseDict` accepts a normalized
dict as is. Example:

    {"relu": True, "spet": {"enabled": True, "fraction": 0.5}}
"""
import copy
import json
import math
import numbers

import numpy as np

# Proto defaults (messages.proto). Every knob is off by default.
DEFAULTS = {
    "relu": False,
    "spet": {"enabled": False, "fraction": 0.5, "threshold": 0.0, "ordering": "PER_LAYER",
             "exact": False, "check_interval": 16, "gate": "THRESHOLD", "bound_scale": 1.0},
    "sdss": {"enabled": False, "stride": 2, "threshold": 0.0, "fill": "MEAN",
             "range_threshold": math.inf},
    "sfma": {"enabled": False, "threshold": 0.0, "spread": "RANGE",
             "kernel_threshold": math.inf},
}

ENUMS = {
    "spet.ordering": ("PER_LAYER", "PER_OUTPUT", "INTERLEAVED"),
    "spet.gate": ("THRESHOLD", "BOUND"),
    "sdss.fill": ("MEAN", "ZERO"),
    "sfma.spread": ("RANGE", "STD", "VARIANCE"),
}

UINT32_MAX = 2 ** 32 - 1

# SPET orderings with one channel order per group (GEMM-friendly; the BOUND gate's).
ONE_ORDER_PER_GROUP = ("PER_LAYER", "INTERLEAVED")
# The largest spet.check_interval and sdss.stride: the C++ kernels hold them in int
# (kMaxCount in dyve_layer.hpp; tests/test_settings.py checks both sides agree).
MAX_COUNT = 2 ** 31 - 1

# The one table of stock layer types and the DyVE layer that replaces each (same
# parameters and blobs, so a stock caffemodel loads into the DyVE form unchanged).
STOCK_TO_DYVE = {"Convolution": "DyveConvolution", "InnerProduct": "DyveInnerProduct"}
DYVE_TYPES = tuple(STOCK_TO_DYVE.values())
CONVOLUTION_TYPES = ("Convolution", "DyveConvolution")
# Knobs that need output maps: an inner product has none (docs/knobs.md, Settings).
CONVOLUTION_ONLY_KNOBS = ("sdss", "sfma")


def _check_type(name, value, default):
    """Check `value` has the type of the proto field whose default is `default`."""
    # numbers.Integral / Real also cover numpy scalars (np.int64, np.float32); bool is an
    # int subclass in Python, but a proto number is not a bool.
    is_bool = isinstance(value, (bool, np.bool_))
    if isinstance(default, bool):
        if not is_bool:
            raise ValueError(f"{name} must be true or false, got {value!r}")
    elif isinstance(default, int):
        if is_bool or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if not 0 <= value <= UINT32_MAX:
            raise ValueError(f"{name} must fit a uint32, got {value}")
    elif isinstance(default, float):
        if is_bool or not isinstance(value, numbers.Real) or math.isnan(value):
            raise ValueError(f"{name} must be a number, got {value!r}")
    elif name in ENUMS:
        if value not in ENUMS[name]:
            raise ValueError(f"{name} must be one of {', '.join(ENUMS[name])}, got {value!r}")


def _plain(name, value, default):
    """`value` checked against the field's type and converted to a plain Python value."""
    _check_type(name, value, default)
    if isinstance(default, bool):
        return bool(value)
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    return value


def normalize(settings, layer_type=None):
    """Return a complete, validated copy of `settings` with every default filled in.

    Raises ValueError naming the field for an unknown key, a wrong type, a bad enum
    string or a value outside its range. With `layer_type` (a stock or DyVE type name) the
    layer-kind rules apply too: on an inner product, SDSS, SFMA and the BOUND gate are
    refused, as the C++ layer's ValidateDyveParameter does. Idempotent:
    normalize(normalize(s)) == normalize(s).
    """
    if settings is None:
        settings = {}
    if not isinstance(settings, dict):
        raise ValueError(f"DyVE settings must be a JSON object, got {settings!r}")
    out = copy.deepcopy(DEFAULTS)
    for key, value in settings.items():
        if key not in DEFAULTS:
            raise ValueError(f"unknown DyVE setting '{key}'")
        if isinstance(DEFAULTS[key], dict):
            if not isinstance(value, dict):
                raise ValueError(f"{key} must be an object, got {value!r}")
            for sub, subvalue in value.items():
                name = f"{key}.{sub}"
                if sub not in DEFAULTS[key]:
                    raise ValueError(f"unknown DyVE setting '{name}'")
                out[key][sub] = _plain(name, subvalue, DEFAULTS[key][sub])
        else:
            out[key] = _plain(key, value, DEFAULTS[key])

    spet, sdss, sfma = out["spet"], out["sdss"], out["sfma"]
    if not 0.0 < spet["fraction"] <= 1.0:
        raise ValueError(f"spet.fraction must be in (0, 1], got {spet['fraction']:g}")
    # Counts the C++ kernels hold in int (dyve_layer.hpp, kMaxCount).
    if not 1 <= spet["check_interval"] <= MAX_COUNT:
        raise ValueError(f"spet.check_interval must be in [1, {MAX_COUNT}], got "
                         f"{spet['check_interval']}")
    if not math.isfinite(spet["threshold"]):
        raise ValueError(f"spet.threshold must be finite, got {spet['threshold']:g}")
    if not 0 <= spet["bound_scale"] < math.inf:
        raise ValueError(f"spet.bound_scale must be finite and >= 0, got "
                         f"{spet['bound_scale']:g}")
    # The BOUND gate refines approximate SPET with one channel order per group
    # (PER_LAYER or INTERLEAVED; docs/knobs.md, The BOUND gate of SPET); the layer
    # refuses it on an inner product.
    if spet["gate"] == "BOUND":
        if not spet["enabled"]:
            raise ValueError("spet.gate BOUND needs spet.enabled true")
        if spet["ordering"] not in ONE_ORDER_PER_GROUP:
            raise ValueError(f"spet.gate BOUND needs spet.ordering PER_LAYER or "
                             f"INTERLEAVED, got {spet['ordering']}")
    if not 1 <= sdss["stride"] <= MAX_COUNT:
        raise ValueError(f"sdss.stride must be in [1, {MAX_COUNT}], got {sdss['stride']}")
    if not 0 <= sdss["threshold"] < math.inf:
        raise ValueError(f"sdss.threshold must be finite and >= 0, got "
                         f"{sdss['threshold']:g}")
    # The paper's second thresholds: inf (the default) leaves them out; NaN is refused
    # as not a number above.
    if sdss["range_threshold"] < 0:
        raise ValueError(f"sdss.range_threshold must be >= 0, got "
                         f"{sdss['range_threshold']:g}")
    if not 0 <= sfma["threshold"] < math.inf:
        raise ValueError(f"sfma.threshold must be finite and >= 0, got "
                         f"{sfma['threshold']:g}")
    if sfma["kernel_threshold"] < 0:
        raise ValueError(f"sfma.kernel_threshold must be >= 0, got "
                         f"{sfma['kernel_threshold']:g}")
    # SPET and SDSS reason about rectified outputs (docs/knobs.md, Settings).
    if not out["relu"]:
        for name, on in (("spet.enabled", spet["enabled"]), ("spet.exact", spet["exact"]),
                         ("sdss.enabled", sdss["enabled"])):
            if on:
                raise ValueError(f"{name} requires relu: true")
    if layer_type is not None:
        check_layer_kind(out, layer_type)
    return out


def check_layer_kind(settings, layer_type):
    """Refuse knobs the layer kind cannot run (`settings` normalized)."""
    if layer_type not in STOCK_TO_DYVE and layer_type not in DYVE_TYPES:
        raise ValueError(f"layer type {layer_type} takes no DyVE settings (DyVE layers: "
                         f"{', '.join(DYVE_TYPES)})")
    if layer_type in CONVOLUTION_TYPES:
        return
    if settings["spet"]["gate"] == "BOUND":
        raise ValueError("spet.gate BOUND applies to convolutions only")
    for knob in CONVOLUTION_ONLY_KNOBS:
        if settings[knob]["enabled"]:
            raise ValueError(f"{knob} applies to convolutions only")


def knobs_off(relu=True):
    """Normalized settings with every knob off (and the layer's own ReLU on or off)."""
    return normalize({"relu": bool(relu)})


def to_json(settings):
    """The normalized settings as a compact JSON string (usable as a param_str)."""
    return json.dumps(normalize(settings), sort_keys=True, separators=(",", ":"))


def from_param_str(param_str):
    """Parse a JSON param_str holding only knob settings; an empty string means defaults."""
    text = param_str.strip() if param_str else ""
    try:
        parsed = json.loads(text) if text else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"DyVE param_str is not valid JSON: {err}") from None
    return normalize(parsed)
