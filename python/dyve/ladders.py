"""The tuner's per-layer ladders of knob levels, scaled to each layer's own activations.

`layer_stats` samples a DyVE layer's pre-activations, SPET partial sums and BOUND-gate
bounds in numpy from the layer's input blob and weights; `build_levels` turns them into
one ladder per knob (docs/tuner.md, Sensitivity sweep); `pareto_ladder` keeps the
levels worth offering to the greedy search.
"""
import math

import numpy as np

# Ladders (docs/tuner.md). Thresholds are rounded to 6 significant digits.
SPET_FRACTIONS = (0.25, 0.5, 0.75)
SPET_STD_MULTIPLES = (-1.0, -0.5, -0.25, 0.0, 0.25)  # THRESHOLD gate (inner products)
SPET_BOUND_SCALES = (1.0, 0.5, 0.25, 0.1, 0.0)       # BOUND gate (convolutions)
SDSS_STRIDE = 2
SDSS_QUANTILES = (0.1, 0.25, 0.5)
SFMA_QUANTILES = (0.05, 0.1, 0.2, 0.35, 0.5)
STATS_IMAGES = 64           # images for the layer statistics (fewer for big inputs)
STATS_BYTES = 64 << 20      # at most this much input sample per layer
STATS_POSITIONS = 256       # output positions sampled per image and layer


def round_sig(value, digits=6):
    """A float rounded to `digits` significant digits (thresholds, readable JSON)."""
    value = float(value)
    return 0.0 if value == 0 else float(f"{value:.{digits}g}")


def _conv_geometry(layer):
    cp = layer.convolution_param

    def pair(rep, h, w, default):
        if cp.HasField(h) or cp.HasField(w):
            return getattr(cp, h), getattr(cp, w)
        vals = list(getattr(cp, rep))
        if not vals:
            return default, default
        return (vals[0], vals[0]) if len(vals) == 1 else (vals[0], vals[1])

    stride = pair("stride", "stride_h", "stride_w", 1)
    pad = pair("pad", "pad_h", "pad_w", 0)
    dil = list(cp.dilation)
    dilation = (1, 1) if not dil else ((dil[0], dil[0]) if len(dil) == 1 else tuple(dil[:2]))
    return {"stride": stride, "pad": pad, "dilation": dilation, "group": cp.group or 1}


def _prefix_count(f, total):
    return max(1, int(math.ceil(f * total - 1e-6)))


def interleaved_order(n):
    """The paper's SPET order (spet.ordering INTERLEAVED): odd-indexed inputs first, then
    the even-indexed ones, each in index order."""
    return np.concatenate([np.arange(1, n, 2), np.arange(0, n, 2)])


