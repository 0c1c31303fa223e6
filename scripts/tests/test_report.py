"""The round report through the real server (openapi.yaml, "Round report"): its numbers against numpy
on the aggregates downloaded, and its SVG rendered by headless Chromium (Debian's
chromium-headless-shell), with each strategy's line on the screenshot."""
import os
import struct
import subprocess
import tempfile
import unittest
import xml.etree.ElementTree as ElementTree
import zlib

import numpy as np
from support import ServerTestCase

import lora_aggregator_client as lac

MODULE = "base_model.model.layers.0.self_attn.q_proj"
A, B = f"{MODULE}.lora_A.weight", f"{MODULE}.lora_B.weight"
STRATEGIES = ["replication", "zero_padding", "hetlora", "svd"]
COLORS = {"replication": (0x1F, 0x77, 0xB4), "zero_padding": (0xD6, 0x27, 0x28), "hetlora": (0x2C, 0xA0, 0x2C), "svd": (0x94, 0x67, 0xBD)}


def png_pixels(data):
    """The RGB pixels of an 8-bit, non-interlaced RGB or RGBA PNG (what Chromium's screenshots are)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    offset, chunks = 8, {}
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        kind = data[offset + 4:offset + 8]
        chunks.setdefault(kind, []).append(data[offset + 8:offset + 8 + length])
        offset += 12 + length
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"][0])
    assert depth == 8 and color in (2, 6) and interlace == 0
    channels = 3 if color == 2 else 4
    raw = zlib.decompress(b"".join(chunks[b"IDAT"]))
    stride = width * channels
    rows, previous = [], bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up, corner = previous[i], previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                predictor = min((abs(p - left), 0, left), (abs(p - up), 1, up), (abs(p - corner), 2, corner))[2]
                line[i] = (line[i] + predictor) & 0xFF
        rows.append(bytes(line))
        previous = line
    return np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(height, width, channels)[:, :, :3]


class ReportTests(ServerTestCase):
    def setUp(self):
        self.service = lac.Client(self.url)
        rng = np.random.default_rng(5)
        # Ranks 2, 4 and 8 with weights 1, 2 and 5: slices 0-1 are everyone's, 2-3 have 7/8 of the weight, 4-7 5/8.
        for client, rank, weight in (("a", 2, 1.0), ("b", 4, 2.0), ("c", 8, 5.0)):
            tensors = {A: rng.standard_normal((rank, 12)).astype(np.float32), B: rng.standard_normal((10, rank)).astype(np.float32)}
            self.service.upload(lac.encode_safetensors(tensors), federation="report", round=0, client=client, rank=rank, weight=weight)

    def test_the_report_holds_each_strategys_slice_contributions_and_the_owners_share(self):
        report = self.service._request_json("GET", "/v1/federations/report/rounds/0/report")
        self.assertEqual(report["strategies"], STRATEGIES)
        (module,) = report["modules"]
        self.assertEqual((module["global_rank"], module["holders"]), (8, 3))
        shares = [slice_["owner_share"] for slice_ in module["slices"]]
        np.testing.assert_allclose(shares, [1, 1, 7 / 8, 7 / 8, 5 / 8, 5 / 8, 5 / 8, 5 / 8])
        self.assertEqual([slice_["owners"] for slice_ in module["slices"]], [3, 3, 2, 2, 1, 1, 1, 1])
        for strategy in STRATEGIES:
            tensors, _ = lac.decode_safetensors(self.service.aggregate(federation="report", round=0, strategy=strategy))
            expected = np.linalg.norm(tensors[B].astype(np.float64), axis=0) * np.linalg.norm(tensors[A].astype(np.float64), axis=1)
            np.testing.assert_allclose([slice_["contribution"][strategy] for slice_ in module["slices"]], expected, rtol=1e-6, err_msg=strategy)
        # Zero padding divides a slice by everyone's weight: its product shrinks by the owners' share squared.
        for slice_ in module["slices"]:
            contribution = slice_["contribution"]
            self.assertAlmostEqual(contribution["zero_padding"], contribution["replication"] * slice_["owner_share"] ** 2, delta=1e-6 * contribution["replication"])

    def test_the_svg_renders_in_headless_chromium_with_every_strategy_drawn(self):
        svg = self.service._request("GET", "/v1/federations/report/rounds/0/report.svg")
        self.assertEqual(svg[1].get("Content-Type"), "image/svg+xml")
        root = ElementTree.fromstring(svg[0])
        width, height = int(root.get("width")), int(root.get("height"))
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "report.svg")
            with open(path, "wb") as handle:
                handle.write(svg[0])
            screenshot = os.path.join(directory, "report.png")
            subprocess.run(["chromium-headless-shell", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={screenshot}",
                            f"--window-size={width},{height}", "file://" + path], check=True, capture_output=True, timeout=120)
            with open(screenshot, "rb") as handle:
                pixels = png_pixels(handle.read()).astype(int)
        self.assertEqual(pixels.shape[:2], (height, width))
        for strategy, color in COLORS.items():
            close = np.all(np.abs(pixels - np.array(color)) <= 8, axis=2)
            self.assertGreater(int(close.sum()), 50, f"{strategy}'s colour is on the rendered plot")


if __name__ == "__main__":
    unittest.main()
