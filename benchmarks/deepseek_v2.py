"""tpflax on a DeepSeek-V2-style decoder written in flax.linen, against DeepSeek's own (Megatron) layout.

The model: multi-head latent attention (``q_a (d, rq)`` -> RMSNorm -> ``q_b (rq, heads * (nope + rope))``;
``kv_a (d, rkv + rope)`` -> a normed latent and one shared rotary key -> ``kv_b (rkv, heads * (nope + v))``;
``o (heads * v, d)``), one dense SwiGLU layer, then MoE layers: 16 fine-grained routed experts
(``(E, d, f)`` gate/up, ``(E, f, d)`` down, f < d), top-4, two shared experts as one SwiGLU, a router
``(d, E)``. Dense dispatch: every routed expert runs every token, weighted by its top-k gate (0 for the
others). Untied head. d 128, 8 heads, vocab 1000, 2 layers, seq 32, batch 8.

The hand layout: q_b, kv_b column, o row, q_a/kv_a replicated over model; routed experts split over E
(expert parallel); the dense and shared MLPs column/row; embedding and head vocab-parallel; router and
norms replicated; with fsdp, the other dim of every kernel over fsdp.

For each mesh and plan (``tree``: ``tpflax.plan(params, mesh)``, ``model``: with ``model=``, ``hand``,
``replicated``) it compiles the adamw step on 8 CPU devices and prints bytes/device (argument + temp +
output - alias), collective bytes/step, flops/device, the estimate's collective bytes and Estimate.peak
against the compiled peak, and the leaves where a tpflax plan differs from the hand layout with the reason.

    python benchmarks/deepseek_v2.py            # ~2 minutes on 2 shared cores
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

D, H, NOPE, ROPE, VD, RQ, RKV = 128, 8, 16, 8, 16, 64, 32
VOCAB, LAYERS, SEQ, BATCH = 1000, 2, 32, 8
F_DENSE, E, TOPK, F_MOE, N_SHARED = 384, 16, 4, 96, 2


class RMSNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * w


def rotary(x, pos):  # x (b, t, h, r)
    r = x.shape[-1]
    inv = 1.0 / (10000 ** (jnp.arange(0, r, 2) / r))
    ang = pos[:, None] * inv[None, :]  # (t, r/2)
    cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]
    x1, x2 = x[..., ::2], x[..., 1::2]
    return jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).reshape(x.shape)


class MLA(nn.Module):
    @nn.compact
    def __call__(self, x):
        b, t, _ = x.shape
        pos = jnp.arange(t, dtype=jnp.float32)
        q = nn.Dense(RQ, use_bias=False, name="q_a")(x)
        q = nn.Dense(H * (NOPE + ROPE), use_bias=False, name="q_b")(RMSNorm(name="q_a_norm")(q))
        q = q.reshape(b, t, H, NOPE + ROPE)
        q_nope, q_rope = q[..., :NOPE], rotary(q[..., NOPE:], pos)
        kv = nn.Dense(RKV + ROPE, use_bias=False, name="kv_a")(x)
        latent, k_rope = kv[..., :RKV], kv[..., RKV:]
        k_rope = rotary(k_rope[:, :, None, :], pos)  # one rope key shared by every head
        kv = nn.Dense(H * (NOPE + VD), use_bias=False, name="kv_b")(RMSNorm(name="kv_a_norm")(latent))
        kv = kv.reshape(b, t, H, NOPE + VD)
        k_nope, v = kv[..., :NOPE], kv[..., NOPE:]
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope, (b, t, H, ROPE))], -1)
        q = jnp.concatenate([q_nope, q_rope], -1)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(NOPE + ROPE)
        mask = jnp.tril(jnp.ones((t, t), bool))
        s = jnp.where(mask, s, -1e9)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v).reshape(b, t, H * VD)
        return nn.Dense(D, use_bias=False, name="o")(o)


class SwiGLU(nn.Module):
    f: int

    @nn.compact
    def __call__(self, x):
        g = nn.Dense(self.f, use_bias=False, name="gate")(x)
        u = nn.Dense(self.f, use_bias=False, name="up")(x)
        return nn.Dense(D, use_bias=False, name="down")(nn.silu(g) * u)


class MoE(nn.Module):
    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal(0.02)
        logits = nn.Dense(E, use_bias=False, name="router")(x)
        probs = jax.nn.softmax(logits, -1)
        top, _ = jax.lax.top_k(probs, TOPK)
        w = jnp.where(probs >= top[..., -1:], probs, 0.0)  # (b, t, E): top-k gates, 0 elsewhere
        wg = self.param("experts_gate", init, (E, D, F_MOE))
        wu = self.param("experts_up", init, (E, D, F_MOE))
        wd = self.param("experts_down", init, (E, F_MOE, D))
        h = nn.silu(jnp.einsum("btd,edf->btef", x, wg)) * jnp.einsum("btd,edf->btef", x, wu)
        routed = jnp.einsum("btef,efd,bte->btd", h, wd, w)
        return routed + SwiGLU(N_SHARED * F_MOE, name="shared")(x)


class Block(nn.Module):
    moe: bool

    @nn.compact
    def __call__(self, x):
        x = x + MLA(name="attn")(RMSNorm(name="attn_norm")(x))
        h = RMSNorm(name="mlp_norm")(x)
        return x + (MoE(name="moe")(h) if self.moe else SwiGLU(F_DENSE, name="mlp")(h))


class DeepSeekV2(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(VOCAB, D, name="embed")(ids)
        for i in range(LAYERS):
            x = Block(moe=i > 0, name=f"layers_{i}")(x)
        return nn.Dense(VOCAB, use_bias=False, name="head")(RMSNorm(name="norm")(x))


MODEL = DeepSeekV2()
SAMPLE = (jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32),)


def fn(params, ids):
    return MODEL.apply(params, ids)


def abstract_params():
    return jax.eval_shape(lambda: MODEL.init(jax.random.key(0), jnp.zeros((BATCH, SEQ), jnp.int32)))


def hand_rules(mesh: dict[str, int]) -> list:
    f = "fsdp" if mesh.get("fsdp", 1) > 1 else None
    t = "model"
    return [
        (r"attn/(q_b|kv_b)/kernel$", P(f, t)),
        (r"attn/o/kernel$", P(t, f)),
        (r"attn/(q_a|kv_a)/kernel$", P(f, None)),
        (r"experts_(gate|up)$", P(t, f, None)),
        (r"experts_down$", P(t, None, f)),
        (r"(mlp|shared)/(gate|up)/kernel$", P(f, t)),
        (r"(mlp|shared)/down/kernel$", P(t, f)),
        (r"embed/embedding$", P(t, f)),
        (r"head/kernel$", P(f, t)),
        (r"router/kernel$", P(f, None)),
        (r".*", P()),
    ]


def main() -> None:
    import optax

    import tpflax

    params = abstract_params()
    print(f"{'mesh':<16}{'plan':<11}{'bytes/dev':>10}{'comm':>10}{'flops':>12}{'est comm':>10}"
          f"{'peak':>10}{'est peak':>10}")
    for mesh in ({"data": 2, "model": 4}, {"fsdp": 2, "model": 4}):
        calls = {"tree": {"batch": SAMPLE}, "model": {"model": fn, "sample": SAMPLE, "batch": SAMPLE},
                 "hand": {"rules": hand_rules(mesh)}, "replicated": {"rules": [(r".*", "replicate")]}}
        plans = {k: tpflax.plan(params, mesh, **kw) for k, kw in calls.items()}
        m = tpflax.make_mesh(mesh)
        label = ",".join(f"{k}={v}" for k, v in mesh.items())
        for name, p in plans.items():
            dr = tpflax.dry_run(tpflax.make_train_step(fn, p, m, optax.adamw(1e-3), sample=SAMPLE), p, m)
            mem = dr.memory
            held = mem["argument"] + (mem["temp"] or 0) + mem["output"] - (mem["alias"] or 0)
            e = tpflax.estimate(p, optax.adamw(1e-3), model=fn, sample=SAMPLE, backend="cpu")
            print(f"{label:<16}{name:<11}{held:>10}{dr.comm_total:>10.0f}{dr.flops:>12.4g}{e.comm_total:>10.0f}"
                  f"{mem['peak']:>10}{e.peak:>10}", flush=True)
        for name in ("tree", "model"):
            for path, d in plans[name].decisions.items():
                if tuple(d.spec) != tuple(plans["hand"].decisions[path].spec):
                    print(f"  {name} {path}: {d.spec} (hand {plans['hand'].decisions[path].spec}): {d.reason}")


if __name__ == "__main__":
    main()
