"""Create the MLflow store and experiment in ONE process, before any parallel job, and decode
the data into the cache every job reads."""

import os
import sys
import time

from mlflow.tracking import MlflowClient

uri, name, work = (
    os.environ["GPU_CHECK_URI"],
    os.environ["GPU_CHECK_EXPERIMENT"],
    os.environ["GPU_CHECK_WORK"],
)
t0 = time.time()
client = MlflowClient(uri)
client.search_experiments()  # creates the sqlite schema
if client.get_experiment_by_name(name) is None:
    client.create_experiment(name, artifact_location=os.path.join(work, "artifacts"))
print(f"MLflow store {uri}, experiment {name!r}: {time.time() - t0:.1f} s")

from fer_sweep.core.data import load_dataset  # noqa: E402
from fer_sweep.sweep.compose import compose_config  # noqa: E402

t0 = time.time()
conf = compose_config(sys.argv[1:])
data = load_dataset(conf.data)
print(
    f"data {conf.data.name}: train {len(data.train)} val {len(data.val)} test {len(data.test)}"
    f" ({'cache hit' if data.info.get('cache_hit') else 'decoded'}) in {time.time() - t0:.1f} s"
    f" -> {conf.data.cache_dir}"
)
