"""A third-party HTTP/3 client (aioquic) against quicar's inbound port, for tests/it/interop.rs.

Usage: aioquic_client.py HOST PORT CA CERT KEY
Prints one JSON object: what each case got. Every case runs on its own connection, and a
plain request after the hostile ones shows the sidecar is still healthy.
"""

import asyncio
import json
import sys

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.buffer import encode_uint_var
from aioquic.h3.connection import H3_ALPN, H3Connection, Setting
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, StopSendingReceived, StreamReset

HOST, PORT, CA, CERT, KEY = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]


def frame(kind: int, payload: bytes) -> bytes:
    return encode_uint_var(kind) + encode_uint_var(len(payload)) + payload


class GreasyH3(H3Connection):
    """Announces one more setting type nobody defines (RFC 9114 §7.2.4.1: ignored)."""

    def _get_local_settings(self):
        settings = super()._get_local_settings()
        settings[0x1F * 7 + 0x21] = 42
        return settings


class Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = GreasyH3(self._quic)
        self.waiters = {}
        self.results = {}
        self.closed = None
        self.stops = {}

    def quic_event_received(self, event):
        if isinstance(event, StopSendingReceived):
            self.stops.setdefault(event.stream_id, []).append(event.error_code)
        if isinstance(event, ConnectionTerminated):
            self.closed = event.error_code
            for w in self.waiters.values():
                if not w.done():
                    w.set_result(None)
        if isinstance(event, StreamReset):
            r = self.results.setdefault(event.stream_id, {"status": None, "headers": {}, "body": b""})
            r["reset"] = event.error_code
            w = self.waiters.get(event.stream_id)
            if w and not w.done():
                w.set_result(r)
        for e in self.h3.handle_event(event):
            r = self.results.setdefault(e.stream_id, {"status": None, "headers": {}, "body": b""})
            if isinstance(e, HeadersReceived):
                h = dict((k.decode(), v.decode()) for k, v in e.headers)
                if r["status"] is None:
                    r["status"] = int(h.get(":status", "0"))
                    r["headers"] = h
            elif isinstance(e, DataReceived):
                r["body"] += e.data
            if getattr(e, "stream_ended", False):
                w = self.waiters.get(e.stream_id)
                if w and not w.done():
                    w.set_result(r)

    def stream(self):
        sid = self._quic.get_next_available_stream_id()
        self.waiters[sid] = asyncio.get_event_loop().create_future()
        return sid

    async def wait(self, sid, timeout=10):
        try:
            r = await asyncio.wait_for(self.waiters[sid], timeout)
        except asyncio.TimeoutError:
            return {"timeout": True}
        if r is None:
            return {"connection_closed": self.closed}
        out = {"status": r["status"], "error_kind": r["headers"].get("quicar-error"),
               "identity": None, "body_len": len(r["body"])}
        if "reset" in r:
            out["reset"] = r["reset"]
        return out


def headers(path, extra=()):
    return [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"hello"),
            (b":path", path.encode())] + list(extra)


async def case(name, body):
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN)
    config.load_verify_locations(CA)
    config.load_cert_chain(CERT, KEY)
    config.server_name = "hello"
    async with connect(HOST, PORT, configuration=config, create_protocol=Client) as c:
        return await body(c)


async def plain(c):
    sid = c.stream()
    c.h3.send_headers(sid, headers("/"), end_stream=True)
    c.transmit()
    return await c.wait(sid)


async def unknown_frame_first(c):
    # A reserved frame type before HEADERS must be ignored (RFC 9114 §7.2.8, §9).
    sid = c.stream()
    c._quic.send_stream_data(sid, frame(0x1F * 3 + 0x21, b"ignore me"), end_stream=False)
    c.h3.send_headers(sid, headers("/"), end_stream=True)
    c.transmit()
    return await c.wait(sid)


async def data_before_headers(c):
    # DATA before HEADERS: H3_FRAME_UNEXPECTED (RFC 9114 §4.1); the sidecar stays up.
    sid = c.stream()
    c._quic.send_stream_data(sid, frame(0x0, b"early") + frame(0x1, b""), end_stream=True)
    c.transmit()
    return await c.wait(sid, timeout=5)


