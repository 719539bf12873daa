"""`dlmtrain convert --from mdlm`: MDLM's DiT (tests/mdlm_reference.py, every weight random) saved in their
Lightning layout (raw + EMA list) and their Hugging Face layouts, imported, and compared logit by logit."""

from __future__ import annotations

import json
import os
import sys
import types

import pytest
import torch
from mdlm_reference import dit_logits, random_dit, their_config
from omegaconf import OmegaConf

import dlmtrain
from dlmtrain.checkpoint import load_checkpoint
from dlmtrain.cli import main

V, HIDDEN, BLOCKS, HEADS, COND = 50, 32, 2, 4, 24  # V includes their [MASK] (id 49)
TOL = 1e-5


from chain_oracles import one_thread  # noqa: E402,F401  (autouse: one thread for tiny tensors)


def _their_ckpt(path, tc: bool, with_ema: bool = True, **cfg_extra):
    raw = random_dit(V, HIDDEN, BLOCKS, HEADS, COND, seed=1)
    ck = {"state_dict": raw, "global_step": 1234, "epoch": 2, "pytorch-lightning_version": "2.2.1",
          "hyper_parameters": {"config": OmegaConf.create(their_config(HIDDEN, BLOCKS, HEADS, COND, tc, **cfg_extra))}}
    ema = None
    if with_ema:  # their EMA: a list in the order of backbone.parameters() (the rotary buffer is no parameter)
        shadow = random_dit(V, HIDDEN, BLOCKS, HEADS, COND, seed=2)
        ema = {k: shadow[k] for k in raw}
        ck["ema"] = {"decay": 0.9999, "num_updates": 1234,
                     "shadow_params": [v for k, v in shadow.items() if not k.endswith("inv_freq")]}
    torch.save(ck, path)
    return raw, ema


def _their_hf(d, tc: bool, fmt: str):
    d.mkdir()
    sd = random_dit(V, HIDDEN, BLOCKS, HEADS, COND, seed=3)
    (d / "config.json").write_text(json.dumps({
        "architectures": ["MDLM"], "model_type": "mdlm", "vocab_size": V, "model_length": 32, "hidden_dim": HIDDEN,
        "cond_dim": COND, "n_blocks": BLOCKS, "n_heads": HEADS, "dropout": 0.1, "time_conditioning": tc,
        "auto_map": {"AutoConfig": "configuration_mdlm.MDLMConfig"}}))
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(d / "model.safetensors"))
    else:
        torch.save(sd, d / "pytorch_model.bin")
    return sd


def _inputs():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, V, (3, 24), generator=g)  # includes mask tokens (id 49) at random places
    ids[0, :5] = V - 1
    return ids, torch.tensor([0.05, 1.3, 4.0])


def _max_diff(module, sd, tc: bool) -> float:
    ids, sigma = _inputs()
    with torch.no_grad():
        ours = module.backbone(ids, sigma=sigma if tc else None)
    return (ours - dit_logits(sd, ids, sigma, HEADS, tc)).abs().max().item()


@pytest.mark.parametrize("tc", [False, True])
def test_lightning_ckpt_import_logits_match_ema_and_raw(tmp_path, tc, capsys):
    raw, ema = _their_ckpt(tmp_path / "their.ckpt", tc)
    assert main(["convert", str(tmp_path / "their.ckpt"), str(tmp_path / "ema"), "--from", "mdlm", "--to", "safetensors"]) == 0
    assert main(["convert", str(tmp_path / "their.ckpt"), str(tmp_path / "raw"), "--from", "mdlm", "--to", "safetensors",
                 "--raw"]) == 0
    m_ema, m_raw = dlmtrain.load_pretrained(tmp_path / "ema"), dlmtrain.load_pretrained(tmp_path / "raw")
    assert m_ema.weights == "ema" and m_raw.weights == "raw" and m_ema.global_step_loaded == 1234
    assert m_ema.mask_id == V - 1 and m_ema.cfg.model.vocab_size == V - 1 and m_ema.time_conditioned == tc
    d_ema, d_raw = _max_diff(m_ema, ema, tc), _max_diff(m_raw, raw, tc)
    print(f"max |logit diff| tc={tc}: ema {d_ema:.2e}, raw {d_raw:.2e}")
    assert d_ema < TOL and d_raw < TOL
    assert _max_diff(m_ema, raw, tc) > 1e-2  # the EMA really is other weights (the check can fail)


