"""Pipeline parallelism (torch.distributed.pipelining) trains exactly like one process.

Unit tests: the layer split (balanced / layers_per_stage), the stage -> rank placement (loop
and V, checked against torch's own mapping), stage modules keeping the full model's parameter
names, the view of a rank's stages that the optimizer and its checkpoints use, and the error
for a schedule this torch lacks.

Parity runs (CPU, gloo, the tiny flavor with 4 layers -- 8 for 8 stages --, seq_len 32,
fp32, 1 thread per rank, 3 optimizer steps, global batch 4, the same seed checkpoint for
every run), each against the single-process run on the same global batch:
  every schedule on 2 pp ranks: GPipe (explicit layers_per_stage=3: an uneven [0-2] [3]
  split), 1F1B, Interleaved1F1B and InterleavedZeroBubble (2 x 2 = 4 stages), ZBVZeroBubble
  (V, 4 stages, with 2 gradient-accumulation micro-steps), DualPipeV (V, 4 stages);
  4 pp ranks: 1F1B (4 stages) and ZBVZeroBubble (8 stages, 8 layers);
  PP x FSDP: 2 pp x 2 dp_shard = 4 ranks with Interleaved1F1B;
  PP x TP: 2 pp x 2 tp = 4 ranks with 1F1B (a non-first stage receives sequence-parallel
  hidden states [B, S/tp, D]; the model takes the sequence length from `positions`);
  DualPipeV with per-block torch.compile (dynamo + AOTAutograd, aot_eager backend);
  the auxiliary balance loss (coefficient 0.01) under 1F1B, against a reference that
  accumulates the same 4 micro-batches (the switch loss is per forward and not linear in the
  batch, so it is only the same loss on the same micro-batches);
  a PP x FSDP checkpoint (step 2) resumed by one process without PP: its step 3 matches;
  DualPipeV x EP with the all-to-all overlap (runtime/parallel/dualpipe_overlap.py):
  2 pp x 2 cp with EP 2 over the CP ranks (4 layers), and 2 pp x 2 dp_shard with EP 2 over
  FSDP (8 layers cut 2, 3, 2, 1, global batch 8 against its own reference); each rank
  reports that all its OVERLAP_F_B actions (3 per step) went through the overlap with the
  turn alternating F, B, F, B at the all-to-alls; the same run with
  `pipeline_parallel_overlap_ep=false` is bit-identical (losses, grad norms, parameters).
Every run uses pipeline microbatch size 1 (4 microbatches per step, 2 with accumulation or
dp 2), document masking (document_ids reach every stage as a keyword argument) and the
aux-loss-free expert bias (a persistent buffer, compared with the parameters: it checks that
every stage counts its own routed tokens, once).

Tolerances (parallel_harness.assert_parity defaults): losses 1e-5 relative (observed
1.1e-7: the pipeline runs the same math on 1-row microbatches, only summation orders
differ); grad norms 1e-4 relative (observed <= 1.2e-7 without FSDP, 1.8e-5 with FSDP: the
fp32 norm of sharded halves of the output head, see the harness); parameters |diff| <=
1e-6 + 1e-5 |ref| (observed <= 1.2e-7).

The checks can fail: `test_broken_pipeline_is_caught` reruns 1F1B once with the schedule's
own gradient scaling switched on (gradients divided by the number of microbatches, torch's
default scale_grads=True; param diff 5e-3) and once without the guard that keeps the
schedule's shape-inference forward out of the MoE token counts (expert bias off by 1e-3,
weights by 4e-3); the parity check rejects both. Splitting wrongly (stages given each
other's layers) was also seen to fail every parity test (loss off by 3e-4 at step 1).

Runtime on a 2-core machine: 120-220 s depending on load (the compiled run ~25 s, the
three DualPipeV x EP overlap runs ~35-50 s).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from parallel_harness import (
    GLOBAL_BATCH,
    STEPS,
    RunError,
    assert_parity,
    compile_with_aot_eager,
    global_batch_overrides,
    max_param_diff,
    run_distributed,
    run_single,
    summarize,
)

from runtime.parallel.dims import ParallelismError


# =========================================================================== unit tests

def test_balanced_split_counts_embeddings_and_head():
    from runtime.parallel.pipeline import stage_layer_ids

    assert stage_layer_ids(4, 2) == [[0, 1], [2, 3]]
    assert stage_layer_ids(4, 4) == [[0], [1], [2], [3]]
    assert stage_layer_ids(5, 2) == [[0, 1, 2], [3, 4]]  # ties go to the earlier stage
    # 3 blocks + embeddings + head over 3 stages: the middle stage takes the extra block.
    assert stage_layer_ids(3, 3) == [[0], [1], [2]]
    assert stage_layer_ids(4, 3) == [[0], [1, 2], [3]]
    # 24 layers, 4 stages: loads (blocks + embeddings/head) 7, 7, 6, 6.
    counts = [len(s) for s in stage_layer_ids(24, 4)]
    assert counts == [6, 7, 6, 5], counts
    for n, s in ((36, 8), (24, 16), (8, 8), (9, 2)):
        split = stage_layer_ids(n, s)
        assert [i for stage in split for i in stage] == list(range(n))
        assert all(split), split
        loads = [len(x) for x in split]
        loads[0] += 1
        loads[-1] += 1
        assert max(loads) - min(loads) <= 1 or min(len(x) for x in split) == 1, split


def test_explicit_layers_per_stage():
    from runtime.parallel.pipeline import stage_layer_ids

    assert stage_layer_ids(4, 2, layers_per_stage=3) == [[0, 1, 2], [3]]
    assert stage_layer_ids(8, 4, layers_per_stage=2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(ParallelismError, match="layers_per_stage"):
        stage_layer_ids(4, 3, layers_per_stage=2)
    with pytest.raises(ParallelismError, match="n_layers"):
        stage_layer_ids(2, 4)


def test_stage_placement_loop_and_v():
    from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping

    from runtime.parallel.pipeline import stage_ids_this_rank

    assert [stage_ids_this_rank(r, 2, 2, "1F1B") for r in range(2)] == [(0,), (1,)]
    assert [stage_ids_this_rank(r, 2, 4, "Interleaved1F1B") for r in range(2)] == [(0, 2), (1, 3)]
    assert [stage_ids_this_rank(r, 2, 4, "DualPipeV") for r in range(2)] == [(0, 3), (1, 2)]
    assert [stage_ids_this_rank(r, 4, 8, "ZBVZeroBubble") for r in range(4)] == \
        [(0, 7), (1, 6), (2, 5), (3, 4)]
    # The same mapping torch's schedules assume.
    for style, name, pp, stages in (("loop", "InterleavedZeroBubble", 4, 12), ("v", "DualPipeV", 4, 8)):
        mapping = generate_stage_to_rank_mapping(pp, stages, style=style)
        for r in range(pp):
            assert stage_ids_this_rank(r, pp, stages, name) == \
                tuple(s for s in range(stages) if mapping[s] == r)
    with pytest.raises(ParallelismError, match="2 stages per rank"):
        stage_ids_this_rank(0, 2, 6, "ZBVZeroBubble")


def test_stage_modules_keep_full_model_names():
    from runtime.model import GptOssModel
    from runtime.model.args import FLAVORS
    from runtime.parallel.pipeline import build_stage_module, stage_layer_ids

    args = FLAVORS["tiny"].replace(n_layers=4)
    with torch.device("meta"):
        model = GptOssModel(args)
    full = {n for n, _ in model.named_parameters()}
    split = stage_layer_ids(4, 3)
    parts = [build_stage_module(model, s, 3, split[s]) for s in range(3)]
    names = [{n for n, _ in p.named_parameters()} for p in parts]
    assert set().union(*names) == full
    assert sum(len(n) for n in names) == len(full)  # disjoint
    assert parts[0].tok_embeddings is not None and parts[0].output is None
    assert parts[1].tok_embeddings is None and parts[1].norm is None and parts[1].output is None
    assert parts[2].output is not None and parts[2].norm is not None
    assert list(parts[1].layers.keys()) == ["1", "2"]
    assert len(model.layers) == 4  # the original is untouched
    # A middle stage takes hidden states and returns hidden states.
    part = build_stage_module(GptOssModel(args), 1, 3, split[1])
    h = torch.randn(2, 8, args.dim)
    assert part(h).shape == (2, 8, args.dim)


def test_missing_schedule_class_is_a_clear_error(monkeypatch):
    from torch.distributed import pipelining

    from runtime.parallel import pipeline

    monkeypatch.delattr(pipelining, "ScheduleDualPipeV", raising=False)
    monkeypatch.delattr(pipelining.schedules, "ScheduleDualPipeV", raising=False)
    with pytest.raises(ParallelismError, match="pipeline_parallel_schedule=DualPipeV.*torch"):
        pipeline.schedule_class("DualPipeV")
    assert pipeline.schedule_class("1F1B") is pipelining.Schedule1F1B


def test_stages_view_names_every_local_block_once():
    """The trainer's optimizer and optimizer checkpoints see a V rank's two stages as one
    module with the full model's names (and the same parameter groups as the full model)."""
    from runtime.model import GptOssModel
    from runtime.model.args import FLAVORS
    from runtime.model.moe import moe_layers
    from runtime.parallel.pipeline import StagesView, build_stage_module, stage_layer_ids
    from runtime.train.config.loader import load_config
    from runtime.train.optim import param_groups

    args = FLAVORS["tiny"].replace(n_layers=4)
    model = GptOssModel(args)
    split = stage_layer_ids(4, 4)
    parts = [build_stage_module(model, s, 4, split[s]) for s in (0, 3)]  # V rank 0 of 2
    view = StagesView(parts)
    names = {n for n, _ in view.named_parameters()}
    assert names == {n for p in parts for n, _ in p.named_parameters()}
    assert list(view.layers.keys()) == ["0", "3"]
    assert view.tok_embeddings is parts[0].tok_embeddings and view.output is parts[1].output
    assert view.layers["3"] is parts[1].layers["3"]
    assert len(moe_layers(view)) == 2
    opt_cfg = load_config(None, []).optimizer
    groups = param_groups(view, opt_cfg.weight_decay, list(opt_cfg.no_decay))
    full = param_groups(model, opt_cfg.weight_decay, list(opt_cfg.no_decay))
    assert [g["weight_decay"] for g in groups] == [g["weight_decay"] for g in full]
    with pytest.raises(RuntimeError, match="no forward"):
        view(torch.zeros(1, 1, dtype=torch.long))


