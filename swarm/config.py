"""The one swarm config: typed, validated once, loaded from YAML, overridable with ``--set section.key=value``.

Everything outside ``peer`` is shared by the whole swarm: the seed publishes it into the DHT and every joiner
adopts it verbatim. ``peer`` holds what each volunteer may choose for itself (device, batch size, addresses).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from swarm.errors import SwarmError

Compression = Literal["blockwise8", "uniform8", "fp16", "none"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class ModelConfig(_Section):
    """A causal LM built from these sizes (random init from ``init_seed``), or loaded from a local checkpoint."""

    architecture: Literal["gpt2", "llama"] = "gpt2"
    checkpoint: str | None = Field(None, description="local Hugging Face checkpoint directory (nothing is downloaded)")
    n_layer: int = Field(4, ge=1, le=128)
    n_head: int = Field(4, ge=1, le=128)
    d_model: int = Field(256, ge=8, le=16384)
    max_seq_len: int = Field(256, ge=8, le=65536)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    init_seed: int = 0

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "ModelConfig":
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        return self


class TokenizerConfig(_Section):
    kind: Literal["bytes", "file"] = "bytes"
    path: str | None = Field(None, description="local tokenizer.json, with kind: file")

    @model_validator(mode="after")
    def _file_needs_path(self) -> "TokenizerConfig":
        if self.kind == "file" and not self.path:
            raise ValueError("kind: file needs path: /path/to/tokenizer.json")
        return self


class DataConfig(_Section):
    source: str = Field("stdlib", description="'stdlib' (Python's own sources), or a .txt/.jsonl file or directory")
    text_field: str = Field("text", description="field holding the text in .jsonl records")
    seq_len: int = Field(128, ge=8, le=65536)
    eval_fraction: float = Field(0.02, gt=0.0, lt=0.5)


class OptimizerConfig(_Section):
    name: Literal["adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    weight_decay: float = Field(0.01, ge=0.0, le=1.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.99, ge=0.0, lt=1.0)
    eps: float = Field(1e-8, gt=0.0)
    max_grad_norm: float = Field(1.0, ge=0.0, description="0 disables clipping")
    warmup_steps: int = Field(10, ge=0, description="global steps of linear warm-up")
    total_steps: int = Field(10_000, ge=1, description="global steps of cosine decay")


class AveragingConfig(_Section):
    target_batch_size: int = Field(256, ge=1, description="samples the whole swarm accumulates per global step")
    compression: Compression = "blockwise8"
    state_compression: Compression = Field("fp16", description="codec for parameter/optimizer-state averaging")
    # fp32 by default: in fp16, Adam's small second moments underflow to 0 and the next step explodes
    load_state_compression: Compression = Field("none", description="codec for state downloads by joiners")
    average_state_every: int = Field(1, ge=1, description="global steps between parameter averaging rounds")
    size_threshold: int = Field(2**16, ge=0, description="tensors smaller than this many values go as fp16")
    part_size_bytes: int = Field(2**19, ge=2**12)
    offload_optimizer: bool = True
    delay_optimizer_step: bool = False
    delay_grad_averaging: bool = False
    delay_state_averaging: bool = True

    @model_validator(mode="after")
    def _delays_are_consistent(self) -> "AveragingConfig":
        if self.delay_grad_averaging and not self.delay_optimizer_step:
            raise ValueError("delay_grad_averaging: true needs delay_optimizer_step: true")
        return self


class TimeoutsConfig(_Section):
    """Seconds. Localhost swarms use a few seconds; internet swarms need tens."""

    matchmaking: float = Field(5.0, gt=0.0)
    averaging: float = Field(30.0, gt=0.0)
    request: float = Field(3.0, gt=0.0)
    next_chunk: float = Field(30.0, gt=0.0)
    load_state: float = Field(300.0, gt=0.0)
    join: float = Field(60.0, gt=0.0, description="how long a joiner retries unreachable addresses")
    # upper bounds: honest DHT nodes refuse records that live longer (swarm.records.MAX_TTL, MAX_CONFIG_TTL)
    record_ttl: float = Field(60.0, gt=0.0, le=3600.0, description="lifetime of a trainer's progress record")
    config_ttl: float = Field(7 * 86400.0, gt=0.0, le=30 * 86400.0, description="lifetime of the published config")

    @model_validator(mode="after")
    def _averaging_outlasts_matchmaking(self) -> "TimeoutsConfig":
        if self.averaging <= self.matchmaking:
            raise ValueError(f"averaging ({self.averaging}) must exceed matchmaking ({self.matchmaking})")
        return self


class PeerConfig(_Section):
    """Per-peer choices: never published, never compared between peers."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int | None = Field(None, ge=1, description="local micro-batch; chosen from memory when unset")
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="0 picks a free port")
    announce: list[str] = Field(default_factory=list, description="multiaddrs to announce (behind NAT)")
    identity: str | None = Field(None, description="key file: stable peer id and signing key")
    client_mode: bool = False
    seed: int | None = Field(None, description="data order seed; derived from the peer id when unset")


