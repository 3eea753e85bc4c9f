"""Runs `gcl` commands one after the other in this one process, as the `gcl` console script runs
each (workflows.cli.main, its file descriptors 1 and 2 a file standing for the terminal), so that
a matrix of bad inputs pays Python's and gcl's imports once. Reads the cases as JSON from argv[1]
and writes what each did to argv[2].

A case: {"name", "argv", "env" (set for the case), "cwd"}. What it did: {"name", "code", "terminal"
(what the command wrote on descriptors 1 and 2), "log" (the log file its quiet console named, or
null), "seconds"}.
"""

import json
import os
import sys
import tempfile
import time


def run_case(case: dict) -> dict:
    from gcl import console
    from workflows.cli import main

    saved_env = {k: os.environ.get(k) for k in case.get("env", {})}
    os.environ.update(case.get("env", {}))
    cwd = os.getcwd()
    os.chdir(case.get("cwd", cwd))
    console.last_log_file = None
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with tempfile.TemporaryFile() as terminal:
        for fd in (1, 2):
            os.dup2(terminal.fileno(), fd)
        start = time.perf_counter()
        try:
            code = main(case["argv"])
        except SystemExit as done:  # argparse's refusals
            code = done.code
        except BaseException as err:  # a crash: what the console script would print, a traceback
            import traceback

            traceback.print_exc()
            code = f"raised {type(err).__name__}"
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            os.chdir(cwd)
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        terminal.seek(0)
        text = terminal.read().decode(errors="replace")
    return {
        "name": case["name"],
        "code": code,
        "terminal": text,
        "log": console.last_log_file,
        "seconds": time.perf_counter() - start,
    }


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    results = [run_case(case) for case in cases]
    with open(sys.argv[2], "w") as f:
        json.dump(results, f, indent=1)
