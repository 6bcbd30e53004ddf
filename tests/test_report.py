"""Reports: the markdown tables, the chart and the metrics file, from hand-made score dicts."""

from __future__ import annotations

import json

from PIL import Image

from cheetah.cli import main
from cheetah.evaluate.report import demon_tables, metrics_dict, mme_table, write_report

BASE_DEMON = {
    "tasks": {"NLVR2": {"metric": "accuracy", "score": 50.0}, "VIST": {"metric": "rouge_l", "score": 12.345}},
    "categories": {"multi_image_reasoning": 50.0, "visual_story_telling_list": 12.345},
    "average": 31.1725,
}
VPGC_DEMON = {
    "tasks": {"NLVR2": {"metric": "accuracy", "score": 62.5}},
    "categories": {"multi_image_reasoning": 62.5},
    "average": 62.5,
}
VPGC_MME = {"subtasks": {"existence": 185.0, "count": 96.667}, "perception": 281.667, "cognition": None,
            "perception_max": 400, "cognition_max": 0}
RESULTS = {"base": {"demon": BASE_DEMON}, "vpgc": {"demon": VPGC_DEMON, "mme": VPGC_MME}}


def test_demon_tables():
    md = demon_tables(RESULTS)
    assert "| Visual Storytelling | 12.35 | – |" in md  # category order follows the paper, missing shows "–"
    assert "| Multi-Image Reasoning | 50.00 | 62.50 |" in md
    assert "| **Average** | 31.17 | 62.50 |" in md
    assert "| VIST | Visual Storytelling | ROUGE-L | 12.35 | – |" in md
    assert "| NLVR2 | Multi-Image Reasoning | Acc | 50.00 | 62.50 |" in md
    assert md.index("Visual Storytelling |") < md.index("Multi-Image Reasoning |")
    assert "matched no option" not in md  # the hand-made scores carry no counts


def test_demon_tables_show_the_answers_that_matched_no_option():
    counted = {m: {"demon": {**r["demon"], "option_rule": "official",
                             "tasks": {t: {**v, "n": 8, "no_option": 3 if m == "base" else 1}
                                       if v["metric"] == "accuracy" else v for t, v in r["demon"]["tasks"].items()}}}
               for m, r in RESULTS.items()}
    md = demon_tables(counted)
    assert "### DEMON multi-choice answers that matched no option" in md
    assert "| NLVR2 | 3 / 8 | 1 / 8 |" in md and "| VIST |" not in md.split("matched no option")[1]
    assert "the first option, as evaluate.py's argmax of an all-zero row" in md


def test_mme_table():
    md = mme_table(RESULTS)
    assert "| Subtask | vpgc |" in md  # only models with MME results
    assert "| existence | 185.00 |" in md and "| count | 96.67 |" in md
    assert "| **Perception** (/400) | 281.67 |" in md and "Cognition" not in md


def test_metrics_dict():
    m = metrics_dict(VPGC_DEMON, VPGC_MME)
    assert m == {"demon": {"average": 62.5, "categories": {"multi_image_reasoning": 62.5}, "tasks": {"NLVR2": 62.5}},
                 "mme": {"perception": 281.667, "subtasks": {"existence": 185.0, "count": 96.667}}}


def test_write_report_and_cli(tmp_path, capsys):
    written = write_report(tmp_path / "r", RESULTS, metrics_path=tmp_path / "m.json")
    assert (tmp_path / "r" / "report.md").read_text().startswith("# Evaluation\n")
    with Image.open(written["chart"]) as im:
        assert im.format == "PNG" and im.size[0] >= 600
    assert json.loads((tmp_path / "m.json").read_text())["demon"]["average"] == 62.5  # the last model by default
    png = written["chart"].read_bytes()
    write_report(tmp_path / "r", RESULTS)
    assert written["chart"].read_bytes() == png  # byte-identical for the same numbers

    (tmp_path / "d.json").write_text(json.dumps(BASE_DEMON))
    (tmp_path / "e.json").write_text(json.dumps(VPGC_DEMON))
    (tmp_path / "f.json").write_text(json.dumps(VPGC_MME))
    assert main(["score", "report", f"base={tmp_path / 'd.json'}", f"vpgc={tmp_path / 'e.json'},{tmp_path / 'f.json'}",
                 "--out", str(tmp_path / "cli"), "--metrics", str(tmp_path / "cm.json"),
                 "--metrics-model", "base"]) == 0
    assert json.loads((tmp_path / "cm.json").read_text())["demon"]["average"] == 31.1725
    assert "| existence | 185.00 |" in (tmp_path / "cli" / "report.md").read_text()
    capsys.readouterr()
    (tmp_path / "bad.json").write_text("{}")
    assert main(["score", "report", f"x={tmp_path / 'bad.json'}", "--out", str(tmp_path / "cli")]) == 2
    assert "neither `cheetah score demon` nor `cheetah score mme` output" in capsys.readouterr().err
