#!/usr/bin/env python3
"""Reliability drills against the release server, on loopback only. Prints a Markdown table.

    scripts/reliability/drills [load|kill|disk-full|read-only|disconnect ...]   (default: all)

- load: 64 concurrent clients mix uploads and aggregate downloads for 60 s; no 5xx, every 2xx upload
  present with its digest afterwards, peak RSS, p50/p99 latency.
- kill: 20 rounds of SIGKILL during a burst of uploads, each followed by a restart and the
  durability check (every acknowledged upload whole, nothing partial).
- disk-full: the database on a 48 MiB tmpfs; uploads until it fills must get 507 problem+json, and
  once the filesystem grows the database is intact and takes uploads again (needs root for mount).
- read-only: the database on a read-only mount: a clear error and a non-zero exit (needs root).
- disconnect: 5 bursts of 200 clients abandoning uploads half-way; nothing is stored, open file
  descriptors return to their baseline, and RSS stops growing after two warm-up bursts.
"""
import gzip, hashlib, http.client, json, os, random, re, signal, socket, struct, subprocess, sys, tempfile, threading, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BINARY = ROOT / ".build/release/lora-aggregator"


def adapter(rank, seed, width=256, modules=8):
    rng = random.Random(seed)
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for module in range(modules):
        for name, shape in ((f"base_model.model.layers.{module}.q_proj.lora_A.weight", [rank, width]),
                            (f"base_model.model.layers.{module}.q_proj.lora_B.weight", [width, rank])):
            count = shape[0] * shape[1]
            blob = struct.pack(f"<{count}f", *(rng.uniform(-0.05, 0.05) for _ in range(count)))
            header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(blob)]}
            blobs.append(blob)
            offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


class Server:
    def __init__(self, database, *extra):
        self.process = subprocess.Popen([str(BINARY), "serve", "--port", "0", "--database", str(database), "--no-access-log", *extra],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        match = re.search(r"127\.0\.0\.1:(\d+)", line)
        if not match:
            raise RuntimeError(f"server did not start: {line!r} {self.process.stderr.read()}")
        self.port = int(match.group(1))

    def request(self, method, path, body=None, headers=None, timeout=120):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        connection.close()
        return response.status, data, dict(response.getheaders())

    def status(self, key):
        for line in open(f"/proc/{self.process.pid}/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def open_descriptors(self):
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)

    def kill(self):
        self.process.kill()
        self.process.wait()


def put(server, federation, client, rank, body, weight=1):
    return server.request("PUT", f"/v1/federations/{federation}/rounds/0/uploads/{client}?rank={rank}&weight={weight}",
                          body=gzip.compress(body, 1), headers={"Content-Encoding": "gzip", "Content-Type": "application/octet-stream"})


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0


def drill_load(workdir, seconds=60, clients=64):
    server = Server(workdir / "load.sqlite")
    files = {rank: [adapter(rank, seed) for seed in range(4)] for rank in (4, 16, 32)}
    acknowledged, statuses, latencies, lock = {}, {}, [], threading.Lock()
    deadline = time.time() + seconds
    peak = [0]

    def client(index):
        rng = random.Random(index)
        name = f"c{index:02d}"
        while time.time() < deadline:
            began = time.perf_counter()
            if rng.random() < 0.5:
                rank = rng.choice((4, 16, 32))
                body = rng.choice(files[rank])
                status, data, _ = put(server, "load", name, rank, body)
                if 200 <= status < 300:
                    with lock:
                        acknowledged[name] = hashlib.sha256(body).hexdigest()
            else:
                status, _, _ = server.request("GET", "/v1/federations/load/rounds/0/aggregate" + rng.choice(["", "?dtype=BF16", "?strategy=zero_padding"]))
            with lock:
                latencies.append(time.perf_counter() - began)
                statuses[status] = statuses.get(status, 0) + 1

    def watch():
        while time.time() < deadline:
            peak[0] = max(peak[0], server.status("VmRSS"))
            time.sleep(0.2)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)] + [threading.Thread(target=watch)]
    for thread in threads: thread.start()
    for thread in threads: thread.join()
    lost = 0
    for name, digest in acknowledged.items():
        status, data, _ = server.request("GET", f"/v1/federations/load/rounds/0/uploads/{name}")
        lost += status != 200 or hashlib.sha256(data).hexdigest() != digest
    server_errors = sum(count for status, count in statuses.items() if status >= 500)
    exit_code = server.stop()
    ok = server_errors == 0 and lost == 0 and exit_code == 0
    return ("load: 64 clients, 60 s, uploads and aggregate downloads", ok,
            f"{sum(statuses.values())} requests {dict(sorted(statuses.items()))}; 5xx: {server_errors}; lost uploads: {lost} of {len(acknowledged)}; "
            f"p50 {percentile(latencies, 0.5) * 1000:.0f} ms, p99 {percentile(latencies, 0.99) * 1000:.0f} ms; peak RSS {peak[0] / 1e6:.0f} MB; exit {exit_code}")


