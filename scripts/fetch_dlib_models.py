#!/usr/bin/python3
"""Download Debian's `dlib` source package and take dlib's ImageNet ResNet-34 out of it.

The model `resnet34_1000_imagenet_classifier.dnn` (Davis King's ResNet-34, trained by
dlib's examples/dnn_imagenet_train_ex.cpp) ships in the component tarball
`dlib_19.24+dfsg.orig-dlib-models.tar.bz2` of Debian's source package dlib 19.24+dfsg-1
(bookworm). As scripts/fetch_caffe_source.py does for Caffe, the deb-src entry is derived
from the Debian mirror that the machine's own apt configuration uses (no host name is
written in the repository), put in a private apt configuration under the build directory
and used with `apt-get source --download-only`; the system's apt configuration is left
untouched.

Both the tarball and the model extracted from it are pinned by SHA-256 and checked on
every use (`--verify-only`, and `model_path()` for library use), so a cached copy under
build/ is never trusted blindly.

Exit status: 0 done, 1 a verification failure, 3 the download is impossible (no Debian
mirror in the apt configuration, or apt-get failed); tests skip on 3 only.
"""
import argparse
import hashlib
import os
import subprocess
import sys
import tarfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fetch_caffe_source as apt_src  # noqa: E402  (the deb-src derivation, shared)

PACKAGE = "dlib"
VERSION = "19.24+dfsg-1"
SUITE = "bookworm"
MODELS_TARBALL = "dlib_19.24+dfsg.orig-dlib-models.tar.bz2"
MODELS_SHA256 = "735a840226bbc6e7418b9c8796a979abf1c1cea04b4ee276ca890d8f571453a8"
MODEL_NAME = "resnet34_1000_imagenet_classifier.dnn"
MODEL_SHA256 = "399bbdef8114d0ae69ff6a36810df1f0f9265a237b64da1eeb211da9bf1cc950"
KEYRING = apt_src.KEYRING

EXIT_VERIFY = 1
EXIT_UNAVAILABLE = 3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DEST = os.path.join(ROOT, "build", "src", "dlib")
DEFAULT_MODEL_DIR = os.path.join(ROOT, "build", "resnet34")


class FetchError(Exception):
    def __init__(self, message, status=EXIT_VERIFY):
        super().__init__(message)
        self.status = status


def _check(path, expected, what):
    if not os.path.isfile(path):
        raise FetchError(f"{path} is missing")
    actual = apt_src.sha256_of(path)
    if actual != expected:
        raise FetchError(
            f"SHA-256 mismatch for {what} {path}:\n  expected {expected}\n  got      "
            f"{actual}\nDelete the file and run again; if it persists, the mirror is not a "
            "faithful Debian mirror.")


def download(dest, apt_etc="/etc/apt"):
    """apt-get source --download-only dlib=VERSION into `dest` (private apt config)."""
    dest = os.path.abspath(dest)
    mirror = apt_src.debian_mirror(apt_etc)
    if mirror is None:
        raise FetchError(
            f"cannot derive a deb-src entry: no Debian archive found in {apt_etc}/sources.list"
            f" or {apt_etc}/sources.list.d/*.{{list,sources}}", EXIT_UNAVAILABLE)
    work = os.path.join(dest, "apt")
    for sub in ("lists/partial", "cache/archives/partial", "sources.list.d"):
        os.makedirs(os.path.join(work, sub), exist_ok=True)
    with open(os.path.join(work, "sources.list"), "w") as handle:
        handle.write(f"deb-src [signed-by={KEYRING}] {mirror} {SUITE} main\n")
    options = ["-o", f"Dir::Etc::SourceList={work}/sources.list",
               "-o", f"Dir::Etc::SourceParts={work}/sources.list.d",
               "-o", f"Dir::State::Lists={work}/lists",
               "-o", f"Dir::Cache={work}/cache"]
    print(f"fetch_dlib_models: a private deb-src entry for {SUITE} derived from {apt_etc}",
          flush=True)
    if subprocess.run(["apt-get", *options, "update"]).returncode != 0:
        raise FetchError(f"'apt-get update' with the deb-src entry in {work}/sources.list "
                         "failed", EXIT_UNAVAILABLE)
    if subprocess.run(["apt-get", *options, "source", "--download-only",
                       f"{PACKAGE}={VERSION}"], cwd=dest).returncode != 0:
        raise FetchError(f"'apt-get source --download-only {PACKAGE}={VERSION}' failed; put "
                         f"{MODELS_TARBALL} in {dest} by hand and run again", EXIT_UNAVAILABLE)


def extract(tarball, model_dir):
    """The model file out of the tarball (whatever folder it sits in) into model_dir."""
    os.makedirs(model_dir, exist_ok=True)
    target = os.path.join(model_dir, MODEL_NAME)
    # The model is the archive's first member: stop there, not after 200 MB of bzip2.
    with tarfile.open(tarball, "r|bz2") as tar:
        for member in tar:
            if member.isfile() and os.path.basename(member.name) == MODEL_NAME:
                break
        else:
            raise FetchError(f"{tarball} holds no file named {MODEL_NAME}")
        source = tar.extractfile(member)
        tmp = target + ".part"
        with open(tmp, "wb") as out:
            for block in iter(lambda: source.read(1 << 20), b""):
                out.write(block)
    os.replace(tmp, target)
    return target


def model_path(dest=DEFAULT_DEST, model_dir=DEFAULT_MODEL_DIR, fetch=True,
               apt_etc="/etc/apt"):
    """The verified model file: downloaded and extracted when missing (with `fetch`),
    its tarball and itself checked against the pinned SHA-256 on every call."""
    dest, model_dir = os.path.abspath(dest), os.path.abspath(model_dir)
    tarball = os.path.join(dest, MODELS_TARBALL)
    if not os.path.isfile(tarball):
        if not fetch:
            raise FetchError(f"{tarball} is missing", EXIT_UNAVAILABLE)
        os.makedirs(dest, exist_ok=True)
        download(dest, apt_etc)
    _check(tarball, MODELS_SHA256, "the dlib models tarball")
    target = os.path.join(model_dir, MODEL_NAME)
    if not os.path.isfile(target):
        extract(tarball, model_dir)
    _check(target, MODEL_SHA256, "the model")
    return target


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", default=DEFAULT_DEST,
                        help="folder for the source package files (default %(default)s)")
    parser.add_argument("--model-dir", default=DEFAULT_MODEL_DIR,
                        help="folder the model is extracted to (default %(default)s)")
    parser.add_argument("--apt-etc", default="/etc/apt",
                        help="apt configuration to derive the mirror from")
    parser.add_argument("--verify-only", action="store_true",
                        help="check the cached files only; never download")
    parser.add_argument("--print-sha256", action="store_true",
                        help="print the SHA-256 of the cached tarball and model, unchecked")
    args = parser.parse_args()
    if args.print_sha256:
        for path in (os.path.join(args.dest, MODELS_TARBALL),
                     os.path.join(args.model_dir, MODEL_NAME)):
            if os.path.isfile(path):
                print(apt_src.sha256_of(path), path)
        return 0
    try:
        path = model_path(args.dest, args.model_dir, fetch=not args.verify_only,
                          apt_etc=args.apt_etc)
    except FetchError as error:
        print(f"fetch_dlib_models: error: {error}", file=sys.stderr)
        return error.status
    print(f"fetch_dlib_models: {path} verified ({MODEL_SHA256[:12]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
