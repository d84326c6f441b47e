"""The MiniDisc distillation loss (arXiv 2205.14570, Sec. 3.3; Eq. for L_KD).

``L = 0.5 * (sum_l MSE(h_l^S, h_l^T) + KL(softmax(z^T / T) || softmax(z^S / T)) * T^2) + w * CE(z^S, y)``

* ``h_l`` are hidden states at every ``max(1, L/6)``-th layer (the paper maps 6 student layers onto
  the teacher's; teacher and candidates share depth and hidden size, so the map is the identity),
  averaged over non-padding tokens only;
* the logit term is the soft cross-entropy minus the teacher's entropy, i.e. the KL divergence: the
  same gradient as soft cross-entropy, and exactly zero when student equals teacher; regression
  tasks use MSE on the logits;
* ``w`` weighs the optional hard-label term (0 in the paper).

Language models (logits of shape ``(batch, length, vocab)``) use the same loss with the KL taken over
the next-token distribution at every non-padding position, the hidden-state term as a relative error
(each layer's MSE over the teacher's mean squared activation: decoder residual streams reach
magnitudes in the thousands), and the hard-label term is the shifted next-token cross-entropy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def hidden_layer_indices(num_layers: int) -> list[int]:
    """Indices into ``hidden_states`` (0 = embeddings) matched by the hidden-state loss."""
    step = max(1, num_layers // 6)
    return list(range(step, num_layers + 1, step))


def masked_hidden_mse(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                      attention_mask: torch.Tensor, layers: Sequence[int], normalise: bool = False) -> torch.Tensor:
    """Sum over ``layers`` of the MSE between hidden states, padding positions excluded.

    With ``normalise`` each layer's MSE is divided by the teacher's mean squared activation there (a
    relative error): decoder residual streams grow to magnitudes in the thousands, where the plain MSE
    would outweigh the next-token KL by four orders of magnitude.
    """
    mask = attention_mask.unsqueeze(-1).to(student[0].dtype)
    denom = mask.sum().clamp_min(1.0) * student[0].shape[-1]
    total = student[0].new_zeros(())
    for i in layers:
        err = (((student[i] - teacher[i]) ** 2) * mask).sum() / denom
        if normalise:
            err = err / ((teacher[i].detach() ** 2) * mask).sum().div(denom).clamp_min(1e-6)
        total = total + err
    return total


def _kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, weight: torch.Tensor,
            temperature: float) -> torch.Tensor:
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return ((log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * weight).sum()


def chunked_logit_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, chunk: int,
                       temperature: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`logit_loss` for per-token logits, ``chunk`` positions at a time: each chunk's fp32 softmaxes
    are recomputed in the backward pass (activation checkpointing), so only one chunk's vocabulary-sized
    fp32 tensors exist at once instead of every position's."""
    vocab = student_logits.shape[-1]
    s, t = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
    w = (mask.reshape(-1) if mask is not None else torch.ones(s.shape[0], device=s.device)).float()
    total = s.new_zeros((), dtype=torch.float32)
    for i in range(0, s.shape[0], chunk):
        part = checkpoint(_kl_sum, s[i:i + chunk], t[i:i + chunk], w[i:i + chunk], temperature, use_reentrant=False)
        total = total + part
    return total / w.sum().clamp_min(1.0) * temperature * temperature


def logit_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
               regression: bool = False, mask: torch.Tensor | None = None, chunk: int = 0) -> torch.Tensor:
    """Temperature-softened KL (= soft CE minus teacher entropy) times T^2; MSE for regression.

    For per-token logits ``(batch, length, vocab)`` the KL is averaged over the positions ``mask`` keeps;
    ``chunk`` > 0 computes it that many positions at a time (:func:`chunked_logit_loss`).
    """
    if regression:
        return F.mse_loss(student_logits, teacher_logits)
    if chunk > 0 and student_logits.dim() == 3:
        return chunked_logit_loss(student_logits, teacher_logits, chunk, temperature, mask)
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    if mask is not None and kl.dim() == 2:
        m = mask.to(kl.dtype)
        return (kl * m).sum() / m.sum().clamp_min(1.0) * t * t
    return kl.mean() * t * t


def minidisc_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                  attention_mask: torch.Tensor, temperature: float = 1.0, regression: bool = False,
                  labels: torch.Tensor | None = None, hard_label_weight: float = 0.0,
                  kl_chunk: int = 0) -> torch.Tensor:
    """Half the sum of the hidden-state MSE and the logit loss, plus an optional hard-label term."""
    layers = hidden_layer_indices(len(student_hidden) - 1)
    per_token = student_logits.dim() == 3  # a language model: relative hidden-state error (see above)
    loss = 0.5 * (masked_hidden_mse(student_hidden, teacher_hidden, attention_mask, layers, normalise=per_token)
                  + logit_loss(student_logits, teacher_logits, temperature, regression, attention_mask, kl_chunk))
    if hard_label_weight and labels is not None:
        loss = loss + hard_label_weight * hard_label_loss(student_logits, labels, regression)
    return loss


def hard_label_loss(student_logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    """The task's own loss on the gold labels (next-token cross-entropy for a language model)."""
    if student_logits.dim() == 3:  # language modelling: predict token t+1 from the prefix up to t
        vocab = student_logits.shape[-1]
        return F.cross_entropy(student_logits[:, :-1].reshape(-1, vocab).float(), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
    if regression:
        return F.mse_loss(student_logits.squeeze(-1), labels.to(student_logits.dtype))
    return F.cross_entropy(student_logits, labels)


@torch.no_grad()
def teacher_top_k(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What an offline teacher keeps per position: the indices and logits of its ``k`` largest logits and the
    log-sum-exp of all its ``logits / temperature`` (so the kept probabilities stay exact, not renormalised).

    Returns ``(indices int64 [..., k], logits [..., k], lse [...])``, the logits in float32.
    """
    z = teacher_logits.float()
    values, indices = z.topk(min(k, z.shape[-1]), dim=-1)
    return indices, values, torch.logsumexp(z / temperature, dim=-1)


def sparse_logit_loss(student_logits: torch.Tensor, indices: torch.Tensor, teacher_values: torch.Tensor,
                      teacher_lse: torch.Tensor, temperature: float = 1.0,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`logit_loss` against a teacher stored as its top-k (:func:`teacher_top_k`): the KL summed over the
    kept support, ``sum_{i in top-k} p_t(i) (log p_t(i) - log p_s(i))`` with the teacher's exact probabilities
    ``p_t(i) = exp(z_i / T - lse)`` and the student's full softmax; the teacher's mass outside the support is
    left out (DistillKit's and the "sparse KL" of offline distillation). With ``k`` = the vocabulary it is
    :func:`logit_loss` exactly."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1).gather(-1, indices)
    log_p_t = teacher_values.float() / t - teacher_lse.unsqueeze(-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    if mask is not None and kl.dim() == 2:
        m = mask.to(kl.dtype)
        return (kl * m).sum() / m.sum().clamp_min(1.0) * t * t
    return kl.mean() * t * t