class _Reference(torch.nn.Module):
    """Their DiT as a backbone for our MDLM module (the same call convention)."""

    def __init__(self, sd, tc):
        super().__init__()
        self.sd, self.tc = sd, tc

    def forward(self, ids, sigma=None, **kw):
        sigma = torch.zeros(ids.shape[0]) if sigma is None else sigma.reshape(-1).expand(ids.shape[0])
        return dit_logits(self.sd, ids, sigma, HEADS, self.tc)


@pytest.mark.parametrize("tc", [False, True])
def test_imported_nelbo_equals_bound_under_their_network(tmp_path, tc):
    """The whole bound (SUBS on their [MASK] id, our schedule's sigma into their conditioning) through the
    imported weights equals the same computation with their network in place of ours."""
    raw, _ = _their_ckpt(tmp_path / "their.ckpt", tc, with_ema=False)
    assert main(["convert", str(tmp_path / "their.ckpt"), str(tmp_path / "exp"), "--from", "mdlm", "--to", "safetensors"]) == 0
    module = dlmtrain.load_pretrained(tmp_path / "exp")
    assert module.weights == "raw"  # no EMA in the file: the raw weights, said so
    ids = torch.randint(0, V - 1, (3, 24), generator=torch.Generator().manual_seed(8))  # clean data: no mask ids
    with torch.no_grad():
        ours = module.nelbo(ids, num_samples=4, generator=torch.Generator().manual_seed(9))
        module.backbone = _Reference(raw, tc)
        theirs = module.nelbo(ids, num_samples=4, generator=torch.Generator().manual_seed(9))
    assert torch.allclose(ours, theirs, rtol=TOL, atol=0), (ours, theirs)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("tc", [False, True])
def test_hugging_face_layout_import_logits_match(tmp_path, fmt, tc):
    sd = _their_hf(tmp_path / "mdlm-owt", tc, fmt)
    assert main(["convert", str(tmp_path / "mdlm-owt"), str(tmp_path / "exp"), "--from", "mdlm", "--to", "safetensors"]) == 0
    d = _max_diff(dlmtrain.load_pretrained(tmp_path / "exp"), sd, tc)
    print(f"max |logit diff| HF {fmt} tc={tc}: {d:.2e}")
    assert d < TOL


def test_import_to_lightning_then_bf16_export(tmp_path):
    raw, ema = _their_ckpt(tmp_path / "their.ckpt", False)
    assert main(["convert", str(tmp_path / "their.ckpt"), str(tmp_path / "ours.ckpt"), "--from", "mdlm",
                 "--to", "lightning"]) == 0
    module = load_checkpoint(tmp_path / "ours.ckpt")
    assert _max_diff(module, ema, False) < TOL
    assert main(["convert", str(tmp_path / "their.ckpt"), str(tmp_path / "bf16"), "--from", "mdlm",
                 "--to", "safetensors", "--dtype", "bf16"]) == 0
    # bf16 weights (8 mantissa bits) through 2 blocks of random weights: logits ~ 5 within 0.1 (measured 3.9e-2)
    d = _max_diff(dlmtrain.load_pretrained(tmp_path / "bf16"), ema, False)
    print(f"max |logit diff| bf16 export: {d:.2e}")
    assert d < 0.1


