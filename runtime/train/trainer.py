"""The training job: `python -m runtime.train --config configs/debugmodel.toml [--a.b=c ...]`.

One Trainer owns the pieces, each from its own module:
  config (config.py) -> mesh (parallel/dims.py) -> model (model/) -> parallel passes
  (parallel/parallelize.py) -> runner (runner.py: the local one, or parallel/pipeline.py's) ->
  optimizer + lr (optim.py) -> data (runtime/data/) -> checkpoints (checkpoint/) ->
  metrics (metrics.py) -> signals/NaNs (faults.py).
The trainer decides what a step is (batch split, loss normalisation, clipping, optimizer);
the runner how this rank executes it; the trainer never asks which runner it has.
Exit codes: 0 done, 2 config error, 74 a checkpoint did not fit the disk, 75 stopped by
SIGUSR1/SIGTERM after saving (requeue me).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from runtime.data import Tokenizer, build_dataloader, split_microbatches
from runtime.data.loader import validation_data_config
from runtime.data.sources import source_kind
from runtime.data.input_check import check_data
from runtime.errors import (EXIT_DISK_FULL, ConfigError, DiskFullError, one_line,
                            report_config_error)
from runtime.hf import load_hf_into
from runtime.model import GptOssModel
from runtime.model.lora import apply_lora, count_trainable
from runtime.model.lora_spec import is_lora_name
from runtime.model.model import resolve_compute_dtype
from runtime.model.loss import IGNORE_INDEX
from runtime.model.moe import moe_layers, update_expert_bias
from runtime.model.quantize import after_optimizer_step
from runtime.parallel.context_parallel import shard_batch
from runtime.parallel.parallelize import Parallelized, parallelize
from runtime.parallel.pipeline import PipelineParallel
from runtime.train.checkpoint.manager import (CheckpointManager, ModelState, OptimizerState,
                                              Progress, TrainState, check_model_early,
                                              lock_dump_folder)
from runtime.train.config.job import validate_job
from runtime.train.config.loader import build_parser, parse_args
from runtime.train.config.schema import JobConfig
from runtime.train.faults import (NonFiniteLossError, StartupStopped, StopSignal,
                                  StopWhileWaiting, check_finite, count_skipped_step,
                                  startup_exit)
from runtime.train.metrics import MetricsLogger
from runtime.train.optim import build_lr_scheduler, build_optimizer
from runtime.train.config.job import step_batch
from runtime.train.memory_plan import check_memory
from runtime.train.checkpoint.hf_export import (check_export_target, check_lora_export,
                                                save_last_in_hf)
from runtime.train.profiling import StepProfiler
from runtime.train.runner import LocalRunner, Runner, materialize
from runtime.train.slurm_env import setup_distributed_env
from runtime.train.validation_loss import Validator
from runtime.train.wandb_logger import WandbLogger, require_wandb


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("training.device='cuda' but CUDA is not available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _progress(name: str) -> property:
    """trainer.step / tokens_seen / skipped_steps: the counters of `trainer.progress`, which
    the checkpoint's TrainState saves and restores."""
    return property(lambda self: getattr(self.progress, name),
                    lambda self, value: setattr(self.progress, name, value))


