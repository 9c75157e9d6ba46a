"""devkit/pg.py without a server: which settings a release is started with, and where the
server user runs the programs from. The "releases" are shell scripts named `postgres`
that answer --version and --describe-config as a real one does (tab-separated, name first).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from devkit import pg

# What `postgres --describe-config` of 15.18 and of 15.20 say about the settings we pass.
OLDER = ("wal_level", "max_replication_slots", "max_wal_senders", "synchronous_commit",
         "track_commit_timestamp", "listen_addresses", "port", "fsync")
NEWER = (*OLDER, "output_plugin_libraries")


def _release(root: Path, version: str, settings: tuple[str, ...]) -> Path:
    """An installation (bin/ beside lib/) whose postgres is a script; returns its bindir."""
    bindir = root / "bin"
    bindir.mkdir(parents=True)
    (root / "lib").mkdir()
    (root / "lib" / "wal2json.so").write_text("not really\n")
    described = "".join(f"{name}\\tsighup\\tSome / Group\\tSTRING\\t\\n" for name in settings)
    (bindir / "postgres").write_text(
        "#!/bin/sh\n"
        f'[ "$1" = --version ] && echo "postgres (PostgreSQL) {version}" && exit 0\n'
        f"printf '{described}'\n")
    for name in ("postgres", "initdb", "pg_ctl"):
        (bindir / name).touch()
        (bindir / name).chmod(0o755)
    return bindir


@pytest.fixture
def reachable_tmp() -> Iterator[Path]:
    """A folder the server user can enter (pytest's tmp_path is 0700 under root)."""
    folder = Path(tempfile.mkdtemp(prefix="sbtest-pg-", dir=pg.MIRROR_BASE))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def test_server_options_release_without_the_setting_leaves_it_out(reachable_tmp: Path) -> None:
    # GIVEN a 15.18-like release, which has no output_plugin_libraries
    old = _release(reachable_tmp / "old", "15.18", OLDER)
    new = _release(reachable_tmp / "new", "15.20", NEWER)

    # WHEN a capture server's settings are chosen for it
    capture = pg.logical_cluster(15)
    capture.stop()  # never started: this only removes its empty root
    chosen = {b: pg.server_options(b, capture.settings, capture.where_known) for b in (old, new)}

    # THEN only the release that has the setting is started with it
    assert "output_plugin_libraries" not in chosen[old]
    assert chosen[new]["output_plugin_libraries"] == "'pgoutput, test_decoding, wal2json'"
    assert {k: v for k, v in chosen[new].items() if k != "output_plugin_libraries"} \
        == chosen[old] == pg.LOGICAL
    assert not pg.knows_setting(old, "OUTPUT_PLUGIN_LIBRARIES")


def test_server_options_required_setting_the_release_lacks_is_named(reachable_tmp: Path) -> None:
    old = _release(reachable_tmp / "old", "15.18", OLDER)
    with pytest.raises(pg.ClusterError, match=r"^PostgreSQL 15\.18 in .* has no setting "
                       r"output_plugin_libraries: pass it in where_known"):
        pg.server_options(old, {"fsync": "off", "output_plugin_libraries": "'pgoutput'"})


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs servers as another user")
def test_server_bindir_unreachable_installation_is_mirrored_once(
        tmp_path: Path, reachable_tmp: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # GIVEN an installation in a folder the server user cannot enter
    hidden = tmp_path / "home"
    bindir = _release(hidden / "postgresql-15", "15.17", NEWER)
    hidden.chmod(0o700)
    assert not pg.server_can_reach(bindir / "postgres")
    monkeypatch.setattr(pg, "MIRROR_BASE", reachable_tmp)

    # WHEN the server's programs are looked for
    with caplog.at_level(logging.WARNING, logger="devkit.pg"):
        used = pg.server_bindir(bindir)

    # THEN they run from a complete, world-readable copy, said in one log line
    mirror = reachable_tmp / "supabackup-postgresql-15-15.17"
    assert used == mirror / "bin"
    assert oct(mirror.stat().st_mode & 0o777) == "0o755"
    assert (mirror / "lib" / "wal2json.so").read_text() == "not really\n"
    assert pg.server_can_reach(used / "postgres", mirror / "lib" / "wal2json.so")
    assert [r.getMessage() for r in caplog.records] == [
        f"devkit.pg: user postgres cannot reach {bindir.parent}; its servers run from a copy "
        f"in {mirror}"]
    assert "output_plugin_libraries" in pg.described_settings(bindir)
    # AND a second look (another process, say) reuses it instead of copying again
    made = mirror.stat().st_ino
    assert pg.mirror_installation(bindir) == used
    assert mirror.stat().st_ino == made
    assert [p.name for p in reachable_tmp.iterdir()] == [mirror.name]  # no staging left


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs servers as another user")
def test_mirror_installation_someone_elses_folder_is_refused(
        tmp_path: Path, reachable_tmp: Path) -> None:
    bindir = _release(tmp_path / "postgresql-15", "15.16", OLDER)
    squatted = reachable_tmp / "supabackup-postgresql-15-15.16"
    squatted.mkdir()
    os.chown(squatted, 65534, 65534)
    with pytest.raises(pg.ClusterError, match="belongs to someone else"):
        pg.mirror_installation(bindir, reachable_tmp)
