"""The parallelism degrees of a run (`ParallelDims`) and their validation; the device mesh.

The mesh is pp x dp_replicate x dp_shard x cp x tp (outermost to innermost, so tp and
then cp stay inside a node). Experts are not a separate mesh dimension: like torchtitan,
EP borrows ranks from dp_shard x cp (and x tp when etp == 1), so with ep > 1 dp_shard is
split into dp_shard_mod_ep x dp_shard_in_ep and
    ep = dp_shard_in_ep x cp            (etp == tp: experts are tensor-parallel over tp)
    ep = dp_shard_in_ep x cp x tp       (etp == 1: EP takes the TP ranks too)
Expert weights are then FSDP-sharded over dp_shard_mod_ep (x dp_replicate for HSDP).

`ParallelDims` takes plain integers (runtime.train.config.job builds it from a config).
Validation is pure Python and runs before any process group exists: every failure is a
one-line `ParallelismError` (runtime.errors; a ConfigError, hence a ValueError) naming the
[parallelism] keys the user writes.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from runtime.errors import ParallelismError
from runtime.model.args import ModelArgs

if TYPE_CHECKING:  # torch is only needed to build the mesh
    from torch.distributed.device_mesh import DeviceMesh

# ParallelDims field -> the config key users write.
KEYS = {
    "dp_replicate": "data_parallel_replicate_degree",
    "dp_shard": "data_parallel_shard_degree",
    "cp": "context_parallel_degree",
    "tp": "tensor_parallel_degree",
    "pp": "pipeline_parallel_degree",
    "ep": "expert_parallel_degree",
    "etp": "expert_tensor_parallel_degree",
}

# Pipeline schedules by how many stages each rank holds.
SINGLE_STAGE_SCHEDULES = ("GPipe", "1F1B")
V_SCHEDULES = ("ZBVZeroBubble", "DualPipeV")  # exactly 2 stages per rank, in a V


def _key(name: str) -> str:
    return f"parallelism.{KEYS[name]}"


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int  # -1: whatever the world size leaves after the other degrees
    cp: int
    tp: int
    pp: int
    ep: int
    etp: int
    world_size: int
    _meshes: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise ParallelismError(f"parallelism: world size must be >= 1, got {self.world_size!r}")
        for name in KEYS:
            value = getattr(self, name)
            if name == "dp_shard" and value == -1:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                allowed = "-1 (infer) or >= 1" if name == "dp_shard" else ">= 1"
                raise ParallelismError(f"{_key(name)} must be {allowed}, got {value!r}")
        dense = ("dp_replicate", "dp_shard", "cp", "tp", "pp")
        if self.dp_shard == -1:
            rest = self.dp_replicate * self.cp * self.tp * self.pp
            if self.world_size % rest:
                names = " * ".join(KEYS[n] for n in dense if n != "dp_shard")
                raise ParallelismError(
                    f"parallelism: cannot infer data_parallel_shard_degree: world size "
                    f"{self.world_size} is not divisible by {names} = {rest}")
            self.dp_shard = self.world_size // rest
        product = math.prod(getattr(self, n) for n in dense)
        if product != self.world_size:
            names = " * ".join(KEYS[n] for n in dense)
            factors = " * ".join(str(getattr(self, n)) for n in dense)
            raise ParallelismError(
                f"parallelism: {names} = {factors} = {product} != world size {self.world_size}")
        self._validate_experts()

    def _validate_experts(self) -> None:
        if self.etp not in (1, self.tp):
            raise ParallelismError(
                f"{_key('etp')} ({self.etp}) must be 1 or equal {_key('tp')} ({self.tp})")
        if self.ep == 1:
            return
        # EP spreads over whole cp groups (and whole tp groups when etp == 1) times a
        # divisor of dp_shard.
        borrows_tp = self.etp == 1 and self.tp > 1
        inner = self.cp * (self.tp if borrows_tp else 1)
        inner_names = _key("cp") + (f" * {_key('tp')}" if borrows_tp else "")
        why = ("experts are spread over dp_shard x cp x tp ranks when etp == 1" if borrows_tp
               else "experts are spread over dp_shard x cp ranks")
        if self.ep % inner:
            raise ParallelismError(
                f"{_key('ep')} ({self.ep}) must be a multiple of {inner_names} = "
                f"{inner} ({why})")
        if (self.dp_shard * inner) % self.ep:
            raise ParallelismError(
                f"{_key('ep')} ({self.ep}) must divide {_key('dp_shard')} * "
                f"{inner_names} = {self.dp_shard * inner} ({why})")

    def check_model(self, model: ModelArgs, seq_len: int, *,
                    cp_load_balancer: str = "headtail", loss_parallel: bool = True,
                    pp_schedule: str = "1F1B", pp_layers_per_stage: int = -1) -> None:
        """Divisibility of the model's shapes and the sequence by the degrees."""
        tp_key = _key("tp")
        if self.tp > 1:
            for name in ("n_heads", "n_kv_heads"):  # attention (and sinks) shard by head
                self._divides(tp_key, self.tp, name, getattr(model, name))
            # Embedding and output (and loss parallel, which reads the output's shards)
            # split the vocabulary.
            why = " (loss parallel)" if loss_parallel else ""
            self._divides(tp_key, self.tp, "vocab_size", model.vocab_size, why)
        # Experts' hidden dim is tensor-parallel under plain TP (ep == 1) or under ETP.
        expert_tp, expert_tp_key = (self.tp, tp_key) if self.ep == 1 else (self.etp, _key("etp"))
        if expert_tp > 1:
            self._divides(expert_tp_key, expert_tp, "moe_inter_dim", model.moe_inter_dim)
        if self.ep > 1:
            self._divides(_key("ep"), self.ep, "num_experts", model.num_experts)
        self._check_seq_len(seq_len, cp_load_balancer)
        if self.pp > 1:
            pipeline_num_stages(self.pp, pp_schedule, model.n_layers, pp_layers_per_stage)

    @staticmethod
    def _divides(key: str, degree: int, what: str, value: int, why: str = "") -> None:
        if value % degree:
            raise ParallelismError(f"{key} ({degree}) must divide model {what} ({value}){why}")

    def _check_seq_len(self, seq_len: int, cp_load_balancer: str) -> None:
        # CP cuts the sequence into cp chunks (2*cp for head-tail balancing), then sequence
        # parallel cuts each rank's chunk over tp.
        parts, why = [], []
        if self.cp > 1:
            headtail = cp_load_balancer == "headtail"
            parts.append(f"{'2 * ' if headtail else ''}{_key('cp')} ({self.cp})")
            why.append("head-tail context parallel" if headtail else "context parallel")
        if self.tp > 1:
            parts.append(f"{_key('tp')} ({self.tp})")
            why.append("sequence parallel")
        divisor = self.seq_len_divisor(cp_load_balancer)
        if seq_len % divisor:
            raise ParallelismError(
                f"training.seq_len ({seq_len}) must be divisible by "
                f"{' * '.join(parts)} = {divisor} ({', '.join(why)})")

    # ------------------------------------------------------------------ derived
    @property
    def dp(self) -> int:
        """Data-parallel degree: ranks that see different samples."""
        return self.dp_replicate * self.dp_shard

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def etp_enabled(self) -> bool:
        return self.ep > 1 and self.etp > 1

    @property
    def dp_shard_in_ep(self) -> int:
        """The part of dp_shard that EP borrows (1 without EP)."""
        if self.ep == 1:
            return 1
        return self.ep // (self.cp * (self.tp if self.etp == 1 else 1))

    @property
    def tp_in_ep(self) -> int:
        """TP ranks that the EP mesh includes (EP borrowing TP ranks, etp == 1)."""
        return self.tp if self.ep > 1 and self.etp == 1 else 1

    @property
    def dp_shard_mod_ep(self) -> int:
        """The part of dp_shard over which expert weights are FSDP-sharded."""
        return self.dp_shard // self.dp_shard_in_ep

    def seq_len_divisor(self, cp_load_balancer: str = "headtail") -> int:
        """training.seq_len must be a multiple of this."""
        cp_chunks = self.cp * (2 if self.cp > 1 and cp_load_balancer == "headtail" else 1)
        return cp_chunks * self.tp

    def describe(self) -> str:
        parts = [f"{n}={getattr(self, n)}" for n in KEYS]
        return f"world {self.world_size}: " + " ".join(parts)

    # ------------------------------------------------------------------ mesh
    def mesh_shape(self) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """Names and sizes of the root mesh (size-1 dims kept, so every name exists)."""
        if self.ep > 1:
            shard = (("dp_shard_mod_ep", self.dp_shard_mod_ep),
                     ("dp_shard_in_ep", self.dp_shard_in_ep))
        else:
            shard = (("dp_shard", self.dp_shard),)
        dims = (("pp", self.pp), ("dp_replicate", self.dp_replicate), *shard,
                ("cp", self.cp), ("tp", self.tp))
        return tuple(n for n, _ in dims), tuple(s for _, s in dims)

    def flattened_dims(self) -> dict[str, tuple[str, ...]]:
        """Derived 1-D meshes, each a flattening of root dims (outer to inner).

        dp: data loading; dp_shard_cp: FSDP of dense params; dp_cp: loss/grad-norm
        reductions; ep: expert all-to-all; dp_shard (with EP): the unsplit FSDP dim;
        dp_cp_tp (EP borrowing TP): MoE token counts for the expert-bias update.
        """
        shard = ("dp_shard_mod_ep", "dp_shard_in_ep") if self.ep > 1 else ("dp_shard",)
        out = {
            "dp": ("dp_replicate", *shard),
            "dp_shard_cp": (*shard, "cp"),
            "dp_cp": ("dp_replicate", *shard, "cp"),
        }
        if self.ep > 1:
            out["dp_shard"] = shard
            out["ep"] = ("dp_shard_in_ep", "cp") + (("tp",) if self.etp == 1 else ())
            if self.tp_in_ep > 1:  # MoE load statistics: every rank routing different tokens
                out["dp_cp_tp"] = ("dp_replicate", *shard, "cp", "tp")
        return out

    def build_mesh(self, device_type: str = "cuda") -> "DeviceMesh":
        """Create the root mesh and the flattened views (needs an initialized process group).

        Views are kept here (`get_mesh`), because slicing a flattened dim from the root
        mesh is deprecated in recent torch.
        """
        # torch is imported here, not at the top: validation runs without it (login nodes).
        from torch.distributed.device_mesh import init_device_mesh

        names, sizes = self.mesh_shape()
        root = init_device_mesh(device_type, sizes, mesh_dim_names=names)
        self._meshes = {"world": root}
        for name, dims in self.flattened_dims().items():
            self._meshes[name] = root[dims]._flatten(name)
        return root

    @property
    def world_mesh(self) -> "DeviceMesh":
        return self.get_mesh("world")

    def get_mesh(self, name: str | tuple[str, ...]) -> "DeviceMesh":
        """A flattened view by name, else root dims by name(s).

        E.g. get_mesh("ep"), get_mesh("tp"), get_mesh(("dp_replicate", "dp_shard_cp")) for
        HSDP of dense params, get_mesh(("dp_replicate", "dp_shard_mod_ep")) for experts.
        """
        if not self._meshes:
            raise RuntimeError("ParallelDims.build_mesh() has not been called")
        if isinstance(name, str) and name in self._meshes:
            return self._meshes[name]
        # Multi-dim views that include a flattened dim (HSDP: ("dp_replicate", "dp_shard_cp"))
        # still come from the root in torch 2.11-2.13, which only warns about it.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Slicing a flattened dim from root mesh")
            return self._meshes["world"][name]

    def group(self, name: str):
        """The process group of a mesh dim or flattened view (e.g. "dp_cp": the ranks with
        different tokens), or None when it holds one rank or no mesh was built (one process):
        callers then skip the collective."""
        if not self._meshes:
            return None
        mesh = self.get_mesh(name)
        return mesh.get_group() if mesh.size() > 1 else None

    def local_rank(self, name: str) -> int:
        """This rank's index in a mesh dim or flattened view (0 without a mesh)."""
        if not self._meshes:
            return 0
        return self.get_mesh(name).get_local_rank()