class Trainer:
    step = _progress("step")
    tokens_seen = _progress("tokens_seen")
    skipped_steps = _progress("skipped_steps")  # non-finite or untrained steps (checkpointed)

    def __init__(self, cfg: JobConfig, stop: StopSignal | None = None):
        """`stop`: the entry point's StopSignal, installed in start-up mode (faults.py); a
        signal before the first step then raises StartupStopped out of here, the dump-folder
        lock released."""
        self.cfg = cfg
        self.stop = stop
        self.progress = Progress()  # step, tokens_seen, skipped_steps
        self.last_trained_tokens = 0
        self._wandb = require_wandb(cfg.metrics)  # not installed: a config error, nothing built
        self.abandoned = False  # stopped while waiting for data: leave without collectives
        self._init_distributed()
        # One job per dump folder (dump_lock.py), before anything is read, built or written;
        # a signal meanwhile waits until the lock file is complete (then raises).
        ckpt_folder = os.path.join(cfg.job.dump_folder, cfg.checkpoint.folder)
        with stop.deferred() if stop is not None else contextlib.nullcontext():
            self.dump_lock = lock_dump_folder(
                cfg.job.dump_folder, self.log,
                subfolders=(("checkpoint.folder", Path(ckpt_folder)),) if cfg.checkpoint.enable
                else ())
        try:
            self._start()
        except BaseException:  # a config error or a start-up signal: the folder is free again
            if self.dump_lock is not None:
                self.dump_lock.release()
            raise

    def _start(self) -> None:
        cfg = self.cfg
        self._log_folders()
        self.model_args = cfg.model_args()
        self.lora_spec = cfg.lora_spec()  # None without [lora] enable
        self.dims = validate_job(cfg, self.world_size, self.model_args)
        self._refuse_over_memory()  # a batch the device cannot hold: exit 2 before any reading
        self.tokenizer = Tokenizer.load(cfg.model.tokenizer_path)
        if self.tokenizer.vocab_size > self.model_args.vocab_size:
            raise ConfigError(
                f"model.tokenizer_path: tokenizer has {self.tokenizer.vocab_size} tokens but "
                f"model.flavor={cfg.model.flavor!r} has vocab_size {self.model_args.vocab_size}")
        self._check_data()  # bad data is one line (exit 2) before any weight
        self.grad_accum, self.global_batch = step_batch(cfg, self.dims.dp)
        # a resume into another model or global batch: exit 2 now
        check_model_early(cfg, self.model_args, self.global_batch, self.dims.dp)
        if cfg.checkpoint.last_save_in_hf:  # an `hf` the export cannot replace: exit 2 now
            check_export_target(cfg.job.dump_folder, self.rank)
        check_lora_export(cfg, self.dims.pp)  # a LoRA hand-back this mesh cannot write: now
        self._build_model()
        self._build_training_state()

    # ------------------------------------------------------------------ setup
    def _init_distributed(self) -> None:
        env = setup_distributed_env()  # Slurm's per-task variables -> RANK, WORLD_SIZE, ...
        self.world_size, self.rank, self.local_rank = env.world_size, env.rank, env.local_rank
        self.device = resolve_device(self.cfg.training.device, self.local_rank)
        # The memory estimate brings up a fake process group: before the real one (a group
        # made by the caller, as in the tests' harness, means no check).
        self.memory_check = None
        if not dist.is_initialized():
            self.memory_check, warning = check_memory(
                self.cfg, self.world_size, self.device.type, self.device.index,
                env.local_world_size)
            if warning:
                self.log(warning)
        if self.world_size > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, device_id=self.device if backend == "nccl" else None)
        if self.device.type == "cpu" and self.world_size > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_world_size))

    def _refuse_over_memory(self) -> None:
        """Every rank raises the first refusal of any rank (the limits may differ by node)."""
        refusal = self.memory_check
        if self.world_size > 1 and dist.is_initialized():
            refusals: list = [None] * self.world_size
            dist.all_gather_object(refusals, refusal)
            refusal = next((r for r in refusals if r), None)
        if refusal:
            raise ConfigError(refusal)

    def _check_data(self) -> None:
        """check_data on every rank (each verifies its share of prepared data's checksums, as
        for checkpoints) for the training data and a prepared validation set; every rank
        raises the first problem found on any rank, so none waits in a collective."""
        cfg, error, sources = self.cfg, None, []
        checks = [(cfg.data, "train")]
        if cfg.validation.enable:
            val_data, holdout = validation_data_config(cfg.validation, cfg.data)
            if not holdout and source_kind(val_data) == "prepared":
                checks.append((val_data, "validation"))
        try:
            for data_cfg, split in checks:
                if source_kind(data_cfg) == "prepared":  # reads every file: say so first
                    self.log(f"data: verifying the checksums of the prepared {split} data "
                             f"({data_cfg.dataset_path}) ...")
                sources.append(check_data(data_cfg, self.tokenizer, split, self.rank,
                                          self.world_size))
        except ConfigError as e:
            error = e
        if self.world_size > 1:
            messages: list = [None] * self.world_size
            dist.all_gather_object(messages, str(error) if error else None)
            first = next((m for m in messages if m), None)
            error = error or (ConfigError(first) if first else None)
        if error:
            raise error
        for source in sources:
            if getattr(source, "checksums", True) is None:
                self.log(f"warning: {source.path}: prepared by an older version without "
                         f"checksums: not verified (prepare it again to verify it)")

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    def _log_folders(self) -> None:
        dump = os.path.abspath(self.cfg.job.dump_folder)
        ckpt = self.cfg.checkpoint
        state = f"every {ckpt.interval} steps" if ckpt.enable else "disabled"
        self.log(f"dump folder {dump} | checkpoint folder {os.path.join(dump, ckpt.folder)} "
                 f"({state})")

    def _build_model(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.training.seed)
        if cfg.training.deterministic:
            torch.use_deterministic_algorithms(True)
        with torch.device("meta"):
            model = GptOssModel(self.model_args)
        if self.lora_spec is not None:  # adapters on, base frozen in the compute dtype
            frozen_dtype = resolve_compute_dtype(self.model_args.compute_dtype, self.device)
            apply_lora(model, self.lora_spec, frozen_dtype)
        total_params = sum(p.numel() for p in model.parameters())
        total_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.mesh = self.dims.build_mesh(self.device.type) if self.world_size > 1 else None

        # What parallelize() made of each part (the model, or each of this rank's stages, in
        # model_parts order): the CP handle, what quantize converted.
        self.parallelized: list[Parallelized] = []

        def parallelize_part(part):
            self.parallelized.append(parallelize(part, self.dims, cfg, self.device))
            return self.parallelized[-1].model

        def materialize_parts(parts):
            materialize(parts, self.device, cfg.training.seed)

        self.runner: Runner
        if self.dims.pp > 1:  # this rank's pipeline stages, each parallelised on its own
            self.runner = PipelineParallel(model, self.dims, cfg, self.device,
                                           parallelize_part, materialize_parts)
        else:
            model = parallelize_part(model)
            materialize_parts([model])
            # The fused head + loss needs the whole vocabulary (TP shards it: loss parallel).
            fused = cfg.training.loss_chunk_size if self.dims.tp == 1 else 0
            self.runner = LocalRunner(model, self.device, fused_loss_chunk=fused)
        self.model_parts = self.runner.model_parts  # the model, or this rank's stages
        # Every part has the same CP handle (one cp mesh dimension): batches are cut with it.
        self.context_parallel = self.parallelized[0].context_parallel
        self._float8_parts = [p.model for p in self.parallelized if p.float8_precompute_scales]
        # Every local parameter under the full model's names (with pp: a view of all local
        # stages): optimizer, optimizer checkpoints, MoE bookkeeping.
        self.model = self.runner.model
        self._load_initial_weights()
        # DTensor.numel() is the global size: count the shard this rank actually holds
        rank_trainable, n_params = count_trainable(self.model)
        self.log(f"model {cfg.model.flavor}: {self.model_args.n_layers} layers, "
                 f"{total_params / 1e6:.1f}M parameters (model total), "
                 f"{n_params / 1e6:.1f}M on rank {self.rank} (per rank), "
                 f"mesh {self.dims.describe()}, device {self.device}, "
                 f"grad accumulation {self.grad_accum}")
        self.trainable_params = (total_trainable, rank_trainable)
        if self.lora_spec is not None:
            # the largest share, for the step line (at startup only)
            most = max_over_ranks(rank_trainable, self.device) if self.world_size > 1 \
                else rank_trainable
            self.trainable_params = (total_trainable, most)
            spec = self.lora_spec
            self.log(f"LoRA rank {spec.rank}, alpha {spec.alpha:g} (scaling {spec.scaling:g}) on "
                     f"{', '.join(sorted(spec.targets))} in {len(spec.layers)} layers: trainable "
                     f"{_millions(total_trainable)} of {_millions(total_params)} parameters "
                     f"({100 * total_trainable / total_params:.3f}%), "
                     f"{_millions(rank_trainable)} on rank {self.rank}, at most "
                     f"{_millions(most)} per rank; frozen base in {frozen_dtype_name(self)}")

    def _load_initial_weights(self) -> None:
        ckpt = self.cfg.checkpoint
        if ckpt.initial_load_path:
            # A LoRA run loads the base: its adapters keep their initialisation.
            base = (lambda name: not is_lora_name(name)) if self.lora_spec is not None else None
            CheckpointManager.load_model_only(ModelState(self.model_parts, include=base),
                                              ckpt.initial_load_path)
            self.log(f"initial weights from {ckpt.initial_load_path}")
        elif ckpt.initial_load_hf:
            for part in self.model_parts:
                load_hf_into(part, ckpt.initial_load_hf)
            self.log(f"initial weights from HF checkpoint {ckpt.initial_load_hf}")

    def _build_training_state(self) -> None:
        cfg = self.cfg
        self.optimizer = build_optimizer(self.model, cfg.optimizer, self.device)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.lr_scheduler, cfg.training.steps)
        dp_rank = self.dims.local_rank("dp")
        v = cfg.validation  # with split_fraction, the held-out conversations are never trained on
        self.dataloader = build_dataloader(
            cfg.data, self.tokenizer, cfg.training.seq_len, self.global_batch,
            dp_rank=dp_rank, dp_world_size=self.dims.dp, document_masking=cfg.data.document_mask,
            prefetch=cfg.data.prefetch, holdout=v.split_fraction if v.enable else 0.0)
        self.validator = Validator(
            cfg, self.tokenizer, self.global_batch, dp_rank=dp_rank, dp_world_size=self.dims.dp,
            log=self.log) if v.enable else None
        # Aux-loss gradients average over every forward of a step (pipeline microbatches too).
        forwards = self.grad_accum * self.runner.microbatches
        for moe in moe_layers(self.model):
            moe.aux_loss_scale = 1.0 / forwards
        self.checkpointer = CheckpointManager(
            cfg.checkpoint, cfg.job.dump_folder,
            # A LoRA checkpoint leaves the frozen base out (it is reloaded from its source).
            {"model": ModelState(self.model_parts,
                                 trainable_only=self.lora_spec is not None),
             "optimizer": OptimizerState([self.model], [self.optimizer]),
             "train": TrainState(self.progress, self.lr_scheduler, self.dataloader, cfg=cfg,
                                 model_args=self.model_args, lora=self.lora_spec is not None,
                                 global_batch=self.global_batch, dp=self.dims.dp)},
            log=self.log)
        resumed = self.checkpointer.load_latest() if cfg.checkpoint.enable else None
        if resumed is not None:
            self.log(f"resumed at step {self.step}")
        self.metrics = MetricsLogger(
            cfg.metrics, cfg.job.dump_folder, self.model_args, cfg.training.seq_len,
            self.global_batch * cfg.training.seq_len, self.world_size, self.device,
            is_writer=self.rank == 0, start_step=self.step,
            trainable_params=self.trainable_params if self.lora_spec is not None else None,
            sinks=[WandbLogger(self._wandb, cfg, cfg.job.dump_folder)]
            if self._wandb is not None and self.rank == 0 else [])

    def _routing_group(self):
        """All ranks that route different tokens: the token group (dp_cp), and the TP ranks
        too when EP borrows them (each TP rank then routes its own sequence shard)."""
        return self.dims.group("dp_cp_tp" if self.dims.tp_in_ep > 1 else "dp_cp")

    def validation_metrics(self) -> dict:
        """{"validation_loss", "validation_tokens"} of the held-out set (validation.enable)."""
        return self.validator.evaluate(
            self.runner, self.model, self.context_parallel, optimizer=self.optimizer,
            grad_accum=self.grad_accum, seq_len=self.cfg.training.seq_len,
            token_group=self.dims.group("dp_cp"), device=self.device, log=self.log)

    # ------------------------------------------------------------------ one step
    def train_step(self, batch: dict) -> tuple[float, float]:
        """One optimizer step's forward/backward on this rank's slice of the global batch, then
        clipping; returns (loss, grad_norm) where loss is the mean token loss over the whole
        global batch. Both are read in one transfer, the step's one host sync on one GPU: the
        non-finite policy must see them before the optimizer steps."""
        batch = shard_batch(self.context_parallel, batch, self.cfg.training.seq_len)  # CP
        global_tokens = self._global_trained_tokens(batch)
        # Gradient reduction averages over the ranks that saw different tokens (dp x cp),
        # hence that factor: any mesh and any accumulation split give the same gradient.
        # max(., 1): a step whose every label is masked trains nothing instead of dividing by 0.
        loss_scale = self.dims.dp * self.dims.cp / max(global_tokens, 1)
        micro_batches = split_microbatches(batch, self.grad_accum)
        self.last_trained_tokens = global_tokens
        if global_tokens == 0:  # nothing to learn: optimizer_step skips the step (same on all ranks)
            return float("nan"), 0.0
        loss_sum = torch.zeros((), device=self.device)
        for i, micro in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            loss_sum += self.runner.forward_backward(micro, loss_scale, sync_grads=last)
        loss_sum = self.runner.share_loss(loss_sum)
        token_group = self.dims.group("dp_cp")  # every rank with different tokens
        if token_group is not None:
            dist.all_reduce(loss_sum, group=token_group)
        loss, grad_norm = read_scalars(loss_sum / max(global_tokens, 1), self.clip_grad_norm_(),
                                       device=self.device)
        return loss, grad_norm

    def _global_trained_tokens(self, batch: dict) -> int:
        """The step's normaliser: labels that are not IGNORE_INDEX, over all micro-batches
        and all ranks with different tokens. Counted on the host (the batch is still on the
        CPU); with data-parallel ranks one all-reduce, whose read is a host sync: the backward
        needs the normaliser as a number."""
        count = int((batch["labels"] != IGNORE_INDEX).sum())
        token_group = self.dims.group("dp_cp")
        if token_group is None:
            return count
        total = torch.tensor(float(count), device=self.device)
        dist.all_reduce(total, group=token_group)
        return int(total.item())

    def clip_grad_norm_(self) -> torch.Tensor:
        """Total gradient norm of the step (every shard and stage), clipped to
        training.max_norm (0: not clipped), as a device scalar. Tests wrap it to see the
        step's gradients."""
        max_norm = self.cfg.training.max_norm
        return self.runner.clip_grad_norm_(max_norm if max_norm > 0 else float("inf"))

    def optimizer_step(self, batch: dict) -> tuple[float, float, float]:
        """Everything of one training step but logging and checkpointing (also used by the
        benchmarks): forward/backward, clipping, optimizer, lr schedule, expert-bias update.
        Returns (loss, grad_norm, lr used)."""
        policy, limit = self.cfg.training.on_nonfinite, self.cfg.training.max_skipped_steps
        loss, grad_norm = self.train_step(batch)
        self.tokens_seen += self.global_batch * self.cfg.training.seq_len
        trained = self.last_trained_tokens > 0
        if not trained:  # no forward ran: no update, no decay, nothing routed
            self.skipped_steps += 1
            self.log(count_skipped_step(self.skipped_steps, limit, self.step,
                                        "no trained token in the global batch"))
        elif check_finite(loss, self.step, policy, "loss") and \
                check_finite(grad_norm, self.step, policy, "grad norm"):
            self.optimizer.step()
            after_optimizer_step(self._float8_parts)  # float8: FSDP all-gather scales (quantize.py)
        else:
            self.skipped_steps += 1
            quantity, value = ("loss", loss) if not math.isfinite(loss) else ("grad norm", grad_norm)
            self.log(count_skipped_step(self.skipped_steps, limit, self.step,
                                        f"non-finite {quantity} {value}"))
        self.optimizer.zero_grad(set_to_none=True)
        # The schedule advances with every step, skipped or not: it is a function of the step
        # number (warmup and decay end where the config says, whatever the data held), and a
        # resume that takes this config's schedule (_restart_schedule_at) lands where a
        # resumed scheduler would.
        lr = self.lr_scheduler.get_last_lr()[0]
        self.lr_scheduler.step()
        if trained:
            update_expert_bias(self.model, self._routing_group())  # every stage's layers
        return loss, grad_norm, lr

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        cfg = self.cfg
        own_stop = self.stop is None or not self.stop.installed
        stop = StopSignal().install() if own_stop else self.stop
        stop.data_wait_s = cfg.training.stop_data_wait_s
        last_step = cfg.training.steps
        profiler = None
        # Everything from here is inside the try: a start-up signal while the loader starts
        # (workers, files) still releases the lock and closes what was opened.
        try:
            if self.step >= last_step:
                self.log(f"nothing to do: already at step {self.step} of {last_step}")
            if cfg.compile.enable and self.step < last_step:
                self.log("compiling the transformer blocks during the first step "
                         "(can take minutes)")
            self.metrics.reset_timer()
            data = iter(self.dataloader)
            profiler = StepProfiler(cfg.profiling, cfg.job.dump_folder, self.rank, self.device,
                                    self.step, self.log).start()
            if cfg.checkpoint.enable and self.step < last_step:
                self.checkpointer.check_space()  # a still-full disk: stop before training
            stop.started()  # from here a signal finishes the step and saves
            while self.step < last_step:
                try:
                    with stop.interrupting():  # a stop never waits for data
                        batch = next(data)
                except StopWhileWaiting:
                    code, line = stop.stopped_waiting(self.step + 1, cfg.checkpoint.enable)
                    self.log(line)
                    self.abandoned = True
                    return code
                self.step += 1
                loss, grad_norm, lr = self.optimizer_step(batch)
                extras = {**self._moe_extras(), **self._data_extras()}
                validate = self.validator is not None and self.validator.due(self.step, last_step)
                if validate:
                    extras.update(self.validation_metrics())
                self.metrics.log(self.step, loss, grad_norm, lr, extras,
                                 force=self.step == last_step or validate)
                if validate:
                    self.metrics.reset_timer()  # keep evaluation time out of tokens/s
                if profiler.step():
                    self.metrics.reset_timer()  # keep trace/snapshot writing out of tokens/s
                stopping = stop.should_stop(self.device)
                self.checkpointer.poll()  # an async save that failed stops the run here
                if self.checkpointer.should_save(self.step, last_step) or (stopping and cfg.checkpoint.enable):
                    self.checkpointer.save(self.step, force_sync=stopping or self.step == last_step)
                    self.metrics.reset_timer()  # keep save time out of tokens/s
                if stopping:  # USR1 -> 75 (requeue); TERM/INT -> 128 + signal (faults.py)
                    code = stop.exit_code(checkpoint_saved=cfg.checkpoint.enable)
                    self.log(stop.describe(self.step, code, cfg.checkpoint.enable))
                    return code
            if cfg.checkpoint.last_save_in_hf:
                self.log(f"HF checkpoint (weights, config, tokenizer, chat template): "
                         f"{self.export_hf()}")
            return 0
        except torch.OutOfMemoryError:
            if profiler is not None:
                profiler.dump_oom_snapshot(self.step)  # with enable_memory_snapshot, on CUDA
            raise
        finally:
            if profiler is not None:
                profiler.close()
            if own_stop:
                stop.uninstall()
            try:
                self.checkpointer.close()  # raises a failed async save (the run stops)
            finally:
                self.metrics.close()
                if self.dump_lock is not None:
                    self.dump_lock.release()

    def export_hf(self) -> Path:
        """checkpoint.last_save_in_hf: this model as an HF checkpoint in <dump_folder>/hf
        (hf_export.py; every rank calls it)."""
        return save_last_in_hf(self.cfg, self.model, self.tokenizer, model_args=self.model_args,
                               lora_spec=self.lora_spec, rank=self.rank, step=self.step,
                               checkpointer=self.checkpointer, pipeline=self.dims.pp > 1)

    def _data_extras(self) -> dict:
        """Trained tokens of the step (loss-masked data); chat conversations cut or dropped so
        far and the padding share (the loader's running statistics: right also when batches
        are prefetched)."""
        return {"trained_tokens": self.last_trained_tokens, **self.dataloader.stats()}

    def _moe_extras(self) -> dict:
        aux = [m.last_aux_loss for m in moe_layers(self.model) if m.last_aux_loss is not None]
        return {"aux_loss": float(torch.stack(aux).mean())} if aux else {}


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n < 1e9 else f"{n / 1e9:.2f}B"


