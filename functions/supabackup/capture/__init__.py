"""Change capture through a logical replication slot: restores to any point in time.

    start: create the slot with an exported snapshot -> take the base full backup in
               that very snapshot (no gap, no overlap) -> record the epoch
    run:   check the schema (every object's definition) and read the sequences, at a
               WAL position L -> peek the slot's committed transactions -> write them as one
               gzip'd segment -> write its index entry (the commit marker, like a manifest)
               -> advance the slot -> record that the epoch covers everything committed
               before L (its progress)
    restore:   the base, then every captured transaction committed at or before the time,
               each atomically, in commit order, each once (by commit LSN) (replay.py), then
               sequences as the run before the time read them

Delivery is at least once: a run that dies after writing its segment but before advancing
the slot leaves those transactions in the slot, and the next run stores them again.
Replay de-duplicates by commit LSN, so a transaction is applied once whatever the store
holds twice.

Modules: state (what the store keeps), slot (the replication slot and its stream),
lifecycle (start, run, status, drop), replay (applying captured transactions),
pointintime (restore to a time), pgoutput (PostgreSQL's own plugin, read into wal2json's
records). The command line calls it `cdc`; the code calls it capture.
"""

from .lifecycle import CaptureRun, drop, run, start, status
from .pointintime import PointInTimeReport, restore_to_time
from .slot import cannot_replay, require_direct, slot_name
from .state import CaptureState, Segment, epochs, read_state, segments

__all__ = ["CaptureRun", "CaptureState", "PointInTimeReport", "Segment", "cannot_replay",
           "drop", "epochs",
           "read_state", "require_direct", "restore_to_time", "run", "segments", "slot_name",
           "start", "status"]