# =========================================================================== multi-process

def run_pp(world_size: int, overrides: list[str], tmp_path: Path, steps: int = STEPS,
           hook=None) -> dict:
    """parallel_harness.run_distributed, keeping the run folder under the test's tmp_path."""
    return run_distributed(world_size, list(overrides), steps, hook=hook,
                           out_dir=tmp_path / f"pp-{time.monotonic_ns()}")


def _pp(degree: int, schedule: str, dp_shard: int = 1) -> list[str]:
    return [f"--parallelism.pipeline_parallel_degree={degree}",
            f"--parallelism.pipeline_parallel_schedule={schedule}",
            f"--parallelism.data_parallel_shard_degree={dp_shard}",
            "--parallelism.pipeline_parallel_microbatch_size=1"]


@pytest.fixture(scope="module")
def seeds(seeded_overrides) -> dict[int, list[str]]:
    """n_layers -> common overrides with that model's seed checkpoint (conftest)."""
    return {n: seeded_overrides(n) for n in (4, 8)}


@pytest.fixture(scope="module")
def references(reference_run) -> dict:
    """n_layers -> the single-process run on the global batch (conftest: training moves)."""
    return {n: reference_run(n) for n in (4, 8)}


def _check_run(name, ref, got, *, schedule, stages_per_rank, pp, n_layers, microbatches,
               accum=1):
    print(f"{name}: {summarize(ref, got)} ({got['wall_s']:.1f}s in the ranks)")
    infos = [r["info"] for r in got["ranks"]]
    # The mode under test was engaged: the schedule, the stages per rank, disjoint layers.
    assert {i["schedule"] for i in infos} == {schedule}
    assert all(i["is_runner"] for i in infos)  # PipelineParallel is a runner.Runner
    assert all(len(i["stage_ids"]) == stages_per_rank for i in infos)
    assert infos[0]["microbatches"] == microbatches and infos[0]["grad_accum"] == accum
    by_pp_rank = {tuple(i["stage_ids"]): i["layers"] for i in infos}
    assert len(by_pp_rank) == pp
    all_layers = sorted(layer for layers in by_pp_rank.values() for part in layers for layer in part)
    assert all_layers == list(range(n_layers)), by_pp_rank
    # Every pp rank reports the same (last stage's) loss and the same total grad norm.
    for r in got["ranks"]:
        assert r["losses"] == got["losses"] and r["grad_norms"] == got["grad_norms"]
    assert_parity(ref, got, what=name)


