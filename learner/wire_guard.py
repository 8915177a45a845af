"""Hostile bytes on the wire: every request that does not parse is refused with INVALID_ARGUMENT.

gRPC Python answers a request its deserializer cannot parse with INTERNAL ("Exception
deserializing request!"), which reads as a learner bug and tells the sender nothing. This
interceptor, the outermost one, swaps each method's deserializer for one that never raises: an
unparsable request becomes a ``Malformed`` value, and the call ends with INVALID_ARGUMENT naming
the method and the parse error before any other code (authentication rules, the service) sees
it. On the experience stream the batches before the malformed one are acknowledged as usual
(stored and durable); the stream ends at it, nothing after it is read.

It also refuses the requests that parse but carry ids no robot has (Subscribe robot ids over
``MAX_ID_CHARS``), so a hostile subscriber cannot make the learner keep megabyte-long keys, and
bounds every status message (``MAX_DETAILS_BYTES``): refusals quote what was wrong, and a quoted
10,000-character id would push the status past the client's 8 KiB header limit, which the client
then reports as RESOURCE_EXHAUSTED "Stream removed" instead of the learner's reason.
"""
from __future__ import annotations

import logging
from typing import Iterator

import grpc

from learner.validate import MAX_ID_CHARS

log = logging.getLogger("tether.learner.wire_guard")
# grpc-message is percent-encoded (a non-ASCII byte takes 3): 1,000 bytes stay under 3 KiB
MAX_DETAILS_BYTES = 1000


def bounded(details: str) -> str:
    data = details.encode("utf-8", "replace")
    if len(data) <= MAX_DETAILS_BYTES:
        return details
    return (data[:MAX_DETAILS_BYTES - 40].decode("utf-8", "ignore")
            + f"... ({len(data)} bytes, cut)")


class _BoundedContext:
    """The handler's context with status messages cut to ``MAX_DETAILS_BYTES``."""

    def __init__(self, context):
        self._context = context

    def abort(self, code, details):
        self._context.abort(code, bounded(str(details)))

    def set_details(self, details):
        self._context.set_details(bounded(str(details)))

    def __getattr__(self, name):
        return getattr(self._context, name)


class Malformed:
    """A request whose bytes are not a valid message of the method's request type."""
    __slots__ = ("error", "size")

    def __init__(self, error: str, size: int):
        self.error, self.size = error, size


class Received:
    """An experience batch as parsed, with the bytes it came in (``raw``): the store's validator
    children (learner/ingest_pool.py) take those bytes instead of a re-serialized copy.
    Attribute reads go to the parsed message."""
    __slots__ = ("message", "raw")

    def __init__(self, message, raw: bytes):
        self.message, self.raw = message, raw

    def __getattr__(self, name):
        return getattr(self.message, name)


def unwrap(request) -> tuple:
    """(message, raw bytes or None) of a request this guard passed on."""
    if isinstance(request, Received):
        return request.message, request.raw
    return request, None


# methods whose request keeps its bytes (``Received``)
_KEEP_RAW = ("/PushExperience", "/StreamExperience")


def _keeping_raw(parse):
    def deserialize(data: bytes):
        return Received(parse(data), data)
    return deserialize


class _MalformedInStream(Exception):
    """Raised by the stream's request iterator; the guard ends the call with it."""


def _lenient(parse):
    def deserialize(data: bytes):
        try:
            return parse(data)
        except Exception as e:  # noqa: BLE001 (protobuf raises DecodeError, or others on odd bytes)
            return Malformed(f"{type(e).__name__}: {e}"[:300], len(data))
    return deserialize


def _refusal(method: str, bad: Malformed) -> str:
    return (f"{method}: the request ({bad.size} bytes) is not a valid protobuf message for this "
            f"method ({bad.error}); nothing was done. Send messages built from "
            f"tether/wire/tether.proto")


def _check_parsed(method: str, request) -> str | None:
    """Why a parsed request is refused, or None."""
    if method.endswith("/Subscribe") and len(request.robot_id) > MAX_ID_CHARS:
        return (f"{method}: robot_id has {len(request.robot_id)} characters (limit "
                f"{MAX_ID_CHARS}); subscribe with the robot's id")
    return None


class WireGuard(grpc.ServerInterceptor):
    """Refuses unparsable requests with INVALID_ARGUMENT; counts them in ``refused``."""

    def __init__(self):
        self.refused = 0

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        if handler.request_streaming and handler.response_streaming:
            kind, wrap = "stream_stream", self._stream
        elif handler.request_streaming:
            return handler  # no stream-unary method in the service
        else:
            kind = "unary_stream" if handler.response_streaming else "unary_unary"
            wrap = self._unary_stream if handler.response_streaming else self._unary
        parse = handler.request_deserializer
        if method.endswith(_KEEP_RAW):
            parse = _keeping_raw(parse)
        return getattr(grpc, f"{kind}_rpc_method_handler")(
            wrap(getattr(handler, kind), method), _lenient(parse), handler.response_serializer)

    def _refuse(self, context, message: str):
        self.refused += 1
        # the first refusals are news; a flood of them (a fuzzer, a broken client) goes to debug
        log.log(logging.WARNING if self.refused <= 10 else logging.DEBUG,
                "wire: refused a request from %s: %s", context.peer(), message[:300])
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

    def _why(self, method: str, request) -> str | None:
        if isinstance(request, Malformed):
            return _refusal(method, request)
        return _check_parsed(method, request)

    def _unary(self, behaviour, method: str):
        def call(request, context):
            context = _BoundedContext(context)
            why = self._why(method, request)
            if why:
                self._refuse(context, why)
            return behaviour(request, context)
        return call

    def _unary_stream(self, behaviour, method: str):
        def call(request, context):
            context = _BoundedContext(context)
            why = self._why(method, request)
            if why:
                self._refuse(context, why)
            yield from behaviour(request, context)
        return call

    def _stream(self, behaviour, method: str):
        def call(requests, context):
            context = _BoundedContext(context)
            refused: list[str] = []

            def checked() -> Iterator:
                for request in requests:
                    why = self._why(method, request)
                    if why:
                        refused.append(why)
                        raise _MalformedInStream(why)  # the handler's reader stops here
                    yield request

            # as learner/auth.py: the handler may read on its own thread and swallow what the
            # reader raises; the refusal goes out here, after the acks of the earlier batches
            yield from behaviour(checked(), context)
            if refused:
                self._refuse(context, refused[0])
        return call
