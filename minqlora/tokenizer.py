"""Text <-> token ids for a Hugging Face model folder: SentencePiece `tokenizer.model` or `tokenizer.json`.
No paper section.

Checked against transformers 5's `AutoTokenizer.from_pretrained(folder)` (tests/test_tokenizer.py):
`encode(text)` gives its `tok(text, add_special_tokens=False).input_ids`, `encode(text, bos=True)` its
`tok(text).input_ids` for Llama folders, and `decode` its `decode(ids, skip_special_tokens=True)`.

How transformers 5 treats a Llama SentencePiece model, and so how this file does:
- No dummy prefix from SentencePiece itself. Spaces become "▁", and one "▁" is prepended only when the
  text does not already start with a space ("first" prepend scheme, `legacy: false`). So " Hello" is
  [▁Hello], where plain sentencepiece gives [▁, ▁Hello]. `legacy: true` prepends to every chunk
  between special tokens, `add_prefix_space: false` never prepends.
- Special-token strings in the text ("<s>", "</s>", "<unk>") become their ids, as transformers does.
- Decoding drops specials, turns "▁" into spaces, joins <0xNN> byte pieces, strips one leading space.
Ids come from sentencepiece's own BPE (merges ranked by piece score), as do transformers' from a
tokenizer.json whose merges are ranked by score (transformers 4 wrote them so). Converting a bare tokenizer.model, transformers ranks merges by
piece id instead; that differs only where scores don't follow ids, in Llama-2 the whitespace-run pieces
("▁▁" is id 259 but scored last), so only text with runs of spaces can tokenize differently there
("a  b"). On the course's train.json (30,000 instructions, outputs and prompts) the two agree.
"""
import re
from pathlib import Path

import sentencepiece as spm

from .config import read_json_object
from .errors import BadInput, is_int

# A NormalizerSpec appended to the serialized ModelProto (field 3, length 4) holding
# add_dummy_prefix (field 3) = false and remove_extra_whitespaces (field 4) = false. Protobuf
# merges a repeated message field into the earlier one, so these two settings override the
# model's own and everything else is kept; we add the "▁" prefix ourselves, as transformers does.
_NO_DUMMY_PREFIX = b"\x1a\x04\x18\x00\x20\x00"
_LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")  # a tuple: `in` takes any JSON value


class _SentencePiece:
    """tokenizer.model through sentencepiece, with transformers' LlamaTokenizer whitespace rules."""

    def __init__(self, path, prepend_scheme):
        self.sp = spm.SentencePieceProcessor(model_proto=path.read_bytes() + _NO_DUMMY_PREFIX)
        self.prepend_scheme = prepend_scheme  # "first", "always" or "never"
        n = self.sp.get_piece_size()
        self.vocab_size = n
        self.special = {self.sp.id_to_piece(i): i for i in range(n)
                        if self.sp.is_control(i) or self.sp.is_unknown(i)}
        self.special_ids = set(self.special.values())
        # Longest first, so the regex prefers "</s>" over a shorter special starting at the same place.
        names = sorted(self.special, key=len, reverse=True)
        self.special_re = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None

    def token_id(self, token):
        i = self.sp.piece_to_id(token)  # unknown pieces map to unk: check the round trip
        return i if self.sp.id_to_piece(i) == token else None

    def encode(self, text):
        parts = self.special_re.split(text) if self.special_re else [text]
        ids = []
        for k, part in enumerate(parts):
            if k % 2:  # re.split puts the matched special tokens at odd positions
                ids.append(self.special[part])
            elif part:
                prefix = self.prepend_scheme == "always" or (self.prepend_scheme == "first" and k == 0)
                if prefix and not part.startswith((" ", "▁")):
                    part = " " + part
                ids += self.sp.encode(part)
        return ids

    def decode(self, ids, skip_special):
        out, pending = [], bytearray()

        def flush():  # consecutive byte pieces form UTF-8; invalid bytes become one U+FFFD each
            if pending:
                try:
                    out.append(pending.decode("utf-8"))
                except UnicodeDecodeError:
                    out.append("\ufffd" * len(pending))
                pending.clear()

        for i in ids:
            if skip_special and i in self.special_ids:
                continue
            piece = self.sp.id_to_piece(i)
            if self.sp.is_byte(i):
                pending.append(int(piece[3:5], 16))  # "<0xE4>" -> 0xE4
                continue
            flush()
            out.append(piece.replace("▁", " "))
        flush()
        text = "".join(out)
        if self.prepend_scheme != "never" and text.startswith(" "):
            text = text[1:]
        return text


class _TokenizersJson:
    """tokenizer.json through the `tokenizers` library (Llama-3, Mistral, SmolLM style folders)."""

    def __init__(self, path, prepend_scheme, llama_class):
        from tokenizers import Tokenizer as RustTokenizer, decoders, pre_tokenizers

        self.tk = RustTokenizer.from_file(str(path))
        if llama_class:
            # transformers 5 keeps only the vocab, merges and added tokens of a LlamaTokenizer's
            # tokenizer.json and rebuilds the rest, as below (the same rules as _SentencePiece).
            self.tk.normalizer = None
            self.tk.pre_tokenizer = pre_tokenizers.Metaspace(
                replacement="▁", prepend_scheme=prepend_scheme, split=False)
            steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
            if prepend_scheme != "never":
                steps.append(decoders.Strip(content=" ", left=1))
            self.tk.decoder = decoders.Sequence(steps)
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        self.bos_id = self.eos_id = None  # only the folder's config files name them

    def token_id(self, token):
        return self.tk.token_to_id(token)

    def encode(self, text):
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special):
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)


