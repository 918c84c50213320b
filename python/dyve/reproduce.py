"""The main job (`make reproduce`): tune and measure DyVE nets against stock Caffe.

1. CIFAR-10 (`cifar10_quick`, `cifar10_full`): the committed weights (models/), tuned by
   `dyve.tune` twice: the certified protocol (a label-free search on training images, the
   calibration split certifying) and the paper's (5 % of the test set tunes); each measured
   by `dyve.bench` against stock Caffe (and OpenCV dnn) on its report images (the whole
   test set, or the paper's other 95 %), and both protocols' frontiers (dyve.frontier).
2. ImageNet nets (AlexNet, OverFeat fast/accurate, VGG-16), in the form the world allows:
   * with `--weights-dir` (WEIGHTS_DIR) holding `<net>.caffemodel` and `--imagenet-dir`
     (IMAGENET_DIR) holding labelled photos (wnid file-name prefixes): measured on those
     photos; tuned first on `--imagenet-calib-dir` (IMAGENET_CALIB_DIR, photos that are not
     the measured ones, e.g. from the training set) when it is given;
   * otherwise the stock and DyVE forms, every knob off, are timed with filler weights on
     a few batches of the shared ImageNet photos, with no accuracy column; the row says
     "no weights: dense-path overhead only".
3. With `--resnet34` (RESNET34=1): dlib's ImageNet ResNet-34, converted and measured
   (dyve.resnet34, docs/resnet34.md); off by default, it takes about 25 min alone.
4. Writes reports/<net>/ (summary.json, summary.md, plots, tune/, frontier.json/.png),
   reports/<net>_paper/ and reports/summary.md, and prints the paper-style table.
"""
import argparse
import os
import subprocess
import sys
import time

from dyve import data, paper_protocol, tune
from dyve.tools import REPO_ROOT

CIFAR10_NETS = ("cifar10_quick", "cifar10_full")
IMAGENET_NETS = ("alexnet", "overfeat_fast", "overfeat_accurate", "vgg16")


def repo_path(*parts):
    return os.path.join(REPO_ROOT, *parts)


def run_bench(args):
    """dyve.bench in its own process (it starts one worker per thread count anyway)."""
    command = [sys.executable, "-m", "dyve.bench", *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO_ROOT)


def cifar10(net, options):
    """Both tuning protocols on one CIFAR-10 net, each measured by dyve.bench on its report
    images, and their frontier. Returns the summary.json paths (certified, paper)."""
    weights = repo_path("models", f"{net}.caffemodel")
    if not os.path.exists(weights):
        raise SystemExit(f"reproduce: {weights} is missing; run 'make train-cifar10' to train it")
    cifar = repo_path("data", "cifar10")
    mean = os.path.join(cifar, "mean.binaryproto")
    test, train = (os.path.join(cifar, f"cifar10_{s}_lmdb") for s in ("test", "train"))
    dyve_off = repo_path("prototxt", f"{net}_dyve_deploy.prototxt")
    out_dir = os.path.join(options.out, net)
    paper_dir = os.path.join(options.out, f"{net}_paper")
    tune_dir, paper_tune_dir = os.path.join(out_dir, "tune"), os.path.join(paper_dir, "tune")
    # Certified: a label-free search on training images (none of them the calibration
    # split), every calibration image certifying; never the test set.
    tune.tune(dyve_off, weights, os.path.join(cifar, "cifar10_calib_lmdb"), mean=mean,
              budget=options.budget, knobs=options.knobs, seed=options.seed, out_dir=tune_dir,
              train_val=repo_path("prototxt", f"{net}_dyve_train_val.prototxt"),
              max_images=options.calib_images, search_images=train,
              search_count=None if options.full_search else options.search_images,
              search_budget=options.search_budget, certify=options.certify,
              workers=options.workers)
    # The paper's own protocol: 5 % of the test set tunes, the other 95 % reports.
    paper_protocol.tune_paper(dyve_off, weights, test, train, mean=mean,
                              budget=options.budget, seed=options.seed,
                              out_dir=paper_tune_dir)
    common = ["--weights", weights, "--stock", repo_path("prototxt", f"{net}_deploy.prototxt"),
              "--images", test, "--mean", mean, "--threads", options.threads, "--opencv", "--onnx"]
    if options.test_images:
        common += ["--max-images", str(options.test_images)]
    run_bench(["--net", net, "--protocol", "certified", "--out-dir", out_dir,
               "--dyve", os.path.join(tune_dir, "tuned_deploy.prototxt"), *common])
    run_bench(["--net", net, "--protocol", "paper", "--out-dir", paper_dir,
               "--dyve", os.path.join(paper_tune_dir, "tuned_deploy.prototxt"),
               "--exclude-tuning", os.path.join(paper_tune_dir, "search.json"), *common])
    frontier = [sys.executable, "-m", "dyve.frontier", "--model", dyve_off,
                "--weights", weights, "--images", test, "--mean", mean,
                "--search", f"certified={os.path.join(tune_dir, 'search.json')}",
                "--search", f"paper={os.path.join(paper_tune_dir, 'search.json')}",
                "--out-dir", out_dir, "--title", f"{net}: ops reduction vs top-1 loss",
                "--workers", str(options.workers)]
    if options.test_images:
        frontier += ["--max-images", str(options.test_images)]
    print("+", " ".join(frontier), flush=True)
    subprocess.run(frontier, check=True, cwd=REPO_ROOT)
    return [os.path.join(out_dir, "summary.json"), os.path.join(paper_dir, "summary.json")]


