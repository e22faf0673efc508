"""The pre-flight of a job graph (orchestrate/preflight.py) and the dry run
(orchestrate/dry_run.py), local executor: every mistake of a profile found at once, grouped,
before any job starts; the dry run prints the graph and writes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mistake_profiles import mistakes_profile

from core.cli import run_cli
from orchestrate import pipeline, preflight
from orchestrate.dry_run import gpu_hours, print_graph
from orchestrate.jobs import expand, write_run_json
from orchestrate.preflight import Problem, report
from orchestrate.profile import load_profile

REPO = Path(__file__).resolve().parents[2]


def tree(*roots: Path) -> dict[str, tuple[int, int]]:
    """path -> (size, mtime_ns) of every file and folder under ``roots`` (.pyc caches aside)."""
    out = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs[:] = [
                d for d in dirs if d not in ("__pycache__", ".pytest_cache", ".git", ".venv")
            ]
            for name in [*dirs, *files]:
                st = os.lstat(os.path.join(folder, name))
                out[os.path.join(folder, name)] = (st.st_size, st.st_mtime_ns)
    return out


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """``python -m orchestrate.pipeline ARGV`` in this process (its __main__: run_cli(main))."""
    with pytest.raises(SystemExit) as stop:
        run_cli(pipeline.main, argv)
    out, err = capsys.readouterr()
    return stop.value.code, out, err


def test_every_mistake_is_reported_at_once_grouped_and_nothing_starts(
    tmp_path, tiny_voc, capsys, monkeypatch
):
    monkeypatch.chdir(REPO)  # the profile's stage configs are repo-relative
    path = mistakes_profile(tmp_path, tiny_voc)
    before = tree(tmp_path, tiny_voc)
    code, _, err = run_main(["--profile", str(path), "--no-tables"], capsys)
    assert code == 2
    t = tmp_path
    assert err.splitlines() == [
        f"error: {path}: 4 problems in the 7 jobs to run; nothing was started",
        "  configs (each job's argv as its stage's parse_config reads it):",
        "    unknown key(s) ['finetune.epochz']; valid keys: finetune.epochs, finetune.batch_size, "
        "finetune.optimizer, finetune.lr, finetune.encoder_lr_mult, finetune.momentum, "
        "finetune.weight_decay, finetune.warmup_epochs, finetune.head, finetune.hidden, "
        "finetune.dropout, finetune.rescale, finetune.rescale_batch, finetune.clip_grad, finetune.amp "
        "[2 jobs: transfer/classify/ce/seed0, transfer/classify/ae/seed0]",
        "  missing files and folders:",
        f"    {t}/no_pretrain_set/VOC2007",
        f"        data.root: {t}/no_pretrain_set/VOC2007/ImageSets/Main/train.txt: split file not "
        "found (split='train', task='Main') [2 jobs: pretext/pretext/ce/seed0, pretext/pretext/ae/seed0]",
        f"    {t}/no_VOC2012",
        "        mask.shapes_root: mask.shapes_root is not a folder [1 job: pretext/pretext/ce/seed0]",
        "        data: VOC root not found (give --data <VOCdevkit/VOC2007>) "
        "[1 job: transfer/segment/ce/seed0]",
        "  present but unusable:",
        f"    {t}/bogus.pt",
        "        checkpoints.outside: cannot read checkpoint (not a torch file, or damaged: "
        "Unsupported operand 110) [1 job: eval/retrieval/all/seed0]",
    ]
    # nothing started: no run folder, no record, no data generated, no file touched
    assert tree(tmp_path, tiny_voc) == before


def test_the_preflight_uses_the_stages_own_checks(tmp_path, tiny_voc):
    """The message of each input problem is what the stage itself raises at its start."""
    from pretext import train
    from pretext.methods.context_encoder import region_shapes
    from transfer import classify

    missing = tmp_path / "no_VOC2012"
    cfg = train.parse_config(["--config", str(REPO / "pretext/configs/builtin.yaml"),
                              "mask.shapes=voc", f"mask.shapes_root={missing}"])  # fmt: skip
    with pytest.raises(FileNotFoundError) as at_start:
        region_shapes(cfg)  # what main calls before its first step
    (shapes,) = [c for c in train.input_checks(cfg) if c.key == "mask.shapes_root"]
    with pytest.raises(FileNotFoundError) as in_preflight:
        shapes.check()
    assert (
        str(in_preflight.value)
        == str(at_start.value)
        == f"{missing}: mask.shapes_root is not a folder"
    )

    cfg = classify.parse_config([f"data={tiny_voc}", "classes=[cat]", "checkpoint=x"])
    (data,) = [c for c in classify.input_checks(cfg) if c.key == "data"]
    with pytest.raises(Exception, match=r"classes \['cat'\] were asked for") as in_preflight:
        data.check()
    with pytest.raises(type(in_preflight.value)) as at_start:
        classify.check_data(cfg)  # main's own data check
    assert str(at_start.value) == str(in_preflight.value)


def test_each_pretext_method_lists_the_inputs_it_opens(tmp_path, tiny_voc):
    """``input_checks`` is the method's: the context encoder adds the random-region shapes'
    source, random / k-means init draw no masks, supervised needs labelled splits; each problem
    is worded as the run words it at its start."""
    import shutil

    from core.splits import open_split
    from pretext import train
    from pretext.methods.context_encoder import region_shapes

    def problems(*overrides: str) -> dict[str, str]:
        cfg = train.parse_config([f"data.root={tiny_voc}", *overrides])
        out = {}
        for item in train.input_checks(cfg):
            try:
                item.check()
            except Exception as err:
                out[item.key] = str(err)
        return out

    photos = tmp_path / "photos"  # a flat image folder: no class subfolders, no VOC layout
    photos.mkdir()
    for photo in sorted((tiny_voc / "JPEGImages").glob("*.jpg"))[:4]:
        shutil.copy(photo, photos / photo.name)
    missing = tmp_path / "no_VOC2012"
    no_shapes = f"{photos}: mask.shapes_root has no SegmentationObject/ folder (give a VOC root, "
    no_shapes += "e.g. VOCdevkit/VOC2012)"
    assert problems() == {}
    assert problems(f"mask.shapes_root={missing}") == {
        "mask.shapes_root": f"{missing}: mask.shapes_root is not a folder"
    }
    assert problems(f"mask.shapes_root={photos}") == {"mask.shapes_root": no_shapes}
    cfg = train.parse_config([f"data.root={tiny_voc}", f"mask.shapes_root={photos}"])
    with pytest.raises(FileNotFoundError, match="has no SegmentationObject/ folder") as at_start:
        region_shapes(cfg)
    assert str(at_start.value) == no_shapes
    for method in ("random_init", "kmeans_init", "autoencoder", "rotation", "relative_location"):
        assert problems(f"method={method}", f"mask.shapes_root={missing}") == {}, method

    flat = f"{photos}: no class subfolders (method=supervised with data.format=folder reads "
    flat += "<root>/<class>/<image>, e.g. ImageNet train/<wnid>/*.JPEG)"
    folder = ["data.format=folder", f"data.root={photos}"]
    assert problems("method=rotation", *folder) == {}
    assert problems("method=supervised", *folder) == {"data.root": flat}
    with pytest.raises(Exception, match="no class subfolders") as at_start:
        open_split(photos, "train", 64, True, labels=True, fmt="folder")  # what the run opens
    assert str(at_start.value) == flat

    val_less = tmp_path / "VOC2007"  # train split only: every method's evaluation reads val
    shutil.copytree(tiny_voc, val_less)
    (val_less / "ImageSets" / "Main" / "val.txt").unlink()
    no_val = f"{val_less}/ImageSets/Main/val.txt: split file not found (split='val', task='Main')"
    for method in ("random_init", "kmeans_init", "context_encoder", "supervised"):
        got = problems(f"method={method}", f"data.root={val_less}")
        assert got == {"data.root": no_val}, method


def test_inputs_written_by_the_graph_or_generated_are_not_checked(tmp_path, monkeypatch):
    """A transfer job's checkpoint is a pretext run folder of the graph, and the built-in
    mini-VOC is generated before the jobs start: neither exists yet, neither is a problem, and
    nothing is generated by the check."""
    monkeypatch.chdir(tmp_path)  # data/minivoc*/VOC2007 do not exist here
    (tmp_path / "c.yaml").write_text("optim:\n  steps: 2\n")
    path = tmp_path / "p.yaml"
    path.write_text(
        textwrap.dedent(
            """
            name: fresh
            runs_root: runs
            results_dir: results
            data: data/minivoc/VOC2007
            seeds: [0]
            pretext:
              config: c.yaml
              variants: {ce: {}}
            transfer:
              classify: {module: transfer.classify, args: ["checkpoint={checkpoint}"], variants: [ce]}
            """
        )
    )
    profile = load_profile(path)
    jobs = expand(profile)
    assert preflight.check_jobs(jobs, {j.run_dir for j in jobs}, str(path)) == []
    assert sorted(os.listdir(tmp_path)) == ["c.yaml", "p.yaml"]
    # the same checkpoint, not written by the graph: checked, and missing
    problems = preflight.check_jobs(jobs[1:], set(), str(path))
    assert [(p.cause, p.path, p.key, p.job) for p in problems] == [
        ("missing", "runs/pretext/ce/seed0", "checkpoint", "transfer/classify/ce/seed0")
    ]


def test_a_plain_script_is_run_not_imported_and_a_missing_module_is_a_problem(
    tmp_path, monkeypatch
):
    (tmp_path / "plain_script.py").write_text(
        f"open({str(tmp_path / 'imported')!r}, 'w').write('x')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert preflight.stage_module("plain_script") is None
    assert not (tmp_path / "imported").exists()
    assert preflight.stage_module("no_such_stage") == (
        "module 'no_such_stage' not found (python -m no_such_stage would fail)"
    )
    # found only on the PYTHONPATH a job is started with: run, not checked here
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "job_only_stage.py").write_text("def parse_config(argv): ...\n")
    monkeypatch.setenv("PYTHONPATH", str(elsewhere))
    assert preflight.stage_module("job_only_stage") is None


def test_report_groups_by_cause_and_lists_each_path_once():
    problems = [
        Problem("missing", "/d/voc", "/d/voc: VOC root not found", "t/a/seed0", "data"),
        Problem("cluster", "c.yaml", "sbatch: error: invalid partition", "p/x/seed0"),
        Problem("missing", "/d/voc", "/d/voc: VOC root not found", "t/b/seed0", "data"),
        Problem("missing", "/d/voc", "/d/voc: data folder not found", "e/r/seed0", "data"),
        Problem("config", "p.yaml", "unknown key(s) ['x']", "t/a/seed0"),
        Problem("missing", "/d/in", "/d/in: image folder not found", "p/x/seed0", "data.root"),
        Problem("missing", "/d/voc", "/d/voc: VOC root not found", "t/c/seed0", "data"),
    ]
    assert report(problems, "p.yaml", 9, "nothing was started").splitlines() == [
        "error: p.yaml: 4 problems in the 9 jobs to run; nothing was started",
        "  configs (each job's argv as its stage's parse_config reads it):",
        "    unknown key(s) ['x'] [1 job: t/a/seed0]",
        "  missing files and folders:",
        "    /d/voc",
        "        data: VOC root not found [3 jobs: t/a/seed0, t/b/seed0 and 1 more]",
        "        data: data folder not found [1 job: e/r/seed0]",
        "    /d/in",
        "        data.root: image folder not found [1 job: p/x/seed0]",
        "  cluster c.yaml:",
        "    sbatch: error: invalid partition [1 job: p/x/seed0]",
    ]
    # one problem (however many jobs it stops): one line
    assert report(problems[1:2], "p.yaml", 9, "nothing was submitted") == (
        "error: c.yaml: sbatch: error: invalid partition [1 job: p/x/seed0]; nothing was submitted"
    )


def test_paper_profile_stops_in_preflight_with_every_missing_root_once(capsys, monkeypatch):
    """PROFILE=paper make table here (no /datasets): exit 2 before any job, each root once."""
    monkeypatch.chdir(REPO)
    before = tree(REPO / "runs") if (REPO / "runs").exists() else {}
    code, out, err = run_main(["--profile", "paper"], capsys)
    assert code == 2 and "start " not in out
    lines = err.splitlines()
    assert lines[0] == (
        "error: orchestrate/profiles/paper.yaml: 4 problems in the 76 jobs to run; nothing was started"
    )
    assert lines[1] == "  missing files and folders:"
    roots = ["/datasets/imagenet", "/datasets/VOCdevkit/VOC2012", "/datasets/paris_streetview",
             "/datasets/VOCdevkit/VOC2007"]  # fmt: skip
    assert [line.strip() for line in lines if not line.startswith("        ")][2:] == roots
    for root in roots:  # once: the heading; the reasons below it do not repeat it
        assert err.count(root) == 1, root
    assert "data.root: image folder not found [12 jobs: pretext/pretext/random_init/seed0" in err
    assert "data: data folder not found [12 jobs: eval/single_label/random_init/seed0" in err
    assert (
        "mask.shapes_root: mask.shapes_root is not a folder [3 jobs: pretext/pretext/context_e"
        in err
    )
    assert "VOC root not found (give --data <VOCdevkit/VOC2007>) [36 jobs:" in err  # VOC2007
    assert (tree(REPO / "runs") if (REPO / "runs").exists() else {}) == before


def test_make_table_runs_the_pipeline_with_the_dry_run_flag():
    """`make table DRY_RUN=1` passes --dry-run (and the profile / executor / cluster)."""
    run = subprocess.run(
        ["make", "--no-print-directory", "-n", "-o", "setup", "table", "PROFILE=paper", "DRY_RUN=1", "EXECUTOR=slurm",
         "CLUSTER=slurm/clusters/example.yaml"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert run.stdout.strip().splitlines()[-1] == (
        ".venv/bin/python -m orchestrate.pipeline --profile paper --executor slurm "
        "--cluster slurm/clusters/example.yaml --dry-run"
    )
    plain = subprocess.run(["make", "--no-print-directory", "-n", "-o", "setup", "table"], cwd=REPO,
                           capture_output=True, text=True, check=True)  # fmt: skip
    assert "--dry-run" not in plain.stdout


def test_paper_make_table_through_the_makefile_stops_with_exit_2():
    """The Makefile's own recipe (set-up skipped), with this interpreter."""
    run = subprocess.run(
        ["make", "-s", "-o", "setup", "table", "PROFILE=paper", f"PY={sys.executable}"],
        cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.startswith(
        "error: orchestrate/profiles/paper.yaml: 4 problems in the 76 jobs to run"
    )
    assert "Traceback" not in run.stderr
    assert "[Makefile" in run.stderr and "Error 2" in run.stderr  # the recipe itself exited 2


@pytest.mark.parametrize("name", ["builtin", "paper"])
def test_dry_run_prints_the_graph_and_writes_nothing(name, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    profile = load_profile(pipeline.profile_path(name))
    jobs = expand(profile)
    before = tree(REPO)
    code, out, err = run_main(["--profile", name, "--dry-run"], capsys)
    assert tree(REPO) == before  # no run folder, no lock, no data, no table
    lines = out.splitlines()
    assert lines[1].split() == ["state", "stage", "run", "folder", "time", "nodes", "GPUs", "CPUs",
                                "mem", "partition", "after"]  # fmt: skip
    rows = [line.split() for line in lines[2:] if not line.startswith("      python -m")]
    assert len(rows) == len(jobs) + 1  # + the totals
    for row, job in zip(rows, jobs):
        assert " ".join(row).startswith(
            (f"to run {job.stage} {job.run_dir} ", f"done {job.stage} ")
        )
    commands = [line.strip() for line in lines if line.startswith("      python -m")]
    assert commands == [f"python -m {j.module} {' '.join(j.argv)}" for j in jobs]
    if name == "paper":
        # pretext 14 x 48 h, transfer 36 x 12 h, frozen 12 x 4 h, single-label 12 x 24 h,
        # inpainting + retrieval 2 x 4 h (1 GPU each): 672 + 432 + 48 + 288 + 8
        assert lines[-1] == (
            "total: 76 jobs (76 to run); the 76 to run (or to run again) ask for 1,448.0 "
            "GPU-hours (time limit x GPUs x nodes)"
        )
        first = rows[0]
        assert first[2:] == ["pretext", "runs/paper/pretext/random_init/seed0", "48:00", "1", "1",
                             "10", "64G", "(default)", "-"]  # fmt: skip
        assert code == 2 and "it would not start" in err.splitlines()[0]
    else:
        assert code == 0 and err == ""
        assert lines[-1].endswith("ask for 0.0 GPU-hours (time limit x GPUs x nodes)")


def test_dry_run_states_dependencies_and_gpu_hours(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            name: t
            runs_root: {tmp_path / "runs"}
            results_dir: {tmp_path / "results"}
            data: /nowhere
            seeds: [0, 1]
            pretext:
              module: plain_stage
              resources: {{timeout_min: 90, gpus_per_node: 2, nodes: 2, cpus_per_task: 4, mem_gb: 16}}
              variants: {{ce: {{}}}}
            transfer:
              classify:
                module: plain_stage
                args: ["checkpoint={{checkpoint}}"]
                variants: [ce]
                resources: {{timeout_min: 30, gpus_per_node: 1, slurm_partition: gpu}}
            """
        )
    )
    jobs = expand(load_profile(path))
    (Path(jobs[0].run_dir)).mkdir(parents=True)
    (Path(jobs[0].run_dir) / "result.json").write_text("{}")  # pretext seed0: done
    write_run_json(jobs[1], "failed")  # pretext seed1: failed, runs again
    write_run_json(jobs[2], "running")  # classify seed0: a killed run, runs again
    states = {j.run_dir: s for j, s in zip(jobs, ["done", "failed", "to run", "to run"])}
    counts = print_graph(jobs, states, str(tmp_path / "runs"), "graph:", out=sys.stdout)
    assert counts == {"done": 1, "failed": 1, "to run": 2}
    out = capsys.readouterr().out.splitlines()
    assert [line.split() for line in out[2:6]] == [
        ["done", "pretext", jobs[0].run_dir, "1:30", "2", "2", "4", "16G", "(default)", "-"],
        ["failed", "pretext", jobs[1].run_dir, "1:30", "2", "2", "4", "16G", "(default)", "-"],
        ["to", "run", "transfer", jobs[2].run_dir, "0:30", "1", "1", "1", "-", "gpu",
         "pretext/ce/seed0"],
        ["to", "run", "transfer", jobs[3].run_dir, "0:30", "1", "1", "1", "-", "gpu",
         "pretext/ce/seed1"],
    ]  # fmt: skip
    # failed pretext 1.5 h x 2 GPUs x 2 nodes = 6, two classify jobs 0.5 h x 1 GPU = 0.5 each
    assert out[-1] == (
        "total: 4 jobs (1 done, 1 failed, 2 to run); the 3 to run (or to run again) ask for 7.0 "
        "GPU-hours (time limit x GPUs x nodes)"
    )
    assert gpu_hours({"gpus_per_node": 1}) == 5 / 60  # submitit's 5-min default time limit
    # the pipeline's dry run shows the same states from the run folders
    with pytest.raises(SystemExit):
        run_cli(pipeline.main, ["--profile", str(path), "--dry-run"])
    shown = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:] if "seed" in line
             and not line.startswith("      ")]  # fmt: skip
    assert shown == ["done", "failed", "to", "to"]
    assert json.loads((Path(jobs[2].run_dir) / "run.json").read_text())["status"] == "running"
