"""Shared by the Python tests: the real server on a free port against a temporary database."""
import os
import re
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))


class ServerTestCase(unittest.TestCase):
    """Starts `lora-aggregator serve` (the debug build, or $LORA_AGGREGATOR_BINARY) once per test
    class; `self.url` reaches it.
    A class may add flags (`server_arguments`) and `LORA_AGGREGATOR_*` variables (`server_environment`)."""

    server_arguments: list[str] = []
    server_environment: dict[str, str] = {}

    @classmethod
    def setUpClass(cls):
        cls.directory = tempfile.TemporaryDirectory()
        binary = os.environ.get("LORA_AGGREGATOR_BINARY") or ROOT / ".build/debug/lora-aggregator"
        cls.server = subprocess.Popen([str(binary), "serve", "--port", "0", "--database", os.path.join(cls.directory.name, "db.sqlite"), "--no-access-log",
                                       *cls.server_arguments], stdout=subprocess.PIPE, text=True, env={**os.environ, **cls.server_environment})
        port = re.search(r"127\.0\.0\.1:(\d+)", cls.server.stdout.readline()).group(1)
        cls.url = f"http://127.0.0.1:{port}"

    @classmethod
    def tearDownClass(cls):
        cls.server.terminate()
        cls.server.wait()
        cls.server.stdout.close()
        cls.directory.cleanup()
