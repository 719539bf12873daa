"""dlmtrain vs kuleshov-group/mdlm, side by side in one process: training step and sampling.

    python benchmarks/mdlm_side_by_side.py --mdlm PATH [--hidden 768 --layers 12 --heads 12 --seq-len 1024
        --vocab 50258 --batch 16 --steps 10 --warmup 3] [--compile both|on|off] [--what train sample]
        [--sample-num 64 --sample-len 1024 --sample-steps 128 --sample-batch 0] [--threads N] [--out FILE.json]

PATH is a checkout of github.com/kuleshov-group/mdlm (its commit is read with git, or given with
--mdlm-commit for a copy without .git). Their code is imported from it at run time and never copied here. Their models/dit.py imports flash_attn, which cannot be installed on our GPU machines:
this script registers its own stand-in modules in sys.modules while importing their files
(``flash_attn.flash_attn_interface.flash_attn_varlen_qkvpacked_func``: SDPA per sequence;
``flash_attn.layers.rotary.apply_rotary_emb_qkv_``: rotate-half rotary on q and k, written from
flash-attn's documented semantics). Other packages their diffusion.py imports at module level but that
the timed code never calls (hydra, datasets, timm, their dataloader.py, models/dimamba.py, ...) are
stubbed only when they are not installed; einops, when missing, gets a reshape-only ``rearrange``
(their three patterns only regroup axes). Before timing, a check on CPU float32 compares their DiT
(stand-ins included, every weight random) with the same weights imported into our backbone by
dlmtrain.checkpoint.mdlm (max |logit difference|; it fails the run above 1e-4).

Same device and dtype for both: CUDA with bf16 autocast (fp32 weights, like Lightning's bf16-mixed)
when available, else CPU float32. Dimensions default to their ``small`` (configs/model/small.yaml):
768 wide, 12 layers, 12 heads, cond_dim 128, seq_len 1024, vocabulary 50258 (GPT-2 + [MASK]).

Training step (tokens/s over --steps timed steps after --warmup, device synchronised once at the end):

- ``mdlm``: their ``Diffusion._loss`` (diffusion.py: antithetic t, log-linear noise, q_xt, their
  ``forward`` with the SUBS parameterization over full [B, L, V] logits, the continuous-time weight,
  their ``print_nans`` check) called on a ``Diffusion`` built without its ``__init__`` (which
  downloads tokenizers) and given the attributes that code reads; then, as their Lightning setup does
  (configs/config.yaml: precision bf16, gradient_clip_val 1.0, optim AdamW lr 3e-4 wd 0, EMA 0.9999):
  their ``training_step``'s ``loss.item()`` (its log call), backward, ``clip_grad_norm_`` 1.0, AdamW
  (torch defaults: foreach), a constant LR schedule, zero_grad, their ``models/ema.py`` update.
  Their model's dropout is their ``small`` config's 0.1 unless ``--their-dropout`` says otherwise;
  ours trains with the same dropout (like for like).
  Their code is run eager (their repo does not compile; their jit-scripted helpers stay scripted).
- ``dlmtrain``: ``configs/model/mdlm_dit.yaml`` at the same sizes, objective mdlm (loglinear, eps
  1e-3, antithetic, no time conditioning; adaLN on sigma = 0 as theirs), our module's own
  ``training_step`` under autocast, backward, ``clip_grad_norm_`` (optim.grad_clip 1.0), the module's
  ``configure_optimizers`` (AdamW foreach + LambdaLR), zero_grad, our EMA update: what Lightning runs
  in ``dlmtrain train`` (``dlmtrain bench train`` times the same step inside a Trainer, with data
  loading). With and without ``objective.masked_head``, with ``trainer.compile`` off/on (each
  transformer block compiled, dlmtrain/distributed/parallelize.py).

FLOPs/token: dlmtrain.backbone.flops_per_token (6 N_matmul + 12 n_layers hidden seq_len, full output
head counted) for both models (identical for the two architectures). MFU = that x tokens/s / peak
(dense bf16 datasheet, dlmtrain.bench.model.PEAK_BF16_TFLOPS, or --peak-tflops; none on CPU). HFU
counts the FLOPs executed: with the masked head, the head's 6 hidden V per token runs only at the
masked share f of positions (f counted from the network's inputs during the timed steps), so
HFU = (flops_per_token - 6 hidden V (1 - f)) x tokens/s / peak. Peak memory: CUDA
max_memory_allocated over the timed steps (reset after the warm-up); null on CPU.

Sampling (generated tokens/s and NFE = network calls, counted by a hook on the network; one untimed
warm-up call first): their real ``Diffusion._sample`` with ``sampling.predictor=ddpm_cache`` and
noise_removal (their default) at --sample-steps (their float32 Gumbel draws), vs our
``dlmtrain.sampling.sample`` ``ancestral`` (cache=True) and ``first_hitting``, with masked_head on
and off, same steps. Random weights: speed only, not sample quality. --sample-batch splits the samples
into calls of that many (their eval loop's eval_batch_size; our sample(batch_size=...)); NFE is then
the network calls of all of them together, for both.

A measurement that runs out of CUDA memory is reported as that row's error; the others still run.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import itertools
import json
import math
import platform
import re
import subprocess
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's dlmtrain, not an installed one

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# ----------------------------------------------------------------------------- flash_attn stand-in


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """flash-attn's varlen packed attention: qkv [total, 3, H, D] holding the sequences
    cu_seqlens[i]:cu_seqlens[i+1] one after another; returns [total, H, D], each sequence attending only
    to itself. When total == n_seqs * max_seqlen every sequence has length max_seqlen (their DiT's only
    case) and one batched SDPA call runs without a host sync; otherwise one SDPA call per sequence."""
    if return_attn_probs or alibi_slopes is not None or tuple(window_size) != (-1, -1):
        raise NotImplementedError("the flash_attn stand-in supports the plain call only")
    total, _, H, D = qkv.shape
    n = cu_seqlens.numel() - 1
    if total == n * max_seqlen:
        q, k, v = qkv.reshape(n, max_seqlen, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)  # [n, H, L, D]
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=softmax_scale)
        return y.transpose(1, 2).reshape(total, H, D)
    outs = []
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        q, k, v = qkv[a:b].permute(1, 2, 0, 3).unbind(0)  # [H, l, D]
        outs.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal,
                                                   scale=softmax_scale).transpose(0, 1))
    return torch.cat(outs, 0)


def apply_rotary_emb_qkv_(qkv, cos, sin, cos_k=None, sin_k=None, interleaved=False, seqlen_offsets=0,
                          num_heads_q=None):
    """flash-attn's rotary on packed qkv [B, L, 3, H, D], non-interleaved (GPT-NeoX rotate-half): for the
    first rotary_dim = 2 cos.shape[-1] features of q and k, (x1, x2) = halves, out = (x1 cos - x2 sin,
    x2 cos + x1 sin) with cos, sin [seqlen, rotary_dim / 2]; v unchanged. flash-attn writes in place and
    returns qkv; this returns a new tensor (their DiT uses the return value), computed in (at least) float32."""
    if interleaved or num_heads_q is not None or qkv.dim() != 5 or not (isinstance(seqlen_offsets, int)
                                                                         and seqlen_offsets == 0):
        raise NotImplementedError("the flash_attn rotary stand-in supports the plain packed call only")
    L = qkv.shape[1]
    half = cos.shape[-1]
    rd = 2 * half

    def rot(x, c, s):
        f = torch.promote_types(x.dtype, torch.float32)
        c, s = c[:L, None, :].to(f), s[:L, None, :].to(f)  # [L, 1, rd/2] against [B, L, H, rd/2]
        x1, x2 = x[..., :half].to(f), x[..., half:rd].to(f)
        y = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1).to(x.dtype)
        return torch.cat([y, x[..., rd:]], -1) if rd < x.shape[-1] else y

    q = rot(qkv[:, :, 0], cos, sin)
    k = rot(qkv[:, :, 1], cos if cos_k is None else cos_k, sin if sin_k is None else sin_k)
    return torch.stack([q, k, qkv[:, :, 2]], 2)


def rearrange(x, pattern: str, **sizes):
    """einops.rearrange for the patterns that only regroup axes in order (a reshape), e.g. their
    'b s (three h d) -> b s three h d', 'b s ... -> (b s) ...', '(b s) h d -> b s (h d)'. Used only when
    einops is not installed."""
    def parse(side):
        toks = []
        for m in re.finditer(r"\([^)]*\)|\.\.\.|\w+", side):
            t = m.group(0)
            toks.append(t[1:-1].split() if t.startswith("(") else [t])
        return toks

    left, right = (parse(part) for part in pattern.split("->"))
    if [n for g in left for n in g] != [n for g in right for n in g]:
        raise NotImplementedError(f"the einops stand-in does not transpose: {pattern}")
    known, ell, dim = dict(sizes), [], 0
    n_ell = x.dim() - (len(left) - 1) if ["..."] in left else 0
    for g in left:
        if g == ["..."]:
            ell = list(x.shape[dim:dim + n_ell])
            dim += n_ell
            continue
        free = [n for n in g if n not in known]
        rest = math.prod(known[n] for n in g if n in known)
        if len(free) > 1:
            raise ValueError(f"einops stand-in: cannot infer {free} in {pattern}")
        if free:
            known[free[0]] = x.shape[dim] // rest
        dim += 1
    shape = []
    for g in right:
        if g == ["..."]:
            shape += ell
        else:
            shape.append(math.prod(known[n] for n in g))
    return x.reshape(shape)


def _standin_modules() -> dict:
    fa = types.ModuleType("flash_attn")
    fa.__doc__ = "dlmtrain benchmarks/mdlm_side_by_side.py stand-in (SDPA), not flash-attn"
    iface = types.ModuleType("flash_attn.flash_attn_interface")
    iface.flash_attn_varlen_qkvpacked_func = flash_attn_varlen_qkvpacked_func
    layers = types.ModuleType("flash_attn.layers")
    rotary = types.ModuleType("flash_attn.layers.rotary")
    rotary.apply_rotary_emb_qkv_ = apply_rotary_emb_qkv_
    fa.flash_attn_interface, fa.layers, layers.rotary = iface, layers, rotary
    fa.flash_attn_varlen_qkvpacked_func = flash_attn_varlen_qkvpacked_func
    return {"flash_attn": fa, "flash_attn.flash_attn_interface": iface, "flash_attn.layers": layers,
            "flash_attn.layers.rotary": rotary}


# ----------------------------------------------------------------------------- their code


class _Anything:
    """A stub class for names of packages that are not installed (never called by the timed code)."""

    def __init__(self, *a, **k):
        pass


def _stub(name: str) -> types.ModuleType:
    m = types.ModuleType(name)

    def attr(a):
        if a.startswith("__"):
            raise AttributeError(a)
        return _Anything if a[:1].isupper() else _stub(f"{name}.{a}")

    m.__getattr__ = attr
    m.__path__ = []
    return m


def load_mdlm(path: Path, force_stubs: tuple = ()) -> types.SimpleNamespace:
    """Import their models/dit.py, models/ema.py, noise_schedule.py, utils.py and diffusion.py from ``path``
    with the flash_attn stand-ins; their generic top-level names (models, utils, ...) are removed from
    sys.modules again afterwards (their functions keep their own module globals). ``force_stubs``: names
    stubbed even when installed (the tests use it to run the stand-ins for einops, huggingface_hub)."""
    path = Path(path).resolve()
    if not (path / "models" / "dit.py").is_file() or not (path / "diffusion.py").is_file():
        raise SystemExit(f"error: {path} is not a checkout of kuleshov-group/mdlm (no models/dit.py, diffusion.py); "
                         "clone github.com/kuleshov-group/mdlm and pass its directory as --mdlm")
    saved = dict(sys.modules)
    ours = {**_standin_modules()}
    stubbed = []
    for name in ("hydra", "hydra.utils", "datasets", "timm", "timm.scheduler", "transformers", "fsspec", "requests",
                 "torchmetrics", "huggingface_hub", "einops", "omegaconf"):
        try:
            if name in force_stubs:
                raise ImportError(name)
            importlib.import_module(name)
        except ImportError:
            if name == "omegaconf":  # a dlmtrain dependency; their DIT reads its config through it
                raise SystemExit("error: their dit.py needs omegaconf; pip install omegaconf") from None
            ours[name] = _stub(name)
            stubbed.append(name)
    if "einops" in ours:  # used by the timed code: our reshape-only rearrange (see above)
        ours["einops"].rearrange = rearrange
    if "huggingface_hub" in ours:
        ours["huggingface_hub"].PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {})
    if "torchmetrics" in ours:
        agg = _stub("torchmetrics.aggregation")
        agg.MeanMetric = type("MeanMetric", (torch.nn.Module,), {})
        ours["torchmetrics"].aggregation = agg
    ours["dataloader"] = _stub("dataloader")  # their data pipeline (datasets, downloads): not used here
    models = types.ModuleType("models")
    models.__path__ = [str(path / "models")]
    ours["models"] = models
    ns = types.SimpleNamespace(stubbed=stubbed)

    def load(name, file):
        spec = importlib.util.spec_from_file_location(name, file)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod

    try:
        sys.modules.update(ours)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models.dit = load("models.dit", path / "models" / "dit.py")
            models.ema = load("models.ema", path / "models" / "ema.py")
            ns.noise_schedule = load("noise_schedule", path / "noise_schedule.py")
            ns.utils = load("utils", path / "utils.py")
            ns.diffusion = load("diffusion", path / "diffusion.py")
        ns.dit, ns.ema = models.dit, models.ema
    finally:  # only the names registered here; packages imported on the way (lightning, ...) stay
        for k in [*ours, "models.dit", "models.ema", "noise_schedule", "utils", "diffusion"]:
            sys.modules.pop(k, None)
            if k in saved:
                sys.modules[k] = saved[k]
    try:
        ns.commit = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                                   check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        ns.commit = None
    ns.path = str(path)
    return ns


def their_config(a, length: int, eval_batch: int = 1, steps: int = 128):
    from omegaconf import OmegaConf

    return OmegaConf.create({
        "backbone": "dit", "parameterization": "subs", "time_conditioning": False, "T": 0, "subs_masking": False,
        "model": {"name": "bench", "type": "ddit", "hidden_size": a.hidden, "cond_dim": a.cond_dim, "length": length,
                  "n_blocks": a.layers, "n_heads": a.heads, "scale_by_sigma": True, "dropout": a.their_dropout},
        "noise": {"type": "loglinear", "sigma_min": 1e-4, "sigma_max": 20},
        "training": {"ema": 0.9999, "antithetic_sampling": True, "importance_sampling": False,
                     "sampling_eps": 1e-3, "change_of_variables": False},
        "sampling": {"predictor": "ddpm_cache", "steps": steps, "noise_removal": True},
        "loader": {"eval_batch_size": eval_batch, "batch_size": a.batch},
        "optim": {"weight_decay": 0, "lr": 3e-4, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8},
    })


def build_theirs(ns, a, cfg, device):
    """Their Diffusion without its __init__ (tokenizer downloads, metrics): the attributes its loss and
    sampler read, set as their __init__ sets them for backbone=dit, parameterization=subs, loglinear."""
    D = ns.diffusion.Diffusion
    obj = D.__new__(D)
    super(D, obj).__init__()  # LightningModule / nn.Module state
    obj.config = cfg
    obj.vocab_size = a.vocab
    obj.mask_index = a.vocab - 1  # GPT-2 has no [MASK]: theirs is vocab_size, then vocab_size += 1
    obj.sampler = cfg.sampling.predictor
    obj.antithetic_sampling = cfg.training.antithetic_sampling
    obj.importance_sampling = cfg.training.importance_sampling
    obj.change_of_variables = cfg.training.change_of_variables
    obj.parameterization = cfg.parameterization
    obj.backbone = ns.dit.DIT(cfg, vocab_size=a.vocab)
    obj.T = cfg.T
    obj.subs_masking = cfg.subs_masking
    obj.softplus = torch.nn.Softplus()
    obj.noise = ns.noise_schedule.get_noise(cfg, dtype=torch.float32)
    obj.ema = None  # the benchmark updates their EMA itself, as their optimizer_step does
    obj.lr = cfg.optim.lr
    obj.sampling_eps = cfg.training.sampling_eps
    obj.time_conditioning = cfg.time_conditioning
    obj.neg_infinity = -1000000.0
    obj._validate_configuration()
    return obj.to(device)


# ----------------------------------------------------------------------------- ours


def build_ours(a, masked_head: bool, compile_: bool, device, ema: bool = True):
    from dlmtrain import build_module, load_config
    from dlmtrain.distributed.parallelize import Parallelize

    cfg = load_config(None, [
        "objective=mdlm", "model=mdlm_dit", f"model.hidden_size={a.hidden}", f"model.n_layers={a.layers}",
        f"model.n_heads={a.heads}", f"model.cond_dim={a.cond_dim}", f"model.mlp_width={4 * a.hidden}",
        f"model.vocab_size={a.vocab - 1}", f"model.dropout={getattr(a, 'their_dropout', 0.0)}",  # like for like
        f"objective.masked_head={str(masked_head).lower()}", f"trainer.compile={str(compile_).lower()}",
        "optim.ema=" + ("0.9999" if ema else "0"), "optim.grad_clip=1.0"])
    module = build_module(cfg).to(device)
    module.setup("fit")  # creates the EMA (outside a Trainer: no datamodule)
    if compile_:
        Parallelize(compile=True)(module)
    return module


# ----------------------------------------------------------------------------- timing


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MaskCounter:
    """Counts [MASK] inputs of a network's calls (no host sync): the masked share f."""

    def __init__(self, net, mask_id, device):
        self.mask_id, self.on = mask_id, False
        self.masked = torch.zeros((), dtype=torch.int64, device=device)
        self.total = 0
        self.calls = 0
        self.handle = net.register_forward_pre_hook(self)

    def __call__(self, net, args):
        self.calls += 1
        if self.on:
            ids = args[0]
            self.masked += (ids == self.mask_id).sum()
            self.total += ids.numel()

    def share(self) -> float | None:
        return self.masked.item() / self.total if self.total else None


