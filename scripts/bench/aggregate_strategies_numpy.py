#!/usr/bin/env python3
"""The numpy peer of the svd and hetlora rows of scripts/bench/aggregate: the same algorithms on the
same files, written as a competent numpy user would (numpy's LAPACK, its own threads).

svd: per module, stack √(w/W)·B side by side and √(w/W)·Aᵀ likewise, reduced QR of both, SVD of
R_B·R_Aᵀ, balanced factors B = Q_B·U·√Σ, A = (Q_A·V·√Σ)ᵀ at the module's largest rank, the sign rule.
hetlora: per module, each client's ‖B·A‖_F from its r × r Gram matrices, then zero padding weighted
by those norms; dense tensors by upload weight. Times the aggregation from in-memory files to F32
arrays and compares with the engine's output file. Prints one JSON object.
    aggregate_strategies_numpy.py DIR {svd|hetlora} REPEATS
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
from aggregate_numpy import parse, rank_axis, tensor


def modules(clients):
    """module name → (A name, B name), and the dense tensor names."""
    names = sorted(set().union(*(header.keys() for _, _, _, header in clients)))
    pairs, dense = {}, []
    for name in names:
        axis = rank_axis(name)
        if axis is None:
            dense.append(name)
        else:
            module = name.rsplit(".lora_", 1)[0]
            pairs.setdefault(module, [None, None])[axis] = name
    return pairs, dense


def mean_dense(clients, dense):
    out = {}
    for name in dense:
        holders = [(w, tensor(d, s, h[name])) for w, d, s, h in clients if name in h]
        out[name] = (sum(w * x.astype(np.float64) for w, x in holders) / sum(w for w, _ in holders)).astype(np.float32)
    return out


def svd(clients, pairs, dense):
    out = mean_dense(clients, dense)
    for a_name, b_name in pairs.values():
        holders = [(w, tensor(d, s, h[a_name]).astype(np.float64), tensor(d, s, h[b_name]).astype(np.float64)) for w, d, s, h in clients if a_name in h]
        total = sum(w for w, _, _ in holders)
        rank = max(a.shape[0] for _, a, _ in holders)
        b_stack = np.hstack([np.sqrt(w / total) * b for w, _, b in holders])
        a_stack = np.hstack([np.sqrt(w / total) * a.T for w, a, _ in holders])
        q_b, r_b = np.linalg.qr(b_stack)
        q_a, r_a = np.linalg.qr(a_stack)
        u, sigma, vt = np.linalg.svd(r_b @ r_a.T)
        kept = min(rank, int(np.sum(sigma > 1e-12 * sigma[0])))
        b = np.zeros((b_stack.shape[0], rank))
        a = np.zeros((rank, a_stack.shape[0]))
        b[:, :kept] = (q_b @ u[:, :kept]) * np.sqrt(sigma[:kept])
        a[:kept] = ((q_a @ vt[:kept].T) * np.sqrt(sigma[:kept])).T
        largest = np.argmax(np.abs(b[:, :kept]), axis=0)
        signs = np.where(b[largest, np.arange(kept)] < 0, -1.0, 1.0)
        b[:, :kept] *= signs
        a[:kept] *= signs[:, None]
        out[b_name], out[a_name] = b.astype(np.float32), a.astype(np.float32)
    return out


def hetlora(clients, pairs, dense):
    out = mean_dense(clients, dense)
    for a_name, b_name in pairs.values():
        holders = [(tensor(d, s, h[a_name]).astype(np.float64), tensor(d, s, h[b_name]).astype(np.float64)) for w, d, s, h in clients if a_name in h]
        norms = [np.sqrt(max(0.0, float(np.sum((b.T @ b) * (a @ a.T))))) for a, b in holders]
        rank = max(a.shape[0] for a, _ in holders)
        a_sum = np.zeros((rank, holders[0][0].shape[1]))
        b_sum = np.zeros((holders[0][1].shape[0], rank))
        for (a, b), norm in zip(holders, norms):
            a_sum[:a.shape[0]] += norm * a
            b_sum[:, :b.shape[1]] += norm * b
        total = sum(norms)
        out[a_name], out[b_name] = (a_sum / total).astype(np.float32), (b_sum / total).astype(np.float32)
    return out


def main():
    directory, strategy, repeats = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    round_file = json.loads((directory / "round.json").read_text())
    clients = []
    for client in sorted(round_file["clients"], key=lambda c: c["client"]):
        data = (directory / client["file"]).read_bytes()
        start, header = parse(data)
        clients.append((client["weight"], data, start, header))
    pairs, dense = modules(clients)
    run = {"svd": svd, "hetlora": hetlora}[strategy]
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        result = run(clients, pairs, dense)
        times.append(time.perf_counter() - began)

    engine_data = (directory / f"engine_{strategy}.safetensors").read_bytes()
    engine_start, engine_header = parse(engine_data)
    worst = 0.0
    for name, values in result.items():
        theirs = tensor(engine_data, engine_start, engine_header[name]).astype(np.float64)
        ours = values.astype(np.float64)
        worst = max(worst, float(np.max(np.abs(theirs - ours)) / (np.max(np.abs(ours)) + 1e-30)))
    print(json.dumps({"numpy_seconds": sorted(times)[len(times) // 2], "max_difference_relative_to_largest": worst}))


if __name__ == "__main__":
    main()
