"""The threshold tuner (python/dyve/tune.py) on tiny nets with known answers.

The net: conv1 -> relu -> conv2 -> relu -> conv3 -> relu, concat(conv2, conv3) -> ip.
The classifier's weights on conv3's channels are zero, so conv3 never influences a
prediction (its knobs are free: the tuner must push it to its most aggressive levels),
while conv2 feeds the classifier directly and every image's label is the dense net's own
prediction (any change is a right -> wrong flip: under budget 0 its approximate knobs must
stay off). Weights are random (seeded), written to a caffemodel in tmp.
"""
import json
import os

import lmdb
import numpy as np
import pytest
from google.protobuf import text_format

import caffe
from caffe.proto import caffe_pb2

from dyve import caffe_io, ladders, live, tune
from dyve.tuned import compact
from dyve import settings as dyve_settings
from dyve.errors import DyveError
from dyve.evaluator import Evaluator

N_IMAGES = 200
SHAPE = (3, 8, 8)
MEAN = "128,128,128"

STOCK = """
name: "tiny"
layer { name: "data" type: "Input" top: "data"
  input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  convolution_param { num_output: CONV2_OUT kernel_size: 3 pad: 1 } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "CONV3_NAME" type: "Convolution" bottom: "conv2" top: "conv3"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "relu3" type: "ReLU" bottom: "conv3" top: "conv3" }
layer { name: "concat" type: "Concat" bottom: "conv2" bottom: "conv3" top: "feat" }
layer { name: "ip" type: "InnerProduct" bottom: "feat" top: "ip"
  inner_product_param { num_output: 4 } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


def stock_text(conv2_out=8, conv3_name="conv3"):
    return STOCK.replace("CONV2_OUT", str(conv2_out)).replace("CONV3_NAME", conv3_name)


def write(path, text):
    path.write_text(text)
    return str(path)


def make_weights(tmp_path, conv3_name="conv3", name="tiny.caffemodel"):
    """Random weights; the classifier ignores conv3's channels."""
    proto = write(tmp_path / f"stock_{conv3_name}.prototxt", stock_text(conv3_name=conv3_name))
    net = caffe.Net(proto, caffe.TEST)
    rng = np.random.RandomState(7)
    for layer, params in net.params.items():
        w = params[0].data
        fan_in = int(np.prod(w.shape[1:]))
        w[...] = rng.randn(*w.shape) / np.sqrt(fan_in)
        params[1].data[...] = 0.1 * rng.randn(*params[1].data.shape)
    # conv2: positive weights and bias on non-negative inputs, so every output is > 0 and
    # any skipped, filled or mean-replaced value is a real change that reaches the classifier
    net.params["conv2"][0].data[...] = np.abs(net.params["conv2"][0].data)
    net.params["conv2"][1].data[...] = 0.5
    ip = net.params["ip"][0].data
    ip[...] = rng.randn(*ip.shape) * 3.0
    ip[:, ip.shape[1] // 2:] = 0.0  # conv3's half of the concat: never matters
    # centre the classifier on the calibration images' mean feature, so the classes
    # depend on each image's deviation from it (small margins, spread over the classes)
    imgs = images()
    net.blobs["data"].reshape(len(imgs), *SHAPE)
    net.reshape()
    net.blobs["data"].data[...] = imgs.astype(np.float32) - 128.0
    net.forward()
    mean_feat = net.blobs["feat"].data.reshape(len(imgs), -1).mean(axis=0)
    net.params["ip"][1].data[...] = -ip @ mean_feat
    path = str(tmp_path / name)
    net.save(path)
    return path, proto


def images(n=N_IMAGES, seed=3):
    rng = np.random.RandomState(seed)
    return rng.randint(0, 256, size=(n,) + SHAPE).astype(np.uint8)


def dense_predictions(proto, weights, imgs):
    net = caffe.Net(proto, weights, caffe.TEST)
    net.blobs["data"].reshape(len(imgs), *SHAPE)
    net.reshape()
    net.blobs["data"].data[...] = imgs.astype(np.float32) - 128.0
    net.forward()
    return net.blobs["prob"].data.argmax(axis=1)


def write_lmdb(path, imgs, labels):
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i, (img, label) in enumerate(zip(imgs, labels)):
            datum = caffe_pb2.Datum(channels=img.shape[0], height=img.shape[1],
                                    width=img.shape[2], data=img.tobytes(),
                                    label=int(label))
            txn.put(f"{i:08d}".encode(), datum.SerializeToString())
    env.close()
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    weights, proto = make_weights(tmp)
    imgs = images()
    labels = dense_predictions(proto, weights, imgs)  # the dense net is always right
    calib = write_lmdb(tmp / "calib_lmdb", imgs, labels)
    return {"dir": tmp, "weights": weights, "model": proto, "calib": calib,
            "labels": labels}


def run(tiny, out, **kwargs):
    args = dict(mean=MEAN, budget=0.0, batch=50, progress=False, out_dir=str(out),
                knobs=tune.KNOBS)  # exact mode included: the floor is tested too
    args.update(kwargs)
    return tune.tune(tiny["model"], tiny["weights"], tiny["calib"], **args)


def strip_volatile(obj):
    if isinstance(obj, dict):
        return {k: strip_volatile(v) for k, v in obj.items() if k not in tune.VOLATILE_KEYS}
    if isinstance(obj, list):
        return [strip_volatile(v) for v in obj]
    return obj


@pytest.fixture(scope="module")
def tuned(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    return run(tiny, out), out


# ---------------------------------------------------------------------------- statistics

def test_paired_stats_by_hand():
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    p0 = np.array([0, 1, 2, 3, 0, 1, 2, 0, 1, 2])      # 7 right, 3 wrong
    p = np.array([0, 1, 2, 1, 0, 2, 2, 3, 1, 3])       # 3->1 and 1->2 break; 0->3 fixes
    st = tune.paired_stats(p0, p, labels, confidence=0.95)
    assert (st["n"], st["n_rw"], st["n_wr"], st["n_changed"]) == (10, 2, 1, 4)
    # d = [0,0,0,1,0,1,0,-1,0,0]: mean 0.1, sample variance (3 - 10*0.01)/9
    mean = 0.1
    se = np.sqrt((3 - 10 * mean ** 2) / 9 / 10)
    z = 1.6448536269514722
    assert st["loss"] == pytest.approx(100 * mean)
    assert st["se"] == pytest.approx(100 * se)
    assert st["ucb"] == pytest.approx(100 * (mean + z * se))
    assert st["gate"] == pytest.approx(st["ucb"])
    assert st["ci_low"] == pytest.approx(100 * (mean - 1.959963984540054 * se))
    assert st["acc0"] == pytest.approx(70.0) and st["acc"] == pytest.approx(60.0)
    # a net gain: loss < 0, the gate does not bank it
    st = tune.paired_stats(p, p0, labels)
    assert st["loss"] == pytest.approx(-10.0) and st["n_rw"] == 1 and st["n_wr"] == 2
    assert st["gate"] == pytest.approx(100 * z * se)
    # projected to 4x the images' SE (a holdout 1/4 the size), sign kept when not clamped
    st = tune.paired_stats(p, p0, labels, se_scale=2.0, clamp=False)
    assert st["gate"] == pytest.approx(100 * (-0.1 + 2 * z * se))
    # no change at all: zero loss, zero SE
    st = tune.paired_stats(p0, p0, labels)
    assert (st["loss"], st["se"], st["ucb"], st["n_changed"]) == (0.0, 0.0, 0.0, 0)


def test_pareto_ladder():
    # (ops, loss, bound): 1 is dominated by 2, 3 is over budget, 4 saves nothing
    points = [(9.0, 0.0, 0.1), (8.0, 0.4, 0.4), (7.0, 0.2, 0.3), (5.0, 0.1, 9.0),
              (10.0, 0.0, 0.0), (6.0, 0.3, 0.45)]
    assert ladders.pareto_ladder(points, floor_ops=10.0, budget=0.5) == [0, 2, 5]


# ---------------------------------------------------------------------------- known answers

def test_free_layer_goes_all_the_way_and_sensitive_layer_stays_off(tuned):
    result, out = tuned
    final = result["final_settings"]
    # exact floor: on conv2 and conv3 (inputs after a ReLU), not conv1 (signed inputs)
    elig = result["floor"]["eligibility"]
    assert not elig["conv1"]["exact"] and elig["conv2"]["exact"] and elig["conv3"]["exact"]
    assert final["conv2"] == {"spet": {"exact": True}}, final["conv2"]
    # conv2's levels were really costly (or saved nothing): not just untried
    sweep2 = [e for e in result["evaluations"] if e["stage"] == "sweep" and e["layer"] == "conv2"]
    assert sweep2 and all(e["n_rw"] > 0 or e["ops"] >= result["floor"]["ops"] for e in sweep2)
    # conv3: every level is free; each knob ends at its most aggressive level, unless
    # stacking it on the others saves nothing
    sweep3 = [e for e in result["evaluations"] if e["stage"] == "sweep" and e["layer"] == "conv3"]
    assert sweep3 and all(e["n_rw"] == 0 and e["n_wr"] == 0 for e in sweep3)
    levels = result["levels"]["conv3"]["ladders"]
    refused = {(e["knob"]): e["refused"] for e in result["evaluations"]
               if e["stage"] == "greedy" and e["layer"] == "conv3" and not e["accepted"]}
    for knob in ("spet", "sdss", "sfma"):
        runs = [e for e in sweep3 if e["knob"] == knob]
        if not runs:
            continue
        best = min(runs, key=lambda e: (e["ops"], e["level"]))
        want = levels[knob][best["level"]]["set"]
        # (the exact floor alone puts a "spet" entry in conv3's settings)
        if knob in final["conv3"] and (knob != "spet" or final["conv3"]["spet"].get("enabled")):
            got = {k: v for k, v in final["conv3"][knob].items() if k in want}
            assert got == want, (knob, got, want)
        else:
            assert refused.get(knob) == "no ops saved", (knob, refused)
    assert "sdss" in final["conv3"] and "sfma" in final["conv3"]
    # the final setting changes no prediction (search and holdout)
    assert result["holdout"]["passed"] is True
    assert result["summary"]["holdout"]["n_rw"] == 0
    assert result["summary"]["final_ops"] < result["floor"]["ops"]


def test_outputs_and_tuned_prototxt_load(tiny, tuned):
    result, out = tuned
    for name in ("tuned_deploy.prototxt", "search.json", "search.md"):
        assert (out / name).is_file()
    saved = json.loads((out / "search.json").read_text())
    assert saved["final_settings"] == result["final_settings"]
    assert saved["interrupted"] is False
    for e in saved["evaluations"]:
        for key in ("stage", "layer", "knob", "settings", "ops", "n_rw", "n_wr", "loss",
                    "se", "ucb", "accepted"):
            assert key in e
    assert not [p for p in os.listdir(out) if ".tmp" in p]
    # the tuned deploy loads the stock caffemodel and carries the settings
    net = caffe.Net(str(out / "tuned_deploy.prototxt"), tiny["weights"], caffe.TEST)
    for name, c in result["final_settings"].items():
        assert compact(live.get_settings(net, name)) == c
    assert "DyVE tuning" in (out / "search.md").read_text()


def test_train_val_copy(tiny, tmp_path):
    tv = caffe_pb2.NetParameter()
    text_format.Merge(stock_text(), tv)
    data = tv.layer[0]
    data.type, data.name = "Data", "data"
    data.ClearField("input_param")
    data.top.append("label")
    data.data_param.source = "x_lmdb"
    data.data_param.batch_size = 10
    data.data_param.backend = caffe_pb2.DataParameter.LMDB
    tv.layer[-1].type, tv.layer[-1].name = "SoftmaxWithLoss", "loss"
    tv.layer[-1].bottom.append("label")
    tv.layer[-1].top[0] = "loss"
    path = write(tmp_path / "tv.prototxt", text_format.MessageToString(tv))
    result = run(tiny, tmp_path / "o", train_val=path, knobs=("exact", "spet"),
                 max_images=60)
    out = caffe_pb2.NetParameter()
    text_format.Merge((tmp_path / "o" / "tuned_train_val.prototxt").read_text(), out)
    layers = {layer.name: layer for layer in out.layer}
    assert layers["conv2"].type == "DyveConvolution" and layers["loss"].type == "SoftmaxWithLoss"
    assert layers["conv2"].dyve_param.spet.exact is True
    assert layers["conv3"].dyve_param.relu is True
    assert result["final_settings"]["conv2"]["spet"]["exact"]


# ---------------------------------------------------------------------------- refusals

def test_missing_weights(tiny, tmp_path):
    with pytest.raises(DyveError, match="no_such.caffemodel"):
        tune.tune(tiny["model"], str(tmp_path / "no_such.caffemodel"), tiny["calib"],
                  out_dir=str(tmp_path), progress=False)


def test_mismatched_blob_shape(tiny, tmp_path):
    proto = write(tmp_path / "wide.prototxt", stock_text(conv2_out=6))
    with pytest.raises(DyveError, match=r"layer 'conv2' blob 0"):
        tune.tune(proto, tiny["weights"], tiny["calib"], mean=MEAN, out_dir=str(tmp_path),
                  progress=False)


def test_dyve_layer_without_weights(tiny, tmp_path):
    weights, _ = make_weights(tmp_path, conv3_name="other", name="other.caffemodel")
    with pytest.raises(DyveError, match=r"DyVE layer 'conv3' has no weights"):
        tune.tune(tiny["model"], weights, tiny["calib"], mean=MEAN, out_dir=str(tmp_path),
                  progress=False)


def test_not_a_caffemodel(tiny, tmp_path):
    bad = write(tmp_path / "bad.caffemodel", "this is not a protobuf \x00\xff")
    with pytest.raises(DyveError, match="bad.caffemodel"):
        tune.tune(tiny["model"], bad, tiny["calib"], out_dir=str(tmp_path), progress=False)


def test_empty_calibration_sets(tiny, tmp_path):
    empty_db = write_lmdb(tmp_path / "empty_lmdb", [], [])
    with pytest.raises(DyveError, match="empty"):
        tune.tune(tiny["model"], tiny["weights"], empty_db, out_dir=str(tmp_path),
                  progress=False)
    folder = tmp_path / "folder"
    (folder / "cat").mkdir(parents=True)
    with pytest.raises(DyveError, match="empty"):
        tune.tune(tiny["model"], tiny["weights"], str(folder), out_dir=str(tmp_path),
                  progress=False)


def test_negative_budget(tiny, tmp_path, capsys):
    with pytest.raises(DyveError, match="budget"):
        tune.tune(tiny["model"], tiny["weights"], tiny["calib"], budget=-0.1,
                  out_dir=str(tmp_path), progress=False)
    with pytest.raises(SystemExit) as exit_info:
        tune.main(["--model", tiny["model"], "--weights", tiny["weights"], "--calib",
                   tiny["calib"], "--budget", "-1"])
    assert exit_info.value.code == 2
    assert "--budget" in capsys.readouterr().err


def test_cli_reports_errors(tiny, tmp_path, capsys):
    code = tune.main(["--model", tiny["model"], "--weights", str(tmp_path / "nope"),
                      "--calib", tiny["calib"], "--out-dir", str(tmp_path), "--quiet"])
    assert code == 2
    assert "nope" in capsys.readouterr().err


# ---------------------------------------------------------------------------- data, determinism

def test_image_folder_matches_lmdb(tiny, tmp_path):
    import cv2
    imgs = images(n=12, seed=5)
    labels = np.arange(12) % 3
    for i, (img, label) in enumerate(zip(imgs, labels)):
        d = tmp_path / "imgs" / f"class{label}"
        d.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(d / f"{i:03d}.png"), img.transpose(1, 2, 0))
    assert caffe_io.image_source(str(tmp_path / "imgs")) == "class_folders"
    x, y = caffe_io.load_images(str(tmp_path / "imgs"), SHAPE)
    order = np.lexsort((np.arange(12), labels))  # by class folder, then file name
    np.testing.assert_array_equal(x, imgs[order].astype(np.float32))
    np.testing.assert_array_equal(y, labels[order])


def test_deterministic(tiny, tuned, tmp_path):
    result, out = tuned
    run(tiny, tmp_path / "again")
    first = json.loads((out / "search.json").read_text())
    second = json.loads((tmp_path / "again" / "search.json").read_text())
    assert strip_volatile(first) == strip_volatile(second)
    assert (out / "tuned_deploy.prototxt").read_text() == \
        (tmp_path / "again" / "tuned_deploy.prototxt").read_text()


@pytest.mark.parametrize("stage,after", [("greedy", 2), ("sweep", 3)])
def test_interrupt_writes_best_so_far(tiny, tmp_path, stage, after):
    seen = []

    def hook(record):
        if record["stage"] == stage:
            seen.append(record)
            if len(seen) == after:
                raise KeyboardInterrupt

    result = run(tiny, tmp_path, hook=hook)
    assert result["interrupted"] is True and result["interrupted_in"] == stage
    saved = json.loads((tmp_path / "search.json").read_text())
    assert saved["interrupted"] is True
    assert saved["final_settings"] == result["final_settings"]
    # at least the exact floor (found before the interruption) is kept
    assert saved["final_settings"]["conv2"]["spet"]["exact"] is True
    assert (tmp_path / "tuned_deploy.prototxt").is_file()
    assert "Interrupted" in (tmp_path / "search.md").read_text()


def test_search_time_stops_the_greedy_and_still_certifies(tiny, tuned, tmp_path):
    # Unlimited, the greedy ends on its own after some rounds.
    assert tuned[0]["greedy"]["rounds"] > 0
    assert tuned[0]["greedy"]["stopped_by"] != "search time"
    # Spent before the first round: the sweep still ran, no greedy round started, and the
    # exact floor (step 0) was certified on the holdout; not an interruption.
    result = run(tiny, tmp_path, search_time=0)
    assert result["interrupted"] is False and result["config"]["search_time"] == 0
    assert result["greedy"] == dict(result["greedy"], rounds=0, steps=[],
                                    stopped_by="search time")
    stages = {e["stage"] for e in result["evaluations"]}
    assert "sweep" in stages and "greedy" not in stages
    assert result["holdout"]["passed"] is True and result["final_step"] == 0
    assert result["final_settings"]["conv2"] == {"spet": {"exact": True}}
    text = (tmp_path / "search.md").read_text()
    assert "stopped at the search time (0 s) after 0 round(s)" in text
    assert "Interrupted" not in text


def test_partial_runs_equal_full_runs(tiny):
    """Starting from a DyVE layer with cached inputs gives the predictions and the effort
    counters of a run from the input, on all images and on a prefix."""
    net_param, converted = caffe_io.dyve_net_param(tiny["model"])
    assert converted
    net = caffe_io.load_net(net_param, tiny["weights"])
    x, y = caffe_io.load_images(tiny["calib"], SHAPE, MEAN, limit=120)
    search, hold = tune.split_indices(len(x), 0.25, seed=1)
    ev = Evaluator(net, x, 40, search, hold, progress=False)
    assert ev.dyve == ["conv1", "conv2", "conv3"] and ev.cacheable == {"conv2", "conv3"}
    exact = dyve_settings.normalize({"relu": True, "spet": {"exact": True}})
    floor = {"conv1": dyve_settings.knobs_off(), "conv2": exact, "conv3": exact}
    ev.commit(floor)
    for layer, knob, level in (("conv3", "sdss", {"enabled": True, "threshold": 1.0}),
                               ("conv2", "spet", {"enabled": True, "fraction": 0.5}),
                               ("conv2", "sfma", {"enabled": True, "threshold": 50.0})):
        s = tune._with_level(floor, layer, knob, level)
        for count in (None, 40):
            part = ev.evaluate(s, start_layer=layer, count=count)
            full = ev.evaluate(s, count=count)
            assert part["start"] > 0 and full["start"] == 0
            np.testing.assert_array_equal(part["preds"], full["preds"])
            assert part["effort"] == full["effort"] and part["ops"] == full["ops"]
    # a commit from conv2 refreshes conv3's cache: runs from conv3 then match again
    s = tune._with_level(floor, "conv2", "sdss", {"enabled": True, "threshold": 5.0})
    ev.commit(s, changed_layer="conv2")
    s3 = tune._with_level(s, "conv3", "spet", {"enabled": True, "fraction": 0.25})
    part, full = ev.evaluate(s3, start_layer="conv3"), ev.evaluate(s3)
    np.testing.assert_array_equal(part["preds"], full["preds"])
    assert part["effort"] == full["effort"]
    # a setting that differs before the start layer is not run from the cache
    s1 = tune._with_level(s3, "conv1", "spet", {"enabled": True, "fraction": 0.5})
    assert ev.evaluate(s1, start_layer="conv3")["start"] == 0


def test_net_name():
    assert tune.net_name("prototxt/cifar10_quick_dyve_deploy.prototxt") == "cifar10_quick"
    assert tune.net_name("x/vgg16_deploy.prototxt") == "vgg16"


def test_hdf5_weights_checked(tiny, tmp_path):
    """Caffe's HDF5 snapshots are checked like caffemodels."""
    net = caffe.Net(tiny["model"], tiny["weights"], caffe.TEST)
    h5 = str(tmp_path / "tiny.caffemodel.h5")
    net.save_hdf5(h5)
    dyve_param, _ = caffe_io.dyve_net_param(tiny["model"])
    caffe_io.load_net(dyve_param, h5)  # fits
    wide, _ = caffe_io.dyve_net_param(write(tmp_path / "wide.prototxt",
                                            stock_text(conv2_out=6)))
    with pytest.raises(DyveError, match=r"layer 'conv2' blob 0"):
        caffe_io.load_net(wide, h5)


LAYER_NET = """
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 3 dim: 4 dim: 7 dim: 7 } } }
layer { name: "conv" type: "DyveConvolution" bottom: "x" top: "conv"
  convolution_param { num_output: 6 kernel_size: 3 stride: 2 pad: 1 group: 2 }
  dyve_param { relu: true } }
layer { name: "v" type: "Input" top: "v" input_param { shape { dim: 3 dim: 10 } } }
layer { name: "fc" type: "DyveInnerProduct" bottom: "v" top: "fc"
  inner_product_param { num_output: 5 } dyve_param { relu: true } }
"""


def test_layer_stats_match_the_layers_spet(tmp_path):
    """The numpy pre-activations and SPET partial sums of layer_stats are what the C++
    layers compute: relu(z) is the knob-off output, and SPET with threshold T zeroes
    exactly the neurons whose partial sum is below T."""
    path = write(tmp_path / "layers.prototxt", LAYER_NET)
    net = caffe.Net(path, caffe.TEST)
    param = caffe_pb2.NetParameter()
    text_format.Merge(LAYER_NET, param)
    layers = {layer.name: layer for layer in param.layer}
    rng = np.random.RandomState(0)
    for blob in list(net.params["conv"]) + list(net.params["fc"]):
        blob.data[...] = rng.randn(*blob.data.shape)
    net.blobs["x"].data[...] = np.abs(rng.randn(*net.blobs["x"].data.shape))
    net.blobs["v"].data[...] = np.abs(rng.randn(*net.blobs["v"].data.shape))
    for name, bottom in (("conv", "x"), ("fc", "v")):
        x = net.blobs[bottom].data.copy()
        p = net.params[name]
        stats = ladders.layer_stats(layers[name], p[0].data, p[1].data, x,
                                 np.random.RandomState(1), positions=10 ** 6)
        live.set_settings(net, name, {"relu": True})
        net.forward()
        top = net.blobs[name].data
        n = top.shape[0]
        if name == "conv":  # z is ordered image, group, (output of group, position)
            def layout(v):
                return v.reshape(n, 2, 3, -1).reshape(n, 6, -1)
        else:
            def layout(v):
                return v.reshape(n, -1)
        z = layout(stats["z"])
        np.testing.assert_allclose(np.maximum(z, 0), top.reshape(z.shape), rtol=1e-4,
                                   atol=1e-4)
        for f in ladders.SPET_FRACTIONS:
            part = layout(stats["partial"][f])
            t = float(np.median(part))
            live.set_settings(net, name, {"relu": True, "spet": {"enabled": True,
                                                                 "fraction": f,
                                                                 "threshold": t}})
            net.forward()
            got = net.blobs[name].data.reshape(z.shape)
            want = np.where(part < t, 0.0, np.maximum(z, 0))
            clear = np.abs(part - t) > 1e-4
            np.testing.assert_allclose(got[clear], want[clear], rtol=1e-4, atol=1e-4)
            if name == "conv":
                # The BOUND gate: the layer zeroes exactly where partial + s * bound < 0,
                # with layer_stats' bound.
                bound = layout(stats["bound"][f])
                for s in (1.0, 0.25):
                    live.set_settings(net, name, {"relu": True, "spet": {
                        "enabled": True, "fraction": f, "gate": "BOUND", "bound_scale": s}})
                    net.forward()
                    got = net.blobs[name].data.reshape(z.shape)
                    gate = part + np.float32(s) * bound
                    want = np.where(gate < 0, 0.0, np.maximum(z, 0))
                    clear = np.abs(gate) > 1e-4
                    np.testing.assert_allclose(got[clear], want[clear], rtol=1e-4, atol=1e-4)
                    if s == 1.0:  # exact on these non-negative inputs
                        np.testing.assert_allclose(got, np.maximum(z, 0), rtol=1e-4, atol=1e-4)


def test_conv_spet_ladder_uses_the_bound_gate_and_exact_is_opt_in():
    param = caffe_pb2.NetParameter()
    text_format.Merge(LAYER_NET, param)
    layers = {layer.name: layer for layer in param.layer}
    rng = np.random.RandomState(0)
    conv = layers["conv"]
    w = rng.randn(6, 2, 3, 3)
    x = np.abs(rng.randn(2, 4, 7, 7))
    stats = ladders.layer_stats(conv, w, np.zeros(6), x, rng)
    levels = ladders.build_levels(conv, stats, ("spet",), (2, 6, 4, 4))["spet"]
    assert levels and all(item["set"]["gate"] == "BOUND" and item["set"]["threshold"] == 0
                          for item in levels)
    # per fraction: exact scale first, then less and less trust in the bound
    first = [item["set"]["bound_scale"] for item in levels
             if item["set"]["fraction"] == levels[0]["set"]["fraction"]]
    assert first == list(ladders.SPET_BOUND_SCALES)
    # the bound is an upper bound, so at s = 1 nothing positive is predicted zero
    assert all(item["scale"]["wrongly_zeroed"] == 0 for item in levels
               if item["set"]["bound_scale"] == 1.0)
    assert "exact" not in tune.DEFAULT_KNOBS
    assert compact(dyve_settings.normalize({"relu": True, "spet": {
        "enabled": True, "gate": "BOUND", "bound_scale": 0.5}}))["spet"] == {
        "enabled": True, "fraction": 0.5, "threshold": 0.0, "gate": "BOUND", "bound_scale": 0.5}


# ---------------------------------------------------------------------------- faults and bad values

@pytest.mark.parametrize("flag,value,needle", [
    ("--sweep-images", "-4", "--sweep-images"), ("--seed", "-1", "--seed"),
    ("--seed", str(2 ** 40), "--seed"), ("--patience", "-1", "--patience"),
    ("--max-images", "0", "--max-images"), ("--batch", "0", "--batch"),
    ("--search-time", "-1", "--search-time")])
def test_bad_argument_values_are_one_line_errors(tiny, tmp_path, capsys, flag, value, needle):
    code = tune.main(["--model", tiny["model"], "--weights", tiny["weights"], "--calib",
                      tiny["calib"], "--out-dir", str(tmp_path), "--quiet", flag, value])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and needle in err, err
    assert "Traceback" not in err


def test_huge_batch_is_clamped(tiny, tmp_path):
    result = run(tiny, tmp_path, batch=2 ** 40, max_images=40, knobs=("sfma",))
    assert result["config"]["batch"] == 40 and result["n_evaluations"] > 0  # the images


def test_unwritable_out_dir_refused_before_tuning(tiny, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    seen = []
    with pytest.raises(DyveError, match="cannot write"):
        run(tiny, blocker / "below", hook=seen.append)
    assert seen == []  # refused before the baseline ran


def test_full_disk_never_leaves_a_net_without_its_search(tiny, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run(tiny, out, max_images=60, knobs=("sfma",))
    assert (out / "tuned_deploy.prototxt").is_file()
    real = tune.dyve_files.write_atomic

    def full(path, text):
        if path.endswith("search.json"):
            raise OSError(28, "No space left on device")
        return real(path, text)

    monkeypatch.setattr(tune.dyve_files, "write_atomic", full)
    with pytest.raises(OSError):
        run(tiny, out, max_images=60, knobs=("sfma",))
    assert not (out / "tuned_deploy.prototxt").exists()  # the old net went first
    assert not [p for p in os.listdir(out) if ".tmp-" in p]


def test_interrupted_prototxt_says_so(tiny, tmp_path):
    def hook(record):
        if record["stage"] == "sweep":
            raise KeyboardInterrupt

    run(tiny, tmp_path, hook=hook, max_images=60)
    header = (tmp_path / "tuned_deploy.prototxt").read_text().splitlines()[0]
    assert "INTERRUPTED during sweep" in header


def test_label_free_search_then_every_calibration_image_certifies(tiny, tmp_path):
    result = run(tiny, tmp_path, max_images=60, search_images=tiny["calib"],
                 search_count=100, search_budget=5.0, budget=0.5)
    assert result["config"]["search_labels"] == "dense predictions"
    assert result["images"] == {"total": 160, "search": 100, "holdout": 60}
    # The search ran against the dense net's own predictions: every change is a flip.
    greedy = [r for r in result["evaluations"] if r["stage"] == "greedy"]
    assert greedy and all(r["n_wr"] == 0 for r in greedy)
    # conv3 is free (the classifier ignores it): pushed to its most aggressive levels,
    # and the holdout (all 60 calibration images) certifies the final setting.
    assert result["holdout"]["n"] == 60 and result["summary"]["holdout_verified"]
    assert result["summary"]["reduction_vs_dense"] > 1.0


@pytest.mark.parametrize("certify, final_step", [("bound", 2), ("estimate", 3)])
def test_certify_bound_or_estimate(tiny, tmp_path, certify, final_step):
    # The greedy path's last step (conv2 SDSS) flips 1 of the 60 calibration images:
    # loss 1.67 pp, UCB 4.41 pp. Under a 2-point budget the bound walks it back to step 2
    # (no flip); the estimate keeps it.
    result = run(tiny, tmp_path, max_images=60, search_images=tiny["calib"],
                 search_count=100, search_budget=10.0, budget=2.0, certify=certify)
    assert result["config"]["certify"] == certify
    last = result["holdout"]["checks"][0]
    assert last["step"] == 3 and (last["n_rw"], last["n_wr"]) == (1, 0)
    assert last["loss"] == pytest.approx(100 / 60) and 4.0 < last["ucb"] < 4.5
    assert result["final_step"] == final_step
    assert result["summary"]["holdout_verified"]
    assert result["summary"]["holdout"]["loss"] == (0.0 if certify == "bound"
                                                    else pytest.approx(100 / 60))


def test_certify_refuses_an_unknown_mode(tiny, tmp_path):
    with pytest.raises(tune.TuneError, match="--certify must be one of bound, estimate"):
        run(tiny, tmp_path, certify="mean")


def test_frontier_and_pick(tiny, tuned, tmp_path):
    from dyve import frontier
    result, out = tuned
    code = frontier.main(["--model", tiny["model"], "--weights", tiny["weights"],
                          "--images", tiny["calib"], "--mean", MEAN, "--search",
                          f"certified={out / 'search.json'}", "--out-dir",
                          str(tmp_path), "--quiet", "--workers", "2"])
    assert code == 0 and (tmp_path / "frontier.png").is_file()
    doc = json.loads((tmp_path / "frontier.json").read_text())
    # one process measures the same numbers as two worker processes
    serial = frontier.measure(tiny["model"], tiny["weights"], tiny["calib"], MEAN,
                              {"certified": frontier.read_search(str(out / "search.json"))},
                              progress=False, workers=1)
    assert serial == doc["runs"]
    run = doc["runs"]["certified"]
    # the chosen setting, measured again on the same images, reproduces the tuner's ops
    assert run["chosen"]["settings"] == result["final_settings"]
    assert run["points"], "no front point"
    losses = [p["search_loss"] for p in run["points"]]
    ops = [p["search_ops"] for p in run["points"]]
    assert ops == sorted(ops, reverse=True) and losses == sorted(losses)  # a Pareto front
    point = run["points"][-1]
    picked = tmp_path / "picked.prototxt"
    assert tune.main(["--model", tiny["model"], "--weights", tiny["weights"], "--pick",
                      point["id"], "--frontier", str(tmp_path / "frontier.json"),
                      "--out", str(picked)]) == 0
    net = caffe.Net(str(picked), tiny["weights"], caffe.TEST)
    for name in live.dyve_layers(net):
        assert compact(live.get_settings(net, name)) == point["settings"].get(name, {})
    assert tune.main(["--model", tiny["model"], "--weights", tiny["weights"], "--pick",
                      "certified:99", "--frontier", str(tmp_path / "frontier.json"),
                      "--out", str(picked)]) == 2


# ---------------------------------------------------------------------------- the paper's protocol

def test_paper_protocol_on_the_tiny_net(tiny, tmp_path):
    """conv3 never reaches the classifier: every threshold of it goes to the top of its
    range; the tuning images are the seeded 25 %, the rest report; the tuned prototxt
    carries the paper's knob variants."""
    from dyve import paper_protocol
    result = paper_protocol.tune_paper(tiny["model"], tiny["weights"], tiny["calib"],
                                       tiny["calib"], mean=MEAN, budget=0.5, seed=3,
                                       tune_fraction=0.25, steps=4, batch=50,
                                       out_dir=str(tmp_path), progress=False)
    tune_idx = result["tune_indices"]
    assert len(tune_idx) == 50 and len(set(tune_idx)) == 50
    assert result["images"] == {"total": N_IMAGES, "tune": 50, "report": 150}
    again, _ = paper_protocol.split_test_set(N_IMAGES, 3, 0.25)
    assert list(again) == tune_idx
    ranges, chosen = result["ranges"]["conv3"], result["thresholds"]["conv3"]
    assert chosen["sfma"] == [ranges["sfma_variance"], ranges["sfma_kernel"]] or \
        tuple(chosen["sfma"]) == (ranges["sfma_variance"], ranges["sfma_kernel"])
    assert tuple(chosen["sdss"]) == (ranges["sdss_max"], ranges["sdss_range"])
    assert chosen["spet"] == ranges["spet_threshold"]
    assert result["knob_layers"] == ["conv1", "conv2", "conv3"]
    # every accepted search step kept the tuning loss under the budget
    assert all(r["loss"] < 0.5 for r in result["evaluations"]
               if r["stage"] == "search" and r["accepted"])
    assert result["summary"]["reduction_vs_dense"] > 1.0
    net = caffe.Net(str(tmp_path / "tuned_deploy.prototxt"), tiny["weights"], caffe.TEST)
    conv3 = live.get_settings(net, "conv3")
    assert conv3["spet"]["ordering"] == "INTERLEAVED" and conv3["spet"]["fraction"] == 0.5
    assert conv3["sfma"]["spread"] == "VARIANCE" and conv3["sdss"]["stride"] == 2
    assert (tmp_path / "search.md").read_text().startswith("# DyVE tuning, the paper's")
