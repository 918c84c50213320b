"""Train the CIFAR-10 nets with Caffe's own solver; write the weights and their record to models/.

    /usr/bin/python3 -m dyve.train cifar10_quick [--threads 2]
    /usr/bin/python3 -m dyve.train cifar10_full [--schedule full]

Runs ``caffe train`` stage by stage, as Caffe's examples/cifar10/train_quick.sh and
train_full.sh do: stage 0 with ``prototxt/<schedule>_solver.prototxt``, then each
``<schedule>_solver_lr<k>.prototxt`` resumed (``--snapshot``) from the previous stage's
solver state. The solvers (generated from dyve/solvers.py) fix the random seed and snapshot
into the git-ignored ``build/train/``. Every command runs from the repository root (the
prototxts' paths are relative to it) with OPENBLAS_NUM_THREADS set explicitly.

Afterwards the final weights are written to ``models/<net>.caffemodel`` (binary proto, as
``caffe train`` writes without ``snapshot_format: HDF5``), the test-set top-1 is measured
with ``caffe test`` (100 batches of 100 = all 10,000 test images) on the stock net and on
its DyVE form (all knobs off, must agree), and ``models/<net>.json`` and ``models/<net>.md``
record the command, schedule, timings, machine and results. Intermediate snapshots are
deleted unless ``--keep-snapshots``. Progress (Caffe's iteration and test lines) goes to
stdout; Caffe's whole log to ``build/train/<net>.caffe.log``.

Schedules: ``cifar10_quick`` = Caffe's 4,000 + 1,000 iterations; ``cifar10_full`` defaults
to our shortened ``cifar10_full_short`` (6,000 + 1,000, see SCHEDULES in solvers.py);
``--schedule full`` runs Caffe's 60,000 + 5,000 + 5,000.
"""
import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time

# Quiet pycaffe's own net-init log (nets imports caffe); the caffe subprocesses get their
# full INFO log back in caffe_env.
os.environ.setdefault("GLOG_minloglevel", "2")

from dyve import data, files, nets, solvers  # noqa: E402
from dyve.errors import DyveError  # noqa: E402
from dyve.tools import REPO_ROOT, caffe_tool  # noqa: E402

NETS = solvers.NETS  # the nets with a schedule (solvers.SCHEDULES, also for --schedule)
WORK_DIR = os.path.join("build", "train")  # relative to REPO_ROOT, git-ignored
MODELS_DIR = "models"
TEST_ITERATIONS = 100  # x test batch 100 = the 10,000 CIFAR-10 test images

# Caffe log lines worth showing while training (the rest goes to the log only).
_PROGRESS = re.compile(r"Iteration \d+|Test net output|Train net output|Snapshotting|"
                       r"Optimization Done|Restoring|Check failed|Error|error")
_TRAIN_LOSS = re.compile(r"Iteration (\d+).*, loss = ([-+0-9.eE]+|nan|inf)")
_TEST_OUTPUT = re.compile(r"\] (\w+) = ([-+0-9.eE]+)(?: \(|$)")


class TrainError(DyveError):
    """A failed Caffe step, with a message for the user."""


def cpu_model():
    """The CPU's model name as /proc/cpuinfo gives it (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _f(value):
    """A float32 proto field as the decimal it was written as (0.9, not 0.899999976)."""
    return float(f"{value:.7g}")


def caffe_env(threads):
    env = dict(os.environ)
    env["OPENBLAS_NUM_THREADS"] = str(threads)
    env["OMP_NUM_THREADS"] = str(threads)
    # Log to the pipe only: no per-run glog files piling up in /tmp.
    env["GLOG_logtostderr"] = "1"
    env.pop("GLOG_minloglevel", None)  # the result lines are INFO
    return env


def run_caffe(args, threads, log, show=True):
    """Run `caffe <args>` from the repository root; every output line goes to `log` (an
    open file) and the progress lines to stdout. Returns the output lines."""
    cmd = [caffe_tool("caffe")] + list(args)
    log.write(f"$ OPENBLAS_NUM_THREADS={threads} {' '.join(map(shlex.quote, cmd))}\n")
    log.flush()
    lines = []
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=caffe_env(threads), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    with proc:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            log.write(line)
            if show and _PROGRESS.search(line):
                print(line.rstrip("\n"), flush=True)
    log.flush()
    if proc.returncode != 0:
        tail = "\n".join(lines[-20:])
        raise TrainError(f"caffe {args[0]} failed (exit {proc.returncode}):\n{tail}")
    return lines


def last_train_loss(lines):
    """(iteration, loss) of the solver's last "Iteration N, loss = X" display line."""
    found = None
    for line in lines:
        m = _TRAIN_LOSS.search(line)
        if m:
            found = (int(m.group(1)), float(m.group(2)))
    if found is None:
        raise TrainError("no 'Iteration N, loss = X' line in caffe train's output")
    return found


