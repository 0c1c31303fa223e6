"""A simulated federation through the real server: the paper's setting (100 clients, 10 sampled per
round, 10 of them at rank 20 and 90 at rank 5) run for 20 chained rounds under both strategies.

Every sampled client runs the client loop (Client.start_round: the round, its base at the client's
rank and scale; a fake training step; an upload at its rank with lora_alpha 16, so rank-20 and rank-5
clients train at different PEFT scales, 0.8 and 3.2). The expectations are computed here in numpy
from the bytes sent and downloaded, not from the service's code: each round's aggregate against a
literal reference, and the point of round bases, that a round whose sample holds no rank-20 client
keeps rank slices 5-19 from its base under replication and loses them (zeros) under zero padding.
"""
import unittest

import numpy as np
from support import ServerTestCase

import lora_aggregator_client as lac

SEED = 0  # its 20 samples include 4 rounds without a rank-20 client (rounds 3, 9, 10 and 13)
CLIENTS, SAMPLED, ROUNDS = 100, 10, 20
HIGH_RANK, LOW_RANK, HIGH_RANK_CLIENTS, LORA_ALPHA = 20, 5, 10, 16
MODULE = "model.layers.0.self_attn.q_proj"  # as the service names it: the tensor name without base_model.model. and lora_A/B
A, B = f"base_model.model.{MODULE}.lora_A.weight", f"base_model.model.{MODULE}.lora_B.weight"
DENSE = "base_model.model.score.weight"
IN_FEATURES, OUT_FEATURES = 32, 24
FEDERATIONS = {"sim-replication": "replication", "sim-zero-padding": "zero_padding"}


def rank_of(client):
    return HIGH_RANK if client < HIGH_RANK_CLIENTS else LOW_RANK


def weight_of(client):
    """A client's sample count: uneven, so the reference's weighting is exercised."""
    return float(10 + client % 13)


def random_adapter(rng, rank, scale=1.0):
    return {A: (scale * rng.standard_normal((rank, IN_FEATURES))).astype(np.float32),
            B: (scale * rng.standard_normal((OUT_FEATURES, rank))).astype(np.float32),
            DENSE: (scale * rng.standard_normal((4, OUT_FEATURES))).astype(np.float32)}


def train_step(start_arrays, client, round_, rank):
    """A fake local training step: a small client- and round-specific delta, at the client's own
    scale (added to the factors it received, unfolded for lora_alpha 16 at its rank)."""
    delta = random_adapter(np.random.default_rng([SEED, round_, client]), rank, scale=0.05)
    return {name: (array + delta[name]).astype(np.float32) for name, array in start_arrays.items()}


def peft_scale(rank):
    return LORA_ALPHA / rank


def reference(uploads, base, strategy):
    """The global adapter at scale 1, written out literally: every upload's factors multiplied by
    √(its scale); slice j averaged over the uploads whose rank exceeds j, divided by their weights
    (replication) or by all weights (zero padding); a slice no upload owns is the base's under
    replication, zeros under zero padding; the dense tensor the weighted mean. Float64."""
    total = sum(weight for _, _, weight in uploads)
    result = {}
    for name, axis in ((A, 0), (B, 1)):
        top = max([base[name].shape[axis]] + [rank for _, rank, _ in uploads])
        slices = []
        for j in range(top):
            owners = [(arrays[name].take([j], axis=axis).astype(np.float64) * np.sqrt(peft_scale(rank)), weight)
                      for arrays, rank, weight in uploads if rank > j]
            if owners:
                divisor = sum(weight for _, weight in owners) if strategy == "replication" else total
                slices.append(sum(weight * part for part, weight in owners) / divisor)
            elif strategy == "replication":
                slices.append(base[name].take([j], axis=axis).astype(np.float64))
            else:
                slices.append(np.zeros_like(base[name].take([j], axis=axis), dtype=np.float64))
        result[name] = np.concatenate(slices, axis=axis)
    result[DENSE] = sum(weight * arrays[DENSE].astype(np.float64) for arrays, _, weight in uploads) / total
    return result


def high_slices(arrays):
    """Rank slices 5-19 of the module: rows of A, columns of B."""
    return arrays[A][LOW_RANK:HIGH_RANK], arrays[B][:, LOW_RANK:HIGH_RANK]


