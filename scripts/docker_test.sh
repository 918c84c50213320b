#!/bin/bash
# Builds the Docker image and runs the reproduction (`make reproduce`, the image's CMD)
# in it on the shared data, then checks what it left: reports/*/summary.json with a
# summary.md beside each, reports/summary.md with the results table, and the table the
# run printed (dyve.bench's plain-text table and/or markdown tables whose header starts
# with `| benchmark |`): every row with numbers where numbers belong. Prints the image
# size, build time and run time. `make docker-test` runs it; it is not part of `make test`.
#
#   scripts/docker_test.sh                      # build, run, check
#   scripts/docker_test.sh --check REPORTS LOG  # only the checks, on an earlier run
#
# Environment (all optional):
#   DYVE_DOCKER_DATA     data folder mounted read-only at /data (default: ../shared/data
#                        beside the repository, when it exists; without one the container
#                        downloads the official CIFAR-10 release)
#   DYVE_DOCKER_REPORTS  host folder mounted at /opt/dyve-caffe/reports (default: reports/
#                        in a new temporary folder, kept and printed at the end)
#   DYVE_DOCKER_IMAGE    image tag (default: dyve-caffe)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
IMAGE=${DYVE_DOCKER_IMAGE:-dyve-caffe}
OFFLINE=$ROOT/../shared/tools/docker-offline.sh
log() { echo "docker_test: $*"; }
die() { echo "docker_test: error: $*" >&2; exit 1; }

# The checks, on a reports folder and the run's output; exit status 1 when one fails.
check() {
  /usr/bin/python3 - "$1" "$2" <<'EOF'
import glob
import json
import os
import re
import sys

reports, run_log = sys.argv[1:3]
errors = []

# 1. reports/<net>/summary.json (JSON) with summary.md beside it; reports/summary.md.
summaries = sorted(glob.glob(os.path.join(reports, "*", "summary.json")))
if not summaries:
    errors.append(f"no {reports}/*/summary.json")
nets = []
for path in summaries:
    try:
        with open(path) as f:
            nets.append(json.load(f).get("net") or os.path.basename(os.path.dirname(path)))
    except (OSError, ValueError) as e:
        errors.append(f"{path}: not JSON ({e})")
    md = os.path.join(os.path.dirname(path), "summary.md")
    if not os.path.isfile(md) or os.path.getsize(md) == 0:
        errors.append(f"{md} is missing or empty")


def read_lines(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return [re.sub(r"\x1b\[[0-9;]*m", "", line).rstrip("\n") for line in f]


def markdown_tables(lines, where):
    """[(header, rows)] of the tables whose header starts with `| benchmark |`."""
    lines = [line.strip() for line in lines]
    tables, i = [], 0
    while i < len(lines):
        if not lines[i].startswith("| benchmark |"):
            i += 1
            continue
        header = [c.strip() for c in lines[i].strip("|").split("|")]
        if i + 1 >= len(lines) or not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[i + 1]):
            errors.append(f"{where}: table header without a separator line: {lines[i]!r}")
            i += 1
            continue
        rows, i = [], i + 2
        while i < len(lines) and lines[i].startswith("|"):
            rows.append([c.strip() for c in lines[i].strip("|").split("|")])
            i += 1
        tables.append((header, rows))
    return tables


def plain_tables(lines):
    """[(header, rows)] of dyve.bench's plain-text table (after '# dyve.bench table')."""
    tables = []
    for i, line in enumerate(lines):
        if not line.startswith("# dyve.bench table") or i + 1 >= len(lines):
            continue
        header, rows = lines[i + 1].split(), []
        for row in lines[i + 2:]:
            cells = row.split()
            if not cells or row.startswith(("#", "+", "reproduce:")) or row[0].isspace():
                break
            rows.append(cells)
        tables.append((header, rows))
    return tables


NUMBER = re.compile(r"[+-]?\d+(\.\d+)?\s*(%|×|x|pts|ms)?")
DASHES = {"—", "-", "–"}
CHANGE = re.compile(r"[+-]?\d+\.\d+ \[[+-]?\d+\.\d+, [+-]?\d+\.\d+\] pp")  # +0.12 [-0.11, +0.35] pp


def numeric(cell):
    """A number with an optional unit, or several joined by ' / '."""
    return all(NUMBER.fullmatch(part.strip()) for part in cell.split("/"))


def check_rows(where, header, rows):
    """Numbers everywhere but the name columns. '—' is accepted in an OpenCV column, and
    in a net without weights (the no-weights timing row) anywhere but the ops reduction;
    such a row still needs one measured speedup."""
    if not rows:
        errors.append(f"{where}: table '{' '.join(header[:3])} …' has no rows")
    for row in rows:
        if len(row) != len(header):
            errors.append(f"{where}: row {row} has {len(row)} cells, header {len(header)}")
            continue
        cells = dict(zip(header, row))
        label = row[0]
        no_weights = "no weights" in label or cells.get("weights") == "none"
        speedups = 0
        for name, cell in list(cells.items())[1:]:
            lowered = name.lower()
            if name == "weights":
                if cell not in ("yes", "none"):
                    errors.append(f"{where}: {label}: weights is {cell!r}, expected yes or none")
                continue
            if "protocol" in lowered:  # a name: certified, paper, or a dash
                continue
            if "change" in lowered and (cell in DASHES or CHANGE.fullmatch(cell)):
                continue
            if numeric(cell):
                speedups += "speedup" in lowered
                continue
            if cell in DASHES and ("opencv" in lowered
                                   or (no_weights and "ops" not in lowered)):
                continue
            errors.append(f"{where}: {label}: column {name!r} is {cell!r}, expected a number")
        if not any("speedup" in h.lower() for h in header[1:]):
            continue
        if speedups == 0:
            errors.append(f"{where}: {label}: no speedup measured")


# 2. The printed table(s) and reports/summary.md's.
printed = read_lines(run_log)
tables = [("printed", h, r) for h, r in plain_tables(printed)]
tables += [("printed", h, r) for h, r in markdown_tables(printed, "printed")]
if not tables:
    errors.append(f"{run_log}: the run printed no results table (neither '# dyve.bench "
                  "table' nor a markdown table whose header starts with '| benchmark |')")
merged = os.path.join(reports, "summary.md")
if os.path.isfile(merged):
    merged_tables = markdown_tables(read_lines(merged), merged)
    if not merged_tables:
        errors.append(f"{merged} has no table whose header starts with '| benchmark |'")
    tables += [(merged, h, r) for h, r in merged_tables]
else:
    errors.append(f"{merged} is missing")
for where, header, rows in tables:
    check_rows(where, header, rows)
    print(f"docker_test: {where}: table '{' | '.join(header[:3])} …': {len(rows)} row(s)")

# 3. Every net with a report has a row in the results table.
labels = {row[0].split(" (")[0] for _w, _h, rows in tables for row in rows}
for net in nets:
    if net not in labels:
        errors.append(f"{net} has a summary.json but no row in any results table")

if errors:
    print("docker_test: FAILED checks:\n  " + "\n  ".join(errors), file=sys.stderr)
    sys.exit(1)
print(f"docker_test: checks passed: {len(summaries)} report(s) ({', '.join(nets)}), "
      f"{len(tables)} table(s)")
EOF
}

