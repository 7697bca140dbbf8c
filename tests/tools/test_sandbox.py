"""The code interpreter contains hostile code: each attack is reported as an error and leaves the host as it was."""
import errno
import io
import json
import os
import re
import shutil
import socket
import subprocess
import tarfile
from pathlib import Path

import pytest

from herd.tools import Limits, run_python, sandbox
from herd.tools.sandbox import sandbox_problem

pytestmark = pytest.mark.skipif(sandbox_problem() is not None, reason=f"no sandbox here: {sandbox_problem()}")

PROJECT = Path(__file__).resolve().parents[2]


def sandbox_processes() -> list[int]:
    """Host processes still running code from a sandbox (their command line names the boot script)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"/sandbox/boot.py" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


def processes_named(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes().replace(b"\0", b" "):
                found.append(int(entry.name))
        except OSError:
            pass
    return found


@pytest.fixture(autouse=True)
def host_unaffected():
    """Around every test: no sandbox process is left, and the host can still start processes."""
    yield
    assert sandbox_processes() == []
    assert subprocess.run(["true"]).returncode == 0


def test_runs_code_and_returns_output():
    result = run_python("import sys\nprint(sum(range(10)))\nprint('warn', file=sys.stderr)")
    assert result == {"stdout": "45\n", "stderr": "warn\n", "exit_code": 0, "files": {}, "error": None}


def test_exception_is_the_error_and_traceback_names_the_code():
    result = run_python("x = 1\nraise KeyError('missing')")
    assert result["exit_code"] == 1
    assert result["error"] == "KeyError: 'missing'"
    assert 'File "main.py", line 2' in result["stderr"] and "boot" not in result["stderr"]
    result = run_python("x = 1\ndef (")
    assert result["error"] == "SyntaxError: invalid syntax"
    assert 'File "main.py", line 2' in result["stderr"] and "boot" not in result["stderr"]


def test_input_files_in_written_files_out():
    code = "rows = open('in.csv').read().split()\nopen('out.csv', 'w').write('\\n'.join(r + ',x' for r in rows))"
    result = run_python(code, files={"in.csv": "a\nb\n"})
    assert result["error"] is None
    assert result["files"] == {"out.csv": b"a,x\nb,x"}  # the unchanged input is not returned
    assert run_python("", files={"../escape": b"x"})["error"].startswith("input file name")


def test_matplotlib_png_is_returned():
    code = ("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.savefig('plot.png')\n"
            "print('saved')")
    result = run_python(code, timeout=30)
    assert result["error"] is None, result["stderr"]
    assert result["files"]["plot.png"].startswith(b"\x89PNG\r\n\x1a\n")


def test_fork_bomb_is_contained():
    result = run_python("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
                        limits=Limits(timeout=1, cpu_seconds=1, processes=16))
    assert result["error"] is not None and result["exit_code"] != 0


def test_fork_bomb_hits_the_process_limit():
    code = ("import os, time\nn = 0\ntry:\n    while n < 1000:\n        if os.fork() == 0:\n"
            "            time.sleep(5)\n            os._exit(0)\n        n += 1\nexcept OSError as e:\n"
            "    print('stopped at', n, type(e).__name__, flush=True)\n    os._exit(3)")
    result = run_python(code, limits=Limits(timeout=10, processes=16))
    assert result["exit_code"] == 3
    stopped = int(result["stdout"].split()[2])
    assert stopped < 16 and result["stdout"].split()[3] == "BlockingIOError"


def test_memory_bomb_is_contained():
    for code in ["blocks = []\nwhile True:\n    blocks.append(bytearray(16 << 20))", "x = [0] * 10**10"]:
        result = run_python(code, limits=Limits(timeout=10, memory_mb=160))
        assert result["error"] == "MemoryError: the memory limit (160 MiB) was reached"


# Eight processes each under the per-process limit, 1.6 GiB together. The kernel kills whichever is largest when
# the group is full: the first process is killed in one run and spared in another (it allocates last here), and
# then exits 0, which must not read as success.
TREE_BOMB = ("import os, time\nfirst = True\nfor _ in range(7):\n    if os.fork() == 0:\n        first = False\n"
             "        break\nif first and {spare_first}:\n    time.sleep(1)\nblock = bytearray(200 << 20)\n"
             "time.sleep(2)\nprint('survived', flush=True)")


@pytest.mark.skipif(os.geteuid() != 0, reason="the tree-wide memory limit is a cgroup, which root makes")
@pytest.mark.parametrize("spare_first", [False, True])
def test_memory_bomb_across_processes_is_contained(monkeypatch, spare_first):
    made = []
    make = sandbox.SandboxCgroup.make
    monkeypatch.setattr(sandbox.SandboxCgroup, "make", lambda *a, **k: made.append(make(*a, **k)) or made[-1])
    result = run_python(TREE_BOMB.format(spare_first=spare_first), limits=Limits(timeout=20, memory_mb=256))
    assert made[0] is not None, "no cgroup was made"
    assert result["error"] == "killed: its processes together reached the memory limit (256 MiB)"
    assert result["stdout"].count("survived") <= 1  # never two 200 MiB blocks at once
    assert not any(group.exists() for group in made[0].directories)  # removed after the run


def test_without_a_cgroup_the_code_runs_as_one_task(monkeypatch, caplog):
    """Where no cgroup can be made (not root, cgroups read-only), N processes could take N times the memory
    limit: the code gets no second process (nor thread), and the host's log says so once."""
    monkeypatch.setattr(sandbox.SandboxCgroup, "make", lambda *a, **k: None)
    sandbox._say_single_task.cache_clear()
    result = run_python(TREE_BOMB.format(spare_first=False), limits=Limits(timeout=20, memory_mb=256))
    assert result["error"] == "BlockingIOError: [Errno 11] Resource temporarily unavailable"
    assert result["stdout"] == ""
    code = "import threading\nthreading.Thread(target=print).start()"
    assert run_python(code)["error"] == "RuntimeError: can't start new thread"
    assert [r.getMessage() for r in caplog.records if r.name == "herd.tools.sandbox"] == [
        "herd: no cgroup can bound the sandbox's memory here (it takes root and writable cgroups): code runs as a "
        "single task, without processes or threads of its own"]
    assert run_python("print(sum(range(10)))")["stdout"] == "45\n"


