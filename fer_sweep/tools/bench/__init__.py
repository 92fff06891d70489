"""The benchmark (``python -m fer_sweep.bench``): fer_sweep's training speed against the model's
own ceiling and against the pipeline a user would write by hand.

Three pipelines per (model, transforms), measured in ONE process and interleaved, so that load
from other processes hits them alike; medians over the repeats are reported. A repeat of a model
runs, per transforms, its ceiling and fer_sweep (on the same model) in short alternating chunks,
then the naive segments. So each fer_sweep figure is paired with a ceiling measured at the same
moments, and a slow spell of the shared machine cancels out of their ratio.

- ``ceiling``: forward + backward + optimizer step on one batch already on the device, in the
  memory format and autocast policy fer_sweep uses for that model. No data path at all: the most
  any training loop can reach with this model, this batch size and this optimizer.
- ceiling variants: the same step in every precision (fp32, bf16 autocast) and compile mode the
  device offers, each on its own model, in whole segments after the pairs. fer_sweep is compared
  with the fastest (and with fp32 eager) through its own variant, like with like: fer_sweep /
  paired ceiling x own variant / that variant, per repeat.
- ``fer_sweep``: ``fer_sweep.core.train.train_epoch`` (the loop ``python -m fer_sweep`` runs) on the
  data from ``fer_sweep.core.data.load_dataset``, model and optimizer from the real Hydra config.
- ``naive``: torchvision ``ImageFolder`` + ``DataLoader(num_workers=os.cpu_count())`` + PIL
  transforms, fp32, contiguous memory: what a tutorial-following user writes.

Plus the data loading times: cold (decode every image into an empty cache) and warm (from the
cache). ``naive_loader`` / ``naive_transform`` / ``naive_step`` are reused by the equivalence test.

One job a module: ``pipelines`` (the pipelines and the ceiling variants, the naive pipeline's
pieces), ``measure`` (plan, pipelines per model, interleaved repeats, the record and its
ratios), ``cli`` (the command line and the markdown table).
"""
