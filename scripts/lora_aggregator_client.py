#!/usr/bin/env python3
"""lora-aggregator client: standard library only; a module and a command line.

    lora-aggregator-client --server URL [--token T] upload --federation F --round N --client C --rank R [--weight W] [--lora-alpha A] [--use-rslora] FILE
    lora-aggregator-client --server URL upload --federation F --round N --client C [--weight W] --peft-dir DIR
    lora-aggregator-client --server URL download --federation F --round N [--client C | --rank R] [--lora-alpha A] [--use-rslora]
                                                 [--strategy S] [--dtype D] (--output PATH | --peft-dir DIR)
    lora-aggregator-client --server URL status --federation F --round N
    lora-aggregator-client --server URL seal --federation F --round N
    lora-aggregator-client --server URL federation show --federation F
    lora-aggregator-client --server URL federation set --federation F [--strategy S] [--chain | --no-chain]
                                                       [--min-uploads N] [--grace-seconds G] [--max-uploads M] [--round-timeout-seconds T]
    lora-aggregator-client --server URL base put --federation F --round N (--rank R [--lora-alpha A] [--use-rslora] FILE | --peft-dir DIR)
    lora-aggregator-client --server URL base get --federation F --round N [--rank R] [--lora-alpha A] [--use-rslora] [--dtype D] --output PATH
    lora-aggregator-client --server URL base delete --federation F --round N

(`pip install ./scripts` installs the command; from a clone, `python3 scripts/lora_aggregator_client.py`
works the same.) FILE is a .safetensors file or a PEFT adapter directory (its
adapter_model.safetensors), tagged with its rank and scale (lora_alpha, default the rank); --peft-dir
sends a directory as save_pretrained wrote it, adapter_model.safetensors with its adapter_config.json
(multipart/form-data), so the service takes ranks and scales from the config. Uploads are sent
zstd'd when the zstandard package is installed, gzip'd otherwise.
A download whose PATH is an existing directory lands in PATH/adapter_model.safetensors; --peft-dir DIR
also writes DIR/adapter_config.json, the service's config that loads it with PeftModel.from_pretrained
(GET .../adapter_config for the global adapter at the same rank and scale, .../adapter_config/C for
--client: the config C uploaded with), written as the service sent it. Without --strategy, a download
uses the federation's strategy (its settings; replication unless set otherwise).

A federation's settings (`federation set`) replace the earlier ones as a whole: a member not given
is back at its default. With chain on, sealing round t makes its aggregate round t+1's base, the
adapter that round's clients start from (`base get` at their rank and lora_alpha); `base put` sets
one by hand, for example round 0's. A client's loop, as a module: Client.start_round (the round to
upload to, its base at the client's rank and scale, the config to upload with), train, upload.

Errors, in the manner of httpx: a refusal by the service (its problem+json answer) raises
AggregatorError with the status, type, title and detail; no answer at all (connection refused or
reset, a timeout) raises AggregatorTransportError. Both are AggregatorClientError. The command line
prints one line and exits 1 for a refusal, 3 when the service cannot be reached and 4 for a local
file or input problem (2 is a usage error).

With numpy: encode_safetensors / decode_safetensors. With torch and PEFT: upload_peft_model and
load_peft_aggregate (a model's adapter up, its own download back in), load_peft_state (bytes already
at the model's ranks and scales, such as a RoundStart's base). upload_peft_directory and
save_peft_aggregate (a directory that PeftModel.from_pretrained loads) need neither.
"""
from __future__ import annotations

import argparse
import gzip
import http.client
import json
import math
import os
import re
import secrets
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:  # optional dependencies, imported where they are used
    import numpy.typing as npt
    from peft import LoraConfig, PeftModel

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
STRATEGIES = ("replication", "zero_padding")
DTYPES = ("F32", "F16", "BF16")

EXIT_REFUSED = 1
EXIT_UNREACHABLE = 3  # after argparse's 2 for a usage error
EXIT_LOCAL_ERROR = 4


try:  # optional: uploads and downloads use zstd (RFC 8878) when it is installed
    import zstandard as _zstandard
except ImportError:
    _zstandard = None


def compress_body(data: bytes) -> tuple[bytes, str]:
    """(body, Content-Encoding) of an upload: zstd when the zstandard package is importable, gzip
    otherwise; the service decodes either as the body arrives."""
    if _zstandard is not None:
        return _zstandard.ZstdCompressor(level=3).compress(data), "zstd"
    return gzip.compress(data, compresslevel=6), "gzip"


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


def _rank_and_scale_query(rank: int | None, lora_alpha: float | None, use_rslora: bool | None) -> dict[str, str | int]:
    """The `rank`, `lora_alpha` and `use_rslora` query parameters, those given only: one spelling for
    an upload's or a base's tags and a download's target, so the service parses them alike."""
    query: dict[str, str | int] = {}
    if rank is not None:
        query["rank"] = int(rank)
    if lora_alpha is not None:
        query["lora_alpha"] = repr(float(lora_alpha))
    if use_rslora is not None:
        query["use_rslora"] = "true" if use_rslora else "false"
    return query