def imagenet_lmdb(images_dir, name):
    """A user's photo folder as a 256x256 LMDB with its mean (skipped when up to date)."""
    out_dir = repo_path("data", "imagenet", name)
    prepared = data.prepare_imagenet(images_dir, out_dir=out_dir, name=name)
    return os.path.join(out_dir, prepared["lmdb"]), os.path.join(out_dir, "mean.binaryproto")


def imagenet(net, options):
    out_dir = os.path.join(options.out, net)
    stock = repo_path("prototxt", f"{net}_deploy.prototxt")
    dyve_off = repo_path("prototxt", f"{net}_dyve_deploy.prototxt")
    weights = os.path.join(options.weights_dir, f"{net}.caffemodel") if options.weights_dir else None
    if weights and os.path.exists(weights) and options.imagenet_dir:
        images, mean = imagenet_lmdb(options.imagenet_dir, "eval")
        dyve = dyve_off
        if options.imagenet_calib_dir:
            # Tuned on the calibration photos, measured on the others.
            calib, calib_mean = imagenet_lmdb(options.imagenet_calib_dir, "calib")
            tune_dir = os.path.join(out_dir, "tune")
            tune.tune(dyve_off, weights, calib, mean=calib_mean, budget=options.budget,
                      knobs=options.knobs, seed=options.seed, out_dir=tune_dir)
            dyve = os.path.join(tune_dir, "tuned_deploy.prototxt")
        else:
            print(f"reproduce: {net}: no IMAGENET_CALIB_DIR, so not tuned; measuring the DyVE "
                  "form with every knob off", flush=True)
        run_bench(["--net", net, "--weights", weights, "--stock", stock, "--dyve", dyve,
                   "--images", images, "--mean", mean, "--threads", options.threads,
                   "--onnx", "--out-dir", out_dir])
        return
    # No weights: the dense path's overhead, timed on one batch of real photos. Most of
    # these rows' time is not in the images timed: with 8 photos and 3 repeats the four
    # took 7.8 min, with 4 and 2 still 7.0.
    run_bench(["--net", net, "--stock", stock, "--dyve", dyve_off,
               "--images", options.imagenet_sample, "--max-images", "4", "--batch", "4",
               "--time-images", "4", "--repeats", "2", "--threads", options.threads,
               "--onnx", "--out-dir", out_dir])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=repo_path("reports"), help="reports folder (default %(default)s)")
    parser.add_argument("--cifar10-nets", default=",".join(CIFAR10_NETS),
                        help="CIFAR-10 nets to tune and measure (default %(default)s)")
    parser.add_argument("--imagenet-nets", default=",".join(IMAGENET_NETS),
                        help="ImageNet nets to measure (default %(default)s; '' for none)")
    parser.add_argument("--weights-dir", default=os.environ.get("WEIGHTS_DIR"),
                        help="folder of <net>.caffemodel for the ImageNet nets (env WEIGHTS_DIR)")
    parser.add_argument("--imagenet-dir", default=os.environ.get("IMAGENET_DIR"),
                        help="labelled ImageNet photos (env IMAGENET_DIR)")
    parser.add_argument("--imagenet-calib-dir", default=os.environ.get("IMAGENET_CALIB_DIR"),
                        help="photos to tune the ImageNet nets on (env IMAGENET_CALIB_DIR)")
    parser.add_argument("--imagenet-sample", default=os.path.join(data.shared_data_dir() or "",
                                                                  "imagenet-sample-dev"),
                        help="photos for the no-weights timing (default: the shared sample)")
    parser.add_argument("--budget", type=float, default=0.5, help="top-1 budget in points (default 0.5)")
    parser.add_argument("--knobs", type=tune._knob_list, default=tune.DEFAULT_KNOBS,
                        help="knobs the tuner may use (default: spet,sdss,sfma)")
    parser.add_argument("--seed", type=int, default=1701)
    parser.add_argument("--calib-images", type=int, help="at most this many calibration images")
    parser.add_argument("--search-images", type=int, default=5000,
                        help="training images the certified protocol's label-free search "
                             "runs on (default %(default)s)")
    parser.add_argument("--full-search", action="store_true",
                        help="search on all 45,000 training images instead (slower)")
    parser.add_argument("--search-budget", type=float, default=3.0,
                        help="disagreement with the dense net the search may reach, points "
                             "(default %(default)s; the calibration images then certify "
                             "--budget)")
    parser.add_argument("--certify", choices=tuple(tune.CERTIFY), default="bound",
                        help="what of the calibration loss the certified protocol holds "
                             "within --budget: its 95 %% UCB (default) or the estimate "
                             "(docs/tuner.md)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="worker processes of the certified tuner's evaluation loop "
                             "and of the frontier's (default: the cores; the same answer "
                             "for any count, docs/parallel.md)")
    parser.add_argument("--test-images", type=int, help="at most this many test images (default all)")
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}", help="OpenBLAS thread counts timed")
    # Opt-in: its tuning alone takes about 15 min on 2 cores, which would break the
    # 30 minutes the CIFAR-10 rows fit in (docs/resnet34.md; `make resnet34` runs it alone).
    parser.add_argument("--resnet34", action="store_true",
                        default=os.environ.get("RESNET34", "") not in ("", "0"),
                        help="add dlib's ResNet-34 row (env RESNET34=1): about 25 min more "
                             "on 2 cores (docs/resnet34.md)")
    options = parser.parse_args(argv)

    started = time.time()
    nets = [n for n in options.cifar10_nets.split(",") if n]
    imagenet_nets = [n for n in options.imagenet_nets.split(",") if n]
    summaries = []
    for net in nets:
        if net not in CIFAR10_NETS:
            parser.error(f"unknown CIFAR-10 net '{net}' (choose from {', '.join(CIFAR10_NETS)})")
        summaries += cifar10(net, options)
    for net in imagenet_nets:
        if net not in IMAGENET_NETS:
            parser.error(f"unknown ImageNet net '{net}' (choose from {', '.join(IMAGENET_NETS)})")
        imagenet(net, options)
    summaries += [os.path.join(options.out, n, "summary.json") for n in imagenet_nets]
    if options.resnet34:
        from dyve import resnet34
        summary = resnet34.reproduce_row(options.out, options.imagenet_sample, options.threads)
        summaries += [summary] if summary else []
    run_bench(["--table", *summaries, "--table-md", os.path.join(options.out, "summary.md")])
    print(f"reproduce: done in {(time.time() - started) / 60:.1f} min; reports in {options.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
