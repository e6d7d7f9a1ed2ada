"""One connection of a lab host's guestfwd: QEMU runs this per connection with the guest's
bytes on stdin, and sends what it prints back to the guest. Pipes them to HOST:PORT.

    python tests/hwlab/relay.py HOST PORT
"""

from __future__ import annotations

import os
import selectors
import socket
import sys


def main() -> None:
    sock = socket.create_connection((sys.argv[1], int(sys.argv[2])))
    sel = selectors.DefaultSelector()
    sel.register(0, selectors.EVENT_READ)
    sel.register(sock, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj == 0:
                data = os.read(0, 65536)
                if not data:
                    sock.shutdown(socket.SHUT_WR)
                    sel.unregister(0)
                    continue
                sock.sendall(data)
            else:
                data = sock.recv(65536)
                if not data:
                    return
                while data:
                    data = data[os.write(1, data) :]


if __name__ == "__main__":
    main()
