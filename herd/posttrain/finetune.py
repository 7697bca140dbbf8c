"""`herd finetune`: every post-training recipe as a config, a data source and a loss, run by the shared Trainer.

    [finetune]
    recipe = "sft"            # sft | rm | dpo | ppo | kd
    model = "default"         # the checkpoint to tune (anything herd.load reads)
    data = "train.jsonl"      # SFT rows (sft, kd), preference rows (rm, dpo) or prompt rows (ppo)

The tuned model is written to run.dir/model (LoRA merged in), loadable by herd.load and `herd convert`, and LoRA's
adapters to run.dir/adapter in PEFT's layout (a reward model's excepted); a reward
model also writes its head there (reward_head.safetensors). Running the same command again resumes from the last
checkpoint (every `checkpoint.interval` steps); one that changes what defines the run (`run_identity`) is refused.
PPO's rollouts, value model and reference are herd.posttrain.rollouts'.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import random
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from herd.atomic import atomic_output, make_directory, save_safetensors
from herd.bounds import NON_NEGATIVE, require
from herd.checkpoint.convert import REWARD_HEAD
from herd.posttrain.data import DialogEncoder, collate, encode_preferences, encode_sft, pack, preference_batch
from herd.posttrain.dpo import DPOConfig, dpo_loss, reference_logps
from herd.posttrain.kd import KDConfig, kd_loss
from herd.posttrain.lora import (LoRAConfig, adapters_off, apply_lora, lora_state_dict, merge_lora,
                                 save_peft_adapter)
from herd.posttrain.ppo import PolicyValue, PPOConfig
from herd.posttrain.reward import RewardModel, body_lora, reward_loss
from herd.posttrain.sft import sft_loss
from herd.rows import read_rows
from herd.train.config import (CheckpointSection, ConfigError, FaultSection, RunSection, TrainingSection,
                               load_config)
from herd.train.loop import autocast_dtype

RECIPES = ("sft", "rm", "dpo", "ppo", "kd")


@dataclass
class FinetuneSection:
    recipe: str = "sft"
    model: str = "default"
    data: str = ""
    eval_data: str = ""
    epochs: float = 0.0          # > 0: training.steps is set from the data size
    pack: bool = True            # sft / kd: pack dialogs into training.seq_len rows under the document mask
    teacher: str = ""            # kd: the teacher checkpoint (same vocabulary)

    def __post_init__(self):
        require(self, NON_NEGATIVE, "epochs")


@dataclass
class FinetuneConfig:
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    # Post-training defaults: short runs from a trained model, so a small learning rate and a short warm-up.
    training: TrainingSection = field(default_factory=lambda: TrainingSection(
        steps=100, batch_size=8, seq_len=2048, lr=1e-5, warmup_steps=5, weight_decay=0.0, min_lr_ratio=0.0))
    # A checkpoint halfway through the default 100 steps: "run again to resume" then loses at most half a run (TRL
    # saves every 500 steps, torchtune every epoch; fine-tuning runs are shorter). PPO counts it in iterations.
    checkpoint: CheckpointSection = field(default_factory=lambda: CheckpointSection(interval=50, keep=1))
    run: RunSection = field(default_factory=lambda: RunSection(dir="out/finetune"))
    fault: FaultSection = field(default_factory=FaultSection)


# `herd train`'s settings that fine-tuning does not apply (herd.train.pretrain and parallel read them): they had
# been accepted and changed nothing, without a word.
PRETRAINING_ONLY = (("training", "batch_size_schedule"), ("training", "seq_len_schedule"), ("training", "compile"),
                    ("training", "activation_checkpointing"), ("checkpoint", "average_last"))


def load_finetune_config(path: str | Path | None, overrides: Sequence[str] = ()) -> FinetuneConfig:
    config = load_config(FinetuneConfig, path, list(overrides))
    f = config.finetune
    given = [f"{section}.{name}" for section, name in PRETRAINING_ONLY if getattr(getattr(config, section), name)]
    if given:
        these, them = ("these", "them") if len(given) > 1 else ("this", "it")
        raise ConfigError(f"{', '.join(given)}: only `herd train` applies {these}; remove {them} from the fine-tuning "
                          "config")
    if f.recipe not in RECIPES:
        raise ConfigError(f"finetune.recipe {f.recipe!r} is not one of {', '.join(RECIPES)}")
    if not f.data:
        raise ConfigError("finetune.data: give the JSONL or Parquet file to train on")
    if f.recipe == "kd" and not f.teacher:
        raise ConfigError("finetune.teacher: the kd recipe needs a teacher checkpoint")
    if f.recipe in ("dpo", "ppo") and config.lora.rank and config.lora.dropout:
        # As TRL, which turns dropout off for DPO and PPO: their losses compare log-probs of separate forward
        # passes (policy and reference; now and at sampling time), and dropout makes that difference random.
        raise ConfigError(f"lora.dropout: the {f.recipe} recipe compares log-probs of separate forward passes, "
                          "which dropout makes random; set it to 0")
    if f.recipe == "ppo":
        from herd.posttrain.rollouts import check_config

        check_config(config)
    return config


def run_identity(config: FinetuneConfig) -> dict[str, Any]:
    """The settings that define a fine-tuning run, by name, kept in its checkpoints: resumed with another recipe, base,
    data, order, batch, LoRA or loss, a run had gone on from weights, moments and a data position of another one.
    What may change on resume is not here: more steps, the learning rate, micro-batches, logging, checkpoints."""
    f, t = config.finetune, config.training
    identity = {"finetune.recipe": f.recipe, "finetune.model": _place(f.model), "finetune.data": _content(f.data),
                "training.seed": t.seed}
    if f.recipe != "ppo":  # ppo's batch is ppo.prompts x ppo.samples, its length ppo.max_tokens
        identity.update({"training.batch_size": t.batch_size, "training.seq_len": t.seq_len})
    if f.recipe in ("sft", "kd"):
        identity["finetune.pack"] = f.pack
    if f.recipe == "kd":
        identity["finetune.teacher"] = _place(f.teacher)
    lora = dataclasses.asdict(config.lora) if config.lora.rank else {"rank": 0}
    identity.update({f"lora.{name}": value for name, value in lora.items()})
    if f.recipe in ("dpo", "kd", "ppo"):
        loss = dataclasses.asdict(getattr(config, f.recipe))
        identity.update({f"{f.recipe}.{name}": value for name, value in loss.items()
                         if (f.recipe, name) != ("ppo", "iterations")})  # more iterations: as more training.steps
    if f.recipe == "ppo" and config.ppo.reward_model:
        identity["ppo.reward_model"] = _place(config.ppo.reward_model)
    return identity


def _place(model: str) -> str:
    """A checkpoint named by path, absolute (a relative one names another directory from elsewhere); a name as is."""
    return str(Path(model).resolve()) if Path(model).exists() else model


def _content(path: str) -> str:
    """A data file by what it holds: moved, it is the same data; edited, it is not."""
    if not Path(path).is_file():
        return path  # reading it says what is wrong with it
    with open(path, "rb") as file:
        return "sha256 " + hashlib.file_digest(file, "sha256").hexdigest()[:16]


class ExampleBatches:
    """A resumable batch source over a list of examples: a seeded order per epoch, one optimizer step per next().

    `collate` turns a list of examples into one micro-batch; each step takes `batch_size` examples in
    micro-batches of `micro_batch_size`, each of one `kind` (see `micro_batches`).
    """

    def __init__(self, items: Sequence, collate: Callable[[list], dict], batch_size: int,
                 micro_batch_size: int | None, seed: int, kind: Callable[[Any], Hashable] | None = None):
        if not items:
            raise ValueError("no training examples")
        self.items, self.collate, self.seed, self.kind = items, collate, seed, kind
        self.batch_size, self.micro = batch_size, micro_batch_size or batch_size
        self.position = 0
        # Two epochs' orders at most: a batch spans two. Shuffled again for every example, 100,000 examples had cost
        # 2 s a step of 64.
        self._order = functools.lru_cache(maxsize=2)(self._epoch_order)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.items)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.items))
        return self._order(epoch)[offset]

    def __iter__(self):
        return self

    def __next__(self) -> list[dict[str, torch.Tensor]]:
        picked = [self.items[self._index(self.position + i)] for i in range(self.batch_size)]
        self.position += self.batch_size
        return micro_batches(picked, self.micro, self.collate, self.kind)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def micro_batches(items: Sequence, micro: int, collate: Callable[[list], dict],
                  kind: Callable[[Any], Hashable] | None = None) -> list[dict]:
    """`items` collated `micro` at a time, each micro-batch of one `kind` (preference rows ranking three replies
    apart from pairs, which a batch cannot mix): the losses are sums over examples, so grouping changes nothing."""
    groups: dict[Hashable, list] = {}
    for item in items:
        groups.setdefault(kind(item) if kind else None, []).append(item)
    return [collate(group[i:i + micro]) for group in groups.values() for i in range(0, len(group), micro)]


@dataclass
class Recipe:
    """What the Trainer runs: the module trained, its batches, its loss, and how the result is written."""

    model: nn.Module
    batches: ExampleBatches
    loss_fn: Callable
    eval_batches: list[dict]
    export: Callable
    metrics: Callable[[], dict] | None = None     # the recipe's own figures for each logged step


def _load(path: str):
    import herd

    return herd.load(path, quantize=None)


def build_recipe(config: FinetuneConfig) -> Recipe:
    f, t = config.finetune, config.training
    llm = _load(f.model)
    if f.recipe == "ppo":
        from herd.posttrain.rollouts import ppo_recipe

        return ppo_recipe(config, llm)
    encoder = DialogEncoder(llm.chat_format)
    base: nn.Module = llm.model
    model: nn.Module = RewardModel(base).to(llm.device) if f.recipe == "rm" else base
    seq_len = min(t.seq_len, base.config.max_seq_len)
    run_dir = Path(config.run.dir)
    # Before DPO's reference is computed: with QLoRA the policy starts from the quantized base, so the reference is
    # that base (adapters off), as PPO's and TRL's are; the float one would make step 0's loss other than log 2.
    if config.lora.rank:
        apply_lora(base, body_lora(config.lora) if f.recipe == "rm" else config.lora)
        if f.recipe == "rm":
            model.head.requires_grad_(True)

    kind = None
    if f.recipe in ("sft", "kd"):
        def prepare(path):
            examples = encode_sft(read_rows(path), encoder, seq_len)
            if f.pack:
                return pack(examples, seq_len, seed=t.seed)
            return [pack([e], len(e.ids))[0] for e in examples]
        items, collate_fn = prepare(f.data), _pad_collate
        eval_items = prepare(f.eval_data) if f.eval_data else []
        if f.recipe == "sft":
            loss_fn = sft_loss
        else:
            teacher = _load(f.teacher).model.eval()
            if teacher.config.vocab_size != base.config.vocab_size:
                raise ConfigError(f"finetune.teacher: its vocabulary ({teacher.config.vocab_size}) is not the "
                                  f"student's ({base.config.vocab_size}); logit distillation needs one vocabulary")
            loss_fn = functools.partial(kd_loss, teacher=teacher, config=config.kd)
    else:
        pad = llm.tokenizer.pad_id if llm.tokenizer.pad_id is not None else 0
        mask = f.recipe == "dpo" and config.dpo.mask_formatting

        def prepare(path, name):
            examples = encode_preferences(read_rows(path), encoder, seq_len)
            if f.recipe == "dpo":
                refs = cached_reference_logps(base, examples, mask, pad, run_dir / f"ref_logps.{name}.pt",
                                              autocast_dtype(t.dtype, llm.device))
                return [(e, r) for e, r in zip(examples, refs)]
            return [(e, None) for e in examples]
        items = prepare(f.data, "train")
        eval_items = prepare(f.eval_data, "eval") if f.eval_data else []
        collate_fn = functools.partial(_preference_collate, mask_formatting=mask, pad_id=pad)
        loss_fn = functools.partial(dpo_loss, config=config.dpo) if f.recipe == "dpo" else reward_loss
        kind = _ranked  # rows with an "edited" reply (three ranked) and pairs mix in a file, not in a batch

    micro = t.micro_batch_size or t.batch_size
    eval_batches = micro_batches(eval_items, micro, collate_fn, kind)
    return Recipe(model, ExampleBatches(items, collate_fn, t.batch_size, t.micro_batch_size, t.seed, kind), loss_fn,
                  eval_batches, functools.partial(export, llm=llm, fmt=config.checkpoint.export_format,
                                                  lora=config.lora, base=f.model))


def _pad_collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Packed rows as they are; unpacked ones (of different lengths) right-padded as documents of their own."""
    width = max(len(r["tokens"]) for r in rows)
    if all(len(r["tokens"]) == width for r in rows):
        return collate(rows)
    padded = []
    for r in rows:
        extra = width - len(r["tokens"])
        padded.append({"tokens": nn.functional.pad(r["tokens"], (0, extra)),
                       "labels": nn.functional.pad(r["labels"], (0, extra), value=-100),
                       "document_ids": nn.functional.pad(r["document_ids"], (0, extra), value=1)})
    return collate(padded)


