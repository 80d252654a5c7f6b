"""A loopback relay between SuperNodes and the SuperLink's Fleet API that cuts one home's reply mid-upload.

Flower 1.41's SuperNode uploads a reply in two requests: ``push-messages`` (the message and its object
tree) and then ``push-object`` for each object. A home that loses power between them leaves the SuperLink a
reply whose objects never come. Every home of a test connects through its own port of this relay. For the
chosen round (``group``), the victim's first reply message is passed on and its object uploads are held
(``held`` is set, then the test kills the home); the other homes' first replies of that round wait until
``release()``, so the half reply is the first one the ServerApp pulls. Everything else passes unchanged.
Plain HTTP/1.1 (an insecure fleet), one request at a time per connection, as httpx sends them.
"""

from __future__ import annotations

import socket
import threading
from typing import BinaryIO

from flwr.proto.fleet_pb2 import PushMessagesRequest


class ReplyCut:
    def __init__(self, superlink: str, group: str) -> None:
        host, port = superlink.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.group = group
        self.held = threading.Event()  # the victim's object upload is being held
        self.released = threading.Event()
        self.victim = ""
        self.replied: set[str] = set()  # homes whose first reply of ``group`` came through
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []

    def listen(self, home: str, victim: bool = False) -> str:
        """A relay port for ``home`` (the address its SuperNode should use as its SuperLink)."""
        if victim:
            self.victim = home
        server = socket.create_server(("127.0.0.1", 0))
        self.sockets.append(server)
        threading.Thread(target=self._accept, args=(server, home), daemon=True).start()
        return f"127.0.0.1:{server.getsockname()[1]}"

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.released.set()
        with self.lock:
            for s in self.sockets:
                s.close()

    def _accept(self, server: socket.socket, home: str) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client, home), daemon=True).start()

    def _relay(self, client: socket.socket, home: str) -> None:
        try:
            upstream = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        with self.lock:
            self.sockets += [client, upstream]
        threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
        reader = client.makefile("rb")
        try:
            while request := _read_request(reader):
                path, raw, body = request
                if not self._gate(home, path, body):
                    reader.read()  # held: nothing more goes up until the home is gone
                    break
                upstream.sendall(raw + body)
        except OSError:
            pass
        finally:
            client.close()
            upstream.close()

    def _gate(self, home: str, path: str, body: bytes) -> bool:
        """Whether the request goes up now (it may first wait for ``release``); False: hold it for good."""
        if path.endswith("/push-object"):
            if home == self.victim and home in self.replied:
                self.held.set()
                return False
            return True
        if path.endswith("/push-messages"):
            meta = PushMessagesRequest.FromString(body).messages_list[0].metadata
            with self.lock:
                first = meta.reply_to_message_id and meta.group_id == self.group and home not in self.replied
                if first:
                    self.replied.add(home)
            if first and home != self.victim:
                self.released.wait()
        return True


def _read_request(reader: BinaryIO) -> tuple[str, bytes, bytes] | None:
    """One HTTP/1.1 request: its path, its request line and headers as received, its body."""
    lines = [reader.readline()]
    if not lines[0]:
        return None
    while lines[-1] not in (b"\r\n", b"\n", b""):
        lines.append(reader.readline())
    length = 0
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return lines[0].split()[1].decode(), b"".join(lines), reader.read(length)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