def _download_query(client: str | None, rank: int | None, lora_alpha: float | None, use_rslora: bool | None) -> dict[str, str | int]:
    """The rank and scale parameters of a download or its config (none for a client's own)."""
    if client is not None and (rank is not None or lora_alpha is not None or use_rslora is not None):
        raise ValueError("a client's download has that client's ranks and scales: give client, or rank / lora_alpha / use_rslora")
    return _rank_and_scale_query(rank, lora_alpha, use_rslora)


class Quorum(TypedDict, total=False):
    """A federation's quorum (FederationSettings.quorum): sealed `grace_seconds` after it holds
    `min_uploads` uploads, at once at `max_uploads`; at least one of the two."""
    min_uploads: int
    grace_seconds: float
    max_uploads: int


@dataclass(frozen=True)
class RoundStart:
    """Where a client starts a round: the round it uploads to (the federation's current_round), the
    adapter it trains from (safetensors bytes, the round's base at the client's rank and unfolded to
    its scale; None when the round has no base) and the adapter_config.json that loads that base
    into PEFT and that the client uploads with (upload_peft), so the service folds its upload at the
    scale it trained at."""
    federation: str
    round: int
    base: bytes | None
    config: dict[str, Any]


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

    def _put_safetensors(self, path: str, query: Mapping[str, str | int], data: bytes) -> dict[str, Any]:
        """PUTs a bare safetensors body compressed (an upload's or a base's, tagged by `query`);
        returns the service's receipt."""
        body, coding = compress_body(data)
        return self._request_json("PUT", path, query, body, {"Content-Encoding": coding, "Content-Type": "application/octet-stream"})

    def _put_peft(self, path: str, query: Mapping[str, str | int], adapter: bytes, config: bytes | Mapping[str, Any],
                  compress: bool = True) -> dict[str, Any]:
        """PUTs an adapter with its config as one multipart/form-data body (an upload's or a base's;
        gzip'd unless `compress` is false): `config` as bytes is sent as it is, a dict serialised as
        save_pretrained does. Returns the service's receipt."""
        config_bytes = config if isinstance(config, bytes) else peft_config_json(config)
        body, content_type = encode_multipart([(ADAPTER_FILE, adapter, "application/octet-stream"),
                                               (CONFIG_FILE, config_bytes, "application/json")])
        headers = {"Content-Type": content_type}
        if compress:
            body, headers["Content-Encoding"] = compress_body(body)
        return self._request_json("PUT", path, query, body, headers)

    def _get_safetensors(self, path: str, query: Mapping[str, str | int]) -> bytes:
        """A safetensors answer, asked for compressed (adapters compress well: zstd when the
        zstandard package is there, gzip otherwise) and returned decompressed."""
        payload, headers = self._request("GET", path, query, headers={"Accept-Encoding": "zstd, gzip" if _zstandard else "gzip"})
        coding = headers.get("Content-Encoding")
        if coding == "zstd" and _zstandard is not None:
            return bytes(_zstandard.ZstdDecompressor().decompressobj().decompress(payload))
        return gzip.decompress(payload) if coding == "gzip" else payload

    def upload(self, data: bytes, *, federation: str, round: int, client: str, rank: int, weight: float = 1.0,
               lora_alpha: float | None = None, use_rslora: bool | None = None) -> dict[str, Any]:
        """Uploads safetensors bytes (sent gzip'd) as `client`'s adapter, every LoRA tensor of rank
        `rank`, trained at PEFT's scale lora_alpha / rank (lora_alpha / √rank with `use_rslora`;
        `lora_alpha` defaults to the rank, scale 1); returns the service's receipt."""
        path = _round_path(federation, round) + f"/uploads/{_segment(client)}"
        query = {**_rank_and_scale_query(rank, lora_alpha, use_rslora), "weight": repr(float(weight))}
        return self._put_safetensors(path, query, data)

    def upload_peft(self, adapter: bytes, config: bytes | Mapping[str, Any], *, federation: str, round: int, client: str,
                    weight: float = 1.0, rank: int | None = None, compress: bool = True) -> dict[str, Any]:
        """Uploads a PEFT adapter with its config: `adapter` is adapter_model.safetensors, `config` its
        adapter_config.json (bytes, sent as they are, or a dict serialised as save_pretrained does),
        both in one multipart/form-data body (gzip'd unless `compress` is false). The service takes
        r, lora_alpha, use_rslora, rank_pattern and alpha_pattern from the config; `rank`, if given,
        must equal its r. Returns the service's receipt."""
        path = _round_path(federation, round) + f"/uploads/{_segment(client)}"
        query = {**_rank_and_scale_query(rank, None, None), "weight": repr(float(weight))}
        return self._put_peft(path, query, adapter, config, compress)

    def upload_file(self, path: str | os.PathLike[str], *, federation: str, round: int, client: str, rank: int, weight: float = 1.0,
                    lora_alpha: float | None = None, use_rslora: bool | None = None) -> dict[str, Any]:
        """Uploads a .safetensors file or a PEFT adapter directory's weights alone, tagged with `rank`
        and scale (see upload; upload_peft_directory sends the directory's config too)."""
        return self.upload(read_adapter_file(path), federation=federation, round=round, client=client, rank=rank, weight=weight,
                           lora_alpha=lora_alpha, use_rslora=use_rslora)

    def aggregate(self, *, federation: str, round: int, client: str | None = None, rank: int | None = None,
                  strategy: str | None = None, dtype: str = "F32", lora_alpha: float | None = None,
                  use_rslora: bool | None = None) -> bytes:
        """The global adapter as bytes: at scale 1 (PEFT's lora_alpha = r), at `rank` (default the
        round's largest), or unfolded for a PEFT model with this one `lora_alpha` (and `use_rslora`);
        or `client`'s own download, cut to its module ranks and unfolded to its scales. `strategy`
        None leaves it to the federation's settings (what its chained bases were built with)."""
        query: dict[str, str | int] = {"dtype": dtype, **_download_query(client, rank, lora_alpha, use_rslora)}
        if strategy is not None:
            query["strategy"] = strategy
        path = _round_path(federation, round) + "/aggregate" + (f"/{_segment(client)}" if client is not None else "")
        return self._get_safetensors(path, query)

    def download(self, output: str | os.PathLike[str], *, federation: str, round: int, client: str | None = None, rank: int | None = None,
                 strategy: str | None = None, dtype: str = "F32", lora_alpha: float | None = None,
                 use_rslora: bool | None = None) -> str:
        """Writes the aggregate (see aggregate) to `output` (a directory receives adapter_model.safetensors); returns the path."""
        return write_adapter_file(output, self.aggregate(federation=federation, round=round, client=client, rank=rank, strategy=strategy,
                                                         dtype=dtype, lora_alpha=lora_alpha, use_rslora=use_rslora))

    def adapter_config(self, *, federation: str, round: int, client: str | None = None, rank: int | None = None,
                       lora_alpha: float | None = None, use_rslora: bool | None = None) -> bytes:
        """The service's adapter_config.json (bytes, as it sent them) that loads the matching download
        with PeftModel.from_pretrained: `client`'s own config as it uploaded it (the minimal one for an
        upload tagged by query parameters), or the global adapter's for the same `rank`, `lora_alpha`
        and `use_rslora` as aggregate (r the largest module rank, others in rank_pattern; at scale 1
        lora_alpha = r with alpha_pattern, else that lora_alpha)."""
        query = _download_query(client, rank, lora_alpha, use_rslora)
        path = _round_path(federation, round) + "/adapter_config" + (f"/{_segment(client)}" if client is not None else "")
        return self._request("GET", path, query)[0]

    def status(self, *, federation: str, round: int) -> dict[str, Any]:
        return self._request_json("GET", _round_path(federation, round))

    def seal(self, *, federation: str, round: int) -> dict[str, Any]:
        return self._request_json("POST", _round_path(federation, round) + "/seal")

    # --- federations and round bases ---

    def set_federation(self, federation: str, *, strategy: str | None = None, chain: bool | None = None, quorum: Quorum | None = None,
                       round_timeout_seconds: float | None = None) -> dict[str, Any]:
        """Sets the federation's settings (admin) and returns the federation as federation() does.
        Only the members given are sent, but the service replaces the settings as a whole: a member
        not given is back at its default (replication, no chain, no quorum, no timeout), not kept. To
        change one, send the others from federation()["settings"] too. A member the service refuses
        (unknown, out of range) raises AggregatorError 422 naming it; nothing is changed then."""
        settings: dict[str, Any] = {}
        if strategy is not None:
            settings["strategy"] = strategy
        if chain is not None:
            settings["chain"] = bool(chain)
        if quorum is not None:
            settings["quorum"] = dict(quorum)
        if round_timeout_seconds is not None:
            settings["round_timeout_seconds"] = float(round_timeout_seconds)
        return self._request_json("PUT", f"/v1/federations/{_segment(federation)}", body=json.dumps(settings).encode("utf-8"),
                                  headers={"Content-Type": "application/json"})

    def federation(self, federation: str) -> dict[str, Any]:
        """The federation: its settings, `current_round` (one past its highest sealed round, 0 while
        none is: the round clients upload to next) and how many rounds it has. A federation never
        configured answers with the defaults."""
        return self._request_json("GET", f"/v1/federations/{_segment(federation)}")

    def put_base(self, data: bytes, *, federation: str, round: int, rank: int, lora_alpha: float | None = None,
                 use_rslora: bool | None = None) -> dict[str, Any]:
        """Sets the round's base (admin), the global adapter its clients start from and whose slices
        fill those no upload owns under replication: safetensors bytes (sent gzip'd) tagged like an
        upload, every LoRA tensor of rank `rank` at PEFT's scale from `lora_alpha` and `use_rslora`
        (`lora_alpha` defaults to the rank, scale 1); the service stores it folded to scale 1.
        Replaces an earlier base; 409 once the round is sealed. Returns the service's receipt."""
        return self._put_safetensors(_round_path(federation, round) + "/base", _rank_and_scale_query(rank, lora_alpha, use_rslora), data)

    def put_base_peft(self, adapter: bytes, config: bytes | Mapping[str, Any], *, federation: str, round: int,
                      compress: bool = True) -> dict[str, Any]:
        """Sets the round's base from a PEFT adapter with its config, as upload_peft sends an upload
        (one multipart body; ranks and scales from the config). Returns the service's receipt."""
        return self._put_peft(_round_path(federation, round) + "/base", {}, adapter, config, compress)

    def base(self, *, federation: str, round: int, rank: int | None = None, lora_alpha: float | None = None,
             use_rslora: bool | None = None, dtype: str | None = None) -> bytes:
        """The round's base as bytes: with no option, the stored file (at scale 1; a chained base is
        the previous round's aggregate byte for byte); with any of `rank`, `lora_alpha`, `use_rslora`,
        `dtype`, cut to `rank` and unfolded for a PEFT model with that `lora_alpha` like aggregate
        (a rank past the base's is 422). AggregatorError 404 when the round has no base."""
        query = _rank_and_scale_query(rank, lora_alpha, use_rslora)
        if dtype is not None:
            query["dtype"] = dtype
        return self._get_safetensors(_round_path(federation, round) + "/base", query)

    def delete_base(self, *, federation: str, round: int) -> None:
        """Removes the round's base (admin); 404 without one, 409 once the round is sealed."""
        self._request("DELETE", _round_path(federation, round) + "/base")

    def start_round(self, federation: str, *, rank: int, lora_alpha: float | None = None, use_rslora: bool = False) -> RoundStart:
        """The start of the client loop every node runs each round: the round to upload to (the
        federation's current_round), its base cut to `rank` and unfolded to this client's scale
        (lora_alpha / rank, / √rank with `use_rslora`; `lora_alpha` defaults to the rank), so it
        loads into the client's PEFT model as it is, or None when the round has no base (round 0
        before one is put, or a federation without chain), and the config to upload with. Then train
        from it and upload_peft(adapter, start.config, round=start.round, ...). An upload refused
        with 409 means the round was sealed meanwhile (a quorum): start again."""
        alpha: float = rank if lora_alpha is None else lora_alpha
        round_ = int(self.federation(federation)["current_round"])
        try:
            base: bytes | None = self.base(federation=federation, round=round_, rank=rank, lora_alpha=alpha,
                                           use_rslora=True if use_rslora else None)
        except AggregatorError as error:
            if error.status != 404:
                raise
            base = None
        config = {"peft_type": "LORA", "r": int(rank), "lora_alpha": alpha, "use_rslora": bool(use_rslora)}
        return RoundStart(federation=federation, round=round_, base=base, config=config)


