#!/usr/bin/env python3
"""lora-aggregator client: standard library only; a module and a command line.

    lora-aggregator-client --server URL [--token T] upload --federation F --round N --client C --rank R [--weight W] FILE
    lora-aggregator-client --server URL download --federation F --round N [--client C | --rank R] [--strategy S] [--dtype D] --output PATH
    lora-aggregator-client --server URL status --federation F --round N
    lora-aggregator-client --server URL seal --federation F --round N

(`pip install ./scripts` installs the command; from a clone, `python3 scripts/lora_aggregator_client.py`
works the same.) FILE is a .safetensors file or a PEFT adapter directory (its
adapter_model.safetensors); it is sent gzip'd. A download whose PATH is an existing directory lands
in PATH/adapter_model.safetensors; with --adapter-config BASE.json it also gets an
adapter_config.json whose `r` is the downloaded rank.

Errors, in the manner of httpx: a refusal by the service (its problem+json answer) raises
AggregatorError with the status, type, title and detail; no answer at all (connection refused or
reset, a timeout) raises AggregatorTransportError. Both are AggregatorClientError. The command line
prints one line and exits 1 for a refusal, 3 when the service cannot be reached and 4 for a local
file or input problem (2 is a usage error).

With numpy: encode_safetensors / decode_safetensors. With torch and PEFT: upload_peft_model and
load_peft_aggregate (a model's adapter up, its truncation back in), save_peft_aggregate (a directory
that PeftModel.from_pretrained loads).
"""
from __future__ import annotations

import argparse
import gzip
import http.client
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # optional dependencies, imported where they are used
    import numpy.typing as npt
    from peft import LoraConfig, PeftModel

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"

EXIT_REFUSED = 1
EXIT_UNREACHABLE = 3  # after argparse's 2 for a usage error
EXIT_LOCAL_ERROR = 4


class AggregatorClientError(Exception):
    """Any failure of a request to the service: catch this to handle both kinds below."""


class AggregatorError(AggregatorClientError):
    """The service answered with an error: its RFC 9457 problem details."""

    def __init__(self, status: int, title: str, detail: str, problem_type: str | None = None) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail
        self.problem_type = problem_type


class AggregatorTransportError(AggregatorClientError):
    """No answer from the service: connection refused or reset, a timeout, a broken HTTP exchange.
    The exception behind it is its __cause__."""

    def __init__(self, method: str, url: str, reason: str) -> None:
        super().__init__(f"{method} {url}: {reason}")
        self.method = method
        self.url = url
        self.reason = reason


def _refusal(error: urllib.error.HTTPError) -> AggregatorError:
    """The service's problem+json as an AggregatorError; any other body (a proxy's page) as its text."""
    payload = error.read()
    try:
        problem = json.loads(payload)
    except ValueError:
        problem = None
    if not isinstance(problem, dict):
        return AggregatorError(error.code, error.reason, payload.decode("utf-8", "replace"))
    return AggregatorError(problem.get("status", error.code), problem.get("title", error.reason), problem.get("detail", ""), problem.get("type"))


def _segment(identifier: str) -> str:
    return urllib.parse.quote(identifier, safe="")


def _round_path(federation: str, round: int) -> str:
    return f"/v1/federations/{_segment(federation)}/rounds/{int(round)}"


