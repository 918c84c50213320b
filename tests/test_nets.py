"""Tests of python/dyve/nets.py, rewrite.py (the DyVE form), solvers.py and gen_prototxt.py.

Run with /usr/bin/python3 -m pytest and
PYTHONPATH=build/caffe-src/python:python (pycaffe and the dyve package).
"""
import os

os.environ.setdefault("GLOG_minloglevel", "2")  # keep Caffe's net-init log out of the output

import numpy as np
import pytest

import caffe
from caffe.proto import caffe_pb2
from google.protobuf import text_format

from dyve import gen_prototxt, nets, rewrite, solvers
from dyve import settings as dyve_settings
from dyve.tools import REPO_ROOT, caffe_source_file

PROTOTXT_DIR = os.path.join(REPO_ROOT, "prototxt")

# Caffe's own definitions that our stock nets must reproduce.
ORIGINAL_DEPLOY = {
    "cifar10_quick": ("examples", "cifar10", "cifar10_quick.prototxt"),
    "cifar10_full": ("examples", "cifar10", "cifar10_full.prototxt"),
    "alexnet": ("models", "bvlc_alexnet", "deploy.prototxt"),
}
ORIGINAL_TRAIN_VAL = {
    "cifar10_quick": ("examples", "cifar10", "cifar10_quick_train_test.prototxt"),
    "cifar10_full": ("examples", "cifar10", "cifar10_full_train_test.prototxt"),
    "alexnet": ("models", "bvlc_alexnet", "train_val.prototxt"),
}
ORIGINAL_SOLVER = {
    ("cifar10_quick", 0): "cifar10_quick_solver.prototxt",
    ("cifar10_quick", 1): "cifar10_quick_solver_lr1.prototxt",
    ("cifar10_full", 0): "cifar10_full_solver.prototxt",
    ("cifar10_full", 1): "cifar10_full_solver_lr1.prototxt",
    ("cifar10_full", 2): "cifar10_full_solver_lr2.prototxt",
}


def write_net(tmp_path, net, fname):
    path = tmp_path / fname
    path.write_text(nets.to_text(net))
    return str(path)


def load(path):
    return caffe.Net(path, caffe.TEST)


def shapes(net):
    blobs = [(name, tuple(blob.data.shape)) for name, blob in net.blobs.items()]
    params = [(name, [tuple(p.data.shape) for p in ps]) for name, ps in net.params.items()]
    return blobs, params


def param_count(net):
    return sum(p.data.size for ps in net.params.values() for p in ps)


def read_net(*parts):
    net = caffe_pb2.NetParameter()
    with open(caffe_source_file(*parts)) as f:
        text_format.Merge(f.read(), net)
    return net


# --------------------------------------------------------------------------- stock nets

@pytest.mark.parametrize("name", sorted(ORIGINAL_DEPLOY))
def test_deploy_matches_caffe_original(tmp_path, name):
    ours = load(write_net(tmp_path, nets.build(name, "deploy"), "ours.prototxt"))
    original = load(caffe_source_file(*ORIGINAL_DEPLOY[name]))
    assert shapes(ours) == shapes(original)


@pytest.mark.parametrize("name", sorted(ORIGINAL_TRAIN_VAL))
def test_train_val_matches_caffe_original(name):
    ours = nets.build(name, "train_val")
    original = read_net(*ORIGINAL_TRAIN_VAL[name])
    assert ours.name == original.name
    # Our only addition: top-5 accuracy for the ImageNet nets.
    ours_layers = [layer for layer in ours.layer if layer.name != "accuracy_top5"]
    assert len(ours_layers) == len(original.layer)
    for mine, theirs in zip(ours_layers, original.layer):
        for layer in (mine, theirs):  # data locations are ours to choose
            if layer.type == "Data":
                layer.data_param.ClearField("source")
                layer.transform_param.ClearField("mean_file")
        assert mine == theirs, f"layer {theirs.name}:\n{mine}\n!=\n{theirs}"