def test_infinite_loop_times_out():
    result = run_python("while True:\n    pass", timeout=1)
    assert result["error"].startswith("timed out after 1 s")


def test_cpu_limit_kills():
    result = run_python("while True:\n    pass", limits=Limits(timeout=120, cpu_seconds=1))
    assert result["error"] == "killed by SIGXCPU: the CPU-time limit was reached"


@pytest.mark.parametrize("path", ["/etc/shadow", "/etc/passwd", str(Path.home() / ".bashrc"),
                                  str(PROJECT / "herd" / "llm.py"), str(PROJECT / "pyproject.toml")])
def test_host_files_are_invisible(path):
    result = run_python(f"print(open({path!r}).read()[:100])")
    assert result["error"].startswith(("FileNotFoundError", "PermissionError")), result
    assert result["stdout"] == ""


def test_home_and_project_directories_do_not_exist():
    code = (f"import json, os\nprint(json.dumps([os.path.exists(p) and sorted(os.listdir(p))\n"
            f"                  for p in [{str(Path.home())!r}, {str(PROJECT)!r}, '/etc', '/']]))")
    home, project, etc, root = json.loads(run_python(code)["stdout"])
    assert home is False and project is False
    assert set(etc) <= {"ld.so.cache", "fonts"}
    assert set(root) == {"bin", "dev", "etc", "lib", "lib64", "opt", "proc", "sandbox", "tmp", "usr", "work"}
    assert run_python("import herd")["error"].startswith("ModuleNotFoundError")


