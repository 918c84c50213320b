"""Data-parallel evaluation of a net over image shards (docs/parallel.md).

The tuner's and the benchmark's evaluation loops split the batches of an image subset
into contiguous *shards*, one per worker, and merge the per-batch results back in batch
(hence shard) order. Each worker loads its nets once and keeps them, with its own cache
of layer inputs for the shards it owns, for the whole run; settings are applied live
(dyve.live). Three backends share one interface (`Backend.run`):

* `InProcess`: the caller's own net, no copy (one worker: exactly the serial loop);
* `LocalProcesses`: `--workers N` worker processes of this Python (`python3 -m
  dyve.parallel --worker-fd FD`), each talking over its own pipe;
* `RayActors`: `--ray ADDRESS|auto`, one Ray actor per worker (Ray's actor API).

Why the answer is the same bit for bit whatever the backend and the worker count: a batch
is always the same images (batches are cut from the subset before sharding, never per
shard), a net's output for a batch depends on nothing else, the effort counters are
integers summed per batch and the per-batch values are merged in batch order by the
caller. A worker that dies (its pipe closes, or Ray reports its actor dead) has its
shard run again on a surviving worker, which lacks that shard's cached layer inputs and
so runs it from the first layer: the same outputs and counters, only slower.
"""
import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

from dyve.errors import DyveError
from dyve.tools import BUILD_DIR

# Each worker is one process with one BLAS thread: the cores are shared out by process,
# not by OpenBLAS threads fighting over them.
WORKER_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "GLOG_minloglevel": "2"}
RAY_SITE = os.path.join(BUILD_DIR, "ray-site")

_CURRENT = []  # the backends in use (the last one is what tests kill workers of)


class ParallelError(DyveError):
    """A worker failed (with its traceback), or no worker is left."""


def current_backend():
    """The most recently started backend still open (tests use it to kill a worker)."""
    return _CURRENT[-1] if _CURRENT else None


def default_workers():
    return os.cpu_count() or 1


def net_spec(net_param, weights, name):
    """What a worker loads a net from: the NetParameter's bytes, the weights' absolute
    path and the name its messages use."""
    return {"param": net_param.SerializeToString(), "weights": os.path.abspath(weights),
            "name": name}


# ============================================================================ sharding

def batch_table(idx, batch):
    """[(batch id, position of its first image in the subset, image indices)] of `idx`."""
    idx = np.asarray(idx)
    return [(j, b0, idx[b0:b0 + batch]) for j, b0 in enumerate(range(0, len(idx), batch))]


