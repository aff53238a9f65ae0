#!/usr/bin/env python3
"""Connections for bench/compare.sh's memory figures (standard library only).

  conns.py idle PORT N        N keep-alive connections, one GET each, then held open:
                              prints "ready" once all are answered, closes them when
                              stdin closes.
  conns.py concurrent PORT N PATH
                              N connections each sending GET PATH at once; exits once
                              every answer is in (so a proxy opens N backend
                              connections, which it then keeps pooled).
"""
import asyncio
import sys

REQUEST = "GET {path} HTTP/1.1\r\nHost: web\r\n\r\n"


async def exchange(port, path):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(REQUEST.format(path=path).encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    await reader.readexactly(length)
    if not head.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"unexpected answer: {head[:40]!r}")
    return writer


async def idle(port, n):
    writers = []
    for start in range(0, n, 100):
        batch = range(start, min(n, start + 100))
        writers += await asyncio.gather(*(exchange(port, "/") for _ in batch))
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for w in writers:
        w.close()


async def concurrent(port, n, path):
    writers = await asyncio.gather(*(exchange(port, path) for _ in range(n)))
    for w in writers:
        w.close()


def main():
    mode, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if mode == "idle":
        asyncio.run(idle(port, n))
    elif mode == "concurrent":
        asyncio.run(concurrent(port, n, sys.argv[4]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
