"""Great Expectations suites: clean sets pass; each kind of bad record is caught, named and quarantined."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from cheetah.config import SynthesizeConfig, ValidateConfig, WorldConfig
from cheetah.io import DataError
from cheetah.synthesize import synthesize
from cheetah.validate import run_suite
from cheetah.world import generate_scene, png_bytes, render, write_corpus


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sets")
    source = write_corpus(WorldConfig(out=str(root / "source"), n=16, seed=0))
    synthesize(SynthesizeConfig(source=str(source), out=str(root / "synthetic"), n=12, captions=4,
                                selector="random"))
    return {"source": source, "synthetic": root / "synthetic"}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(path: Path, change) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    change(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _messages(result) -> str:
    return "\n".join(e for f in result.failures for e in [f.title(), *f.examples])


def _quarantine(result) -> list[dict]:
    return [json.loads(line) for line in (Path(result.report_dir) / "quarantine.jsonl").read_text().splitlines()]


def test_clean_sets_pass_and_write_data_docs(clean, tmp_path):
    cfg = ValidateConfig(docs_dir=str(tmp_path / "docs"))
    source = run_suite("source", clean["source"], cfg, docs=False)
    assert source.success, source.summary()
    assert source.rows == {"captions.jsonl": 16} and source.quarantined == 0
    result = run_suite("synthetic", clean["synthetic"], cfg)
    assert result.success, result.summary()
    report = tmp_path / "docs" / "synthetic"
    assert Path(result.report_dir) == report
    assert (report / "index.html").is_file() and list((report / "validations").rglob("*.html"))
    for page in report.rglob("*.html"):  # opened from file://, Chromium refuses scripts that carry these
        tags = re.findall(r"<(?:script|link)\b[^>]*>", page.read_text(), re.IGNORECASE)
        assert tags and not [t for t in tags if re.search(r"integrity|crossorigin", t, re.IGNORECASE)], page
    assert json.loads((report / "result.json").read_text())["success"] is True
    assert (report / "quarantine.jsonl").read_text() == ""
    assert "passed" in result.summary()


def test_bad_synthetic_records_are_caught_named_and_quarantined(clean, tmp_path, capsys):
    bad = _copy(clean["synthetic"], tmp_path / "bad")
    rows = [json.loads(line) for line in (bad / "synthetic.jsonl").read_text().splitlines()]
    (bad / rows[0]["images"][1]).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # corrupted PNG

    def corrupt(rs):
        rs[1]["images"][1] = "images/missing.png"          # missing image
        rs[2]["edit"]["type"] = "recolor"                  # unknown edit type
        rs[3]["response"] = ""                             # empty response
        rs[4]["images"][0] = "../source/images/000000.png"  # path escaping the folder
    _rewrite(bad / "synthetic.jsonl", corrupt)
    docs = tmp_path / "docs"
    cfg = ValidateConfig(docs_dir=str(docs))
    assert run_suite("synthetic", clean["synthetic"], cfg, docs=False).success  # a passing report exists first

    result = run_suite("synthetic", bad, cfg, docs=False)
    assert not result.success
    text = _messages(result)
    expected = {
        1: "images[1]: images/syn-000000.png cannot be decoded",
        2: "images[1]: images/missing.png does not exist",
        3: "edit_type must be one of ['modify', 'swap', 'delete', 'add'] (got 'recolor')",
        4: "response is blank (got '')",
        5: "images[0]: '../source/images/000000.png' escapes its root folder",
    }
    for line, problem in expected.items():
        assert f"synthetic.jsonl:{line} (id 'syn-{line - 1:06d}'): {problem}" in text, (line, text)
    quarantined = {q["where"]: q for q in _quarantine(result)}
    assert set(quarantined) == {f"synthetic.jsonl:{line}" for line in expected}
    assert result.quarantined == 5
    for line, problem in expected.items():
        q = quarantined[f"synthetic.jsonl:{line}"]
        assert q["id"] == f"syn-{line - 1:06d}" and q["record"]["id"] == q["id"]
        assert any(problem.split(" (got")[0] in reason for reason in q["reasons"])

    # The failure went to its own folder; the last passing report is untouched.
    assert Path(result.report_dir) == docs / "synthetic-failed"
    assert json.loads((docs / "synthetic" / "result.json").read_text())["success"] is True
    assert json.loads((docs / "synthetic-failed" / "result.json").read_text())["success"] is False

    from cheetah.cli import main
    params = tmp_path / "params.yaml"
    params.write_text("")  # defaults, whatever the repository's params.yaml says
    assert main(["--params", str(params), "validate", "synthetic", str(bad), "--docs-dir", str(docs), "--no-docs"]) == 2
    out = capsys.readouterr().out
    assert "FAILED" in out and "synthetic.jsonl:3 (id 'syn-000002')" in out
    assert main(["--params", str(params), "validate", "synthetic", str(clean["synthetic"]), "--docs-dir", str(docs),
                 "--no-docs"]) == 0
    assert not (docs / "synthetic-failed").exists(), "a passing run clears the stale failure report"


def test_malformed_lines_and_structure_problems(clean, tmp_path):
    bad = _copy(clean["synthetic"], tmp_path / "bad")

    def corrupt(rs):
        rs[0]["instruction"] = rs[0]["instruction"].replace("<image>", "", 1)   # 1 placeholder for 2 images
        rs[1]["edit"]["region"] = [0, 0, 500, 10]                                  # outside the 64x64 image
        rs[2]["id"] = rs[3]["id"]                                                  # duplicate id
        rs[5]["images"] = rs[5]["images"][:1]                                      # a pair needs two images
        rs[6]["edit"]["after"] = None if rs[6]["edit"]["type"] != "delete" else {"x": 1}
    _rewrite(bad / "synthetic.jsonl", corrupt)
    with (bad / "captions.jsonl").open("a") as f:
        f.write("{not json\n")
    result = run_suite("synthetic", bad, ValidateConfig(docs_dir=str(tmp_path / "docs"),
                                                        max_text_chars=40), docs=False)
    text = _messages(result)
    assert "synthetic.jsonl:1 (id 'syn-000000'): instruction has 1 <image> placeholder(s) for 2 image(s)" in text
    assert "synthetic.jsonl:2 (id 'syn-000001'): edit.region [0, 0, 500, 10] extends past the 64x64 image" in text
    assert "synthetic.jsonl:3 (id 'syn-000003'): id is duplicated" in text
    assert "synthetic.jsonl:6 (id 'syn-000005'): images lists 1 path(s); expected 2" in text
    assert "synthetic.jsonl:7 (id 'syn-000006'): edit." in text
    assert "captions.jsonl:5 (id None): malformed JSON" in text
    assert "response must have 1 to 40 characters" in text  # the length bound applies
    assert any(q["where"] == "captions.jsonl:5" and q["record"] == "{not json" for q in _quarantine(result))


def test_unbalanced_edit_types_fail(clean, tmp_path):
    bad = _copy(clean["synthetic"], tmp_path / "bad")
    _rewrite(bad / "synthetic.jsonl", lambda rs: rs.__setitem__(slice(None), [r for r in rs
                                                                              if r["edit"]["type"] != "add"]))
    result = run_suite("synthetic", bad, ValidateConfig(docs_dir=str(tmp_path / "d")), docs=False)
    assert [f.title() for f in result.failures] == [
        "edit balance: expect_column_values_to_be_between(deviation): 1 bad row(s)"]
    assert "edit_type='add', share=0.0: deviation must be between 0.0 and 0.1 (got 0.25)" in _messages(result)
    loose = run_suite("synthetic", bad, ValidateConfig(docs_dir=str(tmp_path / "d"), balance_tolerance=0.5),
                      docs=False)
    assert loose.success


def test_source_suite_catches_bad_records(clean, tmp_path):
    bad = _copy(clean["source"], tmp_path / "bad")
    Image.new("RGB", (32, 32)).save(bad / "images" / "000002.png")

    def corrupt(rs):
        rs[0]["caption"] = "   "
        rs[1]["id"] = rs[0]["id"]
        rs[3]["image"] = "/etc/hostname"
        del rs[4]["caption"]
    _rewrite(bad / "captions.jsonl", corrupt)
    result = run_suite("source", bad, ValidateConfig(docs_dir=str(tmp_path / "d")), docs=False)
    text = _messages(result)
    assert "captions.jsonl:1 (id '000000'): caption is blank" in text
    assert "captions.jsonl:2 (id '000000'): id is duplicated" in text
    assert "captions.jsonl:3 (id '000002'): image: images/000002.png is 32x32, expected 64x64" in text
    assert "captions.jsonl:4 (id '000003'): image: '/etc/hostname' is absolute" in text
    assert "captions.jsonl:5 (id '000004'): caption is missing" in text
    assert result.quarantined == 5
    sized = run_suite("source", clean["source"], ValidateConfig(docs_dir=str(tmp_path / "d"), image_size=32),
                      docs=False)
    assert not sized.success and "is 64x64, expected 32x32" in _messages(sized)


def test_source_suite_refuses_what_the_stages_cannot_load(clean, tmp_path):
    """Non-UTF-8 text and a literal image placeholder would pass a lenient reader and then crash base and
    synthesize (UnicodeDecodeError) or training (image-token count): the suite refuses them, naming the record,
    and what it accepts, the stages load."""
    from cheetah.synthesize import load_source
    from cheetah.train.base import _read_source

    bad = _copy(clean["source"], tmp_path / "bad")
    rows = [json.loads(line) for line in (bad / "captions.jsonl").read_text().splitlines()]
    rows[2]["caption"] = "a large <image> red circle"
    rows[3]["image"] = "images/nowhere.png"
    lines = [json.dumps(r).encode() for r in rows]
    lines[1] = lines[1].replace(b'"caption": "', b'"caption": "caf\xe9 ')  # a Latin-1 byte
    (bad / "captions.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))
    result = run_suite("source", bad, ValidateConfig(docs_dir=str(tmp_path / "d")), docs=False)
    text = _messages(result)
    assert "captions.jsonl:2 (id '000001'): field caption: not UTF-8 text (byte 0xe9 at column" in text
    assert ("captions.jsonl:3 (id '000002'): caption contains the image placeholder <image> (only instructions "
            "may hold it)") in text
    assert "captions.jsonl:4 (id '000003'): image: images/nowhere.png does not exist" in text
    quarantined = {q["where"]: q for q in _quarantine(result)}
    assert set(quarantined) == {"captions.jsonl:2", "captions.jsonl:3", "captions.jsonl:4"}
    assert "caf\ufffd" in quarantined["captions.jsonl:2"]["record"]["caption"]  # kept, readable, in the quarantine

    # The same corpus without the three records passes, and both stages that read a corpus load all of it.
    keep = [line for k, line in enumerate((bad / "captions.jsonl").read_bytes().split(b"\n")) if k not in (1, 2, 3)]
    (bad / "captions.jsonl").write_bytes(b"\n".join(keep))
    assert run_suite("source", bad, ValidateConfig(docs_dir=str(tmp_path / "d")), docs=False).success
    items, rejects, n = load_source(bad, need_scenes=True)
    records, _ = _read_source(bad)
    assert len(items) == len(records) == n == 13 and rejects == []


def _bad_caption(corpus: Path, kind: str) -> str:
    """Make record 3 of `corpus` hold a non-UTF-8 byte or a literal `<image>` in its caption; returns the message
    every reader gives for it."""
    lines = (corpus / "captions.jsonl").read_bytes().split(b"\n")
    if kind == "non-utf8":
        lines[2] = lines[2].replace(b'"caption": "', b'"caption": "caf\xe9 ')
        problem = "captions.jsonl:3 (id '000002'): field caption: not UTF-8 text (byte 0xe9 at column"
    else:
        lines[2] = lines[2].replace(b'"caption": "', b'"caption": "<image> ')
        problem = ("captions.jsonl:3 (id '000002'): caption contains the image placeholder <image> (only "
                   "instructions may hold it)")
    (corpus / "captions.jsonl").write_bytes(b"\n".join(lines))
    return problem


@pytest.mark.parametrize("kind", ["non-utf8", "placeholder"])
def test_a_caption_no_stage_can_read_is_refused_by_validation_and_by_every_loader(clean, tmp_path, capsys, kind,
                                                                                  monkeypatch):
    """What `cheetah validate source` refuses, the stages that read a corpus (base, synthesize) refuse the same
    way: exit 2, one line naming the file, the record and the field, no traceback (cheetah.formats is the one
    definition of the record they all check)."""
    from cheetah.cli import main

    monkeypatch.setenv("CHEETAH_TRACKING", "0")  # (MLflow's own log lines would share stderr)
    bad = _copy(clean["source"], tmp_path / "bad")
    problem = _bad_caption(bad, kind)
    assert main(["validate", "source", str(bad), "--no-docs", "--docs-dir", str(tmp_path / "d")]) == 2
    assert problem in capsys.readouterr().out
    overrides = [f"world.out={bad}", f"synthesize.source={bad}", f"base.out={tmp_path / 'backbone'}",
                 f"synthesize.out={tmp_path / 'syn'}", "synthesize.selector=random", "world.image_size=64"]
    for command in ("base", "synthesize"):
        assert main([command, *(a for o in overrides for a in ("--set", o))]) == 2, command
        err = capsys.readouterr().err
        assert err.startswith("error: ") and problem in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "backbone").exists() and not (tmp_path / "syn").exists()


def test_an_image_placeholder_in_an_instructions_text_is_refused_by_validation_and_training(clean, tmp_path, capsys):
    """A literal `<image>` in the user text of a synthetic instruction, beyond the one placeholder per image the
    format puts there: `cheetah validate synthetic` exits 2 naming the record, and training's loader refuses it with
    the same message (it failed later with "sample 0 has 9 image tokens")."""
    from cheetah.cli import main
    from cheetah.train.data import ExampleFile

    bad = _copy(clean["synthetic"], tmp_path / "bad")
    _rewrite(bad / "synthetic.jsonl", lambda rs: rs[1].update(instruction=rs[1]["instruction"] + " an <image> tag"))
    problem = "synthetic.jsonl:2 (id 'syn-000001'): instruction has 3 <image> placeholder(s) for 2 image(s)"
    assert main(["validate", "synthetic", str(bad), "--no-docs", "--docs-dir", str(tmp_path / "d")]) == 2
    assert problem in capsys.readouterr().out
    with pytest.raises(DataError, match=re.escape(problem)):
        ExampleFile(bad / "synthetic.jsonl")


# ---------------------------------------------------------------------------------------------------------------
# Benchmarks
# ---------------------------------------------------------------------------------------------------------------


def _png(i: int) -> bytes:
    return png_bytes(render(generate_scene(3, i, 64)).image)


def _demon(root: Path, dataset: str, question_type: str, samples: list[dict]) -> Path:
    folder = root / dataset / "core"
    (folder / "images").mkdir(parents=True)
    for s in samples:
        for k, p in enumerate(s["task_instance"]["images_path"]):
            (folder / "images" / p).write_bytes(_png(k))
    meta = {"dataset": dataset, "split": "core", "num_sample": len(samples),
            "task_instruction": ["Describe the change. ", "What changed? "], "question_type": question_type}
    (folder / "core.json").write_text(json.dumps({"metadata": meta, "data": samples}))
    return folder / "core.json"


def _demon_set(root: Path) -> Path:
    _demon(root, "Spot-the-Diff", "open-ended", [
        {"sample_id": i, "task_instruction_id": i % 2, "response": "the car is gone",
         "task_instance": {"context": "Image 1: {image#1} Image 2: {image#2}",
                           "images_path": [f"{i}a.png", f"{i}b.png"]}}
        for i in range(3)])
    _demon(root, "NLVR2", "multi-choice", [
        {"sample_id": i, "task_instruction_id": 0, "response": "true",
         "task_instance": {"context": "{image#1} {image#2} Two dogs?", "images_path": [f"{i}a.png", f"{i}b.png"],
                           "choice_list": ["true", "false"]}} for i in range(2)])
    return root


def test_demon_suite(tmp_path):
    root = _demon_set(tmp_path / "demon")
    cfg = ValidateConfig(docs_dir=str(tmp_path / "docs"))
    result = run_suite("demon", root, cfg, docs=False)
    assert result.success, result.summary()
    assert result.rows == {"core.json metadata": 2, "core.json data": 5}

    core = root / "Spot-the-Diff" / "core" / "core.json"
    doc = json.loads(core.read_text())
    doc["data"][0]["response"] = ""
    doc["data"][1]["task_instance"]["images_path"][1] = "../../../escape.png"
    doc["data"][2]["task_instruction_id"] = 7
    doc["data"].append({"sample_id": 3, "task_instruction_id": 0, "response": "x",
                        "task_instance": {"context": "only {image#1}", "images_path": ["gone.png", "3b.png"]}})
    core.write_text(json.dumps(doc))
    nlvr = root / "NLVR2" / "core" / "core.json"
    doc = json.loads(nlvr.read_text())
    del doc["data"][1]["task_instance"]["choice_list"]
    nlvr.write_text(json.dumps(doc))
    (root / "Broken" / "core").mkdir(parents=True)
    (root / "Broken" / "core" / "core.json").write_text("{oops")

    result = run_suite("demon", root, cfg, docs=False)
    text = _messages(result)
    f = "Spot-the-Diff/core/core.json"
    assert f"{f}:data[0] (id 'Spot-the-Diff/0'): response is blank" in text
    assert f"{f}:data[1] (id 'Spot-the-Diff/1'): images_path[1]: '../../../escape.png' escapes" in text
    assert f"{f}:data[2] (id 'Spot-the-Diff/2'): task_instruction_id 7 is not an index" in text
    assert f"{f}:data[3] (id 'Spot-the-Diff/3'): context names images [1] but images_path has 2" in text
    assert f"{f}:data[3] (id 'Spot-the-Diff/3'): images_path[0]: gone.png does not exist" in text
    assert f"{f} (id 'Spot-the-Diff'): metadata.num_sample is 3 but data has 4 samples" in text
    assert "NLVR2/core/core.json:data[1] (id 'NLVR2/1'): a multi-choice sample needs" in text
    assert "Broken/core/core.json (id None): not valid JSON" in text
    assert "Broken/core/core.json (id None): folder Broken: unknown DEMON dataset 'Broken'" in text


def test_demon_suite_accepts_only_what_evaluation_loads(tmp_path):
    """Problems only the evaluation's loader sees (the task table decides that NLVR2 is multi-choice whatever the
    metadata says; an image path that is not a string) are reported as `load_problem`; what passes, loads."""
    from cheetah.evaluate.demon import load_demon

    root = _demon_set(tmp_path / "demon")
    nlvr = root / "NLVR2" / "core" / "core.json"
    doc = json.loads(nlvr.read_text())
    doc["metadata"]["question_type"] = "open-ended"
    del doc["data"][0]["task_instance"]["choice_list"]
    nlvr.write_text(json.dumps(doc))
    spot = root / "Spot-the-Diff" / "core" / "core.json"
    doc = json.loads(spot.read_text())
    doc["data"][1]["task_instance"]["images_path"][1] = 7
    spot.write_text(json.dumps(doc))
    cfg = ValidateConfig(docs_dir=str(tmp_path / "docs"))
    result = run_suite("demon", root, cfg, docs=False)
    text = _messages(result)
    assert [f.title() for f in result.failures] == [
        "core.json data: expect_column_values_to_be_null(load_problem): 2 bad row(s)"]
    assert ("NLVR2/core/core.json:data[0] (id 'NLVR2/0'): sample_id 0: a multi-choice task needs "
            "task_instance.choice_list") in text
    assert ("Spot-the-Diff/core/core.json:data[1] (id 'Spot-the-Diff/1'): sample_id 1: images_path[1]: expected a "
            "non-empty relative path, got 7") in text
    with pytest.raises(DataError):
        load_demon(root)
    for path, k in ((nlvr, 0), (spot, 1)):
        doc = json.loads(path.read_text())
        del doc["data"][k]
        doc["metadata"]["num_sample"] -= 1
        path.write_text(json.dumps(doc))
    assert run_suite("demon", root, cfg, docs=False).success
    assert [len(t.samples) for t in load_demon(root)] == [2, 1]


def _mme_file(folder: Path, stem: str, lines: list[str], image: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    if image:
        (folder / f"{stem}.png").write_bytes(_png(int(stem[-1])))


def test_mme_suite(tmp_path):
    root = tmp_path / "mme"
    q = "Is there a small red star in the image? Please answer yes or no."
    for stem in ("0001", "0002"):
        _mme_file(root / "existence", stem, [f"{q}\tYes", f"{q.replace('red', 'blue')}\tNo"])
    split = root / "scene"
    (split / "images").mkdir(parents=True)
    (split / "images" / "0003.png").write_bytes(_png(3))
    (split / "questions_answers_YN").mkdir()
    (split / "questions_answers_YN" / "0003.txt").write_text(f"{q}\tNo\n{q}\tYes\n")
    cfg = ValidateConfig(docs_dir=str(tmp_path / "docs"), max_examples=20)
    result = run_suite("mme", root, cfg, docs=False)
    assert result.success, result.summary()
    assert result.rows == {"questions": 6}

    _mme_file(root / "count", "0004", [f"{q}\tYes", f"{q}\tNo", f"{q}\tNo"])
    _mme_file(root / "count", "0005", [f"{q}\tYes", f"{q}\tMaybe"])
    _mme_file(root / "count", "0006", [f"{q}\tYes", f"{q} No"])
    _mme_file(root / "count", "0007", [f"{q}\tYes", f"{q}\tNo"], image=False)
    _mme_file(root / "count", "0009", [f"<image> {q}\tYes", f"{q}\tNo"])
    _mme_file(root / "color", "0008", [f"{q}\tYes", f"{q}\tYes"])
    (root / "color" / "0008.png").write_bytes(b"not a png")
    (root / "color" / "0010.png").write_bytes(_png(0))  # an image nobody asks about
    (root / "color" / "0011.txt").write_bytes(f"{q}\tYes\n".encode() + b"Is it caf\xe9?\tNo\n")  # Latin-1
    (root / "color" / "0011.png").write_bytes(_png(1))
    result = run_suite("mme", root, cfg, docs=False)
    text = _messages(result)
    # The evaluation's own loader (cheetah.evaluate.mme) reads every file; what it refuses is named here.
    assert ("count/0004.txt (id 'count/0004'): expected exactly two lines 'question<TAB>Yes|No' (one image, two "
            "questions), found 3") in text
    assert "count/0005.txt (id 'count/0005'): line 2: the answer must be Yes or No, got 'Maybe'" in text
    assert "count/0006.txt (id 'count/0006'): line 2: expected 'question<TAB>Yes|No'" in text
    assert "count/0007.txt:1 (id 'count/0007'): no image 0007.png/.jpg for count/0007.txt" in text
    assert "count/0009.txt (id 'count/0009'): line 1: the question contains the image placeholder <image>" in text
    assert "color/0008.txt (id 'color/0008'): image: 0008.png cannot be decoded" in text
    assert "color/0008.txt (id 'color/0008'): the ground truths of an image's two questions must be one Yes" in text
    assert "color/0010.png (id 'color/0010'): image color/0010.png has no question file 0010.txt" in text
    assert "color/0011.txt (id 'color/0011'): not UTF-8 text" in text
    assert {q["id"] for q in _quarantine(result)} == {f"count/000{k}" for k in (4, 5, 6, 7, 9)} | {
        "color/0008", "color/0010", "color/0011"}
    assert "question is missing" not in text  # a refused file is reported once, by the loader's message

    # Whatever validation accepts, evaluation loads: the same folder without the bad files passes and loads.
    from cheetah.evaluate.mme import load_mme
    for bad in ("count", "color"):
        shutil.rmtree(root / bad)
    assert run_suite("mme", root, cfg, docs=False).success
    assert sum(len(v) for v in load_mme(root).values()) == 6


def test_top_level_problems_are_errors(tmp_path, capsys):
    cfg = ValidateConfig(docs_dir=str(tmp_path / "docs"))
    with pytest.raises(DataError, match="captions.jsonl: file not found"):
        run_suite("source", tmp_path, cfg)
    with pytest.raises(DataError, match="no DEMON core.json found"):
        run_suite("demon", tmp_path, cfg)
    with pytest.raises(DataError, match="no MME subtask folder"):
        run_suite("mme", tmp_path, cfg)
    with pytest.raises(DataError, match="unknown suite 'captions'"):
        run_suite("captions", tmp_path, cfg)
    from cheetah.cli import main
    params = tmp_path / "params.yaml"
    params.write_text("")
    assert main(["--params", str(params), "validate", "source", str(tmp_path / "nowhere"),
                 "--docs-dir", str(tmp_path / "docs")]) == 2
    assert "nowhere: not found" in capsys.readouterr().err
