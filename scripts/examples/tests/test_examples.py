"""Tests of the PEFT helpers, the Flower strategy and the federated experiment against the real
server. They need torch, PEFT and Flower: run them with scripts/install-python-examples's python."""
import json
import sys
import tempfile
import unittest
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict

EXAMPLES = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(EXAMPLES.parent / "tests"), str(EXAMPLES), str(EXAMPLES / "flower")]
from support import ServerTestCase  # noqa: E402

import federated_demo as demo  # noqa: E402
import lora_aggregator_client as lac  # noqa: E402


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(6, 5)
        self.down = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def peft_model(rank, seed):
    torch.manual_seed(0)
    base = TwoLayers()
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=rank, target_modules=["up", "down"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn_like(parameter))
    return model


def replication_reference(states, weights, rank):
    """Replication padding written out literally: each rank slice averaged over the clients that
    have it, weighted; then the first `rank` slices (numpy, independent of the service)."""
    result = {}
    for name in states[0]:
        axis = 0 if "lora_A" in name else 1
        top = max(state[name].shape[axis] for state in states)
        slices = []
        for j in range(top):
            owners = [(state[name].take([j], axis=axis), weight) for state, weight in zip(states, weights) if state[name].shape[axis] > j]
            slices.append(sum(weight * part for part, weight in owners) / sum(weight for _, weight in owners))
        result[name] = np.concatenate(slices, axis=axis).take(range(rank), axis=axis)
    return result


class PeftTests(ServerTestCase):
    def test_upload_then_load_each_clients_truncation_matches_literal_replication(self):
        service = lac.Client(self.url)
        models = {"alice": (peft_model(2, 1), 30), "bob": (peft_model(8, 2), 10), "carol": (peft_model(4, 3), 20)}
        for client, (model, samples) in models.items():
            receipt = lac.upload_peft_model(service, model, federation="peft", round=0, client=client, num_samples=samples)
            self.assertEqual((receipt["rank"], receipt["weight"], receipt["lora_modules"]), (model.peft_config["default"].r, samples, 2))
        states = [{name: tensor.detach().numpy() for name, tensor in get_peft_model_state_dict(model).items()} for model, _ in models.values()]
        weights = [samples for _, samples in models.values()]

        for client, (model, _) in models.items():
            rank = model.peft_config["default"].r
            fresh = peft_model(rank, seed=99)
            metadata = lac.load_peft_aggregate(service, fresh, federation="peft", round=0, client=client)
            self.assertEqual((metadata["rank"], metadata["strategy"]), (str(rank), "replication"))
            loaded = get_peft_model_state_dict(fresh)
            for name, expected in replication_reference(states, weights, rank).items():
                np.testing.assert_allclose(loaded[name].numpy(), expected, rtol=1e-6, atol=1e-7, err_msg=f"{client}: {name}")

    def test_a_saved_aggregate_loads_with_peft_from_pretrained(self):
        service = lac.Client(self.url)
        low, high = peft_model(2, 4), peft_model(4, 5)
        lac.upload_peft_model(service, low, federation="saved", round=0, client="low", num_samples=1)
        lac.upload_peft_model(service, high, federation="saved", round=0, client="high", num_samples=1)
        directory = Path(self.directory.name) / "saved-adapter"
        lac.save_peft_aggregate(service, directory, federation="saved", round=0, rank=3)
        self.assertEqual(json.loads((directory / "adapter_config.json").read_text())["r"], 3)
        torch.manual_seed(0)
        loaded = PeftModel.from_pretrained(TwoLayers(), str(directory))
        expected, _ = lac.decode_safetensors((directory / "adapter_model.safetensors").read_bytes())
        for name, tensor in get_peft_model_state_dict(loaded).items():
            np.testing.assert_array_equal(tensor.numpy(), expected[name])
        self.assertEqual(tuple(loaded(torch.ones(1, 6)).shape), (1, 3))

    def test_a_model_whose_rank_differs_from_the_aggregate_is_refused(self):
        service = lac.Client(self.url)
        lac.upload_peft_model(service, peft_model(2, 6), federation="mismatch", round=0, client="a", num_samples=1)
        with self.assertRaises(ValueError) as refused:
            lac.load_peft_aggregate(service, peft_model(4, 7), federation="mismatch", round=0, client="a")
        self.assertIn("r=4", str(refused.exception))


class FederatedDemoTests(ServerTestCase):
    def test_a_short_run_trains_through_the_service_under_both_strategies(self):
        output = Path(self.directory.name) / "demo"
        results = demo.main(["--server", self.url, "--rounds", "2", "--clients", "10", "--high-rank-clients", "2",
                             "--federation-prefix", "test", "--output-dir", str(output)])
        service = lac.Client(self.url)
        for strategy in demo.STRATEGIES:
            federation = results["strategies"][strategy]["federation"]
            for round_ in (1, 2):
                status = service.status(federation=federation, round=round_)
                self.assertTrue(status["sealed"])
                self.assertEqual(sorted(u["rank"] for u in status["uploads"]), [2] * 8 + [16] * 2)
                self.assertEqual(sum(u["weight"] for u in status["uploads"]), sum(c["samples"] for c in results["clients"]))
            rounds = results["strategies"][strategy]["rounds"]
            self.assertEqual([r["round"] for r in rounds], [1, 2])
            self.assertTrue(all(0.0 <= r["global_accuracy"] <= 1.0 for r in rounds))
            diagnostic = results["strategies"][strategy]["first_round_diagnostic"]
            self.assertEqual(diagnostic["rank"], 16)
        # The same seed gives both strategies the same first local training.
        self.assertEqual(results["strategies"]["replication"]["first_round_diagnostic"]["before_aggregation"],
                         results["strategies"]["zero_padding"]["first_round_diagnostic"]["before_aggregation"])
        self.assertEqual(json.loads((output / "results.json").read_text())["clients"], results["clients"])
        self.assertEqual((output / "accuracy.png").read_bytes()[:8], b"\x89PNG\r\n\x1a\n")


class FlowerStrategyTests(ServerTestCase):
    def test_a_flower_simulation_aggregates_every_round_in_the_service(self):
        import run_simulation
        from lora_aggregator_strategy import LoRAAggregatorStrategy
        with tempfile.TemporaryDirectory() as scratch:
            history = run_simulation.main(["--server", self.url, "--federation", "flower", "--rounds", "2", "--nodes", "3",
                                           "--high-rank-nodes", "1", "--output", str(Path(scratch) / "flower.json")])
        self.assertEqual([entry["round"] for entry in history], [0, 1, 2])
        service = lac.Client(self.url)
        for round_ in (1, 2):
            status = service.status(federation="flower", round=round_)
            self.assertTrue(status["sealed"])
            self.assertEqual(sorted(u["rank"] for u in status["uploads"]), [2, 2, 16])
            self.assertTrue(all(u["client"].startswith("node-") for u in status["uploads"]))
        # What Flower evaluated after round 2 is the service's global adapter.
        base, _, _, x_test, y_test = demo.load_task(0)
        model = demo.lora_model(base, 16)
        lac.load_peft_aggregate(service, model, federation="flower", round=2)
        self.assertAlmostEqual(demo.accuracy(model, x_test, y_test), history[-1]["global_accuracy"], places=6)
        self.assertEqual(LoRAAggregatorStrategy.client_id(7), "node-7")


if __name__ == "__main__":
    unittest.main()
