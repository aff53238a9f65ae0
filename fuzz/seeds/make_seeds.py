#!/usr/bin/env python3
"""Writes the checked-in seed corpus of every fuzz target (fuzz/seeds/<target>/):
a few realistic inputs each, in the input format the target's header describes.

    python3 fuzz/seeds/make_seeds.py

Re-running rewrites the same files (names are the inputs' hashes).
"""

import hashlib
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, data):
    if isinstance(data, str):
        data = data.encode()
    folder = os.path.join(HERE, target)
    os.makedirs(folder, exist_ok=True)
    name = hashlib.sha1(data).hexdigest()[:16]
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)


# --- HTTP/1 --------------------------------------------------------------------------

REQUESTS = [
    "GET / HTTP/1.1\r\nHost: web:80\r\n\r\n",
    "GET /a?b=1 HTTP/1.1\r\nHost: web.default.svc.cluster.local\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n",
    "POST /api/orders HTTP/1.1\r\nHost: api:8080\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{\"id\": 12345}",
    "HEAD /healthz HTTP/1.1\r\nHost: 10.0.0.7:9090\r\nConnection: close\r\n\r\n",
    "GET /index.html HTTP/1.1\r\nHost: [::1]:8080\r\nConnection: keep-alive, X-Trace\r\nX-Trace: abc\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n\r\n",
    "GET /static/app.js HTTP/1.1\r\nHost: www.example.com\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\n"
    "Accept: text/html,application/xhtml+xml\r\nAccept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate, br\r\n"
    "Cookie: session=1f2e3d; theme=dark\r\nReferer: https://www.example.com/\r\nCache-Control: no-cache\r\n\r\n",
    "PUT /objects/7 HTTP/1.1\r\nHost: store\r\nContent-Length: 5\r\nProxy-Connection: keep-alive\r\n\r\nhello"
    "GET /next HTTP/1.1\r\nHost: store\r\n\r\n",
    "DELETE /sessions/9 HTTP/1.1\r\nHost: auth:443\r\nAuthorization: Bearer eyJhbGciOi\r\n\r\n",
]

RESPONSES = [
    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\nhello world",
    "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "HTTP/1.1 204 No Content\r\nDate: Mon, 21 Oct 2013 20:13:21 GMT\r\n\r\n",
    "HTTP/1.1 304 Not Modified\r\nETag: \"abc\"\r\nContent-Length: 120\r\n\r\n",
    "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\nok",
    "HTTP/1.1 301 Moved Permanently\r\nLocation: https://www.example.com/\r\nConnection: close\r\n\r\n",
    "HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2; HttpOnly\r\nVary: Accept-Encoding\r\n"
    "Transfer-Encoding: gzip, chunked\r\nContent-Length: 3\r\n\r\n",
    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    "HTTP/1.1 503 Service Unavailable\nRetry-After: 1\nContent-Length: 0\n\n",
]

CHUNKED = [
    b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n",
    b"3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\n",
    b"3\r\nabc\r\n0\r\ngrpc-status: 0\r\nx-t: 1\r\n\r\nNEXT",
    b"1A\r\n" + b"x" * 26 + b"\r\nA; name=\"v\"\r\n0123456789\r\n0\r\n\r\n",
    b"0\r\n\r\n",
]


def chunked_input(body, cuts):
    return bytes([len(cuts)]) + b"".join(struct.pack("<H", c) for c in cuts) + body


# --- HTTP/2 --------------------------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def settings(*pairs, ack=False):
    return frame(0x4, 0x1 if ack else 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in pairs))


def literal(name, value):
    """A literal without indexing, new name, no Huffman (RFC 7541 §6.2.2)."""
    assert len(name) < 127 and len(value) < 127
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def indexed_name(index, value, incremental=False):
    if incremental:
        return bytes([0x40 | index]) + bytes([len(value)]) + value
    return bytes([index]) + bytes([len(value)]) + value


END_STREAM, END_HEADERS, PADDED, PRIORITY = 0x1, 0x4, 0x8, 0x20

