"""The hetlora and svd strategies through the real server, against numpy (openapi.yaml, the
strategy table): svd against the best rank-r approximation of the dense update M = Σ w·s·B·A / Σ w
that numpy's own SVD gives, at every rank r; hetlora against zero padding weighted by each upload's
‖s·B·A‖_F formed densely. Nothing here reuses the service's algorithm."""
import unittest

import numpy as np
from support import ServerTestCase

import lora_aggregator_client as lac

LINEAR = "base_model.model.layers.0.self_attn.q_proj"
CONV = "base_model.model.stem.conv"
DENSE = "base_model.model.score.weight"


def adapter(rng, rank, dtype=np.float32, conv=True):
    """A client's tensors: a linear module (A [r, 12], B [10, r]), a conv module (A [r, 3, 2, 2],
    B [5, r, 1, 1]) and a dense tensor, in `dtype`."""
    tensors = {f"{LINEAR}.lora_A.weight": rng.standard_normal((rank, 12)), f"{LINEAR}.lora_B.weight": rng.standard_normal((10, rank)),
               DENSE: rng.standard_normal((4, 10))}
    if conv:
        tensors |= {f"{CONV}.lora_A.weight": rng.standard_normal((rank, 3, 2, 2)), f"{CONV}.lora_B.weight": rng.standard_normal((5, rank, 1, 1))}
    return {name: value.astype(dtype) for name, value in tensors.items()}


def scale(rank, lora_alpha, use_rslora):
    return lora_alpha / (np.sqrt(rank) if use_rslora else rank)


def as_matrices(tensors, module):
    """(B as out·rest × r, A as r × n): conv axes flattened into B's rows and A's columns."""
    a = np.asarray(tensors[f"{module}.lora_A.weight"], dtype=np.float64)
    b = np.asarray(tensors[f"{module}.lora_B.weight"], dtype=np.float64)
    return np.moveaxis(b, 1, -1).reshape(-1, b.shape[1]), a.reshape(a.shape[0], -1)


def dense_update(clients, module):
    """M = Σ w·s·B·A / Σ w over the clients holding the module."""
    total = sum(client["weight"] for client in clients)
    return sum(client["weight"] * client["scale"] * np.matmul(*as_matrices(client["tensors"], module)) for client in clients) / total