def frozen_dtype_name(trainer) -> str:
    dtype = resolve_compute_dtype(trainer.model_args.compute_dtype, trainer.device)
    return str(dtype).removeprefix("torch.")


def max_over_ranks(count: int, device: torch.device) -> int:
    """The largest of every rank's `count` (a collective; exact for int64 counts)."""
    counts = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    return int(counts[0])


def read_scalars(*values: torch.Tensor | float, device: torch.device) -> list[float]:
    """Device scalars as Python floats in ONE device-to-host transfer: each separate `.item()`
    is a host sync on a GPU (the CPU waits for every queued kernel)."""
    return torch.stack([torch.as_tensor(v, device=device).float() for v in values]).tolist()

def main(argv: list[str] | None = None, stop: StopSignal | None = None) -> int:
    """The job. `stop`: a StopSignal installed in start-up mode by the caller (__main__.py
    installs it before importing torch); else one is installed here, first of all."""
    if stop is None:
        stop = StopSignal().install(starting=True)
    job: dict = {}
    try:
        return _main(argv, stop, job)
    except StartupStopped as e:  # one line; the Trainer released the dump-folder lock
        trainer = job.get("trainer")
        if trainer is not None and trainer.dump_lock is not None:  # between Trainer() and run()
            trainer.dump_lock.release()
        cfg = job.get("cfg")
        return startup_exit(e.signum, can_resume=cfg is not None and cfg.checkpoint.enable)
    finally:
        stop.uninstall()