class Client:
    def __init__(self, server: str, token: str | None = None, timeout: float = 600) -> None:
        self.server = server.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _request(self, method: str, path: str, query: Mapping[str, str | int] | None = None, body: bytes | None = None,
                 headers: Mapping[str, str] | None = None) -> tuple[bytes, http.client.HTTPMessage]:
        """(body, headers) of a 2xx answer; raises AggregatorError or AggregatorTransportError."""
        url = self.server + path + ("?" + urllib.parse.urlencode(query) if query else "")
        request = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        # urlopen wraps a failure to connect in URLError, but a timeout, reset or cut-off answer while
        # reading (also a refusal's body) arrives bare: OSError or http.client.HTTPException.
        try:
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read(), response.headers
            except urllib.error.HTTPError as error:
                raise _refusal(error) from None
        except (OSError, http.client.HTTPException) as error:
            reason = error.reason if isinstance(error, urllib.error.URLError) else error
            raise AggregatorTransportError(method, url, str(reason) or type(reason).__name__) from error

    def _request_json(self, method: str, path: str, query: Mapping[str, str | int] | None = None, body: bytes | None = None,
                      headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        payload, _ = self._request(method, path, query, body, headers)
        answer: dict[str, Any] = json.loads(payload)
        return answer

    def upload(self, data: bytes, *, federation: str, round: int, client: str, rank: int, weight: float = 1.0) -> dict[str, Any]:
        """Uploads safetensors bytes (sent gzip'd) as `client`'s adapter; returns the service's receipt."""
        path = _round_path(federation, round) + f"/uploads/{_segment(client)}"
        return self._request_json("PUT", path, {"rank": int(rank), "weight": repr(float(weight))}, gzip.compress(data, compresslevel=6),
                                  {"Content-Encoding": "gzip", "Content-Type": "application/octet-stream"})

    def upload_file(self, path: str | os.PathLike[str], *, federation: str, round: int, client: str, rank: int, weight: float = 1.0) -> dict[str, Any]:
        """Uploads a .safetensors file or a PEFT adapter directory."""
        if os.path.isdir(path):
            path = os.path.join(path, ADAPTER_FILE)
        with open(path, "rb") as handle:
            return self.upload(handle.read(), federation=federation, round=round, client=client, rank=rank, weight=weight)

    def aggregate(self, *, federation: str, round: int, client: str | None = None, rank: int | None = None,
                  strategy: str = "replication", dtype: str = "F32") -> bytes:
        """The global adapter (at `rank`, default the round's largest), or `client`'s truncation, as bytes."""
        if client is not None and rank is not None:
            raise ValueError("give client or rank, not both")
        path = _round_path(federation, round) + "/aggregate" + (f"/{_segment(client)}" if client is not None else "")
        query: dict[str, str | int] = {"strategy": strategy, "dtype": dtype}
        if rank is not None:
            query["rank"] = int(rank)
        payload, headers = self._request("GET", path, query, headers={"Accept-Encoding": "gzip"})
        return gzip.decompress(payload) if headers.get("Content-Encoding") == "gzip" else payload

    def download(self, output: str | os.PathLike[str], *, federation: str, round: int, client: str | None = None, rank: int | None = None,
                 strategy: str = "replication", dtype: str = "F32") -> str:
        """Writes the aggregate to `output` (a directory receives adapter_model.safetensors); returns the path."""
        data = self.aggregate(federation=federation, round=round, client=client, rank=rank, strategy=strategy, dtype=dtype)
        path = os.path.join(output, ADAPTER_FILE) if os.path.isdir(output) else os.fspath(output)
        with open(path, "wb") as handle:
            handle.write(data)
        return path

    def status(self, *, federation: str, round: int) -> dict[str, Any]:
        return self._request_json("GET", _round_path(federation, round))

    def seal(self, *, federation: str, round: int) -> dict[str, Any]:
        return self._request_json("POST", _round_path(federation, round) + "/seal")


# --- safetensors with numpy -------------------------------------------------------------------

_NUMPY_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2"}


def _header(data: bytes) -> tuple[int, dict[str, Any]]:
    """(length, parsed JSON) of a safetensors file's header."""
    length = int.from_bytes(data[:8], "little")
    return length, json.loads(data[8:8 + length])


def encode_safetensors(arrays: Mapping[str, npt.ArrayLike], metadata: Mapping[str, object] | None = None) -> bytes:
    """A safetensors file (bytes) of `arrays` (name -> numpy array of float16/32/64), names sorted."""
    import numpy as np
    header: dict[str, Any] = {}
    blobs: list[bytes] = []
    offset = 0
    if metadata:
        header["__metadata__"] = {str(key): str(value) for key, value in metadata.items()}
    for name in sorted(arrays):
        array = np.asarray(arrays[name])
        dtype = next((code for code, numpy_dtype in _NUMPY_DTYPES.items() if np.dtype(numpy_dtype) == array.dtype.newbyteorder("<")), None)
        if dtype is None:
            raise ValueError(f"tensor {name!r} has dtype {array.dtype}; use float16, float32 or float64")
        blob = np.ascontiguousarray(array, dtype=_NUMPY_DTYPES[dtype]).tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(blobs)


def decode_safetensors(data: bytes) -> tuple[dict[str, npt.NDArray[Any]], dict[str, str]]:
    """(name -> numpy array, metadata dict) from safetensors bytes with F16/F32/F64 tensors."""
    import numpy as np
    length, header = _header(data)
    metadata = header.pop("__metadata__", {})
    arrays = {}
    for name, entry in header.items():
        if entry["dtype"] not in _NUMPY_DTYPES:
            raise ValueError(f"tensor {name!r} is {entry['dtype']}; download with dtype F32 or F16 for numpy")
        dtype = np.dtype(_NUMPY_DTYPES[entry["dtype"]])
        begin, end = entry["data_offsets"]
        arrays[name] = np.frombuffer(data, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=8 + length + begin).reshape(entry["shape"])
    return arrays, metadata


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of safetensors bytes (standard library only)."""
    metadata: dict[str, str] = _header(data)[1].get("__metadata__", {})
    return metadata


def file_rank(path: str | os.PathLike[str]) -> int:
    """The LoRA rank a downloaded aggregate declares in its metadata."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        metadata = _header(prefix + handle.read(int.from_bytes(prefix, "little")))[1].get("__metadata__", {})
    if "rank" not in metadata:
        raise ValueError(f"{os.fspath(path)!r} declares no rank in its metadata: not an aggregate from the service")
    return int(metadata["rank"])


def truncate_to_rank(arrays: Mapping[str, npt.NDArray[Any]], rank: int) -> dict[str, npt.NDArray[Any]]:
    """The service's truncation done locally (for a global adapter a node was sent whole): the first
    `rank` rows of every LoRA A and columns of every LoRA B; other tensors as they are."""
    truncated = {}
    for name, array in arrays.items():
        if name.endswith(("lora_A.weight", "lora_embedding_A")):
            axis = 0
        elif name.endswith(("lora_B.weight", "lora_embedding_B")):
            axis = 1
        else:
            truncated[name] = array
            continue
        if array.shape[axis] < rank:
            raise ValueError(f"tensor {name!r} has rank {array.shape[axis]}, below the requested {rank}")
        truncated[name] = array[:rank] if axis == 0 else array[:, :rank]
    return truncated


# --- PEFT -------------------------------------------------------------------------------------

def write_adapter_config(directory: str | os.PathLike[str], base_config: Mapping[str, Any] | str | os.PathLike[str] | LoraConfig, rank: int) -> str:
    """Writes DIRECTORY/adapter_config.json: `base_config` (a dict, a path to a JSON file or a PEFT
    LoraConfig) with `r` set to `rank`, so PEFT builds LoRA layers that fit the downloaded tensors.
    `lora_alpha` is kept as given, and PEFT scales the update by lora_alpha / r: pass the config of
    the model that will use the adapter, or set lora_alpha for the new r yourself."""
    config: dict[str, Any]
    if isinstance(base_config, (str, os.PathLike)):
        with open(base_config, encoding="utf-8") as handle:
            config = json.load(handle)
    elif isinstance(base_config, Mapping):
        config = dict(base_config)
    else:
        config = base_config.to_dict()
    config["r"] = int(rank)
    if config.get("rank_pattern"):
        raise ValueError("the base config has a rank_pattern: per-module ranks do not fit one global rank")
    path = os.path.join(directory, CONFIG_FILE)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, sort_keys=True, default=lambda value: sorted(value) if isinstance(value, (set, frozenset)) else str(value))
    return path


