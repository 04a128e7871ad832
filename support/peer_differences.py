"""Where `lora-pro-adamw` 0.2.1 (a PyTorch port of the LoRA-Pro authors' code) differs from the
paper's definitions that lora_jax implements (../shared/LORA_PRO.md). Runs in the peers' venv,
started by the peers tool:

    python -m bench.peers --differences

(`python -m bench.peers --setup-only` creates that venv.) Every claim below is computed from the
package's own functions on random float64 factors (paper orientation: A (r, n), B (m, r),
W = W0 + s·B A; gA = s·Bᵀg, gB = s·g Aᵀ from a full gradient g), and printed with the figure that
shows it. tests/test_peers.py aligns each difference and then matches lora_jax to ≤ 1e-4 (float32) and
≤ 1e-9 (float64; there lora_jax's own r×r algebra must be float64 too: `lora_pro(compute_dtype=...)`
defaults to float32, which alone gives ~1e-7 relative differences of the adjusted gradients).
"""

from __future__ import annotations

import inspect
import math
import sys
from pathlib import Path

import torch
from torch import nn

from lora_pro import LoRAProAdamW, _lorapro

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script beside peers_worker.py
from peers_worker import patched_efficient, patched_reference  # noqa: E402

r, m, n, s = 8, 48, 40, 2.0


def factors(b_scale=0.3):
    A = torch.randn(r, n) / math.sqrt(n)
    B = b_scale * torch.randn(m, r)
    g = torch.randn(m, n)
    return A, B, g, s * B.T @ g, s * g @ A.T


def rel(x, y):
    return float(torch.linalg.norm(x - y) / torch.linalg.norm(y))


def projection(A, B, g):
    PB = B @ torch.linalg.pinv(B.T @ B) @ B.T if torch.linalg.norm(B) > 0 else torch.zeros(m, m)
    PA = A.T @ torch.linalg.solve(A @ A.T, A)
    return PB @ g + g @ PA - PB @ g @ PA


def adjusted(A, B, gA, gB, X, jitter=0.0):
    """Theorem 2.1's (gA', gB') for a given X, with an optional jitter on the Gram matrices."""
    I = torch.eye(r)
    SB, SA = B.T @ B + jitter * I, A @ A.T + jitter * I
    ga = torch.linalg.solve(SB, gA) / s**2 + X @ A
    P = torch.eye(m) - B @ torch.linalg.solve(SB, B.T)
    gb = P @ gB @ torch.linalg.inv(SA) / s**2 - B @ X
    return ga, gb


