"""Multi-query associative recall (MQAR): GMA against softmax attention (and fla).

MQAR is the recall benchmark of Zoology (Arora et al. 2023, "Zoology: Measuring
and Improving Recall in Efficient Language Models", arXiv 2312.04927).  A
sequence of ``seq_len`` tokens opens with ``kv_pairs`` key-value pairs
``k1 v1 k2 v2 ...`` (keys from the lower half of the vocabulary, values from
the upper half, keys distinct and values distinct within a sequence).  The rest
holds queries: every key reappears exactly once, at an even offset of the query
region, with the gap drawn from Zoology's power law p(g) ~ g^(a - 1), a = 0.01
(so most queries sit near the start of the region); the other positions hold
random filler tokens.  The target at a query's position is the value that
followed that key in the first part; every other target is -100 (ignored).
One deviation from Zoology: a filler token that equals one of the sequence's
keys is replaced by token 0 (never a key), so each key occurs exactly twice;
with Zoology's vocabulary of 8192 such collisions are rare anyway, with the
small vocabulary of ``--small`` they would put a wrong pair in front of a query.

The model is a tiny causal transformer: a token embedding (a learned position
embedding only with ``--pos learned``), ``layers`` pre-norm blocks, a final norm
and an LM head.  A block is x + mixer(conv(norm(x))), then x + mlp(norm(x)),
where conv is a short causal depthwise convolution with a residual, h + conv(h)
(``--conv 0`` drops it).  The convolution lets a value token see the key in
front of it, which is what the short convolutions of H3, Based and fla's layers
are for; the residual keeps the current token in full view.  Without it GMA
stayed on the "some value of this sequence" plateau (accuracy 1 / kv_pairs)
in every --small run tried; with a plain (non-residual) convolution it left
the plateau only in some runs, depending on K, lr and seed.  Position embeddings are off by default
because the convolution supplies the order the task needs, and GMA learned
faster without them.  Token mixers:

  gma   gmagen.torch.GaussianMixtureAttention(causal=True): triton on CUDA,
        the torch lowering on CPU
  sdpa  multi-head causal softmax attention (F.scaled_dot_product_attention)
  fla   fla.layers.GatedLinearAttention, only when ``import fla`` works and the
        device is CUDA (fla's kernels are Triton GPU kernels); else skipped with
        the reason printed

Each mixer trains with AdamW (weight decay on weight matrices only; linear
warm-up, cosine decay to 0.1 of the peak) on freshly drawn batches, the same
batches for every mixer (one seed), and is evaluated every ``eval_every`` steps
on a fixed held-out set (accuracy over query positions only).  Throughput counts the
tokens of the training steps after the first (which pays one-time costs), timed
with time.perf_counter after torch.cuda.synchronize on CUDA; drawing the data
and evaluating are not timed.  Results go to
``--out`` (default benchmarks/results/mqar/): ``mqar.json`` (config, curves,
timings) and ``mqar.png`` (loss and accuracy against step, one colour per mixer).

Settings.  Without ``--small`` (meant for a GPU; not yet run by the author of
this script): vocab 8192, seq_len 512, 64 kv pairs, d_model 128, 2 heads,
K = 64, 2 layers, batch 64, 8000 steps, lr 1e-3: Zoology's MQAR task at its
hard end, likely with fewer training steps than Zoology's runs, which also sweep
lr per mixer; one setting is no verdict on a mixer.
``--small`` (CPU, about 20 s of training for gma and 10 s for sdpa on one
thread): vocab 64, seq_len 32, 4 kv pairs, d_model 64, 2 heads, K = 32, 2
layers, batch 32, 300 steps, lr 3e-3.  With seq_len 64, 8 pairs and vocab 128,
neither mixer left the plateau within 200 steps.

    python examples/mqar.py --small --mixer gma sdpa --threads 1
    python examples/mqar.py --device cuda --mixer gma sdpa fla
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MIXERS = ("gma", "sdpa", "fla")
IGNORE = -100  # target of positions that are not queries (F.cross_entropy's ignore_index)


@dataclasses.dataclass
class MQARConfig:
    vocab_size: int = 8192
    seq_len: int = 512
    kv_pairs: int = 64
    power_a: float = 0.01        # Zoology's power law for query gaps
    d_model: int = 128
    heads: int = 2
    components: int = 64         # K of GMA
    layers: int = 2
    conv: int = 4                # width of the short causal convolution, 0 = none
    pos: str = "none"            # position embedding: "none" or "learned"
    batch: int = 64
    steps: int = 8000
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: float = 0.1          # fraction of steps with linear warm-up
    eval_every: int = 250
    eval_size: int = 1024
    seed: int = 0
    device: str = "cpu"


def small_config(**overrides) -> MQARConfig:
    """CPU-friendly settings (see the module docstring)."""
    cfg = MQARConfig(vocab_size=64, seq_len=32, kv_pairs=4, d_model=64, heads=2, components=32,
                     layers=2, batch=32, steps=300, lr=3e-3, eval_every=25, eval_size=256)
    return dataclasses.replace(cfg, **overrides)


# -- data -----------------------------------------------------------------------

def _check_task(seq_len: int, num_kv_pairs: int, vocab_size: int) -> None:
    # the pairs, then as many query slots (every other position) as pairs
    if num_kv_pairs < 1 or seq_len < 4 * num_kv_pairs:
        raise ValueError(f"MQAR: seq_len={seq_len} must be >= 4 * kv_pairs = {4 * num_kv_pairs}")
    if vocab_size // 2 - 1 < num_kv_pairs:
        raise ValueError(f"MQAR: vocab_size={vocab_size} gives {vocab_size // 2 - 1} keys, "
                         f"fewer than kv_pairs={num_kv_pairs}")


def make_mqar_batch(batch: int, seq_len: int, num_kv_pairs: int, vocab_size: int, *,
                    power_a: float = 0.01, generator: Optional[torch.Generator] = None,
                    device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """(inputs, targets), both [batch, seq_len] int64; targets are IGNORE except
    at query positions, where they hold the value paired with the query's key.
    Drawn on the CPU from ``generator`` (reproducible on any device), then moved."""
    _check_task(seq_len, num_kv_pairs, vocab_size)
    g, P, half = generator, num_kv_pairs, vocab_size // 2
    # distinct keys from 1..half-1 (0 is the placeholder) and distinct values from half..V-1
    keys = 1 + torch.rand(batch, half - 1, generator=g).argsort(-1)[:, :P]
    values = half + torch.rand(batch, vocab_size - half, generator=g).argsort(-1)[:, :P]
    inputs = torch.randint(vocab_size, (batch, seq_len), generator=g)
    collide = (inputs[:, :, None] == keys[:, None, :]).any(-1)
    inputs[collide] = 0  # a filler equal to a key would be a second, wrong pair
    inputs[:, 0:2 * P:2], inputs[:, 1:2 * P:2] = keys, values
    # query gaps: P distinct slots of the query region, weighted by Zoology's power law
    slots = (seq_len - 2 * P) // 2
    weights = power_a * torch.arange(1, slots + 1, dtype=torch.float64) ** (power_a - 1)
    gaps = torch.multinomial(weights.expand(batch, slots), P, replacement=False, generator=g)
    pos = 2 * P + 2 * gaps                                     # [batch, P]
    inputs.scatter_(1, pos, keys)
    targets = torch.full_like(inputs, IGNORE).scatter_(1, pos, values)
    return inputs.to(device), targets.to(device)


# -- model ----------------------------------------------------------------------

class SDPAttention(nn.Module):
    """Multi-head causal softmax attention."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        B, N, E = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # [B, H, N, D]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, N, E))


