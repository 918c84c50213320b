#!/usr/bin/python3
"""Download Debian's `caffe` source package, pinned by version and SHA-256.

The package is a bullseye one, but the machine's apt is configured for its own
release.  We derive a bullseye deb-src entry from the Debian mirror that apt is
already using (never a host name written into the repository), put it in a private
apt configuration under the build directory, and run `apt-get source
--download-only` with it.  The system's apt configuration is left untouched.
"""
import argparse
import glob
import hashlib
import os
import re
import subprocess
import sys

PACKAGE = "caffe"
VERSION = "1.0.0+git20180821.99bd997-8"
SUITE = "bullseye"
ORIG_TARBALL = "caffe_1.0.0+git20180821.99bd997.orig.tar.gz"
ORIG_SHA256 = "e0eb3f06794f7402c77b7dec8e8480273ee1a1bb192e9122b621a69d4147ad0c"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def fail(message):
    sys.exit(f"fetch_caffe_source: error: {message}")


def parse_one_line_sources(path):
    """Yield (uri, suites) from a one-line-style sources.list file."""
    with open(path) as handle:
        for line in handle:
            line = line.split("#", 1)[0].strip()
            if not line.startswith("deb "):
                continue
            # Drop an options block such as [arch=amd64 signed-by=...].
            line = re.sub(r"\[[^\]]*\]", " ", line)
            fields = line.split()
            if len(fields) >= 3:
                yield fields[1], [fields[2]]


def parse_deb822_sources(path):
    """Yield (uri, suites) from a deb822-style .sources file."""
    with open(path) as handle:
        stanzas = handle.read().split("\n\n")
    for stanza in stanzas:
        fields = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[0].isspace():
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.split()
        if "deb" not in fields.get("types", []) or fields.get("enabled") == ["no"]:
            continue
        for uri in fields.get("uris", []):
            yield uri, fields.get("suites", [])


def configured_sources(etc="/etc/apt"):
    files = []
    if os.path.exists(os.path.join(etc, "sources.list")):
        files.append(os.path.join(etc, "sources.list"))
    files += sorted(glob.glob(os.path.join(etc, "sources.list.d", "*.list")))
    files += sorted(glob.glob(os.path.join(etc, "sources.list.d", "*.sources")))
    for path in files:
        parse = parse_deb822_sources if path.endswith(".sources") else parse_one_line_sources
        for uri, suites in parse(path):
            yield path, uri, suites


def debian_mirror(etc="/etc/apt"):
    """The URI of the main Debian archive apt uses: one serving a plain release suite."""
    releases = {"buster", "bullseye", "bookworm", "trixie", "forky", "sid", "stable", "testing", "unstable"}
    for _path, uri, suites in configured_sources(etc):
        if uri.rstrip("/").endswith("debian-security"):
            continue
        if any(suite in releases for suite in suites):
            return uri.rstrip("/")
    return None


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(dest):
    tarball = os.path.join(dest, ORIG_TARBALL)
    if not os.path.exists(tarball):
        fail(f"{tarball} is missing after the download")
    actual = sha256_of(tarball)
    if actual != ORIG_SHA256:
        fail(
            f"SHA-256 mismatch for {tarball}:\n  expected {ORIG_SHA256}\n  got      {actual}\n"
            "The mirror served a different tarball. Delete the file and retry; if it persists,"
            " the mirror is not a faithful Debian mirror."
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", required=True, help="directory for the .dsc and tarballs")
    parser.add_argument("--apt-etc", default="/etc/apt", help="apt configuration to derive the mirror from")
    parser.add_argument("--verify-only", action="store_true", help="only check the tarball's SHA-256")
    args = parser.parse_args()

    dest = os.path.abspath(args.dest)
    dsc = os.path.join(dest, f"{PACKAGE}_{VERSION}.dsc")
    if args.verify_only or os.path.exists(dsc):
        verify(dest)
        print(f"fetch_caffe_source: {ORIG_TARBALL} verified ({ORIG_SHA256[:12]}...)")
        return

    mirror = debian_mirror(args.apt_etc)
    if mirror is None:
        fail(
            f"cannot derive a deb-src entry: no Debian archive found in {args.apt_etc}/sources.list"
            f" or {args.apt_etc}/sources.list.d/*.{{list,sources}}. Add your Debian mirror there"
            " (a 'deb' entry for your release) and run make again."
        )

    work = os.path.join(dest, "apt")
    for sub in ("lists/partial", "cache/archives/partial", "sources.list.d"):
        os.makedirs(os.path.join(work, sub), exist_ok=True)
    with open(os.path.join(work, "sources.list"), "w") as handle:
        handle.write(f"deb-src [signed-by={KEYRING}] {mirror} {SUITE} main\n")
    apt_options = [
        "-o", f"Dir::Etc::SourceList={work}/sources.list",
        "-o", f"Dir::Etc::SourceParts={work}/sources.list.d",
        "-o", f"Dir::State::Lists={work}/lists",
        "-o", f"Dir::Cache={work}/cache",
    ]
    print(f"fetch_caffe_source: using a private deb-src entry for {SUITE} derived from {args.apt_etc}")
    update = subprocess.run(["apt-get", *apt_options, "update"])
    if update.returncode != 0:
        fail(f"'apt-get update' for the {SUITE} deb-src entry in {work}/sources.list failed;"
             " check that the mirror apt uses also carries Debian 11 (bullseye) sources")
    source = subprocess.run(
        ["apt-get", *apt_options, "source", "--download-only", f"{PACKAGE}={VERSION}"], cwd=dest)
    if source.returncode != 0:
        fail(f"'apt-get source --download-only {PACKAGE}={VERSION}' failed; the mirror may no longer"
             f" carry {SUITE}. Put the three source files ({PACKAGE}_{VERSION}.dsc, the orig and"
             f" debian tarballs) in {dest} by hand and run make again.")
    verify(dest)
    print(f"fetch_caffe_source: {ORIG_TARBALL} verified ({ORIG_SHA256[:12]}...)")


if __name__ == "__main__":
    main()
