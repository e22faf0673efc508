"""TensorBoard event files beside a run's ``metrics.jsonl`` (``torch.utils.tensorboard``), so that
``tensorboard --logdir runs/builtin`` shows every run of a profile, one run per run folder.

The event files go into the run folder itself. A resumed run keeps only the events before the
first step it writes (as ``metrics.jsonl`` is truncated to the checkpoint's step): the kept events
are merged into one file named to sort first (:data:`RESUMED`), the others are removed, and the new
writer's file (named by the clock) follows it, so no step appears twice for any reader;
``purge_step`` is also passed, TensorBoard's own marker of a restart. The writer runs in a thread
and is flushed at each checkpoint; it reads nothing back, so no number of the run changes.
``log.tensorboard=false`` writes none; without the ``tensorboard`` package installed, one line
says so and the run goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.atomic_io import atomic_save

log = logging.getLogger(__name__)

# The kept events of earlier writers: the time field 0 sorts before any writer's own file
RESUMED = "events.out.tfevents.0000000000.resumed"


@dataclass
class LogConfig:
    tensorboard: bool = True  # event files in the run folder (tensorboard --logdir runs/...)


def event_files(run_dir: str | Path) -> list[Path]:
    """The run folder's event files in TensorBoard's reading order (by name)."""
    return sorted(p for p in Path(run_dir).glob("events.out.tfevents.*") if p.is_file())


def keep_events_before(
    run_dir: str | Path, first_step: int, drop_tags: Collection[str] = ()
) -> int:
    """Keep in ``run_dir`` only the events of steps < ``first_step`` whose tags start with none
    of ``drop_tags``, merged in step order into :data:`RESUMED`; returns how many were kept."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    files = event_files(run_dir)
    if not files:
        return 0
    kept: list[tuple[int, bytes]] = []
    seen: set[bytes] = set()  # a merge interrupted before removing its inputs left duplicates
    for path in files:
        for raw in RawEventFileLoader(str(path)).Load():
            event = Event.FromString(raw)
            tags = [v.tag for v in event.summary.value]
            if event.step >= first_step or raw in seen:
                continue
            if drop_tags and any(t.startswith(tuple(drop_tags)) for t in tags):
                continue
            seen.add(raw)
            kept.append((event.step, raw))
    kept.sort(key=lambda item: item[0])  # stable: the file-version header stays first
    merged = Path(run_dir) / RESUMED
    if kept:

        def write(fh) -> None:
            writer = RecordWriter(fh)
            for _, raw in kept:
                writer.write(raw)

        atomic_save(merged, write)
    for path in files:
        if path != merged or not kept:
            path.unlink()
    return len(kept)


class EventLog:
    """The event-file writer of one run folder (rank 0 of a run; a no-op when disabled).

    ``first_step``: the first step this process logs; earlier writers' events at or after it
    (and those tagged ``drop_tags``, e.g. a final test that is computed again) are removed first.
    """

    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool = True,
        first_step: int = 0,
        drop_tags: Collection[str] = (),
    ):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("log.tensorboard: the tensorboard package is not installed; no event files")
            return
        keep_events_before(run_dir, first_step, drop_tags)
        purge = first_step if first_step > 0 else None
        self.writer = SummaryWriter(str(run_dir), purge_step=purge)

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def scalars(self, step: int, values: Mapping[str, Any], prefix: str = "") -> None:
        """``prefix + key`` -> value at ``step`` for each number of ``values`` (others skipped)."""
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(
                value, bool
            ):
                self.writer.add_scalar(prefix + key, float(value), step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """``image``: uint8 [H, W, 3]."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of the event files in ``run_dir``, as written: TensorBoard's own
    reader with its purging of restarted steps off, so that a step written twice shows twice."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}, purge_orphaned_data=False)
    events.Reload()
    return {
        tag: [(s.step, s.value) for s in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }
