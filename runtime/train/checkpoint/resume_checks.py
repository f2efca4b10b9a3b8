"""What a resume compares before it loads anything: the model and the config.

- The model: the checkpoint's runtime.json names the flavor and the ModelArgs that shape the
  weights, and its DCP index holds every tensor's name and full shape. Both must equal this
  run's; DCP alone would happily load the subset a smaller model asks for.
- LoRA: the [lora] keys that shape or scale the adapters (rank, targets, layers, alpha, ...)
  must be the checkpoint's: one line naming the key and both values (`lora_change`).
- The config: the keys that differ from the checkpoint's are listed; the few a resume cannot
  honour (the restored optimizer / lr scheduler / data position win) are an error or a named
  warning, each with the `checkpoint.exclude_from_loading` part that lets the config win.
- The global batch: runtime.json records the effective one (sequences per optimizer step).
  With training.global_batch_size = -1 it is local_batch_size x the data-parallel degree, so
  a resume on another number of ranks would silently change the optimisation: an error unless
  `"global_batch"` is in exclude_from_loading. An explicit global_batch_size resumes on any
  mesh unchanged.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from runtime.errors import ConfigError
from runtime.hf.fingerprint import header_fingerprint
from runtime.model.lora_spec import resolve_spec
from runtime.safe_dcp import read_metadata_file

# ModelArgs fields that do not change the weights' meaning: may differ on resume.
NOT_IDENTITY = {"attn_backend", "moe_impl", "compute_dtype", "init_std", "load_balance_coeff",
                "aux_loss_coeff", "max_seq_len"}


def model_identity(flavor: str, args) -> dict[str, Any]:
    """JSON-ready {"flavor", "args"} of the fields that define the weights."""
    fields = {k: list(v) if isinstance(v, tuple) else v
              for k, v in args.to_dict().items() if k not in NOT_IDENTITY}
    return {"flavor": flavor, "args": fields}


def identity_differences(saved: dict, current: dict) -> list[str]:
    old, new = saved.get("args", {}), current["args"]
    out = [f"{k} {old.get(k)!r} here {new.get(k)!r}" for k in sorted(set(old) | set(new))
           if old.get(k) != new.get(k)]
    if out and saved.get("flavor") != current["flavor"]:
        out.insert(0, f"flavor {saved.get('flavor')!r} here {current['flavor']!r}")
    return out


def shape_differences(stored: dict[str, tuple], run: dict[str, tuple]) -> list[str]:
    missing = sorted(set(run) - set(stored))
    extra = sorted(set(stored) - set(run))
    differ = sorted(k for k in set(run) & set(stored) if tuple(run[k]) != tuple(stored[k]))
    out = []
    if missing:
        out.append(f"{len(missing)} tensors of this model are not in it (e.g. {missing[0]})")
    if extra:
        out.append(f"{len(extra)} of its tensors are not in this model (e.g. {extra[0]})")
    for k in differ[:2]:
        out.append(f"{k} is {list(stored[k])} there, {list(run[k])} here")
    if len(differ) > 2:
        out.append(f"{len(differ) - 2} more shapes differ")
    return out


def stored_model_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor under the checkpoint's "model" key (safe metadata read)."""
    metadata = read_metadata_file(path / ".metadata")
    return {key[len("model."):]: tuple(meta.size)
            for key, meta in metadata.state_dict_metadata.items()
            if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}


def model_mismatch(path: Path, saved_identity: dict | None, current_identity: dict,
                   stored_shapes: dict, run_shapes: dict) -> str | None:
    """One line saying how the checkpoint's model differs from this run's, or None."""
    details = identity_differences(saved_identity, current_identity) if saved_identity else []
    details = details or shape_differences(stored_shapes, run_shapes)
    if not details:
        return None
    hint = "its model settings"
    if saved_identity:
        hint = f"model.flavor={saved_identity['flavor']!r}"
        n_layers = saved_identity.get("args", {}).get("n_layers")
        hint += f" model.n_layers={n_layers}" if n_layers is not None else ""
    return (f"checkpoint {path} holds another model than this run ({'; '.join(details)}); "
            f"nothing was loaded or deleted. To start this model fresh, use a new "
            f"job.dump_folder (or checkpoint.folder); to continue the checkpoint, run with {hint}")


