"""``sample()``: draw sequences from a trained module, no Trainer needed.

It checks the arguments, builds the conditioning, splits the samples into batches and
runs the objective's registered sampler under ``torch.inference_mode`` in eval mode with
the EMA weights swapped in when the module has an EMA (the training weights and the
previous train/eval mode are restored afterwards, also on errors). A module from
``dlmtrain.load_checkpoint`` already holds its EMA weights and has no ``ema`` attribute
set, so nothing is swapped there.

Randomness: batch b draws from generators keyed by (seed, b, place in the sampler), so the
same seed and batch_size give the same samples; another batch_size gives other samples.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from dlmtrain.errors import ConfigError
from dlmtrain.sampling.registry import Rng, SamplerOptions, get_sampler, supported_samplers

CONFIDENCES = ("max_prob", "margin", "neg_entropy")


@dataclass
class SampleResult:
    ids: torch.Tensor  # [N, L] long, on the CPU; conditioning tokens included
    text: list[str] | None  # tokenizer.decode of each row, when a tokenizer was given
    nfe: int  # network evaluations of one batch (the largest over batches); a CFG pair counts 2
    seconds: float  # wall time of the sampling loops, all batches
    tokens_per_s: float  # generated (free) positions per second
    nfe_per_batch: list[int] = field(default_factory=list)
    sampler: str = ""
    steps: int = 0

    @property
    def nfe_total(self) -> int:
        return sum(self.nfe_per_batch)


def _rows(x, n: int, name: str) -> torch.Tensor:
    """A list / 1-D / 2-D id sequence as [n, P] long."""
    t = torch.as_tensor(x, dtype=torch.long)
    if t.dim() == 1:
        t = t.unsqueeze(0).expand(n, -1)
    if t.dim() != 2 or t.shape[0] != n:
        raise ConfigError(f"{name} has shape {tuple(t.shape)}; pass one id sequence [P] or one per sample [{n}, P]")
    return t


def conditioning(n: int, L: int, prompt_ids=None, suffix_ids=None, fixed=None) -> torch.Tensor:
    """[n, L] long: the conditioning token at each position, -1 where the sampler is free."""
    out = torch.full((n, L), -1, dtype=torch.long)

    def put(pos: torch.Tensor, ids: torch.Tensor, name: str):
        if (ids < -1).any():
            raise ConfigError(f"{name} holds a negative id {ids.min().item()}; token ids are >= 0 (-1: free, in fixed)")
        cur = out[:, pos]
        clash = (cur >= 0) & (ids >= 0) & (cur != ids)
        if clash.any():
            r, c = clash.nonzero()[0].tolist()
            raise ConfigError(f"{name} sets position {pos[c].item()} of sample {r} to {ids[r, c].item()}, "
                              f"which another argument fixes to {cur[r, c].item()}; make them agree")
        out[:, pos] = torch.where(ids >= 0, ids, cur)

    n_prompt = 0
    if prompt_ids is not None:
        p = _rows(prompt_ids, n, "prompt_ids")
        n_prompt = p.shape[1]
        if n_prompt > L:
            raise ConfigError(f"prompt_ids has {n_prompt} tokens, more than seq_len={L}; shorten it or raise seq_len")
        put(torch.arange(n_prompt), p, "prompt_ids")
    if suffix_ids is not None:
        s = _rows(suffix_ids, n, "suffix_ids")
        if n_prompt + s.shape[1] > L:
            raise ConfigError(f"prompt_ids ({n_prompt}) and suffix_ids ({s.shape[1]}) together exceed seq_len={L}; "
                              "shorten them or raise seq_len")
        put(torch.arange(L - s.shape[1], L), s, "suffix_ids")
    if fixed is not None:
        if isinstance(fixed, dict):
            f = torch.full((L,), -1, dtype=torch.long)
            for pos, tok in fixed.items():
                if not 0 <= int(pos) < L:
                    raise ConfigError(f"fixed has position {pos}, outside 0..{L - 1}; use positions in the sequence")
                f[int(pos)] = int(tok)
        else:
            f = torch.as_tensor(fixed, dtype=torch.long)
        if f.shape[-1] != L:
            raise ConfigError(f"fixed has {f.shape[-1]} positions, not seq_len={L}; pass [L] or [{n}, L] with -1 "
                              "at free positions, or a dict position -> id")
        put(torch.arange(L), _rows(f, n, "fixed"), "fixed")
    return out


def _check(num_samples, seq_len, steps, temperature, top_k, top_p, cfg_scale, block_len, batch_size, confidence):
    try:
        ok = not isinstance(steps, bool) and int(steps) == steps >= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"steps={steps!r} must be an integer >= 1")
    if num_samples < 1 or seq_len < 1:
        raise ConfigError(f"num_samples={num_samples} and seq_len={seq_len} must be >= 1")
    if not temperature > 0:
        raise ConfigError(f"temperature={temperature} must be > 0 (for greedy decoding use top_k=1)")
    if top_k < 0 or not 0 < top_p <= 1:
        raise ConfigError(f"top_k={top_k} must be >= 0 (0: off) and top_p={top_p} in (0, 1] (1: off)")
    if cfg_scale < 0:
        raise ConfigError(f"cfg_scale={cfg_scale} must be >= 0 (0: no guidance)")
    if block_len < 1 or (batch_size is not None and batch_size < 1):
        raise ConfigError(f"block_len={block_len} and batch_size={batch_size} must be >= 1")
    if confidence not in CONFIDENCES:
        raise ConfigError(f"confidence={confidence!r} is not one of: {', '.join(CONFIDENCES)}")


def _device_of(module) -> torch.device:
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def sample(module, num_samples: int, seq_len: int, steps: int, sampler: str = "ancestral", prompt_ids=None,
           suffix_ids=None, fixed=None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
           float64: bool = True, cache: bool = True, confidence: str = "max_prob", block_len: int = 32,
           inner: str = "ancestral", cfg_scale: float = 0.0, clamp: bool = False, tokenizer=None,
           batch_size: int | None = None, device=None, progress: bool = False,
           stop_at_eos: bool = False) -> SampleResult:
    """Draw ``num_samples`` sequences of ``seq_len`` tokens with the objective's ``sampler``.

    Conditioning: ``prompt_ids`` fill the first positions, ``suffix_ids`` the last ones,
    ``fixed`` any positions ([L] or [N, L] ids with -1 where free, or a dict position -> id);
    each accepts one sequence for all samples or one per sample. What ``steps`` means per
    sampler, and the other knobs: dlmtrain/sampling/masked.py. ``cfg_scale`` w > 0 applies
    unsupervised classifier-free guidance (1 + w) cond - w uncond, where the unconditional
    pass sees the conditioning tokens masked (needs some conditioning). ``clamp``: the gaussian
    objective's clamping trick (dlmtrain/sampling/gaussian.py). ``batch_size``:
    samples drawn together (None: all). ``device``: where to run (None: the module's; the
    module is moved there and back). ``stop_at_eos``: stop once every row has drawn EOS, later
    positions set to EOS (samplers that generate left to right in blocks: bd3lm)."""
    _check(num_samples, seq_len, steps, temperature, top_k, top_p, cfg_scale, block_len, batch_size, confidence)
    fn = get_sampler(module, sampler)
    if stop_at_eos and not getattr(fn, "stops_at_eos", False):
        raise ConfigError(f"stop_at_eos is not supported by {type(module).__name__}'s {sampler} sampler "
                          "(it fills all positions at once); set stop_at_eos=false")
    if sampler == "semi_ar":
        allowed = [s for s in supported_samplers(module) if s != "semi_ar"]
        if inner not in allowed:
            raise ConfigError(f"inner={inner!r} cannot run inside semi_ar blocks; choose one of: {', '.join(allowed)}")
    fixed_all = conditioning(num_samples, seq_len, prompt_ids, suffix_ids, fixed)
    given = fixed_all[fixed_all >= 0]
    vocab = getattr(getattr(module, "backbone", None), "out_dim", None)
    mask_id = getattr(module, "mask_id", None)
    is_mask = given == (mask_id if mask_id is not None else -1)  # objectives without [MASK] (ar) have none
    if given.numel() and ((vocab is not None and given.max() >= vocab) or is_mask.any()):
        bad = given[is_mask | (given >= (vocab or given.max() + 1))][0].item()
        raise ConfigError(f"conditioning token id {bad} is [MASK] or outside the model's vocabulary "
                          f"({vocab if vocab is not None else '?'} ids, [MASK] = {mask_id}); "
                          "check the tokenizer the ids came from")
    if cfg_scale > 0 and given.numel() == 0:
        raise ConfigError("cfg_scale > 0 guides towards the conditioning, but no prompt_ids, suffix_ids or fixed "
                          "tokens were given; pass some or set cfg_scale=0")

    target = torch.device(device) if device is not None else _device_of(module)
    home = _device_of(module)
    bs = batch_size or num_samples
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"sampling ({sampler})", unit="nfe", leave=False)
    opts = SamplerOptions(steps=int(steps), temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                          float64=bool(float64), cache=bool(cache), confidence=confidence, block_len=int(block_len),
                          inner=inner, cfg_scale=float(cfg_scale), stop_at_eos=bool(stop_at_eos), clamp=bool(clamp),
                          on_nfe=bar.update if bar is not None else None)
    was_training = module.training
    ema = getattr(module, "ema", None)
    outs, nfes = [], []
    try:
        if target != home:
            module.to(target)
        module.eval()
        swap = ema.swapped_in(module.backbone) if ema is not None else contextlib.nullcontext()
        with swap, torch.inference_mode():
            t0 = time.perf_counter()
            for b, start in enumerate(range(0, num_samples, bs)):
                ids, nfe = fn(module, fixed_all[start:start + bs].to(target), opts, Rng(seed, b, target))
                outs.append(ids.cpu())
                nfes.append(int(nfe))
            if target.type == "cuda":
                torch.cuda.synchronize(target)
            seconds = time.perf_counter() - t0
    finally:
        module.train(was_training)
        if target != home:
            module.to(home)
        if bar is not None:
            bar.close()
    ids = torch.cat(outs)
    text = [tokenizer.decode(row.tolist()) for row in ids] if tokenizer is not None else None
    generated = int((fixed_all < 0).sum())
    return SampleResult(ids=ids, text=text, nfe=max(nfes), seconds=seconds,
                        tokens_per_s=generated / seconds if seconds > 0 else float("inf"),
                        nfe_per_batch=nfes, sampler=sampler, steps=int(steps))


_CONFIG_KEYS = ("sampler", "steps", "temperature", "top_k", "top_p", "float64", "cache", "confidence",
                "block_len", "inner", "cfg_scale", "stop_at_eos", "clamp")


def sample_from_config(module, cfg_sampling, num_samples: int, seq_len: int, **kwargs) -> SampleResult:
    """``sample()`` with the settings of a ``sampling:`` config section (SamplingConfig, a
    DictConfig or a dict); keyword arguments (prompt_ids, seed, tokenizer, steps, ...) win."""
    get = cfg_sampling.get if isinstance(cfg_sampling, dict) else lambda k, d=None: getattr(cfg_sampling, k, d)
    args = {k: get(k) for k in _CONFIG_KEYS if get(k) is not None}
    args.update(kwargs)
    steps = int(args.pop("steps", 128))
    return sample(module, num_samples, seq_len, steps, **args)
