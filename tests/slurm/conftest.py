"""The real local Slurm cluster for the tests marked ``slurm`` (started by ``slurm/local/start.sh``: by default two
nodes, ``node1`` and ``node2``, with one CPU each, and partitions ``low`` (default, preemptible) and ``high``).

``slurm_cluster`` (session) starts the cluster on demand when pytest runs as root, which CI does, and skips every
test that uses it otherwise, or when the start fails (the tail of the logs is printed; ``R2D2_REQUIRE_SLURM=1``
turns that skip into a failure). A cluster that was already up is reused and left running; one this session
started is stopped at the end unless ``R2D2_SLURM_KEEP=1``. ``job_dir`` gives each test its own submitit folder:
job ids restart at 1 whenever the cluster restarts, and submitit trusts result files it finds in its folder.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "slurm" / "local"
CLUSTER_NAME = "r2d2local"  # ClusterName in slurm/local/slurm.conf.in
STATE_DIR = Path(os.environ.get("R2D2_SLURM_DIR", "/tmp/r2d2-slurm"))
# Below pytest-timeout's 300 s, so that a slow package install ends in a skip with its log, not a killed session.
START_TIMEOUT_S = 280
DONE_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED")
# The job row fields that wait_sacct returns; Start - Submit is the queue wait.
SACCT_FIELDS = ("JobID", "State", "ExitCode", "Elapsed", "ElapsedRaw", "Submit", "Start", "End")
SACCT_FIELDS += ("NNodes", "NCPUS", "NodeList", "AllocTRES")


@dataclass(frozen=True)
class SlurmCluster:
    """The running test cluster: what tests need to submit to it and to read its accounting."""

    partition: str  # the default partition (low: preemptible)
    nodes: tuple[str, ...]  # node names, sorted (node1, node2, ...; one node: the short hostname)
    num_cpus: int  # CPUs of each node, as Slurm counts them
    mem_mib: int  # each node's RealMemory
    state_dir: Path  # pid files, logs (log/), controller state, accounting DB
    python: str  # the interpreter that jobs run (this venv's)
    high_partition: str | None = None  # the partition whose jobs preempt the default one's (None: none)

    @property
    def node(self) -> str:
        """The first node."""
        return self.nodes[0]

    def executor(self, folder: Path, **params: Any) -> Any:
        """A submitit AutoExecutor for this cluster: one CPU per task and 5 minutes unless ``params`` say else."""
        import submitit

        executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
        defaults = {"slurm_partition": self.partition, "timeout_min": 5, "cpus_per_task": 1, "nodes": 1}
        executor.update_parameters(**(defaults | params))
        return executor

    def sacct(
        self,
        job_id: str | int,
        fields: Sequence[str] = SACCT_FIELDS,
        steps: bool = False,
        extra: Sequence[str] = (),
    ) -> list[dict]:
        """``sacct`` rows of one job as {field: text}: the job's own row first, its steps too when ``steps``;
        ``extra=("-D",)``: one row per attempt of a requeued job."""
        cmd = ["sacct", "-j", str(job_id), "-o", ",".join(fields), "--parsable2", "--noheader", *extra]
        out = run_cmd(cmd if steps else [*cmd, "-X"]).stdout
        return [dict(zip(fields, line.split("|"), strict=True)) for line in out.splitlines() if line]

    def wait_sacct(
        self, job_id: str | int, states: Sequence[str] = DONE_STATES, timeout_s: float = 30.0
    ) -> dict[str, str]:
        """Polls until the job's row has one of ``states`` (first word: "CANCELLED by 0") and returns the row.

        The accounting DB lags the controller by up to ~1 s, so a job submitit already saw finish may still
        read RUNNING here for a moment.
        """
        deadline = time.monotonic() + timeout_s
        rows: list[dict] = []
        while time.monotonic() < deadline:
            rows = self.sacct(job_id, fields=SACCT_FIELDS)
            if rows and rows[0]["State"].split()[0] in states:
                return rows[0]
            time.sleep(0.2)
        raise AssertionError(
            f"job {job_id}: sacct says {rows[:1]} after {timeout_s:g} s, never one of {states}"
        )

    @staticmethod
    def elapsed_s(text: str) -> int:
        """Seconds in a Slurm duration ``[D-]HH:MM:SS`` (sacct's Elapsed)."""
        days, _, hms = text.rpartition("-")
        hours, minutes, seconds = (int(part) for part in hms.split(":"))
        return int(days or 0) * 86400 + hours * 3600 + minutes * 60 + seconds

    @staticmethod
    def timestamp(text: str) -> dt.datetime:
        """sacct's Submit/Start/End (``2026-11-27T01:52:22``)."""
        return dt.datetime.fromisoformat(text)


def run_cmd(cmd: Sequence[str], timeout_s: float = 30.0, check: bool = True) -> subprocess.CompletedProcess:
    """Runs a Slurm client command and returns its output; bounded, since clients retry an unreachable daemon."""
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout_s, check=check)