def _ids(cfg: dict, key: str, path: Path) -> list:
    """A config's token ids under `key`: an int, a list of ints (Llama-3's eos_token_id) or null (none);
    a negative id means none too (early Llama conversions wrote pad_token_id -1)."""
    value = cfg.get(key)
    ids = value if isinstance(value, list) else [] if value is None else [value]
    if not all(is_int(i) for i in ids):
        raise BadInput(f"{path}: {key}={value!r}: must be a token id (a whole number), a list of them or null")
    return [i for i in ids if i >= 0]


def special_token(path: Path, name: str, files: dict):
    """The `{name}_token` string of tokenizer_config.json (else special_tokens_map.json), or None; `files`
    holds those two files' contents (read_json_object). chat.py passes the same strings to templates."""
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        token = files[file].get(f"{name}_token")
        if isinstance(token, dict):  # {"content": "<s>", "__type": "AddedToken", ...}
            token = token.get("content")
        if token is not None and not isinstance(token, str):
            raise BadInput(f"{path / file}: {name}_token={token!r}: must be a string, an object with a "
                           "\"content\" string, or null")
        if f"{name}_token" in files[file]:
            return token
    return None


def _backend(path: Path, prepend_scheme: str, llama_class: bool):
    """The tokenizer.model (first) or tokenizer.json of the folder; a damaged one is refused naming it."""
    file = path / ("tokenizer.model" if (path / "tokenizer.model").exists() else "tokenizer.json")
    if not file.exists():
        raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in {path}")
    try:
        if file.name == "tokenizer.model":
            return _SentencePiece(file, prepend_scheme)
        return _TokenizersJson(file, prepend_scheme, llama_class)
    except Exception as e:  # sentencepiece raises RuntimeError, tokenizers a bare Exception: the file is damaged
        what = "not a SentencePiece model" if file.name == "tokenizer.model" else "not a tokenizers JSON file"
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(f"{file}: cannot read it: {what} ({detail})") from None


class Tokenizer:
    """encode/decode plus the special ids a training or generation loop needs.

    bos_id/eos_id: the tokenizer files' bos_token/eos_token strings (what transformers' tokenizer
    adds), else config.json, else generation_config.json, else the SentencePiece model's own.
    pad_token_id: the folder's pad token, or None (Llama-2 has none). pad_id: pad_token_id if set,
    else 0 (<unk> in Llama-2), never eos, so code that masks labels where input == pad cannot
    also mask the real end-of-sequence token. Padded positions are masked out of loss and attention.
    stop_ids: every id a generation loop should stop on (eos_id plus the configs' eos ids).
    """

    def __init__(self, backend, bos_id, eos_id, pad_token_id, stop_ids):
        self.backend = backend
        self.vocab_size = backend.vocab_size
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pad_token_id = pad_token_id
        self.pad_id = pad_token_id if pad_token_id is not None else 0
        self.stop_ids = stop_ids

    @classmethod
    def from_dir(cls, path):
        """The folder's tokenizer, special ids from its tokenizer_config.json, special_tokens_map.json,
        config.json and generation_config.json; a damaged file is refused naming it (BadInput)."""
        path = Path(path)
        if not path.is_dir():
            raise BadInput(f"{path}: no such model folder" if not path.exists() else f"{path}: not a model folder")
        files = {name: read_json_object(path / name) for name in (
            "special_tokens_map.json", "tokenizer_config.json", "config.json", "generation_config.json")}
        tok_cfg = {**files["special_tokens_map.json"], **files["tokenizer_config.json"]}
        # transformers' LlamaTokenizer: legacy defaults to False, add_prefix_space (even null) to True.
        if tok_cfg.get("add_prefix_space") is False:
            prepend_scheme = "never"
        else:
            prepend_scheme = "always" if tok_cfg.get("legacy", False) else "first"
        backend = _backend(path, prepend_scheme, tok_cfg.get("tokenizer_class") in _LLAMA_CLASSES)
        configs = ("config.json", "generation_config.json")

        def special_id(name):
            token = special_token(path, name, files)
            from_configs = [i for c in configs for i in _ids(files[c], f"{name}_token_id", path / c)[:1]]
            for candidate in (backend.token_id(token) if token else None, *from_configs,
                              getattr(backend, f"{name}_id", None)):
                if candidate is not None:
                    return candidate
            return None

        bos_id, eos_id = special_id("bos"), special_id("eos")
        stop_ids = {eos_id} if eos_id is not None else set()
        for c in configs:
            stop_ids.update(_ids(files[c], "eos_token_id", path / c))
        return cls(backend, bos_id, eos_id, special_id("pad"), tuple(sorted(stop_ids)))

    def encode(self, text, bos=False, eos=False):
        """Token ids of `text`; bos/eos add the special ids (a tokenizer without one adds nothing)."""
        ids = self.backend.encode(text)
        if bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids, skip_special=True):
        return self.backend.decode(ids, skip_special)
