"""Prediction files in the official formats, written so that a killed evaluation resumes where it stopped.

Every prediction is appended to a journal (`*.partial.jsonl`, one JSON line per sample, flushed and fsynced) the
moment it is produced; `finalize()` folds the journal into the official file in one atomic write and removes it:

    DEMON:  <dir>/<Dataset>/pred.json     [{"sample_id", "pred_response", "gt_response"}]   (what evaluate.py reads)
    MME:    <dir>/<subtask>.txt           image<TAB>question<TAB>gt<TAB>prediction, an image's two questions adjacent

A store opened on a folder that already holds a journal or a final file picks up what is there: `done_ids()` is
what the evaluation skips. A torn last line (the process died mid-write) is dropped. If the store is given `meta`
(model, checkpoint, decoding settings), resuming with different `meta` is refused instead of mixing two models'
answers in one file.

Data-parallel evaluation (`rank`, `world` > 1): each rank appends to a journal of its own
(`.<stem>.partial-rank<r>.jsonl`, so no two processes ever write one file) and reads every rank's journal, so a
resumed run, with any number of ranks, skips what any rank of the killed run had finished. `reload()` re-reads
them all (rank 0, once every rank is done) and `finalize()` merges them in sample order and removes them all.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from cheetah.evaluate.demon import DemonSample, resolve_dataset
from cheetah.evaluate.mme import MMESample, read_results_file, resolve_subtask, results_line
from cheetah.evaluate.scoring import read_demon_predictions
from cheetah.io import DataError, atomic_write_json, atomic_write_jsonl, atomic_write_text, read_json

Benchmark = Literal["demon", "mme"]


class PredictionStore:
    """The predictions of one task (a DEMON dataset or an MME subtask) under `directory`."""

    def __init__(self, directory: str | Path, benchmark: Benchmark, task: str, meta: dict[str, Any] | None = None,
                 rank: int = 0, world: int = 1):
        directory = Path(directory)
        self.benchmark = benchmark
        if benchmark == "demon":
            self.task = resolve_dataset(task).dataset
            self.path = directory / self.task / "pred.json"
        elif benchmark == "mme":
            self.task = resolve_subtask(task)
            self.path = directory / f"{self.task}.txt"
        else:
            raise ValueError(f"benchmark must be 'demon' or 'mme', got {benchmark!r}")
        own = ".partial.jsonl" if world == 1 else f".partial-rank{rank}.jsonl"
        self.journal = self.path.with_name(f".{self.path.stem}{own}")
        self.meta_path = self.path.with_name(f".{self.path.stem}.meta.json")
        self._check_meta(meta)
        self.reload()

    def journals(self) -> list[Path]:
        """Every rank's journal of this task (this store's own included), in a fixed order."""
        return sorted(self.path.parent.glob(f".{self.path.stem}.partial*.jsonl"))

    def reload(self) -> None:
        """(Re-)read the final file and every journal (e.g. after the other ranks have added their answers)."""
        self._records: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            for rec in self._read_final():
                self._records[str(rec["sample_id"])] = rec
        for journal in self.journals():
            for rec in self._read_journal(journal):
                self._records[str(rec["sample_id"])] = rec

    # -- state on disk ---------------------------------------------------------------------------------------------

    def _check_meta(self, meta: dict[str, Any] | None) -> None:
        if meta is None:
            return
        meta = json.loads(json.dumps(meta))  # the form it takes on disk, for comparison
        if self.meta_path.exists():
            old = read_json(self.meta_path)
            if old != meta:
                raise DataError(f"{self.path}: existing predictions were made with {old}, not {meta}; remove them "
                                f"or write to another folder")
        else:
            atomic_write_json(self.meta_path, meta)

    def _read_final(self) -> list[dict[str, Any]]:
        if self.benchmark == "demon":
            return [{k: r[k] for k in ("sample_id", "pred_response", "gt_response") if k in r}
                    for r in read_demon_predictions(self.path)]
        seen: dict[str, int] = {}
        out = []
        for r in read_results_file(self.path):
            index = seen.get(r.image, 0)
            seen[r.image] = index + 1
            out.append({"sample_id": f"{r.image}#{index}", "pred_response": r.pred, "gt_response": r.gt,
                        "image": r.image, "question": r.question})
        return out

    def _read_journal(self, journal: Path) -> list[dict[str, Any]]:
        raw = journal.read_bytes()
        lines = raw.split(b"\n")
        records, torn = [], False
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or "sample_id" not in rec:
                    raise ValueError("not a prediction record")
            except ValueError:
                # Only the unterminated last line can be a write cut short by a kill; anything else is damage.
                if n == len(lines) and not raw.endswith(b"\n"):
                    torn = True
                    continue
                raise DataError(f"{journal}:{n}: malformed prediction record") from None
            records.append(rec)
        if torn and journal == self.journal:  # another rank's journal is only read (that rank may be writing it)
            atomic_write_jsonl(self.journal, records)  # so the next append starts on a clean line
        return records

    # -- API -------------------------------------------------------------------------------------------------------

    def done_ids(self) -> set[str]:
        """Sample ids (as strings) that already have a prediction."""
        return set(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def add(self, sample_id: int | str, pred: str, gt: str, *, image: str | None = None,
            question: str | None = None) -> None:
        """Record one prediction durably. MME needs the image name and the question (the results-file columns)."""
        key = str(sample_id)
        if key in self._records:
            raise ValueError(f"{self.path}: sample {sample_id!r} already has a prediction")
        if not isinstance(pred, str):
            raise TypeError(f"the prediction for {sample_id!r} must be a string, got {type(pred).__name__}")
        rec: dict[str, Any] = {"sample_id": sample_id, "pred_response": pred, "gt_response": str(gt)}
        if self.benchmark == "mme":
            if image is None or question is None:
                raise ValueError("MME predictions need image= and question=")
            if key not in (f"{image}#0", f"{image}#1"):
                # The results file has no id column: ids are rebuilt from the image and the line order on resume.
                raise ValueError(f"an MME sample id is '<image>#0' or '<image>#1' (MMESample.key), got {sample_id!r}")
            rec.update(image=image, question=question)
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        with open(self.journal, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._records[key] = rec

    def add_sample(self, sample: DemonSample | MMESample, pred: str) -> None:
        """`add` with the ids and ground truth taken from a loaded sample."""
        if isinstance(sample, MMESample):
            self.add(sample.key, pred, sample.answer, image=sample.image, question=sample.question)
        else:
            self.add(sample.sample_id, pred, sample.response)

    def finalize(self, expected_ids: Iterable[int | str] | None = None) -> Path:
        """Write the official file atomically (in `expected_ids` order when given, else in the order the predictions
        were made) and drop the journal. With `expected_ids`, a missing or unexpected prediction is an error."""
        records = list(self._records.values())
        if expected_ids is not None:
            order = [str(i) for i in expected_ids]
            missing = [i for i in order if i not in self._records]
            extra = sorted(set(self._records) - set(order))
            if missing or extra:
                raise DataError(f"{self.path}: cannot finalize: {len(missing)} sample(s) without a prediction "
                                f"{missing[:5]}, {len(extra)} unexpected {extra[:5]}")
            records = [self._records[i] for i in order]
        if self.benchmark == "demon":
            atomic_write_json(self.path, records, indent=4)
        else:
            # Pair each image's questions on adjacent lines, so the official calculation.py reads the file too.
            groups: dict[str, list[dict[str, Any]]] = {}
            for r in records:
                groups.setdefault(r["image"], []).append(r)
            for group in groups.values():
                group.sort(key=lambda r: str(r["sample_id"]))  # `<image>#0` before `<image>#1`, as re-read
            atomic_write_text(self.path, "".join(results_line(r["image"], r["question"], r["gt_response"],
                                                              r["pred_response"])
                                                 for group in groups.values() for r in group))
        for journal in self.journals():
            journal.unlink(missing_ok=True)
        return self.path
