"""The reference for `collm bench model`: the same work through HF transformers + PyTorch (float32,
CPU): decode tokens/s at batch 1 and 8 after a 128-token prompt (64 new tokens, temperature 0.7,
top-p 0.9, no early stop), and seconds per teacher-forced forward + backward + AdamW step on
B x T tokens (full fine-tuning). Needs torch and transformers (e.g. the CoMLRL reference venv:
/tmp/refbench/venv/bin/python bench/hf_model_bench.py --gguf PATH). Prints one JSON line."""
import argparse, json, os, resource, time

p = argparse.ArgumentParser()
p.add_argument("--gguf", required=True)
p.add_argument("--prompt-tokens", type=int, default=128)
p.add_argument("--new-tokens", type=int, default=64)
p.add_argument("--train-batch", type=int, default=4)
p.add_argument("--train-tokens", type=int, default=256)
p.add_argument("--repeats", type=int, default=2)
p.add_argument("--threads", type=int, default=2)
a = p.parse_args()

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
import torch
from transformers import AutoModelForCausalLM

torch.set_num_threads(a.threads)
torch.manual_seed(0)
d, f = os.path.split(os.path.abspath(a.gguf))
t0 = time.time()
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
load_s = time.time() - t0
vocab = model.config.vocab_size


def tokens(n, seed):
    # The same pseudo-text ids as `collm bench model`.
    m = (1 << 64) - 1
    x = (seed * 6364136223846793005 + 1442695040888963407) & m
    out = []
    for _ in range(n):
        x = (x * 6364136223846793005 + 1442695040888963407) & m
        out.append(100 + (x >> 33) % (min(vocab, 20000) - 100))
    return out


decode = []
model.eval()
for batch in (1, 8):
    ids = torch.tensor([tokens(a.prompt_tokens, i) for i in range(batch)])
    with torch.no_grad():
        t0 = time.time()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.7, top_p=0.9, top_k=0,
                             max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, pad_token_id=0)
        s = time.time() - t0
    n = (out.shape[1] - ids.shape[1]) * batch
    decode.append({"batch": batch, "generate_s": s, "tokens": n, "tokens_per_s": n / s})

model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
seqs = torch.tensor([tokens(a.train_tokens, 1000 + i) for i in range(a.train_batch)])
times = []
for r in range(a.repeats + 1):
    t0 = time.time()
    logits = model(seqs).logits[:, :-1]
    lp = torch.log_softmax(logits, -1).gather(-1, seqs[:, 1:, None]).squeeze(-1)
    loss = -lp.mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if r > 0:
        times.append(time.time() - t0)
print(json.dumps({"reference": "transformers " + __import__("transformers").__version__ + " + torch " + torch.__version__ + " float32",
                  "load_s": load_s, "decode": decode,
                  "train_step": {"batch": a.train_batch, "tokens": a.train_tokens, "full_s": sum(times) / len(times)},
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "threads": a.threads}))
