"""Slots for full replacements: a site's own weight / bias as overridable inputs (``modules_to_save``, replaced
biases), and trainable token rows as an index list with the rows' differences.

- ``replace``: the site's node reads ``p.weight`` (in the layout the node reads it) / ``p.bias`` [out] instead of
  its own constants. The original constants stay in the graph (``base`` / ``base_bias`` in the record): they are
  the neutral values an adapter without this module gets. A full weight copy is as large as the layer.
- ``tokens``: ``p.token_indices`` int64 [p.k] and ``p.token_delta`` (the new rows minus the base rows, [p.k, dim];
  [dim, p.k] at a tied output head). An embedding adds ``onehot(ids ∈ indices) @ delta`` to its rows; a head whose
  weight is the embedding's (PEFT ties them) adds ``(x @ delta) @ onehot(indices, vocab)`` to its logits. Neutral:
  one index equal to the vocabulary size (matching no id) with a zero row.
"""

from __future__ import annotations

import numpy as np

from lorapass.kinds import Kind
from lorapass.onnx.slots.base import Branch, Slot, SlotInput, Weights, register


@register
class ReplaceSlot(Slot):
    type = "replace"
    parts = frozenset({"weight", "bias"})

    @classmethod
    def for_target(cls, target) -> ReplaceSlot:
        site = target.site
        roles = sorted(cls.parts & target.module.parts(site))
        record = {"slot": cls.type, "path": site.path, "out": site.out_features, "default": "adapter"}
        if "weight" in roles:
            view = site.storage
            _, layout, dims = view.store.operand(view.node)
            record |= {"weight": f"{site.path}.weight", "dims": list(dims), "layout": layout, "base": view.store.name,
                       "base_layout": view.store.layout}
        if "bias" in roles:
            record["bias"] = f"{site.path}.bias"
            store = target.module.bias_view(site).store
            if getattr(store, "value", None) is not None:
                record["base_bias"] = store.name
        return cls(record)

    def covers(self) -> set[str]:
        return {role for role in self.parts if role in self.record}

    def inputs(self) -> list[SlotInput]:
        rec = self.record
        out = [SlotInput(rec["weight"], tuple(rec["dims"]), "weight")] if "weight" in rec else []
        return out + ([SlotInput(rec["bias"], (rec["out"],), "bias")] if "bias" in rec else [])

    def values(self, module: Kind | None, weights: Weights | None = None) -> dict[str, np.ndarray]:
        rec, out = self.record, {}
        if "weight" in rec:
            full = module.full("weight") if module is not None else None
            if full is not None:
                w = full.read()  # torch layout
            else:
                stored = weights.tensor(rec["base"])
                w = stored.T if rec["base_layout"] == "in_out" else stored
            out[rec["weight"]] = np.ascontiguousarray(w.T if rec["layout"] == "in_out" else w)
        if "bias" in rec:
            full = module.full("bias") if module is not None else None
            base = weights.tensor(rec["base_bias"]) if "base_bias" in rec else np.zeros(rec["out"], np.float32)
            out[rec["bias"]] = full.read() if full is not None else base
        return self.checked(module, out) if module is not None else out

    def build(self, b: Branch, joint, inputs: dict) -> None:
        site = joint.site
        if "weight" in inputs:
            view = site.storage
            index, _, _ = view.store.operand(view.node)
            view.node.replace_input_with(index, inputs["weight"])
        if "bias" in inputs:
            view = site.bias_storage
            if "base_bias" in self.record:
                index, _, _ = view.store.operand(view.node)
                view.node.replace_input_with(index, inputs["bias"])
            else:
                joint.add(b, inputs["bias"], "bias")


@register
class TokensSlot(Slot):
    type = "tokens"
    parts = frozenset({"tokens"})

    @classmethod
    def for_target(cls, target) -> TokensSlot:
        site, module = target.site, target.module
        vocab, dim = site.storage.shape
        return cls({"slot": cls.type, "path": site.path, "module": module.path, "site": site.kind, "vocab": vocab,
                    "dim": dim, "token_indices": f"{site.path}.token_indices", "token_delta": f"{site.path}.token_delta",
                    "k": len(module.indices), "default": "adapter"})

    def inputs(self) -> list[SlotInput]:
        rec, k = self.record, f"{self.path}.k"
        dims = (k, rec["dim"]) if rec["site"] == "embedding" else (rec["dim"], k)
        return [SlotInput(rec["token_indices"], (k,), "token_indices", "int64"), SlotInput(rec["token_delta"], dims, "token_delta")]

    def values(self, module: Kind | None, weights: Weights | None = None) -> dict[str, np.ndarray]:
        rec = self.record
        if module is None or "tokens" not in module.own_parts():
            indices, delta = np.array([rec["vocab"]], np.int64), np.zeros((1, rec["dim"]), np.float32)
        else:
            indices, delta = np.array(module.indices, np.int64), module.delta_rows(weights.site(self.path))
        out = {rec["token_indices"]: indices,
               rec["token_delta"]: np.ascontiguousarray(delta if rec["site"] == "embedding" else delta.T)}
        return self.checked(module, out) if module is not None else out

    def build(self, b: Branch, joint, inputs: dict) -> None:
        p, rec = self.path, self.record
        indices, delta = inputs["token_indices"], inputs["token_delta"]
        dtype = delta.type.dtype
        if rec["site"] == "embedding":
            ids = b.op("Cast", [joint.x], f"{p}/tokens/ids_Cast", {"to": 7})  # INT64
            axes = b.const(np.array([-1], np.int64), f"{p}/tokens/axes")
            hits = b.op("Equal", [b.op("Unsqueeze", [ids, axes], f"{p}/tokens/Unsqueeze"), indices], f"{p}/tokens/Equal")
            onehot = b.op("Cast", [hits, ], f"{p}/tokens/Cast", {"to": dtype.value})
            change = b.op("MatMul", [onehot, delta], f"{p}/tokens/MatMul")
        else:
            depth = b.const(np.array(rec["vocab"], np.int64), f"{p}/tokens/vocab")
            on_off = b.const(np.array([0, 1], dtype.numpy()), f"{p}/tokens/values")
            columns = b.op("OneHot", [indices, depth, on_off], f"{p}/tokens/OneHot", {"axis": -1})
            per_token = b.op("MatMul", [joint.x, delta], f"{p}/tokens/MatMul")
            change = b.op("MatMul", [per_token, columns], f"{p}/tokens/scatter_MatMul")
        joint.add(b, change, "tokens")
