"""Change capture through a logical replication slot: restores to any point in time.

    start: create the slot with an exported snapshot -> take the base full backup in
               that very snapshot (no gap, no overlap) -> record the epoch
    run:   under the capture lease, once (a peek) or streaming for a while (--for), each
               flush: check the schema (every object's definition) and read the sequences,
               at a WAL position L -> read the slot through L -> write what committed as
               one gzip'd segment -> write its index entry (the commit marker, like a
               manifest) -> confirm the slot's position -> record that the epoch covers
               everything committed before L (its progress)
    restore:   the base, then every captured transaction committed at or before the time,
               each atomically, in commit order, each once (by commit LSN) (replay.py), then
               sequences as the run before the time read them

Each transaction is stored once: a run that dies after writing its segment but before
confirming the slot leaves those transactions in the slot, and the next run skips what
the epoch's chain of index entries already holds (drain.py). Replay de-duplicates by
commit LSN as well, so a store written by older versions, which stored such
transactions twice, replays the same.

Modules: state (what the store keeps), slot (the replication slot and its stream),
drain (one flush: check, store, confirm), stream (`cdc run --for`), lifecycle (start,
run, status, drop), window (the times a restore can reach), replay (applying captured
transactions),
pointintime (restore to a time), pgoutput (PostgreSQL's own plugin, read into wal2json's
records). The command line calls it `cdc`; the code calls it capture.
"""

from .drain import CaptureRun
from .lifecycle import drop, run, start, status, status_lines
from .pointintime import PointInTimeReport, restore_to_time
from .slot import cannot_replay, require_direct, slot_name
from .state import CaptureState, Segment, epochs, read_state, segments
from .stream import FlushPolicy

__all__ = ["CaptureRun", "CaptureState", "FlushPolicy", "PointInTimeReport", "Segment",
           "cannot_replay", "drop", "epochs", "read_state", "require_direct",
           "restore_to_time", "run", "segments", "slot_name", "start", "status",
           "status_lines"]
