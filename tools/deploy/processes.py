"""The processes of a local deployment: each started in its own session and killed, with its
descendants, when the deployment ends (normally, on error, on timeout, Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil

log = logging.getLogger(__name__)


TAG = "SAVLT_DEPLOYMENT"  # environment marker inherited by every process a deployment starts


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Processes:
    """Every process a deployment starts; :meth:`stop` kills them and all their descendants.

    Flower's SuperLink and SuperNodes start helpers (SuperExec, ServerApp, ClientApps) in
    new sessions, so killing a process group is not enough, and a helper whose parent died
    is re-parented to init. Every process started here carries ``TAG`` in its environment,
    which its descendants inherit: stopping everything kills whatever still carries it.
    """

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.tag = f"{log_dir.resolve()}:{os.getpid()}"
        self.env = {**env, TAG: self.tag}
        self.procs: dict[str, subprocess.Popen] = {}
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        with open(self.log_dir / f"{name}.log", "ab") as fh:
            self.procs[name] = subprocess.Popen(
                argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**self.env, **(env or {})},
                start_new_session=True,
            )
        log.info("started %s (pid %d): %s", name, self.procs[name].pid, " ".join(argv))

    def log_text(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def tagged(self) -> list[psutil.Process]:
        """Live processes that this deployment started, directly or not."""
        found = []
        for p in psutil.process_iter():
            with suppress(psutil.Error):
                if p.status() != psutil.STATUS_ZOMBIE and p.environ().get(TAG) == self.tag:
                    found.append(p)
        return found

    def stop(self, name: str | None = None, grace: float = 5.0) -> None:
        """Terminate one process (or all) with its descendants; kill what outlives ``grace``."""
        victims: list[psutil.Process] = []
        for n in [name] if name else list(self.procs):
            proc = self.procs.pop(n)
            with suppress(psutil.Error):
                parent = psutil.Process(proc.pid)
                victims += [parent, *parent.children(recursive=True)]
        if name is None:
            victims += self.tagged()
        for p in victims:
            with suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(victims, timeout=grace)
        for p in alive:
            with suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=grace)


@contextmanager
def managed(processes: Processes) -> Iterator[Processes]:
    """Stop every process on exit, exception, Ctrl-C, SIGTERM or interpreter exit."""

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term)
    atexit.register(processes.stop)
    try:
        yield processes
    finally:
        processes.stop()
        atexit.unregister(processes.stop)
        signal.signal(signal.SIGTERM, previous)
