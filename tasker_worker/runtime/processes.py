"""Supervisor for ``run --processes K``: K worker processes, crashed ones restarted.

The parent does not touch the queues. Children run in their own sessions, so a terminal's
Ctrl-C (sent to the whole foreground group) reaches them once, through the parent, which forwards SIGTERM/SIGINT to its children (a second
signal is forwarded too, which stops them immediately), waits for them within the shutdown
budget, and kills whatever is left after it. A child that exits on its own is restarted with
exponential backoff; more than ``MAX_RESTARTS_PER_MINUTE`` restarts in a minute means something
is wrong beyond a crash, and the supervisor stops everything and exits 1.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

MAX_RESTARTS_PER_MINUTE = 10
TICK_S = 0.1


@dataclass
class _Child:
    slot: int
    proc: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)
    failures: int = 0


def supervise(
    command: Sequence[str],
    processes: int,
    env: dict[str, str],
    shutdown_timeout: float,
    slot_env: Callable[[int], dict[str, str]] | None = None,
) -> int:
    """Run ``processes`` copies of ``command`` until a signal; return the exit code."""
    signals_seen = 0

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal signals_seen
        if signum != signal.SIGHUP:  # SIGHUP only passes on: every child re-reads its config
            signals_seen += 1
        for child in children.values():
            if child.proc.poll() is None:
                child.proc.send_signal(signum)

    children: dict[int, _Child] = {}
    restarts: deque[float] = deque()
    pending: dict[int, float] = {}  # slot -> when to restart
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        for slot in range(processes):
            children[slot] = _Child(
                slot, subprocess.Popen(list(command), env=_env(env, slot_env, slot), start_new_session=True)
            )
        log.info("supervising %d worker processes", processes)
        while signals_seen == 0:
            now = time.monotonic()
            for slot, child in list(children.items()):
                code = child.proc.poll()
                if code is None or slot in pending:
                    continue
                lived = now - child.started
                child.failures = 0 if lived > 60 else child.failures + 1
                delay = min(30.0, 0.5 * 2 ** max(0, child.failures - 1))
                log.warning(
                    "worker process %d exited with %s after %.1fs; restarting in %.1fs",
                    child.proc.pid,
                    code,
                    lived,
                    delay,
                )
                pending[slot] = now + delay
                restarts.append(now)
            while restarts and now - restarts[0] > 60:
                restarts.popleft()
            if len(restarts) > MAX_RESTARTS_PER_MINUTE:
                log.error("more than %d restarts in a minute: giving up", MAX_RESTARTS_PER_MINUTE)
                on_signal(signal.SIGTERM, None)
                _wait_all(children, shutdown_timeout)
                return 1
            for slot, when in list(pending.items()):
                if now >= when:
                    failures = children[slot].failures
                    children[slot] = _Child(
                        slot,
                        subprocess.Popen(list(command), env=_env(env, slot_env, slot), start_new_session=True),
                        failures=failures,
                    )
                    del pending[slot]
            time.sleep(TICK_S)
        _wait_all(children, shutdown_timeout + 5)
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _wait_all(children: dict[int, _Child], budget: float) -> None:
    deadline = time.monotonic() + budget
    for child in children.values():
        remaining = max(0.0, deadline - time.monotonic())
        try:
            child.proc.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            log.error("worker process %d did not stop in time: killing it", child.proc.pid)
            child.proc.kill()
            child.proc.wait()


def _env(env: dict[str, str], slot_env: Callable[[int], dict[str, str]] | None, slot: int) -> dict[str, str]:
    return env if slot_env is None else {**env, **slot_env(slot)}
