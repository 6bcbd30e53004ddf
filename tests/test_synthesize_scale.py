"""Synthesis at scale: shards on a real local Dask cluster, resume after a kill, a failing shard, progress output,
and no image that one stage rejected used by another (issue 15). `source` and `backbone` come from conftest.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from cheetah.config import SynthesizeConfig
from cheetah.synthesize import ShardFailed, Synthesizer, synthesize
from cheetah.synthesize import pipeline
from cheetah.synthesize.pipeline import Draws, SynthesisJob, build_backends, load_source, run_shard
from cheetah.synthesize.shards import WorkArea, plan_shards, run_key

N, CAPTIONS, SHARD = 16, 4, 4  # 4 shards


def _cfg(source: Path, out: Path, **kw) -> SynthesizeConfig:
    return SynthesizeConfig(source=str(source), out=str(out), **{"n": N, "captions": CAPTIONS, "shard_size": SHARD,
                                                                 **kw})


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_dask_cluster_gives_the_bytes_of_the_local_executor_for_1_and_2_workers(source, backbone, tmp_path, capsys):
    from cheetah.cli import main

    local = synthesize(_cfg(source, tmp_path / "local"), backbone)
    reference = _tree(tmp_path / "local")
    assert local["pairs"] == N and {"synthetic.jsonl", "stats.json"} <= set(reference)

    one = synthesize(_cfg(source, tmp_path / "dask1", executor="dask", workers=1, shard_size=5), backbone)
    assert one == local and _tree(tmp_path / "dask1") == reference

    # 2 workers through the CLI: the backbone is loaded from its directory once per worker; bar and logs on stderr.
    from cheetah.model.backbones import save_backbone

    save_backbone(backbone, tmp_path / "backbone")
    capsys.readouterr()
    (tmp_path / "params.yaml").write_text("{}\n")
    assert main(["--params", str(tmp_path / "params.yaml"), "synthesize", "--source", str(source),
                 "--out", str(tmp_path / "dask2"), "--n", str(N), "--captions", str(CAPTIONS),
                 "--shard-size", "3", "--executor", "dask", "--workers", "2",
                 "--backbone", str(tmp_path / "backbone")]) == 0
    err = capsys.readouterr().err
    assert _tree(tmp_path / "dask2") == reference
    assert "INFO cheetah.synthesize.pipeline: synthesize: 16 pairs in 6 shard(s) of up to 3; 6 to run" in err
    assert "started a local Dask cluster: 2 worker process(es)" in err
    assert "synthesize: 100%" in err and f"{N}/{N}" in err  # the tqdm bar
    assert "progress synthesize 16/16" in err and "pairs/s)" in err  # the machine-readable line and the rate
    # Work areas are gone once the output is merged.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_backends_are_built_once_per_worker_process(source, tmp_path, monkeypatch):
    cfg = _cfg(source, tmp_path / "out", selector="random")
    items, _, _ = load_source(cfg.source, need_scenes=True)
    draws = Draws(cfg, items)
    key = run_key(cfg, None, items)
    shards = plan_shards(cfg.n, cfg.shard_size, key, [draws.pair_item(i) for i in range(cfg.n)])
    work = WorkArea(cfg.out).open()
    built = []
    monkeypatch.setattr(pipeline, "build_backends", lambda c, b=None: built.append(1) or build_backends(c, b))
    monkeypatch.setattr(pipeline, "_PROCESS_SYNTHESIZER", None)
    job = SynthesisJob(cfg, None, items, key, str(work.path))
    for shard in shards:
        run_shard(job, shard)
    assert len(built) == 1 and all(work.is_done(s) for s in shards)
    assert isinstance(pipeline._PROCESS_SYNTHESIZER[1], Synthesizer)
    monkeypatch.setattr(pipeline, "_PROCESS_SYNTHESIZER", None)


_KILL_SCRIPT = """
import os, signal, sys
from cheetah.config import SynthesizeConfig
from cheetah.synthesize import pipeline, synthesize
real = pipeline.Synthesizer.make_pair
def make_pair(self, i):
    if i == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of a shard
    return real(self, i)
pipeline.Synthesizer.make_pair = make_pair
synthesize(SynthesizeConfig(**{cfg}))
"""


def test_a_killed_run_resumes_with_only_the_missing_shards(source, tmp_path, monkeypatch):
    synthesize(_cfg(source, tmp_path / "reference", selector="random"))
    cfg = _cfg(source, tmp_path / "out", selector="random")
    kill_at = 9  # in shard 2 of 0..3: shards 0 and 1 are finished
    script = _KILL_SCRIPT.format(kill_at=kill_at, cfg={k: getattr(cfg, k) for k in ("source", "out", "n", "captions",
                                                                                  "shard_size", "selector")})
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()
    work = tmp_path / ".out.shards"
    assert sorted(p.name[:5] for p in work.iterdir() if not p.name.startswith((".", "cheetah"))) == ["00000", "00001"]
    assert any(p.name.endswith(".tmp") for p in work.iterdir())  # the shard being written when killed

    made: list[int] = []
    real = pipeline.Synthesizer.make_pair
    monkeypatch.setattr(pipeline.Synthesizer, "make_pair", lambda self, i: made.append(i) or real(self, i))
    synthesize(cfg)
    assert made == list(range(2 * SHARD, N))  # only shards 2 and 3 ran
    assert _tree(tmp_path / "out") == _tree(tmp_path / "reference")
    assert not work.exists()


@pytest.fixture(scope="module")
def cluster():
    """A running 2-worker Dask cluster that the stage connects to by address (as to a real one)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        yield c.scheduler_address


