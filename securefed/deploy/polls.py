"""Every wait securefed shortens in Flower 1.42, in one place, and why.

A secure-aggregation round is four exchanges with every site (fit, share, masked, unmask), and
each exchange crosses these waits. Flower 1.42 sizes them for long-running apps on real
networks; on a LAN or loopback they were most of a deployed round's time. None of these changes
what is sent or to whom, nor TLS or node authentication: only how soon a process looks again.

=================================  ==========  ==========  ================================
wait (process)                     Flower      securefed   set by
=================================  ==========  ==========  ================================
SuperNode idle, between two        3 s         0.2 s       :func:`shorten_supernode_polls`
requests to the SuperLink for a                            (patched, see below)
message (site)
SuperNode, between two looks for   0.5 s       0.05 s      :func:`shorten_supernode_polls`
the ClientApp's reply (site, in                            (patched)
memory)
first wait for a message part not  1 s,        0.02 s,     :func:`shorten_supernode_polls`,
yet uploaded (SuperNode, site      doubling    doubling    :func:`shorten_grid_pulls`,
executor, ServerApp)               to 10 s     to 0.5 s    :func:`securefed.deploy.executor.
                                                           pull_task_input`
site executor idle, between two    (1 s, the   0.1 s       :data:`EXECUTOR_POLL_SECONDS`
task requests (site, loopback)     SuperExec)
SuperLink's SuperExec, between     1 s         0.1 s       ``FLWR_SUPEREXEC_TASK_POLL_
two ServerApp task requests                                INTERVAL`` (Flower's own
(server)                                                   setting; launch.flower_env)
=================================  ==========  ==========  ================================

The first three are constants in Flower's source, not settings: the functions here replace
them by rebinding names inside one Flower module each (``time`` and ``pull_objects`` in
``flwr.supernode.start_client_internal``, ``pull_objects`` in
``flwr.superlink.grid.http_grid``); no other module's view changes. They were read from Flower
1.42 (pyproject pins ``flwr>=1.42,<1.43``); on any other version they leave Flower as it is and
log a warning, so a deployment still works, only slower.

The cost of the shorter waits: an idle site sends its SuperLink five small TLS requests a
second (instead of one every 3 s), and its executor asks its SuperNode ten times a second over
loopback.
"""

from __future__ import annotations

import functools
import logging
import time
import types

__all__ = [
    "EXECUTOR_POLL_SECONDS",
    "FLWR_SERIES",
    "PULL_FIRST_WAIT_SECONDS",
    "PULL_MAX_WAIT_SECONDS",
    "SUPERNODE_SLEEPS",
    "shorten_grid_pulls",
    "shorten_supernode_polls",
]

log = logging.getLogger("securefed.deploy")

#: The Flower series the patched constants were read from.
FLWR_SERIES = "1.42."
#: Flower 1.42 SuperNode main-loop sleep (seconds, as written in its source) -> securefed's.
SUPERNODE_SLEEPS: dict[float, float] = {3: 0.2, 0.5: 0.05}
#: First wait before asking again for a message part that is not uploaded yet; doubles up to
#: :data:`PULL_MAX_WAIT_SECONDS`. A message becomes visible before its parts are uploaded, so
#: the reader often asks early; Flower's first wait of 1 s (then 2 s, 4 s) was paid once per
#: stage per direction.
PULL_FIRST_WAIT_SECONDS = 0.02
PULL_MAX_WAIT_SECONDS = 0.5
#: How often an idle site executor asks its SuperNode (loopback) for a task.
EXECUTOR_POLL_SECONDS = 0.1


def _flower_is_supported() -> bool:
    from flwr.supercore.version import package_version

    if package_version.startswith(FLWR_SERIES):
        return True
    log.warning(
        "flwr %s: Flower's waits left as they are (securefed's were read from flwr %sx)",
        package_version,
        FLWR_SERIES,
    )
    return False


def _short_pulls() -> functools.partial:
    from flwr.supercore.inflatable import inflatable_utils

    return functools.partial(
        inflatable_utils.pull_objects,
        initial_backoff=PULL_FIRST_WAIT_SECONDS,
        backoff_cap=PULL_MAX_WAIT_SECONDS,
    )


def shorten_supernode_polls(sleeps: dict[float, float] | None = None) -> bool:
    """In a SuperNode process: its main loop's sleeps and its part-fetch back-off.

    Args:
        sleeps: Flower's sleep -> the one to take instead (default :data:`SUPERNODE_SLEEPS`).

    Returns:
        Whether Flower was changed (False on a Flower version these were not read from).

    """
    if not _flower_is_supported():
        return False
    from flwr.supernode import start_client_internal as loop

    table = dict(SUPERNODE_SLEEPS if sleeps is None else sleeps)

    def sleep(seconds: float) -> None:
        time.sleep(table.get(seconds, seconds))

    # Only that module's view of `time` changes; every other module keeps the real one.
    shim = types.SimpleNamespace(
        **{k: getattr(time, k) for k in dir(time) if not k.startswith("_")}
    )
    shim.sleep = sleep
    loop.time = shim  # type: ignore[attr-defined]
    loop.pull_objects = _short_pulls()  # type: ignore[attr-defined]
    return True


def shorten_grid_pulls() -> bool:
    """In a ServerApp process: the back-off while a site's reply is still being uploaded.

    Returns:
        Whether Flower was changed (False on a Flower version this was not read from).

    """
    if not _flower_is_supported():
        return False
    from flwr.superlink.grid import http_grid

    http_grid.pull_objects = _short_pulls()  # type: ignore[attr-defined]
    return True
