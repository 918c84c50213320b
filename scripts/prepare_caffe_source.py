#!/usr/bin/python3
"""Unpack Caffe's Debian source, apply DyVE-Caffe's patches and overlay its sources.

1. `dpkg-source -x` the pinned .dsc (Debian's own patches get applied) into a
   scratch directory;
2. apply caffe_dyve/patches/*.patch in name order (small files we wrote);
3. extend src/caffe/proto/caffe.proto with caffe_dyve/proto/: the fields in
   layer_parameter_fields.proto go at the end of `message LayerParameter`,
   messages.proto is appended;
4. copy the project's new source files (everything else under caffe_dyve/), which
   must not replace any of Caffe's files;
5. sync the result into the build tree, writing only files whose content changed,
   so CMake's dependency tracking rebuilds only what depends on a change.

It also writes `.dyve-overlay-files` (the overlay's file list) only when that list
changes: CMake must be re-run then, because Caffe's CMake globs its sources.
"""
import argparse
import filecmp
import glob
import os
import shutil
import subprocess
import sys

PROTO_PATH = os.path.join("src", "caffe", "proto", "caffe.proto")
NOT_OVERLAID = {"patches", "proto", "README.md"}


def fail(message):
    sys.exit(f"prepare_caffe_source: error: {message}")


def overlay_files(overlay_dir):
    """Relative paths of the files under caffe_dyve/ that are copied into the tree."""
    files = []
    for entry in sorted(os.listdir(overlay_dir)):
        if entry in NOT_OVERLAID:
            continue
        top = os.path.join(overlay_dir, entry)
        if os.path.isfile(top):
            files.append(entry)
            continue
        for root, _dirs, names in os.walk(top):
            for name in names:
                files.append(os.path.relpath(os.path.join(root, name), overlay_dir))
    return sorted(files)


def extend_proto(tree, overlay_dir):
    """Insert the LayerParameter fields and append the new messages to caffe.proto."""
    proto_file = os.path.join(tree, PROTO_PATH)
    with open(proto_file) as handle:
        text = handle.read()
    with open(os.path.join(overlay_dir, "proto", "layer_parameter_fields.proto")) as handle:
        fields = handle.read()
    with open(os.path.join(overlay_dir, "proto", "messages.proto")) as handle:
        messages = handle.read()
    start = text.find("\nmessage LayerParameter {")
    if start < 0:
        fail(f"{PROTO_PATH} has no 'message LayerParameter'; is this Caffe's source?")
    # The message ends at the first closing brace at the start of a line.
    end = text.find("\n}\n", start)
    if end < 0:
        fail(f"cannot find the end of 'message LayerParameter' in {PROTO_PATH}")
    text = text[:end + 1] + fields + text[end + 1:] + messages
    with open(proto_file, "w") as handle:
        handle.write(text)


def sync_tree(source, dest, previous_overlay, overlay):
    """Make dest equal to source, touching only files whose content differs."""
    changed = 0
    for root, _dirs, names in os.walk(source):
        rel_root = os.path.relpath(root, source)
        os.makedirs(os.path.join(dest, rel_root), exist_ok=True)
        for name in names:
            src = os.path.join(root, name)
            dst = os.path.join(dest, rel_root, name)
            if os.path.islink(src):
                continue
            if os.path.exists(dst) and filecmp.cmp(src, dst, shallow=False):
                continue
            shutil.copyfile(src, dst + ".tmp")
            shutil.copymode(src, dst + ".tmp")
            os.replace(dst + ".tmp", dst)
            changed += 1
    # Files the overlay used to add but no longer does.
    for rel in sorted(set(previous_overlay) - set(overlay)):
        stale = os.path.join(dest, rel)
        if os.path.exists(stale):
            os.remove(stale)
            changed += 1
    return changed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsc", required=True, help="the caffe .dsc downloaded by fetch_caffe_source.py")
    parser.add_argument("--tree", required=True, help="the prepared source tree (build/caffe-src)")
    parser.add_argument("--overlay", required=True, help="the project's caffe_dyve/ directory")
    args = parser.parse_args()

    tree = os.path.abspath(args.tree)
    overlay_dir = os.path.abspath(args.overlay)
    scratch = tree + ".new"
    shutil.rmtree(scratch, ignore_errors=True)
    result = subprocess.run(["dpkg-source", "--no-check", "-x", os.path.abspath(args.dsc), scratch],
                            stdout=subprocess.DEVNULL)
    if result.returncode != 0:
        fail(f"dpkg-source -x {args.dsc} failed; delete {os.path.dirname(args.dsc)} and run make again")
    # dpkg-source leaves a copy of the orig tarball beside the unpacked tree.
    if os.path.dirname(scratch) != os.path.dirname(os.path.abspath(args.dsc)):
        for copied in glob.glob(os.path.join(os.path.dirname(scratch), "*.orig.tar.*")):
            os.remove(copied)

    patches_dir = os.path.join(overlay_dir, "patches")
    for name in sorted(os.listdir(patches_dir)):
        if not name.endswith(".patch"):
            continue
        result = subprocess.run(["patch", "-p1", "--forward", "--batch", "--no-backup-if-mismatch",
                                 "-s", "-d", scratch, "-i", os.path.join(patches_dir, name)])
        if result.returncode != 0:
            fail(f"patch {name} does not apply to Caffe's source; fix caffe_dyve/patches/{name}")

    extend_proto(scratch, overlay_dir)

    overlay = overlay_files(overlay_dir)
    for rel in overlay:
        dst = os.path.join(scratch, rel)
        if os.path.exists(dst):
            fail(f"caffe_dyve/{rel} would replace Caffe's own {rel}; change Caffe's files"
                 " with a patch in caffe_dyve/patches/ instead")
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(os.path.join(overlay_dir, rel), dst)

    list_file = os.path.join(tree, ".dyve-overlay-files")
    previous = []
    if os.path.exists(list_file):
        with open(list_file) as handle:
            previous = handle.read().split()
    changed = sync_tree(scratch, tree, previous, overlay)
    shutil.rmtree(scratch)
    if previous != overlay:
        with open(list_file + ".tmp", "w") as handle:
            handle.write("\n".join(overlay) + "\n")
        os.replace(list_file + ".tmp", list_file)
    print(f"prepare_caffe_source: {tree} ready ({changed} files updated, {len(overlay)} overlaid)")


if __name__ == "__main__":
    main()
