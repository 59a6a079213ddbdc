"""Data-parallel runs: which process this is, the launch, and the few collectives the loop and `lm` use.

`modelcollapse run` under torchrun (RANK, WORLD_SIZE and LOCAL_RANK in the environment), or with `--nproc N`,
which launches itself that way, runs one process per rank. Every rank follows the same loop (SPMD, as
nanoGPT's train.py under DDP) and takes the same decisions; only rank 0, the writer, writes the run
directory, and the others read what it wrote after a barrier, so the run directory must be one every rank
sees (one node, or a shared file system). Outside torchrun every function here is the one-process case:
rank 0 of a world of 1, collectives that return their input.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
import sys
import uuid

import torch
import torch.distributed as dist

from modelcollapse.errors import BadInput
from modelcollapse.procs import die_with_parent, threads_each

# A rank waits at a collective for as long as another works alone: rank 0 sampling the evaluation stories,
# or the last round of shards when it has fewer shards than ranks. The defaults (10 min for NCCL, 30 for gloo)
# are shorter than one big shard on a CPU. A rank that dies is noticed by the launcher, which stops the rest.
TIMEOUT = datetime.timedelta(hours=6)


def launched() -> bool:
    """True in a process that torchrun (or `--nproc`) started."""
    return "WORLD_SIZE" in os.environ


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def is_writer() -> bool:
    """Rank 0 writes the run directory (and prints); the other ranks never do."""
    return rank() == 0


def check_world(cfg, world: int) -> None:
    """Refuse, before anything starts, an experiment that cannot be split over `world` processes. A family
    trains data-parallel when it declares how (`check_data_parallel`); the others run one process."""
    if world == 1:
        return
    check = cfg.family_module.check_data_parallel
    if check is None:
        raise BadInput(f"family {cfg.family} does not train data-parallel; run it without --nproc or torchrun")
    check(cfg.family_config, world)


@contextlib.contextmanager
def process_group(device: str):
    """The process group of a launched run, for the length of the block; yields this rank's device
    (cuda:LOCAL_RANK on a GPU node). NCCL carries the CUDA tensors (gradients), gloo the CPU's (barriers,
    objects, sums), so a CPU-only node runs on gloo alone."""
    if not launched():
        yield device
        return
    die_with_parent()  # the launcher starts each rank in a session of its own, out of reach of its signals
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    dist.init_process_group("cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo", timeout=TIMEOUT)
    # After an error, closed only as the process ends, once the error is reported: closing it at once would
    # fail the other ranks, and have the launcher stop this one before it has said what went wrong.
    atexit.register(_close)
    yield device
    _close()


def _close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _active():
        dist.barrier()


@contextlib.contextmanager
def writer_first():
    """Rank 0 runs the block alone, then the others while rank 0 waits: they read what rank 0 wrote there
    (caches), and none of their reads overlaps what rank 0 writes after it. Bad input that rank 0 finds in
    the block stops every rank with the same error (rank 0 reports it; the others do not repeat it)."""
    if is_writer():
        try:
            yield
        except BadInput as e:
            broadcast(e)
            raise
        broadcast(None)
    else:
        problem = broadcast(None)
        if problem is not None:
            raise problem
        yield
    barrier()


def broadcast(obj):
    """Rank 0's `obj`, on every rank: what rank 0 decided or computed alone."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj) -> list | None:
    """Every rank's `obj` in rank order, on rank 0; None on the others."""
    if not _active():
        return [obj]
    out = [None] * dist.get_world_size() if is_writer() else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_sum(values: list[float]) -> list[float]:
    """The sums over ranks of `values` (float64), the same numbers on every rank."""
    if not _active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def data_parallel(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """`model` in DistributedDataParallel when there are several ranks (backward then averages the
    gradients over them), else `model` itself."""
    if not _active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)


def launch(nproc: int, device: str, args: list[str]) -> int:
    """Run `python -m modelcollapse ARGS` as `nproc` ranks on this node, as `torchrun --standalone` does
    (the same launcher, in this process), each on its own GPU when `device` is cuda. Returns the exit code:
    0; 2 when a rank stopped on bad input (it printed the line); 128 + the signal that stopped the launcher;
    else 1."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if launched():
        raise BadInput("--nproc cannot be used inside torchrun, which has already started the processes")
    if device == "cuda" and nproc > torch.cuda.device_count():
        raise BadInput(f"--nproc {nproc} needs a GPU per process; this node has {torch.cuda.device_count()}")

    os.environ["OMP_NUM_THREADS"] = threads_each(nproc)  # the user's choice, else torchrun's habit of 1 per process
    for name in list(logging.root.manager.loggerDict):  # we report failures ourselves (its loggers set their own levels)
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0)
    try:
        elastic_launch(config, sys.executable)("-m", "modelcollapse", *args)
    except SignalException as e:  # Ctrl-C or kill: the launcher has stopped the ranks
        print(f"interrupted ({e.sigval.name}): run the same command again to resume", file=sys.stderr)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        if 2 in codes:
            return 2
        print(f"error: rank(s) {', '.join(map(str, sorted(e.failures)))} failed (exit codes {sorted(codes)})", file=sys.stderr)
        return 1
    return 0