class SwarmConfig(_Section):
    run_id: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    model: ModelConfig = ModelConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    averaging: AveragingConfig = AveragingConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    peer: PeerConfig = PeerConfig()

    @field_validator("run_id")
    @classmethod
    def _no_dots(cls, value: str) -> str:
        return value  # the pattern already forbids '.', which hivemind uses inside its DHT keys

    @model_validator(mode="after")
    def _sequences_fit_the_model(self) -> "SwarmConfig":
        if self.model.checkpoint is None and self.data.seq_len > self.model.max_seq_len:
            raise ValueError(f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})")
        return self

    def shared(self) -> dict[str, Any]:
        """The part every peer must agree on, as plain data (what the seed publishes)."""
        return self.model_dump(mode="json", exclude={"peer"})

    def shared_yaml(self) -> str:
        return yaml.safe_dump(self.shared(), sort_keys=True)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.shared_yaml().encode()).hexdigest()[:16]


SHARED_SECTIONS = tuple(name for name in SwarmConfig.model_fields if name != "peer")


class ConfigError(SwarmError):
    """A config the user must fix; the message names the dotted field."""


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``["averaging.compression=fp16", ...]`` -> nested dict, values parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for pair in pairs or []:
        path, sep, raw = pair.partition("=")
        if not sep or not path or any(not part for part in path.split(".")):
            raise ConfigError(f"--set {pair!r}: expected section.key=value, e.g. --set averaging.compression=fp16")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        *parents, leaf = path.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {pair!r}: {part} is set twice with different shapes")
            node = child
        node[leaf] = value
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    kind, message = first["type"], first["msg"]
    if kind == "extra_forbidden":
        parent = first["loc"][:-1]
        allowed = _allowed_fields(parent)
        return f"unknown field {where}; allowed here: {', '.join(allowed)}"
    if kind == "missing":
        return f"{where} is required"
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    got = first.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    more = f" (+{len(error.errors()) - 1} more)" if len(error.errors()) > 1 else ""
    return f"{where}: {message}{shown}{more}" if where else f"{message}{more}"


def _allowed_fields(loc: tuple) -> list[str]:
    model: type[BaseModel] = SwarmConfig
    for part in loc:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return list(model.model_fields)


def build_config(data: dict[str, Any], overrides: list[str] | None = None, *, origin: str = "config") -> SwarmConfig:
    """Validate plain data (plus ``--set`` overrides) into a SwarmConfig, or raise ConfigError naming the field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping of sections at the top level, got {type(data).__name__}")
    data = _merge(data, parse_overrides(overrides))
    try:
        config = SwarmConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{origin}: {_describe(error)}") from None
    _check_finite(config.model_dump(), origin)
    return config


def _check_finite(node: Any, origin: str, path: str = "") -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            _check_finite(value, origin, f"{path}.{key}" if path else key)
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{origin}: {path} must be a finite number (got {node})")


def load_config(path: str | Path, overrides: list[str] | None = None) -> SwarmConfig:
    """Read a YAML config file; every failure is a ConfigError with a one-line message."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; pass --config with a file from configs/") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror or error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: broken YAML{where}: {problem}") from None
    return build_config(data if data is not None else {}, overrides, origin=str(path))


def adopt_shared(shared: dict[str, Any], overrides: list[str] | None = None) -> SwarmConfig:
    """A joiner's config: the swarm's shared sections plus its own ``peer.*`` overrides.

    Overriding a shared field with a different value is refused: the swarm would silently diverge.
    """
    config = build_config(shared, origin="swarm config from the DHT")
    wanted = parse_overrides(overrides)
    local = {"peer": wanted.pop("peer")} if "peer" in wanted else {}
    for dotted, value in _flatten(wanted):
        current = _lookup(config.shared(), dotted)
        if current is _MISSING:
            raise ConfigError(f"--set {dotted}: no such field in the swarm's config")
        if current != value:
            raise ConfigError(
                f"--set {dotted}={value!r} conflicts with the swarm's config ({dotted}={current!r}); "
                "shared settings are chosen by the seed; only peer.* may differ"
            )
    merged = _merge(config.model_dump(mode="json"), local)
    return build_config(merged, origin="swarm config with --set")


def peer_from_overrides(overrides: list[str] | None) -> PeerConfig:
    """Validate just the ``peer.*`` part of a joiner's flags, before it knows the swarm's config."""
    wanted = parse_overrides(overrides)
    return build_config({"run_id": "pending", "peer": wanted.get("peer", {})}, origin="command line").peer


_MISSING = object()


def _flatten(node: dict[str, Any], prefix: str = ""):
    for key, value in node.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            yield from _flatten(value, dotted)
        else:
            yield dotted, value


def _lookup(node: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node
