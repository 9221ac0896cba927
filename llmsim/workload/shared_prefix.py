"""Shared-prefix traffic (kubernetes-sigs/inference-perf's ``shared_prefix`` data generator): system prompts
shared by groups of users, a question per user, optionally multi-turn chat where each round resends the
conversation so far. Requests carry their content as ``prefix_segments`` so the prefix cache sees what a real
server sees; lengths are exact (the measured runs force them with ``ignore_eos``)."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from llmsim.config import SharedPrefixConfig


def shared_prefix_requests(cfg: SharedPrefixConfig, rng: np.random.Generator
                           ) -> Iterator[tuple[int, int, tuple[tuple[int, int], ...]]]:
    """(prompt tokens, output tokens, content segments) for request 0, 1, 2, ...

    Content ids: system prompt ``k`` is ``k``; user ``u``'s question is ``P + u``; the answer of its round ``r``
    is ``P + N + r N + u`` (``P`` system prompts, ``N`` users). Users are taken in a seeded random order, as
    inference-perf shuffles its sessions, so consecutive requests rarely share a system prompt by construction.
    """
    num_prompts, num_users = cfg.num_system_prompts, cfg.num_system_prompts * cfg.users_per_system_prompt
    order = rng.permutation(num_users)
    system, question, output = cfg.system_prompt_tokens, cfg.question_tokens, cfg.output_tokens
    i = 0
    while True:
        user, round_ = int(order[i % num_users]), i // num_users
        segments = [(user // cfg.users_per_system_prompt, system)]
        if cfg.multi_turn:
            for k in range(round_):
                segments += [(num_prompts + user, question), (num_prompts + num_users + k * num_users + user, output)]
            segments.append((num_prompts + user, question))
            prompt = system + round_ * (question + output) + question
            segments.append((num_prompts + num_users + round_ * num_users + user, output))
        else:
            segments.append((num_prompts + user, question))
            prompt = system + question
        yield prompt, output, tuple(segments)
        i += 1
