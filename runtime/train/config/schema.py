"""The config schema: one dataclass per TOML section, each field with its rule, and `JobConfig`.

A field is `option(default, choices=..., check=...)`; `validate_config` applies every field's rule
and then the rules that involve several keys (`_cross_check`). Errors name the key and where its
value came from (`Origins`: the file, or `--section.key` on the command line). Pure Python, no
torch. Reading TOML and command lines is loader.py's job.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from runtime.config_fields import (
    auto_or_positive,
    degree,
    half_open_unit,
    non_empty,
    non_negative,
    option,
    positive,
    subset,
    unit_interval,
)
from runtime.data.schema import DataConfig, ValidationConfig
from runtime.errors import ConfigError
from runtime.model.args import ATTN_BACKENDS, COMPUTE_DTYPES, FLAVORS, MOE_IMPLS, ModelArgs
from runtime.model.lora_spec import DEFAULT_TARGETS, TRAINABLE_EXTRA, LoRASpec, resolve_spec

# --------------------------------------------------------------------------- field rules
# The field convention and the common checks are runtime/config_fields.py's (shared with
# data/schema.py); the checks below are this file's own keys'.

def _shard_degree(v):
    return None if v == -1 or v >= 1 else "must be -1 (infer from the world size) or >= 1"


def _global_batch(v):
    ok = v == -1 or v > 0
    return None if ok else "must be -1 (local_batch_size x data-parallel degree) or > 0"


def _load_step(v):
    return None if v >= -1 else "must be -1 (latest) or >= 0"


def _selective_ac(v):
    ok = v == "op" or (v.isdigit() and int(v) > 0)
    return None if ok else "must be 'op' or a positive integer N (checkpoint every N-th layer)"


NO_DECAY_GROUPS = ("norms", "biases", "sinks", "embeddings")
CHECKPOINT_PARTS = ("optimizer", "lr_scheduler", "dataloader", "global_batch")
COMPILE_COMPONENTS = ("model", "loss")
PP_SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble",
                "DualPipeV")


# --------------------------------------------------------------------------- sections

@dataclass
class JobSection:
    dump_folder: str = option("./outputs", check=non_empty, help="root of all outputs of the run")
    description: str = option("", help="free text, logged at start")


@dataclass
class ModelSection:
    name: str = option("gpt_oss", choices=("gpt_oss",), help="model family")
    flavor: str = option("debugmodel", choices=lambda: tuple(FLAVORS),
                       help="a key of runtime.model.args.FLAVORS")
    n_layers: int = option(0, check=non_negative, help="0: the flavor's; >0: reduced-layer runs")
    attn_backend: str = option("auto", choices=ATTN_BACKENDS, help="auto: flex on CUDA, else math")
    compute_dtype: str = option("auto", choices=COMPUTE_DTYPES,
                              help="auto: bfloat16 on CUDA, else float32")
    moe_impl: str = option("grouped", choices=MOE_IMPLS, help="grouped matmul or reference loop")
    load_balance_coeff: float = option(1e-3, check=non_negative,
                                     help="aux-loss-free expert-bias update rate; 0 disables")
    aux_loss_coeff: float = option(0.0, check=non_negative, help="auxiliary balance loss; 0 = off")
    tokenizer_path: str = option("", help="'' = embedded; a tokenizer.json or an HF checkpoint dir")


# The [data] section is the data package's own schema (one owner for the data keys).
DataSection = DataConfig


@dataclass
class TrainingSection:
    steps: int = option(100, check=positive, help="optimizer steps")
    seq_len: int = option(256, check=positive, help="tokens per sample")
    local_batch_size: int = option(8, check=positive,
                                 help="samples per data-parallel rank per micro-step")
    global_batch_size: int = option(-1, check=_global_batch,
                                  help="-1 = local x dp; a multiple -> gradient accumulation")
    seed: int = option(0, check=non_negative, help="parameter init and data seed")
    max_norm: float = option(1.0, check=non_negative, help="gradient clipping norm; 0 disables")
    mixed_precision_param: str = option("bfloat16", choices=("bfloat16", "float32"),
                                      help="FSDP compute dtype of parameters")
    mixed_precision_reduce: str = option("float32", choices=("float32", "bfloat16"),
                                       help="gradient reduce-scatter dtype")
    device: str = option("auto", choices=("auto", "cpu", "cuda"), help="auto: cuda if available")
    on_nonfinite: str = option("error", choices=("error", "skip"),
                             help="on a NaN/inf loss or grad norm: stop, or skip the step")
    max_skipped_steps: int = option(3, check=non_negative,
                                  help="on_nonfinite='skip': steps skipped over the whole run "
                                       "(resumes included) before the run stops with exit 2")
    stop_data_wait_s: float = option(10.0, check=non_negative,
                                     help="a stop signal while the trainer waits for its next "
                                          "batch: the batch may still come this long, the step "
                                          "then runs and saves; else it stops without saving")
    deterministic: bool = option(False, help="deterministic algorithms (slower)")
    skip_memory_check: bool = option(False, help="start even when the memory estimate exceeds "
                                               "the device's (runtime/train/memory_plan.py); "
                                               "also --skip-memory-check")
    loss_chunk_size: int = option(1024, check=non_negative,
                                help="tokens per chunk of the fused output head + cross entropy "
                                     "(never materialises all logits); 0 = plain logits path")

    def gradient_accumulation_steps(self, dp_degree: int) -> int:
        """Micro-steps per optimizer step for a data-parallel degree (1 when global = -1)."""
        per_step = self.local_batch_size * dp_degree
        if self.global_batch_size == -1:
            return 1
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"training.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"training.local_batch_size ({self.local_batch_size}) x data-parallel degree "
                f"({dp_degree}) = {per_step}"
            )
        return self.global_batch_size // per_step


@dataclass
class OptimizerSection:
    name: str = option("AdamW", choices=("AdamW", "Adam"), help="torch.optim class")
    lr: float = option(8e-4, check=positive, help="peak learning rate")
    beta1: float = option(0.9, check=half_open_unit)
    beta2: float = option(0.95, check=half_open_unit)
    eps: float = option(1e-8, check=positive)
    weight_decay: float = option(0.1, check=non_negative)
    no_decay: list = option(list(NO_DECAY_GROUPS), check=subset(NO_DECAY_GROUPS),
                          help="parameter groups exempt from weight decay")
    implementation: str = option("auto", choices=("auto", "fused", "foreach", "for-loop"),
                               help="auto: fused on CUDA, foreach elsewhere")


@dataclass
class LRSchedulerSection:
    warmup_steps: int = option(10, check=non_negative, help="linear warmup (clamped to steps)")
    decay_type: str = option("cosine", choices=("linear", "cosine", "wsd", "constant"))
    decay_ratio: float = option(0.2, check=unit_interval, help="wsd: fraction of steps decaying")
    min_lr_factor: float = option(0.1, check=unit_interval, help="final lr = lr x this")


@dataclass
class ParallelismSection:
    data_parallel_replicate_degree: int = option(1, check=degree, help="DDP / HSDP replicas")
    data_parallel_shard_degree: int = option(-1, check=_shard_degree, help="FSDP; -1 = the rest")
    tensor_parallel_degree: int = option(1, check=degree, help="TP + sequence parallel")
    expert_parallel_degree: int = option(1, check=degree,
                                       help="experts split over dp_shard x cp (x tp) ranks")
    expert_tensor_parallel_degree: int = option(1, check=degree, help="1 or tensor_parallel_degree")
    context_parallel_degree: int = option(1, check=degree, help="sequence split for attention")
    context_parallel_load_balancer: str = option("headtail", choices=("headtail", "none"),
                                               help="headtail: causal-balanced chunks")
    pipeline_parallel_degree: int = option(1, check=degree)
    pipeline_parallel_schedule: str = option("1F1B", choices=PP_SCHEDULES)
    pipeline_parallel_microbatch_size: int = option(1, check=positive)
    pipeline_parallel_layers_per_stage: int = option(-1, check=auto_or_positive,
                                                   help="-1: split layers evenly over stages")
    pipeline_parallel_overlap_ep: bool = option(
        True, help="DualPipeV with EP: overlap all-to-alls with the other microbatch")
    enable_async_tensor_parallel: bool = option(False, help="needs compile.enable and CUDA")
    disable_loss_parallel: bool = option(False, help="gather logits before the loss under TP")
    fsdp_reshard_after_forward: str = option("default", choices=("default", "always", "never"))


@dataclass
class CheckpointSection:
    enable: bool = option(False)
    folder: str = option("checkpoints", check=non_empty, help="relative to job.dump_folder")
    interval: int = option(500, check=positive, help="steps between saves")
    keep_latest_k: int = option(0, check=non_negative, help="0 keeps all")
    async_mode: str = option("disabled", choices=("disabled", "async"))
    initial_load_hf: str = option("", help="HF checkpoint dir to start from (no saved step yet)")
    initial_load_path: str = option("", help="DCP checkpoint dir to start from (no saved step yet)")
    load_step: int = option(-1, check=_load_step, help="-1: latest")
    last_save_in_hf: bool = option(False, help="after the last step, write the model as an HF "
                                             "checkpoint (+ tokenizer, chat template) in "
                                             "<dump_folder>/hf/")
    last_save_hf_dtype: str = option("bfloat16", choices=("bfloat16", "float16", "float32"),
                                   help="dtype of the HF export")
    last_save_hf_experts: str = option("dense", choices=("dense", "mxfp4"),
                                     help="experts of the HF export: dense or MXFP4 as released")
    exclude_from_loading: list = option([], check=subset(CHECKPOINT_PARTS),
                                      help="resume parts taken from this config instead: "
                                           "lr_scheduler (optimizer.lr + [lr_scheduler] at the "
                                           "resumed step), optimizer (fresh state), "
                                           "dataloader, global_batch (accept another one)")


@dataclass
class ActivationCheckpointSection:
    mode: str = option("none", choices=("none", "full", "selective"))
    selective_ac_option: str = option("op", check=_selective_ac, help="'op' or every N-th layer")


@dataclass
class CompileSection:
    enable: bool = option(False, help="torch.compile each transformer block")
    components: list = option(list(COMPILE_COMPONENTS), check=subset(COMPILE_COMPONENTS))


@dataclass
class QuantizeSection:
    mode: str = option("none", choices=("none", "float8", "mxfp8"), help="mxfp8: Blackwell only")
    float8_recipe: str = option("tensorwise", choices=("tensorwise", "rowwise"))
    emulate: bool = option(False, help="emulated float8 (tests on hardware without it)")
    filter_fqns: list = option(["output", "router"], help="linears left in high precision")
    enable_fsdp_float8_all_gather: bool = option(False, help="tensorwise only")


@dataclass
class MetricsSection:
    log_freq: int = option(1, check=positive, help="steps between log lines")
    enable_jsonl: bool = option(True, help="write metrics.jsonl in dump_folder")
    enable_tensorboard: bool = option(False)
    save_tb_folder: str = option("tb", check=non_empty, help="relative to job.dump_folder")
    enable_wandb: bool = option(False, help="log to Weights & Biases (pip install '.[wandb]')")
    wandb_project: str = option("", help="'' = $WANDB_PROJECT, else 'gptoss-runtime'")
    wandb_run_name: str = option("", help="'' = $WANDB_NAME, else the Slurm job name-id, "
                                        "else the dump folder's name")
    wandb_mode: str = option("", choices=("", "online", "offline", "disabled"),
                           help="'' = $WANDB_MODE (wandb's default: online)")


@dataclass
class ProfilingSection:
    enable_profiling: bool = option(False, help="torch.profiler traces, every rank")
    save_traces_folder: str = option("profile_traces", check=non_empty,
                                   help="relative to job.dump_folder")
    profile_freq: int = option(10, check=positive,
                             help="steps per profiling cycle (traces, memory snapshots)")
    profiler_warmup: int = option(3, check=non_negative,
                                help="steps traced but discarded before the active ones")
    profiler_active: int = option(1, check=positive, help="steps recorded per cycle")
    enable_memory_snapshot: bool = option(False, help="CUDA allocator snapshots (and on OOM)")
    save_memory_snapshot_folder: str = option("memory_snapshot", check=non_empty,
                                            help="relative to job.dump_folder")


ValidationSection = ValidationConfig  # one owner: runtime/data/schema.py


@dataclass
class LoRASection:
    enable: bool = option(False, help="LoRA fine-tuning: frozen base (compute dtype), adapters "
                                    "trained (runtime/model/lora.py)")
    rank: int = option(16, check=positive, help="adapter rank r")
    alpha: float = option(32.0, check=positive, help="scaling = alpha / r (rsLoRA: / sqrt(r))")
    dropout: float = option(0.0, check=half_open_unit, help="on the adapters' input; attention "
                                                    "targets only (0 with expert targets)")
    targets: list = option(list(DEFAULT_TARGETS),
                         help="q_proj k_proj v_proj o_proj experts.gate_up_proj "
                              "experts.down_proj all-linear (= the 4 attention projections), "
                              "or our names (wq ... mlp1 mlp2), as module-path suffixes")
    layers: str = option("all", check=non_empty,
                       help="'all' or layer ids and ranges, e.g. '0-11,14'")
    use_rslora: bool = option(False, help="scaling alpha / sqrt(r) instead of alpha / r")
    trainable_extra: list = option([], check=subset(TRAINABLE_EXTRA),
                                 help="base groups trained in full as well")
    export: str = option("both", choices=("adapter", "merged", "both"),
                       help="with checkpoint.last_save_in_hf: <dump>/hf/adapter (PEFT), "
                            "<dump>/hf (merged HF checkpoint), or both")


@dataclass
class JobConfig:
    job: JobSection = field(default_factory=JobSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingSection = field(default_factory=TrainingSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    lr_scheduler: LRSchedulerSection = field(default_factory=LRSchedulerSection)
    parallelism: ParallelismSection = field(default_factory=ParallelismSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    activation_checkpoint: ActivationCheckpointSection = field(
        default_factory=ActivationCheckpointSection)
    compile: CompileSection = field(default_factory=CompileSection)
    quantize: QuantizeSection = field(default_factory=QuantizeSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    profiling: ProfilingSection = field(default_factory=ProfilingSection)
    lora: LoRASection = field(default_factory=LoRASection)

    def validate(self) -> None:
        """Re-check every value (for configs built or edited in Python)."""
        validate_config(self)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_toml_str(self) -> str:
        """The full resolved config as TOML; loading it back gives an equal JobConfig."""
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
            lines.append("")
        return "\n".join(lines)

    def model_args(self) -> ModelArgs:
        """The flavor's ModelArgs with this config's overrides (vocab_size: the flavor's)."""
        m = self.model
        base = FLAVORS[m.flavor]
        changes: dict[str, Any] = dict(
            attn_backend=m.attn_backend, compute_dtype=m.compute_dtype, moe_impl=m.moe_impl,
            # 0 disables the expert-bias update; ModelArgs spells that None.
            load_balance_coeff=m.load_balance_coeff or None, aux_loss_coeff=m.aux_loss_coeff,
        )
        if m.n_layers > 0:
            changes["n_layers"] = m.n_layers
            if base.layer_types is not None:  # keep an explicit pattern when it can be cut
                fits = m.n_layers <= len(base.layer_types)
                changes["layer_types"] = base.layer_types[: m.n_layers] if fits else None
        try:
            return base.replace(**changes)
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None

    def lora_spec(self) -> LoRASpec | None:
        """The resolved adapters of a LoRA run (runtime/model/lora_spec.py), None without."""
        if not self.lora.enable:
            return None
        try:
            return resolve_spec(self.lora, self.model_args())
        except ValueError as e:
            raise ConfigError(f"lora.{e}") from None


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(JobConfig)}


