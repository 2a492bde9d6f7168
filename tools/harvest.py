"""Harvest version gates from the libraries' released wheels into autotune/data/harvest.json,
and regenerate the harvested part of docs/VERIFIED.md from it. Run by hand (network, minutes),
not in CI; the test suite checks the rules against the table it writes.

    python tools/harvest.py                      # every package below
    python tools/harvest.py --only transformers  # one
    python tools/harvest.py --docs-only          # docs/VERIFIED.md from the table as it is

For each release (the first and the last patch of every minor in the ranges below) the wheel is
downloaded (``pip download --no-deps``) and its files are read as text, never imported: the
facts are what the release's own source says. Each row records the file each fact came from.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable

from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "autotune" / "data" / "harvest.json"
VERIFIED = ROOT / "docs" / "VERIFIED.md"
CACHE = Path("/tmp/autotune-harvest")

# (first, last) releases per package; every minor in between, its first and last patch
RANGES = {
    "transformers": ("4.0", None),
    "optimum": ("1.8", None),
    "accelerate": ("0.20", None),
    "bitsandbytes": ("0.39", None),
    "torchao": ("0.10", None),
}


def versions(package: str) -> list[str]:
    """Released versions (no pre-releases) from the index, first and last patch of each minor."""
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", package], capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("Available versions:"))
    vs = sorted({Version(v.strip()) for v in line.split(":", 1)[1].split(",") if v.strip()})
    vs = [v for v in vs if not v.is_prerelease and not v.is_devrelease]
    low = Version(RANGES[package][0])
    by_minor: dict[tuple[int, int], list[Version]] = {}
    for v in vs:
        if v >= low:
            by_minor.setdefault((v.major, v.minor), []).append(v)
    keep = sorted({x for group in by_minor.values() for x in (group[0], group[-1])})
    return [str(v) for v in keep]


def wheel(package: str, version: str) -> Path | None:
    CACHE.mkdir(parents=True, exist_ok=True)
    norm = package.replace("-", "_")
    have = list(CACHE.glob(f"{norm}-{version}-*.whl"))
    if not have:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", f"{package}=={version}",
                        "-d", str(CACHE)], capture_output=True, text=True)
        have = list(CACHE.glob(f"{norm}-{version}-*.whl"))
    return have[0] if have else None


def _read(z: zipfile.ZipFile, name: str) -> str:
    try:
        return z.read(name).decode("utf-8", errors="replace")
    except KeyError:
        return ""


def _metadata(z: zipfile.ZipFile) -> dict[str, Any]:
    meta = next((n for n in z.namelist() if n.endswith(".dist-info/METADATA")), None)
    text = _read(z, meta) if meta else ""
    requires = re.findall(r"^Requires-Dist: (.+)$", text, re.M)
    python = re.search(r"^Requires-Python: (.+)$", text, re.M)
    torch = next((r for r in requires if re.match(r"torch\b", r) and "extra ==" not in r), None)
    return {"requires_python": python.group(1).strip() if python else None, "requires_torch": _norm_req(torch)}


def _norm_req(text: str | None) -> str | None:
    """One spelling per requirement ("torch (>=1.9)" and "torch>=1.9" are the same)."""
    if not text:
        return None
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        r = Requirement(text)
    except InvalidRequirement:
        return text.strip()
    return f"{r.name}{'[' + ','.join(sorted(r.extras)) + ']' if r.extras else ''}{r.specifier}"


def _first(pattern: str, text: str) -> str | None:
    m = re.search(pattern, text, re.M)
    return m.group(1) if m else None


def _last_version(text: str, function: str) -> str | None:
    """The last ``version.parse("X")`` in the body of ``def function`` (None: it compares with none)."""
    m = re.search(rf"def {function}\(.*?(?=\ndef |\Z)", text, re.S)
    hits = re.findall(r'version\.parse\("([0-9.]+)"\)', m.group(0)) if m else []
    return hits[-1] if hits else None


def _gate_before(text: str, marker: str, package: str, window: int = 600) -> str | None:
    """The version in the last ``version.parse(... "package" ...) <op> version.parse("X")`` within
    ``window`` characters before ``marker`` (the message of the error that gate raises)."""
    i = text.find(marker)
    if i < 0:
        return None
    hits = re.findall(r'version\(\s*"' + re.escape(package) + r'"\s*\)\s*\)\s*[<>=]+\s*version\.parse\(\s*"([0-9.]+)"', text[max(0, i - window):i])
    return hits[-1] if hits else None


# encoder model types whose SDPA support is harvested per release (autotune/model.py _ENCODER_TYPES)
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "distilbert", "albert", "electra", "deberta", "deberta-v2", "mpnet",
                 "camembert", "flaubert", "xlm", "ernie", "modernbert", "mobilebert", "squeezebert", "funnel", "longformer", "rembert",
                 "megatron-bert", "convbert", "luke", "layoutlm", "data2vec-text", "roformer", "nezha", "ibert", "canine", "esm")


def _sdpa_encoders(z: zipfile.ZipFile) -> list[str]:
    """The encoder types whose modeling file declares ``_supports_sdpa = True`` in this release."""
    out = []
    for t in ENCODER_TYPES:
        mod = t.replace("-", "_")
        text = _read(z, f"transformers/models/{mod}/modeling_{mod}.py")
        if re.search(r"^\s+_supports_sdpa\s*=\s*True", text, re.M):
            out.append(t)
    return out


def transformers_facts(z: zipfile.ZipFile) -> dict[str, Any]:
    mu = _read(z, "transformers/modeling_utils.py")
    bnb = mu + _read(z, "transformers/quantizers/quantizer_bnb_8bit.py") + _read(z, "transformers/quantizers/quantizer_bnb_4bit.py")
    iu = _read(z, "transformers/utils/import_utils.py")
    qc = _read(z, "transformers/utils/quantization_config.py")
    gu = _read(z, "transformers/generation/utils.py")
    fa2 = re.search(r"def is_flash_attn_2_available.*?(?=\ndef )", iu, re.S)
    return {
        "source": "transformers/modeling_utils.py, utils/import_utils.py, utils/quantization_config.py, METADATA",
        **_metadata(z),
        "torch_floor": _first(r"PyTorch >= ([0-9.]+) is required", iu),
        "accelerate_min": _first(r'^ACCELERATE_MIN_VERSION = "([0-9.]+)"', iu),
        "bitsandbytes_min": _first(r'^BITSANDBYTES_MIN_VERSION = "([0-9.]+)"', iu),
        # torchao through TorchAoConfig: whether the release has it, and the torchao it requires
        # (is_torchao_available's floor, TORCHAO_MIN_VERSION)
        "torchao_config": "class TorchAoConfig" in qc,
        # what autotune's sync-free decode loop needs of generate: a callable custom_generate used as
        # the decoding method, and GenerationMixin._prefill (generation/utils.py)
        "custom_generate_callable": "decoding_method = custom_generate" in gu,
        "generation_prefill": "def _prefill(" in gu,
        # prompt-lookup decoding (generate(prompt_lookup_num_tokens=N)) and what assisted decoding
        # refuses: more than one row, a static cache (generation/utils.py _assisted_decoding)
        "prompt_lookup": "prompt_lookup_num_tokens" in gu,
        "assisted_batch1_only": "assisted generate is only supported for batch_size = 1" in gu,
        "assisted_refuses_static_cache": bool(re.search(r"assisted generate is not supported with `?[Ss]tatic", gu)),
        "torchao_min": _first(r'^TORCHAO_MIN_VERSION = "([0-9.]+)"', iu),
        # the floor in is_flash_attn_2_available (4.36+), or in the module-level flag it reads (4.35)
        # torch floors of SDPA and flex attention (the last version is_torch_*_available compares with)
        "sdpa_torch_min": _last_version(iu, "is_torch_sdpa_available"),
        "flex_torch_min": _last_version(iu, "is_torch_flex_attn_available"),
        "flash_attn_2_min": (_first(r'"(2\.[0-9.]+)"', fa2.group(0)) if fa2 else None)
                            or _first(r'_flash_attn_2_available = _is_package_available\("flash_attn"\) and version\.parse\(\s*importlib\.metadata\.version\("flash_attn"\)\s*\) >= version\.parse\("([0-9.]+)"\)', iu),
        "kw_dtype": bool(re.search(r'kwargs\.pop\("dtype"', mu)),
        "kw_torch_dtype": bool(re.search(r'kwargs\.pop\("torch_dtype"', mu)),
        "torch_dtype_deprecated": "`torch_dtype` is deprecated" in mu,
        "kw_load_in_8bit": bool(re.search(r'kwargs\.pop\("load_in_8bit"', mu)),
        "kw_load_in_4bit": bool(re.search(r'kwargs\.pop\("load_in_4bit"', mu)),
        "kw_use_flash_attention_2": bool(re.search(r'kwargs\.pop\("use_flash_attention_2"', mu)),
        "kw_attn_implementation": bool(re.search(r'kwargs\.pop\("attn_implementation"', mu)),
        "kw_quantization_config": bool(re.search(r'kwargs\.pop\("quantization_config"', mu)),
        "kw_tp_plan": bool(re.search(r'kwargs\.pop\("tp_plan"', mu)),
        "kw_distributed_config": bool(re.search(r'kwargs\.pop\("distributed_config"', mu)),
        "bitsandbytes_config": "class BitsAndBytesConfig" in qc,
        "to_bettertransformer": "def to_bettertransformer" in mu,
        "flash_attention_3": "flash_attention_3" in mu,
        "flash_attention_4": "flash_attention_4" in mu,
        # refusals of a combination: what raises, and from which version of the other package
        "fa2_refuses_offload_map": "Flash Attention 2.0 with a model dispatched on CPU or disk" in mu,
        "sdpa_encoder_types": _sdpa_encoders(z),
        "sdpa_encoder_checked": list(ENCODER_TYPES),  # the types the line above looked for
        "bnb_8bit_min": _gate_before(bnb, "not compatible with 8bit inference", "bitsandbytes"),
        "bnb_4bit_min": _gate_before(bnb, "if load_in_4bit and not supports_4bit", "bitsandbytes")
                        or _gate_before(bnb, "not compatible with 4bit inference", "bitsandbytes"),
        "bnb_4bit_auto_map_accelerate_above": _first(r'version\(\s*"accelerate"\s*\)\s*\)\s*>\s*version\.parse\(\s*"([0-9.]+)"\s*\):\s*'
                                                     r'from accelerate\.utils import CustomDtype', bnb) if "on a 4bit loaded version of the model" in bnb else None,
    }


def _mapping_keys(text: str, name: str) -> list[str] | None:
    """The string keys at the first level of the dict literal ``name = {...}`` in ``text``."""
    m = re.search(rf"{name}\s*=\s*\{{", text)
    if not m:
        return None
    depth, i = 1, m.end()
    while depth and i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    body, keys, depth = text[m.end():i - 1], [], 0
    for k in re.finditer(r'[{}]|"([\w.-]+)"\s*:', body):
        tok = k.group(0)
        if tok in "{}":
            depth += 1 if tok == "{" else -1
        elif depth == 0:
            keys.append(k.group(1))
    return sorted(keys)


def _torch20_types(models: str) -> list[str] | None:
    """The model types requires_torch_20() lists: inline (1.8) or in REQUIRES_TORCH_20 (1.9)."""
    flat = models.replace("\n", " ")
    listed = _first(r"def requires_torch_20.*?model_type in (\[[^\]]*\])", flat) or _first(r"REQUIRES_TORCH_20 = (\{[^}]*\})", flat)
    return sorted(re.findall(r'"([\w-]+)"', listed)) if listed else None


def optimum_facts(z: zipfile.ZipFile) -> dict[str, Any]:
    bt = _read(z, "optimum/bettertransformer/transformation.py")
    return {
        "source": "optimum/bettertransformer/transformation.py, bettertransformer/models/__init__.py, METADATA",
        **_metadata(z),
        "bettertransformer": bool(bt),
        # the model types BetterTransformer converts (BetterTransformerManager.MODEL_MAPPING)
        "bt_model_types": _mapping_keys(_read(z, "optimum/bettertransformer/models/__init__.py"), "MODEL_MAPPING") if bt else None,
        # model types transform() refuses as "natively supported" by transformers, and whether it
        # refuses any model whose config already says _attn_implementation == "sdpa"
        "bt_native_refused": sorted(re.findall(r'"([\w-]+)"', _first(r"model_type in (\[[^\]]*\])", bt) or "")) if bt else None,
        "bt_refuses_sdpa_attn": '_attn_implementation == "sdpa"' in bt if bt else None,
        # transform()'s torch gate: every model (ValueError "BetterTransformer requires torch>=2.0"),
        # or only the model types requires_torch_20() lists
        "bt_torch2_all": 'BetterTransformer requires torch>=2.0 but' in bt if bt else None,
        "bt_torch2_model_types": _torch20_types(_read(z, "optimum/bettertransformer/models/__init__.py")) if bt and "requires_torch_20(" in bt else None,
        "requires_transformers": _norm_req(next((r.strip() for r in re.findall(r"^Requires-Dist: (transformers\b[^;\n]*)", _read(z, next((n for n in z.namelist() if n.endswith(".dist-info/METADATA")), "")), re.M)), None)),
    }


def torchao_facts(z: zipfile.ZipFile) -> dict[str, Any]:
    init = _read(z, "torchao/__init__.py")
    api = _read(z, "torchao/quantization/quant_api.py")
    fmt = _read(z, "torchao/quantization/quantize_/common/packing_format.py") + _read(z, "torchao/quantization/quantize_/workflows/int4/int4_packing_format.py")
    return {
        "source": "torchao/__init__.py, quantization/quant_api.py, quantization/quantize_/..., METADATA",
        **_metadata(z),
        # below this torch the release skips loading its C++ extensions ("incompatible torch version")
        "torch_min_extensions": _first(r'min_torch_version = _parse_version\("([0-9.]+)"\)', init),
        # Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d"): the tinygemm layout (torch's own kernel)
        "int4_tile_packed_to_4d": 'TILE_PACKED_TO_4D = "tile_packed_to_4d"' in fmt,
        "float8_dq_config": "class Float8DynamicActivationFloat8WeightConfig" in api,
        # transform() asserts compute capability 8.9 on CUDA for float8 dynamic activation
        "float8_dq_needs_sm89": "only supported on CUDA>=8.9" in api,
    }


def plain_facts(z: zipfile.ZipFile) -> dict[str, Any]:
    return {"source": "METADATA", **_metadata(z)}


def flash_attn_versions() -> dict[str, str]:
    """flash-attn ships source only on PyPI: {version: sdist URL} from the JSON API, first and last
    release of every minor from 2.0 (post releases count as their base's)."""
    import urllib.request

    with urllib.request.urlopen("https://pypi.org/pypi/flash-attn/json", timeout=60) as r:
        data = json.load(r)
    urls = {}
    for v, files in data["releases"].items():
        sd = [f for f in files if f.get("packagetype") == "sdist"]
        pv = Version(v)
        if sd and not pv.is_prerelease and pv >= Version("2.0"):
            urls[v] = urllib.request.urljoin("https://pypi.org/pypi/flash-attn/json", sd[0]["url"])
    by_minor: dict[tuple[int, int], list[str]] = {}
    for v in sorted(urls, key=Version):
        by_minor.setdefault(Version(v).release[:2], []).append(v)
    return {v: urls[v] for group in by_minor.values() for v in {group[0], group[-1]}}


def flash_attn_facts(version: str, url: str) -> dict[str, Any]:
    """The GPU architectures flash-attn's setup.py compiles FlashAttention-2 for (SASS only:
    ``arch=compute_XX,code=sm_XX``, so a GPU of another major architecture has no kernel)."""
    import tarfile
    import urllib.request

    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"flash_attn-{version}.tar.gz"
    if not path.is_file():
        urllib.request.urlretrieve(url, path)
    with tarfile.open(path) as t:
        member = next((m for m in t.getmembers() if m.name.count("/") == 1 and m.name.endswith("/setup.py")), None)
        text = t.extractfile(member).read().decode("utf-8", errors="replace") if member else ""
    code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))  # commented-out archs are not built
    archs = sorted({int(a) for a in re.findall(r"arch=compute_(\d+),code=sm_\d+", code)})
    return {"source": "setup.py (sdist)", "fa2_cuda_archs": [f"{a // 10}.{a % 10}" for a in archs],
            "fa2_cuda_majors": sorted({str(a // 10) for a in archs}, key=int)}


EXTRACT: dict[str, Callable[[zipfile.ZipFile], dict[str, Any]]] = {
    "transformers": transformers_facts, "optimum": optimum_facts, "accelerate": plain_facts, "bitsandbytes": plain_facts,
    "torchao": torchao_facts,
}


def harvest(package: str) -> dict[str, Any]:
    if package == "flash-attn":
        urls = flash_attn_versions()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            facts = dict(zip(urls, pool.map(lambda v: flash_attn_facts(v, urls[v]), urls)))
        for v, f in sorted(facts.items(), key=lambda x: Version(x[0])):
            print(f"flash-attn {v}: {f['fa2_cuda_archs']}", flush=True)
        return facts
    vs = versions(package)
    rows: dict[str, Any] = {}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        wheels = dict(zip(vs, pool.map(lambda v: wheel(package, v), vs)))
    for v, w in wheels.items():
        if w is None:
            rows[v] = {"error": "no wheel"}
            continue
        with zipfile.ZipFile(w) as z:
            rows[v] = EXTRACT[package](z)
        print(f"{package} {v}: {sum(1 for x in rows[v].values() if x)} facts", flush=True)
    return rows


# ---------------------------------------------------------------------------- docs
def _boundaries(rows: dict[str, Any], key: str) -> str:
    """Where a fact changes value, in version order: 'a (4.26.0-4.55.4) -> b (4.56.0-5.24.0)'."""
    runs: list[tuple[Any, str, str]] = []
    for v in sorted((v for v in rows if "error" not in rows[v]), key=Version):
        val = rows[v].get(key)
        if runs and runs[-1][0] == val:
            runs[-1] = (val, runs[-1][1], v)
        else:
            runs.append((val, v, v))
    return " → ".join(f"{'yes' if val is True else 'no' if val is False else val if val is not None else '–'} ({a}–{b})" for val, a, b in runs)


def docs(table: dict[str, Any]) -> str:
    lines = ["<!-- harvested: generated by tools/harvest.py from autotune/data/harvest.json; do not edit -->",
             "## Harvested from the released wheels", "",
             f"Read {table.get('harvested_at', '?')} from {sum(len(v) for k, v in table.items() if isinstance(v, dict))} wheels "
             "(first and last patch of every minor), as text: what each release's own files say.", ""]
    for package, rows in table.items():
        if not isinstance(rows, dict) or not rows:
            continue
        good = {v: r for v, r in rows.items() if "error" not in r}
        if not good:
            continue
        first = next(iter(good.values()))
        keys = [k for k in first if k not in ("source",)]
        lines += [f"### {package} ({min(good, key=Version)} – {max(good, key=Version)}; {first.get('source', '')})", "",
                  "| fact | value by release |", "|---|---|"]
        lines += [f"| `{k}` | {_boundaries(good, k)} |" for k in keys]
        missing = sorted((v for v in rows if v not in good), key=Version)
        if missing:
            lines += ["", f"No wheel on the index (not read): {', '.join(missing)}."]
        lines.append("")
    lines.append("<!-- /harvested -->")
    return "\n".join(lines)


def write_docs(table: dict[str, Any]) -> None:
    text = VERIFIED.read_text(encoding="utf-8")
    block = docs(table)
    if "<!-- harvested" in text:
        text = re.sub(r"<!-- harvested:.*?<!-- /harvested -->", lambda m: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    VERIFIED.write_text(text, encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", action="append", choices=sorted([*EXTRACT, "flash-attn"]))
    ap.add_argument("--docs-only", action="store_true")
    args = ap.parse_args()
    table = json.loads(TABLE.read_text()) if TABLE.is_file() else {}
    if not args.docs_only:
        import time

        for package in args.only or [*EXTRACT, "flash-attn"]:
            table[package] = harvest(package)
        table["harvested_at"] = time.strftime("%Y-%m-%d")
        TABLE.parent.mkdir(parents=True, exist_ok=True)
        TABLE.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    write_docs(table)
    print(f"wrote {TABLE.relative_to(ROOT)} and docs/VERIFIED.md", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
