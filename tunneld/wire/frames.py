"""Frame encoding and incremental decoding (PROTOCOL.md documents every byte).

A frame is a 10-byte header followed by its payload::

    type u8 | flags u8 | stream id u32 | payload length u32 | payload

`encode` turns an event into bytes; `FrameDecoder` turns bytes into events.
Whatever `encode` accepts decodes back to an equal event (both sides run the
same validators), and the decoder raises only `RemoteProtocolError`, whatever
bytes it is fed. Sans-IO: no trio, no sockets.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import struct
from collections.abc import Callable, Iterator
from typing import Any, Final

from tunneld.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from tunneld.wire.events import (
    PROTOCOL_VERSION,
    TICKET_SIZE,
    AccessRule,
    Ban,
    BanEntry,
    Data,
    Dial,
    Eof,
    Event,
    FrameType,
    GoAway,
    Hello,
    Open,
    Ping,
    Pong,
    Reset,
    ResetCode,
    Welcome,
    Window,
)

HEADER: Final = struct.Struct("!BBII")
HEADER_SIZE: Final = HEADER.size  # 10
MAX_FRAME_SIZE: Final = 1 << 20  # largest payload a receiver must accept (default limit)
MAX_STREAM_ID: Final = 2**32 - 1
MAX_WINDOW: Final = 2**31 - 1  # largest credit a stream may hold (as in HTTP/2)
MAX_U32: Final = 2**32 - 1
PING_SIZE: Final = 8
MAX_SNI: Final = 255

_U32: Final = struct.Struct("!I")
_DATA: Final = int(FrameType.DATA)
_PORT_SNI: Final = struct.Struct("!HB")

_CONTROL: Final = frozenset(
    {
        FrameType.HELLO,
        FrameType.WELCOME,
        FrameType.BAN,
        FrameType.GOAWAY,
        FrameType.PING,
        FrameType.PONG,
        FrameType.DIAL,
    }
)
_JSON: Final = frozenset({FrameType.HELLO, FrameType.WELCOME, FrameType.BAN, FrameType.GOAWAY})
# Payload lengths known from the header alone, checked before buffering the payload.
_FIXED_LENGTH: Final = {
    FrameType.WINDOW: 4,
    FrameType.EOF: 0,
    FrameType.RESET: 4,
    FrameType.PING: PING_SIZE,
    FrameType.PONG: PING_SIZE,
    FrameType.DIAL: TICKET_SIZE,
}
_OPEN_MIN: Final = 1 + 4 + 2 + 1 + 1  # IPv4, one SNI byte
_OPEN_MAX: Final = 1 + 16 + 2 + 1 + MAX_SNI

ErrorType = type[ProtocolError]


def pack_header(ftype: int, stream_id: int, length: int) -> bytes:
    """The 10 header bytes of a frame (flags are always 0 in protocol 1)."""
    return HEADER.pack(ftype, 0, stream_id, length)


def append_data_frame(buf: bytearray, stream_id: int, payload: bytes | memoryview) -> None:
    """Append one DATA frame to `buf`: header + payload, one copy of the payload."""
    buf += HEADER.pack(FrameType.DATA, 0, stream_id, len(payload))
    buf += payload


def encode(event: Event) -> bytes:
    """The bytes of one frame carrying `event`; LocalProtocolError if it is not encodable."""
    buf = bytearray()
    encode_into(buf, event)
    return bytes(buf)


def encode_into(buf: bytearray, event: Event) -> None:
    """Append the frame carrying `event` to `buf` (no intermediate copy of DATA payloads)."""
    if isinstance(event, Data):
        _check_stream_id(event.stream_id, LocalProtocolError)
        if not isinstance(event.data, bytes | bytearray | memoryview):
            raise LocalProtocolError("Data.data must be bytes")
        if not event.data:
            raise LocalProtocolError("empty DATA frames are not allowed")
        if len(event.data) > MAX_FRAME_SIZE:
            raise LocalProtocolError(f"DATA payload over {MAX_FRAME_SIZE} bytes")
        append_data_frame(buf, event.stream_id, event.data)
        return
    ftype, stream_id, payload = _encode_payload(event)
    buf += HEADER.pack(ftype, 0, stream_id, len(payload))
    buf += payload


def _encode_payload(event: Event) -> tuple[FrameType, int, bytes]:
    err = LocalProtocolError
    if isinstance(event, Window):
        _check_stream_id(event.stream_id, err)
        _check_int(event.increment, 1, MAX_WINDOW, "WINDOW increment", err)
        return FrameType.WINDOW, event.stream_id, _U32.pack(event.increment)
    if isinstance(event, Eof):
        _check_stream_id(event.stream_id, err)
        return FrameType.EOF, event.stream_id, b""
    if isinstance(event, Reset):
        _check_stream_id(event.stream_id, err)
        _check_int(event.code, 0, MAX_U32, "RESET code", err)
        return FrameType.RESET, event.stream_id, _U32.pack(event.code)
    if isinstance(event, Open):
        _check_stream_id(event.stream_id, err)
        if event.ticket is None:
            return FrameType.OPEN, event.stream_id, _encode_open(event)
        return FrameType.ATTACH, event.stream_id, _check_ticket(event.ticket) + _encode_open(event)
    if isinstance(event, Dial):
        return FrameType.DIAL, 0, _check_ticket(event.ticket)
    if isinstance(event, Ping | Pong):
        if not isinstance(event.payload, bytes) or len(event.payload) != PING_SIZE:
            raise err(f"{type(event).__name__} payload must be exactly {PING_SIZE} bytes")
        ftype = FrameType.PING if isinstance(event, Ping) else FrameType.PONG
        return ftype, 0, event.payload
    if isinstance(event, Hello):
        obj: dict[str, Any] = {
            "protocol": event.protocol,
            "version": event.version,
            "hostnames": _as_list(event.hostnames),
            "window": event.window,
            "max_streams": event.max_streams,
        }
        if event.data_connections:  # absent means none: what a peer before it sends
            obj["data_connections"] = event.data_connections
        _hello(obj, err)
        return FrameType.HELLO, 0, _dump_json(obj)
    if isinstance(event, Welcome):
        obj = {
            "protocol": event.protocol,
            "session_id": event.session_id,
            "hostnames": _as_list(event.hostnames),
            "window": event.window,
            "ping_interval": event.ping_interval,
        }
        if event.data_connections:
            obj["data_connections"] = event.data_connections
        if event.access:
            obj["access"] = True
        _welcome(obj, err)
        return FrameType.WELCOME, 0, _dump_json(obj)
    if isinstance(event, Ban):
        bans: list[Any] = []
        for entry in _as_list(event.entries):
            if not isinstance(entry, BanEntry):
                raise err("Ban.entries must hold BanEntry values")
            bans.append({"ip": entry.ip, "until": entry.until})
        obj = {"replace": event.replace, "bans": bans}
        if event.access is not None:
            rules: list[Any] = []
            for rule in _as_list(event.access):
                if not isinstance(rule, AccessRule):
                    raise err("Ban.access must hold AccessRule values")
                rules.append(
                    {
                        "hostname": rule.hostname,
                        "allow": _as_list(rule.allow),
                        "deny": _as_list(rule.deny),
                    }
                )
            obj["access"] = rules
        _ban(obj, err)
        return FrameType.BAN, 0, _dump_json(obj)
    if isinstance(event, GoAway):
        obj = {"code": event.code, "reason": event.reason}
        _goaway(obj, err)
        return FrameType.GOAWAY, 0, _dump_json(obj)
    raise err(f"{type(event).__name__} is not a frame")


def _encode_open(event: Open) -> bytes:
    err = LocalProtocolError
    if not isinstance(event.client_ip, str):
        raise err("Open.client_ip must be a string")
    try:
        addr = ipaddress.ip_address(event.client_ip)
    except ValueError:
        raise err(f"Open.client_ip is not an IP address: {event.client_ip!r}") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # one bare address per client, as the home logs and bans it
    _check_int(event.client_port, 0, 65535, "Open.client_port", err)
    sni = _check_sni(event.sni, err)
    return b"".join(
        (bytes((addr.version,)), addr.packed, _PORT_SNI.pack(event.client_port, len(sni)), sni)
    )


def _dump_json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _as_list(value: object) -> list[Any]:
    if isinstance(value, tuple | list):
        return list(value)
    raise LocalProtocolError("expected a tuple")


class FrameDecoder:
    """Incremental decoder: `feed(bytes)`, then `next_event()` until it returns None.

    A header announcing a payload over `max_frame_size` (or any malformed
    header) fails as soon as its 10 bytes are in, before the payload is
    buffered. The buffer holds at most the bytes fed and not yet decoded.
    """

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        if not 1 <= max_frame_size <= MAX_U32:
            raise ValueError("max_frame_size must be between 1 and 2**32-1")
        self.max_frame_size = max_frame_size
        # Whole fed `bytes` are kept as they are (frames are sliced straight out of
        # them); only a partial frame carried over to the next feed is copied.
        self._data: bytes | bytearray = b""
        self._pos = 0

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet decoded (0 means we stand between frames)."""
        return len(self._data) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if self._pos >= len(self._data):
            self._data = data if isinstance(data, bytes) else bytes(data)
            self._pos = 0
            return
        if isinstance(self._data, bytearray):
            del self._data[: self._pos]  # O(1) in CPython: moves the buffer start
            self._data += data
        else:
            buf = bytearray(memoryview(self._data)[self._pos :])
            buf += data
            self._data = buf
        self._pos = 0

    def __iter__(self) -> Iterator[Event]:
        while (event := self.next_event()) is not None:
            yield event

    def next_event(self) -> Event | None:
        """The next complete frame as an event, or None if more bytes are needed."""
        data, pos = self._data, self._pos
        if len(data) - pos < HEADER_SIZE:
            return None
        raw_type, flags, stream_id, length = HEADER.unpack_from(data, pos)
        # DATA is nearly every frame: its checks inline, without the enum lookups.
        is_data = (
            raw_type == _DATA and not flags and stream_id and 0 < length <= self.max_frame_size
        )
        ftype = (
            FrameType.DATA if is_data else self._check_header(raw_type, flags, stream_id, length)
        )
        start = pos + HEADER_SIZE
        end = start + length
        if len(data) < end:
            return None
        payload = data[start:end] if isinstance(data, bytes) else bytes(memoryview(data)[start:end])
        if end == len(data):
            self._data, self._pos = b"", 0  # release the fed buffer at once
        else:
            self._pos = end
        if is_data:
            return Data(stream_id, payload)
        return _decode_payload(ftype, stream_id, payload)

    def _check_header(self, raw_type: int, flags: int, stream_id: int, length: int) -> FrameType:
        err = RemoteProtocolError
        try:
            ftype = FrameType(raw_type)
        except ValueError:
            raise err(f"unknown frame type 0x{raw_type:02x}") from None
        if flags:
            raise err(f"{ftype.name} frame with flags 0x{flags:02x} (must be 0)")
        if length > self.max_frame_size:
            raise err(f"{ftype.name} frame of {length} bytes exceeds {self.max_frame_size}")
        if ftype in _CONTROL:
            if stream_id != 0:
                raise err(f"{ftype.name} frame on stream {stream_id} (must be 0)")
        elif stream_id == 0:
            raise err(f"{ftype.name} frame on stream 0")
        expected = _FIXED_LENGTH.get(ftype)
        if expected is not None and length != expected:
            raise err(f"{ftype.name} payload of {length} bytes (must be {expected})")
        if ftype is FrameType.DATA and length == 0:
            raise err("empty DATA frame")
        if ftype is FrameType.OPEN and not _OPEN_MIN <= length <= _OPEN_MAX:
            raise err(f"OPEN payload of {length} bytes")
        if ftype is FrameType.ATTACH and not _OPEN_MIN <= length - TICKET_SIZE <= _OPEN_MAX:
            raise err(f"ATTACH payload of {length} bytes")
        if ftype in _JSON and length < 2:
            raise err(f"{ftype.name} payload of {length} bytes is not a JSON object")
        return ftype


