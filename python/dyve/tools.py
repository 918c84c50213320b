"""Locating the project's Caffe build: command-line tools and paths."""
import os
import shutil

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD_DIR = os.environ.get("DYVE_BUILD_DIR", os.path.join(REPO_ROOT, "build"))
CAFFE_SOURCE_DIR = os.path.join(BUILD_DIR, "caffe-src")
BIN_DIR = os.path.join(BUILD_DIR, "bin")


def caffe_tool(name):
    """Absolute path of a Caffe tool (caffe, convert_imageset, compute_image_mean, ...).

    The project's build/bin comes first, so the patched Caffe is used even when another
    Caffe is on PATH.
    """
    candidate = os.path.join(BIN_DIR, name)
    if os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(
        f"Caffe tool '{name}' not found in {BIN_DIR} nor on PATH; run 'make build' first")


def caffe_source_file(*parts):
    """A file of the unpacked Caffe source tree (e.g. models/bvlc_alexnet/deploy.prototxt)."""
    path = os.path.join(CAFFE_SOURCE_DIR, *parts)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist; run 'make build' to unpack Caffe's source")
    return path