def main() -> None:
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    print("1. efficient mode, default efficient_solver='vec': _solve_sylvester_vec solves the transposed equation")
    A, B, g, gA, gB = factors()
    SB, SA = B.T @ B, A @ A.T
    C = -torch.linalg.solve(SB, gA) @ A.T / s**2
    X_vec = _lorapro._solve_sylvester_vec(SB, SA, C)
    X_eig = torch.as_tensor(_lorapro._solve_sylvester(SB, SA, C))
    for name, X in (("vec", X_vec), ("eig", X_eig)):
        intended = rel(SB @ X + X @ SA, C)
        transposed = rel(SA @ X + X @ SB, C)
        print(f"   {name}: residual of (BᵀB)X + X(AAᵀ) = C: {intended:.2e};  of (AAᵀ)X + X(BᵀB) = C: {transposed:.2e}")
    print("   why: K = kron(I, SB) + kron(SAᵀ, I) acts on the column-major vec(X), but C.reshape(-1) and "
          ".reshape(r, r) are row-major")
    ga_v, gb_v = adjusted(A, B, gA, gB, X_vec)
    ga_e, gb_e = adjusted(A, B, gA, gB, X_eig)
    obj = lambda ga, gb: float(torch.linalg.norm(ga - gA) ** 2 + torch.linalg.norm(gb - gB) ** 2)
    eq = lambda ga, gb: s * (B @ ga + gb @ A)
    print(f"   equivalent gradient: vec vs eig differ by {rel(eq(ga_v, gb_v), eq(ga_e, gb_e)):.1e} (any X gives the "
          f"projection; vs the float64 projection: {rel(eq(ga_e, gb_e), projection(A, B, g)):.1e})")
    print(f"   what X is chosen for, ‖gA'−gA‖² + ‖gB'−gB‖²: eig {obj(ga_e, gb_e):.4f}, vec {obj(ga_v, gb_v):.4f}; "
          f"the adjusted gradients differ by {rel(ga_v, ga_e):.2f} (A) and {rel(gb_v, gb_e):.2f} (B), relative")
    print("   aligned by: LoRAProAdamW(..., lorapro_mode='efficient', efficient_solver='eig')\n")

    print("2. efficient mode adds jitter 1e-6 to BᵀB and AAᵀ, in their inverses AND in the Sylvester solve; lora_jax "
          "damps the inverses 1/(λ+δ) (δ = 1e-8) and solves the undamped Sylvester equation (denominators λ_i + μ_j)")
    for bs in (0.3, 0.02, 1e-3):
        A, B, g, gA, gB = factors(bs)
        SB, SA = B.T @ B, A @ A.T
        C = -torch.linalg.solve(SB, gA) @ A.T / s**2
        ga0, gb0 = adjusted(A, B, gA, gB, torch.as_tensor(_lorapro._solve_sylvester(SB, SA, C)), 0.0)
        I = torch.eye(r)
        Cj = -torch.linalg.solve(SB + 1e-6 * I, gA) @ A.T / s**2
        ga1, gb1 = adjusted(A, B, gA, gB, torch.as_tensor(_lorapro._solve_sylvester(SB + 1e-6 * I, SA + 1e-6 * I, Cj)), 1e-6)
        # lora_jax.lora_pro(damping=1e-6): the damped inverses (C, gA', projector, (AAᵀ)⁻¹), the undamped Sylvester
        ga2, gb2 = adjusted(A, B, gA, gB, torch.as_tensor(_lorapro._solve_sylvester(SB, SA, Cj)), 1e-6)
        # the package's own function, with and without the patch that undamps its Sylvester call
        ref = {}
        # (both with its float32 Adam normalisation, 7. below, patched away)
        for name, fn in (("shipped", patched_efficient(["native_adam_dtype"])),
                         ("undamped_sylvester", patched_efficient(["undamped_sylvester", "native_adam_dtype"]))):
            ga, gb = gA.clone(), gB.clone()
            # ε = 1e12 ≫ |g|: the Adam step m̂/(√v̂+ε) ≈ g/ε is linear, so ε·update = the adjusted gradient
            fn(A, B, ga, gb, s, 0, None, None, None, None, (0.9, 0.999), 1e12, solver="eig")
            ref[name] = (1e12 * ga, 1e12 * gb)
        print(f"   B ~ {bs:g}·N(0,1) (λ_min(BᵀB) = {float(torch.linalg.eigvalsh(SB)[0]):.1e}): gA' with vs without "
              f"the 1e-6 jitter differ by {rel(ga1, ga0):.1e}; with it in the inverses only (lora_jax, damping=1e-6) vs "
              f"in both (the package): gA' {rel(ga2, ga1):.1e}, gB' {rel(gb2, gb1):.1e}; the package's own step vs "
              f"lora_jax's definition (ε = 1e12: linear): as shipped {rel(ref['shipped'][0], ga2):.1e}, Sylvester undamped {rel(ref['undamped_sylvester'][0], ga2):.1e}")
    print("   (B is that small for the first steps after LoRA's B = 0 init: early efficient-mode steps differ)")
    print("   why it shows in a cross-check: Adam's first step g/(|g|+ε) turns an absolute difference of gA' — set by\n"
          "   the whole matrix, ~1e-7 of its largest entries on MiniLM — into an O(1) difference of the few entries with\n"
          "   |g| ~ ε (1 of 3072 per tensor): the MiniLM float64 update error 8.0e-5 / 1.0e-4 / 1.1e-4 at steps 1/2/3\n"
          "   (lora_jax in float64) falls to 6.0e-8 / 1.1e-7 / 1.4e-7 with the Sylvester undamped (tests/test_peers.py)")
    print("   aligned by: lora_jax.lora_pro(damping=1e-6) for the inverses, and patching the package's Sylvester call to\n"
          "   the undamped SB, SA (support/peers_worker.py: patched_efficient 'undamped_sylvester')\n")

    print("3. full mode: the step == 0 branch uses gA as is, an unprojected gB·(AAᵀ)⁻¹/s², and no Sylvester X")
    beta, eps = (0.9, 0.999), 1e-8
    patched = patched_reference(["no_step0_branch"])
    for bs in (0.3, 0.0):
        A, B, g, gA, gB = factors(bs)
        out = {}
        for name, fn in (("as shipped", _lorapro.lorapro_full_adjustment), ("no step-0 branch", patched)):
            ga, gb = gA.clone(), gB.clone()
            mom, _ = fn(A, B, ga, gb, s, 0, None, None, beta, eps)
            out[name] = (mom / (1 - beta[0]), ga, gb)  # first moment at step 0 = (1−β1)·g̃
        proj = projection(A, B, g)
        print(f"   B {'≠ 0' if bs else '= 0'}: its step-0 g̃ vs the projection P_B g + g P_A − P_B g P_A: "
              f"{rel(out['as shipped'][0], proj):.1e} (general branch: {rel(out['no step-0 branch'][0], proj):.1e}); "
              f"updates of A, B differ by max {float((out['as shipped'][1] - out['no step-0 branch'][1]).abs().max()):.1e}, "
              f"{float((out['as shipped'][2] - out['no step-0 branch'][2]).abs().max()):.1e} "
              f"(largest update entries {float(out['no step-0 branch'][1].abs().max()):.1e}, "
              f"{float(out['no step-0 branch'][2].abs().max()):.1e})")
    print("   so the branch matters only when B ≠ 0 at the first step (PiSSA/OLoRA-style inits, a resumed run "
          "with a fresh optimizer)")
    print("   aligned by: patching `if step == 0:` to never run (support/peers_worker.py: patched_reference)\n")

    print("4. full mode: from its second step, the second moment accumulates bf16-rounded g̃·g̃")
    src = inspect.getsource(_lorapro.lorapro_full_adjustment)
    print("   source:", " ".join(l.strip() for l in src.splitlines() if "bfloat16" in l))
    A, B, g, gA, gB = factors()
    g2 = torch.randn(m, n)
    gA2, gB2 = s * B.T @ g2, s * g2 @ A.T
    vs = {}
    for name, fn in (("shipped", patched_reference(["no_step0_branch"])),
                     ("fp32", patched_reference(["no_step0_branch", "fp32_v"]))):
        mom, v = fn(A, B, gA.clone(), gB.clone(), s, 0, None, None, beta, eps)
        mom, v = fn(A, B, gA2.clone(), gB2.clone(), s, 1, mom, v, beta, eps)
        vs[name] = v
    exact = (1 - beta[1]) * (beta[1] * projection(A, B, g) ** 2 + projection(A, B, g2) ** 2)
    print(f"   V after two steps vs float64: shipped {rel(vs['shipped'], exact):.1e}, float32/64 g̃ {rel(vs['fp32'], exact):.1e}")
    print("   aligned by: patching the two .to(torch.bfloat16) away (patched_reference 'fp32_v')\n")

    print("5. weight decay (both modes): A and B are each scaled by (1 − lr·λ), so s·B A by (1 − lr·λ)²; "
          "frozen W0 untouched")


    class Lin(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(m, n), requires_grad=False)
            self.lora_A = nn.Parameter(torch.randn(r, n))
            self.lora_B = nn.Parameter(torch.randn(m, r))
            self.r, self.lora_alpha = r, 2 * r


    for mode in ("full", "efficient"):
        mod = Lin()
        W0, A0, B0 = mod.weight.clone(), mod.lora_A.detach().clone(), mod.lora_B.detach().clone()
        opt = LoRAProAdamW(mod, lr=0.1, weight_decay=0.1, lorapro_mode=mode, efficient_solver="eig")
        mod.lora_A.grad, mod.lora_B.grad = torch.zeros_like(A0), torch.zeros_like(B0)
        opt.step()
        dW = (mod.lora_B @ mod.lora_A).detach()
        mod.lora_A.requires_grad_(False), mod.lora_B.requires_grad_(False)
        print(f"   mode {mode:9s}: W0 changed by {float((mod.weight - W0).abs().max()):.1e}; A scaled by "
              f"{float((mod.lora_A / A0).mean()):.6f}, B by {float((mod.lora_B / B0).mean()):.6f}; "
              f"B A by {float((dW / (B0 @ A0)).mean()):.6f}")
    print("   efficient mode: that is AdamW's own decoupled decay of A and B, as optax.adamw in "
          "optax.chain(lora_jax.lora_pro(), optax.adamw(lr, weight_decay=λ)): no difference there.")
    print("   full mode: lora_jax.lora_pro_adamw scales A and B by √(1 − lr·λ) = 0.994987 each, B A by 0.990000 "
          "(AdamW's decay of W, towards W0). The authors' DeepSpeed code is described as decaying the frozen W0 (../shared/LORA_PRO.md); this port does not (above).")
    print(f"   its default weight_decay is {inspect.signature(LoRAProAdamW).parameters['weight_decay'].default} "
          "(lora_jax: 0). Aligned by: λ = 0 on both sides\n")

    print("6. the scale s is read as lora_alpha / r: PEFT's use_rslora (s = alpha/√r) is ignored")
    try:
        from peft import LoraConfig, get_peft_model
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        pm = get_peft_model(BertForSequenceClassification(cfg),
                            LoraConfig(r=8, lora_alpha=16, target_modules=["query"], use_rslora=True))
        layer = pm.base_model.model.bert.encoder.layer[0].attention.self.query
        opt = LoRAProAdamW(pm, lr=1e-3)
        print(f"   PEFT scaling {layer.scaling['default']:.4f} (16/√8); LoRAProAdamW uses s = {opt._pairs[0].s:.4f} (16/8)")
    except ImportError as e:  # transformers/peft absent: the claim is read off the code instead
        print(f"   (peft not importable: {e})")

    print("\n7. efficient mode normalises its Adam step in float32 whatever the factors' dtype: mA.float() / bias1, ...")
    src = inspect.getsource(_lorapro.lorapro_efficient_adjustment)
    print("   source:", " ".join(l.strip() for l in src.splitlines() if ".float()" in l))
    A, B, g, gA, gB = factors()
    outs = {}
    for name, fn in (("shipped", _lorapro.lorapro_efficient_adjustment),
                     ("native_adam_dtype", patched_efficient(["native_adam_dtype"]))):
        ga, gb = gA.clone(), gB.clone()
        fn(A, B, ga, gb, s, 0, None, None, None, None, (0.9, 0.999), 1e-8, solver="eig")
        outs[name] = ga
    print(f"   float64 factors, step 1: its update in float32 vs float64 normalisation: {rel(outs['shipped'], outs['native_adam_dtype']):.1e} "
          f"(dtype of the result {outs['shipped'].dtype}); a no-op for float32 factors")
    print("   a precision choice, not a definition: only the float64 cross-checks patch it (patched_efficient 'native_adam_dtype');\n"
          "   with it and 2. aligned, lora_jax (compute_dtype=float64) matches the package to 7.5e-13 over three MiniLM steps")


if __name__ == "__main__":
    main()
