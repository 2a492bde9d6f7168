"""A Llama trained here, on text every machine has offline (the Python standard library's own
sources), so that quantization's effect on quality can be measured: random weights give nearly
flat output distributions, where a lossy format looks harmless or broken for the wrong reasons.

    from autotune import textmodel
    textmodel.train("/tmp/trained", shape=textmodel.TINY, seconds=20)        # CPU, for tests
    textmodel.train("/tmp/trained-1.1b", shape=textmodel.LLAMA_1_1B, seconds=240)  # a GPU
    textmodel.compare_configs("/tmp/trained", [cfg_a, cfg_b])                  # KL, top-1, perplexity

The corpus is every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` (tests excluded),
split by a hash of the file's path: one file in ten is held out, never trained on. The tokenizer
is a byte-level BPE trained on the training files (``tokenizers``), saved with the model, so the
folder loads with ``AutoTokenizer`` / ``AutoModelForCausalLM`` like any other.
"""

from __future__ import annotations

import hashlib
import json
import math
import sysconfig
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

TINY = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
LLAMA_1_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4)
HELD_OUT = 10  # one file in this many is held out
SPECIALS = ["<s>", "</s>", "<pad>"]


def corpus_files(limit: int | None = None, *, site_packages: bool = False) -> tuple[list[Path], list[Path]]:
    """(train, held-out) Python source files: the stdlib's (tests excluded), and with
    ``site_packages`` the installed packages' too (a bigger corpus for a bigger model), in an
    order fixed by a hash of each path (so any prefix mixes every package)."""
    roots = [Path(sysconfig.get_paths()["stdlib"])] + ([Path(sysconfig.get_paths()["purelib"])] if site_packages else [])
    files = []
    for root in roots:
        files += [(root, p) for p in root.rglob("*.py") if "test" not in str(p.relative_to(root)).lower()
                  and (site_packages and root != roots[0] or "site-packages" not in p.parts)]
    keyed = sorted((hashlib.sha256(str(p.relative_to(root)).encode()).hexdigest(), p) for root, p in files)
    train, held = [], []
    for h, p in keyed:
        (held if int(h, 16) % HELD_OUT == 0 else train).append(p)
    if limit is not None:
        train, held = train[:limit], held[: max(1, limit // HELD_OUT)]
    return train, held


def read_texts(files: Iterable[Path]) -> Iterator[str]:
    for p in files:
        try:
            yield p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def train_tokenizer(files: list[Path], vocab_size: int) -> Any:
    """A byte-level BPE over ``files``, as a transformers fast tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(read_texts(files), vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS, show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def token_stream(tokenizer: Any, files: list[Path], max_tokens: int | None = None) -> Any:
    """The files' tokens, each file followed by EOS, as one 1-D tensor (at most ``max_tokens``)."""
    import torch

    ids: list[int] = []
    texts = list(read_texts(files)) if max_tokens is None else None
    it = iter(read_texts(files))
    while max_tokens is None or len(ids) < max_tokens:
        chunk = texts if texts is not None else [t for _, t in zip(range(256), it)]
        if not chunk:
            break
        for row in tokenizer(chunk, add_special_tokens=False)["input_ids"]:  # batched: the fast tokenizer's threads
            ids += row + [tokenizer.eos_token_id]
        if texts is not None:
            break
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)


def windows(stream: Any, length: int, count: int) -> Any:
    """``count`` evenly spaced windows of ``length`` tokens (held-out evaluation: fixed, not sampled)."""
    import torch

    n = stream.numel() - length
    if n <= 0:
        raise ValueError(f"the held-out text has {stream.numel()} tokens, fewer than one window of {length}")
    starts = torch.linspace(0, n, steps=min(count, n)).long()
    return torch.stack([stream[s:s + length] for s in starts])


def train(out_dir: str | Path, *, shape: dict[str, int] | None = None, vocab_size: int = 4096, seq_len: int = 256, batch_size: int = 16,
          seconds: float = 60.0, lr: float = 1e-3, limit_files: int | None = None, seed: int = 0, device: str | None = None,
          site_packages: bool = False, max_tokens: int | None = None, tokenizer_files: int = 4000, log: Any = None) -> dict[str, Any]:
    """Train a Llama of ``shape`` on the stdlib corpus for ``seconds`` of wall time (AdamW, warm-up
    then cosine decay over the time budget; bf16 autocast on CUDA), save it in bfloat16 with its
    tokenizer in ``out_dir``, and return what happened (``autotune-train.json`` there too): steps,
    tokens, the last training loss and the held-out perplexity."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    train_files, held_files = corpus_files(limit_files, site_packages=site_packages)
    tok = train_tokenizer(train_files[:tokenizer_files], vocab_size)
    data = token_stream(tok, train_files, max_tokens)
    held = token_stream(tok, held_files, 2_000_000)
    (out / "heldout.txt").write_text("\n".join(str(p) for p in held_files[:2000]), encoding="utf-8")
    if log:
        log(f"corpus: {data.numel():,} training tokens, {held.numel():,} held out ({time.perf_counter() - t0:.0f} s)")
    t_data = time.perf_counter() - t0
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=max(4096, seq_len), bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **(shape or TINY))
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa").to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=device == "cuda")
    g = torch.Generator().manual_seed(seed)
    warmup, step, loss_v = 50, 0, float("nan")
    start = time.perf_counter()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and step > 0:
            break
        frac = min(elapsed / seconds, 1.0)
        scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        idx = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=g)
        batch = torch.stack([data[i:i + seq_len + 1] for i in idx.tolist()]).to(device)
        with autocast:
            logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0 or step == 1:
            loss_v = loss.item()
            if log:
                log(f"step {step} loss {loss_v:.3f} ({time.perf_counter() - start:.0f} s)")
    loss_v = loss.item()
    train_s = time.perf_counter() - start
    model.eval()
    model = model.to(torch.bfloat16)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    ppl = perplexity(model, windows(held, seq_len, 32).to(device))
    stats = {"shape": shape or TINY, "vocab": len(tok), "seq_len": seq_len, "batch_size": batch_size, "steps": step,
             "train_tokens": step * batch_size * seq_len, "corpus_tokens": int(data.numel()), "heldout_tokens": int(held.numel()),
             "train_files": len(train_files), "heldout_files": len(held_files), "last_loss": round(loss_v, 4),
             "heldout_ppl_bf16": round(ppl, 3), "data_s": round(t_data, 1), "train_s": round(train_s, 1), "device": device}
    (out / "autotune-train.json").write_text(json.dumps(stats, indent=1), encoding="utf-8")
    return stats


def heldout_windows(model_dir: str | Path, length: int = 256, count: int = 32) -> Any:
    """Held-out windows for a model folder :func:`train` wrote (its tokenizer, its held-out files)."""
    from transformers import AutoTokenizer

    d = Path(model_dir)
    tok = AutoTokenizer.from_pretrained(d)
    files = [Path(line) for line in (d / "heldout.txt").read_text(encoding="utf-8").splitlines() if line]
    return windows(token_stream(tok, files, length * count * 4), length, count)


def heldout_prompts(model_dir: str | Path, path: str | Path, *, count: int = 8, tokens: int = 256, skip: int = 0) -> list[str]:
    """Write ``count`` real prompts to ``path`` (.jsonl, one JSON string a line, what ``autotune
    tune --prompts`` reads): the first ``tokens`` tokens of held-out files (never trained on) of
    at least twice that length, after the first ``skip`` such files; returns them."""
    from transformers import AutoTokenizer

    d = Path(model_dir)
    tok = AutoTokenizer.from_pretrained(d)
    files = [Path(line) for line in (d / "heldout.txt").read_text(encoding="utf-8").splitlines() if line]
    out: list[str] = []
    seen = 0
    for text in read_texts(files):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) < 2 * tokens:
            continue
        seen += 1
        if seen > skip:
            out.append(tok.decode(ids[:tokens]))
        if len(out) == count:
            break
    if not out:
        raise ValueError(f"no held-out file of {2 * tokens} tokens or more in {d / 'heldout.txt'}")
    Path(path).write_text("".join(json.dumps(t) + "\n" for t in out), encoding="utf-8")
    return out


def perplexity(model: Any, ids: Any, batch: int = 8) -> float:
    """exp(mean next-token NLL) over every position of ``ids`` (teacher-forced)."""
    import torch

    total, n = 0.0, 0
    with torch.inference_mode():
        for i in range(0, ids.shape[0], batch):
            x = ids[i:i + batch].to(next(model.parameters()).device)
            lp = model(input_ids=x).logits[:, :-1].float().log_softmax(-1)
            total += float(-lp.gather(-1, x[:, 1:, None]).sum())
            n += x[:, 1:].numel()
    return math.exp(total / n)


def compare_configs(model_dir: str | Path, configs: dict[str, dict[str, Any]], *, reference: str, length: int = 256, count: int = 32,
                    batch: int = 4) -> dict[str, dict[str, float]]:
    """Each config's quality on held-out text against ``reference`` (a key of ``configs``), all
    teacher-forced on the same windows: perplexity, mean KL(reference || candidate) per token
    (nats) and top-1 agreement. Each model is loaded with :func:`autotune.load` (uncompiled:
    compiling changes speed, not these figures beyond rounding)."""
    import torch

    from .config import load

    ids = heldout_windows(model_dir, length, count)
    ref_model = load(model_dir, _uncompiled(configs[reference]))
    out: dict[str, dict[str, float]] = {}
    for name, cfg in configs.items():
        m = ref_model if name == reference else load(model_dir, _uncompiled(cfg))
        nll, kl, agree, n = 0.0, 0.0, 0.0, 0
        with torch.inference_mode():
            for i in range(0, ids.shape[0], batch):
                x = ids[i:i + batch].to(next(m.parameters()).device)
                lq = m(input_ids=x).logits[:, :-1].float().log_softmax(-1)
                lp = ref_model(input_ids=x.to(next(ref_model.parameters()).device)).logits[:, :-1].float().log_softmax(-1).to(lq.device)
                nll += float(-lq.gather(-1, x[:, 1:, None]).sum())
                kl += float((lp.exp() * (lp - lq)).sum(-1).sum())
                agree += float((lp.argmax(-1) == lq.argmax(-1)).sum())
                n += x[:, 1:].numel()
        out[name] = {"ppl": round(math.exp(nll / n), 4), "kl": max(0.0, kl / n), "top1": round(agree / n, 4), "tokens": n}
        if m is not ref_model:
            del m
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return out


def _uncompiled(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config's weights and attention, without its decode-time parts (cache, compile, loop)."""
    return {"from_pretrained": dict(cfg.get("from_pretrained") or {}), "generate": {},
            "runtime": {k: v for k, v in (cfg.get("runtime") or {}).items() if k == "sdpa_backend"}}
