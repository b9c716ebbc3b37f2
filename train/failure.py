"""Fail fast: a failure anywhere ends the whole job at once, with one line (issue 19).

Every rank runs train/run.py's main through `run`:

- An exception in any phase writes its full traceback to `{out}/error-rank{R}.log` (to stderr while
  the run folder is not known yet), kills the rank's data-loader workers and leaves with os._exit:
  no collective, no destroy_process_group (it can wait on a peer that will never come), no interpreter
  teardown (it joined loader workers that ignore SIGTERM: the hang of issue 19). The launcher sees the
  non-zero exit and terminates the other ranks; a rank blocked in a collective with the dead one gets a
  connection error at once, or at worst the collective timeout (`collective_timeout`).
- The first rank to fail claims `{out}/error.txt` (O_EXCL) and prints the job's one line,
  `error: rank R failed first: <Type>: <message> (traceback: {out}/error-rankR.log)`. Ranks failing
  after it (mostly of the connection its exit reset) keep their tracebacks in their own logs and print
  nothing. Exit codes: 2 for ConfigError / DataError (the message alone: it names the file or field),
  1 for anything else.
- A rank that finishes (any exit code from main) runs the exit hooks and leaves with os._exit as
  well (`leave`): the interpreter's module teardown cost 1.8 s per process and saves nothing.
- SIGTERM / SIGINT inside the training loop keep the existing stop: a checkpoint at the next step
  boundary, exit 0. Anywhere else (start-up, export, teardown) the rank exits at once with 128 + the
  signal, nothing saved. A second signal (more than `SIGNAL_REPEAT_S` after the first: a launcher
  forwarding the signal its process group also got is the same request), or a stop still unfinished
  `DCD_STOP_TIMEOUT_S` (120) seconds after the signal, exits at once without saving. Signals are
  noticed by a thread woken through signal.set_wakeup_fd, so a main thread stuck in C code (a
  collective, a loader queue) does not delay them.

`fault_point(phase)` is the test-only fault hook: `DCD_FAULT=PHASE[@RANKS][#N][:hang]` raises
InjectedFault (or, with `:hang`, sleeps for ever: a rank alive but stuck) the N-th time (default 1) a
rank in RANKS (`all` or a comma list, default all) reaches PHASE. It prints `[fault] PHASE on rank R
at <unix time>` to stderr first, so tests can time the job's end from the fault.
"""
from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path

PHASES = ("startup", "data", "forward", "teacher", "loss", "backward", "validation", "save", "export",
          "teardown")
FAULT_ENV = "DCD_FAULT"
STOP_TIMEOUT_ENV = "DCD_STOP_TIMEOUT_S"
COLLECTIVE_TIMEOUT_ENV = "DCD_COLLECTIVE_TIMEOUT_S"
GLOO_COLLECTIVE_TIMEOUT_S = 120
SIGNAL_REPEAT_S = 2.0
FIRST_FAILURE = "error.txt"


class InjectedFault(RuntimeError):
    """Raised by fault_point where DCD_FAULT asks for it (tests only)."""


class _State:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    out: Path | None = None
    in_loop = False
    stop_requested = False
    stop_reason = ""
    first_signal_at: float | None = None


STATE = _State()


# ----------------------------------------------------------------------------- context

def set_run(out) -> None:
    """Where failures are written. Every rank calls it before the process group starts (so before
    any peer can fail); rank 0 clears what a failed run left in the same folder."""
    STATE.out = Path(out)
    if STATE.rank == 0:
        for old in [STATE.out / FIRST_FAILURE, *STATE.out.glob("error-rank*.log")]:
            old.unlink(missing_ok=True)


def enter_training_loop() -> None:
    STATE.in_loop = True


def leave_training_loop() -> None:
    STATE.in_loop = False


def collective_timeout(backend: str) -> timedelta | None:
    """The process group's collective timeout: DCD_COLLECTIVE_TIMEOUT_S, else 120 s on gloo (CPU: a
    peer that is alive but never joins must not hold the job for DeepSpeed's 30 minutes), else None
    (DeepSpeed's default, for NCCL)."""
    seconds = os.environ.get(COLLECTIVE_TIMEOUT_ENV)
    if seconds:
        return timedelta(seconds=float(seconds))
    return timedelta(seconds=GLOO_COLLECTIVE_TIMEOUT_S) if backend == "gloo" else None


