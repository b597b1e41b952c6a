"""`GenerationOutput`: the padded tensor view of generated rows (the trainer's [prompt | response] layout)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from verl_mega.models.masks import position_ids_from_mask


@dataclass
class GenerationOutput:
    """Generated rows; N = len(prompts) * n, rows i*n .. i*n+n-1 belong to prompt i.

    prompt_ids [N, P] left-padded with pad_token_id, prompt_mask [N, P] (1 = token);
    response_ids [N, R] right-padded, response_mask [N, R] (1 = generated token, the stop token
    included), response_logprobs [N, R] float32 (0 at padding; see sampling.py for the definition);
    input_ids / attention_mask / position_ids [N, P + R]: the trainer's view of [prompt | response]
    (positions count real prompt tokens from 0 and continue through the response).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    response_logprobs: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor

    def responses(self) -> list[list[int]]:
        """Each row's response tokens without padding."""
        return [row[mask.bool()].tolist() for row, mask in zip(self.response_ids, self.response_mask)]



def assemble_output(rows: list[list[int]], results: list[tuple[list[int], list[float]]], pad_token_id: int) -> GenerationOutput:
    """The `GenerationOutput` of prompt rows `rows` and their (response tokens, log-probs) `results`."""
    n_rows, p_len = len(rows), max(len(r) for r in rows)
    r_len = max(len(toks) for toks, _ in results)
    prompt_ids = torch.full((n_rows, p_len), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros(n_rows, p_len, dtype=torch.long)
    response_ids = torch.full((n_rows, r_len), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros(n_rows, r_len, dtype=torch.long)
    logprobs = torch.zeros(n_rows, r_len, dtype=torch.float32)
    for i, (row, (toks, lps)) in enumerate(zip(rows, results)):
        prompt_ids[i, p_len - len(row):] = torch.tensor(row)
        prompt_mask[i, p_len - len(row):] = 1
        response_ids[i, :len(toks)] = torch.tensor(toks, dtype=torch.long)
        response_mask[i, :len(toks)] = 1
        logprobs[i, :len(lps)] = torch.tensor(lps, dtype=torch.float32)
    prompt_pos = position_ids_from_mask(prompt_mask)  # [N, P]
    response_pos = prompt_pos[:, -1:] + 1 + torch.arange(r_len)  # [N, R]
    return GenerationOutput(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
        response_mask=response_mask, response_logprobs=logprobs,
        input_ids=torch.cat([prompt_ids, response_ids], dim=1),
        attention_mask=torch.cat([prompt_mask, response_mask], dim=1),
        position_ids=torch.cat([prompt_pos, response_pos], dim=1))
