"""The CIFAR-10 training schedules and their Caffe solvers.

One map, SCHEDULES: gen_prototxt writes each schedule's solver files to prototxt/ and
dyve.train runs them (its `--schedule` picks one per net).
"""
from caffe.proto import caffe_pb2

# Caffe's examples/cifar10 schedules, by name: stage 0 is <name>_solver.prototxt, stage
# k > 0 is <name>_solver_lr<k>.prototxt, resumed from the previous stage's snapshot
# (train_quick.sh / train_full.sh; dyve.train runs them). Per schedule: the net it trains,
# the `python3 -m dyve.train --schedule` value that picks it ("full" = Caffe's recipe,
# "short" = ours), whether it is the net's default, and per stage: (base_lr, max_iter,
# snapshot, HDF5 snapshots); max_iter counts from iteration 0, so a stage runs max_iter
# minus the previous stage's max_iter iterations.
SCHEDULES = {
    "cifar10_quick": dict(net="cifar10_quick", option="full", default=True,
                          test_interval=500, display=100,
                          stages=[(0.001, 4000, 4000, False), (0.0001, 5000, 5000, True)]),
    "cifar10_full": dict(net="cifar10_full", option="full", default=False,
                         test_interval=1000, display=200,
                         stages=[(0.001, 60000, 10000, True), (0.0001, 65000, 5000, True),
                                 (0.00001, 70000, 5000, True)]),
    # Ours, not Caffe's, and the default for cifar10_full: the original 70,000 iterations
    # take about 6 hours on the 2-core machine this project is trained on, shared with
    # other jobs. This is the original at a tenth of its length, its last two stages
    # merged: 6,000 iterations at lr 0.001, then 1,000 at 0.0001 (15.6 epochs of the 45,000
    # training images); momentum, decay, seed, test/display intervals and HDF5 snapshots as
    # in the full recipe. Chosen from a first 3,500 + 500 run there (2 OpenBLAS threads):
    # 3.3 it/s on average, tests included, 20.6 min, but only 68.3% top-1, below
    # cifar10_quick; 7,000 iterations at that rate fit the 40-minute budget. It took 34.7
    # min (1.3-5 it/s as the load varied) for 72.7% (models/cifar10_full.md). The lr 1e-5
    # stage is dropped: at this length there is nothing left for it to refine.
    "cifar10_full_short": dict(net="cifar10_full", option="short", default=True,
                               test_interval=1000, display=200,
                               stages=[(0.001, 6000, 6000, True),
                                       (0.0001, 7000, 7000, True)]),
}
NETS = tuple(dict.fromkeys(recipe["net"] for recipe in SCHEDULES.values()))
OPTIONS = tuple(dict.fromkeys(recipe["option"] for recipe in SCHEDULES.values()))
RANDOM_SEED = 1704  # fixed so that runs are repeatable
# Where `caffe train` writes snapshots: git-ignored build/ (Caffe does not create the
# directory; dyve.train does). Only the final weights are copied to models/.
SNAPSHOT_PREFIX = "build/train/{schedule}"


def _recipe(schedule):
    if schedule not in SCHEDULES:
        raise ValueError(f"no CIFAR-10 solver recipe for {schedule!r}; known: "
                         f"{', '.join(SCHEDULES)}")
    return SCHEDULES[schedule]


def schedule_net(schedule):
    """The net trained by the schedule `schedule` (a key of SCHEDULES)."""
    return _recipe(schedule)["net"]


def pick(net, option=None):
    """The schedule (a key of SCHEDULES) that `--schedule option` picks for `net`; option
    None picks the net's default. Raises ValueError for a net or option without one."""
    found = {recipe["option"]: name for name, recipe in SCHEDULES.items()
             if recipe["net"] == net}
    if not found:
        raise ValueError(f"no CIFAR-10 schedule trains {net!r}; known: {', '.join(NETS)}")
    if option is None:
        (default,) = [name for name in found.values() if SCHEDULES[name]["default"]]
        return default
    if option not in found:
        raise ValueError(f"{net} has no '{option}' schedule (one of: {', '.join(found)})")
    return found[option]


def stage_files(schedule):
    """[(file name in prototxt/, SolverParameter)] of the stages of `schedule`."""
    return [(solver_file(schedule, stage), cifar10_solver(schedule, stage))
            for stage in range(len(_recipe(schedule)["stages"]))]


def cifar10_solver(schedule, stage=0, net="prototxt/{net}_train_val.prototxt",
                   snapshot_prefix=SNAPSHOT_PREFIX, random_seed=RANDOM_SEED,
                   solver_mode="CPU"):
    """SolverParameter of stage `stage` of the CIFAR-10 schedule `schedule` (a key of
    SCHEDULES: "cifar10_quick" and "cifar10_full" are Caffe's examples/cifar10 recipes,
    stage 0 = cifar10_*_solver.prototxt, 1 = *_solver_lr1, 2 = *_solver_lr2;
    "cifar10_full_short" is our shortened recipe for the full net): test_iter 100 (10,000
    test images / batch 100), momentum 0.9, weight_decay 0.004, lr_policy "fixed", and the
    stage's base_lr, max_iter, snapshot interval and snapshot format.

    Differences from the originals: paths (`net`, `snapshot_prefix`; "{net}" is replaced by
    the trained net's name and "{schedule}" by `schedule`, relative to the repository root;
    the snapshot directory must exist), a fixed `random_seed`, and solver_mode CPU by
    default (this Caffe is built CPU_ONLY; `caffe train --gpu 0` still selects the GPU).
    """
    recipe = _recipe(schedule)
    net_name = recipe["net"]
    if not 0 <= stage < len(recipe["stages"]):
        raise ValueError(f"{schedule} has stages 0..{len(recipe['stages']) - 1}, not {stage}")
    base_lr, max_iter, snapshot, hdf5 = recipe["stages"][stage]
    solver = caffe_pb2.SolverParameter()
    solver.net = net.format(net=net_name, schedule=schedule)
    solver.test_iter.append(100)
    solver.test_interval = recipe["test_interval"]
    solver.base_lr = base_lr
    solver.momentum = 0.9
    solver.weight_decay = 0.004
    solver.lr_policy = "fixed"
    solver.display = recipe["display"]
    solver.max_iter = max_iter
    solver.snapshot = snapshot
    if hdf5:
        solver.snapshot_format = caffe_pb2.SolverParameter.HDF5
    solver.snapshot_prefix = snapshot_prefix.format(net=net_name, schedule=schedule)
    solver.solver_mode = caffe_pb2.SolverParameter.SolverMode.Value(solver_mode)
    solver.random_seed = random_seed
    return solver


def solver_file(schedule, stage):
    """File name (in prototxt/) of stage `stage` of `schedule`, as gen_prototxt writes it."""
    return f"{schedule}_solver{f'_lr{stage}' if stage else ''}.prototxt"