def decode(data: bytes, max_frame_size: int = MAX_FRAME_SIZE) -> list[Event]:
    """Decode whole frames; RemoteProtocolError if anything is malformed or left over."""
    decoder = FrameDecoder(max_frame_size)
    decoder.feed(data)
    events = list(decoder)
    if decoder.buffered:
        raise RemoteProtocolError(f"{decoder.buffered} bytes of an incomplete frame")
    return events


def _decode_payload(ftype: FrameType, stream_id: int, payload: bytes) -> Event:
    err = RemoteProtocolError
    if ftype is FrameType.DATA:
        return Data(stream_id, payload)
    if ftype is FrameType.WINDOW:
        (increment,) = _U32.unpack(payload)
        _check_int(increment, 1, MAX_WINDOW, "WINDOW increment", err)
        return Window(stream_id, increment)
    if ftype is FrameType.EOF:
        return Eof(stream_id)
    if ftype is FrameType.RESET:
        (code,) = _U32.unpack(payload)
        return Reset(stream_id, _code(code))
    if ftype is FrameType.OPEN:
        return _decode_open(stream_id, payload)
    if ftype is FrameType.ATTACH:
        opened = _decode_open(stream_id, payload[TICKET_SIZE:])
        return dataclasses.replace(opened, ticket=payload[:TICKET_SIZE])
    if ftype is FrameType.DIAL:
        return Dial(payload)
    if ftype is FrameType.PING:
        return Ping(payload)
    if ftype is FrameType.PONG:
        return Pong(payload)
    obj = _load_json(ftype, payload)
    parse: Callable[[dict[str, Any], ErrorType], Event] = _JSON_PARSERS[ftype]
    return parse(obj, err)


