"""The fault matrix of issue 10: does `lcr pretrain` survive killed workers and drivers, a corrupt latest
checkpoint and a full disk, and does every bad input end in one line, without a traceback or lost data?

    flock /tmp/lcr-ray.lock env RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/faults.py   # 15 min, 2 cores
    flock /tmp/lcr-ray.lock env RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/faults.py --quick
    ... benchmarks/faults.py --worker-kills 10 --driver-kills 3 --seed 0 --keep   # keep the work folder

Every command is the real `lcr` CLI in a subprocess. The `lcr pretrain` runs join one Ray head that this
script starts (2 CPUs, in a session of its own, stopped by signalling that session): a driver killed with
kill -9 would leave a local Ray instance of its own running beside the next one. Every run trains the
same configuration (tiny CNN, 32 px, 64 synthetic images, global batch 8 over 2 workers: 8 steps per
epoch, a checkpoint every 2 steps), so every survivor's final weights are compared with one
uninterrupted run's: every tensor of every rank's state_dict (`extra.dump_final_weights`), torch.equal.

- worker kills: SIGKILL of a Ray Train worker process (either rank, drawn at random) when rank 0 has
  logged a randomly drawn global step, all in one run with `max_failures` = the number of kills.
- driver kills: SIGKILL of the `lcr pretrain` process at random steps, each followed by the same command
  again; the reruns must continue the same MLflow run, from the newest intact checkpoint on disk.
- corrupt latest checkpoint: a run stopped at a checkpoint (`extra.stop_after_step`), its checkpoint
  file cut to half its size, the run resumed: from the previous checkpoint, with a warning.
- disk full: storage_path on a tmpfs too small for the run's checkpoints (needs root to mount): the run
  must fail in one line and keep an intact checkpoint; once the tmpfs is enlarged the same command
  resumes from it.
- bad inputs: each mistake of issue 10 as a command; it must exit non-zero with one `lcr STEP: error:`
  line (or, for images that do not decode and empty class folders, succeed and name them).

Steps lost = the last step rank 0 logged to MLflow before the kill minus the step the run resumed from
(`resumed_from_step`); a SIGKILLed rank 0 may not have logged its very last step. Tracebacks count
"Traceback" in what a command printed on the terminal, not in the workers' log file. User data: the sha256
of every file of the source images, the shards, an existing data set, a file given as --out and a run's
checkpoints, before and after the bad inputs; and of the training shards before and after everything.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from components import tracking  # noqa: E402
from components.checkpoint import CHECKPOINT_FILE, checkpoint_order, load_checkpoint, newest_readable  # noqa: E402
from components.pretrain import RAY_SNAPSHOT  # noqa: E402
from components.shards import build_shards  # noqa: E402
from components.storage import file_sha256  # noqa: E402
from lcr_core.backbones import build_backbone  # noqa: E402
from tests.conftest import VENV_BIN  # noqa: E402
from tests.services import start_ray_head, stop_session  # noqa: E402
from tests.shard_samples import BAD_JPEG, colour_jpeg  # noqa: E402
from tests.test_pretrain import TINY, same_weights, train_workers, training_run  # noqa: E402

SPEC = {"num_classes": 4, "train_per_class": 16, "test_per_class": 2, "image_size": 32}
STEPS_PER_EPOCH = 8  # 64 images, global batch 8
EVERY = 2  # checkpoint_every_steps
RUN = [*TINY, "loader_workers=0", f"checkpoint_every_steps={EVERY}"]
EXPERIMENT = "lcr"
TRACEBACK = "Traceback (most recent call last)"
START_TIMEOUT_S = 300  # a driver's Ray connection and first step, on 2 busy cores
RUN_TIMEOUT_S = 600
ROOMY = 10  # checkpoints the enlarged tmpfs holds: Ray's 3 and the new one, and the damaged ones left by the full disk
TINY_INIT = "init:demo?backbone=tiny&backbone_weights=null&freeze_stages=0&image_size=32&eval_resize=32"


@dataclass
class Bench:
    root: Path
    shards: Path
    uri: str  # MLflow tracking URI
    address: str  # the Ray head's GCS, for RAY_ADDRESS
    dashboard: str  # the head's state API, which lists the train workers
    epochs: int
    rng: random.Random
    launched: int = 0

    @property
    def total_steps(self) -> int:
        return self.epochs * STEPS_PER_EPOCH

    @property
    def client(self) -> mlflow.MlflowClient:
        return mlflow.MlflowClient(self.uri)


@dataclass
class Fault:
    fault: str
    runs: int  # `lcr pretrain` processes started
    survived: int
    total: int
    lost: list[int] = field(default_factory=list)  # steps lost, one per fault survived
    bit_identical: bool | None = None
    tracebacks: int = 0
    notes: list[str] = field(default_factory=list)
    details: list[dict] = field(default_factory=list)  # one per kill: where it hit and where the run resumed
    skipped: str | None = None
    seconds: float = 0.0


@dataclass
class Command:
    """A finished command: its exit status and what it printed."""

    name: str
    returncode: int
    out: str
    err: str

    @property
    def tracebacks(self) -> int:
        return (self.out + self.err).count(TRACEBACK)

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("lcr ") and ": error: " in line]


# ---------------------------------------------------------------------------------------------
# Processes

def command_env(**variables: str) -> dict[str, str]:
    """This environment without a RAY_ADDRESS of its own (commands join the bench's head or none)."""
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    return env | {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"} | variables


def launch(bench: Bench, name: str, *argv: str) -> subprocess.Popen:
    """`lcr ARGV` joined to the bench's Ray head and MLflow store, printing to logs/NAME.{out,err}."""
    logs = bench.root / "logs"
    logs.mkdir(exist_ok=True)
    env = command_env(MLFLOW_TRACKING_URI=bench.uri, RAY_ADDRESS=bench.address)
    with open(logs / f"{name}.out", "w") as out, open(logs / f"{name}.err", "w") as err:
        return subprocess.Popen([str(VENV_BIN / "lcr"), *argv], stdout=out, stderr=err, env=env, cwd=bench.root,
                                start_new_session=True)


def pretrain(bench: Bench, name: str, *overrides: str) -> subprocess.Popen:
    bench.launched += 1
    return launch(bench, name, "pretrain", *RUN, f"shards={bench.shards}", f"epochs={bench.epochs}",
                  f"storage_path={bench.root / 'runs'}", *overrides)


def finish(bench: Bench, name: str, proc: subprocess.Popen, timeout: float = RUN_TIMEOUT_S) -> Command:
    """Wait for a command (SIGKILLed after `timeout` s) and read what it printed."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    logs = bench.root / "logs"
    return Command(name, proc.returncode, (logs / f"{name}.out").read_text(), (logs / f"{name}.err").read_text())


def wait_until(condition, timeout: float, proc: subprocess.Popen | None = None):
    """`condition()`'s first truthy value, polled every 0.2 s; None if `proc` ends or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (proc is None or proc.poll() is None):
        if value := condition():
            return value
        time.sleep(0.2)
    return None


def now_ms() -> int:
    return int(1000 * time.time())


# ---------------------------------------------------------------------------------------------
# What a run left in MLflow and its folder

def dump_extra(bench: Bench, run_name: str, **hooks) -> str:
    hooks = {"dump_final_weights": str(bench.root / "weights" / run_name), **hooks}
    return "extra=" + json.dumps(hooks)


def steps_logged_since(bench: Bench, run_id: str, since_ms: int) -> int:
    """The highest global step rank 0 logged a loss for after `since_ms`."""
    return max((m.step for m in bench.client.get_metric_history(run_id, "loss") if m.timestamp > since_ms),
               default=0)


def step_at(bench: Bench, run_id: str, since_ms: int, killed_ms: int) -> int:
    """The last step rank 0 logged before a kill (and after `since_ms`: the previous kill or the launch)."""
    return max((m.step for m in bench.client.get_metric_history(run_id, "loss")
                if since_ms < m.timestamp <= killed_ms), default=0)


def resumed_steps(bench: Bench, run_id: str) -> list[int]:
    """The step of every resume of the run, oldest first."""
    found = bench.client.get_metric_history(run_id, "resumed_from_step")
    return [int(m.value) for m in sorted(found, key=lambda m: m.timestamp)]


def resumed_after(bench: Bench, run_id: str, kill_times: list[int]) -> list[int]:
    """For each kill (times in ms, in order), the step the run resumed from before the next kill; 0 where
    it logged no resume: it started again from step 0."""
    found = bench.client.get_metric_history(run_id, "resumed_from_step")
    windows = zip(kill_times, [*kill_times[1:], now_ms()])
    return [min((int(m.value) for m in found if start < m.timestamp <= end), default=0) for start, end in windows]


def runs_named(bench: Bench, run_name: str) -> list:
    experiment = bench.client.get_experiment_by_name(EXPERIMENT)
    return bench.client.search_runs([experiment.experiment_id], f"tags.`lcr.run_name` = '{run_name}'")


def newest_intact_step(run_dir: Path) -> int | None:
    found = newest_readable(os.listdir(run_dir), lambda name: load_checkpoint(run_dir / name), lambda _: None)
    return None if found is None else found[1]["progress"]["global_step"]


def snapshot_newest_step(run_dir: Path) -> int | None:
    """The newest checkpoint that Ray's snapshot lists: the one Ray resumes from."""
    try:
        listed = json.loads((run_dir / RAY_SNAPSHOT).read_text())["checkpoint_results"]
    except (OSError, ValueError, KeyError):
        return None
    steps = [checkpoint_order(entry["checkpoint_dir_name"]) for entry in listed]
    return max((order[0] for order in steps if order), default=None)


def final_weights(bench: Bench, run_name: str) -> list[dict[str, torch.Tensor]]:
    folder = bench.root / "weights" / run_name
    return [torch.load(folder / f"rank{rank}.pt", weights_only=True) for rank in range(2)]


def matches(bench: Bench, run_name: str, reference: list[dict]) -> bool:
    folder = bench.root / "weights" / run_name
    return all((folder / f"rank{rank}.pt").is_file() for rank in range(2)) and same_weights(folder, reference)


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (or of `path` itself), by relative name."""
    if path.is_file():
        return {".": file_sha256(path)}
    return {str(p.relative_to(path)): file_sha256(p) for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Training faults

def reference_run(bench: Bench) -> tuple[list[dict], Command]:
    name = "uninterrupted"
    command = finish(bench, name, pretrain(bench, name, f"run_name={name}", dump_extra(bench, name)))
    if command.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed ({command.returncode}): {command.err[-2000:]}")
    return final_weights(bench, name), command


def random_steps(bench: Bench, count: int) -> list[int]:
    """`count` distinct global steps, leaving out the first and the last two (the model is logged then)."""
    return sorted(bench.rng.sample(range(2, bench.total_steps - 1), count))


def worker_kills(bench: Bench, count: int, reference: list[dict]) -> Fault:
    name, started = "worker-kills", time.monotonic()
    fault = Fault(f"worker SIGKILL (max_failures={count})", 1, 0, count)
    proc = pretrain(bench, name, f"run_name={name}", f"max_failures={count}", dump_extra(bench, name))
    run_id = wait_until(lambda: training_run(bench.client, name), START_TIMEOUT_S, proc)
    kills: list[tuple[int, int]] = []  # (pid, time in ms)
    for target in random_steps(bench, count):
        if run_id is None or not kill_a_worker_at(bench, run_id, target, proc, kills):
            break
    command = finish(bench, name, proc)
    fault.tracebacks = command.tracebacks
    resumes = resumed_after(bench, run_id, [killed_ms for _, killed_ms in kills]) if run_id else []
    for index, ((pid, killed_ms), resumed) in enumerate(zip(kills, resumes)):
        fault.survived += command.returncode == 0
        since = kills[index - 1][1] if index else 0
        at_step = step_at(bench, run_id, since, killed_ms)
        fault.lost.append(at_step - resumed)
        fault.details.append({"pid": pid, "at_step": at_step, "resumed_from": resumed})
        if f"process {pid} " not in command.err:
            fault.notes.append(f"kill {index + 1}: pid {pid} not named on the terminal")
    if len(kills) < count:
        fault.notes.append(f"only {len(kills)} of {count} kills made (the run ended or stalled first)")
    if command.returncode != 0:
        fault.notes.append(f"exit {command.returncode}: {last_line(command.err)}")
    fault.bit_identical = command.returncode == 0 and matches(bench, name, reference)
    fault.seconds = time.monotonic() - started
    return fault


def kill_a_worker_at(bench: Bench, run_id: str, target: int, proc: subprocess.Popen,
                     kills: list[tuple[int, int]]) -> bool:
    """SIGKILL a train worker once rank 0 has logged `target` since the previous kill (or a later step,
    when the previous kill left the run beyond it); False if the run ended or stalled first."""
    since = kills[-1][1] if kills else 0
    reached = wait_until(lambda: steps_logged_since(bench, run_id, since) >= target, START_TIMEOUT_S, proc)
    pids = wait_until(lambda: len(found := train_workers(bench.dashboard)) == 2 and found, 60, proc)
    if not (reached and pids):
        return False
    victim = bench.rng.choice(sorted(pids))
    os.kill(victim, signal.SIGKILL)
    kills.append((victim, now_ms()))
    return True


@dataclass
class DriverKill:
    killed_ms: int
    at_step: int  # the last step logged before the kill
    on_disk: int | None  # the newest intact checkpoint's step once the workers were gone
    listed: int | None  # the newest checkpoint Ray's snapshot listed then


def driver_kills(bench: Bench, count: int, reference: list[dict]) -> Fault:
    name, started = "driver-kills", time.monotonic()
    fault = Fault("driver SIGKILL, same command rerun", count + 1, 0, count)
    argv = [f"run_name={name}", dump_extra(bench, name)]
    commands, kills, previous = [], [], 0
    for index, target in enumerate(random_steps(bench, count)):
        launch_name = f"{name}-{index + 1}"
        proc = pretrain(bench, launch_name, *argv)
        kill = kill_the_driver_at(bench, name, max(target, previous + 1), proc)
        commands.append(finish(bench, launch_name, proc))
        if kill is None:
            fault.notes.append(f"launch {index + 1} ended before its kill: {last_line(commands[-1].err)}")
            break
        kills.append(kill)
        previous = kill.at_step
    last = finish(bench, f"{name}-{len(commands) + 1}", pretrain(bench, f"{name}-{len(commands) + 1}", *argv))
    commands.append(last)
    fault.runs = len(commands)
    fault.tracebacks = sum(command.tracebacks for command in commands)
    runs = runs_named(bench, name)
    resumes = resumed_after(bench, runs[0].info.run_id, [kill.killed_ms for kill in kills]) if len(runs) == 1 else []
    if len(runs) != 1:
        fault.notes.append(f"{len(runs)} MLflow runs for one training run (expected the same run continued)")
    finished = len(runs) == 1 and runs[0].info.status == "FINISHED" and last.returncode == 0
    for index, (kill, resumed) in enumerate(zip(kills, resumes)):
        if "continuing MLflow run" not in commands[index + 1].out:
            fault.notes.append(f"kill {index + 1}: the rerun did not continue the MLflow run")
            continue
        if kill.on_disk is not None and resumed < kill.on_disk:
            fault.notes.append(f"kill {index + 1} at step {kill.at_step}: resumed from {resumed}, though checkpoint "
                               f"{kill.on_disk} was intact on disk (Ray's snapshot listed {kill.listed})")
        fault.survived += finished and (resumed > 0 or kill.on_disk is None)
        fault.lost.append(kill.at_step - resumed)
        fault.details.append(asdict(kill) | {"resumed_from": resumed})
    if not finished:
        fault.notes.append(f"last rerun: exit {last.returncode}, MLflow {[r.info.status for r in runs]}: "
                           f"{last_line(last.err)}")
    fault.bit_identical = finished and matches(bench, name, reference)
    fault.seconds = time.monotonic() - started
    return fault


def kill_the_driver_at(bench: Bench, run_name: str, target: int, proc: subprocess.Popen) -> DriverKill | None:
    """SIGKILL the driver once rank 0 has logged `target` in this launch; then, once Ray has ended the
    job's workers, what the run folder holds."""
    launched = now_ms()
    run_id = wait_until(lambda: training_run(bench.client, run_name), START_TIMEOUT_S, proc)
    if run_id is None or not wait_until(lambda: steps_logged_since(bench, run_id, launched) >= target,
                                        START_TIMEOUT_S, proc):
        return None
    proc.kill()
    killed_ms = now_ms()
    proc.wait()
    wait_until(lambda: not train_workers(bench.dashboard), 60)
    run_dir = bench.root / "runs" / run_name
    return DriverKill(killed_ms, step_at(bench, run_id, launched, killed_ms), newest_intact_step(run_dir),
                      snapshot_newest_step(run_dir))


def corrupt_latest(bench: Bench, reference: list[dict]) -> Fault:
    name, started = "corrupt", time.monotonic()
    fault = Fault("corrupt latest checkpoint (cut to half)", 2, 0, 1)
    stop = EVERY * bench.rng.randrange(2, bench.total_steps // EVERY - 1)
    first = finish(bench, f"{name}-1", pretrain(bench, f"{name}-1", f"run_name={name}",
                                                dump_extra(bench, name, stop_after_step=stop)))
    damaged = bench.root / "runs" / name / f"checkpoint_{stop:08d}" / CHECKPOINT_FILE
    if first.returncode != 0 or not damaged.is_file():
        fault.notes.append(f"the stopped run failed: {last_line(first.err)}")
        return fault
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    second = finish(bench, f"{name}-2", pretrain(bench, f"{name}-2", f"run_name={name}", dump_extra(bench, name)))
    fault.tracebacks = first.tracebacks + second.tracebacks
    run = runs_named(bench, name)[0]  # the newest: the resumed one
    resumes = resumed_steps(bench, run.info.run_id)
    warned = "truncated or corrupt" in second.err and "lcr.warning.skipped_checkpoint" in run.data.tags
    if second.returncode == 0 and resumes == [stop - EVERY] and warned:
        fault.survived, fault.lost = 1, [stop - resumes[0]]
    else:
        fault.notes.append(f"exit {second.returncode}, resumed from {resumes} (expected [{stop - EVERY}]), "
                           f"warned: {warned}")
    fault.notes.append(f"stopped at step {stop}; that checkpoint cut to half")
    fault.bit_identical = second.returncode == 0 and matches(bench, name, reference)
    fault.seconds = time.monotonic() - started
    return fault


def disk_full(bench: Bench, reference: list[dict], checkpoint_bytes: int) -> Fault:
    """storage_path on a tmpfs that holds 2.5 checkpoints (Ray keeps 3), then enlarged to hold ROOMY."""
    name, started = "disk-full", time.monotonic()
    fault = Fault("disk full (tmpfs storage_path)", 0, 0, 1)
    folder = bench.root / "small-disk"
    folder.mkdir()
    size = int(2.5 * checkpoint_bytes)
    skipped = mount_tmpfs(folder, size)
    if skipped:
        fault.skipped = skipped
        return fault
    try:
        argv = [f"run_name={name}", f"storage_path={folder}", dump_extra(bench, name)]
        first = finish(bench, f"{name}-1", pretrain(bench, f"{name}-1", *argv))
        kept = newest_intact_step(folder / name) if (folder / name).is_dir() else None
        remount = subprocess.run(["mount", "-o", f"remount,size={ROOMY * checkpoint_bytes}", str(folder)],
                                 capture_output=True, text=True, check=False)
        second = finish(bench, f"{name}-2", pretrain(bench, f"{name}-2", *argv))
    finally:
        subprocess.run(["umount", str(folder)], check=False)
    fault.runs, fault.tracebacks = 2, first.tracebacks + second.tracebacks
    one_line = first.returncode != 0 and len(first.error_lines) == 1
    resumes = resumed_steps(bench, runs_named(bench, name)[0].info.run_id)
    fault.notes.append(f"tmpfs of {size} bytes; full run: exit {first.returncode}, {last_line(first.err)!r}; "
                       f"newest intact checkpoint left: {kept}; after enlarging it (mount rc {remount.returncode}) "
                       f"the rerun resumed from {resumes}, exit {second.returncode}")
    if one_line and kept and second.returncode == 0 and resumes == [kept]:
        fault.survived = 1
    fault.bit_identical = second.returncode == 0 and matches(bench, name, reference)
    fault.seconds = time.monotonic() - started
    return fault


def mount_tmpfs(folder: Path, size: int) -> str | None:
    """Mount a tmpfs of `size` bytes on `folder`; the reason when that cannot be done."""
    if os.geteuid() != 0:
        return f"skipped: mounting a tmpfs needs root (this runs as uid {os.geteuid()})"
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        return f"skipped: mount -t tmpfs failed ({last_line(mounted.stderr)})"
    return None


def checkpoint_size(run_dir: Path) -> int:
    newest = max((p for p in run_dir.glob("checkpoint_0*") if p.is_dir()), key=lambda p: checkpoint_order(p.name))
    return sum(p.stat().st_size for p in newest.rglob("*") if p.is_file())


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


# ---------------------------------------------------------------------------------------------
# Bad inputs

@dataclass
class BadInput:
    case: str
    argv: list[str]
    expect: str  # text the output must hold: the error's gist, or the warning of a build that succeeds
    succeeds: bool = False  # a build that leaves out what it cannot use, and says so


def bad_inputs(bench: Bench) -> list[BadInput]:
    """The mistakes of issue 10, each with the files it needs (made here, under bench.root/inputs)."""
    inputs = bench.root / "inputs"
    images, empty_class = inputs / "images", inputs / "empty-class"
    for folder, files in ((images, {"finch/good.jpg": colour_jpeg(1, 64), "finch/cut.jpg": colour_jpeg(2, 64)[:300],
                                    "wren/good.jpg": colour_jpeg(3, 64), "wren/junk.jpg": BAD_JPEG}),
                          (empty_class, {"finch/a.jpg": colour_jpeg(4), "wren/b.jpg": colour_jpeg(5)})):
        for relative, data in files.items():
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            (folder / relative).write_bytes(data)
    (empty_class / "robin").mkdir()
    build_shards("synthetic", str(inputs / "other-set"), options=SPEC | {"num_classes": 3}, progress=False)
    build_shards("synthetic", str(inputs / "no-manifest"), options=SPEC, progress=False)
    (inputs / "no-manifest" / "test" / "manifest.json").unlink()
    mixed_classes(inputs / "mixed")
    (inputs / "a-file").write_bytes(b"keep me")
    torch.save({"features.0.0.weight": torch.zeros(16, 3, 3, 3)} | {k: v for k, v in build_backbone("tiny")
               .state_dict().items() if k != "features.0.0.weight"}, inputs / "narrow.pt")
    train = [*RUN, f"shards={bench.shards}", f"epochs={bench.epochs}", f"storage_path={bench.root / 'runs'}"]
    build = ["shards", "build", "--source", "imagefolder", "--root"]
    return [
        BadInput("garbage and truncated JPEGs", [*build, str(images), "--out", str(inputs / "out-images")],
                 "undecodable image, left out", succeeds=True),
        BadInput("empty class folder", [*build, str(empty_class), "--out", str(inputs / "out-empty")],
                 "has no images", succeeds=True),
        BadInput("--out holds another data set", [*build, str(images), "--out", str(inputs / "other-set")],
                 "--overwrite"),
        BadInput("--out is a file", [*build, str(images), "--out", str(inputs / "a-file")], "is a file"),
        BadInput("verify: a split without its manifest", ["shards", "verify", str(inputs / "no-manifest")],
                 "split test has no manifest.json"),
        BadInput("batch larger than the data set", ["pretrain", *train, "run_name=bad-batch", "batch_size=128",
                                                    "queue_size=128"], "fewer than one global batch"),
        BadInput("missing weights file", ["pretrain", *train, "run_name=bad-weights",
                                          f"backbone_weights={inputs / 'missing.pt'}"], "no such file"),
        BadInput("weights of another shape", ["pretrain", *train, "run_name=bad-weights",
                                              f"backbone_weights={inputs / 'narrow.pt'}"], "features.0.0.weight"),
        BadInput("wrong variant on resume", ["pretrain", *train, "run_name=uninterrupted", "variant=moco"],
                 "was written with variant='lcr'"),
        BadInput("unwritable storage_path", ["pretrain", *train, "run_name=bad-storage",
                                             f"storage_path={inputs / 'a-file' / 'runs'}"], "cannot be written"),
        BadInput("empty path (shards=)", ["pretrain", *train, "run_name=bad-path", "shards="], "shards"),
        BadInput("empty path (storage_path=' ')", ["pretrain", *train, "run_name=bad-path", "storage_path= "],
                 "storage_path"),
        BadInput("NaN value (lr=.nan)", ["pretrain", *train, "run_name=bad-nan", "lr=.nan"], "finite"),
        BadInput("inf value (momentum=.inf)", ["pretrain", *train, "run_name=bad-inf", "momentum=.inf"], "momentum"),
        BadInput("misspelt field (epoch=3)", ["pretrain", *train, "epoch=3"], "unknown field 'epoch'"),
        BadInput("too many workers (4 on 2 CPUs)", ["pretrain", *train, "run_name=bad-workers", "num_workers=4"],
                 "do not fit the Ray cluster"),
        BadInput("NaN loss (lr=1e6)", ["pretrain", *train, "run_name=bad-lr", "lr=1e6"], "diverged"),
        BadInput("probe: train and test class lists differ",
                 ["probe", "--model", TINY_INIT, "--shards", str(inputs / "mixed"), "--fractions", "1.0"],
                 "different class lists"),
    ]


def mixed_classes(out: Path) -> None:
    """A train split of 4 classes beside a test split of 3, copied by hand from two builds."""
    build_shards("synthetic", str(out), options=SPEC, splits=["train"], progress=False)
    build_shards("synthetic", str(out.with_name("three")), options=SPEC | {"num_classes": 3}, splits=["test"],
                 progress=False)
    (out.with_name("three") / "test").rename(out / "test")


def protected(bench: Bench) -> list[Path]:
    """What belongs to the user: sources, shards, an existing data set, a file, a run's checkpoints."""
    inputs = bench.root / "inputs"
    return [bench.shards, inputs / "images", inputs / "empty-class", inputs / "other-set", inputs / "no-manifest",
            inputs / "mixed", inputs / "a-file", bench.root / "runs" / "uninterrupted"]


def run_bad_inputs(bench: Bench) -> tuple[list[dict], list[str]]:
    """Each bad input's outcome, and the user files it changed."""
    cases = bad_inputs(bench)
    before = {path: tree_digest(path) for path in protected(bench)}
    results = []
    for index, case in enumerate(cases):
        name = f"bad-{index + 1:02d}"
        command = finish(bench, name, launch(bench, name, *case.argv), timeout=300)
        results.append(judge(case, command))
        print(f"  {case.case}: exit {command.returncode}, {'ok' if results[-1]['ok'] else 'NOT OK'}", flush=True)
    changed = [str(path) for path in protected(bench) if tree_digest(path) != before[path]]
    return results, changed


def judge(case: BadInput, command: Command) -> dict:
    printed = command.out + command.err
    if case.succeeds:
        ok = command.returncode == 0 and case.expect in printed
        message = next((line for line in printed.splitlines() if case.expect in line), last_line(command.err))
    else:
        ok = command.returncode != 0 and len(command.error_lines) == 1 and case.expect in command.error_lines[0]
        message = command.error_lines[0] if command.error_lines else last_line(command.err)
    return {"case": case.case, "command": shlex.join(["lcr", *case.argv]), "exit": command.returncode,
            "expected": "exit 0, names them" if case.succeeds else "exit != 0, one line",
            "ok": ok and not command.tracebacks, "tracebacks": command.tracebacks, "message": message}


# ---------------------------------------------------------------------------------------------
# Report

def table(faults: list[Fault], bad: list[dict], changed: list[str], data_changed: bool) -> str:
    lines = ["| fault | runs | survived / total | steps lost max / mean | bit-identical | tracebacks |",
             "|---|---|---|---|---|---|"]
    for fault in faults:
        if fault.skipped:
            lines.append(f"| {fault.fault} | 0 | {fault.skipped} | | | |")
            continue
        lost = f"{max(fault.lost)} / {sum(fault.lost) / len(fault.lost):.1f}" if fault.lost else "–"
        identical = "–" if fault.bit_identical is None else "yes" if fault.bit_identical else "**no**"
        lines.append(f"| {fault.fault} | {fault.runs} | {fault.survived} / {fault.total} | {lost} | {identical} | "
                     f"{fault.tracebacks} |")
    ok = sum(result["ok"] for result in bad)
    lines.append(f"| bad inputs (one line, or a build that names what it left out) | {len(bad)} | {ok} / {len(bad)} "
                 f"| | | {sum(result['tracebacks'] for result in bad)} |")
    lines.append(f"\nA checkpoint every {EVERY} steps (so ≤ {EVERY} steps lost is ≤ 1 interval). User data changed by "
                 f"the bad inputs: {', '.join(changed) or 'none'}; training shards changed by the runs: "
                 f"{'yes' if data_changed else 'no'}.")
    lines += ["", "| bad input | exit | ok | message |", "|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['exit']} | {'yes' if r['ok'] else '**no**'} | "
              f"{r['message'].replace('|', '/')[:160]} |" for r in bad]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker-kills", type=int, default=10)
    parser.add_argument("--driver-kills", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4, help=f"of {STEPS_PER_EPOCH} steps, for every run")
    parser.add_argument("--seed", type=int, default=0, help="draws the steps and the workers to kill")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 worker kills, 1 driver kill, 2 epochs")
    parser.add_argument("--out", type=Path, default=Path("docs/faults"), help="writes OUT.json and OUT.md")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, runs, MLflow store)")
    args = parser.parse_args()
    if args.quick:
        args.worker_kills, args.driver_kills, args.epochs = 2, 1, 2
    root = Path(tempfile.mkdtemp(prefix="lcr-faults-"))
    try:
        return benchmark(args, root)
    finally:
        if args.keep:
            print(f"work folder kept: {root}")
        else:
            subprocess.run(["rm", "-rf", str(root)], check=False)


def benchmark(args: argparse.Namespace, root: Path) -> int:
    started = time.monotonic()
    shards = root / "shards"
    build_shards("synthetic", str(shards), options=SPEC, splits=["train"], progress=False)
    shards_digest = tree_digest(shards)
    uri = f"sqlite:///{root}/mlflow.db"
    tracking.prepare_experiment(uri, EXPERIMENT)  # one process migrates a fresh store
    head, address, dashboard = start_ray_head(root, command_env())
    try:
        bench = Bench(root, shards, uri, address, dashboard, args.epochs, random.Random(args.seed))
        reference, _ = reference_run(bench)
        print(f"uninterrupted run: {time.monotonic() - started:.0f} s", flush=True)
        faults = [worker_kills(bench, args.worker_kills, reference), driver_kills(bench, args.driver_kills, reference),
                  corrupt_latest(bench, reference),
                  disk_full(bench, reference, checkpoint_size(root / "runs" / "uninterrupted"))]
        for fault in faults:
            print(f"{fault.fault}: {fault.survived}/{fault.total}, lost {fault.lost}, bit-identical "
                  f"{fault.bit_identical}, {fault.seconds:.0f} s; {'; '.join(fault.notes)}", flush=True)
        bad, changed = run_bad_inputs(bench)
    finally:
        left = stop_session(head)
    data_changed = tree_digest(shards) != shards_digest
    wall = time.monotonic() - started
    markdown = table(faults, bad, changed, data_changed)
    print("\n" + markdown + f"\n\nwall time {wall / 60:.1f} min; Ray processes left: {len(left)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"seed": args.seed, "epochs": args.epochs, "steps_per_epoch": STEPS_PER_EPOCH,
              "checkpoint_every_steps": EVERY, "config": [*RUN, f"epochs={args.epochs}"],
              "faults": [asdict(fault) for fault in faults], "bad_inputs": bad,
              "user_data_changed": changed, "training_shards_changed": data_changed, "wall_s": round(wall),
              "launched_pretrain": bench.launched, "ray_processes_left": len(left)}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown + "\n")
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
