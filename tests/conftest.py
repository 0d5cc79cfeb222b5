"""Shared fixtures and helpers for the tests: the tiny model, the toy model, a saved toy checkpoint,
the real Qwen2.5-VL tokenizer (from tests/fixtures/qwen2-tokenizer), images and scripted samplers."""
import os

import numpy as np
import pytest
from PIL import Image

from support import models, policy
import toy.world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN_TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "qwen2-tokenizer")


@pytest.fixture(scope="session")
def tiny():
    """A randomly initialised tiny Qwen2.5-VL with the tiny tokenizer (models.tiny_agent, seed 0)."""
    return models.tiny_agent(seed=0)


@pytest.fixture(scope="session")
def toy_model():
    """A fresh toy model (toy.world.agent, seed 0): the toy's tokenizer, prompts and rotary layout."""
    return toy.world.agent(seed=0)


@pytest.fixture(scope="session")
def toy_base(tmp_path_factory, toy_model):
    """`toy_model` saved as a checkpoint folder: a stand-in for toy/base."""
    path = str(tmp_path_factory.mktemp("toy_base"))
    policy.save_agent(toy_model, path)
    return path


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The REAL Qwen2.5-VL tokenizer (vocabulary and added tokens at their released ids)."""
    return models.real_tokenizer(QWEN_TOKENIZER)


def noise_image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def scripted(agent, turns_by_task):
    """A sampler that emits canned turns: turns_by_task[task_index][turn] = (text, finish); the log-prob
    of every token is -0.5. Replaces the model in `lfpc.rollout(..., sample_fn=...)`."""
    count = {}

    def sample_fn(a, episodes, budget, cfg):
        out = []
        for ep in episodes:
            k = count.get(id(ep), 0)
            count[id(ep)] = k + 1
            text, finish = turns_by_task[ep.task_index][k]
            toks = agent.encode(text) + ([agent.im_end] if finish == "eos" else [])
            out.append((toks, [-0.5] * len(toks), finish))
        return out
    return sample_fn
