"""SGM/LDM UNet names (Stability's ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``), which SDXL kohya files use,
spelled from diffusers module paths (``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``).

The map needs the UNet's block layout (resnets per block, which blocks have attentions and samplers): read it from
the graph's own site paths or from a diffusers UNet ``config.json``. SGM numbers the input blocks 1, 2, ... over
every (resnet + attention) layer and downsampler of the down blocks in order (0 is conv_in), the output blocks 0, 1,
... over the up blocks' layers, an upsampler joining its block's last output block; the middle block is resnet,
attention, resnet (kohya ``sdxl_model_util.make_unet_conversion_map``, diffusers
``_maybe_map_sgm_blocks_to_diffusers``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from lorapass.errors import AdapterError

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
        "conv_norm_out": "out.0", "conv_out": "out.2"}
_BLOCK = re.compile(r"^(?P<side>down|up)_blocks\.(?P<i>\d+)\.(?P<part>resnets|attentions|downsamplers|upsamplers)\.(?P<j>\d+)"
                    r"(?:\.|$)")
_MID = re.compile(r"^mid_block\.(?P<part>resnets|attentions)\.(?P<j>\d+)(?:\.(?P<rest>.*))?$")
SGM_SCOPES = ("input_blocks", "middle_block", "output_blocks")


@dataclass(frozen=True)
class Block:
    resnets: int
    attentions: bool
    sampler: bool


@dataclass(frozen=True)
class UnetLayout:
    """Per down and up block: its resnet count and whether it has attentions and a (down/up) sampler."""

    down: tuple[Block, ...]
    up: tuple[Block, ...]
    mid_attention: bool = True

    @classmethod
    def from_paths(cls, paths: list[str]) -> UnetLayout | None:
        """The layout the site paths of a diffusers UNet graph show, or None if they show no UNet blocks."""
        seen: dict[tuple[str, int], dict[str, set[int]]] = {}
        mid_attention = False
        for path in paths:
            if (m := _BLOCK.match(path)) is not None:
                seen.setdefault((m["side"], int(m["i"])), {}).setdefault(m["part"], set()).add(int(m["j"]))
            elif path.startswith("mid_block.attentions."):
                mid_attention = True
        blocks = {}
        for side in ("down", "up"):
            count = 1 + max((i for s, i in seen if s == side), default=-1)
            parts = [seen.get((side, i), {}) for i in range(count)]
            if any("resnets" not in p for p in parts):
                return None  # a block whose resnets the graph does not show: the layout is unknown
            blocks[side] = tuple(Block(1 + max(p["resnets"]), "attentions" in p, bool({"downsamplers", "upsamplers"} & set(p)))
                                 for p in parts)
        if not blocks["down"]:
            return None
        return cls(blocks["down"], blocks["up"], mid_attention)

    @classmethod
    def from_config(cls, config: str | Path | dict) -> UnetLayout:
        """The layout a diffusers UNet config declares (a ``config.json`` file, or its contents)."""
        source = "the UNet config" if isinstance(config, dict) else config
        try:
            if not isinstance(config, dict):
                config = json.loads(Path(config).read_text(encoding="utf-8"))
            down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
            layers = config.get("layers_per_block", 2)
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise AdapterError(f"{source}: not a readable diffusers UNet config.json ({exc})") from None
        per_block = [layers] * len(down_types) if isinstance(layers, int) else layers
        if not (all(isinstance(t, str) for t in down_types + up_types) and isinstance(per_block, list)
                and len(per_block) == len(down_types) and all(type(n) is int and n >= 0 for n in per_block)):
            raise AdapterError(f"{source}: not a diffusers UNet config: down_block_types / up_block_types must list "
                               "block class names and layers_per_block be a count or one per down block")
        last = len(down_types) - 1
        down = tuple(Block(n, "Attn" in t, i < last) for i, (t, n) in enumerate(zip(down_types, per_block)))
        up = tuple(Block(n + 1, "Attn" in t, i < last) for i, (t, n) in enumerate(zip(up_types, reversed(per_block))))
        return cls(down, up)

    @cached_property
    def _scopes(self) -> dict[str, str]:
        """diffusers block scope (``down_blocks.1.attentions.0``) -> SGM scope (``input_blocks.4.1``)."""
        out = {}
        for side, sgm, n in (("down", "input_blocks", 1), ("up", "output_blocks", 0)):
            for i, block in enumerate(getattr(self, side)):
                for j in range(block.resnets):
                    out[f"{side}_blocks.{i}.resnets.{j}"] = f"{sgm}.{n}.0"
                    if block.attentions:
                        out[f"{side}_blocks.{i}.attentions.{j}"] = f"{sgm}.{n}.1"
                    n += 1
                if block.sampler and side == "down":  # a downsampler is an input block of its own
                    out[f"down_blocks.{i}.downsamplers.0"] = f"input_blocks.{n}.0"
                    n += 1
                elif block.sampler:  # an upsampler joins its block's last output block
                    out[f"up_blocks.{i}.upsamplers.0"] = f"output_blocks.{n - 1}.{2 if block.attentions else 1}"
        return out

    def sgm(self, path: str) -> str | None:
        """The SGM name of a diffusers UNet module path, or None where SGM has none."""
        if path in _TOP:
            return _TOP[path]
        if (m := _MID.match(path)) is not None:
            j = int(m["j"])
            index = 1 if m["part"] == "attentions" else (2 * j if self.mid_attention else j)
            return _inner(f"middle_block.{index}", m["part"], m["rest"])
        if (m := _BLOCK.match(path)) is None:
            return None
        scope = f"{m['side']}_blocks.{m['i']}.{m['part']}.{m['j']}"
        sgm = self._scopes.get(scope)
        return None if sgm is None else _inner(sgm, m["part"], path[len(scope) + 1:] or None)


def _inner(scope: str, part: str, rest: str | None) -> str | None:
    """The SGM name of a module inside one block: resnet layers renamed, ``op`` for a downsampler's conv."""
    if rest is None:
        return scope
    if part == "resnets":
        head, _, tail = rest.partition(".")
        return f"{scope}.{_RESNET[head]}" + (f".{tail}" if tail else "") if head in _RESNET else None
    if part == "downsamplers":
        return f"{scope}.op" if rest == "conv" else None
    return f"{scope}.{rest}"
