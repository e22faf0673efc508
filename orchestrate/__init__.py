"""Orchestration: profiles (``profiles/*.yaml``), their job graph, the local and SLURM executors,
the pre-flight and dry run, and the report (``results/``). It runs the stages (pretext, transfer,
eval) by module name only, as ``python -m <module>`` or submitit calls, never importing them; see
docs/orchestration.md."""