# --- multipart/form-data (RFC 7578) -----------------------------------------------------------

def encode_multipart(parts: Sequence[tuple[str, bytes, str]]) -> tuple[bytes, str]:
    """(body, Content-Type) of a multipart/form-data body with one part per (name, data, content
    type), each sent as a file of that name. CRLF framing (RFC 7578, RFC 2046); the boundary is
    random and occurs in none of the parts."""
    while True:
        boundary = "lora-aggregator-" + secrets.token_hex(16)
        if not any(boundary.encode("ascii") in data for _, data, _ in parts):
            break
    chunks: list[bytes] = []
    for name, data, content_type in parts:
        if not name or any(character in name for character in '"\\\r\n'):
            raise ValueError(f"unusable part name {name!r}")
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}"\r\n'
                      f"Content-Type: {content_type}\r\n\r\n".encode("utf-8"))
        chunks.append(data)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode("ascii"))
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


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


# --- LoRA modules, ranks and scales (standard library) ------------------------------------------

_LORA_SUFFIXES = ((".lora_A.weight", 0), (".lora_B.weight", 1), (".lora_embedding_A", 0), (".lora_embedding_B", 1))
_MODEL_PREFIX = "base_model.model."


def lora_module(name: str) -> tuple[str, int] | None:
    """(module, rank axis) of a LoRA tensor name as the service names modules (the name without its
    lora_A/lora_B suffix and without a leading `base_model.model.`); None for a dense tensor."""
    for suffix, axis in _LORA_SUFFIXES:
        if name.endswith(suffix):
            module = name[:-len(suffix)]
            return (module[len(_MODEL_PREFIX):] if module.startswith(_MODEL_PREFIX) else module), axis
    return None


