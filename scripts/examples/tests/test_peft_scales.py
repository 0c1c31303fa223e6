"""PEFT scales and per-module ranks end to end, with real PEFT against the real server: clients
with one lora_alpha and different ranks (one with a rank_pattern) upload their save_pretrained
directories; each client's download, loaded with PeftModel.from_pretrained and its own config, and
the global adapter saved by save_peft_aggregate must apply the update that an independent numpy
reference (fold by √s, replication padding, cut) says. Every directory is loaded with the
adapter_config.json the service hands out for it (save_peft_aggregate). Run with
scripts/install-python-examples's python."""
import json
import sys
import unittest
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict

EXAMPLES = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(EXAMPLES.parent / "tests"), str(EXAMPLES.parent)]
from support import ServerTestCase  # noqa: E402

import lora_aggregator_client as lac  # noqa: E402
from test_examples import TwoLayers  # noqa: E402  (the same tiny model as the examples' tests)

LORA_ALPHA = 16
MODULES = ("up", "down")
# client -> (r, rank_pattern, weight)
CLIENTS = {"c-rank4": (4, {}, 3.0), "c-rank16": (16, {}, 1.0), "c-rank8-down2": (8, {"down": 2}, 2.0)}


def base_model():
    torch.manual_seed(0)
    return TwoLayers()


def lora_config(rank, rank_pattern):
    return LoraConfig(r=rank, lora_alpha=LORA_ALPHA, rank_pattern=dict(rank_pattern), target_modules=list(MODULES), lora_dropout=0.0)


def random_client(rank, rank_pattern, seed):
    """A PEFT model with random LoRA factors (set, not trained)."""
    model = get_peft_model(base_model(), lora_config(rank, rank_pattern))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model


def module_rank(rank, rank_pattern, module):
    return rank_pattern.get(module, rank)


def delta_weights(model):
    """module -> the update PEFT applies to its weight (B·A·scaling), as float64 numpy."""
    return {module: model.base_model.model.get_submodule(module).get_delta_weight("default").detach().double().numpy() for module in MODULES}


class Reference:
    """Folding and replication padding written out in numpy, independently of the client module."""

    def __init__(self, states):
        # states: client -> (state dict as numpy, r, rank_pattern, weight)
        self.folded = {}  # module -> list of (A~, B~, weight)
        for module in MODULES:
            entries = []
            for state, rank, rank_pattern, weight in states.values():
                r = module_rank(rank, rank_pattern, module)
                scale = LORA_ALPHA / r
                a = state[f"base_model.model.{module}.lora_A.weight"].astype(np.float64)
                b = state[f"base_model.model.{module}.lora_B.weight"].astype(np.float64)
                assert a.shape[0] == r and b.shape[1] == r
                entries.append((np.sqrt(scale) * a, np.sqrt(scale) * b, weight))
            self.folded[module] = entries

    def global_factors(self, module):
        entries = self.folded[module]
        top = max(a.shape[0] for a, _, _ in entries)
        a_rows, b_columns = [], []
        for j in range(top):
            owners = [(a[j], b[:, j], w) for a, b, w in entries if a.shape[0] > j]
            total = sum(w for _, _, w in owners)
            a_rows.append(sum(w * row for row, _, w in owners) / total)
            b_columns.append(sum(w * column for _, column, w in owners) / total)
        return np.stack(a_rows), np.stack(b_columns, axis=1)

    def delta(self, module, rank=None):
        """ΔW at scale 1 of the global factors cut to `rank` (unfolding then PEFT's scale cancel)."""
        a, b = self.global_factors(module)
        rank = a.shape[0] if rank is None else rank
        return b[:, :rank] @ a[:rank]


