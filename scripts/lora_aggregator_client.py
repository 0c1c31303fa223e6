#!/usr/bin/env python3
"""lora-aggregator client: standard library only; a module and a command line.

    python3 lora_aggregator_client.py --server URL [--token T] upload --federation F --round N --client C --rank R [--weight W] FILE
    python3 lora_aggregator_client.py --server URL download --federation F --round N [--client C | --rank R] [--strategy S] [--dtype D] --output PATH
    python3 lora_aggregator_client.py --server URL status --federation F --round N
    python3 lora_aggregator_client.py --server URL seal --federation F --round N

FILE is a .safetensors file or a PEFT adapter directory (its adapter_model.safetensors); it is sent
gzip'd. A download whose PATH is an existing directory lands in PATH/adapter_model.safetensors;
with --adapter-config BASE.json it also gets an adapter_config.json whose `r` is the downloaded rank.
Errors (problem+json) are raised as AggregatorError carrying the server's detail; the command line
prints them and exits non-zero.

With numpy: encode_safetensors / decode_safetensors. With torch and PEFT: upload_peft_model and
load_peft_aggregate (a model's adapter up, its truncation back in), save_peft_aggregate (a directory
that PeftModel.from_pretrained loads).
"""
import argparse
import gzip
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


class AggregatorError(Exception):
    """A refusal from the server (RFC 9457 problem details) or a failure to reach it."""

    def __init__(self, status, title, detail, problem_type=None):
        super().__init__(f"{status} {title}: {detail}")
        self.status, self.title, self.detail, self.problem_type = status, title, detail, problem_type


class Client:
    def __init__(self, server, token=None, timeout=600):
        self.server = server.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _request(self, method, path, query=None, body=None, headers=None):
        url = self.server + path + ("?" + urllib.parse.urlencode(query) if query else "")
        request = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, response.read(), response.headers
        except urllib.error.HTTPError as error:
            payload = error.read()
            try:
                problem = json.loads(payload)
                raise AggregatorError(problem.get("status", error.code), problem.get("title", error.reason),
                                      problem.get("detail", ""), problem.get("type")) from None
            except (ValueError, AttributeError):
                raise AggregatorError(error.code, error.reason, payload.decode("utf-8", "replace")) from None
        except urllib.error.URLError as error:
            raise AggregatorError(0, "Unreachable", str(error.reason)) from None

    @staticmethod
    def _ids(federation, round_, client=None):
        path = f"/v1/federations/{urllib.parse.quote(federation, safe='')}/rounds/{int(round_)}"
        return path + (f"/uploads/{urllib.parse.quote(client, safe='')}" if client else "")

    def upload(self, federation, round_, client, rank, data, weight=1.0):
        """Uploads safetensors bytes (sent gzip'd); returns the server's receipt as a dict."""
        body = gzip.compress(data, compresslevel=6)
        _, payload, _ = self._request("PUT", self._ids(federation, round_, client), {"rank": int(rank), "weight": repr(float(weight))}, body,
                                      {"Content-Encoding": "gzip", "Content-Type": "application/octet-stream"})
        return json.loads(payload)

    def upload_file(self, federation, round_, client, rank, path, weight=1.0):
        """Uploads a .safetensors file or a PEFT adapter directory."""
        if os.path.isdir(path):
            path = os.path.join(path, ADAPTER_FILE)
        with open(path, "rb") as handle:
            return self.upload(federation, round_, client, rank, handle.read(), weight)

    def aggregate(self, federation, round_, client=None, rank=None, strategy="replication", dtype="F32"):
        """The global adapter (at `rank`, default the round's largest), or `client`'s truncation, as bytes."""
        if client is not None and rank is not None:
            raise ValueError("give client or rank, not both")
        path = self._ids(federation, round_) + "/aggregate" + (f"/{urllib.parse.quote(client, safe='')}" if client else "")
        query = {"strategy": strategy, "dtype": dtype}
        if rank is not None:
            query["rank"] = int(rank)
        _, payload, headers = self._request("GET", path, query, headers={"Accept-Encoding": "gzip"})
        return gzip.decompress(payload) if headers.get("Content-Encoding") == "gzip" else payload

    def download(self, output, federation, round_, **options):
        """Writes the aggregate to `output` (a directory receives adapter_model.safetensors); returns the path."""
        data = self.aggregate(federation, round_, **options)
        path = os.path.join(output, ADAPTER_FILE) if os.path.isdir(output) else output
        with open(path, "wb") as handle:
            handle.write(data)
        return path

    def status(self, federation, round_):
        return json.loads(self._request("GET", self._ids(federation, round_))[1])

    def seal(self, federation, round_):
        return json.loads(self._request("POST", self._ids(federation, round_) + "/seal")[1])


# --- safetensors with numpy -------------------------------------------------------------------

_NUMPY_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2"}


def encode_safetensors(arrays, metadata=None):
    """A safetensors file (bytes) of `arrays` (name -> numpy array of float16/32/64), names sorted."""
    import numpy as np
    header, blobs, offset = {}, [], 0
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


