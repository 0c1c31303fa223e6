#!/usr/bin/env python3
"""A real federated LoRA run through lora-aggregator: replication padding against zero padding.

A small MLP is pre-trained on digits 0-4 of scikit-learn's handwritten digits, frozen, and then
fine-tuned with PEFT LoRA by clients that each hold a non-IID share (Dirichlet label skew) of all ten
digits. The few clients with the most data train at a high rank, the rest at a low one (LoRA
alpha = r, so every client's update has the same scale). Each federation is set to chain (its
strategy, `chain: true`): sealing a round makes its aggregate the next round's base. Every round each
client runs the client loop, Client.start_round (the federation's current round and its base cut to
the client's rank and scale), trains from that base locally on CPU, and uploads its adapter weighted
by its sample count; the service aggregates. The demo keeps no state across rounds but the service's.
The whole run is done twice, identically seeded, once per padding strategy, as two federations on
one server.

    python3 scripts/examples/federated_demo.py --server http://127.0.0.1:8080 [--rounds 10] [--output-dir DIR]

Prints test accuracy per round for both strategies, the paper's first-round diagnostic (a high-rank
client's accuracy before and after aggregation) and writes results.json and accuracy.png to DIR.
"""
import argparse
import copy
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lora_aggregator_client as lac  # noqa: E402

TARGET_MODULES = ["hidden1", "hidden2", "output"]
STRATEGIES = ["replication", "zero_padding"]


class DigitsMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden1 = torch.nn.Linear(64, 128)
        self.hidden2 = torch.nn.Linear(128, 128)
        self.output = torch.nn.Linear(128, 10)

    def forward(self, x):
        return self.output(torch.relu(self.hidden2(torch.relu(self.hidden1(x)))))


def accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def train(model, x, y, epochs, learning_rate, seed, batch_size=32):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            batch = order[start:start + batch_size]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()


def pretrained_base(x, y, seed):
    """The frozen base model: trained on digits 0-4 only, so half the task is new to it."""
    torch.manual_seed(seed)
    base = DigitsMLP()
    known = y < 5
    train(base, x[known], y[known], epochs=40, learning_rate=1e-2, seed=seed)
    return base


def lora_model(base, rank):
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=TARGET_MODULES)
    return get_peft_model(copy.deepcopy(base), config)


def dirichlet_split(y, clients, alpha, seed):
    """Indices per client: for each label (digit), its samples are shared out with Dirichlet(alpha)
    weights. Also paper_regime.py's split, for any labels."""
    rng = np.random.default_rng(seed)
    shares = [[] for _ in range(clients)]
    for label in np.unique(y):
        indices = rng.permutation(np.flatnonzero(y == label))
        cuts = (np.cumsum(rng.dirichlet([alpha] * clients)) * len(indices)).astype(int)[:-1]
        for client, part in enumerate(np.split(indices, cuts)):
            shares[client].extend(part.tolist())
    return [np.array(sorted(share)) for share in shares]


def client_ranks(sizes, high_rank_clients, high_rank, low_rank):
    """The clients with the most data train at the high rank (more data, more capacity), the rest low."""
    largest = set(sorted(range(len(sizes)), key=lambda client: -sizes[client])[:high_rank_clients])
    return [high_rank if client in largest else low_rank for client in range(len(sizes))]


def initial_adapter(base, rank, seed):
    """The round-0 global adapter at the top rank: PEFT's own initialisation (A random, B zero)."""
    torch.manual_seed(seed)
    model = lora_model(base, rank)
    return {name: tensor.detach().numpy().copy() for name, tensor in get_peft_model_state_dict(model).items()}


def start_federation(service, federation, strategy, initial, top_rank):
    """Sets the federation to aggregate with `strategy` and chain its rounds, and gives it the initial
    adapter (safetensors bytes, scale 1) as the base of round 1, where training starts. Round 0 is
    sealed without uploads so that the federation's current round is 1; sealing it chains nothing,
    since round 1 already has a base (an empty round's aggregate under zero padding would be zeros)."""
    service.set_federation(federation, strategy=strategy, chain=True)
    service.put_base(initial, federation=federation, round=1, rank=top_rank)
    service.seal(federation=federation, round=0)


@functools.lru_cache(maxsize=2)
def load_task(seed):
    """(frozen pre-trained base, x_train, y_train, x_test, y_test): the same for every caller and process."""
    digits = load_digits()
    x_all = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y_all = torch.tensor(digits.target, dtype=torch.long)
    train_index, test_index = train_test_split(np.arange(len(y_all)), test_size=0.25, random_state=seed, stratify=digits.target)
    base = pretrained_base(x_all[train_index], y_all[train_index], seed)
    for parameter in base.parameters():
        parameter.requires_grad_(False)
    return base, x_all[train_index], y_all[train_index], x_all[test_index], y_all[test_index]


