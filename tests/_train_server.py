"""Serve ``otca train`` runs in forked processes, for the fault-injection tests (``tests/_faults.py``).

Starting ``python -m otca train`` costs ~30 s on a loaded 2-core machine, nearly all of it imports and the first
build of the model (later builds in the same process take 0.1 s). This server pays that once: it imports otca,
builds the embedded default's policy once, then for each request (a JSON line on stdin) forks a child that sets
``OTCA_FAULT_AT`` as asked and runs ``otca.cli.main(["train", ...])``, the function behind the ``otca`` command,
with stdout to /dev/null and stderr to a file. The child is a separate process: a fault point kills it with
SIGKILL as it would kill a fresh one. ``kill_after`` (seconds) kills the child from outside instead. The reply
is a JSON line ``{"code": <exit code, -9 when killed>, "seconds": <run time>}``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback

os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)

from otca.cli import main  # noqa: E402
from otca.config import load_config  # noqa: E402
from otca.models.registry import build_policy  # noqa: E402
from otca.trainer import Trainer  # noqa: E402, F401  (imported here so that children start warm)


def _child(req: dict) -> int:
    out = os.open(os.devnull, os.O_WRONLY)
    err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.environ.pop("OTCA_FAULT_AT", None)
    if req.get("fault"):
        os.environ["OTCA_FAULT_AT"] = req["fault"]
    try:
        return main(["train", *req["args"]])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def serve() -> None:
    build_policy(load_config(None, []).model, torch.device("cpu"))  # warm: the first build imports the model code
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            os._exit(_child(req))
        limit, status = req.get("kill_after"), None
        if limit is not None:
            while status is None and time.perf_counter() - start < limit:
                done, st = os.waitpid(pid, os.WNOHANG)
                if done:
                    status = st
                time.sleep(0.01)
            if status is None:
                os.kill(pid, signal.SIGKILL)
        if status is None:
            _, status = os.waitpid(pid, 0)
        print(json.dumps({"code": os.waitstatus_to_exitcode(status), "seconds": time.perf_counter() - start}),
              flush=True)

if __name__ == "__main__":
    serve()
