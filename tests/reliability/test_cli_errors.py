"""Every ``python -m`` entry point reports a user's mistake the same way (core.cli.run_cli):
exit code 2, exactly one stderr line ``error: ...`` naming the path / key, no traceback."""

from pathlib import Path

import pytest
import torch

from core.checkpoint import save_checkpoint
from core.models import build_model

MISSING = "/nonexistent/of/the/cli/test"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli_ckpt") / "ce.pt"
    torch.manual_seed(0)
    save_checkpoint(path, {
        "method": "context_encoder", "arch": "small64", "output": "full", "dropout": 0.0,
        "model": build_model("small64").state_dict(), "discriminator": None, "optimizers": {},
        "step": 0, "rng": {}, "data_mean": [0.0, 0.0, 0.0], "config": {}, "elapsed_s": 0.0,
    })  # fmt: skip
    return path


def _cases(ckpt: Path, voc: Path, tmp: Path) -> list[tuple[str, list[str], str]]:
    """(module, argv, words the error line must contain)."""
    run = f"run_dir={tmp / 'run'}"
    image = next((voc / "JPEGImages").glob("*.jpg"))
    profile = tmp / "profile.yaml"
    profile.write_text("name: x\nfrobnicate: 1\n")
    gridded = tmp / "gridded.yaml"
    gridded.write_text(
        "name: x\nruns_root: r\nresults_dir: s\ndata: d\nseeds: [0]\n"
        "pretext: {variants: {ce: {grid: {mask.kind: [central]}, resources: {gpu: 1}}}}\n"
    )
    cases = []
    for module in ("transfer.classify", "transfer.detect", "transfer.segment"):
        cases += [
            (module, [f"checkpoint={MISSING}/ce.pt", f"data={voc}", run], f"{MISSING}/ce.pt"),
            (module, [f"checkpoint={ckpt}", f"data={MISSING}/VOC2007", run], f"{MISSING}/VOC2007"),
            (module, [f"checkpoint={ckpt}", run, "frobnicate=1"], "unknown key(s) ['frobnicate']"),
            (module, [f"checkpoint={ckpt}", run, "seed=ten"], "seed: expected an integer"),
        ]
    cases += [
        ("eval.retrieval", [run, f"checkpoints.ce={MISSING}/ce.pt", f"data={voc}"], MISSING),
        ("eval.retrieval", [run, f"checkpoints.ce={ckpt}", f"data={MISSING}/VOC2007"], MISSING),
        ("eval.retrieval", [run, "checkpoints.ce=x", "frobnicate=1"], "['frobnicate']"),
        ("eval.retrieval", [run, "checkpoints.ce=x", "ks=5"], "ks: expected a list"),
        ("eval.inpainting_bench", [run, f"ce_l2={MISSING}/ce.pt", f"data={voc}"], MISSING),
        ("eval.inpainting_bench", [run, f"data={MISSING}/VOC2007"], f"{MISSING}/VOC2007"),
        ("eval.inpainting_bench", [run, "frobnicate=1"], "unknown key(s) ['frobnicate']"),
        ("eval.inpainting_bench", [run, "max_images=all"], "max_images: expected an integer"),
        (
            "eval.query",
            ["--checkpoint", f"{MISSING}/ce.pt", "--data", str(voc), "--image", str(image)],
            f"{MISSING}/ce.pt",
        ),  # fmt: skip
        (
            "eval.query",
            ["--checkpoint", str(ckpt), "--data", f"{MISSING}/VOC2007", "--image", str(image)],
            MISSING,
        ),  # fmt: skip
        (
            "eval.query",
            [
                "--checkpoint",
                str(ckpt),
                "--data",
                str(voc),
                "--image",
                str(image),
                "--frobnicate",
                "1",
            ],
            "unrecognized arguments: --frobnicate",
        ),  # fmt: skip
        (
            "eval.query",
            ["--checkpoint", str(ckpt), "--data", str(voc), "--image", str(image), "--k", "ten"],
            "argument --k: invalid int value: 'ten'",
        ),  # fmt: skip
        (
            "orchestrate.pipeline",
            ["--profile", f"{MISSING}/p.yaml", "--dry-run"],
            f"{MISSING}/p.yaml",
        ),
        ("orchestrate.pipeline", ["--profile", str(profile), "--dry-run"], "['frobnicate']"),
        (
            "orchestrate.pipeline",
            ["--parallel", "two", "--dry-run"],
            "--parallel: invalid int value",
        ),
        (
            "orchestrate.pipeline",
            ["--profile", str(gridded), "--dry-run"],
            "unknown key(s) ['pretext.variants.ce.resources.gpu']; valid keys: ",
        ),
        (
            "orchestrate.pipeline",
            ["--profile", str(profile), "--executor", "slurm", "--status"],
            "['frobnicate']",
        ),
        (
            "orchestrate.pipeline",
            ["--executor", "slrum"],
            "argument --executor: invalid choice: 'slrum'",
        ),
        ("core.minivoc", ["--n-images", "many"], "--n-images: invalid int value: 'many'"),
    ]
    return cases


CASE_IDS = [f"{m}-{i}" for i, m in enumerate(
    ["transfer.classify"] * 4 + ["transfer.detect"] * 4 + ["transfer.segment"] * 4
    + ["eval.retrieval"] * 4 + ["eval.inpainting_bench"] * 4
    + ["eval.query"] * 4 + ["orchestrate.pipeline"] * 6 + ["core.minivoc"]
)]  # fmt: skip


@pytest.mark.parametrize("index", range(len(CASE_IDS)), ids=CASE_IDS)
def test_user_mistake_is_one_error_line_and_exit_2(fork_server, ckpt, tiny_voc, tmp_path, index):
    cases = _cases(ckpt, tiny_voc, tmp_path)
    assert len(cases) == len(CASE_IDS)
    module, argv, words = cases[index]
    pid, log = fork_server.start(module, argv)
    rc = fork_server.wait(pid)
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(lines) == 1, (rc, text[-3000:])
    assert words in lines[0], lines[0]
    assert not (tmp_path / "run" / "result.json").exists()


def test_a_bug_keeps_its_traceback(capsys):
    from core.cli import run_cli

    def buggy():
        raise KeyError("internal")

    with pytest.raises(KeyError):
        run_cli(buggy)
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: (_ for _ in ()).throw(FileNotFoundError("x.yaml: not found")))
    assert exit_.value.code == 2 and capsys.readouterr().err == "error: x.yaml: not found\n"
