"""Character tokenizer: ids by hand, exact round trips, padding layouts, offline reload of any HF tokenizer."""
import os

import numpy as np
import pytest

from jaxrl_reason.data import tokenizer as T


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return T.build_char_tokenizer(str(tmp_path_factory.mktemp("char_tok")))


def _id(ch):   # hand rule: specials first, then the default alphabet in order
    return len(T.SPECIAL_TOKENS) + T.DEFAULT_ALPHABET.index(ch)


def test_vocab_and_special_ids(tok):
    from transformers import PreTrainedTokenizerFast

    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(tok) == T.DEFAULT_VOCAB_SIZE == 25
    assert (tok.pad_token_id, tok.eos_token_id, tok.mask_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<eos>", "<mask>", "<unk>"]
    assert tok("12+7:", add_special_tokens=False)["input_ids"] == [5, 6, 14, 11, 18]
    assert tok("12+7:", add_special_tokens=False)["input_ids"] == [_id(c) for c in "12+7:"]
    assert tok("1x", add_special_tokens=False)["input_ids"] == [5, 3]   # outside the alphabet -> <unk>


def test_exact_round_trip_over_alphabet(tok):
    rng = np.random.default_rng(0)
    texts = ["12+7=19 19+30=49 #### 49", "  12  +\n\n3 \n", " ", "\n", "check 1+2=3\n", "heck: -7",
             *("".join(rng.choice(list(T.DEFAULT_ALPHABET), size=n)) for n in (1, 7, 50, 200))]
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert ids == [_id(c) for c in t]                     # exactly one id per character
        assert tok.decode(ids) == t


def test_reload_offline_gives_same_tokenizer(tok, tmp_path):
    T.build_char_tokenizer(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["tokenizer.json", "tokenizer_config.json"]
    again = T.load_tokenizer(str(tmp_path))
    s = "5+6=11 check 5+6=11\n#### 11"
    assert again(s, add_special_tokens=False)["input_ids"] == tok(s, add_special_tokens=False)["input_ids"]
    assert again.decode(again(s, add_special_tokens=False)["input_ids"]) == s


def test_custom_alphabet_and_bad_alphabets(tmp_path):
    small = T.build_char_tokenizer(str(tmp_path / "ab"), alphabet="ab \n")
    assert len(small) == 8 and small("b a\n", add_special_tokens=False)["input_ids"] == [5, 6, 4, 7]
    with pytest.raises(ValueError, match="repeated"):
        T.build_char_tokenizer(str(tmp_path / "x"), alphabet="aa")
    with pytest.raises(ValueError, match="<"):
        T.build_char_tokenizer(str(tmp_path / "y"), alphabet="a<")


def test_load_tokenizer_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        T.load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        T.load_tokenizer(str(tmp_path))


def test_left_padded_prompts_hand_computed(tok):
    ids, mask = T.encode_batch_left_padded(tok, ["1+2:", "12:", ""], max_len=5)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == (3, 5)
    np.testing.assert_array_equal(ids, [[0, 5, 14, 6, 18], [0, 0, 5, 6, 18], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match="prompt 0 has 4 tokens"):
        T.encode_batch_left_padded(tok, ["1+2:"], max_len=3)
    ids, mask = T.encode_batch_left_padded(tok, ["1+2:"], max_len=3, on_overflow="truncate_left")
    np.testing.assert_array_equal(ids, [[14, 6, 18]])
    with pytest.raises(ValueError, match="list of strings"):
        T.encode_batch_left_padded(tok, "1+2:", max_len=5)


def test_right_padded_responses_hand_computed(tok):
    ids, mask = T.encode_responses_right_padded(tok, ["#### 3", "12"], max_len=8)
    np.testing.assert_array_equal(ids, [[17, 17, 17, 17, 19, 7, 1, 0], [5, 6, 1, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0, 0, 0]])
    ids, _ = T.encode_responses_right_padded(tok, ["12"], max_len=3, add_eos=False)
    np.testing.assert_array_equal(ids, [[5, 6, 0]])
    with pytest.raises(ValueError, match="response 0 has 3 tokens"):
        T.encode_responses_right_padded(tok, ["12"], max_len=2)
    ids, mask = T.encode_responses_right_padded(tok, ["123"], max_len=2, on_overflow="truncate")
    np.testing.assert_array_equal(ids, [[5, 6]])                  # truncated: no EOS
    np.testing.assert_array_equal(mask, [[1, 1]])


def test_decode_until_eos(tok):
    ids = np.array([[5, 6, 1, 7, 7, 0], [5, 0, 6, 2, 0, 0], [7, 7, 7, 7, 7, 7], [1, 5, 0, 0, 0, 0]])
    assert T.decode_until_eos(tok, ids) == ["12", "12<mask>", "333333", ""]
    texts = ["1+2=3 #### 3", "check 4+4=8\n#### 8"]
    enc, _ = T.encode_responses_right_padded(tok, texts, max_len=24)
    assert T.decode_until_eos(tok, enc) == texts
    with pytest.raises(ValueError, match="2-D"):
        T.decode_until_eos(tok, ids[0])


def test_helpers_work_with_a_bpe_hf_tokenizer(tmp_path):
    """load_tokenizer + helpers on a different HF tokenizer kind (byte-level BPE)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|pad|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["the answer is 42", "what is 6 times 7"] * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|pad|>", eos_token="<|eos|>").save_pretrained(
        str(tmp_path))
    hf = T.load_tokenizer(str(tmp_path))
    texts = ["the answer is 42", "6 times 7 ünïcode"]
    enc, mask = T.encode_responses_right_padded(hf, texts, max_len=40)
    assert T.decode_until_eos(hf, enc) == texts
    ids, mask = T.encode_batch_left_padded(hf, texts, max_len=40)
    n0 = len(hf(texts[0], add_special_tokens=False)["input_ids"])
    assert mask[0].sum() == n0 and not mask[0, :40 - n0].any() and (ids[0, :40 - n0] == hf.pad_token_id).all()