def _log_tails(start_log: Path, since: float, num_lines: int = 15) -> str:
    """The start script's output, then the end of every daemon log written to since ``since`` (epoch s)."""
    logs = [*sorted((STATE_DIR / "log").glob("*.log")), STATE_DIR / "mysql" / "mysqld.err"]
    parts = [f"----- {start_log}\n{start_log.read_text(errors='replace').strip()}"]
    for path in (p for p in logs if p.is_file() and p.stat().st_mtime >= since):
        lines = path.read_text(errors="replace").splitlines()[-num_lines:]
        parts.append(f"----- {path} (last {len(lines)} lines)\n" + "\n".join(lines))
    return "\n".join(parts)


def _unavailable(request: pytest.FixtureRequest, reason: str, details: str = "") -> None:
    """Skips (fails with R2D2_REQUIRE_SLURM=1), printing ``details`` straight to the terminal."""
    if details:
        capture = request.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():
            print(f"\n{details}\n", file=sys.stderr)
    if os.environ.get("R2D2_REQUIRE_SLURM") == "1":
        pytest.fail(f"R2D2_REQUIRE_SLURM=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def _local_cluster_up() -> bool:
    """The controller answers and is this project's test cluster (never a real cluster this machine belongs to)."""
    try:
        if "is UP" not in run_cmd(["scontrol", "ping"], timeout_s=10, check=False).stdout:
            return False
        config = run_cmd(["scontrol", "show", "config"], timeout_s=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):  # no Slurm installed, or no answer
        return False
    return re.search(rf"^ClusterName\s*=\s*{CLUSTER_NAME}\s*$", config, re.M) is not None


def _describe(state_dir: Path) -> SlurmCluster:
    # "%P %c %m %N": partition (the default one marked *), CPUs, memory (MiB), node name; one line per node x partition
    rows = [
        ln.split() for ln in run_cmd(["sinfo", "-h", "-N", "-o", "%P %c %m %N"]).stdout.splitlines() if ln
    ]
    default = next(r for r in rows if r[0].endswith("*"))
    partition = default[0].rstrip("*")
    nodes = tuple(sorted({r[3] for r in rows if r[0] == default[0]}))
    others = sorted({r[0] for r in rows} - {default[0]})
    high = "high" if "high" in others else None
    return SlurmCluster(partition, nodes, int(default[1]), int(default[2]), state_dir, sys.executable, high)


@pytest.fixture(scope="session")
def slurm_cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SlurmCluster]:
    """The local Slurm cluster, started when needed; skips the test when it cannot be had."""
    start, stop = SCRIPTS / "start.sh", SCRIPTS / "stop.sh"
    if not (start.is_file() and stop.is_file()):
        _unavailable(request, f"no Slurm start script at {start}")
    if os.geteuid() != 0:
        if _local_cluster_up():  # started earlier by root: use it, leave it running
            yield _describe(STATE_DIR)
            return
        _unavailable(
            request, f"the local Slurm cluster is down and starting it needs root: `sudo bash {start}`"
        )
    start_log = tmp_path_factory.mktemp("slurm") / "start.log"
    started_at = time.time() - 1  # mtimes have coarse resolution on some file systems
    try:
        # Output to a file, never a pipe: a daemon that kept the pipe open would make this wait forever.
        with start_log.open("w") as out:
            done = subprocess.run(
                ["bash", str(start)], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                timeout=START_TIMEOUT_S, check=False,
            )  # fmt: skip
        failure = f"exit status {done.returncode}" if done.returncode else ""
    except subprocess.TimeoutExpired:
        failure = f"no answer within {START_TIMEOUT_S} s"
    if failure:
        lines = start_log.read_text(errors="replace").strip().splitlines() or ["(no output)"]
        cause = next((line for line in reversed(lines) if "ERROR:" in line), lines[-1])
        reason = f"the local Slurm cluster did not start ({failure}): {cause.strip()} (logs printed above)"
        _unavailable(request, reason, _log_tails(start_log, since=started_at))
    started_here = "already up" not in start_log.read_text()
    yield _describe(STATE_DIR)
    if started_here and os.environ.get("R2D2_SLURM_KEEP") != "1":
        subprocess.run(
            ["bash", str(stop)], stdin=subprocess.DEVNULL, capture_output=True, timeout=120, check=False
        )


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    """This test's own submitit folder (job ids repeat across cluster restarts; submitit trusts old results)."""
    path = tmp_path / "jobs"
    path.mkdir()
    return path


@pytest.fixture(autouse=True)
def _pickle_test_functions_by_value(request: pytest.FixtureRequest) -> None:
    """Jobs cannot import test modules (``tests/slurm`` is not on their path): ship their functions by value."""
    import cloudpickle

    cloudpickle.register_pickle_by_value(request.module)
