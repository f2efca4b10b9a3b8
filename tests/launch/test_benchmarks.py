"""benchmarks/: CPU smoke runs of bench_train / bench_block (tiny model, 1-2 steps) and their
JSON fields, the reference config, make_table on a sample JSONL, and the 120b projection's
arithmetic on a hand-checked example. Performance itself is measured on a GPU, never here."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import bench_block, bench_train, make_table, project_120b
from runtime.model.args import FLAVORS

TINY_TRAIN = ["--config", str(REPO / "configs" / "debugmodel.toml"), "--model.flavor=tiny",
              "--training.seq_len=32", "--training.local_batch_size=2", "--training.device=cpu"]


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- bench_train

def test_bench_train_cpu_smoke_writes_one_record(tmp_path):
    out = tmp_path / "r.jsonl"
    rec = bench_train.run(TINY_TRAIN + [f"--job.dump_folder={tmp_path / 'dump'}", "--warmup", "0",
                                        "--steps", "2", "--out", str(out), "--label", "smoke",
                                        "--peak-tflops", "2.0"])
    rows = read(out)
    assert len(rows) == 1 and rows[0]["label"] == "smoke"
    r = rows[0]
    for key in ("date", "gpu", "torch", "config", "overrides", "tokens_per_s",
                "tokens_per_s_per_device", "tflops_per_device", "mfu", "peak_memory_gib",
                "first_step_s", "median_step_s", "flops_per_token", "peak_tflops", "peak_source"):
        assert key in r, key
    assert r["kind"] == "train" and r["torch"] == torch.__version__ and r["gpu"] is None
    assert r["config"].endswith("debugmodel.toml")
    assert "--model.flavor=tiny" in r["overrides"]
    assert r["world_size"] == 1 and r["tokens_per_step"] == 2 * 32
    assert len(r["step_times_s"]) == 2 and len(r["losses"]) == 3
    assert all(math.isfinite(x) for x in r["losses"])
    assert r["first_step_s"] > 0 and r["peak_memory_gib"] > 0
    # the derived numbers are consistent with each other
    assert r["median_step_s"] == pytest.approx(sum(r["step_times_s"]) / 2)  # median of two
    assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["median_step_s"])
    assert r["tflops_per_device"] == pytest.approx(r["tokens_per_s_per_device"] * r["flops_per_token"] / 1e12)
    assert r["mfu"] == pytest.approx(r["tflops_per_device"] / 2.0)
    assert r["peak_source"].startswith("given")
    assert rec["tokens_per_s"] == r["tokens_per_s"]
    # a benchmark saves nothing: no checkpoint, no metrics file
    assert not list((tmp_path / "dump").glob("checkpoints/*"))
    assert not (tmp_path / "dump" / "metrics.jsonl").exists()


def test_bench_train_measured_peak_and_no_peak(tmp_path):
    rec = bench_train.run(TINY_TRAIN + [f"--job.dump_folder={tmp_path}", "--warmup", "0", "--steps", "1",
                                        "--measure-peak", "--peak-size", "64"])
    assert rec["peak_source"].startswith("measured: 64^3 float32")  # the CPU compute dtype
    assert rec["peak_tflops"] > 0 and rec["mfu"] == pytest.approx(rec["tflops_per_device"] / rec["peak_tflops"])
    # neither flag: no peak and no MFU, never a made-up one (the datasheet's is not used)
    from benchmarks.common import resolve_peak

    ns = bench_train.build_parser().parse_args(["--config", "x"])
    assert resolve_peak(ns, torch.device("cpu")) == {"peak_tflops": None, "peak_source": None}


def test_bench_train_bad_override_is_a_config_error(tmp_path, capsys):
    assert bench_train.main(TINY_TRAIN + ["--training.sq_len=3"]) == 2
    assert "training.seq_len" in capsys.readouterr().err


def test_reference_config_is_the_issue_config():
    from runtime.train.config.loader import load_config
    from runtime.data import Tokenizer

    cfg = load_config(str(REPO / "benchmarks" / "configs" / "20b_2layer_seq4096.toml"))
    args = cfg.model_args()
    assert (cfg.model.flavor, args.n_layers, args.vocab_size, args.dim) == ("20b", 2, 201088, 2880)
    assert (args.num_experts, args.top_k, args.n_heads, args.n_kv_heads) == (32, 4, 64, 8)
    assert [args.is_sliding(i) for i in range(2)] == [True, False]
    assert cfg.training.seq_len == 4096 and cfg.training.local_batch_size == 2
    assert cfg.training.global_batch_size == -1 and cfg.training.device == "cuda"
    assert cfg.model.compute_dtype == "bfloat16" and cfg.optimizer.name == "AdamW"
    assert cfg.parallelism.data_parallel_shard_degree == -1
    assert not cfg.checkpoint.enable
    assert cfg.model.tokenizer_path == ""  # embedded tokenizer: 8192 <= 201088 is accepted
    assert Tokenizer.load("").vocab_size <= args.vocab_size


# ----------------------------------------------------------------------------- bench_block

def test_layer_flops_hand_checked():
    a = FLAVORS["20b"]
    matmul = 6 * (2880 * 4096 * 2 + 2880 * 512 * 2 + 2880 * 32 + 4 * 3 * 2880 * 2880)
    full = matmul + 6 * 64 * 64 * 2 * (4097 / 2)
    sliding = matmul + 6 * 64 * 64 * 2 * ((128 * 129 / 2 + (4096 - 128) * 128) / 4096)
    assert bench_block.layer_flops_per_token(a, 4096, sliding=False) == pytest.approx(full)
    assert bench_block.layer_flops_per_token(a, 4096, sliding=True) == pytest.approx(sliding)
    # 16k tokens: ~14.05 TF (full), ~12.5 TF (sliding) per block fwd+bwd
    assert full * 16384 == pytest.approx(14.05e12, rel=1e-3)
    assert sliding * 16384 == pytest.approx(12.50e12, rel=1e-3)
    # the pieces add up to the block (router included in neither attention piece)
    t = 16384
    pieces = (bench_block.projection_flops(a, t) + bench_block.attention_core_flops(a, t, 4096, False)
              + bench_block.experts_flops(a, t) + bench_block.router_flops(a, t))
    assert pieces == pytest.approx(full * t)


def test_bench_block_cpu_smoke(tmp_path):
    out = tmp_path / "b.jsonl"
    recs = bench_block.run(["--flavor", "tiny", "--tokens", "64", "--iters", "1", "--warmup", "0",
                            "--device", "cpu", "--peak-tflops", "1.5", "--out", str(out), "--label", "t"])
    rows = read(out)
    assert len(rows) == len(recs)
    blocks = [r for r in rows if r["kind"] == "block"]
    pieces = [r for r in rows if r["kind"] == "block_piece"]
    assert [b["variant"] for b in blocks] == ["sliding", "full"]
    assert len(pieces) == 7
    a = FLAVORS["tiny"]
    for b in blocks:
        assert (b["tokens"], b["batch"], b["seq_len"], b["attn_backend"]) == (64, 1, 64, "math")
        assert b["dtype"] == "float32" and b["param_dtype"] == "float32" and b["compile"] is False
        assert b["flops"] == pytest.approx(
            bench_block.layer_flops_per_token(a, 64, b["variant"] == "sliding") * 64)
        assert b["tflops"] == pytest.approx(b["flops"] / (b["ms"] * 1e-3) / 1e12)
        assert b["pct_of_peak"] == pytest.approx(100 * b["tflops"] / 1.5)
        assert b["ms"] > 0 and b["first_call_s"] > 0 and b["torch"] == torch.__version__
    names = [p["piece"] for p in pieces]
    assert any(n.startswith("experts") for n in names) and "q/k/v/o projections" in names


def test_bench_block_records_a_failing_variant_and_goes_on(tmp_path, monkeypatch):
    real = bench_block.bench_block_variant

    def flaky(c, args, batch, seq_len, sliding, *rest):
        if sliding:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")
        return real(c, args, batch, seq_len, sliding, *rest)

    monkeypatch.setattr(bench_block, "bench_block_variant", flaky)
    out = tmp_path / "b.jsonl"
    argv = ["--flavor", "tiny", "--tokens", "32", "--iters", "1", "--warmup", "0", "--device", "cpu",
            "--no-pieces", "--out", str(out)]
    assert bench_block.main(argv) == 1
    rows = read(out)
    assert [(r["variant"], (r.get("error") or "")[:4]) for r in rows] == [("sliding", "OOM:"), ("full", "")]
    assert rows[1]["ms"] > 0
    assert "| OOM |" in make_table.make_table(rows)


def test_bench_block_refuses_flex_on_cpu():
    with pytest.raises(SystemExit, match="flex"):
        bench_block.run(["--flavor", "tiny", "--tokens", "64", "--device", "cpu", "--attn-backend", "flex"])


# ----------------------------------------------------------------------------- make_table

SAMPLE = [
    {"kind": "peak", "date": "2026-12-01T10:00:00+00:00", "gpu": "NVIDIA H100 80GB HBM3",
     "torch": "2.11.0", "peak_shape": "8192^3", "peak_dtype": "bfloat16", "peak_ms": 1.5,
     "peak_tflops": 733.0},
    {"kind": "train", "label": "ref (compiled)", "date": "2026-12-01T10:05:00+00:00",
     "gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "config": "benchmarks/configs/x.toml",
     "overrides": [], "world_size": 1, "tokens_per_s": 67200.0, "tokens_per_s_per_device": 67200.0,
     "tflops_per_device": 300.0, "mfu": 0.4, "peak_memory_gib": 50.0,
     "memory_kind": "cuda max_memory_allocated", "first_step_s": 45.0, "error": None},
    {"kind": "train", "label": None, "date": "2026-12-01T10:09:00+00:00", "gpu": "NVIDIA H100 80GB HBM3",
     "torch": "2.11.0", "config": "benchmarks/configs/x.toml", "overrides": ["--compile.enable=false"],
     "world_size": 1, "tokens_per_s": None, "tokens_per_s_per_device": None, "tflops_per_device": None,
     "mfu": None, "peak_memory_gib": 79.1, "memory_kind": "cuda max_memory_allocated",
     "first_step_s": None, "error": "OOM: CUDA out of memory | tried"},
    {"kind": "block", "label": "compiled", "flavor": "20b", "variant": "full", "batch": 4, "seq_len": 4096,
     "dtype": "bfloat16", "param_dtype": "float32", "compile": True, "attn_backend": "flex",
     "ms": 30.0, "tflops": 468.0, "pct_of_peak": 63.8, "first_call_s": 40.0, "peak_memory_gib": 20.0,
     "date": "2026-12-01T10:20:00+00:00", "gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0"},
    {"kind": "block_piece", "label": "eager", "flavor": "20b", "piece": "experts grouped_mm (balanced)",
     "compile": False, "ms": 23.3, "tflops": 420.0, "pct_of_peak": None},
]


def test_make_table_on_sample(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in SAMPLE))
    md_path = tmp_path / "t.md"
    assert make_table.main([str(path), "--out", str(md_path)]) == 0
    md = md_path.read_text()
    assert md.index("### Measured matmul peak") < md.index("### Training step") < md.index("### One transformer")
    lines = md.splitlines()
    ref = next(line for line in lines if "ref (compiled)" in line)
    assert "| 67,200 |" in ref and "| 1.60x |" in ref and "| 40.0% |" in ref and "tokens/s target met" in ref
    oom = next(line for line in lines if "compile.enable=false" in line)
    assert "OOM" in oom and "> 55 GiB" in oom and "| - |" in oom
    assert "\\|" not in oom.split("OOM")[1].split("|")[0]  # the note keeps only "OOM"
    block = next(line for line in lines if "| full |" in line)
    assert "| 30.00 |" in block and "63.8% (>= 45%)" in block and "| 4x4096 |" in block
    piece = next(line for line in lines if "experts grouped_mm" in line)
    assert piece.endswith("| 23.30 | 420.0 | - |  |")
    # every table row has as many cells as its header
    for table in md.split("###")[1:]:
        rows = [line for line in table.splitlines() if line.startswith("|")]
        assert len({line.replace("\\|", "").count("|") for line in rows}) == 1
    assert make_table.make_table([]) == "No results.\n"


# ----------------------------------------------------------------------------- project_120b

def test_param_counts_match_the_model():
    from runtime.model import GptOssModel

    for flavor in ("tiny", "20b", "120b"):
        args = FLAVORS[flavor]
        with torch.device("meta"):
            model = GptOssModel(args)
        expert = sum(p.numel() for n, p in model.named_parameters() if ".moe.experts." in n)
        total = sum(p.numel() for p in model.parameters())
        c = project_120b.param_counts(args)
        assert (c["total"], c["expert"]) == (total, expert), flavor
    assert project_120b.param_counts(FLAVORS["120b"])["total"] == 116_829_156_672


def test_projection_hand_checked_example():
    # 64 GPUs = 8 nodes, pp 1, FSDP 64, EP 8; 16384 tokens per GPU; an assumed 10 ms per layer
    # at 16384 tokens; no AC, head and optimizer switched off to isolate the formulas.
    a = project_120b.Assumptions(sliding_ms=10.0, full_ms=10.0, layer_tokens=16384, tokens_per_gpu=16384,
                                 ep=8, pp=1, activation_checkpoint="none", head_ms=0.0,
                                 optimizer_bytes_per_param=0.0)
    r = project_120b.project(64, a)
    assert r["compute_ms"] == pytest.approx(36 * 10.0)
    # EP: 16384 tok x 4 x 2880 x 2 B x 2 (dispatch+combine) x 7/8 = 660,602,880 B per layer forward,
    # x2 with backward, x36 layers = 47,563,407,360 B over NVLink at 450 GB/s = 105.6964608 ms.
    assert r["ep_bytes_per_gpu"] == 47_563_407_360
    assert r["ep_ms"] == pytest.approx(105.6964608)
    # FSDP: (2 all-gathers x 2 B + 1 reduce-scatter x 4 B) = 8 B per param, ring factor (f-1)/f.
    # dense 2,127,557,952 params over 64 ranks: 8 x 2,127,557,952 x 63/64 = 16,754,518,872 B;
    # experts 114,701,598,720 / ep 8 over 8 ranks: 8 x 14,337,699,840 x 7/8 = 100,363,898,880 B;
    # both groups span nodes -> IB 50 GB/s: 117,118,417,752 B = 2342.36835504 ms.
    assert r["fsdp_bytes_per_gpu"] == pytest.approx(117_118_417_752)
    assert r["fsdp_ms"] == pytest.approx(2342.36835504)
    assert (r["fsdp_dense_link"], r["fsdp_expert_link"]) == ("ib", "ib")
    assert r["step_ms_serial"] == pytest.approx(360 + 105.6964608 + 2342.36835504)
    assert r["step_ms_overlap"] == pytest.approx(2342.36835504)  # FSDP-bound
    assert r["tokens_per_s_overlap"] == pytest.approx(64 * 16384 / 2.34236835504)
    assert r["state_gib_per_gpu"] == pytest.approx(16 * 116_829_156_672 / 64 / 2 ** 30)
    # 8 GPUs: fp32 states alone (16 B/param) do not fit in 80 GiB
    assert not project_120b.project(8, a)["states_fit"]
    # full AC: forward recomputed (x 4/3 compute) and its all-to-alls repeated (x 1.5)
    ac = project_120b.project(64, project_120b.Assumptions(**{**a.__dict__, "activation_checkpoint": "full"}))
    assert ac["compute_ms"] == pytest.approx(480.0) and ac["ep_ms"] == pytest.approx(1.5 * 105.6964608)
    with pytest.raises(ValueError, match="ep=8"):
        project_120b.project(12, a)


def test_projection_from_results_and_cli(tmp_path, capsys):
    rows = [{"kind": "peak", "peak_tflops": 700.0},
            {"kind": "block", "flavor": "20b", "variant": "sliding", "tokens": 16384, "ms": 20.0, "label": "e"},
            {"kind": "block", "flavor": "20b", "variant": "full", "tokens": 16384, "ms": 30.0, "label": "e"},
            {"kind": "block", "flavor": "20b", "variant": "full", "tokens": 16384, "ms": 25.0, "label": "c"},
            {"kind": "block", "flavor": "tiny", "variant": "full", "tokens": 64, "ms": 0.1}]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = project_120b.layer_ms_from_results(str(path))
    assert (m["sliding_ms"], m["full_ms"], m["layer_tokens"], m["peak"]) == (20.0, 25.0, 16384, 700.0)
    assert project_120b.layer_ms_from_results(str(path), label="e")["full_ms"] == 30.0
    assert project_120b.main(["--results", str(path), "--gpus", "64,128"]) == 0
    out = capsys.readouterr().out
    assert "measured:" in out and "| 64 | 8 |" in out and "| 128 | 16 |" in out
    assert project_120b.main(["--assume-layer-ms", "30", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["gpus"] for r in data["rows"]] == [8, 64, 128]
    assert data["assumptions"]["layer_source"].startswith("assumed")


def test_scripts_run_as_files_and_shell_scripts_parse():
    scripts = [str(REPO / "benchmarks" / s) for s in ("run_all.sh", "bench_train.sbatch", "gpu_check.sh")]
    for script in scripts:
        subprocess.run(["bash", "-n", script], check=True)
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck:
        out = subprocess.run([shellcheck, "-x", *scripts], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
    # run as a file from elsewhere: the script puts the checkout on sys.path itself
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "project_120b.py"), "--help"],
                         capture_output=True, text=True, check=True, cwd="/")
    assert "--assume-layer-ms" in out.stdout


# ----------------------------------------------------------------------------- gpu_check

def test_gpu_check_cpu_smoke_end_to_end(tmp_path):
    """The GPU window's script, CPU mode: every part runs, one JSONL + one summary (+ a log)."""
    import os

    env = {**os.environ, "RESULTS_DIR": str(tmp_path / "results"), "GPU_CHECK_CACHE": str(tmp_path / "cache"),
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu-smoke"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    files = sorted((tmp_path / "results").iterdir())
    assert [f.suffix for f in files] == [".jsonl", ".log", ".md"]  # <= 8 files come back from $OUT
    rows = read(files[0])
    for r in rows:
        assert r["kind"] == "gpu_check" and isinstance(r["passed"], bool), r
        assert r["gpu"] is None and r["torch"] == torch.__version__ and r["date"], r
    parts = [r["part"] for r in rows]
    assert parts[0] == "run" and rows[0]["cpu_smoke"] is True
    order = [p for i, p in enumerate(parts) if p != "run" and (i == 0 or parts[i - 1] != p)]
    assert order == ["correctness", "reference", "profile", "block"]
    assert all(r["passed"] for r in rows), [r for r in rows if not r["passed"]]
    checks = {r["check"]: r for r in rows}
    flex = [r for r in rows if r["check"].startswith("flex vs math")]
    assert len(flex) == 8 and all(r["max_error"] <= r["tolerance"] for r in flex)
    assert checks["grouped experts vs loop float32"]["idle_expert_max_grad"] == 0.0
    assert checks["compiled block (aot_eager)"]["graph_breaks"] == 0
    compiled_step = checks["train step compiled (aot_eager) vs cpu fp32"]
    assert compiled_step["compile"] and not compiled_step.get("skipped")
    assert checks["torchrun fsdp2 bf16 + full AC step vs cpu fp32"]["fsdp_block_class"].startswith("FSDP")
    assert checks["(process) pytest"]["tests"] >= 1
    ref = checks["reference config"]
    assert ref["tokens_per_s"] > 0 and ref["plan_total_gib"] > 0 and ref["first_step_s"] > 0
    # the dry run's prediction, recorded beside the measurement (its record copied before it)
    dry = checks["dry run"]
    assert dry["dry_run_exit"] == 0 and dry["dry_run_flops_per_step"] > 0
    assert ref["dry_run_peak_gib"] == dry["dry_run_peak_gib"] > 0
    assert parts.index("reference") < rows.index(dry) < rows.index(ref)
    phases = checks["phases"]
    assert phases["step_ms"] == pytest.approx(sum(phases["phases_ms"].values()))
    marked = [d["phase"] for d in phases["detail_ms"]]  # every boundary was found in the runtime
    assert {"mask build", "block 0 forward", "block 1 forward", "head + loss forward", "head + loss backward",
            "block 1 backward", "block 0 backward", "grad clip", "optimizer"} <= set(marked), marked
    assert set(phases["phases_ms"]) == {"blocks forward", "blocks backward", "loss forward", "loss backward",
                                        "optimizer", "grad clip", "mask build", "other"}
    assert checks["host-sync audit"]["syncs"] == 0
    block = checks["block sliding vs full"]
    assert {"block_sliding", "block_full", "attention_core_sliding", "attention_core_full"} <= set(block)
    md = files[2].read_text()
    assert "**Correctness: passed**" in md and "| block | block sliding vs full | yes |" in md
    assert md in proc.stdout  # the summary is printed last


def test_gpu_check_reports_a_failing_part_and_runs_the_rest(tmp_path, monkeypatch, capsys):
    from benchmarks import gpu_check

    def steps(py, jsonl, smoke, scratch):
        return [gpu_check.Step("correctness", "fails", [py, "-c", "raise SystemExit(3)"], 5, 5, wave=1),
                gpu_check.Step("correctness", "also runs", [py, "-c", "print('[c] side by side')"], 5, 5, wave=1),
                gpu_check.Step("reference", "hangs", [py, "-c", "import time; time.sleep(60)"], 5, 50, wave=2),
                gpu_check.Step("block", "works", [py, "-c", "print('[block] fine')"], 5, 20, wave=3)]

    monkeypatch.setattr(gpu_check, "plan_steps", steps)
    monkeypatch.setenv("GPU_CHECK_CACHE", str(tmp_path / "cache"))
    argv = ["--cpu-smoke", "--budget", "reference/hangs=2"]  # (its own budget: 50 s)
    assert gpu_check.main(argv + ["--results-dir", str(tmp_path)]) == 1
    rows = read(next(tmp_path.glob("*.jsonl")))
    by = {r["check"]: r for r in rows}
    assert by["(process) fails"]["exit_code"] == 3 and not by["(process) fails"]["passed"]
    assert by["(process) hangs"]["timed_out"] and by["(process) hangs"]["budget_s"] == 2
    assert by["(process) hangs"]["seconds"] < 30
    assert by["(process) works"]["passed"] and by["(process) also runs"]["passed"]
    assert [w[0].name for w in gpu_check.waves(steps(*"abcd"))] == ["fails", "hangs", "works"]
    out = capsys.readouterr().out
    assert "[block] fine" in out and "**Correctness: FAILED**" in out
    # a measuring part's failure alone does not fail the run
    monkeypatch.setattr(gpu_check, "plan_steps", lambda *a: steps(*a)[2:])
    assert gpu_check.main(argv + ["--results-dir", str(tmp_path / "2")]) == 0
    with pytest.raises(SystemExit):  # a step that does not exist: a usage error, nothing written
        gpu_check.main(["--cpu-smoke", "--budget", "nope=3", "--results-dir", str(tmp_path / "3")])
    assert not (tmp_path / "3").exists()


def test_gpu_check_idle_gaps_and_phases_hand_checked():
    from benchmarks import check_profile

    trace = {"traceEvents": [
        {"ph": "X", "cat": "user_annotation", "name": "gpu_check_step", "ts": 1000, "dur": 1000},
        {"ph": "X", "cat": "kernel", "name": "a", "ts": 1100, "dur": 200},   # 1100-1300
        {"ph": "X", "cat": "kernel", "name": "b", "ts": 1250, "dur": 150},   # overlaps: 1100-1400
        {"ph": "X", "cat": "gpu_memcpy", "name": "c", "ts": 1700, "dur": 100},  # 1700-1800
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 1000, "dur": 900},
    ]}
    r = check_profile.idle_gaps(trace, "gpu_check_step")
    assert (r["span_ms"], r["busy_ms"], r["idle_ms"]) == pytest.approx((1.0, 0.4, 0.6))
    assert [g["us"] for g in r["gaps"]] == [300, 200, 100]  # b->c, c->end, start->a
    assert r["gaps"][0] == {"us": 300, "after": "b", "before": "c"}
    assert check_profile.top_kernels(trace)[0] == {"kernel": "a", "ms": 0.2, "calls": 1}
    cats = check_profile.phase_summary([("h2d + token count", 1.0), ("mask build", 2.0), ("block 0 forward", 3.0),
                                        ("block 1 forward", 4.0), ("head + loss forward", 5.0),
                                        ("head + loss backward", 6.0), ("block 1 backward", 7.0),
                                        ("block 0 backward", 8.0), ("grad clip", 9.0), ("optimizer", 10.0)])
    assert cats == {"blocks forward": 7.0, "blocks backward": 15.0, "loss forward": 5.0, "loss backward": 6.0,
                    "optimizer": 10.0, "grad clip": 9.0, "mask build": 2.0, "other": 1.0}


def test_gpu_check_sync_audit_lists_repository_sites():
    """The audit's capture (what set_sync_debug_mode('warn') feeds on CUDA) on a stand-in step."""
    import warnings

    from benchmarks import check_profile

    class Trainer:
        step = 0

        def optimizer_step(self, batch):
            for _ in range(2):
                warnings.warn("called a synchronizing CUDA operation")  # this line is the site
            warnings.warn("something else")  # not a sync: ignored
            return 1.0, 1.0, 1e-3

    r = check_profile.sync_audit(Trainer(), {}, torch.device("cpu"))
    assert r["syncs"] == 2 and len(r["sites"]) == 1
    site = r["sites"][0]
    assert site["count"] == 2 and site["site"].startswith("tests/launch/test_benchmarks.py:")
    assert "optimizer_step: warnings.warn(" in site["site"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA refusal")
def test_gpu_check_without_cuda_refuses_in_one_line(tmp_path, capsys):
    from benchmarks import check_correctness, gpu_check

    assert gpu_check.main(["--results-dir", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()
    assert check_correctness.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("--cpu-smoke" in e or "--smoke" in e for e in err)
