"""Bad files given to dyve.tune and dyve.bench alike (issue 16): both go through
caffe_io's one weight check and one image loader, so each case must be refused by both,
with a one-line error naming the file (and the blob, record or field), before any work
and without leaving outputs behind."""
import os

import caffe
import numpy as np
import pytest
from caffe.proto import caffe_pb2

from dyve import bench, tune
from dyve.tools import REPO_ROOT
from test_tune import write_lmdb

PROTO = os.path.join(REPO_ROOT, "prototxt")
STOCK = os.path.join(PROTO, "cifar10_quick_deploy.prototxt")
DYVE = os.path.join(PROTO, "cifar10_quick_dyve_deploy.prototxt")
WEIGHTS = os.path.join(REPO_ROOT, "models", "cifar10_quick.caffemodel")
CIFAR = os.path.join(REPO_ROOT, "data", "cifar10")
TEST_LMDB = os.path.join(CIFAR, "cifar10_test_lmdb")
MEAN = os.path.join(CIFAR, "mean.binaryproto")

pytestmark = pytest.mark.skipif(not os.path.isdir(TEST_LMDB) or not os.path.isfile(MEAN),
                                reason="needs data/cifar10 (make data-cifar10)")


def _tune(weights=WEIGHTS, images=TEST_LMDB, mean=MEAN, out=None):
    return tune.main(["--model", DYVE, "--weights", weights, "--calib", images,
                      "--mean", mean, "--max-images", "40", "--out-dir", out, "--quiet"])


def _bench(weights=WEIGHTS, images=TEST_LMDB, mean=MEAN, out=None):
    return bench.main(["--net", "cifar10_quick", "--stock", STOCK, "--dyve", DYVE,
                       "--weights", weights, "--images", images, "--mean", mean,
                       "--max-images", "40", "--threads", "1", "--out-dir", out])


def _both_refuse(tmp_path, capsys, needles, **files):
    for name, run in (("tune", _tune), ("bench", _bench)):
        out = tmp_path / f"out_{name}"
        assert run(out=str(out), **files) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "Traceback" not in err, f"{name}: {err}"
        for needle in needles:
            assert needle in err, f"{name}: {err}"
        assert not any(out.glob("*.prototxt")) and not (out / "summary.json").exists()


def test_empty_caffemodel(tmp_path, capsys):
    empty = tmp_path / "empty.caffemodel"
    empty.write_bytes(b"")
    _both_refuse(tmp_path, capsys, [str(empty)], weights=str(empty))


def test_truncated_caffemodel(tmp_path, capsys):
    data = open(WEIGHTS, "rb").read()
    cut = tmp_path / "cut.caffemodel"
    cut.write_bytes(data[:len(data) // 2])
    _both_refuse(tmp_path, capsys, [str(cut)], weights=str(cut))


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_weight(tmp_path, capsys, value):
    net = caffe.Net(STOCK, WEIGHTS, caffe.TEST)
    net.params["ip1"][0].data[5, 7] = value
    bad = tmp_path / "bad.caffemodel"
    net.save(str(bad))
    _both_refuse(tmp_path, capsys, ["layer 'ip1' blob 0", "not finite"], weights=str(bad))


def test_mean_of_the_wrong_size(tmp_path, capsys):
    blob = caffe.io.array_to_blobproto(np.full((1, 3, 28, 28), 120, np.float32))
    mean = tmp_path / "mean28.binaryproto"
    mean.write_bytes(blob.SerializeToString())
    _both_refuse(tmp_path, capsys, [str(mean), "28"], mean=str(mean))


def test_non_finite_mean_file(tmp_path, capsys):
    values = np.full((1, 3, 32, 32), 120, np.float32)
    values[0, 1, 4, 4] = np.nan
    mean = tmp_path / "nanmean.binaryproto"
    mean.write_bytes(caffe.io.array_to_blobproto(values).SerializeToString())
    _both_refuse(tmp_path, capsys, [str(mean), "not finite"], mean=str(mean))


def test_images_smaller_than_the_net(tmp_path, capsys):
    rng = np.random.RandomState(0)
    small = write_lmdb(tmp_path / "small_lmdb",
                       rng.randint(0, 255, (40, 3, 24, 24)).astype(np.uint8),
                       np.arange(40) % 10)
    _both_refuse(tmp_path, capsys, [small, "24"], images=small)


def test_labels_out_of_range(tmp_path, capsys):
    rng = np.random.RandomState(1)
    bad = write_lmdb(tmp_path / "labels_lmdb",
                     rng.randint(0, 255, (40, 3, 32, 32)).astype(np.uint8),
                     3 + np.arange(40) % 10)
    _both_refuse(tmp_path, capsys, [bad, "12"], images=bad)


def test_not_a_protobuf_mean(tmp_path, capsys):
    mean = tmp_path / "garbage.binaryproto"
    mean.write_bytes(os.urandom(300))
    _both_refuse(tmp_path, capsys, [str(mean)], mean=str(mean))


def test_blob_proto_sanity():
    """The fixtures' helper writes what Caffe itself reads back."""
    blob = caffe_pb2.BlobProto()
    blob.ParseFromString(caffe.io.array_to_blobproto(np.ones((1, 3, 2, 2))).SerializeToString())
    assert caffe.io.blobproto_to_array(blob).shape == (1, 3, 2, 2)
