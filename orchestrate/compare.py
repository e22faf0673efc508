"""Do two runs of a profile (e.g. on two CPU types) reach the same conclusions?

    python -m orchestrate.compare results results/machines/amd_epyc --out results/cross_machine.md

For every compared cell of the tables both result folders hold (``*_runs.csv``, as
:mod:`orchestrate.report` writes them): the Δ to the baseline with its 95% interval over seeds on
each side, and whether the conclusion — ahead (interval above 0), behind (below 0) or not
resolved — is the same. A conclusion that differs between the two is not a conclusion
(docs/benchmark.md); the table says which.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd

from core.atomic_io import atomic_write_text
from core.cli import UserError, run_cli

TABLES = ("table2_transfer", "frozen_layers", "frozen_lowshot", "retrieval", "table1_inpainting")


def verdict(low: float, high: float) -> str:
    """'ahead' / 'behind' when the interval excludes 0, 'n.s.' otherwise."""
    if low > 0:
        return "ahead"
    if high < 0:
        return "behind"
    return "n.s."


def compared(folder: Path, table: str) -> pd.DataFrame | None:
    """The rows of ``table`` with a Δ and interval (the non-baseline rows), indexed by (row,
    column); None when the folder has no such table."""
    path = folder / f"{table}_runs.csv"
    if not path.is_file():
        return None
    runs = pd.read_csv(path)
    if not {"row", "column"} <= set(runs.columns):
        raise UserError(f"{path}: not a run list of orchestrate.report (no row / column)")
    if not {"diff", "ci_low", "ci_high"} <= set(runs.columns):
        return None  # a table without a baseline comparison (retrieval, Table 1)
    runs = runs.dropna(subset=["diff", "ci_low", "ci_high"])
    return runs.set_index(["row", "column"])[["diff", "ci_low", "ci_high"]]


def cell(r: pd.Series) -> str:
    return f"{r['diff']:+.1f} [{r['ci_low']:+.1f}, {r['ci_high']:+.1f}]"


def compare(a: Path, b: Path, names: tuple[str, str]) -> tuple[str, dict[str, int]]:
    """(markdown, counts {'same', 'differ'}) over every cell both folders hold."""
    header = [
        f"# The same conclusions on {names[0]} and {names[1]}?",
        "",
        f"Δ to the baseline row with its 95% interval over seeds, from `{a}` ({names[0]}) and "
        f"`{b}` ({names[1]}); *ahead* / *behind*: the interval excludes 0. Written by "
        "`python -m orchestrate.compare`.",
        "",
    ]
    lines: list[str] = []
    counts = {"same": 0, "differ": 0}
    for table in TABLES:
        ra, rb = compared(a, table), compared(b, table)
        if ra is None or rb is None:
            continue
        keys = [k for k in ra.index if k in rb.index]
        if not keys:
            continue
        lines += [f"## {table}", ""]
        lines += [f"| Row | Column | {names[0]} | {names[1]} | Conclusion |", "| --- " * 5 + "|"]
        for key in keys:
            x, y = ra.loc[key], rb.loc[key]
            va, vb = verdict(x["ci_low"], x["ci_high"]), verdict(y["ci_low"], y["ci_high"])
            same = va == vb
            counts["same" if same else "differ"] += 1
            conclusion = va if same else f"**differs** ({va} / {vb})"
            lines.append(f"| {key[0]} | {key[1]} | {cell(x)} | {cell(y)} | {conclusion} |")
        lines.append("")
    total = counts["same"] + counts["differ"]
    share = counts["same"] / total if total else math.nan
    header.append(f"{counts['same']} of {total} cells ({share:.0%}) reach the same conclusion.\n")
    return "\n".join(header + lines), counts


def main(argv: list[str] | None = None) -> dict[str, int]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path, help="a results folder")
    p.add_argument("b", type=Path, help="another results folder of the same profile")
    p.add_argument("--names", nargs=2, default=None, help="what each folder is (e.g. the CPUs)")
    p.add_argument("--out", type=Path, default=None, help="write the markdown here (else stdout)")
    args = p.parse_args(argv)
    for folder in (args.a, args.b):
        if not folder.is_dir():
            raise UserError(f"{folder}: not a results folder")
    names = tuple(args.names) if args.names else (str(args.a), str(args.b))
    text, counts = compare(args.a, args.b, names)  # type: ignore[arg-type]
    if args.out is None:
        print(text)
    else:
        atomic_write_text(args.out, text)
    return counts


if __name__ == "__main__":
    run_cli(main)
