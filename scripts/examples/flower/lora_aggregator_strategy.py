"""A Flower strategy whose aggregation runs in lora-aggregator: heterogeneous LoRA ranks with
replication padding (or zero padding), no aggregation math in the Flower app.

    from lora_aggregator_strategy import LoRAAggregatorStrategy
    strategy = LoRAAggregatorStrategy("http://127.0.0.1:8080", federation="my-run", padding="replication")
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(initial_lora_state), num_rounds=10)

It is Flower's FedAvg (Message API: node sampling, metrics, evaluation unchanged) with two steps
replaced:
- aggregate_train uploads every node's reply (its LoRA tensors by name, its rank from the reply's
  metrics under `rank_key`, its weight under `weighted_by_key`) to the service as round
  `server_round`, seals the round, and returns the service's global adapter at the round's top rank;
- configure_train sends each node that uploaded in the last round its own truncation from the
  service, so a rank-2 node receives rank-2 tensors; any other node gets the global adapter and
  truncates it itself (`lora_aggregator_client.truncate_to_rank`).
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
    def __init__(self, server, federation, *, token=None, padding="replication", rank_key="lora-rank", upload_threads=4, **fedavg_options):
        super().__init__(**fedavg_options)
        if padding not in ("replication", "zero_padding"):
            raise ValueError("padding is 'replication' or 'zero_padding'")
        self.service = lac.Client(server, token)
        self.federation, self.padding, self.rank_key, self.upload_threads = federation, padding, rank_key, upload_threads
        self.last_round, self.last_uploaders = None, set()

    @staticmethod
    def client_id(node_id):
        """The service's client id for a Flower node."""
        return f"node-{node_id}"

    def configure_train(self, server_round, arrays, config, grid):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if self.last_round is None:
            return messages
        personalised = []
        for message in messages:
            node = message.metadata.dst_node_id
            if node not in self.last_uploaders:
                personalised.append(message)
                continue
            data = self.service.aggregate(federation=self.federation, round=self.last_round, client=self.client_id(node), strategy=self.padding)
            content = RecordDict({self.arrayrecord_key: self._record(data), self.configrecord_key: message.content[self.configrecord_key]})
            personalised.append(Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN))
        return personalised

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
            if self.rank_key not in metrics:
                raise ValueError(f"node {reply.metadata.src_node_id} sent no '{self.rank_key}' metric: its LoRA rank")
            data = lac.encode_safetensors({name: array.numpy() for name, array in arrays.items()})
            self.service.upload(data, federation=self.federation, round=server_round, client=self.client_id(reply.metadata.src_node_id),
                                rank=int(metrics[self.rank_key]), weight=float(metrics[self.weighted_by_key]))

        with ThreadPoolExecutor(self.upload_threads) as pool:
            list(pool.map(upload, valid))
        self.service.seal(federation=self.federation, round=server_round)
        self.last_round, self.last_uploaders = server_round, {reply.metadata.src_node_id for reply in valid}
        arrays = self._record(self.service.aggregate(federation=self.federation, round=server_round, strategy=self.padding))
        metrics = self.train_metrics_aggr_fn([reply.content for reply in valid], self.weighted_by_key)
        return arrays, metrics

    @staticmethod
    def _record(safetensors_bytes):
        tensors, _ = lac.decode_safetensors(safetensors_bytes)
        return ArrayRecord({name: Array(tensor.copy()) for name, tensor in sorted(tensors.items())})
