"""The PostgreSQL client layer: built by `make layer`, then used as Lambda uses it.

The layer's programs run under `env -i` with only the layer's own directories set (PATH
and LD_LIBRARY_PATH, as Lambda sets them for /opt), against live PostgreSQL 15 and 17.
The arm64 layer (the template's default architecture) runs too, under qemu's user-mode
emulation with an arm64 glibc from the same Debian packages: its programs dump, restore
and query a real database, and the engine backs up and restores with them.
"""

from __future__ import annotations

import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from supabackup.backup import BackupRequest, run_backup
from supabackup.dburl import ConnectionInfo
from supabackup.restore import run_restore
from supabackup.store import Store

from devkit.compare import differences
from devkit.differential.source import Source
from devkit.pg import Cluster

from .helpers import REPO

sys.path.insert(0, str(REPO / "layers"))
from build_layer import GLIBC, PROGRAMS, build, library_root, needed

pytestmark = pytest.mark.tools  # builds and runs the layer's programs

LDD = shutil.which("ldd") or "/usr/bin/ldd"
GLIBC_MAX = (2, 34)  # Amazon Linux 2023, the python3.12 runtime
SIZE_BUDGET = 50 * 1024 * 1024  # unzipped; Lambda allows 250 MB for function and layers


@pytest.fixture(scope="module")
def layer() -> Path:
    """`make layer`, exactly as a user runs it: this machine's architecture."""
    subprocess.run(["make", "--no-print-directory", "-C", str(REPO / "layers"), "layer",
                    f"PYTHON={sys.executable}"], check=True, capture_output=True)
    return REPO / "build" / "layer"


@pytest.fixture(scope="module")
def arm64_layer() -> Path:
    """The template's default architecture, built on whatever this machine is."""
    dest = REPO / "build" / "layer-aarch64"
    build(dest, "aarch64", REPO / "build" / ".layer-cache")
    return dest


def _elf_files(root: Path) -> list[Path]:
    return [p for p in sorted(root.rglob("*")) if p.is_file() and p.read_bytes()[:4] == b"\x7fELF"]


