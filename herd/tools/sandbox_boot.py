"""Runs inside the sandbox, before the model's code: limits, the drop to an unprivileged uid, the input files, then
the code in a child process. This process outlives the code: at the timeout, or when the code ends, it kills every
process the code left, then sends the files the code wrote back to the host through a pipe, since the working
directory is a tmpfs of bounded size that disappears with the sandbox (on the host's disk, code could fill it, or
leave a million empty files for the host to walk).

Started as `python -I -B sandbox_boot.py CONFIG_JSON` by herd.tools.sandbox; it imports nothing of herd's (the
project is not visible in the sandbox). Without privilege the code cannot raise the hard limits set here.
"""

import io
import json
import os
import resource
import select
import shutil
import signal
import site
import stat
import sys
import tarfile
import time
import traceback


def main() -> None:
    config = json.loads(sys.argv[1])
    for name, value in config["rlimits"].items():
        soft, hard = value if isinstance(value, list) else (value, value)
        resource.setrlimit(getattr(resource, name), (soft, hard))
    if config.get("uid") is not None:
        # Started as root inside (bwrap run by root keeps only CAP_SETUID/CAP_SETGID); once every uid is
        # unprivileged the kernel clears the remaining capabilities, and RLIMIT_NPROC applies.
        os.setgroups([])
        os.setresgid(config["uid"], config["uid"], config["uid"])
        os.setresuid(config["uid"], config["uid"], config["uid"])
    inputs = set()
    for directory, _, names in os.walk(config["inputs"]):
        here = os.path.relpath(directory, config["inputs"])
        os.makedirs(here, exist_ok=True)
        for name in names:
            shutil.copyfile(os.path.join(directory, name), os.path.join(here, name))
            inputs.add(os.path.normpath(os.path.join(here, name)))
    child = os.fork()
    if child == 0:
        os.close(config["result_fd"])
        run_code(config)
        return
    timed_out = not select.select([os.pidfd_open(child)], [], [], config["timeout"])[0]
    kill_all()
    code = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
    kill_all(until_gone=True)
    with os.fdopen(config["result_fd"], "wb") as result:
        send_files(result, config, inputs, timed_out)
    os._exit(code if code >= 0 else 128 - code)  # as bwrap reports a child killed by a signal


def run_code(config: dict) -> None:
    for directory in config["site_dirs"]:
        site.addsitedir(directory)
    sys.path.insert(0, os.getcwd())
    sys.argv = [config["main"]]
    with open(config["main"], encoding="utf-8") as source:
        text = source.read()
    try:
        exec(compile(text, "main.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit:
        raise
    except BaseException as error:  # noqa: BLE001 - the traceback goes to stderr without this file's frame
        traceback.print_exception(type(error), error, error.__traceback__.tb_next)
        sys.exit(1)


def kill_all(until_gone: bool = False) -> None:
    """Kill every process of this uid but this one: the code and whatever it started, in any session. until_gone:
    again until none is left (the reaped child no longer counts), so that none writes while the files are read."""
    deadline = time.monotonic() + 2
    try:
        os.kill(-1, signal.SIGKILL)
        while until_gone and time.monotonic() < deadline:
            time.sleep(0.01)
            os.kill(-1, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def send_files(result, config: dict, inputs: set[str], timed_out: bool) -> None:
    """One line of JSON (timed_out, and how many files were left out for the limits), then a tar of the files the
    code created or changed, up to `max_files` files and `max_bytes` bytes."""
    chosen, omitted, total = [], 0, 0
    for name, size in files_under():
        over = len(chosen) >= config["max_files"] or total + size > config["max_bytes"]
        if over and name not in inputs:
            omitted += 1  # without reading it: the code may have left a million, or one of the file-size limit
            continue
        data = read(name)
        if data is None or (name in inputs and same_as_input(os.path.join(config["inputs"], name), data)):
            continue
        if over:
            omitted += 1
            continue
        chosen.append((name, data))
        total += len(data)
    result.write(json.dumps({"timed_out": timed_out, "omitted": omitted}).encode() + b"\n")
    with tarfile.open(fileobj=result, mode="w|") as tar:
        for name, data in chosen:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def files_under():
    """The working directory's regular files, as (path relative to it, size) (a directory's own in name order, then
    its subdirectories'), never through a symlink; directories the code made unreadable are opened again (it owned
    them). Without recursion: the code may have nested directories thousands deep."""
    stack = [""]
    while stack:
        directory = stack.pop()
        try:
            if not os.access(directory or ".", os.R_OK | os.X_OK):
                os.chmod(directory, 0o700)
            entries = sorted(os.scandir(directory or "."), key=lambda entry: entry.name, reverse=True)
        except OSError:
            continue
        prefix = directory + "/" if directory else ""
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append(prefix + entry.name)
        for entry in reversed(entries):
            if entry.is_file(follow_symlinks=False):
                yield prefix + entry.name, entry.stat(follow_symlinks=False).st_size


def read(path: str) -> bytes | None:
    try:
        if not stat.S_IMODE(os.lstat(path).st_mode) & stat.S_IRUSR:
            os.chmod(path, 0o600)
        with open(path, "rb") as file:
            return file.read()
    except OSError:
        return None


def same_as_input(path: str, data: bytes) -> bool:
    try:
        with open(path, "rb") as file:
            return file.read() == data
    except OSError:
        return False


main()
