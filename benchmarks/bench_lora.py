"""LoRA against full fine-tuning of the same job, measured on CPU (issue #22 item 8).

    python benchmarks/bench_lora.py [--steps 40] [--out benchmarks/results/lora_cpu.jsonl]

Three JSON lines:
- kind "lora_steps": configs/debugmodel_lora.toml (embedded chat sample) as LoRA and as a full
  fine-tune of the same job (`--lora.enable=false`, its lr from debugmodel_sft.toml): the same
  seeded base and the same batches. Both trainers live in one process and their steps
  alternate (full, LoRA, full, ...), so the shared machine's load hits both alike: median step
  times and their ratio, the trained-token loss of every step, the validation loss before and
  after, trainable parameters.
- kind "lora_rss": peak RSS of one step-and-a-half of training a 20b-shaped layer (dim 2880,
  64 x 64 heads, 8 kv heads, expert width 2880, top-4; 1 layer, 8 of 20b's 32 experts and the
  embedded tokenizer's 8192 vocabulary, so a full fine-tune fits in this machine's memory),
  LoRA and full fine-tune each in a fresh process. measured = peak RSS - RSS before the model
  is built; next to it runtime.plan's estimate of the same job on CPU (fp32: the frozen base is
  fp32 here, bf16 on GPU).
- kind "lora_plan": runtime.plan for configs/gptoss_20b_lora.toml on 1 GPU against the same job
  as a full fine-tune (the memory a 20b LoRA run saves, which no CPU can measure).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

LORA_CONFIG = str(REPO / "configs" / "debugmodel_lora.toml")
FULL_LR = "1e-3"  # configs/debugmodel_sft.toml: the full fine-tune's own lr
QUIET = ["--checkpoint.enable=false", "--metrics.enable_jsonl=false",
         "--metrics.enable_tensorboard=false"]
RSS_FLAVOR = "20b-layer-bench"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _register_rss_flavor() -> None:
    from runtime.model.args import FLAVORS

    FLAVORS[RSS_FLAVOR] = FLAVORS["20b"].replace(n_layers=1, num_experts=8,
                                                 vocab_size=FLAVORS["debugmodel"].vocab_size)


def _rss_overrides(mode: str) -> list[str]:
    return [f"--model.flavor={RSS_FLAVOR}", "--training.local_batch_size=1",
            "--training.seq_len=512", "--validation.enable=false",
            f"--lora.enable={'true' if mode == 'lora' else 'false'}"]


# --------------------------------------------------------------------------- step time

def bench_steps(steps: int) -> dict:
    import torch

    from runtime.train.config.loader import load_config
    from runtime.train.trainer import Trainer

    trainers, batches, times, losses, val = {}, {}, {}, {}, {}
    for mode in ("full", "lora"):
        extra = ["--lora.enable=false", f"--optimizer.lr={FULL_LR}"] if mode == "full" else []
        cfg = load_config(LORA_CONFIG, QUIET + [f"--training.steps={steps}",
                                                f"--job.dump_folder=outputs/bench_lora_{mode}",
                                                *extra])
        t = trainers[mode] = Trainer(cfg)
        data = iter(t.dataloader)
        batches[mode] = [next(data) for _ in range(steps)]
        val[mode] = [t.validation_metrics()["validation_loss"]]
        times[mode], losses[mode] = [], []
    for i in range(steps):  # interleaved: full, lora, full, lora, ...
        for mode, t in trainers.items():
            t.step += 1
            start = time.perf_counter()
            loss, _, _ = t.optimizer_step(batches[mode][i])
            times[mode].append(time.perf_counter() - start)
            losses[mode].append(float(loss))
    for mode, t in trainers.items():
        val[mode].append(t.validation_metrics()["validation_loss"])
    lora = trainers["lora"]
    trainable = sum(p.numel() for p in lora.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in lora.model.parameters())
    median = {m: statistics.median(x[1:]) for m, x in times.items()}  # step 1: warm-up
    return {
        "kind": "lora_steps", "config": "configs/debugmodel_lora.toml", "steps": steps,
        "tokens_per_step": lora.global_batch * lora.cfg.training.seq_len,
        "threads": torch.get_num_threads(),
        "trainable_params": trainable, "total_params": total,
        "trainable_fraction": trainable / total,
        "median_step_s_full": median["full"], "median_step_s_lora": median["lora"],
        "step_time_ratio_lora_over_full": median["lora"] / median["full"],
        "loss_full": losses["full"], "loss_lora": losses["lora"],
        "validation_loss_full": val["full"], "validation_loss_lora": val["lora"],
    }


# --------------------------------------------------------------------------- peak RSS

def rss_child(mode: str) -> None:
    """One process, one mode: prints one JSON line {rss_before, peak_rss, step_s}."""
    _register_rss_flavor()
    from runtime.train.config.loader import load_config
    from runtime.train.trainer import Trainer

    cfg = load_config(LORA_CONFIG, QUIET + _rss_overrides(mode) + [
        "--training.steps=2", f"--job.dump_folder=outputs/bench_lora_rss_{mode}"])
    before = _rss_bytes()
    t = Trainer(cfg)
    data = iter(t.dataloader)
    start = time.perf_counter()
    for _ in range(2):  # the second step runs with AdamW's state allocated
        t.step += 1
        t.optimizer_step(next(data))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"rss_before": before, "peak_rss": peak,
                      "step_s": (time.perf_counter() - start) / 2}), flush=True)


def _plan(config: str, world: int, overrides: list[str], flavor: bool = False) -> dict:
    """runtime.plan's lines (GiB) in a fresh process (it needs its own process group)."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]);"
        "from benchmarks.bench_lora import _register_rss_flavor as r;"
        + ("r();" if flavor else "")
        + "from runtime.train.config.loader import load_config;"
        "from runtime.train.memory_plan import plan_job;"
        "p = plan_job(load_config(sys.argv[2], sys.argv[4:]), int(sys.argv[3]));"
        "print(json.dumps({**{l.label: l.bytes / 2**30 for l in p.lines},"
        " 'total': p.total_bytes / 2**30, 'trainable': p.total_trainable,"
        " 'total_params': p.total_params}))")
    out = subprocess.run([sys.executable, "-c", code, str(REPO), config, str(world), *overrides],
                         check=True, capture_output=True, text=True, timeout=600, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_rss() -> dict:
    record: dict = {"kind": "lora_rss", "shape": "20b layer (dim 2880, 64x64 heads, 8 kv, "
                    "expert width 2880, top-4), 1 layer, 8 experts, vocab 8192, 512 tokens",
                    "dtype": "float32 (CPU)"}
    for mode in ("full", "lora"):
        out = subprocess.run([sys.executable, __file__, "--rss-child", mode], check=True,
                             capture_output=True, text=True, timeout=1800, cwd=REPO)
        child = json.loads(out.stdout.strip().splitlines()[-1])
        plan = _plan(LORA_CONFIG, 1, _rss_overrides(mode) + ["--training.device=cpu"],
                     flavor=True)
        record[f"measured_gib_{mode}"] = (child["peak_rss"] - child["rss_before"]) / 2**30
        record[f"peak_rss_gib_{mode}"] = child["peak_rss"] / 2**30
        record[f"step_s_{mode}"] = child["step_s"]
        record[f"plan_gib_{mode}"] = plan["total"] - plan.get("reserve", 0)  # no CUDA reserve on CPU
        record[f"plan_state_gib_{mode}"] = plan["params"] + plan.get("grads", 0) + plan["optimizer"]
        record[f"params_{mode}"] = plan["params"]
        record[f"trainable_{mode}"] = plan["trainable"]
    record["measured_ratio_lora_over_full"] = record["measured_gib_lora"] / record["measured_gib_full"]
    record["plan_ratio_lora_over_full"] = record["plan_gib_lora"] / record["plan_gib_full"]
    return record


def bench_plan_20b() -> dict:
    config = str(REPO / "configs" / "gptoss_20b_lora.toml")
    lora = _plan(config, 1, [])
    full = _plan(config, 1, ["--lora.enable=false"])
    return {"kind": "lora_plan", "config": "configs/gptoss_20b_lora.toml", "world_size": 1,
            "plan_gib_lora": lora, "plan_gib_full": full,
            "plan_ratio_lora_over_full": lora["total"] / full["total"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per mode")
    p.add_argument("--out", default=None, metavar="FILE.jsonl", help="append the JSON lines")
    p.add_argument("--parts", default="plan,rss,steps", help="comma-separated: plan,rss,steps")
    p.add_argument("--rss-child", choices=("full", "lora"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rss_child:
        rss_child(args.rss_child)
        return 0
    from benchmarks.common import append_jsonl, env_info

    import torch

    parts = {"plan": bench_plan_20b, "rss": bench_rss, "steps": lambda: bench_steps(args.steps)}
    for name in args.parts.split(","):
        record = {**parts[name](), **env_info(torch.device("cpu"))}
        print(json.dumps(record), flush=True)
        append_jsonl(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
