"""Issue 27 #2: a vanishing sampling temperature (1e-45, 1e-300, 5e-324) decodes greedily instead of from NaN."""

from __future__ import annotations

import math

import pytest
import torch

from model.config import MIN_SAMPLING_TEMPERATURE, GenerationConfig
from model.generate.base import generate_ids
from model.network.checkpoint import load_model
from model.network.deepresonance import Example


@pytest.fixture(scope="module")
def model(tiny_layout):
    return load_model(tiny_layout.vicuna, tiny_layout.delta_dir("alpha"), tiny_layout.imagebind)


def rows() -> list[Example]:
    g = torch.Generator().manual_seed(1)
    return [Example("<Audio>", "Describe the music.", [("audio", torch.randn(3, 1, 128, 204, generator=g))]),
            Example("", "Hi", [])]  # fmt: skip


@pytest.mark.parametrize("temperature", [0.0, 5e-324, 1e-300, 1e-45, MIN_SAMPLING_TEMPERATURE / 2])
def test_tiny_temperatures_mean_greedy(temperature):
    gen = GenerationConfig(do_sample=True, temperature=temperature)
    assert gen.do_sample is False
    assert GenerationConfig(do_sample=True, temperature=MIN_SAMPLING_TEMPERATURE).do_sample is True


@pytest.mark.parametrize("temperature", [-0.1, math.nan, math.inf, -math.inf])
def test_temperatures_that_are_no_number_of_sampling_are_refused(temperature):
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(temperature=temperature)


@pytest.mark.parametrize("decoder", ["generate", "static", "engine"])
@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-45])
def test_sampling_at_a_vanishing_temperature_gives_the_greedy_answer(model, decoder, temperature):
    greedy = generate_ids(model, rows(), GenerationConfig(max_new_tokens=8, do_sample=False, decoder="generate"))
    gen = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=temperature, seed=0, decoder=decoder)
    assert generate_ids(model, rows(), gen) == greedy
