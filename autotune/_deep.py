"""The deep probe: runs in its own interpreter (``machine.deep_probe``) and prints one JSON line.

Each step is guarded, so one broken import is reported and the next step still runs.
"""

import json
import sys
import traceback


def _err(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text.splitlines()[0][:400] if text else type(e).__name__


def main() -> dict:
    out: dict = {"python": sys.executable}
    try:
        import torch
    except BaseException as e:  # noqa: BLE001
        out["torch"] = {"import": False, "error": _err(e)}
        return out
    t: dict = {"import": True, "version": torch.__version__, "cuda_build": torch.version.cuda}
    try:
        t["cuda_available"] = bool(torch.cuda.is_available())
        t["device_count"] = torch.cuda.device_count() if t["cuda_available"] else 0
        t["devices"] = [
            {"index": i, "name": torch.cuda.get_device_name(i), "capability": "%d.%d" % torch.cuda.get_device_capability(i)}
            for i in range(t["device_count"])
        ]
    except BaseException as e:  # noqa: BLE001
        t["cuda_error"] = _err(e)
    out["torch"] = t
    out["sdpa"] = _sdpa(torch, t)
    for module, key in (("flash_attn", "flash-attn"), ("flash_attn_interface", "flash-attn-3"), ("bitsandbytes", "bitsandbytes"), ("transformers", "transformers")):
        out.setdefault("imports", {})[key] = _import(module)
    if out["imports"]["bitsandbytes"].get("ok"):
        out["bitsandbytes_native"] = _bnb_native()
    if out["imports"]["transformers"].get("ok"):
        try:
            from transformers.utils import import_utils as iu

            out["transformers_sees_torch"] = bool(iu.is_torch_available())
        except BaseException as e:  # noqa: BLE001
            out["transformers_sees_torch"] = _err(e)
    return out


def _import(module: str) -> dict:
    import importlib
    import importlib.util

    try:
        if importlib.util.find_spec(module) is None:
            return {"ok": None}
    except BaseException:  # noqa: BLE001
        return {"ok": None}
    try:
        importlib.import_module(module)
        return {"ok": True}
    except BaseException as e:  # noqa: BLE001
        return {"ok": False, "error": _err(e)}


def _bnb_native() -> dict:
    try:
        from bitsandbytes import cextension

        lib = getattr(cextension, "lib", None)
        if lib is None or "Mock" in type(lib).__name__ or "ErrorHandler" in type(lib).__name__:
            return {"ok": False, "error": "bitsandbytes loaded without its native library for this CUDA"}
        return {"ok": True, "backend": str(getattr(cextension, "BNB_BACKEND", ""))}
    except BaseException as e:  # noqa: BLE001
        return {"ok": False, "error": _err(e)}


def _sdpa(torch, t: dict) -> dict:
    """Try each SDPA backend on a tiny fp16 causal problem on GPU 0 (or fp32 on CPU)."""
    res: dict = {}
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        import torch.nn.functional as F
    except BaseException as e:  # noqa: BLE001
        return {"error": _err(e)}
    cuda = bool(t.get("cuda_available"))
    dev, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
    for key, name in names.items():
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            res[key] = {"ok": False, "error": "not in this torch"}
            continue
        try:
            q = torch.randn(1, 2, 16, 64, device=dev, dtype=dtype)
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, q, q, is_causal=True)
            if cuda:
                torch.cuda.synchronize()
            res[key] = {"ok": True}
        except BaseException as e:  # noqa: BLE001
            res[key] = {"ok": False, "error": _err(e)}
    res["device"] = dev
    return res


if __name__ == "__main__":
    try:
        result = main()
    except BaseException:  # noqa: BLE001
        result = {"error": traceback.format_exc().splitlines()[-1]}
    print(json.dumps(result))
