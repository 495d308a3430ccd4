"""The MRL replay buffer (docs/spec.md#mrl-curriculum-freezing-resets-replay): the best episodes of earlier rollouts,
replayed with every new one."""

from __future__ import annotations

import torch


class MrlReplayBuffer:
    """The `size` best episodes collected so far, replayed with every new rollout
    (docs/spec.md#mrl-curriculum-freezing-resets-replay).

    **Entry** = one collected episode: its `G = num_generations` rows of the episode-major rollout tensors
    (`start_stm`, `first_ids`, `saved_ids`, `qa_ids`, `action_mask`, `old_logps`, `rewards`, `turn_mask`, critic
    input, and with `stm_source="snapshot"` the STM snapshots) — everything the update needs to replay it — kept on
    the CPU. `values` and `advantages` are not stored: they are recomputed when the episode is replayed.

    **Score** (`score`) = mean over the episode's steps (those it has, `turn_mask`) of `mean_G(r) − std_G(r)`, the
    mean and (unbiased) standard deviation of that step's reward over the episode's `G` generations. The spec's
    "mean over steps of (mean reward − std reward)" puts both statistics *inside* the mean over steps, i.e. over the
    rows of one stored step: the reference stores per step a reward vector `[B]`
    (docs/spec.md#mrl-episode-and-rollout), so there they run over the rows it collected together; our rows of one
    episode are its `G` answers. With `G = 1` (critic) the std is 0 and the score is the mean reward over steps (not
    mean − std *over steps*, which would be a different quantity). The score ranks episodes that are good *and*
    consistent first. An episode without steps scores −inf.

    **Update** (`add`, once per rollout): every entry ages by one; `k = min(#new, max(update_size, free slots))` new
    episodes, best score first, are inserted with age 0, after evicting `k − free` entries: entries with
    `age >= max_age` first, then the others, each lowest score first (ties: older first). So an empty buffer fills at
    once, a full one replaces `update_size` entries per rollout, and it never holds more than `size`. The number of
    entries depends only on counts, never on rewards, so under DDP every process (each keeps its own buffer of its
    own episodes) replays the same number of rows.
    """

    def __init__(self, size: int, update_size: int, max_age: int = 3):
        for name, value, low in (("size", size, 1), ("update_size", update_size, 1), ("max_age", max_age, 1)):
            if type(value) is not int or value < low:
                raise ValueError(f"MrlReplayBuffer {name}={value!r}: expected an integer >= {low}.")
        if update_size > size:
            raise ValueError(f"MrlReplayBuffer update_size={update_size}: expected <= size ({size}).")
        self.size, self.update_size, self.max_age = size, update_size, max_age
        self.entries: list[dict] = []  # {"episode": {key: tensor [G, ...]}, "score": float, "age": int}

    def __len__(self) -> int:
        return len(self.entries)

    @staticmethod
    def score(rewards: torch.Tensor, turn_mask: torch.Tensor, generations: int = 1) -> torch.Tensor:
        """`rewards`, `turn_mask` `[E·G, N]` (G consecutive rows per episode) → scores `[E]` (see the class)."""
        steps = rewards.shape[-1]
        grouped = rewards.float().reshape(-1, generations, steps)
        valid = turn_mask.bool().reshape(-1, generations, steps).all(1)  # the rows of an episode share its steps
        spread = grouped.std(1) if generations > 1 else torch.zeros_like(grouped[:, 0])
        per_step = (grouped.mean(1) - spread).masked_fill(~valid, 0.0)
        count = valid.sum(-1)
        return torch.where(count > 0, per_step.sum(-1) / count.clamp(min=1), float("-inf"))

    def episodes(self) -> list[dict]:
        """The stored episodes (insertion order)."""
        return [entry["episode"] for entry in self.entries]

    def add(self, episodes: list[dict], scores) -> dict[str, int]:
        """Age every entry, evict, insert the best new episodes (see the class). Returns the counts."""
        scores = scores.tolist() if isinstance(scores, torch.Tensor) else list(scores)
        if len(scores) != len(episodes):
            raise ValueError(f"MrlReplayBuffer.add: {len(episodes)} episodes but {len(scores)} scores.")
        for entry in self.entries:
            entry["age"] += 1
        free = self.size - len(self.entries)
        count = min(len(episodes), max(self.update_size, free))
        evict = max(0, count - free)
        if evict:
            order = sorted(range(len(self.entries)), key=lambda i: (self.entries[i]["age"] < self.max_age,
                           self.entries[i]["score"], -self.entries[i]["age"], i))  # fmt: skip
            gone = set(order[:evict])
            self.entries = [entry for i, entry in enumerate(self.entries) if i not in gone]
        best = sorted(range(len(episodes)), key=lambda i: -scores[i])[:count]  # stable: ties keep collection order
        for i in best:
            episode = {key: value.detach().to("cpu", copy=True) for key, value in episodes[i].items()}
            self.entries.append({"episode": episode, "score": float(scores[i]), "age": 0})
        return {"evicted": evict, "inserted": count}

    def state_dict(self) -> dict:
        return {"size": self.size, "update_size": self.update_size, "max_age": self.max_age,
                "entries": [dict(entry) for entry in self.entries]}  # fmt: skip

    @classmethod
    def from_state_dict(cls, state: dict) -> MrlReplayBuffer:
        buffer = cls(state["size"], state["update_size"], state["max_age"])
        buffer.entries = [{"episode": {k: v.cpu() for k, v in e["episode"].items()}, "score": float(e["score"]),
                           "age": int(e["age"])} for e in state["entries"]]  # fmt: skip
        return buffer


def concat_padded(parts: list[dict], pad_id: int) -> dict:
    """Episode-major tensor dicts → one, each key padded on every dim but the first to the widest (`*_ids` with
    `pad_id`, `prompt_len` with 1, everything else with 0/False)."""
    keys = list(parts[0])
    if any(set(part) != set(keys) for part in parts):
        raise ValueError(f"concat_padded: parts with different keys {[sorted(part) for part in parts]}.")
    out = {}
    for key in keys:
        tensors = [part[key] for part in parts]
        shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
        value = pad_id if key.endswith("_ids") else (1 if key == "prompt_len" else 0)
        padded = []
        for tensor in tensors:
            if list(tensor.shape[1:]) != shape:
                full = tensor.new_full((tensor.shape[0], *shape), value)
                full[tuple(slice(0, n) for n in tensor.shape)] = tensor
                tensor = full
            padded.append(tensor)
        out[key] = torch.cat(padded)
    return out