def _peft_rank(model: PeftModel, adapter_name: str) -> int:
    config = model.peft_config[adapter_name]
    if getattr(config, "rank_pattern", None):
        raise ValueError("the adapter has a rank_pattern; the service needs one rank per upload")
    return int(config.r)


def upload_peft_model(service: Client, model: PeftModel, *, federation: str, round: int, client: str, num_samples: float,
                      adapter_name: str = "default") -> dict[str, Any]:
    """Uploads the PEFT model's adapter (get_peft_model_state_dict) as `client`'s, tagged with its rank
    and weighted by `num_samples`; returns the service's receipt. Tensors go up as F32 (exact for
    BF16 and F16)."""
    import torch
    from peft import get_peft_model_state_dict
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    arrays = {name: tensor.detach().to(device="cpu", dtype=torch.float32).numpy() for name, tensor in state.items()}
    return service.upload(encode_safetensors(arrays), federation=federation, round=round, client=client,
                          rank=_peft_rank(model, adapter_name), weight=num_samples)


def load_peft_aggregate(service: Client, model: PeftModel, *, federation: str, round: int, client: str | None = None,
                        adapter_name: str = "default", strategy: str = "replication") -> dict[str, str]:
    """Loads the round's aggregate into the PEFT model with set_peft_model_state_dict: `client`'s
    truncation when given, else the global aggregate at the model's rank. Returns the metadata."""
    import torch
    from peft import set_peft_model_state_dict
    rank = _peft_rank(model, adapter_name)
    data = service.aggregate(federation=federation, round=round, client=client, rank=None if client is not None else rank, strategy=strategy)
    metadata = safetensors_metadata(data)
    if int(metadata.get("rank", rank)) != rank:
        raise ValueError(f"the aggregate has rank {metadata.get('rank')} but the model's adapter has r={rank}")
    arrays, _ = decode_safetensors(data)
    result = set_peft_model_state_dict(model, {name: torch.from_numpy(array.copy()) for name, array in arrays.items()}, adapter_name=adapter_name)
    if result.unexpected_keys:
        raise ValueError(f"the aggregate has tensors the model does not: {sorted(result.unexpected_keys)[:3]}")
    return metadata


