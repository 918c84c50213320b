"""Datasets to LMDB with Caffe's own tools (convert_imageset, compute_image_mean).

Command line (``/usr/bin/python3 -m dyve.data --help``)::

    python -m dyve.data cifar10  [--binary TGZ | --download [--url URL] | --images DIR_OR_TGZ]
    python -m dyve.data imagenet [--images DIR] [--listfile FILE] [--wnids FILE]

CIFAR-10 (``prepare_cifar10``) writes to ``<out>`` (default ``data/cifar10`` in the repo):
``cifar10_train_lmdb``, ``cifar10_calib_lmdb``, ``cifar10_test_lmdb``, ``mean.binaryproto``
(mean of the train LMDB only) and ``cifar10.json`` (inputs, counts per class, checksums).

Choices, the same for every input format:

* Channel order is **BGR** (Datum = uint8 C x H x W, channel 0 = blue), Caffe's convention
  for ``convert_imageset``, which reads files with OpenCV. The official binary release
  stores RGB planes and Caffe's ``convert_cifar_data`` copies them as they are (RGB, keys
  ``%05d``, exactly 10,000 records per batch file, no calibration split), so it is *not*
  used: the binary records are written as lossless PNG files (with OpenCV, hence BGR) into
  the same ``<split>/<class>/<index>.png`` tree an image-folder input has, and both inputs
  then go through the one ``convert_imageset`` path. A PNG tree and a binary release of
  the same pixels give byte-identical LMDBs.
* Classes are the sorted class-folder names (CIFAR-10's alphabetical order is its
  official label order 0-9). Each split's list is first sorted by relative path.
* Split: ``numpy.random.RandomState(seed)`` shuffles the training list (``seed`` default
  1701); the last ``calib_size`` (default 5000) entries of that order are the calibration
  split, the others the train split, kept in the shuffled order (Caffe's data layer reads
  an LMDB in order). The same generator then shuffles the test list, so a prefix of the
  test LMDB is not one class. The test set is never used for calibration.
* Every output is built under ``<name>.tmp-<pid>`` and moved in place with ``os.replace``;
  the JSON summary is written last and marks a complete build. A later call whose recorded
  inputs match skips the work (``force=True`` / ``--force`` redoes it).

ImageNet (``prepare_imagenet``): a folder of images -> ``<out>/<name>_lmdb`` resized to
256x256 by ``convert_imageset`` plus ``<out>/mean.binaryproto`` and ``<out>/<name>.json``.
Labels come from a listfile (``relative/path label``) or from the ``nXXXXXXXX_`` wnid prefix
of each file name, mapped to its line position in ``ilsvrc2012_wnids.txt``.

``read_lmdb(path)`` reads an LMDB back as (uint8 N x C x H x W images, int64 labels).
"""
import argparse
import collections
import hashlib
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request

import numpy as np
from tqdm import tqdm

from dyve.errors import DyveError
from dyve.tools import REPO_ROOT, caffe_tool

FORMAT_VERSION = 1
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_ARCHIVE = "cifar-10-binary.tar.gz"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
CIFAR10_IMAGES_ARCHIVE = "cifar10-images.tar.gz"
CIFAR10_RECORD = 1 + 3 * 32 * 32
CIFAR10_BATCHES = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)],
                   "test": ["test_batch.bin"]}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff")
WNID_PREFIX = re.compile(r"^(n\d{8})_")
DEFAULT_CIFAR10_OUT = os.path.join(REPO_ROOT, "data", "cifar10")
DEFAULT_IMAGENET_OUT = os.path.join(REPO_ROOT, "data", "imagenet")


class DataError(DyveError):
    """A problem with the input data or a conversion step, with a message for the user."""


# ----------------------------------------------------------------------------- helpers

def shared_data_dir():
    """``$DYVE_SHARED_DATA`` if set, else ``<repo>/../shared/data``."""
    return os.environ.get("DYVE_SHARED_DATA") or os.path.join(
        os.path.dirname(REPO_ROOT), "shared", "data")


def _progress(iterable=None, **kwargs):
    # disable=None: a bar on a terminal, silent in logs and tests.
    return tqdm(iterable, disable=None, **kwargs)


