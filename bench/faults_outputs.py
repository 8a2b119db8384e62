"""Output faults of `alro train`, injected for real (docs/faults.md):

    python bench/faults_outputs.py --fault disk-full   # root: a small tmpfs in a private mount namespace
    python bench/faults_outputs.py --fault second-run  # two runs into one directory

disk-full: the output directory is a tmpfs of --size-mb (mounted in a private mount namespace
made with `unshare -m`, so nothing outside this process tree sees it; needs root or
CAP_SYS_ADMIN). A tiny 2-epoch run writes its checkpoints and final/; the disk is then filled
but for --free-kb, and a rerun with train.epochs=3 must fail writing the epoch-3 checkpoint with
a clear error, leaving epoch_002, final/ and history.json as they were. With the space freed, a
third run resumes from epoch_002 and finishes. Prints each step's exit code, error line and
seconds.

second-run: a run is started into a directory, a second one into the same directory while the
first trains (refused: time to refusal, its message); the first is then SIGKILLed and a third
run takes its lock over (the warning) and resumes.

Each run is the CLI in a subprocess (its own local Ray), tiny config, 3 steps an epoch.
"""

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TRAIN = [sys.executable, "-m", "alro_ray.cli", "train", "--config", "configs/tiny.yaml", "train.max_steps_per_epoch=3",
         "train.eval_users=6", "train.max_failures=0", "--no-test-summary"]


def tree_digest(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(d).as_posix().encode() + p.read_bytes())
    return h.hexdigest()[:16]


def train(out: Path, *extra: str, wait: bool = True):
    t0 = time.time()
    cmd = [*TRAIN, "--output-dir", str(out), *extra]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), t0
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    return proc, time.time() - t0


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("alro train: error:")]
    return lines[-1] if lines else stderr.strip().splitlines()[-1] if stderr.strip() else ""


def report(step: str, proc, seconds: float) -> None:
    print(f"{step}: exit {proc.returncode}, {seconds:.0f} s; {error_line(proc.stderr)[:600]}", flush=True)


def disk_full(mount: Path, free_kb: int) -> None:
    from alro_ray.train.checkpoints import missing_parts

    out = mount / "run"
    proc, s = train(out)
    report("1. two epochs on the tmpfs", proc, s)
    run = out / "ray" / "tiny"
    sizes = {d.name: sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) for d in sorted(run.glob("epoch_*"))}
    print(f"   checkpoint sizes (bytes): {sizes}; final/ {tree_digest(out / 'final')}", flush=True)
    before = (tree_digest(out / "final"), (out / "history.json").read_bytes(), tree_digest(run / "epoch_002"))
    st = os.statvfs(mount)
    filler = mount / "filler"
    with open(filler, "wb") as f:  # fill all but free_kb
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - free_kb * 1024))
    st = os.statvfs(mount)
    print(f"   filled: {st.f_bavail * st.f_frsize // 1024} KiB free", flush=True)
    proc, s = train(out, "train.epochs=3")
    report("2. rerun, train.epochs=3, disk full", proc, s)
    after = (tree_digest(out / "final"), (out / "history.json").read_bytes(), tree_digest(run / "epoch_002"))
    print(f"   final/ unchanged: {after[0] == before[0]}, history.json unchanged: {after[1] == before[1]}, "
          f"epoch_002 unchanged: {after[2] == before[2]}, epoch_002 complete: {not missing_parts(run / 'epoch_002')}; "
          f"epoch dirs now: {sorted(p.name for p in run.glob('epoch_*'))}; "
          f"epoch_003 missing: {missing_parts(run / 'epoch_003')[:3] if (run / 'epoch_003').exists() else 'absent'}",
          flush=True)
    leftovers = sorted(p.name for p in out.iterdir() if ".tmp" in p.name or ".old" in p.name)
    print(f"   temp leftovers in the run directory: {leftovers}", flush=True)
    filler.unlink()
    proc, s = train(out, "train.epochs=3")
    report("3. rerun with the space freed", proc, s)
    history = json.loads((out / "history.json").read_text())
    print(f"   history epochs {[h['epoch'] for h in history]}, resumed {[h['resumed'] for h in history]}", flush=True)


def second_run(out: Path) -> None:
    first, t0 = train(out, wait=False)
    lock = out / ".alro-run.lock"
    while not (lock.exists() and lock.read_text()):
        if first.poll() is not None:
            raise SystemExit(f"the first run ended early: {first.stderr.read()[-2000:]}")
        time.sleep(0.2)
    print(f"first run holds the lock after {time.time() - t0:.1f} s: {lock.read_text()}", flush=True)
    proc, s = train(out)
    report("second run into the same directory", proc, s)
    time.sleep(20)  # let the first one get into training
    first.send_signal(signal.SIGKILL)
    first.wait()
    print(f"first run SIGKILLed after {time.time() - t0:.0f} s; lock record left: {lock.read_text()}", flush=True)
    proc, s = train(out)
    report("third run after the kill", proc, s)
    took = [line for line in proc.stderr.splitlines() if "taking over the lock" in line]
    print(f"   {took[0][:300] if took else 'no takeover warning'}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fault", choices=("disk-full", "second-run"), required=True)
    ap.add_argument("--size-mb", type=int, default=64)
    ap.add_argument("--free-kb", type=int, default=256)
    ap.add_argument("--inside", help=argparse.SUPPRESS)  # the tmpfs, once mounted
    args = ap.parse_args()
    if args.fault == "second-run":
        second_run(Path(tempfile.mkdtemp(prefix="alro-second-run-")) / "run")
    elif args.inside:
        disk_full(Path(args.inside), args.free_kb)
    else:
        mount = Path(tempfile.mkdtemp(prefix="alro-disk-full-"))
        inner = (f"mount -t tmpfs -o size={args.size_mb}m alro-full {mount} && exec {sys.executable} {Path(__file__)} "
                 f"--fault disk-full --free-kb {args.free_kb} --inside {mount}")
        sys.exit(subprocess.call(["unshare", "-m", "--propagation", "private", "sh", "-c", inner]))


if __name__ == "__main__":
    main()