# ----------------------------------------------------------------------------- fault hook

_arrivals: dict = {}


def parse_fault(spec: str) -> tuple[str, set | None, int, bool]:
    """`PHASE[@RANKS][#N][:hang]` -> (phase, ranks or None for all, n, hang)."""
    rest, _, mode = spec.strip().partition(":")
    if mode not in ("", "hang"):
        raise ValueError(f"{FAULT_ENV}={spec!r}: unknown mode {mode!r}; use ':hang' or nothing")
    rest, _, nth = rest.partition("#")
    phase, _, ranks = rest.partition("@")
    if phase not in PHASES:
        raise ValueError(f"{FAULT_ENV}={spec!r}: unknown phase {phase!r}; use one of {PHASES}")
    chosen = None if ranks in ("", "all") else {int(r) for r in ranks.split(",")}
    return phase, chosen, int(nth) if nth else 1, mode == "hang"


def fault_point(phase: str) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    wanted, ranks, nth, hang = parse_fault(spec)
    rank = int(os.environ.get("RANK", STATE.rank))
    if phase != wanted or (ranks is not None and rank not in ranks):
        return
    _arrivals[phase] = _arrivals.get(phase, 0) + 1
    if _arrivals[phase] == nth:
        print(f"[fault] {phase} on rank {rank} at {time.time():.3f}", file=sys.stderr, flush=True)
        while hang:
            time.sleep(1)
        raise InjectedFault(f"injected fault in {phase} ({FAULT_ENV})")


# ----------------------------------------------------------------------------- exiting

class ReportedError(ValueError):
    """An error whose one-line message is the whole report (a bad flag, config, file or field): no
    type prefix, no traceback, exit 2. train.config.ConfigError and train.data.DataError derive from
    it, so this module needs neither of them (data.py imports this one for its fault point)."""


def one_line(error: BaseException) -> str:
    """`Type: message`, first line; the original error of one re-raised from a loader worker."""
    text = str(error).strip()
    if "\nOriginal Traceback" in text:  # torch's re-raise of a worker's exception: its last line
        text = text.splitlines()[-1].split(": ", 1)[-1]
    text = text.splitlines()[0] if text else ""
    if isinstance(error, ReportedError):
        return text or type(error).__name__
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# How long a claim made before the run folder was known counts (the claim file of another job that
# happened to have the same launcher pid and port is older than this).
EARLY_CLAIM_S = 120


def _early_claim_path() -> Path | None:
    """Before the run folder is known (the config and preflight checks, which every rank runs and
    fails alike), the ranks of one launcher on this node claim the one line through a file named by
    the launcher's pid and port: the first to fail prints (the launcher stops the others at once,
    so waiting for rank 0 could print nothing)."""
    if STATE.world == 1:
        return None
    import tempfile
    name = f"dcd-first-failure-{os.getppid()}-{os.environ.get('MASTER_PORT', '')}"
    path = Path(tempfile.gettempdir()) / name
    try:
        if time.time() - path.stat().st_mtime > EARLY_CLAIM_S:
            path.unlink()
    except OSError:
        pass
    return path


def _claim_first(line: str) -> bool:
    """Whether this rank is the first of the job to fail or stop (it then prints the line)."""
    claim = STATE.out / FIRST_FAILURE if STATE.out is not None else _early_claim_path()
    if claim is None:
        return True
    try:
        claim.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    except OSError:
        return True
    with os.fdopen(fd, "w") as f:
        f.write(line + "\n")
    return True


def kill_children() -> None:
    """SIGKILL this process's children (its data-loader workers, which ignore SIGTERM) and reap them."""
    try:
        import psutil
        children = psutil.Process().children(recursive=True)
        for child in children:
            try:
                child.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(children, timeout=2)
    except Exception:
        pass


_exiting = threading.Lock()


