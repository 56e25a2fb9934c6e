"""``study logs``: the files of a run's current job, one rank's lines, and following a file while it grows."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

from r2d2_hpc.launch.logs import log_files, print_logs
from r2d2_hpc.launch.record import Study, StudyRun


def _sbatch_study(tmp_path: Path) -> Study:
    run = StudyRun("unet-n2-r0", "unet", 2, 2, 0, "runs/unet-n2-r0", job_id="77", state="RUNNING")
    run.extra["previous_jobs"] = [{"job_id": "70", "state": "CANCELLED"}]
    study = Study.create(tmp_path / "s", [run], "sbatch", {})
    (study.dir / "sbatch").mkdir()
    return study


def test_rank_filter_and_follow_of_a_growing_sbatch_log(tmp_path: Path) -> None:
    study = _sbatch_study(tmp_path)
    run = study.runs[0]
    out_file, err_file = log_files(study, run)
    assert (out_file.name, err_file.name) == ("unet-n2-r0-77.out", "unet-n2-r0-77.err")  # the current job
    (study.dir / "sbatch" / "unet-n2-r0-70.err").write_text("[rank 1] from the cancelled job\n")
    err_file.write_text("t [rank 0] INFO start\nt [rank 1] WARNING slow\n")

    def writer() -> None:
        for i in range(3):
            time.sleep(0.2)
            with open(err_file, "a") as fh:
                fh.write(f"t [rank 1] INFO step {i}\nt [rank 0] INFO step {i}\n")
        with open(err_file, "a") as fh:
            fh.write("t [rank 1] half a li")  # a line still being written is held back

    thread = threading.Thread(target=writer)
    thread.start()
    grace = time.monotonic() + 1.0

    def going() -> bool:  # follows while the writer writes, and a moment after
        return thread.is_alive() or time.monotonic() < grace

    out = io.StringIO()
    found = print_logs(study, [run], out, rank=1, follow=going, poll_s=0.05)
    thread.join()
    lines = out.getvalue().splitlines()
    assert found == 1  # the .err exists, the .out not yet
    assert lines == [
        f"==> {err_file} <==",
        "t [rank 1] WARNING slow",
        "t [rank 1] INFO step 0",
        "t [rank 1] INFO step 1",
        "t [rank 1] INFO step 2",
    ]
