"""Run untrusted Python programs (`stepflash eval`'s code tasks) inside bubblewrap (`bwrap`).

The program gets new network, pid, ipc, uts and mount namespaces: no network at all (not even the
host's loopback), a read-only view of /usr and of the interpreter's prefix only, a fresh size-limited
tmpfs as /tmp and working directory, a read-only minimal /dev, no /proc, no home directory, an empty
environment and no capabilities. rlimits bound CPU time, memory, file size, open files and processes.
The kernel kills every process of a pid namespace when its init exits, and bwrap's init dies with
bwrap (--die-with-parent): `run` returns only once all of them are gone, at the timeout too.
"""

import functools
import json
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap; "
                "as a non-root user it also needs unprivileged user namespaces), or pass --unsafe-no-sandbox "
                "to run the code unconfined")
NOBODY = 65534
# The interpreter the programs run on: the installation itself, not a virtual environment's link to it
# (a venv may live under /tmp, which the sandbox replaces; programs need the standard library only).
BASE_PYTHON = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
# Runs first inside the sandbox. RLIMIT_NPROC counts every process of the user, so it is set here, in
# the sandbox's user namespace, where the count is the sandbox's own; the kernel exempts uid 0 from it,
# so bwrap run by root becomes nobody first. Then the program itself, read from stdin.
LAUNCHER = f"""\
import os, resource, sys
resource.setrlimit(resource.RLIMIT_NPROC, (int(sys.argv[1]),) * 2)
if os.getuid() == 0:
    os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
os.execv(sys.executable, [sys.executable, '-I', '-'])
"""


class SandboxUnavailable(ValueError):
    """No sandbox can be made here (a ValueError, which the CLI prints as a plain error)."""


@dataclass(frozen=True)
class Limits:
    seconds: float = 10.0
    memory_bytes: int = 1 << 30
    file_bytes: int = 1 << 20
    open_files: int = 64
    processes: int = 64
    tmpfs_bytes: int = 64 << 20


@dataclass(frozen=True)
class Outcome:
    returncode: int | None  # None: killed at the timeout
    stderr: str


@dataclass(frozen=True)
class Sandbox:
    name: str  # what ran the code, recorded in results
    bwrap: str | None = None  # None: no sandbox at all (--unsafe-no-sandbox)

    def run(self, source: str, limits: Limits = Limits()) -> Outcome:
        """Run `source` with `python -I`. Sandboxed, every process it started is gone when this
        returns; unconfined, only its process group is killed, at the timeout."""
        status_read, status_write = os.pipe() if self.bwrap else (None, None)
        with tempfile.TemporaryDirectory(prefix="stepflash-eval-") as work, tempfile.TemporaryFile() as stderr:
            try:
                proc = subprocess.Popen(self._command(limits, status_write), cwd=work, env={},
                                        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr,
                                        pass_fds=(status_write,) if self.bwrap else (), start_new_session=True,
                                        preexec_fn=functools.partial(_set_limits, limits))
            finally:
                if self.bwrap:
                    os.close(status_write)
            init = _sandbox_init(status_read) if self.bwrap else None
            try:
                proc.communicate(source.encode(), timeout=limits.seconds)
                returncode = proc.returncode
            except subprocess.TimeoutExpired:
                returncode = None
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)  # the program's group, or bwrap: its init dies with it
                    proc.wait()
                if self.bwrap:
                    os.close(status_read)  # open till bwrap wrote its last status (else SIGPIPE)
                if init is not None:
                    select.select([init], [], [], 10.0)  # readable once the init (so every process) is gone
                    os.close(init)
            stderr.seek(0)
            return Outcome(returncode, stderr.read().decode(errors="replace"))

    def _command(self, limits: Limits, status_fd: int | None) -> list[str]:
        if self.bwrap is None:
            return [sys.executable, "-I", "-"]
        return [self.bwrap, "--json-status-fd", str(status_fd), *_bwrap_args(limits),
                BASE_PYTHON, "-I", "-c", LAUNCHER, str(limits.processes)]


UNCONFINED = Sandbox("none (--unsafe-no-sandbox)")


@functools.cache
def bubblewrap() -> Sandbox:
    """The bubblewrap sandbox, once a trial program ran in it; else SandboxUnavailable saying why."""
    path = shutil.which("bwrap")
    if path is None:
        raise SandboxUnavailable(f"this task runs model-written code, which needs a sandbox, and bubblewrap "
                                 f"(bwrap) is not installed: {INSTALL_HINT}")
    version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.strip()
    sandbox = Sandbox(version or "bubblewrap", path)
    trial = sandbox.run("pass", Limits(seconds=60))
    if trial.returncode != 0:
        reason = (trial.stderr.strip().splitlines() or [f"exit code {trial.returncode}"])[-1]
        raise SandboxUnavailable(f"this task runs model-written code, which needs a sandbox, and bwrap could not "
                                 f"make one here ({reason}): {INSTALL_HINT}")
    return sandbox


def _set_limits(limits: Limits) -> None:
    seconds = int(limits.seconds) + 1
    for kind, value in ((resource.RLIMIT_CPU, seconds), (resource.RLIMIT_AS, limits.memory_bytes),
                        (resource.RLIMIT_FSIZE, limits.file_bytes), (resource.RLIMIT_NOFILE, limits.open_files)):
        resource.setrlimit(kind, (value, value))


def _bwrap_args(limits: Limits) -> list[str]:
    args = ["--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--die-with-parent",
            "--new-session", "--cap-drop", "ALL"]  # no --clearenv needed: Popen gives bwrap an empty environment
    if os.geteuid() == 0:  # for the launcher to become nobody, which drops them too
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    for path in ("/usr", "/bin", "/lib", "/lib64"):
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for prefix in sorted({sys.base_prefix, sys.base_exec_prefix}):
        if not Path(prefix).is_relative_to("/usr"):
            for parent in reversed(Path(prefix).parents[:-1]):  # traversable by nobody
                args += ["--perms", "0755", "--dir", str(parent)]
            args += ["--ro-bind", prefix, prefix]
    return args + ["--dev", "/dev", "--perms", "1777", "--size", str(limits.tmpfs_bytes), "--tmpfs", "/tmp",
                   "--chdir", "/tmp", "--remount-ro", "/dev", "--remount-ro", "/"]


def _sandbox_init(status_fd: int) -> int | None:
    """A pidfd of the sandbox's init (bwrap reports its pid first thing), or None if it is gone."""
    line = b""
    while not line.endswith(b"\n") and (chunk := os.read(status_fd, 1)):
        line += chunk
    try:
        return os.pidfd_open(json.loads(line)["child-pid"])
    except (ValueError, KeyError, ProcessLookupError):
        return None
