"""What a checkpoint holds: components, parameter counts, dtypes, and MACs per call."""

from __future__ import annotations

from pocketfusion.macs import component_callable, component_inputs, count_macs

_ORDER = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")


def describe(model) -> dict:
    """Per component: class, parameters, dtype, the input shapes of one call and its MACs.

    The U-Net is counted at batch 1 and the model's native latent size (a CFG step is two calls);
    text encoders at the tokenizer's max length; the VAE decoder for one image.
    """
    comps = model.components
    names = [n for n in _ORDER if n in comps or (n == "vae_decoder" and "vae" in comps)]
    out = {"path": str(model.path), "kind": model.kind, "class": model.class_name, "components": {}}
    if "scheduler" in comps:
        out["scheduler"] = type(comps["scheduler"]).__name__
    if getattr(model, "origin", None):  # a single-file checkpoint: what it was read as
        out["single_file"] = dict(model.origin)
    for name in names:
        module = comps["vae"] if name == "vae_decoder" else comps[name]
        params = sum(p.numel() for p in (module.decoder.parameters() if name == "vae_decoder" else module.parameters()))
        if name == "vae_decoder":
            pqc = getattr(module, "post_quant_conv", None)  # AutoencoderTiny has none
            params += sum(p.numel() for p in pqc.parameters()) if pqc is not None else 0
        args, kwargs = component_inputs(model, name)
        macs = count_macs(component_callable(model, name), args, kwargs)
        out["components"][name] = {
            "class": type(module).__name__,
            "parameters": params,
            "dtype": str(next(module.parameters()).dtype).replace("torch.", ""),
            "call_inputs": {f"arg{i}": list(a.shape) for i, a in enumerate(args)},
            "macs": macs,
        }
    return out


def _human(n: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} "


def format_table(info: dict) -> str:
    lines = [f"{info['path']}  ({info['class']}{', ' + info['scheduler'] if 'scheduler' in info else ''})", ""]
    if "single_file" in info:
        o = info["single_file"]
        lines[1:1] = [f"single file: {o['family']}, {o['prediction_type']} ({o['prediction_type_from']}), config {o['config']}"]
    head = f"{'component':<15} {'class':<28} {'params':>10} {'dtype':>8} {'MACs/call':>11} {'attn MACs':>11}  input"
    lines += [head, "-" * len(head)]
    for name, c in info["components"].items():
        shape = "x".join(str(d) for d in c["call_inputs"]["arg0"])
        lines.append(
            f"{name:<15} {c['class']:<28} {_human(c['parameters']) + 'P':>10} {c['dtype']:>8} "
            f"{_human(c['macs']['total']) + 'MAC':>11} {_human(c['macs']['attention']) + 'MAC':>11}  {shape}"
        )
    return "\n".join(lines)
