"""kohya / LyCORIS / diffusers single files on small real modules: every kind's delta against the reference tool's
own (PEFT's LoHa/LoKr layers' ``get_delta_weight``, whose tensor names and formulas are LyCORIS's; PEFT's LoRA
merge), the scale rules, refusals by key, name binding, and convolutions of any geometry end to end."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file

from diffusion_files import SDXL_UNET, lycoris_file, rel, run, sdxl_kohya_name
from lorapass import demo
from lorapass.adapter import load_adapter
from lorapass.cli import main
from lorapass.errors import AdapterError, ShapeMismatchError, UnsupportedError
from lorapass.formats.names import bind
from lorapass.formats.sgm import UnetLayout


class Tiny(torch.nn.Module):
    """A strided, padded, dilated 3x3 conv, a grouped conv, a 1x1 conv and a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 12, 3, stride=2, padding=2, dilation=2)
        self.grouped = torch.nn.Conv2d(12, 12, 3, padding=1, groups=2)
        self.point = torch.nn.Conv2d(12, 16, 1)
        self.proj = torch.nn.Linear(16, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.point(self.grouped(self.conv(x))).mean((2, 3)))


def tuned(config, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = inject_adapter_in_model(config, Tiny().eval())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("lora_", "hada_", "lokr_")):
                p.normal_(0, 0.3)
    return model


def deltas(model) -> dict[str, np.ndarray]:
    return {name: m.get_delta_weight("default").detach().numpy() for name, m in model.named_modules()
            if hasattr(m, "get_delta_weight") and name}


def bound(file, paths=("conv", "point", "proj")):
    return bind(load_adapter(file), list(paths))