def module_ranks(data: bytes) -> dict[str, int]:
    """Module name -> rank (rows of its A) of safetensors bytes, from the header alone."""
    ranks: dict[str, int] = {}
    for name, entry in _header(data)[1].items():
        found = lora_module(name)
        if name != "__metadata__" and found is not None and found[1] == 0:
            ranks[found[0]] = int(entry["shape"][0])
    return ranks


def _pattern_key(pattern: Mapping[str, Any], module: str) -> str | None:
    """The first key of a rank_pattern / alpha_pattern that matches `module` as PEFT matches."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def module_rank_and_alpha(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    """(r, lora_alpha) that PEFT gives `module` under an adapter config (a dict): from rank_pattern /
    alpha_pattern when a key matches, else r / lora_alpha."""
    rank_pattern: Mapping[str, Any] = config.get("rank_pattern") or {}
    alpha_pattern: Mapping[str, Any] = config.get("alpha_pattern") or {}
    rank_key, alpha_key = _pattern_key(rank_pattern, module), _pattern_key(alpha_pattern, module)
    rank = int(rank_pattern[rank_key] if rank_key is not None else config.get("r", 8))
    alpha = float(alpha_pattern[alpha_key] if alpha_key is not None else config.get("lora_alpha", 8))
    return rank, alpha


def module_scale(config: Mapping[str, Any], module: str) -> float:
    """PEFT's scale of `module`: lora_alpha / r, or lora_alpha / √r with use_rslora."""
    rank, alpha = module_rank_and_alpha(config, module)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


