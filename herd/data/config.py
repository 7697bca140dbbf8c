"""What a pipeline run does, as dataclasses: the ordered stages, the data mix, the token shards.

A PIPELINE.toml mirrors these dataclasses one to one:

    docs_per_unit = 1000
    [shards]
    tokenizer = "herd.tokenizer:load_tokenizer"
    [mix]
    targets = { general = 0.5, math_reasoning = 0.25, code = 0.17, multilingual = 0.08 }
    [[stages]]
    type = "language"
    languages = ["en"]

Each `[[stages]]` table names a stage type and that stage's own dataclass options; unknown types and
options are reported as configuration errors before any work starts.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from herd.bounds import NON_NEGATIVE, require_value

# The final pre-training mix Llama 3 reports (section 3.1.2), by tokens.
LLAMA3_MIX = {"general": 0.50, "math_reasoning": 0.25, "code": 0.17, "multilingual": 0.08}

# type name -> "module:Class". Imported on use, so a config names stages without loading all of them.
STAGE_TYPES = {
    "language": "herd.data.filters:LanguageFilter",
    "gopher_quality": "herd.data.filters:GopherQuality",
    "gopher_repetition": "herd.data.filters:GopherRepetition",
    "c4_quality": "herd.data.filters:C4Quality",
    "fineweb_quality": "herd.data.filters:FineWebQuality",
    "nsfw": "herd.data.filters:NSFWFilter",
    "pii": "herd.data.filters:PIIMasker",
    "url_dedup": "herd.data.dedup:URLDedup",
    "exact_dedup": "herd.data.dedup:ExactDedup",
    "minhash_dedup": "herd.data.dedup:MinHashDedup",
    "line_dedup": "herd.data.dedup:LineDedup",
    "quality_classifier": "herd.data.classify:QualityClassifier",
    "domain_classifier": "herd.data.classify:DomainClassifier",
}


class ConfigError(ValueError):
    """A pipeline configuration that cannot run; the message names the offending part."""


@dataclass(frozen=True)
class StageSpec:
    type: str
    options: dict[str, Any] = field(default_factory=dict)

    def build(self):
        """The stage object itself; its own dataclass validates the options."""
        target = STAGE_TYPES.get(self.type) or (self.type if ":" in self.type else None)
        if target is None:
            raise ConfigError(f"unknown stage type {self.type!r}; known: {', '.join(STAGE_TYPES)}")
        cls = import_object(target)
        accepted = inspect.signature(cls).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
            unknown = next((name for name in self.options if name not in accepted), None)
            if unknown is not None:  # its __init__'s own TypeError named the option but not the ones there are
                raise ConfigError(f"stage {self.type!r} has no option {unknown!r}; its options: "
                                  f"{', '.join(accepted) or 'none'}")
        check_types(cls, self.options, f"stage {self.type!r}")
        try:
            return cls(**self.options)
        except (TypeError, ValueError) as e:  # an unknown option, or a value out of the option's range
            raise ConfigError(f"stage {self.type!r}: {e}") from None


@dataclass(frozen=True)
class ShardConfig:
    # "module:callable" returning an object with encode(text, bos, eos), bos_id, eos_id, vocab_size.
    tokenizer: str = "herd.tokenizer:load_tokenizer"
    bos: bool = True
    eos: bool = True  # so a reader that concatenates documents still sees where each one ends
    max_tokens_per_shard: int = 1 << 28  # 1 GiB of uint32; documents are never split across shards


@dataclass(frozen=True)
class MixConfig:
    targets: dict[str, float] = field(default_factory=lambda: dict(LLAMA3_MIX))
    seed: int = 0
    # Past a few epochs repeated tokens stop helping; a domain that would need more is met by
    # shrinking the whole output instead.
    max_repeats: int = 4


@dataclass(frozen=True)
class PipelineConfig:
    stages: tuple[StageSpec, ...]
    shards: ShardConfig = ShardConfig()
    mix: MixConfig | None = MixConfig()  # applied only once a domain classifier labels the documents
    docs_per_unit: int = 1000  # documents per work unit: the grain of parallelism and of resuming
    html_extractor: str = "herd"  # HTML to text: "herd" (keeps code and math) or "trafilatura"
    text_key: str = "text"  # the JSONL field / Parquet column holding the text (RedPajama: "raw_content")

    def fingerprint(self, contents: bool = False) -> str:
        """A run directory is only resumed by the very configuration that started it; with `contents`, also by the
        very files its stages read, read once to say so (a classifier retrained into the same path had labelled the
        rest of a resumed run)."""
        settings = dataclasses.asdict(self)
        if contents and (digests := self.file_digests()):
            settings["file_digests"] = digests
        blob = json.dumps(settings, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def file_digests(self) -> dict[str, str]:
        """The SHA-256 of each file a stage's `path` option names (the classifiers' models), by path."""
        return {str(spec.options["path"]): file_sha256(Path(str(spec.options["path"])))
                for spec in self.stages if "path" in spec.options}


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def check_types(cls: type, options: dict[str, Any], where: str) -> None:
    """A ConfigError naming the first option whose TOML value is not of its field's type (a number for a string, a
    string for a number...), which would otherwise fail inside a worker mid-run, or pass a wrong comparison."""
    if not dataclasses.is_dataclass(cls):
        return
    hints = typing.get_type_hints(cls)
    for name, value in options.items():
        kinds = _TOML_KINDS.get(typing.get_origin(hints.get(name)) or hints.get(name))
        if kinds is not None and (not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool))):
            raise ConfigError(f"{where}: {name} must be {hints[name].__name__}, got {value!r}")


# The TOML values each plain field type takes: an integer where a float is asked for, never a boolean for a number.
_TOML_KINDS = {int: (int,), float: (int, float), str: (str,), bool: (bool,), list: (list,), tuple: (list, tuple),
               dict: (dict,)}


def import_object(target: str) -> Any:
    module, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot import {target!r}: {e}") from None


def default_config(quality_model: str | Path | None = None, domain_model: str | Path | None = None,
                   quality_threshold: float = 0.5) -> PipelineConfig:
    """The Llama-3-like pipeline: web text in every language (the language stage records each document's language
    and drops none), heuristics, NSFW, PII, four de-duplications, classifiers."""
    stages = [
        StageSpec("language"),
        StageSpec("gopher_repetition"),
        StageSpec("gopher_quality"),
        StageSpec("c4_quality"),
        StageSpec("fineweb_quality"),
        StageSpec("nsfw"),
        StageSpec("url_dedup"),
        StageSpec("exact_dedup"),
        StageSpec("minhash_dedup"),
        StageSpec("line_dedup"),
        # after de-duplication, so repeated personal data is counted once and masking sees final lines
        StageSpec("pii"),
    ]
    if quality_model:
        stages.append(StageSpec("quality_classifier", {"path": str(quality_model), "threshold": quality_threshold}))
    if domain_model:
        stages.append(StageSpec("domain_classifier", {"path": str(domain_model)}))
    return PipelineConfig(stages=tuple(stages))


def read_toml(path: str | Path) -> dict[str, Any]:
    """The TOML file at `path` as a dict; a ConfigError naming the file when it is missing or invalid."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}), as TOML must be; save it as "
                          "UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


