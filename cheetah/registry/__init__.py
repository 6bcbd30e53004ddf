"""MLflow registration, promotion and serving of VPG-C (`cheetah register`, `cheetah registry ...`, `cheetah predict`).

One job per module:

    pyfunc.py     the served model (`VPGCPyfunc`): logged with its code, pinned requirements, a signature, an input
                  example and a reference to its backbone (logged once per weights digest), so it serves anywhere
    provenance.py whether a model may become champion, from the lineage recorded at its training, evaluation and
                  registration (committed, not a `dvc exp run` experiment; cheetah.provenance), and its config tags
    gate.py       what is registered is verified first (weights against their card, loadable, finite; metrics finite
                  and naming the weights they measured); `challenger` always, `champion` by the rules; every
                  decision recorded; `demote`, `promote`, `history`
    integrity.py  what is served is what was registered: every file of the logged model hashed at registration
                  (tags `artifact_files`, `artifact_sha256`), checked before it is loaded, served or promoted
    serve.py      `load`, `predict` and `serve` (not re-exported here) on a checked copy of a registered version (`load(uri).predict(df)`,
                  columns `instruction` and `images`: paths or `data:image/png;base64,...` URIs)
"""

from cheetah.registry.gate import (CHALLENGER, CHAMPION, MEASURED_WEIGHTS_FIELD, RANDOM_BACKBONE_FIELD, decide,
                                   demote, history, logged_metric, metric_value, promote, read_measured_metrics,
                                   receipt_is_current, register, verify_weights)
from cheetah.registry.provenance import champion_eligibility, config_tags
from cheetah.registry.pyfunc import (BACKBONE_ENV, VPGCPyfunc, fetch_backbone, log_backbone, log_model,
                                     pip_requirements, resolve_backbone_dir, with_image_placeholders)
from cheetah.registry.integrity import verified_copy, verify_version
from cheetah.registry.serve import load, predict

__all__ = ["BACKBONE_ENV", "CHALLENGER", "CHAMPION", "MEASURED_WEIGHTS_FIELD", "RANDOM_BACKBONE_FIELD", "VPGCPyfunc",
           "champion_eligibility", "config_tags", "decide", "demote", "fetch_backbone", "history", "load",
           "log_backbone", "log_model", "logged_metric", "metric_value", "pip_requirements", "predict", "promote",
           "read_measured_metrics", "receipt_is_current", "register", "resolve_backbone_dir",
           "verified_copy", "verify_version", "verify_weights", "with_image_placeholders"]
