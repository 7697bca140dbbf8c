"""Run under torchrun: several training runs one after the other in the same ranks (saves process start-ups).

argv[1]: a JSON list of override lists, one per run (each complete: shards, run.dir, parallel layout).
"""
import json
import sys

from herd.train.config import TrainConfig, load_config
from herd.train.pretrain import pretrain

for overrides in json.loads(open(sys.argv[1]).read()):
    pretrain(load_config(TrainConfig, None, overrides))

import torch.distributed as dist  # noqa: E402

if dist.is_initialized():
    dist.destroy_process_group()
