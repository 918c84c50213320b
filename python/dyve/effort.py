"""Effort counters of the DyVE layers (docs/knobs.md) and the operation counts made of them.

The counter list is the one the C++ `DyveEffort` defines (its X-macro list in
caffe_dyve/src/caffe/layers/dyve_layer.cpp); a test pins the two orders together. One
formula for an executed operation: a MAC that ran plus every knob's overhead operation.
"""

# DyveEffort's counters, in its order (docs/knobs.md, Counters).
COUNTERS = (
    "forward_passes", "images", "outputs", "macs_dense", "macs_executed",
    "macs_skipped_spet", "macs_skipped_exact", "macs_skipped_sdss", "macs_skipped_sfma",
    "ops_spet", "ops_exact", "ops_sdss", "ops_sfma",
    "spet_zeroed", "exact_stopped", "sdss_filled", "sfma_maps",
)
KNOBS = ("spet", "exact", "sdss", "sfma")
# Neurons (or maps) decided by each knob.
KNOB_NEURONS = {"spet": "spet_zeroed", "exact": "exact_stopped", "sdss": "sdss_filled",
                "sfma": "sfma_maps"}
# Counters that are not sums over images (left out of per-image figures).
NOT_PER_IMAGE = ("forward_passes", "images")


def zero():
    """A counter dict with every counter at 0."""
    return dict.fromkeys(COUNTERS, 0)


def overhead(counters):
    """Operations the knobs spent deciding what to skip."""
    return sum(counters[f"ops_{knob}"] for knob in KNOBS)


def ops(counters):
    """Operations executed: the MACs that ran plus every knob's overhead."""
    return counters["macs_executed"] + overhead(counters)


def add(a, b):
    """Counter-wise sum of two counter dicts."""
    return {k: a.get(k, 0) + b.get(k, 0) for k in dict.fromkeys(list(a) + list(b))}


def per_image(effort, images):
    """{layer: {counter: value per image}} of {layer: counters}, sorted by counter name."""
    return {name: {k: v / images for k, v in sorted(c.items()) if k not in NOT_PER_IMAGE}
            for name, c in effort.items()}


def summarize(effort, macs, types, settings, images):
    """Per-layer and per-knob operation counts of one pass over `images` images.

    `effort`: {DyVE layer: counters} of the pass; `macs`: {weighted layer: dense MACs per
    image} (caffe_io.layer_macs of the stock net); `types`: {layer: type}; `settings`:
    {DyVE layer: knob settings}. Layers of `macs` without counters are dense. Returns
    (effort dict, totals dict, warnings): the layout of bench's summary.json "effort" key
    and its ops_* totals (docs/bench.md).
    """
    warnings = []
    layers = {}
    for name, dense_per_image in macs.items():
        if name in effort:
            e = effort[name]
            skipped = {k: int(e[f"macs_skipped_{k}"]) for k in KNOBS}
            spent = {k: int(e[f"ops_{k}"]) for k in KNOBS}
            dense = int(e["macs_dense"])
            executed_macs = int(e["macs_executed"])
            if dense != executed_macs + sum(skipped.values()):
                warnings.append(f"{name}: macs_dense {dense} != macs_executed + skipped "
                                f"{executed_macs + sum(skipped.values())}")
            if dense != dense_per_image * images:
                warnings.append(f"{name}: macs_dense {dense} != {dense_per_image} MACs per "
                                f"image x {images} images from the stock net's shapes")
            if int(e["images"]) != images:
                warnings.append(f"{name}: effort counted {e['images']} images, the pass had "
                                f"{images}")
            executed = ops(e)
            layers[name] = {
                "dyve": True, "type": types.get(name), "images": int(e["images"]),
                "macs_dense": dense, "macs_executed": executed_macs,
                "macs_skipped": skipped, "ops_overhead": spent,
                "ops_dense": dense, "ops_executed": executed,
                "ops_reduction": dense / executed if executed else float("inf"),
                "neurons": {"outputs": int(e["outputs"]),
                            **{KNOB_NEURONS[k]: int(e[KNOB_NEURONS[k]]) for k in KNOBS}},
                "settings": settings.get(name)}
        else:
            dense = dense_per_image * images
            layers[name] = {
                "dyve": False, "type": types.get(name), "images": images,
                "macs_dense": dense, "macs_executed": dense,
                "macs_skipped": dict.fromkeys(KNOBS, 0), "ops_overhead": dict.fromkeys(KNOBS, 0),
                "ops_dense": dense, "ops_executed": dense, "ops_reduction": 1.0,
                "neurons": None, "settings": None}
    dyve_rows = [r for r in layers.values() if r["dyve"]]
    dense_dyve = sum(r["ops_dense"] for r in dyve_rows)
    exec_dyve = sum(r["ops_executed"] for r in dyve_rows)
    other = sum(r["ops_dense"] for r in layers.values() if not r["dyve"])
    totals = {
        "ops_dense": dense_dyve + other, "ops_executed": exec_dyve + other,
        "ops_dense_dyve_layers": dense_dyve, "ops_executed_dyve_layers": exec_dyve,
        "ops_non_dyve_layers": other,
    }
    totals["ops_reduction"] = totals["ops_dense"] / totals["ops_executed"]
    totals["ops_reduction_dyve_layers"] = dense_dyve / exec_dyve if exec_dyve else 1.0
    totals["ops_dense_per_image"] = totals["ops_dense"] / images
    totals["ops_executed_per_image"] = totals["ops_executed"] / images
    knobs = {}
    for k in KNOBS:
        skipped = sum(r["macs_skipped"][k] for r in dyve_rows)
        spent = sum(r["ops_overhead"][k] for r in dyve_rows)
        knobs[k] = {"macs_skipped": skipped, "ops_overhead": spent,
                    "net_ops_saved": skipped - spent,
                    "share_of_dense": skipped / totals["ops_dense"],
                    KNOB_NEURONS[k]: sum(r["neurons"][KNOB_NEURONS[k]] for r in dyve_rows)}
    return {"images": images, "layers": layers, "knobs": knobs}, totals, warnings
