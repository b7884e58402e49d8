"""TensorBoard event files written without TensorFlow.

An event file is a sequence of records, each `length (uint64 LE) | masked CRC-32C of length |
data | masked CRC-32C of data`, whose data is a serialized `Event` proto; the first event names
the file version ("brain.Event:2"). Scalars are written as TF2's `tf.summary.scalar` writes them:
a float32 scalar tensor with the "scalars" plugin's metadata, so TensorBoard and
`tf.compat.v1.train.summary_iterator` read them as before. The protos are tensorboard's own
(`tensorboard.compat.proto`, plain protobuf): importing them starts no TensorFlow, which takes
~9 s of every `jaxlm` command's start on a 2-core host.

The record format and masking constant are TensorFlow's (tensorflow/core/lib/io/record_writer.cc,
tensorflow/core/lib/hash/crc32c.h).
"""

import os
import socket
import struct
import time
from typing import Mapping

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

_CRC32C_POLY = 0x82F63B78  # Castagnoli, reflected.
_MASK_DELTA = 0xA282EAD8


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (_CRC32C_POLY if crc & 1 else 0)
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:  # Records are a few hundred bytes: a table loop is fast enough.
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def scalar_value(tag: str, value: float) -> summary_pb2.Summary.Value:
    tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape=tensor_shape_pb2.TensorShapeProto(),
                                    float_val=[float(np.float32(value))])
    metadata = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
    return summary_pb2.Summary.Value(tag=tag, tensor=tensor, metadata=metadata)


class EventFile:
    """One event file in `logdir`, named as TensorFlow names them (TensorBoard looks for
    "tfevents" in the name; the host and pid keep concurrent writers apart)."""

    _count = 0

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        EventFile._count += 1
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.{EventFile._count}.v2"
        self.path = os.path.join(logdir, name)
        self._file = open(self.path, "ab")  # pylint: disable=consider-using-with
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        self.flush()

    def _write(self, event: event_pb2.Event) -> None:
        self._file.write(record(event.SerializeToString()))

    def add_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        summary = summary_pb2.Summary(value=[scalar_value(tag, v) for tag, v in scalars.items()])
        self._write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