if [ "${1:-}" = "--check" ]; then
  [ $# -eq 3 ] || die "usage: $0 --check REPORTS_DIR RUN_LOG"
  check "$2" "$3"
  exit
fi
[ $# -eq 0 ] || die "usage: $0 [--check REPORTS_DIR RUN_LOG]"

command -v docker >/dev/null 2>&1 || die "no docker client on PATH; install Docker (Debian: apt-get install docker.io)"
if ! docker info >/dev/null 2>&1; then
  if [ -f "$OFFLINE" ]; then
    log "no Docker engine answers; starting one with $OFFLINE"
    bash "$OFFLINE"
  else
    die "no Docker engine answers 'docker info'; start one (e.g. 'systemctl start docker') and rerun"
  fi
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/dyve-docker-test.XXXXXX")
REPORTS=${DYVE_DOCKER_REPORTS:-$WORK/reports}
mkdir -p "$REPORTS"
REPORTS=$(cd "$REPORTS" && pwd)
RUN_LOG=$WORK/run.log
DATA=${DYVE_DOCKER_DATA-$ROOT/../shared/data}
mounts=(-v "$REPORTS:/opt/dyve-caffe/reports")
if [ -n "$DATA" ] && [ -d "$DATA" ]; then
  DATA=$(cd "$DATA" && pwd)
  mounts+=(-v "$DATA:/data:ro")
  log "data: $DATA, mounted read-only at /data"
else
  log "data: no data folder (${DATA:-none given}); the container downloads the official CIFAR-10 release"
fi

log "building image $IMAGE"
build_start=$(date +%s)
docker build --network host -t "$IMAGE" .
build_secs=$(( $(date +%s) - build_start ))
size_mb=$(( $(docker image inspect -f '{{.Size}}' "$IMAGE") / 1000000 ))
log "image $IMAGE built in ${build_secs} s, ${size_mb} MB"

log "running 'make reproduce' in $IMAGE; reports to $REPORTS, output to $RUN_LOG"
run_start=$(date +%s)
set +e
docker run --rm --network host "${mounts[@]}" "$IMAGE" 2>&1 | tee "$RUN_LOG"
run_rc=${PIPESTATUS[0]}
set -e
run_secs=$(( $(date +%s) - run_start ))
[ "$run_rc" -eq 0 ] || die "the container exited with status $run_rc after ${run_secs} s (build ${build_secs} s, image ${size_mb} MB); output in $RUN_LOG"

log "the run took ${run_secs} s; checking the reports in $REPORTS and the printed table"
check "$REPORTS" "$RUN_LOG"

echo
echo "docker_test: OK"
echo "  image:      $IMAGE, ${size_mb} MB"
echo "  build time: ${build_secs} s"
echo "  run time:   ${run_secs} s"
echo "  reports:    $REPORTS"
echo "  output:     $RUN_LOG"
