"""What docs/protocol.md §2.2 and §2.4 say about frames a client should not send, against a real broker.

- a multipart message is handled part by part: a part that is a whole frame is a message, any other
  part is an `invalid_message` with an empty session;
- a frame over the broker's limit cuts the sender's connection without a word; libzmq reconnects it,
  and a hello with the same token (the handshake's steps 5 and 6) confirms the way is open again.

The broker runs in this process (a thread), on ipc sockets in a temporary directory.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from voxpipe import protocol
from voxpipe.runtime import Connection
from voxpipe.runtime.broker import Broker, Endpoints


@pytest.fixture
def endpoints() -> Iterator[Endpoints]:
    with tempfile.TemporaryDirectory(prefix="vp-transport-") as directory:
        path = Path(directory) / "bus"
        context = zmq.Context()
        broker = Broker(path, context)
        broker.start()
        try:
            yield Endpoints.in_dir(path)
        finally:
            broker.stop()
            context.destroy(linger=0)


def frame(kind: str, seq: int, **body: object) -> bytes:
    return protocol.encode(protocol.Message(protocol.KINDS[kind](**body), "s1", "r1", seq, time.time(), "tx"))


def received(connection: Connection, quiet: float = 0.3) -> list[protocol.Message]:
    """Every message until none comes for `quiet` seconds."""
    messages = []
    while (message := connection.receive(quiet)) is not None:
        messages.append(message)
    return messages


def test_each_part_of_a_multipart_message_is_handled_as_its_own_frame(endpoints: Endpoints) -> None:
    receiver = Connection("rx", endpoints, [protocol.subscription("token"), protocol.subscription("error", "")])
    sender = Connection("tx", endpoints, [])
    receiver.open(5)
    sender.open(5)
    try:
        assert sender._pub is not None
        sender._pub.send_multipart([frame("token", 0, text="one"), frame("token", 1, text="two")])
        sender._pub.send_multipart([b"token/s1", msgpack.packb({"v": 1, "kind": "token"})])
        messages = received(receiver)
    finally:
        sender.close()
        receiver.close()
    tokens = [message.body.text for message in messages if message.kind == "token"]
    assert tokens == ["one", "two"], "whole frames sent as parts are each a message"
    errors = [message for message in messages if message.kind == "error"]
    assert [error.body.code for error in errors] == ["invalid_message", "invalid_message"]
    assert all("frame has no topic separator" in error.body.message for error in errors)
    assert all((error.session, error.id, error.body.ref_kind) == ("", "", "") for error in errors)


def test_an_oversized_frame_cuts_the_sender_which_a_hello_with_the_same_token_reconfirms(
        endpoints: Endpoints) -> None:
    connection = Connection("tx", endpoints, [protocol.subscription("token", "s1")])
    connection.open(5)
    try:
        assert connection._pub is not None and connection._sub is not None
        monitor = connection._pub.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        connection._pub.send(b"token/s1 " + b"x" * (protocol.BROKER_MAX_BYTES + 1))  # send() says nothing
        events = []
        deadline = time.monotonic() + 10
        while zmq.EVENT_HANDSHAKE_SUCCEEDED not in events and time.monotonic() < deadline:
            if monitor.poll(100):
                events.append(recv_monitor_message(monitor)["event"])
        assert events == [zmq.EVENT_DISCONNECTED, zmq.EVENT_HANDSHAKE_SUCCEEDED]
        connection._pub.disable_monitor()
        monitor.close()
        # re-handshake (§3, steps 5 and 6): the same hello, whose subscription the cut left in place
        hello_topic = connection._hello.encode()
        hello = protocol.encode(protocol.Message(protocol.Hello(), hello_topic.decode().split("/", 1)[1], "", 0,
                                                 time.time(), "tx"))
        back = False
        while not back and time.monotonic() < deadline:
            connection._pub.send(hello)
            back = connection._sub.poll(20) and connection._sub.recv().startswith(hello_topic)
        assert back, "the hello came back after the reconnection"
        connection._drain_hellos()
        connection.publish("s1", "r1", protocol.Token(text="after"))
        assert [message.body.text for message in received(connection) if message.kind == "token"] == ["after"]
    finally:
        connection.close()
