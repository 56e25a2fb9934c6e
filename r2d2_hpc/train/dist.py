"""The distributed environment: launcher variables -> ``DistEnv`` -> a process group, and naming a dead rank.

One function reads what ``torchrun``, ``srun`` or submitit's LocalExecutor exported (in that order of precedence)
and returns a frozen :class:`DistEnv`; the training code never looks at the environment itself. ``MASTER_ADDR``
and ``MASTER_PORT`` always win over derived values. Under Slurm the rendezvous host is the first host of the step's
(else the job's) node list, expanded in pure Python, and the port is derived from the job id and the step id (see
:func:`derived_port`) so that every task of a step derives the same one without talking to the others, while two
steps of one job (two runs sharing an allocation) and two jobs on one node get different ones. A multi-task Slurm
job whose ranks were not started by ``srun`` (``python -m r2d2_hpc.train`` run by the batch script itself) fails
at once, instead of waiting as rank 0 for ranks that never start. submitit's Slurm executor exports the Slurm variables, so it is read as Slurm;
its LocalExecutor's own variables win over ``SLURM_*`` inherited from an allocation it runs inside.

:class:`Heartbeat` lets a surviving rank name the rank that died: every rank publishes (step, wall time) to the
process group's TCPStore (hosted by rank 0) from a background thread about once a second.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import re
import socket
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as tdist

from r2d2_hpc.errors import ConfigError, problem
from r2d2_hpc.train.devices import choose_cuda_index

log = logging.getLogger(__name__)

# Derived ports lie in [PORT_BASE, PORT_END): above the well-known range and below Linux' ephemeral range (32768
# and up, /proc/sys/net/ipv4/ip_local_port_range), where an outgoing connection could already hold the port.
PORT_BASE, PORT_END = 15000, 32768
STEPS_PER_JOB = 8  # steps of one job running at once that get distinct ports
HEARTBEAT_KEY = "r2d2/heartbeat/{rank}"
VERDICT_KEY = "r2d2/heartbeat/verdict"  # the inspector's list of suspects after a failed collective
_NEVER = json.dumps({"never": True})  # placeholder of a rank that has not published yet
_state: dict[str, float] = {}  # the timeout given to init_process_group, for describe_failure
_heartbeats: weakref.WeakSet[Heartbeat] = weakref.WeakSet()


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job; built once by :func:`dist_env_from_environ`."""

    rank: int  # global rank, 0 .. world_size-1
    world_size: int  # processes in the job
    local_rank: int  # rank on this node
    local_world_size: int  # processes on this node
    master_addr: str  # host of rank 0 (runs the TCPStore)
    master_port: int  # rendezvous port
    num_nodes: int  # nodes in the job
    backend: str  # "nccl" | "gloo" (resolved; never "auto")
    device: str  # "cuda:<i>" or "cpu"
    source: str  # "torchrun" | "slurm" | "submitit" | "single"
    job_id: str | None  # Slurm job id when present

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that writes shared files."""
        return self.rank == 0


def dist_env_from_environ(environ: Mapping[str, str] | None = None, backend: str = "auto") -> DistEnv:
    """Reads the launcher's variables (torchrun, then Slurm, then submitit local, else one process).

    Args:
        environ: the variables to read; ``os.environ`` when None.
        backend: ``auto`` (nccl with CUDA, else gloo), ``nccl`` or ``gloo``.

    Raises:
        ConfigError: a variable is missing, not an integer or inconsistent with another one, or nccl is asked
            for without CUDA.
    """
    env = dict(os.environ if environ is None else environ)
    local_submitit = "SUBMITIT_LOCAL_GLOBALID" in env
    if "RANK" in env or "WORLD_SIZE" in env:
        p = _from_torchrun(env)
    elif "SLURM_PROCID" in env and not (local_submitit and env.get("SUBMITIT_EXECUTOR") == "local"):
        p = _from_slurm(env)
    elif local_submitit:  # wins over SLURM_* inherited from an allocation the local executor runs inside
        p = _from_submitit_local(env)
    else:
        p = _Parts(
            0, 1, 0, 1, 1, None, None, "single", ("rank", "world size", "local rank", "local world size")
        )
    if env.get("MASTER_ADDR"):
        p.master_addr = env["MASTER_ADDR"]
    if env.get("MASTER_PORT"):
        p.master_port = _int(env, "MASTER_PORT")
    _check(p)
    resolved = _resolve_backend(backend)
    if p.master_addr is None:
        if p.num_nodes > 1:
            raise ConfigError(f"{p.num_nodes} nodes but no rendezvous host: set MASTER_ADDR to rank 0's host")
        p.master_addr = "127.0.0.1"
    if p.master_port is None:
        if p.world_size > 1:
            raise ConfigError(
                "no rendezvous port for a multi-process job: set MASTER_PORT (the same on all ranks)"
            )
        p.master_port = free_port()
    fields = {k: v for k, v in dataclasses.asdict(p).items() if k != "names"}
    device = _device(resolved, p.local_rank, p.local_world_size, env)
    return DistEnv(**fields, backend=resolved, device=device, job_id=env.get("SLURM_JOB_ID") or None)


@dataclass
class _Parts:
    """What one launcher's variables say, before checks and defaults; ``names`` are the variables read."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    num_nodes: int
    master_addr: str | None
    master_port: int | None
    source: str
    names: tuple[str, str, str, str]  # the variables behind rank, world_size, local_rank, local_world_size