# name: (world, n_layers, overrides, stages per rank, pp, microbatches, accumulation)
SCHEDULES = {
    "GPipe_layers_per_stage_3": (
        2, 4, _pp(2, "GPipe") + ["--parallelism.pipeline_parallel_layers_per_stage=3"],
        1, 2, 4, 1),
    "1F1B": (2, 4, _pp(2, "1F1B"), 1, 2, 4, 1),
    "Interleaved1F1B": (2, 4, _pp(2, "Interleaved1F1B"), 2, 2, 4, 1),
    "InterleavedZeroBubble": (2, 4, _pp(2, "InterleavedZeroBubble"), 2, 2, 4, 1),
    "ZBVZeroBubble_grad_accum_2": (2, 4, _pp(2, "ZBVZeroBubble"), 2, 2, 2, 2),
    "DualPipeV": (2, 4, _pp(2, "DualPipeV"), 2, 2, 4, 1),
    "1F1B_4_stages": (4, 4, _pp(4, "1F1B"), 1, 4, 4, 1),
    "ZBVZeroBubble_8_stages": (4, 8, _pp(4, "ZBVZeroBubble"), 2, 4, 4, 1),
}


# torch < 2.13 on gloo cannot run V schedules (see pipeline._refuse_v_schedule_on_old_gloo).
OLD_GLOO_V = pytest.mark.skipif(torch.torch_version.TorchVersion(torch.__version__) < "2.13",
                                reason="V schedules need torch >= 2.13 on gloo")


