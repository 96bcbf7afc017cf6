"""Connections dealt to serving processes in turn, instead of left to the kernel.

With pre-forked workers on one shared listening socket, the process that accepts a connection is
whichever event loop wins the race, and an asyncio loop accepts every connection pending when it
wakes. Two keep-alive connections that open together (a gateway's small pool, a load generator)
then often land in the same process, which serves both in turn while the other idles: in
``bench/serving_latency.py`` at 100k items with two processes, the API's p50 was about 6-7 ms in
those runs against about 4 ms when the kernel split them. Node's cluster module deals connections
round robin from its primary process for the same reason; :class:`Dealer` does the same. The
supervisor accepts, and sends each connection's descriptor (``SCM_RIGHTS`` over a Unix socket pair)
to the next worker, whose :class:`DealtServer` hands it to its uvicorn event loop. Only connections
pass through the supervisor, never requests; it costs one ``sendmsg`` per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time

import uvicorn

__all__ = ["Dealer", "DealtServer"]

logger = logging.getLogger(__name__)


class Dealer:
    """Accept on ``sock`` and deal each connection to the next of ``workers`` channels.

    Create it before forking; each worker takes its end with :meth:`channel`, and the supervisor
    starts dealing with :meth:`start` after the fork. A worker that is gone is skipped (the
    supervisor notices it and stops the set).
    """

    def __init__(self, sock: socket.socket, workers: int) -> None:
        self._sock = sock
        self._pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(workers)]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def channel(self, n: int) -> socket.socket:
        """In worker ``n``, after the fork: its end of its channel (every other descriptor closed)."""
        for i, (ours, theirs) in enumerate(self._pairs):
            ours.close()
            if i != n:
                theirs.close()
        self._sock.close()  # only the supervisor accepts
        return self._pairs[n][1]

    def start(self) -> None:
        """In the supervisor, after the fork: deal in a background thread until :meth:`stop`."""
        for _, theirs in self._pairs:
            theirs.close()
        self._thread = threading.Thread(target=self._deal, name="freshrec-serve-dealer", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the dealing thread runs (the supervisor stops the set if it died)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for ours, _ in self._pairs:
            ours.close()  # each worker's receiver sees the end of its channel

    def _deal(self) -> None:
        self._sock.settimeout(0.2)  # to notice stop()
        turn = 0
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:  # out of descriptors, say: the backlog holds the connection
                logger.warning("accepting a connection failed: %s", exc)
                time.sleep(0.05)
                continue
            with conn:  # the worker holds its own duplicate once sent
                for _ in range(len(self._pairs)):
                    ours = self._pairs[turn][0]
                    turn = (turn + 1) % len(self._pairs)
                    try:  # never wait on one worker: a stuck one must not hold up the others
                        socket.send_fds(ours, [b"c"], [conn.fileno()], socket.MSG_DONTWAIT)
                    except OSError:
                        continue  # that worker is gone, or its channel is full: the next one
                    break
                else:
                    logger.warning("no serving worker took a connection; closed it")


class DealtServer(uvicorn.Server):
    """A uvicorn server that listens on nothing and serves the connections dealt over ``channel``.

    Its own names start with ``_dealt`` so as not to shadow uvicorn's (``Server._serve`` exists)."""

    def __init__(self, config: uvicorn.Config, channel: socket.socket) -> None:
        super().__init__(config)
        self._dealt_channel = channel
        self._dealt_loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._dealt_loop = asyncio.get_running_loop()
        await super().startup(sockets=[])
        threading.Thread(target=self._dealt_receive, name="freshrec-serve-dealt", daemon=True).start()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Take no more connections: this wakes the receiver, and the supervisor skips this worker.
        with contextlib.suppress(OSError):  # already closed
            self._dealt_channel.shutdown(socket.SHUT_RDWR)
        await super().shutdown(sockets=sockets)

    def _dealt_receive(self) -> None:
        loop = self._dealt_loop
        assert loop is not None
        try:
            while True:
                try:
                    message, fds, flags, _ = socket.recv_fds(self._dealt_channel, 1, 1)
                except OSError:
                    return  # closed by shutdown()
                if not message:
                    return  # the supervisor closed its end
                if not fds or flags & socket.MSG_CTRUNC:  # out of descriptors here: dropped
                    for fd in fds:
                        socket.socket(fileno=fd).close()
                    logger.warning("a dealt connection was lost (out of file descriptors?)")
                    continue
                conn = socket.socket(fileno=fds[0])
                try:
                    asyncio.run_coroutine_threadsafe(self._dealt_connect(conn), loop)
                except RuntimeError:  # the loop has closed: this worker is stopping
                    conn.close()
                    return
        finally:
            self._dealt_channel.close()

    async def _dealt_connect(self, conn: socket.socket) -> None:
        if self.should_exit:  # stopping: refuse rather than serve a connection it cannot finish
            conn.close()
            return
        try:
            await asyncio.get_running_loop().connect_accepted_socket(self._dealt_protocol, conn)
        except Exception:
            logger.exception("serving a dealt connection failed")
            conn.close()

    def _dealt_protocol(self) -> asyncio.Protocol:
        # What uvicorn's own startup() builds for each connection it accepts.
        protocol: asyncio.Protocol = self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config, server_state=self.server_state, app_state=self.lifespan.state
        )
        return protocol
