#!/usr/bin/env python3
"""PyTorch reference for Baton's GPU benchmark (issue: the pipeline on GPUs).

The same GPT-2 as Baton's engine (pre-LN blocks, tanh GELU, tied LM head, no dropout), in plain
PyTorch with bf16 autocast, torch.compile and fused AdamW, timed on the same batch shape
(B x T tokens per step) so BENCHMARKS.md can carry the ratio Baton / PyTorch measured in the
same script run. Prints one machine-readable line:

    TORCH_REFERENCE tokens_per_s=... step_ms=... mfu=... params=... B=... T=... compile=...

Usage (on the GPU machine, whose python3 holds PyTorch):
    python3 scripts/torch_reference.py --batch 64 --seq 1024 --steps 20 [--no-compile]
"""
import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, c, nh):
        super().__init__()
        self.nh = nh
        self.ln_1 = nn.LayerNorm(c, eps=1e-5)
        self.c_attn = nn.Linear(c, 3 * c)
        self.c_proj = nn.Linear(c, c)
        self.ln_2 = nn.LayerNorm(c, eps=1e-5)
        self.c_fc = nn.Linear(c, 4 * c)
        self.mlp_proj = nn.Linear(4 * c, c)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.nh, c // self.nh).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab, max_seq, layers, c, nh):
        super().__init__()
        self.wte = nn.Embedding(vocab, c)
        self.wpe = nn.Embedding(max_seq, c)
        self.h = nn.ModuleList(Block(c, nh) for _ in range(layers))
        self.ln_f = nn.LayerNorm(c, eps=1e-5)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith("c_proj.weight") or name.endswith("mlp_proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for block in self.h:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied LM head
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="measured bf16 GEMM rate for MFU (0: not reported)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test of this script)")
    a = ap.parse_args()
    torch.manual_seed(0)
    dev = a.device
    torch.backends.cuda.matmul.allow_tf32 = True
    model = GPT(a.vocab, a.seq, a.layers, a.d_model, a.heads).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=dev == "cuda")
    step_fn = model if a.no_compile else torch.compile(model)
    x = torch.randint(0, a.vocab, (a.batch, a.seq), device=dev)
    y = torch.randint(0, a.vocab, (a.batch, a.seq), device=dev)

    def step():
        with torch.autocast(device_type=dev, dtype=torch.bfloat16):
            loss = step_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(a.warmup):
        step()
    if dev == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(a.steps):
            loss = step()
        end.record()
        torch.cuda.synchronize()
        step_ms = start.elapsed_time(end) / a.steps
    else:
        t0 = time.perf_counter()
        for _ in range(a.steps):
            loss = step()
        step_ms = (time.perf_counter() - t0) * 1e3 / a.steps
    tokens = a.batch * a.seq
    tps = tokens / (step_ms / 1e3)
    flops_per_token = 6 * n_params + 6 * a.layers * a.d_model * a.seq
    mfu = (tps * flops_per_token / 1e12 / a.peak_tflops) if a.peak_tflops > 0 else float("nan")
    print(f"TORCH_REFERENCE tokens_per_s={tps:.0f} step_ms={step_ms:.2f} mfu={mfu:.4f} params={n_params} "
          f"B={a.batch} T={a.seq} compile={not a.no_compile} loss={loss.item():.4f}", flush=True)


if __name__ == "__main__":
    main()