def run(arguments):
    base, x_train, y_train, x_test, y_test = load_task(arguments.seed)
    base_accuracy = accuracy(base, x_test, y_test)

    shares = dirichlet_split(y_train.numpy(), arguments.clients, arguments.alpha, arguments.seed)
    ranks = client_ranks([len(share) for share in shares], arguments.high_rank_clients, arguments.high_rank, arguments.low_rank)
    clients = [{"id": f"client-{index:02d}", "rank": rank, "indices": share} for index, (rank, share) in enumerate(zip(ranks, shares))]
    top_rank = max(ranks)
    service = lac.Client(arguments.server, arguments.token)
    run_id = arguments.federation_prefix or f"digits-{int(time.time())}"
    initial = lac.encode_safetensors(initial_adapter(base, top_rank, arguments.seed))

    print(f"base model (digits 0-4 only): test accuracy {base_accuracy:.3f}")
    print("clients: " + ", ".join(f"{c['id']} r={c['rank']} n={len(c['indices'])}" for c in clients))
    results = {"base_accuracy": base_accuracy, "clients": [{"client": c["id"], "rank": c["rank"], "samples": len(c["indices"])} for c in clients],
               "settings": {key: value for key, value in vars(arguments).items() if key not in ("server", "token", "output_dir")}, "strategies": {}}
    for strategy in STRATEGIES:
        federation = f"{run_id}-{strategy.replace('_', '-')}"
        start_federation(service, federation, strategy, initial, top_rank)
        history, diagnostic = [], {}
        for round_ in range(1, arguments.rounds + 1):
            local = {}
            for client in clients:
                # The client loop: the round to upload to and its base at this client's rank and
                # scale (round 1: the initial adapter; later: the last global adapter, chained).
                start = service.start_round(federation, rank=client["rank"], lora_alpha=client["rank"])
                if start.round != round_ or start.base is None:
                    raise RuntimeError(f"{federation}: the service's current round is {start.round} (base: {start.base is not None}), expected {round_} with a base")
                model = lora_model(base, client["rank"])
                lac.load_peft_state(model, start.base)
                x, y = x_train[client["indices"]], y_train[client["indices"]]
                train(model, x, y, epochs=arguments.local_epochs, learning_rate=arguments.learning_rate, seed=arguments.seed * 1000 + round_ * 100 + int(client["id"][-2:]))
                local[client["id"]] = accuracy(model, x_test, y_test)
                lac.upload_peft_model(service, model, federation=federation, round=start.round, client=client["id"], num_samples=len(client["indices"]))
            service.seal(federation=federation, round=round_)  # and round_ + 1's base is this round's aggregate
            # Downloads name no strategy: the federation's applies.
            global_model = lora_model(base, top_rank)
            lac.load_peft_aggregate(service, global_model, federation=federation, round=round_)
            low_model = lora_model(base, arguments.low_rank)
            lac.load_peft_aggregate(service, low_model, federation=federation, round=round_)
            entry = {"round": round_, "global_accuracy": accuracy(global_model, x_test, y_test),
                     "low_rank_truncation_accuracy": accuracy(low_model, x_test, y_test),
                     "mean_local_accuracy": float(np.mean(list(local.values())))}
            history.append(entry)
            if round_ == 1:
                high = next(client for client in clients if client["rank"] == top_rank)
                after = lora_model(base, high["rank"])
                lac.load_peft_aggregate(service, after, federation=federation, round=1, client=high["id"])
                diagnostic = {"client": high["id"], "rank": high["rank"], "before_aggregation": local[high["id"]],
                              "after_aggregation": accuracy(after, x_test, y_test)}
            print(f"{strategy:>12} round {round_:2d}: global {entry['global_accuracy']:.3f}  rank-{arguments.low_rank} truncation "
                  f"{entry['low_rank_truncation_accuracy']:.3f}  clients' local models {entry['mean_local_accuracy']:.3f}", flush=True)
        results["strategies"][strategy] = {"federation": federation, "rounds": history, "first_round_diagnostic": diagnostic}

    print("\nfirst-round diagnostic (the high-rank client's own test accuracy):")
    for strategy in STRATEGIES:
        d = results["strategies"][strategy]["first_round_diagnostic"]
        print(f"  {strategy:>12}: {d['client']} (r={d['rank']}) {d['before_aggregation']:.3f} after local training -> "
              f"{d['after_aggregation']:.3f} with its truncation of the aggregate")
    return results


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(7, 4.2))
    for strategy, style in zip(STRATEGIES, ("-o", "--s")):
        rounds = results["strategies"][strategy]["rounds"]
        axis.plot([r["round"] for r in rounds], [r["global_accuracy"] for r in rounds], style, label=f"{strategy}: global adapter")
        axis.plot([r["round"] for r in rounds], [r["low_rank_truncation_accuracy"] for r in rounds], style, alpha=0.45,
                  label=f"{strategy}: rank-{results['settings']['low_rank']} truncation")
    axis.axhline(results["base_accuracy"], color="grey", linewidth=0.8, linestyle=":", label="base model (digits 0-4 only)")
    axis.set_xlabel("round")
    axis.set_ylabel("test accuracy")
    axis.set_title("Federated LoRA on digits, heterogeneous ranks, via lora-aggregator")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", required=True)
    parser.add_argument("--token", default=None)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--high-rank-clients", type=int, default=3)
    parser.add_argument("--high-rank", type=int, default=16)
    parser.add_argument("--low-rank", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the label skew")
    parser.add_argument("--local-epochs", type=int, default=10)
    parser.add_argument("--learning-rate", type=float, default=2e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--federation-prefix", default=None)
    parser.add_argument("--output-dir", default=None, help="where results.json and accuracy.png go")
    arguments = parser.parse_args(argv)
    if not 0 < arguments.high_rank_clients < arguments.clients or arguments.low_rank >= arguments.high_rank:
        parser.error("need some but not all clients at the high rank, and a low rank below the high one")
    results = run(arguments)
    if arguments.output_dir:
        output = Path(arguments.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        plot(results, output / "accuracy.png")
        print(f"\nwrote {output / 'results.json'} and {output / 'accuracy.png'}")
    return results


if __name__ == "__main__":
    main()