def test_imagenet_train_val_has_top5_accuracy():
    for name in ("alexnet", "overfeat_fast", "overfeat_accurate", "vgg16"):
        net = nets.build(name, "train_val")
        top5 = [layer for layer in net.layer if layer.name == "accuracy_top5"]
        assert len(top5) == 1 and top5[0].accuracy_param.top_k == 5, name
        assert [layer.type for layer in net.layer[-3:]] == ["Accuracy", "Accuracy",
                                                            "SoftmaxWithLoss"]
        assert [layer.include[0].phase for layer in net.layer[:2]] == [caffe.TRAIN,
                                                                      caffe.TEST]


def test_train_val_data_paths_are_parameters():
    net = nets.cifar10_quick("train_val", train_source="a", test_source="b", mean_file="m")
    train, test = net.layer[0], net.layer[1]
    assert (train.data_param.source, test.data_param.source) == ("a", "b")
    assert train.transform_param.mean_file == test.transform_param.mean_file == "m"
    default = nets.cifar10_quick("train_val")
    assert default.layer[0].data_param.source == "data/cifar10/cifar10_train_lmdb"
    assert default.layer[0].transform_param.mean_file == "data/cifar10/mean.binaryproto"


@pytest.mark.parametrize("key", sorted(ORIGINAL_SOLVER))
def test_cifar10_solvers_follow_caffe(key):
    name, stage = key
    ours = solvers.cifar10_solver(name, stage)
    original = caffe_pb2.SolverParameter()
    with open(caffe_source_file("examples", "cifar10", ORIGINAL_SOLVER[key])) as f:
        text_format.Merge(f.read(), original)
    assert ours.net == f"prototxt/{name}_train_val.prototxt"
    assert ours.random_seed == solvers.RANDOM_SEED
    assert ours.solver_mode == caffe_pb2.SolverParameter.CPU
    for field in ("net", "snapshot_prefix", "random_seed", "solver_mode"):
        ours.ClearField(field)
        original.ClearField(field)
    assert ours == original


def test_unknown_form_and_net_rejected():
    with pytest.raises(ValueError):
        nets.alexnet("test")
    with pytest.raises(ValueError):
        nets.build("resnet50")


# --------------------------------------------------------------------------- parameter counts

def conv_params(layers):
    """Weights + biases of (in_channels, out_channels, kernel) convolutions."""
    return sum(c_in * c_out * k * k + c_out for c_in, c_out, k in layers)


def fc_params(layers):
    """Weights + biases of (inputs, outputs) fully connected layers."""
    return sum(n_in * n_out + n_out for n_in, n_out in layers)


def test_vgg16_parameter_count(tmp_path):
    # Simonyan & Zisserman 2015, Table 1, configuration D (all convolutions 3x3).
    convs = [(3, 64, 3), (64, 64, 3),
             (64, 128, 3), (128, 128, 3),
             (128, 256, 3), (256, 256, 3), (256, 256, 3),
             (256, 512, 3), (512, 512, 3), (512, 512, 3),
             (512, 512, 3), (512, 512, 3), (512, 512, 3)]
    fcs = [(512 * 7 * 7, 4096), (4096, 4096), (4096, 1000)]
    expected = conv_params(convs) + fc_params(fcs)
    assert expected == 138_357_544
    net = load(write_net(tmp_path, nets.vgg16("deploy", deploy_batch=1), "vgg16.prototxt"))
    assert param_count(net) == expected
    assert net.blobs["pool5"].data.shape == (1, 512, 7, 7)
    assert net.blobs["prob"].data.shape == (1, 1000)


def test_overfeat_fast_parameter_count(tmp_path):
    # Sermanet et al. 2014, Table 1 (fast model): layers 1-5 conv, 6-8 full.
    convs = [(3, 96, 11), (96, 256, 5), (256, 512, 3), (512, 1024, 3), (1024, 1024, 3)]
    fcs = [(1024 * 6 * 6, 3072), (3072, 4096), (4096, 1000)]
    expected = conv_params(convs) + fc_params(fcs)
    assert round(expected / 1e6) == 146  # the paper (Table 4) rounds to 145M
    net = load(write_net(tmp_path, nets.overfeat_fast("deploy", deploy_batch=1),
                         "overfeat_fast.prototxt"))
    assert param_count(net) == expected
    # Map sizes of Table 1 (231x231 input): conv1 56 -> 28 pooled, layer 2's 24x24
    # (its conv output) -> 12 pooled, layers 3-5 at 12x12, 6x6 into layer 6.
    sizes = {name: net.blobs[name].data.shape[-1] for name in
             ("data", "conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5")}
    assert sizes == dict(data=231, conv1=56, pool1=28, conv2=24, pool2=12, conv3=12,
                         conv4=12, conv5=12, pool5=6)


