"""Tests of python3 -m dyve.bench (python/dyve/bench.py, timing.py, report.py): the
summary.json schema on a tiny run, its internal consistency, the merged table, the tuning
plot (on a search.json that dyve.tune wrote) and the refusal of bad input. cifar10_quick
with filler weights, 20 test images: well under a minute."""
import json
import os

os.environ.setdefault("GLOG_minloglevel", "2")

import numpy as np
import pytest

import caffe

from dyve import bench, caffe_io, engines, nets, report
from dyve import effort as dyve_effort
from dyve.errors import DyveError
from dyve.tools import REPO_ROOT
from test_tune import run as run_tune, tiny  # noqa: F401  (tiny: dyve.tune's test net)

PROTO = os.path.join(REPO_ROOT, "prototxt")
STOCK = os.path.join(PROTO, "cifar10_quick_deploy.prototxt")
DYVE = os.path.join(PROTO, "cifar10_quick_dyve_deploy.prototxt")
TEST_LMDB = os.path.join(REPO_ROOT, "data", "cifar10", "cifar10_test_lmdb")
MEAN = os.path.join(REPO_ROOT, "data", "cifar10", "mean.binaryproto")

needs_data = pytest.mark.skipif(not os.path.isdir(TEST_LMDB) or not os.path.isfile(MEAN),
                                reason="CIFAR-10 LMDB not prepared (python3 -m dyve.data cifar10)")


def _filler_model(path, prototxt):
    net = caffe.Net(prototxt, caffe.TEST)
    engines.fill_weights(net, seed=7)
    net.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def weights(tmp):
    return _filler_model(tmp / "quick_filler.caffemodel", STOCK)