def test_outputs(lines):
    """{output: value} of `caffe test`'s final summary (the lines after 'Loss:')."""
    for i, line in enumerate(lines):
        if re.search(r"\] Loss: ", line):
            out = {}
            for rest in lines[i + 1:]:
                m = _TEST_OUTPUT.search(rest)
                if m:
                    out[m.group(1)] = float(m.group(2))
            return out
    raise TrainError("no summary ('Loss: ...') in caffe test's output")


def load_solver(path):
    from caffe.proto import caffe_pb2
    from google.protobuf import text_format
    solver = caffe_pb2.SolverParameter()
    with open(os.path.join(REPO_ROOT, path)) as f:
        text_format.Merge(f.read(), solver)
    return solver


def snapshot_path(solver, kind):
    """Path (relative to the root) of the snapshot `caffe train` writes at its last
    iteration: kind "caffemodel" or "solverstate", ".h5" with HDF5 snapshots."""
    from caffe.proto import caffe_pb2
    path = f"{solver.snapshot_prefix}_iter_{solver.max_iter}.{kind}"
    if solver.snapshot_format == caffe_pb2.SolverParameter.HDF5:
        path += ".h5"
    return path


def stage_solvers(schedule):
    """[(file, SolverParameter)] of the schedule's stages, read from prototxt/ and checked
    against the generator so a stale file cannot train something else than recorded."""
    stages = []
    for fname, expected in solvers.stage_files(schedule):
        path = os.path.join("prototxt", fname)
        if not os.path.exists(os.path.join(REPO_ROOT, path)):
            raise TrainError(f"{path} is missing; run 'python3 -m dyve.gen_prototxt'")
        solver = load_solver(path)
        if solver != expected:
            raise TrainError(f"{path} differs from dyve.solvers; run "
                             f"'python3 -m dyve.gen_prototxt'")
        stages.append((path, solver))
    return stages


def to_binary_caffemodel(weights, net_prototxt, out):
    """Write `weights` (a .caffemodel or .caffemodel.h5 snapshot) to `out` as a binary
    NetParameter, the form Caffe's non-HDF5 snapshots and the Model Zoo use. HDF5 is
    converted by loading it into the TRAIN net (what Solver snapshots) and Net::save."""
    if not weights.endswith(".h5"):
        with open(os.path.join(REPO_ROOT, weights), "rb") as f:
            files.write_atomic(out, f.read())
        return
    import caffe
    caffe.set_mode_cpu()
    net = caffe.Net(os.path.join(REPO_ROOT, net_prototxt), caffe.TRAIN,
                    weights=os.path.join(REPO_ROOT, weights))
    with files.atomic_path(out) as tmp:
        net.save(tmp)


def remove_snapshots(stages):
    """Delete the snapshots written by the solvers of `stages` ([(path, SolverParameter)]),
    any iteration, either format."""
    for _, solver in stages:
        directory, prefix = os.path.split(os.path.join(REPO_ROOT, solver.snapshot_prefix))
        if not os.path.isdir(directory):
            continue
        pattern = re.compile(re.escape(prefix) + r"_iter_\d+\.(caffemodel|solverstate)(\.h5)?$")
        for entry in os.listdir(directory):
            if pattern.match(entry):
                os.remove(os.path.join(directory, entry))


