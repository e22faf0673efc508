"""The profile -> job graph expansion (orchestrate.profile, orchestrate.jobs): grids, resources and the cluster file, deps."""

from __future__ import annotations

import pytest
import yaml

from core.config import ConfigError
from orchestrate.jobs import expand
from orchestrate.profile import load_profile

BASE = {
    "name": "g",
    "runs_root": "/r",
    "results_dir": "/res",
    "data": "/voc",
    "seeds": [0, 1],
    "pretext": {
        "config": "pretext/configs/builtin.yaml",
        "overrides": ["optim.steps=5"],
        "resources": {"timeout_min": 30, "cpus_per_task": 2},
        "variants": {
            "rand": {"overrides": ["method=random_init"], "seeds": [0]},
            "ce": {
                "title": "CE",
                "overrides": ["loss.adversarial=false"],
                "grid": {"mask.kind": ["central", "random_block"], "loss.l2": [0.5, 1]},
                "resources": {"tasks_per_node": 2},
            },
        },
    },
    "transfer": {
        "classify": {
            "module": "transfer.classify",
            "args": ["checkpoint={checkpoint}"],
            "variants": ["ce", "rand"],
            "resources": {"timeout_min": 10, "gpus_per_node": 1},
        }
    },
    "eval": {
        "retrieval": {
            "module": "eval.retrieval",
            "per": "profile",
            "args": ["checkpoints.a={checkpoint:rand}", "checkpoints.b={checkpoint:ce,mask.kind=central,loss.l2=1}"],
            "figures": ["x.png"],
        },
    },
}  # fmt: skip


def _load(tmp_path, spec, cluster=None):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return load_profile(path, cluster=cluster)


def test_grid_expands_into_variants_with_their_overrides_and_titles(tmp_path):
    profile = _load(tmp_path, BASE)
    names = list(profile.pretext.variants)
    assert names == [
        "rand",
        "ce,mask.kind=central,loss.l2=0.5",
        "ce,mask.kind=central,loss.l2=1",
        "ce,mask.kind=random_block,loss.l2=0.5",
        "ce,mask.kind=random_block,loss.l2=1",
    ]
    assert profile.pretext.variants[names[2]].title == "CE (mask.kind=central, loss.l2=1)"
    jobs = {j.name: j for j in expand(profile)}
    job = jobs["pretext/pretext/ce,mask.kind=random_block,loss.l2=0.5/seed1"]
    assert job.run_dir == "/r/pretext/ce,mask.kind=random_block,loss.l2=0.5/seed1"
    # profile overrides, then the variant's, then its grid values (last wins in the stage's parser)
    assert job.argv[-4:] == (
        "optim.steps=5", "loss.adversarial=false", "mask.kind=random_block", "loss.l2=0.5"
    )  # fmt: skip
    # a task naming the gridded variant runs on every grid variant and seed
    classify = [j for j in jobs.values() if j.task == "classify"]
    assert len(classify) == 4 * 2 + 1
    assert len(jobs) == (4 * 2 + 1) * 2 + 1


def test_dependencies_and_placeholders(tmp_path):
    jobs = {j.name: j for j in expand(_load(tmp_path, BASE))}
    pre = jobs["pretext/pretext/ce,mask.kind=central,loss.l2=1/seed1"]
    cls = jobs["transfer/classify/ce,mask.kind=central,loss.l2=1/seed1"]
    assert cls.deps == (pre.run_dir,) and f"checkpoint={pre.run_dir}" in cls.argv
    assert cls.run_dir == "/r/transfer/classify/ce,mask.kind=central,loss.l2=1/seed1"
    ret = jobs["eval/retrieval/all/seed0"]
    assert ret.deps == ("/r/pretext/rand/seed0", "/r/pretext/ce,mask.kind=central,loss.l2=1/seed0")
    assert "checkpoints.b=/r/pretext/ce,mask.kind=central,loss.l2=1/seed0" in ret.argv
    order = list(jobs.values())
    for i, job in enumerate(order):  # dependencies first
        assert all(dep in {j.run_dir for j in order[:i]} for dep in job.deps)