def test_overfeat_accurate_parameter_count(tmp_path):
    # Sermanet et al. 2014, Table 3 (accurate model): layers 1-6 conv, 7-9 full.
    convs = [(3, 96, 7), (96, 256, 7), (256, 512, 3), (512, 512, 3), (512, 1024, 3),
             (1024, 1024, 3)]
    fcs = [(1024 * 5 * 5, 4096), (4096, 4096), (4096, 1000)]
    expected = conv_params(convs) + fc_params(fcs)
    assert round(expected / 1e6) == 145  # the paper (Table 4) says 144M
    net = load(write_net(tmp_path, nets.overfeat_accurate("deploy", deploy_batch=1),
                         "overfeat_accurate.prototxt"))
    assert param_count(net) == expected
    # Spatial input sizes of Table 3 (221x221 input): 36 into layer 2, 15 into layers
    # 3-6, 5 into layer 7.
    sizes = {name: net.blobs[name].data.shape[-1] for name in
             ("data", "pool1", "pool2", "conv3", "conv4", "conv5", "conv6", "pool6")}
    assert sizes == dict(data=221, pool1=36, pool2=15, conv3=15, conv4=15, conv5=15,
                         conv6=15, pool6=5)


def test_vgg16_layer_names_match_model_zoo():
    # Layer names of VGG_ILSVRC_16_layers_deploy.prototxt (Model Zoo).
    expected = ["data"]
    for b, depth in enumerate([2, 2, 3, 3, 3], start=1):
        for i in range(1, depth + 1):
            expected += [f"conv{b}_{i}", f"relu{b}_{i}"]
        expected.append(f"pool{b}")
    expected += ["fc6", "relu6", "drop6", "fc7", "relu7", "drop7", "fc8", "prob"]
    assert [layer.name for layer in nets.vgg16("deploy").layer] == expected


# --------------------------------------------------------------------------- generator

def test_prototxt_dir_is_generator_output(tmp_path):
    assert gen_prototxt.main(["--out-dir", str(tmp_path)]) == 0
    generated = sorted(os.listdir(tmp_path))
    committed = sorted(f for f in os.listdir(PROTOTXT_DIR) if f.endswith(".prototxt"))
    assert generated == committed
    for fname in generated:
        with open(tmp_path / fname, "rb") as a, open(os.path.join(PROTOTXT_DIR, fname), "rb") as b:
            assert a.read() == b.read(), f"prototxt/{fname} differs from the generator's output"
    assert gen_prototxt.main(["--check"]) == 0


