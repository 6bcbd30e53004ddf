"""dvc.yaml against the code: every stage calls a real CLI command, reads parameters that exist and writes the paths
its configuration names (templated from params.yaml, never repeated, so a real-scale parameters file moves them all);
params.yaml holds every parameter DVC tracks; the default remote; the DAG order used by `cheetah pipeline run` and the
Prefect flow, read through DVC; `dvc exp run -S train.lr=...` on a small pipeline; and data.dvc, which versions the
source corpus: a fresh copy regenerates exactly the corpus it records, a change of `world.*` is recorded in it, and a
corpus of your own is recorded but never regenerated."""

from __future__ import annotations

import dataclasses
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cheetah.cli import build_parser
from cheetah.config import Params, WorldConfig, load_params, to_dict
from cheetah.io import DataError
from cheetah.config import ConfigError
from cheetah.pipeline import (DATA_DVC, SOURCE, ensure_source, read_data_dvc, read_stages, reads_source, stage_order,
                              use_params)

REPO = Path(__file__).resolve().parents[1]
DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())  # as written (templated)
STAGES = read_stages(REPO)  # as DVC resolves it from params.yaml


def _params_keys(stage: dict) -> list[str]:
    return [p for p in stage.get("params", []) if isinstance(p, str)]


def _outs(name: str, stages: dict = STAGES) -> set[str]:
    return set(stages[name]["outs"])


def test_stages_run_in_order_and_each_depends_on_what_it_reads():
    assert stage_order(REPO) == list(STAGES) == ["validate_source", "language", "middle", "base", "synthesize",
                                                 "validate",
                                                 "train", "benchmarks", "validate_demon", "validate_mme", "evaluate",
                                                 "register"]
    deps = {n: set(s["deps"]) for n, s in STAGES.items()}
    assert "data/language" in deps["middle"] and {"data/source", "data/language-middle"} <= deps["base"]
    assert {"data/source", "data/backbone"} <= deps["synthesize"]
    # The language model reads no data; its code dependencies (and the middle stage's) are file by file, so that a
    # change to VPG-C or to the base's measurements does not retrain it (40 and 50 minutes).
    assert all(d.startswith("cheetah/") for d in deps["language"])
    for name in ("language", "middle"):
        assert not {"cheetah/model", "cheetah/evaluate", "cheetah/model/vpgc.py", "cheetah/train/base.py"} & deps[name]
    assert "data/synthetic" in deps["validate"]
    # Every input is validated before it is used: a stage waits for a passing suite (its deterministic result file).
    assert "data/source" in deps["validate_source"]
    assert "reports/data_docs/source/result.json" in deps["base"] & deps["synthesize"]
    assert {"data/synthetic", "data/backbone", "reports/data_docs/synthetic/result.json"} <= deps["train"]
    assert "data/benchmarks/demon" in deps["validate_demon"] and "data/benchmarks/mme" in deps["validate_mme"]
    assert {"data/benchmarks/demon", "data/benchmarks/mme", "checkpoints/vpgc", "data/backbone",
            "reports/data_docs/demon/result.json", "reports/data_docs/mme/result.json"} <= deps["evaluate"]
    # The benchmark suites ask the evaluation's loaders too: a change to them reruns the validation.
    assert "cheetah/evaluate/demon.py" in deps["validate_demon"] and "cheetah/evaluate/mme.py" in deps["validate_mme"]
    assert {"checkpoints/vpgc", "metrics/eval.json"} <= deps["register"]
    # Benchmarks come from the world's held-out scenes, not from the corpus.
    assert "data/source" not in deps["benchmarks"] and "cheetah/world" in deps["benchmarks"]
    assert {"world.heldout_seed", "world.image_size"} <= set(_params_keys(DVC_YAML["stages"]["benchmarks"]))
    # Every data dependency is some earlier stage's output (code dependencies are folders of cheetah/), except the
    # source corpus, which data.dvc versions, and the user's DeepSpeed config (a file in git).
    order = list(STAGES)
    ds_config = load_params(REPO / "params.yaml").train.deepspeed_config
    for name, paths in deps.items():
        for dep in paths - {p for p in paths if p.startswith("cheetah/")} - {SOURCE, ds_config}:
            producers = [m for m in order[:order.index(name)] if any(dep == o or dep.startswith(o + "/")
                                                                    for o in _outs(m))]
            assert producers, f"{name}: {dep} is produced by no earlier stage"


