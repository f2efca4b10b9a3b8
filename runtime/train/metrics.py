"""Per-step metrics: one timestamped line + `<dump_folder>/metrics.jsonl` (+ TensorBoard, W&B).

metrics.jsonl holds every step once: a run that starts after step N (a resume, or 0 for a
fresh run) first drops the rows after step N, which a killed predecessor logged but never
checkpointed, into `metrics.dropped.jsonl`. JSON has no NaN: non-finite values are null.

FLOPs per trained token (used for MFU), counting matmuls only, forward + backward = 3x fwd:
    6 * (active matmul parameters)                       dense projections, router,
                                                          top_k experts, output head
  + 6 * n_heads * head_dim * 2 * sum_layers(mean keys)   QK^T and PV (2 matmuls, 2 FLOPs/MAC)
where mean keys for a query at position i (0-based, seq S) is i + 1 for full causal layers
and min(i + 1, window) for sliding layers, averaged over i. The embedding table (a lookup)
is not counted. Document masking only shortens the attended spans further; the formula
uses the plain causal/window mask so MFU stays comparable between runs (it is an upper bound
on work actually needed, as torchtitan's and Megatron's counts are).
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch

from runtime.model.args import ModelArgs

# Dense bf16 peak per GPU (no sparsity), for MFU. Override with RUNTIME_PEAK_TFLOPS.
_PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "B200": 2250.0,
                     "GB200": 2450.0, "L40S": 362.0, "A10G": 70.0}


def mean_attended_keys(seq_len: int, window: int | None) -> float:
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    # i + 1 keys for the first `window` queries, then `window` each
    ramp = window * (window + 1) / 2
    return (ramp + (seq_len - window) * window) / seq_len


def active_matmul_params(args: ModelArgs) -> int:
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    attention = args.dim * q * 2 + args.dim * kv * 2  # wq, wo, wk, wv
    router = args.dim * args.num_experts
    experts = args.top_k * 3 * args.dim * args.moe_inter_dim  # mlp1 (2F) + mlp2 (F)
    head = args.dim * args.vocab_size
    return args.n_layers * (attention + router + experts) + head


def training_flops_per_token(args: ModelArgs, seq_len: int, frozen_base: bool = False) -> float:
    """Matmul FLOPs of one trained token: 6 per active weight (forward, input and weight
    gradients) + attention. frozen_base (LoRA): the base weights get no weight gradient, 4 per
    weight (checked against the dry run's FlopCounterMode count); the adapters' own FLOPs
    (< 1% at rank 16) are left out."""
    attention = 0.0
    for layer in range(args.n_layers):
        window = args.sliding_window if args.is_sliding(layer) else None
        attention += 6 * args.n_heads * args.head_dim * 2 * mean_attended_keys(seq_len, window)
    return (4 if frozen_base else 6) * active_matmul_params(args) + attention


def peak_flops(device: torch.device) -> float | None:
    if os.environ.get("RUNTIME_PEAK_TFLOPS"):
        return float(os.environ["RUNTIME_PEAK_TFLOPS"]) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in sorted(_PEAK_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return tflops * 1e12
    return None


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is KiB on Linux: the process' peak resident memory
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


DROPPED = "metrics.dropped.jsonl"


def json_safe(value):
    """NaN/inf -> None (JSON null), at any depth: strict JSON readers reject NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def truncate_metrics(path: Path, last_step: int) -> int:
    """Keep the rows of steps <= last_step (and no torn last line); the others go to
    metrics.dropped.jsonl. Returns how many rows were moved."""
    if not path.is_file():
        return 0
    keep, drop = [], []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
            ok = isinstance(row, dict) and int(row["step"]) <= last_step
        except (ValueError, KeyError, TypeError):
            ok = False  # a line torn by a kill, or not ours
        (keep if ok else drop).append(line)
    if not drop:
        return 0
    with open(path.with_name(DROPPED), "a") as f:
        f.writelines(line + "\n" for line in drop)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
    return len(drop)


class MetricsLogger:
    def __init__(self, cfg, dump_folder: str, model_args: ModelArgs, seq_len: int,
                 global_tokens_per_step: int, world_size: int, device: torch.device,
                 is_writer: bool, start_step: int | None = None, sinks: list | None = None,
                 trainable_params: tuple[int, int] | None = None):
        """start_step: the step this run continues after (0: fresh); rows after it are
        removed from metrics.jsonl first. None leaves the file as it is.
        sinks: more writers of each emitted record (e.g. wandb_logger.WandbLogger), each with
        log(record) and close(); give them to the writer rank only.
        trainable_params: (whole model, the largest rank's share), on every step line (LoRA
        runs: most of the model is frozen)."""
        self.cfg = cfg
        self.trainable = trainable_params
        self.device = device
        self.is_writer = is_writer
        self.world_size = world_size
        self.tokens_per_step = global_tokens_per_step
        self.flops_per_token = training_flops_per_token(model_args, seq_len,
                                                        frozen_base=trainable_params is not None)
        self.peak = peak_flops(device)
        self.jsonl = None
        self.tb = None
        self.sinks = list(sinks or [])
        if is_writer:
            Path(dump_folder).mkdir(parents=True, exist_ok=True)
            if cfg.enable_jsonl:
                path = Path(dump_folder) / "metrics.jsonl"
                if start_step is not None:
                    dropped = truncate_metrics(path, start_step)
                    if dropped:
                        print(f"{path}: moved {dropped} rows logged after step {start_step} "
                              f"(not checkpointed) to {path.with_name(DROPPED)}", flush=True)
                self.jsonl = open(path, "a", buffering=1)
            if cfg.enable_tensorboard:
                self.tb = self._tensorboard(Path(dump_folder) / cfg.save_tb_folder)
        self._last_time = time.perf_counter()

    @staticmethod
    def _tensorboard(folder: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # pragma: no cover - optional extra
            raise RuntimeError("metrics.enable_tensorboard=true needs `pip install tensorboard`") from exc
        return SummaryWriter(str(folder))

    def reset_timer(self) -> None:
        self._last_time = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def log(self, step: int, loss: float, grad_norm: float, lr: float, extra: dict | None = None,
            force: bool = False) -> dict:
        """Records every step (timing); prints/writes on step 1, every log_freq steps and when forced."""
        now = time.perf_counter()
        step_time = now - self._last_time
        self._last_time = now
        tokens_per_s = self.tokens_per_step / step_time
        achieved = tokens_per_s * self.flops_per_token / self.world_size  # per device
        record = {
            "step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr,
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": tokens_per_s / self.world_size,
            "tflops_per_device": achieved / 1e12,
            "mfu": achieved / self.peak if self.peak else None,
            "memory_gib": peak_memory_gib(self.device),
            "step_time_s": step_time,
            **(extra or {}),
        }
        if self.trainable is not None:
            record["trainable_params"], record["trainable_params_per_rank"] = self.trainable
        if self.is_writer and (force or step == 1 or step % self.cfg.log_freq == 0):
            self._emit(record)
        return record

    def _emit(self, r: dict) -> None:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} step {r['step']:>6} | "
              f"loss {r['loss']:.4f} | grad_norm {r['grad_norm']:.3f} | lr {r['lr']:.2e} | "
              f"tok/s {r['tokens_per_s']:,.0f} | tflops/dev {r['tflops_per_device']:.2f} | "
              f"mfu {mfu} | mem {r['memory_gib']:.2f} GiB | {r['step_time_s']:.2f}s"
              f"{_data_suffix(r, self.tokens_per_step)}", flush=True)
        if self.jsonl:
            self.jsonl.write(json.dumps(json_safe(r), allow_nan=False) + "\n")
        if self.tb:
            for key, value in r.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, r["step"])
        for sink in self.sinks:
            sink.log(r)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
        for sink in self.sinks:
            sink.close()
        sys.stdout.flush()


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _data_suffix(r: dict, tokens_per_step: int) -> str:
    """Step-line tail for loss-masked data: trained tokens (when not every token is), chat
    conversations cut or dropped so far (share of those seen), padding, validation loss."""
    out = ""
    if "trainable_params" in r:
        out += (f" | trainable {_count(r['trainable_params'])} "
                f"({_count(r['trainable_params_per_rank'])}/rank)")
    if r.get("trained_tokens") is not None and r["trained_tokens"] != tokens_per_step:
        out += f" | trained {r['trained_tokens']:,}"
    if r.get("chat_truncated") or r.get("chat_dropped"):
        out += (f" | chats cut {r['chat_truncated']} ({100 * r['chat_cut_share']:.1f}%) dropped "
                f"{r['chat_dropped']} ({100 * r['chat_dropped_share']:.1f}%)")
    if r.get("padding_share") is not None:
        out += f" | padding {100 * r['padding_share']:.1f}%"
    if "validation_loss" in r:
        out += f" | val_loss {r['validation_loss']:.4f} ({r['validation_tokens']:,} tok)"
    return out
