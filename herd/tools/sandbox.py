"""The code interpreter: model-written Python run in a bubblewrap sandbox.

The code sees a private working directory (a tmpfs of bounded size, its only writable place besides a small tmpfs
/tmp: returned files come from there, sent back by the boot script when the code ends), and read-only: /usr (the
system's libraries) and the Python runtime (the interpreter's prefix at /opt/python, the environment's site-packages
at /opt/site-packages). Nothing else of the host exists for it: no home, no project checkout, no /etc beyond the
loader's cache. It has its own network (loopback only, nothing of the host's), PID, IPC and UTS namespaces, rlimits
on CPU time, address space, processes, file size and open files, where root can make one a cgroup bounding the
memory and tasks of the whole tree, caps on what it prints, and a wall-clock timeout that kills its whole process
tree (the PID namespace dies with it). Where no cgroup can be made (not root, or cgroups read-only) nothing would
bound a tree's memory but N processes times the per-process limit, so the code then runs as a single task: it can
start no process and no thread (said once, on stderr). Run by root, bwrap keeps only CAP_SETUID/CAP_SETGID and the
code then drops to a fresh unprivileged uid (root is exempt from RLIMIT_NPROC); run by a user, the code lives in a
new user namespace. On x86-64 and arm64 a seccomp filter keeps the code from making user namespaces of its own
(inside one it would hold every capability: what most kernel privilege escalations start from), from tracing or
reading other processes and from the keyrings, and, where no cgroup bounds the memory, from memory no rlimit
counts. The filesystem's own tmpfs (/, /dev) is read-only; bwrap itself gets no environment of the host's.

Where no sandbox can be made (bwrap missing, namespaces refused) the code is not run: the result says why.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import os
import platform
import re
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from herd.tools.cgroups import SandboxCgroup

_BOOT = Path(__file__).with_name("sandbox_boot.py")
# The code's working directory inside the sandbox, whose files come back with the run (read by verifiers too).
WORK_DIR, _INSIDE_CONTROL = "/work", "/sandbox"
_INSIDE_PYTHON, _INSIDE_SITE = "/opt/python", "/opt/site-packages"
_INSIDE_MPL = "/tmp/matplotlib"
_NOTE = re.compile(r"\[(output truncated|\d+ more files not returned)")  # what herd adds to the code's stderr
_PLOTS = re.compile(r"matplotlib|pyplot|seaborn|pandas|\.plot\(")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    timeout: float = 10.0  # wall clock, seconds
    cpu_seconds: int = 10
    memory_mb: int = 1024  # address space of each process; with cgroups (as root), memory of all together
    processes: int = 32  # tasks (processes and threads)
    file_mb: int = 64  # the largest file it may write
    open_files: int = 256
    output_bytes: int = 64_000  # kept of stdout and of stderr each; the rest is dropped with a note
    returned_bytes: int = 32 << 20  # all returned files together
    returned_files: int = 256  # the most files returned; the rest are counted on stderr
    work_mb: int = 256  # the working directory (a tmpfs): the input files and all the code writes there
    tmp_mb: int = 64  # the tmpfs at /tmp


def run_python(code: str, timeout: float = 10, files: dict[str, bytes | str] | None = None, *,
               limits: Limits | None = None) -> dict:
    """Run `code` in the sandbox: {"stdout", "stderr", "exit_code", "files": {name: bytes}, "error"}.

    `files` are written into the working directory first; `files` in the result are those the code created or
    changed there. `error` is None when the code exited 0, else one line saying what went wrong (its exception,
    a limit it hit, the timeout, or why no sandbox could be made, in which case nothing ran).
    """
    # The CPU limit a second above the wall clock's: a busy loop given `timeout` seconds had raced the two, and
    # could end killed by SIGXCPU instead of timed out (a fresh clone's CI run, stop 34).
    limits = limits or Limits(timeout=timeout, cpu_seconds=math.ceil(timeout) + 1)
    problem = sandbox_problem()
    if problem:
        return _result(error=f"code_interpreter refused to run the code: {problem}")
    try:
        return _result(**_sandboxed(code, files or {}, limits))
    except ValueError as error:
        return _result(error=str(error))


@functools.cache
def sandbox_problem() -> str | None:
    """Why no sandbox can be made here (None when one can): checked once, by running `pass` in one."""
    if shutil.which(os.environ.get("HERD_BWRAP", "bwrap")) is None:
        return "bubblewrap (bwrap) is not installed; install it (apt-get install bubblewrap) to run code"
    try:
        run = _sandboxed("pass", {}, Limits(timeout=30))
    except OSError as error:
        return f"bwrap could not be started ({error})"
    if run["exit_code"] != 0:
        detail = (run["stderr"].strip().splitlines() or ["no message"])[-1]
        return (f"bwrap cannot make a sandbox here ({detail}); it needs root or user namespaces "
                "(sysctl kernel.unprivileged_userns_clone=1 and user.max_user_namespaces > 0)")
    return None


def _sandboxed(code: str, files: dict[str, bytes | str], limits: Limits, *, fonts: bool = True) -> dict:
    with tempfile.TemporaryDirectory(prefix="herd-sandbox-") as root:
        control = Path(root, "control")
        control.mkdir()
        _write_inputs(control / "inputs", files, limits)
        (control / "main.py").write_text(code, encoding="utf-8")
        shutil.copyfile(_BOOT, control / "boot.py")
        extra: list[str] = []
        font_list = _font_list() if fonts and _PLOTS.search(code) else None
        if font_list:
            name, data = font_list
            (control / name).write_bytes(data)
            extra = ["--ro-bind", str(control / name), f"{_INSIDE_MPL}/{name}"]
        for path in (Path(root), *control.rglob("*"), control):
            path.chmod(0o755 if path.is_dir() else 0o644)
        uid = _drop_to_uid()
        cgroup = _tree_limit(limits)
        results, results_in = os.pipe()
        seccomp = _seccomp_filter(bounded=cgroup is not None)
        if seccomp is not None:
            extra = [*extra, "--seccomp", str(seccomp)]
        try:
            tasks = limits.processes if cgroup else 1
            return _execute(_command(control, uid, limits, tasks, results_in, extra), limits, cgroup, results,
                            results_in, () if seccomp is None else (seccomp,))
        finally:
            if seccomp is not None:
                os.close(seccomp)
            if cgroup:
                cgroup.remove()


def _bpf(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


_LOAD, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ/JGE/JSET|K, BPF_RET|K
_ALLOW, _ERRNO = 0x7FFF0000, 0x00050000
_CLONE_NEWUSER, _EPERM, _ENOSYS = 0x10000000, 1, 38


@dataclass(frozen=True)
class _Syscalls:
    """One architecture's audit number and the numbers of the calls the filter looks at."""
    arch: int
    unshare: int
    clone: int
    clone3: int
    # Denied outright: ptrace and another process's memory (a user's sandbox runs bwrap's init and the boot script
    # as the code's own uid: attached, init had been moved out of reach of the kill and outlived the host), and the
    # keyrings (the session keyring is the host's: a key added there by the host had been read from the code).
    denied: tuple[int, ...]
    # Denied too where no cgroup bounds the tree: memory that no rlimit counts (memfd pages, System V segments).
    unbounded: tuple[int, ...]
    shadow_numbers: bool = False  # x86-64: numbers from 0x40000000 are x32's, which name these calls otherwise