# RFC 7541 C.3 and C.4: requests without and with Huffman coding.
C3 = [
    bytes.fromhex("828684410f7777772e6578616d706c652e636f6d"),
    bytes.fromhex("828684be58086e6f2d6361636865"),
    bytes.fromhex("828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565"),
]
C4 = [
    bytes.fromhex("828684418cf1e3c2e5f23a6ba0ab90f4ff"),
    bytes.fromhex("828684be5886a8eb10649cbf"),
    bytes.fromhex("828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf"),
]
# RFC 7541 C.5 and C.6: responses with a 256-byte table (evictions).
C5 = [
    bytes.fromhex(
        "4803333032580770726976617465611d4d6f6e2c203231204f637420323031332032303a31333a323120474d54"
        "6e1768747470733a2f2f7777772e6578616d706c652e636f6d"
    ),
    bytes.fromhex("4803333037c1c0bf"),
    bytes.fromhex(
        "88c1611d4d6f6e2c203231204f637420323031332032303a31333a323220474d54c05a04677a6970"
        "7738666f6f3d4153444a4b48514b425a584f5157454f50495541585157454f49553b206d61782d6167653d"
        "333630303b2076657273696f6e3d31"
    ),
]
C6 = [
    bytes.fromhex(
        "488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29ad171863"
        "c78f0b97c8e9ae82ae43d3"
    ),
    bytes.fromhex("4883640effc1c0bf"),
]


def grpc_request(path=b"/greet.Greeter/SayHello"):
    return (
        b"\x83\x86"  # POST, http
        + indexed_name(4, path)
        + indexed_name(1, b"greeter.default.svc:50051")
        + indexed_name(31, b"application/grpc")
        + literal(b"te", b"trailers")
    )


def h2_seeds():
    client_settings = settings((0x3, 100), (0x4, 65535), (0x6, 16384))
    out = []
    # Server role (mode 0x00: whole reads, echo), h2c prior knowledge like curl.
    out.append(
        bytes([0x00])
        + client_settings
        + frame(0x8, 0, 0, struct.pack(">I", 1 << 20))
        + frame(0x1, END_STREAM | END_HEADERS, 1, C3[0])
        + settings(ack=True)
        + frame(0x6, 0, 0, b"12345678")
    )
    # gRPC call with a body split over DATA frames (one padded), trailers, then a
    # second request whose headers continue in a CONTINUATION frame.
    msg = b"\x00\x00\x00\x00\x07\x0a\x05world"
    out.append(
        bytes([0x02])  # reads of 1 byte
        + client_settings
        + frame(0x1, END_HEADERS, 1, grpc_request())
        + frame(0x0, 0, 1, msg[:6])
        + frame(0x0, PADDED, 1, bytes([3]) + msg[6:] + b"\x00\x00\x00")
        + frame(0x1, END_STREAM | END_HEADERS, 1, literal(b"x-end", b"1"))
        + frame(0x1, END_STREAM, 3, C4[0][:5])
        + frame(0x9, END_HEADERS, 3, C4[0][5:])
        + frame(0x8, 0, 1, struct.pack(">I", 100000))
        + frame(0x8, 0, 0, struct.pack(">I", 100000))
    )
    # Priority flag, PRIORITY frame, RST_STREAM, GOAWAY (mode: 64-byte reads, stream).
    out.append(
        bytes([0x66])
        + client_settings
        + frame(0x1, END_HEADERS | PRIORITY, 1, b"\x00\x00\x00\x00\x10" + C3[0])
        + frame(0x2, 0, 3, b"\x00\x00\x00\x01\x20")
        + frame(0x1, END_STREAM | END_HEADERS, 3, C3[0])
        + frame(0x3, 0, 1, struct.pack(">I", 8))
        + frame(0x7, 0, 0, struct.pack(">II", 3, 0))
    )
    # Rapid reset: many streams opened and reset (mode: reset behaviour).
    rapid = b""
    for sid in range(1, 40, 2):
        rapid += frame(0x1, END_HEADERS, sid, C3[0]) + frame(0x3, 0, sid, struct.pack(">I", 8))
    out.append(bytes([0x40]) + client_settings + rapid)
    # Client role (mode 0x01): the backend's SETTINGS, answers on streams 1 and 3.
    backend_settings = settings((0x3, 2), (0x4, 1 << 20), (0x5, 32768))
    out.append(
        bytes([0x01])
        + backend_settings
        + settings(ack=True)
        + frame(0x1, END_HEADERS, 1, b"\x88" + literal(b"content-type", b"text/plain"))
        + frame(0x0, 0, 1, b"hello ")
        + frame(0x0, END_STREAM, 1, b"world")
        + frame(0x1, END_HEADERS, 3, b"\x88" + indexed_name(28, b"5"))
        + frame(0x0, 0, 3, b"abcde")
        + frame(0x1, END_STREAM | END_HEADERS, 3, literal(b"grpc-status", b"0"))
        + frame(0x8, 0, 0, struct.pack(">I", 1 << 20))
        + frame(0x6, 0x1, 0, b"\x00" * 8)
        + frame(0x7, 0, 0, struct.pack(">II", 3, 0) + b"bye")
    )
    # Client role, responses with Huffman and the dynamic table (RFC 7541 C.6).
    out.append(
        bytes([0x0B])
        + settings((0x1, 256))
        + frame(0x1, END_HEADERS, 1, C6[0])
        + frame(0x0, END_STREAM, 1, b"<html></html>")
        + frame(0x1, END_HEADERS | END_STREAM, 3, C6[1])
    )
    return out


