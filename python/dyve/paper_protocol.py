"""The paper's own tuning protocol (DyVEDeep, arXiv 1704.01137, Algorithm 1), as published.

A seeded random 5 % of the *test* set tunes; everything is reported on the other 95 %.
Knobs in convolution layers only, in the paper's variants: SPET sums the odd-indexed input
channels first and checks at 50 % (spet.ordering INTERLEAVED, THRESHOLD gate); SDSS
samples every second position and fills an unsampled one with its neighbours' mean when
their maximum and their range are under two thresholds; SFMA replaces an input map whose
variance is under a threshold, where every kernel slice's sum of |w| is under a second.
For each conv layer in net order, a greedy binary search finds the largest value of each
threshold, in the order SFMA pair, SDSS pair, SPET, that keeps the top-1 loss on the tuning
images under the budget, over a range from 0 to the largest value seen on training images.
There is no confidence bound: that is the paper's protocol, and docs/tuner.md says what it
costs. `tune_paper` returns (and writes) a search.json like dyve.tune's.
"""
import copy
import math
import os
import time

import numpy as np

from dyve import caffe_io, report, tuned
from dyve import effort as dyve_effort
from dyve import settings as dyve_settings
from dyve.errors import DyveError
from dyve.evaluator import Evaluator
from dyve.ladders import layer_stats, round_sig
from dyve.stats import paired

TUNE_FRACTION = 0.05       # of the test set (the paper's)
SEARCH_STEPS = 8           # halvings per threshold: resolution = range / 256
TRAIN_SAMPLE = 256         # training images for the threshold ranges
RANGE_POSITIONS = 256      # sampled output positions per image for SPET's partial sums
INFINITE = math.inf        # a second threshold not yet searched: no constraint


class PaperProtocolError(DyveError):
    """Bad input for the paper's protocol."""


def split_test_set(n, seed, fraction=TUNE_FRACTION):
    """(tune, report) sorted index arrays: a seeded random `fraction` of range(n) tunes."""
    n_tune = int(round(fraction * n))
    if n_tune < 1 or n_tune >= n:
        raise PaperProtocolError(f"--tune-fraction {fraction} of {n} test images leaves no "
                                 "tuning or no report image")
    perm = np.random.RandomState(seed).permutation(n)
    return np.sort(perm[:n_tune]), np.sort(perm[n_tune:])


def knob_settings(spet=None, sdss=None, sfma=None):
    """Normalized settings of one layer in the paper's knob variants; None = knob off."""
    s = {"relu": True}
    if spet is not None:
        s["spet"] = {"enabled": True, "fraction": 0.5, "ordering": "INTERLEAVED",
                     "threshold": spet}
    if sdss is not None:
        s["sdss"] = {"enabled": True, "stride": 2, "fill": "MEAN", "threshold": sdss[0],
                     "range_threshold": sdss[1]}
    if sfma is not None:
        s["sfma"] = {"enabled": True, "spread": "VARIANCE", "threshold": sfma[0],
                     "kernel_threshold": sfma[1]}
    return dyve_settings.normalize(s, "DyveConvolution")


def threshold_ranges(net, conv_layers, layer_params, train_x, batch, seed):
    """{layer: {threshold: largest value seen}} on training images under the dense net:
    input-map variance and kernel |w| sums (SFMA), post-ReLU output (SDSS maximum and
    range: on rectified values the range never exceeds the maximum), SPET's partial sum
    over the odd-indexed channels plus bias."""
    rng = np.random.RandomState(seed)
    top = {name: 0.0 for name in conv_layers}
    bottoms = {name: [] for name in conv_layers}
    for b0 in range(0, len(train_x), batch):
        caffe_io.forward(net, train_x[b0:b0 + batch])
        for name in conv_layers:
            top[name] = max(top[name], float(net.blobs[net.top_names[name][0]].data.max()))
            bottoms[name].append(net.blobs[net.bottom_names[name][0]].data.copy())
    ranges = {}
    for name in conv_layers:
        w = net.params[name][0].data
        bias = net.params[name][1].data if len(net.params[name]) > 1 else None
        st = layer_stats(layer_params[name], w, bias, np.concatenate(bottoms[name]), rng,
                         fractions=(0.5,), positions=RANGE_POSITIONS, ordering="INTERLEAVED")
        ranges[name] = {
            "sfma_variance": round_sig(float(st["variances"].max())),
            "sfma_kernel": round_sig(float(np.abs(w).sum(axis=(2, 3)).max())),
            "sdss_max": round_sig(top[name]), "sdss_range": round_sig(top[name]),
            "spet_threshold": round_sig(max(0.0, float(st["partial"][0.5].max())))}
    return ranges


