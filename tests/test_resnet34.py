"""dlib's ImageNet ResNet-34 converted to Caffe (python/dyve/resnet34.py) against dlib itself.

The model comes from Debian's dlib source package through apt (scripts/fetch_dlib_models.py,
cached under build/ and SHA-256-checked on every use); these tests are skipped only when
that download is impossible. The full 500-photo check is `make resnet34`; here a seeded
subset keeps `make test` short (about 30 s after the first build of the dumper).
"""
import copy
import os

import numpy as np
import pytest

from dyve import nets, resnet34, rewrite

import fetch_dlib_models  # scripts/, put on sys.path by dyve.resnet34

SUBSET = 24
# Measured on all 500 shared photos: max |dlib - Caffe| logit difference 1.4e-5 for logits
# up to about 30 (docs/resnet34.md); the bound leaves room for other BLAS builds.
LOGIT_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def converted():
    try:
        return resnet34.convert(quiet=True)
    except fetch_dlib_models.FetchError as error:
        if error.status == fetch_dlib_models.EXIT_UNAVAILABLE:
            pytest.skip(f"dlib's model archive cannot be downloaded through apt: {error}")
        raise


@pytest.fixture(scope="module")
def dump(converted):
    return resnet34.read_dump(os.path.join(resnet34.WORK_DIR, "dump"))


def test_model_pinned_and_verified(converted):
    assert converted["model_sha256"] == fetch_dlib_models.MODEL_SHA256
    # Verified again on every use, without a download.
    assert fetch_dlib_models.model_path(fetch=False) == converted["model"]


def test_dlib_stack_is_resnet34(converted, dump):
    layers, labels = dump
    assert len(layers) == len(resnet34.expected_stack()) == 122
    kinds = [e["kind"] for e in layers]
    assert kinds.count("con") == 33 and kinds.count("affine") == 33
    assert kinds.count("add_prev") == 16 and kinds[-1] == "fc"
    # dlib's classes are Caffe's (sorted wnids): checked by position against the wnids file.
    assert resnet34.check_labels(labels) == 1000
    # All parameters are used: 33 folded convolutions and the classifier.
    assert converted["parameters_dlib"] == 21631464
    assert converted["parameters_caffe"] == 21631464 - sum(
        e["count"] for e in layers if e["kind"] == "affine")  # gamma, beta folded away


def test_wrong_stack_refused(dump):
    layers, _ = dump
    for index, field, value in ((1, "padding_y", 3), (5, "stride_x", 2), (121, "num_outputs", 10)):
        bad = copy.deepcopy(layers)
        bad[index][field] = value
        with pytest.raises(resnet34.ConversionError, match=f"dlib layer {index}"):
            resnet34.caffe_weights(bad)
    with pytest.raises(resnet34.ConversionError, match="computational layers"):
        resnet34.caffe_weights(layers[:-1])


def test_affine_folded_into_convolution(dump):
    layers, _ = dump
    w = resnet34.caffe_weights(layers)
    con, affine = layers[5], layers[6]  # res2a_branch2a and its affine
    n = con["num_filters"]
    gamma, beta = affine["values"][:n], affine["values"][n:]
    raw = con["values"][:n * 64 * 9].reshape(n, 64, 3, 3)
    np.testing.assert_allclose(w["res2a_branch2a"][0], raw * gamma[:, None, None, None],
                               rtol=1e-6)
    np.testing.assert_allclose(w["res2a_branch2a"][1], con["values"][n * 576:] * gamma + beta,
                               rtol=1e-5, atol=1e-6)
    # conv1 takes the input normalisation: BGR order, / 256.
    raw1 = layers[1]["values"][:64 * 3 * 49].reshape(64, 3, 7, 7)
    g1 = layers[2]["values"][:64]
    np.testing.assert_allclose(w["conv1"][0][:, 0], raw1[:, 2] * g1[:, None, None] / 256,
                               rtol=1e-6)


def test_caffe_net_shapes_match_dlib(converted):
    from dyve import caffe_io
    net = caffe_io.load_net(converted["deploy"], converted["caffemodel"])
    # dlib pads only at stride 1 and rounds pooled sizes down: 227 -> 111 -> 55 -> 27 -> 13 -> 6
    for blob, shape in (("conv1", (64, 111, 111)), ("pool1", (64, 55, 55)),
                        ("res3a_branch2a", (128, 27, 27)), ("res3a_branch1", (128, 27, 27)),
                        ("res4a", (256, 13, 13)), ("res5c", (512, 6, 6)), ("pool5", (512, 1, 1)),
                        ("fc1000", (1000,))):
        assert net.blobs[blob].data.shape[1:] == shape, blob


def test_dyve_form_converts_conv1_and_branch2a_only():
    stock = nets.resnet34("deploy")
    names = rewrite.dyve_layers(stock)
    assert names[0] == "conv1" and len(names) == 17
    assert all(n.endswith("_branch2a") for n in names[1:])  # branch2b feeds the Eltwise


def test_agrees_with_dlib(converted):
    r = resnet34.check(limit=SUBSET)
    assert r["images"] == SUBSET
    assert r["top1_agreement"] >= 0.995, resnet34.format_check(r)
    assert r["max_abs_logit_diff"] < LOGIT_TOLERANCE, resnet34.format_check(r)
    assert r["dlib"] == r["caffe"]
    assert r["dlib"]["top5"] > 0.5  # a real classifier on real photos


def test_views_are_caffes_ten_crops(tmp_path):
    """The label-free search's views (write_views): per photo the four corner crops,
    the centre crop and their mirrors, keyed view-major; the centre one is exactly the
    crop the tuner and the bench read from the photo itself."""
    from dyve import caffe_io, data
    if not os.path.isdir(resnet34.default_images()):
        pytest.skip(f"no ImageNet sample photos at {resnet34.default_images()}")
    photos = tmp_path / "photos"
    photos.mkdir()
    names = sorted(os.listdir(resnet34.default_images()))[:3]
    for name in names:
        os.symlink(os.path.join(resnet34.default_images(), name), photos / name)
    out = tmp_path / "views_lmdb"
    info = resnet34.write_views(str(photos), str(out))
    assert info == {"path": str(out), "photos": 3, "views": 30}
    x, y, keys = data.read_lmdb(str(out), with_keys=True)
    assert keys == [f"{v:02d}_{i:05d}" for v in range(10) for i in range(3)]
    centre, labels = caffe_io.load_images(str(photos), (3, 227, 227))
    assert np.array_equal(x[4 * 3:5 * 3], centre) and np.array_equal(y[:3], labels)
    assert np.array_equal(y, np.tile(labels, 10))
    for view in range(5):  # the mirrors, and four different corners
        assert np.array_equal(x[(view + 5) * 3:(view + 6) * 3],
                              x[view * 3:(view + 1) * 3][..., ::-1])
    assert len({x[v * 3].tobytes() for v in range(10)}) == 10
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
