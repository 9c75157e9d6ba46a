"""The differential harness, seeded and bounded: generated sources, random workloads, and
a strict comparison of the source at each point with a restore to that point.

Both capture plugins (wal2json on PostgreSQL 15, pgoutput on 17) and incrementals on both
servers. Fixed seeds, so a failure here replays with `make fuzz SEEDS=<seed>`; `make fuzz`
runs random seeds for longer. See devkit/differential/ for what a case is made of.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from supabackup.store import Store

from devkit.differential.harness import run_case
from devkit.pg import Cluster, logical_cluster

pytestmark = pytest.mark.server  # starts servers of its own

SEEDS = (11, 12)
STEPS = 4


@pytest.fixture(scope="module", params=[15, 17], ids=["pg15", "pg17"])
def server(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """wal_level=logical; 15 decodes with wal2json, 17 (no wal2json here) with pgoutput."""
    cluster = logical_cluster(request.param).start()
    yield cluster
    cluster.stop()


def _check(result_summary: str, ok: bool, points: int) -> None:
    print(result_summary)
    assert ok, result_summary
    assert points >= STEPS  # every step was restored and compared


@pytest.mark.parametrize("seed", SEEDS)
def test_restores_to_a_time_equal_the_source_then_or_name_what_differs(
        server: Cluster, store: Store, seed: int) -> None:
    # GIVEN a generated source under capture and a random workload with catalog changes
    # WHEN each time a capture run covered is restored into a fresh database
    result = run_case("cdc", server, store, seed, steps=STEPS, ddl_every=3)
    # THEN each restore equals the source at that time, object by object, or its report
    # names the object and why; times capture cannot give exactly are refused
    _check(result.summary(), result.ok, result.points)
    assert any("later than capture covers" in r for r in result.refused)
    assert any("schema change" in r for r in result.refused)
    # what is named is only what the stream cannot carry, each with its reason
    reasons = ("unlogged", "no replica identity", "large objects", "NaN", "sequences:")
    assert all(any(r in n for r in reasons) for n in result.named), result.named


@pytest.mark.parametrize("seed", SEEDS)
def test_incrementals_restore_to_exactly_the_source_at_each_backup(
        server: Cluster, store: Store, seed: int) -> None:
    # GIVEN a generated source, a full backup, and an incremental after each random step,
    # some of them catalog changes alone (enum label renamed, column dropped and re-added)
    result = run_case("incremental", server, store, seed, steps=STEPS, ddl_every=3)
    # THEN every incremental restores to exactly the source as it was then: nothing named
    _check(result.summary(), result.ok, result.points)
    assert result.named == []