def test_the_train_stage_reruns_on_exactly_the_code_a_training_state_is_resumed_under():
    """A change DVC reruns `train` for must not resume the previous code's finished state (it would export the old
    weights), and a state stays resumable across changes DVC ignores: one list, cheetah.train.state.TRAINING_CODE."""
    from cheetah.train.state import TRAINING_CODE

    code = [d for d in DVC_YAML["stages"]["train"]["deps"] if d.startswith("cheetah/")]
    assert sorted(code) == sorted(TRAINING_CODE)


def test_paths_in_dvc_yaml_are_the_configured_ones():
    p = load_params(REPO / "params.yaml")
    assert p.world.out == p.synthesize.source == SOURCE
    assert _outs("language") == {p.language.out, p.language.metrics}
    assert _outs("middle") == {p.middle.out, p.middle.metrics}
    assert _outs("base") == {p.base.out, p.base.metrics} and p.model.backbone_dir == p.base.out
    assert _outs("synthesize") == {p.synthesize.out} and p.train.data == p.synthesize.out
    assert _outs("validate") == {f"{p.validate.docs_dir}/synthetic"}
    assert STAGES["validate"]["cmd"] == f"cheetah validate synthetic {p.synthesize.out}"
    for suite, path in (("source", p.synthesize.source), ("demon", p.evaluate.demon_dir),
                        ("mme", p.evaluate.mme_dir)):
        assert _outs(f"validate_{suite}") == {f"{p.validate.docs_dir}/{suite}"}
        assert STAGES[f"validate_{suite}"]["cmd"] == f"cheetah validate {suite} {path}"
    assert _outs("train") == {p.train.out, p.train.state_dir, p.train.metrics, p.train.curve, p.train.curve_image}
    assert _outs("benchmarks") == {p.world.benchmarks}
    assert {p.evaluate.demon_dir, p.evaluate.mme_dir} == {f"{p.world.benchmarks}/demon", f"{p.world.benchmarks}/mme"}
    assert _outs("evaluate") == {p.evaluate.out, p.evaluate.metrics}
    assert _outs("register") == {"metrics/register.json"}
    # Written once: every data path of dvc.yaml is a parameter (the register receipt is the CLI's fixed one).
    raw = [entry for stage in DVC_YAML["stages"].values() for section in ("deps", "outs", "metrics", "plots")
           for e in stage.get(section, []) for entry in ([e] if isinstance(e, str) else list(e))]
    literal = [e for e in raw if not e.startswith("${") and not e.startswith("cheetah/")]
    assert literal == ["metrics/register.json"], literal
    # Metrics files are small and versioned with git; the register receipt is not (it describes a local store)
    # and persists, so DVC's run-cache never restores a receipt instead of registering; training state persists.
    raw_stages = DVC_YAML["stages"]
    train_outs = {k: v for o in raw_stages["train"]["outs"] if isinstance(o, dict) for k, v in o.items()}
    assert train_outs["${train.state_dir}"] == {"persist": True}
    assert raw_stages["register"]["outs"] == [{"metrics/register.json": {"persist": True}}]
    for name in ("language", "middle", "base", "train", "evaluate"):
        for m in raw_stages[name]["metrics"]:
            assert list(m.values())[0] == {"cache": False}, (name, m)
    # The language model is committed with git, as a downloaded Vicuna would be kept: not in DVC's cache.
    assert raw_stages["language"]["outs"] == [{"${language.out}": {"cache": False}}]
    assert raw_stages["middle"]["outs"] == [{"${middle.out}": {"cache": False}}]
    # The receipt is an output, not a metric: `dvc metrics show` lists results only (and a fresh clone has no receipt).
    assert set(DVC_YAML["metrics"]) == {"${language.metrics}", "${middle.metrics}", "${base.metrics}", "${train.metrics}",
                                        "${evaluate.metrics}"}


