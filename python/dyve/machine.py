"""Facts about the machine a benchmark ran on: CPU, the OpenBLAS this process loaded,
load average and library versions (``summary.json``'s "machine" key, docs/bench.md)."""
import contextlib
import ctypes
import os
import re
import shutil
import subprocess
import sys

import numpy as np


def openblas_info():
    """The libopenblas this process loaded (from /proc/self/maps): path, config string,
    core name and current thread count."""
    paths = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                if "openblas" in os.path.basename(path).lower() and path not in paths:
                    paths.append(path)
    except OSError:
        pass
    paths.sort(key=lambda p: (not os.path.basename(p).startswith("libopenblas"), p))
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
            lib.openblas_get_config.restype = ctypes.c_char_p
            info = {"library": os.path.realpath(path),
                    "config": lib.openblas_get_config().decode(),
                    "threads": int(lib.openblas_get_num_threads())}
            with contextlib.suppress(AttributeError):
                lib.openblas_get_corename.restype = ctypes.c_char_p
                info["corename"] = lib.openblas_get_corename().decode()
            return info
        except (OSError, AttributeError):
            continue
    return {"library": None, "config": None, "threads": None}


def _loadavg():
    with contextlib.suppress(OSError):
        return [float(v) for v in open("/proc/loadavg").read().split()[:3]]
    return None


def machine_facts():
    model = None
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    flags = []
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in ("avx", "avx2", "fma", "avx512f", "avx512_vnni") if f in have]
                break
    if shutil.which("lscpu"):
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
            m = re.search(r"^Model name:\s*(.+)$", out, re.M)
            model = model or (m and m.group(1).strip())
    facts = {"cpu_model": model, "cores": os.cpu_count(), "cpu_flags": flags,
             "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else None,
             "openblas": openblas_info(), "python": sys.version.split()[0],
             "numpy": np.__version__, "loadavg": _loadavg(),
             "env": {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}}
    with contextlib.suppress(ImportError):
        import cv2
        facts["opencv"] = cv2.__version__
    return facts
