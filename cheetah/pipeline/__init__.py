"""Running the DVC pipeline: `cheetah pipeline run` (make run), `cheetah pipeline source|use|check|stages`, and the
Prefect flow (flows/pipeline.py), which all build on these modules, one job each:

    dag.py      dvc.yaml's stages as DVC resolves them, their order, and params.yaml at any scale (`use_params`)
    dvc.py      running DVC: a stage process' environment, `dvc <args>`, its machine-readable status
    source.py   data/source, versioned by data.dvc: restored, regenerated (the embedded world) or recorded
    record.py   the parent MLflow run of a pipeline run and the record logged on it
    run.py      the one sequence of a pipeline run (`Pipeline`), which the CLI and the flow both call
    check.py    whether the committed dvc.lock, data.dvc and metrics are those of the committed code
"""

from cheetah.pipeline.check import check, metric_differences
from cheetah.pipeline.dag import (DVC_YAML, RECEIPT, SOURCE, read_stages, reads_source, stage_order, use_params,
                                  with_upstream)
from cheetah.pipeline.dvc import dvc, is_up_to_date, repro_command, stage_env, stale_stages
from cheetah.pipeline.record import forget_stale_receipt, log_record, parent_run
from cheetah.pipeline.run import SOURCE_STEP, Pipeline, StageFailed, dvc_stage, run_pipeline, source_step
from cheetah.pipeline.source import DATA_DVC, ensure_source, read_data_dvc, world_manifest

__all__ = ["DATA_DVC", "DVC_YAML", "RECEIPT", "SOURCE", "SOURCE_STEP", "Pipeline", "StageFailed", "check", "dvc",
           "dvc_stage", "ensure_source", "forget_stale_receipt", "is_up_to_date", "log_record",
           "metric_differences", "parent_run", "read_data_dvc", "read_stages", "reads_source", "repro_command",
           "run_pipeline", "source_step", "stage_env", "stage_order", "stale_stages", "use_params", "with_upstream",
           "world_manifest"]
