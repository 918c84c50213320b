"""Per-layer DyVE threshold tuner under an accuracy budget (``python3 -m dyve.tune``).

Given a trained net, its caffemodel and calibration images (never the test set), picks per
DyVE layer the knob settings that save the most operations while the top-1 loss against
the dense net stays within ``--budget`` points with statistical confidence: a baseline, an
optional exact floor, a sensitivity sweep of per-layer ladders (dyve.ladders), a greedy
combination and a holdout verification, all on one live net (dyve.evaluator). The design,
the statistics and the outputs are in docs/tuner.md.

Library use: ``tune(model, weights, calib, ...) -> dict`` (the content of search.json).
"""
import argparse
import copy
import math
import os
import signal
import sys
import time

if __name__ == "__main__":  # quiet Caffe's log before pycaffe loads glog
    os.environ.setdefault("GLOG_minloglevel", "2")
    if any(a == "--ray" or a.startswith("--ray=") for a in sys.argv[1:]):
        # Ray's pinned dependencies (build/ray-site) must load before any Debian copy
        # of them (matplotlib imports Debian's packaging, for one)
        from dyve.parallel import import_ray
        import_ray()

import numpy as np
from tqdm import tqdm

from caffe.proto import caffe_pb2

from dyve import caffe_io, live, parallel, report, stats
from dyve import effort as dyve_effort
from dyve import files as dyve_files
from dyve import tuned
from dyve import settings as dyve_settings
from dyve.errors import DyveError
from dyve.evaluator import Evaluator
from dyve.ladders import (STATS_BYTES, STATS_IMAGES, build_levels, layer_stats,
                          pareto_ladder, round_sig)

KNOBS = ("exact", "spet", "sdss", "sfma")
APPROX_KNOBS = ("spet", "sdss", "sfma")
DEFAULT_KNOBS = APPROX_KNOBS  # exact mode is opt-in: it saves MACs but costs wall time
TIE_TOLERANCE = 1e-4        # exact mode may flip a prediction only on a tie this close
MAX_SEED = 2 ** 32 - 1      # numpy.random.RandomState's range

# What of a greedy step's loss on the holdout (with --search-images: on every
# calibration image) must be within the budget for the walk-back to stop there.
# "bound": its one-sided UCB (loss + z * SE) within the budget, so the true loss exceeds
# the budget with probability <= 1 - confidence, and the expected loss lands well under
# it; "estimate": its measured loss within the budget, which spends the budget (the
# expected loss lands near it) and reports the UCB beside it (docs/tuner.md).
CERTIFY = {"bound": "ucb", "estimate": "loss"}

# Keys of search.json that depend on the clock or the output location.
VOLATILE_KEYS = ("elapsed_s", "time_s", "started", "finished", "out_dir", "files",
                 "parallel")  # parallel: the backend, its workers' pids and nodes


class TuneError(DyveError):
    """Bad input or an inconsistency found by the tuner."""


# ============================================================================ statistics

def z_value(confidence, two_sided=False):
    """stats.z_value, refusing a bad --confidence with a TuneError."""
    try:
        return stats.z_value(confidence, two_sided)
    except ValueError:
        raise TuneError(f"--confidence must be in (0, 1), got {confidence}") from None


def paired_stats(p0, p, labels, confidence=0.95, se_scale=1.0, clamp=True):
    """stats.paired in percentage points for predictions `p` against the reference `p0`
    on `labels`, plus n_changed (any prediction change); acc0 / acc are the accuracies."""
    p0, p, labels = (np.asarray(a).ravel() for a in (p0, p, labels))
    if not len(p0) == len(p) == len(labels):
        raise ValueError("paired_stats: p0, p and labels must have the same length")
    st = stats.paired(p0 == labels, p == labels, confidence, se_scale, clamp, unit=100.0)
    st["acc0"], st["acc"] = st.pop("acc_ref"), st.pop("acc_new")
    st["n_changed"] = int(np.sum(p0 != p))
    return st


def _fits(st, budget, key="ucb"):
    return st[key] <= budget + 1e-9


# ============================================================================ calibration data

def split_indices(n, holdout, seed):
    """(search, holdout) sorted index arrays, a seeded permutation of range(n)."""
    n_hold = int(round(holdout * n))
    if n - n_hold < 1:
        raise TuneError(f"--holdout {holdout} leaves no search image out of {n}")
    perm = np.random.RandomState(seed).permutation(n)
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


# ============================================================================ net structure

