"""Tests of python3 -m dyve.export_onnx and the ONNX Runtime column of dyve.bench.

Every stock net the project ships is exported and run in ONNX Runtime (build/onnx-venv,
`make onnx-venv`) on real images, and every blob ONNX can name is compared with Caffe's:
the trained CIFAR-10 nets on test-LMDB images, the ImageNet-shaped ones (AlexNet,
OverFeat, VGG-16, ResNet-34) with seeded filler weights on two of the shared photos. A
synthetic net covers the layer options the shipped nets do not use (ceil pooling that
Caffe clips, AVE windows past the padding, FLOOR rounding, LRN both ways, Eltwise,
Power, BatchNorm, Scale, ...). About 110 s of CPU (3 min wall on a loaded 2-core machine),
most of it moving VGG-16's and the OverFeat nets' weights through the export and ORT.
"""
import os
import subprocess
import sys

os.environ.setdefault("GLOG_minloglevel", "2")

import numpy as np
import pytest

import caffe

from dyve import bench, caffe_io, data, export_onnx
from dyve.tools import REPO_ROOT

PROTO = os.path.join(REPO_ROOT, "prototxt")
MODELS = os.path.join(REPO_ROOT, "models")
CIFAR = os.path.join(REPO_ROOT, "data", "cifar10")
TEST_LMDB = os.path.join(CIFAR, "cifar10_test_lmdb")
MEAN = os.path.join(CIFAR, "mean.binaryproto")
PHOTOS = os.path.join(data.shared_data_dir(), "imagenet-sample-dev")
IMAGENET_MEAN = [104.0, 117.0, 123.0]
CIFAR_NETS = ("cifar10_quick", "cifar10_full")
IMAGENET_NETS = ("alexnet", "overfeat_fast", "overfeat_accurate", "vgg16", "resnet34")

needs_venv = pytest.mark.skipif(
    not os.access(os.path.join(export_onnx.ONNX_VENV, "bin", "python"), os.X_OK),
    reason=f"{export_onnx.ONNX_VENV} missing (make onnx-venv)")
needs_cifar = pytest.mark.skipif(not os.path.isdir(TEST_LMDB) or not os.path.isfile(MEAN),
                                 reason="CIFAR-10 LMDB not prepared (make data-cifar10)")
needs_photos = pytest.mark.skipif(not os.path.isdir(PHOTOS),
                                  reason=f"no ImageNet sample photos at {PHOTOS}")


def test_shipped_nets_are_all_covered():
    """Every stock deploy prototxt in prototxt/ is in this file's lists, and each of its
    layer types has a converter (a new shipped net must come with its check here)."""
    shipped = sorted(f[:-len("_deploy.prototxt")] for f in os.listdir(PROTO)
                     if f.endswith("_deploy.prototxt") and "_dyve" not in f)
    assert shipped == sorted(CIFAR_NETS + IMAGENET_NETS)
    for net in shipped:
        param = caffe_io.read_net_param(os.path.join(PROTO, f"{net}_deploy.prototxt"))
        types = {layer.type for layer in export_onnx.test_layers(param)}
        assert types <= set(export_onnx.SUPPORTED_TYPES), (net, types)
    param = caffe_io.read_net_param(os.path.join(PROTO, "cifar10_full_deploy.prototxt"))
    from caffe.proto import caffe_pb2
    lrn = [l for l in param.layer if l.type == "LRN"]
    assert lrn and all(l.lrn_param.norm_region == caffe_pb2.LRNParameter.WITHIN_CHANNEL
                       for l in lrn)


def _caffe_blobs(net, x):
    """Every blob of a Caffe forward of `x` (copies), the batch reshaped to len(x)."""
    caffe_io.reshape(net, len(x))
    net.blobs[caffe_io.input_blob(net)].data[...] = x
    net.forward()
    return {name: blob.data.copy() for name, blob in net.blobs.items()}


