"""Run by the real sae-lens package's Python (never imported by pytest): `save DIR` writes one SAE of each
architecture with random weights plus inputs and SAELens's encodings; `encode DIR` loads every folder
mechscope exported under DIR with SAELens and writes SAELens's encodings of the same inputs."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SITE = "blocks.1.hook_resid_pre"


def save(root: Path) -> None:
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

    torch.manual_seed(0)
    x = torch.randn(64, 16)
    out = {"x": x}
    for name, cls, cfg in (
        ("standard", StandardSAE, StandardSAEConfig(d_in=16, d_sae=40)),
        ("topk", TopKSAE, TopKSAEConfig(d_in=16, d_sae=40, k=5)),
        ("jumprelu", JumpReLUSAE, JumpReLUSAEConfig(d_in=16, d_sae=40)),
    ):
        cfg.metadata.hook_name = SITE
        sae = cls(cfg)
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn_like(p) / 4)
            if name == "jumprelu":
                sae.threshold.copy_(torch.rand_like(sae.threshold) / 5)
        sae.save_model(root / name)
        with torch.no_grad():
            out[f"{name}.f"] = sae.encode(x)
            out[f"{name}.recon"] = sae(x)
    save_file(out, str(root / "saelens_side.safetensors"))


def encode(root: Path) -> None:
    from sae_lens import SAE

    x = load_file(str(root / "inputs.safetensors"))["x"]
    out = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        sae = SAE.load_from_disk(str(folder))
        with torch.no_grad():
            out[f"{folder.name}.f"] = sae.encode(x)
            out[f"{folder.name}.recon"] = sae(x)
        out[f"{folder.name}.hook"] = torch.tensor([ord(c) for c in (sae.cfg.metadata.hook_name or "")])
    save_file(out, str(root / "saelens_side.safetensors"))


if __name__ == "__main__":
    {"save": save, "encode": encode}[sys.argv[1]](Path(sys.argv[2]))