def decode_safetensors(data):
    """(name -> numpy array, metadata dict) from safetensors bytes with F16/F32/F64 tensors."""
    import numpy as np
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    metadata = header.pop("__metadata__", {})
    arrays = {}
    for name, entry in header.items():
        if entry["dtype"] not in _NUMPY_DTYPES:
            raise ValueError(f"tensor {name!r} is {entry['dtype']}; download with dtype F32 or F16 for numpy")
        begin, end = entry["data_offsets"]
        arrays[name] = np.frombuffer(data, dtype=_NUMPY_DTYPES[entry["dtype"]], count=(end - begin) // np.dtype(_NUMPY_DTYPES[entry["dtype"]]).itemsize,
                                     offset=8 + length + begin).reshape(entry["shape"])
    return arrays, metadata


def safetensors_metadata(data):
    """The `__metadata__` of safetensors bytes (standard library only)."""
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + length]).get("__metadata__", {})


def file_rank(path):
    """The LoRA rank a downloaded aggregate declares in its metadata."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        return int(json.loads(handle.read(length)).get("__metadata__", {})["rank"])


def truncate_to_rank(arrays, rank):
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

def write_adapter_config(directory, base_config, rank):
    """Writes DIRECTORY/adapter_config.json: `base_config` (a dict, a path to a JSON file or a PEFT
    LoraConfig) with `r` set to `rank`, so PEFT builds LoRA layers that fit the downloaded tensors.
    `lora_alpha` is kept as given, and PEFT scales the update by lora_alpha / r: pass the config of
    the model that will use the adapter, or set lora_alpha for the new r yourself."""
    if isinstance(base_config, (str, os.PathLike)):
        with open(base_config, encoding="utf-8") as handle:
            config = json.load(handle)
    elif isinstance(base_config, dict):
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


def _peft_rank(model, adapter_name):
    config = model.peft_config[adapter_name]
    if getattr(config, "rank_pattern", None):
        raise ValueError("the adapter has a rank_pattern; the service needs one rank per upload")
    return int(config.r)


def upload_peft_model(client, federation, round_, client_id, model, num_samples, adapter_name="default"):
    """Uploads the PEFT model's adapter (get_peft_model_state_dict), tagged with its rank and weighted
    by `num_samples`; returns the server's receipt. Tensors go up as F32 (exact for BF16 and F16)."""
    import torch
    from peft import get_peft_model_state_dict
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    arrays = {name: tensor.detach().to(device="cpu", dtype=torch.float32).numpy() for name, tensor in state.items()}
    return client.upload(federation, round_, client_id, _peft_rank(model, adapter_name), encode_safetensors(arrays), weight=num_samples)


def load_peft_aggregate(client, federation, round_, model, client_id=None, adapter_name="default", strategy="replication"):
    """Loads the round's aggregate into the PEFT model with set_peft_model_state_dict: `client_id`'s
    truncation when given, else the global aggregate at the model's rank. Returns the metadata."""
    import torch
    from peft import set_peft_model_state_dict
    rank = _peft_rank(model, adapter_name)
    data = client.aggregate(federation, round_, client=client_id, rank=None if client_id else rank, strategy=strategy)
    metadata = safetensors_metadata(data)
    if int(metadata.get("rank", rank)) != rank:
        raise ValueError(f"the aggregate has rank {metadata.get('rank')} but the model's adapter has r={rank}")
    arrays, _ = decode_safetensors(data)
    result = set_peft_model_state_dict(model, {name: torch.from_numpy(array.copy()) for name, array in arrays.items()}, adapter_name=adapter_name)
    if result.unexpected_keys:
        raise ValueError(f"the aggregate has tensors the model does not: {sorted(result.unexpected_keys)[:3]}")
    return metadata


def save_peft_aggregate(client, directory, federation, round_, base_config, client_id=None, rank=None, strategy="replication", dtype="F32"):
    """Writes the aggregate (or `client_id`'s truncation) as a PEFT adapter directory:
    adapter_model.safetensors and an adapter_config.json from `base_config` with the matching `r`."""
    os.makedirs(directory, exist_ok=True)
    path = client.download(directory, federation, round_, client=client_id, rank=rank, strategy=strategy, dtype=dtype)
    write_adapter_config(directory, base_config, file_rank(path))
    return directory


def main(argv=None):
    parser = argparse.ArgumentParser(description="lora-aggregator client")
    parser.add_argument("--server", required=True, help="for example http://127.0.0.1:8080")
    parser.add_argument("--token", default=os.environ.get("LORA_AGGREGATOR_TOKEN"), help="bearer token (or LORA_AGGREGATOR_TOKEN)")
    commands = parser.add_subparsers(dest="command", required=True)

    def round_arguments(command):
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

    arguments = parser.parse_args(argv)
    client = Client(arguments.server, arguments.token)
    try:
        if arguments.command == "upload":
            result = client.upload_file(arguments.federation, arguments.round, arguments.client, arguments.rank, arguments.file, arguments.weight)
        elif arguments.command == "download":
            path = client.download(arguments.output, arguments.federation, arguments.round, client=arguments.client,
                                   rank=arguments.rank, strategy=arguments.strategy, dtype=arguments.dtype)
            result = {"written": path, "bytes": os.path.getsize(path)}
            if arguments.adapter_config:
                result["adapter_config"] = write_adapter_config(os.path.dirname(os.path.abspath(path)), arguments.adapter_config, file_rank(path))
        elif arguments.command == "status":
            result = client.status(arguments.federation, arguments.round)
        else:
            result = client.seal(arguments.federation, arguments.round)
    except (AggregatorError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