def base_identity(checkpoint_cfg, seed: int) -> dict[str, Any]:
    """The frozen base of a LoRA run, as its checkpoints record it: the source and a cheap
    fingerprint (HF: the safetensors headers, runtime/hf/fingerprint.py; DCP: its index
    file), or the seed of a base initialised from scratch."""
    c = checkpoint_cfg
    try:
        if c.initial_load_hf:
            return {"initial_load_hf": c.initial_load_hf,
                    "fingerprint": header_fingerprint(c.initial_load_hf)}
        if c.initial_load_path:
            index = Path(c.initial_load_path) / ".metadata"
            digest = hashlib.sha256(index.read_bytes()).hexdigest()
            return {"initial_load_path": c.initial_load_path, "fingerprint": f"sha256:{digest}"}
    except (OSError, ValueError) as e:
        key = "initial_load_hf" if c.initial_load_hf else "initial_load_path"
        raise ConfigError(f"checkpoint.{key}: {' '.join(str(e).split())}") from None
    return {"seed": seed}


def _describe_base(base: dict) -> str:
    if "seed" in base:
        return f"a base initialised with training.seed={base['seed']}"
    return f"{_setting(base)} ({str(base.get('fingerprint'))[:19]}...)"


def base_mismatch(path: Path, saved: dict | None, current: dict | None) -> str | None:
    """One line if a LoRA checkpoint's base is not this run's (or only one of the two is a
    LoRA run), else None. A moved base (same fingerprint, another path) is the same base."""
    if saved is None and current is None:
        return None
    tail = ("nothing was loaded or deleted. To train on this base, use a new job.dump_folder; "
            "to continue the checkpoint, run with ")
    if current is None:
        return (f"checkpoint {path} holds LoRA adapters (of {_describe_base(saved)}) but this run "
                f"has lora.enable = false; {tail}its [lora] settings")
    if saved is None:
        return (f"checkpoint {path} holds a full model, not LoRA adapters, and this run has "
                f"lora.enable = true; {tail}lora.enable = false")
    same = (saved.get("fingerprint") == current.get("fingerprint") if "seed" not in current
            else saved.get("seed") == current["seed"])
    if same and ("seed" in saved) == ("seed" in current):
        return None
    return (f"checkpoint {path} holds LoRA adapters of another base than this run's: trained on "
            f"{_describe_base(saved)}, this run has {_describe_base(current)}; {tail}"
            f"{_setting(saved)}")


# [lora] keys that shape or scale the adapters a checkpoint holds (runtime/model/lora_spec.py):
# a resume keeps them; targets and layers compare as the (layer, module) pairs they select,
# so another spelling of the same adapters ("q_proj" / "wq") resumes.
LORA_KEYS = ("rank", "targets", "layers", "alpha", "use_rslora", "trainable_extra")


def lora_change(path: Path, saved_config: dict | None, lora, model_args) -> str | None:
    """One line naming the first [lora] key whose value differs from the checkpoint's (both
    values), or None. Only between two LoRA runs: a LoRA <-> full switch is base_mismatch's."""
    saved = (saved_config or {}).get("lora") if isinstance(saved_config, dict) else None
    if not isinstance(saved, dict) or not saved.get("enable") or not lora.enable:
        return None
    same_pairs = _same_adapters(saved, lora, model_args)
    for key in LORA_KEYS:
        if key not in saved:
            continue
        old, new = saved[key], getattr(lora, key)
        if key in ("targets", "layers") and same_pairs:
            continue
        if (list(old) if isinstance(old, (list, tuple)) else old) == \
                (list(new) if isinstance(new, (list, tuple)) else new):
            continue
        return (f"checkpoint {path}: lora.{key} = {_fmt(new)} here, {_fmt(old)} in the "
                f"checkpoint, whose adapters it shapes or scales; nothing was loaded or deleted. "
                f"Set lora.{key} = {_fmt(old)} to continue the checkpoint, or use a new "
                f"job.dump_folder to train these adapters fresh")
    return None


