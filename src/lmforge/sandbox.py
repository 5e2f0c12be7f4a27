"""Running code a model wrote (an agent's Python tool, a reward's unit tests) where it can do no harm.

Threat model: the code is hostile. It may try to read the user's files (~/.ssh, the project, /etc), write or delete
files outside its work directory, reach the network, start processes (fork bombs, a shell), exhaust memory, disk or
CPU, or tamper with the Python interpreter it runs in. Python-level guards cannot stop that on their own (PEP 578:
audit hooks are not a sandbox; ctypes or /proc/self/mem undo them), so the boundary is the kernel's:

- **Linux namespaces through bubblewrap** (Debian's `bubblewrap`): a new user, mount, PID, network, IPC and UTS
  namespace. The filesystem is an empty root with, read-only, /usr (and its /bin, /lib symlinks), /etc/ld.so.cache
  and the Python installation the code runs on, plus a private /tmp (tmpfs, size-capped) as the work directory and
  fresh /proc and /dev. No home directory, no project, no /etc beyond the loader's cache. The network namespace has
  only its own loopback. All capabilities are dropped; the sandbox dies with its parent.
- **A seccomp filter** installed by the child before the code runs (the kernel enforces it; the code cannot remove
  it): fork, vfork, execve, execveat, ptrace and process_vm_writev fail with EPERM, clone fails unless it creates a
  thread (threads keep working), clone3 answers ENOSYS (so the C library falls back to clone), and a foreign
  syscall ABI kills the process.
- **Resource limits** (setrlimit): CPU seconds, address space, the size of any file written (a write past it fails),
  open files; and a wall-clock timeout in the parent.
- **An audit hook** refuses sockets, subprocesses and ctypes at the Python level, so the usual attempts end in a
  readable PermissionError rather than an obscure errno.

Without bubblewrap (or where the kernel refuses user namespaces) nothing runs unless the caller explicitly allows
unconfined execution (`allow_unconfined=True`, or LMFORGE_ALLOW_UNCONFINED_CODE=1): the code then runs with only the
limits, the seccomp filter and the audit hook, which do not stop it reading or writing the user's files.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

ALLOW_ENV = "LMFORGE_ALLOW_UNCONFINED_CODE"


class SandboxUnavailable(RuntimeError):
    """No confinement on this machine and the caller did not allow running without it."""


@dataclass(frozen=True)
class Limits:
    """What one run may use: wall-clock and CPU seconds, address space and work-directory size in MB."""

    timeout: float = 10.0
    cpu_seconds: int = 10
    memory_mb: int = 512
    disk_mb: int = 64


@dataclass
class Result:
    """What the code printed and how it ended: `returncode` (negative: killed by that signal), `timed_out`."""

    stdout: str
    stderr: str
    returncode: int
    timed_out: bool = False
    confined: bool = True

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(-self.returncode).name if self.returncode < 0 else None


# The child's first statements (before the untrusted code): limits, then the seccomp filter, then the audit hook.
# Syscall numbers: x86_64 and aarch64 (asm/unistd.h); BPF opcodes and seccomp_data offsets: linux/filter.h,
# linux/seccomp.h.
_PRELUDE = r'''
import sys, resource, signal, ctypes, struct, platform
resource.setrlimit(resource.RLIMIT_CPU, ({cpu}, {cpu}))
resource.setrlimit(resource.RLIMIT_AS, ({mem}, {mem}))
resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize}, {fsize}))
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the size limit fails with EFBIG instead of killing
def _seccomp():
    machine = platform.machine()
    if machine == "x86_64":
        arch, nr = 0xC000003E, dict(clone=56, fork=57, vfork=58, execve=59, ptrace=101, execveat=322,
                                   process_vm_writev=311, clone3=435)
    elif machine == "aarch64":
        arch, nr = 0xC00000B7, dict(clone=220, execve=221, ptrace=117, execveat=281, process_vm_writev=271,
                                   clone3=435)
    else:
        raise OSError(f"no seccomp filter for {{machine}}")
    LD, JEQ, JSET, JGE, RET = 0x20, 0x15, 0x45, 0x35, 0x06
    ALLOW, KILL, EPERM, ENOSYS = 0x7FFF0000, 0x80000000, 0x00050000 | 1, 0x00050000 | 38
    deny = [n for k, n in nr.items() if k not in ("clone", "clone3")]
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, arch), (RET, 0, 0, KILL), (LD, 0, 0, 0)]
    if machine == "x86_64":  # the x32 ABI numbers (bit 30) would bypass the list below
        prog += [(JGE, 0, 1, 0x40000000), (RET, 0, 0, KILL)]
    for n in deny:
        prog += [(JEQ, 0, 1, n), (RET, 0, 0, EPERM)]
    prog += [(JEQ, 0, 1, nr["clone3"]), (RET, 0, 0, ENOSYS),
             (JEQ, 1, 0, nr["clone"]), (RET, 0, 0, ALLOW),
             (LD, 0, 0, 16), (JSET, 0, 1, 0x00010000), (RET, 0, 0, ALLOW), (RET, 0, 0, EPERM)]  # CLONE_THREAD
    raw = b"".join(struct.pack("HBBI", *i) for i in prog)
    buf = ctypes.create_string_buffer(raw)
    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    fprog = Fprog(len(prog), ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")
_seccomp()
def _guard(event, args):
    if event.startswith(("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                         "os.fork", "pty.", "ctypes.")):
        raise PermissionError(f"{{event}} is not allowed in the sandbox")
sys.addaudithook(_guard)
del _guard, _seccomp, resource, signal, ctypes, struct, platform
'''


def _interpreter() -> tuple[str, list[str]]:
    """The real Python binary (not a venv's symlink) and the directories it needs read-only."""
    exe = os.path.realpath(sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    return exe, [prefix] if not prefix.startswith("/usr") else []


def _bwrap_args(limits: Limits) -> list[str]:
    args = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--hostname", "sandbox", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin",
            "--ro-bind", "/usr", "/usr"]
    for top in ("bin", "lib", "lib64", "lib32", "sbin"):  # Debian: symlinks into /usr; elsewhere real directories
        path = f"/{top}"
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    if os.path.exists("/etc/ld.so.cache"):
        args += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    for d in _interpreter()[1]:
        args += ["--ro-bind", d, d]
    args += ["--proc", "/proc", "--dev", "/dev", "--size", str(limits.disk_mb * 2**20), "--tmpfs", "/tmp",
             "--chdir", "/tmp"]
    return args


@functools.lru_cache(maxsize=1)
def confinement_problem() -> str | None:
    """Why code cannot be confined on this machine (None when bubblewrap works here); checked once per process."""
    if shutil.which("bwrap") is None:
        return ("bubblewrap is not installed (Debian/Ubuntu: apt-get install bubblewrap; it confines model-written "
                "code to an empty filesystem without network)")
    exe = _interpreter()[0]
    try:
        done = subprocess.run(_bwrap_args(Limits()) + ["--", exe, "-I", "-c", "print('ok')"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"bubblewrap did not start: {e}"
    if done.returncode != 0 or done.stdout.strip() != "ok":
        return f"bubblewrap cannot create its namespaces here: {(done.stderr or done.stdout).strip()[:300]}"
    return None


def run_python_code(code: str, limits: Limits = Limits(), allow_unconfined: bool | None = None) -> Result:
    """Run `code` (Python source, given on stdin) in the sandbox (module docstring). Raises SandboxUnavailable when
    it cannot be confined and unconfined runs are not allowed (the argument, else LMFORGE_ALLOW_UNCONFINED_CODE=1)."""
    if allow_unconfined is None:
        allow_unconfined = os.environ.get(ALLOW_ENV, "") == "1"
    exe = _interpreter()[0]
    prelude = _PRELUDE.format(cpu=int(limits.cpu_seconds), mem=int(limits.memory_mb) * 2**20,
                              fsize=int(limits.disk_mb) * 2**20)
    command = [exe, "-I", "-c", prelude + "\nexec(compile(sys.stdin.read(), '<sandbox>', 'exec'))"]
    problem = confinement_problem()
    if problem is not None and not allow_unconfined:
        raise SandboxUnavailable(f"refusing to run model-written code unconfined: {problem}. Set {ALLOW_ENV}=1 to "
                                 "run it anyway with only resource limits (it can then read and write your files)")
    with tempfile.TemporaryDirectory() as cwd:
        if problem is None:
            command, cwd_arg, env = _bwrap_args(limits) + ["--"] + command, None, None
        else:
            cwd_arg, env = cwd, {"PATH": "/usr/bin:/bin"}
        try:
            done = subprocess.run(command, input=code, capture_output=True, text=True, timeout=limits.timeout,
                                  cwd=cwd_arg, env=env)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            return Result(out, err, -signal.SIGKILL, timed_out=True, confined=problem is None)
    returncode = done.returncode
    if problem is None and returncode > 128 and returncode - 128 in {s.value for s in signal.Signals}:
        returncode = -(returncode - 128)  # bwrap reports the child's death by signal N as 128 + N
    return Result(done.stdout, done.stderr, returncode, confined=problem is None)
