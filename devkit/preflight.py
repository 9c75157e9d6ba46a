"""Check, before `make test` or `make demo`, that this machine has what they need.

Usage: python -m devkit.preflight test|demo

Silent and exit 0 when everything is there. Otherwise ONE line on stderr naming the
missing Debian packages (and the file or library that showed each one missing) and the
one command that installs them, and exit 1: a machine that lacks something fails here,
before any server is started, and never skips tests instead.

What is looked for is what the tests and demo use, not what dpkg says is installed, so
PostgreSQL put there some other way counts too:
- PostgreSQL 15's server and client programs and wal2json.so (test only: `make demo` runs
  on PostgreSQL 17 alone);
- the pinned PostgreSQL 17 binaries (`make setup` fetches them), and every shared library
  they need, resolved by `ldd`: that is how a missing libicu72 or libreadline8 shows;
- as root, setpriv and the `postgres` OS user the servers run as (devkit.pg);
- for `make test`, what the layer and fault tests run: readelf, GNU time, Debian's keyring,
  zstd, and qemu-aarch64-static (the arm64 layer's programs run under emulation).
Every place looked in is a field of `Machine`, so a test can point them at an empty folder.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .pg import PG15_BINDIR, PG17_BINDIR, SERVER_USER

# Programs and libraries of PostgreSQL 17 that the tests and demo run or load.
PG17_PROGRAMS = ("postgres", "initdb", "pg_ctl", "psql", "pg_dump", "pg_dumpall",
                 "pg_restore")
PG17_LIBRARIES = ("plpgsql.so", "pgoutput.so", "dict_snowball.so", "libpqwalreceiver.so")

# The Debian (bookworm) package of each shared library the PostgreSQL 17 binaries link.
LIBRARY_PACKAGES = {
    "libzstd.so.1": "libzstd1", "liblz4.so.1": "liblz4-1", "libxml2.so.2": "libxml2",
    "libssl.so.3": "libssl3", "libcrypto.so.3": "libssl3",
    "libgssapi_krb5.so.2": "libgssapi-krb5-2", "libkrb5.so.3": "libkrb5-3",
    "libk5crypto.so.3": "libk5crypto3", "libkrb5support.so.0": "libkrb5support0",
    "libcom_err.so.2": "libcom-err2", "libkeyutils.so.1": "libkeyutils1",
    "libicuuc.so.72": "libicu72", "libicudata.so.72": "libicu72",
    "libicui18n.so.72": "libicu72", "libreadline.so.8": "libreadline8",
    "libtinfo.so.6": "libtinfo6", "libz.so.1": "zlib1g", "liblzma.so.5": "liblzma5",
}


@dataclass(frozen=True)
class Machine:
    """Where the checks look; the defaults are this machine's real places."""

    pg15_bindir: Path = PG15_BINDIR
    pg15_libdir: Path = PG15_BINDIR.parent / "lib"
    pg17_bindir: Path = PG17_BINDIR
    path: str = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/usr/bin:/sbin:/bin"
    gnu_time: Path = Path("/usr/bin/time")  # the tests call it by this path
    keyring: Path = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
    server_user: str = SERVER_USER
    as_root: bool = os.geteuid() == 0


@dataclass(frozen=True)
class Missing:
    package: str  # the Debian package to install, or what is missing when `fix` is set
    evidence: str  # the file, program or library that is not there
    fix: str = ""  # a command other than apt-get that brings it


def _program(machine: Machine, name: str) -> bool:
    return shutil.which(name, path=machine.path) is not None


def _unresolved_libraries(machine: Machine, files: list[Path]) -> list[str]:
    """Sonames that `ldd` cannot find for these ELF files ("ldd" when there is none; ldd's
    own words when it fails otherwise, e.g. on a file that is no program for this machine)."""
    ldd = shutil.which("ldd", path=machine.path)
    if ldd is None:
        return ["ldd"]
    done = subprocess.run([ldd, *map(str, files)], capture_output=True, text=True)
    unresolved = {line.split()[0] for line in done.stdout.splitlines() if "=> not found" in line}
    if done.returncode != 0 and not unresolved:
        said = (done.stderr.strip() or done.stdout.strip()).splitlines()
        unresolved.add(said[0] if said else f"ldd exited {done.returncode}")
    return sorted(unresolved)