class FLAMixer(nn.Module):
    """fla's GatedLinearAttention; its forward returns (o, attentions, cache)."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        from fla.layers import GatedLinearAttention

        self.layer = GatedLinearAttention(mode="chunk", hidden_size=d_model, num_heads=heads)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layer(x)
        return out[0] if isinstance(out, tuple) else out


def mixer_unavailable(name: str, device: str) -> Optional[str]:
    """Why mixer ``name`` cannot run on ``device``, or None when it can."""
    if name not in MIXERS:
        return f"unknown mixer {name!r}; expected one of {', '.join(MIXERS)}"
    if name != "fla":
        return None
    try:
        import fla.layers  # noqa: F401
    except Exception as exc:  # any import failure (missing, or broken triton) means skip
        return f"`import fla.layers` failed: {type(exc).__name__}: {exc}"
    if not device.startswith("cuda"):
        return "fla's kernels are Triton GPU kernels; run with --device cuda"
    return None


def make_mixer(name: str, cfg: MQARConfig) -> nn.Module:
    if name == "gma":
        from gmagen.torch import GaussianMixtureAttention

        return GaussianMixtureAttention(cfg.d_model, cfg.heads, cfg.components, causal=True)
    if name == "sdpa":
        return SDPAttention(cfg.d_model, cfg.heads)
    return FLAMixer(cfg.d_model, cfg.heads)


class ShortConv(nn.Module):
    """Causal depthwise convolution over a few tokens: lets a token see its
    predecessor (the key in front of a value), as the short convolutions of
    Based, H3 and fla's layers do."""

    def __init__(self, d_model: int, width: int):
        super().__init__()
        self.width = width
        self.conv = nn.Conv1d(d_model, d_model, width, groups=d_model)

    def forward(self, x: Tensor) -> Tensor:  # [B, N, E]
        h = F.pad(x.transpose(1, 2), (self.width - 1, 0))    # left pad only: causal
        # residual: the current token stays in full view, not in a random mix
        return x + self.conv(h).transpose(1, 2)


