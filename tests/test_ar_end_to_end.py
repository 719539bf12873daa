"""objective=ar end to end: `train` on a Markov source whose entropy is known exactly, then
`dlmtrain eval` / `dlmtrain sample` on the checkpoint and the checkpoint as evaluation LM."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dlmtrain import load_checkpoint, load_config
from dlmtrain.cli import main
from dlmtrain.data.synthetic import markov_log_prob, stationary, write_markov
from dlmtrain.eval.commands import _datamodule
from dlmtrain.eval.quality import CheckpointLM, load_eval_lm
from dlmtrain.train import train

# 4 states (+ EOS = 4 in the vocabulary): entropy rate 0.967 nats/token, log V = log 5 = 1.609
P = np.array([[0.6, 0.3, 0.05, 0.05], [0.05, 0.6, 0.3, 0.05], [0.05, 0.05, 0.6, 0.3], [0.3, 0.05, 0.05, 0.6]])
L = 32


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ar")
    manifest = write_markov(root / "data", P, seq_len=L, train_samples=2048, val_samples=256)
    try:
        res = train(load_config("configs/demo.yaml", [
            "objective=ar", f"data.manifest={manifest}", f"run.dir={root / 'run'}", "data.num_workers=0",
            "trainer.max_steps=120", "trainer.global_batch_size=32", "trainer.val_every_n_steps=120",
            "trainer.limit_val_batches=0", "trainer.val_before_training=false", "trainer.progress_bar=false",
            "optim.warmup_steps=20", "eval.sample_every_n_steps=1000", "eval.num_samples=4"]))
    finally:
        torch.set_num_threads(n)
    return res, root / "run", manifest


def test_train_end_to_end_learns_the_source_and_the_bound_is_exact(run):
    """Held-out NLL >= the exact -log p(x) of the same sequences (paired, within 3 SE), clearly
    below log V, and val/nelbo equals the checkpoint's exact NLL recomputed here."""
    res, run_dir, _ = run
    assert res["step"] == 120 and res["val/nelbo_se_mc"] == 0.0  # exact: no Monte Carlo noise
    assert not list((run_dir / "eval").glob("nelbo_by_t*"))  # no t-binned picture for an objective without time
    saved = load_config(run_dir / "config.yaml")
    assert saved.objective.name == "ar" and saved.model.causal is True
    module = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    dm = _datamodule(module, None, [], 64)
    model_nats, exact_nats = [], []
    with torch.no_grad():
        for b in dm.val_dataloader():
            model_nats.append(module.nelbo(b["input_ids"], b["attention_mask"], segment_ids=b["segment_ids"]).double())
            exact_nats.append(-torch.from_numpy(markov_log_prob(b["input_ids"].numpy(), P)))
    q, p = torch.cat(model_nats), torch.cat(exact_nats)
    assert len(q) == 256
    nll, entropy = q.sum().item() / (256 * L), p.sum().item() / (256 * L)
    kl = (q - p) / L  # per-sequence excess nats/token: its mean estimates KL(p || q) >= 0
    se = kl.std().item() / math.sqrt(len(kl))
    print(f"held-out NLL {nll:.4f} nats/token, exact {entropy:.4f}, excess {kl.mean().item():.4f} ± {se:.4f}")
    assert kl.mean().item() > -3 * se
    assert nll < math.log(5) - 0.5 and nll - entropy < 0.1
    assert res["val/nelbo"] == pytest.approx(nll, rel=1e-5)  # the callback's figure, EMA weights


def test_eval_and_sample_commands_on_an_ar_checkpoint(run, tmp_path, capsys):
    res, run_dir, _ = run
    ckpt = str(run_dir / "checkpoints" / "last.ckpt")
    assert main(["eval", ckpt, "--samples", "3", "--out", str(tmp_path / "e.json")]) == 0
    ev = json.loads((tmp_path / "e.json").read_text())
    assert ev["nelbo"] == pytest.approx(res["val/nelbo"], rel=1e-6) and ev["nelbo_se_mc"] == 0.0
    assert "t_bins" not in ev
    out = tmp_path / "s.jsonl"
    prompt = "\x01\x02\x02"  # byte tokenizer: the ids 1, 2, 2
    assert main(["sample", ckpt, "--num", "64", "--prompt", prompt, "--seed", "1", "--out", str(out)]) == 0
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    x = torch.tensor([r["tokens"] for r in rows])
    assert x.shape == (64, L) and (x[:, :3] == torch.tensor([1, 2, 2])).all()
    assert rows[0]["nfe"] == L - 3 and rows[0]["text"].startswith(prompt)
    # the samples follow the chain: transition frequencies near P (~450 transitions per row of P,
    # SE <= 0.025); EOS (never in the data, some mass after 120 steps) is rare
    assert (x[:, 3:] == 4).float().mean() < 0.02
    a, b = x[:, 2:-1].flatten(), x[:, 3:].flatten()
    keep = (a < 4) & (b < 4)
    counts = torch.zeros(4, 4).index_put_((a[keep], b[keep]), torch.ones(int(keep.sum())), accumulate=True)
    freq = counts / counts.sum(1, keepdim=True)
    assert (freq - torch.tensor(P, dtype=torch.float32)).abs().max() < 0.1, freq


def test_ar_checkpoint_as_eval_lm_equals_exp_mean_nll_by_hand(run, tmp_path):
    _, run_dir, _ = run
    ckpt = str(run_dir / "checkpoints" / "last.ckpt")
    lm = load_eval_lm(ckpt)
    assert isinstance(lm, CheckpointLM) and lm.max_length == L
    texts = ["\x00\x01\x01\x02\x03\x00", "\x02", "\x03\x02" * 25]  # the last one is cut to 32 tokens
    module = load_checkpoint(ckpt)
    total, count = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = list(t.encode())[:L]
            inp = torch.tensor([[module.start_id] + ids[:-1]])
            logp = torch.log_softmax(module.backbone(inp)[0].double(), -1)
            total -= sum(logp[i, ids[i]].item() for i in range(len(ids)))
            count += len(ids)
    assert count == 6 + 1 + 32
    assert [n for _, n in lm.nll(texts)] == [6, 1, 32]
    assert lm.perplexity(texts) == pytest.approx(math.exp(total / count), rel=1e-5)
    # in the sample-quality callback: gen_ppl of its own samples under the checkpoint
    from dlmtrain.callbacks.samples import SampleQuality

    cfg = load_config(run_dir / "config.yaml", [f"eval.eval_lm={ckpt}", "eval.num_samples=3",
                                                "eval.sample_every_n_steps=1"])
    cb = SampleQuality(cfg, tmp_path, lm.tokenizer, L)
    cb.setup(None, module, "fit")
    stats = cb.run(SimpleNamespace(global_step=7, is_global_zero=True, loggers=[]), module)
    texts = [json.loads(ln)["text"] for ln in (tmp_path / "samples" / "step7.jsonl").read_text().splitlines()]
    assert stats["samples/gen_ppl"] == pytest.approx(lm.perplexity(texts), rel=1e-6)


def test_eval_lm_refuses_a_diffusion_checkpoint_in_one_line(tmp_path):
    from dlmtrain.errors import ConfigError

    with pytest.raises(ConfigError, match="does not exist|not a readable") as e:
        load_eval_lm(str(tmp_path / "missing.ckpt"))
    assert "\n" not in str(e.value) and "eval.eval_lm=" in str(e.value)
