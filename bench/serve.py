"""Closed-loop load against ``learnledger serve`` and, in the same run, a bare echo server.

Usage: ``python bench/serve.py [--seconds 5] [--json]`` with ``LEARNLEDGER_DATABASE_URL``
(and optionally ``LEARNLEDGER_SCHEMA``) pointing at PostgreSQL; the embedded server is
used otherwise. Reports RPS (and rows/s), p50/p99 latency, and for unary Predict the
ratio to the echo server, which answers the same messages without doing anything.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from learnledger.v1 import ledger_pb2 as pb  # noqa: E402
from learnledger.v1 import ledger_pb2_grpc as pb_grpc  # noqa: E402

N_FEATURES = 8


class EchoServicer(pb_grpc.LedgerServicer):
    """Answers Predict with a constant reply: the cost of gRPC alone."""

    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        """Echo."""
        return pb.PredictResponse(prediction_id=request.prediction_id, score=0.5, model_version=1,
                                  params_digest="sha256:echo")


def run_echo_server() -> None:
    """``--echo-server``: serve the echo on a free port; print it; run until killed."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=128))
    pb_grpc.add_LedgerServicer_to_server(EchoServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


def spawn(argv: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    """Start a server process and read its address from stdout."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    assert proc.stdout is not None
    for line in proc.stdout:
        match = re.search(r"listening on (\S+)", line)
        if match:
            return proc, match.group(1)
    raise RuntimeError(f"{argv} did not start")


def closed_loop(call: Callable[[int], int], in_flight: int, seconds: float) -> dict[str, float]:
    """``in_flight`` threads each calling back to back; returns calls/s, rows/s, p50, p99 (ms)."""
    latencies: list[list[float]] = [[] for _ in range(in_flight)]
    rows = [0] * in_flight
    stop = time.perf_counter() + seconds

    def worker(k: int) -> None:
        i = 0
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            rows[k] += call(k * 1_000_000 + i)
            latencies[k].append(time.perf_counter() - t0)
            i += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(in_flight)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    flat = sorted(x for lat in latencies for x in lat)
    return {
        "rps": len(flat) / elapsed,
        "rows_per_s": sum(rows) / elapsed,
        "p50_ms": 1000 * flat[len(flat) // 2] if flat else 0.0,
        "p99_ms": 1000 * flat[int(len(flat) * 0.99)] if flat else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.echo_server:
        run_echo_server()
        return 0
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    serve, address = spawn([sys.executable, "-m", "server.cli", "serve", "--port", "0"], env)
    echo, echo_address = spawn([sys.executable, str(Path(__file__).resolve()), "--echo-server"], env)
    results: list[dict[str, Any]] = []
    try:
        channel = grpc.insecure_channel(address)
        stub = pb_grpc.LedgerStub(channel)
        echo_stub = pb_grpc.LedgerStub(grpc.insecure_channel(echo_address))
        model = f"bench{int(time.time())}"
        stub.RegisterModel(pb.RegisterModelRequest(
            name=model, spec=pb.LearnerSpec(kind="logistic", n_features=N_FEATURES, batch_size=256)))
        features = [0.1 * i for i in range(N_FEATURES)]

        def predict_on(s: pb_grpc.LedgerStub) -> Callable[[int], int]:
            def call(i: int) -> int:
                s.Predict(pb.PredictRequest(model=model, features=features, prediction_id=f"p-{time.time_ns()}-{i}"))
                return 1
            return call

        for in_flight in (1, 8, 64):
            echo_row = closed_loop(predict_on(echo_stub), in_flight, args.seconds)
            row = closed_loop(predict_on(stub), in_flight, args.seconds)
            results.append({"load": f"Predict x{in_flight}", **row, "echo_rps": echo_row["rps"],
                            "ratio": row["rps"] / echo_row["rps"]})

        batch_rows = [pb.PredictRow(features=features) for _ in range(256)]
        made: list[str] = []
        made_lock = threading.Lock()

        def predict_batch(i: int) -> int:
            reply = stub.PredictBatch(pb.PredictBatchRequest(model=model, rows=batch_rows))
            if len(made) < 400_000:
                with made_lock:
                    made.extend(r.prediction_id for r in reply.results)
            return len(reply.results)

        for in_flight in (1, 8):
            results.append({"load": f"PredictBatch 256 x{in_flight}", **closed_loop(predict_batch, in_flight,
                                                                                      args.seconds)})

        # FeedbackBatchStream: fixed work (every label once), timed as a whole.
        streams = 4
        per_stream = min(len(made) // streams, 32_768)
        spans: list[float] = []

        def feedback_stream(k: int) -> None:
            ids = made[k * per_stream : (k + 1) * per_stream]
            messages = (pb.FeedbackBatch(items=[pb.FeedbackRequest(prediction_id=p, label=float(j % 2))
                                                for j, p in enumerate(ids[m : m + 256])])
                        for m in range(0, len(ids), 256))
            t0 = time.perf_counter()
            stub.FeedbackBatchStream(messages)
            spans.append(time.perf_counter() - t0)

        started = time.perf_counter()
        workers = [threading.Thread(target=feedback_stream, args=(k,)) for k in range(streams)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        elapsed = time.perf_counter() - started
        results.append({"load": f"FeedbackBatchStream 256/msg x{streams}", "rps": streams / elapsed,
                        "rows_per_s": streams * per_stream / elapsed, "p50_ms": 1000 * sorted(spans)[len(spans) // 2],
                        "p99_ms": 1000 * max(spans)})
    finally:
        serve.terminate()
        serve.wait(60)
        echo.kill()
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{'load':<32}{'calls/s':>10}{'rows/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'echo/s':>9}{'ratio':>7}")
        for r in results:
            print(f"{r['load']:<32}{r['rps']:>10.0f}{r['rows_per_s']:>10.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
                  f"{r.get('echo_rps', 0):>9.0f}{r.get('ratio', 0):>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