def shard_ranges(n_batches, n_shards):
    """Contiguous [lo, hi) batch ranges, as even as possible, in order; none empty."""
    n_shards = max(1, min(n_shards, n_batches))
    return [(s * n_batches // n_shards, (s + 1) * n_batches // n_shards)
            for s in range(n_shards)]


# ============================================================================ the worker side

def limit_blas_threads(threads=1):
    """Set OpenBLAS's thread count in this process (it read the environment when it
    loaded; a Ray worker may have loaded it before the actor started). Returns the
    count OpenBLAS reports afterwards, or None without OpenBLAS."""
    import ctypes
    from dyve.machine import openblas_info
    info = openblas_info()
    if info["library"]:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(info["library"]).openblas_set_num_threads(int(threads))
        return openblas_info()["threads"]
    return None


class ShardRunner:
    """A worker's nets and state. `nets`: {key: pycaffe net}; `images`: N x C x H x W
    float32 (an array or a read-only memory map); `meta` (evaluate tasks): the net's
    DyVE layers, its live-in blobs and the cacheable layers (from dyve.evaluator).

    Task kinds: "evaluate" (dyve.evaluator: one setting over batches, optionally
    re-running from a cached layer and capturing layer inputs) and "scores" (dyve.bench:
    each named net's output scores, and the DyVE effort counters, per batch).
    """

    def __init__(self, nets, images, meta=None):
        self.nets, self.images, self.meta = nets, images, meta or {}
        self.applied = {}
        self.cache = {}  # batch id -> {"version": int, "blobs": {layer: {blob: array}}}
        if "net" in nets:
            from dyve import caffe_io
            net = nets["net"]
            self.names = list(net._layer_names)
            self.index = {name: i for i, name in enumerate(self.names)}
            self.input = caffe_io.input_blob(net)
            self.output = caffe_io.output_blob(net)

    def pid(self):
        return os.getpid()

    # -- settings
    def _apply(self, settings):
        from dyve import live
        net = self.nets["net"]
        for name, want in settings.items():
            if self.applied.get(name) != want:
                live.set_settings(net, name, want)
                self.applied[name] = want

    def run(self, task, on_batch=None):
        if task["kind"] == "evaluate":
            return self._evaluate(task, on_batch)
        if task["kind"] == "scores":
            return self._scores(task, on_batch)
        raise ValueError(f"unknown task kind {task['kind']!r}")

    # -- dyve.bench: scores of every net, effort of the DyVE one
    def _scores(self, task, on_batch):
        from dyve import caffe_io, live
        out = []
        dyve = self.nets.get(task.get("effort_net"))
        for bid, b0, sel in task["batches"]:
            x = self.images[sel]
            item = {"id": bid, "scores": {}}
            if dyve is not None:
                live.reset_effort(dyve)
            for key in task["nets"]:
                item["scores"][key] = caffe_io.forward(self.nets[key], x)
            if dyve is not None:
                item["effort"] = live.effort(dyve)
            out.append(item)
            if on_batch:
                on_batch(len(sel))
        return out

    # -- dyve.evaluator: one setting over batches
    def _evaluate(self, task, on_batch):
        from dyve import caffe_io, live
        net = self.nets["net"]
        meta, index, names = self.meta, self.index, self.names
        live_in, dyve = meta["live_in"], meta["dyve"]
        self._apply(task["settings"])
        start_layer, version = task["start_layer"], task["version"]
        commit = task.get("commit")  # the new version when this run is a commit
        sample = task.get("sample")
        last = len(names) - 1
        out = []
        for bid, b0, sel in task["batches"]:
            nb = len(sel)
            entry = self.cache.get(bid) if start_layer is not None else None
            use = (entry is not None and entry["version"] == version
                   and start_layer in entry["blobs"])
            start = index[start_layer] if use else 0
            captures = [n for n in task["captures"] if index[n] > start]
            stops = sorted({index[n] for n in captures}
                           | ({index[n] for n in sample} if sample else set()))
            caffe_io.reshape(net, nb)
            if start == 0:
                net.blobs[self.input].data[...] = self.images[sel]
            else:
                for blob, data in entry["blobs"][start_layer].items():
                    net.blobs[blob].data[...] = data
            item = {"id": bid, "start": start}
            captured = {}
            before = live.effort(net)
            cur = start
            for k in stops:
                if k > cur:
                    net._forward(cur, k - 1)
                    cur = k
                name = names[k]
                if name in captures:
                    captured[name] = {b: net.blobs[b].data.copy() for b in live_in[name]}
                if sample and name in sample:
                    bottom = net.blobs[net.bottom_names[name][0]].data
                    item.setdefault("mins", {})[name] = float(bottom.min())
                    if b0 < sample[name]:
                        item.setdefault("bottoms", {})[name] = \
                            bottom[:min(nb, sample[name] - b0)].copy()
            net._forward(cur, last)
            scores = net.blobs[self.output].data.reshape(nb, -1)
            item["preds"] = scores.argmax(axis=1).astype(np.int64)
            if sample:
                top2 = np.sort(scores, axis=1)[:, -2:] if scores.shape[1] > 1 else \
                    np.concatenate([scores, scores], axis=1)
                item["gaps"] = (top2[:, 1] - top2[:, 0]).astype(np.float64)
            after = live.effort(net)
            item["effort"] = {n: {k: after[n][k] - before[n][k] for k in after[n]}
                              for n in dyve}
            if commit is not None:
                kept = {n: b for n, b in (entry["blobs"].items() if use else ())
                        if index[n] <= start}
                kept.update(captured)
                self.cache[bid] = {"version": commit, "blobs": kept}
            out.append(item)
            if on_batch:
                on_batch(nb)
        if commit is not None:  # entries of older commits are stale: free them
            for bid in [b for b, e in self.cache.items() if e["version"] != commit]:
                del self.cache[bid]
        return out


def load_worker(spec):
    """A ShardRunner from a picklable spec: {"nets": {key: {"param": NetParameter bytes,
    "weights": path or bytes, "name": label}}, "images": array or .npy path, "meta"}."""
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    from caffe.proto import caffe_pb2
    from dyve import caffe_io
    limit_blas_threads(int(os.environ.get("OPENBLAS_NUM_THREADS", "1")))
    nets = {}
    tmp = None
    for key, net_spec in spec["nets"].items():
        param = caffe_pb2.NetParameter()
        param.ParseFromString(net_spec["param"])
        weights = net_spec["weights"]
        if isinstance(weights, bytes):  # shipped through Ray's object store
            tmp = tmp or tempfile.mkdtemp(prefix="dyve-worker-")
            path = os.path.join(tmp, f"{key}.caffemodel")
            with open(path, "wb") as f:
                f.write(weights)
            weights = path
        nets[key] = caffe_io.load_net(param, weights, model_name=net_spec.get("name"))
    images = spec["images"]
    if isinstance(images, str):
        images = np.load(images, mmap_mode="r")
    return ShardRunner(nets, images, spec.get("meta"))


def _worker_loop(fd):
    """`python3 -m dyve.parallel --worker-fd FD`: serve tasks on one pipe until it closes."""
    import signal
    from multiprocessing.connection import Connection
    # Ctrl-C reaches the whole process group: the driver handles it (it writes the best
    # setting so far and closes the pipes), a worker just waits for its pipe to close
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(fd)
    try:
        runner = load_worker(conn.recv())
        from dyve.machine import openblas_info
        conn.send(("ready", {"pid": os.getpid(), "blas_threads": openblas_info()["threads"]}))
    except Exception:  # noqa: BLE001 - the parent reports it
        conn.send(("error", traceback.format_exc()))
        return 1
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return 0
        if message is None:
            return 0
        shard, task = message
        try:
            conn.send(("ok", shard, runner.run(task)))
        except Exception:  # noqa: BLE001
            conn.send(("error", traceback.format_exc()))


# ============================================================================ backends

class Backend:
    """Runs tasks, one per shard, and returns {shard: result}. Shard s has affinity to
    worker s mod n (its cached layer inputs live there) until that worker dies."""
    name = "?"

    def __init__(self):
        self.n_workers = 1
        self.reruns = 0          # shards run again after their worker died
        self.failed_workers = []
        self.info = {}
        self._owner = {}
        _CURRENT.append(self)

    def owner(self, shard, alive):
        """The worker shard `shard` runs on: its first owner (shard mod n) while that one
        lives, else the least loaded survivor (lowest index on ties): deterministic."""
        w = self._owner.get(shard, shard % self.n_workers)
        if w not in alive:
            load = {a: 0 for a in alive}
            for s, o in self._owner.items():
                if o in load and s != shard:
                    load[o] += 1
            w = min(alive, key=lambda a: (load[a], a))
        self._owner[shard] = w
        return w

    def run(self, tasks, progress=None):
        raise NotImplementedError

    def worker_pids(self):
        return []

    def close(self):
        if self in _CURRENT:
            _CURRENT.remove(self)

    def describe(self):
        return {"backend": self.name, "workers": self.n_workers, "reruns": self.reruns,
                "failed_workers": list(self.failed_workers), **self.info}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class InProcess(Backend):
    """The caller's own nets: one worker, no copy, progress per batch."""
    name = "in-process"

    def __init__(self, runner):
        super().__init__()
        self.runner = runner
        from dyve.machine import openblas_info
        self.info = {"blas_threads": [openblas_info()["threads"]], "pids": [os.getpid()]}

    def run(self, tasks, progress=None):
        return {shard: self.runner.run(task, progress) for shard, task in tasks}

    def worker_pids(self):
        return [os.getpid()]


class LocalProcesses(Backend):
    """`n` worker processes of this Python, each on its own pipe."""
    name = "local-processes"

    def __init__(self, n, spec, threads=1):
        super().__init__()
        from multiprocessing import Pipe
        self.n_workers = int(n)
        env = dict(os.environ, **dict(WORKER_ENV, OPENBLAS_NUM_THREADS=str(threads)))
        # the workers import what this process imports (pycaffe, dyve) from the same places
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(
            [p for p in sys.path if p and os.path.isdir(p)]))
        self.conns, self.procs = [], []
        self.tmp_dir = tempfile.mkdtemp(prefix="dyve-workers-")
        try:
            spec = dict(spec)
            if not isinstance(spec["images"], str):
                spec["images"] = images_for_workers(spec["images"], self.tmp_dir)
            for _ in range(self.n_workers):
                parent, child = Pipe()
                # A session of its own per worker, as each Ray node has: with the kernel's
                # autogroups (sched_autogroup_enabled) CPU time is shared out per session,
                # so on a busy machine N workers in the driver's session would get one
                # session's share between them. The pipe, not the terminal, ends them.
                proc = subprocess.Popen(
                    [sys.executable, "-m", "dyve.parallel", "--worker-fd", str(child.fileno())],
                    pass_fds=[child.fileno()], env=env, start_new_session=True)
                child.close()
                self.conns.append(parent)
                self.procs.append(proc)
            for w, conn in enumerate(self.conns):
                conn.send(spec)
            pids, threads_seen = [], []
            for w, conn in enumerate(self.conns):
                kind, *rest = self._recv(w)
                if kind != "ready":
                    raise ParallelError(f"worker {w} could not start:\n{rest[0]}")
                pids.append(rest[0]["pid"])
                threads_seen.append(rest[0]["blas_threads"])
            self.alive = set(range(self.n_workers))
            self.info = {"blas_threads": threads_seen, "pids": pids}
        except BaseException:
            self.close()
            raise

    def _recv(self, w):
        try:
            return self.conns[w].recv()
        except (EOFError, OSError):
            code = self.procs[w].wait()
            raise ParallelError(f"worker {w} (pid {self.procs[w].pid}) exited with "
                                f"code {code} while starting") from None

    def worker_pids(self):
        return [self.procs[w].pid for w in sorted(self.alive)]

    def run(self, tasks, progress=None):
        from multiprocessing.connection import wait
        pending = list(tasks)           # (shard, task) not yet sent
        queues = {w: [] for w in self.alive}
        for shard, task in pending:
            queues[self.owner(shard, self.alive)].append((shard, task))
        busy = {}                        # worker -> (shard, task) in flight
        results = {}

        def feed(w):
            if w not in busy and queues.get(w):
                item = queues[w].pop(0)
                try:
                    self.conns[w].send(item)
                    busy[w] = item
                except (BrokenPipeError, OSError):
                    queues[w].insert(0, item)
                    lose(w)

        def lose(w):
            # the worker is gone: its in-flight and queued shards go to the survivors
            self.alive.discard(w)
            self.failed_workers.append(w)
            orphans = ([busy.pop(w)] if w in busy else []) + queues.pop(w, [])
            if not self.alive:
                raise ParallelError("every worker process died; the last was worker "
                                    f"{w} (pid {self.procs[w].pid})")
            for shard, task in orphans:
                self.reruns += 1
                target = self.owner(shard, self.alive)
                queues[target].append((shard, task))
                feed(target)

        for w in list(queues):
            feed(w)
        while busy:
            ready = wait([self.conns[w] for w in busy])
            for conn in ready:
                w = self.conns.index(conn)
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    self.procs[w].wait()
                    lose(w)
                    continue
                if message[0] == "error":
                    raise ParallelError(f"worker {w} failed:\n{message[1]}")
                _, shard, result = message
                busy.pop(w)
                results[shard] = result
                if progress:
                    progress(sum(len(b[2]) for b in dict(tasks)[shard]["batches"]))
                feed(w)
        return results

    def close(self):
        super().close()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(None)
            conn.close()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.conns, self.procs = [], []
        if getattr(self, "tmp_dir", None):
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            self.tmp_dir = None


