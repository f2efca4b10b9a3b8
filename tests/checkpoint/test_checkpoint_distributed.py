"""Checkpoint checks on more than one rank (gloo): an async save is published in the
background (its collectives on the async gloo group), the manifest's checksums are split over
the ranks, and a damage only one rank sees still makes every rank skip the checkpoint."""

import time

from parallel_harness import BASE, run_distributed, run_single

from runtime.train.checkpoint import manifest


def wait_for_async_publish(rank, world_size):
    """Step 3 (after the async save of step 2 began) waits, on every rank, until step-2 is
    published: only a background publication can get there (no step boundary passes)."""
    def patch(trainer):
        real = trainer.optimizer_step

        def optimizer_step(batch):
            if trainer.step == 3:
                final = trainer.checkpointer.folder / "step-2" / manifest.MANIFEST
                deadline = time.monotonic() + 60
                while not final.is_file():
                    assert time.monotonic() < deadline, "step-2 not published in the background"
                    time.sleep(0.01)
            return real(batch)

        trainer.optimizer_step = optimizer_step
    return patch


def test_damage_seen_by_one_rank_is_skipped_by_all(tmp_path):
    folder = tmp_path / "ckpt"
    ckpt = ["--checkpoint.enable=true", "--checkpoint.interval=2", f"--checkpoint.folder={folder}"]
    fsdp2 = ["--parallelism.data_parallel_shard_degree=2", "--training.local_batch_size=2"]
    run_distributed(2, BASE + ckpt + fsdp2 + ["--checkpoint.async_mode=async"], 4,
                    out_dir=tmp_path / "a", hook=wait_for_async_publish)
    assert (folder / "step-2" / manifest.MANIFEST).is_file()
    step4 = folder / "step-4"
    names = sorted(manifest.read_manifest(step4)[0])
    assert names == [".metadata", "__0_0.distcp", "__1_0.distcp", "runtime.json"]
    # rank 1 checksums names[1::2]: only it can see this damage
    assert "__0_0.distcp" in manifest.files_for_rank(names, 1, 2)
    with open(step4 / "__0_0.distcp", "r+b") as f:
        f.seek(2000)
        f.write(bytes(512))
    got = run_distributed(2, BASE + ckpt + fsdp2, 6, out_dir=tmp_path / "b")
    assert len(got["losses"]) == 4  # both ranks resumed at step 2, ran 3..6
    # The checkpoint saved by 2 ranks verifies and loads on one process (another mesh).
    one = run_single(BASE + ckpt + ["--training.local_batch_size=4"], 7, out_dir=tmp_path / "c")
    assert len(one["losses"]) == 1