async def oversized_headers(c):
    sid = c.stream()
    # 100 KiB of fields (over the sidecar's 64 KiB, under what its HTTP/3 layer takes).
    big = [(b"x-big-%d" % i, b"b" * 500) for i in range(200)]
    c.h3.send_headers(sid, headers("/", big), end_stream=True)
    c.transmit()
    return await c.wait(sid)


async def reset_mid_body(c):
    sid = c.stream()
    hs = headers("/sink")
    hs[0] = (b":method", b"POST")
    c.h3.send_headers(sid, hs + [(b"content-length", b"1000")], end_stream=False)
    c.h3.send_data(sid, b"x" * 10, end_stream=False)
    c.transmit()
    await asyncio.sleep(0.2)
    c._quic.reset_stream(sid, 0x10C)  # H3_REQUEST_CANCELLED
    c.transmit()
    await asyncio.sleep(0.2)
    # The connection is still usable after the reset.
    return await plain(c)


async def sized_body_fin_later(c):
    # A sized body whose FIN arrives after the body: the app has its content-length by then,
    # and the sidecar must not stop the stream with STOP_SENDING code 0, which is not an
    # HTTP/3 error code (RFC 9114 §8.1; Envoy drops the response when it gets one).
    sid = c.stream()
    hs = headers("/")
    hs[0] = (b":method", b"POST")
    c.h3.send_headers(sid, hs + [(b"content-length", b"5")], end_stream=False)
    c.h3.send_data(sid, b"hello", end_stream=False)
    c.transmit()
    await asyncio.sleep(0.5)
    try:
        c._quic.send_stream_data(sid, b"", end_stream=True)
    except ValueError:
        pass  # aioquic already reset its side after a STOP_SENDING (recorded below)
    c.transmit()
    r = await c.wait(sid)
    await asyncio.sleep(0.2)
    r["stop_sending"] = c.stops.get(sid, [])
    return r


async def bad_header_value(c):
    # A field value with a control character is a malformed request (RFC 9114 §4.1.2): refused,
    # never forwarded, and the connection keeps serving.
    sid = c.stream()
    c.h3.send_headers(sid, headers("/bad", [(b"x-bad", b"a\x01b")]), end_stream=True)
    c.transmit()
    r = await c.wait(sid, timeout=5)
    r["after"] = await plain(c)
    return r


async def bad_pseudo_headers(c):
    # A `:path` or `:authority` that is not a valid URI part is a malformed request: refused
    # with H3_MESSAGE_ERROR, never forwarded, and the connection keeps serving.
    out = {}
    for name, hs in [("path", headers("/bad path")),
                     ("authority", [(k, b"hel lo" if k == b":authority" else v)
                                    for k, v in headers("/bad-authority")])]:
        sid = c.stream()
        c.h3.send_headers(sid, hs, end_stream=True)
        c.transmit()
        out[name] = await c.wait(sid, timeout=5)
    out["after"] = await plain(c)
    return out


async def near_interned_names(c):
    # The receiver parses a few names sidecars send (traceparent, tracestate, quicar-deadline)
    # from a shared list: names of the same lengths that differ pass as themselves, and an
    # upper-case one is still a malformed request (RFC 9114 §4.2).
    sid = c.stream()
    c.h3.send_headers(sid, headers("/near", [(b"traceparenx", b"1"), (b"tracestatf", b"2")]),
                      end_stream=True)
    c.transmit()
    out = {"near": await c.wait(sid, timeout=5)}
    sid = c.stream()
    c.h3.send_headers(sid, headers("/bad-upper", [(b"Traceparent", b"1")]), end_stream=True)
    c.transmit()
    out["upper"] = await c.wait(sid, timeout=5)
    out["after"] = await plain(c)
    return out


async def main():
    out = {}
    for name, body in [("plain", plain), ("unknown_frame_first", unknown_frame_first),
                       ("data_before_headers", data_before_headers),
                       ("oversized_headers", oversized_headers),
                       ("reset_mid_body", reset_mid_body),
                       ("sized_body_fin_later", sized_body_fin_later),
                       ("bad_header_value", bad_header_value),
                       ("bad_pseudo_headers", bad_pseudo_headers),
                       ("near_interned_names", near_interned_names), ("still_healthy", plain)]:
        try:
            out[name] = await asyncio.wait_for(case(name, body), 20)
        except Exception as e:  # the case's outcome, reported to the Rust test
            out[name] = {"exception": repr(e)}
    print(json.dumps(out))


asyncio.run(main())