def file_digest(path, algorithm="sha256"):
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_image(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _tmp_name(path):
    return f"{path}.tmp-{os.getpid()}"


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _pid_alive(pid):
    if pid == os.getpid():
        return False  # a leftover of this very process is stale too
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_tmps(out_dir, names):
    """Delete ``<name>.tmp-<pid>`` leftovers of ``names`` whose process is gone."""
    pattern = re.compile(r"^(.*)\.tmp-(\d+)$")
    for entry in os.listdir(out_dir):
        m = pattern.match(entry)
        if m and m.group(1) in names and not _pid_alive(int(m.group(2))):
            _remove(os.path.join(out_dir, entry))


def _replace(tmp, final):
    """Move a finished file or directory into place (os.replace cannot replace a full dir)."""
    if os.path.isdir(final) and not os.path.islink(final):
        shutil.rmtree(final)
    os.replace(tmp, final)


def _write_json(path, obj):
    tmp = _tmp_name(path)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def _load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _safe_extract(archive, dest, want, desc="extracting"):
    """Extract the regular-file members of a tar archive for which ``want(name)`` holds.

    Links, devices and paths leaving ``dest`` are refused (Python 3.11.2 has no tar filter).
    """
    dest_real = os.path.realpath(dest)
    count = 0
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in _progress(tar, desc=desc, unit=" files"):
                if not member.isfile() or not want(member.name):
                    continue
                target = os.path.realpath(os.path.join(dest, member.name))
                if os.path.isabs(member.name) or not target.startswith(dest_real + os.sep):
                    raise DataError(f"{archive}: unsafe path in archive: {member.name!r}")
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with tar.extractfile(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                count += 1
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"cannot read archive {archive}: {e}") from e
    return count


def _run_tool(name, args, total=None, desc=None):
    """Run a Caffe tool; progress from its 'Processed N files.' lines; DataError on failure."""
    cmd = [caffe_tool(name)] + [str(a) for a in args]
    env = dict(os.environ, GLOG_logtostderr="1")  # log to stderr only, no files in /tmp
    tail = collections.deque(maxlen=40)
    bar = _progress(total=total, desc=desc or name, unit=" img")
    done = 0
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, text=True, errors="replace")
    for line in proc.stdout:
        tail.append(line.rstrip())
        m = re.search(r"Processed (\d+) files", line)
        if m:
            n = int(m.group(1))
            bar.update(n - done)
            done = n
    rc = proc.wait()
    bar.close()
    if rc != 0:
        raise DataError(f"{name} failed (exit {rc}): {' '.join(cmd)}\n" + "\n".join(tail))
    return list(tail)


def _lmdb_stats(path):
    """(entries, sha256 over keys and values in key order) of an LMDB."""
    import lmdb
    h = hashlib.sha256()
    env = lmdb.open(path, readonly=True, lock=False, subdir=True)
    try:
        entries = env.stat()["entries"]
        with env.begin() as txn:
            for key, value in txn.cursor():
                h.update(len(key).to_bytes(4, "little") + key)
                h.update(len(value).to_bytes(4, "little") + value)
    finally:
        env.close()
    return entries, h.hexdigest()


