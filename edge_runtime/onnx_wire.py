"""ONNX models at the protobuf wire level (the edge install has no ``onnx`` package), and
the onnxruntime session options every edge session uses. Field numbers are onnx.proto's."""

from __future__ import annotations


def session_options(threads: int = 1, arena: bool = False):
    """onnxruntime options for small resident memory. ``arena``: the session keeps what its runs
    allocate for its next runs (onnxruntime's CPU memory arena) instead of freeing it to the C
    heap. A template session needs it: every streamed expert's run through it allocates its
    intermediate tensors afresh, and between those runs the engine keeps small objects of its
    own (bindings, views); without the arena glibc's heap fragmented around them, and the
    process grew by about 0.3 MB per expert streamed (54 MB after 600 hanzi:500 images under
    the smallest budget; with the arena under 2 MB)."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.enable_cpu_mem_arena = arena
    opts.enable_mem_pattern = False
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(number: int, value: int | bytes | str) -> bytes:
    """One protobuf field: an integer (varint) or bytes/str (length-delimited)."""
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    data = value.encode() if isinstance(value, str) else value
    return varint(number << 3 | 2) + varint(len(data)) + data


def read_varint(buf: bytes, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        b = buf[i]
        i += 1
        out |= (b & 0x7F) << shift
        if b < 0x80:
            return out, i
        shift += 7


def fields(buf: bytes):
    """(field number, wire type, value, the field's raw bytes) of one message; ValueError on a
    wire type protobuf does not have."""
    i = 0
    while i < len(buf):
        start = i
        tag, i = read_varint(buf, i)
        num, wt = tag >> 3, tag & 7
        if wt == 0:
            value, i = read_varint(buf, i)
        elif wt == 1:
            value, i = buf[i:i + 8], i + 8
        elif wt == 2:
            n, i = read_varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wt == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")
        yield num, wt, value, buf[start:i]