def test_writes_outside_its_directory_fail(tmp_path):
    target = tmp_path / "escaped.txt"
    paths = [str(target), "/usr/escaped.txt", "/opt/python/escaped.txt", "/sandbox/main.py", "/escaped.txt",
             "/tmp/../escaped.txt"]
    code = (f"for path in {paths!r}:\n    try:\n        open(path, 'w').write('x')\n        print('wrote', path)\n"
            "    except OSError as e:\n        print(type(e).__name__)")
    result = run_python(code)
    assert result["error"] is None and "wrote" not in result["stdout"]
    assert set(result["stdout"].split()) <= {"FileNotFoundError", "PermissionError", "OSError"}
    assert not target.exists() and not Path("/usr/escaped.txt").exists() and not Path("/escaped.txt").exists()
    assert run_python("open('/tmp/scratch', 'w').write('ok')\nprint(open('/tmp/scratch').read())")["stdout"] == "ok\n"
    # Symlinks it leaves behind are not followed when its files are collected on the host.
    links = "import os\nos.symlink('/', 'root')\nos.symlink('/etc/hostname', 'name')\nopen('real.txt', 'w').write('x')"
    assert run_python(links)["files"] == {"real.txt": b"x"}


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the seccomp filter is x86-64's")
def test_the_code_cannot_make_a_user_namespace_but_still_threads_and_forks():
    # Inside one of its own it had held every capability (CapEff 1ffffffffff), root's sandbox or a user's.
    code = ("import ctypes, subprocess, threading\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "for flags in (0x10000000, 0x10020000):\n    print(libc.unshare(flags), ctypes.get_errno())\n"
            "t = threading.Thread(target=print, args=('thread',)); t.start(); t.join()\n"
            "print(subprocess.run(['echo', 'child'], capture_output=True, text=True).stdout.strip())")
    result = run_python(code)
    assert result["stdout"].splitlines() == ["-1 1", "-1 1", "thread", "child"], result


@pytest.mark.skipif(os.uname().machine not in ("x86_64", "aarch64"), reason="the seccomp filter knows these two")
@pytest.mark.parametrize("bounded", [True, False])
def test_the_code_cannot_trace_read_keyrings_or_take_uncounted_memory(monkeypatch, bounded):
    """ptrace, another process's memory and the keyrings (the host's session keyring: a key the host added had been
    read from the code) are refused; memfd and System V memory, which no rlimit counts, where no cgroup bounds it."""
    if not bounded:
        monkeypatch.setattr(sandbox.SandboxCgroup, "make", lambda *a, **k: None)
    code = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "def show(result):\n    print(result, ctypes.get_errno() if result == -1 else 0)\n"
            "show(libc.ptrace(0, 0, 0, 0))\n"  # PTRACE_TRACEME
            "show(libc.process_vm_readv(os.getppid(), None, 0, None, 0, 0))\n"
            "show(libc.syscall(%d, -3, 0, 0))\n"  # keyctl(KEYCTL_GET_KEYRING_ID, session)
            "show(libc.shmget(0, 1 << 20, 0o600))\n"
            "try:\n    os.memfd_create('x')\n    print('memfd')\nexcept OSError as e:\n    print(e.errno)")
    keyctl = {"x86_64": 250, "aarch64": 219}[os.uname().machine]
    lines = run_python(code % keyctl)["stdout"].splitlines()
    assert lines[:3] == [f"-1 {errno.EPERM}"] * 3
    assert lines[3:] == (["0 0", "memfd"] if bounded else [f"-1 {errno.EPERM}", str(errno.EPERM)]), lines


def test_returned_file_names_are_printable_and_clashing_inputs_are_an_error():
    code = "open(b'\\xff.png', 'wb').write(b'x')\nopen('\\x1b]0;owned\\x07.txt', 'w').write('y')"
    assert run_python(code)["files"] == {"\ufffd.png": b"x", "\ufffd]0;owned\ufffd.txt": b"y"}
    assert run_python("", files={"a": b"", "a/b": b""})["error"] == (
        "input file name 'a/b' clashes with another, which makes it a directory or its parent a file; give each "
        "file a path of its own")


def test_sockets_reach_nothing():
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    port = server.getsockname()[1]
    code = (f"import socket\nfor host in ['127.0.0.1', '1.1.1.1']:\n    try:\n"
            f"        socket.create_connection((host, {port}), timeout=2)\n        print(host, 'connected')\n"
            "    except OSError as e:\n        print(host, type(e).__name__)")
    result = run_python(code)
    with pytest.raises(BlockingIOError):  # no connection ever reached the host's server
        server.accept()
    server.close()
    assert "connected" not in result["stdout"]
    assert result["stdout"].splitlines()[0] == "127.0.0.1 ConnectionRefusedError"


def test_signalling_the_parent_or_the_host_does_nothing_to_the_host():
    sentinel = subprocess.Popen(["sleep", "30"])
    try:
        code = (f"import os, signal\nfor pid in [os.getppid(), {os.getpid()}, {sentinel.pid}, -1]:\n"
                "    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError as e:\n        print(pid, type(e).__name__)")
        result = run_python(code)
        assert sentinel.poll() is None  # the host's process is untouched (and so is this one)
        assert result["exit_code"] != 0 or "ProcessLookupError" in result["stdout"]
    finally:
        sentinel.kill()
        sentinel.wait()