def _v_marks(name: str):
    return [OLD_GLOO_V] if ("ZBV" in name or "DualPipeV" in name) else []


@pytest.mark.parametrize("name", [pytest.param(n, marks=_v_marks(n)) for n in SCHEDULES])
def test_schedule_matches_single_process(name, seeds, references, tmp_path):
    world, n_layers, overrides, per_rank, pp, microbatches, accum = SCHEDULES[name]
    got = run_pp(world, seeds[n_layers] + overrides + global_batch_overrides(GLOBAL_BATCH, 1, accum),
                 tmp_path)
    schedule = "Schedule" + overrides[1].split("=", 1)[1]
    _check_run(name, references[n_layers], got, schedule=schedule, stages_per_rank=per_rank,
               pp=pp, n_layers=n_layers, microbatches=microbatches, accum=accum)


def test_pp_with_fsdp_matches_single_process(seeds, references, tmp_path):
    """2 pp x 2 dp_shard = 4 ranks: each stage FSDP-sharded over its dp pair, the schedule's
    UNSHARD / RESHARD / REDUCE_GRAD actions, dp halves of the batch (2 microbatches each)."""
    got = run_pp(4, seeds[4] + _pp(2, "Interleaved1F1B", dp_shard=2)
                 + global_batch_overrides(GLOBAL_BATCH, 2), tmp_path)
    assert got["info"]["fsdp"] == [True]
    assert "dp_shard=2" in got["info"]["mesh"] and "pp=2" in got["info"]["mesh"]
    _check_run("Interleaved1F1B x FSDP 2", references[4], got, schedule="ScheduleInterleaved1F1B",
               stages_per_rank=2, pp=2, n_layers=4, microbatches=2)


