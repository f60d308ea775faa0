"""TCP forwarder for _support/netns.py: accepts on an inherited listening socket (bound in
the host's namespace) and connects to 127.0.0.1:PORT in the namespace it runs in.

    nsenter --net=/proc/PID/ns/net python netns_forward.py LISTEN_FD PORT
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def main(fd: int, port: int) -> None:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            inner_r, inner_w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(pipe(client_r, inner_w), pipe(inner_r, client_w))

    listener = socket.socket(fileno=fd)
    server = await asyncio.start_server(handle, sock=listener)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