def import_ray():
    """`ray`, from build/ray-site (`make ray-site`) when it is not on sys.path already."""
    try:
        import ray
        return ray
    except ImportError:
        pass
    if os.path.isdir(RAY_SITE):
        sys.path.insert(0, RAY_SITE)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [RAY_SITE] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
        try:
            import ray
            return ray
        except ImportError as error:
            raise ParallelError(f"--ray: cannot import Ray from {RAY_SITE}: {error}") from None
    raise ParallelError(f"--ray: Ray is not installed; run 'make ray-site' (it installs "
                        f"the pinned Ray into {RAY_SITE}, beside Debian's numpy)")


def ray_env(token=None):
    """This interpreter's environment with build/ray-site first on PYTHONPATH (Ray's own
    dependencies must load before Debian's copies of them), one BLAS thread, no usage
    reporting, no 30 s drain on SIGTERM, workers at normal priority (Ray nices them to
    15 by default: on a busy machine they would lose the cores to everything else, which
    is not what a comparison with local worker processes should measure), and token
    authentication when `token`."""
    env = dict(os.environ, **WORKER_ENV, RAY_USAGE_STATS_ENABLED="0",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", RAY_worker_niceness="0",
               PYTHONPATH=os.pathsep.join(dict.fromkeys(
                   [RAY_SITE] + [p for p in sys.path if p and os.path.isdir(p)])))
    if token:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    return env