def _from_torchrun(env: dict[str, str]) -> _Parts:
    for name in ("RANK", "WORLD_SIZE"):
        if name not in env:
            raise ConfigError(
                f"RANK and WORLD_SIZE come together (torchrun sets both) but {name} is missing; "
                "launch with torchrun, or unset the other one"
            )
    world, rank = _int(env, "WORLD_SIZE"), _int(env, "RANK")
    local_world = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world
    local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank % max(local_world, 1)
    nodes = _int(env, "GROUP_WORLD_SIZE") if "GROUP_WORLD_SIZE" in env else -(-world // max(local_world, 1))
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    return _Parts(rank, world, local_rank, local_world, nodes, None, None, "torchrun", names)


def _from_slurm(env: dict[str, str]) -> _Parts:
    world_var = _first(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    if world_var is None or "SLURM_LOCALID" not in env:
        missing = "SLURM_NTASKS" if world_var is None else "SLURM_LOCALID"
        raise ConfigError(
            f"SLURM_PROCID is set but {missing} is not: start the ranks with "
            "`srun --ntasks=N python -m r2d2_hpc.train ...`"
        )
    world = _int(env, world_var)
    step_id = env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID")
    if not _srun_step(step_id) and world > 1:
        raise ConfigError(
            problem(
                f"{world_var}={world}",
                f"this process runs in the batch script of a {world}-task Slurm job, not in a task started "
                f"by srun (no SLURM_STEP_ID), so it would wait as rank 0 of {world} for ranks that never start",
                "one process per task, started by srun",
                "start it with `srun python -m r2d2_hpc.train ...` in the sbatch script (or run it with "
                "--ntasks=1)",
            )
        )
    per_node_var = _first(env, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    counts = parse_tasks_per_node(env[per_node_var], per_node_var) if per_node_var else None
    nodes_var = _first(env, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
    nodes = _int(env, nodes_var) if nodes_var else len(counts) if counts else 1
    node_id = _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
    if counts is not None and len(counts) == nodes and 0 <= node_id < nodes:
        if sum(counts) != world:
            raise ConfigError(
                f"{per_node_var}={env[per_node_var]!r} adds up to {sum(counts)} tasks but "
                f"{world_var}={world}; start the ranks with a single srun"
            )
        local_world = counts[node_id]
    elif env.get("SLURM_NTASKS_PER_NODE"):
        local_world = _int(env, per_node_var := "SLURM_NTASKS_PER_NODE")
    else:
        local_world = -(-world // nodes)
    host_var = _first(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    addr = expand_nodelist(env[host_var], host_var)[0] if host_var else None
    port = derived_port(env["SLURM_JOB_ID"], step_id, "SLURM_JOB_ID") if env.get("SLURM_JOB_ID") else None
    names = ("SLURM_PROCID", world_var, "SLURM_LOCALID", per_node_var or "SLURM_NTASKS / SLURM_NNODES")
    rank, local_rank = _int(env, "SLURM_PROCID"), _int(env, "SLURM_LOCALID")
    return _Parts(rank, world, local_rank, local_world, nodes, addr, port, "slurm", names)


def _from_submitit_local(env: dict[str, str]) -> _Parts:
    # submitit 1.5's LocalExecutor: one node, tasks_per_node processes, job id = the controller's pid.
    world = _int(env, "SUBMITIT_LOCAL_NTASKS") if "SUBMITIT_LOCAL_NTASKS" in env else 1
    rank = _int(env, "SUBMITIT_LOCAL_GLOBALID")
    local_rank = _int(env, "SUBMITIT_LOCAL_LOCALID") if "SUBMITIT_LOCAL_LOCALID" in env else 0
    job_id = env.get("SUBMITIT_LOCAL_JOB_ID")
    port = derived_port(job_id, None, "SUBMITIT_LOCAL_JOB_ID") if job_id else None
    ntasks = "SUBMITIT_LOCAL_NTASKS"
    names = ("SUBMITIT_LOCAL_GLOBALID", ntasks, "SUBMITIT_LOCAL_LOCALID", ntasks)
    return _Parts(rank, world, local_rank, world, 1, "127.0.0.1", port, "submitit", names)


def _first(env: Mapping[str, str], *names: str) -> str | None:
    return next((name for name in names if env.get(name)), None)


def _check(p: _Parts) -> None:
    rank_var, world_var, local_rank_var, local_world_var = p.names
    if min(p.world_size, p.local_world_size, p.num_nodes) < 1 or p.local_world_size > p.world_size:
        raise ConfigError(
            f"{world_var}={p.world_size}, {local_world_var}={p.local_world_size} and "
            f"{p.num_nodes} node(s) are inconsistent: each must be at least 1, and no node can "
            "hold more ranks than the job"
        )
    for value, var, size, size_var in (
        (p.rank, rank_var, p.world_size, world_var),
        (p.local_rank, local_rank_var, p.local_world_size, local_world_var),
    ):
        if not 0 <= value < size:
            raise ConfigError(
                f"{var}={value} must be in [0, {size_var}={size}): the launcher's variables "
                "disagree; relaunch with torchrun or srun"
            )
    if p.master_port is not None and not 0 < p.master_port < 65536:
        raise ConfigError(f"MASTER_PORT={p.master_port} is not a TCP port (1-65535)")


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(str(env[name]).strip())
    except ValueError:
        raise ConfigError(f"{name}={env[name]!r} is not an integer") from None


def _srun_step(step_id: str | None) -> bool:
    """The step id is an srun step's (0, 1, ...), not absent (a batch script) nor a special step's id
    (batch 4294967291, extern 4294967292, interactive 4294967290, or those names)."""
    return step_id is not None and step_id.isdigit() and int(step_id) < 0xFFFFFFF0


def derived_port(job_id: str, step_id: str | None = None, name: str = "SLURM_JOB_ID") -> int:
    """The rendezvous port of a job step: in [PORT_BASE, PORT_END), the same on every task of the step.

    Consecutive job ids are ``STEPS_PER_JOB`` ports apart and each of a job's first ``STEPS_PER_JOB`` concurrent
    steps has its own port, so runs on one node collide only when their job ids are more than
    ``(PORT_END - PORT_BASE) / STEPS_PER_JOB`` (2,221) apart and congruent. Non-numeric step ids (a batch
    script's) count as step 0.
    """
    digits = re.sub(r"\D", "", job_id)
    if not digits:
        raise ConfigError(f"{name}={job_id!r} has no digits to derive a port from; set MASTER_PORT")
    step = int(step_id) if _srun_step(step_id) else 0
    key = int(digits) * STEPS_PER_JOB + step % STEPS_PER_JOB
    return PORT_BASE + key % (PORT_END - PORT_BASE)


def _resolve_backend(backend: str) -> str:
    if backend not in ("auto", "nccl", "gloo"):
        raise ConfigError(
            f"train.backend={backend!r} is not a valid choice. Valid choices are: auto, nccl, gloo"
        )
    cuda = torch.cuda.is_available()
    if backend == "nccl" and not cuda:
        raise ConfigError(
            "train.backend=nccl needs CUDA, but torch sees no GPU here "
            f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})."
            " Fix: set train.backend=gloo (CPU) or train.backend=auto"
        )
    if backend == "auto":
        return "nccl" if cuda else "gloo"
    return backend


def _device(backend: str, local_rank: int, local_world_size: int, env: Mapping[str, str]) -> str:
    if backend != "nccl":
        return "cpu"
    index, why = choose_cuda_index(local_rank, local_world_size, torch.cuda.device_count(), env)
    log.debug("local rank %d uses cuda:%d (%s)", local_rank, index, why)
    return f"cuda:{index}"


def expand_nodelist(text: str, name: str = "SLURM_JOB_NODELIST") -> list[str]:
    """Expands a Slurm host list such as ``gpu[01-04,07],cpu5`` or ``node-[1-3]`` into host names."""
    groups, depth, start = [], 0, 0
    for i, char in enumerate(text + ","):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1) or (i == len(text) and depth):
            raise ConfigError(f"{name}={text!r} has unbalanced brackets; set MASTER_ADDR to rank 0's host")
        if char == "," and depth == 0:
            groups.append(text[start:i].strip())
            start = i + 1
    hosts: list[str] = []
    for group in filter(None, groups):
        pieces = re.split(r"\[([^\]]*)\]", group)  # literal, ranges, literal, ranges, ... literal
        choices = [[p] if k % 2 == 0 else _expand_ranges(p, text, name) for k, p in enumerate(pieces)]
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    if not hosts:
        raise ConfigError(f"{name}={text!r} names no host; set MASTER_ADDR to rank 0's host")
    return hosts


def _expand_ranges(spec: str, text: str, name: str) -> list[str]:
    out = []
    for item in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if match is None:
            raise ConfigError(
                f"{name}={text!r}: {item!r} is not a number or a range like 01-04; "
                "set MASTER_ADDR to rank 0's host"
            )
        low, high = match.group(1), match.group(2) or match.group(1)
        out.extend(f"{i:0{len(low)}d}" for i in range(int(low), int(high) + 1))
    return out


def parse_tasks_per_node(text: str, name: str = "SLURM_TASKS_PER_NODE") -> list[int]:
    """Expands Slurm's tasks-per-node form, e.g. ``2(x3),1`` -> ``[2, 2, 2, 1]``."""
    counts = []
    for item in text.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if match is None:
            raise ConfigError(f"{name}={text!r}: {item!r} is not a count like 4 or 2(x3)")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (for single-process runs and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_process_group(env: DistEnv, timeout_s: float) -> tdist.ProcessGroup:
    """Joins the process group over ``tcp://master_addr:master_port`` (also for one process, so code paths match).

    Returns the group for small CPU-side exchanges (RNG states, the checkpoint choice, model facts): the world
    itself with gloo, and a gloo group over the same ranks with NCCL, so that gathering or broadcasting Python
    objects never opens NCCL point-to-point links from rank 0 to every peer, nor copies bytes through a GPU.
    """
    if env.backend == "nccl":
        torch.cuda.set_device(torch.device(env.device))
    host = f"[{env.master_addr}]" if ":" in env.master_addr else env.master_addr
    _state["timeout_s"] = float(timeout_s)
    kwargs = {"device_id": torch.device(env.device)} if env.backend == "nccl" else {}
    try:
        tdist.init_process_group(
            env.backend,
            init_method=f"tcp://{host}:{env.master_port}",
            world_size=env.world_size,
            rank=env.rank,
            timeout=timedelta(seconds=timeout_s),
            **kwargs,
        )
    except (RuntimeError, OSError) as exc:
        if "address already in use" in str(exc).lower():
            raise ConfigError(
                problem(
                    f"{env.master_addr}:{env.master_port}",
                    "the rendezvous port is taken",
                    "a free port on rank 0's host",
                    "set MASTER_PORT to another port (runs sharing a Slurm job derive the same one)",
                )
            ) from exc
        exc.add_note(
            f"rendezvous tcp://{host}:{env.master_port}, rank {env.rank} of {env.world_size}, "
            f"backend {env.backend}, timeout {timeout_s:g} s ({env.source} environment)"
        )
        raise
    return cpu_group(env.backend, timeout_s)


def cpu_group(backend: str, timeout_s: float) -> tdist.ProcessGroup:
    """A gloo group of every rank: the world when it is gloo already, else a new one (a collective call)."""
    if backend == "gloo":
        return tdist.group.WORLD
    return tdist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def destroy_process_group() -> None:
    """Stops the heartbeats and leaves the process group; safe when none was initialised."""
    for heartbeat in list(_heartbeats):
        heartbeat.close()
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


class Heartbeat:
    """Publishes this rank's (step, wall time) about once a second so that survivors can name a dead rank.

    ``beat(step)`` only stores an integer (free per step); a daemon thread writes it to the TCPStore that rank 0
    hosts, under ``r2d2/heartbeat/<rank>``. Wall times from different hosts are compared, so clocks are assumed
    to agree within a second or two (NTP).

    Reading is kept off rank 0's store: one rank, the *inspector* (rank 0 unless told otherwise), looks at the
    others' heartbeats, once per stall (no progress for ``stall_warn_s``), in one batched ``multi_get``, and logs
    what it found (with NCCL the watchdog may end the process before Python sees an exception, and that line is
    then the one that names the rank). The other ranks read nothing while they stall. When a collective fails,
    the inspector looks at most twice and publishes its verdict under ``r2d2/heartbeat/verdict``; the others
    wait for that one key. So a stall costs the store O(1) reads and a failure O(world size), not the
    2 (N - 1) reads per rank per second of polling every peer from every rank.
    """

    def __init__(
        self,
        env: DistEnv,
        store: tdist.Store | None = None,
        interval_s: float = 1.0,
        stale_after_s: float | None = None,
        stall_warn_s: float | None = None,
        connect_timeout_s: float = 10.0,
        inspector: bool | None = None,
    ) -> None:
        self.env = env
        self.interval_s = interval_s
        self.stale_after_s = stale_after_s or max(5.0, 5 * interval_s)
        self.stall_warn_s = stall_warn_s or min(120.0, 0.5 * _state.get("timeout_s", 240.0))
        self.inspector = env.rank == 0 if inspector is None else inspector
        self.step = 0
        self._step_changed = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._store_error: str | None = None
        self._placeholders = False  # set once every peer's key is known to exist (multi_get would wait)
        self._where = {"host": socket.gethostname(), "pid": os.getpid()}
        self._store = store
        if store is None and env.world_size > 1:
            try:  # our own client of rank 0's store: its own socket, a short timeout
                self._store = tdist.TCPStore(
                    env.master_addr,
                    env.master_port,
                    None,
                    False,
                    timedelta(seconds=connect_timeout_s),
                    wait_for_workers=False,
                )
            except Exception as exc:  # any failure: rank 0's store is unreachable
                self._store_error = f"{type(exc).__name__}: {exc}"
        self._thread: threading.Thread | None = None
        if self._store is not None:
            self._publish()
            self._thread = threading.Thread(target=self._run, name="r2d2-heartbeat", daemon=True)
            self._thread.start()
        _heartbeats.add(self)

    def beat(self, step: int) -> None:
        """Records the step this rank has completed (the thread publishes it)."""
        if step != self.step:
            self.step = step
            self._step_changed = time.monotonic()

    def _publish(self, done: bool = False) -> None:
        value = json.dumps({"step": self.step, "time": time.time(), "done": done, **self._where})
        with self._lock:
            self._store.set(HEARTBEAT_KEY.format(rank=self.env.rank), value)

    def _run(self) -> None:
        warned_at = None
        while not self._stop.wait(self.interval_s):
            if self._store_error is None:
                try:
                    self._publish()
                except Exception as exc:  # rank 0 (the store) is gone: stop writing, still report a stall
                    self._store_error = f"{type(exc).__name__}: {exc}"
            stalled_s = time.monotonic() - self._step_changed
            if stalled_s > self.stall_warn_s and warned_at != self._step_changed:
                warned_at = self._step_changed  # once per stall, whatever is found
                self._report_stall(stalled_s)

    def _report_stall(self, stalled_s: float) -> None:
        if not (self.inspector or self._store_error):
            return  # the inspector speaks for the job; a stalled rank adds no reads to rank 0's store
        reasons = self.inspect()
        head = f"rank {self.env.rank} has made no progress for {stalled_s:.1f} s (step {self.step}); "
        if reasons:
            log.error("%s%s", head, "; ".join(f"rank {r} {why}" for r, why in reasons.items()))
        else:
            log.warning(
                "%severy other rank still beats and none is behind: a slow step (data, checkpoint, compile) "
                "or ranks that disagree on the collectives",
                head,
            )

    def _read_peers(self) -> dict[int, dict[str, Any] | None]:
        """Every other rank's last record (None: it never sent one), in one batched read."""
        ranks = [r for r in range(self.env.world_size) if r != self.env.rank]
        keys = [HEARTBEAT_KEY.format(rank=r) for r in ranks]
        with self._lock:
            if not self._placeholders:
                # multi_get waits for missing keys: give a rank that never beat a placeholder, once (compare_set
                # writes only where no key exists, so a heartbeat arriving meanwhile is kept)
                if not self._store.check(keys):
                    for key in keys:
                        self._store.compare_set(key, "", _NEVER)
                self._placeholders = True
            values = self._store.multi_get(keys)
        records = (json.loads(bytes(v).decode()) for v in values)
        return {r: (None if rec.get("never") else rec) for r, rec in zip(ranks, records, strict=True)}

    def inspect(self, now: float | None = None) -> dict[int, str]:
        """Suspect ranks -> why: stale or missing heartbeat, closed heartbeat, or behind this rank's step."""
        if self._store is None or self._store_error:
            return {0: self._unreachable(self._store_error or "no store")}
        behind_ok = time.monotonic() - self._step_changed > 2 * self.interval_s
        try:
            records = self._read_peers()
        except Exception as exc:  # the store lives in rank 0's process
            return {0: self._unreachable(f"{type(exc).__name__}: {exc}")}
        now = time.time() if now is None else now
        reasons, ages = {}, {}
        for rank, record in records.items():
            if record is None:
                reasons[rank], ages[rank] = "never sent a heartbeat (it died or hung while starting)", 1e9
                continue
            age_s, where = now - record["time"], f"on {record['host']} (pid {record['pid']})"
            ages[rank] = age_s
            if record.get("done"):
                reasons[rank] = f"left the job at step {record['step']} {where} (its loop ended early)"
            elif age_s > self.stale_after_s:
                reasons[rank] = (
                    f"stopped beating {age_s:.1f} s ago at step {record['step']} {where}: "
                    "the process died or its node failed"
                )
            elif behind_ok and record["step"] < self.step:
                reasons[rank] = (
                    f"is alive but behind at step {record['step']} (this rank: {self.step}) {where}: stuck or slow"
                )
        return {r: reasons[r] for r in sorted(reasons, key=lambda r: -ages[r])}

    def _unreachable(self, detail: str) -> str:
        return (
            f"hosts the heartbeat store at {self.env.master_addr}:{self.env.master_port}, which is unreachable "
            f"({detail}): rank 0 most likely died"
        )

    def suspects(self, now: float | None = None) -> list[int]:
        """Ranks whose heartbeat is stale, missing or behind; ``[0]`` when rank 0's store is unreachable."""
        return sorted(self.inspect(now))

    def wait_for_suspects(self, max_wait_s: float) -> dict[int, str]:
        """:meth:`inspect` now and, if it names no one, once more when a just-killed rank has gone stale."""
        reasons = self.inspect()
        if reasons or max_wait_s <= 0:
            return reasons
        time.sleep(min(max_wait_s, self.stale_after_s + self.interval_s))
        return self.inspect()

    def failure_reasons(self, max_wait_s: float) -> dict[int, str]:
        """After a failed collective: the inspector's verdict, shared through the store (see the class doc)."""
        if self._store is None or self._store_error:
            return self.inspect()
        if self.inspector:
            reasons = self.wait_for_suspects(max_wait_s)
            with contextlib.suppress(Exception), self._lock:
                self._store.set(VERDICT_KEY, json.dumps({str(r): why for r, why in reasons.items()}))
            return reasons
        try:
            waiter = self._store.clone()  # its own socket: the heartbeat thread keeps publishing meanwhile
            waiter.set_timeout(timedelta(seconds=max_wait_s + 2 * self.interval_s + 1.0))
            waiter.wait([VERDICT_KEY])
            verdict = json.loads(bytes(waiter.get(VERDICT_KEY)).decode())
        except Exception:  # no verdict in time (the inspector is stuck elsewhere) or the store is gone
            return self.wait_for_suspects(max_wait_s)
        return {int(r): why for r, why in verdict.items() if int(r) != self.env.rank}

    def close(self) -> None:
        """Stops the thread and marks this rank as done; idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 1.0)
            with contextlib.suppress(Exception):  # rank 0 may already be gone at shutdown
                self._publish(done=True)
        _heartbeats.discard(self)


def describe_failure(
    exc: BaseException, heartbeat: Heartbeat | None, env: DistEnv, timeout_s: float | None = None
) -> str:
    """A message for a failed collective that names the suspect rank(s), their last step, the timeout and the fix."""
    first_line = (str(exc).strip().splitlines() or [""])[0][:300]
    text = f"{type(exc).__name__} {exc}".lower()
    timeout_s = timeout_s if timeout_s is not None else _state.get("timeout_s")
    lines = [
        f"Rank {env.rank} of {env.world_size}: a collective failed ({type(exc).__name__}: {first_line})."
    ]
    if "timed out" in text or "timeout" in text or "watchdog" in text:
        lines.append("It waited the whole process-group timeout for the other ranks.")
    elif "closed by peer" in text or "connection reset" in text or "broken pipe" in text:
        lines.append("A peer closed its connection: another rank most likely crashed.")
    if heartbeat is None:
        lines.append(
            "No heartbeat ran, so the failed rank cannot be named: look for the rank whose log ends in an "
            "error first."
        )
        suspect_text = "the failed rank"
    else:
        reasons = heartbeat.failure_reasons(heartbeat.stale_after_s + 2 * heartbeat.interval_s)
        if reasons:
            names = ", ".join(str(r) for r in reasons)
            lines.append(f"Suspect rank(s): {names} (this rank was at step {heartbeat.step}).")
            lines += [f"  rank {r} {why}" for r, why in reasons.items()]
            suspect_text = f"rank {next(iter(reasons))}"
        else:
            lines.append(
                f"Every other rank still sends heartbeats at this rank's step {heartbeat.step}: the ranks "
                "may disagree on the number of collectives (a rank skipped or added one)."
            )
            suspect_text = "every rank"
    limit = f"train.dist_timeout_s={timeout_s:g} s" if timeout_s is not None else "train.dist_timeout_s"
    lines.append(
        f"The process-group timeout is {limit}. Fix: read the log of {suspect_text} (its stderr or Slurm "
        "output file) for the first error; if it is only slow (a long data stall, a first-step compile, a "
        "slow checkpoint write), raise train.dist_timeout_s."
    )
    return "\n".join(lines)
