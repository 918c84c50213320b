"""DyVE knob settings as plain Python dicts (the `dyve_param` of docs/knobs.md).

The dict uses the field names of `DyveParameter` (caffe_dyve/proto/messages.proto) and
enum values as strings, so `google.protobuf.json_format.ParseDict` accepts a normalized
dict as is. Example:

    {"relu": True, "spet": {"enabled": True, "fraction": 0.5}}
"""
import copy
import json
import math

# Proto defaults (messages.proto). Every knob is off by default.
DEFAULTS = {
    "relu": False,
    "spet": {"enabled": False, "fraction": 0.5, "threshold": 0.0, "ordering": "PER_LAYER",
             "exact": False, "check_interval": 16, "gate": "THRESHOLD", "bound_scale": 1.0},
    "sdss": {"enabled": False, "stride": 2, "threshold": 0.0, "fill": "MEAN"},
    "sfma": {"enabled": False, "threshold": 0.0, "spread": "RANGE"},
}

ENUMS = {
    "spet.ordering": ("PER_LAYER", "PER_OUTPUT"),
    "spet.gate": ("THRESHOLD", "BOUND"),
    "sdss.fill": ("MEAN", "ZERO"),
    "sfma.spread": ("RANGE", "STD"),
}

UINT32_MAX = 2 ** 32 - 1


def _check_type(name, value, default):
    """Check `value` has the type of the proto field whose default is `default`."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
    elif isinstance(default, int):
        # bool is an int subclass in Python; a proto uint32 is not a bool.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if not 0 <= value <= UINT32_MAX:
            raise ValueError(f"{name} must fit a uint32, got {value}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ValueError(f"{name} must be a number, got {value!r}")
    elif name in ENUMS:
        if value not in ENUMS[name]:
            raise ValueError(f"{name} must be one of {', '.join(ENUMS[name])}, got {value!r}")


def normalize(settings):
    """Return a complete, validated copy of `settings` with every default filled in.

    Raises ValueError naming the field for an unknown key, a wrong type, a bad enum
    string or a value outside its range. Idempotent: normalize(normalize(s)) == normalize(s).
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
                _check_type(name, subvalue, DEFAULTS[key][sub])
                out[key][sub] = float(subvalue) if isinstance(DEFAULTS[key][sub], float) \
                    else subvalue
        else:
            _check_type(key, value, DEFAULTS[key])
            out[key] = value

    spet, sdss, sfma = out["spet"], out["sdss"], out["sfma"]
    if not 0.0 < spet["fraction"] <= 1.0:
        raise ValueError(f"spet.fraction must be in (0, 1], got {spet['fraction']:g}")
    if spet["check_interval"] < 1:
        raise ValueError(f"spet.check_interval must be >= 1, got {spet['check_interval']}")
    if not 0 <= spet["bound_scale"] < math.inf:
        raise ValueError(f"spet.bound_scale must be finite and >= 0, got "
                         f"{spet['bound_scale']:g}")
    # The BOUND gate refines approximate SPET with one channel order per group
    # (docs/knobs.md, The BOUND gate of SPET); the layer refuses it on an inner product.
    if spet["gate"] == "BOUND":
        if not spet["enabled"]:
            raise ValueError("spet.gate BOUND needs spet.enabled true")
        if spet["ordering"] != "PER_LAYER":
            raise ValueError(f"spet.gate BOUND needs spet.ordering PER_LAYER, "
                             f"got {spet['ordering']}")
    if sdss["stride"] < 1:
        raise ValueError(f"sdss.stride must be >= 1, got {sdss['stride']}")
    if sdss["threshold"] < 0:
        raise ValueError(f"sdss.threshold must be >= 0, got {sdss['threshold']:g}")
    if sfma["threshold"] < 0:
        raise ValueError(f"sfma.threshold must be >= 0, got {sfma['threshold']:g}")
    # SPET and SDSS reason about rectified outputs (docs/knobs.md, Settings).
    if not out["relu"]:
        for name, on in (("spet.enabled", spet["enabled"]), ("spet.exact", spet["exact"]),
                         ("sdss.enabled", sdss["enabled"])):
            if on:
                raise ValueError(f"{name} requires relu: true")
    return out


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
