"""devkit/preflight.py: what `make test` and `make demo` need from the system, named in one
line with the command that installs it. Server-free: every place the checker looks is a
folder of tmp_path, filled with stand-ins (empty files, an `ldd` that is a shell script)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from devkit.preflight import PG17_LIBRARIES, PG17_PROGRAMS, Machine, main, message, missing

RESOLVED_LDD = "#!/bin/sh\necho '\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x0)'\n"


def _complete_machine(root: Path, ldd: str = RESOLVED_LDD) -> Machine:
    """GIVEN a machine that has everything: each needed file present, each program on PATH."""
    pg15, pg17, tools = root / "pg15" / "bin", root / "pg17" / "bin", root / "path"
    for folder in (pg15, root / "pg15" / "lib", pg17, root / "pg17" / "lib", tools):
        folder.mkdir(parents=True)
    for name in ("postgres", "initdb", "pg_ctl", "psql", "pg_dump"):
        (pg15 / name).touch()
    (root / "pg15" / "lib" / "wal2json.so").touch()
    for name in PG17_PROGRAMS:
        (pg17 / name).touch()
    for name in PG17_LIBRARIES:
        (root / "pg17" / "lib" / name).touch()
    for name, text in (("ldd", ldd), ("setpriv", "#!/bin/sh\n"), ("readelf", "#!/bin/sh\n"),
                       ("zstd", "#!/bin/sh\n"), ("qemu-aarch64-static", "#!/bin/sh\n")):
        (tools / name).write_text(text)
        (tools / name).chmod(0o755)
    (root / "time").touch()
    (root / "keyring.gpg").touch()
    return Machine(pg15_bindir=pg15, pg15_libdir=root / "pg15" / "lib", pg17_bindir=pg17,
                   path=str(tools), gnu_time=root / "time", keyring=root / "keyring.gpg",
                   server_user="root", as_root=True)


@pytest.mark.parametrize("target", ["test", "demo"])
def test_missing_everything_present_finds_nothing(tmp_path: Path, target: str) -> None:
    assert missing(target, _complete_machine(tmp_path)) == []


def test_main_wal2json_missing_prints_one_line_with_the_install_command(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    machine = _complete_machine(tmp_path)
    (machine.pg15_libdir / "wal2json.so").unlink()

    code = main(["test"], replace(machine, as_root=False))

    err = capsys.readouterr().err
    assert code == 1
    assert err == (f"make test needs postgresql-15-wal2json (no {machine.pg15_libdir}/wal2json.so);"
                   " run: sudo apt-get install -y postgresql-15-wal2json\n")


def test_main_demo_does_not_ask_for_postgresql_15(tmp_path: Path) -> None:
    machine = _complete_machine(tmp_path)
    (machine.pg15_bindir / "postgres").unlink()
    (machine.pg15_libdir / "wal2json.so").unlink()
    assert main(["demo"], machine) == 0
    assert main(["test"], machine) == 1


def test_missing_unresolved_library_names_its_debian_package(tmp_path: Path) -> None:
    machine = _complete_machine(tmp_path, ldd="#!/bin/sh\n"
                                "echo '\tlibicuuc.so.72 => not found'\n"
                                "echo '\tlibreadline.so.8 => not found'\n"
                                "echo '\tlibicuuc.so.72 => not found'\n")
    line = message("demo", missing("demo", machine), as_root=True)
    assert line == (f"make demo needs libicu72 (no libicuuc.so.72 for {machine.pg17_bindir}), "
                    f"libreadline8 (no libreadline.so.8 for {machine.pg17_bindir}); "
                    "run: apt-get install -y libicu72 libreadline8")


def test_missing_ldd_failing_otherwise_is_not_a_pass(tmp_path: Path) -> None:
    machine = _complete_machine(tmp_path, ldd="#!/bin/sh\necho 'not a dynamic executable' >&2\n"
                                "exit 1\n")
    (found,) = missing("demo", machine)
    assert "not a dynamic executable" in found.evidence and "make setup" in found.fix


def test_missing_as_root_without_setpriv_or_server_user_names_both(tmp_path: Path) -> None:
    machine = _complete_machine(tmp_path)
    (Path(machine.path) / "setpriv").unlink()
    lacking = replace(machine, server_user="no-such-user-sb")
    assert [m.package for m in missing("demo", lacking)] == ["util-linux", "postgresql-common"]
    assert missing("demo", replace(lacking, as_root=False)) == []


def test_message_empty_machine_names_every_package_once_and_make_setup(tmp_path: Path) -> None:
    empty = Machine(pg15_bindir=tmp_path, pg15_libdir=tmp_path, pg17_bindir=tmp_path / "bin",
                    path=str(tmp_path), gnu_time=tmp_path / "time", keyring=tmp_path / "k",
                    server_user="no-such-user-sb", as_root=True)
    line = message("test", missing("test", empty), as_root=True)
    assert "\n" not in line
    assert line.endswith("; run: apt-get install -y util-linux postgresql-common postgresql-15 "
                         "postgresql-client-15 postgresql-15-wal2json binutils time "
                         "debian-archive-keyring zstd qemu-user-static && make setup")
    assert line.count("postgresql-15 (") == 1