# --- discovery (protobuf) --------------------------------------------------------------


def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field_varint(num, n):
    return varint(num << 3) + varint(n)


def field_bytes(num, data):
    if isinstance(data, str):
        data = data.encode()
    return varint(num << 3 | 2) + varint(len(data)) + data


def field_double(num, x):
    return varint(num << 3 | 1) + struct.pack("<d", x)


def locality(region, zone, subzone=""):
    return field_bytes(1, region) + field_bytes(2, zone) + (field_bytes(3, subzone) if subzone else b"")


def endpoint(address, weight=1, zone="zone-a", health=1, protocol=0, name=""):
    return (
        field_bytes(1, address)
        + field_varint(2, weight)
        + field_bytes(3, locality("region-1", zone))
        + field_varint(4, health)
        + (field_varint(6, protocol) if protocol else b"")
        + (field_bytes(7, name) if name else b"")
    )


def share(zone, x):
    return field_bytes(1, zone) + field_double(2, x)


def policy(path="/healthz", timeout_ms=2000):
    check = field_bytes(1, path) + field_varint(2, 3000) + field_varint(3, 500) + field_varint(4, 3) + field_varint(5, 2)
    return field_bytes(1, check) + field_varint(2, timeout_ms)


def snapshot(service, endpoints, shares=(), proxy_zone=None, continued=False, pol=None, td=""):
    body = field_bytes(1, service)
    if proxy_zone:
        body += field_bytes(2, locality("region-1", proxy_zone))
    for z, x in shares:
        body += field_bytes(3, share(z, x))
    for e in endpoints:
        body += field_bytes(4, e)
    if td:
        body += field_bytes(5, td)
    if pol:
        body += field_bytes(6, pol)
    if continued:
        body += field_varint(7, 1)
    return body


def delta(added=(), changed=(), removed=(), shares=None, proxy_zone=None, td=None, pol=None):
    body = b""
    for e in added:
        body += field_bytes(1, e)
    for e in changed:
        body += field_bytes(2, e)
    for r in removed:
        body += field_bytes(3, r)
    if shares is not None:
        body += field_bytes(4, b"".join(field_bytes(1, share(z, x)) for z, x in shares))
    if proxy_zone is not None:
        body += field_bytes(5, locality("region-1", proxy_zone))
    if td is not None:
        body += field_bytes(6, td)
    if pol is not None:
        body += field_bytes(7, pol)
    return body


def update(version, snap=None, dlt=None):
    body = field_varint(1, version)
    if snap is not None:
        body += field_bytes(2, snap)
    if dlt is not None:
        body += field_bytes(3, dlt)
    return varint(len(body)) + body


SERVICE = "web.default.svc.cluster.local:80"


