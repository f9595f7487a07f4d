"""Every wait securefed shortens in Flower 1.42, in one place, and why.

A masked round is five exchanges with every site (fit, share, masked, consistency, unmask), and
each exchange crosses these waits. Flower 1.42 sizes them for long-running apps on real
networks; on a LAN or loopback they were most of a deployed round's time. None of these changes
what is sent or to whom, nor TLS or node authentication: only how soon a process looks again.

=================================  ==========  ================  ==========================
wait (process)                     Flower      securefed         set by
=================================  ==========  ================  ==========================
SuperNode idle, between two        3 s         0.15 s after a    :func:`shorten_supernode_
requests to the SuperLink for a                message, growing  polls` (patched, see below)
message (site)                                 x1.25 to 0.6 s
SuperNode, between two looks for   0.5 s       0.05 s            :func:`shorten_supernode_
the ClientApp's reply (site, in                                  polls` (patched)
memory)
first wait for a message part not  1 s,        0.05 s,           :func:`shorten_supernode_
yet uploaded (SuperNode, site      doubling    doubling          polls`, :func:`shorten_
executor, ServerApp)               to 10 s     to 0.5 s          grid_pulls`, the executor's
                                                                 ``pull_task_input``
site executor idle, between two    (1 s, the   0.02 s after a    :data:`EXECUTOR_IDLE`
task requests (site, loopback)     SuperExec)  task, growing
                                               x1.25 to 0.25 s
SuperLink's SuperExec, between     1 s         0.5 s             ``FLWR_SUPEREXEC_TASK_POLL_
two ServerApp task requests                                      INTERVAL`` (Flower's own
(server)                                                         setting; launch.flower_env)
=================================  ==========  ================  ==========================

The idle waits start short right after a message, when the next stage of the round is near,
and grow while nothing comes: ten idle sites polling every 0.2 s kept 0.75 of a 2-core machine
busy (measured with ``LocalDeployment``), CPU the sites' training then lacked. They do not start
shorter than 0.15 s because every poll is a request the SuperLink must serve: with ten sites,
the SuperLink (one Python process) is what a protocol stage waits for, not the sites.

The first three are constants in Flower's source, not settings: the functions here replace
them by rebinding names inside one Flower module each (``time``, ``pull_objects`` and
``_pull_and_store_message`` in ``flwr.supernode.start_client_internal``, ``pull_objects`` in
``flwr.superlink.grid.http_grid``); no other module's view changes. They were read from Flower
1.42 (pyproject pins ``flwr>=1.42,<1.43``); on any other version they leave Flower as it is and
log a warning, so a deployment still works, only slower.

The cost of the shorter waits: a long-idle site sends its SuperLink under two small TLS requests
a second (instead of one every 3 s), and its executor asks its SuperNode four times a second over
loopback; more during a round.
"""

from __future__ import annotations

import functools
import logging
import time
import types

__all__ = [
    "EXECUTOR_IDLE",
    "SUPERNODE_IDLE",
    "IdleWait",
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
#: Flower 1.42 SuperNode main-loop sleeps (seconds, as written in its source).
FLWR_SUPERNODE_IDLE_SLEEP = 3
FLWR_SUPERNODE_REPLY_SLEEP = 0.5
#: SuperNode idle wait: (first after a message, longest) seconds.
SUPERNODE_IDLE = (0.15, 0.6)
#: Other SuperNode sleeps (Flower's value -> securefed's): the wait for the ClientApp's reply.
SUPERNODE_SLEEPS: dict[float, float] = {FLWR_SUPERNODE_REPLY_SLEEP: 0.05}
#: First wait before asking again for a message part that is not uploaded yet; doubles up to
#: :data:`PULL_MAX_WAIT_SECONDS`. A message becomes visible before its parts are uploaded, so
#: the reader often asks early; Flower's first wait of 1 s (then 2 s, 4 s) was paid once per
#: stage per direction.
PULL_FIRST_WAIT_SECONDS = 0.05
PULL_MAX_WAIT_SECONDS = 0.5
#: Site executor idle wait between two task requests: (first after a task, longest) seconds.
EXECUTOR_IDLE = (0.02, 0.25)
#: Growth of an idle wait per empty poll.
IDLE_GROWTH = 1.25


class IdleWait:
    """An idle poll's wait: short right after activity, growing while nothing happens.

    Args:
        first: Seconds of the first wait after :meth:`reset`.
        longest: The wait never grows past this.
        growth: Factor per wait.

    """

    def __init__(self, first: float, longest: float, growth: float = IDLE_GROWTH) -> None:
        if not 0 < first <= longest or growth < 1:
            raise ValueError(f"need 0 < first <= longest and growth >= 1 (got {first}, {longest})")
        self.first, self.longest, self.growth = first, longest, growth
        self.current = first

    def reset(self) -> None:
        """Something happened: the next wait is the shortest again."""
        self.current = self.first

    def next(self) -> float:
        """The wait to take now (and grow the one after it)."""
        value = self.current
        self.current = min(self.longest, self.current * self.growth)
        return value


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


def shorten_supernode_polls(
    idle: IdleWait | None = None, sleeps: dict[float, float] | None = None
) -> bool:
    """In a SuperNode process: its main loop's sleeps and its part-fetch back-off.

    Args:
        idle: The idle wait replacing Flower's 3 s (default from :data:`SUPERNODE_IDLE`); it is
            reset whenever the SuperNode receives a message.
        sleeps: Flower's other sleeps -> the ones to take (default :data:`SUPERNODE_SLEEPS`).

    Returns:
        Whether Flower was changed (False on a Flower version these were not read from).

    """
    if not _flower_is_supported():
        return False
    from flwr.supernode import start_client_internal as loop

    wait = IdleWait(*SUPERNODE_IDLE) if idle is None else idle
    table = dict(SUPERNODE_SLEEPS if sleeps is None else sleeps)

    def sleep(seconds: float) -> None:
        if seconds == FLWR_SUPERNODE_IDLE_SLEEP:
            time.sleep(wait.next())
        else:
            time.sleep(table.get(seconds, seconds))

    pull_and_store = loop._pull_and_store_message  # noqa: SLF001  # Flower 1.42's loop step

    @functools.wraps(pull_and_store)
    def pull_and_store_then_reset(*args: object, **kwargs: object) -> int | None:
        run_id = pull_and_store(*args, **kwargs)
        if run_id is not None:
            wait.reset()  # the round's next message usually follows soon
        return run_id

    # Only that module's view of `time` changes; every other module keeps the real one.
    shim = types.SimpleNamespace(
        **{k: getattr(time, k) for k in dir(time) if not k.startswith("_")}
    )
    shim.sleep = sleep
    loop.time = shim  # type: ignore[attr-defined]
    loop.pull_objects = _short_pulls()  # type: ignore[attr-defined]
    loop._pull_and_store_message = pull_and_store_then_reset  # type: ignore[attr-defined]
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
