"""Shared pytest set-up: quiet Caffe logs and the project's python/ on sys.path.

`make test` runs pytest with Debian's /usr/bin/python3 and PYTHONPATH set to pycaffe
and python/ (see the Makefile); this keeps a bare `pytest tests/` working from the repo
root with the same environment.
"""
import os
import sys

os.environ.setdefault("GLOG_minloglevel", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (os.path.join(REPO, "python"), os.path.join(REPO, "build", "caffe-src", "python")):
    if path not in sys.path:
        sys.path.insert(0, path)