def discovery_seeds():
    eps = [endpoint(f"10.0.0.{i}:8080", weight=1 + i % 3, zone=f"zone-{'abc'[i % 3]}") for i in range(1, 8)]
    out = []
    out.append(
        b"\x00"
        + update(1000, snap=snapshot(SERVICE, eps, shares=[("zone-a", 40.0), ("zone-b", 40.0), ("zone-c", 20.0)], proxy_zone="zone-a", pol=policy(), td="PreferClose"))
        + update(1001, dlt=delta(added=[endpoint("10.0.0.9:8080", zone="zone-b")], removed=["10.0.0.1:8080"]))
        + update(1002, dlt=delta(changed=[endpoint("10.0.0.2:8080", health=2)], shares=[("zone-a", 1.0)], td=""))
    )
    out.append(
        b"\x00"
        + update(7, snap=snapshot(SERVICE, eps[:3], continued=True))
        + update(7, snap=snapshot("", eps[3:]))
        + update(8, dlt=delta(added=[endpoint("[fd00::1]:9000", protocol=2, name="pod-1")], proxy_zone="zone-c", pol=policy("/ready", 0)))
    )
    out.append(b"\x00" + update(5, snap=snapshot(SERVICE, [])) + update(6, dlt=delta(added=eps[:2])) + update(6, dlt=delta()))
    # Structured mode (odd mode byte): arbitrary bytes.
    out.append(b"\x01" + bytes(range(256)))
    out.append(b"\x07" + hashlib.sha512(b"discovery").digest() * 4)
    return out


# --- services files --------------------------------------------------------------------

SERVICES = [
    """
services:
  - name: web
    namespace: default
    port: 80
    callers: {zone-a: 40, zone-b: 40, zone-c: 20}
    endpoints:
      - {address: "127.0.0.1:9001", weight: 1, region: region-1, zone: zone-a, health: healthy}
      - {address: "127.0.0.1:9002", weight: 3, region: region-1, zone: zone-b, health: draining}
  - name: api
    port: 8080
    cluster_ip: 10.96.0.7
    protocol: http2
    timeout: 2s
    health_check: {path: /healthz, interval: 3s}
    endpoints:
      - address: "[::1]:9003"
nodes:
  - {name: node-a, region: region-1, zone: zone-a}
""",
    """# Written by `tandem demo`: the backends the control plane serves.
services:
  - name: web
    namespace: default
    port: 80
    endpoints:
      - {address: "127.0.0.1:40001", name: backend-1, weight: 1, region: local, zone: local-a}
      - {address: "127.0.0.1:40002", name: backend-2, weight: 1, region: local, zone: local-a}
      - {address: "127.0.0.1:40003", name: backend-3, weight: 1, region: local, zone: local-a}
""",
    "services:\n  - {name: web, port: 80, callers: counted}\n",
    """services:
  - name: grpc
    namespace: team-a
    port: 50051
    protocol: http2
    health_check:
      path: /grpc.health.v1.Health/Check
      interval: 10s
      timeout: 1s
      unhealthy_threshold: 3
      healthy_threshold: 2
    endpoints:
      - &ep {address: "10.1.0.4:50051", zone: zone-a, identity: spiffe://cluster.local/ns/team-a/sa/grpc}
      - {<<: *ep, address: "10.1.0.5:50051", zone: zone-b, health: unhealthy}
nodes:
  - name: node-1
    region: eu-west-1
    zone: eu-west-1a
    subzone: rack-7
""",
    "services: []\nnodes: []\n",
]


def main():
    for r in REQUESTS:
        write("http1_request", r)
    for r in RESPONSES:
        write("http1_response", r)
    for body in CHUNKED:
        write("http1_chunked", chunked_input(body, []))
        write("http1_chunked", chunked_input(body, [1, 4, 9, len(body) - 2]))
    for seed in h2_seeds():
        write("h2_frames", seed)

    def blocks(size_choice, bs):
        return bytes([size_choice]) + b"".join(bytes([len(b)]) + b for b in bs)

    write("hpack", blocks(0, C3))
    write("hpack", blocks(0, C4))
    write("hpack", blocks(2, C5))
    write("hpack", blocks(2, C6))
    write("hpack", blocks(0, [grpc_request(), b"\x3f\xe1\x1f\x82", b"\x20" + literal(b"x-a", b"1")]))
    for text in SERVICES:
        write("services_file", text)
    for seed in discovery_seeds():
        write("discovery", seed)


if __name__ == "__main__":
    main()
