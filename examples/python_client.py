#!/usr/bin/env python3
"""tokenwatch from Python: ingest an events file over gRPC and print the riskiest tokens.

Needs `pip install grpcio grpcio-tools` (and `pyarrow` for .parquet input). The gRPC stubs
are generated from proto/ at start, so the client always matches the server's contract.

    python3 examples/python_client.py --target 127.0.0.1:50051 --key "$KEY" \
        --events data/sample.csv [--limit 10]

The key needs the `ingest` and `read` roles (or `admin`); it may also come from the
TOKENWATCH_KEY environment variable. Events files follow ../shared/spec/events.md:
CSV or JSON Lines (optionally .gz) with a header / fields named as the contract, or Parquet.
"""
import argparse
import csv
import datetime as dt
import gzip
import importlib
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.join(HERE, "..", "proto")
PROTO = "tokenwatch/v1/tokenwatch.proto"


def load_stubs():
    """Compile proto/ into a temporary package and import it."""
    from grpc_tools import protoc
    import grpc_tools

    out = tempfile.mkdtemp(prefix="tokenwatch_pb_")
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(["protoc", f"-I{PROTO_ROOT}", f"-I{include}",
                      f"--python_out={out}", f"--grpc_python_out={out}", PROTO])
    if rc != 0:
        sys.exit(f"protoc failed on {PROTO} ({rc})")
    sys.path.insert(0, out)
    pb = importlib.import_module("tokenwatch.v1.tokenwatch_pb2")
    rpc = importlib.import_module("tokenwatch.v1.tokenwatch_pb2_grpc")
    return pb, rpc


def parse_ts(v):
    """Contract timestamps: RFC 3339 (UTC offset) or integer epoch milliseconds."""
    if isinstance(v, (int, float)):
        return int(v)
    if isinstance(v, dt.datetime):
        if v.tzinfo is None:
            v = v.replace(tzinfo=dt.timezone.utc)
        return int(v.timestamp() * 1000)
    s = str(v).strip()
    if s.lstrip("-").isdigit():
        return int(s)
    t = dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return int(t.timestamp() * 1000)


def rows(path):
    """Yield dicts of contract fields from CSV, JSON Lines (.gz too) or Parquet."""
    opener = gzip.open if path.endswith(".gz") else open
    base = path[:-3] if path.endswith(".gz") else path
    if base.endswith(".parquet"):
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=10_000):
            yield from batch.to_pylist()
    elif base.endswith(".csv"):
        with opener(path, "rt", newline="") as f:
            yield from csv.DictReader(f)
    else:
        with opener(path, "rt") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)


def to_event(pb, r):
    """One contract row as a proto Event. Values the server must judge are passed as they
    are (a bad value comes back as an EventError with its index), except for a type that
    cannot be carried at all, which is raised here."""
    def text(k):
        v = r.get(k)
        return "" if v is None else str(v)

    def opt_num(k, conv):
        v = r.get(k)
        return None if v in (None, "") else conv(v)

    ev = pb.Event(
        ts_ms=parse_ts(r["ts"]),
        token_id=text("token_id"),
        method=text("method"),
        endpoint=text("endpoint"),
        status=int(float(r.get("status") or 0)),
        bytes_out=int(float(r.get("bytes_out") or 0)),
        src_ip=text("src_ip"),
        country=text("country"),
        user_agent=text("user_agent"),
        scope=text("scope"),
        env=text("env"),
    )
    lat = opt_num("latency_ms", float)
    if lat is not None:
        ev.latency_ms = lat
    asn = opt_num("asn", lambda v: int(float(v)))
    if asn is not None:
        ev.asn = asn
    return ev


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="127.0.0.1:50051")
    ap.add_argument("--key", default=os.environ.get("TOKENWATCH_KEY"))
    ap.add_argument("--events", required=True, help="CSV, JSON Lines (.gz) or Parquet file")
    ap.add_argument("--batch", type=int, default=1000, help="events per IngestRequest")
    ap.add_argument("--limit", type=int, default=10, help="riskiest tokens to print")
    a = ap.parse_args()

    import grpc

    pb, rpc = load_stubs()
    meta = [("authorization", f"Bearer {a.key}")] if a.key else []
    with grpc.insecure_channel(a.target) as ch:
        stub = rpc.TokenWatchStub(ch)
        skipped = []

        def requests():
            batch = []
            for i, r in enumerate(rows(a.events)):
                try:
                    batch.append(to_event(pb, r))
                except (KeyError, ValueError, TypeError) as e:
                    # Not representable in the proto at all (e.g. ts missing): say where.
                    skipped.append(f"{a.events}: row {i + 1}: {e!r}")
                    continue
                if len(batch) == a.batch:
                    yield pb.IngestRequest(events=batch)
                    batch = []
            if batch:
                yield pb.IngestRequest(events=batch)

        try:
            resp = stub.Ingest(requests(), metadata=meta)
        except grpc.RpcError as e:
            sys.exit(f"Ingest failed: {e.code().name}: {e.details()}")
        print(f"ingested {a.events}: {resp.accepted} accepted, {resp.rejected} rejected")
        for e in resp.errors[:10]:
            print(f"  event {e.index}: {e.field}: {e.reason}")
        for s in skipped[:10]:
            print(f"  not sent: {s}")

        try:
            risky = stub.ListRiskyTokens(pb.ListRiskyTokensRequest(limit=a.limit), metadata=meta)
        except grpc.RpcError as e:
            sys.exit(f"ListRiskyTokens failed: {e.code().name}: {e.details()}")
        print(f"riskiest {len(risky.tokens)} tokens:")
        for t in risky.tokens:
            start = dt.datetime.fromtimestamp(t.window_start_ms / 1000, dt.timezone.utc)
            print(f"  {t.token_id:<24} risk {t.risk:5.1f}  window {start:%Y-%m-%dT%H:%MZ}"
                  f"  {'ALERT' if t.alert else ''}")
            for c in t.contributions[:3]:
                print(f"      {c.signal:<20} +{c.score:5.2f}  {c.reason}")


if __name__ == "__main__":
    main()
