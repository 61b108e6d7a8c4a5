"""§4.1's settings as the paper states them: per option, a sentence quoted from the paper
(../shared/paper.md) and the value parsed out of that quote.

Tests check that each quote really occurs in the paper (so a mis-quote fails) and that the config
under test holds the parsed value (so a wrong default or preset fails). Whitespace is normalised
before the comparison (paper.md wraps a sentence across a paragraph break and pads inline maths).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

PAPER = Path(__file__).resolve().parents[2] / ".." / "shared" / "paper.md"

ADAM = (
    "We based the whole optimization process on the Adam optimizer with a learning rate of 0.0001 "
    "for both the generator and the discriminator."
)
WEIGHTS = (
    "The logistic loss weight of the generator $\\alpha$ and the gradient penalty scale of the "
    "discriminator $\\lambda$ were both set to 10."
)
GUMBEL = "In Gumbel sigmoid, the inverse temperature was set to 0.9 without annealing."
D_STEPS = (
    "According to our experimental observation, as the pretrained generators were strong enough, we "
    "trained the discriminators 3 times per generator update."
)
D_INPUTS = (
    "For the discriminator, the image features $z = f_{ext}(x)$ and label set were both linearly "
    "projected onto 256-dimension vectors, and then simply concatenated and fed into 8 fully "
    "connected layers of 512 dimensions with leaky relu activation functions."
)
PAIRS = (
    "For each discriminator training iteration, we randomly sampled 3 batches for 3 kinds of inputs: "
    "matched pairs, generated pairs, and mismatched pairs, as indicated in Fig. 1(b); this is "
    "essential for training stability."
)
TEST_CROP = (
    "For testing, we simply resized all images to $224 \\times 224$ and conducted single-crop evaluation."
)


def _number(pattern: str) -> Callable[[str], float]:
    """The number that ``pattern``'s group captures in the quote."""

    def parse(quote: str) -> float:
        return float(re.search(pattern, quote).group(1))

    return parse


def _mentions(phrase: str) -> Callable[[str], bool]:
    return lambda quote: phrase in quote


# (option, quoted sentence, the option's value parsed from the quote)
PAPER_SETTINGS: list[tuple[str, str, Callable[[str], Any]]] = [
    # "the whole optimization process": phase 1's BCE training too
    ("optim.bce_lr", ADAM, _number(r"learning rate of ([0-9.]+)")),
    ("optim.g_lr", ADAM, _number(r"learning rate of ([0-9.]+) for both the generator")),
    ("optim.d_lr", ADAM, _number(r"learning rate of ([0-9.]+) for both the generator and the discriminator")),
    ("gan.bce_weight", WEIGHTS, _number(r"generator \$\\alpha\$ .* both set to ([0-9.]+)")),
    ("gan.gp_weight", WEIGHTS, _number(r"discriminator \$\\lambda\$ were both set to ([0-9.]+)")),
    ("gan.inv_temperature", GUMBEL, _number(r"inverse temperature was set to ([0-9.]+)")),
    ("gan.gumbel", GUMBEL, _mentions("In Gumbel sigmoid,")),
    ("gan.d_steps", D_STEPS, _number(r"discriminators ([0-9]+) times per generator update")),
    ("gan.proj_dim", D_INPUTS, _number(r"projected onto ([0-9]+)-dimension")),
    ("gan.num_layers", D_INPUTS, _number(r"fed into ([0-9]+) fully connected layers")),
    ("gan.hidden_dim", D_INPUTS, _number(r"layers of ([0-9]+) dimensions")),
    ("gan.conditional", D_INPUTS, _mentions("the image features $z = f_{ext}(x)$ and label set")),
    ("gan.negative_sampling", PAIRS, _mentions("and mismatched pairs")),
    ("data.image_size", TEST_CROP, _number(r"resized all images to \$([0-9]+) \\times")),
]
PAPER_SETTING_IDS = [option for option, _, _ in PAPER_SETTINGS]


def normalise(text: str) -> str:
    return " ".join(text.split())


@functools.cache
def _paper_text() -> str | None:
    return normalise(PAPER.read_text(encoding="utf-8")) if PAPER.is_file() else None


def paper_text() -> str:
    """The paper's text, whitespace-normalised; skips the test when ../shared is absent."""
    text = _paper_text()
    if text is None:
        pytest.skip(f"the paper is absent: these tests quote it from {PAPER.resolve()}")
    return text


def check_setting(option: str, quote: str, parse: Callable[[str], Any], value: Any) -> None:
    """``quote`` is in the paper, and ``value`` (the option's value in the config under test) is the
    value ``parse`` reads from it."""
    assert normalise(quote) in paper_text(), f"{option}: not a quote of {PAPER.name}: {quote!r}"
    expected = parse(quote)
    assert value == expected, f"{option} = {value!r}, but §4.1 says {expected!r}: {quote!r}"