def section_fields(section: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(SECTIONS[section])}


def field_kind(f: dataclasses.Field) -> type:
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return type(default)


# --------------------------------------------------------------------------- origins + errors

class Origins:
    """Where each value came from, so an error can say `file: key` or `command line: --key`."""

    def __init__(self, default: str):
        self.default = default  # the config file (or "config") for values never set
        self.by_key: dict[tuple[str, str], tuple[str, bool]] = {}

    def set(self, section: str, key: str, origin: str, flag: bool) -> None:
        self.by_key[(section, key)] = (origin, flag)

    def name(self, section: str, key: str) -> str:
        flag = self.by_key.get((section, key), (None, False))[1]
        return f"--{section}.{key}" if flag else f"{section}.{key}"

    def error(self, section: str, key: str, text: str) -> ConfigError:
        origin = self.by_key.get((section, key), (self.default, False))[0]
        return ConfigError(f"{origin}: {self.name(section, key)} {text}")


# --------------------------------------------------------------------------- typing

_KIND_TEXT = {bool: "true or false", int: "an integer", float: "a finite number",
              str: "a string", list: "a list of strings"}


def coerce(kind: type, value: Any) -> Any:
    """`value` as `kind`, or raise TypeError. An int is accepted where a float is expected."""
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isfinite(value):
            return float(value)
    if kind is str and isinstance(value, str):
        return value
    if kind is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"must be {_KIND_TEXT[kind]}")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # JSON string escapes are valid TOML basic-string escapes; DEL must be escaped too.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


