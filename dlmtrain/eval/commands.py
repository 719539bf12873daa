"""`dlmtrain eval` and `dlmtrain sample`: a trained checkpoint's likelihood bound and samples."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dlmtrain.errors import ConfigError


def _load(checkpoint: str, overrides: list[str], device: str, ema: bool):
    """A .ckpt or sharded checkpoint directory written by dlmtrain train, or an export directory
    (dlmtrain convert --to safetensors)."""
    from dlmtrain.checkpoint import load_checkpoint
    from dlmtrain.checkpoint.export import is_export_dir, load_pretrained, refuse_sharded
    from dlmtrain.checkpoint.files import MANIFEST

    p = Path(checkpoint)
    model_ov = [o for o in overrides if o.startswith("model.")]
    if p.is_dir():
        if is_export_dir(p):
            module = load_pretrained(p, map_location=device, overrides=model_ov)
            if not ema and module.weights == "ema":
                raise ConfigError(f"{checkpoint} holds the EMA weights only; --raw needs an export made with "
                                  "`dlmtrain convert ... --raw` (or the .ckpt)")
            return module
        if (p / MANIFEST).exists():  # a sharded checkpoint (strategy=fsdp|deepspeed_*): consolidated in memory
            return load_checkpoint(p, ema=ema, map_location=device, overrides=model_ov)
        refuse_sharded(p)  # DeepSpeed / DCP files without dlmtrain's manifest (not written by dlmtrain train)
        raise ConfigError(f"{checkpoint} is a directory but not an export directory; expected a Lightning .ckpt file "
                          "written by dlmtrain train (e.g. runs/NAME/checkpoints/last.ckpt) or a directory written by "
                          "`dlmtrain convert CKPT DIR --to safetensors`")
    return load_checkpoint(p, ema=ema, map_location=device, overrides=model_ov)


def _imported_without_data(module, data: str | None) -> bool:
    meta = getattr(module, "export_meta", None) or {}
    return not data and meta.get("source_format", "dlmtrain") != "dlmtrain" and not meta.get("data_known")


def _datamodule(module, data: str | None, overrides: list[str], micro: int):
    """The data the checkpoint was trained on (or --data): validation stream and tokenizer."""
    from omegaconf import OmegaConf

    from dlmtrain.config import _apply_dotted
    from dlmtrain.data import build_datamodule

    if _imported_without_data(module, data):
        raise ConfigError("this export was imported from another codebase and names no data of ours; pass --data "
                          "MANIFEST (prepared with the model's tokenizer)")
    cfg = OmegaConf.create(OmegaConf.to_container(module.cfg, resolve=True))
    if data:
        cfg.data.manifest = data
    cfg = _apply_dotted(cfg, [o for o in overrides if o.startswith("data.")])
    try:
        dm = build_datamodule(cfg, micro)
        if dm.vocab_size > int(module.cfg.model.vocab_size):
            raise ConfigError(f"the data's vocabulary ({dm.vocab_size}, {dm.manifest_url}) is larger than the model's "
                              f"({module.cfg.model.vocab_size}); pass --data with the model's tokenizer")
        return dm
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a DataError already has a good message
        from dlmtrain.errors import UserError

        if isinstance(e, UserError):
            raise type(e)(f"{e} (the data named by the checkpoint; pass --data MANIFEST to use other data)") from None
        raise


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device visible; use --device cpu")
    return name


# ----------------------------------------------------------------------------- eval


def add_eval_arguments(p) -> None:
    p.add_argument("checkpoint", help="a checkpoint written by dlmtrain train (.ckpt file or sharded directory), "
                   "or an export directory (dlmtrain convert)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. data.max_val_samples=512 model.attn_backend=sdpa")
    p.add_argument("--data", metavar="MANIFEST", help="evaluate on this manifest's validation split (default: the "
                   "data the checkpoint was trained on)")
    p.add_argument("--samples", type=int, default=4, metavar="K", help="noise draws per sequence (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="sequences per forward (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    p.add_argument("--max-batches", type=int, default=0, metavar="N", help="stop after N batches (0: all)")
    p.add_argument("--raw", action="store_true", help="the raw training weights instead of the EMA")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: %(default)s)")
    p.add_argument("--out", metavar="FILE.json", help="also write the figures as JSON")


def run_eval(args) -> int:
    from dlmtrain.eval.elbo import evaluate

    if args.samples < 1 or args.batch_size < 1:
        raise ConfigError("--samples and --batch-size must be >= 1")
    bad = [o for o in args.overrides if not o.startswith(("data.", "model.attn_backend"))]
    if bad:
        raise ConfigError(f"dlmtrain eval takes data.* and model.attn_backend overrides, not {bad[0]}")
    module = _load(args.checkpoint, args.overrides, _device(args.device), ema=not args.raw)
    dm = _datamodule(module, args.data, args.overrides, args.batch_size)
    res = evaluate(module, dm, num_samples=args.samples, seed=args.seed, tokenizer=dm.tokenizer,
                   t_bins=int(module.cfg.eval.t_bins), discrete_steps=int(module.cfg.eval.discrete_steps),
                   max_batches=args.max_batches or None, progress=sys.stderr.isatty())
    for key in ("nelbo", "ppl_bound", "bpt", "bpb"):  # the standard error including data sampling (see eval/elbo.py)
        if f"{key}_se" in res:
            res[f"{key}_stderr"] = res[f"{key}_se"]
    res.update(checkpoint=str(args.checkpoint), step=module.global_step_loaded, weights=module.weights,
               seed=args.seed, samples=args.samples, data=dm.manifest_url)
    rows = [("NELBO (nats/token)", "nelbo"), ("perplexity bound", "ppl_bound"), ("bits/token", "bpt"),
            ("bits/byte", "bpb")]
    print(f"{args.checkpoint} (step {res['step']}, {module.weights} weights): {int(res['sequences'])} sequences, "
          f"{int(res['tokens'])} tokens, {args.samples} noise draws each, seed {args.seed}")
    for label, key in rows:
        if key in res:
            se = res.get(f"{key}_stderr")
            print(f"  {label:<20} {res[key]:>10.4f}" + (f"  ± {se:.4f}" if se is not None else ""))
    if args.out:
        from dlmtrain.data.format import write_json_atomic

        write_json_atomic(args.out, res)
    return 0


# ----------------------------------------------------------------------------- sample


def add_sample_arguments(p) -> None:
    p.add_argument("checkpoint", help="a checkpoint written by dlmtrain train (.ckpt file or sharded directory), "
                   "or an export directory (dlmtrain convert)")
    p.add_argument("overrides", nargs="*", help="sampling.* settings, e.g. sampling.temperature=0.9 sampling.top_p=0.95")
    p.add_argument("--num", type=int, default=4, metavar="N", help="samples (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, metavar="K", help="sampler steps (default: sampling.steps)")
    p.add_argument("--sampler", default=None, help="ancestral | first_hitting | confidence | semi_ar; ar: "
                   "ancestral | greedy (default: sampling.sampler)")
    p.add_argument("--prompt", default=None, metavar="TEXT", help="every sample starts with this text")
    p.add_argument("--seq-len", type=int, default=0, metavar="L", help="tokens per sample, prompt included "
                   "(default: the training seq_len)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=0, metavar="B", help="samples drawn together (0: all)")
    p.add_argument("--data", metavar="MANIFEST", help="where the tokenizer is (default: an export's own tokenizer, "
                   "else the checkpoint's data)")
    p.add_argument("--raw", action="store_true", help="the raw training weights instead of the EMA")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", metavar="FILE.jsonl", help="also write one JSON object per sample")


def run_sample(args) -> int:
    from dlmtrain.config import _apply_dotted
    from dlmtrain.sampling import sample_from_config

    if args.num < 1:
        raise ConfigError("--num must be >= 1")
    bad = [o for o in args.overrides if not o.startswith(("sampling.", "data.", "model.attn_backend"))]
    if bad:
        raise ConfigError(f"dlmtrain sample takes sampling.* overrides, not {bad[0]}")
    module = _load(args.checkpoint, args.overrides, _device(args.device), ema=not args.raw)
    if getattr(module, "tokenizer", None) is not None and not args.data:  # an export carries its tokenizer
        tok, data_len = module.tokenizer, module.seq_len
    else:
        dm = _datamodule(module, args.data, args.overrides, 1)
        tok, data_len = dm.tokenizer, dm.seq_len
    sp = _apply_dotted(module.cfg, [o for o in args.overrides if o.startswith("sampling.")]).sampling
    if args.sampler:
        sp.sampler = args.sampler
    if args.steps is not None:
        if args.steps < 1:
            raise ConfigError("--steps must be >= 1")
        sp.steps = args.steps
    seq_len = args.seq_len or data_len
    if not seq_len:
        raise ConfigError(f"{args.checkpoint} records no sequence length; pass --seq-len L")
    prompt_ids = None
    if args.prompt is not None:
        prompt_ids = tok.encode(args.prompt)
        if len(prompt_ids) >= seq_len:
            raise ConfigError(f"--prompt is {len(prompt_ids)} tokens, not shorter than the sequence length {seq_len}; "
                              "shorten it or raise --seq-len")
    res = sample_from_config(module, sp, num_samples=args.num, seq_len=seq_len, seed=args.seed, tokenizer=tok,
                             prompt_ids=prompt_ids, batch_size=args.batch_size or None,
                             progress=sys.stderr.isatty())
    ids = res.ids.tolist()
    if prompt_ids is not None:  # the prompt verbatim, then the decoded continuation
        texts = [args.prompt + tok.decode(s[len(prompt_ids):]) for s in ids]
    else:
        texts = [tok.decode(s) for s in ids]
    per = res.seconds / max(1, args.num)
    for i, t in enumerate(texts):
        print(f"--- sample {i} ({sp.sampler}, {sp.steps} steps, {res.nfe} network evaluations) ---")
        print(t)
    print(f"--- {args.num} samples x {seq_len} tokens in {res.seconds:.2f} s ({res.tokens_per_s:,.0f} tokens/s, "
          f"NFE {res.nfe})")
    if args.out:
        tmp = Path(str(args.out) + ".tmp")
        with open(tmp, "w") as f:
            for s, t in zip(ids, texts):
                f.write(json.dumps({"text": t, "tokens": s, "sampler": sp.sampler, "steps": sp.steps,
                                    "nfe": res.nfe, "seconds": per}) + "\n")
        tmp.replace(args.out)
    return 0