def format_readme(facts):
    """models/<net>.md: the facts of the JSON for a reader."""
    stages = "\n".join(
        f"| {s['stage']} | `{s['solver']}` | {s['base_lr']:g} | {s['first_iter']}-{s['max_iter']}"
        f" ({s['iterations']}) | {s['resumed_from'] or '-'} | {s['wall_s'] / 60:.1f} min |"
        for s in facts["stages"])
    acc = facts["test"]
    return f"""# {facts['net']} (CIFAR-10)

Weights `models/{facts['net']}.caffemodel` (binary NetParameter, sha256 `{facts['caffemodel_sha256']}`),
trained with Caffe's own solver by `python/dyve/train.py`. This file and
`models/{facts['net']}.json` are written by that tool; do not edit.

- Command: `{facts['command']}` (from the repository root)
- Net: `{facts['train_val']}`; schedule `{facts['schedule']}` ({facts['schedule_note']})
- Solver: SGD, momentum {facts['momentum']}, weight decay {facts['weight_decay']}, batch {facts['batch_size']}, random_seed {facts['random_seed']}
- Data: `{facts['data']['train']}` ({facts['data']['train_images']} images), mean `{facts['data']['mean']}`
- Machine: {facts['cpu_model']} ({facts['cpu_count']} cores visible), OPENBLAS_NUM_THREADS={facts['threads']}, CPU mode
- Wall time: {facts['wall_s'] / 60:.1f} min in all, {facts['train_wall_s'] / 60:.1f} min of it in `caffe train` (the rest: writing the model, two `caffe test` runs); finished {facts['finished']}

| stage | solver | lr | iterations | resumed from | wall |
|---|---|---|---|---|---|
{stages}

Final train loss (iteration {facts['final_train_loss_iter']}, one batch): {facts['final_train_loss']:.4f}

Test top-1 on all {acc['images']} test images (`{acc['command_stock']}`):

| form | prototxt | top-1 |
|---|---|---|
| stock | `{acc['stock_model']}` | {acc['top1_stock']:.4f} |
| DyVE, all knobs off | `{acc['dyve_model']}` | {acc['top1_dyve']:.4f} |
"""


