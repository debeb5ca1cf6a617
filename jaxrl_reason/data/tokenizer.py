"""Tokenizers: a character-level one for the synthetic tasks, and batch helpers for any HF tokenizer.

The character tokenizer (built with `tokenizers`, wrapped in `PreTrainedTokenizerFast`, saved with
`save_pretrained`, reloaded offline with `AutoTokenizer.from_pretrained`) has one id per character of the
alphabet plus the special tokens `<pad>` (id 0), `<eos>` (1), `<mask>` (2, masked diffusion), `<unk>` (3, any
character outside the alphabet). With the default alphabet its vocabulary has `DEFAULT_VOCAB_SIZE` = 25 ids.
Any string over the alphabet round-trips exactly (spaces, repeated spaces and newlines included).

Padding layout (static shapes):
  prompts    left-padded to P:   ids_BxP = [pad .. pad, p_0 .. p_n]          mask_BxP True on real tokens
  responses  right-padded to T:  ids_BxT = [r_0 .. r_m, eos, pad .. pad]     mask_BxT True on r and eos
"""
import os

import numpy as np

SPECIAL_TOKENS = ("<pad>", "<eos>", "<mask>", "<unk>")
DEFAULT_ALPHABET = "0123456789+-=#: \nchek"   # digits, operators, `####`, `check`, space, newline
DEFAULT_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(DEFAULT_ALPHABET)


def build_char_tokenizer(out_dir: str, alphabet: str = DEFAULT_ALPHABET):
    """Builds, saves (`save_pretrained(out_dir)`) and reloads a character-level tokenizer.

    Ids: `SPECIAL_TOKENS` first (pad=0, eos=1, mask=2, unk=3), then the alphabet in the given order.
    No BOS/EOS is added by `tok(text)`; `encode_responses_right_padded` appends EOS explicitly.

    Returns:
      The tokenizer as reloaded by `AutoTokenizer.from_pretrained(out_dir)` (a `PreTrainedTokenizerFast`).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if not alphabet or len(set(alphabet)) != len(alphabet):
        raise ValueError(f"alphabet must be non-empty with no repeated characters, got {alphabet!r}.")
    if "<" in alphabet:
        raise ValueError("alphabet must not contain '<', which would make special-token names ambiguous.")
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + list(alphabet))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")   # one piece per char
    tok.decoder = decoders.Fuse()                                                     # join without spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   mask_token="<mask>", unk_token="<unk>", clean_up_tokenization_spaces=False)
    fast.save_pretrained(out_dir)
    return load_tokenizer(out_dir)


def load_tokenizer(path: str):
    """Loads any local Hugging Face tokenizer directory offline (`AutoTokenizer`, `local_files_only=True`)."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"Tokenizer directory {path!r} does not exist.")
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any(os.path.exists(os.path.join(path, n)) for n in names):
        raise FileNotFoundError(f"Directory {path!r} holds no tokenizer files (tokenizer.json, ...).")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _encode(tok, texts) -> list[list[int]]:
    if isinstance(texts, str):
        raise ValueError("texts must be a list of strings, not a single string.")
    if not texts:
        return []
    return tok(list(texts), add_special_tokens=False)["input_ids"]


def _pad_id(tok) -> int:
    if tok.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tok.pad_token before encoding batches.")
    return int(tok.pad_token_id)


def encode_batch_left_padded(tok, texts, max_len: int, on_overflow: str = "raise"):
    """Encodes prompts, left-padded to `max_len` (no special tokens added).

    Args:
      on_overflow: "raise" (ValueError naming the row) or "truncate_left" (keep the last `max_len` tokens).

    Returns:
      ids_BxP int32 with P = max_len (pad id left of the tokens), mask_BxP bool (True on real tokens).
    """
    if on_overflow not in ("raise", "truncate_left"):
        raise ValueError(f"on_overflow must be 'raise' or 'truncate_left', got {on_overflow!r}.")
    pad = _pad_id(tok)
    rows = _encode(tok, texts)
    ids_BxP = np.full((len(rows), max_len), pad, np.int32)
    mask_BxP = np.zeros((len(rows), max_len), bool)
    for i, row in enumerate(rows):
        if len(row) > max_len:
            if on_overflow == "raise":
                raise ValueError(f"prompt {i} has {len(row)} tokens, more than max_len={max_len}.")
            row = row[len(row) - max_len:]
        if row:
            ids_BxP[i, max_len - len(row):] = row
            mask_BxP[i, max_len - len(row):] = True
    return ids_BxP, mask_BxP


def encode_responses_right_padded(tok, texts, max_len: int, add_eos: bool = True, on_overflow: str = "raise"):
    """Encodes responses, `+ [eos]` if `add_eos`, right-padded to `max_len`.

    Args:
      on_overflow: "raise" (ValueError naming the row) or "truncate" (keep the first `max_len` tokens, so a
        truncated response has no EOS, like an overlong sample).

    Returns:
      ids_BxT int32 with T = max_len, mask_BxT bool (True on response tokens and the EOS).
    """
    if on_overflow not in ("raise", "truncate"):
        raise ValueError(f"on_overflow must be 'raise' or 'truncate', got {on_overflow!r}.")
    pad = _pad_id(tok)
    if add_eos and tok.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token but add_eos=True.")
    rows = _encode(tok, texts)
    ids_BxT = np.full((len(rows), max_len), pad, np.int32)
    mask_BxT = np.zeros((len(rows), max_len), bool)
    for i, row in enumerate(rows):
        row = list(row) + ([int(tok.eos_token_id)] if add_eos else [])
        if len(row) > max_len:
            if on_overflow == "raise":
                raise ValueError(f"response {i} has {len(row)} tokens with EOS, more than max_len={max_len}.")
            row = row[:max_len]
        ids_BxT[i, :len(row)] = row
        mask_BxT[i, :len(row)] = True
    return ids_BxT, mask_BxT


def decode_until_eos(tok, ids_BxT) -> list[str]:
    """Decodes each row up to (excluding) its first EOS; pad ids are dropped, other specials kept as text.

    Args:
      ids_BxT: int array `[B, T]` (numpy or jax) of sampled response tokens.

    Returns:
      B strings. A row without EOS (truncated) decodes in full.
    """
    ids_BxT = np.asarray(ids_BxT)
    if ids_BxT.ndim != 2:
        raise ValueError(f"ids_BxT must be 2-D [B, T], got shape {ids_BxT.shape}.")
    eos, pad = tok.eos_token_id, tok.pad_token_id
    out = []
    for row in ids_BxT.tolist():
        if eos is not None and eos in row:
            row = row[:row.index(eos)]
        row = [t for t in row if t != pad]
        out.append(tok.decode(row, skip_special_tokens=False, clean_up_tokenization_spaces=False))
    return out