def drill_kill(workdir, iterations=20):
    database = workdir / "kill.sqlite"
    files = [adapter(16, seed) for seed in range(24)]
    acknowledged_total, problems = 0, []
    for iteration in range(iterations):
        server = Server(database)
        acknowledged, lock = {}, threading.Lock()

        def upload(index):
            try:
                status, data, _ = put(server, "crash", f"c{index:02d}", 16, files[(index + iteration) % len(files)])
                if 200 <= status < 300:
                    with lock:
                        acknowledged[index] = json.loads(data)["sha256"]
            except (OSError, http.client.HTTPException):
                pass

        threads = [threading.Thread(target=upload, args=(i,)) for i in range(len(files))]
        for thread in threads: thread.start()
        time.sleep(random.Random(iteration).uniform(0.02, 0.25))
        server.kill()
        for thread in threads: thread.join()
        restarted = Server(database)
        for index, digest in acknowledged.items():
            status, data, _ = restarted.request("GET", f"/v1/federations/crash/rounds/0/uploads/c{index:02d}")
            if status != 200 or hashlib.sha256(data).hexdigest() != digest:
                problems.append(f"iteration {iteration}: c{index:02d} acknowledged but {status}")
        status, data, _ = restarted.request("GET", "/v1/federations/crash/rounds/0")
        for upload_entry in (json.loads(data)["uploads"] if status == 200 else []):
            status, body, _ = restarted.request("GET", f"/v1/federations/crash/rounds/0/uploads/{upload_entry['client']}")
            if hashlib.sha256(body).hexdigest() != upload_entry["sha256"]:
                problems.append(f"iteration {iteration}: {upload_entry['client']} partial")
        acknowledged_total += len(acknowledged)
        restarted.stop()
    return (f"SIGKILL during uploads, {iterations} iterations", not problems,
            f"{acknowledged_total} acknowledged uploads across the kills, all present and whole after restart" if not problems else "; ".join(problems[:5]))


def drill_disk_full(workdir):
    if os.geteuid() != 0:
        return ("disk full", None, "skipped: needs root to mount a small tmpfs")
    mount = workdir / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], check=True)
    try:
        server = Server(mount / "db.sqlite")
        outcomes, stored = [], {}
        for index in range(30):
            body = adapter(64, index, width=1024)  # 4 MB each: 120 MB into 48 MiB
            status, data, headers = put(server, "full", f"c{index:02d}", 64, body)
            outcomes.append(status)
            if 200 <= status < 300:
                stored[f"c{index:02d}"] = hashlib.sha256(body).hexdigest()
            elif status == 507:
                problem = json.loads(data)
                assert headers.get("Content-Type") == "application/problem+json" and problem["status"] == 507, data
        full = outcomes.count(507)
        server_errors = [s for s in outcomes if s >= 500 and s != 507]
        subprocess.run(["mount", "-o", "remount,size=512m", str(mount)], check=True)
        intact = all(server.request("GET", f"/v1/federations/full/rounds/0/uploads/{name}")[1] is not None
                     and hashlib.sha256(server.request("GET", f"/v1/federations/full/rounds/0/uploads/{name}")[1]).hexdigest() == digest
                     for name, digest in stored.items())
        after, _, _ = put(server, "full", "after", 64, adapter(64, 99, width=1024))
        exit_code = server.stop()
        check = subprocess.run(["python3", "-c", "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('PRAGMA integrity_check').fetchone()[0])", str(mount / "db.sqlite")],
                               capture_output=True, text=True).stdout.strip()
        ok = full > 0 and not server_errors and intact and after == 201 and check == "ok" and exit_code == 0
        return ("disk full (database on a 48 MiB tmpfs)", ok,
                f"{len(stored)} uploads stored, then {full} × 507 problem+json, other 5xx: {len(server_errors)}; after growing the filesystem: "
                f"stored uploads intact: {intact}, a new upload: {after}, integrity_check: {check}")
    finally:
        subprocess.run(["umount", str(mount)])


