"""The codec against the documented test vectors, and fuzzing of the receive path."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bridge.exceptions import IncompleteFrame, InvalidFrame, ProtocolError
from firmware_bridge.frames import (
    MAX_PAYLOAD,
    AllOff,
    AllOffAck,
    Frame,
    FrameDecoder,
    Inputs,
    Message,
    Nack,
    NackReason,
    Ping,
    Pong,
    Query,
    QueryReply,
    ReadInputs,
    Release,
    ReleaseAck,
    ReleaseLevel,
    crc16,
    decode,
    encode,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "firmware-protocol.md"
MESSAGES: dict[str, type[Message]] = {
    cls.__name__: cls
    for cls in (
        Ping,
        Pong,
        Release,
        ReleaseAck,
        Query,
        QueryReply,
        Nack,
        ReleaseLevel,
        AllOff,
        AllOffAck,
        ReadInputs,
        Inputs,
    )
}


def _value(text: str) -> object:
    if text in ("true", "false"):
        return text == "true"
    if text in NackReason.__members__:
        return NackReason[text]
    return int(text, 0)


def _load_vectors() -> dict[str, tuple[bytes, str]]:
    match = re.search(r"```vectors\n(.*?)```", DOC.read_text(), re.S)
    assert match, "docs/firmware-protocol.md lost its ```vectors block"
    vectors = {}
    for line in match.group(1).splitlines():
        name, rest = line.split(":", 1)
        hex_part, meaning = rest.split("=>")
        vectors[name.strip()] = (bytes.fromhex(hex_part), meaning.strip())
    return vectors


VECTORS = _load_vectors()
FRAME_VECTORS = {name: v for name, v in VECTORS.items() if name != "crc16"}


def _message(meaning: str) -> Message:
    type_name, *fields = meaning.split()
    kwargs = dict(field.split("=", 1) for field in fields)
    return MESSAGES[type_name](**{k: _value(v) for k, v in kwargs.items()})  # type: ignore[arg-type]


def test_doc_has_every_required_vector() -> None:
    required = {
        "crc16",
        "ping",
        "pong",
        "release",
        "release_ack_new",
        "release_ack_duplicate",
        "query",
        "query_reply_not_executed",
        "query_reply_executed",
        "nack_bad_channel",
        "release_level",
        "all_off",
        "all_off_ack",
        "read_inputs",
        "inputs_sensed",
        "inputs_not_sensed",
        "pong_v12",
        "release_ack_new_v12",
        "release_ack_duplicate_v12",
        "query_reply_not_executed_v12",
        "query_reply_executed_v12",
    }
    assert required <= VECTORS.keys()


def test_crc_matches_documented_check_value() -> None:
    data, expected = VECTORS["crc16"]
    assert crc16(data) == int(expected, 0) == 0x29B1


@pytest.mark.parametrize("name", sorted(FRAME_VECTORS))
def test_documented_vector_decodes_to_its_meaning(name: str) -> None:
    data, meaning = FRAME_VECTORS[name]
    frame, rest = Frame.deserialize(data)
    assert rest == b""
    assert decode(frame) == _message(meaning)


@pytest.mark.parametrize("name", sorted(FRAME_VECTORS))
def test_documented_meaning_encodes_to_the_vector_bytes(name: str) -> None:
    data, meaning = FRAME_VECTORS[name]
    assert encode(_message(meaning), seq=data[3]) == data


def test_deserialize_tells_need_more_bytes_from_garbage() -> None:
    data = FRAME_VECTORS["release"][0]
    for cut in range(len(data)):
        with pytest.raises(IncompleteFrame):
            Frame.deserialize(data[:cut])
    with pytest.raises(InvalidFrame):
        Frame.deserialize(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(InvalidFrame):
        Frame.deserialize(b"\x7e\x02" + data[2:])
    with pytest.raises(InvalidFrame):
        Frame.deserialize(b"\x7e\x01\x01\x00\x41")


def test_bad_payloads_raise_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        decode(Frame(0x02, 0, b"\x00" * 13))  # RELEASE must be 14 bytes
    with pytest.raises(ProtocolError):
        decode(Frame(0x42, 0, b""))  # unknown type
    with pytest.raises(ProtocolError):
        decode(Frame(0x82, 0, b"\x00" * 12 + b"\x02"))  # status neither 0 nor 1
    with pytest.raises(ProtocolError):
        decode(Frame(0xFF, 0, b"\x00" * 5 + b"\x09"))  # unknown NACK reason
    with pytest.raises(ProtocolError):
        encode(Release(2**64, 1, 1, 10, 10), 0)  # command_id wider than u64


# Firmware 1.2 appended exec_count (and ring_size in PONG); both forms stay valid.
BOTH_FORMS: list[tuple[Message, Message, int, int]] = [
    (Pong(1, 1, 1, 8), Pong(1, 1, 2, 8, exec_count=7, ring_size=32), 7, 13),
    (ReleaseAck(1, 2, False), ReleaseAck(1, 2, False, exec_count=7), 13, 17),
    (ReleaseAck(1, 2, True), ReleaseAck(1, 2, True, exec_count=7), 13, 17),
    (QueryReply(1, 2, False), QueryReply(1, 2, False, exec_count=7), 13, 17),
    (QueryReply(1, 2, True), QueryReply(1, 2, True, exec_count=7), 13, 17),
]


@pytest.mark.parametrize(("old", "new", "old_len", "new_len"), BOTH_FORMS)
def test_old_and_new_firmware_replies_both_round_trip(
    old: Message, new: Message, old_len: int, new_len: int
) -> None:
    for message, length in ((old, old_len), (new, new_len)):
        frame, _ = Frame.deserialize(encode(message, 3))
        assert len(frame.payload) == length
        assert decode(frame) == message


@pytest.mark.parametrize(("old", "new", "old_len", "new_len"), BOTH_FORMS)
def test_replies_of_any_other_length_are_refused(
    old: Message, new: Message, old_len: int, new_len: int
) -> None:
    payload = new.to_payload()
    for length in (old_len - 1, old_len + 1, new_len - 1, new_len + 1):
        with pytest.raises(ProtocolError, match=f"{old_len} or {new_len} bytes"):
            decode(Frame(new.TYPE, 0, (payload + b"\x00")[:length]))


def test_old_firmware_replies_have_no_count() -> None:
    pong = decode(Frame.deserialize(FRAME_VECTORS["pong"][0])[0])
    assert isinstance(pong, Pong) and pong.exec_count is None and pong.ring_size is None
    reply = decode(Frame.deserialize(FRAME_VECTORS["query_reply_not_executed"][0])[0])
    assert isinstance(reply, QueryReply) and reply.exec_count is None


def test_pong_never_encodes_half_of_the_new_fields() -> None:
    for pong in (Pong(1, 1, 2, 8, exec_count=1), Pong(1, 1, 2, 8, ring_size=32)):
        with pytest.raises(ProtocolError):
            encode(pong, 0)
    with pytest.raises(ProtocolError):
        encode(Pong(1, 1, 2, 8, exec_count=2**32, ring_size=32), 0)  # wider than u32


def test_payload_with_sof_bytes_is_not_lost_after_a_false_start() -> None:
    frame = encode(Query(0x7E7E7E7E7E7E7E7E), 0x7E)
    # A stray SOF+VER and a LEN that swallows the start of the real frame.
    stream = b"\x7e\x01\x03\x00\x10" + frame + b"\x00" * 20
    assert FrameDecoder().feed(stream) == [Frame.deserialize(frame)[0]]


# --- fuzzing -------------------------------------------------------------------

frames_st = st.builds(
    Frame,
    type=st.integers(0, 255),
    seq=st.integers(0, 255),
    payload=st.binary(max_size=MAX_PAYLOAD),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=10))
def test_decoder_never_raises_on_arbitrary_bytes(chunks: list[bytes]) -> None:
    decoder = FrameDecoder()
    for chunk in chunks:
        for frame in decoder.feed(chunk):
            assert Frame.deserialize(frame.serialize())[0] == frame


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_deserialize_raises_only_protocol_errors(data: bytes) -> None:
    try:
        frame, rest = Frame.deserialize(data)
    except ProtocolError:  # InvalidFrame or IncompleteFrame
        return
    assert frame.serialize() + rest == data


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=30), frames_st), max_size=6), st.binary(max_size=30))
def test_valid_frames_embedded_in_garbage_are_all_found(
    pieces: list[tuple[bytes, Frame]], tail: bytes
) -> None:
    # Garbage without SOF cannot start a false candidate that swallows a frame;
    # SOF inside frames (seq, payload, CRC) is covered by the drop-one-byte rule.
    stream = b"".join(g.replace(b"\x7e", b"") + f.serialize() for g, f in pieces)
    stream += tail.replace(b"\x7e", b"")
    assert FrameDecoder().feed(stream) == [f for _, f in pieces]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=20), frames_st.map(Frame.serialize)), max_size=8))
def test_feeding_one_byte_at_a_time_gives_the_same_frames(parts: list[bytes]) -> None:
    stream = b"".join(parts)
    whole = FrameDecoder().feed(stream)
    decoder = FrameDecoder()
    bytewise = [frame for i in range(len(stream)) for frame in decoder.feed(stream[i : i + 1])]
    assert bytewise == whole


def test_decoder_buffer_stays_bounded_under_garbage() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x7e\x01" + b"\x00" * 10_000)
    assert decoder.feed(encode(Ping(), 1)) == [Frame(0x01, 1)]
    assert len(decoder._buffer) == 0


def _crc16_as_the_protocol_page_spells_it(data: bytes) -> int:
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


@given(st.binary(max_size=80))
def test_crc16_is_the_one_the_protocol_page_defines(data: bytes) -> None:
    assert crc16(data) == _crc16_as_the_protocol_page_spells_it(data)