class FederationSimulationTests(ServerTestCase):
    def test_twenty_chained_rounds_keep_the_high_rank_slices_only_under_replication(self):
        service = lac.Client(self.url)
        initial = lac.encode_safetensors(random_adapter(np.random.default_rng([SEED, 12345]), HIGH_RANK))
        for federation, strategy in FEDERATIONS.items():
            settings = service.set_federation(federation, strategy=strategy, chain=True)["settings"]
            self.assertEqual((settings["strategy"], settings["chain"]), (strategy, True))
            # Round 0's base, put by the admin, so that every round has one.
            self.assertEqual(service.put_base(initial, federation=federation, round=0, rank=HIGH_RANK, lora_alpha=LORA_ALPHA)["source"], "upload")

        sampler = np.random.default_rng(SEED)
        without_high_rank = []
        for round_ in range(ROUNDS):
            sample = sorted(int(client) for client in sampler.choice(CLIENTS, SAMPLED, replace=False))
            has_high_rank = any(rank_of(client) == HIGH_RANK for client in sample)
            if not has_high_rank:
                without_high_rank.append(round_)
            for federation, strategy in FEDERATIONS.items():
                with self.subTest(round=round_, strategy=strategy):
                    self.run_round(service, federation, strategy, round_, sample, has_high_rank)
        self.assertGreaterEqual(len(without_high_rank), 1, "the seed gives no round without a rank-20 client")
        self.assertEqual(without_high_rank, [3, 9, 10, 13])

    def run_round(self, service, federation, strategy, round_, sample, has_high_rank):
        """One round of one federation: each sampled client's loop, the seal, then the checks."""
        stored_base, _ = lac.decode_safetensors(service.base(federation=federation, round=round_))  # at scale 1
        uploads = []
        for client in sample:
            rank = rank_of(client)
            start = service.start_round(federation, rank=rank, lora_alpha=LORA_ALPHA)
            self.assertEqual((start.round, start.config), (round_, {"peft_type": "LORA", "r": rank, "lora_alpha": LORA_ALPHA, "use_rslora": False}))
            self.assertIsNotNone(start.base)
            received, _ = lac.decode_safetensors(start.base)
            # The base as this client needs it: cut to its rank, unfolded by √(16 / rank).
            for name, array in lac.truncate_to_rank(stored_base, rank).items():
                expected = array if name == DENSE else array / np.sqrt(peft_scale(rank))
                np.testing.assert_allclose(received[name], expected, rtol=1e-6, atol=1e-7, err_msg=f"client {client}: {name}")
            trained = train_step(received, client, round_, rank)
            service.upload(lac.encode_safetensors(trained), federation=federation, round=start.round, client=f"client-{client:03d}",
                           rank=rank, lora_alpha=LORA_ALPHA, weight=weight_of(client))
            uploads.append((trained, rank, weight_of(client)))
        status = service.seal(federation=federation, round=round_)
        self.assertEqual((status["sealed"], status["sealed_by"], len(status["uploads"])), (True, "request", len(sample)))
        self.assertEqual(status["base"]["source"], "upload" if round_ == 0 else "chain")

        data = service.aggregate(federation=federation, round=round_)  # the federation's strategy, scale 1
        self.assertEqual((lac.safetensors_metadata(data)["strategy"], lac.module_ranks(data)), (strategy, {MODULE: HIGH_RANK}))
        global_, _ = lac.decode_safetensors(data)
        for name, expected in reference(uploads, stored_base, strategy).items():
            np.testing.assert_allclose(global_[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)
        if not has_high_rank:
            for kept, base_part in zip(high_slices(global_), high_slices(stored_base)):
                if strategy == "replication":  # kept: the base's slices (the previous global's), exactly
                    np.testing.assert_array_equal(kept, base_part)
                    self.assertTrue(np.all(kept != 0))
                else:  # lost
                    np.testing.assert_array_equal(kept, np.zeros_like(kept))
        # Chained: the next round's base is this aggregate, byte for byte.
        self.assertEqual(service.base(federation=federation, round=round_ + 1), data)
        self.assertEqual(service.federation(federation)["current_round"], round_ + 1)


if __name__ == "__main__":
    unittest.main()
