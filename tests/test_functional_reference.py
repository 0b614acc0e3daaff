"""The functional test against a reference built without the project's writer or targets.

Here each head's operator is formed densely in float64 from the torch modules' own weights
(M = s W_Q W_K^T, the input norm's gain folded in as docs/method/functional_test.md says), every
reconstruction target is formed densely (T from numpy's singular values or Frobenius products,
rank-k corrections and truncations from numpy's SVD), factored, written into a float64 copy of the
model with plain torch assignments, and the model is run with eager attention in float64 throughout
(``float64_attention``; transformers' own takes its softmax in float32): the KL of each head's
attention maps, the entropy shift and the loss change are then compared with the project's figures
for the same strategy (``reconstruction_effects``, which runs the fast path).

What a reconstruction is, and so what is written, follows the method's text, not its code:
- rotary models (Llama) take positions in the d_head coordinates, so the frame of the factors
  matters there; the method fixes it: the operator target in the anchor's frame (T W_Q^a, W_K^a),
  the spectral one in the head's own (W_Q moved along its own left singular directions: P diag(sqrt r)
  P^T W_Q, P the left singular vectors of M), a truncated rank-k target in the frame closest to
  the head's own (the projection of W_Q onto the target's column space);
- without positions in the logit (BERT) the frame does not matter: targets are factored by a plain
  SVD, X = U sqrt(S), Y = V sqrt(S), and the biases' key-dependent term W_K b_Q is kept by least squares
  (as is W_Q b_K, which drops out of the softmax anyway).
Only the functional test's inputs come from the project: the anchor layers and the strategy names.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from float64_attention import float64_eager
from qkspectra.analysis.reconstruction.evidence import reconstruction_effects
from qkspectra.analysis.seed import Anchor

TOKENS = np.random.default_rng(0)
WINDOWS = [TOKENS.integers(0, 60, 12).tolist() for _ in range(2)] + [TOKENS.integers(0, 60, 7).tolist()]
NUM_LAYERS, HEADS, D_MODEL, D_HEAD = 3, 4, 32, 8
K = 2  # the rank of the rank-k correction of every fitted head but one


# ----------------------------------------------------------------------------
# Tiny models
# ----------------------------------------------------------------------------


def sharpen(model: nn.Module) -> nn.Module:
    """Weights of std 0.3 (heads that matter) and norm gains and biases in [0.5, 1.5] (folding must undo them)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name.lower():
                parameter.uniform_(0.5, 1.5)
            elif parameter.ndim == 2 and "emb" not in name:
                parameter.normal_(0, 0.3)
    return model.eval()


def tiny_llama(kv_heads: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(11)
    config = LlamaConfig(num_hidden_layers=NUM_LAYERS, num_attention_heads=HEADS, num_key_value_heads=kv_heads,
                         hidden_size=D_MODEL, intermediate_size=64, vocab_size=64, bos_token_id=0, eos_token_id=0,
                         attention_bias=False, attn_implementation="eager")
    return sharpen(LlamaForCausalLM(config))


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(12)
    config = BertConfig(num_hidden_layers=NUM_LAYERS, num_attention_heads=HEADS, hidden_size=D_MODEL,
                        intermediate_size=64, vocab_size=64, attn_implementation="eager")
    return sharpen(BertModel(config))


# ----------------------------------------------------------------------------
# Each architecture's query/key layout, read and written with plain torch
# ----------------------------------------------------------------------------


def numpy64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float64).numpy().copy()