_ARCHES = {
    "x86_64": _Syscalls(0xC000003E, unshare=272, clone=56, clone3=435,
                        denied=(101, 310, 311, 248, 249, 250), unbounded=(319, 29), shadow_numbers=True),
    "aarch64": _Syscalls(0xC00000B7, unshare=97, clone=220, clone3=435,
                         denied=(117, 270, 271, 217, 218, 219), unbounded=(279, 194)),
}


def _filter_program(calls: _Syscalls, bounded: bool) -> bytes:
    """seccomp_data is {int nr; u32 arch; u64 ip; u64 args[6]}. unshare and clone with CLONE_NEWUSER in their flags
    (their first argument) fail with EPERM, and so do the denied calls and every call of another architecture;
    clone3, whose flags sit behind a pointer a filter cannot read, fails with ENOSYS, on which the C library falls
    back to clone."""
    denied = calls.denied + (() if bounded else calls.unbounded)
    # Jumps count instructions forward from the next one; the program ends: flags check (3), EPERM, ENOSYS.
    body = [(_JEQ, calls.unshare, "flags"), (_JEQ, calls.clone, "flags"), (_JEQ, calls.clone3, "enosys"),
            *[(_JEQ, number, "eperm") for number in denied]]
    if calls.shadow_numbers:
        body.insert(0, (_JGE, 0x40000000, "eperm"))
    flags = 3 + len(body) + 1  # after the two loads, the arch check, the body and its ALLOW
    where = {"flags": flags, "eperm": flags + 3, "enosys": flags + 4}
    program = [_bpf(_LOAD, 4), _bpf(_JEQ, calls.arch, jf=where["eperm"] - 2), _bpf(_LOAD, 0)]
    for index, (op, k, target) in enumerate(body, start=3):
        program.append(_bpf(op, k, jt=where[target] - index - 1))
    program += [_bpf(_RET, _ALLOW),
                _bpf(_LOAD, 16), _bpf(_JSET, _CLONE_NEWUSER, jt=1), _bpf(_RET, _ALLOW),
                _bpf(_RET, _ERRNO | _EPERM), _bpf(_RET, _ERRNO | _ENOSYS)]
    return b"".join(program)