def test_pp_with_tp_matches_single_process(seeds, references, tmp_path):
    """2 pp x 2 tp = 4 ranks: sequence-sharded hidden states travel between stages, the last
    stage's vocab-sharded logits go into the loss under loss_parallel()."""
    got = run_pp(4, seeds[4] + _pp(2, "1F1B") + ["--parallelism.tensor_parallel_degree=2"]
                 + global_batch_overrides(GLOBAL_BATCH, 1), tmp_path)
    assert "tp=2" in got["info"]["mesh"] and "pp=2" in got["info"]["mesh"]
    _check_run("1F1B x TP 2", references[4], got, schedule="Schedule1F1B", stages_per_rank=1,
               pp=2, n_layers=4, microbatches=4)


@OLD_GLOO_V
def test_split_backward_schedule_with_compiled_blocks(seeds, tmp_path):
    """DualPipeV runs each stage's backward in two passes (input grads, then weight grads)
    over one graph; per-block torch.compile (dynamo + AOTAutograd through the harness's
    aot_eager hook) must allow that (no donated buffers) and still match eager. Both runs
    use the reference expert loop (fp32 grouped matmul does not compile, see
    test_parallel_parity)."""
    loop = ["--model.moe_impl=loop"] + global_batch_overrides(GLOBAL_BATCH, 1)
    eager = run_single(seeds[4] + loop, STEPS)
    got = run_pp(2, seeds[4] + loop + _pp(2, "DualPipeV") + ["--compile.enable=true"], tmp_path,
                 hook=compile_with_aot_eager)
    assert got["info"]["dynamo_unique_graphs"] > 0, "torch.compile was not engaged"
    _check_run("DualPipeV compiled", eager, got, schedule="ScheduleDualPipeV", stages_per_rank=2,
               pp=2, n_layers=4, microbatches=4)


def test_pp_with_ep_and_compiled_blocks(seeds, references, tmp_path):
    """2 pp x 2 dp_shard with EP 2 and per-block compile (aot_eager): the expert weights
    reach the compiled block as DTensors (FSDP x EP) and must be unwrapped there (a
    `hasattr(t, "to_local")` test traced as False under dynamo here: "mixed torch.Tensor and
    DTensor")."""
    got = run_pp(4, seeds[4] + _pp(2, "1F1B", dp_shard=2)
                 + ["--parallelism.expert_parallel_degree=2", "--compile.enable=true"]
                 + global_batch_overrides(GLOBAL_BATCH, 2), tmp_path, hook=compile_with_aot_eager)
    assert got["info"]["dynamo_unique_graphs"] > 0, "torch.compile was not engaged"
    assert "ep=2" in got["info"]["mesh"]
    _check_run("1F1B x FSDP 2 x EP 2 compiled", references[4], got, schedule="Schedule1F1B",
               stages_per_rank=1, pp=2, n_layers=4, microbatches=2)


