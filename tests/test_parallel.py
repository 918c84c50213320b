"""Data-parallel evaluation (python/dyve/parallel.py): one process, N local worker
processes and a real Ray cluster give the same answer bit for bit, and a worker killed
mid-run has its shard run again elsewhere with the same result.

The Ray part starts a cluster of two nodes on this machine (`ray start --head` on
127.0.0.1 plus one more `ray start --address`, one CPU each, token-authenticated:
dyve.parallel.local_ray_cluster), runs each Ray driver as a process of its own (pytest
has loaded Debian's copies of some of Ray's dependencies already) and stops the cluster
by the process groups it started. It runs when Ray is importable (`make ray-site`, which
`make test` runs first) and is skipped otherwise.
"""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from dyve import bench, caffe_io, parallel, tune
from dyve import settings as dyve_settings
from dyve.evaluator import Evaluator
from test_tune import MEAN, SHAPE, run, strip_volatile, tiny  # noqa: F401 (a fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):  # noqa: F811
    """The single-process tune of the tiny net: the answer everyone must give."""
    out = tmp_path_factory.mktemp("ref")
    return run(tiny, out, workers=1), out


def _killer(at, victim=1):
    """A tune hook that SIGKILLs worker `victim` of the running backend at evaluation
    `at` (the tune goes on: the next shard sent to it finds it dead and runs elsewhere)."""
    killed = []

    def hook(record):
        if record["id"] == at and not killed:
            backend = parallel.current_backend()
            pid = backend.info["pids"][victim]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return hook, killed


def _assert_same_tune(a, b):
    assert strip_volatile(a) == strip_volatile(b)
    # the parts that matter, named, so a failure says which
    assert a["final_settings"] == b["final_settings"]
    assert a["baseline"] == b["baseline"]
    assert [(e["ops"], e.get("n_rw"), e.get("acc")) for e in a["evaluations"]] == \
        [(e["ops"], e.get("n_rw"), e.get("acc")) for e in b["evaluations"]]


# ---------------------------------------------------------------------------- sharding

def test_shard_ranges_contiguous_and_even():
    assert parallel.shard_ranges(4, 3) == [(0, 1), (1, 2), (2, 4)]
    assert parallel.shard_ranges(2, 5) == [(0, 1), (1, 2)]  # never an empty shard
    assert parallel.shard_ranges(7, 1) == [(0, 7)]
    table = parallel.batch_table(np.array([5, 2, 9, 4, 7]), 2)
    assert [(j, b0, list(sel)) for j, b0, sel in table] == \
        [(0, 0, [5, 2]), (1, 2, [9, 4]), (2, 4, [7])]


# ---------------------------------------------------------------------------- local processes

def _evaluator_run(tiny, workers):  # noqa: F811
    """A fixed sequence of evaluations covering every path: the baseline with samples,
    commits, runs from cached layers, a count-limited run, the holdout."""
    net_param, _ = caffe_io.dyve_net_param(tiny["model"])
    net = caffe_io.load_net(net_param, tiny["weights"])
    x, _ = caffe_io.load_images(tiny["calib"], SHAPE, MEAN, limit=120)
    search, hold = tune.split_indices(len(x), 0.25, seed=1)
    spec = {"param": net_param.SerializeToString(), "weights": tiny["weights"], "name": "tiny"}
    ev = Evaluator(net, x, 20, search, hold, progress=False, workers=workers, net_spec=spec)
    try:
        assert ev.backend.n_workers == workers
        exact = dyve_settings.normalize({"relu": True, "spet": {"exact": True}})
        floor = {"conv1": dyve_settings.knobs_off(), "conv2": exact, "conv3": exact}
        out = [ev.evaluate(floor, "all", sample={"conv2": 30, "conv3": 7}), ev.commit(floor)]
        s = tune._with_level(floor, "conv3", "sdss", {"enabled": True, "threshold": 1.0})
        out.append(ev.evaluate(s, start_layer="conv3"))
        out.append(ev.evaluate(s, start_layer="conv3", count=30))
        s2 = tune._with_level(floor, "conv2", "spet", {"enabled": True, "fraction": 0.5})
        out.append(ev.commit(s2, changed_layer="conv2"))
        s3 = tune._with_level(s2, "conv3", "sfma", {"enabled": True, "threshold": 5.0})
        out.append(ev.evaluate(s3, start_layer="conv3"))
        out.append(ev.evaluate(s3, "holdout"))
        assert out[2]["start"] > 0 and out[5]["start"] > 0  # the cache was really used
        return out
    finally:
        ev.close()


def test_evaluator_one_and_three_workers_bit_identical(tiny):  # noqa: F811
    one, three = _evaluator_run(tiny, 1), _evaluator_run(tiny, 3)
    for a, b in zip(one, three):
        assert a.keys() == b.keys()
        np.testing.assert_array_equal(a["preds"], b["preds"])
        assert a["effort"] == b["effort"] and a["batch_effort"] == b["batch_effort"]
        assert a["ops"] == b["ops"] and a["n"] == b["n"] and a["start"] == b["start"]
        if "gaps" in a:
            assert a["gaps"].tobytes() == b["gaps"].tobytes()
            assert a["mins"] == b["mins"]
            for k in a["bottoms"]:
                assert a["bottoms"][k].tobytes() == b["bottoms"][k].tobytes()
    assert one[0]["bottoms"]["conv2"].shape[0] == 30
    assert one[0]["bottoms"]["conv3"].shape[0] == 7


