"""The demo dataset's vocabulary (data_pipelines.demo): its splits, digits and directions, the
captions' wordings, the irrelevant sentences of caption_irrelevant noise, and the taxonomy of noun
and verb classes the captions name.
"""

from __future__ import annotations

import numpy as np

SPLITS = ('train', 'val', 'test')
DIRECTIONS = ('left', 'right', 'up', 'down')
DIGIT_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')

DIRECTION_PHRASES = {
  'left': ('to the left', 'left', 'leftwards'),
  'right': ('to the right', 'right', 'rightwards'),
  'up': ('up', 'upwards', 'towards the top'),
  'down': ('down', 'downwards', 'towards the bottom'),
}
VERBS = (('moves', 'moving'), ('drifts', 'drifting'), ('slides', 'sliding'), ('glides', 'gliding'))
TEMPLATES = (
  '{a} {word} {verb} {dir}',
  'the digit {num} {verb} {dir}',
  '{word} {verbing} {dir}',
  'a handwritten {word} {verb} {dir} over a textured background',
  'the number {word} {verb} {dir}',
  'we see {a} {word} {verbing} {dir}',
)
# Irrelevant captions name no digit, number or direction (caption_irrelevant noise).
IRRELEVANT = (
  'chop the onions and fry them gently in butter',
  'the soup simmers slowly on the stove',
  'whisk the eggs with a pinch of salt',
  'heavy rain is expected along the coast tonight',
  'the sky clears in the afternoon with a light breeze',
  'knead the dough and let it rest for an hour',
  'a warm front brings humid air and scattered showers',
  'season the sauce with pepper and fresh basil',
  'fog lingers over the valley this morning',
  'bake the bread until the crust turns golden',
  'strong winds are forecast for the weekend',
  'slice the tomatoes thinly and drizzle with olive oil',
)


def taxonomy() -> dict[str, dict[str, list[str]]]:
  """The demo's noun and verb classes with their synonyms (module docstring): what taxonomy.json
  holds. Class index = key order: noun d is digit d, verb i is DIRECTIONS[i]."""
  return {
    'nouns': {word: [word, str(d)] for d, word in enumerate(DIGIT_WORDS)},
    'verbs': {
      f'move {direction}': [
        f'{verb} {phrase}' for phrase in DIRECTION_PHRASES[direction] for verb in _motion_verbs()
      ]
      for direction in DIRECTIONS
    },
  }


def _motion_verbs() -> list[str]:
  return [form for forms in VERBS for form in forms]


def caption_tags(digit: int, direction: str) -> dict[str, list[int]]:
  """A clean caption's classes in taxonomy(): its digit and its direction's index."""
  return {'nouns': [int(digit)], 'verbs': [DIRECTIONS.index(direction)]}


def caption_form(rng: np.random.Generator) -> tuple[int, int, int]:
  """A caption's wording, drawn: indices into VERBS, TEMPLATES and a direction's 3 phrases."""
  verb = int(rng.integers(len(VERBS)))
  template = int(rng.integers(len(TEMPLATES)))
  return verb, template, int(rng.integers(3))


def caption_text(digit: int, direction: str, form: tuple[int, int, int]) -> str:
  """The caption of `digit` moving `direction` in the wording `form` (caption_form): captions of
  one form differ only in the digit (its word or numeral, with its article) and the direction
  phrase (the phrase of the same index)."""
  verb, template, phrase = form
  return TEMPLATES[template].format(
    a='an' if digit == 8 else 'a',
    word=DIGIT_WORDS[digit],
    num=digit,
    verb=VERBS[verb][0],
    verbing=VERBS[verb][1],
    dir=DIRECTION_PHRASES[direction][phrase],
  )