def exit_now(code: int, what: str, details: str = "") -> None:
    """Record, print (first rank only), clean up and leave without any collective or teardown.
    One thread does it: a signal arriving meanwhile (the launcher tearing the job down) waits."""
    _exiting.acquire()
    rank = STATE.rank
    # Before the run folder is known (the config and preflight checks) every rank fails alike: no "who".
    who = f"rank {rank} failed first" if STATE.world > 1 and STATE.out is not None else ""
    if what.startswith("stopped: "):
        line = what
    else:
        line = f"error: {who + ': ' if who else ''}{what}"
    log = None
    if details and STATE.out is not None:
        log = STATE.out / f"error-rank{rank}.log"
        try:
            STATE.out.mkdir(parents=True, exist_ok=True)
            log.write_text(details + ("" if details.endswith("\n") else "\n"))
            line += f" (traceback: {log})"
        except OSError:
            log = None
    try:
        printed = _claim_first(line)
        if printed:
            if details and log is None:
                sys.stderr.write(details)
            sys.stderr.write(line + "\n")
        if not (printed and rank == 0):  # rank 0's stderr is copied into the run log already
            _append_run_log(f"[rank {rank}] {line}")
        sys.stdout.flush()
        sys.stderr.flush()
        kill_children()
    finally:
        os._exit(code)


def _append_run_log(line: str) -> None:
    """The error line into {out}/train.log (train/run_log.py), appended in one write."""
    if STATE.out is None:
        return
    try:
        with open(STATE.out / "train.log", "a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError:
        pass


def _fail(error: BaseException) -> None:
    known = isinstance(error, ReportedError)
    details = "" if known else "".join(traceback.format_exception(error))
    exit_now(2 if known else 1, one_line(error), details)


# ----------------------------------------------------------------------------- signals

def _on_signal(signum, frame) -> None:
    STATE.stop_requested = True
    STATE.stop_reason = signal.Signals(signum).name


def _stop_timeout_s() -> float:
    return float(os.environ.get(STOP_TIMEOUT_ENV, "120"))


def _watch_signals(read_fd: int) -> None:
    """Runs in a thread: decides, per signal, between the loop's own stop and leaving at once."""
    while True:
        try:
            data = os.read(read_fd, 64)
        except InterruptedError:
            continue
        for signum in data:
            if signum not in (signal.SIGTERM, signal.SIGINT):
                continue  # the wakeup fd gets every handled signal: torch's loader handles SIGCHLD
            name = signal.Signals(signum).name
            now = time.monotonic()
            who = f"rank {STATE.rank}"
            if STATE.first_signal_at is None:
                STATE.first_signal_at = now
                if not STATE.in_loop:
                    exit_now(128 + signum, f"stopped: {who} got {name} outside the training loop: "
                                           "exited at once, nothing saved")
                if STATE.out is not None and (STATE.out / FIRST_FAILURE).exists():
                    # another rank failed (the launcher is tearing the job down): no checkpoint can
                    # be saved without it, so do not wait for the step boundary
                    exit_now(128 + signum, f"stopped: {who} got {name} after another rank failed")
                threading.Thread(target=_bound_stop, args=(signum,), daemon=True).start()
            elif now - STATE.first_signal_at > SIGNAL_REPEAT_S:
                exit_now(128 + signum, f"stopped: {who} got a second {name}: exited at once without saving")


def _bound_stop(signum: int) -> None:
    limit = _stop_timeout_s()
    time.sleep(limit)
    exit_now(128 + signum, f"stopped: rank {STATE.rank} did not stop within {limit:.0f} s of "
                           f"{signal.Signals(signum).name}: exited without saving")


def install_signal_handlers() -> None:
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=_watch_signals, args=(read_fd,), name="dcd-signals", daemon=True).start()


def run(main) -> None:
    """Run `main()` as a rank's whole life: its return value is the exit code; any exception ends
    the process at once (module docstring)."""
    install_signal_handlers()
    try:
        code = main()
    except BaseException as error:  # SystemExit from argparse included: one line, one exit path
        if isinstance(error, SystemExit) and error.code in (0, None):
            code = 0
        elif isinstance(error, SystemExit) and isinstance(error.code, int):
            code = error.code
        else:
            _fail(error)
    leave(code)


def leave(code: int) -> None:
    """A rank's normal end: what the interpreter's exit would do for us, then os._exit.

    The process group is destroyed and every file closed or flushed by now; what the interpreter
    would still do is tear down the modules of torch, DeepSpeed and transformers, 1.8 s per rank on
    this CPU after the last line (plus up to 1 s of the launcher's polling), every run and test."""
    for thread in threading.enumerate():  # the ones the interpreter would wait for
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # loader workers, logging, user hooks: as at a normal exit
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
