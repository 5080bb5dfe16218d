"""Write a depth-pruned copy of a local safetensors model (drop whole decoder layers, ShortGPT-style).

    .venv/bin/python scripts/prune_layers.py --drop 20-25 --output runs/models/smollm2-24l

The packaged SmolLM2 is the only real model here, so a pruned copy (24 of 30 layers by default) is the receiver
of a real pair whose depths differ while the KV geometry (KV heads, head_dim, RoPE, tokenizer) matches: the case
Q-KVComm's relative-depth layer map and moment matching are for. Kept layers are renumbered 0..L'-1.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from kvcomm.models import load_model
from kvcomm.selection import parse_layers

LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def prune(source: Path, target: Path, drop: tuple[int, ...]) -> Path:
    """Copy ``source`` (a folder with config.json and model.safetensors) to ``target`` without layers ``drop``."""
    config = json.loads((source / "config.json").read_text())
    depth = int(config["num_hidden_layers"])
    keep = [layer for layer in range(depth) if layer not in set(drop)]
    renumber = {old: new for new, old in enumerate(keep)}
    state = load_file(str(source / "model.safetensors"))
    pruned = {}
    for name, tensor in state.items():
        match = LAYER_KEY.match(name)
        if match is None:
            pruned[name] = tensor
        elif int(match.group(1)) in renumber:
            pruned[f"model.layers.{renumber[int(match.group(1))]}.{match.group(2)}"] = tensor
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name not in ("model.safetensors", "config.json") and item.is_file():
            shutil.copy2(item, target / item.name)
    config["num_hidden_layers"] = len(keep)
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = [config["layer_types"][layer] for layer in keep]
    (target / "config.json").write_text(json.dumps(config, indent=2))
    save_file(pruned, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model to prune (converted once if GGUF)")
    parser.add_argument("--drop", default="20-25", help="layers to drop, e.g. '20-25' or '4,9,14'")
    parser.add_argument("--output", type=Path, default=Path("runs/models/smollm2-24l"))
    args = parser.parse_args()
    loaded = load_model(args.model, dtype="fp32")
    source = Path(loaded.model.config._name_or_path)
    drop = parse_layers(args.drop, loaded.num_layers)
    prune(source, args.output, drop)
    pruned = load_model(str(args.output), dtype="fp32")
    print(f"wrote {args.output}: {pruned.num_layers} layers (dropped {list(drop)} of {loaded.num_layers})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
