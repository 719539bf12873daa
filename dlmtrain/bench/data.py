"""`dlmtrain bench data`: how fast one loader worker turns shards into batches.

Measures the real per-worker code path (read shard whole, check its sha256 and size unless
``--no-verify``, parse tar, decode and check samples, block shuffle, batch, segment ids, int64
tensors) in this process, then the whole DataLoader with ``--num-workers`` processes. Without
``--manifest`` it writes a synthetic uint16 shard set at ``--seq-len`` into a temporary directory first.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from dlmtrain.errors import DataError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", default="", help="manifest.json to read (default: a synthetic uint16 set)")
    p.add_argument("--seq-len", type=int, default=1024, help="synthetic set: tokens per sample (default: %(default)s)")
    p.add_argument("--dtype", default="uint16", choices=["uint16", "uint32"], help="synthetic set: token dtype")
    p.add_argument("--shards", type=int, default=4, help="synthetic set: train shards (default: %(default)s)")
    p.add_argument("--samples-per-shard", type=int, default=2000, help="synthetic set: samples per shard")
    p.add_argument("--batch-size", type=int, default=32, help="micro batch size (default: %(default)s)")
    p.add_argument("--shuffle-buffer", type=int, default=1000, help="block-shuffle size (default: %(default)s)")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers for the second figure")
    p.add_argument("--seconds", type=float, default=5.0, help="time per measurement (default: %(default)s)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256/size check of each shard "
                   "(data.verify_checksums=false), to measure what the check costs")


def _measure(batches, seconds: float) -> tuple[int, int, float, float]:
    """(samples, tokens, wall s, CPU s of this process, helper threads included)."""
    it = iter(batches)
    next(it)  # warm-up: worker start, first shard open
    n_samples = n_tokens = 0
    t0, c0 = time.perf_counter(), time.process_time()
    while True:
        b = next(it)
        n_samples += b["input_ids"].shape[0]
        n_tokens += b["input_ids"].numel()
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return n_samples, n_tokens, dt, time.process_time() - c0


def run(args) -> int:
    from dlmtrain.data.datamodule import TrackedLoader
    from dlmtrain.data.format import read_manifest
    from dlmtrain.data.stream import ShardRef, StreamSpec, TrainStream
    from dlmtrain.data.format import join_url

    with tempfile.TemporaryDirectory(prefix="dlmtrain-bench-data-") as tmp:
        if args.manifest:
            path = args.manifest
        else:
            from dlmtrain.data.synthetic import write_synthetic

            t = time.perf_counter()
            path = str(write_synthetic(tmp, seq_len=args.seq_len, dtype=args.dtype, train_shards=args.shards,
                                       samples_per_shard=args.samples_per_shard, val_shards=0))
            print(f"synthetic set: {args.shards} shards x {args.samples_per_shard} samples of {args.seq_len} "
                  f"{args.dtype} tokens in {tmp} ({time.perf_counter() - t:.1f} s)")
        m = read_manifest(path)
        shards = [ShardRef(join_url(m["_where"], s["name"]), s["name"], int(s["samples"]), s.get("sha256") or "",
                           int(s.get("bytes") or 0)) for s in m["splits"]["train"]["shards"]]
        if not shards:
            raise DataError(f"{path} has no train shards")
        pad = m.get("pad_id") if m.get("pad_id") is not None else m["eos_id"]
        spec = StreamSpec(seq_len=int(m["seq_len"]), dtype=m["dtype"], vocab_size=int(m["vocab_size"]), pad_id=pad,
                          on_corrupt="fail", verify=not args.no_verify)
        L = spec.seq_len

        def stream(workers: int) -> TrainStream:
            return TrainStream(shards, spec, batch_size=args.batch_size, seed=0, buffer=args.shuffle_buffer,
                               rank=0, world=1, num_workers=workers)

        mb = sum(s.bytes for s in shards) / len(shards) / 1e6
        print(f"reading {path}: seq_len {L}, {m['dtype']}, batch {args.batch_size}, shuffle block "
              f"{args.shuffle_buffer}, shards of {mb:.1f} MB, sha256 {'not checked' if args.no_verify else 'checked'}")
        s, tok, dt, cpu = _measure(TrackedLoader(stream(1), batch_size=None, num_workers=0), args.seconds)
        # CPU time per token: the figure to compare on a machine shared with other work
        print(f"one worker (in process): {s / dt:,.0f} samples/s, {tok / dt:,.0f} tokens/s per worker, "
              f"{cpu / tok * 1e9:.1f} CPU-ms per 1M tokens")
        if args.num_workers > 0:
            loader = TrackedLoader(stream(args.num_workers), batch_size=None, num_workers=args.num_workers)
            s, tok, dt, _ = _measure(loader, args.seconds)
            print(f"DataLoader, {args.num_workers} workers: {s / dt:,.0f} samples/s, {tok / dt:,.0f} tokens/s total, "
                  f"{tok / dt / args.num_workers:,.0f} tokens/s per worker")
    return 0


if __name__ == "__main__":  # python -m dlmtrain.bench.data
    ap = argparse.ArgumentParser(description=__doc__)
    add_arguments(ap)
    raise SystemExit(run(ap.parse_args()))