def _run(out_dir, *extra):
    argv = ["--net", "cifar10_quick", "--stock", STOCK, "--dyve", DYVE,
            "--images", TEST_LMDB, "--mean", MEAN, "--max-images", "20", "--batch", "4",
            "--repeats", "2", "--threads", "1", "--out-dir", str(out_dir), *extra]
    assert bench.main(argv) == 0
    with open(os.path.join(out_dir, "summary.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def summary(tmp, weights):
    return _run(tmp / "with_weights", "--weights", weights, "--opencv")


@pytest.fixture(scope="module")
def summary_no_weights(tmp):
    return _run(tmp / "no_weights")


@needs_data
def test_summary_schema(summary, tmp):
    for key, kind in report.REQUIRED_KEYS.items():
        assert key in summary, key
        assert isinstance(summary[key], kind), (key, type(summary[key]))
    assert summary["net"] == "cifar10_quick"
    assert summary["images"] == 20
    assert isinstance(summary["baseline_top1"], float) and 0 <= summary["baseline_top1"] <= 1
    assert summary["batches"] == [1, 4] and summary["threads"] == [1]
    for b in ("1", "4"):
        sp = summary["speedup"][b]["1"]
        assert isinstance(sp, float) and sp > 0
        tm = summary["timings"][b]["1"]
        assert set(tm["ms_per_image"]) == {"stock", "dyve", "opencv"}
        assert all(len(v) == 2 for v in tm["rounds_ms"].values())
        assert set(tm["layers"]) == {"conv1", "conv2", "conv3"}
        for row in tm["layers"].values():
            assert row["stock_ms"] > 0 and row["dyve_ms"] > 0
            assert row["skipping_efficiency"] == pytest.approx(row["speedup"] / row["ops_reduction"])
        assert tm["openblas_threads"] == 1
    assert set(summary["effort"]["layers"]) == {"conv1", "conv2", "conv3", "ip1", "ip2"}
    assert set(summary["effort"]["knobs"]) == set(dyve_effort.KNOBS)
    assert summary["machine"]["cores"] >= 1 and summary["machine"]["openblas"]["config"]
    assert "dyve.bench" in summary["command"]
    out = tmp / "with_weights"
    assert (out / "summary.md").read_text().count("| benchmark | baseline top-1 |") == 1
    assert (out / "effort.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in os.listdir(out) if ".tmp" in p]


@needs_data
def test_knobs_off_consistency(summary):
    s = summary
    assert s["ops_reduction"] == s["ops_dense"] / s["ops_executed"] == 1.0
    assert s["ops_reduction_dyve_layers"] == 1.0
    assert s["dyve_top1"] == s["baseline_top1"]
    top1 = s["accuracy"]["top1"]
    assert top1["flips_right_to_wrong"] == top1["flips_wrong_to_right"] == 0
    assert top1["diff"] == 0 and top1["diff_ci95"] == [0, 0]
    assert s["accuracy"]["agreement_top1"] == 1.0
    assert s["opencv_top1"] == pytest.approx(s["baseline_top1"], abs=0.051)  # 1 image of 20
    # ops_dense = sum of the layers = 12.35 M MACs per image for cifar10_quick
    layers = s["effort"]["layers"]
    assert s["ops_dense"] == sum(r["ops_dense"] for r in layers.values())
    assert s["ops_dense"] == 12_354_176 * s["images"]
    assert s["ops_dense_dyve_layers"] == sum(r["macs_dense"] for r in layers.values() if r["dyve"])
    assert not s["warnings"]


@needs_data
def test_no_weights_mode(summary_no_weights, tmp):
    s = summary_no_weights
    assert s["weights"] is None and s["baseline_top1"] is None and s["dyve_top1"] is None
    assert bench.NO_WEIGHTS_LABEL in s["label"]
    assert s["accuracy"]["agreement_top1"] == 1.0
    assert s["ops_reduction"] == 1.0
    md = (tmp / "no_weights" / "summary.md").read_text()
    assert bench.NO_WEIGHTS_LABEL in md


@needs_data
def test_table_merge_parses_back(summary, summary_no_weights, tmp, capsys):
    paths = [str(tmp / "with_weights" / "summary.json"), str(tmp / "no_weights" / "summary.json")]
    md, plain = report.merge_table(paths)
    rows = report.parse_table(plain)
    assert [r["net"] for r in rows] == ["cifar10_quick", "cifar10_quick"]
    a, b = rows
    assert a["weights"] == "yes" and b["weights"] == "none"
    assert a["baseline_top1"] == pytest.approx(100 * summary["baseline_top1"], abs=0.005)
    assert a["delta_top1"] == 0
    assert b["baseline_top1"] is None and b["dyve_top1"] is None
    assert a["ops_reduction"] == 1.0 and a["N"] == 4 and a["images"] == 20
    assert a["speedup_b1"] == pytest.approx(summary["speedup"]["1"]["1"], abs=5e-4)
    assert a["speedup_bN"] == pytest.approx(summary["speedup"]["4"]["1"], abs=5e-4)
    assert (a["delta_ci_low"], a["delta_ci_high"]) == (0, 0)  # no flips on 20 images
    assert a["protocol"] is None and b["delta_ci_low"] is None
    assert ("| benchmark | tuning protocol | baseline top-1 | DyVE top-1 | change (95 % CI) "
            "| ops reduction |") in md
    assert bench.NO_WEIGHTS_LABEL in md
    # the CLI prints the same plain table and writes the markdown
    md_path = tmp / "table.md"
    assert bench.main(["--table", *paths, "--table-md", str(md_path)]) == 0
    assert report.parse_table(capsys.readouterr().out) == rows
    assert md_path.read_text() == md


@needs_data
def test_exact_mode_keeps_accuracy_and_saves_ops(tmp, weights):
    """Exact early termination never changes a ReLU output: same predictions, fewer ops."""
    net = nets.cifar10_quick(form="deploy", dyve={
        "conv2": {"spet": {"exact": True}}, "conv3": {"spet": {"exact": True}}})
    path = tmp / "exact_dyve.prototxt"
    path.write_text(nets.to_text(net))
    stock, dyve, _ = bench.load_nets(STOCK, str(path), weights, str(tmp))
    images, labels = caffe_io.load_images(TEST_LMDB, (3, 32, 32), MEAN, limit=20)
    scores, effort = bench.accuracy_pass(stock, dyve, images, labels, 10)
    acc = bench.accuracy_summary(scores, labels, with_accuracy=True)
    assert acc["top1"]["stock"] == acc["top1"]["dyve"]
    assert acc["top1"]["flips_right_to_wrong"] == acc["top1"]["flips_wrong_to_right"] == 0
    eff, totals, warnings = dyve_effort.summarize(
        effort, caffe_io.layer_macs(stock), {}, {}, len(images))
    assert not warnings
    # (with random weights the sign checks may cost more than they save: no claim on > 1)
    assert totals["ops_reduction"] == totals["ops_dense"] / totals["ops_executed"]
    assert totals["ops_executed"] == totals["ops_executed_dyve_layers"] + \
        totals["ops_non_dyve_layers"]
    conv2 = eff["layers"]["conv2"]
    assert conv2["macs_skipped"]["exact"] > 0 and conv2["ops_overhead"]["exact"] > 0
    assert conv2["macs_dense"] == conv2["macs_executed"] + sum(conv2["macs_skipped"].values())
    assert conv2["ops_executed"] == conv2["macs_executed"] + conv2["ops_overhead"]["exact"]
    assert conv2["ops_reduction"] == conv2["macs_dense"] / conv2["ops_executed"]
    assert eff["knobs"]["exact"]["macs_skipped"] == sum(
        r["macs_skipped"]["exact"] for r in eff["layers"].values())
    assert eff["layers"]["conv1"]["ops_reduction"] == 1.0


def test_paired_stats():
    ref = [1, 1, 0, 0, 1, 0, 1, 1]
    new = [1, 0, 1, 0, 1, 0, 1, 0]
    s = bench.paired_entry(ref, new)
    assert s["flips_right_to_wrong"] == 2 and s["flips_wrong_to_right"] == 1
    d = np.array(new) - np.array(ref)
    assert s["diff"] == pytest.approx(d.mean())
    se = d.std(ddof=1) / np.sqrt(len(d))
    z = 1.959963984540054  # two-sided 95 %
    assert s["diff_ci95"] == pytest.approx([d.mean() - z * se, d.mean() + z * se])


# ----------------------------------------------------------------------------- bad input

def _fails(argv, capsys, *needles):
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    for needle in needles:
        assert needle in err, err
    return err


def test_missing_weights_file(tmp, capsys):
    _fails(["--net", "cifar10_quick", "--weights", str(tmp / "nope.caffemodel")], capsys,
           "--weights", "nope.caffemodel", "does not exist")


def test_missing_prototxt(tmp, capsys):
    _fails(["--net", "cifar10_quick", "--dyve", str(tmp / "missing.prototxt")], capsys,
           "--dyve", "does not exist")


@needs_data
def test_mismatched_caffemodel(tmp, capsys):
    full = _filler_model(tmp / "full_filler.caffemodel",
                         os.path.join(PROTO, "cifar10_full_deploy.prototxt"))
    err = _fails(["--net", "cifar10_quick", "--weights", full, "--max-images", "4",
                  "--threads", "1", "--out-dir", str(tmp / "mismatch")], capsys,
                 "does not match", "layer 'ip1' blob 0: prototxt 64x1024, caffemodel 10x1024",
                 "layer 'ip2' has no weights")
    assert not (tmp / "mismatch" / "summary.json").exists()


def test_mismatched_prototxts(tmp, capsys):
    _fails(["--net", "cifar10_quick", "--stock",
            os.path.join(PROTO, "cifar10_full_deploy.prototxt"), "--dyve", DYVE,
            "--threads", "1", "--out-dir", str(tmp / "pair")], capsys,
           "different layers", "only in the stock net: norm1, norm2")


def test_bad_prototxt_and_weights(tmp, capsys):
    bad = tmp / "bad.prototxt"
    bad.write_text("layer { name: 'x' type: \n")
    _fails(["--net", "cifar10_quick", "--dyve", str(bad), "--threads", "1"], capsys,
           "not a valid NetParameter prototxt")
    junk = tmp / "junk.caffemodel"
    junk.write_bytes(b"\xff\x00not a model" * 10)
    with pytest.raises(DyveError, match="not a binary caffemodel|holds no layers"):
        caffe_io.weight_blobs(str(junk))


def test_table_refuses_non_summary(tmp):
    other = tmp / "other.json"
    other.write_text(json.dumps({"net": "x"}))
    with pytest.raises(bench.BenchError, match="not a dyve.bench summary"):
        report.merge_table([str(other)])


# ----------------------------------------------------------------------------- tuning plot

# dyve.tune's layout (python/dyve/tune.py), the keys plot_tuning reads
SEARCH_DOC = {
    "units": {"loss": "percentage points of top-1 (paired, vs the dense net)"},
    "config": {"budget": 0.5}, "baseline": {"dense_macs": 12.3e6, "other_macs": 66e3},
    "evaluations": [
        {"stage": "baseline", "subset": "all", "ops": 12.3e6, "loss": 0.0, "accepted": True},
        {"stage": "greedy", "subset": "search", "ops": 7e6, "loss": 0.4, "accepted": False},
        {"stage": "holdout", "subset": "holdout", "ops": 8e6, "loss": 0.3, "accepted": None}],
    "summary": {"final_ops": 8e6, "search_loss": 0.2, "dense_ops": 12.3e6}}


def test_plot_tuning(tmp):
    path = tmp / "search.json"
    path.write_text(json.dumps(SEARCH_DOC))
    out = tmp / "tuning.png"
    assert report.plot_tuning(str(path), str(out)) == 2
    assert out.read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def search_json(tiny, tmp_path_factory):  # noqa: F811
    """The search.json of a real dyve.tune run (tests/test_tune.py's tiny net)."""
    out = tmp_path_factory.mktemp("tiny_tune") / "tune"
    run_tune(tiny, out)
    return out / "search.json"


def test_plot_tuning_reads_dyve_tune_output(search_json, tmp, capsys):
    doc = json.loads(search_json.read_text())
    search = [e for e in doc["evaluations"] if e["subset"] != "holdout"]
    assert search and len(search) < len(doc["evaluations"])  # holdout checks drawn apart
    out = tmp / "tiny_tuning.png"
    assert report.plot_tuning(str(search_json), str(out)) == len(search)
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert bench.main(["--plot-tuning", str(search_json), str(out)]) == 0
    assert capsys.readouterr().out == f"{len(search)} settings plotted to {out}\n"


@pytest.mark.parametrize("keys, name", [
    (("evaluations",), "evaluations"), (("baseline",), "baseline"),
    (("baseline", "dense_macs"), "baseline.dense_macs"), (("config", "budget"), "config.budget"),
    (("summary",), "summary"), (("summary", "final_ops"), "summary.final_ops"),
    (("units", "loss"), "units.loss"), (("evaluations", 0, "loss"), "evaluations[0].loss"),
    (("evaluations", 1, "ops"), "evaluations[1].ops"),
    (("evaluations", 2, "subset"), "evaluations[2].subset"),
    (("evaluations", 3, "accepted"), "evaluations[3].accepted")])
def test_plot_tuning_names_a_missing_key(search_json, tmp, capsys, keys, name):
    doc = json.loads(search_json.read_text())
    parent = doc
    for key in keys[:-1]:
        parent = parent[key]
    del parent[keys[-1]]
    path = tmp / "search_missing.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(bench.BenchError) as error:
        report.plot_tuning(str(path), str(tmp / "x.png"))
    assert str(error.value).startswith(f"{path}: no key '{name}'"), str(error.value)
    assert not (tmp / "x.png").exists()
    # the CLI says the same in one line
    assert bench.main(["--plot-tuning", str(path), str(tmp / "x.png")]) == 2
    assert capsys.readouterr().err == f"error: {error.value}\n"


@pytest.mark.parametrize("doc, needle", [
    ({"nothing": 1}, "no key 'evaluations'"),
    # layouts other tools write: refused, not guessed at
    ([{"ops_per_image": 8e6, "ops_dense_per_image": 12e6, "loss": 0.002, "accepted": True}],
     "a JSON list, not the object dyve.tune writes"),
    ({"ops_dense": 12e6, "budget": 0.005, "trials": [{"ops": 9e6, "loss": 0.001}]},
     "no key 'evaluations'"),
    ({"evaluations": [{"ops": 9e6, "loss": 0.1}], "baseline": {"dense_macs": 12e6},
      "config": {"budget": 0.5}, "summary": {"final_ops": None}, "units": {"loss": "pp"}},
     "no key 'evaluations[0].subset'"),
    (dict(SEARCH_DOC, evaluations=[SEARCH_DOC["evaluations"][2]]), "no search evaluation"),
])
def test_plot_tuning_refuses_other_layouts(tmp, doc, needle):
    path = tmp / "search_bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(bench.BenchError, match="^" + str(path)) as error:
        report.plot_tuning(str(path), str(tmp / "x.png"))
    assert needle in str(error.value)


# ----------------------------------------------------------------------------- faults

@needs_data
def test_non_finite_weights_refused_naming_the_blob(tmp, weights, capsys):
    net = caffe.Net(STOCK, weights, caffe.TEST)
    net.params["conv2"][1].data[3] = np.nan
    bad = str(tmp / "nan.caffemodel")
    net.save(bad)
    _fails(["--net", "cifar10_quick", "--weights", bad, "--max-images", "4", "--threads",
            "1", "--out-dir", str(tmp / "nan")], capsys,
           "layer 'conv2' blob 1", "not finite")
    assert not (tmp / "nan").exists() or not (tmp / "nan" / "summary.json").exists()


@needs_data
def test_non_finite_mean_values_refused(tmp, capsys):
    _fails(["--net", "cifar10_quick", "--mean-value", "1,nan,3", "--max-images", "4",
            "--threads", "1", "--out-dir", str(tmp / "nanmean")], capsys, "not finite")


def test_unwritable_out_dir_refused_up_front(tmp, capsys):
    blocker = tmp / "a_file"
    blocker.write_text("x")
    _fails(["--net", "cifar10_quick", "--threads", "1", "--out-dir",
            str(blocker / "below")], capsys, "cannot write")


@needs_data
def test_chance_level_baseline_refused(tmp, weights, capsys):
    # filler weights passed off as trained ones: top-1 near 10 % on 100 images
    _fails(["--net", "cifar10_quick", "--weights", weights, "--max-images", "100",
            "--threads", "1", "--out-dir", str(tmp / "chance")], capsys, "chance level")


@needs_data
def test_sigterm_stops_the_worker_and_cleans_up(tmp):
    import signal
    import subprocess
    import sys
    import time
    scratch = tmp / "scratch"
    scratch.mkdir()
    env = dict(os.environ, TMPDIR=str(scratch))
    proc = subprocess.Popen(
        [sys.executable, "-m", "dyve.bench", "--net", "cifar10_quick", "--max-images", "200",
         "--batch", "100", "--repeats", "200", "--threads", "1", "--out-dir",
         str(tmp / "sigterm")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    workers = []
    while time.time() < deadline and not workers:  # wait for the timing worker
        time.sleep(0.5)
        workers = [p for p in os.listdir("/proc") if p.isdigit()
                   and _cmdline(p).count("--worker") and str(scratch) in _cmdline(p)]
    assert workers, "no timing worker started"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    time.sleep(0.5)
    assert not [p for p in workers if os.path.exists(f"/proc/{p}")
                and _cmdline(p).count("--worker")], "the worker outlived the benchmark"
    assert os.listdir(scratch) == []
    assert not (tmp / "sigterm" / "summary.json").exists()


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
