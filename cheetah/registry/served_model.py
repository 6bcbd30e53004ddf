"""The MLflow "models from code" entry of a registered VPG-C model (logged with every version).

MLflow copies this file into the model and runs it on `mlflow.pyfunc.load_model`, instead of unpickling a Python
object: nothing is deserialised but the weights (safetensors) and the card (JSON). The model's code is the
installed `cheetah` package (`cheetah.registry.pyfunc.VPGCPyfunc`).
"""

from mlflow.models import set_model

from cheetah.registry.pyfunc import VPGCPyfunc

set_model(VPGCPyfunc())
