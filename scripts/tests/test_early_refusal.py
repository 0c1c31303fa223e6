"""Early refusals reach clients that send their whole body before reading, as Python's http.client
(and urllib and requests on top of it) does: no `Expect: 100-continue`, the body sent in full, then
the answer read. Without the server's lingering close they see "connection reset by peer"."""
import http.client
import json
import unittest
from urllib.parse import urlsplit

from support import ServerTestCase

MB = 1_000_000


def put_whole_body(url: str, path: str, size: int, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], dict]:
    address = urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=120)
    try:
        connection.request("PUT", path, body=bytes(size), headers={"Content-Type": "application/octet-stream", **(headers or {})})
        response = connection.getresponse()
        return response.status, {name.lower(): value for name, value in response.getheaders()}, json.loads(response.read())
    finally:
        connection.close()


class OversizedUploadTests(ServerTestCase):
    server_arguments = ["--max-upload-bytes", str(50 * MB)]

    def test_a_60_mb_body_over_a_50_mb_limit_gets_the_413_problem(self):
        status, headers, problem = put_whole_body(self.url, "/v1/federations/f/rounds/1/uploads/c?rank=4", 60 * MB)
        self.assertEqual(status, 413)
        self.assertEqual(headers["content-type"], "application/problem+json")
        self.assertEqual(headers["connection"], "close")
        self.assertEqual(problem["status"], 413)
        self.assertIn("exceeds the limit", problem["detail"])

    def test_an_unsupported_content_coding_gets_the_415_problem(self):
        status, headers, problem = put_whole_body(self.url, "/v1/federations/f/rounds/1/uploads/c?rank=4", 20 * MB, {"Content-Encoding": "br"})
        self.assertEqual((status, problem["status"]), (415, 415))
        self.assertIn("accept-encoding", headers)

    def test_the_server_answers_the_next_client_normally(self):
        put_whole_body(self.url, "/v1/federations/f/rounds/1/uploads/c?rank=4", 60 * MB)
        address = urlsplit(self.url)
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
        connection.request("GET", "/healthz")
        self.assertEqual(connection.getresponse().status, 200)
        connection.close()


class UnauthenticatedUploadTests(ServerTestCase):
    server_environment = {"LORA_AGGREGATOR_ADMIN_TOKEN": "the-admin-token-of-this-test"}

    def test_a_20_mb_upload_without_a_token_gets_the_401_problem(self):
        status, headers, problem = put_whole_body(self.url, "/v1/federations/f/rounds/1/uploads/c?rank=4", 20 * MB)
        self.assertEqual(status, 401)
        self.assertEqual(headers["content-type"], "application/problem+json")
        self.assertEqual(problem["status"], 401)

    def test_a_20_mb_upload_with_a_wrong_token_gets_the_401_problem(self):
        status, _, problem = put_whole_body(self.url, "/v1/federations/f/rounds/1/uploads/c?rank=4", 20 * MB,
                                            {"Authorization": "Bearer not-the-token"})
        self.assertEqual((status, problem["status"]), (401, 401))


class BoundedLingeringTests(ServerTestCase):
    # Discarding stops after 1 MB: a client still sending then gets the reset lingering prevents.
    server_arguments = ["--max-upload-bytes", str(50 * MB), "--lingering-bytes", str(MB)]

    def test_past_the_byte_bound_the_connection_is_reset(self):
        with self.assertRaises(ConnectionError):
            put_whole_body(self.url, "/v1/federations/f/rounds/1/uploads/c?rank=4", 60 * MB)


if __name__ == "__main__":
    unittest.main()
