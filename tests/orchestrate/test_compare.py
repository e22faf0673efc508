"""orchestrate.compare: which conclusions two result folders share (oracle: hand-made run lists)."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd

from orchestrate.compare import compare, main, verdict

COLUMNS = ["row", "column", "mean", "diff", "ci_low", "ci_high"]


def write_runs(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=COLUMNS).to_csv(folder / "table2_transfer_runs.csv", index=False)


def test_verdict_follows_the_interval():
    assert verdict(0.1, 2.0) == "ahead"
    assert verdict(-3.0, -0.5) == "behind"
    assert verdict(-1.0, 1.0) == "n.s."


def test_cells_are_matched_and_flips_counted(tmp_path):
    base = ["Random", "Cls", 20.0, None, None, None]  # the baseline row has no Δ: not compared
    write_runs(tmp_path / "a", [base, ["M1", "Cls", 30, 10, 5, 15], ["M2", "Cls", 21, 1, 0.5, 1.5],
                                ["M3", "Cls", 19, -1, -2, 1]])  # fmt: skip
    write_runs(tmp_path / "b", [base, ["M1", "Cls", 29, 9, 4, 14], ["M2", "Cls", 21, 1, -1, 3],
                                ["M4", "Cls", 25, 5, 1, 9]])  # fmt: skip
    text, counts = compare(tmp_path / "a", tmp_path / "b", ("x", "y"))
    assert counts == {"same": 1, "differ": 1}  # M1 ahead on both; M2 ahead / n.s.; M3, M4 unpaired
    assert "| M1 | Cls | +10.0 [+5.0, +15.0] | +9.0 [+4.0, +14.0] | ahead |" in text
    assert "**differs** (ahead / n.s.)" in text and "M3" not in text and "Random" not in text
    out = tmp_path / "cmp.md"
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == counts
    assert out.read_text() == compare(tmp_path / "a", tmp_path / "b", (str(tmp_path / "a"),
                                                                        str(tmp_path / "b")))[0]  # fmt: skip


def test_a_missing_folder_is_one_error_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "orchestrate.compare", str(tmp_path / "nope"),
                        str(tmp_path)], capture_output=True, text=True)  # fmt: skip
    assert (
        r.returncode == 2
        and r.stderr.strip() == f"error: {tmp_path / 'nope'}: not a results folder"
    )
