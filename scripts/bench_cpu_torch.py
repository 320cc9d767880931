"""PyTorch's side of scripts/bench-cpu.sh: the same GPT-2 as Baton's (pre-LN blocks, tanh GELU, tied LM head,
AdamW), eager fp32 on the CPU, with a fixed number of threads; `--microbatches M` accumulates the gradients of M
equal micro-batches per step (what a pipeline's micro-batching costs PyTorch). Prints one JSON line: median step
seconds, tokens/s, peak resident memory. Run by scripts/bench-cpu.sh (which installs torch into a venv under target/)."""
import argparse
import json
import math
import resource
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.c_fc = nn.Linear(d, 4 * d)
        self.mlp_proj = nn.Linear(4 * d, d)
        self.heads = heads

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        h = self.heads
        q, k, v = (z.view(b, t, h, c // h).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class Gpt(nn.Module):
    def __init__(self, vocab, seq, layers, d, heads):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(seq, d)
        self.h = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def main():
    p = argparse.ArgumentParser()
    for name, default in [("layers", 4), ("d-model", 128), ("heads", 4), ("vocab", 256), ("batch", 8), ("seq", 128),
                          ("threads", 2), ("steps", 10), ("warmup", 3), ("microbatches", 1)]:
        p.add_argument("--" + name, type=int, default=default)
    a = p.parse_args()
    if a.microbatches < 1 or a.batch % a.microbatches:
        raise SystemExit(f"--microbatches {a.microbatches} must divide --batch {a.batch}")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = Gpt(a.vocab, a.seq, a.layers, a.d_model, a.heads)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    times = []
    for step in range(a.steps + a.warmup):
        x = torch.randint(0, a.vocab, (a.batch, a.seq))
        y = torch.randint(0, a.vocab, (a.batch, a.seq))
        t0 = time.perf_counter()
        for xs, ys in zip(x.chunk(a.microbatches), y.chunk(a.microbatches)):
            loss = model(xs, ys) / a.microbatches
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        assert math.isfinite(loss.item())
        if step >= a.warmup:
            times.append(dt)
    median = statistics.median(times)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"engine": "pytorch", "version": torch.__version__, "step_s": median,
                      "tokens_per_s": a.batch * a.seq / median, "peak_rss_bytes": rss, "threads": a.threads,
                      "microbatches": a.microbatches}))


if __name__ == "__main__":
    main()