def _ranked(item: tuple) -> int:
    """How many replies a preference example ranks (two, or three with an edited one)."""
    return len(item[0].replies)


def _preference_collate(items: list, *, mask_formatting: bool, pad_id: int) -> dict[str, torch.Tensor]:
    batch = preference_batch([e for e, _ in items], mask_formatting=mask_formatting, pad_id=pad_id)
    if items[0][1] is not None:
        refs = torch.stack([r for _, r in items])           # [n, ranks]
        batch["ref_logps"] = refs.T.reshape(-1)               # rank-major, as the rows
    return batch


def cached_reference_logps(model: nn.Module, examples, mask_formatting: bool, pad_id: int, path: Path,
                           autocast: torch.dtype | None = None, chunk: int = 8) -> list[torch.Tensor]:
    """Each example's summed reply log-probs [ranks] under the untrained model (with LoRA: its adapters off), in
    the precision the policy trains in (`autocast`, as the Trainer's: in float32 against a bf16 policy, step 0's
    loss had not been log 2), computed once and kept in run.dir with a digest of what they depend on; a run that
    finds them there with the same digest (a resumed one) reads them, any other computes them again."""
    key = reference_key(model, examples, mask_formatting, autocast)
    cached = torch.load(path) if path.is_file() else None
    if isinstance(cached, dict) and cached.get("key") == key:
        return list(cached["logps"])
    device = next(model.parameters()).device
    precision = torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
    refs: list[torch.Tensor | None] = [None] * len(examples)
    with adapters_off(model), precision:
        for part in micro_batches(list(enumerate(examples)), chunk, list, lambda item: len(item[1].replies)):
            batch = preference_batch([e for _, e in part], mask_formatting=mask_formatting, pad_id=pad_id)
            logps = reference_logps(model, {k: v.to(device) for k, v in batch.items()})
            for (i, _), row in zip(part, logps.view(-1, len(part)).T.cpu()):
                refs[i] = row
    with atomic_output(path) as tmp:
        torch.save({"key": key, "logps": refs}, tmp)
    return refs