def _seccomp_filter(bounded: bool) -> int | None:
    """A file descriptor holding the filter for bwrap's --seccomp, on the architectures whose numbers we know.
    bounded: whether a cgroup bounds the tree's memory."""
    calls = _ARCHES.get(platform.machine())
    if calls is None:
        return None
    fd = os.memfd_create("herd-seccomp")
    os.write(fd, _filter_program(calls, bounded))
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _tree_limit(limits: Limits) -> SandboxCgroup | None:
    """A cgroup bounding the memory and tasks of the whole tree (two processes each under the memory rlimit could
    still take twice as much), or None where none can be made."""
    # + 3: bwrap, its init in the new PID namespace and the boot script, which waits for the code
    cgroup = SandboxCgroup.make(limits.memory_mb << 20, limits.processes + 3) if os.geteuid() == 0 else None
    if cgroup is None:
        _say_single_task()
    return cgroup


@functools.cache
def _say_single_task() -> None:
    log.warning("herd: no cgroup can bound the sandbox's memory here (it takes root and writable cgroups): "
                "code runs as a single task, without processes or threads of its own")


@functools.cache
def _font_list() -> tuple[str, bytes] | None:
    """matplotlib's font list, built once by a sandboxed run of our own and shown read-only to later runs that
    plot: building it takes seconds on every fresh MPLCONFIGDIR. None where matplotlib is not installed."""
    code = f"import os\nos.environ['MPLCONFIGDIR'] = {WORK_DIR!r}\nimport matplotlib.font_manager"
    run = _sandboxed(code, {}, Limits(timeout=120, cpu_seconds=120), fonts=False)
    found = sorted((name, data) for name, data in run["files"].items() if name.startswith("fontlist-"))
    return found[0] if run["exit_code"] == 0 and found else None


def _drop_to_uid() -> int | None:
    """A fresh unprivileged uid for this run when we are root (no user namespace is made then), else None."""
    return 0x100000 + secrets.randbelow(0x1000000) if os.geteuid() == 0 else None