def test_every_cmd_is_a_cheetah_command_and_every_param_exists():
    parser = build_parser()
    defaults = Params()
    fields = {s.name: {f.name for f in dataclasses.fields(getattr(defaults, s.name))} for s in dataclasses.fields(Params)}
    for name, stage in STAGES.items():
        argv = shlex.split(stage["cmd"])
        assert argv[0] == "cheetah", stage["cmd"]
        parser.parse_args(argv[1:])  # exits (SystemExit) on an unknown command or argument
        for key in _params_keys(DVC_YAML["stages"][name]):
            section, _, field = key.partition(".")
            assert section in fields, f"{name}: unknown params section {section!r}"
            assert not field or field in fields[section], f"{name}: unknown parameter {key!r}"


def test_params_yaml_holds_every_parameter_dvc_tracks():
    """DVC fails on a declared parameter missing from params.yaml, and cannot see a field left to its default in
    code: changing that default would not rerun the stage. So params.yaml spells out every field."""
    path = REPO / "params.yaml"
    assert path.is_file(), "params.yaml is missing: dvc.yaml's stages read their parameters from it"
    tree = yaml.safe_load(path.read_text())
    load_params(path)  # valid
    missing = []
    for name, stage in DVC_YAML["stages"].items():
        for key in _params_keys(stage):
            section, _, field = key.partition(".")
            wanted = [field] if field else list(to_dict(getattr(Params(), section)))
            missing += [f"{section}.{f} ({name})" for f in wanted if f not in (tree.get(section) or {})]
    assert not missing, f"params.yaml lacks parameters that dvc.yaml tracks: {missing}"


def test_dvc_config_has_a_default_local_remote_and_no_analytics():
    config = (REPO / ".dvc" / "config").read_text()
    assert "remote = local" in config and "url = ../../cheetah-dvc-remote" in config  # <repo>/../cheetah-dvc-remote
    assert "analytics = false" in config


def test_stage_order_follows_dependencies_and_refuses_cycles(tmp_path):
    def write(stages: dict) -> Path:
        (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
        return tmp_path

    # Written out of order: `b` reads what `a` writes (inside a's output folder, a templated path), so `a` runs first.
    (tmp_path / "params.yaml").write_text("p:\n  a: out/a\n")
    assert stage_order(write({"b": {"cmd": "x", "deps": ["${p.a}/file.txt"]}, "a": {"cmd": "y", "outs": ["${p.a}"]},
                              "c": {"cmd": "z"}})) == ["a", "b", "c"]
    with pytest.raises(DataError, match="cycle"):
        stage_order(write({"a": {"cmd": "x", "deps": ["b.txt"], "outs": ["a.txt"]},
                           "b": {"cmd": "y", "deps": ["a.txt"], "outs": ["b.txt"]}}))
    # DVC expands foreach stages, and says what cannot be resolved.
    assert stage_order(write({"a": {"foreach": [1, 2], "do": {"cmd": "x ${item}"}}})) == ["a@1", "a@2"]
    with pytest.raises(DataError, match="p.missing"):
        stage_order(write({"a": {"cmd": "x ${p.missing}"}}))


def _run(cmd: list[str], cwd: Path) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_dvc_exp_run_sets_a_train_parameter(tmp_path):
    """`dvc exp run -S train.lr=...` on a two-stage pipeline shaped like ours (params by section, metrics file)."""
    git = ["git", "-c", "user.email=ci@cheetah", "-c", "user.name=ci"]
    dvc = [sys.executable, "-m", "dvc"]
    (tmp_path / "params.yaml").write_text("train:\n  lr: 0.001\n  steps: 3\nevaluate:\n  n: 2\n")
    script = ("import json, yaml; p = yaml.safe_load(open('params.yaml')); "
              "json.dump({'loss': p['train']['lr'] * p['train']['steps']}, open('metrics.json', 'w'))")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "train": {"cmd": f'{sys.executable} -c "{script}"', "params": ["train"],
                  "metrics": [{"metrics.json": {"cache": False}}]},
        "evaluate": {"cmd": f'{sys.executable} -c "open(\'eval.txt\', \'w\').write(open(\'metrics.json\').read())"',
                     "deps": ["metrics.json"], "params": ["evaluate.n"], "outs": ["eval.txt"]},
    }}))
    _run(git + ["init", "-q"], tmp_path)
    _run(dvc + ["init", "-q"], tmp_path)
    _run(dvc + ["repro", "-q"], tmp_path)
    _run(git + ["add", "-A"], tmp_path)
    _run(git + ["commit", "-qm", "baseline"], tmp_path)
    out = _run(dvc + ["exp", "run", "-S", "train.lr=0.01"], tmp_path)
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"loss": pytest.approx(0.03)}
    shown = json.dumps(json.loads(subprocess.run(dvc + ["exp", "show", "--json"], cwd=tmp_path, check=True,
                                                 capture_output=True, text=True).stdout))
    assert '"lr": 0.01' in shown and '"lr": 0.001' in shown  # the experiment and its baseline
    assert '"loss": 0.03' in shown and '"loss": 0.003' in shown


