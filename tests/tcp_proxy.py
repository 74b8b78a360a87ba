"""A TCP proxy on 127.0.0.1 that can be cut and restored, to make a real server unreachable on demand,
or lose the reply to one PostgreSQL COMMIT."""

from __future__ import annotations

import socket
import threading
import urllib.parse


class TcpProxy:
    """Forwards 127.0.0.1:<port> to ``target``.

    :meth:`cut` closes the listening socket and every forwarded connection, so
    that clients see connection resets and then "connection refused";
    :meth:`restore` listens on the same port again. After :meth:`lose_next_commit_reply`, the
    next simple-query ``COMMIT`` a client sends is forwarded and that connection is closed before
    the server can answer: the server commits, the client sees its connection break (for
    unencrypted PostgreSQL connections, ``sslmode=disable``). After :meth:`lose_next_commit` the
    COMMIT itself is dropped with the connection: nothing commits. Thread-safe.
    """

    COMMIT = b"Q\x00\x00\x00\x0bCOMMIT\x00"   # a Query message: type, length 4 + 7, text

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.port = 0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lose_commit = threading.Event()
        self._deliver_commit = True
        self.commits_lost = 0

    def url_for(self, url: str) -> str:
        """``url`` (a PostgreSQL URL) through this proxy, unencrypted so that COMMIT can be seen."""
        parts = urllib.parse.urlsplit(url)
        user = urllib.parse.quote(parts.username or "postgres")
        password = f":{urllib.parse.quote(parts.password)}" if parts.password else ""
        query = urllib.parse.urlencode([*urllib.parse.parse_qsl(parts.query), ("sslmode", "disable")])
        return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}{password}@127.0.0.1:{self.port}",
                                                      query=query))

    def lose_next_commit_reply(self) -> None:
        self._deliver_commit = True
        self._lose_commit.set()

    def lose_next_commit(self) -> None:
        self._deliver_commit = False
        self._lose_commit.set()

    def start(self) -> TcpProxy:
        self.restore()
        return self

    def restore(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        for sock in [listener, *conns]:
            if sock is None:
                continue
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    stop = cut

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, client), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, client: socket.socket | None = None) -> None:
        try:
            while data := src.recv(65536):
                if client is not None and self.COMMIT in data and self._lose_commit.is_set():
                    self._lose_commit.clear()
                    self.commits_lost += 1
                    # The client's side first, so that no reply can reach it; then the COMMIT
                    # reaches the server followed by the end of the connection.
                    client.shutdown(socket.SHUT_RDWR)
                    if self._deliver_commit:
                        dst.sendall(data)
                    break
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