@functools.cache
def _runtime() -> tuple[list[str], str, list[str], dict[str, str]]:
    """bwrap arguments that show the Python runtime read-only, the interpreter inside, site dirs, environment."""
    base = Path(os.path.realpath(sys.base_prefix))
    executable = Path(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))
    if not executable.is_relative_to(base):
        executable = base / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    args: list[str] = []
    env: dict[str, str] = {}
    if base.is_relative_to("/usr"):
        interpreter = str(executable)
    else:  # e.g. pyenv's under a home directory: shown at /opt/python, the home itself stays invisible
        args += ["--ro-bind", str(base), _INSIDE_PYTHON]
        interpreter = str(PurePosixPath(_INSIDE_PYTHON) / executable.relative_to(base))
        env["LD_LIBRARY_PATH"] = f"{_INSIDE_PYTHON}/lib"
    site_dirs = []
    packages = Path(sysconfig.get_path("purelib"))
    if os.path.realpath(sys.prefix) != str(base) and packages.is_dir():
        args += ["--ro-bind", str(packages), _INSIDE_SITE]
        site_dirs.append(_INSIDE_SITE)
    return args, interpreter, site_dirs, env


def _command(control: Path, uid: int | None, limits: Limits, tasks: int, results: int,
             extra: list[str] = ()) -> list[str]:
    runtime_args, interpreter, site_dirs, runtime_env = _runtime()
    config = {
        "uid": uid,
        "site_dirs": site_dirs,
        "main": f"{_INSIDE_CONTROL}/main.py",
        "inputs": f"{_INSIDE_CONTROL}/inputs",
        "timeout": limits.timeout,
        "result_fd": results,
        "max_files": limits.returned_files,
        "max_bytes": limits.returned_bytes,
        "rlimits": {
            # SIGXCPU at the soft limit says why; SIGKILL a second later if it is caught.
            "RLIMIT_CPU": [limits.cpu_seconds, limits.cpu_seconds + 1],
            "RLIMIT_AS": limits.memory_mb << 20,
            # Besides the code's tasks: the boot script, which waits for it, and in a user namespace bwrap's init
            # too, which runs as the same uid there.
            "RLIMIT_NPROC": tasks + (1 if uid is not None else 2),
            "RLIMIT_FSIZE": limits.file_mb << 20,
            "RLIMIT_NOFILE": limits.open_files,
            "RLIMIT_CORE": 0,
        },
    }
    env = {
        "PATH": "/usr/bin:/bin", "HOME": WORK_DIR, "TMPDIR": "/tmp", "LANG": "C.UTF-8",
        "MPLBACKEND": "Agg", "MPLCONFIGDIR": _INSIDE_MPL, "XDG_CACHE_HOME": "/tmp/cache",
        "XDG_CONFIG_HOME": "/tmp/config",
        # One thread per BLAS/OpenMP pool: threads count against the process limit and the address space.
        "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        **runtime_env,
    }
    if uid is None:  # a user's bwrap: a new user namespace, inside which no further one may be made
        namespaces = ["--unshare-all", "--unshare-user", "--disable-userns"]
    else:  # root's: no user namespace (the kuid must not be root's); drop the uid in the boot script
        namespaces = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
                      "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    return [
        shutil.which(os.environ.get("HERD_BWRAP", "bwrap")) or "bwrap",
        *namespaces, "--die-with-parent", "--new-session",
        "--ro-bind", "/usr", "/usr",
        "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
        # Directories bwrap makes for mount points are private to root unless told otherwise.
        "--perms", "0755", "--dir", "/etc", "--perms", "0755", "--dir", "/opt",
        "--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache", "--ro-bind-try", "/etc/fonts", "/etc/fonts",
        "--proc", "/proc", "--dev", "/dev",
        "--perms", "1777", "--size", str(limits.tmp_mb << 20), "--tmpfs", "/tmp",
        "--perms", "1777", "--dir", _INSIDE_MPL,
        *runtime_args,
        "--ro-bind", str(control), _INSIDE_CONTROL,
        "--perms", "0777", "--size", str(limits.work_mb << 20), "--tmpfs", WORK_DIR,
        *extra,
        # The root and /dev are tmpfs mounts of no bounded size, writable by a user's sandbox, whose code owns them.
        "--remount-ro", "/dev", "--remount-ro", "/",
        "--chdir", WORK_DIR,
        "--clearenv", *[a for key, value in env.items() for a in ("--setenv", key, value)],
        "--", interpreter, "-I", "-B", "-X", "utf8", f"{_INSIDE_CONTROL}/boot.py", json.dumps(config),
    ]