def test_tune_two_processes_and_a_killed_worker_give_the_single_process_answer(
        tiny, reference, tmp_path):  # noqa: F811
    ref, _ = reference
    two = run(tiny, tmp_path / "two", workers=2)
    _assert_same_tune(two, ref)
    assert two["parallel"]["backend"] == "local-processes"
    assert two["parallel"]["workers"] == 2 and two["parallel"]["reruns"] == 0
    assert two["parallel"]["blas_threads"] == [1, 1]
    hook, killed = _killer(at=5)
    hurt = run(tiny, tmp_path / "killed", workers=3, hook=hook)
    assert killed, "the hook never killed a worker"
    assert hurt["parallel"]["failed_workers"] == [1]
    assert hurt["parallel"]["reruns"] >= 1
    _assert_same_tune(hurt, ref)


def test_bench_accuracy_pass_on_workers_matches_serial(tiny, reference):  # noqa: F811
    _, out = reference
    dyve_path = str(out / "tuned_deploy.prototxt")  # knobs on: the counters move
    stock = caffe_io.load_net(tiny["model"], tiny["weights"])
    dyve = caffe_io.load_net(dyve_path, tiny["weights"])
    x, y = caffe_io.load_images(tiny["calib"], SHAPE, MEAN)
    serial = bench.accuracy_pass(stock, dyve, x, y, 30)
    nets = {key: {"param": caffe_io.read_net_param(path).SerializeToString(),
                  "weights": tiny["weights"], "name": path}
            for key, path in (("stock", tiny["model"]), ("dyve", dyve_path))}
    with parallel.LocalProcesses(2, {"nets": nets, "images": x}) as backend:
        par = bench.accuracy_pass(stock, dyve, x, y, 30, backend=backend)
    assert serial[1] == par[1]  # effort counters, layer by layer
    assert serial[1]["conv3"]["macs_executed"] < serial[1]["conv3"]["macs_dense"]
    for key in ("stock", "dyve"):
        assert serial[0][key].tobytes() == par[0][key].tobytes()


def test_worker_error_names_the_worker(tiny):  # noqa: F811
    spec = {"nets": {"net": {"param": b"\x00garbage", "weights": tiny["weights"]}},
            "images": np.zeros((1,) + SHAPE, np.float32)}
    with pytest.raises(parallel.ParallelError, match="worker 0 could not start"):
        parallel.LocalProcesses(1, spec)


# ---------------------------------------------------------------------------- a Ray cluster

@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """Two nodes on this machine, one CPU each (dyve.parallel.local_ray_cluster)."""
    probe = subprocess.run([sys.executable, "-c", "import ray"], env=parallel.ray_env(),
                           capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"Ray is not installed ({parallel.RAY_SITE}: run make ray-site): "
                    f"{probe.stderr.strip().splitlines()[-1:]}")
    with parallel.local_ray_cluster(str(tmp_path_factory.mktemp("ray")), nodes=2) as cluster:
        yield cluster


# The Ray driver: dyve.tune.tune on the tiny net, as tests/test_tune.py's run() calls it,
# killing Ray worker 1 at evaluation KILL_AT (-1: never); ray-site is imported first.
DRIVER = """
import json, os, signal, sys
from dyve import parallel
parallel.import_ray()
from dyve import tune
model, weights, calib, out, address, kill_at = sys.argv[1:]
def hook(record):
    if record["id"] == int(kill_at):
        os.kill(parallel.current_backend().info["pids"][1], signal.SIGKILL)
tune.tune(model, weights, calib, mean="128,128,128", budget=0.0, batch=50, progress=False,
          out_dir=out, knobs=tune.KNOBS, ray=address, workers=2, hook=hook)
"""


def _ray_tune(tiny, cluster, out, kill_at=-1):  # noqa: F811
    cmd = [sys.executable, "-c", DRIVER, tiny["model"], tiny["weights"], tiny["calib"],
           str(out), cluster["address"], str(kill_at)]
    done = subprocess.run(cmd, env=cluster["env"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    with open(os.path.join(out, "search.json")) as f:
        return json.load(f)


def test_ray_cluster_tune_same_answer_and_rerun_after_kill(tiny, reference, ray_cluster,
                                                           tmp_path):  # noqa: F811
    _, ref_out = reference
    with open(ref_out / "search.json") as f:
        ref = json.load(f)
    on_ray = _ray_tune(tiny, ray_cluster, tmp_path / "ray")
    info = on_ray["parallel"]
    assert info["backend"] == "ray" and info["workers"] == 2 and info["reruns"] == 0
    assert len(info["nodes"]) == 2  # one actor per node: SPREAD over both
    assert info["blas_threads"] == [1, 1]
    _assert_same_tune(on_ray, ref)
    hurt = _ray_tune(tiny, ray_cluster, tmp_path / "ray_killed", kill_at=5)
    assert hurt["parallel"]["failed_workers"] == [1] and hurt["parallel"]["reruns"] >= 1
    _assert_same_tune(hurt, ref)
