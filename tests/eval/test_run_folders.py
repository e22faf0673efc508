"""One run-folder contract for every stage (core.run_folder; docs/reliability.md): a finished folder
returns its recorded result, a changed config is refused (exit 2, one ``error:`` line naming the
folder and the key) unless force=true, which recomputes; every checkpoint read is recorded with its
sha256."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core import run_folder
from core.checkpoint import file_sha256, resolve_checkpoint_path
from core.cli import run_cli
from eval import frozen, retrieval
from eval import inpainting_bench as bench
from pretext import train
from transfer import classify


def _inpainting(tiny_voc, ckpt, other, tmp_path):
    argv = [f"data={tiny_voc}", f"ce_l2={ckpt}", "methods=[mean_fill,ce_l2]", "max_images=4",
            "grid_rows=0", f"cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    return bench, argv, "telea_radius=5", "telea_radius: 3 -> 5", {"ce_l2": ckpt}


def _retrieval(tiny_voc, ckpt, other, tmp_path):
    argv = [f"checkpoints.ce={ckpt}", f"checkpoints.other={other}", f"data={tiny_voc}",
            "layers=[pool5]", "ks=[1]", "approx=[]", "grid_queries=0",
            f"cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    return retrieval, argv, "ks=[1,2]", "ks: [1] -> [1, 2]", {"ce": ckpt, "other": other}


def _frozen(tiny_voc, ckpt, other, tmp_path):
    argv = [f"checkpoint={ckpt}", f"data={tiny_voc}", "layers=[conv1]", "svm.costs=[1.0]",
            "knn.k=5", f"cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    return frozen, argv, "knn.k=3", "knn.k: 5 -> 3", {"checkpoint": ckpt}


def _classify(tiny_voc, ckpt, other, tmp_path):
    argv = [f"checkpoint={ckpt}", f"data={tiny_voc}", "modes=[linear_pool5]", "progress=false",
            "linear.max_iter=20"]  # fmt: skip
    return classify, argv, "linear.max_iter=10", "linear.max_iter: 20 -> 10", {"checkpoint": ckpt}


def _pretext(tiny_voc, ckpt, other, tmp_path):
    argv = [f"data.root={tiny_voc}", "data.num_workers=0", "optim.batch_size=8", "optim.steps=2",
            "optim.warmup_steps=1", "checkpoint_every=2", "log_every=1", "eval_images=4",
            "threads=1"]  # fmt: skip
    return train, argv, "optim.lr=0.01", "optim.lr: 0.001 -> 0.01", {}


STAGES = {"inpainting_bench": _inpainting, "retrieval": _retrieval, "frozen": _frozen,
          "classify": _classify, "pretext": _pretext}  # fmt: skip


def run_cli_argv(module, argv):
    return run_cli(lambda: module.main(module.parse_config(argv)))


@pytest.mark.parametrize("stage", STAGES)
def test_finished_changed_forced_and_provenance(
    stage, tiny_voc, tiny_ckpt, make_checkpoint, tmp_path, capsys
):
    other = make_checkpoint(tmp_path / "other.pt", seed=3)
    module, argv, change, words, read = STAGES[stage](tiny_voc, tiny_ckpt, other, tmp_path)
    run_dir = tmp_path / "run"
    argv = [*argv, f"run_dir={run_dir}"]
    first = run_cli_argv(module, argv)
    assert run_folder.is_finished(run_dir) and run_folder.read_result(run_dir) == first

    # provenance: every checkpoint read (pretext: the one written), path + the file's sha256
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["status"] == "done"
    if stage == "pretext":
        recorded = {"checkpoint": meta["checkpoint"]}
        read = {"checkpoint": run_dir}
    else:
        recorded = meta["sources"]
    assert set(recorded) == set(read)
    for name, path in read.items():
        file = resolve_checkpoint_path(path)
        assert recorded[name] == {**recorded[name], "path": str(file), "sha256": file_sha256(file)}

    # finished + same config: the recorded result, nothing recomputed (the marker comes back)
    marked = {**first, "marker": 123.0}
    (run_dir / "result.json").write_text(json.dumps(marked))
    assert run_cli_argv(module, argv) == marked

    # a changed config: exit 2, one error line naming the folder and the key (old -> new)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_cli_argv(module, [*argv, change])
    assert exit_.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and str(run_dir) in lines[0] and words in lines[0], lines
    assert "force=true" in lines[0]
    assert run_folder.read_result(run_dir) == marked  # the folder is left as it was

    # force=true recomputes with the new config
    forced = run_cli_argv(module, [*argv, change, "force=true"])
    assert "marker" not in forced and run_folder.read_result(run_dir) == forced
    key, value = change.split("=")
    saved = run_folder.flatten(run_folder.read_yaml(run_dir / "config.yaml"))
    assert str(saved[key]).replace(" ", "") == value


def test_eval_stage_refuses_other_weights_at_the_same_path(
    tiny_voc, make_checkpoint, tmp_path, capsys
):
    """The config is the same (same path), the checkpoint was retrained: refused, names it."""
    ckpt = make_checkpoint(tmp_path / "ce.pt", seed=0)
    argv = [f"checkpoints.ce={ckpt}", f"data={tiny_voc}", "layers=[pool5]", "ks=[1]",
            "approx=[]", "grid_queries=0", f"cache_dir={tmp_path / 'cache'}",
            f"run_dir={tmp_path / 'run'}"]  # fmt: skip
    run_cli_argv(retrieval, argv)
    make_checkpoint(ckpt, seed=7)
    with pytest.raises(SystemExit) as exit_:
        run_cli_argv(retrieval, argv)
    assert exit_.value.code == 2
    assert "checkpoint ce: sha256" in capsys.readouterr().err


def test_config_changes_free_keys_defaults_and_legacy():
    saved = {"a": 1, "opt": {"lr": 0.1, "workers": 2}, "mask": {"kind": "x"}}
    now = {"a": 1, "opt": {"lr": 0.2, "workers": 4}, "mask": {"kind": "x", "band": "off"}}
    assert run_folder.config_changes(saved, now, {"opt.workers"}, now) == ["opt.lr: 0.1 -> 0.2"]
    # a key added later keeps its default: no change; another value is one
    same = {**now, "opt": saved["opt"]}
    assert run_folder.config_changes(saved, same, (), now) == []
    assert run_folder.config_changes(saved, same, (), {"mask": {"band": "on"}}) == [
        "mask.band: None -> 'off'"
    ]
    # what a run of that time did instead of the new default
    legacy = {"mask.band": "on"}
    assert run_folder.config_changes(saved, same, (), now, legacy) == ["mask.band: 'on' -> 'off'"]


def test_is_finished_and_read_result(tmp_path: Path):
    assert not run_folder.is_finished(tmp_path) and run_folder.read_result(tmp_path) is None
    run_folder.finish(tmp_path, {"x": 1, "source": "voc"}, {"task": "t"})
    assert run_folder.is_finished(tmp_path)
    assert run_folder.read_result(tmp_path) == {"x": 1.0, "source": "voc"}
    with pytest.raises(TypeError, match="is not a number"):
        run_folder.finish(tmp_path, {"x": [1]}, {})