def layer_stats(layer, weights, bias, bottom, rng, fractions=SPET_FRACTIONS,
                positions=STATS_POSITIONS, ordering="PER_LAYER"):
    """Samples of a DyVE layer's pre-activations and SPET partial sums, from its input.

    Returns {"z": full pre-activations, "partial": {f: partial sums (prefix channels of
    the layer's SPET order, plus bias)}, "ranges" and "variances": per-map input ranges and
    population variances (conv), "fan_channels": input channels per group (inputs of an
    inner product)}. `ordering`: PER_LAYER (channels by descending L1 norm of their
    weights) or INTERLEAVED (interleaved_order).
    """
    w = np.asarray(weights, np.float64)
    b = np.zeros(w.shape[0]) if bias is None else np.asarray(bias, np.float64)
    x = np.asarray(bottom, np.float64)
    z_all, part_all, ranges, variances = [], {f: [] for f in fractions}, None, None
    bound_all = {f: [] for f in fractions}
    if layer.type == "DyveInnerProduct":
        ipp = layer.inner_product_param
        axis = ipp.axis if ipp.HasField("axis") else 1
        xs = x.reshape(int(np.prod(x.shape[:axis])), -1)
        w = w.T if ipp.transpose else w
        w = w.reshape(w.shape[0], -1)
        fan = w.shape[1]
        order = interleaved_order(fan) if ordering == "INTERLEAVED" else \
            np.argsort(-np.abs(w).sum(axis=0), kind="stable")
        z_all.append((xs @ w.T + b).ravel())
        for f in fractions:
            pre = order[:_prefix_count(f, w.shape[1])]
            part_all[f].append((xs[:, pre] @ w[:, pre].T + b).ravel())
    else:
        g = _conv_geometry(layer)
        (sh, sw), (ph, pw), (dh, dw), groups = g["stride"], g["pad"], g["dilation"], g["group"]
        o, cg, kh, kw = w.shape
        fan = cg
        og = o // groups
        n, c, h, wd = x.shape
        ho = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
        wo = (wd + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
        ranges = (x.max(axis=(2, 3)) - x.min(axis=(2, 3))).ravel()
        variances = x.var(axis=(2, 3)).ravel()
        wg = w.reshape(groups, og, cg, kh * kw)
        orders = [interleaved_order(cg) if ordering == "INTERLEAVED" else
                  np.argsort(-np.abs(wg[gi]).sum(axis=(0, 2)), kind="stable")
                  for gi in range(groups)]
        for i in range(n):
            xp = np.pad(x[i], ((0, 0), (ph, ph), (pw, pw)))
            pos = np.sort(rng.choice(ho * wo, size=min(positions, ho * wo), replace=False))
            oy, ox = np.divmod(pos, wo)
            cols = np.empty((c, kh * kw, len(pos)))
            for a in range(kh):
                for bb in range(kw):
                    cols[:, a * kw + bb, :] = xp[:, oy * sh + a * dh, ox * sw + bb * dw]
            for gi in range(groups):
                cgrp = cols[gi * cg:(gi + 1) * cg]
                bg = b[gi * og:(gi + 1) * og, None]
                z_all.append((np.einsum("ock,ckp->op", wg[gi], cgrp) + bg).ravel())
                for f in fractions:
                    pre = orders[gi][:_prefix_count(f, cg)]
                    rest = orders[gi][_prefix_count(f, cg):]
                    part_all[f].append((np.einsum("ock,ckp->op", wg[gi][:, pre],
                                                  cgrp[pre]) + bg).ravel())
                    # BOUND gate: positive weight sums times the taps' maxima
                    bound_all[f].append(np.einsum(
                        "oc,cp->op", np.maximum(wg[gi][:, rest], 0).sum(axis=2),
                        cgrp[rest].max(axis=1)).ravel())
    return {"z": np.concatenate(z_all),
            "partial": {f: np.concatenate(v) for f, v in part_all.items()},
            "bound": {f: np.concatenate(v) for f, v in bound_all.items() if v},
            "ranges": ranges, "variances": variances, "fan_channels": fan}


def build_levels(layer, stats, knobs, top_shape):
    """{knob: [level dicts]} for one DyVE layer, plus a per-level description."""
    levels = {}
    z = stats["z"]
    if "spet" in knobs:
        items, prefixes = [], set()
        for f in SPET_FRACTIONS:
            prefix = _prefix_count(f, stats["fan_channels"])
            if prefix >= stats["fan_channels"] or prefix in prefixes:
                continue  # the prefix is every channel (nothing to skip), or seen already
            prefixes.add(prefix)
            p = stats["partial"][f]
            if layer.type == "DyveConvolution":
                u = stats["bound"][f]
                for s in SPET_BOUND_SCALES:
                    zero = p + np.float32(s) * u < 0
                    items.append({"set": {"enabled": True, "fraction": f, "threshold": 0.0,
                                           "gate": "BOUND", "bound_scale": s},
                                  "scale": {"bound_scale": s,
                                            "predicted_zero": round_sig(float(np.mean(zero)), 4),
                                            "wrongly_zeroed": round_sig(float(np.mean(zero & (z > 0))), 4)}})
                continue
            sd = float(np.std(p)) or 1.0
            for m in SPET_STD_MULTIPLES:
                t = round_sig(m * sd)
                zero = p < t
                items.append({"set": {"enabled": True, "fraction": f, "threshold": t},
                              "scale": {"std_multiple": m, "partial_std": round_sig(sd),
                                        "predicted_zero": round_sig(float(np.mean(zero)), 4),
                                        "wrongly_zeroed": round_sig(float(np.mean(zero & (z > 0))), 4)}})
        levels["spet"] = items
    is_conv = layer.type == "DyveConvolution"
    if "sdss" in knobs and is_conv and int(np.prod(top_shape[2:])) > 1:
        pos = z[z > 0]
        ts = [(0.0, None)] + ([(round_sig(np.quantile(pos, q)), q) for q in SDSS_QUANTILES]
                              if len(pos) else [])
        items, seen = [], set()
        for t, q in ts:
            if t in seen:
                continue
            seen.add(t)
            items.append({"set": {"enabled": True, "stride": SDSS_STRIDE, "threshold": t,
                                  "fill": "MEAN"},
                          "scale": {"positive_output_quantile": q}})
        levels["sdss"] = items
    if "sfma" in knobs and is_conv and stats["ranges"] is not None:
        r = stats["ranges"]
        ts = ([(0.0, None)] if np.any(r <= 0) else []) + \
            [(round_sig(np.quantile(r, q)), q) for q in SFMA_QUANTILES]
        items, seen = [], set()
        for t, q in ts:
            if t in seen:
                continue
            seen.add(t)
            items.append({"set": {"enabled": True, "threshold": t, "spread": "RANGE"},
                          "scale": {"input_range_quantile": q,
                                    "maps_replaced": round_sig(float(np.mean(r <= t)), 4)}})
        levels["sfma"] = items
    return levels


def pareto_ladder(points, floor_ops, budget):
    """Indices of sweep points forming a track's greedy ladder, least aggressive first.

    `points` = [(ops, cost, bound)] (the search uses the gate for both). Drops points that
    save nothing or whose bound alone is over the budget, then keeps the Pareto front (no
    other point with fewer-or-equal ops and lower-or-equal cost), by decreasing ops.
    """
    ok = [i for i, (ops, loss, bound) in enumerate(points)
          if ops < floor_ops and bound <= budget + 1e-9]
    ok.sort(key=lambda i: (points[i][0], points[i][1], i))
    front, best = [], math.inf
    for i in ok:
        if points[i][1] < best - 1e-12:
            front.append(i)
            best = points[i][1]
    return list(reversed(front))
