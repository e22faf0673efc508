"""Processes writing results at the same time: no record lost, none interleaved, none half-read."""

import json
import multiprocessing as mp
from pathlib import Path

from core.atomic_io import append_jsonl, atomic_write_json, read_jsonl
from orchestrate.jobs import Job, write_run_json
from orchestrate.tables import collect_runs

WRITERS, RECORDS = 4, 300


def append_records(path: str, writer: int) -> None:
    for i in range(RECORDS):
        # 1-9 KB lines: larger than PIPE_BUF (4 KB) too
        append_jsonl(path, {"writer": writer, "i": i, "pad": "x" * (1000 * (1 + i % 9))})


def test_append_jsonl_from_many_processes_loses_and_interleaves_nothing(tmp_path):
    path = tmp_path / "shared.jsonl"
    ctx = mp.get_context("spawn")  # a clean interpreter, like separate runs
    procs = [ctx.Process(target=append_records, args=(str(path), w)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = path.read_text().splitlines()
    assert len(lines) == WRITERS * RECORDS
    records = [json.loads(line) for line in lines]  # every line is one whole record
    for w in range(WRITERS):
        mine = [r["i"] for r in records if r["writer"] == w]
        assert mine == list(range(RECORDS))  # each writer's order is kept
    assert all(r["pad"] == "x" * (1000 * (1 + r["i"] % 9)) for r in records)


def write_runs(root: str, writer: int, n: int) -> None:
    """What the pipeline does for a job: run.json running -> result.json -> run.json done."""
    for i in range(n):
        run_dir = Path(root, f"w{writer}", f"run{i}")
        job = Job("transfer", "classify", f"v{writer}", i, "m", (), str(run_dir))
        write_run_json(job, "running")
        atomic_write_json(run_dir / "result.json", {"mAP": writer + i / 1000, "pad": "y" * 5000})
        write_run_json(job, "done", wall_s=0.1)
        # and one results file shared by all writers, rewritten whole each time
        atomic_write_json(Path(root, "latest.json"), {"writer": writer, "i": i, "pad": "z" * 20000})


def test_run_folders_written_while_tables_are_read(tmp_path):
    ctx = mp.get_context("spawn")
    n = 60
    procs = [ctx.Process(target=write_runs, args=(str(tmp_path), w, n)) for w in range(2)]
    for p in procs:
        p.start()
    reads = 0
    while any(p.is_alive() for p in procs) or reads == 0:
        runs = collect_runs(tmp_path)  # raises on a half-written run.json
        assert runs["run_dir"].is_unique
        latest = tmp_path / "latest.json"
        if latest.exists():
            assert len(json.loads(latest.read_text())["pad"]) == 20000  # never half a file
        reads += 1
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    runs = collect_runs(tmp_path)
    assert len(runs) == 2 * n and set(runs["status"]) == {"done"}
    assert sorted(runs["m.mAP"]) == sorted(w + i / 1000 for w in range(2) for i in range(n))
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_a_torn_last_line_is_skipped_and_repaired_on_resume(tmp_path):
    from pretext.engine import truncate_metrics as _truncate_metrics

    path = tmp_path / "m.jsonl"
    for i in range(3):
        append_jsonl(path, {"step": i})
    with open(path, "ab") as fh:
        fh.write(b'{"step": 3, "loss": 0.')  # what a kill inside a large write can leave
    assert [r["step"] for r in read_jsonl(path)] == [0, 1, 2]
    _truncate_metrics(path, 2)  # what pretext.train does when it resumes
    append_jsonl(path, {"step": 3})
    assert [r["step"] for r in read_jsonl(path)] == [0, 1, 2, 3]
