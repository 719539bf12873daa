"""Sample-quality statistics and generative perplexity under a tiny local evaluation LM."""

import math

import pytest
import torch

from dlmtrain.errors import ConfigError
from dlmtrain.eval.quality import EvalLM, diversity, unigram_entropy


def test_diversity_by_hand():
    a, b = [1, 2, 3, 1], [1, 1, 1, 1]
    d = diversity([a, b], max_n=2)
    ent_a = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert d["entropy"] == pytest.approx((ent_a + 0.0) / 2)
    assert d["distinct_1"] == pytest.approx(3 / 8)  # unique {1,2,3} of 8 tokens
    # bigrams: a -> (1,2),(2,3),(3,1); b -> (1,1) x3; unique {(1,2),(2,3),(3,1),(1,1)} of 6
    assert d["distinct_2"] == pytest.approx(4 / 6)
    assert d["rep_1"] == pytest.approx(((1 - 3 / 4) + (1 - 1 / 4)) / 2)
    assert d["rep_2"] == pytest.approx(((1 - 3 / 3) + (1 - 1 / 3)) / 2)
    assert unigram_entropy(list(range(16))) == pytest.approx(math.log(16))


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = tmp_path_factory.mktemp("evallm")
    words = ["<eos>", "<unk>", "the", "cat", "sat", "on", "mat", "a", "dog"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), eos_token="<eos>",
                                                unk_token="<unk>", pad_token="<eos>")
    fast.save_pretrained(str(d))
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=len(words), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(d))
    return d


def test_generative_perplexity_equals_exp_mean_nll_by_hand(lm_dir):
    import transformers

    texts = ["the cat sat on the mat", "a dog sat"]
    lm = EvalLM(str(lm_dir))
    ppl = lm.perplexity(texts)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(lm_dir)).eval()
    total, count = 0.0, 0
    ids_of = {"the": 2, "cat": 3, "sat": 4, "on": 5, "mat": 6, "a": 7, "dog": 8}
    for t in texts:
        ids = [0] + [ids_of[w] for w in t.split()]  # <eos> starts every text
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        for i in range(1, len(ids)):
            total -= float(torch.log_softmax(logits[i - 1].double(), -1)[ids[i]])
            count += 1
    assert count == 9
    assert ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_missing_eval_lm_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="not a Hugging Face model directory") as e:
        EvalLM(str(tmp_path / "nope"))
    assert "\n" not in str(e.value)
