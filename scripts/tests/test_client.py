"""Tests of scripts/lora_aggregator_client.py against the real server (started on a free port)."""
import contextlib
import email.parser
import email.policy
import gzip
import hashlib
import io
import json
import socket
import struct
import tempfile
import unittest
import urllib.request
from unittest import mock
from pathlib import Path

import numpy as np
from support import ServerTestCase

import lora_aggregator_client as lac


def adapter(rank, value):
    header, data, offset = {"__metadata__": {"format": "pt"}}, b"", 0
    for name, shape in (("base_model.model.q.lora_A.weight", [rank, 8]), ("base_model.model.q.lora_B.weight", [8, rank])):
        blob = struct.pack(f"<{shape[0] * shape[1]}f", *[value] * (shape[0] * shape[1]))
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        data, offset = data + blob, offset + len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def read_tensor(data, name):
    (length,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8:8 + length])
    begin, end = header[name]["data_offsets"]
    return header[name]["shape"], struct.unpack(f"<{(end - begin) // 4}f", data[8 + length + begin:8 + length + end])


class ClientTests(ServerTestCase):
    def test_upload_status_download_and_seal_through_the_module(self):
        client = lac.Client(self.url)
        peft_directory = Path(self.directory.name) / "peft-adapter"
        peft_directory.mkdir()
        (peft_directory / "adapter_model.safetensors").write_bytes(adapter(2, 1.0))
        receipt = client.upload_file(peft_directory, federation="fed", round=0, client="alice", rank=2, weight=3)
        self.assertEqual((receipt["client"], receipt["rank"], receipt["lora_modules"]), ("alice", 2, 1))
        client.upload(adapter(4, 2.0), federation="fed", round=0, client="bob", rank=4, weight=1)
        status = client.status(federation="fed", round=0)
        self.assertEqual([u["client"] for u in status["uploads"]], ["alice", "bob"])
        self.assertEqual(status["max_rank"], 4)

        # Replication padding: rows 0-1 are shared (weights 3 and 1), rows 2-3 only bob's.
        shape, values = read_tensor(client.aggregate(federation="fed", round=0), "base_model.model.q.lora_A.weight")
        self.assertEqual(shape, [4, 8])
        self.assertAlmostEqual(values[0], (3 * 1.0 + 1 * 2.0) / 4, places=6)
        self.assertAlmostEqual(values[8 * 3], 2.0, places=6)
        out = Path(self.directory.name) / "out"
        out.mkdir()
        written = client.download(out, federation="fed", round=0, client="alice")
        self.assertEqual(Path(written), out / "adapter_model.safetensors")
        self.assertEqual(read_tensor(Path(written).read_bytes(), "base_model.model.q.lora_A.weight")[0], [2, 8])

        self.assertTrue(client.seal(federation="fed", round=0)["sealed"])
        with self.assertRaises(lac.AggregatorError) as refused:
            client.upload(adapter(2, 1.0), federation="fed", round=0, client="carol", rank=2)
        self.assertEqual(refused.exception.status, 409)
        self.assertIn("sealed", refused.exception.detail)

    def test_command_line_prints_results_and_fails_with_the_detail(self):
        path = Path(self.directory.name) / "cli.safetensors"
        path.write_bytes(adapter(2, 0.5))
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = lac.main(["--server", self.url, "upload", "--federation", "cli", "--round", "1", "--client", "c1", "--rank", "2", str(path)])
        self.assertEqual(code, 0)
        self.assertEqual(json.loads(stdout.getvalue())["client"], "c1")
        output = Path(self.directory.name) / "global.safetensors"
        with contextlib.redirect_stdout(io.StringIO()):
            self.assertEqual(lac.main(["--server", self.url, "download", "--federation", "cli", "--round", "1", "--rank", "1", "--dtype", "BF16", "--output", str(output)]), 0)
        self.assertTrue(output.exists())
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            code = lac.main(["--server", self.url, "upload", "--federation", "cli", "--round", "1", "--client", "c2", "--rank", "3", str(path)])
        self.assertEqual(code, lac.EXIT_REFUSED)
        self.assertEqual(stderr.getvalue().count("\n"), 1)
        self.assertIn("422", stderr.getvalue())
        self.assertIn("rank", stderr.getvalue())

    def test_a_refusal_raises_aggregator_error_with_the_problem_details(self):
        client = lac.Client(self.url)
        with self.assertRaises(lac.AggregatorError) as missing:
            client.status(federation="nobody", round=0)
        self.assertEqual((missing.exception.status, missing.exception.title), (404, "Not Found"))
        client.upload(adapter(2, 1.0), federation="refusals", round=0, client="a", rank=2)
        with self.assertRaises(lac.AggregatorClientError) as refused:
            client.upload(adapter(2, 1.0), federation="refusals", round=0, client="b", rank=3)
        problem = refused.exception
        self.assertIsInstance(problem, lac.AggregatorError)
        self.assertEqual((problem.status, problem.title), (422, "Unprocessable Content"))
        self.assertTrue(problem.problem_type.startswith("urn:lora-aggregator:problem:"), problem.problem_type)
        self.assertIn("rank", problem.detail)

    def test_safetensors_with_numpy_round_trips_and_the_server_reads_it(self):
        arrays = {"base_model.model.q.lora_B.weight": np.arange(12, dtype=np.float32).reshape(6, 2),
                  "base_model.model.q.lora_A.weight": np.linspace(-1, 1, 16).reshape(2, 8).astype(np.float16)}
        data = lac.encode_safetensors(arrays, metadata={"format": "pt"})
        decoded, metadata = lac.decode_safetensors(data)
        self.assertEqual(metadata, {"format": "pt"})
        for name, array in arrays.items():
            np.testing.assert_array_equal(decoded[name], array)
            self.assertEqual(decoded[name].dtype, array.dtype)
        self.assertEqual(lac.Client(self.url).upload(data, federation="np", round=0, client="a", rank=2)["tensors"], 2)
        with self.assertRaises(ValueError):
            lac.encode_safetensors({"x.lora_A.weight": np.zeros((2, 2), dtype=np.int32)})

    def test_truncation_keeps_the_first_rank_slices_of_lora_tensors_only(self):
        arrays = {"m.lora_A.weight": np.arange(24).reshape(4, 6), "m.lora_B.weight": np.arange(12).reshape(3, 4), "head.weight": np.ones((2, 2))}
        truncated = lac.truncate_to_rank(arrays, 2)
        np.testing.assert_array_equal(truncated["m.lora_A.weight"], arrays["m.lora_A.weight"][:2])
        np.testing.assert_array_equal(truncated["m.lora_B.weight"], arrays["m.lora_B.weight"][:, :2])
        self.assertIs(truncated["head.weight"], arrays["head.weight"])
        with self.assertRaises(ValueError):
            lac.truncate_to_rank(arrays, 5)

    def test_download_peft_dir_writes_the_services_config_beside_the_weights(self):
        client = lac.Client(self.url)
        client.upload(adapter(2, 1.0), federation="cfg", round=0, client="a", rank=2)
        client.upload(adapter(4, 1.0), federation="cfg", round=0, client="b", rank=4, lora_alpha=16)
        # A tagged upload's config is the minimal one; the global adapter's at scale 1 says lora_alpha = r.
        self.assertEqual(json.loads(client.adapter_config(federation="cfg", round=0, client="b")),
                         {"peft_type": "LORA", "r": 4, "lora_alpha": 16, "use_rslora": False})
        config = json.loads(client.adapter_config(federation="cfg", round=0, rank=2))
        self.assertEqual((config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"]), (2, 2, {}, {}))
        # --output writes the weights alone.
        output = Path(self.directory.name) / "cfg-out"
        output.mkdir()
        with contextlib.redirect_stdout(io.StringIO()) as stdout:
            code = lac.main(["--server", self.url, "download", "--federation", "cfg", "--round", "0", "--rank", "2", "--output", str(output)])
        self.assertEqual(code, 0, stdout.getvalue())
        self.assertEqual(sorted(path.name for path in output.iterdir()), ["adapter_model.safetensors"])
        # --peft-dir with --lora-alpha: the weights unfolded for that lora_alpha and the service's config for them, as sent.
        peft_dir = Path(self.directory.name) / "cfg-peft"
        with contextlib.redirect_stdout(io.StringIO()) as stdout:
            code = lac.main(["--server", self.url, "download", "--federation", "cfg", "--round", "0", "--lora-alpha", "8", "--peft-dir", str(peft_dir)])
        self.assertEqual(code, 0, stdout.getvalue())
        self.assertEqual(json.loads(stdout.getvalue())["adapter_config"], str(peft_dir / "adapter_config.json"))
        self.assertEqual((peft_dir / "adapter_config.json").read_bytes(), client.adapter_config(federation="cfg", round=0, lora_alpha=8))
        self.assertEqual((peft_dir / "adapter_model.safetensors").read_bytes(), client.aggregate(federation="cfg", round=0, lora_alpha=8))
        config = json.loads((peft_dir / "adapter_config.json").read_text())
        self.assertEqual((config["r"], config["lora_alpha"], config["alpha_pattern"], config["use_rslora"]), (4, 8, {}, False))
        # A refused download leaves no config behind (a stale one would load new weights at old scales).
        with contextlib.redirect_stderr(io.StringIO()) as stderr:
            code = lac.main(["--server", self.url, "download", "--federation", "cfg", "--round", "0", "--client", "nobody", "--peft-dir", str(peft_dir)])
        self.assertEqual(code, lac.EXIT_REFUSED, stderr.getvalue())
        self.assertIn("404", stderr.getvalue())
        self.assertFalse((peft_dir / "adapter_config.json").exists())
        with self.assertRaises(ValueError):  # a client's config has that client's ranks and scales
            client.adapter_config(federation="cfg", round=0, client="a", lora_alpha=8)

    def test_a_multipart_clients_config_comes_back_byte_for_byte_and_download_peft_dir_writes_both_files(self):
        client = lac.Client(self.url)
        # Not as save_pretrained writes it (members unsorted, one line): the service keeps the bytes.
        uploaded = b'{"target_modules": ["q"], "r": 2, "peft_type": "LORA", "rank_pattern": {}, "lora_alpha": 4}'
        client.upload_peft(adapter(2, 1.0), uploaded, federation="own", round=0, client="alice")
        client.upload(adapter(4, 3.0), federation="own", round=0, client="bob", rank=4)
        self.assertEqual(client.adapter_config(federation="own", round=0, client="alice"), uploaded)
        peft_dir = Path(self.directory.name) / "alice-next"
        with contextlib.redirect_stdout(io.StringIO()) as stdout:
            code = lac.main(["--server", self.url, "download", "--federation", "own", "--round", "0", "--client", "alice", "--peft-dir", str(peft_dir)])
        self.assertEqual(code, 0, stdout.getvalue())
        self.assertEqual(json.loads(stdout.getvalue())["written"], str(peft_dir / "adapter_model.safetensors"))
        self.assertEqual(sorted(path.name for path in peft_dir.iterdir()), ["adapter_config.json", "adapter_model.safetensors"])
        self.assertEqual((peft_dir / "adapter_config.json").read_bytes(), uploaded)
        self.assertEqual((peft_dir / "adapter_model.safetensors").read_bytes(), client.aggregate(federation="own", round=0, client="alice"))
        self.assertEqual(lac.module_ranks((peft_dir / "adapter_model.safetensors").read_bytes()), {"q": 2})
        # The global adapter's config starts from the lowest client id's config, members in its order.
        directory = lac.save_peft_aggregate(client, Path(self.directory.name) / "own-global", federation="own", round=0)
        config = json.loads((Path(directory) / "adapter_config.json").read_text())
        self.assertEqual(list(config)[:5], ["target_modules", "r", "peft_type", "rank_pattern", "lora_alpha"])
        self.assertEqual((config["r"], config["lora_alpha"], config["target_modules"]), (4, 4, ["q"]))


def two_module_adapter(seed, ranks=(("q", 4), ("k", 2))):
    rng = np.random.default_rng(seed)
    arrays = {}
    for module, rank in ranks:
        arrays[f"base_model.model.{module}.lora_A.weight"] = rng.standard_normal((rank, 6)).astype(np.float32)
        arrays[f"base_model.model.{module}.lora_B.weight"] = rng.standard_normal((5, rank)).astype(np.float32)
    return arrays


def put(url, body, headers):
    """(status, JSON body) of a PUT sent with urllib itself, for the status code the client hides."""
    request = urllib.request.Request(url, data=body, method="PUT", headers=headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, json.loads(response.read())


class ScaleAndMultipartTests(ServerTestCase):
    """Uploads with their PEFT config (multipart/form-data) or tagged with lora_alpha."""

    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": {"k": 2}, "target_modules": ["q", "k"]}

    def test_multipart_upload_with_and_without_gzip_answers_201_with_the_configs_scale(self):
        data = lac.encode_safetensors(two_module_adapter(1))
        body, content_type = lac.encode_multipart([("adapter_model.safetensors", data, "application/octet-stream"),
                                                   ("adapter_config.json", lac.peft_config_json(self.config), "application/json")])
        self.assertTrue(body.endswith(b"--\r\n") and b"\r\n\r\n" in body)
        path = f"{self.url}/v1/federations/multipart/rounds/0/uploads/"
        for client, compress in (("plain", False), ("gzipped", True)):
            with self.subTest(compress=compress):
                headers = {"Content-Type": content_type}
                if compress:
                    headers["Content-Encoding"] = "gzip"
                status, receipt = put(path + client + "?weight=3", gzip.compress(body) if compress else body, headers)
                self.assertEqual(status, 201)
                self.assertEqual((receipt["rank"], receipt["lora_alpha"], receipt["use_rslora"], receipt["lora_modules"], receipt["weight"]),
                                 (4, 8, False, 2, 3))
                self.assertEqual(receipt["sha256"], hashlib.sha256(data).hexdigest())
        service = lac.Client(self.url)
        for compress in (False, True):
            receipt = service.upload_peft(data, self.config, federation="multipart", round=0, client="plain", weight=3, compress=compress)
            self.assertEqual((receipt["client"], receipt["lora_alpha"], receipt["rank"]), ("plain", 8, 4))
        self.assertEqual([(u["client"], u["lora_alpha"]) for u in service.status(federation="multipart", round=0)["uploads"]],
                         [("gzipped", 8), ("plain", 8)])

    def test_a_rank_pattern_gives_per_module_ranks_and_scales(self):
        service = lac.Client(self.url)
        arrays = two_module_adapter(2)
        receipt = service.upload_peft(lac.encode_safetensors(arrays), self.config, federation="pattern", round=0, client="a")
        self.assertEqual((receipt["rank"], receipt["lora_alpha"], receipt["lora_modules"]), (4, 8, 2))
        # Alone in its round, the client gets back what it sent; the global adapter is folded by √(8/r_m).
        own, _ = lac.decode_safetensors(service.aggregate(federation="pattern", round=0, client="a"))
        self.assertEqual(lac.module_ranks(lac.encode_safetensors(own)), {"q": 4, "k": 2})
        global_, _ = lac.decode_safetensors(service.aggregate(federation="pattern", round=0))
        for name, array in arrays.items():
            np.testing.assert_allclose(own[name], array, rtol=1e-6, atol=1e-6)
            scale = 8 / (4 if ".q." in name else 2)
            np.testing.assert_allclose(global_[name], array * np.sqrt(scale), rtol=1e-6, atol=1e-6)
        # The same directory as save_pretrained writes it, through the command line.
        directory = Path(self.directory.name) / "pattern-dir"
        directory.mkdir()
        (directory / "adapter_model.safetensors").write_bytes(lac.encode_safetensors(arrays))
        (directory / "adapter_config.json").write_text(json.dumps(self.config, indent=2, sort_keys=True))
        with contextlib.redirect_stdout(io.StringIO()) as stdout:
            code = lac.main(["--server", self.url, "upload", "--federation", "pattern", "--round", "0", "--client", "b", "--weight", "2",
                             "--peft-dir", str(directory)])
        self.assertEqual(code, 0)
        self.assertEqual((json.loads(stdout.getvalue())["client"], json.loads(stdout.getvalue())["weight"]), ("b", 2))
        receipt = lac.upload_peft_directory(service, directory, federation="pattern", round=0, client="c", weight=5)
        self.assertEqual((receipt["rank"], receipt["lora_alpha"]), (4, 8))

    def test_the_global_config_gives_every_module_of_the_global_adapter_its_rank_and_scale(self):
        service = lac.Client(self.url)
        service.upload_peft(lac.encode_safetensors(two_module_adapter(5)), self.config, federation="global-config", round=0, client="a")
        service.upload(lac.encode_safetensors(two_module_adapter(6, (("q", 2), ("k", 2)))), federation="global-config", round=0, client="b", rank=2)
        for options in ({}, {"rank": 3}, {"lora_alpha": 16}, {"lora_alpha": 16, "use_rslora": True}):
            with self.subTest(**options):
                config = json.loads(service.adapter_config(federation="global-config", round=0, **options))
                ranks = lac.module_ranks(service.aggregate(federation="global-config", round=0, **options))
                self.assertEqual(ranks, {"q": min(4, options.get("rank", 4)), "k": 2})
                self.assertEqual(config["target_modules"], ["q", "k"])  # from a's config, the lowest client id that sent one
                self.assertEqual(config["use_rslora"], options.get("use_rslora", False))
                for module, rank in ranks.items():
                    alpha = options.get("lora_alpha", rank)
                    self.assertEqual(lac.module_rank_and_alpha(config, module), (rank, alpha), module)

    def test_a_pattern_key_matching_no_module_is_refused_and_stores_nothing(self):
        service = lac.Client(self.url)
        data = lac.encode_safetensors(two_module_adapter(3))
        service.upload_peft(data, self.config, federation="refused-pattern", round=0, client="a")
        before = service.status(federation="refused-pattern", round=0)
        for pattern in ("rank_pattern", "alpha_pattern"):
            bad = dict(self.config, **{pattern: {"k": 2, "v_proj": 3}})
            for client in ("a", "b"):
                with self.subTest(pattern=pattern, client=client), self.assertRaises(lac.AggregatorError) as refused:
                    service.upload_peft(data, bad, federation="refused-pattern", round=0, client=client)
                self.assertEqual(refused.exception.status, 422)
                self.assertIn("v_proj", refused.exception.detail)
        self.assertEqual(service.status(federation="refused-pattern", round=0)["uploads"], before["uploads"])
        with self.assertRaises(lac.AggregatorError) as refused:  # scale parameters come from the config in a multipart upload
            service._request_json("PUT", "/v1/federations/refused-pattern/rounds/0/uploads/b", {"lora_alpha": "4"},
                                  *self.multipart(data, lac.peft_config_json(self.config)))
        self.assertEqual(refused.exception.status, 400)

    @staticmethod
    def multipart(data, config):
        body, content_type = lac.encode_multipart([("adapter_model.safetensors", data, "application/octet-stream"),
                                                   ("adapter_config.json", config, "application/json")])
        return body, {"Content-Type": content_type}

    def test_plain_upload_with_lora_alpha_folds_by_its_scale(self):
        service = lac.Client(self.url)
        arrays = {name: array for name, array in two_module_adapter(4).items() if ".q." in name}
        receipt = service.upload(lac.encode_safetensors(arrays), federation="alpha", round=0, client="a", rank=4, lora_alpha=16)
        self.assertEqual((receipt["rank"], receipt["lora_alpha"], receipt["use_rslora"]), (4, 16, False))
        receipt = service.upload(lac.encode_safetensors(arrays), federation="alpha", round=0, client="b", rank=4, lora_alpha=16, use_rslora=True)
        self.assertEqual((receipt["lora_alpha"], receipt["use_rslora"]), (16, True))
        # a at scale 4, b at scale 8, equal weights: the global factors are the mean of √s·x.
        global_, _ = lac.decode_safetensors(service.aggregate(federation="alpha", round=0))
        for name, array in arrays.items():
            np.testing.assert_allclose(global_[name], array * (2 + np.sqrt(8)) / 2, rtol=1e-6, atol=1e-6)
        # Asked for a model with lora_alpha=16 (scale 4 at rank 4): divided by √4.
        unfolded, _ = lac.decode_safetensors(service.aggregate(federation="alpha", round=0, lora_alpha=16))
        for name, array in arrays.items():
            np.testing.assert_allclose(unfolded[name], array * (2 + np.sqrt(8)) / 4, rtol=1e-6, atol=1e-6)
        path = Path(self.directory.name) / "alpha.safetensors"
        path.write_bytes(lac.encode_safetensors(arrays))
        with contextlib.redirect_stdout(io.StringIO()) as stdout:
            code = lac.main(["--server", self.url, "upload", "--federation", "alpha", "--round", "0", "--client", "c", "--rank", "4",
                             "--lora-alpha", "32", "--use-rslora", str(path)])
        self.assertEqual(code, 0)
        self.assertEqual((json.loads(stdout.getvalue())["lora_alpha"], json.loads(stdout.getvalue())["use_rslora"]), (32, True))


def based_adapter(seed, rank, dense=True):
    """One LoRA module `q` of rank `rank` (A [rank, 6], B [5, rank]) and, with `dense`, a dense `head`."""
    rng = np.random.default_rng(seed)
    arrays = {"base_model.model.q.lora_A.weight": rng.standard_normal((rank, 6)).astype(np.float32),
              "base_model.model.q.lora_B.weight": rng.standard_normal((5, rank)).astype(np.float32)}
    if dense:
        arrays["base_model.model.head.weight"] = rng.standard_normal((3, 3)).astype(np.float32)
    return arrays


class Recorder:
    """Wraps a Client's _request: each call's (method, path, query, body, headers) and answer headers."""

    def __init__(self, client):
        self.calls, self.request = [], client._request

    def __call__(self, method, path, query=None, body=None, headers=None):
        payload, answer_headers = self.request(method, path, query, body, headers)
        self.calls.append({"method": method, "path": path, "query": dict(query or {}), "body": body, "headers": dict(headers or {}),
                           "answer": answer_headers})
        return payload, answer_headers


class FederationTests(ServerTestCase):
    """Federation settings, round bases and a client's start of a round, through Client."""

    def test_set_federation_sends_only_the_members_given_and_federation_reads_them_back(self):
        client = lac.Client(self.url)
        recorder = Recorder(client)
        with mock.patch.object(client, "_request", recorder):
            answer = client.set_federation("settings", strategy="zero_padding", chain=True, quorum={"min_uploads": 3, "grace_seconds": 1.5},
                                           round_timeout_seconds=60)
            client.set_federation("settings-defaults")
        self.assertEqual(json.loads(recorder.calls[0]["body"]), {"strategy": "zero_padding", "chain": True,
                                                                  "quorum": {"min_uploads": 3, "grace_seconds": 1.5}, "round_timeout_seconds": 60})
        self.assertEqual((recorder.calls[0]["method"], recorder.calls[0]["headers"]["Content-Type"]), ("PUT", "application/json"))
        self.assertEqual(json.loads(recorder.calls[1]["body"]), {})
        self.assertEqual((answer["federation"], answer["current_round"], answer["rounds"]), ("settings", 0, 0))
        self.assertEqual(answer["settings"]["strategy"], "zero_padding")
        self.assertEqual(answer["settings"]["quorum"]["min_uploads"], 3)
        self.assertEqual(client.federation("settings"), answer)
        # The settings are replaced as a whole: a member not given is back at its default.
        changed = client.set_federation("settings", chain=True)
        self.assertEqual(changed["settings"], {"strategy": "replication", "chain": True, "quorum": None, "round_timeout_seconds": None})
        # A federation never configured answers with the defaults.
        self.assertEqual(client.federation("never-configured")["settings"]["chain"], False)

    def test_a_refused_setting_is_an_aggregator_error_422_naming_the_member_and_changes_nothing(self):
        client = lac.Client(self.url)
        before = client.set_federation("refused-settings", strategy="zero_padding")
        for options, member in (({"strategy": "bogus"}, "strategy"), ({"quorum": {"min_uploads": 0}}, "quorum.min_uploads"),
                                ({"quorum": {"min_uploads": 3, "max_uploads": 2}}, "quorum.max_uploads"),
                                ({"quorum": {"grace_seconds": 1}}, "quorum"), ({"quorum": {"min_upload": 1}}, "quorum.min_upload"),
                                ({"round_timeout_seconds": -1}, "round_timeout_seconds")):
            with self.subTest(member=member), self.assertRaises(lac.AggregatorError) as refused:
                client.set_federation("refused-settings", **options)
            self.assertEqual((refused.exception.status, refused.exception.title), (422, "Unprocessable Content"))
            self.assertIn(f"'{member}'", refused.exception.detail)
        self.assertEqual(client.federation("refused-settings"), before)

    def test_put_base_is_stored_at_scale_1_and_read_back_as_stored_or_cut_and_unfolded(self):
        client = lac.Client(self.url)
        arrays = based_adapter(1, 4)
        # zstd both ways with the zstandard package (scripts/test installs it), gzip without it.
        self.assertIsNotNone(lac._zstandard, "scripts/test installs zstandard")
        for zstandard, coding, accepted in ((lac._zstandard, "zstd", "zstd, gzip"), (None, "gzip", "gzip")):
            recorder = Recorder(client)
            with mock.patch.object(client, "_request", recorder), mock.patch.object(lac, "_zstandard", zstandard):
                receipt = client.put_base(lac.encode_safetensors(arrays), federation="bases", round=0, rank=4, lora_alpha=8)
                stored = client.base(federation="bases", round=0)
            put, got = recorder.calls
            self.assertEqual((put["query"], put["headers"]["Content-Encoding"]), ({"rank": 4, "lora_alpha": "8.0"}, coding))
            self.assertEqual((got["query"], got["headers"]["Accept-Encoding"], got["answer"]["Content-Encoding"]), ({}, accepted, coding))
        self.assertEqual((receipt["rank"], receipt["lora_alpha"], receipt["use_rslora"], receipt["lora_modules"], receipt["tensors"], receipt["source"]),
                         (4, 8, False, 1, 3, "upload"))
        self.assertEqual(receipt["sha256"], hashlib.sha256(stored).hexdigest())
        self.assertEqual(client.status(federation="bases", round=0)["base"], {"rank": 4, "sha256": receipt["sha256"], "source": "upload"})
        # Stored folded to scale 1: LoRA factors times √(8/4); the dense tensor as it is.
        folded, _ = lac.decode_safetensors(stored)
        for name, array in arrays.items():
            factor = 1.0 if "head" in name else np.sqrt(2.0)
            np.testing.assert_allclose(folded[name], array * factor, rtol=1e-6, err_msg=name)
        # Cut to rank 2 and unfolded for lora_alpha 8 (scale 4, or 8/√2 with rsLoRA), like an aggregate.
        for use_rslora, scale in ((None, 4.0), (True, 8 / np.sqrt(2))):
            with self.subTest(use_rslora=use_rslora):
                data = client.base(federation="bases", round=0, rank=2, lora_alpha=8, use_rslora=use_rslora)
                unfolded, metadata = lac.decode_safetensors(data)
                self.assertEqual((lac.module_ranks(data), metadata["base"]), ({"q": 2}, "upload"))
                expected = lac.truncate_to_rank(folded, 2)
                for name, array in expected.items():
                    np.testing.assert_allclose(unfolded[name], array if "head" in name else array / np.sqrt(scale), rtol=1e-6, err_msg=name)
        half, _ = lac.decode_safetensors(client.base(federation="bases", round=0, dtype="F16"))
        self.assertEqual(half["base_model.model.q.lora_A.weight"].dtype, np.float16)
        with self.assertRaises(lac.AggregatorError) as refused:  # past the base's rank
            client.base(federation="bases", round=0, rank=5)
        self.assertEqual(refused.exception.status, 422)
        # The same adapter with its config, multipart: the same stored base.
        config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q"]}
        again = client.put_base_peft(lac.encode_safetensors(arrays), config, federation="bases", round=0)
        self.assertEqual((again["sha256"], again["lora_alpha"], again["source"]), (receipt["sha256"], 8, "upload"))
        other = client.put_base_peft(lac.encode_safetensors(based_adapter(2, 4)), lac.peft_config_json(config), federation="bases", round=1,
                                     compress=False)
        self.assertEqual(other["round"], 1)

    def test_a_base_refused_missing_deleted_or_sealed(self):
        client = lac.Client(self.url)
        with self.assertRaises(lac.AggregatorError) as missing:
            client.base(federation="base-refusals", round=0)
        self.assertEqual(missing.exception.status, 404)
        self.assertIn("no base", missing.exception.detail)
        with self.assertRaises(lac.AggregatorError) as refused:  # the rank tag disagrees with the tensors
            client.put_base(lac.encode_safetensors(based_adapter(3, 4)), federation="base-refusals", round=0, rank=3)
        self.assertEqual(refused.exception.status, 422)
        client.put_base(lac.encode_safetensors(based_adapter(3, 4)), federation="base-refusals", round=0, rank=4)
        with self.assertRaises(lac.AggregatorError) as refused:  # an upload's shapes are checked against the base
            client.upload(lac.encode_safetensors(based_adapter(4, 2, dense=False) | {"base_model.model.head.weight": np.zeros((2, 2), np.float32)}),
                          federation="base-refusals", round=0, client="a", rank=2)
        self.assertEqual(refused.exception.status, 422)
        self.assertIsNone(client.delete_base(federation="base-refusals", round=0))
        with self.assertRaises(lac.AggregatorError) as missing:
            client.delete_base(federation="base-refusals", round=0)
        self.assertEqual(missing.exception.status, 404)
        client.put_base(lac.encode_safetensors(based_adapter(3, 4)), federation="base-refusals", round=0, rank=4)
        client.seal(federation="base-refusals", round=0)
        for attempt in (lambda: client.put_base(lac.encode_safetensors(based_adapter(3, 4)), federation="base-refusals", round=0, rank=4),
                        lambda: client.delete_base(federation="base-refusals", round=0)):
            with self.assertRaises(lac.AggregatorError) as sealed:
                attempt()
            self.assertEqual(sealed.exception.status, 409)
        self.assertEqual(lac.module_ranks(client.base(federation="base-refusals", round=0)), {"q": 4})  # still readable

    def test_start_round_gives_the_current_round_its_base_at_the_clients_scale_and_the_config(self):
        client = lac.Client(self.url)
        client.set_federation("loop", strategy="replication", chain=True)
        start = client.start_round("loop", rank=2, lora_alpha=16)
        self.assertEqual((start.federation, start.round, start.base), ("loop", 0, None))
        self.assertEqual(start.config, {"peft_type": "LORA", "r": 2, "lora_alpha": 16, "use_rslora": False})
        self.assertEqual(client.start_round("loop", rank=3).config, {"peft_type": "LORA", "r": 3, "lora_alpha": 3, "use_rslora": False})
        # An explicit round-0 base: each client gets it at its own rank and scale.
        client.put_base(lac.encode_safetensors(based_adapter(5, 4)), federation="loop", round=0, rank=4)
        start = client.start_round("loop", rank=2, lora_alpha=16)
        self.assertEqual(start.round, 0)
        self.assertEqual(start.base, client.base(federation="loop", round=0, rank=2, lora_alpha=16))
        # Two clients train (here: a fixed delta) and upload with the config, then the round is sealed.
        for name, rank, alpha in (("low", 2, 16), ("high", 4, 8)):
            start = client.start_round("loop", rank=rank, lora_alpha=alpha)
            arrays, _ = lac.decode_safetensors(start.base)
            trained = {key: array + np.float32(0.25) for key, array in arrays.items()}
            receipt = client.upload_peft(lac.encode_safetensors(trained), start.config, federation="loop", round=start.round, client=name)
            self.assertEqual((receipt["round"], receipt["rank"], receipt["lora_alpha"]), (0, rank, alpha))
        sealed = client.seal(federation="loop", round=0)
        self.assertEqual(sealed["sealed_by"], "request")
        # Chained: round 1 starts from round 0's aggregate at the client's rank and scale.
        self.assertEqual(client.federation("loop")["current_round"], 1)
        self.assertEqual(client.status(federation="loop", round=1)["base"]["source"], "chain")
        self.assertEqual(client.base(federation="loop", round=1), client.aggregate(federation="loop", round=0))
        for rank, alpha, use_rslora in ((2, 16, False), (4, 8, False), (3, 4, True)):
            with self.subTest(rank=rank, lora_alpha=alpha, use_rslora=use_rslora):
                start = client.start_round("loop", rank=rank, lora_alpha=alpha, use_rslora=use_rslora)
                self.assertEqual((start.round, start.config["use_rslora"]), (1, use_rslora))
                base, metadata = lac.decode_safetensors(start.base)
                self.assertEqual((lac.module_ranks(start.base), metadata["base"]), ({"q": rank}, "chain"))
                expected, _ = lac.decode_safetensors(client.aggregate(federation="loop", round=0, rank=rank, lora_alpha=alpha,
                                                                      use_rslora=True if use_rslora else None))
                self.assertEqual(sorted(base), sorted(expected))
                for name, array in expected.items():
                    np.testing.assert_allclose(base[name], array, rtol=1e-6, atol=1e-7, err_msg=name)
        # Without chain a sealed round leaves the next one without a base.
        client.set_federation("unchained")
        client.upload(lac.encode_safetensors(based_adapter(6, 2)), federation="unchained", round=0, client="a", rank=2)
        client.seal(federation="unchained", round=0)
        start = client.start_round("unchained", rank=2)
        self.assertEqual((start.round, start.base), (1, None))

    def test_aggregate_without_strategy_follows_the_federations(self):
        client = lac.Client(self.url)
        client.set_federation("follows", strategy="zero_padding")
        client.upload(adapter(2, 1.0), federation="follows", round=0, client="a", rank=2)
        client.upload(adapter(4, 3.0), federation="follows", round=0, client="b", rank=4)
        recorder = Recorder(client)
        with mock.patch.object(client, "_request", recorder):
            data = client.aggregate(federation="follows", round=0)
        self.assertNotIn("strategy", recorder.calls[0]["query"])
        # Zero padding: rows 2-3 only b holds, divided by both weights: 3 / 2.
        self.assertEqual(lac.safetensors_metadata(data)["strategy"], "zero_padding")
        self.assertAlmostEqual(read_tensor(data, "base_model.model.q.lora_A.weight")[1][8 * 3], 1.5, places=6)
        replication = client.aggregate(federation="follows", round=0, strategy="replication")
        self.assertAlmostEqual(read_tensor(replication, "base_model.model.q.lora_A.weight")[1][8 * 3], 3.0, places=6)
        output = Path(self.directory.name) / "follows.safetensors"
        self.assertEqual(Path(client.download(output, federation="follows", round=0)).read_bytes(), data)
        client.set_federation("follows", strategy="replication")
        self.assertEqual(client.aggregate(federation="follows", round=0), replication)

    def test_command_line_federation_and_base(self):
        def run(*arguments):
            with contextlib.redirect_stdout(io.StringIO()) as stdout, contextlib.redirect_stderr(io.StringIO()) as stderr:
                code = lac.main(["--server", self.url, *arguments])
            return code, stdout.getvalue(), stderr.getvalue()

        code, stdout, _ = run("federation", "set", "--federation", "cli-fed", "--strategy", "zero_padding", "--chain", "--min-uploads", "2",
                              "--grace-seconds", "5", "--round-timeout-seconds", "30")
        self.assertEqual(code, 0)
        self.assertEqual(json.loads(stdout)["settings"], {"strategy": "zero_padding", "chain": True, "round_timeout_seconds": 30,
                                                          "quorum": {"min_uploads": 2, "grace_seconds": 5, "max_uploads": None}})
        code, stdout, _ = run("federation", "show", "--federation", "cli-fed")
        self.assertEqual((code, json.loads(stdout)["current_round"]), (0, 0))
        code, stdout, _ = run("federation", "set", "--federation", "cli-fed", "--no-chain")
        self.assertEqual((code, json.loads(stdout)["settings"]["chain"], json.loads(stdout)["settings"]["strategy"]), (0, False, "replication"))
        code, _, stderr = run("federation", "set", "--federation", "cli-fed", "--min-uploads", "0")
        self.assertEqual(code, lac.EXIT_REFUSED)
        self.assertIn("422", stderr)
        self.assertIn("quorum.min_uploads", stderr)
        with contextlib.redirect_stderr(io.StringIO()), self.assertRaises(SystemExit) as usage:
            lac.main(["--server", self.url, "federation", "set", "--federation", "cli-fed", "--grace-seconds", "5"])
        self.assertEqual(usage.exception.code, 2)

        arrays = based_adapter(7, 4)
        path = Path(self.directory.name) / "cli-base.safetensors"
        path.write_bytes(lac.encode_safetensors(arrays))
        code, stdout, _ = run("base", "put", "--federation", "cli-fed", "--round", "0", "--rank", "4", "--lora-alpha", "16", str(path))
        self.assertEqual((code, json.loads(stdout)["lora_alpha"], json.loads(stdout)["source"]), (0, 16, "upload"))
        peft_directory = Path(self.directory.name) / "cli-base-peft"
        peft_directory.mkdir()
        (peft_directory / "adapter_model.safetensors").write_bytes(lac.encode_safetensors(arrays))
        (peft_directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 16}))
        code, stdout, _ = run("base", "put", "--federation", "cli-fed", "--round", "0", "--peft-dir", str(peft_directory))
        self.assertEqual((code, json.loads(stdout)["rank"]), (0, 4))
        output = Path(self.directory.name) / "cli-base-out"
        output.mkdir()
        code, stdout, _ = run("base", "get", "--federation", "cli-fed", "--round", "0", "--rank", "2", "--lora-alpha", "16", "--output", str(output))
        self.assertEqual((code, json.loads(stdout)["written"]), (0, str(output / "adapter_model.safetensors")))
        self.assertEqual((output / "adapter_model.safetensors").read_bytes(), lac.Client(self.url).base(federation="cli-fed", round=0, rank=2, lora_alpha=16))
        code, stdout, _ = run("base", "delete", "--federation", "cli-fed", "--round", "0")
        self.assertEqual(code, 0)
        code, _, stderr = run("base", "get", "--federation", "cli-fed", "--round", "0", "--output", str(output))
        self.assertEqual(code, lac.EXIT_REFUSED)
        self.assertIn("404", stderr)


class LocalHelperTests(unittest.TestCase):
    """Multipart framing, config serialisation and PEFT's pattern resolution, without a server."""

    def test_multipart_framing_is_crlf_and_the_boundary_occurs_in_no_part(self):
        taken = b"x lora-aggregator-aaaa y"
        with mock.patch.object(lac.secrets, "token_hex", side_effect=["aaaa", "bbbb"]):
            body, content_type = lac.encode_multipart([("adapter_model.safetensors", taken, "application/octet-stream"),
                                                       ("adapter_config.json", b"{}", "application/json")])
        self.assertEqual(content_type, "multipart/form-data; boundary=lora-aggregator-bbbb")
        self.assertEqual(body, b'--lora-aggregator-bbbb\r\nContent-Disposition: form-data; name="adapter_model.safetensors"; '
                               b'filename="adapter_model.safetensors"\r\nContent-Type: application/octet-stream\r\n\r\n' + taken +
                               b'\r\n--lora-aggregator-bbbb\r\nContent-Disposition: form-data; name="adapter_config.json"; '
                               b'filename="adapter_config.json"\r\nContent-Type: application/json\r\n\r\n{}\r\n--lora-aggregator-bbbb--\r\n')
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
        self.assertEqual([part.get_payload(decode=True) for part in message.iter_parts()], [taken, b"{}"])

    def test_config_json_sorts_keys_like_save_pretrained_but_keeps_pattern_order(self):
        text = lac.peft_config_json({"r": 8, "rank_pattern": {"z": 2, "a": 4}, "alpha_pattern": {"y": 1, "b": 2},
                                     "lora_alpha": 16, "target_modules": {"q"}, "loftq_config": {"b": 1, "a": 2}})
        self.assertEqual(list(json.loads(text)), ["alpha_pattern", "loftq_config", "lora_alpha", "r", "rank_pattern", "target_modules"])
        parsed = json.loads(text)
        self.assertEqual((list(parsed["rank_pattern"]), list(parsed["alpha_pattern"]), list(parsed["loftq_config"])), (["z", "a"], ["y", "b"], ["a", "b"]))
        self.assertEqual(parsed["target_modules"], ["q"])

    def test_save_peft_aggregate_refetches_when_the_config_changes_under_the_download(self):
        class Service:  # adapter_config answers from `configs` in turn; download writes the weights
            def __init__(self, configs):
                self.configs, self.downloads = list(configs), 0

            def adapter_config(self, **ids):
                return self.configs.pop(0)

            def download(self, output, **options):
                self.downloads += 1
                (Path(output) / "adapter_model.safetensors").write_bytes(b"weights")
                return str(Path(output) / "adapter_model.safetensors")

        with tempfile.TemporaryDirectory() as directory:
            service = Service([b"old", b"new", b"new", b"new"])
            lac.save_peft_aggregate(service, directory, federation="f", round=0)
            self.assertEqual((service.downloads, (Path(directory) / "adapter_config.json").read_bytes()), (2, b"new"))
            with self.assertRaises(ValueError) as changing:
                lac.save_peft_aggregate(Service([b"1", b"2", b"3", b"4"]), directory, federation="f", round=0, attempts=2)
            self.assertIn("seal", str(changing.exception))
            self.assertFalse((Path(directory) / "adapter_config.json").exists())

    def test_module_resolution_follows_peft_first_matching_key(self):
        config = {"r": 8, "lora_alpha": 16, "rank_pattern": {"layers.0.q": 2, "q": 4}, "alpha_pattern": {"q": 32}}
        self.assertEqual(lac.module_rank_and_alpha(config, "model.layers.0.q"), (2, 32.0))
        self.assertEqual(lac.module_rank_and_alpha(config, "model.layers.1.q"), (4, 32.0))
        self.assertEqual(lac.module_rank_and_alpha(config, "model.layers.1.qq"), (8, 16.0))
        self.assertEqual(lac.module_scale(dict(config, use_rslora=True), "k"), 16 / np.sqrt(8))
        self.assertEqual(lac.lora_module("base_model.model.a.b.lora_B.weight"), ("a.b", 1))
        self.assertIsNone(lac.lora_module("base_model.model.head.weight"))


def unused_port():
    """A local port with nothing listening: bound so that the kernel picks a free one, then closed."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class WithoutServerTests(unittest.TestCase):
    """Failures before any answer from the service: nothing listening, nothing answering, no file."""

    def test_nothing_listening_raises_a_transport_error_not_a_refusal(self):
        url = f"http://127.0.0.1:{unused_port()}"
        with self.assertRaises(lac.AggregatorClientError) as failed:
            lac.Client(url).status(federation="fed", round=0)
        error = failed.exception
        self.assertIsInstance(error, lac.AggregatorTransportError)
        self.assertNotIsInstance(error, lac.AggregatorError)
        self.assertEqual((error.method, error.url), ("GET", url + "/v1/federations/fed/rounds/0"))
        self.assertIn("refused", error.reason)

    def test_a_server_that_never_answers_times_out_as_a_transport_error(self):
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen()  # connections complete in the kernel's backlog but are never accepted
            with self.assertRaises(lac.AggregatorTransportError) as failed:
                lac.Client(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.2).status(federation="fed", round=0)
        self.assertIn("timed out", failed.exception.reason)

    def test_command_line_exit_codes_tell_unreachable_from_a_local_problem(self):
        server = f"http://127.0.0.1:{unused_port()}"
        for arguments, exit_code, message in (
                (["status", "--federation", "fed", "--round", "0"], lac.EXIT_UNREACHABLE, "no answer from the service: GET "),
                (["upload", "--federation", "fed", "--round", "0", "--client", "a", "--rank", "2", "/nonexistent.safetensors"],
                 lac.EXIT_LOCAL_ERROR, "No such file")):
            with self.subTest(arguments[0]), contextlib.redirect_stderr(io.StringIO()) as stderr:
                self.assertEqual(lac.main(["--server", server, *arguments]), exit_code)
            self.assertEqual(stderr.getvalue().count("\n"), 1)
            self.assertIn(message, stderr.getvalue())


if __name__ == "__main__":
    unittest.main()
