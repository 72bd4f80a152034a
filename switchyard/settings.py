"""Typed settings of every service, and the command line built from them.

One class per service (:class:`EngineSettings`, :class:`ControllerSettings`,
:class:`GatewaySettings`, :class:`KVServiceSettings`,
:class:`ToolServiceSettings`) on a shared base,
:class:`ServiceSettings`. A value comes from, in order of precedence:

1. a flag: ``--field-name VALUE`` (booleans: ``--field-name`` / ``--no-field-name``);
2. an environment variable: ``SWITCHYARD_FIELD_NAME``;
3. a YAML file of ``field_name: value`` pairs, named by ``--config FILE`` or
   ``SWITCHYARD_CONFIG``; a file shared by several services puts each one's pairs under a
   top-level key named for the service (``engine:``, ``controller:``, ``gateway:``, ``kv:``,
   ``tools:``);
4. the default declared here.

List fields take a comma-separated string in flags and env vars (``--api-keys a,b``), except
``engine_command`` and ``engine_args``, which are split like a shell line. In YAML every list
is a YAML list.

Typical use in a service's ``__main__``::

    settings = load_settings(EngineSettings, argv)

and in a CLI with subcommands::

    add_settings_arguments(subparser, ControllerSettings)
    settings = settings_from_namespace(ControllerSettings, parser.parse_args())

``docs/configuration.md`` lists every field; keep it in step with this module.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import Field, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ENV_PREFIX = "SWITCHYARD_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"

S = TypeVar("S", bound="ServiceSettings")


def default_data_dir() -> Path:
    """``~/.cache/switchyard``; ``SWITCHYARD_DATA_DIR`` overrides it like any other field."""
    return Path.home() / ".cache" / "switchyard"


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _split_shell(value: Any) -> Any:
    if isinstance(value, str):
        return shlex.split(value)
    return value


class ServiceSettings(BaseSettings):
    """Fields every service has. Subclass it for a service; each field becomes a flag, an
    env var and a YAML key (see the module docstring)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", validate_default=True)
    yaml_section: ClassVar[str] = ""

    config: Path | None = Field(
        default=None, description="YAML file of settings (lower precedence than env and flags)"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="log level of the service's structured log on stderr"
    )
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="where the service keeps files it creates (the demo model, logs, state)",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Flags arrive as init kwargs; the YAML file is named by a flag or the env.
        config_file: Any = None
        if isinstance(init_settings, InitSettingsSource):
            config_file = init_settings.init_kwargs.get("config")
        _check_env_names(os.environ)
        config_file = config_file or env_settings().get("config")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if config_file:
            yaml_values = _read_yaml(
                Path(config_file), getattr(settings_cls, "yaml_section", ""), settings_cls
            )
            sources.append(InitSettingsSource(settings_cls, init_kwargs=yaml_values))
        return tuple(sources)


# Variables under the prefix that are not settings: the stack id `switchyard up` gives its
# processes, the API key the benchmarks send, and the mark the e2e tests put on a stack.
NON_SETTING_ENV = frozenset(
    {ENV_PREFIX + "UP_ID", ENV_PREFIX + "API_KEY", ENV_PREFIX + "E2E_STACK"}
)


def _service_classes() -> list[type[ServiceSettings]]:
    found: list[type[ServiceSettings]] = []
    pending = list(ServiceSettings.__subclasses__())
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


def _any_service_field(name: str) -> bool:
    return name in ServiceSettings.model_fields or any(
        name in cls.model_fields for cls in _service_classes()
    )


def _check_env_names(environ: Mapping[str, str]) -> None:
    """Raises ``ValueError`` naming a ``SWITCHYARD_*`` variable that no service reads: the
    environment is shared by every service of a stack, so a variable only needs to be some
    service's setting, but a misspelt one must not go unnoticed."""
    for name in environ:
        if not name.startswith(ENV_PREFIX) or name in NON_SETTING_ENV:
            continue
        if not _any_service_field(name[len(ENV_PREFIX) :].lower()):
            raise ValueError(
                f"unknown setting {name} in the environment (no service has a setting "
                f"{name[len(ENV_PREFIX) :].lower()!r}; docs/configuration.md lists them)"
            )


