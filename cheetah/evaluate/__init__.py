"""DEMON and MME evaluation: official on-disk formats, official-semantics scoring, reports, embedded benchmarks.

    demon.py        task table (TASKS, CATEGORIES), load_demon / load_demon_task, write_demon_task
    mme.py          subtask table (SUBTASKS), load_mme, results-file reading/writing, write_mme_subtask
    scoring.py      score_demon, score_mme (the CLI's `cheetah score`), and the per-answer rules
    predictions.py  PredictionStore: resumable writing of pred.json / <subtask>.txt
    report.py       write_report: markdown tables, bar chart, metrics JSON
    embedded.py     write_embedded_benchmarks: DEMON- and MME-format tasks from held-out world scenes
    generation.py   batched, deterministic generation for evaluation

Import from the submodules; this package imports nothing, so `cheetah score` starts without torch.
"""