def _decode_open(stream_id: int, payload: bytes) -> Open:
    err = RemoteProtocolError
    family = payload[0]
    if family == 4:
        addr_len = 4
    elif family == 6:
        addr_len = 16
    else:
        raise err(f"OPEN with address family {family} (must be 4 or 6)")
    if len(payload) < 1 + addr_len + _PORT_SNI.size:
        raise err("OPEN payload too short")
    port, sni_len = _PORT_SNI.unpack_from(payload, 1 + addr_len)
    sni_start = 1 + addr_len + _PORT_SNI.size
    if len(payload) != sni_start + sni_len:
        raise err(f"OPEN payload of {len(payload)} bytes does not match its SNI length")
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address
    if family == 4:
        addr = ipaddress.IPv4Address(payload[1:5])
    else:
        addr = ipaddress.IPv6Address(payload[1:17])
        if addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
    sni_bytes = payload[sni_start:]
    try:
        sni = sni_bytes.decode("ascii")
    except UnicodeDecodeError:
        raise err("OPEN SNI is not ASCII") from None
    _check_sni(sni, err)
    return Open(stream_id, addr.compressed, port, sni)


def _load_json(ftype: FrameType, payload: bytes) -> dict[str, Any]:
    err = RemoteProtocolError

    def reject_constant(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    try:
        obj = json.loads(payload.decode("utf-8"), parse_constant=reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise err(f"{ftype.name} payload is not valid UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise err(f"{ftype.name} payload is not a JSON object")
    return obj


# --- validators shared by encode (LocalProtocolError) and decode (RemoteProtocolError) ---


def _field(obj: dict[str, Any], key: str, kind: str, err: ErrorType) -> Any:
    if key not in obj:
        raise err(f"{kind} is missing {key!r}")
    return obj[key]


def _check_int(value: object, low: int, high: int, what: str, err: ErrorType) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise err(f"{what} must be an integer")
    if not low <= value <= high:
        raise err(f"{what} {value} out of range {low}..{high}")
    return value


def _check_str(value: object, what: str, err: ErrorType) -> str:
    if not isinstance(value, str):
        raise err(f"{what} must be a string")
    return value


def _check_number(value: object, what: str, err: ErrorType) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise err(f"{what} must be a number")
    if not math.isfinite(value):
        raise err(f"{what} must be finite")
    return float(value)


def _check_hostnames(value: object, kind: str, err: ErrorType) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise err(f"{kind} hostnames must be a list")
    return tuple(_check_str(h, f"{kind} hostname", err) for h in value)


def _check_protocol(obj: dict[str, Any], kind: str, err: ErrorType) -> int:
    protocol = _check_int(_field(obj, "protocol", kind, err), 0, MAX_U32, "protocol", err)
    if protocol != PROTOCOL_VERSION:
        # Checked first: another version's other keys cannot be judged by our rules.
        raise err(f"{kind} speaks protocol {protocol}; this side speaks {PROTOCOL_VERSION}")
    return protocol


def _check_stream_id(stream_id: object, err: ErrorType) -> None:
    _check_int(stream_id, 1, MAX_STREAM_ID, "stream id", err)


def _check_sni(sni: object, err: ErrorType) -> bytes:
    if not isinstance(sni, str):
        raise err("SNI must be a string")
    if not sni or len(sni) > MAX_SNI or not sni.isascii() or not sni.isprintable() or " " in sni:
        raise err(f"SNI must be 1..{MAX_SNI} printable ASCII characters: {sni!r}")
    return sni.encode("ascii")


def _code(code: int) -> int:
    """Known codes as ResetCode (readable in logs), unknown ones as plain ints."""
    try:
        return ResetCode(code)
    except ValueError:
        return code


def _hello(obj: dict[str, Any], err: ErrorType) -> Hello:
    kind = "HELLO"
    protocol = _check_protocol(obj, kind, err)
    return Hello(
        version=_check_str(_field(obj, "version", kind, err), "HELLO version", err),
        hostnames=_check_hostnames(_field(obj, "hostnames", kind, err), kind, err),
        window=_check_int(_field(obj, "window", kind, err), 1, MAX_WINDOW, "HELLO window", err),
        max_streams=_check_int(
            _field(obj, "max_streams", kind, err), 1, MAX_U32, "HELLO max_streams", err
        ),
        protocol=protocol,
        data_connections=_data_connections(obj, kind, err),
    )


def _data_connections(obj: dict[str, Any], kind: str, err: ErrorType) -> int:
    value = obj.get("data_connections", 0)
    return _check_int(value, 0, MAX_U32, f"{kind} data_connections", err)


def _check_ticket(ticket: object) -> bytes:
    if not isinstance(ticket, bytes) or len(ticket) != TICKET_SIZE:
        raise LocalProtocolError(f"a ticket is exactly {TICKET_SIZE} bytes")
    return ticket


def _welcome(obj: dict[str, Any], err: ErrorType) -> Welcome:
    kind = "WELCOME"
    protocol = _check_protocol(obj, kind, err)
    interval = _check_number(_field(obj, "ping_interval", kind, err), "ping_interval", err)
    if interval <= 0:
        raise err("WELCOME ping_interval must be positive")
    return Welcome(
        session_id=_check_str(_field(obj, "session_id", kind, err), "session_id", err),
        hostnames=_check_hostnames(_field(obj, "hostnames", kind, err), kind, err),
        window=_check_int(_field(obj, "window", kind, err), 1, MAX_WINDOW, "WELCOME window", err),
        ping_interval=interval,
        protocol=protocol,
        data_connections=_data_connections(obj, kind, err),
        access=_optional_bool(obj, "access", "WELCOME", err),
    )


def _optional_bool(obj: dict[str, Any], key: str, kind: str, err: ErrorType) -> bool:
    value = obj.get(key, False)
    if not isinstance(value, bool):
        raise err(f"{kind} {key} must be a boolean")
    return value


def _access(value: object, err: ErrorType) -> tuple[AccessRule, ...]:
    if not isinstance(value, list):
        raise err("BAN access must be a list")
    rules = []
    for item in value:
        if not isinstance(item, dict):
            raise err("BAN access rule must be an object")
        hostname = _check_str(_field(item, "hostname", "BAN access rule", err), "hostname", err)
        lists = []
        for key in ("allow", "deny"):
            networks = _field(item, key, "BAN access rule", err)
            if not isinstance(networks, list) or not all(isinstance(n, str) for n in networks):
                raise err(f"BAN access {key} must be a list of strings")
            for network in networks:
                try:
                    ipaddress.ip_network(network)
                except ValueError:
                    raise err(f"BAN access {key} holds a bad network: {network!r}") from None
            lists.append(tuple(networks))
        rules.append(AccessRule(hostname, lists[0], lists[1]))
    return tuple(rules)


def _ban(obj: dict[str, Any], err: ErrorType) -> Ban:
    replace = _field(obj, "replace", "BAN", err)
    if not isinstance(replace, bool):
        raise err("BAN replace must be a boolean")
    bans = _field(obj, "bans", "BAN", err)
    if not isinstance(bans, list):
        raise err("BAN bans must be a list")
    entries = []
    for item in bans:
        if not isinstance(item, dict):
            raise err("BAN entry must be an object")
        ip = _check_str(_field(item, "ip", "BAN entry", err), "BAN ip", err)
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise err(f"BAN ip is not an IP address: {ip!r}") from None
        until = _field(item, "until", "BAN entry", err)
        entries.append(BanEntry(ip, None if until is None else _check_number(until, "until", err)))
    access = _access(obj["access"], err) if "access" in obj else None
    return Ban(tuple(entries), replace, access)


def _goaway(obj: dict[str, Any], err: ErrorType) -> GoAway:
    code = _check_int(_field(obj, "code", "GOAWAY", err), 0, MAX_U32, "GOAWAY code", err)
    reason = _check_str(_field(obj, "reason", "GOAWAY", err), "GOAWAY reason", err)
    return GoAway(_code(code), reason)


_JSON_PARSERS: Final[dict[FrameType, Callable[[dict[str, Any], ErrorType], Event]]] = {
    FrameType.HELLO: _hello,
    FrameType.WELCOME: _welcome,
    FrameType.BAN: _ban,
    FrameType.GOAWAY: _goaway,
}
