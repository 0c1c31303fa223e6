"""Tests of scripts/lora_aggregator_client.py against the real server (started on a free port)."""
import contextlib
import io
import json
import socket
import struct
import unittest
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

    def test_download_with_an_adapter_config_writes_one_whose_r_is_the_rank(self):
        client = lac.Client(self.url)
        client.upload(adapter(2, 1.0), federation="cfg", round=0, client="a", rank=2)
        client.upload(adapter(4, 1.0), federation="cfg", round=0, client="b", rank=4)
        base = Path(self.directory.name) / "base_config.json"
        base.write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q"]}))
        output = Path(self.directory.name) / "cfg-out"
        output.mkdir()
        with contextlib.redirect_stdout(io.StringIO()) as stdout:
            code = lac.main(["--server", self.url, "download", "--federation", "cfg", "--round", "0", "--client", "a", "--output", str(output), "--adapter-config", str(base)])
        self.assertEqual(code, 0, stdout.getvalue())
        config = json.loads((output / "adapter_config.json").read_text())
        self.assertEqual((config["r"], config["lora_alpha"], config["target_modules"]), (2, 16, ["q"]))
        self.assertEqual(read_tensor((output / "adapter_model.safetensors").read_bytes(), "base_model.model.q.lora_A.weight")[0], [2, 8])
        with self.assertRaises(ValueError):
            lac.write_adapter_config(str(output), {"r": 8, "rank_pattern": {"q": 4}}, 2)


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