def reference_key(model: nn.Module, examples, mask_formatting: bool, autocast: torch.dtype | None = None) -> str:
    """A digest of what the reference log-probs depend on: the rows' ids and formatting marks, the masking, the
    precision, and every weight of the reference (QLoRA's quantized ones included, the adapters not: they are off)."""
    digest = hashlib.sha256(json.dumps({"mask_formatting": mask_formatting, "autocast": str(autocast)}).encode())
    for e in examples:
        digest.update(json.dumps([e.prompt, e.replies, e.formatting]).encode())
    adapters = lora_state_dict(model).keys()
    for name, tensor in model.state_dict().items():
        if name not in adapters:
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{name} {tensor.dtype} {list(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def export(trainer, *, llm, fmt: str, lora: LoRAConfig, base: str) -> None:
    """Write the trained model (LoRA merged) with its tokenizer to run.dir/model; a language model's adapters also
    to run.dir/adapter, in PEFT's layout, before they are merged."""
    from herd.checkpoint import save_checkpoint

    if not trainer.is_main:
        return
    model = trainer.model
    body = model.policy if isinstance(model, PolicyValue) else model.body if isinstance(model, RewardModel) else model
    if lora.rank and not isinstance(model, RewardModel):  # a reward model's adapters mean nothing without its head
        save_peft_adapter(body, lora, trainer.run_dir / "adapter", base)
        trainer.log.note(f"wrote the LoRA adapters to {trainer.run_dir / 'adapter'} (PEFT)")
    merge_lora(body)
    out = trainer.run_dir / "model"
    state = {k: v.detach().cpu() for k, v in body.state_dict().items()}
    save_checkpoint((body.config, state, llm.tokenizer), out, fmt)
    if isinstance(model, RewardModel):
        save_safetensors({"weight": model.head.weight.detach().cpu().contiguous()}, out / REWARD_HEAD)
    trainer.log.note(f"wrote the tuned model to {out} ({fmt})")


def load_reward_model(path: str | Path):
    """(RewardModel, LLM) from a `herd finetune` reward-model output directory."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / REWARD_HEAD).is_file():
        raise FileNotFoundError(f"{path}: no {REWARD_HEAD}; give the run.dir/model of a `recipe = \"rm\"` run")
    llm = _load(str(path))
    rm = RewardModel(llm.model)
    rm.head.weight.data.copy_(load_file(str(path / REWARD_HEAD))["weight"])
    return rm.to(llm.device).eval(), llm


def finetune(config: FinetuneConfig) -> dict:
    from herd.train.checkpoint import Checkpointer
    from herd.train.loop import Trainer, check_identity
    from herd.train.parallel import DistEnv
    from herd.train.config import to_toml
    from herd.llm import default_device
    from herd.train.pretrain import require_memory

    identity = run_identity(config)
    # Before the model loads and DPO's reference log-probs are computed (and cached over the run's): a refused
    # resume wastes neither time nor what run.dir holds. The Trainer checks again the checkpoint it resumes from.
    checkpoints = Checkpointer(config.run.dir, config.checkpoint)
    check_identity(checkpoints.latest_extra().get("identity"), identity, checkpoints.latest())
    torch.manual_seed(config.training.seed)
    recipe = build_recipe(config)
    t = config.training
    if default_device().type == "cpu":  # the loaded model is in memory already; its optimizer state is not
        trained = sum(p.numel() for p in recipe.model.parameters() if p.requires_grad)
        require_memory(12 * trained, f"finetune: {trained / 1e9:.2f}B trained parameters need {{}} more memory for "
                       "their gradients and AdamW's moments (12 bytes each)",
                       "tune with LoRA (lora.rank) or a smaller model")
    run_dir = Path(config.run.dir)
    make_directory(run_dir, "run.dir")
    record = to_toml(config)  # what was asked, from which the steps below are derived
    if config.finetune.recipe == "ppo":
        from herd.posttrain.rollouts import trainer_config

        config = trainer_config(config)
    elif config.finetune.epochs > 0:
        steps = math.ceil(config.finetune.epochs * len(recipe.batches.items) / t.batch_size)
        config = dataclasses.replace(config, training=dataclasses.replace(t, steps=max(steps, 1)))
    trainer = Trainer(config, recipe.model, recipe.batches, recipe.loss_fn, env=DistEnv(device=default_device()),
                      eval_batches=recipe.eval_batches, export=recipe.export, step_metrics=recipe.metrics,
                      record=record, identity=identity)
    return trainer.fit()
