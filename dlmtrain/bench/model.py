"""`dlmtrain bench model`: training throughput and MFU of the backbone alone.

Times forward + backward + AdamW step of the backbone with a cross-entropy loss on
random tokens (no data loading, no diffusion math), e.g.::

    dlmtrain bench model --size small --seq-len 1024 --batch-size 8
    python -m dlmtrain.bench.model --size tiny --seq-len 128 --device cpu --json

FLOPs per token follow :func:`dlmtrain.backbone.flops_per_token` (6 N + 12 n_layers
hidden seq_len); MFU = achieved / peak, with the peak from ``--peak-tflops`` or the
dense bf16 datasheet figure of a known GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from dlmtrain.errors import UserError

SIZES = ("tiny", "small", "medium", "1b")
# dense bf16 datasheet peaks, TFLOP/s (first match in the device name wins)
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=SIZES, default="tiny", help="configs/model/<size>.yaml")
    parser.add_argument("--vocab-size", type=int, default=50258)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                        help="autocast dtype (fp32 weights); auto: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--backend", choices=("auto", "sdpa", "flash"), default="auto", help="attention backend")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    parser.add_argument("--cond", action="store_true", help="build adaLN time conditioning and pass sigma")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak TFLOP/s for MFU (default: datasheet bf16 dense for known GPUs)")
    parser.add_argument("--fp32-matmul", choices=("highest", "high"), default="high",
                        help="torch.set_float32_matmul_precision: 'high' lets the float32 output head use TF32 on CUDA")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to torch; use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> int:
    from dlmtrain.backbone import Backbone, count_params, flops_per_token
    from dlmtrain.config import load_config

    if args.steps < 1 or args.warmup < 0 or args.seq_len < 1 or args.batch_size < 1:
        raise UserError("--steps, --seq-len and --batch-size must be >= 1 and --warmup >= 0")
    device = _device(args.device)
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    cfg = load_config(None, [f"model={args.size}", f"model.vocab_size={args.vocab_size}",
                             f"model.attn_backend={args.backend}"]).model
    V, B, L = args.vocab_size, args.batch_size, args.seq_len

    torch.set_float32_matmul_precision(args.fp32_matmul)
    torch.manual_seed(0)
    model = Backbone(cfg, V, use_cond=args.cond).to(device).train()
    n_params = count_params(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    fwd = torch.compile(model) if args.compile else model
    ids = torch.randint(0, V, (B, L), device=device)
    target = torch.randint(0, V, (B, L), device=device)
    sigma = torch.rand(B, device=device) if args.cond else None

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            logits = fwd(ids, sigma=sigma)
        loss = F.cross_entropy(logits.view(-1, V), target.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    elapsed = time.perf_counter() - t0

    name = _device_name(device)
    tokens_s = B * L * args.steps / elapsed
    tflops = flops_per_token(cfg, L, V) * tokens_s / 1e12
    peak = args.peak_tflops
    if peak is None:
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), 0.0) if dtype == "bf16" else 0.0
    result = {
        "device": name,
        "size": args.size,
        "params": n_params,
        "non_embedding_params": count_params(model, non_embedding=True),
        "batch_size": B,
        "seq_len": L,
        "dtype": dtype,
        "backend": args.backend,
        "compile": bool(args.compile),
        "cond": bool(args.cond),
        "fp32_matmul": args.fp32_matmul,
        "tokens_per_s": round(tokens_s, 1),
        "ms_per_step": round(1000 * elapsed / args.steps, 2),
        "tflops_per_s": round(tflops, 3),
    }
    if peak > 0:
        result["peak_tflops"] = peak
        result["mfu"] = round(tflops / peak, 4)
    if device.type == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:<22} {v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{k:<22} {v}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dlmtrain bench model", description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except UserError as e:
        print(f"error: {e}")
        return e.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
