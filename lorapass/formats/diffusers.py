"""diffusers / PEFT single files: ``unet.<path>.lora_A.weight`` / ``.lora_B.weight`` (``text_encoder.``,
``text_encoder_2.``, ``transformer.``, or no prefix for a file of one model, as ``save_lora_adapter`` writes).

The older spellings diffusers still loads are read too: ``<path>.lora.down/up.weight``, ``.lora_linear_layer.down/up``
and the attention-processor form ``<attn>.processor.to_q_lora.down.weight`` (``to_out_lora`` is ``to_out.0`` in a
UNet; in a text encoder ``to_q_lora`` is ``q_proj``, ``to_out_lora`` ``out_proj``).

Each component's rule is what diffusers gives PEFT (``_create_lora_config``): the ``LoraConfig`` saved in the file's
``lora_adapter_metadata`` (keys ``<component>.<field>``, flat for a one-model file), else one derived from the tensors
as ``get_peft_kwargs`` does: r = the most common rank with an anchored ``rank_pattern`` for the others, and alpha from
the file's network alphas (``<path>.alpha``; the most common one, others as ``alpha_pattern``) or, without any,
alpha = rank (scale 1). Each module's rank, alpha and scale then come from that rule exactly as PEFT resolves them.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from lorapass.adapter import Adapter
from lorapass.errors import AdapterError, UnsupportedError
from lorapass.formats.names import COMPONENTS, Namespace, Spelling
from lorapass.formats.tensors import TensorFile, TensorRef
from lorapass.kinds import Lora
from lorapass.rules import LoraRule

METADATA = "lora_adapter_metadata"
_ROLE = re.compile(r"^(?P<module>.+?)(?:\.lora_(?P<ab>[AB])|\.lora\.(?P<du>down|up)|\.lora_linear_layer\.(?P<ll>down|up)"
                   r"|(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<pr>down|up))\.weight$")
_PROCESSOR = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
              "text": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}
_REFUSED = {"lora_magnitude_vector": "DoRA", "dora_scale": "DoRA", "lora_B.bias": "lora_bias (a bias on LoRA B)",
            ".lokr_": "LoKr in diffusers' key layout (LyCORIS LoKr files are read)",
            ".hada_": "LoHa in diffusers' key layout (LyCORIS LoHa files are read)"}
_ROLE_NAMES = {"A": "lora_A", "B": "lora_B", "down": "lora_A", "up": "lora_B"}


def _component(key: str) -> tuple[str | None, str]:
    head, _, rest = key.partition(".")
    return (head, rest) if head in COMPONENTS and rest else (None, key)


def parse(key: str) -> tuple[str | None, str, str] | None:
    """(component, module path, role: lora_A | lora_B | alpha) of a diffusers-format key, or None."""
    component, rest = _component(key)
    alpha = rest.endswith(".alpha")
    if alpha:
        rest = rest[: -len(".alpha")]
        rest = rest if rest.endswith(".weight") else rest + ".lora.down.weight"
    m = _ROLE.match(rest)
    if m is None:
        return None
    module = m["module"]
    if m["proj"]:
        text = component in ("text_encoder", "text_encoder_2") or ".self_attn" in module
        module = f"{module}.{_PROCESSOR['text' if text else 'unet'][m['proj']]}"
    role = "alpha" if alpha else _ROLE_NAMES[m["ab"] or m["du"] or m["ll"] or m["pr"]]
    return component, module, role


def detect(keys: Iterable[str]) -> bool:
    """Whether the keys are diffusers / PEFT single-file LoRA keys (any that are not get named by :func:`read`)."""
    return any(parse(k) is not None for k in keys)


def _metadata(file: TensorFile) -> dict:
    text = file.metadata().get(METADATA)
    if not text:
        return {}
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise AdapterError(f"{file.path}: the {METADATA!r} metadata is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{file.path}: the {METADATA!r} metadata is not a JSON object")
    return data


def _component_config(metadata: dict, component: str | None) -> dict | None:
    if component is None:
        return metadata or None
    found = {k[len(component) + 1:]: v for k, v in metadata.items() if k.startswith(component + ".")}
    return found or None


def derived_rule(name: str, ranks: dict[str, int], alphas: dict[str, float]) -> LoraRule:
    """The rule diffusers' ``get_peft_kwargs`` builds from a file's tensors (module -> rank) and network alphas."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    rank_pattern = {f"^{m}": v for m, v in ranks.items() if v != r}
    if alphas:
        alpha = Counter(alphas.values()).most_common(1)[0][0]
        alpha_pattern = {m: v for m, v in alphas.items() if v != alpha}
    else:
        alpha, alpha_pattern = r, dict(rank_pattern)
    return LoraRule(name=name, target_modules=sorted(ranks), r=r, lora_alpha=alpha, rank_pattern=rank_pattern,
                    alpha_pattern=alpha_pattern)


def read(path: Path) -> Adapter:
    """The diffusers / PEFT single file at ``path``, its modules keyed ``<component>.<path>`` (bind them to sites)."""
    file = TensorFile(path)
    tensors: dict[tuple[str | None, str], dict[str, str]] = {}
    for key in file.keys():
        refused = next((why for part, why in _REFUSED.items() if part in key), None)
        if refused:
            raise UnsupportedError(f"{path}: tensor {key!r}: lorapass does not implement {refused}")
        parsed = parse(key)
        if parsed is None:
            raise UnsupportedError(f"{path}: tensor {key!r} is not a LoRA A/B weight or alpha")
        component, module, role = parsed
        tensors.setdefault((component, module), {})[role] = key
    metadata = _metadata(file)
    modules, spellings = {}, {}
    for component in dict.fromkeys(c for c, _ in tensors):
        mine = {m: roles for (c, m), roles in tensors.items() if c == component}
        for module, roles in mine.items():
            if not {"lora_A", "lora_B"} <= set(roles):
                missing = ({"lora_A", "lora_B"} - set(roles)).pop()
                raise AdapterError(f"{path}: module {module!r} has no {missing} weight")
        config = _component_config(metadata, component)
        if config is not None:
            rule = LoraRule.from_peft_config(config)
            if rule.use_dora:
                which = f" for {component}" if component else ""
                raise UnsupportedError(f"{path}: its {METADATA!r} sets use_dora{which}: lorapass does not implement "
                                       "DoRA in diffusers files")
            stray = [] if rule.all_linear else [m for m in sorted(mine) if not rule.matches(m)]
            if stray:
                raise AdapterError(f"{path}: module {stray[0]!r} has LoRA weights, but the file's {METADATA!r} "
                                   f"does not target it (target_modules={rule.target_modules!r}"
                                   + (f", exclude_modules={rule.exclude_modules!r}" if rule.exclude_modules else "")
                                   + "), so diffusers would not load them")
        else:
            ranks = {m: TensorRef(file, roles["lora_B"]).rank(1) for m, roles in mine.items()}
            alphas = {m: file.scalar(roles["alpha"]) for m, roles in mine.items() if "alpha" in roles}
            rule = derived_rule(path.stem, ranks, alphas)
        spelling = Spelling(component, f"{component}." if component else "", False)
        for module, roles in sorted(mine.items()):
            p = rule.params(module)
            name = spelling.spell(module)
            modules[name] = Lora(module, path, TensorRef(file, roles["lora_A"]), TensorRef(file, roles["lora_B"]),
                                 p.r, p.alpha, p.scale)
            spellings[name] = spelling
    rule = LoraRule(name=path.stem, target_modules=sorted(modules))
    return Adapter(path, rule, modules, format="diffusers", files=[path], namespace=Namespace(spellings))