def _build_lmdb(root, items, db_path, desc, resize=None):
    """``convert_imageset`` of ``items`` [(relpath, label)] under ``root`` into ``db_path``.

    Checks that every listed image went in (convert_imageset skips unreadable files).
    Returns (entries, content sha256, listfile sha256).
    """
    listing = "".join(f"{rel} {label}\n" for rel, label in items)
    fd, list_path = tempfile.mkstemp(prefix="dyve-list-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write(listing)
    args = ["--backend=lmdb", "--check_size"]
    if resize:
        args += [f"--resize_height={resize}", f"--resize_width={resize}"]
    try:
        log = _run_tool("convert_imageset", args + [os.path.join(root, ""), list_path, db_path],
                        total=len(items), desc=desc)
    finally:
        os.remove(list_path)
    entries, digest = _lmdb_stats(db_path)
    if entries != len(items):
        missing = [line for line in log if "Could not open" in line][:5]
        raise DataError(f"convert_imageset wrote {entries} of {len(items)} images into "
                        f"{db_path}; unreadable files:\n" + "\n".join(missing))
    return entries, digest, hashlib.sha256(listing.encode()).hexdigest()


def _compute_mean(db_path, mean_path):
    _run_tool("compute_image_mean", ["--backend=lmdb", db_path, mean_path],
              desc="compute_image_mean")
    return read_mean(mean_path)


def read_mean(path):
    """A mean.binaryproto as a float32 C x H x W array."""
    from caffe.proto import caffe_pb2
    blob = caffe_pb2.BlobProto()
    with open(path, "rb") as f:
        blob.ParseFromString(f.read())
    data = np.asarray(blob.data, dtype=np.float32)
    if blob.HasField("shape"):
        shape = tuple(blob.shape.dim)
    else:
        shape = (blob.num, blob.channels, blob.height, blob.width)
    return data.reshape(shape[-3:])


def _datum_image(datum, value, path, key):
    """uint8 C x H x W of one LMDB record, or a DataError naming the file and the key."""
    where = f"{path}: record {key.decode(errors='replace')!r}"
    try:
        datum.ParseFromString(value)
    except Exception as error:  # protobuf DecodeError
        raise DataError(f"{where} is not a Caffe Datum: {error}") from None
    if datum.encoded:
        import cv2
        img = cv2.imdecode(np.frombuffer(datum.data, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise DataError(f"{where}: OpenCV cannot decode its encoded image (truncated "
                            "or not an image)")
        return img.transpose(2, 0, 1)
    shape = (datum.channels, datum.height, datum.width)
    count = int(np.prod(shape))
    if count == 0:
        raise DataError(f"{where}: the Datum has shape {'x'.join(map(str, shape))}")
    if datum.data:
        if len(datum.data) != count:
            raise DataError(f"{where}: {len(datum.data)} bytes for shape "
                            f"{'x'.join(map(str, shape))} ({count} expected)")
        return np.frombuffer(datum.data, np.uint8).reshape(shape)
    if len(datum.float_data) != count:
        raise DataError(f"{where}: {len(datum.float_data)} float values for shape "
                        f"{'x'.join(map(str, shape))} ({count} expected)")
    values = np.asarray(datum.float_data, np.float32)
    if not (np.all(np.isfinite(values)) and values.min() >= 0 and values.max() <= 255):
        raise DataError(f"{where}: float pixels outside 0..255 (this loader keeps uint8)")
    return values.reshape(shape).astype(np.uint8)


def read_lmdb(path, limit=None, with_keys=False):
    """Read a Caffe Datum LMDB: (uint8 images N x C x H x W, int64 labels[, keys]).

    Raw datums are read as stored; encoded ones are decoded with OpenCV (BGR, like Caffe's
    data layer). ``limit`` reads only the first entries in key order. A record that is not
    a Datum, does not decode or does not fill its shape is a DataError naming the key.
    """
    import lmdb
    from caffe.proto import caffe_pb2
    if not os.path.isdir(path):
        raise DataError(f"no LMDB at {path}")
    images, labels, keys = [], [], []
    datum = caffe_pb2.Datum()
    try:
        env = lmdb.open(path, readonly=True, lock=False, subdir=True)
    except lmdb.Error as error:
        raise DataError(f"{path}: not a readable LMDB: {error}") from None
    try:
        with env.begin() as txn:
            total = env.stat()["entries"]
            total = total if limit is None else min(limit, total)
            for i, (key, value) in enumerate(_progress(txn.cursor(), total=total,
                                                       desc="reading", unit=" img")):
                if limit is not None and i >= limit:
                    break
                images.append(_datum_image(datum, value, path, key))
                labels.append(datum.label)
                keys.append(key.decode(errors="replace"))
    except lmdb.Error as error:
        raise DataError(f"{path}: the LMDB is corrupt: {error}") from None
    finally:
        env.close()
    if images and len({a.shape for a in images}) > 1:
        raise DataError(f"{path}: images of different sizes; read them one by one")
    out = (np.stack(images) if images else np.zeros((0, 0, 0, 0), np.uint8),
           np.asarray(labels, dtype=np.int64))
    return out + (keys,) if with_keys else out


# ----------------------------------------------------------------------------- CIFAR-10

def split_train_calib(items, calib_size, seed):
    """Deterministic split of a training list: returns (train, calib, rng).

    ``items`` are sorted, shuffled with ``RandomState(seed)``; the last ``calib_size`` of the
    shuffled order are calibration, the rest training (both in the shuffled order). The
    generator is returned so that the caller can shuffle the test list with it next.
    """
    items = sorted(items)
    if not 0 < calib_size < len(items):
        raise DataError(f"calib_size must be between 1 and {len(items) - 1} "
                        f"(the training set has {len(items)} images), got {calib_size}")
    rng = np.random.RandomState(seed)
    order = [items[i] for i in rng.permutation(len(items))]
    return order[:-calib_size], order[-calib_size:], rng


def _find_split_root(root):
    """The folder holding train/ and test/: ``root`` itself or its one subdirectory."""
    def has_splits(d):
        return all(os.path.isdir(os.path.join(d, s)) for s in ("train", "test"))
    if has_splits(root):
        return root
    subdirs = [os.path.join(root, d) for d in sorted(os.listdir(root))
               if os.path.isdir(os.path.join(root, d))]
    if len(subdirs) == 1 and has_splits(subdirs[0]):
        return subdirs[0]
    raise DataError(f"{root}: expected an image tree train/<class>/*.jpg and "
                    "test/<class>/*.jpg (optionally inside one top-level folder)")


def _scan_cifar_tree(root):
    """{split: [(relpath, label)]}, class names; labels = index of the sorted class names."""
    classes = sorted(d for d in os.listdir(os.path.join(root, "train"))
                     if os.path.isdir(os.path.join(root, "train", d)))
    if len(classes) != len(CIFAR10_CLASSES):
        raise DataError(f"{root}/train: expected {len(CIFAR10_CLASSES)} class folders, "
                        f"found {len(classes)}: {classes}")
    test_classes = sorted(d for d in os.listdir(os.path.join(root, "test"))
                          if os.path.isdir(os.path.join(root, "test", d)))
    if test_classes != classes:
        raise DataError(f"{root}: train and test class folders differ: {classes} vs "
                        f"{test_classes}")
    splits = {}
    for split in ("train", "test"):
        items = []
        for label, cls in enumerate(classes):
            folder = os.path.join(root, split, cls)
            for name in os.listdir(folder):
                if _is_image(name) and os.path.isfile(os.path.join(folder, name)):
                    items.append((f"{split}/{cls}/{name}", label))
        if not items:
            raise DataError(f"{root}/{split}: no images")
        splits[split] = sorted(items)
    return splits, classes


def _tree_fingerprint(root):
    """sha256 over the relative paths and contents of every image file under ``root``."""
    files = []
    for dirpath, _, names in os.walk(root):
        files += [os.path.join(dirpath, n) for n in names if _is_image(n)]
    h = hashlib.sha256()
    for path in _progress(sorted(files), desc="hashing", unit=" files"):
        rel = os.path.relpath(path, root)
        with open(path, "rb") as f:
            data = f.read()
        h.update(f"{rel}\0{len(data)}\0".encode() + data)
    return h.hexdigest()


def _binary_to_png_tree(archive, work):
    """Unpack an official binary release and write its records as PNG files (BGR).

    Returns the tree root: <root>/{train,test}/<class>/<index:05d>.png, where index is the
    record's position in its split (data_batch_1..5 concatenated, or test_batch).
    """
    import cv2
    raw = os.path.join(work, "bin")
    os.makedirs(raw)
    _safe_extract(archive, raw, lambda n: n.endswith(".bin"), desc="extracting")
    batches = {}
    for dirpath, _, names in os.walk(raw):
        for n in names:
            batches.setdefault(n, os.path.join(dirpath, n))
    needed = CIFAR10_BATCHES["train"] + CIFAR10_BATCHES["test"]
    missing = [n for n in needed if n not in batches]
    if missing:
        raise DataError(f"{archive}: not the CIFAR-10 binary layout "
                        f"(cifar-10-batches-bin/...), missing {missing}")
    root = os.path.join(work, "png")
    for split in ("train", "test"):
        for cls in CIFAR10_CLASSES:
            os.makedirs(os.path.join(root, split, cls))
        records = []
        for name in CIFAR10_BATCHES[split]:
            data = np.fromfile(batches[name], dtype=np.uint8)
            if data.size == 0 or data.size % CIFAR10_RECORD:
                raise DataError(f"{archive}: {name} has {data.size} bytes, not a multiple "
                                f"of the {CIFAR10_RECORD}-byte record")
            records.append(data.reshape(-1, CIFAR10_RECORD))
        records = np.concatenate(records)
        if records[:, 0].max() >= len(CIFAR10_CLASSES):
            raise DataError(f"{archive}: label {records[:, 0].max()} out of range")
        for index, rec in enumerate(_progress(records, desc=f"writing {split} PNGs",
                                              unit=" img")):
            rgb_chw = rec[1:].reshape(3, 32, 32)
            bgr_hwc = np.ascontiguousarray(rgb_chw[::-1].transpose(1, 2, 0))
            path = os.path.join(root, split, CIFAR10_CLASSES[rec[0]], f"{index:05d}.png")
            if not cv2.imwrite(path, bgr_hwc):
                raise DataError(f"cannot write {path}")
    shutil.rmtree(raw)
    return root


def download_file(url, dest, expected_md5, timeout=60):
    """Download ``url`` to ``dest`` atomically: temp file, size and MD5 checks, rename.

    On a truncated or corrupt transfer the temp file is removed and DataError raised.
    """
    tmp = _tmp_name(dest)
    h = hashlib.md5()
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as f:
            length = resp.headers.get("Content-Length")
            length = int(length) if length is not None else None
            with _progress(total=length, desc="downloading", unit="B",
                           unit_scale=True) as bar:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    f.write(chunk)
                    h.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if length is not None and received != length:
            raise DataError(f"download of {url} truncated: got {received} of {length} bytes")
        if h.hexdigest() != expected_md5:
            raise DataError(f"download of {url} is corrupt: MD5 {h.hexdigest()}, expected "
                            f"{expected_md5} ({received} bytes)")
        os.replace(tmp, dest)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        _remove(tmp)
        raise DataError(f"download of {url} failed: {e}") from e
    except BaseException:
        _remove(tmp)
        raise
    return dest


def _cifar10_source(out_dir, binary, images, url, download_):
    """Pick the input by priority; returns (kind, path, url or None)."""
    given = [n for n, v in (("--binary", binary), ("--download", download_),
                            ("--images", images)) if v]
    if len(given) > 1:
        print(f"note: several inputs given ({', '.join(given)}); using {given[0]}",
              file=sys.stderr)
    if binary:
        return "binary", os.path.abspath(binary), None
    if download_:
        return "binary", os.path.join(out_dir, CIFAR10_ARCHIVE), url or CIFAR10_URL
    if images:
        return "images", os.path.abspath(images), None
    shared = os.path.join(shared_data_dir(), CIFAR10_IMAGES_ARCHIVE)
    if os.path.isfile(shared):
        return "images", os.path.abspath(shared), None
    raise DataError(
        "no CIFAR-10 input: give --binary cifar-10-binary.tar.gz (the official binary "
        f"release), --download (fetches {CIFAR10_URL}), or --images DIR_OR_TGZ "
        f"(<split>/<class>/*.jpg); {shared} does not exist (set DYVE_SHARED_DATA to the "
        "folder holding cifar10-images.tar.gz)")


def _outputs_complete(out_dir, names, json_name, inputs):
    summary = _load_json(os.path.join(out_dir, json_name))
    if not summary or summary.get("inputs") != inputs:
        return None
    if all(os.path.exists(os.path.join(out_dir, n)) for n in names):
        return summary
    return None


def prepare_cifar10(out_dir=None, binary=None, images=None, url=None, download=False,
                    calib_size=5000, seed=1701, force=False, expected_md5=CIFAR10_MD5):
    """Build the CIFAR-10 train/calib/test LMDBs, mean and JSON summary; returns the summary.

    Input priority: ``binary`` (official cifar-10-binary.tar.gz, MD5-checked against
    ``expected_md5``), ``download`` (from ``url``, default the official address, to
    ``<out_dir>/cifar-10-binary.tar.gz``), ``images`` (image tree or .tar.gz of one), else
    the shared ``cifar10-images.tar.gz``. Skips the work when the outputs exist and were
    made from the same inputs, unless ``force``. The summary has ``skipped`` True then.
    """
    t0 = time.time()
    out_dir = os.path.abspath(out_dir or DEFAULT_CIFAR10_OUT)
    os.makedirs(out_dir, exist_ok=True)
    lmdbs = {s: f"cifar10_{s}_lmdb" for s in ("train", "calib", "test")}
    json_name, mean_name = "cifar10.json", "mean.binaryproto"
    outputs = list(lmdbs.values()) + [mean_name]
    _remove_stale_tmps(out_dir, outputs + [json_name, CIFAR10_ARCHIVE, "cifar10_work"])

    kind, src, src_url = _cifar10_source(out_dir, binary, images, url, download)
    base_inputs = {"format_version": FORMAT_VERSION, "calib_size": calib_size, "seed": seed}

    if kind == "binary":
        inputs = dict(kind="binary", md5=expected_md5, **base_inputs)
        # With --download, outputs already made from an archive of this MD5 need no fetch.
        up_to_date = not force and _outputs_complete(out_dir, outputs, json_name, inputs)
        have = os.path.isfile(src) and file_digest(src, "md5")
        if src_url and not up_to_date and have != expected_md5:
            download_file(src_url, src, expected_md5)
        elif not src_url and not have:
            raise DataError(f"{src} does not exist")
        elif not src_url and have != expected_md5:
            raise DataError(f"{src}: MD5 {have} does not match the official "
                            f"cifar-10-binary.tar.gz ({expected_md5}); refusing it "
                            "(re-download it, or pass --md5 for a known other file)")
    else:
        if not os.path.exists(src):
            raise DataError(f"{src} does not exist")
        digest = file_digest(src) if os.path.isfile(src) else _tree_fingerprint(src)
        inputs = dict(kind="images", sha256=digest, **base_inputs)

    if not force:
        summary = _outputs_complete(out_dir, outputs, json_name, inputs)
        if summary:
            return dict(summary, skipped=True)

    # (Re)build. Drop the old summary first: outputs without a JSON are never trusted.
    _remove(os.path.join(out_dir, json_name))
    work = _tmp_name(os.path.join(out_dir, "cifar10_work"))
    tmps = {n: _tmp_name(os.path.join(out_dir, n)) for n in outputs}
    try:
        os.makedirs(work)
        if kind == "binary":
            root = _binary_to_png_tree(src, work)
        elif os.path.isfile(src):
            _safe_extract(src, work, _is_image, desc="extracting")
            root = _find_split_root(work)
        else:
            root = _find_split_root(src)
        lists, classes = _scan_cifar_tree(root)
        train, calib, rng = split_train_calib(lists["train"], calib_size, seed)
        test = [lists["test"][i] for i in rng.permutation(len(lists["test"]))]
        splits = {"train": train, "calib": calib, "test": test}

        summary_splits = {}
        for split, items in splits.items():
            entries, digest, list_digest = _build_lmdb(root, items, tmps[lmdbs[split]],
                                                       desc=f"{split} lmdb")
            counts = collections.Counter(label for _, label in items)
            summary_splits[split] = {
                "lmdb": lmdbs[split], "count": entries,
                "per_class": {classes[c]: counts.get(c, 0) for c in range(len(classes))},
                "list_sha256": list_digest, "lmdb_sha256": digest}
        shape = read_lmdb(tmps[lmdbs["train"]], limit=1)[0].shape[1:]
        if shape != (3, 32, 32):
            raise DataError(f"CIFAR-10 images must be 3x32x32 colour, got {shape}")
        mean = _compute_mean(tmps[lmdbs["train"]], tmps[mean_name])

        for name in outputs:
            _replace(tmps[name], os.path.join(out_dir, name))
        summary = {
            "dataset": "cifar10",
            "inputs": inputs,
            "source": {"kind": kind, "path": src, "url": src_url},
            "classes": classes,
            "datum": "uint8 C x H x W = 3 x 32 x 32, channel order BGR (OpenCV)",
            "channel_order": "BGR",
            "split_rule": (f"train list sorted by path, shuffled with numpy RandomState("
                           f"{seed}); last {calib_size} -> calib, rest -> train; the same "
                           "generator then shuffles the sorted test list"),
            "splits": summary_splits,
            "mean": {"file": mean_name, "from": "train",
                     "per_channel_bgr": [round(float(v), 4) for v in mean.mean(axis=(1, 2))],
                     "sha256": file_digest(os.path.join(out_dir, mean_name))},
            "tools": ["convert_imageset", "compute_image_mean"],
            "elapsed_s": round(time.time() - t0, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        _write_json(os.path.join(out_dir, json_name), summary)
    finally:
        for path in [work] + list(tmps.values()):
            _remove(path)
    return dict(summary, skipped=False)


# ----------------------------------------------------------------------------- ImageNet

def _need_list_file(path, what):
    if not os.path.isfile(path):
        raise DataError(f"{what} {path} does not exist" if not os.path.exists(path)
                        else f"{what} {path} is not a file")


def read_wnids(path):
    """wnid -> class index (line position, counting from 0) of an ilsvrc2012_wnids file."""
    _need_list_file(path, "wnids file")
    index = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                wnid = line.split()[0]
                if wnid in index:
                    raise DataError(f"{path}: wnid {wnid} listed twice")
                index[wnid] = len(index)
    return index


def imagenet_labels(images_dir, listfile=None, wnids=None):
    """[(relpath, label)] sorted by path, from a listfile or from wnid file-name prefixes."""
    items = []
    if listfile:
        _need_list_file(listfile, "list file")
        with open(listfile) as f:
            for n, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                rel, _, label = line.rpartition(" ")
                if not rel or not label.lstrip("-").isdigit():
                    raise DataError(f"{listfile}:{n}: expected 'relative/path label', "
                                    f"got {line!r}")
                if not os.path.isfile(os.path.join(images_dir, rel)):
                    raise DataError(f"{listfile}:{n}: {os.path.join(images_dir, rel)} "
                                    "does not exist")
                items.append((rel, int(label)))
        return items
    index = read_wnids(wnids or os.path.join(shared_data_dir(), "ilsvrc2012_wnids.txt"))
    for dirpath, _, names in os.walk(images_dir, followlinks=True):
        for name in names:
            if not _is_image(name):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), images_dir)
            m = WNID_PREFIX.match(name)
            if not m:
                raise DataError(f"{os.path.join(images_dir, rel)}: file name does not start "
                                "with a wnid (nXXXXXXXX_); give --listfile")
            if m.group(1) not in index:
                raise DataError(f"{os.path.join(images_dir, rel)}: unknown wnid "
                                f"{m.group(1)} (not in the wnids file)")
            items.append((rel, index[m.group(1)]))
    if not items:
        raise DataError(f"{images_dir}: no images")
    return sorted(items)


def prepare_imagenet(images_dir=None, out_dir=None, name=None, listfile=None, wnids=None,
                     resize=256, force=False):
    """Folder of images -> ``<out_dir>/<name>_lmdb`` (resize x resize, BGR), mean, JSON.

    Defaults: the shared ``imagenet-sample-dev`` folder, ``data/imagenet``, and a name made
    from the folder's name. Returns the summary (``skipped`` True when already up to date).
    """
    t0 = time.time()
    if isinstance(resize, bool) or not isinstance(resize, int) or resize < 1:
        raise DataError(f"resize must be a positive number of pixels, got {resize!r}")
    images_dir = os.path.abspath(images_dir or os.path.join(shared_data_dir(),
                                                            "imagenet-sample-dev"))
    if not os.path.isdir(images_dir):
        raise DataError(f"{images_dir} is not a folder of images")
    out_dir = os.path.abspath(out_dir or DEFAULT_IMAGENET_OUT)
    name = name or re.sub(r"\W+", "_", os.path.basename(images_dir.rstrip(os.sep)))
    wnids = os.path.abspath(wnids or os.path.join(shared_data_dir(), "ilsvrc2012_wnids.txt"))
    os.makedirs(out_dir, exist_ok=True)
    db_name, mean_name, json_name = f"{name}_lmdb", "mean.binaryproto", f"{name}.json"
    outputs = [db_name, mean_name]
    _remove_stale_tmps(out_dir, outputs + [json_name])

    items = imagenet_labels(images_dir, listfile, None if listfile else wnids)
    h = hashlib.sha256()
    for rel, label in _progress(items, desc="hashing", unit=" files"):
        h.update(f"{rel}\0{label}\0{file_digest(os.path.join(images_dir, rel))}\n".encode())
    inputs = {"format_version": FORMAT_VERSION, "images_sha256": h.hexdigest(),
              "resize": resize}
    if not force:
        summary = _outputs_complete(out_dir, outputs, json_name, inputs)
        if summary:
            return dict(summary, skipped=True)

    _remove(os.path.join(out_dir, json_name))
    tmps = {n: _tmp_name(os.path.join(out_dir, n)) for n in outputs}
    try:
        entries, digest, list_digest = _build_lmdb(images_dir, items, tmps[db_name],
                                                   desc=f"{name} lmdb", resize=resize)
        mean = _compute_mean(tmps[db_name], tmps[mean_name])
        for n in outputs:
            _replace(tmps[n], os.path.join(out_dir, n))
        counts = collections.Counter(label for _, label in items)
        summary = {
            "dataset": "imagenet",
            "inputs": inputs,
            "source": {"images": images_dir, "listfile": listfile and os.path.abspath(listfile),
                       "wnids": None if listfile else wnids},
            "lmdb": db_name, "count": entries, "num_classes": len(counts),
            "per_class": {str(k): v for k, v in sorted(counts.items())},
            "datum": f"uint8 C x H x W = 3 x {resize} x {resize}, channel order BGR (OpenCV)",
            "channel_order": "BGR",
            "list_sha256": list_digest, "lmdb_sha256": digest,
            "mean": {"file": mean_name, "from": db_name,
                     "per_channel_bgr": [round(float(v), 4) for v in mean.mean(axis=(1, 2))],
                     "sha256": file_digest(os.path.join(out_dir, mean_name))},
            "tools": ["convert_imageset", "compute_image_mean"],
            "elapsed_s": round(time.time() - t0, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        _write_json(os.path.join(out_dir, json_name), summary)
    finally:
        for path in tmps.values():
            _remove(path)
    return dict(summary, skipped=False)


# ----------------------------------------------------------------------------- CLI

def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m dyve.data",
        description="Convert datasets to Caffe LMDBs with convert_imageset and "
                    "compute_image_mean (images stored BGR, uint8 C x H x W).")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("cifar10", help="CIFAR-10 -> train/calib/test LMDBs + train mean",
                       description="CIFAR-10 -> cifar10_{train,calib,test}_lmdb, "
                       "mean.binaryproto (train split only) and cifar10.json. Input "
                       "priority: --binary, --download, --images, then the shared "
                       "cifar10-images.tar.gz ($DYVE_SHARED_DATA or <repo>/../shared/data).")
    c.add_argument("--out", default=DEFAULT_CIFAR10_OUT, help="output folder (default: %(default)s)")
    c.add_argument("--binary", metavar="TGZ", help="official cifar-10-binary.tar.gz")
    c.add_argument("--download", action="store_true", help="download the binary release from --url")
    c.add_argument("--url", default=CIFAR10_URL, help="download address (default: %(default)s)")
    c.add_argument("--md5", default=CIFAR10_MD5,
                   help="expected MD5 of the binary archive (default: the official one, %(default)s)")
    c.add_argument("--images", metavar="DIR_OR_TGZ",
                   help="image tree <split>/<class>/*.jpg, or a .tar.gz of one")
    c.add_argument("--calib-size", type=int, default=5000,
                   help="training images set aside for calibration (default: %(default)s)")
    c.add_argument("--seed", type=int, default=1701, help="split shuffle seed (default: %(default)s)")
    c.add_argument("--force", action="store_true", help="rebuild even if up to date")

    i = sub.add_parser("imagenet", help="folder of ImageNet images -> resized LMDB + mean",
                       description="Images -> <out>/<name>_lmdb resized to --resize square, "
                       "mean.binaryproto and <name>.json. Labels from --listfile or from "
                       "the nXXXXXXXX_ wnid prefix of each file name (index = line in --wnids).")
    i.add_argument("--images", help="image folder (default: the shared imagenet-sample-dev)")
    i.add_argument("--out", default=DEFAULT_IMAGENET_OUT, help="output folder (default: %(default)s)")
    i.add_argument("--name", help="LMDB name prefix (default: from the folder name)")
    i.add_argument("--listfile", help="lines 'relative/path label' (instead of wnid prefixes)")
    i.add_argument("--wnids", help="ilsvrc2012_wnids.txt (default: the shared copy)")
    i.add_argument("--resize", type=int, default=256, help="side in pixels (default: %(default)s)")
    i.add_argument("--force", action="store_true", help="rebuild even if up to date")

    args = parser.parse_args(argv)
    try:
        if args.command == "cifar10":
            summary = prepare_cifar10(args.out, binary=args.binary, images=args.images,
                                      url=args.url, download=args.download,
                                      calib_size=args.calib_size, seed=args.seed,
                                      force=args.force, expected_md5=args.md5.lower())
        else:
            summary = prepare_imagenet(args.images, args.out, name=args.name,
                                       listfile=args.listfile, wnids=args.wnids,
                                       resize=args.resize, force=args.force)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if summary.get("skipped"):
        print(f"up to date (use --force to rebuild): {args.out}", file=sys.stderr)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
