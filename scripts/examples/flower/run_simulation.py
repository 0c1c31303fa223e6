#!/usr/bin/env python3
"""A Flower simulation whose aggregation runs in lora-aggregator (LoRAAggregatorStrategy).

Nodes fine-tune the federated demo's digits MLP with PEFT LoRA, a few at a high rank and the rest at
a low one, each on a Dirichlet share of the data; Flower samples them, sends each its truncation and
collects their replies; the service aggregates with the chosen padding.

    python3 scripts/examples/flower/run_simulation.py --server http://127.0.0.1:8080 [--padding replication] [--rounds 5] [--nodes 6]

Prints the global adapter's test accuracy after each round (Flower's centralised evaluation) and,
with --output FILE, writes it as JSON. Needs `flwr[simulation]` (Ray), torch and PEFT:
scripts/install-python-examples installs them.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from peft import get_peft_model_state_dict, set_peft_model_state_dict

HERE = Path(__file__).resolve().parent
MODULE_PATHS = [str(HERE), str(HERE.parent), str(HERE.parents[1])]
sys.path[:0] = MODULE_PATHS
import federated_demo as demo  # noqa: E402
import lora_aggregator_client as lac  # noqa: E402
from lora_aggregator_strategy import LoRAAggregatorStrategy  # noqa: E402


def make_apps(settings, history):
    ranks = [settings.high_rank] * settings.high_rank_nodes + [settings.low_rank] * (settings.nodes - settings.high_rank_nodes)
    top_rank = max(ranks)

    client_app = ClientApp()

    @client_app.train()
    def train(message: Message, context: Context):
        partition = int(context.node_config["partition-id"])
        base, x_train, y_train, _, _ = demo.load_task(settings.seed)
        share = demo.dirichlet_split(y_train.numpy(), settings.nodes, settings.alpha, settings.seed)[partition]
        rank = ranks[partition]
        model = demo.lora_model(base, rank)
        received = {name: array.numpy() for name, array in message.content["arrays"].items()}
        state = lac.truncate_to_rank(received, rank)  # a no-op when the strategy sent this node's truncation
        set_peft_model_state_dict(model, {name: torch.from_numpy(np.array(array)) for name, array in state.items()})
        server_round = int(message.content["config"]["server-round"])
        demo.train(model, x_train[share], y_train[share], epochs=settings.local_epochs, learning_rate=settings.learning_rate,
                   seed=settings.seed * 1000 + server_round * 100 + partition)
        reply = RecordDict({
            "arrays": _named(get_peft_model_state_dict(model)),
            "metrics": MetricRecord({"num-examples": len(share), "lora-rank": rank}),
        })
        return Message(content=reply, reply_to=message)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context):
        base, _, _, x_test, y_test = demo.load_task(settings.seed)
        strategy = LoRAAggregatorStrategy(settings.server, settings.federation, padding=settings.padding, fraction_evaluate=0.0,
                                          min_train_nodes=settings.nodes, min_available_nodes=settings.nodes)

        def evaluate(server_round, arrays):
            model = demo.lora_model(base, top_rank)
            set_peft_model_state_dict(model, {name: torch.from_numpy(array.numpy().copy()) for name, array in arrays.items()})
            accuracy = demo.accuracy(model, x_test, y_test)
            history.append({"round": server_round, "global_accuracy": accuracy})
            return MetricRecord({"accuracy": accuracy})

        initial = demo.initial_adapter(base, top_rank, settings.seed)
        strategy.start(grid=grid, initial_arrays=_named(initial), num_rounds=settings.rounds, evaluate_fn=evaluate)

    return server_app, client_app


def _named(state):
    """An ArrayRecord keeping tensor names (torch tensors or numpy arrays)."""
    return ArrayRecord({name: Array(value.detach().numpy().copy() if hasattr(value, "detach") else np.asarray(value).copy()) for name, value in state.items()})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", required=True)
    parser.add_argument("--federation", default=None)
    parser.add_argument("--padding", default="replication", choices=["replication", "zero_padding"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--nodes", type=int, default=6)
    parser.add_argument("--high-rank-nodes", type=int, default=2)
    parser.add_argument("--high-rank", type=int, default=16)
    parser.add_argument("--low-rank", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None)
    settings = parser.parse_args(argv)
    settings.federation = settings.federation or f"flower-{settings.padding.replace('_', '-')}-{int(time.time())}"
    history = []
    server_app, client_app = make_apps(settings, history)
    # Ray's workers import the apps' modules by name: they inherit this path.
    os.environ["PYTHONPATH"] = os.pathsep.join(MODULE_PATHS + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=settings.nodes,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2, "include_dashboard": False}})
    for entry in history:
        print(f"round {entry['round']}: global adapter test accuracy {entry['global_accuracy']:.3f}")
    if settings.output:
        Path(settings.output).write_text(json.dumps({"federation": settings.federation, "padding": settings.padding, "rounds": history}, indent=2) + "\n")
    return history


if __name__ == "__main__":
    main()