def test_huge_output_is_truncated():
    result = run_python("import sys\nsys.stdout.write('x' * 10_000_000)", limits=Limits(output_bytes=1000))
    assert result["error"] is None
    assert result["stdout"].startswith("x" * 1000)
    assert result["stdout"].endswith("[output truncated: 9999000 more bytes dropped]")


def test_endless_output_is_stopped():
    result = run_python("while True:\n    print('y' * 1000)", timeout=1)
    assert result["error"].startswith("timed out") and len(result["stdout"]) < 70_000


def test_no_process_is_left_behind():
    code = ("import os, subprocess\nsubprocess.Popen(['sleep', '987654'], start_new_session=True)\n"
            "if os.fork() == 0:\n    os.setsid()\n    import time\n    time.sleep(600)\nprint('bye')")
    result = run_python(code)
    assert result["stdout"] == "bye\n" and result["error"] is None
    assert processes_named("sleep 987654") == []


def test_refuses_without_bwrap(monkeypatch, tmp_path):
    marker = tmp_path / "ran"
    monkeypatch.setenv("HERD_BWRAP", str(tmp_path / "no-such-bwrap"))
    sandbox_problem.cache_clear()
    try:
        result = run_python(f"open({str(marker)!r}, 'w').write('x')")
    finally:
        monkeypatch.delenv("HERD_BWRAP")
        sandbox_problem.cache_clear()
    assert result["error"].startswith("code_interpreter refused to run the code: bubblewrap (bwrap) is not installed")
    assert result["exit_code"] is None and not marker.exists()


def test_refuses_without_namespaces(monkeypatch, tmp_path):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("HERD_BWRAP", str(fake))
    sandbox_problem.cache_clear()
    try:
        result = run_python("print('ran')")
    finally:
        monkeypatch.delenv("HERD_BWRAP")
        sandbox_problem.cache_clear()
    assert "bwrap cannot make a sandbox here (bwrap: No permissions to creating new namespace)" in result["error"]
    assert result["stdout"] == ""


UNPRIVILEGED = """
import importlib.util, json, os, sys, types
# The system's Python has none of herd's dependencies: load the two modules the sandbox is made of by themselves.
sys.modules["herd"], sys.modules["herd.tools"] = types.ModuleType("herd"), types.ModuleType("herd.tools")
for name in ("cgroups", "sandbox"):
    spec = importlib.util.spec_from_file_location(f"herd.tools.{name}", os.path.join(sys.argv[1], f"{name}.py"))
    module = sys.modules[f"herd.tools.{name}"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
sandbox = module
bomb = ("import os, time\\nn = 0\\ntry:\\n    while n < 1000:\\n        if os.fork() == 0:\\n"
        "            time.sleep(5)\\n            os._exit(0)\\n        n += 1\\nexcept OSError:\\n    print(n)")
print(json.dumps([sandbox.run_python("import os\\nprint(os.getuid(), sorted(os.listdir('/')))"),
                  sandbox.run_python(bomb, limits=sandbox.Limits(processes=12)),
                  sandbox.run_python(sys.argv[2])]))
"""
# What a user's sandbox, whose code owns its namespace's root, had let it do: write to the unbounded tmpfs of / and
# /dev, read the host's environment from bwrap's init (/proc/1), attach to init (then move it out of the kill's
# reach).
OWNED = """import ctypes, json
libc = ctypes.CDLL(None, use_errno=True)
out = []
for path in ('/x', '/etc/x', '/dev/x', '/dev/shm/x'):
    try:
        open(path, 'w')
        out.append('wrote ' + path)
    except OSError as e:
        out.append(e.errno)
try:
    out.append('HERD_TEST_SECRET' in open('/proc/1/environ').read())
except OSError as e:
    out.append(e.errno)
out += [libc.ptrace(16, 1, 0, 0), ctypes.get_errno()]
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/python3").exists() or not shutil.which("setpriv"),
                    reason="needs root (to become nobody) and the system's Python")
def test_unprivileged_user_gets_a_user_namespace_sandbox():
    """The path a non-root user takes: bwrap makes a user namespace, where RLIMIT_NPROC counts only its own."""
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c",
                             UNPRIVILEGED, str(Path(sandbox.__file__).parent), OWNED], capture_output=True,
                            text=True, timeout=120, cwd="/", env={**os.environ, "HERD_TEST_SECRET": "x"})
    assert result.returncode == 0, result.stderr
    hello, bomb, probe = json.loads(result.stdout)
    uid, root = hello["stdout"].split(" ", 1)
    assert uid == "65534" and "work" in root and "root" not in root and hello["error"] is None
    assert int(bomb["stdout"]) < 12
    assert json.loads(probe["stdout"]) == [errno.EROFS] * 4 + [False, -1, errno.EPERM], probe


def test_the_working_directory_holds_at_most_its_size():
    """The code's files live in a tmpfs of `work_mb`, not on the host's disk, which a loop of files each under the
    file-size limit had filled at the disk's speed until the timeout."""
    code = "block = b'x' * (4 << 20)\nfor i in range(1000):\n    open(f'part{i}', 'wb').write(block)"
    result = run_python(code, limits=Limits(timeout=30, work_mb=16, returned_bytes=64 << 20))
    assert result["error"] == ("OSError: [Errno 28] No space left on device: the working directory holds 16 MiB and "
                               "/tmp 64 MiB")
    assert 12 << 20 <= sum(map(len, result["files"].values())) <= 16 << 20
    assert run_python("", files={"big.bin": b"x" * (2 << 20)}, limits=Limits(work_mb=1))["error"] == (
        "the input files exceed the working directory's 1 MiB; pass fewer or smaller files, or raise Limits.work_mb")


