"""ParallelDims: degree inference, world-size and model divisibility checks, the mesh."""

from __future__ import annotations

import pathlib

import pytest

from runtime.model.args import FLAVORS
from runtime.errors import ConfigError
from runtime.parallel import ParallelDims, ParallelismError, pipeline_num_stages
from runtime.train.config.job import parallel_dims, validate_job
from runtime.train.config.loader import load_config

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"


def dims(world_size, dp_replicate=1, dp_shard=-1, cp=1, tp=1, pp=1, ep=1, etp=1):
    return ParallelDims(dp_replicate=dp_replicate, dp_shard=dp_shard, cp=cp, tp=tp, pp=pp,
                        ep=ep, etp=etp, world_size=world_size)


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(ParallelismError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- valid meshes

def test_dp_shard_is_inferred_from_the_world_size():
    d = dims(8)
    assert d.dp_shard == 8 and d.dp == 8
    assert (d.dp_replicate, d.cp, d.tp, d.ep, d.pp) == (1, 1, 1, 1, 1)
    d = dims(16, dp_replicate=2, tp=2, cp=2)
    assert d.dp_shard == 2 and d.dp == 4


def test_single_process_and_explicit_degrees():
    d = dims(1)
    assert d.dp_shard == 1 and d.dp == 1 and not d.pp_enabled
    d = dims(8, dp_replicate=2, dp_shard=2, pp=2)
    assert d.pp_enabled and d.dp == 4
    d = dims(4, dp_replicate=4, dp_shard=1)  # DDP
    assert (d.dp_replicate, d.dp_shard, d.dp) == (4, 1, 4)


def test_ep_borrows_dp_shard_ranks():
    d = dims(16, ep=8)
    assert (d.dp_shard_in_ep, d.dp_shard_mod_ep) == (8, 2)
    d = dims(16, tp=2, ep=4, etp=2)  # etp == tp: EP over dp_shard x cp only
    assert (d.dp_shard, d.dp_shard_in_ep, d.dp_shard_mod_ep, d.etp_enabled) == (8, 4, 2, True)
    d = dims(16, tp=2, ep=4, etp=1)  # etp == 1: EP takes the TP ranks too
    assert (d.dp_shard_in_ep, d.dp_shard_mod_ep) == (2, 4)
    d = dims(16, cp=2, tp=2, ep=8, etp=1)
    assert (d.dp_shard, d.dp_shard_in_ep, d.dp_shard_mod_ep) == (4, 2, 2)
    d = dims(8)
    assert (d.dp_shard_in_ep, d.dp_shard_mod_ep) == (1, 8)


def test_the_config_hands_plain_degrees_to_parallel_dims():
    cfg = load_config(None, ["--parallelism.tensor_parallel_degree=2",
                             "--parallelism.expert_parallel_degree=2"])
    d = parallel_dims(cfg, 8)
    assert (d.dp_replicate, d.dp_shard, d.cp, d.tp, d.pp, d.ep, d.etp) == (1, 4, 1, 2, 1, 2, 1)


# --------------------------------------------------------------------------- world size errors

def test_product_must_equal_the_world_size():
    assert error_of(dims, 8, dp_shard=6) == (
        "parallelism: data_parallel_replicate_degree * data_parallel_shard_degree * "
        "context_parallel_degree * tensor_parallel_degree * pipeline_parallel_degree = "
        "1 * 6 * 1 * 1 * 1 = 6 != world size 8")
    assert error_of(dims, 8, dp_replicate=2, dp_shard=2, tp=4).endswith(
        "= 2 * 2 * 1 * 4 * 1 = 16 != world size 8")


def test_dp_shard_cannot_be_inferred():
    assert error_of(dims, 8, tp=3) == (
        "parallelism: cannot infer data_parallel_shard_degree: world size 8 is not divisible by "
        "data_parallel_replicate_degree * context_parallel_degree * tensor_parallel_degree * "
        "pipeline_parallel_degree = 3")


@pytest.mark.parametrize("kwargs, message", [
    (dict(tp=0), "parallelism.tensor_parallel_degree must be >= 1, got 0"),
    (dict(cp=-1), "parallelism.context_parallel_degree must be >= 1, got -1"),
    (dict(ep=0), "parallelism.expert_parallel_degree must be >= 1, got 0"),
    (dict(dp_shard=0), "parallelism.data_parallel_shard_degree must be -1 (infer) or >= 1, got 0"),
    (dict(dp_shard=-2),
     "parallelism.data_parallel_shard_degree must be -1 (infer) or >= 1, got -2"),
])
def test_bad_degrees(kwargs, message):
    assert error_of(dims, 8, **kwargs) == message


def test_bad_world_size():
    assert error_of(dims, 0) == "parallelism: world size must be >= 1, got 0"


@pytest.mark.parametrize("kwargs, message", [
    (dict(tp=4, etp=2), "parallelism.expert_tensor_parallel_degree (2) must be 1 or equal "
                        "parallelism.tensor_parallel_degree (4)"),
    (dict(etp=2), "parallelism.expert_tensor_parallel_degree (2) must be 1 or equal "
                  "parallelism.tensor_parallel_degree (1)"),
    (dict(ep=3), "parallelism.expert_parallel_degree (3) must divide "
                 "parallelism.data_parallel_shard_degree * "
                 "parallelism.context_parallel_degree = 16 "
                 "(experts are spread over dp_shard x cp ranks)"),
    (dict(cp=4, ep=2), "parallelism.expert_parallel_degree (2) must be a multiple of "
                       "parallelism.context_parallel_degree = 4 "
                       "(experts are spread over dp_shard x cp ranks)"),
    (dict(tp=4, ep=2), "parallelism.expert_parallel_degree (2) must be a multiple of "
                       "parallelism.context_parallel_degree * "
                       "parallelism.tensor_parallel_degree = 4 "
                       "(experts are spread over dp_shard x cp x tp ranks when etp == 1)"),
    (dict(tp=2, ep=32), "parallelism.expert_parallel_degree (32) must divide "
                        "parallelism.data_parallel_shard_degree * "
                        "parallelism.context_parallel_degree * "
                        "parallelism.tensor_parallel_degree = 16 "
                        "(experts are spread over dp_shard x cp x tp ranks when etp == 1)"),
])
def test_expert_parallel_errors(kwargs, message):
    assert error_of(dims, 16, **kwargs) == message


def test_parallelism_error_is_a_config_and_value_error():
    assert issubclass(ParallelismError, ConfigError) and issubclass(ParallelismError, ValueError)


# --------------------------------------------------------------------------- model checks

def test_model_divisibility():
    m = FLAVORS["20b"]  # 64 heads, 8 kv heads, 32 experts, F 2880, vocab 201088
    dims(16, tp=8, ep=8, etp=1).check_model(m, 4096)
    dims(16, tp=2, ep=8, etp=2).check_model(m, 4096)
    assert error_of(dims(48, tp=3).check_model, m, 4096) == (
        "parallelism.tensor_parallel_degree (3) must divide model n_heads (64)")
    assert error_of(dims(16, tp=16).check_model, m, 4096) == (
        "parallelism.tensor_parallel_degree (16) must divide model n_kv_heads (8)")
    assert error_of(dims(64, ep=64).check_model, m, 4096) == (
        "parallelism.expert_parallel_degree (64) must divide model num_experts (32)")


def test_vocab_and_expert_hidden_divisibility():
    m = FLAVORS["tiny"].replace(vocab_size=511)  # 4 heads, 2 kv heads
    assert error_of(dims(2, tp=2).check_model, m, 64) == (
        "parallelism.tensor_parallel_degree (2) must divide model vocab_size (511) (loss parallel)")
    m = m.replace(vocab_size=512, moe_inter_dim=63)
    assert error_of(dims(2, tp=2).check_model, m, 64) == (
        "parallelism.tensor_parallel_degree (2) must divide model moe_inter_dim (63)")
    assert error_of(dims(4, tp=2, ep=2, etp=2).check_model, m, 64) == (
        "parallelism.expert_tensor_parallel_degree (2) must divide model moe_inter_dim (63)")
    dims(4, tp=2, ep=2, etp=1).check_model(m, 64)  # etp == 1: experts are not TP-sharded


def test_seq_len_divisibility():
    m = FLAVORS["tiny"]
    dims(4, dp_shard=1, cp=4).check_model(m, 64)
    assert error_of(dims(4, dp_shard=1, cp=4).check_model, m, 36) == (
        "training.seq_len (36) must be divisible by 2 * parallelism.context_parallel_degree (4) "
        "= 8 (head-tail context parallel)")
    dims(4, dp_shard=1, cp=4).check_model(m, 36, cp_load_balancer="none")
    assert error_of(dims(4, dp_shard=1, cp=4).check_model, m, 34, cp_load_balancer="none") == (
        "training.seq_len (34) must be divisible by parallelism.context_parallel_degree (4) = 4 "
        "(context parallel)")
    assert error_of(dims(4, dp_shard=1, cp=2, tp=2).check_model, m, 36) == (
        "training.seq_len (36) must be divisible by 2 * parallelism.context_parallel_degree (2) "
        "* parallelism.tensor_parallel_degree (2) = 8 "
        "(head-tail context parallel, sequence parallel)")
    assert dims(4, dp_shard=1, cp=2, tp=2).seq_len_divisor() == 8


def test_pipeline_stages():
    assert pipeline_num_stages(4, "1F1B", 24) == 4
    assert pipeline_num_stages(4, "Interleaved1F1B", 24) == 8
    assert pipeline_num_stages(2, "ZBVZeroBubble", 24, layers_per_stage=6) == 4
    assert pipeline_num_stages(2, "1F1B", 24, layers_per_stage=12) == 2
    assert pipeline_num_stages(2, "Interleaved1F1B", 24, layers_per_stage=3) == 8
    assert error_of(pipeline_num_stages, 4, "DualPipeV", 4) == (
        "model n_layers (4) must be >= the number of pipeline stages "
        "(8 = parallelism.pipeline_parallel_degree (4) x 2 per rank for DualPipeV)")
    assert error_of(pipeline_num_stages, 4, "1F1B", 24, 5) == (
        "parallelism.pipeline_parallel_layers_per_stage (5) makes 5 stages of 24 layers, but "
        "that is not a multiple of parallelism.pipeline_parallel_degree (4)")
    assert error_of(pipeline_num_stages, 2, "GPipe", 24, 6) == (
        "parallelism.pipeline_parallel_layers_per_stage (6) makes 4 stages of 24 layers, but "
        "GPipe needs exactly 1 stage per rank, got 2")
    assert error_of(pipeline_num_stages, 2, "DualPipeV", 24, 4) == (
        "parallelism.pipeline_parallel_layers_per_stage (4) makes 6 stages of 24 layers, but "
        "DualPipeV needs exactly 2 stages per rank, got 3")
    assert error_of(pipeline_num_stages, 2, "Interleaved1F1B", 24, 12) == (
        "parallelism.pipeline_parallel_layers_per_stage (12) makes 2 stages of 24 layers, but "
        "Interleaved1F1B needs >= 2 stages per rank, got 1")
    m = FLAVORS["debugmodel"]  # 4 layers
    assert "n_layers (4)" in error_of(dims(8, dp_shard=1, pp=8).check_model, m, 256)


# --------------------------------------------------------------------------- shipped configs

@pytest.mark.parametrize("name, world_size, expect", [
    ("debugmodel", 1, dict(dp_shard=1)),
    ("debugmodel", 2, dict(dp_shard=2)),
    ("gptoss_20b", 16, dict(dp_shard=16, ep=8, dp_shard_mod_ep=2)),
    ("gptoss_120b", 128, dict(dp_shard=128, ep=8, dp_shard_mod_ep=16)),
])
def test_shipped_configs_validate_at_their_world_size(name, world_size, expect):
    cfg = load_config(str(CONFIGS / f"{name}.toml"), [])
    d = validate_job(cfg, world_size)
    for key, value in expect.items():
        assert getattr(d, key) == value


def test_shipped_configs_fail_cleanly_at_a_wrong_world_size():
    cfg = load_config(str(CONFIGS / "gptoss_20b.toml"), [])
    assert error_of(validate_job, cfg, 12).startswith(
        "parallelism.expert_parallel_degree (8) must divide")
    with pytest.raises(ConfigError, match=r"^training.global_batch_size \(64\) must be a multiple"):
        validate_job(cfg, 48)  # 2 x 48 = 96 does not divide 64


def test_validate_job_uses_the_config_options():
    cfg = load_config(None, ["--parallelism.context_parallel_degree=2", "--training.seq_len=66",
                             "--parallelism.context_parallel_load_balancer=none"])
    validate_job(cfg, 2)
    cfg.parallelism.context_parallel_load_balancer = "headtail"
    assert "head-tail" in error_of(validate_job, cfg, 2)


# --------------------------------------------------------------------------- the mesh

@pytest.fixture
def fake_world():
    dist = pytest.importorskip("torch.distributed")
    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")

    def init(rank, world_size):
        dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=rank, world_size=world_size)

    yield init
    if dist.is_initialized():
        dist.destroy_process_group()