def largest_feasible(feasible, hi, steps=SEARCH_STEPS):
    """The largest value in [0, hi] that `feasible` accepts, by binary search (None when
    even 0 is refused): the paper's per-threshold search."""
    if not feasible(0.0):
        return None
    if hi <= 0 or feasible(hi):
        return max(hi, 0.0)
    lo = 0.0
    for _ in range(steps):
        mid = round_sig((lo + hi) / 2)
        if mid in (lo, hi):
            break
        if feasible(mid):
            lo = mid
        else:
            hi = mid
    return lo


def tune_paper(model, weights, test_images, train_images, mean=None, budget=0.5, seed=1701,
               tune_fraction=TUNE_FRACTION, steps=SEARCH_STEPS, batch=100,
               train_sample=TRAIN_SAMPLE, max_images=None, out_dir=None, progress=True,
               write=True, hook=None):
    """Algorithm 1 of the paper on `model` + `weights`: see the module docstring.

    `test_images`: the labelled test set (5 % tunes, 95 % reports); `train_images`: images
    the threshold ranges are read from (labels unused). Returns the search.json content.
    """
    t_start = time.time()
    if not budget >= 0:
        raise PaperProtocolError(f"--budget must be >= 0 percentage points, got {budget}")
    if not 0 < tune_fraction < 1:
        raise PaperProtocolError(f"--tune-fraction must be in (0, 1), got {tune_fraction}")
    if steps < 1:
        raise PaperProtocolError(f"--search-steps must be >= 1, got {steps}")
    caffe_io.need_file(weights, "--weights", "caffemodel")
    net_param, converted = caffe_io.dyve_net_param(model)
    if write:
        from dyve import files as dyve_files
        dyve_files.ensure_writable_dir(out_dir)
    net = caffe_io.load_net(net_param, weights, model_name=model)
    in_shape = tuple(net.blobs[caffe_io.input_blob(net)].data.shape[1:])
    x, labels = caffe_io.load_images(test_images, in_shape, mean, max_images, seed,
                                     "--test-images")
    classes = net.blobs[caffe_io.output_blob(net)].data[0].size
    caffe_io.check_labels(labels, classes, test_images, "--test-images")
    train_x, _ = caffe_io.load_images(train_images, in_shape, mean, train_sample, seed,
                                      "--train-images")
    batch = min(batch, len(x), caffe_io.max_batch(in_shape))
    tune_idx, report_idx = split_test_set(len(x), seed, tune_fraction)
    ev = Evaluator(net, x, batch, tune_idx, report_idx, progress=progress)
    types = dict(zip(net._layer_names, (layer.type for layer in net.layers)))
    conv = [n for n in ev.dyve if types[n] == "DyveConvolution" and ev.base[n]["relu"]]
    if not conv:
        raise PaperProtocolError(f"--model: {model} has no DyVE convolution with a ReLU "
                                 "(the paper's knobs are in convolution layers only)")
    layer_params = {layer.name: layer for layer in net_param.layer}
    ranges = threshold_ranges(net, conv, layer_params, train_x, batch, seed)

    evals = []
    off = copy.deepcopy(ev.base)
    base = ev.evaluate(off, "all", desc="dense")
    p0 = base["preds"]
    y_t, y_r = labels[tune_idx], labels[report_idx]

    def loss_stats(preds, idx):
        y = labels[idx]
        return paired(p0[idx] == y, preds == y, 0.95, unit=100.0)

    def record(stage, settings, res, layer=None, threshold=None, value=None, subset="search"):
        idx = tune_idx if subset == "search" else report_idx
        st = loss_stats(res["preds"], idx)
        rec = {"id": len(evals), "stage": stage, "subset": "tune" if subset == "search"
               else "report", "layer": layer, "threshold": threshold, "value": value,
               "settings": {n: c for n, c in ((n, tuned.compact(s)) for n, s in
                                              settings.items()) if c},
               "n": res["n"], "ops": res["ops"],
               **{k: st[k] for k in ("n_rw", "n_wr", "loss", "se", "ci_low", "ci_high")},
               "accepted": None}
        evals.append(rec)
        if hook is not None:
            hook(rec)
        return rec

    current = copy.deepcopy(off)
    ev.commit(current)
    dense_tune = ev.evaluate(current, "search", desc="dense (tune)")
    record("dense", current, dense_tune)
    chosen = {name: {"spet": None, "sdss": None, "sfma": None} for name in conv}
    # (knob, position in its pair, range key): Algorithm 1's order within a layer.
    sequence = (("sfma", 0, "sfma_variance"), ("sfma", 1, "sfma_kernel"),
                ("sdss", 0, "sdss_max"), ("sdss", 1, "sdss_range"),
                ("spet", None, "spet_threshold"))
    for name in conv:
        for knob, slot, key in sequence:
            if slot == 1 and chosen[name][knob] is None:
                continue  # the pair's first threshold refused even 0: the knob stays off

            def candidate(value):
                knobs = dict(chosen[name])
                if slot is None:
                    knobs[knob] = value
                else:
                    pair = list(knobs[knob] or (INFINITE, INFINITE))
                    pair[slot] = value
                    knobs[knob] = tuple(pair)
                trial = dict(current)
                trial[name] = knob_settings(**knobs)
                return trial

            def feasible(value, name=name, knob=knob, key=key, candidate=candidate):
                trial = candidate(value)
                res = ev.evaluate(trial, "search", start_layer=name,
                                  desc=f"{name} {key} {value:g}")
                rec = record("search", trial, res, layer=name, threshold=key, value=value)
                rec["accepted"] = rec["loss"] < budget
                return rec["accepted"]

            value = largest_feasible(feasible, ranges[name][key], steps)
            if value is None:
                continue
            if slot is None:
                chosen[name][knob] = value
            else:
                pair = list(chosen[name][knob] or (INFINITE, INFINITE))
                pair[slot] = value
                chosen[name][knob] = tuple(pair)
            current = dict(current)
            current[name] = knob_settings(**chosen[name])
            ev.commit(current, changed_layer=name, desc=f"{name}: commit")

    final = {n: current.get(n, ev.base[n]) for n in ev.dyve}
    tune_res = ev.evaluate(final, "search", desc="final (tune)")
    report_res = ev.evaluate(final, "holdout", desc="final (report)")
    dense_report = ev.evaluate(off, "holdout", desc="dense (report)")
    tune_rec = record("final", final, tune_res)
    report_rec = record("final", final, report_res, subset="holdout")
    dense_ops = sum(base["effort"][n]["macs_dense"] for n in ev.dyve) / base["n"]
    other = sum(m for n, m in caffe_io.layer_macs(net).items() if n not in ev.dyve)
    result = {
        "tool": "dyve.tune", "protocol": "paper", "model": model, "weights": weights,
        "test_images": test_images, "train_images": train_images, "mean": mean,
        "converted_from_stock": converted, "net": net_param.name, "dyve_layers": ev.dyve,
        "knob_layers": conv,
        "config": {"budget": budget, "seed": seed, "tune_fraction": tune_fraction,
                   "search_steps": steps, "batch": batch, "train_sample": len(train_x),
                   "max_images": max_images},
        "units": {"loss": "percentage points of top-1 (paired, vs the dense net)",
                  "ops": "per image: macs_executed + ops_spet + ops_exact + ops_sdss + "
                         "ops_sfma, summed over the DyVE layers"},
        "images": {"total": int(len(x)), "tune": int(len(tune_idx)),
                   "report": int(len(report_idx))},
        "tune_indices": [int(i) for i in tune_idx],
        "ranges": ranges,
        "thresholds": {n: {k: v for k, v in c.items()} for n, c in chosen.items()},
        "baseline": {"accuracy": 100.0 * float(np.mean(p0 == labels)),
                     "accuracy_tune": 100.0 * float(np.mean(p0[tune_idx] == y_t)),
                     "accuracy_report": 100.0 * float(np.mean(p0[report_idx] == y_r)),
                     "dense_macs": dense_ops, "other_macs": other,
                     "ops_report": dense_report["ops"]},
        "final_settings": {n: tuned.compact(s) for n, s in final.items()},
        "final_settings_full": final,
        "evaluations": evals, "interrupted": False, "interrupted_in": None,
    }
    final_ops = report_res["ops"]
    result["summary"] = {
        "dense_ops": dense_ops, "final_ops": final_ops,
        "reduction_vs_dense": dense_ops / final_ops,
        "reduction_vs_dense_whole_net": (dense_ops + other) / (final_ops + other),
        "tune": {k: tune_rec[k] for k in ("loss", "n_rw", "n_wr", "ops")},
        "report": {k: report_rec[k] for k in ("loss", "se", "ci_low", "ci_high", "n_rw",
                                              "n_wr", "ops")},
        "final_ops_per_layer": {n: dyve_effort.ops(report_res["effort"][n]) / report_res["n"]
                                for n in ev.dyve},
    }
    result["n_evaluations"] = len(evals)
    result["elapsed_s"] = round(time.time() - t_start, 1)
    if write:
        header = (f"# Tuned by python3 -m dyve.tune --protocol paper (budget {budget} pp "
                  f"on {len(tune_idx)} test images, seed {seed}); see search.json\n")
        nets = {"deploy": tuned.apply_to_param(net_param, final, "--model")}
        tuned.write_outputs(out_dir, result, nets, header, report.paper_tuning_markdown(result))
    return result


def default_out_dir(model):
    from dyve.tune import net_name
    return os.path.join("reports", net_name(model), "tune_paper")
