"""A disk that fills (issue 20, item 2): a save that cannot fit is refused before it starts, a
save the disk filled under is removed, and a restart on a still-full disk stops before it
trains; each is one `error:` line naming the folder, the bytes needed and the bytes free, exit
74 (EXIT_DISK_FULL), and the previous checkpoint stays the latest. On small tmpfs mounts
(root only: skipped with the reason otherwise)."""

import os
import re
import subprocess

import pytest
from checkpoint_helpers import error_lines, parked_job, read_until, run_job

from runtime.errors import EXIT_DISK_FULL

# The tiny model's checkpoint (BASE) is 14.4 MB.
NEEDS = re.compile(r"it needs ([\d,]+) bytes \(the size of step-2\) and ([\d,]+) bytes are free")


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(size) -> a fresh tmpfs of `size` (mount's syntax, e.g. "24m"), always
    unmounted at the end of the test."""
    mounted = []

    def mount(size: str):
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root (CI runs the suite as root)")
        path = tmp_path / f"disk{len(mounted)}"
        path.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(path)], check=True)


def _state(folder):
    return sorted(p.name for p in folder.iterdir()), (folder / "latest").read_text().strip()


def test_a_save_that_cannot_fit_is_refused_and_a_restart_stops_before_training(
        small_disk, tmp_path):
    disk = small_disk("24m")  # step-2 fits, a second 14.4 MB checkpoint does not
    folder = disk / "checkpoints"
    proc = run_job(tmp_path, f"--checkpoint.folder={folder}")
    assert proc.returncode == EXIT_DISK_FULL, proc.stderr[-3000:]
    (line,) = error_lines(proc)
    assert "Traceback" not in proc.stderr
    assert line.startswith(f"error: checkpoint step 4: no space in {folder}: ")
    needed, free = (int(n.replace(",", "")) for n in NEEDS.search(line).groups())
    assert free < needed and line.endswith("nothing was written; step-2 stays the latest "
                                           "checkpoint")
    assert _state(folder) == (["latest", "step-2"], "step-2")

    proc = run_job(tmp_path, f"--checkpoint.folder={folder}", "--training.steps=6")
    assert proc.returncode == EXIT_DISK_FULL, proc.stderr[-3000:]
    (line,) = error_lines(proc)
    assert line.startswith(f"error: the next checkpoint: no space in {folder}: ")
    assert NEEDS.search(line) and "nothing was trained" in line
    assert "step 3 |" not in proc.stdout
    assert _state(folder) == (["latest", "step-2"], "step-2")


@pytest.mark.parametrize("mode", ["disabled", "async"])
def test_a_disk_that_fills_during_a_save_is_one_line(small_disk, tmp_path, mode):
    """Another writer fills the disk (1 MB left) just as the save of step 4 starts writing."""
    disk = small_disk("40m")
    folder = disk / "checkpoints"
    job = parked_job(tmp_path, f"--checkpoint.folder={folder}", "--training.steps=6",
                     f"--checkpoint.async_mode={mode}", fill_at_save=f"4:{disk / 'filler'}:1000000")
    try:
        out = read_until(job, "\0")  # to its end
    finally:
        job.kill()
        job.wait()
    assert job.returncode == EXIT_DISK_FULL, "\n".join(out[-40:])
    (line,) = [line for line in out if line.startswith("error:")]
    assert not any("Traceback" in line for line in out)
    assert line.startswith(f"error: checkpoint step 4: no space in {folder}: "), line
    needed, free = (int(n.replace(",", "")) for n in NEEDS.search(line).groups())
    assert 500_000 < free < needed  # about the 1 MB the save had (tmpfs counts pages)
    assert line.endswith("the partial save was removed; step-2 stays the latest checkpoint")
    assert _state(folder) == (["latest", "step-2"], "step-2")
