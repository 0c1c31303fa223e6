#!/usr/bin/env python3
"""lora-aggregator client: standard library only; a module and a command line.

    python3 lora_aggregator_client.py --server URL [--token T] upload --federation F --round N --client C --rank R [--weight W] FILE
    python3 lora_aggregator_client.py --server URL download --federation F --round N [--client C | --rank R] [--strategy S] [--dtype D] --output PATH
    python3 lora_aggregator_client.py --server URL status --federation F --round N
    python3 lora_aggregator_client.py --server URL seal --federation F --round N

FILE is a .safetensors file or a PEFT adapter directory (its adapter_model.safetensors); it is sent
gzip'd. A download whose PATH is an existing directory lands in PATH/adapter_model.safetensors.
Errors (problem+json) are raised as AggregatorError carrying the server's detail; the command line
prints them and exits non-zero.
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
        elif arguments.command == "status":
            result = client.status(arguments.federation, arguments.round)
        else:
            result = client.seal(arguments.federation, arguments.round)
    except (AggregatorError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