# --------------------------------------------------------------------------- validation

def validate_config(cfg: JobConfig, origins: Origins | None = None) -> None:
    """Every field's rule, then the rules involving several keys; raises ConfigError."""
    origins = origins or Origins("config")
    for section in SECTIONS:
        obj = getattr(cfg, section)
        for key, f in section_fields(section).items():
            value = getattr(obj, key)
            try:
                value = coerce(field_kind(f), value)
            except TypeError as e:
                raise origins.error(section, key, f"{e}, got {value!r}") from None
            choices = f.metadata["choices"]
            choices = choices() if callable(choices) else choices
            if choices is not None and value not in choices:
                problem = f"must be one of {', '.join(choices)}"
            else:
                problem = f.metadata["check"] and f.metadata["check"](value)
            if problem:
                raise origins.error(section, key, f"{problem}, got {value!r}")
    _cross_check(cfg, origins)


def _check_validation(cfg: JobConfig, o: Origins) -> None:
    v, d = cfg.validation, cfg.data
    if not v.enable:
        return
    held_out = v.dataset_path or v.hf_dataset or (v.dataset and v.dataset != d.dataset)
    if v.split_fraction > 0 and held_out:
        raise o.error("validation", "split_fraction", "and a held-out source "
                      f"({o.name('validation', 'dataset_path')} / hf_dataset) are exclusive")
    if v.split_fraction >= 1:
        raise o.error("validation", "split_fraction", f"must be < 1, got {v.split_fraction}")
    embedded_chat = d.dataset == "chat" and not (d.dataset_path or d.hf_dataset)
    if not (v.split_fraction > 0 or held_out or embedded_chat):
        raise o.error("validation", "enable", f"needs {o.name('validation', 'dataset_path')} "
                      f"(or hf_dataset) or {o.name('validation', 'split_fraction')} > 0")


