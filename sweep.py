"""sweep.py: a seed sweep of valdi.py, one run per (dynamics, seed), on Slurm or on this machine.

    python sweep.py --dynamics diffusion mlp --num-seeds 3 --workers 2 --sweep-dir sweeps/lc -- \\
        --pop-size 64 --num-elites 8 --cem-iters 4 --batch-size 64 --total-trajectories 150 --threads 1
    python sweep.py --launcher slurm --partition gpu --time-min 1440 --gpus-per-task 1 --cpus-per-task 8 \\
        --dynamics diffusion mlp --num-seeds 3 --workers 6 --sweep-dir sweeps/paper

Everything after `--` goes to valdi.py unchanged. Each (dynamics, seed) has its folder SWEEP_DIR/<dynamics>__s<seed>/,
whose runs/ holds its valdi.py run: a task starts the run, or resumes it from its checkpoint, so the same command run
again goes on with the unfinished runs and skips the finished ones. On Slurm the tasks are one job array, --workers
at a time. 90 s before a time limit, or on preemption, Slurm sends the task USR2: it stops its valdi.py with SIGTERM
(the run keeps its last checkpoint), waits for it to exit and requeues itself, and the requeued task resumes the run.
Locally, the same tasks run through submitit's local executor, --workers at a time, one GPU each where there are
several. Built on submitit (facebookincubator/submitit); the runs resume bit for bit as valdi.py's own resume does.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import submitit

import valdi

HERE = Path(__file__).resolve().parent
SWEEP_FILE = "sweep.json"  # marks a sweep directory and records the command that made it
SET_BY_THE_SWEEP = ("--dynamics", "--seed", "--runs-dir", "--resume")


class SweepError(Exception):
    """A problem with the sweep's input; reported as one line."""


# --- one task: one (dynamics, seed) run of valdi.py ------------------------------------------
class Task:
    """A submitit job that runs valdi.py for one (dynamics, seed) until its run is done, and that submitit can
    requeue: checkpoint() is what it calls on the requeue signal."""

    def __init__(self, folder: str, flags: list[str], gpu: int | None = None):
        self.folder, self.flags, self.gpu, self.child = folder, flags, gpu, None

    def __getstate__(self) -> dict:  # the running valdi.py does not travel with a requeued task
        return {**self.__dict__, "child": None}

    def __call__(self) -> str:
        folder = Path(self.folder)
        with claim(folder):
            run = run_of(folder)
            where = ["--resume", str(run)] if run else ["--runs-dir", str(folder / "runs")]
            env = None if self.gpu is None else {**os.environ, "CUDA_VISIBLE_DEVICES": str(self.gpu)}
            # Slurm signals every process of the step: valdi.py inherits an ignored USR2 (an ignored signal stays
            # ignored across exec) and is stopped by checkpoint()'s SIGTERM instead, after its last checkpoint.
            self.child = subprocess.Popen([sys.executable, str(HERE / "valdi.py"), *self.flags, *where], env=env,
                                          preexec_fn=lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN))
            # Poll: a blocking Popen.wait() in the main thread would hold the requeue signal's handler off until
            # valdi.py exits on its own.
            while self.child.poll() is None:
                time.sleep(0.2)
            if self.child.returncode != 0:
                raise RuntimeError(f"valdi.py exited with {self.child.returncode} in {folder}")
            return str(run_of(folder))

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """The requeue signal came (a time limit 90 s away, or a preemption): stop valdi.py, whose checkpoint then
        holds the run up to its last finished trajectory, and requeue this task, which will resume it."""
        if self.child is not None and self.child.poll() is None:
            self.child.terminate()
            self.child.wait(timeout=300)
        print(f"sweep.py: requeued {self.folder}: valdi.py stopped with its checkpoint; the requeued task resumes it",
              file=sys.stderr, flush=True)
        return submitit.helpers.DelayedSubmission(Task(self.folder, self.flags, self.gpu))