def save_peft_aggregate(service: Client, directory: str | os.PathLike[str], *, federation: str, round: int,
                        base_config: Mapping[str, Any] | str | os.PathLike[str] | LoraConfig, client: str | None = None,
                        rank: int | None = None, strategy: str = "replication", dtype: str = "F32") -> str:
    """Writes the aggregate (or `client`'s truncation) as a PEFT adapter directory:
    adapter_model.safetensors and an adapter_config.json from `base_config` with the matching `r`."""
    os.makedirs(directory, exist_ok=True)
    path = service.download(directory, federation=federation, round=round, client=client, rank=rank, strategy=strategy, dtype=dtype)
    write_adapter_config(directory, base_config, file_rank(path))
    return os.fspath(directory)


# --- command line -----------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-aggregator-client", description="lora-aggregator client",
                                     epilog="exit status: 0 done, 1 refused by the service, 2 usage error, "
                                            "3 service unreachable, 4 local file or input problem")
    parser.add_argument("--server", required=True, help="for example http://127.0.0.1:8080")
    parser.add_argument("--token", default=os.environ.get("LORA_AGGREGATOR_TOKEN"), help="bearer token (or LORA_AGGREGATOR_TOKEN)")
    commands = parser.add_subparsers(dest="command", required=True)

    def round_arguments(command: argparse.ArgumentParser) -> None:
        command.add_argument("--federation", required=True)
        command.add_argument("--round", type=int, required=True)

    upload = commands.add_parser("upload", help="upload a .safetensors file or a PEFT adapter directory (gzip'd)")
    round_arguments(upload)
    upload.add_argument("--client", required=True)
    upload.add_argument("--rank", type=int, required=True)
    upload.add_argument("--weight", type=float, default=1.0)
    upload.add_argument("file")
    download = commands.add_parser("download", help="download the global adapter or a client's truncation")
    round_arguments(download)
    chosen = download.add_mutually_exclusive_group()
    chosen.add_argument("--client")
    chosen.add_argument("--rank", type=int)
    download.add_argument("--strategy", default="replication", choices=["replication", "zero_padding"])
    download.add_argument("--dtype", default="F32", choices=["F32", "F16", "BF16"])
    download.add_argument("--output", required=True)
    download.add_argument("--adapter-config", help="a PEFT adapter_config.json to copy beside the download with r set to its rank")
    for name, text in (("status", "show a round"), ("seal", "seal a round")):
        round_arguments(commands.add_parser(name, help=text))
    return parser


def _run(arguments: argparse.Namespace) -> dict[str, Any]:
    client = Client(arguments.server, arguments.token)
    ids = {"federation": arguments.federation, "round": arguments.round}
    if arguments.command == "upload":
        return client.upload_file(arguments.file, **ids, client=arguments.client, rank=arguments.rank, weight=arguments.weight)
    if arguments.command == "download":
        path = client.download(arguments.output, **ids, client=arguments.client, rank=arguments.rank, strategy=arguments.strategy, dtype=arguments.dtype)
        result: dict[str, Any] = {"written": path, "bytes": os.path.getsize(path)}
        if arguments.adapter_config:
            result["adapter_config"] = write_adapter_config(os.path.dirname(os.path.abspath(path)), arguments.adapter_config, file_rank(path))
        return result
    if arguments.command == "status":
        return client.status(**ids)
    return client.seal(**ids)


def _fail(message: str, exit_code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return exit_code


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    try:
        result = _run(arguments)
    except AggregatorError as error:
        return _fail(f"the service refused: {error}", EXIT_REFUSED)
    except AggregatorTransportError as error:
        return _fail(f"no answer from the service: {error}", EXIT_UNREACHABLE)
    except (OSError, ValueError) as error:
        return _fail(str(error), EXIT_LOCAL_ERROR)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