def test_a_broken_record_fails_its_shard_by_name_and_the_other_shards_are_kept(source, tmp_path, monkeypatch,
                                                                                 cluster, caplog):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(source, src)
    cfg = _cfg(src, tmp_path / "out", selector="random", executor="dask", address=cluster)
    items, _, _ = load_source(src, need_scenes=True)
    draws = Draws(cfg, items)
    broken = draws.pair_item(6)  # drawn by pair 6 (shard 1); the corpus has 30 records, so by no other pair
    assert [i for i in range(N) if draws.pair_item(i).id == broken.id] == [6]
    image = src / broken.image
    good = image.read_bytes()
    real_load = pipeline.load_source

    def load_then_break(*args, **kwargs):
        # The record passes the corpus check; then its image is not what the workers read (changed on the
        # shared storage): the shard must fail and say which record, not skip it or use the new bytes.
        out = real_load(*args, **kwargs)
        image.write_bytes((src / draws.pair_item(0).image).read_bytes())
        return out

    monkeypatch.setattr(pipeline, "load_source", load_then_break)
    with pytest.raises(ShardFailed) as failure:
        synthesize(cfg)
    message = str(failure.value)
    assert f"shard 1 (pairs 4-7) failed at pair 6 on source record id '{broken.id}'" in message
    assert f"captions.jsonl line {broken.index + 1}, image {broken.image}" in message
    assert "changed since the corpus was checked" in message and "1 of 4 shard(s) failed" in message
    assert failure.value.record == {"id": broken.id, "line": broken.index + 1, "image": broken.image}
    assert not (tmp_path / "out").exists()
    kept = sorted(p.name[:5] for p in (tmp_path / ".out.shards").iterdir() if p.name[0].isdigit())
    assert kept == ["00000", "00002", "00003"]

    # Fixed, the rerun makes only the failed shard, and the result is the clean run's.
    monkeypatch.setattr(pipeline, "load_source", real_load)
    image.write_bytes(good)
    caplog.set_level("INFO", logger="cheetah")
    synthesize(cfg)
    assert "4 shard(s) of up to 4; 1 to run, 3 done before" in caplog.text
    synthesize(_cfg(src, tmp_path / "clean", selector="random"))
    assert _tree(tmp_path / "out") == _tree(tmp_path / "clean")


def _png_with_corrupt_pixels(path: Path) -> None:
    """A PNG whose chunk structure and CRCs are valid (PIL's verify() passes) but whose pixel data is not zlib."""
    data = bytearray(path.read_bytes())
    at = data.index(b"IDAT")
    length = int.from_bytes(data[at - 4:at], "big")
    data[at + 4:at + 4 + length] = bytes((b ^ 0x5A) for b in data[at + 4:at + 4 + length])
    data[at + 4 + length:at + 8 + length] = zlib.crc32(bytes(data[at:at + 4 + length])).to_bytes(4, "big")
    path.write_bytes(bytes(data))


def test_no_stage_uses_an_image_another_stage_rejected(source, tmp_path):
    import shutil

    from PIL import Image

    src = tmp_path / "src"
    shutil.copytree(source, src)
    _png_with_corrupt_pixels(src / "images" / "000004.png")
    with Image.open(src / "images" / "000004.png") as im:
        im.verify()  # the old check let this image through to the pairs, which then rejected it
    # An image that is not the rendering of its scene graph: the pairs reject the record (scene_mismatch).
    Image.new("RGB", (64, 64), (10, 20, 30)).save(src / "images" / "000007.png")

    # Every pair and more caption samples than records: every usable record is drawn by both.
    stats = synthesize(_cfg(src, tmp_path / "out", selector="random", n=60, captions=60, shard_size=16))
    out = tmp_path / "out"
    quarantine = _rows(out / "quarantine.jsonl")
    assert {(q["stage"], q["id"]) for q in quarantine if q["reason"] == "undecodable_image"} == {("source", "000004")}
    mismatched = {q["source_id"] for q in quarantine if q["reason"] == "scene_mismatch"}
    assert mismatched == {"000007"}
    used = {img for r in _rows(out / "synthetic.jsonl") + _rows(out / "captions.jsonl") for img in r["images"]}
    assert not used & {"images/src-000004.png", "images/src-000007.png"}
    assert not (out / "images" / "src-000004.png").exists() and not (out / "images" / "src-000007.png").exists()
    assert stats["captions"] == 60 and stats["source_usable"] == 29