class Block(nn.Module):
    def __init__(self, mixer: str, cfg: MQARConfig):
        super().__init__()
        E = cfg.d_model
        self.norm1, self.norm2 = nn.LayerNorm(E), nn.LayerNorm(E)
        self.conv = ShortConv(E, cfg.conv) if cfg.conv > 0 else nn.Identity()
        self.mixer = make_mixer(mixer, cfg)
        self.mlp = nn.Sequential(nn.Linear(E, 4 * E), nn.GELU(), nn.Linear(4 * E, E))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.mixer(self.conv(self.norm1(x)))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, mixer: str, cfg: MQARConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.blocks = nn.ModuleList(Block(mixer, cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:  # [B, N] -> logits [B, N, V]
        x = self.tok(tokens)
        if self.pos is not None:
            x = x + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


# -- training -------------------------------------------------------------------

def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()  # CUDA runs asynchronously: wait before reading the clock


@torch.no_grad()
def evaluate(model: nn.Module, inputs: Tensor, targets: Tensor, batch: int) -> tuple[float, float]:
    """(loss, accuracy) over the query positions of a held-out set."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for lo in range(0, inputs.shape[0], batch):
        logits = model(inputs[lo:lo + batch])
        tgt = targets[lo:lo + batch]
        loss_sum += float(F.cross_entropy(logits.flatten(0, 1), tgt.flatten(),
                                          ignore_index=IGNORE, reduction="sum"))
        query = tgt != IGNORE
        correct += int((logits.argmax(-1)[query] == tgt[query]).sum())
        count += int(query.sum())
    model.train()
    return loss_sum / count, correct / count


def _lr_factor(step: int, cfg: MQARConfig) -> float:
    """Linear warm-up, then cosine decay to 0.1 of the peak."""
    warm = max(1, int(cfg.warmup * cfg.steps))
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, cfg.steps - warm)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * t))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay for weight matrices only: not for biases and norms, nor for
    GMA's mixture (mean, log_var, logit), which decay would pull towards one
    shared unit Gaussian."""
    decay, keep = [], []
    for name, p in model.named_parameters():
        mixture = name.rsplit(".", 1)[-1] in ("mean", "log_var", "logit")
        (keep if p.dim() < 2 or mixture else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def train(mixer: str, cfg: MQARConfig) -> dict:
    """Train one mixer on MQAR; returns its curves, final numbers and timings.
    Raises RuntimeError when the mixer cannot run on cfg.device."""
    why = mixer_unavailable(mixer, cfg.device)
    if why:
        raise RuntimeError(f"mixer {mixer!r}: {why}")
    torch.manual_seed(cfg.seed)  # every mixer: the same seed, the same training batches
    model = TinyLM(mixer, cfg).to(cfg.device)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    train_gen = torch.Generator().manual_seed(cfg.seed)
    # held-out set: its own seed stream, fixed for the whole run and across mixers
    eval_set = make_mqar_batch(cfg.eval_size, cfg.seq_len, cfg.kv_pairs, cfg.vocab_size,
                               power_a=cfg.power_a, device=cfg.device,
                               generator=torch.Generator().manual_seed(cfg.seed + 1_000_003))
    curves: dict = {"step": [], "loss": [], "eval_step": [], "eval_loss": [], "eval_acc": []}
    step_times = []
    for step in range(cfg.steps):
        inputs, targets = make_mqar_batch(cfg.batch, cfg.seq_len, cfg.kv_pairs, cfg.vocab_size,
                                          power_a=cfg.power_a, generator=train_gen,
                                          device=cfg.device)
        _sync(cfg.device)
        t0 = time.perf_counter()
        logits = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        _sync(cfg.device)
        step_times.append(time.perf_counter() - t0)
        curves["step"].append(step + 1)
        curves["loss"].append(loss.item())
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            eval_loss, acc = evaluate(model, *eval_set, cfg.batch)
            curves["eval_step"].append(step + 1)
            curves["eval_loss"].append(eval_loss)
            curves["eval_acc"].append(acc)
    # the first step pays for one-time work (kernel compilation, allocator warm-up)
    timed = step_times[1:] or step_times
    return {"mixer": mixer, **curves,
            "final_loss": curves["eval_loss"][-1], "final_acc": curves["eval_acc"][-1],
            "params": sum(p.numel() for p in model.parameters()),
            "train_time_s": sum(step_times), "first_step_s": step_times[0],
            "tokens_per_s": len(timed) * cfg.batch * cfg.seq_len / sum(timed)}


# -- reporting ------------------------------------------------------------------

def print_table(results: list[dict]) -> None:
    print(f"\n{'mixer':<6} {'params':>8} {'eval loss':>9} {'eval acc':>8} {'best acc':>8} "
          f"{'train s':>8} {'tokens/s':>10}")
    for r in results:
        print(f"{r['mixer']:<6} {r['params']:>8} {r['final_loss']:>9.3f} {r['final_acc']:>8.3f} "
              f"{max(r['eval_acc']):>8.3f} {r['train_time_s']:>8.1f} {r['tokens_per_s']:>10.0f}")


def plot(results: list[dict], cfg: MQARConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for i, r in enumerate(results):
        color = f"C{i}"  # one colour per mixer in both panels
        ax_loss.plot(r["step"], r["loss"], color=color, alpha=0.3, lw=0.8)
        ax_loss.plot(r["eval_step"], r["eval_loss"], color=color, label=r["mixer"])
        ax_acc.plot(r["eval_step"], r["eval_acc"], color=color, marker=".", label=r["mixer"])
    ax_loss.set(xlabel="step", ylabel="cross-entropy at query positions\n(pale: train batches, "
                "line: held-out set)", yscale="log")
    ax_acc.set(xlabel="step", ylabel="eval accuracy (query positions)", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"MQAR: seq_len {cfg.seq_len}, {cfg.kv_pairs} kv pairs, vocab {cfg.vocab_size}, "
                 f"d_model {cfg.d_model}, {cfg.layers} layers, K {cfg.components}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mixer", nargs="+", default=["gma", "sdpa", "fla"], choices=MIXERS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="CPU-friendly settings")
    fields = {f.name: f for f in dataclasses.fields(MQARConfig)}
    for name in ("steps", "seq_len", "kv_pairs", "d_model", "heads", "components", "layers",
                 "batch", "lr", "vocab_size", "conv", "eval_every", "eval_size", "seed"):
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None,
                       type=float if fields[name].type == "float" else int)
    p.add_argument("--pos", default=None, choices=("none", "learned"),
                   help="position embedding (default none: the short convolution gives order)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default); small problems run "
                        "fastest on 1 thread")
    p.add_argument("--out", default="benchmarks/results/mqar")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(MQARConfig)
             if getattr(args, f.name, None) is not None}
    given["device"] = args.device
    cfg = small_config(**given) if args.small else dataclasses.replace(MQARConfig(), **given)
    print(f"config: {cfg}")
    results, skipped = [], {}
    for name in args.mixer:
        why = mixer_unavailable(name, cfg.device)
        if why:
            print(f"skipping {name}: {why}")
            skipped[name] = why
            continue
        print(f"training {name} ...", flush=True)
        r = train(name, cfg)
        print(f"  {name}: eval acc {r['final_acc']:.3f}, eval loss {r['final_loss']:.3f}, "
              f"{r['train_time_s']:.1f} s, {r['tokens_per_s']:.0f} tokens/s", flush=True)
        results.append(r)
        save(results, skipped, cfg, Path(args.out))  # after each mixer: a cut-off run keeps it
    if results:
        print_table(results)
        print(f"wrote {Path(args.out) / 'mqar.json'} and {Path(args.out) / 'mqar.png'}")


def save(results: list[dict], skipped: dict, cfg: MQARConfig, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {"config": dataclasses.asdict(cfg), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "skipped": skipped, "results": results}
    (out / "mqar.json").write_text(json.dumps(meta, indent=1))
    plot(results, cfg, out / "mqar.png")


if __name__ == "__main__":
    main()