def _nonneg_producers(net, net_param):
    """{blob position}: whether the bottom of each DyVE layer is provably >= 0."""
    names = list(net._layer_names)
    types = [layer.type for layer in net.layers]
    params = {layer.name: layer for layer in net_param.layer}
    tops, bottoms = net.top_names, net.bottom_names

    def nonneg(blob, before):
        for j in range(before - 1, -1, -1):
            if blob not in tops[names[j]]:
                continue
            t, p = types[j], params.get(names[j])
            ins = list(bottoms[names[j]])
            if t == "ReLU":
                return p is None or p.relu_param.negative_slope == 0
            if t in dyve_settings.DYVE_TYPES:
                return p is None or p.dyve_param.relu
            if t in ("Softmax", "Sigmoid", "AbsVal"):
                return True
            if t in ("Pooling", "LRN", "Dropout", "Flatten", "Reshape", "Split",
                     "Concat", "Crop"):
                sources = ins[:1] if t == "Crop" else ins
                return all(nonneg(b, j) for b in sources)
            if t == "Eltwise" and p is not None:
                op = p.eltwise_param.operation
                if op == caffe_pb2.EltwiseParameter.MAX:
                    return any(nonneg(b, j) for b in ins)
                if op == caffe_pb2.EltwiseParameter.SUM:
                    coeffs = list(p.eltwise_param.coeff) or [1.0] * len(ins)
                    return all(c >= 0 for c in coeffs) and all(nonneg(b, j) for b in ins)
                if op == caffe_pb2.EltwiseParameter.PROD:
                    return all(nonneg(b, j) for b in ins)
            return False
        return False  # a net input

    out = {}
    for name in live.dyve_layers(net):
        j = names.index(name)
        out[name] = all(nonneg(b, j) for b in bottoms[name])
    return out


# ============================================================================ evaluation

# ============================================================================ the search

def _with_level(settings, layer, knob, level):
    """`settings` with `level` applied to one knob of one layer: a new setting, so it is
    validated here, once."""
    out = copy.deepcopy(settings)
    s = copy.deepcopy(settings[layer])  # its own dict, even if others share one
    s[knob].update(level)
    out[layer] = dyve_settings.normalize(s)
    return out


def net_name(model):
    """reports/<net-name>: the prototxt's base name without _dyve / _deploy."""
    base = os.path.basename(model)
    if base.endswith(".prototxt"):
        base = base[:-len(".prototxt")]
    changed = True
    while changed:
        changed = False
        for suffix in ("_deploy", "_dyve", "_train_val", "_tuned"):
            if base.endswith(suffix) and len(base) > len(suffix):
                base, changed = base[:-len(suffix)], True
    return base