def _read_yaml(path: Path, section: str, settings_cls: type[BaseSettings]) -> dict[str, Any]:
    """The file's mapping, or its ``section`` mapping when it has one. Raises ``ValueError``
    naming a key no setting has: in ``section``, a key ``settings_cls`` lacks; at the top,
    a key that is neither a service's section nor any service's setting (a file without
    sections may be shared by every service of a stack)."""
    if not path.is_file():
        raise FileNotFoundError(f"settings file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"settings file {path} must hold a mapping of setting names to values")
    sections = {cls.yaml_section for cls in _service_classes() if cls.yaml_section}
    for key in data:
        if key not in sections and not _any_service_field(str(key)):
            raise ValueError(f"unknown setting {key!r} in {path}")
    if section and isinstance(data.get(section), dict):
        values: dict[str, Any] = data[section]
        for key in values:
            if key not in settings_cls.model_fields:
                raise ValueError(
                    f"unknown setting {key!r} in the {section}: section of {path} "
                    f"(the {section} settings are listed in docs/configuration.md)"
                )
        return values
    return data


class EngineSettings(ServiceSettings):
    """One engine replica: the model it loads, how it shares out memory and compute, and
    where it listens and registers. Maps onto ``engine_service.engine.EngineConfig``."""

    yaml_section: ClassVar[str] = "engine"

    model: str = Field(
        default="demo",
        description="checkpoint directory (config.json + safetensors), or `demo` for the "
        "random-weight demo model built under data_dir",
    )
    served_model_name: str = Field(
        default="", description="model name clients ask for; empty: the value of model"
    )
    dtype: str = Field(
        default="auto", description="weights/activations dtype: auto, float32, float16, bfloat16"
    )
    device: str = Field(default="auto", description="torch device; auto: cuda when available")
    host: str = Field(default="0.0.0.0", description="address the gRPC server binds")
    port: int = Field(default=50100, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    metrics_port: int = Field(
        default=9100, ge=0, le=65535, description="Prometheus /metrics port; 0 picks a free one"
    )
    advertise_host: str = Field(
        default="",
        description="host the controller and gateways reach this replica at; empty: host, "
        "or 127.0.0.1 when host is a wildcard",
    )
    controller_address: str = Field(
        default="127.0.0.1:50051", description="controller host:port; empty: do not register"
    )
    replica_id: str = Field(default="", description="id in the registry; empty: generated")
    heartbeat_interval_s: float = Field(
        default=2.0, gt=0, description="seconds between heartbeats, unless the controller says"
    )
    block_size: int = Field(default=16, description="tokens per KV-cache block (power of two)")
    num_kv_blocks: int | None = Field(
        default=None, description="KV pool size in blocks; unset: sized from memory"
    )
    kv_cache_memory_bytes: int | None = Field(
        default=None, description="KV pool size in bytes when num_kv_blocks is unset"
    )
    gpu_memory_utilization: float = Field(
        default=0.85,
        gt=0,
        le=1,
        description="fraction of GPU memory for weights + KV pool when neither size is set",
    )
    max_model_len: int | None = Field(
        default=None, description="longest prompt + output; unset: the model's own limit"
    )
    max_num_batched_tokens: int = Field(
        default=2048, gt=0, description="token budget of one engine step"
    )
    max_num_seqs: int = Field(default=256, gt=0, description="sequences in one engine step")
    max_queued_requests: int | None = Field(
        default=None,
        ge=0,
        description="requests a replica keeps waiting before it answers RESOURCE_EXHAUSTED "
        "(the gateway then tries another replica or answers 429); unset: as many as the KV "
        "pool holds at 256 tokens each, at least max_num_seqs; 0: unbounded",
    )
    enable_prefix_caching: bool = Field(
        default=True, description="reuse KV blocks of shared prompt prefixes"
    )
    enable_chunked_prefill: bool = Field(
        default=True,
        description="split a prompt longer than the step's remaining token budget over steps; "
        "off: it waits until it fits in one step",
    )
    long_prefill_token_threshold: int = Field(
        default=0,
        ge=0,
        description="most prompt tokens of one request in one step, so several prompts share "
        "a step; 0: no cap",
    )
    attention_backend: Literal["auto", "sdpa", "triton"] = Field(
        default="auto",
        description="attention kernels: sdpa (torch reference, any device), triton (CUDA "
        "paged decode); auto: triton on CUDA when Triton is installed, else sdpa",
    )
    enable_cuda_graphs: bool = Field(
        default=True,
        description="replay CUDA graphs for steps up to cuda_graph_max_batch tokens, decodes "
        "and small extends alike (CUDA with the triton backend)",
    )
    cuda_graph_max_batch: int = Field(
        default=512, ge=0, description="largest step (in tokens) captured as a CUDA graph"
    )
    speculative_config: str = Field(
        default="",
        description="speculative decoding, vLLM's --speculative-config JSON: "
        '{"method": "ngram", "num_speculative_tokens": 4} or '
        '{"method": "draft_model", "model": PATH, "num_speculative_tokens": 4}; empty: off',
    )
    async_scheduling: bool = Field(
        default=True,
        description="schedule and prepare the next step while the device runs the current "
        "one (vLLM's --async-scheduling, SGLang's overlap scheduler); same outputs",
    )
    grammar_backend: Literal["llguidance", "xgrammar"] = Field(
        default="llguidance",
        description="grammar library for structured-output constraints that name no backend",
    )
    enable_jump_forward: bool = Field(
        default=True,
        description="append the tokens a grammar forces in one step instead of sampling them",
    )
    seed: int = Field(
        default=0, description="seed of the engine's random state (requests without a seed)"
    )
    kv_service_address: str = Field(
        default="", description="KV service host:port to offload blocks to; empty: none"
    )
    kv_offload_host_bytes: int = Field(
        default=0,
        ge=0,
        description="host-memory tier for KV blocks evicted from the device (0: none; with "
        "kv_service_address set, at least 64 MiB, through which blocks reach the service); "
        "per rank on a parallel engine",
    )
    kv_write_through: bool = Field(
        default=True,
        description="with kv_service_address: store every computed block there, not only "
        "evicted ones, so other replicas reuse prefixes at once",
    )
    enable_lora: bool = Field(
        default=False, description="serve LoRA adapters (vLLM's --enable-lora)"
    )
    lora_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        json_schema_extra={"nargs": "+"},
        description="adapters loaded at start: NAME=PATH ... or vLLM's JSON "
        '{"name": ..., "path": ..., "base_model_name": ...} (PATH: a PEFT folder or hub id)',
    )
    max_loras: int = Field(default=1, gt=0, description="LoRA adapters on the device at once")
    max_lora_rank: int = Field(default=16, gt=0, description="highest LoRA rank accepted")
    max_cpu_loras: int | None = Field(
        default=None, gt=0, description="LoRA adapters kept in host memory; unset: max_loras"
    )
    mm_encoder_cache_gb: float = Field(
        default=1.0,
        ge=0,
        description="vision-language models: GiB of vision-encoder outputs kept by image "
        "content hash (LRU), so a repeated image is not encoded again; 0: off",
    )
    role: Literal["prefill", "decode", "both"] = Field(
        default="both",
        description="prefill/decode disaggregation: prefill engines compute prompts and hand "
        "their KV to decode engines, which generate the rest; both: an ordinary engine "
        "(docs/disaggregation.md)",
    )
    kv_transfer_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="decode engines: longest a prompt's KV hand-off from a prefill engine may "
        "take; past it the prompt is computed here instead",
    )

    tensor_parallel_size: int = Field(
        default=1,
        ge=1,
        description="ranks (GPUs) the model is split across, each holding a slice of every "
        "layer (vLLM's --tensor-parallel-size); this process drives them all as one replica",
    )
    data_parallel_size: int = Field(
        default=1,
        ge=1,
        description="data-parallel attention ranks (vLLM's --data-parallel-size): each holds "
        "the whole model (split over --tensor-parallel-size GPUs of its own) with its own "
        "batch and KV cache; MoE layers exchange tokens between them with "
        "--enable-expert-parallel",
    )
    enable_expert_parallel: bool = Field(
        default=False,
        description="MoE layers hold whole experts, sharded across the data-parallel x "
        "tensor-parallel ranks, and exchange tokens all-to-all (vLLM's "
        "--enable-expert-parallel)",
    )

    @field_validator("lora_modules", mode="before")
    @classmethod
    def _lora_module_list(cls, value: Any) -> Any:
        from switchyard.lora_modules import parse_lora_modules

        if isinstance(value, str):  # an env var: a JSON list, or shell-split items
            stripped = value.strip()
            value = json.loads(stripped) if stripped.startswith("[") else shlex.split(value)
        items = [json.dumps(v) if isinstance(v, dict) else v for v in value or []]
        parse_lora_modules(items)  # refuse a bad module at start, with its reason
        return items