class PeftScaleTests(ServerTestCase):
    def assert_deltas(self, model, expected, label):
        for module, delta in delta_weights(model).items():
            reference = expected[module]
            np.testing.assert_allclose(delta, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max(), err_msg=f"{label}: {module}")

    def test_each_client_and_the_global_adapter_apply_the_folded_replication_update(self):
        service = lac.Client(self.url)
        scratch = Path(self.directory.name) / "scales"
        states = {}
        for seed, (client, (rank, rank_pattern, weight)) in enumerate(CLIENTS.items(), start=1):
            model = random_client(rank, rank_pattern, seed)
            directory = scratch / client
            model.save_pretrained(str(directory))
            receipt = lac.upload_peft_directory(service, directory, federation="scales", round=0, client=client, weight=weight)
            self.assertEqual((receipt["rank"], receipt["lora_alpha"], receipt["lora_modules"], receipt["weight"]), (rank, LORA_ALPHA, 2, weight))
            states[client] = ({name: tensor.detach().numpy() for name, tensor in get_peft_model_state_dict(model).items()}, rank, rank_pattern, weight)
        reference = Reference(states)
        # The reference is not trivially right: the clients' raw factors would give a different update.
        a_raw = sum(w * s["base_model.model.up.lora_A.weight"][:4] for s, _, _, w in states.values()) / sum(w for *_, w in states.values())
        b_raw = sum(w * s["base_model.model.up.lora_B.weight"][:, :4] for s, _, _, w in states.values()) / sum(w for *_, w in states.values())
        self.assertFalse(np.allclose(b_raw @ a_raw * LORA_ALPHA / 4, reference.delta("up", 4), rtol=1e-3))

        for client, (rank, rank_pattern, _) in CLIENTS.items():
            with self.subTest(client=client):
                ranks = {module: module_rank(rank, rank_pattern, module) for module in MODULES}
                expected = {module: reference.delta(module, ranks[module]) for module in MODULES}
                # Its download with the service's config for it, the adapter_config.json it uploaded (same bytes), loaded by PEFT as it is.
                directory = scratch / f"{client}-next"
                lac.save_peft_aggregate(service, directory, federation="scales", round=0, client=client)
                self.assertEqual((directory / "adapter_config.json").read_bytes(), (scratch / client / "adapter_config.json").read_bytes())
                self.assertEqual(lac.module_ranks((directory / "adapter_model.safetensors").read_bytes()), ranks)
                loaded = PeftModel.from_pretrained(base_model(), str(directory))
                self.assert_deltas(loaded, expected, f"{client} from_pretrained")
                # The same through load_peft_aggregate into a model with the client's config.
                model = get_peft_model(base_model(), lora_config(rank, rank_pattern))
                metadata = lac.load_peft_aggregate(service, model, federation="scales", round=0, client=client)
                self.assertEqual(metadata["strategy"], "replication")
                self.assert_deltas(model, expected, f"{client} load_peft_aggregate")

        full = {module: reference.delta(module) for module in MODULES}
        self.assertEqual({module: reference.global_factors(module)[0].shape[0] for module in MODULES}, {"up": 16, "down": 16})
        # The global adapter saved as a directory: at scale 1 (lora_alpha = r), or for lora_alpha=16. Its
        # config is the lowest client id's (c-rank16, one r) with the global ranks and scale.
        for label, options in (("scale 1", {}), ("lora_alpha 16", {"lora_alpha": LORA_ALPHA})):
            with self.subTest(global_adapter=label):
                directory = scratch / f"global-{len(options)}"
                lac.save_peft_aggregate(service, directory, federation="scales", round=0, **options)
                config = json.loads((directory / "adapter_config.json").read_text())
                self.assertEqual((config["r"], config["rank_pattern"], config["alpha_pattern"]), (16, {}, {}))
                self.assertEqual(sorted(config["target_modules"]), sorted(MODULES))
                self.assertEqual(config["lora_alpha"], options.get("lora_alpha", 16))
                self.assert_deltas(PeftModel.from_pretrained(base_model(), str(directory)), full, f"global {label}")
        # Cut to rank 4: one rank, lora_alpha = 4.
        directory = scratch / "global-rank4"
        lac.save_peft_aggregate(service, directory, federation="scales", round=0, rank=4)
        self.assertEqual(json.loads((directory / "adapter_config.json").read_text())["lora_alpha"], 4)
        self.assert_deltas(PeftModel.from_pretrained(base_model(), str(directory)), {m: reference.delta(m, 4) for m in MODULES}, "global rank 4")

        # The global adapter into models of other shapes: one r (the service unfolds), a rank_pattern (unfolded locally).
        for rank, rank_pattern in ((4, {}), (8, {"down": 2}), (16, {"up": 2})):
            with self.subTest(global_into=(rank, rank_pattern)):
                model = get_peft_model(base_model(), lora_config(rank, rank_pattern))
                lac.load_peft_aggregate(service, model, federation="scales", round=0)
                expected = {module: reference.delta(module, module_rank(rank, rank_pattern, module)) for module in MODULES}
                self.assert_deltas(model, expected, f"global into r={rank} {rank_pattern}")

    def test_upload_peft_model_sends_the_rank_pattern_and_a_mismatched_model_is_refused(self):
        service = lac.Client(self.url)
        model = random_client(8, {"down": 2}, seed=7)
        receipt = lac.upload_peft_model(service, model, federation="pattern-model", round=0, client="a", num_samples=5)
        self.assertEqual((receipt["rank"], receipt["lora_alpha"], receipt["lora_modules"], receipt["weight"]), (8, LORA_ALPHA, 2, 5))
        # Alone in the round: its own download is what it sent, so PEFT applies the same update.
        fresh = get_peft_model(base_model(), lora_config(8, {"down": 2}))
        lac.load_peft_aggregate(service, fresh, federation="pattern-model", round=0, client="a")
        self.assert_deltas(fresh, delta_weights(model), "round trip")
        with self.assertRaises(ValueError) as wrong_rank:
            lac.load_peft_aggregate(service, get_peft_model(base_model(), lora_config(8, {})), federation="pattern-model", round=0, client="a")
        self.assertIn("'down'", str(wrong_rank.exception))
        with self.assertRaises(ValueError) as wrong_scale:
            other = get_peft_model(base_model(), LoraConfig(r=8, lora_alpha=8, rank_pattern={"down": 2}, target_modules=list(MODULES)))
            lac.load_peft_aggregate(service, other, federation="pattern-model", round=0, client="a")
        self.assertIn("lora_alpha", str(wrong_scale.exception))

        # With a rank-4 client too, the global ranks differ by module (up 8, down 4): the saved config
        # says so with rank_pattern, and at scale 1 with alpha_pattern.
        other = random_client(4, {}, seed=8)
        lac.upload_peft_model(service, other, federation="pattern-model", round=0, client="b", num_samples=1)
        states = {"a": ({n: t.detach().numpy() for n, t in get_peft_model_state_dict(model).items()}, 8, {"down": 2}, 5.0),
                  "b": ({n: t.detach().numpy() for n, t in get_peft_model_state_dict(other).items()}, 4, {}, 1.0)}
        reference = Reference(states)
        full = {module: reference.delta(module) for module in MODULES}
        # The server keys patterns by anchored module names, so each resolves to exactly its module.
        for label, options, alpha, alpha_pattern in (("scale 1", {}, 8, {"^down$": 4}), ("lora_alpha 16", {"lora_alpha": LORA_ALPHA}, 16, {})):
            with self.subTest(global_adapter=label):
                directory = Path(self.directory.name) / f"pattern-global-{len(options)}"
                lac.save_peft_aggregate(service, directory, federation="pattern-model", round=0, **options)
                config = json.loads((directory / "adapter_config.json").read_text())
                self.assertEqual((config["r"], config["rank_pattern"], config["lora_alpha"], config["alpha_pattern"]), (8, {"^down$": 4}, alpha, alpha_pattern))
                self.assert_deltas(PeftModel.from_pretrained(base_model(), str(directory)), full, f"global {label}")


if __name__ == "__main__":
    unittest.main()