def test_missing_classes_in_their_pickle_and_sampling_with_their_tokenizer(tmp_path, capsys):
    """Their checkpoint pickles a transformers tokenizer: a class that is not installed here must not stop
    the import. With --tokenizer, the export samples from the CLI; eval without data says what to pass."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    fake = types.ModuleType("fake_transformers_xyz")

    class GPT2TokenizerFast:  # noqa: D401 - stands in for their pickled tokenizer
        def __init__(self):
            self.vocab = {"a": 1}

    GPT2TokenizerFast.__module__, GPT2TokenizerFast.__qualname__ = fake.__name__, "GPT2TokenizerFast"
    fake.GPT2TokenizerFast = GPT2TokenizerFast
    sys.modules[fake.__name__] = fake
    try:
        raw = random_dit(V, HIDDEN, BLOCKS, HEADS, COND, seed=1)
        torch.save({"state_dict": raw, "global_step": 5, "hyper_parameters": {
            "config": OmegaConf.create(their_config(HIDDEN, BLOCKS, HEADS, COND, False)),
            "tokenizer": GPT2TokenizerFast()}}, tmp_path / "their.ckpt")
    finally:
        del sys.modules[fake.__name__]
    words = ["[EOS]"] + [f"w{i}" for i in range(V - 2)]  # V - 1 tokens; their [MASK] is id V - 1
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    assert main(["convert", str(tmp_path / "their.ckpt"), str(tmp_path / "exp"), "--from", "mdlm",
                 "--to", "safetensors", "--tokenizer", str(tmp_path / "tokenizer.json")]) == 0
    assert sorted(os.listdir(tmp_path / "exp")) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert main(["sample", str(tmp_path / "exp"), "--num", "2", "--steps", "4", "--seq-len", "12",
                 "--out", str(tmp_path / "s.jsonl")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["tokens"]) == 12 and max(r["tokens"]) < V - 1 for r in rows)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err
    assert "pass --data" in err and err.count("\n") == 1


@pytest.mark.parametrize("case,needle", [
    ("sedd", "parameterization=sedd cannot be imported"),
    ("other_arch", "not a checkpoint of MDLM's DiT"),
    ("hf_other", "not an MDLM Hugging Face config"),
    ("no_heads", "number of attention heads"),
    ("bert_tokenizer", "pass --tokenizer"),
])
def test_refusals_are_one_line_exit_2_nothing_written(tmp_path, capsys, case, needle):
    src = tmp_path / "src.ckpt"
    if case == "sedd":
        _their_ckpt(src, False, parameterization="sedd")
    elif case == "other_arch":  # their AR backbone's checkpoint, say
        torch.save({"state_dict": {"backbone.embed.weight": torch.zeros(4, 4)}, "global_step": 1}, src)
    elif case == "hf_other":
        src = tmp_path / "bert"
        src.mkdir()
        (src / "config.json").write_text(json.dumps({"model_type": "bert"}))
    elif case == "bert_tokenizer":  # their LM1B models: bert-base-uncased, [MASK] = 103, not the last id
        _their_ckpt(src, False, data={"tokenizer_name_or_path": "bert-base-uncased"})
    elif case == "no_heads":
        src = tmp_path / "hf"
        _their_hf(src, False, "safetensors")
        cfg = json.loads((src / "config.json").read_text())
        del cfg["n_heads"]
        (src / "config.json").write_text(json.dumps(cfg))
    before = sorted(os.listdir(tmp_path))
    assert main(["convert", str(src), str(tmp_path / "out"), "--from", "mdlm", "--to", "safetensors"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == before


def test_tokenizer_with_its_own_mask_token(tmp_path):
    """Their LM1B models use bert-base-uncased, whose [MASK] (103) sits inside the vocabulary: the mask id
    then comes from the tokenizer and every id is a data token (vocab_size = rows of the embedding)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    raw, ema = _their_ckpt(tmp_path / "their.ckpt", False, data={"tokenizer_name_or_path": "bert-base-uncased"})
    words = ["[PAD]", "[SEP]", "w2", "[MASK]"] + [f"w{i}" for i in range(4, V)]  # V tokens, [MASK] = 3
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    assert main(["convert", str(tmp_path / "their.ckpt"), str(tmp_path / "exp"), "--from", "mdlm", "--to", "safetensors",
                 "--tokenizer", str(tmp_path / "tokenizer.json")]) == 0
    module = dlmtrain.load_pretrained(tmp_path / "exp")
    assert module.mask_id == 3 and module.cfg.model.vocab_size == V and module.cfg.model.eos_id == 1
    assert module.tokenizer.mask_id == 3 and _max_diff(module, ema, False) < TOL