@contextlib.contextmanager
def local_ray_cluster(tmp_dir, nodes=2, cpus_per_node=1, timeout=90):
    """A Ray cluster on this machine: `ray start --head` on 127.0.0.1 plus `nodes` - 1
    more `ray start --address` nodes, `cpus_per_node` CPUs each, token-authenticated.
    Yields {"address", "env"} (env: what a driver process needs, token included). Each
    node runs `ray start --block` in a process group of its own; leaving stops them by
    those groups (SIGTERM, SIGKILL after 30 s): nothing else on the machine is touched.
    (Ray advertises the machine's own address rather than 127.0.0.1; everything stays on
    this machine.)"""
    import secrets
    import signal
    import socket
    # a driver in this process must have the token before it imports ray (Ray reads the
    # auth mode once): use the one set in the environment, if any
    env = ray_env(os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(16))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cli = [sys.executable, os.path.join(RAY_SITE, "bin", "ray"), "start", "--block",
           f"--num-cpus={cpus_per_node}", "--object-store-memory=100000000",
           "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    procs = []
    try:
        for i in range(nodes):
            extra = ["--head", f"--port={port}", "--include-dashboard=false"] if i == 0 \
                else [f"--address=127.0.0.1:{port}"]
            log = os.path.join(tmp_dir, f"ray_node{i}.log")
            with open(log, "w") as f:
                procs.append(subprocess.Popen(cli + extra, stdout=f, stderr=subprocess.STDOUT,
                                              env=env, cwd=tmp_dir, start_new_session=True))
            deadline = time.time() + timeout
            while True:
                with open(log) as f:
                    text = f.read()
                if "Ray runtime started" in text:
                    break
                if procs[-1].poll() is not None or time.time() > deadline:
                    raise ParallelError(f"ray start (node {i}) did not start; {log}:\n"
                                        f"{text[-3000:]}")
                time.sleep(0.5)
        yield {"address": f"127.0.0.1:{port}", "env": env}
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


class _RayWorker:
    """The actor: one ShardRunner, built once from the spec."""

    def __init__(self, spec, images):
        # `images` is a top-level argument: Ray hands it over as the array (read-only,
        # shared with the node's other workers), not as a reference
        self.runner = load_worker(dict(spec, images=images))

    def ready(self):
        import ray
        from dyve.machine import openblas_info
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "blas_threads": openblas_info()["threads"]}

    def run(self, task):
        return self.runner.run(task)


