"""Why head pruning hurts SmolLM2-135M: per layer, the largest hidden-state magnitude and the dimension
holding it (the massive activation), dense vs COMP 20 % with and without heads (no mask tuning).

    python benchmarks/pruning/heads_massive_activation.py | tail -1 > benchmarks/pruning/results/masktuning/heads_massive_activation.json

Prints one line per model as it finishes, then all of them as one JSON object (the last line).
"""
import json

import torch
import fedprune
from fedprune.pruning import get_calibration
torch.set_num_threads(1)
tok = fedprune.load_tokenizer("smollm2-135m")
calib = get_calibration(tok, "c4", 8, 256, 0)
probe = get_calibration(tok, "c4", 4, 256, 1)

def profile(model):
    with torch.no_grad():
        out = model(input_ids=probe, output_hidden_states=True)
    hs = out.hidden_states
    return [float(h.abs().amax()) for h in hs], [int(h.abs().amax(dim=(0, 1)).argmax()) for h in hs]

res = {}
m = fedprune.load_model("smollm2-135m"); res["dense"] = profile(m); print("dense", json.dumps(res["dense"]), flush=True)
for name, opts in [("heads_no_mt", {"head_sparsity": None, "mask_tuning": False}),
                   ("no_heads_no_mt", {"mask_tuning": False})]:
    m = fedprune.load_model("smollm2-135m")
    r = fedprune.prune(m, "comp", 0.2, calib_ids=calib, **opts)
    res[name] = list(profile(m)) + [r.report["removed_layers"]]; print(name, json.dumps(res[name]), flush=True)
print(json.dumps(res))