class ControllerSettings(ServiceSettings):
    """The controller: where it listens, when it declares a replica unhealthy or gone, and
    the engine pool its backend keeps running.

    With ``backend="local"`` it starts ``engines`` engine processes on this machine, each as
    ``engine_command + engine_args`` plus ``--model``, ``--port engine_base_port + i``,
    ``--metrics-port engine_base_metrics_port + i`` and ``--controller-address``. With
    ``backend="kubernetes"`` the engine Deployment runs the engines; the controller follows
    its pods and its scale (``engines`` is not used) and may autoscale it.
    """

    yaml_section: ClassVar[str] = "controller"

    host: str = Field(default="0.0.0.0", description="address the gRPC server binds")
    port: int = Field(default=50051, ge=0, le=65535, description="gRPC port")
    heartbeat_interval_s: float = Field(
        default=2.0, gt=0, description="heartbeat interval the controller asks engines for"
    )
    unhealthy_after_s: float = Field(
        default=6.0, gt=0, description="a replica without a heartbeat this long is UNHEALTHY"
    )
    remove_after_s: float = Field(
        default=30.0, gt=0, description="a replica without a heartbeat this long is removed"
    )
    backend: Literal["local", "kubernetes", "none"] = Field(
        default="local",
        description="what starts engines: local processes, the Kubernetes API, or nothing "
        "(engines are started elsewhere and register themselves)",
    )
    engines: int = Field(default=1, ge=0, description="desired number of engine replicas")
    prefill_engines: int = Field(
        default=0,
        ge=0,
        description="desired prefill engines (--role prefill; local backend), a pool of its own "
        "(docs/disaggregation.md)",
    )
    decode_engines: int = Field(
        default=0, ge=0, description="desired decode engines (--role decode; local backend)"
    )
    model: str = Field(default="demo", description="model the engines load (see EngineSettings)")
    served_model_name: str = Field(
        default="", description="served name passed to engines; empty: the value of model"
    )
    engine_command: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [sys.executable, "-m", "engine_service"],
        description="command that starts one engine (shell-split when given as a string)",
    )
    engine_args: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="extra arguments for every engine, e.g. `--device cpu --num-kv-blocks 512`",
    )
    engine_host: str = Field(
        default="127.0.0.1", description="address local engines bind and advertise"
    )
    run_dir: Path | None = Field(
        default=None,
        description="local backend: folder for engine logs and the record of running engines "
        "(a restarted controller adopts them); empty: data_dir",
    )
    engine_base_port: int = Field(
        default=50100, ge=1, le=65535, description="gRPC port of the first local engine"
    )
    engine_base_metrics_port: int = Field(
        default=9100, ge=1, le=65535, description="metrics port of the first local engine"
    )
    kubernetes_api: str = Field(
        default="",
        description="Kubernetes API base URL (backend=kubernetes); empty: in-cluster, with the "
        "pod's service-account token",
    )
    kubernetes_namespace: str = Field(
        default="", description="namespace of the engine pods; empty: the controller pod's own"
    )
    engine_deployment: str = Field(
        default="switchyard-engine",
        description="engine Deployment whose scale subresource the controller follows and sets",
    )
    engine_selector: str = Field(
        default="app.kubernetes.io/component=engine",
        description="label selector of the engine pods the controller watches",
    )
    engine_port: int = Field(
        default=50100, ge=1, le=65535, description="gRPC port of the engine pods"
    )
    prefill_engine_deployment: str = Field(
        default="",
        description="kubernetes: Deployment of the prefill engines, followed and scaled as the "
        "prefill-engines pool; empty: none",
    )
    decode_engine_deployment: str = Field(
        default="",
        description="kubernetes: Deployment of the decode engines (the decode-engines pool); "
        "empty: none",
    )
    leader_election: bool = Field(
        default=False,
        description="take a coordination Lease before acting (more than one controller replica)",
    )
    lease_name: str = Field(default="switchyard-controller", description="name of that Lease")
    lease_duration_s: int = Field(
        default=15, ge=1, description="seconds a leader holds the Lease without renewing it"
    )
    autoscale: bool = Field(
        default=False, description="scale the engine Deployment on queue depth and KV usage"
    )
    autoscale_min: int = Field(default=1, ge=1, description="fewest engines the autoscaler keeps")
    autoscale_max: int = Field(default=4, ge=1, description="most engines the autoscaler keeps")
    autoscale_target_waiting: float = Field(
        default=4.0, gt=0, description="waiting requests per ready engine the autoscaler aims at"
    )
    autoscale_target_kv_usage: float = Field(
        default=0.8, gt=0, le=1, description="KV-cache usage per ready engine it aims at"
    )
    autoscale_cooldown_s: float = Field(
        default=120.0, ge=0, description="least time between two autoscaler changes"
    )

    @field_validator("engine_command", "engine_args", mode="before")
    @classmethod
    def _split_command_line(cls, value: Any) -> Any:
        return _split_shell(value)


