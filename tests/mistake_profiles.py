"""A profile of real stages with deliberate mistakes, for the pre-flight tests (local and SLURM)."""

from __future__ import annotations

import textwrap
from pathlib import Path


def mistakes_profile(tmp: Path, voc: Path) -> Path:
    """Real stages, four deliberate mistakes and one job without any: an unknown key in the
    classify jobs, a missing pretext data root, a missing mask-shape root (also the segment
    task's data root), and an input checkpoint that is no checkpoint."""
    (tmp / "bogus.pt").write_text("not a checkpoint")
    path = tmp / "mistakes.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            name: mistakes
            runs_root: {tmp / "runs"}
            results_dir: {tmp / "results"}
            data: {voc}
            seeds: [0]
            pretext:
              config: pretext/configs/builtin.yaml
              data: {tmp / "no_pretrain_set" / "VOC2007"}
              variants:
                ce: {{overrides: [mask.shapes=voc, "mask.shapes_root={tmp / "no_VOC2012"}"]}}
                ae: {{config: pretext/configs/autoencoder.yaml}}
            transfer:
              classify:
                module: transfer.classify
                args: ["checkpoint={{checkpoint}}", "finetune.epochz=5"]
                variants: [ce, ae]
              segment:
                module: transfer.segment
                data: {tmp / "no_VOC2012"}
                args: ["checkpoint={{checkpoint}}"]
                variants: [ce]
            eval:
              frozen:
                module: eval.frozen
                args: ["checkpoint={{checkpoint}}"]
                variants: [ae]
              retrieval:
                module: eval.retrieval
                per: profile
                args: ["checkpoints.ce={{checkpoint:ce}}", "checkpoints.outside={tmp / "bogus.pt"}"]
            """
        )
    )
    return path