@contextlib.contextmanager
def claim(folder: Path):
    """Own the task's folder while the task lives (an exclusive lock on FOLDER/task.lock): a second copy of the task
    (a double submission, a node-failure requeue) is refused, also before its run has a first checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "task.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepError(f"{folder} is being run by another task; this copy stops") from None
        yield


def held(folder: Path) -> bool:
    """Whether a task runs in `folder` now."""
    if not (folder / "task.lock").exists():
        return False
    with open(folder / "task.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


def run_of(folder: Path) -> Path | None:
    """The task's valdi.py run: the newest run directory in FOLDER/runs with a checkpoint, or None."""
    runs = sorted(p.parent for p in (folder / "runs").glob(f"*/{valdi.CHECKPOINT_NAME}"))
    return runs[-1] if runs else None


def trajectories_done(folder: Path) -> int:
    run = run_of(folder)
    return 0 if run is None else int(valdi.load_checkpoint(run, required=("counters",))["counters"]["trajectories"])


# --- the sweep -------------------------------------------------------------------------------
def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The sweep's flags, and valdi.py's (everything after `--`), each checked before anything is submitted."""
    split = argv.index("--") if "--" in argv else len(argv)
    parser = valdi.OneLineParser(prog="sweep.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dynamics", nargs="+", default=["diffusion"], help="dynamics to run, each with every seed")
    parser.add_argument("--num-seeds", type=int, default=3, help="seeds per dynamics")
    parser.add_argument("--start-seed", type=int, default=1, help="the first seed")
    parser.add_argument("--workers", type=int, default=2, help="runs at the same time")
    parser.add_argument("--launcher", choices=["local", "slurm"], default="local", help="where the tasks run")
    parser.add_argument("--sweep-dir", default="sweeps/sweep", help="one folder per (dynamics, seed) in here")
    parser.add_argument("--partition", default=None, help="Slurm partition")
    parser.add_argument("--time-min", type=int, default=1440,
                        help="time limit of a task in whole minutes (sbatch --time, submitit's timeout_min)")
    parser.add_argument("--gpus-per-task", type=int, default=1, help="Slurm GPUs per task")
    parser.add_argument("--cpus-per-task", type=int, default=8, help="Slurm CPUs per task")
    parser.add_argument("--max-requeues", type=int, default=20,
                        help="time-limit requeues of a task before it gives up (submitit's default is 3)")
    parser.add_argument("--signal-delay-s", type=int, default=90, help="seconds between the requeue signal and the "
                                                                         "time limit")
    opts, flags = parser.parse_args(argv[:split]), argv[split + 1:]
    for name, low in (("num_seeds", 1), ("workers", 1), ("time_min", 1), ("cpus_per_task", 1),
                      ("gpus_per_task", 0), ("max_requeues", 0), ("signal_delay_s", 1), ("start_seed", 0)):
        if getattr(opts, name) < low:
            raise SweepError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(opts, name)}")
    if opts.signal_delay_s >= 60 * opts.time_min:
        raise SweepError(f"--signal-delay-s {opts.signal_delay_s} leaves no time in --time-min {opts.time_min}")
    for flag in (f for f in flags if f.split("=")[0] in SET_BY_THE_SWEEP):
        raise SweepError(f"{flag} is set by the sweep for each run; leave it out of valdi.py's flags")
    for dynamics in opts.dynamics:  # valdi.py's own check, in its own words (argparse exits with its one line)
        argv = [*flags, "--dynamics", dynamics, "--seed", str(opts.start_seed)]
        try:
            checked = valdi.parse_args(argv)
        except valdi.ValdiError as exc:
            # The replay buffer's memory is checked where the run runs: a cluster node, not this login node.
            if not (opts.launcher == "slurm" and "lower --buffer-size" in str(exc)):
                raise SweepError(f"valdi.py: {exc}") from None
            checked = valdi.parse_args([*argv, "--buffer-size", "1"])
    opts.total_trajectories = checked.total_trajectories
    return opts, flags


def launch(opts: argparse.Namespace, flags: list[str], argv: list[str]) -> int:
    sweep_dir = Path(opts.sweep_dir)
    if sweep_dir.is_dir() and any(sweep_dir.iterdir()) and not (sweep_dir / SWEEP_FILE).is_file():
        raise SweepError(f"{sweep_dir} holds something other than a sweep (no {SWEEP_FILE}); give a new --sweep-dir")
    missing = [c for c in ("sbatch", "srun") if opts.launcher == "slurm" and shutil.which(c) is None]
    if missing:  # submitit's Slurm executor needs both
        raise SweepError(f"--launcher slurm: {' and '.join(missing)} not on PATH (run this on the cluster's "
                         f"login node)")
    seeds = range(opts.start_seed, opts.start_seed + opts.num_seeds)
    folders = [sweep_dir / f"{dynamics}__s{seed}" for dynamics in opts.dynamics for seed in seeds]
    running = [f for f in folders if held(f)]
    if running:
        raise SweepError(f"this sweep is running ({running[0]} has a task): wait for it, or stop it first")
    todo = [(f, [*flags, "--dynamics", f.name.split("__s")[0], "--seed", f.name.split("__s")[1]])
            for f in folders if trajectories_done(f) < opts.total_trajectories]
    sweep_dir.mkdir(parents=True, exist_ok=True)
    # The tasks unpickle this file's Task and import valdi wherever they run (sbatch passes the environment on).
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    record = {"command": ["python", "sweep.py", *argv], "runs": [f.name for f in folders]}
    valdi.atomic_write(sweep_dir / SWEEP_FILE, json.dumps(record, indent=2).encode())
    print(f"{len(folders) - len(todo)} of {len(folders)} runs done; {len(todo)} to run")
    if not todo:
        return 0
    if opts.launcher == "slurm":
        executor = submitit.SlurmExecutor(folder=sweep_dir / "slurm" / "%j", max_num_timeout=opts.max_requeues)
        executor.update_parameters(job_name="valdi-sweep", time=opts.time_min, partition=opts.partition,
                                   gpus_per_task=opts.gpus_per_task or None, cpus_per_task=opts.cpus_per_task,
                                   ntasks_per_node=1, nodes=1, array_parallelism=opts.workers,
                                   signal_delay_s=opts.signal_delay_s)
        with executor.batch():  # one job array
            jobs = [executor.submit(Task(str(folder), argv)) for folder, argv in todo]
        print(f"submitted job array {jobs[0].job_id.split('_')[0]}: {len(jobs)} tasks, {opts.workers} at a time; "
              f"logs in {sweep_dir / 'slurm'}")
        return 0
    gpus = valdi.torch.cuda.device_count()
    executor = submitit.LocalExecutor(folder=sweep_dir / "local" / "%j", max_num_timeout=opts.max_requeues)
    executor.update_parameters(timeout_min=opts.time_min, signal_delay_s=opts.signal_delay_s)
    failed = 0
    for start in range(0, len(todo), opts.workers):  # --workers at a time
        jobs = [executor.submit(Task(str(folder), argv, gpu=k % gpus if gpus > 1 else None))
                for k, (folder, argv) in enumerate(todo[start:start + opts.workers])]
        for job, (folder, _) in zip(jobs, todo[start:start + opts.workers]):
            try:
                print(f"done: {job.result()}")
            except Exception as exc:  # a failed run: the others go on; its log says why
                failed += 1
                print(f"sweep.py: {folder.name} failed ({str(exc).strip().splitlines()[-1][:160]}); "
                      f"log: {job.paths.stderr}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return launch(*parse(argv), argv)
    except (SweepError, valdi.ValdiError) as exc:
        print(f"sweep.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