def _execute(command: list[str], limits: Limits, cgroup: SandboxCgroup | None, results: int,
             results_in: int, passed: tuple[int, ...] = ()) -> dict:
    """Run bwrap (inside `cgroup`), keeping the first `output_bytes` of each stream and the files the boot script
    sends back through the `results` pipe. The boot script kills the code at the timeout; this kills the whole tree
    a few seconds later, should the code have stopped the boot script."""
    try:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   start_new_session=True, umask=0o022, pass_fds=(results_in, *passed), env={},
                                   preexec_fn=cgroup.enter if cgroup else None)
    except OSError:
        os.close(results)
        raise
    finally:
        os.close(results_in)
    streams = {"stdout": _CappedReader(process.stdout, limits.output_bytes),
               "stderr": _CappedReader(process.stderr, limits.output_bytes)}
    # the files, a line of status, each file's tar header and padding (under 1 KiB), the tar's last record
    returned = _CappedReader(open(results, "rb"),
                             limits.returned_bytes + 1024 * (limits.returned_files + 1) + tarfile.RECORDSIZE)
    timed_out = False
    try:
        process.wait(timeout=limits.timeout + _GRACE)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        # bwrap's child dies with it (PR_SET_PDEATHSIG), and with it, as PID 1 of its namespace, every
        # process the code started, whatever session or group it moved to.
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    texts = {name: reader.text() for name, reader in streams.items()}
    status, files = _returned_files(returned.data(), limits)
    if status.get("omitted"):
        texts["stderr"] += (f"\n[{status['omitted']} more files not returned: at most {limits.returned_files} files "
                            f"and {limits.returned_bytes >> 20} MiB come back]")
    out_of_memory = cgroup is not None and cgroup.oom_killed()
    return {**texts, "exit_code": process.returncode, "files": files,
            "timed_out": timed_out or status.get("timed_out") is True, "out_of_memory": out_of_memory,
            "limits": limits}


_GRACE = 5.0  # seconds the boot script has, after the timeout, to kill the code and send its files


def _returned_files(data: bytes, limits: Limits) -> tuple[dict, dict[str, bytes]]:
    """The boot script's status line and the files in the tar after it. Read as untrusted (the code could have
    written to the pipe): a damaged or cut stream gives the files read before the damage."""
    head, _, body = data.partition(b"\n")
    try:
        status = json.loads(head)
    except ValueError:
        return {}, {}
    files: dict[str, bytes] = {}
    total = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:") as tar:
            for member in tar:
                path = PurePosixPath(member.name)
                if (not member.isreg() or path.is_absolute() or ".." in path.parts or len(files) >=
                        limits.returned_files or total + member.size > limits.returned_bytes):
                    continue
                files[_readable(str(path))] = tar.extractfile(member).read()
                total += member.size
    except (tarfile.TarError, EOFError, OSError):
        pass
    return status if isinstance(status, dict) else {}, files


def _readable(name: str) -> str:
    """A returned file's name as text anyone can print: bytes that are not UTF-8 (tarfile keeps them as surrogates,
    which JSON cannot carry) and control characters (terminal escapes, in `herd chat`) become U+FFFD."""
    name = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return "".join("\ufffd" if unicodedata.category(c) == "Cc" else c for c in name)


