"""One pycaffe net run over image subsets under per-layer DyVE settings (the tuner's
evaluation loop), re-running only the layers from the first changed one."""
import copy

import numpy as np
from tqdm import tqdm

from dyve import caffe_io, live
from dyve import effort as dyve_effort
from dyve import settings as dyve_settings


class Evaluator:
    """Runs one pycaffe net over image subsets under per-layer settings.

    It keeps a *committed* setting with, per DyVE layer, the blobs that flow into it
    (its "live-in" blobs) for every search image and the per-batch effort counters, so a
    setting that differs from the committed one only from layer L on is evaluated by
    running the net from L.
    """

    def __init__(self, net, images, batch, search, holdout, cache_mb=2048, progress=True):
        """`images`: float32 N x C x H x W, preprocessed (caffe_io.load_images)."""
        self.net, self.images = net, images
        self.batch = int(batch)
        self.subsets = {"search": np.asarray(search), "holdout": np.asarray(holdout),
                        "all": np.arange(len(images))}
        self.progress = progress
        self.names = list(net._layer_names)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.dyve = list(live.dyve_layers(net))
        self.input = caffe_io.input_blob(net)
        self.output = caffe_io.output_blob(net)
        self.live_in = {name: self._live_in(self.index[name]) for name in self.dyve}
        self.applied = {name: live.get_settings(net, name) for name in self.dyve}
        # Knobs off, with the prototxt's relu (a DyVE layer without it takes no SPET/SDSS).
        self.base = {name: dyve_settings.knobs_off(self.applied[name]["relu"])
                     for name in self.dyve}
        caffe_io.reshape(self.net, self.batch)
        self.cacheable = self._choose_cache(cache_mb)
        self.committed = None

    # -- structure
    def _live_in(self, k):
        produced, needed = set(), []
        for j in range(k, len(self.names)):
            for blob in self.net.bottom_names[self.names[j]]:
                if blob not in produced and blob not in needed:
                    needed.append(blob)
            produced.update(self.net.top_names[self.names[j]])
        return needed

    def _choose_cache(self, cache_mb):
        """DyVE layers whose live-in blobs are cached, deepest first within cache_mb."""
        n = len(self.subsets["search"])
        budget = cache_mb * (1 << 20)
        chosen = set()
        for name in reversed(self.dyve):
            if self.index[name] <= 1:
                continue  # only the input layer before it: nothing to save
            blobs = [self.net.blobs[b] for b in self.live_in[name]]
            if any(b.data.ndim == 0 or b.data.shape[0] != self.batch for b in blobs):
                continue
            size = n * sum(b.data[0].nbytes for b in blobs)
            if size <= budget:
                chosen.add(name)
                budget -= size
        return chosen

    # -- settings: {DyVE layer: normalized settings}; a layer left out is knobs off
    def apply(self, settings):
        for name in self.dyve:
            want = settings.get(name, self.base[name])
            if want != self.applied[name]:
                live.set_settings(self.net, name, want)
                self.applied[name] = want

    def _batch_input(self, sel):
        return self.images[sel]

    # -- running
    def evaluate(self, settings, subset="search", start_layer=None, capture=False,
                 count=None, sample=None, desc=None):
        """Run `settings` on a subset; returns a dict with preds, effort (per layer,
        summed), ops (per image), n, and, when capture, the live-in cache of the DyVE
        layers after the start layer (search only).

        `count` limits the subset to its first images (rounded up to whole batches);
        `sample` = {DyVE layer: k} also returns, for the first k images, each layer's
        bottom, the minimum of each such layer's bottom over the subset, and the output gap
        between the two top scores (baseline bookkeeping).
        """
        self.apply(settings)
        idx = self.subsets[subset]
        if count is not None and count < len(idx):
            idx = idx[:min(len(idx), -(-count // self.batch) * self.batch)]
        n = len(idx)
        start = 0
        c = self.committed
        if (start_layer is not None and subset == "search" and c is not None
                and start_layer in self.cacheable and start_layer in c["cache"]
                and all(settings.get(l, self.base[l]) == c["settings"].get(l, self.base[l])
                        for l in self.dyve[:self.dyve.index(start_layer)])):
            start = self.index[start_layer]
        captures = [name for name in self.dyve if self.index[name] > start
                    and name in self.cacheable] if capture else []
        if sample is not None and start > 0:
            raise ValueError("sampling needs a run from the first layer")
        stops = sorted({self.index[nm] for nm in captures}
                       | ({self.index[nm] for nm in sample} if sample else set()))
        cache = {name: {b: None for b in self.live_in[name]} for name in captures}
        preds = np.empty(n, np.int64)
        gaps = np.empty(n, np.float64) if sample else None
        mins = {name: np.inf for name in sample} if sample else None
        bottoms = {}
        batch_effort = []
        live.reset_effort(self.net)
        last = len(self.names) - 1
        bar = tqdm(total=n, desc=desc or subset, unit=" img", leave=False,
                   disable=not self.progress)
        try:
            for b0 in range(0, n, self.batch):
                sel = idx[b0:b0 + self.batch]
                nb = len(sel)
                caffe_io.reshape(self.net, nb)
                if start == 0:
                    self.net.blobs[self.input].data[...] = self._batch_input(sel)
                else:
                    for blob in self.live_in[start_layer]:
                        self.net.blobs[blob].data[...] = c["cache"][start_layer][blob][b0:b0 + nb]
                before = live.effort(self.net)
                cur = start
                for k in stops:
                    if k > cur:
                        self.net._forward(cur, k - 1)
                        cur = k
                    name = self.names[k]
                    if name in cache:
                        for blob in self.live_in[name]:
                            data = self.net.blobs[blob].data
                            if cache[name][blob] is None:
                                cache[name][blob] = np.empty((n,) + data.shape[1:], np.float32)
                            cache[name][blob][b0:b0 + nb] = data
                    if sample is not None and name in sample:
                        bottom = self.net.blobs[self.net.bottom_names[name][0]].data
                        mins[name] = min(mins[name], float(bottom.min()))
                        if b0 < sample[name]:
                            take = bottom[:min(nb, sample[name] - b0)].copy()
                            bottoms.setdefault(name, []).append(take)
                self.net._forward(cur, last)
                out = self.net.blobs[self.output].data.reshape(nb, -1)
                preds[b0:b0 + nb] = out.argmax(axis=1)
                if sample:
                    top2 = np.sort(out, axis=1)[:, -2:] if out.shape[1] > 1 else \
                        np.concatenate([out, out], axis=1)
                    gaps[b0:b0 + nb] = top2[:, 1] - top2[:, 0]
                after = live.effort(self.net)
                batch_effort.append({name: {k: after[name][k] - before[name][k]
                                            for k in after[name]} for name in self.dyve})
                bar.update(nb)
        finally:
            bar.close()
        # Layers before the start were not run: their counters are the committed ones.
        if start > 0:
            nbatches = len(batch_effort)
            for i in range(nbatches):
                for name in self.dyve:
                    if self.index[name] < start:
                        batch_effort[i][name] = dict(c["batch_effort"][i][name])
        effort = {name: {} for name in self.dyve}
        for be in batch_effort:
            for name in self.dyve:
                effort[name] = dyve_effort.add(effort[name], be[name])
        ops = sum(dyve_effort.ops(effort[name]) for name in self.dyve) / n
        result = {"preds": preds, "effort": effort, "ops": ops, "n": n, "start": start,
                  "batch_effort": batch_effort}
        if capture:
            result["cache"] = cache
        if sample:
            result.update(gaps=gaps, mins=mins,
                          bottoms={k: np.concatenate(v) for k, v in bottoms.items()})
        return result

    def commit(self, settings, changed_layer=None, desc="commit"):
        """Make `settings` the committed setting on the search images (re-running from
        `changed_layer` when the cache allows) and return its evaluation."""
        result = self.evaluate(settings, "search", start_layer=changed_layer, capture=True,
                               desc=desc)
        cache = {}
        if self.committed is not None:
            for name, blobs in self.committed["cache"].items():
                if self.index[name] <= result["start"]:
                    cache[name] = blobs
        cache.update(result.pop("cache"))
        self.committed = {"settings": copy.deepcopy(settings), "cache": cache,
                          "batch_effort": result["batch_effort"]}
        return result