def test_pipeline_stages_command_prints_the_order(capsys, monkeypatch):
    from cheetah.cli import main

    monkeypatch.chdir(REPO)
    assert main(["pipeline", "stages"]) == 0
    assert capsys.readouterr().out.split() == list(STAGES)


def test_a_real_scale_parameters_file_drives_the_same_dag(tmp_path):
    """`cheetah pipeline use configs/vicuna-7b.yaml`: params.yaml with every field, and dvc.yaml, unchanged, then
    reads the 7B paths: the backbone the base stage brings in, the corpus and benchmarks outside the repository."""
    (tmp_path / "dvc.yaml").write_bytes((REPO / "dvc.yaml").read_bytes())
    use_params(REPO / "configs" / "vicuna-7b.yaml", tmp_path)
    p = load_params(tmp_path / "params.yaml")
    assert p.train.steps == 18_000 and p.train.synthetic_batch == 24 and p.model.preset == "vicuna-7b"
    assert p.train.launcher == "torchrun --standalone --nproc_per_node 8"
    tree = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert all(set(tree[s.name]) == {f.name for f in dataclasses.fields(getattr(p, s.name))}
               for s in dataclasses.fields(Params))  # every field written out, so DVC tracks it
    stages = read_stages(tmp_path)
    assert list(stages) == list(STAGES) and stage_order(tmp_path) == list(STAGES)
    assert _outs("base", stages) == {"data/backbone-vicuna7b", "metrics/base-vicuna7b.json"}
    assert {"/data/cc3m-subset", "data/backbone-vicuna7b"} <= set(stages["synthesize"]["deps"])
    assert {"data/synthetic-cc3m", "data/backbone-vicuna7b", "configs/deepspeed.json"} <= set(stages["train"]["deps"])
    assert {"/data/DEMON", "/data/MME_Benchmark_release_version", "checkpoints/vpgc-vicuna7b"} <= set(
        stages["evaluate"]["deps"])
    assert _outs("benchmarks", stages) == {"data/benchmarks"}  # the embedded ones never go into the real folders
    # A file whose stages would not chain is refused, naming the keys.
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {preset: vicuna-7b, backbone_dir: /models/x}\n")
    with pytest.raises(ConfigError, match="model.backbone_dir is '/models/x' but base.out is 'data/backbone'"):
        use_params(broken, tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# data.dvc: the source corpus
# ---------------------------------------------------------------------------------------------------------------


def test_data_dvc_tracks_the_source_corpus_and_no_stage_writes_it():
    """data/source is data (data.dvc), not a stage output: DVC refuses a .dvc file for a stage's output."""
    spec = yaml.safe_load((REPO / DATA_DVC).read_text())
    assert [o["path"] for o in spec["outs"]] == [SOURCE]
    assert all(SOURCE not in _outs(name) for name in STAGES)
    # It records the embedded world of params.yaml (meta.world names the md5 it describes).
    world = load_params(REPO / "params.yaml").world
    assert read_data_dvc(REPO) == {"md5": spec["outs"][0]["md5"],
                                   "world": {"n": world.n, "seed": world.seed, "image_size": world.image_size}}
    # `cheetah pipeline run` prepares the corpus when the stages it runs read it, and only then.
    assert reads_source(REPO) and reads_source(REPO, ["evaluate"]) and not reads_source(REPO, ["benchmarks"])


def _dvc_repo(path: Path, with_data_dvc: bool = False) -> Path:
    """A git + DVC repository with this checkout's DVC config (its default remote, ../cheetah-dvc-remote beside it,
    does not exist) and, optionally, its data.dvc."""
    path.mkdir()
    (path / ".dvc").mkdir()
    (path / ".dvc" / "config").write_bytes((REPO / ".dvc" / "config").read_bytes())
    if with_data_dvc:
        (path / DATA_DVC).write_bytes((REPO / DATA_DVC).read_bytes())
    _run(["git", "init", "-q"], path)
    return path


def _dvc_status(repo: Path) -> dict:
    return json.loads(_run([sys.executable, "-m", "dvc", "status", "--json", DATA_DVC], repo).split("\n")[0] or "{}")


def test_a_fresh_copy_regenerates_exactly_the_corpus_data_dvc_records(tmp_path):
    """No DVC cache, no remote data: the embedded world is regenerated byte for byte (same hash), and data.dvc is not
    touched. (If this fails after a change to cheetah/world, record the new corpus: `cheetah pipeline source` in
    the checkout, or `cheetah world && dvc add data/source`, and commit data.dvc.)"""
    repo = _dvc_repo(tmp_path / "repo", with_data_dvc=True)
    lines = []
    assert ensure_source(load_params(REPO / "params.yaml"), repo, echo=lines.append) == "regenerated", lines
    assert (repo / DATA_DVC).read_bytes() == (REPO / DATA_DVC).read_bytes()
    assert _dvc_status(repo) == {}
    assert ensure_source(load_params(REPO / "params.yaml"), repo, echo=lines.append) == "up to date"


@pytest.mark.slow
def test_world_params_are_recorded_in_data_dvc_and_a_corpus_of_your_own_is_never_regenerated(tmp_path):
    repo = _dvc_repo(tmp_path / "repo")
    params = Params()
    small = dataclasses.replace(params, world=dataclasses.replace(params.world, n=6, image_size=32))
    echo = [].append
    # No data.dvc yet: the world is generated and recorded (data.dvc written, data/.gitignore by DVC).
    assert ensure_source(small, repo, echo=echo) == "recorded"
    first = read_data_dvc(repo)
    assert first["world"] == {"n": 6, "seed": 0, "image_size": 32}
    assert (repo / "data" / ".gitignore").read_text().split() == ["/source"]
    # Another world.n: regenerated and recorded, so every stage reading data/source reruns (DVC's hash check).
    other = dataclasses.replace(small, world=dataclasses.replace(small.world, n=5))
    assert ensure_source(other, repo, echo=echo) == "recorded"
    assert read_data_dvc(repo)["md5"] != first["md5"] and read_data_dvc(repo)["world"]["n"] == 5
    # Back to the first data.dvc (e.g. `git checkout data.dvc params.yaml`): restored from DVC's cache.
    (repo / DATA_DVC).write_text(yaml.safe_dump({"meta": {"world": {"n": 6, "seed": 0, "image_size": 32,
                                                                    "md5": first["md5"]}},
                                                 "outs": [{"path": SOURCE, "md5": first["md5"], "hash": "md5"}]}))
    assert ensure_source(small, repo, echo=echo) == "restored" and _dvc_status(repo) == {}

    # A corpus of your own (no world.json) replaces it: recorded as it is, whatever world.* says; not the world.
    own = repo / SOURCE
    for f in own.rglob("world.json"):
        f.unlink()
    (own / "captions.jsonl").write_text('{"id": "a", "image": "images/000000.png", "caption": "mine"}\n')
    assert ensure_source(small, repo, echo=echo) == "recorded"
    mine = read_data_dvc(repo)
    assert mine["world"] is None and "world" not in (yaml.safe_load((repo / DATA_DVC).read_text()).get("meta") or {})
    assert ensure_source(small, repo, echo=echo) == "up to date"
    assert not (own / "world.json").exists()
    # Missing and nowhere to pull it from: a clear error, and no embedded world put in its place.
    import shutil

    shutil.rmtree(own)
    shutil.rmtree(repo / ".dvc" / "cache")
    with pytest.raises(DataError, match=r"data/source is missing.*your own corpus.*dvc remote add"):
        ensure_source(small, repo, echo=echo)
    assert not own.exists() and read_data_dvc(repo) == mine
    elsewhere = dataclasses.replace(small, world=dataclasses.replace(small.world, out="data/world"))
    with pytest.raises(DataError, match=r"not the embedded world"):
        ensure_source(elsewhere, repo, echo=echo)


def test_stale_stages_names_the_code_and_parameters_that_differ_from_dvc_lock(tmp_path):
    """What `cheetah pipeline check` (and .ci/run) enforces, on a copy of this project: a code or parameter edit
    after dvc.lock was written makes the stages that depend on it stale, naming the file and key; outputs that are
    not built yet (a fresh clone) are not a change."""
    from conftest import copy_checkout

    from cheetah.pipeline import metric_differences, stale_stages

    repo = copy_checkout(tmp_path, ["cheetah", "configs", "dvc.yaml", "dvc.lock", "params.yaml", "data.dvc",
                                    ".dvc/config", ".dvcignore"])
    _run(["git", "init", "-q"], repo)
    with open(repo / "cheetah" / "registry" / "gate.py", "a") as f:
        f.write("# an edit after the pipeline ran\n")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["evaluate"]["max_new_tokens"] += 1  # a key the register stage tracks by name
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    after = stale_stages(repo)["register"]
    assert "cheetah/registry modified" in after and "params.yaml: evaluate.max_new_tokens modified" in after
    # Reproduced metrics: speed figures are not compared, results are, with a relative tolerance.
    (repo / "m.json").write_text(json.dumps({"a": {"score": 50.4}, "samples_per_s": 9.0, "new": 1}))
    committed = {"a": {"score": 50.0}, "samples_per_s": 3.0}
    assert metric_differences("m.json", committed, 0.1, repo) == ["m.json: new appeared"]
    assert metric_differences("m.json", committed, 0.0, repo) == ["m.json: a.score was 50.0, now 50.4",
                                                                 "m.json: new appeared"]


@pytest.mark.slow
def test_a_corrupt_record_in_your_corpus_stops_the_pipeline_at_validation(tmp_path):
    """`dvc repro base` on a corpus of your own with a non-UTF-8 caption, a caption holding `<image>` and a missing
    image: the validate_source stage fails (exit 2) naming each record, writes the quarantine, and base never runs."""
    from conftest import copy_checkout

    from cheetah.pipeline import dvc as run_dvc
    from cheetah.world import write_corpus

    repo = copy_checkout(_dvc_repo(tmp_path / "repo"), ["cheetah", "dvc.yaml", "params.yaml", ".dvcignore"])
    corpus = write_corpus(WorldConfig(out=str(repo / SOURCE), n=6, seed=0))
    (corpus / "world.json").unlink()  # your own corpus, not the embedded world
    rows = [json.loads(line) for line in (corpus / "captions.jsonl").read_text().splitlines()]
    rows[2]["caption"] = "two <image> circles"
    rows[4]["image"] = "images/lost.png"
    lines = [json.dumps(r).encode() for r in rows]
    lines[3] = lines[3].replace(b'"caption": "', b'"caption": "\xff')
    (corpus / "captions.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    # base's other upstream stages, which DVC may run first: seconds, not the committed minutes of evaluation.
    params["language"].update(steps=2, batch_size=4, warmup_steps=1, eval_scenes=2, threads=1)
    params["middle"].update(steps=2, batch_size=2, input_batch=2, warmup_steps=1, eval_scenes=2, threads=1)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    done = run_dvc("repro", "base", root=repo, capture=True)
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "validate_source" in out
    assert "captions.jsonl:3 (id '000002'): caption contains the image placeholder <image>" in out
    assert "captions.jsonl:4 (id '000003'): field caption: not UTF-8 text (byte 0xff" in out
    assert "captions.jsonl:5 (id '000004'): image: images/lost.png does not exist" in out
    assert "failed to reproduce 'validate_source'" in out and "exited with 2" in out  # bad data: no retry
    quarantine = [json.loads(line) for line in
                  (repo / "reports/data_docs/source-failed/quarantine.jsonl").read_text().splitlines()]
    assert [q["where"] for q in quarantine] == ["captions.jsonl:3", "captions.jsonl:4", "captions.jsonl:5"]
    assert not (repo / "data" / "backbone").exists() and not (repo / "reports/data_docs/source").exists()



def test_dvc_plots_render_offline():
    """`dvc plots show` uses .dvc/plots/offline.html: DVC's page with the Vega scripts inlined, so the HTML it writes
    loads nothing from the network."""
    import configparser
    import re

    config = configparser.ConfigParser()
    config.read(REPO / ".dvc" / "config")
    template = (REPO / ".dvc" / config["plots"]["html_template"]).read_text()
    assert "{plot_divs}" in template and "vegaEmbed" in template
    assert not re.search(r"""<(script|link)[^>]+(src|href)=["']?https?:""", template)
