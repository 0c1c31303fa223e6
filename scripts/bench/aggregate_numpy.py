#!/usr/bin/env python3
"""The numpy peer of scripts/bench/aggregate: the same replication-padding aggregation on the same bytes.

Owner-normalised, Float64 accumulation, clients in ascending id order, F32 output, written as a
competent numpy user would. Reads the round written by `AggregateBenchmark generate`, times the
aggregation from in-memory files to output bytes, and compares its result with the engine's output
file. Prints one JSON object.
"""
import json
import struct
import sys
import time
from pathlib import Path

import numpy as np

NUMPY_DTYPES = {"F32": "<f4", "F64": "<f8", "F16": "<f2"}


def parse(data):
    (length,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8:8 + length])
    header.pop("__metadata__", None)
    return 8 + length, header


def tensor(data, start, info):
    begin, end = info["data_offsets"]
    if info["dtype"] == "BF16":
        bits = np.frombuffer(data, dtype="<u2", count=(end - begin) // 2, offset=start + begin)
        values = (bits.astype(np.uint32) << 16).view(np.float32)
    else:
        values = np.frombuffer(data, dtype=NUMPY_DTYPES[info["dtype"]], count=-1, offset=start + begin)[: int(np.prod(info["shape"]))]
    return values.reshape(info["shape"])


def rank_axis(name):
    if name.endswith("lora_A.weight") or name.endswith("lora_embedding_A"):
        return 0
    if name.endswith("lora_B.weight") or name.endswith("lora_embedding_B"):
        return 1
    return None


def aggregate(clients, rank):
    """clients: list of (weight, data, start, header) sorted by client id."""
    names = sorted(set().union(*(header.keys() for _, _, _, header in clients)))
    out = {}
    for name in names:
        holders = [(w, d, s, h[name]) for w, d, s, h in clients if name in h]
        axis = rank_axis(name)
        if axis is None:
            acc = np.zeros(holders[0][3]["shape"], dtype=np.float64)
            for w, d, s, info in holders:
                acc += w * tensor(d, s, info).astype(np.float64)
            out[name] = (acc / sum(w for w, *_ in holders)).astype(np.float32)
            continue
        shape = list(holders[0][3]["shape"])
        shape[axis] = rank
        acc = np.zeros(shape, dtype=np.float64)
        owners = np.zeros(rank, dtype=np.float64)
        for w, d, s, info in holders:
            x = tensor(d, s, info)
            k = min(x.shape[axis], rank)
            if axis == 0:
                acc[:k] += w * x[:k].astype(np.float64)
            else:
                acc[:, :k] += w * x[:, :k].astype(np.float64)
            owners[:k] += w
        divisor = np.where(owners > 0, owners, np.inf)
        acc /= divisor.reshape((-1,) + (1,) * (acc.ndim - 1)) if axis == 0 else divisor.reshape((1, -1) + (1,) * (acc.ndim - 2))
        out[name] = acc.astype(np.float32)
    return out


def serialise(tensors):
    header, offset = {}, 0
    for name in sorted(tensors):
        size = tensors[name].nbytes
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return b"".join([struct.pack("<Q", len(text)), text] + [tensors[name].tobytes() for name in sorted(tensors)])


def main():
    directory, repeats = Path(sys.argv[1]), int(sys.argv[2])
    round_file = json.loads((directory / "round.json").read_text())
    clients = []
    input_bytes = 0
    for client in sorted(round_file["clients"], key=lambda c: c["client"]):
        data = (directory / client["file"]).read_bytes()
        start, header = parse(data)
        input_bytes += len(data) - start
        clients.append((client["weight"], data, start, header))
    rank = max(c["rank"] for c in round_file["clients"])

    for _ in range(2):  # untimed warm-up, as for the engine
        aggregate(clients, rank)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        result = aggregate(clients, rank)
        output = serialise(result)
        times.append(time.perf_counter() - began)

    engine_data = (directory / "engine_output.safetensors").read_bytes()
    engine_start, engine_header = parse(engine_data)
    worst = 0.0
    identical = True
    for name, values in result.items():
        theirs = tensor(engine_data, engine_start, engine_header[name]).astype(np.float64)
        ours = values.astype(np.float64)
        identical &= np.array_equal(theirs, ours)
        worst = max(worst, float(np.max(np.abs(theirs - ours) / (np.abs(ours) + 1e-30), initial=0.0)))
    assert set(result) == set(engine_header), "the engine and numpy produced different tensor names"
    print(json.dumps({"input_bytes": input_bytes, "output_bytes": len(output), "numpy_seconds": sorted(times)[len(times) // 2],
                      "identical_to_engine": bool(identical), "max_relative_difference": worst}))


if __name__ == "__main__":
    main()
