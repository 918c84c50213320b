"""Tuned settings as files: the compact form of a setting, a net carrying it, and the
output set a tuning run writes (tuned prototxts, search.json, search.md).

The set is written so that a reader never sees a tuned net without the search that made
it: an old tuned net is removed first, search.json and search.md are written, then the
nets (each file atomically).
"""
import copy
import json
import math
import os

import numpy as np
from google.protobuf import json_format, text_format

from dyve import files as dyve_files
from dyve import settings as dyve_settings
from dyve.errors import InputError


def compact(s):
    """The enabled knobs of normalized settings (relu omitted; it is always on)."""
    out = {}
    spet = s["spet"]
    if spet["enabled"] or spet["exact"]:
        d = {}
        if spet["enabled"]:
            d.update(enabled=True, fraction=spet["fraction"], threshold=spet["threshold"])
            if spet["ordering"] != "PER_LAYER":
                d["ordering"] = spet["ordering"]
            if spet["gate"] != "THRESHOLD":
                d.update(gate=spet["gate"], bound_scale=spet["bound_scale"])
        if spet["exact"]:
            d["exact"] = True
            if spet["check_interval"] != dyve_settings.DEFAULTS["spet"]["check_interval"]:
                d["check_interval"] = spet["check_interval"]
        out["spet"] = d
    # The paper's second thresholds are left out at their default, inf (no second test):
    # the compact form of a setting without them is what it was before they existed, and
    # json_format takes no bare inf.
    for knob, second in (("sdss", "range_threshold"), ("sfma", "kernel_threshold")):
        if s[knob]["enabled"]:
            d = dict(s[knob])
            if math.isinf(d[second]):
                del d[second]
            out[knob] = d
    return out


def apply_to_param(net_param, final, what):
    """A copy of `net_param` whose DyVE layers carry the settings `final` ({layer:
    normalized settings})."""
    out = copy.deepcopy(net_param)
    by_name = {layer.name: layer for layer in out.layer}
    for name, s in final.items():
        layer = by_name.get(name)
        if layer is None or layer.type not in dyve_settings.DYVE_TYPES:
            raise InputError(f"{what}: no DyVE layer named '{name}' to carry the tuned "
                            "settings")
        param = dict(compact(s), relu=True)
        layer.ClearField("dyve_param")
        json_format.ParseDict(param, layer.dyve_param)
    return out


def jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else str(value)
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    return obj


def write_outputs(out_dir, result, nets, header, markdown):
    """Write the output set: `nets` = {kind: NetParameter} (deploy, train_val) as
    tuned_<kind>.prototxt with `header`, `result` as search.json, `markdown` as
    search.md. Records the paths in result["files"]."""
    files = {kind: os.path.join(out_dir, f"tuned_{kind}.prototxt") for kind in nets}
    files.update(json=os.path.join(out_dir, "search.json"),
                 md=os.path.join(out_dir, "search.md"))
    result["files"] = files
    texts = {kind: header + text_format.MessageToString(param) for kind, param in nets.items()}
    for kind in nets:
        dyve_files.remove_if_present(files[kind])
    dyve_files.write_atomic(files["json"], json.dumps(jsonable(result), indent=1) + "\n")
    dyve_files.write_atomic(files["md"], markdown)
    for kind, text in texts.items():
        dyve_files.write_atomic(files[kind], text)
    return files