def _compare(model, want, x, rel=1e-5, prob=1e-5):
    """Run `model` in ONNX Runtime on `x` and compare every output with Caffe's blob of
    that name: |diff| <= rel * max(1, max |Caffe|), and <= `prob` for the softmax output
    'prob'. Returns {name: max abs diff}."""
    with export_onnx.OrtRunner(model) as ort:
        got = ort.run(x)
    assert set(got) <= set(want) and got
    diffs = {}
    for name, value in got.items():
        assert value.shape == want[name].shape, name
        scale = max(1.0, float(np.abs(want[name]).max()))
        diffs[name] = export_onnx.output_max_abs_diff(value, want[name])
        tol = prob if name == "prob" else rel * scale
        assert diffs[name] <= tol, (name, diffs[name], scale)
    return diffs


def _fill(net, seed=1704):
    """Seeded He-normal weights (engines.fill_weights' distribution, drawn in float32:
    a third of its time on VGG-16's 138 M) and small random biases."""
    rng = np.random.default_rng(seed)
    for params in net.params.values():
        w = params[0].data
        w[...] = rng.standard_normal(w.shape, np.float32) * np.float32(
            np.sqrt(2.0 / max(1, np.prod(w.shape[1:]))))
        for b in params[1:]:
            b.data[...] = rng.standard_normal(b.data.shape, np.float32) * np.float32(0.1)


def _every_blob(net, prototxt):
    """The blobs the prototxt's layers write (not the inputs, nor the split copies Caffe
    adds where a blob feeds several layers), in net order."""
    param = caffe_io.read_net_param(str(prototxt))
    tops = {t for layer in param.layer if layer.type != "Input" for t in layer.top}
    return [n for n in net.blobs if n in tops]