def test_pp_checkpoint_resumes_on_one_process(seeds, references, tmp_path):
    """Interleaved1F1B x FSDP 2 (4 ranks; each rank holds 2 stages under one optimizer, all
    sharded) saves after 2 steps; one process without PP or FSDP resumes from it (model,
    optimizer state and data position, by parameter name) and its 3rd step matches the
    uninterrupted reference."""
    ckpt = ["--checkpoint.enable=true", "--checkpoint.interval=2",
            f"--checkpoint.folder={tmp_path / 'ckpt'}"]
    run_pp(4, seeds[4] + _pp(2, "Interleaved1F1B", dp_shard=2) + ckpt
           + global_batch_overrides(GLOBAL_BATCH, 2), tmp_path, steps=2)
    assert (tmp_path / "ckpt" / "step-2").is_dir()
    resumed = run_single(seeds[4] + ckpt + global_batch_overrides(GLOBAL_BATCH, 1), STEPS)
    ref = references[4]
    assert len(resumed["losses"]) == 1  # only step 3 ran
    tail = {"losses": ref["losses"][-1:], "grad_norms": ref["grad_norms"][-1:],
            "params": ref["params"], "world_size": 1}
    assert_parity(tail, resumed, what="resumed from a PP x FSDP checkpoint")


def test_aux_loss_matches_accumulated_reference(seeds, references, tmp_path):
    aux = ["--model.aux_loss_coeff=0.01"]
    ref = run_single(seeds[4] + aux + global_batch_overrides(GLOBAL_BATCH, 1, accumulation=4), STEPS)
    # The aux loss really trains the router (accumulation alone changes nothing beyond rounding).
    assert max_param_diff(references[4], ref)[1] > 1e-4
    got = run_pp(2, seeds[4] + aux + _pp(2, "1F1B") + global_batch_overrides(GLOBAL_BATCH, 1),
                 tmp_path)
    _check_run("1F1B aux loss", ref, got, schedule="Schedule1F1B", stages_per_rank=1, pp=2,
               n_layers=4, microbatches=4)


# --------------------------------------------------------------------------- DualPipeV x EP overlap

# pp 2 x cp 2 = 4 ranks with EP 2 over the CP ranks: each OVERLAP_F_B action's forward and
# backward roles both issue EP all-to-alls and CP all-gathers on the same groups.
EP_OVER_CP = _pp(2, "DualPipeV") + ["--parallelism.context_parallel_degree=2",
                                    "--parallelism.expert_parallel_degree=2"]
OVERLAP_OFF = ["--parallelism.pipeline_parallel_overlap_ep=false"]


def _check_overlap_ran(got, per_step: int = 3) -> None:
    """Every rank ran its OVERLAP_F_B actions (3 per step with pp 2 and 4 microbatches)
    through the overlap, and the turn always went F, B, F, B, ... at the all-to-alls."""
    for record in got["ranks"]:
        stats = record["info"]["ep_overlap"]
        assert stats is not None, "the DualPipeV EP overlap was not engaged"
        assert stats["actions"] == per_step * STEPS, stats
        assert stats["always_alternated"], stats
        assert min(stats["hand_overs"].values()) >= stats["actions"], stats
        trace = stats["last_trace"]
        assert trace[:2] == ["F:after_dispatch", "B:before_combine"], trace


@pytest.fixture(scope="module")
def ep_overlap_run(seeds, tmp_path_factory):
    return run_pp(4, seeds[4] + EP_OVER_CP + global_batch_overrides(GLOBAL_BATCH, 1),
                  tmp_path_factory.mktemp("ep-overlap"))


@OLD_GLOO_V
def test_dualpipev_ep_overlap_matches_single_process(ep_overlap_run, references):
    got = ep_overlap_run
    _check_overlap_ran(got)
    assert "ep=2" in got["info"]["mesh"] and "cp=2" in got["info"]["mesh"]
    _check_run("DualPipeV x EP 2 (over CP 2), overlapped", references[4], got,
               schedule="ScheduleDualPipeV", stages_per_rank=2, pp=2, n_layers=4, microbatches=4)