class RayActors(Backend):
    """One Ray actor per worker on the cluster at `address` ("auto": the local one)."""
    name = "ray"

    def __init__(self, address, n, spec, actor_cpus=1):
        super().__init__()
        ray = self.ray = import_ray()
        self._own_init = not ray.is_initialized()
        try:
            if self._own_init:
                ray.init(address=address, log_to_driver=False,
                         runtime_env={"env_vars": dict(WORKER_ENV)})
            n = int(n or ray.cluster_resources().get("CPU", 1))
            self.n_workers = n
            # The images and the weights travel through the object store, once per node.
            spec = dict(spec)
            images = spec.pop("images")
            images = ray.put(np.ascontiguousarray(
                np.load(images) if isinstance(images, str) else images))
            nets = {}
            for key, net_spec in spec["nets"].items():
                net_spec = dict(net_spec)
                if isinstance(net_spec["weights"], str):
                    with open(net_spec["weights"], "rb") as f:
                        net_spec["weights"] = f.read()
                nets[key] = net_spec
            spec["nets"] = nets
            actor = ray.remote(num_cpus=actor_cpus, max_restarts=0)(_RayWorker)
            self.actors = [actor.options(scheduling_strategy="SPREAD").remote(spec, images)
                           for _ in range(n)]
            facts = ray.get([a.ready.remote() for a in self.actors])
            self.alive = set(range(n))
            self.info = {"address": address, "pids": [f["pid"] for f in facts],
                         "nodes": sorted({f["node"] for f in facts}),
                         "blas_threads": [f["blas_threads"] for f in facts],
                         "cluster_cpus": ray.cluster_resources().get("CPU")}
        except BaseException:
            self.close()
            raise

    def worker_pids(self):
        return [self.info["pids"][w] for w in sorted(self.alive)]

    def run(self, tasks, progress=None):
        ray = self.ray
        inflight = {}  # object ref -> (worker, shard, task)
        results = {}

        def submit(shard, task):
            w = self.owner(shard, self.alive)
            inflight[self.actors[w].run.remote(task)] = (w, shard, task)

        for shard, task in tasks:
            submit(shard, task)
        while inflight:
            done, _ = ray.wait(list(inflight), num_returns=1)
            for ref in done:
                w, shard, task = inflight.pop(ref)
                try:
                    results[shard] = ray.get(ref)
                except ray.exceptions.RayActorError:
                    # the actor (or its node) died: run the shard on a survivor
                    if w in self.alive:
                        self.alive.discard(w)
                        self.failed_workers.append(w)
                    if not self.alive:
                        raise ParallelError("every Ray worker died") from None
                    self.reruns += 1
                    submit(shard, task)
                    continue
                except ray.exceptions.RayTaskError as error:
                    raise ParallelError(f"Ray worker {w} failed:\n{error}") from None
                if progress:
                    progress(sum(len(b[2]) for b in task["batches"]))
        return results

    def close(self):
        super().close()
        ray = getattr(self, "ray", None)
        if ray is None:
            return
        for a in getattr(self, "actors", []):
            with contextlib.suppress(Exception):
                ray.kill(a)
        self.actors = []
        if self._own_init and ray.is_initialized():
            ray.shutdown()


