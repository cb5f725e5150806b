"""Connecting a job to Ray: the cluster it is given, or a local instance that only this machine can reach.

    connect(None)             -> RAY_ADDRESS when set (`ray job submit` sets it), else a new local instance
    connect("auto")           -> the cluster `ray start` left running on this machine
    connect("10.0.0.5:6379")  -> that cluster

A local instance listens on 127.0.0.1 only (GCS, raylets, workers, agents), keeps Ray's token authentication on
and starts no dashboard unless asked (`--dashboard`, then on 127.0.0.1 too). Ray binds its gRPC servers to
loopback only when its node address is loopback, and on Linux it replaces 127.0.0.1 with the machine's external
address unless told this is a single-machine instance (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the mode Ray uses on
laptops), so that is what a local start sets. Ray fate-shares its daemons with the driver but not the agents the
raylet starts (about 200 MB): a local start also starts a small watchdog that kills what is left of the instance
when the driver dies without shutting it down (`kill -9`).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from ..common.logs import log_line

LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # single-machine mode: the node address stays 127.0.0.1
    # Ray Train's preemption watcher is for cloud spot nodes; locally it is one more actor and an ERROR line
    # about its constructor arguments at every start
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def connect(address: str | None = None, *, dashboard: bool = False, **init_kwargs) -> None:
    """Connects this process to Ray once (a no-op when already connected); see the module docstring."""
    import ray

    if ray.is_initialized():
        return
    if not sys.stderr.isatty():  # worker lines Ray relays to this driver: no colour codes in a log file or CI
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        ray.init(address=address, **init_kwargs)
        return
    for name, value in LOCAL_ENV.items():  # inherited by the raylet and every worker it starts
        os.environ.setdefault(name, value)
    if os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
        # Ray read the variable when this process imported it: the driver's copy of the setting is updated too
        from ray._private import ray_constants
        ray_constants.ENABLE_RAY_CLUSTER = False
    # Ray's own warning about token auth is one more alarming line for a setting that is on and wanted
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    token = _token_path()
    new_token = token is not None and not token.exists()
    if not dashboard:  # no dashboard, no State API: Ray Train's placement-group cleaner would warn every second
        runtime_env = dict(init_kwargs.pop("runtime_env", None) or {})
        runtime_env.setdefault("worker_process_setup_hook", "pipeline.distributed.cluster.quiet_workers")
        init_kwargs["runtime_env"] = runtime_env
    context = ray.init(address="local", include_dashboard=dashboard, dashboard_host="127.0.0.1", **init_kwargs)
    _watch_for_driver_death()
    loopback = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    auth = "off" if os.environ.get("RAY_AUTH_MODE") == "disabled" else "on"
    if new_token and token.exists():
        log_line("ray", f"created Ray's auth token in {token} (every client of a local instance sends it; Ray reuses "
                        "it next time; RAY_AUTH_MODE=disabled turns token auth off)")
    board = f"dashboard at http://{context.dashboard_url}" if dashboard else "no dashboard (--dashboard starts one)"
    log_line("ray", f"started a local Ray instance listening on {'127.0.0.1 only' if loopback else 'every interface'}"
                    f", token auth {auth}, {board}; --address auto joins a cluster from `ray start` instead")


def quiet_workers() -> None:
    """Runs as every worker of a local instance without a dashboard starts: Ray Train's placement-group cleaner asks
    the State API (served by the dashboard) whether the run's controller lives, and logs a warning each second it
    cannot, 80 lines in a healthy run. Its warnings are dropped; the cleaner still removes a dead run's groups when
    the controller actor is gone (Ray also frees them with the job). The train worker's "Reporting training result"
    line, a dump of every report's metrics beside the loop's own progress line, is dropped too (its logger is named
    after its file, so the name is built from Ray's path rather than importing Ray Train into every worker)."""
    import ray

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    context = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")
    logging.getLogger(context).setLevel(logging.WARNING)


def _token_path():
    """Where Ray writes the token of a new local instance (None: token auth off, or the user gives the token)."""
    from pathlib import Path

    if os.environ.get("RAY_AUTH_MODE") == "disabled" or os.environ.get("RAY_AUTH_TOKEN") \
            or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return None
    return Path.home() / ".ray" / "auth_token"


# Run detached from the driver: while the driver lives, it notes every descendant of the driver once a second (the
# raylet starts its agents after ray.init returns); once the driver is gone (or a zombie), it waits for Ray's own
# teardown, then kills each noted process still alive and still the same process (its start time unchanged).
_WATCHDOG = """
import os, sys, time
def stats():
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                out[int(name)] = (fields[0], int(fields[1]), fields[19])
            except (OSError, IndexError, ValueError):
                pass
    return out
driver, noted = int(sys.argv[1]), {}
while True:
    now = stats()
    if driver not in now or now[driver][0] == "Z":
        break
    todo = [driver]
    while todo:
        parent = todo.pop()
        for pid, (_, ppid, started) in now.items():
            if ppid == parent and pid != os.getpid() and pid not in noted:
                noted[pid] = started
                todo.append(pid)
    time.sleep(1)
time.sleep(5)
now = stats()
for pid, started in noted.items():
    if pid in now and now[pid][2] == started and now[pid][0] != "Z":
        try:
            os.kill(pid, 9)
        except OSError:
            pass
"""


def _watch_for_driver_death() -> None:
    """Starts the watchdog over this driver's local instance (Linux: it reads /proc; elsewhere nothing to do)."""
    if Path("/proc/self/stat").exists():
        subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid())], start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         close_fds=True)