def pipeline_num_stages(pp: int, schedule: str, n_layers: int, layers_per_stage: int = -1) -> int:
    """Total pipeline stages (pp x stages per rank) for a schedule; raises when impossible."""
    per_rank = 1 if schedule in SINGLE_STAGE_SCHEDULES else 2
    if layers_per_stage == -1:
        stages = pp * per_rank
        if n_layers < stages:
            raise ParallelismError(
                f"model n_layers ({n_layers}) must be >= the number of pipeline stages "
                f"({stages} = parallelism.pipeline_parallel_degree ({pp}) x {per_rank} per rank "
                f"for {schedule})")
        return stages
    stages = math.ceil(n_layers / layers_per_stage)
    prefix = (f"parallelism.pipeline_parallel_layers_per_stage ({layers_per_stage}) makes "
              f"{stages} stages of {n_layers} layers, but")
    if stages % pp:
        raise ParallelismError(
            f"{prefix} that is not a multiple of parallelism.pipeline_parallel_degree ({pp})")
    got = stages // pp
    if schedule in SINGLE_STAGE_SCHEDULES and got != 1:
        raise ParallelismError(f"{prefix} {schedule} needs exactly 1 stage per rank, got {got}")
    if schedule in V_SCHEDULES and got != 2:
        raise ParallelismError(f"{prefix} {schedule} needs exactly 2 stages per rank, got {got}")
    if got < 2 and schedule not in SINGLE_STAGE_SCHEDULES:
        raise ParallelismError(f"{prefix} {schedule} needs >= 2 stages per rank, got {got}")
    return stages