@needs_venv
@needs_cifar
@pytest.mark.parametrize("name", CIFAR_NETS)
def test_cifar_nets_match_caffe_on_test_images(name, tmp_path, capsys):
    """The command itself on the trained weights, then every blob on 20 test images."""
    model = os.path.join(PROTO, f"{name}_deploy.prototxt")
    weights = os.path.join(MODELS, f"{name}.caffemodel")
    out = tmp_path / f"{name}.onnx"
    assert export_onnx.main(["--model", model, "--weights", weights, "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert out.stat().st_size > 300_000  # the weights are in it
    assert sorted(os.listdir(tmp_path)) == [f"{name}.onnx"]  # no temporary file left

    net = caffe_io.load_net(model, weights)
    x, labels = caffe_io.load_images(TEST_LMDB, net.blobs["data"].data.shape[1:], MEAN, 20)
    want = _caffe_blobs(net, x)
    # all blobs as outputs too (the command exposes the net's outputs only)
    full = tmp_path / f"{name}_all.onnx"
    export_onnx.export_net(caffe_io.read_net_param(model), net, str(full),
                           extra_outputs=_every_blob(net, model))
    diffs = _compare(str(full), want, x)
    assert set(diffs) == set(_every_blob(net, model))
    if name == "cifar10_full":  # the WITHIN_CHANNEL LRN's formula, checked on its own
        assert {"norm1", "norm2"} <= set(diffs)
    # the trained net is right on most of them (not a net of zeros matching zeros)
    assert (want["prob"].argmax(1) == labels).mean() >= 0.5
    assert want["prob"].max() > 0.5


@needs_venv
@needs_photos
@pytest.mark.parametrize("name", IMAGENET_NETS)
def test_imagenet_nets_match_caffe_with_filler_weights(name, tmp_path):
    """Filler weights (no ImageNet caffemodels ship), two real photos, every blob. With
    filler weights the logits reach hundreds, so the softmax output may differ by a few
    1e-5 where the logits agree to 1e-6 of their size."""
    model = os.path.join(PROTO, f"{name}_deploy.prototxt")
    net = caffe_io.load_net(model)
    _fill(net)
    x, _ = caffe_io.load_images(PHOTOS, net.blobs["data"].data.shape[1:], IMAGENET_MEAN, 2)
    want = _caffe_blobs(net, x)
    out = tmp_path / f"{name}.onnx"
    export_onnx.export_net(caffe_io.read_net_param(model), net, str(out),
                           extra_outputs=_every_blob(net, model))
    diffs = _compare(str(out), want, x, prob=1e-4)
    assert set(diffs) == set(_every_blob(net, model))


EDGES = """
name: "edges"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 2 dim: 3 dim: 8 dim: 7 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1
          weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "leaky" type: "ReLU" bottom: "conv" top: "conv" relu_param { negative_slope: 0.1 } }
layer { name: "split" type: "Split" bottom: "conv" top: "a" top: "b" }
# AVE, ceil, last window past the padding on H (Pad + count_include_pad=0)
layer { name: "pave" type: "Pooling" bottom: "a" top: "pave"
        pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "pmax" type: "Pooling" bottom: "b" top: "pmax"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
# ceil on H, Caffe's clip of a last window starting in the padding on W (a Slice)
layer { name: "pclip" type: "Pooling" bottom: "a" top: "pclip"
        pooling_param { pool: MAX kernel_h: 3 kernel_w: 2 stride: 2 pad_h: 0 pad_w: 1 } }
layer { name: "pavec" type: "Pooling" bottom: "a" top: "pavec"
        pooling_param { pool: AVE kernel_h: 3 kernel_w: 2 stride: 2 pad_h: 0 pad_w: 1 } }
layer { name: "pfloor" type: "Pooling" bottom: "b" top: "pfloor"
        pooling_param { pool: AVE kernel_size: 3 stride: 2 round_mode: FLOOR } }
layer { name: "sum" type: "Eltwise" bottom: "pave" bottom: "pmax" top: "sum"
        eltwise_param { operation: SUM coeff: 0.5 coeff: -2 } }
layer { name: "prod" type: "Eltwise" bottom: "pave" bottom: "pmax" top: "prod"
        eltwise_param { operation: PROD } }
layer { name: "emax" type: "Eltwise" bottom: "pave" bottom: "pmax" top: "emax"
        eltwise_param { operation: MAX } }
layer { name: "cat" type: "Concat" bottom: "sum" bottom: "prod" bottom: "emax" top: "cat" }
layer { name: "lrn_across" type: "LRN" bottom: "cat" top: "lrn_across"
        lrn_param { local_size: 5 alpha: 0.3 beta: 0.75 k: 2 } }
layer { name: "lrn_within" type: "LRN" bottom: "cat" top: "lrn_within"
        lrn_param { local_size: 3 alpha: 0.4 beta: 0.6 norm_region: WITHIN_CHANNEL } }
layer { name: "bn" type: "BatchNorm" bottom: "lrn_within" top: "lrn_within" }
layer { name: "scale" type: "Scale" bottom: "lrn_within" top: "lrn_within"
        scale_param { bias_term: true filler { type: "gaussian" std: 1 }
                      bias_filler { type: "gaussian" std: 1 } } }
layer { name: "power" type: "Power" bottom: "lrn_across" top: "power"
        power_param { power: 2 scale: 0.5 shift: 1 } }
layer { name: "const" type: "Power" bottom: "lrn_across" top: "const"
        power_param { power: 3 scale: 0 shift: 2 } }
layer { name: "sig" type: "Sigmoid" bottom: "power" top: "sig" }
layer { name: "tanh" type: "TanH" bottom: "lrn_within" top: "tanh" }
layer { name: "gap" type: "Pooling" bottom: "tanh" top: "gap"
        pooling_param { pool: AVE global_pooling: true } }
layer { name: "flat" type: "Flatten" bottom: "sig" top: "flat" }
layer { name: "drop" type: "Dropout" bottom: "flat" top: "flat" }
layer { name: "ip" type: "InnerProduct" bottom: "flat" top: "ip"
        inner_product_param { num_output: 5
          weight_filler { type: "gaussian" std: 0.1 } bias_filler { type: "gaussian" std: 1 } } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


@needs_venv
def test_layer_options_match_caffe(tmp_path):
    path = tmp_path / "edges.prototxt"
    path.write_text(EDGES)
    caffe.set_random_seed(3)
    net = caffe.Net(str(path), caffe.TEST)
    rng = np.random.RandomState(5)
    mean, var, factor = net.params["bn"]
    mean.data[...] = rng.normal(0, 1, mean.data.shape)
    var.data[...] = rng.uniform(0.5, 2, var.data.shape)
    factor.data[...] = 4  # Caffe divides the stored statistics by it
    # Caffe's shapes that the export has to reproduce (the rounding cases above)
    assert net.blobs["pave"].data.shape[2:] == (5, 4)
    assert net.blobs["pclip"].data.shape[2:] == (4, 4)
    assert net.blobs["pfloor"].data.shape[2:] == (3, 3)
    x = rng.normal(0, 2, (2, 3, 8, 7)).astype(np.float32)
    want = _caffe_blobs(net, x)
    out = tmp_path / "edges.onnx"
    report = export_onnx.export_net(caffe_io.read_net_param(str(path)), net, str(out),
                                    extra_outputs=_every_blob(net, path))
    assert report["opset"] == export_onnx.OPSET
    diffs = _compare(str(out), want, x)
    assert set(diffs) == set(_every_blob(net, path))
    assert (want["const"] == 8).all()  # Power with scale 0: shift ** power everywhere


# dyve.nets.resnet34's downsampling shortcut: the pooled maps, zero channels after them
# (Power scale 0 is ConstantOfShape(Shape(x)) in ONNX), added to the strided branch.
SHORTCUT = """
name: "shortcut"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 2 dim: 3 dim: 9 dim: 9 } } }
layer { name: "branch2a" type: "Convolution" bottom: "data" top: "branch2a"
        convolution_param { num_output: 6 kernel_size: 3 stride: 2
          weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "pool" type: "Pooling" bottom: "data" top: "pool"
        pooling_param { pool: AVE kernel_size: 2 stride: 2 round_mode: FLOOR } }
layer { name: "zeros" type: "Power" bottom: "pool" top: "zeros" power_param { scale: 0 } }
layer { name: "branch1" type: "Concat" bottom: "pool" bottom: "zeros" top: "branch1" }
layer { name: "sum" type: "Eltwise" bottom: "branch2a" bottom: "branch1" top: "sum" }
layer { name: "relu" type: "ReLU" bottom: "sum" top: "sum" }
"""


@needs_venv
def test_zero_padded_shortcut_exports_without_extra_outputs(tmp_path):
    """Only the net's output is declared, so every inner shape (the zeros, the Concat of
    them) must come from ONNX's own shape inference and agree with Caffe's."""
    path = tmp_path / "shortcut.prototxt"
    path.write_text(SHORTCUT)
    caffe.set_random_seed(4)
    net = caffe.Net(str(path), caffe.TEST)
    assert net.blobs["branch1"].data.shape == (2, 6, 4, 4)
    x = np.random.RandomState(6).normal(0, 1, (2, 3, 9, 9)).astype(np.float32)
    want = _caffe_blobs(net, x)
    assert (want["zeros"] == 0).all() and (want["pool"] != 0).any()
    out = tmp_path / "shortcut.onnx"
    export_onnx.export_net(caffe_io.read_net_param(str(path)), net, str(out))
    assert set(_compare(str(out), want, x)) == {"sum"}


def test_dyve_layer_is_refused_naming_it(tmp_path, capsys):
    out = tmp_path / "x.onnx"
    code = export_onnx.main(["--model", os.path.join(PROTO, "cifar10_quick_dyve_deploy.prototxt"),
                             "--weights", os.path.join(MODELS, "cifar10_quick.caffemodel"),
                             "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "layer 'conv1' has type 'DyveConvolution'" in err
    assert "cifar10_quick_dyve_deploy.prototxt" in err
    assert not out.exists() and not os.listdir(tmp_path)


def test_unknown_layer_is_refused_naming_it(tmp_path):
    path = tmp_path / "argmax.prototxt"
    path.write_text(EDGES.replace('layer { name: "prob"',
                                  'layer { name: "argmax" type: "ArgMax" bottom: "ip" '
                                  'top: "am" }\nlayer { name: "prob"'))
    net = caffe.Net(str(path), caffe.TEST)
    with pytest.raises(export_onnx.ExportError, match="layer 'argmax' has type 'ArgMax'"):
        export_onnx.convert(caffe_io.read_net_param(str(path)), net)


def test_help():
    proc = subprocess.run([sys.executable, "-m", "dyve.export_onnx", "--help"],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 0
    for flag in ("--model", "--weights", "--out", "--batch"):
        assert flag in proc.stdout


def test_missing_venv_is_an_error_naming_it(monkeypatch, tmp_path):
    monkeypatch.setattr(export_onnx, "ONNX_VENV", str(tmp_path / "no-venv"))
    with pytest.raises(export_onnx.ExportError, match="make onnx-venv"):
        export_onnx.venv_python()


# ----------------------------------------------------------------------------- dyve.bench

def _bench(out_dir, weights, *extra):
    import json
    argv = ["--net", "cifar10_quick", "--weights", weights,
            "--stock", os.path.join(PROTO, "cifar10_quick_deploy.prototxt"),
            "--dyve", os.path.join(PROTO, "cifar10_quick_dyve_deploy.prototxt"),
            "--images", TEST_LMDB, "--mean", MEAN, "--max-images", "20", "--batch", "4",
            "--repeats", "2", "--threads", "1", "--out-dir", str(out_dir), "--onnx", *extra]
    assert bench.main(argv) == 0
    with open(os.path.join(out_dir, "summary.json")) as f:
        return json.load(f)


@needs_venv
@needs_cifar
def test_bench_onnx_runtime_column(tmp_path):
    weights = os.path.join(MODELS, "cifar10_quick.caffemodel")
    s = _bench(tmp_path / "b", weights)
    assert s["onnx"] and s["onnx_measured"] and s["onnx_status"] is None
    assert s["onnx_max_abs_diff"] < 1e-5
    assert s["onnx_top1"] == s["baseline_top1"]
    assert s["accuracy"]["agreement_top1_onnx"] == 1.0
    for b in ("1", "4"):
        tm = s["timings"][b]["1"]
        ms = tm["ms_per_image"]
        assert set(ms) == {"stock", "dyve", "onnx"} and ms["onnx"] > 0
        assert len(tm["rounds_ms"]["onnx"]) == 2
        assert tm["dyve_over_onnx"] == pytest.approx(ms["dyve"] / ms["onnx"])
        assert s["dyve_over_onnx"][b]["1"] == tm["dyve_over_onnx"]
        assert tm["speedup_onnx"] == pytest.approx(ms["stock"] / ms["onnx"])
        assert tm["onnx_threads"] == 1
    md = (tmp_path / "b" / "summary.md").read_text()
    assert "| ONNX Runtime | stock/ORT | DyVE ÷ ORT |" in md
    assert f"ONNX Runtime {s['onnxruntime']}" in md
    from dyve import report
    table_md, plain = report.merge_table([str(tmp_path / "b" / "summary.json")])
    row = report.parse_table(plain)[0]
    assert row["dyve_over_ort_b1"] == pytest.approx(s["dyve_over_onnx"]["1"]["1"], abs=5e-4)
    assert row["dyve_over_ort_bN"] == pytest.approx(s["dyve_over_onnx"]["4"]["1"], abs=5e-4)
    assert "DyVE ÷ ONNX Runtime" in table_md


@needs_cifar
def test_bench_without_venv_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export_onnx, "ONNX_VENV", str(tmp_path / "no-venv"))
    s = _bench(tmp_path / "b", os.path.join(MODELS, "cifar10_quick.caffemodel"),
               "--repeats", "1")
    assert s["onnx"] and not s["onnx_measured"]
    assert "make onnx-venv" in s["onnx_status"]
    assert set(s["timings"]["1"]["1"]["ms_per_image"]) == {"stock", "dyve"}
    md = (tmp_path / "b" / "summary.md").read_text()
    assert "**ONNX Runtime not measured:**" in md and "make onnx-venv" in md
    assert "| not measured | — | — |" in md
    assert "ONNX Runtime not measured" in capsys.readouterr().err
    from dyve import report
    table_md, plain = report.merge_table([str(tmp_path / "b" / "summary.json")])
    assert report.parse_table(plain)[0]["dyve_over_ort_b1"] is None
    assert "not measured / not measured" in table_md