def test_resources_merge_profile_variant_and_cluster_file(tmp_path):
    cluster = tmp_path / "site.yaml"
    cluster.write_text(yaml.safe_dump({
        "resources": {"slurm_partition": "cpu", "timeout_min": 5},
        "stages": {"classify": {"slurm_partition": "gpu"}},
    }))  # fmt: skip
    jobs = {j.name: j for j in expand(_load(tmp_path, BASE, cluster=str(cluster)))}
    assert jobs["pretext/pretext/rand/seed0"].resources == {
        "slurm_partition": "cpu", "timeout_min": 30, "cpus_per_task": 2
    }  # fmt: skip
    assert jobs["pretext/pretext/ce,mask.kind=central,loss.l2=1/seed0"].resources == {
        "slurm_partition": "cpu", "timeout_min": 30, "cpus_per_task": 2, "tasks_per_node": 2
    }  # fmt: skip
    assert jobs["transfer/classify/rand/seed0"].resources == {
        "slurm_partition": "gpu", "timeout_min": 10, "gpus_per_node": 1
    }  # fmt: skip
    assert jobs["eval/retrieval/all/seed0"].resources == {
        "slurm_partition": "cpu",
        "timeout_min": 5,
    }
    # no cluster file: the profile's resources only
    assert expand(_load(tmp_path, BASE))[0].resources == {"timeout_min": 30, "cpus_per_task": 2}


def _with(path: str, value):
    spec = yaml.safe_load(yaml.safe_dump(BASE, sort_keys=False))
    node = spec
    *parents, last = path.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    return spec


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (_with("frobnicate", 1), "p.yaml: unknown key(s) ['frobnicate']; valid keys: name, runs_root, results_dir, data, seeds, pretext, transfer, eval, parallel, cluster"),
        (_with("pretext.variants.ce.grdi", {}), "unknown key(s) ['pretext.variants.ce.grdi']; valid keys: pretext.variants.ce.title, pretext.variants.ce.config"),
        (_with("pretext.variants.ce.grid", {"mask.kind": []}), "pretext.variants.ce.grid: expected a mapping key -> non-empty list"),
        (_with("pretext.variants.ce.grid", {"seed": [0, 1]}), "use `seeds:`"),
        (_with("pretext.resources", {"gpus_per_nod": 1}), "unknown key(s) ['pretext.resources.gpus_per_nod']; valid keys: pretext.resources.timeout_min, pretext.resources.cpus_per_task"),
        (_with("pretext.resources", {"timeout_min": "1h"}), "pretext.resources.timeout_min: expected an integer, got str '1h'"),
        (_with("transfer.classify.resource", {}), "unknown key(s) ['transfer.classify.resource']; valid keys: transfer.classify.module"),
        (_with("transfer.classify.per", "variants"), "transfer.classify.per: 'variants' is not one of ['variant', 'profile']"),
        (_with("transfer.classify.figures", ["a.png"]), "transfer.classify.figures: only a `per: profile` task has one run"),
        (_with("parallel", "two"), "parallel: expected an integer, got str 'two'"),
        (_with("eval.figures", {"x.png": "/r/x.png"}), "unknown key(s) ['eval.figures.x.png']"),
        (_with("transfer.classify.variants", ["ce", "nope"]), "transfer.classify: names pretext variant 'nope'"),
        (_with("cluster", "/nonexistent/site.yaml"), "/nonexistent/site.yaml: config file not found"),
    ],
)  # fmt: skip
def test_bad_profiles_name_the_file_key_and_valid_keys(tmp_path, spec, message):
    with pytest.raises(ConfigError, match="p.yaml|site.yaml") as err:
        _load(tmp_path, spec)
    assert message in str(err.value)


def test_bad_cluster_file(tmp_path):
    cluster = tmp_path / "site.yaml"
    cluster.write_text("resources: {slurm_partition: x}\nstage: {}\n")
    with pytest.raises(
        ConfigError,
        match=r"site.yaml: unknown key\(s\) \['stage'\]; valid keys: resources, stages$",
    ):
        _load(tmp_path, BASE, cluster=str(cluster))  # fmt: skip
    cluster.write_text("stages: {pretext: {gpus: 1, slurm_partition: gpu}}\n")
    with pytest.raises(ConfigError, match=r"site.yaml: unknown key\(s\) \['stages.pretext.gpus'\]"):
        _load(tmp_path, BASE, cluster=str(cluster))


def test_a_tasks_figures_come_from_its_run_folder(tmp_path):
    profile = _load(tmp_path, BASE)
    assert profile.eval["retrieval"].figures == ["x.png"]
    (job,) = [j for j in expand(profile) if j.task == "retrieval"]
    assert job.run_dir == "/r/eval/retrieval/all/seed0"  # where the report copies x.png from


@pytest.mark.parametrize("name", ["builtin", "paper", "ce_masks", "ablation"])
def test_shipped_profiles_load_and_expand(name):
    from orchestrate.profile import profile_path

    jobs = expand(load_profile(profile_path(name)))
    dirs = {j.run_dir for j in jobs}
    assert len(dirs) == len(jobs) and all(d in dirs for j in jobs for d in j.deps)
    assert {j.stage for j in jobs} >= {"pretext", "transfer"}