def tune(model, weights, calib, mean=None, budget=0.5, knobs=DEFAULT_KNOBS, seed=1701,
         holdout=0.3, confidence=0.95, batch=100, max_images=None, out_dir=None,
         train_val=None, patience=1, sweep_images=None, cache_mb=2048, bank_gains=False,
         progress=True, hook=None, write=True, search_images=None, search_count=None,
         search_budget=None, workers=1, ray=None, certify="bound", search_time=None):
    """Tune the DyVE knobs of `model` with `weights` on `calib` (see the module docstring).

    `hook`, if given, is called with each evaluation record (a dict) right after it is
    made; raising KeyboardInterrupt from it stops the search as Ctrl-C does (for tests).
    With `search_images` (e.g. training images) the search is label-free on (the first
    `search_count` of) them, judged against the dense net's own predictions under
    `search_budget` points of disagreement, and every calibration image certifies
    (docs/tuner.md, Label-free search).
    `certify`: "bound" or "estimate", what of the holdout's loss must be within
    `budget` (CERTIFY).
    `search_time` (seconds from the start): the greedy starts no new round after it; the
    steps accepted so far are then certified as usual (unlike an interruption, which
    skips the certification).
    `workers` / `ray`: evaluate over that many worker processes, or on the Ray cluster
    at that address (dyve.parallel); the result is the same bit for bit.
    Returns the search.json content; writes the outputs into `out_dir` when `write`.
    """
    t_start = time.time()
    if budget is None or not budget >= 0:
        raise TuneError(f"--budget must be >= 0 percentage points, got {budget}")
    knobs = tuple(knobs)
    bad = [k for k in knobs if k not in KNOBS]
    if bad or not knobs:
        raise TuneError(f"--knobs: unknown knob(s) {', '.join(bad) or '(none given)'}; "
                        f"choose from {', '.join(KNOBS)}")
    if search_time is not None and not search_time >= 0:
        raise TuneError(f"--search-time must be >= 0 seconds, got {search_time}")
    if not 0 <= holdout < 1:
        raise TuneError(f"--holdout must be in [0, 1), got {holdout}")
    z_value(confidence)
    if batch < 1:
        raise TuneError(f"--batch must be >= 1, got {batch}")
    if max_images is not None and max_images < 1:
        raise TuneError(f"--max-images must be >= 1, got {max_images}")
    if sweep_images is not None and sweep_images < 1:
        raise TuneError(f"--sweep-images must be >= 1, got {sweep_images}")
    if not 0 <= seed <= MAX_SEED:
        raise TuneError(f"--seed must be in [0, {MAX_SEED}], got {seed}")
    if patience < 0:
        raise TuneError(f"--patience must be >= 0, got {patience}")
    if cache_mb < 0:
        raise TuneError(f"--cache-mb must be >= 0, got {cache_mb}")
    if search_count is not None and search_count < 1:
        raise TuneError(f"--search-count must be >= 1, got {search_count}")
    if search_budget is not None and not search_budget >= 0:
        raise TuneError(f"--search-budget must be >= 0 percentage points, got "
                        f"{search_budget}")
    search_budget = budget if search_budget is None else search_budget
    if certify not in CERTIFY:
        raise TuneError(f"--certify must be one of {', '.join(CERTIFY)}, got {certify!r}")
    caffe_io.need_file(weights, "--weights", "caffemodel")
    calib_kind = caffe_io.image_source(calib, "--calib")
    net_param, converted = caffe_io.dyve_net_param(model)
    tv_param = None
    if train_val:
        tv_param, _ = caffe_io.dyve_net_param(train_val, what="--train-val")
    out_dir = out_dir or os.path.join("reports", net_name(model), "tune")
    if write:
        dyve_files.ensure_writable_dir(out_dir)

    net = caffe_io.load_net(net_param, weights, model_name=model)
    in_shape = tuple(net.blobs[caffe_io.input_blob(net)].data.shape[1:])
    images, labels = caffe_io.load_images(calib, in_shape, mean, max_images, seed, "--calib")
    classes = net.blobs[caffe_io.output_blob(net)].data[0].size
    caffe_io.check_labels(labels, classes, calib, "--calib")
    calib_info = {"kind": calib_kind, "path": calib, "count": int(len(labels))}
    # No bigger than the images (as bench does) nor than a blob Caffe can count.
    batch = min(batch, len(images), caffe_io.max_batch(in_shape))
    if search_images:
        x_free, _ = caffe_io.load_images(search_images, in_shape, mean, search_count, seed,
                                         "--search-images")
        n_free = len(x_free)
        images = np.concatenate([x_free, images])
        labels = np.concatenate([np.full(n_free, -1, np.int64), labels])  # set after baseline
        search_idx, hold_idx = np.arange(n_free), np.arange(n_free, len(images))
    else:
        search_idx, hold_idx = split_indices(len(images), holdout, seed)
    if not live.dyve_layers(net):
        raise TuneError(f"--model: {model} has no DyVE layer")
    net_spec = parallel.net_spec(net_param, weights, model)
    ev = Evaluator(net, images, batch, search_idx, hold_idx, cache_mb, progress,
                   workers=workers, ray=ray, net_spec=net_spec)
    layer_params = {layer.name: layer for layer in net_param.layer}
    approx = [k for k in APPROX_KNOBS if k in knobs]
    rng = np.random.RandomState(seed)
    def say(text):
        if progress:
            tqdm.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)
    n_hold = len(hold_idx)

    def paired(p0, preds, y, projected=True):
        """Paired statistics; the gate is projected to the holdout's size (same flip rate)
        so that what the search accepts is what the holdout can confirm."""
        scale = math.sqrt(len(y) / n_hold) if projected and n_hold else 1.0
        return paired_stats(p0, preds, y, confidence, se_scale=scale, clamp=not bank_gains)

    result = {
        "tool": "dyve.tune", "model": model, "weights": weights, "calib": calib_info,
        "mean": mean, "converted_from_stock": converted, "net": net_param.name,
        "dyve_layers": ev.dyve, "knobs": list(knobs),
        "config": {"budget": budget, "search_budget": search_budget, "certify": certify,
                   "search_images": search_images, "search_count": search_count,
                   "search_labels": "dense predictions" if search_images else "labels",
                   "seed": seed, "holdout": None if search_images else holdout,
                   "confidence": confidence, "z": z_value(confidence), "batch": batch,
                   "max_images": max_images, "patience": patience,
                   "sweep_images": sweep_images, "cache_mb": cache_mb,
                   "bank_gains": bank_gains, "search_time": search_time,
                   "gate_se_scale": (math.sqrt(len(search_idx) / len(hold_idx))
                                     if len(hold_idx) else 1.0)},
        "units": {"loss": "percentage points of top-1 (paired, vs the dense net)",
                  "ops": "per image: macs_executed + ops_spet + ops_exact + ops_sdss + "
                         "ops_sfma, summed over the DyVE layers"},
        "images": {"total": int(len(images)), "search": int(len(search_idx)),
                   "holdout": int(len(hold_idx))},
        "cached_layers": sorted(ev.cacheable, key=ev.dyve.index),
        "interrupted": False, "interrupted_in": None,
        "evaluations": [], "out_dir": out_dir, "parallel": ev.backend.describe(),
    }
    evals = result["evaluations"]
    y_s, y_h = labels[search_idx], labels[hold_idx]
    off = copy.deepcopy(ev.base)
    state = {"phase": "baseline", "best": copy.deepcopy(off), "steps": []}

    def record(stage, settings, res, p0, y, layer=None, knob=None, level=None,
               accepted=None, subset="search", t0=None, **extra):
        st = paired(p0, res["preds"], y, projected=subset == "search") \
            if p0 is not None else None
        rec = {"id": len(evals), "stage": stage, "subset": subset, "layer": layer,
               "knob": knob, "level": level,
               "settings": {n: c for n, c in ((n, tuned.compact(s)) for n, s in settings.items())
                            if c},
               "n": res["n"], "ops": res["ops"]}
        if st:
            rec.update({k: st[k] for k in ("n_rw", "n_wr", "n_changed", "loss", "se",
                                           "ucb", "gate", "acc")})
        rec["accepted"] = accepted
        rec.update(extra)
        rec["time_s"] = round(time.time() - t0, 3) if t0 else None
        evals.append(rec)
        if hook is not None:
            hook(rec)
        return rec, st

    try:
        # ---------------------------------------------------------------- 1. baseline
        t0 = time.time()
        k_stats = {}
        for name in ev.dyve:
            bottom = net.blobs[net.bottom_names[name][0]].data
            per_image = max(1, bottom[0].nbytes)
            k_stats[name] = max(4, min(STATS_IMAGES, STATS_BYTES // per_image))
        base = ev.evaluate(off, "all", sample=k_stats, desc="baseline")
        p0_all = base["preds"]
        if search_images:  # label-free: the dense net's predictions are the labels
            labels[search_idx] = p0_all[search_idx]
            y_s = labels[search_idx]
        p0_s, p0_h = p0_all[search_idx], p0_all[hold_idx]
        dense = sum(base["effort"][n]["macs_dense"] for n in ev.dyve) / base["n"]
        record("baseline", off, base, p0_all, labels, subset="all", accepted=True, t0=t0)
        result["baseline"] = {
            "accuracy": 100.0 * float(np.mean((p0_h == y_h) if search_images
                                              else (p0_all == labels))),
            "accuracy_search": 100.0 * float(np.mean(p0_s == y_s)),
            "accuracy_holdout": (100.0 * float(np.mean(p0_h == y_h)) if len(hold_idx)
                                 else None),
            "ops": base["ops"], "dense_macs": dense,
            "other_macs": sum(m for n, m in caffe_io.layer_macs(net).items()
                              if n not in ev.dyve),
            "ops_per_layer": {n: dyve_effort.ops(base["effort"][n]) / base["n"]
                              for n in ev.dyve}}
        n_labelled = len(hold_idx) if search_images else len(images)  # what accuracy is on
        say(f"baseline: top-1 {result['baseline']['accuracy']:.2f} % on {n_labelled} "
            f"calibration images, {dense / 1e6:.3f} M MACs/image in DyVE layers")

        # ---------------------------------------------------------------- 2. exact floor
        state["phase"] = "floor"
        structural = _nonneg_producers(net, net_param)
        eligibility = {}
        floor = copy.deepcopy(off)
        for name in ev.dyve:
            lowest = base["mins"][name]
            ok = structural[name] and lowest >= 0 and ev.base[name]["relu"]
            eligibility[name] = {"structurally_nonnegative": structural[name],
                                 "min_bottom": lowest,
                                 "exact": bool(ok and "exact" in knobs)}
            if ok and "exact" in knobs:
                floor[name] = dyve_settings.normalize({"relu": True, "spet": {"exact": True}})
        state["best"] = copy.deepcopy(floor)
        t0 = time.time()
        fl = ev.commit(floor, desc="floor (search)")
        _, st = record("floor", floor, fl, p0_s, y_s, accepted=True, t0=t0)
        fl_hold = None
        if len(hold_idx):
            t0 = time.time()
            fl_hold = ev.evaluate(floor, "holdout", desc="floor (holdout)")
            record("floor", floor, fl_hold, p0_h, y_h, subset="holdout", accepted=True,
                   t0=t0)
        gaps, ties = base["gaps"], {}
        for part, res, idx in (("search", fl, search_idx), ("holdout", fl_hold, hold_idx)):
            if res is None:
                continue
            bad_img = np.nonzero(res["preds"] != p0_all[idx])[0]
            real = [int(idx[i]) for i in bad_img if gaps[idx[i]] > TIE_TOLERANCE]
            if real:
                raise TuneError(f"exact mode changed {len(real)} prediction(s) on "
                                f"{part} images (e.g. image {real[0]}); exact mode must not "
                                "change any output: this is a bug in the DyVE layers")
            ties[part] = int(len(bad_img))
        state["floor_checked"] = fl_hold is not None
        result["floor"] = {"settings": {n: tuned.compact(s) for n, s in floor.items()},
                           "eligibility": eligibility, "ops": fl["ops"],
                           "rounding_ties": ties,
                           "effort_per_image": dyve_effort.per_image(fl["effort"], fl["n"]),
                           "ops_per_layer": {n: dyve_effort.ops(fl["effort"][n]) / fl["n"]
                                             for n in ev.dyve}}
        state["steps"] = [{"settings": copy.deepcopy(floor), "ops": fl["ops"],
                           "loss": st["loss"], "ucb": st["ucb"], "gate": st["gate"],
                           "ops_per_layer": {n: dyve_effort.ops(fl["effort"][n]) / fl["n"]
                                             for n in ev.dyve},
                           "effort": dyve_effort.per_image(fl["effort"], fl["n"])}]
        floor_ops = fl["ops"]
        say(f"exact floor on {', '.join(n for n in ev.dyve if eligibility[n]['exact']) or 'no layer'}: "
            f"{floor_ops / 1e6:.3f} M ops/image (predictions unchanged)")

        # ---------------------------------------------------------------- 3. sweep
        state["phase"] = "sweep"
        tracks, ladders = [], {}
        result["levels"] = {}
        sweep_count = sweep_images if sweep_images else None
        floor_sweep = fl
        if sweep_count is not None and sweep_count < len(search_idx):
            floor_sweep = ev.evaluate(floor, "search", start_layer=ev.dyve[-1],
                                      count=sweep_count, desc="floor (sweep images)")
        n_sweep = floor_sweep["n"]
        p0_sw, y_sw = p0_s[:n_sweep], y_s[:n_sweep]
        all_levels = {}
        for name in ev.dyve:
            layer = layer_params[name]
            sample = base["bottoms"][name][:k_stats[name]]
            w = net.params[name][0].data
            b = net.params[name][1].data if len(net.params[name]) > 1 else None
            top_shape = net.blobs[net.top_names[name][0]].data.shape
            sample_stats = layer_stats(layer, w, b, sample, rng)
            lv = build_levels(layer, sample_stats, approx if ev.base[name]["relu"] else
                              [k for k in approx if k == "sfma"], top_shape)
            all_levels[name] = lv
            result["levels"][name] = {
                "stats_images": int(len(sample)),
                "z_std": round_sig(float(np.std(sample_stats["z"]))),
                "positive_fraction": round_sig(float(np.mean(sample_stats["z"] > 0)), 4),
                "ladders": {k: [dict(level=i, **item) for i, item in enumerate(v)]
                            for k, v in lv.items()}}
        total = sum(len(v) for lv in all_levels.values() for v in lv.values())
        bar = tqdm(total=total, desc="sweep", unit=" level", disable=not progress)
        try:
            for name in ev.dyve:
                for knob in APPROX_KNOBS:
                    items = all_levels[name].get(knob)
                    if not items:
                        continue
                    points, hopeless = [], set()
                    for i, item in enumerate(items):
                        group = item["set"].get("fraction")  # a monotone sub-ladder
                        if group in hopeless:
                            points.append((math.inf, math.inf, math.inf))
                            result["levels"][name]["ladders"][knob][i]["skipped"] = True
                            bar.update(1)
                            continue
                        s = _with_level(floor, name, knob, item["set"])
                        t0 = time.time()
                        res = ev.evaluate(s, "search", start_layer=name, count=n_sweep,
                                          desc=f"{name} {knob} {i}")
                        rec, st = record("sweep", s, res, p0_sw, y_sw, layer=name, knob=knob,
                                         level=i, accepted=False, t0=t0)
                        lcb = st["loss"] - z_value(confidence) * st["se"]
                        points.append((res["ops"], st["gate"], st["gate"]))
                        item["record"] = rec["id"]
                        if lcb > search_budget:
                            hopeless.add(group)  # the next levels only skip more
                        bar.update(1)
                    ladder = pareto_ladder(points, floor_sweep["ops"], search_budget)
                    for i in ladder:
                        evals[items[i]["record"]]["accepted"] = True
                    ladders[(name, knob)] = [items[i]["set"] for i in ladder]
                    result["levels"][name]["ladders"][knob + "_greedy"] = ladder
                    say(f"sweep {name} {knob}: {len(items)} levels "
                        f"({sum(1 for p in points if p[0] == math.inf)} skipped), "
                        f"greedy ladder {ladder}")
                    if ladder:
                        tracks.append((name, knob))
        finally:
            bar.close()

        # ---------------------------------------------------------------- 4. greedy
        state["phase"] = "greedy"
        current, cur_res = copy.deepcopy(floor), fl
        cur_stats = paired(p0_s, fl["preds"], y_s)
        position = {t: -1 for t in tracks}
        refusals = {t: 0 for t in tracks}
        retired = set()
        n_s = len(search_idx)
        result["greedy"] = {"tracks": [list(t) for t in tracks], "rounds": 0, "steps": [],
                            "retired": [], "stopped_by": None}
        rnd = 0
        while True:
            active = [t for t in tracks if t not in retired
                      and position[t] + 1 < len(ladders[t])]
            if not active:
                result["greedy"]["stopped_by"] = "no track left"
                break
            if search_time is not None and time.time() - t_start >= search_time:
                result["greedy"]["stopped_by"] = "search time"
                say(f"search time ({search_time:g} s) spent after {rnd} greedy round(s): "
                    "certifying the steps accepted so far")
                break
            rnd += 1
            result["greedy"]["rounds"] = rnd
            candidates = []
            for order, t in enumerate(active):
                name, knob = t
                level = position[t] + 1
                s = _with_level(current, name, knob, ladders[t][level])
                t0 = time.time()
                res = ev.evaluate(s, "search", start_layer=name,
                                  desc=f"round {rnd}: {name} {knob} -> {level}")
                st = paired(p0_s, res["preds"], y_s)
                saved = cur_res["ops"] - res["ops"]
                added = (st["gate"] - cur_stats["gate"]) / 100.0
                fits = _fits(st, search_budget, "gate") and saved > 0
                eff = saved / max(added, 1.0 / n_s)
                reason = None if fits else ("no ops saved" if saved <= 0 else
                                            "gate over budget")
                rec, _ = record("greedy", s, res, p0_s, y_s, layer=name, knob=knob,
                                level=level, accepted=False, round=rnd,
                                ops_saved=saved, added_gate=100.0 * added,
                                efficiency=eff if fits else None, refused=reason, t0=t0)
                if fits:
                    candidates.append((-eff, order, t, level, s, res, st, rec))
                    refusals[t] = 0
                else:
                    refusals[t] += 1
                    if patience and refusals[t] >= patience:
                        retired.add(t)
                        result["greedy"]["retired"].append([name, knob, rnd])
            if not candidates:
                result["greedy"]["stopped_by"] = "no candidate within the search budget"
                break
            candidates.sort(key=lambda c: (c[0], c[1]))
            _, _, t, level, s, res, st, rec = candidates[0]
            rec["accepted"] = True
            position[t] = level
            current, cur_stats = s, st
            state["best"] = copy.deepcopy(current)
            result["greedy"]["steps"].append(
                {"round": rnd, "layer": t[0], "knob": t[1], "level": level,
                 "record": rec["id"], "set": ladders[t][level], "ops": res["ops"],
                 "loss": st["loss"], "se": st["se"], "ucb": st["ucb"], "gate": st["gate"],
                 "n_rw": st["n_rw"], "n_wr": st["n_wr"]})
            state["steps"].append({"settings": copy.deepcopy(current), "ops": res["ops"],
                                   "loss": st["loss"], "ucb": st["ucb"], "gate": st["gate"],
                                   "ops_per_layer": {n: dyve_effort.ops(res["effort"][n]) / res["n"]
                                                     for n in ev.dyve},
                                   "effort": dyve_effort.per_image(res["effort"], res["n"])})
            cur_res = ev.commit(current, changed_layer=t[0], desc=f"round {rnd}: commit")
            if not np.array_equal(cur_res["preds"], res["preds"]):
                raise TuneError(f"re-running the accepted setting of round {rnd} gave "
                                "different predictions: the net is not deterministic")
            say(f"round {rnd}: {t[0]} {t[1]} -> level {level}: "
                f"{res['ops'] / 1e6:.3f} M ops/image, loss {st['loss']:+.2f} "
                f"(UCB {st['ucb']:.2f}) pp")

        # ---------------------------------------------------------------- 5. holdout
        state["phase"] = "holdout"
        verification = {"subset": "holdout", "n": int(len(hold_idx)), "checks": [],
                        "undone_steps": 0, "passed": None}
        result["holdout"] = verification
        k = len(state["steps"]) - 1
        if len(hold_idx) == 0:
            verification["passed"] = None
            verification["note"] = "no holdout images (--holdout 0): not verified"
        else:
            while True:
                step = state["steps"][k]
                stage = "holdout" if k == len(state["steps"]) - 1 else "undo"
                if k == 0:  # the floor: measured on the holdout already
                    res = fl_hold
                    rec, st = record(stage, step["settings"], res, p0_h, y_h,
                                     subset="holdout", accepted=True, step=k, reused=True)
                else:
                    t0 = time.time()
                    res = ev.evaluate(step["settings"], "holdout",
                                      desc=f"holdout (step {k})")
                    rec, st = record(stage, step["settings"], res, p0_h, y_h,
                                     subset="holdout", accepted=None, step=k, t0=t0)
                ok = _fits(st, budget, CERTIFY[certify])
                rec["accepted"] = ok
                verification["checks"].append(
                    {"step": k, "record": rec["id"], "ops": res["ops"],
                     **{x: st[x] for x in ("n_rw", "n_wr", "loss", "se", "ucb",
                                           "ci_low", "ci_high", "acc0", "acc")}})
                state["best"] = copy.deepcopy(step["settings"])
                if ok or k == 0:
                    verification["passed"] = bool(ok)
                    break
                say(f"holdout: {'UCB' if certify == 'bound' else 'loss'} "
                    f"{st[CERTIFY[certify]]:.2f} pp over the budget at step {k}; undoing it")
                k -= 1
                verification["undone_steps"] += 1
                state["best"] = copy.deepcopy(state["steps"][k]["settings"])
            verification["final_step"] = k
        result["final_step"] = k
        state["phase"] = "done"
    except KeyboardInterrupt:
        result["interrupted"] = True
        result["interrupted_in"] = state["phase"]
        tqdm.write(f"interrupted during {state['phase']}: writing the best setting so far")
    except BaseException:
        ev.close()
        raise
    result["parallel"] = ev.backend.describe()  # with the reruns, if a worker died
    ev.close()

    # -------------------------------------------------------------------- final
    final = {n: state["best"].get(n, ev.base[n]) for n in ev.dyve}
    result["final_settings"] = {n: tuned.compact(s) for n, s in final.items()}
    result["final_settings_full"] = final
    summary = {"holdout_verified": bool(result.get("holdout", {}).get("passed"))}
    if state.get("floor_checked") and state["steps"] and all(
            state["steps"][0]["settings"][n] == final[n]
            for n in ev.dyve):
        summary["holdout_verified"] = True  # the exact floor: same predictions as dense
    # Search-set ops of the final setting: from the greedy step it corresponds to.
    final_ops = None
    for step in state.get("steps", []):
        if all(step["settings"].get(n, ev.base[n]) == final[n]
               for n in ev.dyve):
            final_ops = step["ops"]
            summary.update(search_loss=step["loss"], search_ucb=step["ucb"],
                           search_gate=step["gate"],
                           final_ops_per_layer=step["ops_per_layer"],
                           final_effort_per_image=step["effort"])
    if "baseline" in result:
        b = result["baseline"]
        summary.update({"dense_ops": b["dense_macs"], "floor_ops": result.get(
            "floor", {}).get("ops"), "final_ops": final_ops})
        if final_ops:
            summary["reduction_vs_dense"] = b["dense_macs"] / final_ops
            summary["reduction_vs_dense_whole_net"] = \
                (b["dense_macs"] + b["other_macs"]) / (final_ops + b["other_macs"])
            if summary["floor_ops"]:
                summary["reduction_vs_floor"] = summary["floor_ops"] / final_ops
    checks = result.get("holdout", {}).get("checks") or []
    if checks and not result["interrupted"]:
        last = checks[-1]
        summary["holdout"] = {x: last[x] for x in ("loss", "se", "ci_low", "ci_high", "ucb",
                                                   "n_rw", "n_wr", "ops", "acc0", "acc")}
    result["summary"] = summary
    result["n_evaluations"] = len(evals)
    result["elapsed_s"] = round(time.time() - t_start, 1)

    if write:
        state_note = (f"INTERRUPTED during {result['interrupted_in']}: the best setting "
                      "accepted so far" + ("" if summary["holdout_verified"] else
                                           ", not verified on the holdout") + "; "
                      if result["interrupted"] else "")
        header = (f"# Tuned by python3 -m dyve.tune (budget {budget} pp, seed {seed}); "
                  f"{state_note}see search.json\n")
        nets_out = {"deploy": tuned.apply_to_param(net_param, final, "--model")}
        if tv_param is not None:
            nets_out["train_val"] = tuned.apply_to_param(tv_param, final, "--train-val")
        tuned.write_outputs(out_dir, result, nets_out, header, report.tuning_markdown(result))
    return result


def pick(model, frontier_path, point_id, out):
    """Write `model` (a DyVE or stock deploy prototxt) with the settings of one frontier
    point as the prototxt `out`."""
    from dyve import frontier
    point = frontier.find_point(frontier_path, point_id)
    net_param, _ = caffe_io.dyve_net_param(model)
    dyve = [layer.name for layer in net_param.layer
            if layer.type in dyve_settings.DYVE_TYPES]
    unknown = sorted(set(point["settings"]) - set(dyve))
    if unknown:
        raise TuneError(f"--pick: point '{point_id}' sets layer(s) {', '.join(unknown)}, "
                        f"which {model} has no DyVE layer for")
    relu = {layer.name: layer.dyve_param.relu or layer.name in point["settings"]
            for layer in net_param.layer if layer.name in dyve}
    final = frontier.full_settings(point["settings"], dyve,
                                   {n: dyve_settings.knobs_off(relu[n]) for n in dyve})
    param = tuned.apply_to_param(net_param, final, "--model")
    header = (f"# Point {point_id} of {frontier_path}: ops reduction "
              f"{point['ops_reduction']:.3f}x, top-1 loss {point['loss']:+.2f} pp on the "
              "report images (python3 -m dyve.tune --pick)\n")
    from google.protobuf import text_format
    dyve_files.write_atomic(out, header + text_format.MessageToString(param))


# ============================================================================ CLI

def _knob_list(text):
    items = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in items if k not in KNOBS]
    if bad or not items:
        raise argparse.ArgumentTypeError(
            f"unknown knob(s) {', '.join(bad) or '(none)'}; choose from {','.join(KNOBS)}")
    return tuple(k for k in KNOBS if k in items)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python3 -m dyve.tune",
        description="Tune the per-layer DyVE knob settings of a trained net under a top-1 "
                    "accuracy budget, on calibration images (never the test set). "
                    "Writes tuned_deploy.prototxt, search.json and search.md.")
    parser.add_argument("--model", required=True,
                        help="DyVE deploy prototxt (a stock deploy prototxt is converted "
                             "with every knob off)")
    parser.add_argument("--weights", required=True, help="caffemodel (or Caffe HDF5 snapshot)")
    parser.add_argument("--protocol", choices=("certified", "paper"), default="certified",
                        help="certified (default): search on calibration images, confirm "
                             "on a holdout with a confidence bound; paper: the paper's "
                             "Algorithm 1 on 5 %% of the test set, reported on the rest "
                             "(docs/tuner.md)")
    parser.add_argument("--calib",
                        help="calibration LMDB, or a folder of <class>/*.jpg|png or of "
                             "wnid-prefixed files (certified protocol)")
    parser.add_argument("--test-images",
                        help="paper protocol: the labelled test set (5 %% tunes, 95 %% "
                             "reports)")
    parser.add_argument("--train-images",
                        help="paper protocol: training images the threshold ranges are "
                             "read from")
    parser.add_argument("--tune-fraction", type=float, default=0.05,
                        help="paper protocol: fraction of the test set that tunes "
                             "(default %(default)s)")
    parser.add_argument("--search-steps", type=int, default=8,
                        help="paper protocol: halvings per threshold (default %(default)s)")
    parser.add_argument("--mean", help="mean.binaryproto, or per-channel values 'b,g,r'")
    parser.add_argument("--budget", type=float, default=0.5,
                        help="accuracy budget, percentage points of top-1 (default %(default)s)")
    parser.add_argument("--knobs", type=_knob_list, default=DEFAULT_KNOBS,
                        help="comma-separated subset of exact,spet,sdss,sfma (default: spet,sdss,sfma; "
                             "exact mode saves MACs but is slower in wall time)")
    parser.add_argument("--seed", type=int, default=1701, help="default %(default)s")
    parser.add_argument("--holdout", type=float, default=0.3,
                        help="fraction of the calibration images held back to confirm "
                             "the final choice (default %(default)s)")
    parser.add_argument("--confidence", type=float, default=0.95,
                        help="one-sided confidence of the loss bound (default %(default)s)")
    parser.add_argument("--batch", type=int, default=100, help="default %(default)s")
    parser.add_argument("--max-images", type=int,
                        help="use at most this many calibration images")
    parser.add_argument("--search-images",
                        help="label-free search on these images (e.g. the training LMDB), "
                             "judged against the dense net's predictions; every --calib "
                             "image then certifies (docs/tuner.md)")
    parser.add_argument("--search-count", type=int,
                        help="with --search-images: use the first N of them (default: all)")
    parser.add_argument("--search-time", type=float, metavar="SECONDS",
                        help="start no greedy round after this many seconds; the steps "
                             "accepted by then are certified as usual (default: no limit)")
    parser.add_argument("--search-budget", type=float,
                        help="the search's budget in points of its statistic (default: "
                             "--budget); with --search-images it bounds disagreement with "
                             "the dense net, and the certification picks the point")
    parser.add_argument("--certify", choices=tuple(CERTIFY), default="bound",
                        help="what the holdout (with --search-images: every calibration "
                             "image) holds within --budget: bound (default), the one-sided "
                             "UCB of the loss, so the loss stays under the budget with "
                             "--confidence and lands well below it; estimate, the measured "
                             "loss, which spends the budget (docs/tuner.md)")
    parser.add_argument("--sweep-images", type=int,
                        help="sensitivity sweep on the first N search images only "
                             "(default: all search images)")
    parser.add_argument("--patience", type=int, default=1,
                        help="retire a track after this many refused greedy candidates in a "
                             "row; 0 = never (default %(default)s)")
    parser.add_argument("--cache-mb", type=int, default=2048,
                        help="memory for cached layer inputs (default %(default)s)")
    parser.add_argument("--out-dir", help="output folder (default reports/<net-name>/tune)")
    parser.add_argument("--train-val", help="train_val prototxt to emit a tuned copy of")
    parser.add_argument("--bank-gains", action="store_true",
                        help="let the search accept on the plain UCB (loss + z*SE), banking "
                             "measured accuracy gains; default: loss clamped at 0")
    parser.add_argument("--workers", type=int, default=None,
                        help="evaluate over N local worker processes, one OpenBLAS thread "
                             "each (default: the number of cores; 1 = in this process); "
                             "with --ray: the number of Ray actors (default: the cluster's "
                             "CPUs). The result does not depend on it (docs/parallel.md)")
    parser.add_argument("--ray", metavar="ADDRESS",
                        help="evaluate on the Ray cluster at ADDRESS (or 'auto'), one "
                             "actor per worker (needs `make ray-site`)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--pick", metavar="POINT",
                        help="instead of tuning: write the prototxt of a point of a "
                             "frontier.json (python3 -m dyve.frontier), e.g. paper:3 or "
                             "certified:chosen; needs --frontier and --out")
    parser.add_argument("--frontier", help="with --pick: the frontier.json")
    parser.add_argument("--out", help="with --pick: the prototxt to write")
    args = parser.parse_args(argv)

    def terminate(signum, frame):  # a kill (SIGTERM) stops cleanly, as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    if args.budget < 0:
        parser.error(f"--budget must be >= 0 percentage points, got {args.budget:g}")
    if args.pick:
        if not args.frontier or not args.out:
            parser.error("--pick needs --frontier and --out")
        try:
            pick(args.model, args.frontier, args.pick, args.out)
        except DyveError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(f"wrote {args.out}", file=sys.stderr)
        return 0
    if args.protocol == "paper":
        from dyve import paper_protocol
        for flag in ("test_images", "train_images"):
            if not getattr(args, flag):
                parser.error(f"--protocol paper needs --{flag.replace('_', '-')}")
        run = lambda: paper_protocol.tune_paper(  # noqa: E731
            args.model, args.weights, args.test_images, args.train_images, mean=args.mean,
            budget=args.budget, seed=args.seed, tune_fraction=args.tune_fraction,
            steps=args.search_steps, batch=args.batch, max_images=args.max_images,
            out_dir=args.out_dir or paper_protocol.default_out_dir(args.model),
            progress=not args.quiet)
        render = report.paper_tuning_markdown
    else:
        if not args.calib:
            parser.error("--calib is required (the certified protocol tunes on calibration "
                         "images)")
        run = lambda: tune(  # noqa: E731
            args.model, args.weights, args.calib, mean=args.mean, budget=args.budget,
            knobs=args.knobs, seed=args.seed, holdout=args.holdout,
            confidence=args.confidence, batch=args.batch, max_images=args.max_images,
            out_dir=args.out_dir, train_val=args.train_val, patience=args.patience,
            sweep_images=args.sweep_images, cache_mb=args.cache_mb,
            bank_gains=args.bank_gains, progress=not args.quiet,
            search_images=args.search_images, search_count=args.search_count,
            search_budget=args.search_budget, certify=args.certify,
            search_time=args.search_time,
            workers=(args.workers if args.workers is not None or args.ray
                     else parallel.default_workers()),
            ray=args.ray)
        render = report.tuning_markdown
    try:
        result = run()
    except DyveError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(render(result))
    print(f"wrote {', '.join(result['files'].values())}", file=sys.stderr)
    return 130 if result["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