def load_config(path: str | Path) -> PipelineConfig:
    return config_from_dict(read_toml(path), where=str(path))


def config_from_dict(raw: dict[str, Any], where: str = "config") -> PipelineConfig:
    raw = dict(raw)
    stages_raw = raw.pop("stages", None)
    if not stages_raw:
        raise ConfigError(f"{where}: needs at least one [[stages]] table")
    if not isinstance(stages_raw, list) or not all(isinstance(table, dict) for table in stages_raw):
        raise ConfigError(f"{where}: stages must be [[stages]] tables, one per stage in order, each with a type "
                          '(type = "gopher_quality"), not [stages] or [stages.NAME]')
    stages = []
    for i, table in enumerate(stages_raw):
        table = dict(table)
        kind = table.pop("type", None)
        if not isinstance(kind, str):
            raise ConfigError(f"{where}: stage {i + 1} has no type")
        stages.append(StageSpec(kind, table))
    shards_raw = raw.pop("shards", {})
    check_types(ShardConfig, shards_raw, f"{where}: shards")
    mix_raw = raw.pop("mix", {})
    if isinstance(mix_raw, dict) and not isinstance(mix_raw.get("enabled", True), bool):
        raise ConfigError(f"{where}: mix: enabled must be bool, got {mix_raw['enabled']!r}")
    mix_on = not (mix_raw is False or mix_raw.get("enabled") is False)
    mix_raw = {k: v for k, v in mix_raw.items() if k != "enabled"} if mix_on else {}
    check_types(MixConfig, mix_raw, f"{where}: mix")
    check_types(PipelineConfig, raw, where)
    try:
        shards = ShardConfig(**shards_raw)
        mix = MixConfig(**mix_raw) if mix_on else None
        config = PipelineConfig(stages=tuple(stages), shards=shards, mix=mix, **raw)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None
    validate(config, where)
    return config


