"""A Flower strategy whose aggregation runs in lora-aggregator: heterogeneous LoRA ranks with
replication padding (or zero padding), no aggregation math and no state across rounds in the Flower
app: the federation's rounds are chained in the service.

    from lora_aggregator_strategy import LoRAAggregatorStrategy
    strategy = LoRAAggregatorStrategy("http://127.0.0.1:8080", federation="my-run", padding="replication")
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(initial_lora_state), num_rounds=10)

It is Flower's FedAvg (Message API: node sampling, metrics, evaluation unchanged) with three steps
replaced:
- start sets the federation's settings (strategy `padding`, `chain: true`: sealing round t makes its
  aggregate round t+1's base) and puts `initial_arrays` as round 1's base (round 0 is sealed empty,
  so the federation's current round is Flower's first); the federation must be new;
- configure_train sends every sampled node the round's base from the service: cut to the node's
  rank and unfolded to its scale (Client.start_round, the client loop) once the node has told its
  rank in a reply, else the whole base at scale 1, which the node cuts itself
  (`lora_aggregator_client.truncate_to_rank`; the same tensors for a node with lora_alpha = r);
- aggregate_train uploads every node's reply (its LoRA tensors by name, its rank from the reply's
  metrics under `rank_key`, its lora_alpha under `alpha_key` if there, else the rank, its weight
  under `weighted_by_key`) to the service as round `server_round`, seals the round, and returns the
  service's global adapter at the round's top rank (the federation's strategy, scale 1).
"""
import sys
from concurrent.futures import ThreadPoolExecutor
from logging import INFO
from pathlib import Path

from flwr.app import Array, ArrayRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp.strategy import FedAvg

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import lora_aggregator_client as lac  # noqa: E402


class LoRAAggregatorStrategy(FedAvg):
    def __init__(self, server, federation, *, token=None, padding="replication", rank_key="lora-rank", alpha_key="lora-alpha",
                 upload_threads=4, **fedavg_options):
        super().__init__(**fedavg_options)
        if padding not in ("replication", "zero_padding"):
            raise ValueError("padding is 'replication' or 'zero_padding'")
        self.service = lac.Client(server, token)
        self.federation, self.padding, self.rank_key, self.alpha_key, self.upload_threads = federation, padding, rank_key, alpha_key, upload_threads
        # A node's rank and lora_alpha, as its replies said: what it trains at, not what a round held.
        self.node_scales = {}

    @staticmethod
    def client_id(node_id):
        """The service's client id for a Flower node."""
        return f"node-{node_id}"

    def start(self, grid, initial_arrays, *args, **kwargs):
        self.prepare_federation(initial_arrays)
        return super().start(grid, initial_arrays, *args, **kwargs)

    def prepare_federation(self, initial_arrays):
        """The federation's settings, and the initial adapter (at scale 1) as the base of round 1,
        where Flower's rounds start: Flower's round t is the service's round t."""
        federation = self.service.set_federation(self.federation, strategy=self.padding, chain=True)
        if federation["current_round"] != 0:
            raise ValueError(f"federation {self.federation!r} already has sealed rounds: start a new one")
        data = lac.encode_safetensors({name: array.numpy() for name, array in initial_arrays.items()})
        self.service.put_base(data, federation=self.federation, round=1, rank=max(lac.module_ranks(data).values()))
        self.service.seal(federation=self.federation, round=0)  # empty: it chains nothing over round 1's base

    def configure_train(self, server_round, arrays, config, grid):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        whole = None  # the round's base as stored (scale 1), for nodes whose rank is not known yet
        started = []
        for message in messages:
            node = message.metadata.dst_node_id
            if node in self.node_scales:
                rank, lora_alpha = self.node_scales[node]
                start = self.service.start_round(self.federation, rank=rank, lora_alpha=lora_alpha)
                base = start.base
            else:
                start = None
                if whole is None:
                    whole = self.service.base(federation=self.federation, round=server_round)
                base = whole
            if start is not None and start.round != server_round:
                raise RuntimeError(f"federation {self.federation!r} is at round {start.round}, Flower at {server_round}")
            if base is None:
                raise RuntimeError(f"round {server_round} of {self.federation!r} has no base")
            content = RecordDict({self.arrayrecord_key: self._record(base), self.configrecord_key: message.content[self.configrecord_key]})
            started.append(Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN))
        return started

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        valid = [reply for reply in replies if not reply.has_error()]
        log(INFO, "aggregate_train: %s results and %s failures, aggregated by lora-aggregator (%s)", len(valid), len(replies) - len(valid), self.padding)
        if not valid:
            return None, None

        def upload(reply):
            content = reply.content
            metrics = content.metric_records[next(iter(content.metric_records))]
            arrays = content.array_records[next(iter(content.array_records))]
            node = reply.metadata.src_node_id
            if self.rank_key not in metrics:
                raise ValueError(f"node {node} sent no '{self.rank_key}' metric: its LoRA rank")
            rank = int(metrics[self.rank_key])
            lora_alpha = float(metrics[self.alpha_key]) if self.alpha_key in metrics else float(rank)
            data = lac.encode_safetensors({name: array.numpy() for name, array in arrays.items()})
            self.service.upload(data, federation=self.federation, round=server_round, client=self.client_id(node),
                                rank=rank, lora_alpha=lora_alpha, weight=float(metrics[self.weighted_by_key]))
            return node, (rank, lora_alpha)

        with ThreadPoolExecutor(self.upload_threads) as pool:
            self.node_scales.update(pool.map(upload, valid))
        self.service.seal(federation=self.federation, round=server_round)  # and round server_round + 1's base is its aggregate
        arrays = self._record(self.service.aggregate(federation=self.federation, round=server_round))
        metrics = self.train_metrics_aggr_fn([reply.content for reply in valid], self.weighted_by_key)
        return arrays, metrics

    @staticmethod
    def _record(safetensors_bytes):
        tensors, _ = lac.decode_safetensors(safetensors_bytes)
        return ArrayRecord({name: Array(tensor.copy()) for name, tensor in sorted(tensors.items())})
