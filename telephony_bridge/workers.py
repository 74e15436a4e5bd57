"""``serve --workers N``: N bridge processes on one port, each with its own event loop.

One Python process carries calls on one core. To use a machine's other cores, the supervisor (this module,
in the ``serve`` process) starts N workers; each binds its own listening socket to the same address with
SO_REUSEPORT, so the kernel spreads new connections across them and no accept lock is shared. The supervisor
holds the port bound (not listening) for the whole run, so a worker restarting cannot lose it to another
program. Workers share device accounting and stream tokens through Redis, exactly like replicas on separate
machines (a webhook and its stream may reach different workers), which is why N > 1 requires ``redis_url``.
The shared ops port, like the public one, reaches any worker; ``server.worker_ops_port`` gives each worker an ops
listener of its own as well (port + index), held by the supervisor too, so each can be scraped as one target.

Signals: SIGTERM or SIGINT to the supervisor is passed on once to every worker, each drains its calls
(``server.drain_timeout_s``) and exits; the supervisor exits when they all have. A worker that dies otherwise
is logged and started again after ``RESTART_DELAY_S``.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
from multiprocessing.process import BaseProcess
from types import FrameType

from telephony_bridge.errors import ConfigError
from telephony_bridge.ops import logging as oplog
from telephony_bridge.serving import bind_socket, host_port, warn_if_ipv6_only
from telephony_bridge.settings import Settings

log = logging.getLogger(__name__)

RESTART_DELAY_S = 1.0
POLL_S = 0.2


def supervise(settings: Settings) -> int:
    """Run ``settings.server.workers`` workers until a signal has stopped them all; returns the exit code."""
    if settings.dev_mode:
        raise ConfigError(
            "server.workers above 1 needs a Savants service (savants.base_url / SAVANTS_BASE_URL): "
            "the embedded dev emulator runs in one process"
        )
    host = settings.listen_host
    holder = _reserve_port(host, settings.server.port)
    port = holder.getsockname()[1]
    ports = {"port": port}
    ops_holder = None
    if settings.server.ops_port is not None:  # the ops listener is shared the same way
        ops_holder = _reserve_port(host, settings.server.ops_port)
        ports["ops_port"] = ops_holder.getsockname()[1]
    # Each worker's own ops port too (``server.worker_ops_port``): taken now, so a worker started again finds its
    # port free. SO_REUSEPORT lets one user bind a port twice without a word, so a port 0 above that came out in
    # their range must be refused here (the settings could not know it).
    own_ports = settings.server.worker_ops_ports()
    clash = [p for p in ports.values() if p in own_ports]
    if clash:
        raise ConfigError(
            f"server.worker_ops_port {own_ports.start} gives the workers ports {own_ports.start}-{own_ports[-1]}, "
            f"and the port chosen for port 0 ({clash[0]}) is among them: choose fixed ports, or another range"
        )
    own_holders = [_reserve_port(host, own) for own in own_ports]
    settings = settings.model_copy(update={"server": settings.server.model_copy(update=ports)})
    context = multiprocessing.get_context("spawn")  # no fork: the parent may hold threads and locks
    stopping = threading.Event()
    workers: list[BaseProcess] = []

    def start(index: int) -> BaseProcess:
        process = context.Process(target=_run_worker, args=(settings, index), name=f"bridge-worker-{index}")
        process.start()
        return process

    def stop(sig: int, frame: FrameType | None) -> None:
        if stopping.is_set():
            return
        stopping.set()
        log.info("stopping %d workers (signal %d): each drains its calls", len(workers), sig)
        for process in workers:
            if process.pid is not None and process.exitcode is None:
                os.kill(process.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        workers.extend(start(i) for i in range(settings.server.workers))
        log.info("started %d workers; bridge listening on %s", len(workers), host_port(host, port))
        warn_if_ipv6_only(holder, host, "listening", "IPv4 clients", "server.host")  # once, not once a worker
        if ops_holder is not None:
            log.info("ops listening on %s (each worker's /status, /metrics)", host_port(host, ports["ops_port"]))
        if own_ports:
            log.info("worker k's own ops port is %d + k (%d-%d)", own_ports.start, own_ports.start, own_ports[-1])
        while not (stopping.is_set() and all(p.exitcode is not None for p in workers)):
            stopping.wait(POLL_S)
            for i, process in enumerate(workers):
                if process.exitcode is not None and not stopping.is_set():
                    log.error(
                        "worker %d (pid %s) exited with code %s; starting it again", i, process.pid, process.exitcode
                    )
                    if not stopping.wait(RESTART_DELAY_S):
                        workers[i] = start(i)
            for process in workers:
                process.join(0)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        holder.close()
        if ops_holder is not None:
            ops_holder.close()
        for own_holder in own_holders:
            own_holder.close()


def _reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) so port 0 becomes one real port every worker joins, and no other user's process
    takes it (SO_REUSEPORT lets this user's own bind it again: ``supervise`` checks its own ports)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        holder.bind((host, port))
    except OSError as exc:
        holder.close()
        raise ConfigError(f"cannot listen on {host_port(host, port)}: {exc.strerror}") from None
    return holder


def _run_worker(settings: Settings, index: int) -> None:
    """One worker: its own process group (a terminal's Ctrl-C reaches the supervisor alone, which passes it on
    once), its own event loop, its own listening socket on the shared port."""
    os.setpgid(0, 0)
    from telephony_bridge.cli import ops_ports, serve_on

    host = settings.listen_host
    oplog.configure(settings.logging.level, settings.logging.format)  # spawned: its logging is its own
    # The shared ops port and this worker's own: both beside the supervisor's reservation, hence SO_REUSEPORT.
    ops = [bind_socket(host, port, reuse_port=True) for port in ops_ports(settings, index)]
    serve_on(settings, bind_socket(host, settings.server.port, reuse_port=True), worker=index, ops_socks=ops)
