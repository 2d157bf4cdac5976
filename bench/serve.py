"""Closed-loop load against ``learnledger serve`` and, in the same run, a bare echo server.

Usage: ``python bench/serve.py [--seconds 5] [--json]`` with ``LEARNLEDGER_DATABASE_URL``
(and optionally ``LEARNLEDGER_SCHEMA``) pointing at PostgreSQL; the embedded server is
used otherwise. Reports RPS (and rows/s), p50/p99 latency, and for unary Predict and the
feedback streams the ratio to the echo server, which answers the same messages (or
counts the same labels) without doing anything.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from learnledger.v1 import ledger_pb2 as pb  # noqa: E402
from learnledger.v1 import ledger_pb2_grpc as pb_grpc  # noqa: E402

N_FEATURES = 8
MAX_LABELS = 400_000


class EchoServicer(pb_grpc.LedgerServicer):
    """Answers Predict with a constant reply, and counts streamed labels: the cost of gRPC alone."""

    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        """Echo."""
        return pb.PredictResponse(
            prediction_id=request.prediction_id, score=0.5, model_version=1, params_digest="sha256:echo"
        )

    def FeedbackStream(self, request_iterator: Any, context: grpc.ServicerContext) -> pb.FeedbackSummary:
        """Count the labels, one per message."""
        return pb.FeedbackSummary(accepted=sum(1 for _ in request_iterator))

    def FeedbackBatchStream(self, request_iterator: Any, context: grpc.ServicerContext) -> pb.FeedbackSummary:
        """Count the labels, many per message."""
        return pb.FeedbackSummary(accepted=sum(len(m.items) for m in request_iterator))


def feedback_run(meter: Any, target: Any, kind: str, messages: list[list[Any]], expected: int) -> dict[str, Any]:
    """Send each list of messages on its own stream, all at once; time the whole and check every label counted."""
    spans: list[float] = []
    summaries: list[pb.FeedbackSummary] = []
    call = target.FeedbackBatchStream if kind == "batch" else target.FeedbackStream

    def one_stream(stream: list[Any]) -> None:
        t0 = time.perf_counter()
        summaries.append(call(iter(stream)))
        spans.append(time.perf_counter() - t0)

    reading = meter.start()
    workers = [threading.Thread(target=one_stream, args=(stream,)) for stream in messages]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    cpu = meter.since(reading)
    elapsed = time.perf_counter() - reading[0]
    accepted = sum(x.accepted + x.late for x in summaries)
    if accepted != expected:
        raise RuntimeError(f"{expected} labels sent, {accepted} accepted: {summaries}")
    return {"elapsed": elapsed, "spans": spans, "accepted": accepted, **cpu}


def run_echo_server() -> None:
    """``--echo-server``: serve the echo on a free port; print it; run until killed."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=128))
    pb_grpc.add_LedgerServicer_to_server(EchoServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


def spawn(argv: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    """Start a server process and read its address from stdout (its stderr goes to a temp file)."""
    log = tempfile.NamedTemporaryFile(prefix="bench-serve-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT)
    assert proc.stdout is not None
    for line in proc.stdout:
        match = re.search(r"listening on (\S+)", line)
        if match:
            return proc, match.group(1)
    tail = Path(log.name).read_text(errors="replace")[-2000:]
    raise RuntimeError(f"{argv} did not start; its log ({log.name}) ends:\n{tail}")


class CpuMeter:
    """CPU time (in cores) used by this client process and by the server processes."""

    def __init__(self, pids: dict[str, int]):
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}

    def start(self) -> tuple[float, float, dict[str, float]]:
        """A reading: wall clock, this process's CPU, every server's CPU."""
        return time.perf_counter(), time.process_time(), {n: _cpu(p) for n, p in self.procs.items()}

    def since(self, reading: tuple[float, float, dict[str, float]]) -> dict[str, float]:
        """Cores used since ``reading``: ``client_cpu`` and ``<name>_cpu`` per server."""
        wall, client, servers = reading
        elapsed = time.perf_counter() - wall
        out = {"client_cpu": (time.process_time() - client) / elapsed}
        for name, proc in self.procs.items():
            out[f"{name}_cpu"] = (_cpu(proc) - servers[name]) / elapsed
        return out


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def closed_loop(
    start_call: Callable[[int], Any], count: Callable[[Any], int], in_flight: int, seconds: float
) -> dict[str, float]:
    """``in_flight`` calls outstanding at all times for ``seconds``; calls/s, rows/s, p50, p99 (ms).

    Each completion starts the next call from gRPC's callback, so the client spends no
    thread per call in flight (64 blocking threads cost the client ~3x the CPU, taken
    from the same two cores as the server).
    """
    latencies: list[list[float]] = [[] for _ in range(in_flight)]
    rows = [0] * in_flight
    errors: list[BaseException] = []
    remaining = [in_flight]
    lock = threading.Lock()
    finished = threading.Event()
    stop = time.perf_counter() + seconds

    def launch(k: int, i: int) -> None:
        t0 = time.perf_counter()
        future = start_call(k * 1_000_000 + i)

        def done(f: Any) -> None:
            now = time.perf_counter()
            try:
                rows[k] += count(f.result())
                latencies[k].append(now - t0)
            except BaseException as exc:  # report, do not hang
                errors.append(exc)
                now = stop
            if now < stop:
                launch(k, i + 1)
                return
            with lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    finished.set()

        future.add_done_callback(done)

    started = time.perf_counter()
    for k in range(in_flight):
        launch(k, 0)
    finished.wait()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} calls failed, first: {errors[0]!r}")
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
    parser.add_argument("--repeat", type=int, default=1, help="run every configuration this many times")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--only",
        choices=("predict", "batch", "feedback"),
        action="append",
        help="run only these tables (repeatable; default: all; feedback needs batch for its ids)",
    )
    parser.add_argument(
        "--in-flight", type=int, action="append", help="unary Predict concurrency (repeatable; default: 1, 8, 64)"
    )
    parser.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    only = set(args.only or ("predict", "batch", "feedback"))
    if "feedback" in only:
        only.add("batch")  # the labels are for the predictions PredictBatch made
    if args.echo_server:
        run_echo_server()
        return 0
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    serve, address = spawn([sys.executable, "-m", "server.cli", "serve", "--port", "0"], env)
    echo, echo_address = spawn([sys.executable, str(Path(__file__).resolve()), "--echo-server"], env)
    meter = CpuMeter({"server": serve.pid, "echo": echo.pid})
    results: list[dict[str, Any]] = []
    try:
        options = [("grpc.max_receive_message_length", 16 * 1024 * 1024)]
        stub = pb_grpc.LedgerStub(grpc.insecure_channel(address, options=options))
        echo_stub = pb_grpc.LedgerStub(grpc.insecure_channel(echo_address, options=options))
        model = f"bench{int(time.time())}"
        stub.RegisterModel(
            pb.RegisterModelRequest(
                name=model, spec=pb.LearnerSpec(kind="logistic", n_features=N_FEATURES, batch_size=256)
            )
        )
        features = [0.1 * i for i in range(N_FEATURES)]

        def predict_on(s: pb_grpc.LedgerStub) -> Callable[[int], Any]:
            def call(i: int) -> Any:
                return s.Predict.future(
                    pb.PredictRequest(model=model, features=features, prediction_id=f"p-{time.time_ns()}-{i}")
                )

            return call

        one = lambda _reply: 1  # noqa: E731
        for in_flight in (args.in_flight or (1, 8, 64)) if "predict" in only else ():
            for _ in range(args.repeat):
                reading = meter.start()
                echo_row = closed_loop(predict_on(echo_stub), one, in_flight, args.seconds)
                echo_cpu = meter.since(reading)
                reading = meter.start()
                row = closed_loop(predict_on(stub), one, in_flight, args.seconds)
                cpu = meter.since(reading)
                results.append(
                    {
                        "load": f"Predict x{in_flight}",
                        **row,
                        "echo_rps": echo_row["rps"],
                        "ratio": row["rps"] / echo_row["rps"],
                        "server_cpu": cpu["server_cpu"],
                        "client_cpu": cpu["client_cpu"],
                        "echo_cpu": echo_cpu["echo_cpu"],
                        "echo_client_cpu": echo_cpu["client_cpu"],
                        "loadavg": os.getloadavg()[0],
                    }
                )

        batch = pb.PredictBatchRequest(model=model, rows=[pb.PredictRow(features=features) for _ in range(256)])
        made: list[str] = []

        def predict_batch(i: int) -> Any:
            return stub.PredictBatch.future(batch)

        def keep_ids(reply: pb.PredictBatchResponse) -> int:
            if len(made) < MAX_LABELS:
                made.extend([r.prediction_id for r in reply.results])
            return len(reply.results)

        for in_flight in (1, 8) if "batch" in only else ():
            for _ in range(args.repeat):
                reading = meter.start()
                row = closed_loop(predict_batch, keep_ids, in_flight, args.seconds)
                cpu = meter.since(reading)
                results.append(
                    {
                        "load": f"PredictBatch 256 x{in_flight}",
                        **row,
                        "server_cpu": cpu["server_cpu"],
                        "client_cpu": cpu["client_cpu"],
                        "loadavg": os.getloadavg()[0],
                    }
                )

        # FeedbackBatchStream (256 labels a message) and FeedbackStream (one label a
        # message, the RPC the issue names): fixed work (every label once), timed as a
        # whole; the messages are built before the clock starts (the client must not
        # starve the server). Each run labels its own predictions.
        streams = 4
        per_round = min(len(made) // (streams * args.repeat * 2), 32_768)
        runs = [(kind, r) for kind in ("batch", "single") for r in range(args.repeat if "feedback" in only else 0)]
        for n, (kind, _) in enumerate(runs):
            # One label a message is slower: fewer labels keep its run within seconds.
            size = per_round if kind == "batch" else min(per_round, 8_192)
            messages: list[list[Any]] = []
            for k in range(streams):
                ids = made[(n * streams + k) * per_round : (n * streams + k) * per_round + size]
                requests = [pb.FeedbackRequest(prediction_id=p, label=float(j % 2)) for j, p in enumerate(ids)]
                if kind == "batch":
                    messages.append([pb.FeedbackBatch(items=requests[m : m + 256]) for m in range(0, len(ids), 256)])
                else:
                    messages.append(requests)

            # The echo first: it only counts, so the same messages can be sent to the server after.
            echo_run = feedback_run(meter, echo_stub, kind, messages, streams * size)
            ours = feedback_run(meter, stub, kind, messages, streams * size)
            results.append(
                {
                    "load": f"FeedbackBatchStream 256/msg x{streams}"
                    if kind == "batch"
                    else f"FeedbackStream x{streams}",
                    "rps": streams / ours["elapsed"],
                    "rows_per_s": ours["accepted"] / ours["elapsed"],
                    "p50_ms": 1000 * sorted(ours["spans"])[len(ours["spans"]) // 2],
                    "p99_ms": 1000 * max(ours["spans"]),
                    "echo_rps": echo_run["accepted"] / echo_run["elapsed"],
                    "ratio": (ours["accepted"] / ours["elapsed"]) / (echo_run["accepted"] / echo_run["elapsed"]),
                    "server_cpu": ours["server_cpu"],
                    "client_cpu": ours["client_cpu"],
                    "echo_cpu": echo_run["echo_cpu"],
                    "echo_client_cpu": echo_run["client_cpu"],
                    "loadavg": os.getloadavg()[0],
                }
            )
    finally:
        serve.terminate()
        serve.wait(60)
        echo.kill()
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(
            f"{'load':<32}{'calls/s':>9}{'rows/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'echo/s':>8}{'ratio':>6}"
            f"{'srv cpu':>8}{'cli cpu':>8}{'echo cpu':>9}{'e.cli':>6}{'load':>6}"
        )
        for row in results:
            print(
                f"{row['load']:<32}{row['rps']:>9.0f}{row['rows_per_s']:>9.0f}{row['p50_ms']:>8.2f}"
                f"{row['p99_ms']:>8.2f}{row.get('echo_rps', 0):>8.0f}{row.get('ratio', 0):>6.2f}"
                f"{row['server_cpu']:>8.2f}{row['client_cpu']:>8.2f}{row.get('echo_cpu', 0):>9.2f}"
                f"{row.get('echo_client_cpu', 0):>6.2f}{row['loadavg']:>6.1f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