def _glibc_versions(path: Path) -> set[tuple[int, ...]]:
    out = subprocess.run(["readelf", "--dyn-syms", "--version-info", "-W", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return {tuple(int(x) for x in v.split(".")) for v in re.findall(r"GLIBC_([0-9.]+)", out)}


@pytest.mark.parametrize("which", ["layer", "arm64_layer"])
def test_layer_holds_the_programs_and_every_library_they_need(which: str,
                                                              request: pytest.FixtureRequest) -> None:
    root: Path = request.getfixturevalue(which)
    assert sorted(p.name for p in (root / "bin").iterdir()) == sorted(PROGRAMS)
    libs = {p.name for p in (root / "lib").iterdir()}
    for path in _elf_files(root):
        missing = [s for s in needed(path) if s not in GLIBC and s not in libs]
        assert missing == [], f"{path.name} needs {missing}, which the layer lacks"
    assert {"libpq.so.5", "libssl.so.3", "libzstd.so.1"} <= libs
    manifest = (root / "lib" / "MANIFEST").read_text()
    assert all(f"lib/{name}\t" in manifest for name in libs - {"MANIFEST"})


@pytest.mark.parametrize("which", ["layer", "arm64_layer"])
def test_no_file_in_the_layer_needs_glibc_newer_than_2_34(which: str,
                                                          request: pytest.FixtureRequest) -> None:
    root: Path = request.getfixturevalue(which)
    files = _elf_files(root)
    assert len(files) >= 10
    for path in files:
        newest = max(_glibc_versions(path), default=(0,))
        assert newest <= GLIBC_MAX, f"{path.relative_to(root)} needs GLIBC_{newest}"


def test_layer_fits_well_under_lambdas_size_limit(layer: Path, arm64_layer: Path) -> None:
    for root in (layer, arm64_layer):
        size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        assert size < SIZE_BUDGET, f"{root.name} is {size / 2**20:.1f} MiB unzipped"


def _layer_env(layer: Path) -> list[str]:
    """`env -i` with only what Lambda sets for a layer at /opt."""
    return ["env", "-i", f"PATH={layer / 'bin'}", f"LD_LIBRARY_PATH={layer / 'lib'}"]


def test_every_library_resolves_inside_the_layer(layer: Path) -> None:
    # libpq's own RUNPATH points elsewhere (/opt/postgresql/lib): LD_LIBRARY_PATH, which
    # Lambda sets to include /opt/lib, is what must make every library come from the layer.
    for program in PROGRAMS:
        out = subprocess.run([*_layer_env(layer), LDD, str(layer / "bin" / program)],
                             capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            match = re.match(r"\s*(\S+) => (\S+)", line)
            if match and match.group(1) not in GLIBC:
                assert match.group(2).startswith(str(layer / "lib")), line


def test_layer_programs_dump_restore_and_query_live_servers(
        cluster: Cluster, new_db: Any, layer: Path, tmp_path: Path) -> None:
    source, target = new_db(cluster), new_db(cluster)
    cluster.execute("CREATE TABLE t (id int PRIMARY KEY, doc jsonb);"
                    "INSERT INTO t SELECT g, jsonb_build_object('g', g)"
                    " FROM generate_series(1, 1000) g", source)
    env = _layer_env(layer)
    archive = tmp_path / "t.dump"
    subprocess.run([*env, "pg_dump", "--format=custom", "--compress=zstd",
                    f"--file={archive}", f"--dbname={cluster.url(source)}"], check=True)
    subprocess.run([*env, "pg_restore", "--exit-on-error", "--no-owner",
                    f"--dbname={cluster.url(target)}", str(archive)],
                   check=cluster.major >= 17, capture_output=True)
    if cluster.major < 17:
        # pg_restore 17 sets transaction_timeout, which 15 lacks (see supabackup.restore);
        # the supported path is the script through psql, as the engine restores.
        script = subprocess.run([*env, "pg_restore", "--file=-", str(archive)],
                                capture_output=True, check=True).stdout
        script = script.replace(b"SET transaction_timeout = 0;\n", b"")
        cluster.drop_database(target)
        cluster.create_database(target)
        subprocess.run([*env, "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1",
                        f"--dbname={cluster.url(target)}"], input=script, check=True)
    out = subprocess.run([*env, "psql", "-X", "-At", f"--dbname={cluster.url(target)}",
                          "-c", "SELECT count(*), sum((doc->>'g')::int) FROM t"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1000|500500"


def test_engine_uses_the_layer_and_records_which_pg_dump(
        pg17: Cluster, new_db: Any, layer: Path, store: Store,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUPABACKUP_PG_BINDIR", str(layer / "bin"))
    monkeypatch.setenv("LD_LIBRARY_PATH", str(layer / "lib"))
    db = new_db(pg17)
    pg17.execute("CREATE TABLE t (id int)", db)
    manifest = run_backup(ConnectionInfo.from_url(pg17.url(db)), store, BackupRequest())
    assert manifest.pg_dump == str(layer / "bin" / "pg_dump")
    assert manifest.pg_dump_version == "17.11"


# --- arm64: the template's default architecture, run under emulation ---------------------

QEMU = shutil.which("qemu-aarch64-static") or "/usr/bin/qemu-aarch64-static"
EM_AARCH64 = 183  # ELF e_machine


@pytest.fixture(scope="module")
def arm64_root(arm64_layer: Path) -> Path:
    """arm64 glibc from the same bookworm packages: what Lambda's runtime provides."""
    return library_root(REPO / "build" / "root-aarch64", "aarch64", REPO / "build" / ".layer-cache")


@pytest.fixture(scope="module")
def emulated(arm64_layer: Path, arm64_root: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> Path:
    """The arm64 layer as a host with binfmt_misc runs it: bin/ holds for each program a
    script that notes the run (in `ran`) and execs the arm64 program under qemu's user-mode
    emulation (the loader and libc from the arm64 root, every other library from the
    layer's lib/, through LD_LIBRARY_PATH as Lambda sets it). pg_dumpall runs `pg_dump -V` from its own directory
    through /bin/sh, so its arm64 copy sits in arm64/ beside an emulated pg_dump. This host
    has no binfmt_misc entry for arm64, and registering one would change the whole machine;
    Graviton runs the programs natively."""
    root = tmp_path_factory.mktemp("emulated-layer")
    for folder in ("bin", "arm64"):
        (root / folder).mkdir()
    (root / "lib").symlink_to(arm64_layer / "lib")
    shutil.copy2(arm64_layer / "bin" / "pg_dumpall", root / "arm64" / "pg_dumpall")

    def emulate(script: Path, program: Path) -> None:
        script.write_text(f"#!/bin/sh\necho {program.name} >> {root / 'ran'}\n"
                          f'exec {QEMU} -L {arm64_root} {program} "$@"\n')
        script.chmod(0o755)
    for program in PROGRAMS:
        emulate(root / "bin" / program, root / "arm64" / program if program == "pg_dumpall"
                else arm64_layer / "bin" / program)
    emulate(root / "arm64" / "pg_dump", arm64_layer / "bin" / "pg_dump")
    return root


def _emulated(layer: Path, program: str, *args: str, **run: Any
              ) -> subprocess.CompletedProcess[bytes]:
    """One of the arm64 layer's programs, emulated, with only what Lambda sets for a layer."""
    return subprocess.run([*_layer_env(layer), program, *args], capture_output=True,
                          check=True, **run)


ARM64_ROLE = "sb_arm64_role"


def _realistic_source(cluster: Cluster, db: str, seed: int, tables: int, steps: int) -> Source:
    """A schema from the differential test's builder (every type it knows, keys and REPLICA
    IDENTITY FULL, `tables` random tables), then `steps` steps of DML, every other with DDL;
    the builder, for more steps."""
    schema = Source(cluster.url(db), random.Random(seed))  # noqa: S311 - a fixed schema
    schema.build(tables)
    for i in range(steps):
        schema.step(ddl=i % 2 == 1)
    return schema


def test_arm64_programs_dump_restore_and_query_a_real_database(
        pg17: Cluster, new_db: Any, arm64_layer: Path, emulated: Path, tmp_path: Path) -> None:
    for program in PROGRAMS:  # these are arm64 programs: nothing runs them but qemu
        assert int.from_bytes((arm64_layer / "bin" / program).read_bytes()[18:20], "little") == (
            EM_AARCH64)
    source, target = new_db(pg17), new_db(pg17)
    _realistic_source(pg17, source, seed=18, tables=6, steps=6)
    pg17.execute(f"DROP ROLE IF EXISTS {ARM64_ROLE}; CREATE ROLE {ARM64_ROLE} NOLOGIN")
    try:
        started = time.monotonic()
        archive = tmp_path / "arm64.dump"
        _emulated(emulated, "pg_dump", "--format=custom", "--compress=zstd",
                  f"--file={archive}", f"--dbname={pg17.url(source)}")
        _emulated(emulated, "pg_restore", "--exit-on-error", "--no-owner",
                  f"--dbname={pg17.url(target)}", str(archive))
        assert differences(pg17.url(source), pg17.url(target)) == []
        counted = _emulated(emulated, "psql", "-X", "-At", f"--dbname={pg17.url(target)}",
                            "-c", "SELECT count(*) FROM public.every_type_pk", text=True).stdout
        [(rows,)] = pg17.execute("SELECT count(*) FROM public.every_type_pk", source)
        assert int(counted) == rows > 0
        roles = _emulated(emulated, "pg_dumpall", "--roles-only", f"--dbname={pg17.url()}",
                          text=True).stdout
        assert f"CREATE ROLE {ARM64_ROLE};" in roles
        print(f"arm64 under qemu: dump, restore, query and roles in "
              f"{time.monotonic() - started:.1f} s")
    finally:
        pg17.execute(f"DROP ROLE IF EXISTS {ARM64_ROLE}")


def test_the_engine_backs_up_and_restores_with_the_arm64_programs(
        pg17: Cluster, new_db: Any, arm64_layer: Path, emulated: Path, store: Store,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A full and an incremental backup and a restore of the chain, every client program
    the arm64 one (parallel COPY workers, roles, the schema archive), compared whole."""
    monkeypatch.setenv("SUPABACKUP_PG_BINDIR", str(emulated / "bin"))
    monkeypatch.setenv("LD_LIBRARY_PATH", str(arm64_layer / "lib"))
    source, target = new_db(pg17), new_db(pg17)
    schema = _realistic_source(pg17, source, seed=1818, tables=4, steps=0)
    ran = emulated / "ran"
    ran.unlink(missing_ok=True)  # what the other test ran must not count for this one
    started = time.monotonic()
    full = run_backup(ConnectionInfo.from_url(pg17.url(source)), store, BackupRequest())
    schema.step(ddl=True)
    incremental = run_backup(ConnectionInfo.from_url(pg17.url(source)), store,
                             BackupRequest(kind="incremental"))
    assert (full.pg_dump, incremental.base) == (str(emulated / "bin" / "pg_dump"), full.backup_id)
    assert {"pg_dump", "pg_dumpall", "psql"} <= set(ran.read_text().split())
    ran.unlink()
    run_restore(store, incremental, ConnectionInfo.from_url(pg17.url(target)))
    assert {"pg_restore", "psql"} <= set(ran.read_text().split())
    print(f"arm64 under qemu: full, incremental and restore in {time.monotonic() - started:.1f} s")
    assert differences(pg17.url(source), pg17.url(target)) == []