class SVDTests(ServerTestCase):
    def setUp(self):
        self.service = lac.Client(self.url)

    def round(self, federation, seed, ranks, alphas, dtypes):
        rng = np.random.default_rng(seed)
        clients = []
        for index, (rank, (lora_alpha, use_rslora), dtype) in enumerate(zip(ranks, alphas, dtypes)):
            tensors = adapter(rng, rank, dtype)
            client = {"id": f"c{index}", "rank": rank, "weight": float(rng.integers(1, 50)), "tensors": tensors,
                      "scale": scale(rank, lora_alpha, use_rslora)}
            self.service.upload(lac.encode_safetensors(tensors), federation=federation, round=0, client=client["id"], rank=rank,
                                weight=client["weight"], lora_alpha=lora_alpha, use_rslora=use_rslora)
            clients.append(client)
        return clients

    def factors(self, federation, rank=None, **options):
        data = self.service.aggregate(federation=federation, round=0, strategy="svd", rank=rank, **options)
        return lac.decode_safetensors(data)[0]

    def test_every_truncation_is_the_best_approximation_at_its_rank(self):
        clients = self.round("svd", 1, [2, 4, 8], [(16, False), (8, True), (8, False)], [np.float32, np.float16, np.float32])
        global_rank = 8
        for module in (LINEAR, CONV):
            m = dense_update(clients, module)
            u, sigma, vt = np.linalg.svd(m, full_matrices=False)
            for rank in range(1, global_rank + 1):
                b, a = as_matrices(self.factors("svd", rank), module)
                self.assertEqual(b.shape[1], rank)
                kept = min(rank, len(sigma))
                best = (u[:, :kept] * sigma[:kept]) @ vt[:kept]
                self.assertLess(np.linalg.norm(b @ a - best), 2e-5 * np.linalg.norm(m), f"{module} at rank {rank}")
            b, a = as_matrices(self.factors("svd"), module)
            norms_b, norms_a = np.linalg.norm(b, axis=0), np.linalg.norm(a, axis=1)
            live = norms_b > 0
            np.testing.assert_allclose(norms_b[live] * norms_a[live], sigma[:live.sum()], rtol=2e-5, err_msg="σ descending, as numpy's")
            np.testing.assert_allclose(norms_b, norms_a, rtol=2e-5, err_msg="balanced: B = U√Σ, A = √ΣVᵀ")
            for j in np.flatnonzero(live):
                column = b[:, j]
                self.assertGreater(column[np.argmax(np.abs(column))], 0, f"sign rule, component {j}")
            # Components past the rank of M (5 for the conv module: its B has 5 rows) are exactly zero.
            self.assertTrue(np.all(b[:, ~live] == 0) and np.all(a[~live] == 0))
            self.assertEqual(int(live.sum()), min(global_rank, np.linalg.matrix_rank(m)))

    def test_a_rank_deficient_update_has_exact_zero_components_and_unfolds_to_a_scale(self):
        rng = np.random.default_rng(2)
        tensors = adapter(rng, 6, conv=False)
        # Only two independent directions: M has rank 2 although the client's rank is 6.
        b = tensors[f"{LINEAR}.lora_B.weight"]
        b[:, 2:] = 0
        self.service.upload(lac.encode_safetensors(tensors), federation="deficient", round=0, client="only", rank=6, lora_alpha=12)
        factors = self.factors("deficient")
        b_out, a_out = as_matrices(factors, LINEAR)
        self.assertTrue(np.all(b_out[:, 2:] == 0) and np.all(a_out[2:] == 0))
        m = dense_update([{"weight": 1.0, "scale": 2.0, "tensors": tensors}], LINEAR)
        self.assertLess(np.linalg.norm(b_out @ a_out - m), 1e-5 * np.linalg.norm(m))
        # Unfolded for lora_alpha 12 at rank 6 (scale 2), PEFT's 2·B·A is M again.
        b_peft, a_peft = as_matrices(self.factors("deficient", lora_alpha=12), LINEAR)
        self.assertLess(np.linalg.norm(2 * b_peft @ a_peft - m), 1e-5 * np.linalg.norm(m))

    def test_the_result_does_not_depend_on_the_upload_order(self):
        rng = np.random.default_rng(3)
        clients = [(f"c{index}", rank, adapter(rng, rank)) for index, rank in enumerate([4, 2, 8, 1])]
        for federation, order in (("order-a", clients), ("order-b", clients[::-1])):
            for client, rank, tensors in order:
                self.service.upload(lac.encode_safetensors(tensors), federation=federation, round=0, client=client, rank=rank)
        first = self.service.aggregate(federation="order-a", round=0, strategy="svd")
        second = self.service.aggregate(federation="order-b", round=0, strategy="svd")
        self.assertEqual(lac.decode_safetensors(first)[0].keys(), lac.decode_safetensors(second)[0].keys())
        for name, value in lac.decode_safetensors(first)[0].items():
            np.testing.assert_array_equal(value, lac.decode_safetensors(second)[0][name], err_msg=name)


class HetLoRATests(ServerTestCase):
    def test_zero_padding_weighted_by_each_updates_norm(self):
        service = lac.Client(self.url)
        rng = np.random.default_rng(4)
        clients = []
        for index, (rank, lora_alpha) in enumerate([(2, 16), (4, 16), (8, 4)]):
            tensors = adapter(rng, rank)
            service.upload(lac.encode_safetensors(tensors), federation="het", round=0, client=f"c{index}", rank=rank, weight=10.0 * (index + 1),
                           lora_alpha=lora_alpha)
            clients.append((rank, 10.0 * (index + 1), scale(rank, lora_alpha, False), tensors))
        result = lac.decode_safetensors(service.aggregate(federation="het", round=0, strategy="hetlora"))[0]
        for module in (LINEAR, CONV):
            norms = [s * np.linalg.norm(np.matmul(*as_matrices(tensors, module))) for _, _, s, tensors in clients]
            for factor, axis in (("lora_A.weight", 0), ("lora_B.weight", 1)):
                name = f"{module}.{factor}"
                padded = []
                for (rank, _, s, tensors), norm in zip(clients, norms):
                    value = np.asarray(tensors[name], dtype=np.float64) * np.sqrt(s)
                    width = [(0, 0)] * value.ndim
                    width[axis] = (0, 8 - rank)
                    padded.append(norm * np.pad(value, width))
                expected = sum(padded) / sum(norms)
                np.testing.assert_allclose(result[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)
        dense = sum(weight * np.asarray(tensors[DENSE], dtype=np.float64) for _, weight, _, tensors in clients) / sum(weight for _, weight, _, _ in clients)
        np.testing.assert_allclose(result[DENSE], dense, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    unittest.main()