def drill_read_only(workdir):
    if os.geteuid() != 0:
        return ("read-only database at start", None, "skipped: needs root to mount read-only")
    mount = workdir / "ro"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], check=True)
    try:
        server = Server(mount / "db.sqlite")
        server.stop()
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        result = subprocess.run([str(BINARY), "serve", "--port", "0", "--database", str(mount / "db.sqlite")], capture_output=True, text=True, timeout=30)
        message = result.stderr.strip().splitlines()[0] if result.stderr.strip() else ""
        ok = result.returncode != 0 and "database" in message
        return ("read-only database at start", ok, f"exit {result.returncode}: {message}")
    finally:
        subprocess.run(["umount", str(mount)])


def drill_disconnect(workdir, clients=200):
    """Bursts of abandoned uploads. The first bursts grow the allocator's pools; after them, further
    bursts must not grow descriptors, nor memory by more than 16 MB (a leak grows with every burst)."""
    server = Server(workdir / "disconnect.sqlite")
    body = gzip.compress(adapter(16, 1), 1)
    start_descriptors, start_rss = server.open_descriptors(), server.status("VmRSS")

    def burst(tag):
        for index in range(clients):
            connection = socket.create_connection(("127.0.0.1", server.port))
            head = (f"PUT /v1/federations/gone/rounds/0/uploads/{tag}{index:03d}?rank=16 HTTP/1.1\r\nHost: x\r\n"
                    f"Content-Encoding: gzip\r\nContent-Length: {len(body)}\r\n\r\n").encode()
            connection.sendall(head + body[: len(body) // 2])
            connection.close()
        time.sleep(2)
        return server.open_descriptors(), server.status("VmRSS")

    burst("a")
    _, warm_rss = burst("b")
    rounds = [burst(tag) for tag in ("c", "d", "e")]
    status, _, _ = server.request("GET", "/v1/federations/gone/rounds/0")
    exit_code = server.stop()
    ok = status == 404 and all(d <= start_descriptors for d, _ in rounds) and rounds[-1][1] <= warm_rss + 16 * 1024 * 1024 and exit_code == 0
    return (f"5 × {clients} clients leave mid-upload", ok,
            f"round afterwards: {status} (nothing stored); open descriptors {start_descriptors} at start, {[d for d, _ in rounds]} after bursts 3–5; "
            f"RSS {start_rss / 1e6:.0f} MB at start, {warm_rss / 1e6:.0f} MB after two warm-up bursts (allocator pools), "
            f"{[round(r / 1e6) for _, r in rounds]} MB after bursts 3–5")


DRILLS = {"load": drill_load, "kill": drill_kill, "disk-full": drill_disk_full, "read-only": drill_read_only, "disconnect": drill_disconnect}

if __name__ == "__main__":
    names = sys.argv[1:] or list(DRILLS)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for name in names:
            (Path(directory) / name).mkdir()
            rows.append(DRILLS[name](Path(directory) / name))
    print("| drill | result | figures |")
    print("|---|---|---|")
    for title, ok, figures in rows:
        print(f"| {title} | {'skipped' if ok is None else 'pass' if ok else 'FAIL'} | {figures} |")
    sys.exit(0 if all(ok is not False for _, ok, _ in rows) else 1)
