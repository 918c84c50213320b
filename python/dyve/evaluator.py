"""One pycaffe net run over image subsets under per-layer DyVE settings (the tuner's
evaluation loop), re-running only the layers from the first changed one."""
import copy

import numpy as np
from tqdm import tqdm

from dyve import caffe_io, live, parallel
from dyve import effort as dyve_effort
from dyve import settings as dyve_settings


class Evaluator:
    """Runs one pycaffe net over image subsets under per-layer settings.

    It keeps a *committed* setting with, per DyVE layer, the blobs that flow into it
    (its "live-in" blobs) for every search image and the per-batch effort counters, so a
    setting that differs from the committed one only from layer L on is evaluated by
    running the net from L.
    """

    def __init__(self, net, images, batch, search, holdout, cache_mb=2048, progress=True,
                 workers=1, ray=None, net_spec=None, actor_cpus=1):
        """`images`: float32 N x C x H x W, preprocessed (caffe_io.load_images).
        `workers` / `ray`: the backend (dyve.parallel.make_backend); more than one worker
        needs `net_spec` = {"param": NetParameter bytes, "weights": path, "name": label}
        to load the same net in each worker."""
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
        self.version = 0
        self.backend = self._start_backend(workers, ray, net_spec, actor_cpus)

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
    def full(self, settings):
        """`settings` completed with knobs off for every DyVE layer it leaves out."""
        return {name: settings.get(name, self.base[name]) for name in self.dyve}

    def apply(self, settings):
        """Apply `settings` to the caller's own net (the coordinator's copy)."""
        for name in self.dyve:
            want = settings.get(name, self.base[name])
            if want != self.applied[name]:
                live.set_settings(self.net, name, want)
                self.applied[name] = want

    # -- workers
    def _meta(self):
        return {"dyve": list(self.dyve), "live_in": self.live_in}

    def _start_backend(self, workers, ray, net_spec, actor_cpus=1):
        def local():
            # the caller's own net: it already carries the settings applied so far
            runner = parallel.ShardRunner({"net": self.net}, self.images, self._meta())
            runner.applied = self.applied  # one net, one record of what it carries
            return runner

        def spec():
            if net_spec is None:
                raise parallel.ParallelError("more than one worker needs the net's "
                                             "prototxt and weights (net_spec)")
            return {"nets": {"net": net_spec}, "images": self.images, "meta": self._meta()}
        return parallel.make_backend(workers, ray, spec, local, actor_cpus)

    def close(self):
        """Stop the workers (a no-op for the in-process backend)."""
        self.backend.close()

    # -- running
    def evaluate(self, settings, subset="search", start_layer=None, capture=False,
                 count=None, sample=None, desc=None):
        """Run `settings` on a subset; returns a dict with preds, effort (per layer,
        summed), ops (per image), n, batch_effort, and the start layer's index.

        `count` limits the subset to its first images (rounded up to whole batches);
        `sample` = {DyVE layer: k} also returns, for the first k images, each layer's
        bottom, the minimum of each such layer's bottom over the subset, and the output gap
        between the two top scores (baseline bookkeeping). With `capture` (search only)
        the workers keep the live-in blobs of the DyVE layers after the start layer: the
        run becomes the committed one (see commit).

        The subset's batches are cut first and then shared out in contiguous shards, one
        per worker (dyve.parallel), and merged back in batch order: the result does not
        depend on the number of workers.
        """
        full = self.full(settings)
        idx = self.subsets[subset]
        table = parallel.batch_table(idx, self.batch)
        if count is not None and count < len(idx):
            table = table[:-(-count // self.batch)]
        n = sum(len(sel) for _, _, sel in table)
        start = 0
        c = self.committed
        if (start_layer is not None and subset == "search" and c is not None
                and start_layer in self.cacheable and start_layer in c["layers"]
                and all(full[l] == c["settings"][l]
                        for l in self.dyve[:self.dyve.index(start_layer)])):
            start = self.index[start_layer]
        if sample is not None and start > 0:
            raise ValueError("sampling needs a run from the first layer")
        if capture and subset != "search":
            raise ValueError("only the search images are cached")
        captures = [name for name in self.dyve if self.index[name] > start
                    and name in self.cacheable] if capture else []
        commit = None
        if capture:
            self.version += 1
            commit = self.version
        base = {"kind": "evaluate", "settings": full,
                "start_layer": self.names[start] if start else None,
                "version": c["version"] if c else None, "commit": commit,
                "captures": captures, "sample": sample}
        # Shards of the whole subset (a count-limited run takes its first batches), so a
        # batch's cached inputs are on the worker that ran it last.
        ranges = parallel.shard_ranges(len(parallel.batch_table(idx, self.batch)),
                                       self.backend.n_workers)
        tasks = []
        for shard, (lo, hi) in enumerate(ranges):
            batches = table[lo:min(hi, len(table))]
            if batches:
                tasks.append((shard, dict(base, batches=batches)))
        bar = tqdm(total=n, desc=desc or subset, unit=" img", leave=False,
                   disable=not self.progress)
        try:
            done = self.backend.run(tasks, progress=bar.update)
        finally:
            bar.close()
        items = [item for shard, _ in tasks for item in done[shard]]
        if [item["id"] for item in items] != list(range(len(table))):
            raise parallel.ParallelError("the workers returned batches "
                                         f"{[item['id'] for item in items]}, expected "
                                         f"0..{len(table) - 1}")
        preds = np.concatenate([item["preds"] for item in items]) if items else \
            np.empty(0, np.int64)
        batch_effort = []
        for j, item in enumerate(items):
            be = item["effort"]
            # Layers before the batch's start were not run: their counters are the
            # committed ones (equal to what running them would count).
            if item["start"] > 0:
                be = dict(be)
                for name in self.dyve:
                    if self.index[name] < item["start"]:
                        be[name] = dict(c["batch_effort"][j][name])
            batch_effort.append(be)
        effort = {name: {} for name in self.dyve}
        for be in batch_effort:  # in batch order: the same sums for any worker count
            for name in self.dyve:
                effort[name] = dyve_effort.add(effort[name], be[name])
        ops = sum(dyve_effort.ops(effort[name]) for name in self.dyve) / n
        result = {"preds": preds, "effort": effort, "ops": ops, "n": n, "start": start,
                  "batch_effort": batch_effort, "captured": captures}
        if sample:
            mins = {name: min([item["mins"][name] for item in items], default=np.inf)
                    for name in sample}
            bottoms = {}
            for item in items:
                for name, arr in item.get("bottoms", {}).items():
                    bottoms.setdefault(name, []).append(arr)
            result.update(gaps=np.concatenate([item["gaps"] for item in items]), mins=mins,
                          bottoms={k: np.concatenate(v) for k, v in bottoms.items()})
        return result

    def commit(self, settings, changed_layer=None, desc="commit"):
        """Make `settings` the committed setting on the search images (re-running from
        `changed_layer` when the cache allows) and return its evaluation. The workers
        keep the cached layer inputs; this side keeps which layers are cached and the
        per-batch counters."""
        result = self.evaluate(settings, "search", start_layer=changed_layer, capture=True,
                               desc=desc)
        layers = set()
        if self.committed is not None:
            layers = {name for name in self.committed["layers"]
                      if self.index[name] <= result["start"]}
        layers.update(result.pop("captured"))
        self.committed = {"settings": copy.deepcopy(self.full(settings)), "layers": layers,
                          "batch_effort": result["batch_effort"], "version": self.version}
        return result