class LlamaLayout:
    causal = True

    def __init__(self, model):
        self.model = model
        self.attention = [layer.self_attn for layer in model.model.layers]
        self.norms = [layer.input_layernorm for layer in model.model.layers]

    def expand_kv_heads(self) -> None:
        """One key/value head per query head (the rows of k_proj, v_proj repeated): the same function."""
        for attn in self.attention:
            group = attn.num_key_value_groups
            if group == 1:
                continue
            for name in ("k_proj", "v_proj"):
                old = getattr(attn, name).weight  # (H_kv * d_head, d_model)
                rows = old.view(-1, D_HEAD, D_MODEL).repeat_interleave(group, dim=0).reshape(HEADS * D_HEAD, D_MODEL)
                new = nn.Linear(D_MODEL, HEADS * D_HEAD, bias=False, dtype=old.dtype)
                with torch.no_grad():
                    new.weight.copy_(rows)
                setattr(attn, name, new)
            attn.num_key_value_groups = 1
        self.model.config.num_key_value_heads = HEADS

    def weights(self, index: int) -> dict:
        """W_Q, W_K (H, d_model, d_head) per query head, no biases; the norm's gain, no norm bias; s."""
        attn = self.attention[index]
        W_Q = numpy64(attn.q_proj.weight).reshape(HEADS, D_HEAD, D_MODEL).transpose(0, 2, 1)
        W_K = numpy64(attn.k_proj.weight).reshape(-1, D_HEAD, D_MODEL).transpose(0, 2, 1)
        W_K = np.repeat(W_K, HEADS // W_K.shape[0], axis=0)
        return {"W_Q": W_Q, "W_K": W_K, "b_Q": None, "b_K": None, "gain": numpy64(self.norms[index].weight),
                "beta": None, "scale": float(attn.scaling)}

    def write(self, index: int, W_Q: np.ndarray, W_K: np.ndarray, b_Q, b_K) -> None:
        attn = self.attention[index]
        with torch.no_grad():
            attn.q_proj.weight.copy_(torch.from_numpy(W_Q.transpose(0, 2, 1).reshape(HEADS * D_HEAD, D_MODEL)))
            attn.k_proj.weight.copy_(torch.from_numpy(W_K.transpose(0, 2, 1).reshape(HEADS * D_HEAD, D_MODEL)))


class BertLayout:
    causal = False

    def __init__(self, model):
        self.model = model
        self.attention = [layer.attention.self for layer in model.encoder.layer]
        self.norms = [model.embeddings.LayerNorm] + [layer.output.LayerNorm for layer in model.encoder.layer[:-1]]

    def expand_kv_heads(self) -> None:
        pass

    def weights(self, index: int) -> dict:
        attn, norm = self.attention[index], self.norms[index]
        W_Q = numpy64(attn.query.weight).reshape(HEADS, D_HEAD, D_MODEL).transpose(0, 2, 1)
        W_K = numpy64(attn.key.weight).reshape(HEADS, D_HEAD, D_MODEL).transpose(0, 2, 1)
        return {"W_Q": W_Q, "W_K": W_K, "b_Q": numpy64(attn.query.bias).reshape(HEADS, D_HEAD),
                "b_K": numpy64(attn.key.bias).reshape(HEADS, D_HEAD), "gain": numpy64(norm.weight),
                "beta": numpy64(norm.bias), "scale": D_HEAD**-0.5}

    def write(self, index: int, W_Q: np.ndarray, W_K: np.ndarray, b_Q, b_K) -> None:
        attn = self.attention[index]
        with torch.no_grad():
            attn.query.weight.copy_(torch.from_numpy(W_Q.transpose(0, 2, 1).reshape(HEADS * D_HEAD, D_MODEL)))
            attn.key.weight.copy_(torch.from_numpy(W_K.transpose(0, 2, 1).reshape(HEADS * D_HEAD, D_MODEL)))
            attn.query.bias.copy_(torch.from_numpy(b_Q.reshape(-1)))
            attn.key.bias.copy_(torch.from_numpy(b_K.reshape(-1)))


def layout_of(model):
    return BertLayout(model) if model.config.model_type == "bert" else LlamaLayout(model)


# ----------------------------------------------------------------------------
# Dense operators and targets (numpy float64)
# ----------------------------------------------------------------------------


class Head:
    """One head in the space of the geometry: A = sqrt(s) diag(g) W_Q, B likewise, biases with the norm's
    bias pushed in (b + W^T beta, times sqrt(s)); M = A B^T dense (d_model, d_model)."""

    def __init__(self, raw: dict, h: int, fold: bool):
        root = np.sqrt(raw["scale"])
        gain = raw["gain"] if fold else np.ones(D_MODEL)
        beta = raw["beta"] if fold and raw["beta"] is not None else np.zeros(D_MODEL)
        self.A = root * gain[:, None] * raw["W_Q"][h]
        self.B = root * gain[:, None] * raw["W_K"][h]
        self.b_Q = None if raw["b_Q"] is None else root * (raw["b_Q"][h] + raw["W_Q"][h].T @ beta)
        self.b_K = None if raw["b_K"] is None else root * (raw["b_K"][h] + raw["W_K"][h].T @ beta)
        self.M = self.A @ self.B.T
        U, S, Vt = np.linalg.svd(self.M)
        self.U, self.S, self.V = U[:, :D_HEAD], S[:D_HEAD], Vt[:D_HEAD].T


def plain_factors(target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """X, Y (d_model, d_head) with X Y^T the best rank-d_head approximation of target: X = U sqrt(S), Y = V sqrt(S)."""
    U, S, Vt = np.linalg.svd(target)
    root = np.sqrt(S[:D_HEAD])
    return U[:, :D_HEAD] * root, Vt[:D_HEAD].T * root


def best_rank(matrix: np.ndarray, rank: int) -> np.ndarray:
    U, S, Vt = np.linalg.svd(matrix)
    return (U[:, :rank] * S[:rank]) @ Vt[:rank]


def reference_targets(heads: list[list[Head]], anchor: np.ndarray, k: np.ndarray, *, rotary: bool) -> dict:
    """{strategy: [layer][head] (X, Y)}: spectral, operator, operator_rank_k (and control), densely."""
    targets = {"control": [], "spectral": [], "operator": [], "operator_rank_k": []}
    for layer, row in enumerate(heads):
        for name in targets:
            targets[name].append([])
        for h, own in enumerate(row):
            ref = heads[anchor[layer]][h]
            targets["control"][layer].append((own.A, own.B))
            # spectral: the own singular vectors, T sigma_a as singular values
            T_spectral = own.S @ ref.S / (ref.S @ ref.S)
            r = T_spectral * ref.S / own.S
            if rotary:  # the head's own frame: W_Q moved along its own singular directions
                X = own.U @ (np.sqrt(r)[:, None] * (own.U.T @ own.A))
                Y = own.V @ (np.sqrt(r)[:, None] * (own.V.T @ own.B))
            else:
                X, Y = plain_factors((own.U * (r * own.S)) @ own.V.T)
            targets["spectral"][layer].append((X, Y))
            # operator: T M_a, T the least-squares scalar on the operators
            T = np.sum(own.M * ref.M) / np.sum(ref.M * ref.M)
            operator = (T * ref.A, ref.B) if rotary else plain_factors(T * ref.M)
            targets["operator"][layer].append(operator)
            # rank k: T M_a plus the best rank-k part of M_L - T M_a, truncated to rank d_head
            if k[layer, h] == 0:
                targets["operator_rank_k"][layer].append(operator)
                continue
            target = best_rank(T * ref.M + best_rank(own.M - T * ref.M, k[layer, h]), D_HEAD)
            X, Y = plain_factors(target)
            if rotary:  # the frame closest to the head's own: own W_Q projected onto the target's column space
                X = X @ np.linalg.lstsq(X, own.A, rcond=None)[0]
                Y = target.T @ np.linalg.pinv(X).T
            np.testing.assert_allclose(X @ Y.T, target, atol=1e-12 * np.abs(target).max())
            targets["operator_rank_k"][layer].append((X, Y))
    return targets


def write_targets(layout, raw_layers: list[dict], targets: list[list[tuple]], fold: bool) -> None:
    """Each layer's (X, Y) back to weights: / sqrt(s), / g; biases kept by least squares, norm bias pushed out."""
    for index, raw in enumerate(raw_layers):
        root = np.sqrt(raw["scale"])
        gain = raw["gain"] if fold else np.ones(D_MODEL)
        beta = raw["beta"] if fold and raw["beta"] is not None else np.zeros(D_MODEL)
        W_Q, W_K, b_Q, b_K = [], [], [], []
        for h, (X, Y) in enumerate(targets[index]):
            head = Head(raw, h, fold)
            W_Q.append(X / root / gain[:, None])
            W_K.append(Y / root / gain[:, None])
            if head.b_Q is not None:  # in the geometry's space, then out of it
                b_Q.append(np.linalg.lstsq(Y, head.B @ head.b_Q, rcond=None)[0] / root - W_Q[-1].T @ beta)
                b_K.append(np.linalg.lstsq(X, head.A @ head.b_K, rcond=None)[0] / root - W_K[-1].T @ beta)
        layout.write(index, np.stack(W_Q), np.stack(W_K), np.stack(b_Q) if b_Q else None,
                     np.stack(b_K) if b_K else None)


# ----------------------------------------------------------------------------
# Eager float64 figures
# ----------------------------------------------------------------------------


def run_eager(model: nn.Module, causal: bool) -> list[dict]:
    """Per window: attention maps (L, H, q, k), and the loss's ingredients, float64 eager."""
    runs = []
    with torch.no_grad():
        for window in WINDOWS:
            ids = torch.tensor([window])
            if causal:
                out = model(input_ids=ids, labels=ids, output_attentions=True)
                runs.append({"p": torch.stack(out.attentions)[:, 0], "loss": float(out.loss) * (len(window) - 1)})
            else:
                out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True)
                runs.append({"p": torch.stack(out.attentions)[:, 0], "hidden": out.last_hidden_state[0]})
    return runs


def eager_effects(original: list[dict], changed: list[dict], causal: bool) -> dict:
    """The method's figures from two runs' maps: per-head KL(original || changed) and entropy shift, mean
    over queries; the mean next-token cross-entropy change, or the mean 1 - cosine of the final hidden states."""
    kl = shift = 0.0
    for p0, p in ((o["p"], c["p"]) for o, c in zip(original, changed)):
        kl = kl + (torch.xlogy(p0, p0) - torch.xlogy(p0, p)).sum(-1).sum(-1)  # (L, H)
        shift = shift + (torch.xlogy(p0, p0) - torch.xlogy(p, p)).sum(-1).sum(-1)
    tokens = sum(map(len, WINDOWS))
    if causal:
        predicted = sum(len(w) - 1 for w in WINDOWS)
        before, after = (sum(run["loss"] for run in runs) / predicted for runs in (original, changed))
        delta, relative = after - before, (after - before) / before
    else:
        cosines = [nn.functional.cosine_similarity(o["hidden"], c["hidden"], dim=-1) for o, c in zip(original, changed)]
        delta, relative = float(sum((1 - c).sum() for c in cosines)) / tokens, None
    per_head = (kl / tokens).numpy()
    return {"per_head_kl": per_head, "mean_kl": float(per_head.mean()),
            "mean_entropy_shift": float((shift / tokens).mean()), "delta_loss": delta, "relative_delta_loss": relative}


def rewritten(original: nn.Module, layout_targets: list[list[tuple]], raw_layers: list[dict], fold: bool,
              layers: range | None = None) -> nn.Module:
    """A float64 copy of ``original`` with the targets of ``layers`` (default all) written in."""
    model = copy.deepcopy(original)
    layout = layout_of(model)
    layout.expand_kv_heads()
    chosen = range(len(raw_layers)) if layers is None else layers
    for index in chosen:  # the other layers keep their weights
        write_targets(_OneLayer(layout, index), [raw_layers[index]], [layout_targets[index]], fold)
    return model


class _OneLayer:
    """A layout whose layer 0 is layer ``index`` of another."""

    def __init__(self, layout, index: int):
        self.layout, self.index = layout, index

    def write(self, _, *arrays) -> None:
        self.layout.write(self.index, *arrays)


# ----------------------------------------------------------------------------
# The tests
# ----------------------------------------------------------------------------

EAGER_MODULES = [__import__(f"transformers.models.{name}.modeling_{name}", fromlist=["_"]) for name in ("llama", "bert")]
CASES = {
    "llama-mha-rope": lambda: tiny_llama(kv_heads=HEADS),
    "llama-gqa-rope": lambda: tiny_llama(kv_heads=2),
    "bert-encoder": tiny_bert,
}


def rank_k_choice() -> np.ndarray:
    """k per (L, h): K for every head of the layers fitted to another, but 0 for head 1 of layer 1."""
    k = np.full((NUM_LAYERS, HEADS), K)
    k[1, 1] = 0
    return k


@pytest.mark.parametrize("case, fold", [("llama-mha-rope", True), ("llama-gqa-rope", True), ("llama-gqa-rope", False),
                                        ("bert-encoder", True), ("bert-encoder", False)])
def test_functional_figures_equal_an_independent_float64_eager_reference(case, fold, monkeypatch):
    model = CASES[case]().to(torch.float64)
    model.set_attn_implementation("eager")
    float64_eager(monkeypatch, *EAGER_MODULES)
    layout = layout_of(model)
    raw_layers = [layout.weights(index) for index in range(NUM_LAYERS)]
    heads = [[Head(raw, h, fold) for h in range(HEADS)] for raw in raw_layers]
    anchors = {"first": np.zeros(NUM_LAYERS, dtype=int), "last": np.full(NUM_LAYERS, NUM_LAYERS - 1)}
    k = {name: np.where(a[:, None] == np.arange(NUM_LAYERS)[:, None], 0, rank_k_choice()) for name, a in anchors.items()}

    # the project's figures: its fast path on a float64 copy, given our singular values and k
    fast = copy.deepcopy(model)
    fast.set_attn_implementation("sdpa")
    singular_values = np.array([[head.S for head in row] for row in heads])  # (L, H, d_head)
    section = reconstruction_effects(
        fast, WINDOWS, singular_values,
        {name: Anchor(name, a, ((0, NUM_LAYERS),)) for name, a in anchors.items()},
        {name: {"operator": {"k": k[name].tolist()}} for name in anchors}, fold_ln=fold)

    causal = layout.causal
    original = run_eager(model, causal)
    control = section["control"]
    worst = {}
    for name, a in anchors.items():
        targets = reference_targets(heads, a, k[name], rotary=causal)
        for strategy in ("control", "spectral", "operator", "operator_rank_k"):
            ours = section[name][strategy] if strategy != "control" else control
            reference = eager_effects(original, run_eager(rewritten(model, targets[strategy], raw_layers, fold), causal),
                                      causal)
            np.testing.assert_allclose(ours["per_head_kl"], reference["per_head_kl"], rtol=1e-5, atol=1e-6,
                                       err_msg=f"{name} {strategy} per_head_kl")
            for figure in ("mean_kl", "mean_entropy_shift", "delta_loss"):
                assert abs(ours[figure] - reference[figure]) <= 1e-6 + 1e-5 * abs(reference[figure]), (name, strategy, figure)
            if causal:
                assert abs(ours["relative_delta_loss"] - reference["relative_delta_loss"]) <= 1e-6
            worst[name, strategy] = max(np.abs(np.array(ours["per_head_kl"]) - reference["per_head_kl"]).max(),
                                        abs(ours["delta_loss"] - reference["delta_loss"]))
            if strategy == "control":
                assert np.abs(reference["per_head_kl"]).max() < 1e-12 and abs(reference["delta_loss"]) < 1e-12
            elif name == "first":  # layer 0 is its own anchor and sees the original input: no change there
                assert np.abs(reference["per_head_kl"][0]).max() < 1e-12
                assert np.abs(np.array(ours["per_head_kl"][0])).max() <= 5 * np.abs(control["per_head_kl"]).max() + 1e-7
            else:
                assert reference["mean_kl"] > 1e-3  # random layers are not rescales of one another
    print(f"{case} fold={fold}: largest |project - reference| (KL per head, delta loss):",
          {key: f"{value:.1e}" for key, value in worst.items()})


@pytest.mark.parametrize("case", ["llama-gqa-rope", "bert-encoder"])
def test_the_anchor_layer_replaced_by_itself_changes_nothing(case, monkeypatch):
    """Writing only the anchor layer's own target T M_a (T = 1 up to rounding) back through the reference
    path: KL about 0 at every layer, in float64 to 1e-10 (the last layer and a middle one as anchors)."""
    model = CASES[case]().to(torch.float64)
    model.set_attn_implementation("eager")
    float64_eager(monkeypatch, *EAGER_MODULES)
    layout = layout_of(model)
    raw_layers = [layout.weights(index) for index in range(NUM_LAYERS)]
    heads = [[Head(raw, h, True) for h in range(HEADS)] for raw in raw_layers]
    original = run_eager(model, layout.causal)
    for anchor_layer in (NUM_LAYERS - 1, 1):
        a = np.full(NUM_LAYERS, anchor_layer)
        targets = reference_targets(heads, a, np.zeros((NUM_LAYERS, HEADS), dtype=int), rotary=layout.causal)
        for strategy in ("spectral", "operator"):
            changed = rewritten(model, targets[strategy], raw_layers, True, layers=range(anchor_layer, anchor_layer + 1))
            effects = eager_effects(original, run_eager(changed, layout.causal), layout.causal)
            assert np.abs(effects["per_head_kl"]).max() < 1e-10, (anchor_layer, strategy)
            assert abs(effects["delta_loss"]) < 1e-10
        # and another layer's target written into the anchor layer does change it (the check can fail)
        other = reference_targets(heads, np.full(NUM_LAYERS, 0), np.zeros((NUM_LAYERS, HEADS), dtype=int),
                                  rotary=layout.causal)
        changed = rewritten(model, other["operator"], raw_layers, True, layers=range(anchor_layer, anchor_layer + 1))
        assert eager_effects(original, run_eager(changed, layout.causal), layout.causal)["mean_kl"] > 1e-3
