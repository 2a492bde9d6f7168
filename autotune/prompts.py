"""Real prompts for a tune (``autotune tune MODEL --prompts FILE``).

Every option autotune measures decodes at a speed set by the shapes alone (batch, prompt
length, new tokens) — except the ones whose work depends on the text. Prompt-lookup decoding
(``generate(prompt_lookup_num_tokens=N)``) proposes the tokens that followed the last n-gram's
earlier occurrence in the prompt, and one forward verifies them all: its gain is the share of
the output that the prompt already holds (high when a model quotes, edits or continues code;
nothing for open-ended text). So it is measured only on the user's own prompts.

The file holds one prompt per line (``.txt``; blank lines skipped), one JSON string or object
with ``"prompt"`` or ``"text"`` per line (``.jsonl``), or a JSON list of those (``.json``), the
last two for prompts that span lines. They are tokenized with the model folder's own tokenizer
(``AutoTokenizer``), at most :data:`MAX_PROMPTS` of them, each cut to its last ``prompt_len``
tokens where one is given. Each prompt is then one timed generate (left-padded to the longest,
so that every call has one shape).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError, read_json_file, read_text_file

# Prompts measured at most (each is one generate of every timed run of a text-dependent candidate)
MAX_PROMPTS = 8
_KEYS = ("prompt", "text")


@dataclass(frozen=True)
class Prompts:
    ids: tuple[tuple[int, ...], ...]  # token ids of each prompt, as measured (cut to prompt_len)
    source: str  # the file's name
    total: int  # prompts in the file
    truncated: int  # how many were cut to their last prompt_len tokens

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.ids).encode()).hexdigest()[:16]

    @property
    def longest(self) -> int:
        return max(len(p) for p in self.ids)

    def describe(self) -> str:
        """What the workload records: the file, how many prompts, the digest of their tokens."""
        return f"{self.source}: {len(self.ids)} prompts, sha256:{self.digest}"

    def notes(self) -> list[str]:
        out = []
        if self.total > len(self.ids):
            out.append(f"--prompts: the first {len(self.ids)} of the {self.total} prompts in {self.source} were measured")
        if self.truncated:
            out.append(f"--prompts: {self.truncated} prompt(s) cut to their last {self.longest} tokens (--prompt-len)")
        return out


def _entry(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        for k in _KEYS:
            if isinstance(value.get(k), str):
                return value[k]
    raise UserError(f"{where}: expected a prompt (a string, or an object with \"prompt\" or \"text\"), found {json.dumps(value)[:60]}")


def read_texts(path: str | Path) -> list[str]:
    """The prompts in ``path``, as text (see the module's docstring for the formats)."""
    p = Path(path)
    if p.suffix == ".json":
        data = read_json_file(p, "--prompts")
        if not isinstance(data, list):
            raise UserError(f"--prompts: {p.name} must hold a JSON list of prompts, found {type(data).__name__}")
        texts = [_entry(v, f"--prompts: {p.name} item {i + 1}") for i, v in enumerate(data)]
    elif p.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(read_text_file(p, "--prompts").splitlines(), 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"--prompts: {p.name} line {n} is not valid JSON ({e.msg})") from None
            texts.append(_entry(value, f"--prompts: {p.name} line {n}"))
    else:
        texts = [line for line in read_text_file(p, "--prompts").splitlines() if line.strip()]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UserError(f"--prompts: {p.name} holds no prompt")
    return texts


def load(path: str | Path, model_dir: str | Path, *, prompt_len: int | None = None, limit: int = MAX_PROMPTS,
         trust_remote_code: bool = False) -> Prompts:
    """Read and tokenize the prompts in ``path`` with ``model_dir``'s tokenizer."""
    texts = read_texts(path)
    tok = tokenizer(model_dir, trust_remote_code=trust_remote_code)
    ids = [list(row) for row in tok(texts[:limit], add_special_tokens=True)["input_ids"]]
    truncated = 0
    if prompt_len is not None:
        truncated = sum(len(r) > prompt_len for r in ids)
        ids = [r[-prompt_len:] for r in ids]
    ids = [r for r in ids if r]
    if not ids:
        raise UserError(f"--prompts: the prompts in {Path(path).name} tokenize to nothing")
    return Prompts(ids=tuple(tuple(r) for r in ids), source=Path(path).name, total=len(texts), truncated=truncated)


def tokenizer(model_dir: str | Path, *, trust_remote_code: bool = False) -> Any:
    """The model folder's own tokenizer, or one line saying why there is none."""
    folder = Path(model_dir)
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
        raise UserError(f"--prompts needs the model's tokenizer, and {folder} has none (tokenizer.json or tokenizer_config.json): "
                        "save it beside the weights (tokenizer.save_pretrained(folder))")
    try:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - a broken or unknown tokenizer: one line
        raise UserError(f"--prompts: cannot load the tokenizer in {folder} ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None