def time_steps(step, n_warmup, n_steps, device, counter):
    for i in range(n_warmup):
        step(i)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    counter.on = True
    t0 = time.perf_counter()
    for i in range(n_steps):
        step(n_warmup + i)
    _sync(device)
    elapsed = time.perf_counter() - t0
    counter.on = False
    mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return elapsed, mem


def train_theirs(ns, a, device, autocast):
    torch.manual_seed(0)
    cfg = their_config(a, a.seq_len)
    obj = build_theirs(ns, a, cfg, device).train()
    params = lambda: itertools.chain(obj.backbone.parameters(), obj.noise.parameters())  # noqa: E731
    opt = torch.optim.AdamW(params(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)  # their constant_warmup after its warm-up
    ema = ns.ema.ExponentialMovingAverage(params(), decay=cfg.training.ema)
    ema.move_shadow_params_to_device(device)
    x0 = torch.randint(0, a.vocab - 1, (a.batch, a.seq_len), generator=torch.Generator().manual_seed(1)).to(device)
    am = torch.ones_like(x0)
    counter = MaskCounter(obj.backbone, obj.mask_index, device)

    def step(i):
        with autocast():
            loss = obj._loss(x0, am).loss
        loss.item()  # their training_step: self.log(name='trainer/loss', value=loss.item(), ...)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema.update(params())

    elapsed, mem = time_steps(step, a.warmup, a.steps, device, counter)
    out = {"masked_share": counter.share(), "peak_memory_bytes": mem, "elapsed_s": elapsed}
    return out


def train_ours(a, device, autocast, masked_head, compile_):
    torch.manual_seed(0)
    module = build_ours(a, masked_head, compile_, device).train()
    o = module.configure_optimizers()
    opt, sched = o["optimizer"], o["lr_scheduler"]["scheduler"]
    x0 = torch.randint(0, a.vocab - 1, (a.batch, a.seq_len), generator=torch.Generator().manual_seed(1)).to(device)
    counter = MaskCounter(module.backbone, module.mask_id, device)
    clip = float(module.cfg.optim.grad_clip)

    def step(i):
        with autocast():
            loss = module.training_step({"input_ids": x0}, i)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        module.ema.update(module.backbone)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # outside a Trainer, self.log is a no-op
        elapsed, mem = time_steps(step, a.warmup, a.steps, device, counter)
    out = {"masked_share": counter.share(), "peak_memory_bytes": mem, "elapsed_s": elapsed}
    return out


def sample_theirs(ns, a, device, autocast, steps):
    torch.manual_seed(0)
    bs = a.sample_batch or a.sample_num
    cfg = their_config(a, a.sample_len, eval_batch=bs, steps=steps)
    obj = build_theirs(ns, a, cfg, device).eval()
    counter = MaskCounter(obj.backbone, obj.mask_index, device)
    with autocast():
        obj._sample(num_steps=2)  # warm-up
        _sync(device)
        calls = counter.calls
        torch.manual_seed(1)
        t0 = time.perf_counter()
        xs = []
        for start in range(0, a.sample_num, bs):  # their eval loop: eval_batch_size samples per _sample call
            obj.config.loader.eval_batch_size = min(bs, a.sample_num - start)
            xs.append(obj._sample(num_steps=steps))
        _sync(device)
        seconds = time.perf_counter() - t0
    assert torch.cat(xs).shape == (a.sample_num, a.sample_len)
    return {"nfe": counter.calls - calls, "seconds": seconds}


def sample_ours(a, device, autocast, steps, sampler, masked_head):
    from dlmtrain.sampling import sample

    torch.manual_seed(0)
    module = build_ours(a, masked_head, False, device, ema=False)
    extra = {"cache": True} if sampler == "ancestral" else {}
    with autocast():
        sample(module, a.sample_num, a.sample_len, 2, sampler=sampler, seed=99, **extra)  # warm-up
        res = sample(module, a.sample_num, a.sample_len, steps, sampler=sampler, seed=1,
                     batch_size=a.sample_batch or None, **extra)
    return {"nfe": int(sum(res.nfe_per_batch)), "seconds": res.seconds}  # all calls, as counted for theirs


def _guarded(fn, device) -> dict:
    """Run one measurement; CUDA out-of-memory becomes the row's error instead of ending the run."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError as e:
        return {"error": f"CUDA out of memory ({str(e).splitlines()[0][:120]})"}
    finally:
        import gc

        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- stand-in check


def standin_check(ns, a) -> dict:
    """Their DiT (stand-ins, CPU float32, eval, every weight random) against the same weights imported
    into our backbone by dlmtrain.checkpoint.mdlm.import_mdlm (via their Lightning checkpoint layout);
    also the varlen stand-in against a per-sequence softmax attention written out."""
    from dlmtrain.checkpoint.mdlm import import_mdlm

    out = {}
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(3 + 5 + 4, 3, 2, 8, generator=g)
    cu = torch.tensor([0, 3, 8, 12], dtype=torch.int32)
    y = flash_attn_varlen_qkvpacked_func(qkv, cu, 5)
    ref = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        q, k, v = qkv[s:e].unbind(1)  # [l, H, D]
        w = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
        ref.append(torch.einsum("hqk,khd->qhd", w.softmax(-1), v))
    out["varlen_max_abs_diff"] = (y - torch.cat(ref)).abs().max().item()

    hidden, heads, layers, V, cond, L, B = 64, 4, 2, a.vocab, 32, 48, 3
    small = argparse.Namespace(hidden=hidden, layers=layers, heads=heads, cond_dim=cond, their_dropout=0.0, batch=B)
    for tc in (False, True):
        cfg = their_config(small, L)
        cfg.time_conditioning = tc
        torch.manual_seed(2)
        dit = ns.dit.DIT(cfg, vocab_size=V).eval()
        with torch.no_grad():
            for name, p in dit.named_parameters():  # their zero inits (adaLN, head) would hide a wrong mapping
                scale = 1.0 if "embedding" in name else (0.3 if p.dim() == 1 or "adaLN" in name else p.shape[-1] ** -0.5)
                p.copy_(torch.randn_like(p) * scale + (1.0 if "norm" in name else 0.0))
        ids = torch.randint(0, V, (B, L), generator=g)
        ids[0, :7] = V - 1
        sigma = torch.tensor([0.05, 1.3, 4.0])
        with tempfile.TemporaryDirectory() as d:
            ck = Path(d) / "their.ckpt"
            torch.save({"state_dict": {"backbone." + k: v for k, v in dit.state_dict().items()}, "global_step": 0,
                        "hyper_parameters": {"config": cfg}}, ck)
            module, _, _ = import_mdlm(ck, ema=False)
        with torch.no_grad():
            theirs = dit(ids, sigma if tc else torch.zeros(B))
            ours = module.backbone(ids, sigma=sigma if tc else None)
        out[f"dit_max_abs_logit_diff_tc_{str(tc).lower()}"] = (theirs.float() - ours.float()).abs().max().item()
        out["dit_logit_scale"] = theirs.abs().max().item()
    out["dims"] = f"hidden {hidden}, {layers} layers, {heads} heads, cond {cond}, vocab {V}, {B} x {L}, CPU float32"
    return out


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mdlm", required=True, help="a checkout of github.com/kuleshov-group/mdlm")
    p.add_argument("--mdlm-commit", default=None, help="their commit, when PATH is a copy without .git")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--cond-dim", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=50258, help="rows of the embedding, [MASK] (the last id) included")
    p.add_argument("--batch", type=int, default=16, help="training micro-batch (sequences)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps first (compile happens here)")
    p.add_argument("--compile", choices=("both", "off", "on"), default="both", help="our trainer.compile")
    p.add_argument("--their-dropout", type=float, default=0.1, help="their small config's dropout (0.1)")
    p.add_argument("--what", nargs="+", choices=("train", "sample"), default=["train", "sample"])
    p.add_argument("--sample-num", type=int, default=64)
    p.add_argument("--sample-len", type=int, default=1024)
    p.add_argument("--sample-steps", type=int, nargs="+", default=[128])
    p.add_argument("--sample-batch", type=int, default=0,
                   help="samples drawn together per call (0: all --sample-num); NFE is summed over calls")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--out", help="write every figure as JSON here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    import dlmtrain
    from dlmtrain.backbone import flops_per_token
    from dlmtrain.bench.model import PEAK_BF16_TFLOPS, _device, _device_name
    from dlmtrain.config import load_config

    for msg in (r".*torch\.cuda\.amp\.autocast.*", r"CUDA is not available or torch_xla is imported.*",
                r"In CUDA autocast, but the target dtype is not supported.*"):
        warnings.filterwarnings("ignore", message=msg)  # their code's deprecated torch.cuda.amp calls
    device = _device(a.device)
    bf16 = device.type == "cuda"
    if bf16:
        torch.set_float32_matmul_precision("high")
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    name = _device_name(device)
    peak = a.peak_tflops or (next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None) if bf16 else None)
    ns = load_mdlm(Path(a.mdlm))
    ns.commit = ns.commit or a.mdlm_commit
    print(f"mdlm {ns.path} @ {ns.commit}; stubbed (not installed, not used by the timed code): {ns.stubbed or 'none'}")

    check = standin_check(ns, a)
    print("stand-in check (CPU float32): " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                       for k, v in check.items()))
    worst = max(v for k, v in check.items() if k.endswith("diff"))
    if worst > 1e-4:
        raise SystemExit(f"error: the flash_attn stand-in / mapping check failed (max diff {worst:.3g} > 1e-4)")

    mcfg = load_config(None, ["model=mdlm_dit", f"model.hidden_size={a.hidden}", f"model.n_layers={a.layers}",
                              f"model.n_heads={a.heads}", f"model.mlp_width={4 * a.hidden}"]).model
    fpt = flops_per_token(mcfg, a.seq_len, a.vocab)
    head = 6.0 * a.hidden * a.vocab
    rows = []
    if "train" in a.what:
        runs = [("mdlm (theirs)", lambda: train_theirs(ns, a, device, autocast), False, False)]
        for c in ([False, True] if a.compile == "both" else [a.compile == "on"]):
            for mh in (False, True):
                runs.append((f"dlmtrain masked_head={str(mh).lower()} compile={str(c).lower()}",
                             (lambda mh=mh, c=c: train_ours(a, device, autocast, mh, c)), mh, c))
        for label, fn, mh, c in runs:
            r = _guarded(fn, device)
            if "error" in r:
                rows.append({"part": "train", "impl": label, "masked_head": mh, "compile": c, **r})
                print(f"  train {label}: {r['error']}", flush=True)
                continue
            tps = a.batch * a.seq_len * a.steps / r["elapsed_s"]
            exec_fpt = fpt - head * (1 - r["masked_share"]) if mh else fpt
            rows.append({"part": "train", "impl": label, "masked_head": mh, "compile": c, "tokens_per_s": tps,
                         "ms_per_step": 1000 * r["elapsed_s"] / a.steps, "masked_share": r["masked_share"],
                         "model_flops_per_token": fpt, "executed_flops_per_token": exec_fpt,
                         "tflops_per_s": fpt * tps / 1e12,
                         "mfu": fpt * tps / (peak * 1e12) if peak else None,
                         "hfu": exec_fpt * tps / (peak * 1e12) if peak else None,
                         "peak_memory_bytes": r["peak_memory_bytes"]})
            print(f"  train {label}: {tps:,.1f} tokens/s", flush=True)
        base = rows[0].get("tokens_per_s")
        for r in rows:
            r["ratio_vs_mdlm"] = r["tokens_per_s"] / base if base and "tokens_per_s" in r else None
    if "sample" in a.what:
        for steps in a.sample_steps:
            srows = [("mdlm ddpm_cache (theirs)", lambda: sample_theirs(ns, a, device, autocast, steps), None)]
            for sampler in ("ancestral", "first_hitting"):
                for mh in (True, False):
                    srows.append((f"dlmtrain {sampler}{' (cache)' if sampler == 'ancestral' else ''} "
                                  f"masked_head={str(mh).lower()}",
                                  (lambda s=sampler, mh=mh: sample_ours(a, device, autocast, steps, s, mh)), mh))
            first = None
            for i, (label, fn, mh) in enumerate(srows):
                r = _guarded(fn, device)
                if "error" in r:
                    rows.append({"part": "sample", "impl": label, "masked_head": mh, "steps": steps, **r})
                    print(f"  sample {label} steps {steps}: {r['error']}", flush=True)
                    continue
                tps = a.sample_num * a.sample_len / r["seconds"]
                first = tps if i == 0 else first
                rows.append({"part": "sample", "impl": label, "masked_head": mh, "steps": steps, "nfe": r["nfe"],
                             "seconds": r["seconds"], "tokens_per_s": tps, "ms_per_nfe": 1000 * r["seconds"] / r["nfe"],
                             "ratio_vs_mdlm": tps / first if first else None})
                print(f"  sample {label} steps {steps}: {tps:,.1f} tokens/s, NFE {r['nfe']}", flush=True)

    try:
        ours_commit = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), "rev-parse", "HEAD"],
                                     capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        ours_commit = None
    result = {"device": name, "dtype": "bf16 autocast (fp32 weights)" if bf16 else "float32",
              "torch": torch.__version__, "dlmtrain": dlmtrain.__version__, "dlmtrain_commit": ours_commit,
              "python": platform.python_version(), "mdlm_path": ns.path, "mdlm_commit": ns.commit,
              "flash_attn": "stand-in (SDPA), benchmarks/mdlm_side_by_side.py", "stubbed_modules": ns.stubbed,
              "config": {k: v for k, v in vars(a).items() if k != "out"}, "peak_tflops": peak,
              "standin_check": check, "rows": rows}

    print(f"\n{name}, {result['dtype']}, torch {torch.__version__}, dlmtrain {dlmtrain.__version__}, mdlm "
          f"{(ns.commit or '?')[:10]}; {a.hidden} wide, {a.layers} layers, {a.heads} heads, vocab {a.vocab}")
    tr = [r for r in rows if r["part"] == "train"]
    if tr:
        print(f"training step, batch {a.batch} x seq {a.seq_len}, {a.steps} timed steps after {a.warmup}; "
              f"model FLOPs/token {fpt:.4g}")
        print(f"{'implementation':<44}{'tokens/s':>12}{'vs mdlm':>9}{'ms/step':>10}{'MFU':>8}{'HFU':>8}"
              f"{'exec/model FLOPs':>18}{'masked':>8}{'peak GiB':>10}")
        for r in tr:
            if "error" in r:
                print(f"{r['impl']:<44}{r['error']}")
                continue
            pct = lambda v: f"{100 * v:.1f}%" if v is not None else "n/a"  # noqa: E731
            mem = f"{r['peak_memory_bytes'] / 2**30:.2f}" if r["peak_memory_bytes"] is not None else "n/a"
            ratio = f"{r['ratio_vs_mdlm']:>8.2f}x" if r["ratio_vs_mdlm"] is not None else f"{'n/a':>9}"
            print(f"{r['impl']:<44}{r['tokens_per_s']:>12,.1f}{ratio}{r['ms_per_step']:>10.1f}"
                  f"{pct(r['mfu']):>8}{pct(r['hfu']):>8}"
                  f"{r['executed_flops_per_token'] / r['model_flops_per_token']:>18.3f}{r['masked_share']:>8.3f}{mem:>10}")
    sr = [r for r in rows if r["part"] == "sample"]
    if sr:
        print(f"sampling, {a.sample_num} x {a.sample_len} ({a.sample_batch or a.sample_num} per call)")
        print(f"{'implementation':<44}{'steps':>6}{'NFE':>6}{'seconds':>9}{'tokens/s':>11}{'vs mdlm':>9}{'ms/NFE':>9}")
        for r in sr:
            if "error" in r:
                print(f"{r['impl']:<44}{r['steps']:>6}  {r['error']}")
                continue
            ratio = f"{r['ratio_vs_mdlm']:>8.2f}x" if r["ratio_vs_mdlm"] is not None else f"{'n/a':>9}"
            print(f"{r['impl']:<44}{r['steps']:>6}{r['nfe']:>6}{r['seconds']:>9.3f}{r['tokens_per_s']:>11,.1f}"
                  f"{ratio}{r['ms_per_nfe']:>9.2f}")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
