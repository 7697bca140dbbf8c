"""Runs inside the sandbox, before the model's code: limits, then the drop to an unprivileged uid, then the code.

Started as `python -I -B sandbox_boot.py CONFIG_JSON` by herd.tools.sandbox; it imports nothing of herd's (the
project is not visible in the sandbox). Without privilege the code cannot raise the hard limits set here.
"""

import json
import os
import resource
import site
import sys
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


main()