def test_a_million_empty_files_cost_the_host_nothing():
    """Empty files weigh nothing against the returned bytes: the host had listed, read and returned every one
    (270,818 in a 10 s run, which then took 39 s). At most `returned_files` come back, the rest counted."""
    code = "for i in range(10**7):\n    open(f'{i:08d}', 'w').close()"
    result = run_python(code, limits=Limits(timeout=3, cpu_seconds=30, returned_files=5))
    assert result["error"].startswith("timed out after 3 s")
    assert result["files"] == {f"{i:08d}": b"" for i in range(5)}
    assert re.fullmatch(r"\[\d+ more files not returned: at most 5 files and 32 MiB come back]",
                        result["stderr"].strip()), result["stderr"]


def test_files_come_back_from_a_run_that_timed_out_and_from_unreadable_or_deep_directories():
    code = ("import os, time\nos.makedirs('locked/inner')\nopen('locked/inner/a.txt', 'w').write('a')\n"
            "os.chmod('locked/inner', 0)\nos.chmod('locked', 0)\nopen('hidden.txt', 'w').write('h')\n"
            "os.chmod('hidden.txt', 0)\nfor _ in range(1500):\n    os.mkdir('d')\n    os.chdir('d')\n"
            "open('deep.txt', 'w').write('deep')\nprint('written', flush=True)\ntime.sleep(60)")
    result = run_python(code, timeout=2)
    assert result["stdout"] == "written\n" and result["error"].startswith("timed out after 2 s")
    assert result["files"] == {"hidden.txt": b"h", "locked/inner/a.txt": b"a",
                               "/".join(["d"] * 1500 + ["deep.txt"]): b"deep"}


def test_the_returned_stream_is_read_as_untrusted():
    """The code could write to the pipe its files come back through: names outside the directory, links, a cut
    tar and sizes over the limits are dropped, the files before the damage kept."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in [("ok.txt", b"fine"), ("../escape", b"x"), ("/etc/evil", b"x"), ("big", b"y" * 2000),
                           ("next.txt", b"also")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    stream = b'{"timed_out": false, "omitted": 0}\n' + buffer.getvalue()
    limits = Limits(returned_bytes=1000)
    assert sandbox._returned_files(stream, limits) == ({"timed_out": False, "omitted": 0},
                                                       {"ok.txt": b"fine", "next.txt": b"also"})
    assert sandbox._returned_files(stream[:len(stream) // 2], limits)[1] == {"ok.txt": b"fine"}
    assert sandbox._returned_files(b"not json\n" + buffer.getvalue(), limits) == ({}, {})
    assert sandbox._returned_files(b"", limits) == ({}, {})
