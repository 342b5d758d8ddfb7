"""tokenizer.model, a SentencePiece model, read for its pieces: text, score and type, without sentencepiece.

llama.cpp's converter builds the vocabulary of Gemma and Phi-3 from tokenizer.model,
through the sentencepiece library: each piece's text, score and type
(_create_vocab_sentencepiece). tokenizer.json holds no scores for a BPE model, so an
export that writes the converter's vocabulary reads them here. The file is one
protobuf message, ModelProto (sentencepiece_model.proto), whose field 1 repeats
SentencePiece {1: piece, 2: score, 3: type}; its other fields (trainer and
normalizer settings) are skipped by their wire type. Reading these three fields
takes this module instead of a runtime dependency on sentencepiece and protobuf.
"""

import struct

from swtool.errors import CheckpointError
from swtool.inputfile import open_regular

MAX_MODEL_BYTES = 64 << 20  # Gemma 3's 262k pieces take 4.5 MB

# SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5


def read_pieces(path):
    """[(piece, score, type)] of a tokenizer.model, by id; a one-line CheckpointError if it is not one."""
    with open_regular(path) as f:
        data = f.read(MAX_MODEL_BYTES + 1)
    if len(data) > MAX_MODEL_BYTES:
        raise CheckpointError(path, f"larger than {MAX_MODEL_BYTES >> 20} MiB: not a SentencePiece model")
    try:
        pieces = [piece(value) for field, value in fields(data) if field == 1 and is_message(value)]
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise CheckpointError(path, f"not a SentencePiece model ({e})") from None
    if not pieces:
        raise CheckpointError(path, "a SentencePiece model without pieces")
    return pieces


def is_message(value):
    """Is a field's value an embedded message (length-delimited bytes)?"""
    if not isinstance(value, bytes):
        raise ValueError("a piece that is not a message")
    return True


def piece(message):
    """(text, score, type) of one SentencePiece message; proto2 defaults for absent fields."""
    text, score, kind = None, 0.0, NORMAL
    for field, value in fields(message):
        if field == 1 and isinstance(value, bytes):
            text = value.decode("utf-8")
        elif field == 2 and isinstance(value, bytes) and len(value) == 4:
            score = struct.unpack("<f", value)[0]
        elif field == 3 and isinstance(value, int):
            kind = value
        elif field in (1, 2, 3):
            raise ValueError(f"field {field} of a piece has the wrong wire type")
    if text is None:
        raise ValueError("a piece without its text")
    if kind not in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE):
        raise ValueError(f"piece {text!r} has type {kind}")
    return text, score, kind


def fields(data):
    """(field number, value) of each field of a protobuf message: ints, or bytes for the other wire types."""
    data, at = memoryview(data), 0
    while at < len(data):
        key, at = varint(data, at)
        field, wire = key >> 3, key & 7
        if wire == VARINT:
            value, at = varint(data, at)
        elif wire in (FIXED64, FIXED32):
            size = 8 if wire == FIXED64 else 4
            value, at = bytes(data[at:at + size]), at + size
        elif wire == LENGTH_DELIMITED:
            size, at = varint(data, at)
            value, at = bytes(data[at:at + size]), at + size
        else:
            raise ValueError(f"wire type {wire}")
        if at > len(data):
            raise ValueError("truncated")
        yield field, value


def varint(data, at):
    """A base-128 integer at `at`: (value, position after it)."""
    value = 0
    for shift in range(0, 70, 7):
        if at >= len(data):
            raise ValueError("truncated")
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if not byte & 0x80:
            return value, at
    raise ValueError("a varint longer than 10 bytes")