# --- PEFT adapter configs ----------------------------------------------------------------------

_PATTERNS = ("rank_pattern", "alpha_pattern")


def _json_value(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    return str(value)


def _sorted_like_peft(value: Any, keep_order: bool = False) -> Any:
    """save_pretrained writes json.dumps(..., sort_keys=True); the patterns keep their order here,
    since PEFT resolves them in order (first matching key wins)."""
    if isinstance(value, Mapping):
        items = list(value.items()) if keep_order else sorted(value.items(), key=lambda item: str(item[0]))
        return {key: _sorted_like_peft(item, keep_order=keep_order or key in _PATTERNS) for key, item in items}
    if isinstance(value, (list, tuple)):
        return [_sorted_like_peft(item, keep_order) for item in value]
    return value


def peft_config_json(config: Mapping[str, Any] | LoraConfig) -> bytes:
    """adapter_config.json bytes of a config (a dict or a PEFT LoraConfig) as save_pretrained writes
    them (keys sorted, indent 2, sets as lists), except that rank_pattern and alpha_pattern keep
    their order."""
    dictionary = _config_dict(config)
    return json.dumps(_sorted_like_peft(dictionary), indent=2, default=_json_value).encode("utf-8")


def _config_dict(config: Mapping[str, Any] | LoraConfig) -> dict[str, Any]:
    """A config as a dict (order kept): a dict or a LoraConfig."""
    if isinstance(config, Mapping):
        return dict(config)
    dictionary: dict[str, Any] = config.to_dict()
    return {key: list(value) if isinstance(value, (set, frozenset)) else value for key, value in dictionary.items()}


def read_adapter_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a .safetensors file, or of a PEFT adapter directory's adapter_model.safetensors."""
    if os.path.isdir(path):
        path = os.path.join(path, ADAPTER_FILE)
    with open(path, "rb") as handle:
        return handle.read()


def write_adapter_file(output: str | os.PathLike[str], data: bytes) -> str:
    """Writes safetensors bytes to `output` (a directory receives adapter_model.safetensors); returns the path."""
    path = os.path.join(output, ADAPTER_FILE) if os.path.isdir(output) else os.fspath(output)
    with open(path, "wb") as handle:
        handle.write(data)
    return path


def read_peft_directory(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(adapter_model.safetensors, adapter_config.json) of a directory as save_pretrained wrote it,
    both as they are: the config's bytes are sent untouched, since the service keeps them."""
    with open(os.path.join(path, ADAPTER_FILE), "rb") as handle:
        adapter = handle.read()
    with open(os.path.join(path, CONFIG_FILE), "rb") as handle:
        return adapter, handle.read()


def upload_peft_directory(service: Client, path: str | os.PathLike[str], *, federation: str, round: int, client: str,
                          weight: float = 1.0) -> dict[str, Any]:
    """Uploads a PEFT adapter directory as save_pretrained wrote it (adapter_model.safetensors and
    adapter_config.json, both sent as they are, multipart and gzip'd); ranks and scales come from the
    config. Returns the service's receipt."""
    adapter, config = read_peft_directory(path)
    return service.upload_peft(adapter, config, federation=federation, round=round, client=client, weight=weight)


def save_peft_aggregate(service: Client, directory: str | os.PathLike[str], *, federation: str, round: int, client: str | None = None,
                        rank: int | None = None, lora_alpha: float | None = None, use_rslora: bool | None = None,
                        strategy: str | None = None, dtype: str = "F32", attempts: int = 3) -> str:
    """Writes the global adapter (or `client`'s own download) as a PEFT adapter directory that
    PeftModel.from_pretrained loads as it is (made if missing): adapter_model.safetensors and the
    service's adapter_config.json for it (Client.adapter_config with the same client, rank,
    lora_alpha and use_rslora), written as the service sent it. The global adapter comes at scale 1
    (its config says lora_alpha = r, other module ranks in rank_pattern and alpha_pattern), or with
    `lora_alpha` (and `use_rslora`) unfolded for that one lora_alpha; a client's download comes with
    the config that client uploaded. The config is fetched before and after the weights; if it
    changed (uploads to an unsealed round), both are fetched again, up to `attempts` times, then
    ValueError. Standard library only; returns the directory."""
    def current_config() -> bytes:
        return service.adapter_config(federation=federation, round=round, client=client, rank=rank, lora_alpha=lora_alpha, use_rslora=use_rslora)

    os.makedirs(directory, exist_ok=True)
    config_path = os.path.join(directory, CONFIG_FILE)
    if os.path.exists(config_path):  # never left beside weights it does not belong to
        os.remove(config_path)
    for _ in range(max(1, attempts)):
        config = current_config()
        service.download(directory, federation=federation, round=round, client=client, rank=rank, strategy=strategy, dtype=dtype,
                         lora_alpha=lora_alpha, use_rslora=use_rslora)
        if current_config() == config:
            with open(config_path, "wb") as handle:
                handle.write(config)
            return os.fspath(directory)
    raise ValueError(f"round {round} of {federation!r} kept changing while its aggregate was downloaded: seal it first, or retry")


# --- PEFT (torch) ------------------------------------------------------------------------------

def upload_peft_model(service: Client, model: PeftModel, *, federation: str, round: int, client: str, num_samples: float,
                      adapter_name: str = "default") -> dict[str, Any]:
    """Uploads the PEFT model's adapter as `client`'s, weighted by `num_samples`: its LoRA tensors
    (get_peft_model_state_dict, sent as F32, exact for BF16 and F16) with its adapter_config.json
    (the model's peft_config, rank_pattern and alpha_pattern included), multipart and gzip'd, so the
    service folds each module at the scale PEFT applied. Returns the service's receipt."""
    import torch
    from peft import get_peft_model_state_dict
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    arrays = {name: tensor.detach().to(device="cpu", dtype=torch.float32).numpy() for name, tensor in state.items()}
    return service.upload_peft(encode_safetensors(arrays), peft_config_json(model.peft_config[adapter_name]),
                               federation=federation, round=round, client=client, weight=num_samples)


def _model_ranks(model: PeftModel, adapter_name: str, config: Mapping[str, Any]) -> dict[str, int]:
    """Module -> rank of the model's adapter, resolved from its config (rank_pattern aware)."""
    from peft import get_peft_model_state_dict
    modules = {found[0] for found in map(lora_module, get_peft_model_state_dict(model, adapter_name=adapter_name)) if found is not None}
    return {module: module_rank_and_alpha(config, module)[0] for module in sorted(modules)}


def load_peft_aggregate(service: Client, model: PeftModel, *, federation: str, round: int, client: str | None = None,
                        adapter_name: str = "default", strategy: str | None = None) -> dict[str, str]:
    """Loads the round's aggregate into the PEFT model with set_peft_model_state_dict: `client`'s own
    download (cut to its module ranks and unfolded to its scales by the service; the model must have
    the config that client uploaded with), else the global adapter cut to the model's module ranks
    and unfolded to its scales. Checks every module's rank against the model's config (rank_pattern
    aware) and that no tensor is foreign to the model. Returns the aggregate's metadata."""
    import numpy as np
    config = _config_dict(model.peft_config[adapter_name])
    expected = _model_ranks(model, adapter_name, config)
    if not expected:
        raise ValueError("the model's adapter has no LoRA module")
    patterned = bool(config.get("rank_pattern") or config.get("alpha_pattern"))
    use_rslora = bool(config.get("use_rslora"))
    if client is not None:
        data = service.aggregate(federation=federation, round=round, client=client, strategy=strategy)
    elif not patterned:  # one r and one lora_alpha: the service cuts and unfolds
        data = service.aggregate(federation=federation, round=round, rank=max(expected.values()), strategy=strategy,
                                 lora_alpha=float(config.get("lora_alpha", 8)), use_rslora=use_rslora)
    else:  # per-module ranks or alphas: the global adapter at scale 1, cut and unfolded here (Float64)
        data = service.aggregate(federation=federation, round=round, rank=max(expected.values()), strategy=strategy)
    metadata = safetensors_metadata(data)
    for module, rank in module_ranks(data).items():
        wanted = expected.get(module)
        if wanted is not None and rank != wanted and (client is not None or not patterned or rank < wanted):
            raise ValueError(f"module {module!r}: the aggregate has rank {rank} but the model's adapter has r={wanted}")
    if client is not None:  # the download is at the scales the client uploaded with: the model's must be those
        model_scale = (float(config.get("lora_alpha", 8)), use_rslora)
        for upload in service.status(federation=federation, round=round)["uploads"]:
            if upload["client"] == client and (float(upload["lora_alpha"]), bool(upload["use_rslora"])) != model_scale:
                raise ValueError(f"{client!r} uploaded with lora_alpha={upload['lora_alpha']}, use_rslora={upload['use_rslora']}, but the model "
                                 f"has lora_alpha={config.get('lora_alpha')}, use_rslora={use_rslora}: the download would apply at the wrong scale")
    arrays, _ = decode_safetensors(data)
    if client is None and patterned:
        for name, array in list(arrays.items()):
            found = lora_module(name)
            if found is None or found[0] not in expected:
                continue
            module, axis = found
            cut = array[:expected[module]] if axis == 0 else array[:, :expected[module]]
            arrays[name] = (cut.astype(np.float64) / math.sqrt(module_scale(config, module))).astype(array.dtype)
    _set_peft_state(model, arrays, adapter_name)
    return metadata


def _set_peft_state(model: PeftModel, arrays: Mapping[str, npt.NDArray[Any]], adapter_name: str) -> None:
    """set_peft_model_state_dict with numpy arrays; a tensor foreign to the model is refused (PEFT
    would skip it silently, leaving that module where it was)."""
    import torch
    from peft import set_peft_model_state_dict
    result = set_peft_model_state_dict(model, {name: torch.from_numpy(array.copy()) for name, array in arrays.items()}, adapter_name=adapter_name)
    if result.unexpected_keys:
        raise ValueError(f"the adapter has tensors the model does not: {sorted(result.unexpected_keys)[:3]}")


def load_peft_state(model: PeftModel, data: bytes, adapter_name: str = "default") -> dict[str, str]:
    """Loads safetensors bytes that are already at the model's module ranks and scales into the PEFT
    model: a RoundStart's base (Client.start_round with the model's r, lora_alpha and use_rslora),
    a base or a client's download. Every module's rank must be the model's (rank_pattern aware),
    checked first so that a mismatch names the module. Returns the file's metadata."""
    config = _config_dict(model.peft_config[adapter_name])
    expected = _model_ranks(model, adapter_name, config)
    for module, rank in module_ranks(data).items():
        if module in expected and rank != expected[module]:
            raise ValueError(f"module {module!r}: the adapter has rank {rank} but the model's adapter has r={expected[module]}")
    arrays, metadata = decode_safetensors(data)
    _set_peft_state(model, arrays, adapter_name)
    return metadata


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

    def adapter_arguments(command: argparse.ArgumentParser) -> None:
        """An adapter sent up (an upload, a base): a tagged file or a PEFT directory with its config."""
        command.add_argument("--rank", type=int, help="every LoRA tensor's rank (required with FILE)")
        command.add_argument("--lora-alpha", type=float, help="with FILE: PEFT's lora_alpha it was trained with (default the rank: scale 1)")
        command.add_argument("--use-rslora", action="store_true", help="with FILE: it was trained with rsLoRA (scale lora_alpha / sqrt(rank))")
        sources = command.add_mutually_exclusive_group(required=True)
        sources.add_argument("--peft-dir", help="a directory as save_pretrained wrote it: its weights and adapter_config.json are sent as they are")
        sources.add_argument("file", nargs="?", help="a .safetensors file or a PEFT adapter directory's weights alone, tagged with --rank")

    upload = commands.add_parser("upload", help="upload a .safetensors file or a PEFT adapter directory (gzip'd)")
    round_arguments(upload)
    upload.add_argument("--client", required=True)
    upload.add_argument("--weight", type=float, default=1.0)
    adapter_arguments(upload)
    download = commands.add_parser("download", help="download the global adapter or a client's own download")
    round_arguments(download)
    chosen = download.add_mutually_exclusive_group()
    chosen.add_argument("--client")
    chosen.add_argument("--rank", type=int)
    download.add_argument("--lora-alpha", type=float, help="the global adapter unfolded for a PEFT model with this lora_alpha (default scale 1)")
    download.add_argument("--use-rslora", action="store_true", help="with --lora-alpha: for a model with use_rslora")
    download.add_argument("--strategy", choices=STRATEGIES, help="default the federation's strategy")
    download.add_argument("--dtype", default="F32", choices=DTYPES)
    outputs = download.add_mutually_exclusive_group(required=True)
    outputs.add_argument("--output", help="a file, or a directory that receives adapter_model.safetensors")
    outputs.add_argument("--peft-dir", help="a directory (made if missing) that receives adapter_model.safetensors and the service's "
                                            "adapter_config.json for it (PeftModel.from_pretrained loads it)")
    for name, text in (("status", "show a round"), ("seal", "seal a round")):
        round_arguments(commands.add_parser(name, help=text))

    federation = commands.add_parser("federation", help="show or set a federation's settings").add_subparsers(dest="action", required=True)
    federation.add_parser("show", help="its settings and current_round, the round clients upload to next").add_argument("--federation", required=True)
    settings = federation.add_parser("set", help="replace its settings (a setting not given is back at its default)")
    settings.add_argument("--federation", required=True)
    settings.add_argument("--strategy", choices=STRATEGIES, help="for downloads that name none and for chaining (default replication)")
    settings.add_argument("--chain", action=argparse.BooleanOptionalAction, help="sealing round t makes its aggregate round t+1's base")
    settings.add_argument("--min-uploads", type=int, help="quorum: seal once the round holds this many uploads (after --grace-seconds)")
    settings.add_argument("--grace-seconds", type=float, help="quorum: how long after --min-uploads")
    settings.add_argument("--max-uploads", type=int, help="quorum: seal at once at this many uploads")
    settings.add_argument("--round-timeout-seconds", type=float, help="seal this long after a round's first upload, if it holds the quorum")

    base = commands.add_parser("base", help="put, get or delete a round's base, the adapter its clients start from").add_subparsers(dest="action", required=True)
    put = base.add_parser("put", help="set the round's base from a .safetensors file or a PEFT adapter directory (gzip'd)")
    round_arguments(put)
    adapter_arguments(put)
    get = base.add_parser("get", help="the stored base, or cut to --rank and unfolded for --lora-alpha")
    round_arguments(get)
    get.add_argument("--rank", type=int)
    get.add_argument("--lora-alpha", type=float, help="unfolded for a PEFT model with this lora_alpha (default scale 1)")
    get.add_argument("--use-rslora", action="store_true", help="with --lora-alpha: for a model with use_rslora")
    get.add_argument("--dtype", choices=DTYPES)
    get.add_argument("--output", required=True, help="a file, or a directory that receives adapter_model.safetensors")
    round_arguments(base.add_parser("delete", help="remove the round's base"))
    return parser


def _check_usage(parser: argparse.ArgumentParser, arguments: argparse.Namespace) -> None:
    """What argparse cannot say: exits 2 with a usage error."""
    action = getattr(arguments, "action", None)
    if arguments.command == "upload" or (arguments.command, action) == ("base", "put"):
        name = "upload" if arguments.command == "upload" else "base put"
        if arguments.file is not None and arguments.rank is None:
            parser.error(f"{name} FILE needs --rank (or send the PEFT directory with its config: --peft-dir DIR)")
        if arguments.peft_dir is not None and (arguments.rank is not None or arguments.lora_alpha is not None or arguments.use_rslora):
            parser.error("--peft-dir takes rank and scale from its adapter_config.json: drop --rank, --lora-alpha and --use-rslora")
    if arguments.command == "download" and arguments.client is not None and (arguments.lora_alpha is not None or arguments.use_rslora):
        parser.error("a client's download has that client's own scales: drop --lora-alpha and --use-rslora")
    if arguments.command in ("download", "base") and getattr(arguments, "use_rslora", False) and arguments.lora_alpha is None:
        parser.error("--use-rslora needs --lora-alpha")
    if (arguments.command, action) == ("federation", "set") and arguments.grace_seconds is not None \
            and arguments.min_uploads is None and arguments.max_uploads is None:
        parser.error("--grace-seconds belongs to a quorum: give --min-uploads or --max-uploads")


def _run_federation(client: Client, arguments: argparse.Namespace) -> dict[str, Any]:
    """`federation show` and `federation set`."""
    if arguments.action == "show":
        return client.federation(arguments.federation)
    quorum: Quorum | None = None
    if arguments.min_uploads is not None or arguments.max_uploads is not None:
        quorum = {}
        if arguments.min_uploads is not None:
            quorum["min_uploads"] = arguments.min_uploads
        if arguments.grace_seconds is not None:
            quorum["grace_seconds"] = arguments.grace_seconds
        if arguments.max_uploads is not None:
            quorum["max_uploads"] = arguments.max_uploads
    return client.set_federation(arguments.federation, strategy=arguments.strategy, chain=arguments.chain, quorum=quorum,
                                 round_timeout_seconds=arguments.round_timeout_seconds)


def _run_base(client: Client, arguments: argparse.Namespace) -> dict[str, Any]:
    """`base put`, `base get` and `base delete`."""
    ids = {"federation": arguments.federation, "round": arguments.round}
    if arguments.action == "put":
        if arguments.peft_dir is not None:
            return client.put_base_peft(*read_peft_directory(arguments.peft_dir), **ids)
        return client.put_base(read_adapter_file(arguments.file), **ids, rank=arguments.rank, lora_alpha=arguments.lora_alpha,
                               use_rslora=True if arguments.use_rslora else None)
    if arguments.action == "get":
        data = client.base(**ids, rank=arguments.rank, lora_alpha=arguments.lora_alpha, use_rslora=True if arguments.use_rslora else None,
                           dtype=arguments.dtype)
        path = write_adapter_file(arguments.output, data)
        return {"written": path, "bytes": len(data)}
    client.delete_base(**ids)
    return {**ids, "deleted": "base"}


def _run(arguments: argparse.Namespace) -> dict[str, Any]:
    client = Client(arguments.server, arguments.token)
    if arguments.command == "federation":
        return _run_federation(client, arguments)
    if arguments.command == "base":
        return _run_base(client, arguments)
    ids = {"federation": arguments.federation, "round": arguments.round}
    if arguments.command == "upload":
        if arguments.peft_dir is not None:
            return upload_peft_directory(client, arguments.peft_dir, **ids, client=arguments.client, weight=arguments.weight)
        return client.upload_file(arguments.file, **ids, client=arguments.client, rank=arguments.rank, weight=arguments.weight,
                                  lora_alpha=arguments.lora_alpha, use_rslora=True if arguments.use_rslora else None)
    if arguments.command == "download":
        options: dict[str, Any] = {"client": arguments.client, "rank": arguments.rank, "lora_alpha": arguments.lora_alpha,
                                   "use_rslora": True if arguments.use_rslora else None, "strategy": arguments.strategy, "dtype": arguments.dtype}
        if arguments.peft_dir is None:
            path = client.download(arguments.output, **ids, **options)
            return {"written": path, "bytes": os.path.getsize(path)}
        save_peft_aggregate(client, arguments.peft_dir, **ids, **options)
        path = os.path.join(arguments.peft_dir, ADAPTER_FILE)
        return {"written": path, "bytes": os.path.getsize(path), "adapter_config": os.path.join(arguments.peft_dir, CONFIG_FILE)}
    if arguments.command == "status":
        return client.status(**ids)
    return client.seal(**ids)


def _fail(message: str, exit_code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return exit_code


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    arguments = parser.parse_args(argv)
    _check_usage(parser, arguments)
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
