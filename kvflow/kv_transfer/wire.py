"""The KV transfer protocol: length-prefixed msgpack control messages, raw KV bytes after them.

A decode instance connects to a prefill instance and sends `Pull`. The prefill side answers with
a `Header`, then one `Layer` per model layer as each becomes ready — over TCP the layer's bytes
follow the message on the socket; over shared memory they are already in the segment the header
names, at the offset the message gives — then `Done` with the first token (and the logprobs the
request asked for: the first token's, the prompt's). The puller installs the KV and answers
`Ack`, after which the prefill side may free its blocks. A `Pull` may skip the first `start`
prompt tokens: an n > 1 sibling on the decode side shares them with its leader. Tensors are never
pickled: a layer travels as raw bytes, per token, in the KV-cache spec's wire layout
(kvflow/attention/kv_spec.py: per component, [2 (k, v), kv_heads, tokens, width]; for KIVI, the
tokens still dense in the sequence's ring follow in the model's dtype).
"""

from __future__ import annotations

import socket
import struct

import msgspec

from kvflow.sampling_params import MAX_LOGPROBS

_LENGTH = struct.Struct("!I")
MAX_CONTROL_BYTES = 1 << 20  # a control message is small; anything bigger is a corrupt stream
# A `Done` may also carry one prompt-logprob entry per prompt token; msgpack-encoded, an entry with
# top-MAX_LOGPROBS alternatives is under this many bytes.
PROMPT_LOGPROB_BYTES = 32 + 18 * MAX_LOGPROBS

# One token's logprob entry on the wire: (token id, logprob, top ids, top logprobs).
WireLogprobs = tuple[int, float, list[int], list[float]]


class KVTransferParams(msgspec.Struct):
    """Carried by a request: on a prefill instance it names the transfer its KV is served under;
    on a decode instance `source` is the prefill instance (HOST:PORT) to pull it from."""

    transfer_id: str
    source: str | None = None


class Pull(msgspec.Struct, tag="pull", array_like=True):
    transfer_id: str
    start: int = 0  # the first prompt token to send: the puller already holds the ones before


def done_limit(num_prompt_tokens: int) -> int:
    """The largest `Done` a transfer of this prompt may send (prompt logprobs included)."""
    return MAX_CONTROL_BYTES + num_prompt_tokens * PROMPT_LOGPROB_BYTES


class Header(msgspec.Struct, tag="header", array_like=True):
    transfer_id: str
    num_layers: int
    num_tokens: int
    kv_format: str  # the KV-cache spec's wire format: both instances must store KV the same way
    layer_nbytes: int
    shm_name: str | None = None  # shm transport: the segment holding every layer back to back
    start: int = 0  # the layers hold tokens [start, num_tokens) (the `Pull`'s start)


class Layer(msgspec.Struct, tag="layer", array_like=True):
    index: int
    offset: int = 0  # shm: where the layer starts in the segment (tcp: its bytes follow)


class Done(msgspec.Struct, tag="done", array_like=True):
    first_token: int
    # The first token's logprob entry when the request asked for logprobs: (logprob, top ids, top logprobs).
    logprobs: tuple[float, list[int], list[float]] | None = None
    # The prompt's logprobs when the request asked for them: one entry per prompt token, None for
    # token 0 (nothing predicts it), as the colocated engine emits them.
    prompt_logprobs: list[WireLogprobs | None] | None = None


class Failed(msgspec.Struct, tag="failed", array_like=True):
    message: str


class Ack(msgspec.Struct, tag="ack", array_like=True):
    pass


Message = Pull | Header | Layer | Done | Failed | Ack
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


class ProtocolError(RuntimeError):
    """The peer sent something out of order, malformed, or hung up mid-transfer."""


class Channel:
    """A connected socket speaking this protocol, counting the bytes each way."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.bytes_sent = 0
        self.bytes_received = 0

    def send(self, message: Message) -> None:
        body = _encoder.encode(message)
        self.sock.sendall(_LENGTH.pack(len(body)) + body)
        self.bytes_sent += _LENGTH.size + len(body)

    def send_raw(self, data: memoryview | bytes) -> None:
        self.sock.sendall(data)
        self.bytes_sent += len(data)

    def recv(self, limit: int = MAX_CONTROL_BYTES) -> Message:
        """The next control message; one longer than `limit` bytes means a corrupt stream."""
        (length,) = _LENGTH.unpack(self._recv_bytes(_LENGTH.size))
        if length > limit:
            raise ProtocolError(f"control message of {length} bytes")
        try:
            return _decoder.decode(self._recv_bytes(length))
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"malformed control message: {exc}") from None

    def recv_into(self, view: memoryview) -> None:
        """Fill `view` from the socket (no intermediate copies); raise if the peer hangs up first."""
        got = 0
        while got < len(view):
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise ProtocolError(f"peer closed the connection after {got} of {len(view)} bytes")
            got += n
        self.bytes_received += got

    def _recv_bytes(self, n: int) -> bytes:
        buf = bytearray(n)
        self.recv_into(memoryview(buf))
        return bytes(buf)


def expect(message: Message, kind: type) -> Message:
    if isinstance(message, Failed):
        raise ProtocolError(f"the prefill instance failed the transfer: {message.message}")
    if not isinstance(message, kind):
        raise ProtocolError(f"expected {kind.__name__}, got {type(message).__name__}")
    return message