def train(net, schedule_key=None, threads=2, keep_snapshots=False, argv=None):
    """Train `net` on its schedule, write models/<net>.{caffemodel,json,md}; returns the
    facts dict."""
    started = time.time()
    try:
        schedule = solvers.pick(net, schedule_key)
    except ValueError as error:
        raise TrainError(str(error)) from None
    plan = stage_solvers(schedule)
    work_dir = os.path.join(REPO_ROOT, WORK_DIR)
    os.makedirs(work_dir, exist_ok=True)  # Caffe does not create the snapshot directory
    for _, solver in plan:
        os.makedirs(os.path.dirname(os.path.join(REPO_ROOT, solver.snapshot_prefix)),
                    exist_ok=True)
    # Old snapshots of an earlier run would be resumed from by mistake.
    remove_snapshots(plan)
    log_path = os.path.join(work_dir, f"{net}.caffe.log")
    stages, lines, previous = [], [], None
    with open(log_path, "w", buffering=1) as log:  # line-buffered: tail -f works
        for stage, (path, solver) in enumerate(plan):
            args = ["train", f"--solver={path}"]
            if previous is not None:
                args.append(f"--snapshot={snapshot_path(previous, 'solverstate')}")
            first = previous.max_iter if previous is not None else 0
            print(f"== {net} stage {stage}: {path}, lr {solver.base_lr:g}, iterations "
                  f"{first}-{solver.max_iter}", flush=True)
            t0 = time.time()
            lines = run_caffe(args, threads, log)
            stages.append(dict(stage=stage, solver=path, base_lr=_f(solver.base_lr),
                               first_iter=first, max_iter=solver.max_iter,
                               iterations=solver.max_iter - first,
                               resumed_from=(snapshot_path(previous, "solverstate")
                                             if previous is not None else None),
                               wall_s=round(time.time() - t0, 1)))
            previous = solver
        loss_iter, loss = last_train_loss(lines)
        train_wall = time.time() - started

        net_prototxt = f"prototxt/{net}_train_val.prototxt"
        dyve_prototxt = f"prototxt/{net}_dyve_train_val.prototxt"
        final = snapshot_path(previous, "caffemodel")
        model = os.path.join(MODELS_DIR, f"{net}.caffemodel")
        to_binary_caffemodel(final, net_prototxt, os.path.join(REPO_ROOT, model))
        print(f"== wrote {model}", flush=True)

        top1 = {}
        commands = {}
        for form, prototxt in (("stock", net_prototxt), ("dyve", dyve_prototxt)):
            args = ["test", "-model", prototxt, "-weights", model,
                    "-iterations", str(TEST_ITERATIONS)]
            commands[form] = "caffe " + " ".join(args)
            print(f"== {commands[form]}", flush=True)
            out = test_outputs(run_caffe(args, threads, log, show=False))
            top1[form] = out["accuracy"]
            print(f"   top-1 = {top1[form]:.4f}", flush=True)
    if not keep_snapshots:
        remove_snapshots(plan)

    base = solvers.cifar10_solver(schedule, 0)
    train_val = nets.build(net, "train_val")
    batch_size = train_val.layer[0].data_param.batch_size
    data_json = os.path.join(REPO_ROOT, "data", "cifar10", "cifar10.json")
    train_images, data_sha = None, None
    if os.path.exists(data_json):  # written by dyve.data; records what the LMDBs hold
        with open(data_json) as f:
            info = json.load(f)
        train_images = info["splits"]["train"]["count"]
        data_sha = info["splits"]["train"].get("lmdb_sha256")
    command = "OPENBLAS_NUM_THREADS={} python3 -m dyve.train {}".format(
        threads, " ".join(map(shlex.quote, argv if argv is not None else [net])))
    facts = dict(
        net=net,
        command=command,
        schedule=schedule,
        schedule_note=("Caffe's original recipe"
                       if solvers.SCHEDULES[schedule]["option"] == "full"
                       else "shortened; see SCHEDULES in python/dyve/solvers.py"),
        train_val=net_prototxt,
        solvers=[s["solver"] for s in stages],
        random_seed=base.random_seed,
        momentum=_f(base.momentum),
        weight_decay=_f(base.weight_decay),
        batch_size=batch_size,
        stages=stages,
        total_iterations=previous.max_iter,
        threads=threads,
        cpu_model=cpu_model(),
        cpu_count=os.cpu_count(),
        data=dict(train=train_val.layer[0].data_param.source,
                  test=train_val.layer[1].data_param.source,
                  mean=train_val.layer[0].transform_param.mean_file,
                  train_images=train_images, train_lmdb_sha256=data_sha),
        final_train_loss=loss,
        final_train_loss_iter=loss_iter,
        train_wall_s=round(train_wall, 1),
        wall_s=round(time.time() - started, 1),
        finished=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        caffemodel=model,
        caffemodel_sha256=data.file_digest(os.path.join(REPO_ROOT, model)),
        test=dict(images=TEST_ITERATIONS * train_val.layer[1].data_param.batch_size,
                  iterations=TEST_ITERATIONS,
                  stock_model=net_prototxt, dyve_model=dyve_prototxt,
                  command_stock=commands["stock"], command_dyve=commands["dyve"],
                  top1_stock=top1["stock"], top1_dyve=top1["dyve"]),
    )
    files.write_atomic(os.path.join(REPO_ROOT, MODELS_DIR, f"{net}.json"),
                 json.dumps(facts, indent=2) + "\n")
    files.write_atomic(os.path.join(REPO_ROOT, MODELS_DIR, f"{net}.md"), format_readme(facts))
    print(f"== wrote {MODELS_DIR}/{net}.json and {MODELS_DIR}/{net}.md", flush=True)
    if top1["stock"] != top1["dyve"]:
        raise TrainError(f"DyVE form (all knobs off) gives top-1 {top1['dyve']} but the stock "
                         f"net {top1['stock']}: they must agree")
    return facts


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python3 -m dyve.train", description=__doc__.split("\n\n")[0],
        epilog="Writes models/<net>.caffemodel, .json, .md; logs and snapshots go to "
               "build/train/.")
    parser.add_argument("net", choices=NETS)
    parser.add_argument("--threads", type=int, default=2,
                        help="OPENBLAS_NUM_THREADS for caffe (default 2)")
    parser.add_argument("--schedule", choices=solvers.OPTIONS, default=None,
                        help="'full' = Caffe's original recipe; 'short' = our shortened one "
                             "(cifar10_full only). Default: full for cifar10_quick, short "
                             "for cifar10_full")
    parser.add_argument("--keep-snapshots", action="store_true",
                        help="keep the snapshots and solver states in build/train/")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    try:
        facts = train(args.net, args.schedule, args.threads, args.keep_snapshots, argv)
    except TrainError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{args.net}: test top-1 {facts['test']['top1_stock']:.4f} (stock), "
          f"{facts['test']['top1_dyve']:.4f} (DyVE), {facts['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
