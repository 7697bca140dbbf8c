"""A memory and task limit for a sandbox's whole process tree, where cgroups are writable (as root).

rlimits bound each process; without a cgroup, a tree of N processes may use N times the memory limit. Both
cgroup v1 (a memory and a pids hierarchy) and v2 (one unified tree with those controllers) are handled; where
neither can be written, `SandboxCgroup.make` returns None and the per-process rlimits are what holds.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


class SandboxCgroup:
    def __init__(self, directories: list[Path], events: Path | None):
        self.directories, self.events = directories, events

    @classmethod
    def make(cls, memory_bytes: int, tasks: int, root: Path = ROOT) -> SandboxCgroup | None:
        name = f"herd-sandbox-{secrets.token_hex(6)}"
        made: list[Path] = []
        try:
            if (root / "cgroup.controllers").exists():  # v2: one directory, both controllers
                if not {"memory", "pids"} <= set((root / "cgroup.subtree_control").read_text().split()):
                    return None
                group = root / name
                group.mkdir()
                made.append(group)
                _write(group / "memory.max", memory_bytes)
                _write(group / "memory.swap.max", 0, optional=True)
                _write(group / "pids.max", tasks)
                return cls(made, group / "memory.events")
            memory, pids = root / "memory" / name, root / "pids" / name
            for group in (memory, pids):
                group.mkdir()
                made.append(group)
            _write(memory / "memory.limit_in_bytes", memory_bytes)
            _write(memory / "memory.memsw.limit_in_bytes", memory_bytes, optional=True)  # no escape into swap
            _write(pids / "pids.max", tasks)
            return cls(made, memory / "memory.oom_control")
        except OSError:
            cls(made, None).remove()
            return None

    def enter(self) -> None:
        """Move the calling process in (run as the sandbox's preexec_fn: its whole tree is then inside)."""
        for group in self.directories:
            (group / "cgroup.procs").write_text("0")

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process of the group for memory."""
        try:
            for line in self.events.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value) > 0:
                    return True
        except (OSError, ValueError, AttributeError):
            pass
        return False

    def remove(self) -> None:
        """Remove the directories once their last process has gone (a dying tree takes a moment)."""
        for group in self.directories:
            for _ in range(50):
                try:
                    group.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)


def _write(path: Path, value: int, optional: bool = False) -> None:
    try:
        path.write_text(str(value))
    except OSError:
        if not optional:  # optional: a kernel without swap accounting has no such file
            raise
