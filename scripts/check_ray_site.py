"""Checks build/ray-site (`make ray-site`): Ray's pinned dependencies are consistent
(`pip check`, restricted to the packages installed there: Debian's own unrelated
complaints are not ours), and Ray imports beside Debian's numpy and protobuf, which
must still be Debian's (the ones pycaffe is built and tested against)."""
import argparse
import os
import re
import subprocess
import sys


def normalize(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--site", required=True, help="the --target folder (build/ray-site)")
    parser.add_argument("--requirements", required=True, help="scripts/ray_requirements.txt")
    args = parser.parse_args(argv)
    ours = set()
    with open(args.requirements) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                ours.add(normalize(re.split(r"[=<>!~ ]", line, 1)[0]))
    for banned in ("numpy", "protobuf"):
        if banned in ours:
            sys.exit(f"{args.requirements}: {banned} must come from Debian, not be pinned")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [args.site] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    check = subprocess.run([sys.executable, "-m", "pip", "check",
                            "--disable-pip-version-check"], env=env, capture_output=True,
                           text=True)
    bad = [line for line in check.stdout.splitlines()
           if line.split() and normalize(line.split()[0]) in ours]
    if bad:
        sys.exit("pip check, on build/ray-site's packages:\n" + "\n".join(bad))
    probe = ("import numpy, google.protobuf, ray, caffe; "
             "print(ray.__version__, numpy.__version__, google.protobuf.__version__, "
             "numpy.__file__, google.protobuf.__file__, ray.__file__)")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                         text=True)
    if out.returncode:
        sys.exit(f"importing ray beside pycaffe failed:\n{out.stderr}")
    ray_v, np_v, pb_v, np_file, pb_file, ray_file = out.stdout.split()
    for what, path in (("numpy", np_file), ("protobuf", pb_file)):
        if path.startswith(os.path.abspath(args.site)):
            sys.exit(f"{what} was imported from {path}: it must stay Debian's")
    print(f"ray-site: ray {ray_v} ({os.path.dirname(ray_file)}) with Debian's numpy {np_v} "
          f"and protobuf {pb_v}; pip check clean for {len(ours)} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