def test_mesh_names_without_ep():
    d = dims(16, dp_replicate=2, cp=2, tp=2)
    assert d.mesh_shape() == (("pp", "dp_replicate", "dp_shard", "cp", "tp"), (1, 2, 2, 2, 2))
    assert set(d.flattened_dims()) == {"dp", "dp_shard_cp", "dp_cp"}


def test_mesh_for_120b_on_128_ranks(fake_world):
    fake_world(rank=9, world_size=128)
    d = validate_job(load_config(str(CONFIGS / "gptoss_120b.toml"), []), 128)
    root = d.build_mesh("cpu")
    assert root.mesh_dim_names == (
        "pp", "dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep", "cp", "tp")
    assert d.world_mesh is root
    # EP = the 8 GPUs of rank 9's node; expert weights shard across nodes.
    assert d.get_mesh("ep").mesh.tolist() == list(range(8, 16))
    assert d.get_mesh("dp_shard_mod_ep").mesh.tolist() == list(range(1, 128, 8))
    for name in ("dp", "dp_shard", "dp_shard_cp", "dp_cp"):
        assert d.get_mesh(name).size() == 128
    assert d.get_mesh(("dp_replicate", "dp_shard_mod_ep")).shape == (1, 16)


def test_mesh_with_tp_cp_and_etp(fake_world):
    fake_world(rank=0, world_size=16)
    d = dims(16, cp=2, tp=2, ep=2, etp=2)  # dp_shard 4 = mod_ep 2 x in_ep 1; ep = in_ep x cp
    d.build_mesh("cpu")
    assert d.get_mesh("tp").mesh.tolist() == [0, 1]
    assert d.get_mesh("cp").mesh.tolist() == [0, 2]
    assert d.get_mesh("ep").mesh.tolist() == [0, 2]
    assert d.get_mesh("dp_shard").mesh.tolist() == [0, 4, 8, 12]
    assert d.get_mesh("dp_shard_cp").size() == 8 and d.get_mesh("dp").size() == 4
    # Groups by name: None where a dim holds one rank (the caller skips the collective).
    assert d.group("dp_cp") is d.get_mesh("dp_cp").get_group() is not None
    assert d.group("pp") is None and d.group("dp_replicate") is None
    assert d.local_rank("dp") == 0 and d.local_rank("cp") == 0


def test_groups_without_a_mesh():
    d = dims(4, cp=2)  # one process never builds the mesh: no group, rank 0
    assert d.group("dp_cp") is None and d.local_rank("dp") == 0


def test_hsdp_views_with_ep(fake_world, recwarn):
    fake_world(rank=3, world_size=16)
    d = dims(16, dp_replicate=2, ep=4)
    d.build_mesh("cpu")
    hsdp = d.get_mesh(("dp_replicate", "dp_shard_cp"))
    assert hsdp.mesh.tolist() == [list(range(8)), list(range(8, 16))]
    assert d.get_mesh(("dp_replicate", "dp_shard_mod_ep")).mesh.tolist() == [[3, 7], [11, 15]]
    assert d.get_mesh("ep").mesh.tolist() == [0, 1, 2, 3]
    assert not [w for w in recwarn if "flattened dim" in str(w.message)]


def test_get_mesh_before_build():
    with pytest.raises(RuntimeError, match="build_mesh"):
        dims(1).get_mesh("dp")