@OLD_GLOO_V
def test_dualpipev_ep_overlap_off_gives_identical_numbers(ep_overlap_run, references, seeds,
                                                          tmp_path):
    """The interleaving changes no arithmetic: the run without it is bit-identical."""
    off = run_pp(4, seeds[4] + EP_OVER_CP + OVERLAP_OFF + global_batch_overrides(GLOBAL_BATCH, 1),
                 tmp_path)
    assert all(r["info"]["ep_overlap"] is None for r in off["ranks"])
    assert_parity(references[4], off, what="DualPipeV x EP, overlap off")
    assert off["losses"] == ep_overlap_run["losses"]
    assert off["grad_norms"] == ep_overlap_run["grad_norms"]
    assert max_param_diff(ep_overlap_run, off) == ("", 0.0)


@OLD_GLOO_V
def test_dualpipev_ep_overlap_with_fsdp_and_uneven_stages(seeds, tmp_path):
    """pp 2 x dp_shard 2 = 4 ranks, EP 2 over dp_shard (FSDP all-gathers / reduce-scatters
    inside both roles), 8 layers cut 2, 3, 2, 1: the two stages of a rank have different
    numbers of MoE layers, so one role runs out of hand-over points first. Global batch 8
    (DualPipeV needs 4 microbatches per dp rank)."""
    batch = global_batch_overrides(8, 2)
    ref = run_single(seeds[8] + global_batch_overrides(8, 1), STEPS)
    got = run_pp(4, seeds[8] + _pp(2, "DualPipeV", dp_shard=2)
                 + ["--parallelism.expert_parallel_degree=2"] + batch, tmp_path)
    _check_overlap_ran(got)
    assert got["info"]["fsdp"] == [True]
    _check_run("DualPipeV x FSDP 2 x EP 2, overlapped", ref, got, schedule="ScheduleDualPipeV",
               stages_per_rank=2, pp=2, n_layers=8, microbatches=4)


# --------------------------------------------------------------------------- the checks can fail

def schedule_scales_gradients(rank: int, world_size: int) -> None:
    """Hook: let the schedule divide gradients by the number of microbatches (torch's
    default scale_grads=True) on top of our already-normalised loss."""
    import functools

    from torch.distributed.pipelining import Schedule1F1B

    original = Schedule1F1B.__init__

    @functools.wraps(original)
    def init(self, *args, **kwargs):
        kwargs["scale_grads"] = True
        original(self, *args, **kwargs)

    Schedule1F1B.__init__ = init


def count_shape_inference_tokens(rank: int, world_size: int) -> None:
    """Hook: drop the guard that keeps the schedule's shape-inference forward out of the MoE
    routed-token counts."""
    from runtime.parallel import pipeline

    pipeline._protect_moe_statistics = lambda stage: None


@pytest.mark.parametrize("hook", [schedule_scales_gradients, count_shape_inference_tokens])
def test_broken_pipeline_is_caught(hook, seeds, references, tmp_path):
    got = run_pp(2, seeds[4] + _pp(2, "1F1B") + global_batch_overrides(GLOBAL_BATCH, 1), tmp_path,
                 hook=hook)
    print(f"{hook.__name__}: {summarize(references[4], got)}")
    with pytest.raises(AssertionError, match="param "):
        assert_parity(references[4], got, what=hook.__name__)


@OLD_GLOO_V
def test_dualpipev_needs_enough_microbatches(seeds, tmp_path):
    """A schedule's own constraint surfaces as a one-line config error naming the keys."""
    with pytest.raises(RunError, match="pipeline_parallel_microbatch_size"):
        run_pp(2, seeds[4] + _pp(2, "DualPipeV") + ["--parallelism.pipeline_parallel_microbatch_size=2"]
               + global_batch_overrides(GLOBAL_BATCH, 1), tmp_path, steps=1)