def test_generator_check_detects_stale_files(tmp_path, capsys):
    gen_prototxt.main(["--out-dir", str(tmp_path)])
    assert gen_prototxt.main(["--check", "--out-dir", str(tmp_path)]) == 0
    (tmp_path / "alexnet_deploy.prototxt").write_text("name: \"edited\"\n")
    os.remove(tmp_path / "cifar10_quick_solver.prototxt")
    capsys.readouterr()
    assert gen_prototxt.main(["--check", "--out-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "alexnet_deploy.prototxt" in out and "cifar10_quick_solver.prototxt" in out
    assert "vgg16_deploy.prototxt" not in out
    # A second write only touches the stale files.
    gen_prototxt.main(["--out-dir", str(tmp_path)])
    assert sorted(capsys.readouterr().out.split()) == sorted([
        "wrote", str(tmp_path / "alexnet_deploy.prototxt"),
        "wrote", str(tmp_path / "cifar10_quick_solver.prototxt")])


def test_generated_files_cover_every_net():
    files = gen_prototxt.generate(with_dyve=True)
    for name in nets.NETS:
        for suffix in ("train_val", "deploy", "dyve_train_val", "dyve_deploy"):
            assert f"{name}_{suffix}.prototxt" in files
    assert "cifar10_quick_solver.prototxt" in files
    assert "cifar10_full_solver.prototxt" in files


# --------------------------------------------------------------------------- DyVE form

EXPECTED_DYVE_LAYERS = {
    "cifar10_quick": ["conv1", "conv2", "conv3"],  # ip1 has no ReLU in Caffe's net
    "cifar10_full": ["conv1", "conv2", "conv3"],
    "alexnet": ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"],
    "overfeat_fast": ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"],
    "overfeat_accurate": ["conv1", "conv2", "conv3", "conv4", "conv5", "conv6", "fc7",
                          "fc8"],
    "vgg16": ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
              "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3", "fc6",
              "fc7"],
    # conv1 and each block's branch2a; branch2b feeds the residual Eltwise, not a ReLU.
    "resnet34": ["conv1"] + [f"res{s}{chr(ord('a') + b)}_branch2a"
                             for s, _, blocks in nets.RESNET34_STAGES for b in range(blocks)],
}


@pytest.mark.parametrize("name", sorted(nets.NETS))
@pytest.mark.parametrize("form", nets.FORMS)
def test_dyve_form_converts_rectified_layers(name, form):
    stock = nets.build(name, form)
    dyve = nets.build(name, form, dyve={})
    assert [layer.name for layer in dyve.layer] == [layer.name for layer in stock.layer]
    converted = [layer.name for layer in dyve.layer if layer.type.startswith("Dyve")]
    assert converted == EXPECTED_DYVE_LAYERS[name]
    for mine, theirs in zip(dyve.layer, stock.layer):
        if mine.name in converted:
            assert mine.type == dyve_settings.STOCK_TO_DYVE[theirs.type]
            # All knobs off: relu only.
            assert mine.dyve_param == caffe_pb2.DyveParameter(relu=True)
            mine.type = theirs.type
            mine.ClearField("dyve_param")
        assert mine == theirs  # everything else (param, fillers, ...) untouched


def test_dyve_settings_applied():
    settings = {
        "conv2": {"spet": {"enabled": True, "fraction": 0.25, "ordering": "PER_OUTPUT"}},
        "conv3": {"sdss": {"enabled": True, "stride": 3}, "relu": False},
        "fc6": {"spet": {"exact": True, "check_interval": 8}},
    }
    net = nets.alexnet("deploy", dyve=settings)
    params = {layer.name: layer.dyve_param for layer in net.layer if layer.HasField("dyve_param")}
    assert params["conv2"].relu and params["conv2"].spet.enabled
    assert params["conv2"].spet.fraction == 0.25
    assert params["conv2"].spet.ordering == caffe_pb2.DyveSpetParameter.PER_OUTPUT
    assert not params["conv2"].HasField("sdss")
    assert params["conv3"].relu  # always forced on
    assert params["conv3"].sdss.enabled and params["conv3"].sdss.stride == 3
    assert params["fc6"].spet.exact and params["fc6"].spet.check_interval == 8
    assert params["conv1"] == caffe_pb2.DyveParameter(relu=True)
    # to_dyve leaves its input alone.
    stock = nets.alexnet("deploy")
    rewrite.to_dyve(stock, settings)
    assert all(layer.type in ("Input", "Convolution", "ReLU", "LRN", "Pooling",
                              "InnerProduct", "Dropout", "Softmax") for layer in stock.layer)


@pytest.mark.parametrize("bad_layer", ["conv9", "ip1", "ip2", "pool1", "relu1"])
def test_dyve_settings_on_wrong_layer_rejected(bad_layer):
    with pytest.raises(ValueError, match=f"'{bad_layer}'"):
        nets.cifar10_quick("deploy", dyve={bad_layer: {}})


@pytest.mark.parametrize("knobs,field", [
    ({"spet": {"fractoin": 0.5}}, "spet.fractoin"),  # unknown fields
    ({"spte": {"enabled": True}}, "spte"),
    ({"spet": {"fraction": 0}}, "spet.fraction"),  # would abort Caffe's layer setup
    ({"spet": {"check_interval": 0}}, "spet.check_interval"),
    ({"spet": {"ordering": "PER_NEURON"}}, "spet.ordering"),
    ({"sdss": {"stride": 2.5}}, "sdss.stride"),
    ({"sfma": {"threshold": -1}}, "sfma.threshold"),
    ({"relu": "yes"}, "relu"),  # forced on, but still a bool
    ({"spet": {"gate": "BOUND"}}, "spet.gate"),  # BOUND needs spet.enabled
    ("spet", "dict"),
])
def test_dyve_bad_setting_rejected(knobs, field):
    with pytest.raises(ValueError, match=f"'conv2'.*{field}"):
        nets.cifar10_quick("deploy", dyve={"conv2": knobs})


@pytest.mark.parametrize("knobs,field", [
    ({"sdss": {"enabled": True}}, "sdss"),
    ({"sfma": {"enabled": True}}, "sfma"),
    ({"spet": {"enabled": True, "gate": "BOUND"}}, "spet.gate"),
])
def test_dyve_convolution_knobs_rejected_on_inner_product(knobs, field):
    with pytest.raises(ValueError, match=f"'fc6'.*{field}"):
        nets.alexnet("deploy", dyve={"fc6": knobs})
    nets.alexnet("deploy", dyve={"conv5": knobs})  # fine on a convolution


def dyve_params(net):
    return {layer.name: layer.dyve_param for layer in net.layer if layer.HasField("dyve_param")}


def test_dyve_settings_accept_numpy_scalars():
    plain = {"spet": {"enabled": True, "fraction": 0.25, "check_interval": 8,
                      "threshold": -0.5},
             "sdss": {"enabled": True, "stride": 3}}
    numpy = {"spet": {"enabled": np.bool_(True), "fraction": np.float32(0.25),
                      "check_interval": np.int64(8), "threshold": np.float64(-0.5)},
             "sdss": {"enabled": np.True_, "stride": np.uint8(3)}}
    expected = dyve_params(nets.cifar10_quick("deploy", dyve={"conv2": plain}))["conv2"]
    got = dyve_params(nets.cifar10_quick("deploy", dyve={"conv2": numpy}))["conv2"]
    assert got == expected
    assert got.spet.fraction == 0.25 and got.spet.check_interval == 8 and got.sdss.stride == 3


def test_dyve_param_holds_only_non_default_fields():
    """Settings are written normalized: values equal to the proto defaults are left out,
    so spelling out a default gives the same prototxt as leaving it out."""
    net = nets.cifar10_quick("deploy", dyve={
        "conv1": {"relu": True, "spet": {"enabled": False, "fraction": 0.5},
                  "sdss": {"fill": "MEAN"}},
        "conv2": {"spet": {"enabled": True, "ordering": "PER_LAYER", "threshold": 0.1}}})
    params = dyve_params(net)
    assert params["conv1"] == caffe_pb2.DyveParameter(relu=True)
    assert not params["conv1"].HasField("spet") and not params["conv1"].HasField("sdss")
    assert params["conv2"] == caffe_pb2.DyveParameter(
        relu=True, spet=caffe_pb2.DyveSpetParameter(enabled=True, threshold=0.1))
    assert not params["conv2"].spet.HasField("ordering")


def test_dyve_form_loads_stock_weights(tmp_path):
    """Needs DyveConvolution in the built Caffe: a DyVE deploy net (all knobs off) loads a
    caffemodel saved from the stock net by layer name, and computes the same output."""
    # Fail cleanly rather than let Caffe abort the whole run on an unknown layer type.
    assert "DyveConvolution" in caffe.layer_type_list(), "this Caffe has no DyveConvolution"
    stock = load(write_net(tmp_path, nets.cifar10_quick("deploy"), "stock.prototxt"))
    rng = np.random.RandomState(0)
    for blobs in stock.params.values():
        for blob in blobs:
            blob.data[...] = rng.normal(0, 0.1, blob.data.shape)
    weights = str(tmp_path / "stock.caffemodel")
    stock.save(weights)
    dyve_path = write_net(tmp_path, nets.cifar10_quick("deploy", dyve={}), "dyve.prototxt")
    dyve = caffe.Net(dyve_path, caffe.TEST, weights=weights)
    for name, blobs in stock.params.items():
        for mine, theirs in zip(dyve.params[name], blobs):
            np.testing.assert_array_equal(mine.data, theirs.data)
    image = rng.uniform(-1, 1, stock.blobs["data"].data.shape)
    stock.blobs["data"].data[...] = image
    dyve.blobs["data"].data[...] = image
    np.testing.assert_allclose(dyve.forward()["prob"], stock.forward()["prob"],
                               rtol=1e-5, atol=1e-7)