def _main(argv: list[str] | None, stop: StopSignal, job: dict) -> int:
    parser = build_parser("python -m runtime.train")
    parser.add_argument("--skip-memory-check", action="store_true",
                        help="start even when the memory estimate exceeds the device's "
                             "(= --training.skip_memory_check=true)")
    try:
        cfg, ns = parse_args(argv, parser)
    except ConfigError as e:
        return report_config_error(e)
    if ns.skip_memory_check:
        cfg.training.skip_memory_check = True
    job["cfg"] = cfg
    if ns.print_config:
        print(cfg.to_toml_str(), end="")
        return 0
    try:
        trainer = job["trainer"] = Trainer(cfg, stop)
    except ConfigError as e:
        return report_config_error(e)
    start = time.perf_counter()
    try:
        code = trainer.run()
    except DiskFullError as e:  # a save did not fit: the previous checkpoint is intact
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_DISK_FULL
    except (NonFiniteLossError, ConfigError) as e:
        # the user's data or settings, not a bug: one line (e.g. a bad record deep in a file,
        # met mid-run: the pre-flight check reads only the head of each file)
        return report_config_error(e)
    trainer.log(f"finished at step {trainer.step} in {time.perf_counter() - start:.1f}s (exit {code})")
    if dist.is_initialized() and not trainer.abandoned:
        dist.barrier()
        dist.destroy_process_group()
    return code
