"""Checkpoints: DCP save/resume that is atomic, verified and never unpickles user files.

  manager.py        CheckpointManager, TrainState: save, find, verify and load `step-N`
  manifest.py       size + CRC32 of each file of a checkpoint (written last)
  resume_checks.py  a checkpoint against this run: model identity, shapes, config changes
  dump_lock.py      one job per dump folder (`<dump_folder>/.lock`)
  disk_space.py     free space before a save; a save the disk filled
  hf_export.py      the last model as an HF checkpoint (checkpoint.last_save_in_hf)

Nothing here imports the rest of runtime.train (the trainer calls in, never the reverse), so the
package sits below train/'s trainer with no import back up into its parent package.
"""