def _pg17(machine: Machine) -> list[Missing]:
    files = ([machine.pg17_bindir / p for p in PG17_PROGRAMS]
             + [machine.pg17_bindir.parent / "lib" / lib for lib in PG17_LIBRARIES])
    absent = [f for f in files if not f.is_file()]
    if absent:
        return [Missing("PostgreSQL 17 binaries", str(absent[0]), fix="make setup")]
    found = []
    for soname in _unresolved_libraries(machine, files):
        if soname == "ldd":
            found.append(Missing("libc-bin", "ldd"))
        elif soname in LIBRARY_PACKAGES:
            found.append(Missing(LIBRARY_PACKAGES[soname], f"{soname} for {machine.pg17_bindir}"))
        elif " " in soname:  # ldd's own complaint: a broken or foreign download
            found.append(Missing("PostgreSQL 17 binaries", f"working programs: {soname}",
                                 fix=f"rm -rf {machine.pg17_bindir.parent} && make setup"))
        else:
            found.append(Missing(soname, f"{soname} for {machine.pg17_bindir}",
                                 fix=f"install the package that provides {soname}"))
    return found


def _pg15(machine: Machine) -> list[Missing]:
    found = []
    for program, package in (("postgres", "postgresql-15"), ("initdb", "postgresql-15"),
                             ("pg_ctl", "postgresql-15"), ("psql", "postgresql-client-15"),
                             ("pg_dump", "postgresql-client-15")):
        if not (machine.pg15_bindir / program).is_file():
            found.append(Missing(package, str(machine.pg15_bindir / program)))
    if not (machine.pg15_libdir / "wal2json.so").is_file():
        found.append(Missing("postgresql-15-wal2json", str(machine.pg15_libdir / "wal2json.so")))
    return found


def _server_user(machine: Machine) -> list[Missing]:
    if not machine.as_root:
        return []
    found = []
    if not _program(machine, "setpriv"):
        found.append(Missing("util-linux", "setpriv"))
    try:
        pwd.getpwnam(machine.server_user)
    except KeyError:  # Debian's postgresql-common creates the user
        found.append(Missing("postgresql-common", f"OS user {machine.server_user}"))
    return found


def _test_tools(machine: Machine) -> list[Missing]:
    found = []
    if not _program(machine, "readelf"):
        found.append(Missing("binutils", "readelf"))
    if not machine.gnu_time.is_file():
        found.append(Missing("time", str(machine.gnu_time)))
    if not machine.keyring.is_file():
        found.append(Missing("debian-archive-keyring", str(machine.keyring)))
    if not _program(machine, "zstd"):  # the README's restore by hand, which a test runs
        found.append(Missing("zstd", "zstd"))
    if not _program(machine, "qemu-aarch64-static"):  # the arm64 layer's programs, emulated
        found.append(Missing("qemu-user-static", "qemu-aarch64-static"))
    return found


def missing(target: str, machine: Machine | None = None) -> list[Missing]:
    """What `make <target>` (test or demo) needs and this machine lacks."""
    machine = machine or Machine()
    found = _server_user(machine) + _pg17(machine)
    if target == "test":
        found += _pg15(machine) + _test_tools(machine)
    return found


def message(target: str, found: list[Missing], as_root: bool = os.geteuid() == 0) -> str:
    """The one line that says what is missing and the command that brings it."""
    first: dict[str, str] = {}  # each package once, with the first thing that showed it
    for m in found:
        first.setdefault(m.package, m.evidence)
    packages = list(dict.fromkeys(m.package for m in found if not m.fix))
    shown = ", ".join(f"{package} (no {evidence})" for package, evidence in first.items())
    fixes = []
    if packages:
        fixes.append(f"{'' if as_root else 'sudo '}apt-get install -y {' '.join(packages)}")
    fixes += dict.fromkeys(m.fix for m in found if m.fix)
    return f"make {target} needs {shown}; run: {' && '.join(fixes)}"


def main(argv: list[str], machine: Machine | None = None) -> int:
    if len(argv) != 1 or argv[0] not in ("test", "demo"):
        print("usage: python -m devkit.preflight test|demo", file=sys.stderr)
        return 2
    machine = machine or Machine()
    found = missing(argv[0], machine)
    if found:
        print(message(argv[0], found, machine.as_root), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
