"""Next-token cross-entropy, the one loss that training and perplexity share.

Labels are input_ids with -100 where a token is not scored (prompt, padding), as in
qlora.py's DataCollatorForCausalLM and transformers' LlamaForCausalLM; logits at position t
predict the token at t+1. Computed in fp32 whatever the model's dtype. No paper section (QLoRA,
like qlora.py, scores the response only: the masking is data.py's). Checked against
transformers' loss in tests/test_model.py.
"""
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_nll(logits: torch.Tensor, labels: torch.Tensor):
    """Per-token negative log-likelihood (B, T-1) and the mask of scored tokens (B, T-1)."""
    logits = logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
    targets = labels[:, 1:]  # (B, T-1)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),  # (B*(T-1), V), (B*(T-1),)
                          ignore_index=IGNORE_INDEX, reduction="none")  # (B*(T-1),)
    return nll.view(targets.shape), targets != IGNORE_INDEX  # (B, T-1) each


def causal_lm_loss(logits, labels, reduction: str = "mean"):
    """'mean': over every scored token of the batch (transformers' loss);
    'sum': the summed loss and the token count, to normalise over several micro-batches;
    'per_example': each row's own mean (B,), rows with no scored token give 0."""
    nll, mask = token_nll(logits, labels)
    if reduction == "mean":
        return nll.sum() / mask.sum().clamp(min=1)
    if reduction == "sum":
        return nll.sum(), mask.sum()
    if reduction == "per_example":
        return nll.sum(1) / mask.sum(1).clamp(min=1)
    raise ValueError(f"unknown reduction {reduction!r}")