class _CappedReader:
    """Drains a pipe on a thread so the process never blocks on it; keeps the first `cap` bytes."""

    def __init__(self, pipe, cap: int):
        self.pipe, self.cap, self.kept, self.total = pipe, cap, bytearray(), 0
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        while chunk := self.pipe.read1(65536):
            self.total += len(chunk)
            if len(self.kept) < self.cap:
                self.kept += chunk[: self.cap - len(self.kept)]
        self.pipe.close()

    def data(self) -> bytes:
        # Bounded: a process that escaped the kill would hold the pipe open, and the run would never return.
        self.thread.join(timeout=_GRACE)
        return bytes(self.kept)

    def text(self) -> str:
        text = self.data().decode("utf-8", errors="replace")
        if self.total > self.cap:
            text += f"\n[output truncated: {self.total - self.cap} more bytes dropped]"
        return text


_SIGNALS = {
    signal.SIGXCPU: "the CPU-time limit was reached",
    signal.SIGXFSZ: "the file-size limit was reached",
    signal.SIGKILL: "the process was killed",
    signal.SIGSEGV: "it crashed (segmentation fault)",
}


def _result(stdout: str = "", stderr: str = "", exit_code: int | None = None, files: dict | None = None,
            error: str | None = None, timed_out: bool = False, out_of_memory: bool = False,
            limits: Limits | None = None) -> dict:
    # A process the kernel killed for memory fails the run even when the first one, spared, exits 0.
    if error is None and (exit_code or out_of_memory):
        error = _describe_failure(stderr, exit_code, timed_out, out_of_memory, limits)
    return {"stdout": stdout, "stderr": stderr, "exit_code": exit_code, "files": files or {}, "error": error}


def _describe_failure(stderr: str, exit_code: int, timed_out: bool, out_of_memory: bool, limits: Limits) -> str:
    if timed_out:
        return f"timed out after {limits.timeout:g} s; the code and every process it started were killed"
    if out_of_memory:
        return f"killed: its processes together reached the memory limit ({limits.memory_mb} MiB)"
    # bwrap reports a child killed by signal N as exit status 128 + N.
    signo = exit_code - 128 if exit_code > 128 else -exit_code if exit_code < 0 else None
    if signo is not None and signo in _SIGNALS:
        return f"killed by {signal.Signals(signo).name}: {_SIGNALS[signo]}"
    lines = [line for line in stderr.splitlines() if line.strip() and not _NOTE.match(line)]
    last = lines[-1].strip() if lines else ""
    if "MemoryError" in last:
        return f"MemoryError: the memory limit ({limits.memory_mb} MiB) was reached"
    if "[Errno 28]" in last:  # ENOSPC: a tmpfs is full
        return f"{last}: the working directory holds {limits.work_mb} MiB and /tmp {limits.tmp_mb} MiB"
    return last or f"exited with status {exit_code}"


def _write_inputs(inputs: Path, files: dict[str, bytes | str], limits: Limits) -> None:
    """The input files, where the boot script copies them into the working directory from."""
    inputs.mkdir()
    total = 0
    for name, data in files.items():
        path = PurePosixPath(name)
        if path.is_absolute() or ".." in path.parts or not path.parts:
            raise ValueError(f"input file name {name!r} must be a relative path inside the working directory")
        data = data.encode() if isinstance(data, str) else bytes(data)
        total += len(data)
        if total > limits.work_mb << 20:
            raise ValueError(f"the input files exceed the working directory's {limits.work_mb} MiB; pass fewer or "
                             "smaller files, or raise Limits.work_mb")
        target = inputs / path
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        except (FileExistsError, NotADirectoryError, IsADirectoryError):
            raise ValueError(f"input file name {name!r} clashes with another, which makes it a directory or its "
                             "parent a file; give each file a path of its own") from None