def _check_lora(cfg: JobConfig, o: Origins) -> None:
    """The [lora] targets resolve on this model (a target that adapts nothing is an error)."""
    if not cfg.lora.enable:
        return
    if cfg.quantize.mode != "none":
        raise o.error("lora", "enable", f"with {o.name('quantize', 'mode')} = "
                      f"'{cfg.quantize.mode}' is not supported (the adapters sit on the "
                      f"linears float8 would replace); set quantize.mode = 'none'")
    try:
        model_args = cfg.model_args()
    except ConfigError:
        return  # reported by the model checks
    try:
        resolve_spec(cfg.lora, model_args)
    except ValueError as e:
        key, _, text = str(e).partition(": ")
        raise o.error("lora", key, text) from None


def _cross_check(cfg: JobConfig, o: Origins) -> None:
    """Rules that involve more than one key. The first key named is the one blamed."""
    t, p, c, q = cfg.training, cfg.parallelism, cfg.checkpoint, cfg.quantize
    for key, problem in cfg.data.problems(lambda k: o.name("data", k)):
        raise o.error("data", key, problem)
    _check_validation(cfg, o)
    if t.global_batch_size > 0 and t.global_batch_size % t.local_batch_size:
        raise o.error("training", "global_batch_size",
                      f"({t.global_batch_size}) must be a multiple of "
                      f"{o.name('training', 'local_batch_size')} ({t.local_batch_size})")
    max_seq_len = FLAVORS[cfg.model.flavor].max_seq_len
    if t.seq_len > max_seq_len:
        raise o.error("training", "seq_len", f"({t.seq_len}) exceeds the max_seq_len "
                      f"({max_seq_len}) of model flavor '{cfg.model.flavor}'")
    if p.pipeline_parallel_degree > 1 and t.local_batch_size % p.pipeline_parallel_microbatch_size:
        raise o.error("training", "local_batch_size",
                      f"({t.local_batch_size}) must be a multiple of "
                      f"{o.name('parallelism', 'pipeline_parallel_microbatch_size')} "
                      f"({p.pipeline_parallel_microbatch_size})")
    if p.enable_async_tensor_parallel and not (cfg.compile.enable
                                               and "model" in cfg.compile.components):
        raise o.error("parallelism", "enable_async_tensor_parallel",
                      f"needs {o.name('compile', 'enable')} = true with 'model' in "
                      f"{o.name('compile', 'components')} (async TP is a compiler pass)")
    pr = cfg.profiling
    if pr.enable_profiling and pr.profile_freq < pr.profiler_warmup + pr.profiler_active:
        raise o.error("profiling", "profile_freq",
                      f"({pr.profile_freq}) must be >= {o.name('profiling', 'profiler_warmup')} + "
                      f"{o.name('profiling', 'profiler_active')} "
                      f"({pr.profiler_warmup} + {pr.profiler_active})")
    if c.initial_load_hf and c.initial_load_path:
        raise o.error("checkpoint", "initial_load_hf",
                      f"and {o.name('checkpoint', 'initial_load_path')} are mutually exclusive")
    _check_lora(cfg, o)
    if q.mode == "float8" and q.enable_fsdp_float8_all_gather and q.float8_recipe != "tensorwise":
        raise o.error("quantize", "enable_fsdp_float8_all_gather",
                      f"needs {o.name('quantize', 'float8_recipe')} = 'tensorwise', "
                      f"got '{q.float8_recipe}'")


