"""Seeds, derived in one place: the official evaluation protocol (bench, eval) and one derivation for the
episodes of data collection and online training.

Every seed is a function of named keys alone, never of the order jobs run in or which worker runs them, so
a resumed or parallel run repeats a serial one exactly.
"""
import zlib

import numpy as np


def evaluation_seeds(seed: int, task: str, episode: int) -> tuple[int, int]:
    """(env seed, planner-noise seed) of one evaluation episode. The env seed is the base seed, as in the official
    evaluation (the episode picks the reset, see `envs.episode_env`); the noise seed is drawn from (seed, task,
    episode), crc32 of the name keeping it independent of task order."""
    noise_seed = np.random.SeedSequence([seed, zlib.crc32(task.encode()), episode]).generate_state(1)[0]
    return seed, int(noise_seed)


def derive_seed(*keys: int) -> int:
    """A 31-bit seed for the env, agent noise and numpy draws of one collected or trained episode, from integer
    keys: (seed, task index, episode) for `data collect`, (seed, episode) for `train`."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0] >> 1)
