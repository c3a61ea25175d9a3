"""kohya-ss sd-scripts and LyCORIS files: ``<prefix>_<module path with dots as underscores>.<tensor>``.

Prefixes ``lora_unet_`` (UNet), ``lora_te_`` / ``lora_te1_`` (first text encoder), ``lora_te2_`` (SDXL's second),
``lycoris_`` (LyCORIS's standalone wrapper: one model).
The tensors of one module say its kind, and its scale is computed as the reference tools do:

- LoRA / LoCon (``networks/lora.py``): ``lora_down.weight`` [r, in] or [r, in, kh, kw], ``lora_up.weight``
  [out, r(, 1, 1)], LoCon's CP form adds ``lora_mid.weight``; scale = alpha / r, r = lora_down's rows.
- LoHa (LyCORIS ``modules/loha.py``): ``hada_w1_a/b``, ``hada_w2_a/b`` (+ Tucker ``hada_t1/t2``); r = hada_w1_b's rows.
- LoKr (``modules/lokr.py``): ``lokr_w1`` or ``lokr_w1_a/b``, ``lokr_w2`` or ``lokr_w2_a/b`` (+ ``lokr_t2``);
  r = lokr_w1_a's columns, else lokr_w2_a's rank; both factors full means scale 1 whatever alpha says.

``alpha`` is a scalar tensor; missing or 0 it is r (scale 1). DoRA ``dora_scale`` and the other LyCORIS algorithms
(full ``diff``, norms, OFT/BOFT, IA3) are refused by key. Modules are bound to sites with
:func:`lorapass.formats.names.bind`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from lorapass.adapter import Adapter
from lorapass.errors import AdapterError, UnsupportedError
from lorapass.formats.names import Namespace, Spelling
from lorapass.formats.tensors import TensorFile, TensorRef
from lorapass.kinds import Kind, Loha, Lokr, Lora, LoraCP
from lorapass.rules import LoraRule

PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2", "lora_te_": "text_encoder",
            "lycoris_": None}  # LyCORIS's own wrapper: one model, whichever it was trained on
_LORA = {"lora_down.weight", "lora_up.weight", "lora_mid.weight"}
_LOHA = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}
_LOKR = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
_REFUSED = {
    "dora_scale": "DoRA (weight-decomposed) modules (LyCORIS and ComfyUI read dora_scale differently and no reference "
                  "library loads them for SD; diffusers drops the key): merge with the tool that trained the file",
    "diff": "LyCORIS full-weight differences", "diff_b": "LyCORIS full bias differences",
    "w_norm": "LyCORIS norm-layer adapters", "b_norm": "LyCORIS norm-layer adapters",
    "oft_blocks": "LyCORIS OFT/BOFT", "oft_diag": "LyCORIS OFT", "rescale": "LyCORIS OFT/BOFT", "weight": "LyCORIS IA3",
    "on_input": "LyCORIS IA3", "lora_up.bias": "LoRA biases", "lokr_t1": "LoKr Tucker factors on w1",
}


def _prefix(name: str) -> str | None:
    return next((p for p in PREFIXES if name.startswith(p)), None)


def detect(keys: Iterable[str]) -> bool:
    """Whether every key is ``<kohya prefix>...<module>.<tensor>``."""
    keys = list(keys)
    return bool(keys) and all("." in k and _prefix(k) is not None for k in keys)


def _alpha(file: TensorFile, roles: dict[str, str], r: int) -> float:
    if "alpha" not in roles:
        return float(r)
    value = file.scalar(roles["alpha"])
    return value if value != 0 else float(r)


def _need(source: Path, module: str, roles: dict[str, str], *names: str) -> None:
    missing = [n for n in names if n not in roles]
    if missing:
        raise AdapterError(f"{source}: module {module!r} has no {', '.join(missing)} tensor(s)")


def _kind(file: TensorFile, module: str, roles: dict[str, str]) -> Kind:
    source = file.path
    ref = {role: TensorRef(file, key) for role, key in roles.items() if role != "alpha"}
    present = set(ref)
    if present <= _LORA:
        _need(source, module, roles, "lora_down.weight", "lora_up.weight")
        down, up = ref["lora_down.weight"], ref["lora_up.weight"]
        r = down.rank(0)
        alpha = _alpha(file, roles, r)
        if "lora_mid.weight" in ref:
            return LoraCP(module, source, down, ref["lora_mid.weight"], up, r, alpha, alpha / r)
        return Lora(module, source, down, up, r, alpha, alpha / r)
    if present <= _LOHA:
        _need(source, module, roles, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        tucker = ("hada_t1", "hada_t2") if "hada_t1" in ref or "hada_t2" in ref else ()
        _need(source, module, roles, *tucker)
        w1 = tuple(ref[k] for k in ("hada_w1_a", "hada_w1_b", *tucker[:1]))
        w2 = tuple(ref[k] for k in ("hada_w2_a", "hada_w2_b", *tucker[1:]))
        r = ref["hada_w1_b"].rank(0)
        alpha = _alpha(file, roles, r)
        return Loha(module, source, w1, w2, r, alpha, alpha / r)
    if present <= _LOKR:
        return _lokr(file, module, roles, ref)
    kinds = sorted({("LoRA" if n in _LORA else "LoHa" if n in _LOHA else "LoKr") for n in present})
    raise AdapterError(f"{source}: module {module!r} mixes tensors of {' and '.join(kinds)} ({sorted(present)})")


def _lokr(file: TensorFile, module: str, roles: dict[str, str], ref: dict[str, TensorRef]) -> Lokr:
    source = file.path
    if ("lokr_w1" in ref) == ("lokr_w1_a" in ref or "lokr_w1_b" in ref):
        raise AdapterError(f"{source}: LoKr module {module!r} needs either lokr_w1 or lokr_w1_a + lokr_w1_b")
    if ("lokr_w2" in ref) == ("lokr_w2_a" in ref or "lokr_w2_b" in ref):
        raise AdapterError(f"{source}: LoKr module {module!r} needs either lokr_w2 or lokr_w2_a + lokr_w2_b")
    w1 = (ref["lokr_w1"],) if "lokr_w1" in ref else (ref.get("lokr_w1_a"), ref.get("lokr_w1_b"))
    w2 = (ref["lokr_w2"],) if "lokr_w2" in ref else (ref.get("lokr_w2_a"), ref.get("lokr_w2_b"))
    _need(source, module, roles, *(("lokr_w1_a", "lokr_w1_b") if len(w1) == 2 else ()),
          *(("lokr_w2_a", "lokr_w2_b") if len(w2) == 2 else ()))
    if "lokr_t2" in ref:
        if len(w2) != 2:
            raise AdapterError(f"{source}: LoKr module {module!r} has lokr_t2 without lokr_w2_a/lokr_w2_b")
        w2 = (*w2, ref["lokr_t2"])
    if len(w1) == 2:
        r = w1[0].rank(1)
    elif len(w2) >= 2:
        r = w2[2].rank(0) if len(w2) == 3 else w2[0].rank(1)
    else:  # both factors full: LyCORIS uses scale 1 whatever alpha says
        return Lokr(module, source, w1, w2, 1, 1.0, 1.0)
    alpha = _alpha(file, roles, r)
    return Lokr(module, source, w1, w2, r, alpha, alpha / r)


def read(path: Path) -> Adapter:
    """The kohya / LyCORIS file at ``path``, its modules keyed by their file names (bind them to sites)."""
    file = TensorFile(path)
    modules: dict[str, dict[str, str]] = {}
    for key in file.keys():
        module, _, role = key.partition(".")
        if role in _REFUSED:
            raise UnsupportedError(f"{path}: tensor {key!r}: lorapass does not implement {_REFUSED[role]}")
        if role != "alpha" and role not in _LORA | _LOHA | _LOKR:
            raise UnsupportedError(f"{path}: tensor {key!r} is not a kohya/LyCORIS LoRA, LoHa or LoKr tensor")
        modules.setdefault(module, {})[role] = key
    kinds = {name: _kind(file, name, roles) for name, roles in sorted(modules.items())}
    spellings = {name: Spelling(PREFIXES[p], p, True) for name in kinds if (p := _prefix(name)) is not None}
    rule = LoraRule(name=path.stem, target_modules=sorted(kinds))
    return Adapter(path, rule, kinds, format=_format(kinds), files=[path], namespace=Namespace(spellings))


def _format(kinds: dict[str, Kind]) -> str:
    found = {type(k) for k in kinds.values()}
    if found <= {Lora, LoraCP}:
        return "kohya"
    return "lycoris " + "+".join(sorted({"LoHa" if t is Loha else "LoKr" if t is Lokr else "LoRA" for t in found}))