def make_backend(workers=None, ray_address=None, spec=None, local=None, actor_cpus=1):
    """The backend for `--workers N` / `--ray ADDRESS`: InProcess(`local`) for one worker
    without Ray, else worker processes or Ray actors built from `spec` (a callable
    returning it, so that nothing is serialized when it is not needed)."""
    if workers is not None and int(workers) < 1:
        raise ParallelError(f"--workers must be >= 1, got {workers}")
    if ray_address:
        return RayActors(ray_address, workers, spec(), actor_cpus)
    workers = default_workers() if workers is None else int(workers)
    if workers == 1:
        return InProcess(local())
    return LocalProcesses(workers, spec())


def scores_pass(backend, n_images, batch, nets, effort_net=None, progress=None):
    """dyve.bench's accuracy pass on the workers: ({net key: N x classes scores}, the
    summed effort counters of `effort_net`) over images 0..n_images-1 in batches of
    `batch`, merged in batch order (the same arrays and sums as one serial pass)."""
    from dyve import effort as dyve_effort
    table = batch_table(np.arange(n_images), batch)
    tasks = [(s, {"kind": "scores", "batches": table[lo:hi], "nets": list(nets),
                  "effort_net": effort_net})
             for s, (lo, hi) in enumerate(shard_ranges(len(table), backend.n_workers))]
    done = backend.run(tasks, progress)
    items = [item for s, _ in tasks for item in done[s]]
    if [item["id"] for item in items] != list(range(len(table))):
        raise ParallelError("the workers returned the batches out of order")
    scores = {k: np.concatenate([item["scores"][k] for item in items]) for k in nets}
    effort = {}
    for item in items:  # in batch order
        for layer, counters in item.get("effort", {}).items():
            effort[layer] = dyve_effort.add(effort.get(layer, {}), counters)
    return scores, effort


def images_for_workers(images, tmp_dir):
    """The images as a .npy file the local workers memory-map: one copy, in the page
    cache, shared by them all, instead of one pickled copy per worker."""
    path = os.path.join(tmp_dir, "images.npy")
    np.save(path, np.ascontiguousarray(images, dtype=np.float32))
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python3 -m dyve.parallel",
        description="A worker process of dyve's data-parallel evaluation (started by "
                    "dyve.tune / dyve.bench --workers N; not meant to be run by hand). "
                    "See docs/parallel.md.")
    parser.add_argument("--worker-fd", type=int, required=True,
                        help="the inherited pipe to serve tasks on")
    args = parser.parse_args(argv)
    return _worker_loop(args.worker_fd)


if __name__ == "__main__":
    sys.exit(main())
