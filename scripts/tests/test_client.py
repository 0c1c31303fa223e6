"""Tests of scripts/lora_aggregator_client.py against the real server (started on a free port)."""
import contextlib
import io
import json
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
        receipt = client.upload_file("fed", 0, "alice", 2, str(peft_directory), weight=3)
        self.assertEqual((receipt["client"], receipt["rank"], receipt["lora_modules"]), ("alice", 2, 1))
        client.upload("fed", 0, "bob", 4, adapter(4, 2.0), weight=1)
        status = client.status("fed", 0)
        self.assertEqual([u["client"] for u in status["uploads"]], ["alice", "bob"])
        self.assertEqual(status["max_rank"], 4)

        # Replication padding: rows 0-1 are shared (weights 3 and 1), rows 2-3 only bob's.
        shape, values = read_tensor(client.aggregate("fed", 0), "base_model.model.q.lora_A.weight")
        self.assertEqual(shape, [4, 8])
        self.assertAlmostEqual(values[0], (3 * 1.0 + 1 * 2.0) / 4, places=6)
        self.assertAlmostEqual(values[8 * 3], 2.0, places=6)
        out = Path(self.directory.name) / "out"
        out.mkdir()
        written = client.download(str(out), "fed", 0, client="alice")
        self.assertEqual(Path(written), out / "adapter_model.safetensors")
        self.assertEqual(read_tensor(Path(written).read_bytes(), "base_model.model.q.lora_A.weight")[0], [2, 8])

        self.assertTrue(client.seal("fed", 0)["sealed"])
        with self.assertRaises(lac.AggregatorError) as refused:
            client.upload("fed", 0, "carol", 2, adapter(2, 1.0))
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
        self.assertEqual(code, 1)
        self.assertIn("422", stderr.getvalue())
        self.assertIn("rank", stderr.getvalue())

    def test_safetensors_with_numpy_round_trips_and_the_server_reads_it(self):
        arrays = {"base_model.model.q.lora_B.weight": np.arange(12, dtype=np.float32).reshape(6, 2),
                  "base_model.model.q.lora_A.weight": np.linspace(-1, 1, 16).reshape(2, 8).astype(np.float16)}
        data = lac.encode_safetensors(arrays, metadata={"format": "pt"})
        decoded, metadata = lac.decode_safetensors(data)
        self.assertEqual(metadata, {"format": "pt"})
        for name, array in arrays.items():
            np.testing.assert_array_equal(decoded[name], array)
            self.assertEqual(decoded[name].dtype, array.dtype)
        self.assertEqual(lac.Client(self.url).upload("np", 0, "a", 2, data)["tensors"], 2)
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
        client.upload("cfg", 0, "a", 2, adapter(2, 1.0))
        client.upload("cfg", 0, "b", 4, adapter(4, 1.0))
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


if __name__ == "__main__":
    unittest.main()