CASES = {
    "loha": (LoHaConfig(r=3, alpha=5, target_modules=["conv", "point", "proj"]), 5.0),
    "loha-tucker": (LoHaConfig(r=2, alpha=3, target_modules=["conv"], use_effective_conv2d=True), 3.0),
    "lokr-w2-lowrank": (LoKrConfig(r=1, alpha=3, target_modules=["conv", "point", "proj"]), 3.0),
    "lokr-both-lowrank": (LoKrConfig(r=1, alpha=3, target_modules=["proj"], decompose_both=True), 3.0),
    "lokr-tucker": (LoKrConfig(r=1, alpha=5, target_modules=["conv"], use_effective_conv2d=True), 5.0),
    # both factors full: LyCORIS ignores alpha (scale 1), which PEFT matches with alpha = r
    "lokr-full": (LoKrConfig(r=4, alpha=4, target_modules=["proj"]), 9.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lycoris_kinds_match_peft_deltas(tmp_path, case):
    config, file_alpha = CASES[case]
    model = tuned(config)
    file = lycoris_file(get_peft_model_state_dict(model), tmp_path / "f.safetensors", file_alpha)
    adapter = bound(file, [n for n, _ in Tiny().named_modules() if n])
    expected = deltas(model)
    assert set(adapter.modules) == set(expected)
    for path, kind in adapter.modules.items():
        up, down = kind.low_rank()
        assert np.abs((up @ down).reshape(expected[path].shape) - expected[path]).max() <= 1e-5 * np.abs(expected[path]).max()
    keys = set(load_adapter(file).modules["lora_unet_" + next(iter(expected))].keys())
    assert {"loha-tucker": {"hada_t1", "hada_t2"}, "lokr-tucker": {"lokr_t2"}}.get(case, set()) <= keys


def test_kohya_scale_rules(tmp_path):
    """kohya networks/lora.py: scale = alpha / r, r = lora_down's rows; alpha missing or 0 means alpha = r."""
    rng = np.random.default_rng(0)
    tensors = {}
    for name, alpha in (("proj", 2.0), ("point", None), ("conv", 0.0)):
        shape = {"proj": (16,), "point": (12, 1, 1), "conv": (8, 3, 3)}[name]
        out = {"proj": 24, "point": 16, "conv": 12}[name]
        tensors[f"lora_unet_{name}.lora_down.weight"] = torch.from_numpy(rng.standard_normal((4, *shape), np.float32))
        tensors[f"lora_unet_{name}.lora_up.weight"] = torch.from_numpy(
            rng.standard_normal((out, 4) + (1, 1) * (name != "proj"), np.float32))
        if alpha is not None:
            tensors[f"lora_unet_{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(tmp_path / "k.safetensors"))
    modules = bound(tmp_path / "k.safetensors").modules
    assert (modules["proj"].scale, modules["point"].scale, modules["conv"].scale) == (0.5, 1.0, 1.0)


def test_locon_cp_form_is_lycoris_rebuild_tucker(tmp_path):
    rng = np.random.default_rng(1)
    down, mid, up = (rng.standard_normal(s, np.float32) for s in ((3, 8, 1, 1), (3, 3, 3, 3), (12, 3, 1, 1)))
    save_file({"lora_unet_conv.lora_down.weight": torch.from_numpy(down), "lora_unet_conv.lora_mid.weight": torch.from_numpy(mid),
               "lora_unet_conv.lora_up.weight": torch.from_numpy(up), "lora_unet_conv.alpha": torch.tensor(6.0)},
              str(tmp_path / "cp.safetensors"))
    u, d = bound(tmp_path / "cp.safetensors").modules["conv"].low_rank()
    # LyCORIS locon make_weight: rebuild_tucker(mid, up.view(out, -1).T, down.view(r, -1)) * alpha / r
    expected = np.einsum("ijkl,ip,jr->prkl", mid, up.reshape(12, 3).T, down.reshape(3, 8)) * 2.0
    np.testing.assert_allclose((u @ d).reshape(expected.shape), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key,error,words", [
    ("lora_unet_proj.dora_scale", UnsupportedError, "DoRA"),
    ("lora_unet_proj.diff", UnsupportedError, "full-weight differences"),
    ("lora_unet_proj.hada_w1_a", AdapterError, "mixes"),
])
def test_kohya_refusals_name_the_key(tmp_path, key, error, words):
    tensors = {"lora_unet_proj.lora_down.weight": torch.ones(2, 16), "lora_unet_proj.lora_up.weight": torch.ones(24, 2),
               key: torch.ones(24, 2)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    with pytest.raises(error, match=words) as info:
        load_adapter(tmp_path / "x.safetensors")
    assert "x.safetensors" in str(info.value) and ("lora_unet_proj" in str(info.value))


def test_diffusers_dora_refused(tmp_path):
    save_file({"unet.proj.lora_A.weight": torch.ones(2, 16), "unet.proj.lora_B.weight": torch.ones(24, 2),
               "unet.proj.lora_magnitude_vector": torch.ones(24)}, str(tmp_path / "d.safetensors"))
    with pytest.raises(UnsupportedError, match="unet.proj.lora_magnitude_vector.*DoRA"):
        load_adapter(tmp_path / "d.safetensors")


def test_underscore_collision_is_an_error(tmp_path):
    save_file({"lora_unet_a_b_c.lora_down.weight": torch.ones(2, 4), "lora_unet_a_b_c.lora_up.weight": torch.ones(4, 2)},
              str(tmp_path / "c.safetensors"))
    with pytest.raises(AdapterError, match=r"ambiguous.*'a.b_c', 'a_b.c'"):
        bind(load_adapter(tmp_path / "c.safetensors"), ["a.b_c", "a_b.c", "a.d"])
    assert set(bind(load_adapter(tmp_path / "c.safetensors"), ["a_b.c", "a.d"]).modules) == {"a_b.c"}


def test_sgm_names_are_kohyas_for_the_sdxl_layout():
    unet = demo.sd_unet(SDXL_UNET)
    paths = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    layout = UnetLayout.from_paths(paths)
    config = UnetLayout.from_config(dict(unet.config))
    assert layout == config
    for path in paths:
        if path.split(".")[0] in ("down_blocks", "mid_block", "up_blocks"):
            assert "lora_unet_" + layout.sgm(path).replace(".", "_") == sdxl_kohya_name(path), path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny exported by TorchScript, a PEFT LoRA on its conv / 1x1 conv / linear as a one-model diffusers file
    (``save_lora_adapter``'s layout: no component prefix, flat metadata), and PEFT's merged output."""
    folder = tmp_path_factory.mktemp("tiny")
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["conv", "point", "proj"])
    model = tuned(config, seed=2)
    state = get_peft_model_state_dict(model)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "tiny.safetensors"),
              metadata={"lora_adapter_metadata": json.dumps(config.to_dict(), default=list)})
    x = torch.randn(2, 8, 11, 11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_plain(model), (x,), str(folder / "tiny.onnx"), dynamo=False, input_names=["x"],
                          output_names=["y"])
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for m in merged.modules():
            if hasattr(m, "merge"):
                m.merge()
        expected = merged(x).numpy()
    return folder, {"x": x.numpy()}, expected


def _base(model):
    return {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}


def _plain(model):
    plain = Tiny().eval()
    plain.load_state_dict(_base(model))
    return plain


@pytest.mark.parametrize("strategy", ["merge", "dynamic"])
def test_conv_geometry_and_one_model_file(tiny, tmp_path, strategy):
    folder, feeds, expected = tiny
    out = tmp_path / "out.onnx"
    assert main(["rewrite", str(folder / "tiny.onnx"), "--adapter", str(folder / "tiny.safetensors"),
                 "--strategy", strategy, "-o", str(out)]) == 0
    assert rel(run(out, feeds), expected) <= 1e-4


def test_grouped_conv_reported_by_name(tiny, capsys):
    folder, _, _ = tiny
    assert main(["inspect", str(folder / "tiny.onnx")]) == 0
    out = capsys.readouterr().out
    assert "/grouped/Conv" in out and "group=2" in out
    assert any(line.startswith("conv ") and "8->12 3x3" in line for line in out.splitlines())


def test_shape_misfit_names_key_site_and_shapes(tiny, tmp_path, capsys):
    folder, _, _ = tiny
    save_file({"lora_unet_point.lora_down.weight": torch.ones(2, 10, 1, 1), "lora_unet_point.lora_up.weight": torch.ones(16, 2, 1, 1)},
              str(tmp_path / "wide.safetensors"))
    out = tmp_path / "out.onnx"
    assert main(["rewrite", str(folder / "tiny.onnx"), "--adapter", str(tmp_path / "wide.safetensors"), "--strategy", "merge",
                 "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "lora_unet_point.lora_down.weight" in err and "[2, 10, 1, 1]" in err and "[2, 12, 1, 1]" in err and "'point'" in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_unmatched_keys_reported_and_strict_fails(tiny, tmp_path, capsys):
    folder, _, _ = tiny
    extra = {"lora_unet_proj.lora_down.weight": torch.ones(2, 16), "lora_unet_proj.lora_up.weight": torch.ones(24, 2),
             "lora_unet_projj.lora_down.weight": torch.ones(2, 16), "lora_unet_projj.lora_up.weight": torch.ones(24, 2)}
    save_file(extra, str(tmp_path / "extra.safetensors"))
    args = ["rewrite", str(folder / "tiny.onnx"), "--adapter", str(tmp_path / "extra.safetensors"), "--strategy", "merge",
            "-o", str(tmp_path / "out.onnx")]
    assert main(args + ["--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["adapter_keys"][0]["unmatched"] == {"lora_unet_projj": "proj"}
    assert "1 module(s) matched, 1 unmatched" in captured.err
    (tmp_path / "out.onnx").unlink()
    assert main(args + ["--strict"]) == 2
    assert "lora_unet_projj" in capsys.readouterr().err and not (tmp_path / "out.onnx").exists()


def test_component_errors_name_the_components(tiny, tmp_path, capsys):
    folder, _, _ = tiny
    save_file({"lora_te_proj.lora_down.weight": torch.ones(2, 16), "lora_te_proj.lora_up.weight": torch.ones(24, 2)},
              str(tmp_path / "te.safetensors"))
    args = ["rewrite", str(folder / "tiny.onnx"), "--adapter", str(tmp_path / "te.safetensors"), "--strategy", "merge",
            "-o", str(tmp_path / "out.onnx")]
    assert main(args + ["--component", "unet"]) == 2
    assert "holds no unet modules; it holds text_encoder (1 modules)" in capsys.readouterr().err


def test_component_prefixes_bind_to_their_model(tmp_path):
    """diffusers' ``transformer.`` prefix and LyCORIS's one-model ``lycoris_`` prefix bind like the others."""
    save_file({"transformer.proj.lora_A.weight": torch.ones(2, 16), "transformer.proj.lora_B.weight": torch.ones(24, 2)},
              str(tmp_path / "t.safetensors"))
    save_file({"lycoris_point.lora_down.weight": torch.ones(2, 12, 1, 1), "lycoris_point.lora_up.weight": torch.ones(16, 2, 1, 1)},
              str(tmp_path / "l.safetensors"))
    t = bind(load_adapter(tmp_path / "t.safetensors"), ["conv", "point", "proj"], component="transformer")
    assert (t.binding.component, list(t.modules), t.modules["proj"].scale) == ("transformer", ["proj"], 1.0)
    l = bind(load_adapter(tmp_path / "l.safetensors"), ["conv", "point", "proj"], component="unet")
    assert (l.binding.component, list(l.modules), l.modules["point"].scale) == (None, ["point"], 1.0)