def check_mix_domains(mix: MixConfig | None, domains: set[str] | None) -> None:
    """A ConfigError where the mix and the domains documents are labelled with disagree (`domains` None: a stage
    labels documents without saying with what).

    A target naming a domain no stage labels with (`math` for `math_reasoning`) would give its share to the others
    while that domain's documents were all dropped; the built-in Llama 3 mix is exempt, as a classifier trained
    without one of its domains has the others share that one's weight. A label the mix has no target for would drop
    every document given it, whatever the mix."""
    if mix is None or domains is None:
        return
    unknown = [d for d in mix.targets if d not in domains]
    if unknown and mix.targets != LLAMA3_MIX:
        raise ConfigError(f"mix targets name {', '.join(map(repr, unknown))}, which the domain classifier never "
                          f"gives; its domains: {', '.join(sorted(domains))}")
    missing = sorted(domains - set(mix.targets))
    untargeted = ", ".join(map(repr, missing))
    if missing:
        # "multilingual" is the stage's own label for non-English text (non_english_is_multilingual), not a class
        # its model was trained on: retraining would not remove it.
        remedy = ("retrain the classifier with these names, or " if missing != ["multilingual"] else
                  "set non_english_is_multilingual = false in the domain_classifier stage, or ")
        raise ConfigError(f"the domain classifier labels documents {untargeted}, which the mix has no target for, so "
                          f"it would drop them all; the mix's domains: {', '.join(mix.targets)}; {remedy}give a "
                          f"[mix] table with a target for {untargeted} (0 to drop its documents)")


def validate(config: PipelineConfig, where: str = "config") -> None:
    for spec in config.stages:
        if spec.type not in STAGE_TYPES and ":" not in spec.type:
            raise ConfigError(f"{where}: unknown stage type {spec.type!r}; known: {', '.join(STAGE_TYPES)}")
    if config.mix is not None:
        for domain, share in config.mix.targets.items():
            if isinstance(share, bool) or not isinstance(share, (int, float)):
                raise ConfigError(f"{where}: mix targets {domain} must be a number, got {share!r}")
            try:
                require_value(f"mix targets {domain}", share, NON_NEGATIVE)
            except ValueError as e:
                raise ConfigError(f"{where}: {e}") from None
        total = sum(config.mix.targets.values())
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(f"{where}: mix targets must sum to 1 (they sum to {total:g})")
        if config.mix.max_repeats < 1:
            raise ConfigError(f"{where}: mix max_repeats must be at least 1")
    from herd.data.readers import EXTRACTORS

    if config.html_extractor not in EXTRACTORS:
        raise ConfigError(f"{where}: unknown html_extractor {config.html_extractor!r}; "
                          f"choose one of: {', '.join(EXTRACTORS)}")
    if not config.text_key:
        raise ConfigError(f"{where}: text_key must name a field")
    if config.docs_per_unit < 1:
        raise ConfigError(f"{where}: docs_per_unit must be at least 1")
    if config.shards.max_tokens_per_shard < 1:
        raise ConfigError(f"{where}: shards max_tokens_per_shard must be at least 1")