class GatewaySettings(ServiceSettings):
    """The HTTP gateway: where it listens, whom it lets in, and the tokenizer it uses."""

    yaml_section: ClassVar[str] = "gateway"

    host: str = Field(default="0.0.0.0", description="address the HTTP server binds")
    port: int = Field(default=8000, ge=0, le=65535, description="HTTP port")
    controller_address: str = Field(
        default="127.0.0.1:50051", description="controller host:port to follow the routes of"
    )
    model: str = Field(
        default="demo",
        description="checkpoint directory whose tokenizer and chat template to use, or `demo`",
    )
    served_model_name: str = Field(
        default="", description="model name clients ask for; empty: the value of model"
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="accepted API keys (comma-separated in flags/env); none and no "
        "api_key_file: no authentication",
    )
    api_key_file: Path | None = Field(
        default=None, description="file of accepted API keys, one per line"
    )
    request_timeout_s: float = Field(
        default=600.0, gt=0, description="longest a request may take end to end"
    )
    failover_wait_s: float = Field(
        default=30.0,
        ge=0,
        description="how long a request that has produced nothing waits for a replica to "
        "serve it when the replicas it tried were unavailable (a crashed engine's restart); "
        "0: fail at once",
    )
    max_n: int = Field(default=16, ge=1, description="largest `n` (samples per request) accepted")
    max_in_flight_requests: int = Field(
        default=4096,
        ge=0,
        description="generations the gateway runs at once; over it: 429 with Retry-After; "
        "0: unbounded",
    )
    max_in_flight_per_replica: int = Field(
        default=0,
        ge=0,
        description="this gateway's requests on one replica before it counts as full (all "
        "full: 429); 0: the capacity the replica reports (max_num_seqs + max_queued_requests)",
    )
    routing_policy: Literal["least_load", "prefix", "round_robin"] = Field(
        default="least_load",
        description="how a replica is chosen: least_load, prefix (longest cached prompt "
        "prefix, from the engines' KV events) or round_robin",
    )
    prefix_load_guard: int = Field(
        default=4,
        ge=0,
        description="prefix policy: fall back to the least-loaded replica when the best "
        "prefix holder has this many more requests than it",
    )
    pd_min_prompt_tokens: int = Field(
        default=256,
        ge=0,
        description="prefill/decode disaggregation: prompts of at least this many tokens are "
        "computed by a prefill engine and handed to a decode engine; shorter ones only by the "
        "decode engine (when prefill engines are routable; docs/disaggregation.md)",
    )
    session_header: str = Field(
        default="x-session-id",
        description="prefix policy: requests with the same value of this header stick to one "
        "replica (consistent hashing); empty: no affinity",
    )
    chat_format: Literal["auto", "template", "harmony"] = Field(
        default="auto",
        description="how chats are rendered and parsed: the model's chat template, or "
        "Harmony (gpt-oss); auto: Harmony when config.json or the template says so",
    )
    tool_call_parser: Literal["auto", "hermes", "llama3_json", "mistral"] = Field(
        default="auto",
        description="format the model writes tool calls in; auto: from the chat template "
        "and the tokenizer's special tokens",
    )
    # -- images (vision-language models; docs/multimodal.md) --
    limit_mm_per_prompt: dict[str, int] = Field(
        default_factory=lambda: {"image": 4},
        description='most images one request may carry, as vLLM\'s JSON {"image": N}',
    )
    max_image_bytes: int = Field(
        default=20 << 20,
        gt=0,
        description="largest encoded image accepted (a data: URL's decoded bytes or a "
        "fetched file)",
    )
    max_image_pixels: int = Field(
        default=50_000_000,
        gt=0,
        description="largest image accepted, in pixels (width x height), checked before "
        "decoding the pixels",
    )
    enable_media_url_fetch: bool = Field(
        default=False,
        description="fetch image_url parts given as http(s) URLs; off: only data: URLs",
    )
    allowed_media_domains: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="with enable_media_url_fetch: the hosts images may be fetched from "
        "(comma-separated; a host also allows its subdomains); empty: any host",
    )
    media_fetch_timeout_s: float = Field(
        default=10.0, gt=0, description="longest an image fetch may take"
    )

    # -- tools, MCP and the Responses API (docs/tools.md) --
    tool_service_address: str = Field(
        default="", description="tool service host:port; empty: no platform tools, no /mcp tools"
    )
    allow_outbound_mcp: bool = Field(
        default=False,
        description="let /v1/responses name MCP servers by server_url (the tool service must "
        "allow it too)",
    )
    max_tool_iterations: int = Field(
        default=8, ge=1, description="most model turns of one server-side tool loop"
    )
    tool_timeout_s: float = Field(default=60.0, gt=0, description="timeout of one tool call")
    redis_url: str = Field(
        default="",
        description="redis://HOST:PORT[/DB] shared by gateways for keys, rate limits, budgets "
        "and stored responses; empty: in this process's memory",
    )
    response_ttl_s: float = Field(
        default=7 * 86400, gt=0, description="how long a stored response can be continued"
    )
    # -- keys, rate limits and budgets (docs/gateway.md) --
    rate_limit_rpm: int = Field(
        default=0, ge=0, description="default requests per minute per key; 0: unlimited"
    )
    rate_limit_tpm: int = Field(
        default=0, ge=0, description="default tokens per minute per key; 0: unlimited"
    )
    rate_limit_concurrent: int = Field(
        default=0, ge=0, description="default concurrent requests per key; 0: unlimited"
    )
    rate_limit_fail_open: bool = Field(
        default=True,
        description="when Redis is unreachable: admit configured keys without limits (open) "
        "or refuse every request with 503 (--no-rate-limit-fail-open)",
    )
    admin_key: str = Field(
        default="",
        description="bearer key of the admin API (/admin/keys; and LoRA load/unload when keys "
        "are configured); empty: disabled",
    )

    @field_validator("api_keys", "allowed_media_domains", mode="before")
    @classmethod
    def _split_key_list(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("limit_mm_per_prompt", mode="before")
    @classmethod
    def _mm_limits_json(cls, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value

    @field_validator("limit_mm_per_prompt")
    @classmethod
    def _known_modalities(cls, value: dict[str, int]) -> dict[str, int]:
        unknown = sorted(set(value) - {"image"})
        if unknown or any(count < 0 for count in value.values()):
            raise ValueError('limit_mm_per_prompt takes {"image": N} with N >= 0')
        return value


class KVServiceSettings(ServiceSettings):
    """The KV service: where it listens, the store it keeps blocks in, and its bounds.

    ``kv_store`` is ``memory``, ``disk`` (under ``data_dir/kv``), ``disk:PATH`` or
    ``redis://HOST:PORT[/DB]``; disk and Redis get a memory tier of ``kv_memory_bytes`` on
    top (0: none).
    """

    yaml_section: ClassVar[str] = "kv"

    host: str = Field(default="0.0.0.0", description="address the gRPC server binds")
    port: int = Field(default=50060, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    metrics_port: int = Field(
        default=9060, ge=0, le=65535, description="Prometheus /metrics port; 0 picks a free one"
    )
    kv_store: str = Field(
        default="disk", description="memory, disk, disk:PATH or redis://HOST:PORT[/DB]"
    )
    kv_memory_bytes: int = Field(
        default=1 << 30, ge=0, description="bytes of the memory store, or of the memory tier"
    )
    kv_disk_bytes: int = Field(default=16 << 30, gt=0, description="bytes of the disk store")
    kv_redis_ttl_s: float = Field(
        default=0.0, ge=0, description="seconds a block lives in Redis after its write; 0: no TTL"
    )
    max_chunk_bytes: int = Field(
        default=4 << 20, gt=0, description="largest data chunk of a Put stream accepted"
    )
    max_block_bytes: int = Field(default=256 << 20, gt=0, description="largest block accepted")

    @field_validator("kv_store")
    @classmethod
    def _known_store(cls, value: str) -> str:
        if value in ("memory", "disk") or value.startswith(("disk:", "redis://")):
            return value
        raise ValueError("kv_store must be memory, disk, disk:PATH or redis://HOST:PORT[/DB]")


def _split_mcp_servers(value: Any) -> Any:
    """``LABEL=URL_OR_COMMAND`` entries: a YAML list, a JSON list, or one entry per line
    (commands may hold commas, so a comma does not separate entries)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [line.strip() for line in text.splitlines() if line.strip()]
    return value


class ToolServiceSettings(ServiceSettings):
    """The tool service: its built-in tools' limits, the MCP servers it connects to, and the
    bounds of every call. ``docs/tools.md`` describes the tools."""

    yaml_section: ClassVar[str] = "tools"

    host: str = Field(default="0.0.0.0", description="address the gRPC server binds")
    port: int = Field(default=50070, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    mcp_servers: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="MCP servers as LABEL=URL_OR_COMMAND (a URL: Streamable HTTP; else a "
        "stdio command line); in flags/env a JSON list or one entry per line",
    )
    allow_outbound_mcp: bool = Field(
        default=False,
        description="let callers name MCP servers by URL (server_url) besides the configured ones",
    )
    file_search_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="directories the read-only file_search tool searches (comma-separated); "
        "none: no file_search tool",
    )
    python_tool: bool = Field(default=True, description="offer the built-in python tool")
    python_cpu_s: int = Field(default=10, ge=1, description="python tool: CPU seconds per call")
    python_wall_s: float = Field(
        default=30.0, gt=0, description="python tool: wall-clock seconds per call"
    )
    python_memory_bytes: int = Field(
        default=1 << 30, ge=64 << 20, description="python tool: address-space limit"
    )
    python_output_bytes: int = Field(
        default=64 << 10, ge=1024, description="python tool: stdout and stderr bytes kept each"
    )
    call_timeout_s: float = Field(
        default=60.0, gt=0, description="timeout of a call that names none"
    )
    max_call_timeout_s: float = Field(
        default=300.0, gt=0, description="longest timeout a call may ask for"
    )
    max_result_bytes: int = Field(
        default=1 << 20, ge=1024, description="a tool's result is cut to this many bytes"
    )

    @field_validator("mcp_servers", mode="before")
    @classmethod
    def _split_servers(cls, value: Any) -> Any:
        return _split_mcp_servers(value)

    @field_validator("mcp_servers")
    @classmethod
    def _check_servers(cls, value: list[str]) -> list[str]:
        labels = []
        for entry in value:
            label, sep, target = entry.partition("=")
            if not sep or not label.strip() or not target.strip():
                raise ValueError(f"MCP server {entry!r} must be LABEL=URL_OR_COMMAND")
            labels.append(label.strip())
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(f"MCP server labels must be unique: {', '.join(duplicates)}")
        return value

    @field_validator("file_search_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: Any) -> Any:
        return _split_commas(value)


def _is_bool(annotation: Any) -> bool:
    if annotation is bool:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args == [bool]
    return False


def _help(name: str, field: FieldInfo) -> str:
    default = field.get_default(call_default_factory=True)
    shown = " ".join(default) if isinstance(default, list) else default
    text = field.description or ""
    return f"{text} (env {ENV_PREFIX}{name.upper()}; default: {shown!s})".replace("%", "%%")


def add_settings_arguments(
    parser: argparse.ArgumentParser, settings_cls: type[ServiceSettings]
) -> None:
    """Add ``--field-name`` for every field of ``settings_cls`` to ``parser``.

    Flags not given are absent from the parsed namespace (``argparse.SUPPRESS``), so env vars
    and the YAML file still apply to them.
    """
    for name, field in settings_cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if _is_bool(field.annotation):
            parser.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=_help(name, field),
            )
        else:
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            parser.add_argument(
                flag,
                dest=name,
                default=argparse.SUPPRESS,
                metavar=name.upper(),
                help=_help(name, field),
                **({"nargs": extra["nargs"]} if "nargs" in extra else {}),
            )


def settings_from_namespace(settings_cls: type[S], namespace: argparse.Namespace) -> S:
    """Build the settings from the flags in ``namespace`` (others come from env and YAML).

    Attributes of ``namespace`` that are not fields of ``settings_cls`` (a subcommand's own
    arguments) are ignored. Raises ``pydantic.ValidationError`` on a bad value.
    """
    flags = {k: v for k, v in vars(namespace).items() if k in settings_cls.model_fields}
    return settings_cls(**flags)


def load_settings(
    settings_cls: type[S], argv: list[str] | None = None, *, prog: str | None = None
) -> S:
    """Parse ``argv`` (default ``sys.argv[1:]``) into ``settings_cls``; exits with a usage
    message on a bad flag or value, like argparse does."""
    parser = argparse.ArgumentParser(prog=prog, description=settings_cls.__doc__)
    add_settings_arguments(parser, settings_cls)
    namespace = parser.parse_args(argv)
    try:
        return settings_from_namespace(settings_cls, namespace)
    except (ValidationError, FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
