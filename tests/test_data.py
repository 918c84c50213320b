"""Tests of dyve.data: CIFAR-10 binary / image-tree / download paths, split, ImageNet labels.

Run: PYTHONPATH=build/caffe-src/python:python /usr/bin/python3 -m pytest tests/test_data.py
"""
import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import tarfile
import threading

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
pytest.importorskip("lmdb")
pytest.importorskip("caffe")

from dyve import data  # noqa: E402
from dyve.tools import REPO_ROOT  # noqa: E402

PER_BATCH = 6          # records per data_batch_N.bin -> 30 train images
PER_TEST = 10          # records in test_batch.bin
CALIB = 7


def _records(rng, n, offset):
    labels = (np.arange(n) + offset) % 10          # every class appears
    pixels = rng.randint(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)  # RGB planes
    return labels.astype(np.uint8), pixels


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny official-layout cifar-10-binary.tar.gz, and the records written into it."""
    d = tmp_path_factory.mktemp("tiny")
    rng = np.random.RandomState(0)
    splits = {"train": ([], []), "test": ([], [])}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        def add(name, payload):
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        for b in range(1, 6):
            labels, pixels = _records(rng, PER_BATCH, b)
            splits["train"][0].append(labels)
            splits["train"][1].append(pixels)
            recs = np.concatenate([labels[:, None], pixels.reshape(PER_BATCH, -1)], axis=1)
            add(f"data_batch_{b}.bin", recs.tobytes())
        labels, pixels = _records(rng, PER_TEST, 0)
        splits["test"] = ([labels], [pixels])
        add("test_batch.bin",
            np.concatenate([labels[:, None], pixels.reshape(PER_TEST, -1)], axis=1).tobytes())
        add("batches.meta.txt", ("\n".join(data.CIFAR10_CLASSES) + "\n").encode())
    archive = d / "cifar-10-binary.tar.gz"
    archive.write_bytes(buf.getvalue())
    records = {s: (np.concatenate(l), np.concatenate(p)) for s, (l, p) in splits.items()}
    return {"archive": str(archive), "md5": hashlib.md5(buf.getvalue()).hexdigest(),
            "bytes": buf.getvalue(), "records": records}


@pytest.fixture(scope="module")
def from_binary(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("bin_out")
    summary = data.prepare_cifar10(str(out), binary=tiny["archive"], calib_size=CALIB,
                                   expected_md5=tiny["md5"])
    return str(out), summary


def _read_all(out):
    return {s: data.read_lmdb(os.path.join(out, f"cifar10_{s}_lmdb"), with_keys=True)
            for s in ("train", "calib", "test")}


def _index_of(key):
    # keys are "%08d_<split>/<class>/<index>.png" (convert_imageset's key format)
    return int(key.rsplit("/", 1)[1].split(".")[0])


def test_binary_roundtrip_bgr(tiny, from_binary):
    out, summary = from_binary
    assert not summary["skipped"] and summary["channel_order"] == "BGR"
    content = _read_all(out)
    for split, source in (("train", "train"), ("calib", "train"), ("test", "test")):
        images, labels, keys = content[split]
        ref_labels, ref_rgb = tiny["records"][source]
        assert images.shape[1:] == (3, 32, 32) and images.dtype == np.uint8
        for img, label, key in zip(images, labels, keys):
            i = _index_of(key)
            assert key.split("_", 1)[1].startswith(f"{source}/{data.CIFAR10_CLASSES[label]}/")
            assert label == ref_labels[i]
            np.testing.assert_array_equal(img, ref_rgb[i][::-1])   # BGR = RGB reversed
    n_train = 5 * PER_BATCH
    assert summary["splits"]["train"]["count"] == n_train - CALIB
    assert summary["splits"]["calib"]["count"] == CALIB
    assert summary["splits"]["test"]["count"] == PER_TEST
    for split in ("train", "calib", "test"):
        per_class = summary["splits"][split]["per_class"]
        assert list(per_class) == list(data.CIFAR10_CLASSES)
        assert np.bincount(content[split][1], minlength=10).tolist() == list(per_class.values())
    # mean.binaryproto is the mean of the train split only
    mean = data.read_mean(os.path.join(out, "mean.binaryproto"))
    np.testing.assert_allclose(mean, content["train"][0].astype(np.float64).mean(0), atol=1e-3)
    on_disk = json.load(open(os.path.join(out, "cifar10.json")))
    assert on_disk["inputs"] == summary["inputs"]
    assert sorted(os.listdir(out)) == sorted(["cifar10_train_lmdb", "cifar10_calib_lmdb",
                                               "cifar10_test_lmdb", "mean.binaryproto",
                                               "cifar10.json"])


def test_png_tree_matches_binary(tiny, from_binary, tmp_path):
    """The same pixels as a PNG tree (folder and .tar.gz with a top folder) -> same LMDBs."""
    root = tmp_path / "tree" / "cifar10-images"
    for split in ("train", "test"):
        labels, rgb = tiny["records"][split]
        for cls in data.CIFAR10_CLASSES:
            (root / split / cls).mkdir(parents=True)
        for i, (label, img) in enumerate(zip(labels, rgb)):
            bgr = np.ascontiguousarray(img[::-1].transpose(1, 2, 0))
            assert cv2.imwrite(str(root / split / data.CIFAR10_CLASSES[label] / f"{i:05d}.png"),
                               bgr)
    bin_out, bin_summary = from_binary
    expected = _read_all(bin_out)
    archive = tmp_path / "tree.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="cifar10-images")
    for src in (str(root), str(archive)):
        out = str(tmp_path / ("out_" + os.path.basename(src)))
        summary = data.prepare_cifar10(out, images=src, calib_size=CALIB)
        got = _read_all(out)
        for split in ("train", "calib", "test"):
            assert got[split][2] == expected[split][2]                # same keys, same order
            np.testing.assert_array_equal(got[split][0], expected[split][0])
            np.testing.assert_array_equal(got[split][1], expected[split][1])
            assert (summary["splits"][split]["lmdb_sha256"]
                    == bin_summary["splits"][split]["lmdb_sha256"])
        assert summary["inputs"]["kind"] == "images"


def test_split_disjoint_deterministic(from_binary):
    out, summary = from_binary
    content = _read_all(out)
    paths = {s: [k.split("_", 1)[1] for k in content[s][2]] for s in content}
    assert set(paths["train"]).isdisjoint(paths["calib"])
    assert all(p.startswith("train/") for p in paths["train"] + paths["calib"])
    assert all(p.startswith("test/") for p in paths["test"])
    assert len(set(paths["train"] + paths["calib"])) == 5 * PER_BATCH
    # the pure split: deterministic per seed, a partition, calib = last of the shuffle
    items = [(f"train/c/{i:04d}.png", i % 10) for i in range(100)]
    tr1, ca1, _ = data.split_train_calib(items, 20, 1701)
    tr2, ca2, _ = data.split_train_calib(list(reversed(items)), 20, 1701)
    assert (tr1, ca1) == (tr2, ca2)
    assert len(ca1) == 20 and len(tr1) == 80 and sorted(tr1 + ca1) == items
    assert data.split_train_calib(items, 20, 7)[1] != ca1
    with pytest.raises(data.DataError):
        data.split_train_calib(items, 100, 1701)


def test_skip_and_force(tiny, from_binary):
    out, _ = from_binary
    again = data.prepare_cifar10(out, binary=tiny["archive"], calib_size=CALIB,
                                 expected_md5=tiny["md5"])
    assert again["skipped"]
    other_seed = data.prepare_cifar10(out, binary=tiny["archive"], calib_size=CALIB, seed=5,
                                      expected_md5=tiny["md5"])
    assert not other_seed["skipped"] and other_seed["inputs"]["seed"] == 5
    forced = data.prepare_cifar10(out, binary=tiny["archive"], calib_size=CALIB,
                                  expected_md5=tiny["md5"], force=True)
    assert not forced["skipped"]
    assert forced["splits"]["calib"]["lmdb_sha256"] != other_seed["splits"]["calib"]["lmdb_sha256"]
    assert not [n for n in os.listdir(out) if ".tmp-" in n]


def test_binary_md5_mismatch_refused(tiny, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(data.DataError, match="MD5 .* does not match the official"):
        data.prepare_cifar10(str(out), binary=tiny["archive"])    # official MD5 expected
    assert os.listdir(out) == []


class _Server:
    """Serves the tiny archive at /good, a short body with a long Content-Length at
    /truncated and flipped bytes at /corrupt, on 127.0.0.1 (ephemeral port)."""

    def __init__(self, payload):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body, length = payload, len(payload)
                if self.path == "/truncated":
                    body = payload[: len(payload) // 2]
                elif self.path == "/corrupt":
                    body = bytes(b ^ 0xFF for b in payload[:64]) + payload[64:]
                self.send_response(200)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def test_download(tiny, from_binary, tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    with _Server(tiny["bytes"]) as server:
        for bad, message in (("truncated", "truncated"), ("corrupt", "corrupt: MD5")):
            out = tmp_path / bad
            with pytest.raises(data.DataError, match=message):
                data.prepare_cifar10(str(out), download=True, url=f"{server.url}/{bad}",
                                     calib_size=CALIB, expected_md5=tiny["md5"])
            assert os.listdir(out) == [], "nothing half-written may be left"
        out = tmp_path / "good"
        summary = data.prepare_cifar10(str(out), download=True, url=f"{server.url}/good",
                                       calib_size=CALIB, expected_md5=tiny["md5"])
    assert (out / "cifar-10-binary.tar.gz").read_bytes() == tiny["bytes"]
    assert summary["source"]["url"].endswith("/good")
    assert summary["splits"]["test"]["lmdb_sha256"] == \
        from_binary[1]["splits"]["test"]["lmdb_sha256"]
    # server gone: up to date outputs need no second download
    assert data.prepare_cifar10(str(out), download=True, url=f"{server.url}/good",
                                calib_size=CALIB, expected_md5=tiny["md5"])["skipped"]


def test_cli(tiny, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.join(REPO_ROOT, "build", "caffe-src", "python"),
         os.path.join(REPO_ROOT, "python")]))
    run = [sys.executable, "-m", "dyve.data"]
    r = subprocess.run(run + ["cifar10", "--help"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "--calib-size" in r.stdout
    out = tmp_path / "cli"
    r = subprocess.run(run + ["cifar10", "--out", str(out), "--binary", tiny["archive"],
                              "--md5", tiny["md5"], "--calib-size", "3"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["splits"]["calib"]["count"] == 3
    r = subprocess.run(run + ["cifar10", "--out", str(tmp_path / "x"), "--binary",
                              tiny["archive"]], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "does not match the official" in r.stderr


# ----------------------------------------------------------------------------- ImageNet

SAMPLE = os.path.join(data.shared_data_dir(), "imagenet-sample-dev")
WNIDS = os.path.join(data.shared_data_dir(), "ilsvrc2012_wnids.txt")
needs_sample = pytest.mark.skipif(not os.path.isdir(SAMPLE), reason="no shared ImageNet sample")


def _sample_links(folder, names):
    folder.mkdir()
    for n in names:
        os.symlink(os.path.join(SAMPLE, n), folder / n)
    return folder


@needs_sample
def test_imagenet_wnid_labels(tmp_path):
    names = sorted(os.listdir(SAMPLE))
    picked = [names[0], names[1], names[len(names) // 2], names[-1]]
    assert picked[0] == "n01440764_tench.JPEG"                  # first wnid -> class 0
    lines = [line.split()[0] for line in open(WNIDS)]
    folder = _sample_links(tmp_path / "imgs", picked)
    summary = data.prepare_imagenet(str(folder), str(tmp_path / "out"), name="dev")
    images, labels, keys = data.read_lmdb(str(tmp_path / "out" / "dev_lmdb"), with_keys=True)
    assert images.shape == (4, 3, 256, 256)
    expected = {n: lines.index(n.split("_")[0]) for n in picked}
    assert expected["n01440764_tench.JPEG"] == 0
    assert {k.split("_", 1)[1]: int(l) for k, l in zip(keys, labels)} == expected
    assert summary["count"] == 4 and summary["mean"]["from"] == "dev_lmdb"
    assert data.read_mean(str(tmp_path / "out" / "mean.binaryproto")).shape == (3, 256, 256)
    # the listfile overrides file-name labels
    listfile = tmp_path / "list.txt"
    listfile.write_text("".join(f"{n} {i + 500}\n" for i, n in enumerate(picked)))
    data.prepare_imagenet(str(folder), str(tmp_path / "out2"), name="dev",
                          listfile=str(listfile), resize=64)
    images, labels = data.read_lmdb(str(tmp_path / "out2" / "dev_lmdb"))
    assert images.shape == (4, 3, 64, 64) and sorted(labels) == [500, 501, 502, 503]


@needs_sample
def test_imagenet_unknown_wnid(tmp_path):
    folder = _sample_links(tmp_path / "imgs", ["n01440764_tench.JPEG"])
    os.symlink(os.path.join(SAMPLE, "n01440764_tench.JPEG"), folder / "n99999999_fake.JPEG")
    with pytest.raises(data.DataError, match="n99999999_fake.JPEG: unknown wnid"):
        data.prepare_imagenet(str(folder), str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == []


# ----------------------------------------------------------------------------- bad records

def _lmdb_of(path, records):
    import lmdb
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, value in records:
            txn.put(key, value)
    env.close()
    return str(path)


def _datum(**fields):
    from caffe.proto import caffe_pb2
    return caffe_pb2.Datum(**fields).SerializeToString()


def test_corrupt_lmdb_records_name_file_and_key(tmp_path):
    ok, jpeg = cv2.imencode(".jpg", np.full((8, 8, 3), 99, np.uint8))
    assert ok
    good = _datum(channels=3, height=2, width=2, data=bytes(12), label=1)
    cases = {
        "truncated": _datum(channels=3, height=8, width=8, encoded=True,
                            data=jpeg.tobytes()[:20], label=0),
        "short": _datum(channels=3, height=4, width=4, data=bytes(10), label=0),
        "notdatum": b"\xff\xff\xff\xff garbage",
    }
    for name, value in cases.items():
        db = _lmdb_of(tmp_path / name, [(b"00000000_ok", good), (b"00000001_bad", value)])
        with pytest.raises(data.DataError, match=r"record '00000001_bad'") as err:
            data.read_lmdb(db)
        assert db in str(err.value)
    images, labels = data.read_lmdb(_lmdb_of(tmp_path / "fine", [(b"k", good)]))
    assert images.shape == (1, 3, 2, 2) and list(labels) == [1]


def test_garbage_data_mdb_is_a_data_error(tmp_path):
    db = tmp_path / "garbage_lmdb"
    db.mkdir()
    (db / "data.mdb").write_bytes(b"\x00not an lmdb\xff" * 1000)
    with pytest.raises(data.DataError, match="garbage_lmdb"):
        data.read_lmdb(str(db))


def test_imagenet_missing_list_files_and_bad_resize(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for args, needle in ((["--wnids", str(tmp_path / "none.txt")], "wnids file"),
                         (["--listfile", str(tmp_path / "none.txt")], "list file"),
                         (["--resize", "0"], "resize"), (["--resize", "-5"], "resize")):
        code = data.main(["imagenet", "--images", str(folder), "--out", str(tmp_path / "o"),
                          *args])
        err = capsys.readouterr().err
        assert code == 1 and err.startswith("error: ") and needle in err, (args, err)
