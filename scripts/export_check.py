"""Loads collm's exports in the tools people use and compares them with collm's own numbers.

    python export_check.py SPEC.json

SPEC.json (written by crates/collm-cli/tests/export.rs) names the token ids, the files holding
collm's logits (raw little-endian float32, [tokens, vocab]) and greedy tokens, and the exports:
  hf:   transformers.AutoModelForCausalLM on the HF directory -> max |logit difference|
  peft: peft.PeftModel.from_pretrained(base HF directory, adapter) -> max |logit difference|
  gguf: llama_cpp.Llama on each GGUF file -> its greedy tokens
Prints one JSON object with the figures; the test asserts on them.
"""

import json
import sys

import numpy as np


def logits_of(model, ids):
    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return out.logits[0].float().numpy()


def main():
    spec = json.load(open(sys.argv[1]))
    ids = spec["ids"]
    result = {}
    if "hf" in spec or "peft" in spec:
        import torch
        import transformers

        torch.set_num_threads(2)
        result["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    if "hf" in spec:
        from transformers import AutoModelForCausalLM

        want = np.fromfile(spec["hf"]["logits"], dtype="<f4").reshape(len(ids), -1)
        m = AutoModelForCausalLM.from_pretrained(spec["hf"]["dir"], torch_dtype="float32")
        got = logits_of(m, ids)
        result["hf_max_abs_diff"] = float(np.abs(got - want).max())
        result["hf_argmax_equal"] = bool((got.argmax(-1) == want.argmax(-1)).all())
    if "peft" in spec:
        import peft
        from transformers import AutoModelForCausalLM

        want = np.fromfile(spec["peft"]["logits"], dtype="<f4").reshape(len(ids), -1)
        base = AutoModelForCausalLM.from_pretrained(spec["peft"]["base"], torch_dtype="float32")
        base_logits = logits_of(base, ids)
        m = peft.PeftModel.from_pretrained(base, spec["peft"]["dir"])
        got = logits_of(m, ids)
        result["peft_version"] = peft.__version__
        result["peft_max_abs_diff"] = float(np.abs(got - want).max())
        # The adapter must matter: the base alone is far from collm's adapted logits.
        result["peft_base_max_abs_diff"] = float(np.abs(base_logits - want).max())
    if "gguf" in spec:
        import llama_cpp

        result["llama_cpp_version"] = llama_cpp.__version__
        result["gguf"] = {}
        for name, path in spec["gguf"]["files"].items():
            llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=2, verbose=False, seed=0)
            llm.reset()
            toks = []
            for t in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
                toks.append(int(t))
                if len(toks) == spec["gguf"]["new_tokens"]:
                    break
            result["gguf"][name] = toks
    print(json.dumps(result))


if __name__ == "__main__":
    main()
