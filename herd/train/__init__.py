"""Training: pretraining (`herd train`) and the components post-training recipes share.

config.py (dataclass sections read from TOML, `--section.field VALUE` overrides), data.py (packed,
document-masked, resumable batches from token shards), optim.py (AdamW, warm-up + cosine + anneal, clipping),
loop.py (the Trainer), checkpoint.py (DCP checkpoints, export to herd's formats), parallel.py + pipeline.py
(FSDP2, tensor and pipeline parallelism over one device mesh), fault.py (watchdog, bad steps, replica
checksums), metrics.py, pretrain.py (the recipe), launch.py (torchrun), scaling.py, report.py, cli.py.
"""
