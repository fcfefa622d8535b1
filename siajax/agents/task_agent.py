"""Task Agent: runs items under a harness with a policy, as episodes; logs one record per episode.

Each trajectory record holds the prompt messages, every segment of the episode
(the model's replies with their token ids and log-probs; tool results and retry
feedback with theirs), the tool calls with their results, the final answer's
parsed value, reward and failure kind, the first answer's reward and the number
of answers (``attempt``). :mod:`siajax.agents.episodes` runs the turns.
"""

from __future__ import annotations

import dataclasses

import jax

from siajax.agents.episodes import Episode, episode_batch, run_episodes
from siajax.harness import Harness
from siajax.sampling import GenerationResult


@dataclasses.dataclass
class Rollout:
    harness: Harness
    episodes: list[Episode]  # item-major (samples_per_prompt each)
    records: list[dict]  # one per episode, same order
    rewards: list[float]  # each episode's final reward, same order

    @property
    def replies(self) -> int:
        """Replies drawn: every turn of every episode (what a sample budget counts)."""
        return sum(record["turns"] for record in self.records)

    @property
    def tokens(self) -> int:
        """Tokens the policy generated, every turn."""
        return sum(len(record["token_ids"]) for record in self.records)

    def training_rows(self, pad_token_id: int) -> GenerationResult:
        """The episodes as rows the learner trains on (token ids: local policy only)."""
        return episode_batch(self.episodes, self.harness, pad_token_id)


def run_items(task, harness: Harness, backend, items: list[dict], key: jax.Array) -> Rollout:
    """Runs ``samples_per_prompt`` episodes of every item (tool calls answered, failures retried
    as the harness says)."""
    episodes = run_episodes(task, harness, backend, items, key)
    return Rollout(harness, episodes, [e.record() for e in episodes], [e.verdicts[-1]["reward"] for e in episodes])