def _same_adapters(saved: dict, lora, model_args) -> bool:
    try:
        old = resolve_spec(SimpleNamespace(**{**vars(lora), **saved}), model_args)
        new = resolve_spec(lora, model_args)
    except (ValueError, TypeError):
        return False  # the saved section does not resolve here: compare the raw values
    return old.pairs == new.pairs


def _setting(base: dict) -> str:
    if "seed" in base:
        return f"training.seed={base['seed']}"
    key = "initial_load_hf" if "initial_load_hf" in base else "initial_load_path"
    return f"checkpoint.{key}={base[key]!r}"


# What a resume does with a config key whose value differs from the checkpoint's:
# (key prefix, the exclude_from_loading part that lets it apply, why it cannot apply otherwise,
#  error?). Keys not listed take effect.
RESUME_RULES = [
    ("optimizer.lr", "lr_scheduler", "the restored lr scheduler keeps {old}", True),
    ("optimizer.beta1", "optimizer", "the restored optimizer state keeps {old}", False),
    ("optimizer.beta2", "optimizer", "the restored optimizer state keeps {old}", False),
    ("optimizer.eps", "optimizer", "the restored optimizer state keeps {old}", False),
    ("optimizer.weight_decay", "optimizer", "the restored optimizer state keeps {old}", False),
    ("training.seed", None, "weights and RNG state come from the checkpoint", False),
    ("checkpoint.initial_load_", None, "the weights come from the checkpoint", False),
    ("data.", "dataloader", "the data loader resumes at the checkpoint's position "
                            "(a position in the old data)", False),
]
# Differences not worth reporting on a resume.
QUIET_KEYS = {"checkpoint.load_step", "checkpoint.exclude_from_loading", "job.description",
              "job.dump_folder"}


def config_differences(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """(section.key, checkpoint's value, this run's value) of every reportable difference."""
    out = []
    for section, values in current.items():
        for key, value in values.items():
            name = f"{section}.{key}"
            old = saved.get(section, {}).get(key, value)
            if old != value and name not in QUIET_KEYS:
                out.append((name, old, value))
    return out


def _fmt(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (str, list)) else repr(value)


def describe_changes(diffs: list[tuple[str, Any, Any]]) -> str:
    return "; ".join(f"{k} {_fmt(a)} -> {_fmt(b)}" for k, a, b in diffs)


def unhonoured_changes(diffs: list[tuple[str, Any, Any]],
                       exclude: list[str]) -> tuple[list[str], str | None]:
    """(warnings, error) for the differences this resume cannot apply."""
    warnings = []
    for key, old, new in diffs:
        rule = next((r for r in RESUME_RULES if key.startswith(r[0])), None)
        if rule is None or (rule[1] is not None and rule[1] in exclude):
            continue
        _, part, why, is_error = rule
        remedy = (f"add \"{part}\" to checkpoint.exclude_from_loading to take it from this "
                  f"config" if part else "it only applies to a fresh run")
        text = (f"{key} = {_fmt(new)} cannot take effect on this resume: "
                f"{why.format(old=_fmt(old))}; {remedy}")
        if is_error:
            return warnings, f"{text}, or set it back to {_fmt(old)}"
        warnings.append(text)
    return warnings, None


def global_batch_change(saved_train: dict, current: int, how: str,
                        exclude: list[str]) -> tuple[str | None, str | None]:
    """(error, warning) when the checkpoint's effective global batch (`saved_train`'s
    "global_batch"; absent in older checkpoints: not checked) differs from this run's
    `current`, which `how` explains."""
    old = saved_train.get("global_batch") if isinstance(saved_train, dict) else None
    if not isinstance(old, int) or old == current:
        return None, None
    text = (f"the checkpoint was trained with a global batch of {old} sequences per step, this "
            f"run's is {current} ({how})")
    if "global_batch" in exclude:
        return None, (f"{text}: continuing with {current} (checkpoint.exclude_from_loading has "
                      f"\"global_batch\")")
    return (f"{text}; set training.global_batch_size = {old} to keep it, or add "
            f"\"global_batch\" to checkpoint.exclude_from_loading to continue with {current}"), None
