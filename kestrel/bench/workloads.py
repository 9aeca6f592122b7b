"""The prompt workloads of the benchmarks that exercise the prefix cache, as token ids.

    shared-prefix  G groups x R requests: every request of a group starts with the group's P-token
                   system prompt, then its own Q-token question (SGLang's "generated shared
                   prefix"); shuffled with the seed, so the groups' requests interleave.
    multi-turn     C conversations of T turns: turn 1 is I new tokens; turn t's prompt is turn t-1's
                   prompt, the O tokens generated for it, then I new tokens (a chat whose history
                   the cache already holds). The new tokens are drawn here; the outputs come from
                   the run.

Token ids are uniform over the vocabulary (like `offline.random_prompts`); `kestrel bench serve`
turns the same shapes into text (`serve.shared_prefix_prompts`). No torch here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

DATASETS = ("random", "shared-prefix", "multi-turn")


@dataclass(frozen=True, slots=True)
class SharedPrefix:
    num_groups: int
    prompts_per_group: int
    prefix_len: int
    """P: tokens of each group's system prompt."""
    question_len: int
    """Q: tokens of each request's own part."""

    def __post_init__(self) -> None:
        for name in ("num_groups", "prompts_per_group", "prefix_len", "question_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    @property
    def num_prompts(self) -> int:
        return self.num_groups * self.prompts_per_group


def shared_prefix_prompts(w: SharedPrefix, vocab_size: int, seed: int) -> list[list[int]]:
    """G x R prompts of P + Q tokens, the first P shared within a group; shuffled."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(w.num_groups):
        prefix = [rng.randrange(vocab_size) for _ in range(w.prefix_len)]
        prompts += [prefix + [rng.randrange(vocab_size) for _ in range(w.question_len)]
                    for _ in range(w.prompts_per_group)]
    rng.shuffle(prompts)
    return prompts


@dataclass(frozen=True, slots=True)
class MultiTurn:
    num_conversations: int
    num_turns: int
    turn_len: int
    """I: new tokens each turn adds (the user's message)."""
    output_len: int
    """O: tokens generated per turn; the next turn's prompt carries them."""

    def __post_init__(self) -> None:
        for name in ("num_conversations", "num_turns", "turn_len", "output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    def prompt_len(self, turn: int) -> int:
        """Prompt tokens of turn `turn` (0-based)."""
        return self.turn_len + turn * (self.turn_len + self.output_len)

    @property
    def max_len(self) -> int:
        """Context the last turn needs: its prompt and its output."""
        return self.prompt_len(self.num_turns - 1) + self.output_len


def multi_turn_new_tokens(w: MultiTurn, vocab_size: int, seed: int) -> list[list[list[int]]]:
    """[conversation][turn] -> the turn's new tokens."""
    rng = random.Random(seed)
    return [[[rng.randrange(vocab_size) for _ in range(w.turn_len)] for _ in range(w.num_turns)]
            for _ in range(w.num_conversations)]
