"""Services run as child processes: started in their own session, their
output relayed with its last lines kept to explain a death, stopped with
SIGTERM then SIGKILL, and started again with a growing delay when they die.
`pagewire serve` runs its services so, and a gateway its workers."""

from __future__ import annotations

import asyncio
import collections
import ctypes
import os
import signal
import sys
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pagewire.services.common.grpc_utils import stop_on_signals
from pagewire.services.common.logging import get_logger

# Lines name the service of the process that runs the children.
log = get_logger()

# Lines of a child's output kept to explain its death.
TAIL_LINES = 20
RESTART_INITIAL_S = 1.0
RESTART_MAX_S = 30.0
# A child that ran this long before dying is restarted after the initial delay.
RESTART_RESET_AFTER_S = 60.0

# Beyond its grace period, what a child gets to exit before it is killed (the
# gateway needs a second or two to close its REST connections).
STOP_MARGIN_S = 5.0
# prctl(2): the signal a process gets when its parent dies.
PR_SET_PDEATHSIG = 1


@dataclass
class ChildCommand:
    argv: list[str]
    # Added to the environment the child inherits.
    env: dict[str, str]


def flag(name: str, value: typing.Any) -> list[str]:
    """The command-line flag(s) that give option `name` its value."""
    option_flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [option_flag if value else "--no-" + option_flag[2:]]
    if isinstance(value, list):
        return [part for item in value for part in (option_flag, str(item))]
    return [option_flag, str(value)]


@dataclass
class Child:
    name: str
    process: asyncio.subprocess.Process
    tail: collections.deque[str]
    relay: asyncio.Task[None]


async def _relay_output(stream: asyncio.StreamReader, tail: collections.deque[str]) -> None:
    """Copy a child's output to ours, keeping its last lines."""
    while line := await stream.readline():
        text = line.decode(errors="replace").rstrip("\n")
        tail.append(text)
        # A last line without its newline must not run into our next record.
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


def _die_with_launcher() -> typing.Callable[[], None] | None:
    """What a child runs between fork and exec so that it gets SIGTERM (and
    drains, as when the launcher stops it) once the launcher is gone, however
    the launcher ended: a SIGKILL leaves it no chance to stop its children,
    whose own sessions keep them from its terminal's signals too. Linux only
    (PR_SET_PDEATHSIG); None elsewhere."""
    if sys.platform != "linux":
        return None
    # Looked up before the fork: the child may only make system calls.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    launcher = os.getpid()

    def in_child() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        # The launcher died before the request took effect: nothing would come.
        if os.getppid() != launcher:
            os._exit(1)

    return in_child


async def start_child(name: str, command: ChildCommand) -> Child:
    # Own session: a Ctrl-C in the terminal reaches only the launcher, which
    # stops the children in order. The parent-death signal is sent when the
    # thread that forked exits: this is the event loop's, the launcher's main thread.
    process = await asyncio.create_subprocess_exec(
        *command.argv,
        env=os.environ | command.env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_die_with_launcher(),
    )
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    assert process.stdout is not None
    log.info("started", child=name, pid=process.pid)
    return Child(name, process, tail, asyncio.create_task(_relay_output(process.stdout, tail)))



async def _stop_one(child: Child, grace_s: float) -> None:
    if child.process.returncode is None:
        child.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(child.process.wait(), grace_s + STOP_MARGIN_S)
        except TimeoutError:
            log.warning("did not stop in time, killing", child=child.name, grace_s=grace_s, margin_s=STOP_MARGIN_S)
            child.process.kill()
            await child.process.wait()
    await asyncio.wait_for(child.relay, grace_s)


async def stop_children(children: dict[str, Child], grace_s: float, groups: list[list[str]] | None = None) -> None:
    """SIGTERM, then SIGKILL after the grace: group by group in reverse start
    order (the gateway first, so that it drains while the engine still
    serves), the children of one group (a service's workers) all at once.
    Without `groups`, each child is a group of its own."""
    for group in reversed(groups or [[name] for name in children]):
        await asyncio.gather(*(_stop_one(children[name], grace_s) for name in group if name in children))


def report_death(child: Child) -> None:
    log.error("child exited", child=child.name, exit_code=child.process.returncode, last_output="\n".join(child.tail))


async def supervise(
    children: dict[str, Child], commands: dict[str, ChildCommand], exits: dict[asyncio.Future[int], Child], stopping: asyncio.Future[bool]
) -> None:
    """Until `stopping` completes, start again every child that dies
    (`children` and `exits` follow the new processes)."""
    loop = asyncio.get_running_loop()
    delays = dict.fromkeys(children, RESTART_INITIAL_S)
    started_at = dict.fromkeys(children, loop.time())
    while True:
        done, _ = await asyncio.wait([stopping, *exits], return_when=asyncio.FIRST_COMPLETED)
        if stopping in done:
            return
        for waiter in done:
            child = exits.pop(waiter)
            report_death(child)
            if loop.time() - started_at[child.name] > RESTART_RESET_AFTER_S:
                delays[child.name] = RESTART_INITIAL_S
            delay = delays[child.name]
            delays[child.name] = min(delay * 2, RESTART_MAX_S)
            log.warning("restarting child", child=child.name, exit_code=child.process.returncode, in_s=delay)
            await asyncio.wait([stopping], timeout=delay)
            if stopping.done():
                return
            children[child.name] = await start_child(child.name, commands[child.name])
            started_at[child.name] = loop.time()
            exits[asyncio.ensure_future(children[child.name].process.wait())] = children[child.name]


@dataclass
class Supervision:
    """How run_children stops its children and what it says of their start."""

    grace_s: float
    # Children stopped together, in start order (see stop_children).
    groups: list[list[str]] | None
    on_ready: Callable[[], None]
    # Given why `ready` failed.
    on_failed_start: Callable[[BaseException], None]


async def run_children(commands: dict[str, ChildCommand], ready: Awaitable[None], supervision: Supervision) -> int:
    """Start every child and wait for `ready`. A child that dies before then
    stops them all (one that cannot start would only die again), as does
    `ready` failing; once ready, a child that dies is started again, until
    SIGTERM or SIGINT stops them all. The exit code: 0 after a signal, else 1."""
    stop = stop_on_signals()
    children: dict[str, Child] = {}
    exit_code = 0
    try:
        for name, command in commands.items():
            children[name] = await start_child(name, command)
        exits = {asyncio.ensure_future(child.process.wait()): child for child in children.values()}
        stopping = asyncio.ensure_future(stop.wait())
        readiness = asyncio.ensure_future(ready)
        done, _ = await asyncio.wait([readiness, stopping, *exits], return_when=asyncio.FIRST_COMPLETED)
        if readiness in done and readiness.exception() is None:
            supervision.on_ready()
            await supervise(children, commands, exits, stopping)
            done = {stopping}
        elif readiness in done:
            supervision.on_failed_start(typing.cast(BaseException, readiness.exception()))
            exit_code = 1
        readiness.cancel()
        stopping.cancel()
        for waiter in exits:
            if waiter in done:
                report_death(exits[waiter])
                exit_code = 1
            else:
                waiter.cancel()
        if stop.is_set():
            log.info("shutting down")
    finally:
        await stop_children(children, supervision.grace_s, supervision.groups)
    log.info("stopped", exit_code=exit_code)
    return exit_code
